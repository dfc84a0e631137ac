"""The one exception type that means "the user's input is wrong" (exit code 2), and how a
client's value is quoted in such a message."""

from __future__ import annotations

import reprlib


class UserInputError(Exception):
    """Bad input or bad configuration: the message is one line that names the file, key or class.

    Entrypoints turn it into exit code 2; every other exception is exit code 1.
    """


# Cut short and at most 3 levels deep; built once (Python 3.10 and 3.11 take no keyword
# arguments here).
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 3, 40, 40, 40


def shown(value: object) -> str:
    """A client's value in an error message: its repr, cut short and at most 3 levels deep, so
    a 900-deep list neither floods the message nor recurses."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int past Python's 4,300-digit limit for conversion to text
        return "a number of more than 4300 digits"
