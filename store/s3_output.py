"""An output root under an S3 bucket (AWS or an S3-compatible store), through boto3's standard credential chain.

Calls ride out transient failures (store.retry) for `S3Settings.outage_s`. Every object carries the sha256 of its
bytes in its user metadata, checked whenever the whole object is read, whatever boto3's own checksum settings are.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

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

from .location import PROBE_PREFIX, READ_BUFFER, S3Settings, StorageError, check_prefix, safe_key
from .requests import on_request_created
from .retry import is_transient, retry_transient

T = TypeVar("T")
MAX_POOL_CONNECTIONS = 32
_CLIENTS: dict[tuple, tuple] = {}  # this process's clients (S3Output.client), by what builds them
_CLIENTS_LOCK = threading.RLock()
# Quick retries inside botocore for a dropped packet; store.retry covers the longer outages around them.
DEFAULT_MAX_ATTEMPTS = 3

# The user metadata entry (x-amz-meta-sha256) holding the hex sha256 of an object's bytes, set on every S3 write.
SHA256_METADATA = "sha256"
# boto3 >= 1.36 sends a CRC with every upload and validates responses ("when_supported"). Many S3-compatible
# stores reject the former or send a whole object's checksum with a ranged GET, so for an endpoint other than AWS
# both settings default to "when_required", as other S3 clients do; a user's own setting always wins.
CHECKSUM_SETTINGS = {"request_checksum_calculation": "AWS_REQUEST_CHECKSUM_CALCULATION",
                     "response_checksum_validation": "AWS_RESPONSE_CHECKSUM_VALIDATION"}
COMPATIBLE_CHECKSUM_MODE = "when_required"
AWS_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")

NO_CREDENTIALS_HINT = (
    "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or use an instance role"
)
REJECTED_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
MISSING_OBJECT_CODES = {"NoSuchKey", "NotFound", "404"}
# A conditional write that lost: the object exists (If-None-Match), or changed (If-Match), or another
# conditional write to it is in flight.
CONDITION_FAILED_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
# Refused, these only needed read access: the hint says so.
READ_OPERATIONS = {"GetObject", "HeadObject", "ListObjectsV2"}


@dataclass(frozen=True)
class StoredObject:
    """What a HEAD tells of an object: its size, and the sha256 stored with it (None for objects written without
    one, by older versions or other tools)."""

    size: int
    sha256: str | None


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
        self._ranged_client = None
        self._compatible = False  # an S3-compatible store rather than AWS: decided when the client is built

    # boto3 sessions and clients neither pickle nor survive a fork; each process builds its own.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None, "_client": None, "_ranged_client": None}

    @property
    def client(self):
        """The boto3 client, built on first use in whichever process this output now lives, and shared there by
        every output with the same endpoint, settings and AWS environment (a writer task's output is unpickled
        anew for each task; building a client costs tens of milliseconds of CPU)."""
        if self._client is None:
            self._client, self._session, self._compatible = _shared_client(self, "plain")
        return self._client

    @property
    def ranged_client(self):
        """A client that never validates a response checksum: some stores send the whole object's checksum with
        a ranged GET, which botocore would then check against the range. Parquet's page checksums and the
        manifest's sha256 of each image check what ranged reads bring instead."""
        if self._ranged_client is None:
            self.client  # noqa: B018 - decides whether the endpoint is AWS
            self._ranged_client = _shared_client(self, "ranged")[0]
        return self._ranged_client

    def _build_clients(self, kind: str):
        """A new client of `kind` ("plain" or "ranged"), its session, and whether the store is S3-compatible."""
        if kind == "ranged":
            self.client  # noqa: B018
            return (self._new_client(response_checksum_validation=COMPATIBLE_CHECKSUM_MODE), self._session,
                    self._compatible)
        self._compatible = self.endpoint is not None and not is_aws_endpoint(self.endpoint)
        client = self._new_client()
        if not self._compatible and not is_aws_endpoint(client.meta.endpoint_url):
            # An endpoint_url from the AWS config file: known only once botocore has resolved it.
            self._compatible = True
            client = self._new_client()
        return client, self._session, self._compatible

    def _new_client(self, **overrides):
        if self._session is None:
            self._session = boto3.session.Session(botocore_session=botocore.session.get_session())
        core = self._session._session  # the botocore session under it (a shared client's session too)
        attempts = self.settings.max_attempts or core.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS
        modes = checksum_modes(core) if self._compatible else {}
        config = Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            # Self-hosted servers (rclone, MinIO) rarely resolve bucket subdomains.
            s3={"addressing_style": "path"} if self._compatible else None,
            # Shared by a writer's concurrent PUTs and a multipart upload's parts (TransferConfig's 10 threads).
            max_pool_connections=MAX_POOL_CONNECTIONS,
            **{**modes, **overrides},
        )
        client = self._session.client("s3", endpoint_url=self.endpoint, config=config)
        client.meta.events.register("request-created.s3", on_request_created)
        return client

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        if len(data) >= self.settings.multipart_threshold:
            return self._upload(key, lambda: io.BytesIO(data), content_type)
        extra = {"ContentType": content_type} if content_type else {}
        self._call(self.uri(key), lambda: self.client.put_object(Bucket=self.bucket, Key=self._object_key(key),
                                                                 Body=data, Metadata=_sha256_metadata(data),
                                                                 **extra))
        return self.uri(key)

    def put_file(self, key: str, path: Path, content_type: str | None = None, sha256: str | None = None) -> str:
        """Uploads a file (multipart and parallel above the threshold); `sha256`, if the caller has it already,
        saves reading the file twice."""
        return self._upload(key, lambda: open(path, "rb"), content_type, sha256)  # noqa: SIM115 - closed by _upload

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
        return self.stat(key) is not None

    def stat(self, key: str) -> StoredObject | None:
        """The object's size and stored sha256, or None when there is no such object."""
        def probe():
            try:
                response = self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            except ClientError as err:
                if _error_code(err) in MISSING_OBJECT_CODES:
                    return None
                raise
            return StoredObject(response["ContentLength"], _stored_sha256(response.get("Metadata", {})))

        return self._call(self.uri(key), probe)

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)

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

    def _upload(self, key: str, open_body: Callable[[], BinaryIO], content_type: str | None,
                sha256: str | None = None) -> str:
        if sha256 is None:
            with open_body() as body:
                digest = hashlib.sha256()
                while chunk := body.read(READ_BUFFER):
                    digest.update(chunk)
            sha256 = digest.hexdigest()
        extra = {"Metadata": {SHA256_METADATA: sha256}}
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
        stored = _stored_sha256(metadata)
        if stored is not None and stored != hashlib.sha256(data).hexdigest():
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
            access = "read" if err.operation_name in READ_OPERATIONS else "read and write"
            return StorageError(
                f"{target}: access denied (HTTP 403); the credentials are wrong or lack permission "
                f"for bucket '{self.bucket}': use credentials that may {access} it"
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


def _shared_client(output: S3Output, kind: str) -> tuple:
    """(client, session, compatible) for the output, built once per process for each endpoint, settings and AWS
    environment (credentials, profile, config file and checksum settings all come from it)."""
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (kind, output.endpoint, output.settings, environment, os.getpid())
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = output._build_clients(kind)
        return _CLIENTS[key]


def _sha256_metadata(data: bytes) -> dict[str, str]:
    return {SHA256_METADATA: hashlib.sha256(data).hexdigest()}


def _stored_sha256(metadata: dict[str, str]) -> str | None:
    # Metadata names are case-insensitive; some servers (rclone) capitalise them.
    return {name.lower(): value for name, value in metadata.items()}.get(SHA256_METADATA)


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


