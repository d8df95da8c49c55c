"""Which Ray a run uses, chosen as Ray's own tools choose it, and checked before Ray is asked to connect.

RAY_ADDRESS names the cluster (`ray job submit` sets it for its drivers); without it, the cluster that the last
`ray start` on this machine recorded, if one answers there; otherwise a local Ray started in-process for the run
(`address="local"`, so a record left by a dead cluster cannot get in the way). A cluster that demands a token gets
the one at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), as Ray's CLI sends it under
RAY_AUTH_MODE=token. What cannot work is one line (ClusterUnusable) within seconds, where Ray itself would retry
with a warning every few seconds, hang on an address nobody answers, or end in a traceback.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray

from .quiet import quiet_ray_logs
from .resources import demands
from .spec import JobSpec

log = logging.getLogger("wurstfabrik")
TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TCP_WAIT_S = 10.0  # a head that is starting gets this long to open its port
PROBE_TIMEOUT_S = 20.0
# Asks the cluster's GCS for a key, as the first thing ray.init does: exit 3 if it wants a token this process
# does not send, 4 on any other failure. In a process of its own: Ray's C++ client logs its retries to stderr.
PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"wurstfabrik-probe", None, timeout=5)
except AuthenticationError:
    sys.exit(3)
except Exception as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(4)
"""


class ClusterUnusable(Exception):
    """The Ray cluster the run should use cannot be used as things stand; the message says what to set or fix."""


def connect_ray(spec: JobSpec) -> str:
    """Connects this process to the Ray the run uses (unless it already is) and returns which, in words."""
    quiet_ray_logs()
    if not ray.is_initialized():
        description = _connect(spec)
    else:
        description = f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows its own
    return description


def _connect(spec: JobSpec) -> str:
    given = os.environ.get("RAY_ADDRESS", "").strip()
    if given == "local":
        return _start_local(spec)
    if given and given != "auto":
        _check_cluster(given, "RAY_ADDRESS")
        ray.init(address=given, logging_level=logging.WARNING, log_to_driver=True)
        return f"the Ray cluster at {given} (RAY_ADDRESS)"
    recorded = _recorded_cluster()
    if recorded and _answers(recorded, wait_s=0):
        _check_cluster(recorded, "the last `ray start` on this machine")
        ray.init(address=recorded, logging_level=logging.WARNING, log_to_driver=True)
        return f"the Ray cluster at {recorded} (started on this machine with `ray start`)"
    if given == "auto":
        raise ClusterUnusable("RAY_ADDRESS=auto, but no Ray cluster started with `ray start` answers on this "
                              "machine; start one, or unset RAY_ADDRESS to let the run start its own")
    if recorded:
        log.info("no Ray answers at %s, which the last `ray start` on this machine recorded (it has stopped); "
                 "starting a local Ray for this run", recorded)
    return _start_local(spec)


def _start_local(spec: JobSpec) -> str:
    """A local Ray with enough logical CPUs for the placement: they are scheduling slots, the stages share the
    real cores."""
    needed = sum(d.count * d.bundle.get("CPU", 0) for d in demands(spec.placement, 0, 0))
    cpus = max(math.ceil(needed), os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, logging_level=logging.WARNING, include_dashboard=False)
    return f"a local Ray started for this run ({cpus} CPUs)"


def _check_cluster(address: str, named_by: str) -> None:
    """Refuses, in one line, a cluster that does not answer or demands a token this process cannot send; turns on
    token authentication for this process when the cluster wants it and a token is at hand."""
    if address.startswith(("http://", "https://")):
        raise ClusterUnusable(f"{address} ({named_by}) is a Ray dashboard's address, which `ray job submit "
                              f"--address` takes; a run connects to the head's GCS address, host:6379")
    if not _answers(address, wait_s=TCP_WAIT_S):
        raise ClusterUnusable(f"no Ray cluster answers at {address} ({named_by}) after {TCP_WAIT_S:g} s: check "
                              f"the address and that the cluster is up")
    if address.startswith("ray://"):
        return  # Ray Client: its server checks what it needs when ray.init connects
    outcome, detail = _probe(address)
    if outcome == "token":
        source = token_at_hand()
        if source is None or os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            raise ClusterUnusable(
                f"the Ray cluster at {address} demands an authentication token "
                + (f"and refused the one from {source}; " if source and _token_mode() else
                   "and none is at hand; ")
                + "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token) to the cluster's "
                  "token, which `ray get-auth-token` prints on the head")
        _use_token()
        outcome, detail = _probe(address)
        if outcome == "token":
            raise ClusterUnusable(f"the Ray cluster at {address} refused the authentication token from {source}; "
                                  f"set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head)")
    if outcome != "ok":
        raise ClusterUnusable(f"{address} ({named_by}) answers, but not as a Ray cluster's GCS ({detail}); "
                              f"a run connects to the head's GCS address, host:6379")


def token_at_hand() -> str | None:
    """Where the token this process would send comes from, in Ray's order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        return path if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def _token_mode() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _use_token() -> None:
    """Token authentication for this process and the ones it starts, as RAY_AUTH_MODE=token in the shell would
    give; Ray reads its settings once, so they are read again."""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")


def _probe(address: str) -> tuple[str, str]:
    """ "ok", "token" (a token is wanted, or the one sent was refused) or "other", and what went wrong."""
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "other", f"no answer to a request within {PROBE_TIMEOUT_S:g} s"
    if done.returncode == 0:
        return "ok", ""
    if done.returncode == 3:
        return "token", ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return "other", lines[-1] if lines else f"exit {done.returncode}"


def _answers(address: str, wait_s: float) -> bool:
    """Whether something accepts a TCP connection at the address's host and port, trying for `wait_s`."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnusable(f"{address}: not a Ray address (host:port, or ray://host:port)")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def _recorded_cluster() -> str | None:
    """The address the last `ray start` on this machine recorded (Ray's own lookup), if any."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address() or None
    except Exception:  # Ray moved its record: nothing recorded, as far as this run can tell
        return None
