"""Where a job's outputs go: a local folder or an `s3://bucket/prefix`, behind one small interface (`Output`,
store.location), opened by URI here; and reading inputs from either.

Keys are relative POSIX paths under the output root; every write is atomic and stays inside the root. S3 calls
ride out transient failures (store.retry) for `S3Settings.outage_s`. The conditional writes (`put_new`,
`put_if_version`) are what the output's lease is built on. Every S3 object carries the sha256 of its bytes in its
user metadata, checked whenever the whole object is read, whatever boto3's own checksum settings are.
"""

from __future__ import annotations

import glob
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from .local_output import LocalOutput
from .location import Output, S3Settings, StorageError, safe_key
from .s3_output import S3Output

__all__ = ["LocalOutput", "Output", "S3Output", "S3Settings", "StorageError", "list_files", "open_input",
           "open_output", "safe_key"]


def open_output(uri: str, settings: S3Settings | None = None) -> Output:
    """Open a local path, `file://` path or `s3://bucket[/prefix]` as an output root."""
    if uri.startswith("s3://"):
        bucket, prefix = _parse_s3(uri)
        return S3Output(bucket, prefix, settings, endpoint=_endpoint_from_env())
    return LocalOutput(_local_path(uri))


def list_files(location: str, suffix: str = "", settings: S3Settings | None = None) -> list[str] | None:
    """The files at a location, as sorted URIs: the file itself, the files ending in `suffix` under a folder or
    S3 prefix, or the matches of a glob (`*`, `?`, `[...]`; `**` crosses folders). None when nothing is there."""
    is_glob = any(c in location for c in "*?[")
    if not location.startswith("s3://"):
        path = _local_path(location)
        if is_glob:
            files = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        elif path.is_file():
            files = [str(path)]
        elif path.is_dir():
            files = [str(path / key) for key in LocalOutput(path).list() if key.endswith(suffix)]
        else:
            return None
        return files or None
    literal = re.split(r"[*?\[]", location, maxsplit=1)[0]
    bucket, prefix = _parse_s3(literal.rpartition("/")[0] + "/" if is_glob else location)
    bucket_root = open_output(f"s3://{bucket}", settings)
    uris = [f"s3://{bucket}/{key}" for key in bucket_root.list(f"{prefix}/" if prefix else "")]
    if is_glob:
        files = sorted(u for u in uris if fnmatchcase(u, location))
    elif uris:
        files = sorted(u for u in uris if u.endswith(suffix))
    else:
        files = [f"s3://{bucket}/{prefix}"] if prefix and bucket_root.exists(prefix) else []
    return files or None


def open_input(uri: str, settings: S3Settings | None = None) -> BinaryIO:
    """A seekable binary file for reading a local path or an s3:// object (ranged GETs, same retries)."""
    if uri.startswith("s3://"):
        bucket, key = _parse_s3(uri)
        return open_output(f"s3://{bucket}", settings).open_read(key)
    path = _local_path(uri)
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as err:
        raise StorageError(f"{path}: cannot read: {err.strerror or err}") from err


def _endpoint_from_env() -> str | None:
    """The endpoint boto3 itself would pick from the environment; the S3-specific variable wins."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _parse_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name")
    if prefix:
        try:
            safe_key(prefix)
        except StorageError as err:
            raise StorageError(f"{uri}: {err}") from None
    return bucket, prefix


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file URIs on another host ({parts.netloc}) are not supported")
        return Path(unquote(parts.path))
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; use a local path, file:// or s3://")
    return Path(uri).expanduser().absolute()
