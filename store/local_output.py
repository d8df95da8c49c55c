"""An output root in a local (or mounted) folder: atomic writes by rename, made durable with fsync, and the
conditional writes of the output's lease under a folder lock."""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .location import PROBE_PREFIX, READ_BUFFER, TEMP_PREFIX, StorageError, check_prefix, safe_key


class LocalOutput:
    """An output root in a local (or mounted) folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().absolute()
        self.root_uri = self.root.as_uri()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        return self._write(key, lambda file: file.write(data), os.replace)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        def copy(file):
            with open(path, "rb") as source:
                shutil.copyfileobj(source, file, READ_BUFFER)

        return self._write(key, copy, os.replace)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StorageError(f"{path.as_uri()}: cannot read: {err.strerror or err}") from err

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with self.open_read(key) as file:
            file.seek(start)
            return file.read(length)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except OSError as err:
            raise StorageError(f"{path.as_uri()}: cannot read: {err.strerror or err}") from err

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        # Only the folder the prefix points into needs walking, not the whole root.
        start = self.root / prefix.rpartition("/")[0]
        keys = []
        for folder, _subfolders, files in os.walk(start):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = Path(folder, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise StorageError(f"{path.as_uri()}: cannot delete: {err.strerror or err}") from err

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root_uri}: exists but is not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{self.root_uri}: cannot create the folder: {err.strerror or err}") from err
        probe = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        self.put(probe, b"")
        self.delete(probe)

    # A local object's version is the sha256 of its bytes; the folder's flock makes compare-and-swap atomic
    # between processes on this host.
    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        data = self.get(key)
        return None if data is None else (data, _digest(data))

    def put_new(self, key: str, data: bytes) -> str | None:
        def link_if_absent(temp: Path, path: Path) -> None:
            os.link(temp, path)  # fails if the name exists: an exclusive create of the whole content
            temp.unlink()

        try:
            with self._locked(key):
                self._write(key, lambda file: file.write(data), link_if_absent)
        except StorageError as err:
            if isinstance(err.__cause__, FileExistsError):
                return None
            raise
        return _digest(data)

    def put_if_version(self, key: str, data: bytes, version: str) -> str | None:
        with self._locked(key):
            current = self.read_versioned(key)
            if current is None or current[1] != version:
                return None
            self.put(key, data)
        return _digest(data)

    def _write(self, key: str, fill: Callable[[BinaryIO], object], commit: Callable[[Path, Path], None]) -> str:
        path = self._path(key)
        temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as file:
                    fill(file)
                    file.flush()
                    os.fsync(file.fileno())
                commit(temp, path)
            finally:
                temp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except OSError as err:
            raise StorageError(f"{path.as_uri()}: cannot write: {err.strerror or err}") from err
        return path.as_uri()

    def _locked(self, key: str):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FolderLock(path.parent)

    def _path(self, key: str) -> Path:
        path = self.root / safe_key(key)
        # A symlinked folder inside the root could still point elsewhere.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise StorageError(f"storage key {key!r} resolves outside the output root {self.root_uri}")
        return path


class FolderLock:
    """An flock on a folder, exclusive or shared, held for a `with` block (between processes on this host)."""

    def __init__(self, folder: Path, shared: bool = False):
        self.folder = folder
        self.shared = shared

    def __enter__(self):
        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: it only survives a crash once the folder's entry is on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


