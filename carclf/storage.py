"""Where a pipeline's outputs go: a local path (the default) or a URI, through ``pyarrow.fs``.

``output_dir`` may be ``runs/x/train``, ``/shared/runs/x/train``, ``file:///shared/…``,
``s3://bucket/runs/x/train``, ``gs://…``: anything ``pyarrow.fs.FileSystem.from_uri`` resolves.
Ray Train writes its checkpoints there itself (``storage_path`` + ``storage_filesystem``). The files
carclf writes itself (bundle, evaluation, reports, the run's CSV and TensorBoard logs) go to a
local staging directory first and are copied up with :meth:`Storage.upload`. On the local
filesystem (a plain path or ``file://``) there is nothing to stage: everything is written in place.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from carclf.errors import UserInputError


def is_uri(path: str) -> bool:
    """Whether ``path`` names a filesystem scheme (``s3://…``) rather than a local path."""
    return "://" in path


@dataclass(frozen=True)
class Storage:
    """An output directory: the filesystem that holds it, its path there and its name for users."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        """True when the path is on this machine's filesystem (no staging, no copying)."""
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def parent(self) -> Storage:
        """The directory that holds this one."""
        return Storage(self.filesystem, _parent(self.path), _parent(self.uri))

    def sibling(self, name: str) -> Storage:
        """The directory ``name`` beside this one (``…/train`` → ``…/bundle``)."""
        up = self.parent()
        return Storage(self.filesystem, f"{up.path}/{name}", f"{up.uri}/{name}")

    def ray_storage(self) -> dict[str, Any]:
        """``RunConfig`` keywords that put a Ray Train run named ``self.name`` at this path."""
        if self.is_local:
            return {"storage_path": _parent(self.path)}
        return {"storage_path": _parent(self.path), "storage_filesystem": self.filesystem}

    def upload(self, local_dir: str | Path) -> str:
        """Copy the tree ``local_dir`` into this directory; returns where it now lives."""
        if self.is_local and Path(local_dir).resolve() == Path(self.path):
            return self.path
        self.filesystem.create_dir(self.path, recursive=True)
        pafs.copy_files(
            str(Path(local_dir).resolve()),
            self.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )
        return self.path

    def exists(self, relative: str = "") -> bool:
        """Whether this directory (or a file below it) exists."""
        path = posixpath.join(self.path, relative) if relative else self.path
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


def open_storage(output_dir: str, filesystem: pafs.FileSystem | None = None) -> Storage:
    """Resolve ``output_dir`` (a path or a URI) to a :class:`Storage`.

    Args:
        output_dir: the config's ``output_dir``.
        filesystem: a filesystem that ``output_dir`` is a path inside (tests pass a
            ``SubTreeFileSystem``); by default the scheme of ``output_dir`` picks it.
    """
    output_dir = output_dir.rstrip("/")
    if filesystem is not None:
        return Storage(filesystem, output_dir, output_dir)
    if not is_uri(output_dir):
        local = str(Path(output_dir).resolve())
        return Storage(pafs.LocalFileSystem(), local, local)
    try:
        resolved, path = pafs.FileSystem.from_uri(output_dir)
    except (ValueError, OSError) as exc:
        raise UserInputError(f"output_dir: cannot open {output_dir!r} ({exc})") from None
    return Storage(resolved, path.rstrip("/"), output_dir)
