"""Whether a directory tree is this user's own: the one check carclf makes before a library
unpickles state from it (a pickle runs code while it loads).

carclf's own loaders never need this: run checkpoints are read with torch's ``weights_only``
unpickler (:mod:`carclf.runs`), because a run directory may be shared. Ray Tune's restore state
(``tuner.pkl``, ``experiment_state-*.json``, ``searcher-state-*.pkl``, a trial's ``error.pkl``)
can only be read with a full unpickler, so whoever can write it can run code as the user who
restores it. Such a tree is trusted only when every directory and file in it is owned by the
user and writable by nobody else; anything else needs the user's explicit confirmation.
Imports nothing heavy, so the check runs before Ray starts.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from functools import cache
from pathlib import Path

from carclf.errors import UserInputError


@cache
def _private_group(gid: int, uid: int) -> bool:
    """Whether ``gid`` is ``uid``'s own user-private group (same name, no other member).

    Under the user-private-group convention (Debian, Ubuntu, Fedora) the default umask is 002,
    so every file Tune writes is group-writable; refusing those would only teach users to
    pass the confirmation flag.
    """
    try:
        user, group = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    return (
        user.pw_gid == gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}
    )


def not_own(path: Path, uid: int | None = None) -> str | None:
    """Why ``path`` (its target, for a link: what would be read) is not the user's own.

    Args:
        path: a file or directory.
        uid: the user (default: this process's effective user).

    Returns:
        A short reason ("owned by uid 1001", "writable by others"), or None when it is
        owned by ``uid`` and writable by nobody else.
    """
    uid = os.geteuid() if uid is None else uid
    st = os.stat(path)
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not {uid}"
    if st.st_mode & stat.S_IWOTH:
        return "writable by others"
    if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid, uid):
        return f"writable by group {st.st_gid}"
    return None


def _entries(root: Path, top: Path) -> list[Path]:
    """``root``'s parents up to ``top`` (whoever can write one can swap ``root``), then every
    directory and file inside ``root``, without descending into linked directories."""
    chain = [root, *root.parents]
    found = chain[: chain.index(top) + 1] if top in chain else [root]
    for here, dirs, files in os.walk(root):
        found += [Path(here, name) for name in (*dirs, *files)]
    return found


def check_own_tree(root: Path, *, top: Path | None = None, confirm: str) -> None:
    """Refuse to load pickled state from ``root`` unless all of it is the user's own.

    Args:
        root: the directory whose files are about to be unpickled.
        top: the outermost parent of ``root`` to check as well (default: ``root`` only).
        confirm: how the user confirms anyway (a flag), named in the message.

    Raises:
        UserInputError: naming the first entry that is not the user's own, and why.
    """
    for path in _entries(Path(root), Path(top or root)):
        try:
            why = not_own(path)
        except FileNotFoundError:  # a dangling link, or removed meanwhile: nothing to read
            continue
        if why:
            raise UserInputError(
                f"{path}: refused to restore from it, it is {why} and the state in it is "
                f"pickled (loading it can run code); make it yours (chown, chmod go-w) "
                f"or confirm with {confirm}"
            )
