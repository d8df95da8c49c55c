"""Where a job's outputs go: a local folder or an `s3://bucket/prefix`, behind one small interface.

Keys are relative POSIX paths under the output root; every write is atomic and stays inside the root.
"""

from __future__ import annotations

import io
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import boto3
import botocore.session
import pyarrow.fs
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

MiB = 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 5

# In-progress local writes and write probes carry these names; listings leave them out.
TEMP_PREFIX = ".tmp-put-"
PROBE_PREFIX = ".write-probe-"

NO_CREDENTIALS_HINT = (
    "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or use an instance role"
)
REJECTED_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
MISSING_OBJECT_CODES = {"NoSuchKey", "NotFound", "404"}


class StorageError(Exception):
    """An output location that cannot be used; the message names the URI or key and the problem."""


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
    """Client tuning for S3 outputs; the defaults suit a long batch job."""

    max_attempts: int | None = None  # total tries per request; None: AWS_MAX_ATTEMPTS, else 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB


class Output(Protocol):
    """An output root that stores bytes under relative keys."""

    root_uri: str

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str: ...

    def get(self, key: str) -> bytes | None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def uri(self, key: str) -> str: ...

    def check_writable(self) -> None: ...


class LocalOutput:
    """An output root in a local (or mounted) folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().absolute()
        self.root_uri = self.root.as_uri()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        except OSError as err:
            raise StorageError(f"{path.as_uri()}: cannot write: {err.strerror or err}") from err
        return path.as_uri()

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
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

    def _path(self, key: str) -> Path:
        path = self.root / safe_key(key)
        # A symlinked folder inside the root could still point elsewhere.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise StorageError(f"storage key {key!r} resolves outside the output root {self.root_uri}")
        return path


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
        self._session: boto3.session.Session | None = None
        self._client = None

    # boto3 sessions and clients neither pickle nor survive a fork; each process builds its own.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None, "_client": None}

    @property
    def client(self):
        """The boto3 client, built on first use in whichever process this output now lives."""
        if self._client is None:
            core = botocore.session.get_session()
            attempts = (
                self.settings.max_attempts or core.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS
            )
            config = Config(
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=self.settings.connect_timeout,
                read_timeout=self.settings.read_timeout,
                # Self-hosted servers (rclone, MinIO) rarely resolve bucket subdomains.
                s3={"addressing_style": "path"} if self.endpoint else None,
            )
            self._session = boto3.session.Session(botocore_session=core)
            self._client = self._session.client("s3", endpoint_url=self.endpoint, config=config)
        return self._client

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        name = self._object_key(key)
        extra = {"ContentType": content_type} if content_type else {}
        with self._errors(self.uri(key)):
            if len(data) < self.settings.multipart_threshold:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=data, **extra)
            else:
                # A multipart upload only becomes visible when it completes, so it is atomic too.
                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, name, ExtraArgs=extra, Config=self._transfer_config()
                )
        return self.uri(key)

    def get(self, key: str) -> bytes | None:
        with self._errors(self.uri(key)):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            except ClientError as err:
                if _error_code(err) in MISSING_OBJECT_CODES:
                    return None
                raise
            return response["Body"].read()

    def exists(self, key: str) -> bool:
        with self._errors(self.uri(key)):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            except ClientError as err:
                if _error_code(err) in MISSING_OBJECT_CODES:
                    return False
                raise
            return True

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        keys = []
        with self._errors(self.root_uri):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._base + prefix
            )
            for page in pages:
                keys.extend(item["Key"][len(self._base) :] for item in page.get("Contents", []))
        return keys

    def delete(self, key: str) -> None:
        with self._errors(self.uri(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def check_writable(self) -> None:
        with self._errors(self.root_uri):
            self.client.head_bucket(Bucket=self.bucket)
        probe = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        self.put(probe, b"")
        self.delete(probe)

    def _object_key(self, key: str) -> str:
        return self._base + safe_key(key)

    def _transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.settings.multipart_threshold,
            multipart_chunksize=self.settings.multipart_chunksize,
            # The CRT transfer client would bypass this client's retry and timeout settings.
            preferred_transfer_client="classic",
        )

    @contextmanager
    def _errors(self, target: str):
        try:
            yield
        except (BotoCoreError, ClientError) as err:
            raise self._describe(target, err) from err

    def _describe(self, target: str, err: Exception) -> StorageError:
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(f"{target}: {NO_CREDENTIALS_HINT}")
        endpoint = self.client.meta.endpoint_url
        if isinstance(err, EndpointUnreachableError):
            return StorageError(f"{target}: cannot reach the S3 endpoint {endpoint}")
        if isinstance(err, (ReadTimeoutError, ConnectionClosedError)):
            return StorageError(f"{target}: the S3 endpoint {endpoint} stopped answering")
        if not isinstance(err, ClientError):
            return StorageError(f"{target}: {type(err).__name__}: {self._redact(str(err))}")
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
                f"for bucket '{self.bucket}'"
            )
        # HEAD answers carry no body, so a missing bucket shows only as a bare 404.
        if code == "NoSuchBucket" or (status == 404 and err.operation_name == "HeadBucket"):
            return StorageError(f"{target}: bucket '{self.bucket}' does not exist")
        message = self._redact(err.response.get("Error", {}).get("Message", ""))
        return StorageError(f"{target}: S3 refused {err.operation_name} with {code or status}: {message}")

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


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def open_output(uri: str, settings: S3Settings | None = None) -> Output:
    """Open a local path, `file://` path or `s3://bucket[/prefix]` as an output root."""
    if uri.startswith("s3://"):
        bucket, prefix = _parse_s3(uri)
        return S3Output(bucket, prefix, settings, endpoint=_endpoint_from_env())
    return LocalOutput(_local_path(uri))


def parquet_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """Give pyarrow a filesystem for `uri` with boto3's credentials and endpoint, and the path it expects."""
    if not uri.startswith("s3://"):
        return pyarrow.fs.LocalFileSystem(), str(_local_path(uri))
    bucket, prefix = _parse_s3(uri)
    session = boto3.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise StorageError(f"{uri}: {NO_CREDENTIALS_HINT}")
    frozen = credentials.get_frozen_credentials()
    endpoint = _endpoint_from_env()
    location = {}
    if endpoint:
        parts = urlsplit(endpoint)
        location = {
            "endpoint_override": parts.netloc + parts.path.rstrip("/"),
            "scheme": parts.scheme or "https",
        }
    filesystem = pyarrow.fs.S3FileSystem(
        access_key=frozen.access_key,
        secret_key=frozen.secret_key,
        session_token=frozen.token,
        region=session.region_name,
        **location,
    )
    return filesystem, f"{bucket}/{prefix}" if prefix else bucket


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
