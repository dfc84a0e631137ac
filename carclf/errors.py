"""The one exception type that means "the user's input is wrong" (exit code 2)."""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input or bad configuration: the message is one line that names the file, key or class.

    Entrypoints turn it into exit code 2; every other exception is exit code 1.
    """
