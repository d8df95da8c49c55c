"""Where a job's outputs go: a local folder or an `s3://bucket/prefix`, behind one small interface.

Keys are relative POSIX paths under the output root; every write is atomic and stays inside the root. S3 calls
ride out transient failures (store.retry) for `S3Settings.outage_s`. The conditional writes (`put_new`,
`put_if_version`) are what the output's lease is built on. Every S3 object carries the sha256 of its bytes in its
user metadata, checked whenever the whole object is read, whatever boto3's own checksum settings are.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import io
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as EndpointUnreachableError

from .retry import DEFAULT_OUTAGE_S, is_transient, retry_transient

T = TypeVar("T")
MiB = 1024 * 1024
# Quick retries inside botocore for a dropped packet; store.retry covers the longer outages around them.
DEFAULT_MAX_ATTEMPTS = 3
READ_BUFFER = 4 * MiB

# The user metadata entry (x-amz-meta-sha256) holding the hex sha256 of an object's bytes, set on every S3 write.
SHA256_METADATA = "sha256"
# boto3 >= 1.36 sends a CRC with every upload and validates responses ("when_supported"). Many S3-compatible
# stores reject the former or send a whole object's checksum with a ranged GET, so for an endpoint other than AWS
# both settings default to "when_required", as other S3 clients do; a user's own setting always wins.
CHECKSUM_SETTINGS = {"request_checksum_calculation": "AWS_REQUEST_CHECKSUM_CALCULATION",
                     "response_checksum_validation": "AWS_RESPONSE_CHECKSUM_VALIDATION"}
COMPATIBLE_CHECKSUM_MODE = "when_required"
AWS_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")

# In-progress local writes and write probes carry these names; listings leave them out.
TEMP_PREFIX = ".tmp-put-"
PROBE_PREFIX = ".write-probe-"

NO_CREDENTIALS_HINT = (
    "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or use an instance role"
)
REJECTED_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
MISSING_OBJECT_CODES = {"NoSuchKey", "NotFound", "404"}
# A conditional write that lost: the object exists (If-None-Match), or changed (If-Match), or another
# conditional write to it is in flight.
CONDITION_FAILED_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


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


def _check_prefix(prefix: str) -> None:
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
        _check_prefix(prefix)
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
        return _FolderLock(path.parent)

    def _path(self, key: str) -> Path:
        path = self.root / safe_key(key)
        # A symlinked folder inside the root could still point elsewhere.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise StorageError(f"storage key {key!r} resolves outside the output root {self.root_uri}")
        return path


class _FolderLock:
    """An exclusive flock on a folder, held for a `with` block."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
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


class S3Output:
    """An output root under an S3 bucket, through boto3's standard credential chain."""

    def __init__(
        self, bucket: str, prefix: str = "", settings: S3Settings | None = None, endpoint: str | None = None
    ):
        self.bucket = bucket
        self.prefix = prefix
        self.settings = settings or S3Settings()
        self.endpoint = endpoint
        self.root_uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._base = f"{prefix}/" if prefix else ""
        self._core: botocore.session.Session | None = None
        self._session: boto3.session.Session | None = None
        self._client = None
        self._ranged_client = None
        self._compatible = False  # an S3-compatible store rather than AWS: decided when the client is built

    # boto3 sessions and clients neither pickle nor survive a fork; each process builds its own.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_core": None, "_session": None, "_client": None, "_ranged_client": None}

    @property
    def client(self):
        """The boto3 client, built on first use in whichever process this output now lives."""
        if self._client is None:
            self._compatible = self.endpoint is not None and not is_aws_endpoint(self.endpoint)
            self._client = self._new_client()
            if not self._compatible and not is_aws_endpoint(self._client.meta.endpoint_url):
                # An endpoint_url from the AWS config file: known only once botocore has resolved it.
                self._compatible = True
                self._client = self._new_client()
        return self._client

    @property
    def ranged_client(self):
        """A client that never validates a response checksum: some stores send the whole object's checksum with
        a ranged GET, which botocore would then check against the range. Parquet's page checksums and the
        manifest's sha256 of each image check what ranged reads bring instead."""
        if self._ranged_client is None:
            self.client  # noqa: B018 - decides whether the endpoint is AWS
            self._ranged_client = self._new_client(response_checksum_validation=COMPATIBLE_CHECKSUM_MODE)
        return self._ranged_client

    def _new_client(self, **overrides):
        if self._session is None:
            self._core = botocore.session.get_session()
            self._session = boto3.session.Session(botocore_session=self._core)
        core = self._core
        attempts = self.settings.max_attempts or core.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS
        modes = checksum_modes(core) if self._compatible else {}
        config = Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            # Self-hosted servers (rclone, MinIO) rarely resolve bucket subdomains.
            s3={"addressing_style": "path"} if self._compatible else None,
            **{**modes, **overrides},
        )
        return self._session.client("s3", endpoint_url=self.endpoint, config=config)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        if len(data) >= self.settings.multipart_threshold:
            return self._upload(key, lambda: io.BytesIO(data), content_type)
        extra = {"ContentType": content_type} if content_type else {}
        self._call(self.uri(key), lambda: self.client.put_object(Bucket=self.bucket, Key=self._object_key(key),
                                                                 Body=data, Metadata=_sha256_metadata(data),
                                                                 **extra))
        return self.uri(key)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        return self._upload(key, lambda: open(path, "rb"), content_type)  # noqa: SIM115 - closed by _upload

    def get(self, key: str) -> bytes | None:
        found = self.read_versioned(key)
        return None if found is None else found[0]

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        span = f"bytes={start}-{start + length - 1}"
        return self._call(self.uri(key), lambda: self.ranged_client.get_object(
            Bucket=self.bucket, Key=self._object_key(key), Range=span)["Body"].read())

    def open_read(self, key: str) -> BinaryIO:
        size = self._call(self.uri(key), lambda: self.client.head_object(
            Bucket=self.bucket, Key=self._object_key(key))["ContentLength"])
        return io.BufferedReader(_RangeReader(self, key, size), buffer_size=READ_BUFFER)

    def exists(self, key: str) -> bool:
        def probe():
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            except ClientError as err:
                if _error_code(err) in MISSING_OBJECT_CODES:
                    return False
                raise
            return True

        return self._call(self.uri(key), probe)

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)

        def listing():
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self._base + prefix)
            return [item["Key"][len(self._base):] for page in pages for item in page.get("Contents", [])]

        return self._call(self.root_uri, listing)

    def delete(self, key: str) -> None:
        self._call(self.uri(key), lambda: self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key)))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def check_writable(self) -> None:
        self._call(self.root_uri, lambda: self.client.head_bucket(Bucket=self.bucket))
        probe = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        self.put(probe, b"")
        self.delete(probe)

    # An S3 object's version is its ETag; conditional PUTs (If-None-Match, If-Match) compare against it.
    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        def fetch():
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            except ClientError as err:
                if _error_code(err) in MISSING_OBJECT_CODES:
                    return None
                raise
            return response["Body"].read(), response["ETag"], response.get("Metadata", {})

        found = self._call(self.uri(key), fetch)
        if found is None:
            return None
        data, etag, metadata = found
        self._verify(key, data, metadata)
        return data, etag

    def put_new(self, key: str, data: bytes) -> str | None:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def put_if_version(self, key: str, data: bytes, version: str) -> str | None:
        return self._conditional_put(key, data, IfMatch=version)

    def _conditional_put(self, key: str, data: bytes, **condition) -> str | None:
        def attempt():
            try:
                response = self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data,
                                                  ContentType="application/json", Metadata=_sha256_metadata(data),
                                                  **condition)
            except ClientError as err:
                if _error_code(err) in CONDITION_FAILED_CODES:
                    return None
                raise
            return response["ETag"]

        return self._call(self.uri(key), attempt)

    def _upload(self, key: str, open_body: Callable[[], BinaryIO], content_type: str | None) -> str:
        with open_body() as body:
            digest = hashlib.sha256()
            while chunk := body.read(READ_BUFFER):
                digest.update(chunk)
        extra = {"Metadata": {SHA256_METADATA: digest.hexdigest()}}
        if content_type:
            extra["ContentType"] = content_type

        def upload():
            # A multipart upload only becomes visible when it completes, so it is atomic too.
            with open_body() as body:
                self.client.upload_fileobj(body, self.bucket, self._object_key(key), ExtraArgs=extra,
                                           Config=self._transfer_config())

        self._call(self.uri(key), upload)
        return self.uri(key)

    def _object_key(self, key: str) -> str:
        return self._base + safe_key(key)

    def _verify(self, key: str, data: bytes, metadata: dict[str, str]) -> None:
        """Compares the bytes read with the sha256 stored at write time; objects written without one pass."""
        # Metadata names are case-insensitive; some servers (rclone) capitalise them.
        stored = {name.lower(): value for name, value in metadata.items()}.get(SHA256_METADATA)
        if stored is not None and stored != _digest(data):
            raise StorageError(
                f"{self.uri(key)}: the object's bytes do not match the sha256 stored with it when it was written; "
                "it was changed or damaged in the store: restore it, or delete it so that a rerun writes it anew"
            )

    def _transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.settings.multipart_threshold,
            multipart_chunksize=self.settings.multipart_chunksize,
            # The CRT transfer client would bypass this client's retry and timeout settings.
            preferred_transfer_client="classic",
        )

    def _call(self, target: str, call: Callable[[], T]) -> T:
        try:
            return retry_transient(call, self.settings.outage_s, target)
        except (BotoCoreError, ClientError) as err:
            raise self._describe(target, err) from err

    def _describe(self, target: str, err: Exception) -> StorageError:
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(f"{target}: {NO_CREDENTIALS_HINT}")
        endpoint = self.client.meta.endpoint_url
        retried = f"(retried for {self.settings.outage_s:g} s)"
        if isinstance(err, EndpointUnreachableError):
            return StorageError(f"{target}: cannot reach the S3 endpoint {endpoint} {retried}; if it stays away, "
                                "check AWS_ENDPOINT_URL", transient=True)
        if isinstance(err, (ReadTimeoutError, ConnectionClosedError)):
            return StorageError(f"{target}: the S3 endpoint {endpoint} stopped answering {retried}", transient=True)
        if not isinstance(err, ClientError):
            return StorageError(f"{target}: {type(err).__name__}: {self._redact(str(err))}",
                                transient=is_transient(err))
        code = _error_code(err)
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in REJECTED_CREDENTIAL_CODES:
            return StorageError(
                f"{target}: the S3 endpoint rejected the credentials ({code}); "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the AWS profile"
            )
        if code == "AccessDenied" or status == 403:
            return StorageError(
                f"{target}: access denied (HTTP 403); the credentials are wrong or lack permission "
                f"for bucket '{self.bucket}': use credentials that may read and write it"
            )
        # HEAD answers carry no body, so a missing bucket or object shows only as a bare 404.
        if code == "NoSuchBucket" or (status == 404 and err.operation_name == "HeadBucket"):
            return StorageError(f"{target}: bucket '{self.bucket}' does not exist; create it or correct the URI")
        if code in MISSING_OBJECT_CODES:
            return StorageError(f"{target}: no such object")
        message = self._redact(err.response.get("Error", {}).get("Message", ""))
        return StorageError(f"{target}: S3 refused {err.operation_name} with {code or status}: {message}",
                            transient=is_transient(err))

    def _redact(self, text: str) -> str:
        """Strip the current keys from server-supplied text before it reaches a message or a log."""
        credentials = self._session.get_credentials() if self._session else None
        if credentials is None:
            return text
        frozen = credentials.get_frozen_credentials()
        for secret in (frozen.access_key, frozen.secret_key, frozen.token):
            if secret:
                text = text.replace(secret, "***")
        return text


class _RangeReader(io.RawIOBase):
    """A seekable read-only view of one S3 object, fetched by ranged GETs (what Parquet readers need)."""

    def __init__(self, output: S3Output, key: str, size: int):
        self.output, self.key, self.size, self.position = output, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        length = min(len(buffer), self.size - self.position)
        if length <= 0:
            return 0
        data = self.output.get_range(self.key, self.position, length)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def _sha256_metadata(data: bytes) -> dict[str, str]:
    return {SHA256_METADATA: _digest(data)}


def is_aws_endpoint(url: str) -> bool:
    """Whether an endpoint URL is Amazon S3 itself rather than an S3-compatible store."""
    host = urlsplit(url).hostname or ""
    return any(f".{host}".endswith(suffix) for suffix in AWS_HOST_SUFFIXES)


def checksum_modes(core: botocore.session.Session) -> dict[str, str]:
    """The checksum settings for an S3-compatible store: "when_required" for each one the user has not set in the
    environment or the AWS config file; botocore applies the user's own."""
    scoped = core.get_scoped_config()
    return {name: COMPATIBLE_CHECKSUM_MODE for name, variable in CHECKSUM_SETTINGS.items()
            if not os.environ.get(variable) and name not in scoped}


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


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
