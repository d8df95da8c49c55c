"""What every output location shares: the error that names a location's problem, the rule for safe keys, the
S3 client settings, and the `Output` interface that store.local_output and store.s3_output implement."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from .retry import DEFAULT_OUTAGE_S

MiB = 1024 * 1024
READ_BUFFER = 4 * MiB
# In-progress local writes and write probes carry these names; listings leave them out.
TEMP_PREFIX = ".tmp-put-"
PROBE_PREFIX = ".write-probe-"


class StorageError(Exception):
    """An output location that cannot be used; the message names the URI or key and the problem.

    `transient` is True only for what a later run can get past as it is: an endpoint unreachable, silent or
    throttling after the retries ran out. Everything else (access, a missing bucket or object, a damaged object)
    is met again by every rerun until someone fixes it, so that is the default: a scheduler is not sent into a
    loop of reruns by an error nobody classified."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):  # keeps `transient` when the error crosses processes (Ray tasks)
        return type(self), (str(self), self.transient)


def safe_key(key: str) -> str:
    """Return `key` unchanged if it is a plain relative POSIX path, else raise StorageError."""
    reason = None
    if not key:
        reason = "it is empty"
    elif any(ord(char) < 32 or ord(char) == 127 for char in key):
        reason = "it contains a control character"
    elif "\\" in key:
        reason = "it contains a backslash"
    elif key.startswith("/"):
        reason = "it is an absolute path"
    elif any(segment in ("", ".", "..") for segment in key.split("/")):
        reason = "it has an empty, '.' or '..' path segment"
    if reason:
        raise StorageError(f"unsafe storage key {key!r}: {reason}")
    return key


def check_prefix(prefix: str) -> None:
    """A listing prefix is a key, or a key with one trailing slash, or empty."""
    if prefix:
        safe_key(prefix.removesuffix("/"))


@dataclass(frozen=True)
class S3Settings:
    """Client tuning for S3 locations; the defaults suit a long batch job."""

    max_attempts: int | None = None  # botocore's tries per request; None: AWS_MAX_ATTEMPTS, else 3
    outage_s: float = DEFAULT_OUTAGE_S  # how long transient failures are retried before a call gives up
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB


class Output(Protocol):
    """An output root that stores bytes under relative keys."""

    root_uri: str

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str: ...

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str: ...

    def get(self, key: str) -> bytes | None: ...

    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    def open_read(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def uri(self, key: str) -> str: ...

    def check_writable(self) -> None: ...

    def read_versioned(self, key: str) -> tuple[bytes, str] | None: ...

    def put_new(self, key: str, data: bytes) -> str | None: ...

    def put_if_version(self, key: str, data: bytes, version: str) -> str | None: ...
