"""Which Ray a run uses, against real `ray start --head` clusters on this machine, each with a HOME (and so a
token) and a TMPDIR (and so a record of the latest cluster) of its own: a cluster that demands a token gets the one
at hand, or the run refuses in one line; a cluster recorded by `ray start` is joined without RAY_ADDRESS, and a
record left by a head killed with -9 does not stop a run; an address where nothing answers, and a dashboard's
address, are refused in one line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port, ray_head
from job_helpers import make_spec, ok_rows, spec_file, write_prompts

from wurstfabrik.store.storage import open_output

BIN = Path(sys.executable).parent
SHORT_DEMO = ["--set", "height=128", "--set", "width=128", "--set", "prior_steps=2", "--set", "decoder_steps=2"]


def machine_env(home: Path, tmpdir: Path | None = None, **variables: str) -> dict[str, str]:
    """A user's shell on this machine: their HOME, TMPDIR and variables, none of Ray's from the test process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TMPDIR"))}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env['PATH']}", **variables)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def wurstfabrik(env: dict, *args: str, cwd: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([BIN / "wurstfabrik", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - started


def said(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


@pytest.fixture
def short_job(tiny_checkpoints, tmp_path) -> Path:
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", ["a red fox", "a lighthouse"]),
                     tmp_path / "out", prior_steps=2, decoder_steps=2)
    return spec_file(spec, tmp_path / "job.json")


def test_an_address_where_nothing_answers_is_refused_in_one_line(short_job, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    done, took = wurstfabrik(machine_env(tmp_path, RAY_ADDRESS=address), "run", str(short_job), "--no-progress",
                             cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert took < 30
    [line] = said(done)
    assert line.startswith("error: no Ray cluster answers at ") and address in line and "RAY_ADDRESS" in line
    assert not (tmp_path / "out" / "manifest").exists()


def test_a_dashboard_address_is_refused_in_one_line(short_job, tmp_path):
    done, _ = wurstfabrik(machine_env(tmp_path, RAY_ADDRESS="http://127.0.0.1:8265"), "run", str(short_job),
                          "--no-progress", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = said(done)
    assert "dashboard" in line and "host:6379" in line


# --- a head on this machine, started after a token exists, as `ray start --head` does after any local ray.init -----


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """A user's HOME with a token (as any earlier local `ray.init()` leaves one) and a TMPDIR of their own."""
    home = tmp_path_factory.mktemp("home")
    tmpdir = Path(tempfile.mkdtemp(prefix="wf-", dir="/tmp"))  # Ray's socket paths under it must stay short
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=machine_env(home, tmpdir), check=True,
                   capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    yield home, tmpdir
    shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(machine):
    """`ray start --head` as the user starts it in their shell: it finds their token and turns authentication on
    (RAY_AUTH_MODE=token here only so the fixture's own readiness probe, a `ray job submit`, is let in)."""
    home, tmpdir = machine
    with ray_head(machine_env(home, tmpdir, RAY_AUTH_MODE="token"), num_cpus=2, recorded=True) as (_, started):
        yield started


@pytest.mark.slow
def test_a_run_joins_a_cluster_that_demands_a_token_with_the_token_at_hand(machine, head, tmp_path):
    home, tmpdir = machine
    env = machine_env(home, tmpdir, RAY_ADDRESS=head.gcs_address)  # no RAY_AUTH_MODE, as a user's shell
    done, _ = wurstfabrik(env, "demo", "--dir", str(tmp_path / "demo"), "--no-progress", *SHORT_DEMO, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"on the Ray cluster at {head.gcs_address} (RAY_ADDRESS)" in done.stderr
    assert "InvalidAuthToken" not in done.stderr and "Traceback" not in done.stderr
    assert len(ok_rows(open_output(str(tmp_path / "demo" / "output")))) == 36


@pytest.mark.slow
def test_a_cluster_that_demands_a_token_none_is_at_hand_for_is_refused_in_one_line(machine, head, short_job,
                                                                                    tmp_path):
    _, tmpdir = machine
    env = machine_env(tmp_path / "another-home", tmpdir, RAY_ADDRESS=head.gcs_address)
    done, took = wurstfabrik(env, "run", str(short_job), "--no-progress", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert took < 10
    [line] = said(done)  # no Ray warning, no traceback
    assert head.gcs_address in line and "token" in line and "RAY_AUTH_TOKEN" in line


@pytest.mark.slow
def test_without_an_address_a_run_joins_the_cluster_ray_start_recorded(machine, head, tmp_path):
    home, tmpdir = machine
    env = machine_env(home, tmpdir)
    done, _ = wurstfabrik(env, "demo", "--dir", str(tmp_path / "demo"), "--no-progress", *SHORT_DEMO, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    port = head.gcs_address.rpartition(":")[2]  # `ray start` records the node's address, not loopback's
    assert re.search(rf"on the Ray cluster at \S+:{port} \(started on this machine with `ray start`\)",
                     done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "multiple active Ray instances" not in done.stderr
    status, _ = wurstfabrik(env, "status", str(tmp_path / "demo" / "output"), cwd=tmp_path)
    assert status.returncode == 0 and "36" in status.stdout, status.stdout + status.stderr


@pytest.mark.slow
def test_a_record_left_by_a_head_killed_with_minus_9_does_not_stop_a_run(machine, head, tmp_path):
    home, tmpdir = machine
    os.killpg(head.process.pid, signal.SIGKILL)
    head.process.wait()
    record = (tmpdir / "ray" / "ray_current_cluster").read_text().strip()
    assert record.endswith(f":{head.gcs_address.rpartition(':')[2]}"), "the dead head's record is still there"
    done, _ = wurstfabrik(machine_env(home, tmpdir), "demo", "--dir", str(tmp_path / "demo"), "--no-progress",
                          *SHORT_DEMO, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"no Ray answers at {record}, which the last `ray start` on this machine recorded" in done.stderr
    assert "on a local Ray started for this run" in done.stderr and "Traceback" not in done.stderr
    assert len(ok_rows(open_output(str(tmp_path / "demo" / "output")))) == 36
