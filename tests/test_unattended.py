"""Runs nobody watches: the output's lease, S3 outages and throttling, preflight refusals, placements that can
never be scheduled, stalls, signals, run records, and a healthy run's quiet output. (The records of a run and
its rerun are checked in test_job.py, on the same two runs as the rerun's test.)"""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import pytest
import ray
from conftest import restart_rclone, s3_environment, set_environment
from fault_proxy import FaultProxy
from job_helpers import (
    PROMPTS,
    START_LINE,
    SUMMARY_LINE,
    image_files,
    make_spec,
    ok_keys_once,
    spec_file,
    start_driver,
    start_local_ray,
    wait_for_parts,
    write_prompts,
)

from wurstfabrik.jobs.cli import main
from wurstfabrik.jobs.driver import run_job
from wurstfabrik.store.lease import LEASE_KEY, Holder, Lease, read_holder
from wurstfabrik.store.runs import read_runs
from wurstfabrik.store.storage import open_output
from wurstfabrik.workers.faults import FAULTS_ENV


def run_cli(spec, tmp_path, *extra) -> int:
    return main(["run", str(spec_file(spec, tmp_path / "job.yaml")), "--no-progress", *extra])


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_a_held_output_refuses_a_second_run_and_a_stale_lease_is_taken_over(ray_local, tiny_checkpoints,
                                                                           tmp_path, capsys):
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", PROMPTS[:2]), out)
    output = open_output(str(out))
    other = Lease(output, Holder.for_this_process("nightly-1", "raysubmit_abc"))
    other.acquire()

    assert run_cli(spec, tmp_path) == 3
    err = capsys.readouterr().err
    assert error_lines(err) == [error_lines(err)[0]] and "in use by run nightly-1" in err
    assert "raysubmit_abc" in err and "Traceback" not in err
    assert not (out / "job.json").exists() and not (out / "images").exists()

    stale = replace(other.holder, renewed="2020-01-01T00:00:00+00:00")
    output.put_if_version(LEASE_KEY, json.dumps(asdict(stale)).encode(), other.version)
    assert run_cli(spec, tmp_path) == 0
    assert "took over the output's lease from run nightly-1" in capsys.readouterr().err
    (record,) = read_runs(output)
    assert record["took_over_lease_from"]["run_id"] == "nightly-1"
    assert read_holder(output).released and read_holder(output).run_id == record["run_id"]


def test_preflight_problems_are_one_line_and_leave_only_a_released_lease(tiny_checkpoints, tmp_path, capsys,
                                                                         monkeypatch):
    prior, decoder = tiny_checkpoints
    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS[:1])
    no_weights = tmp_path / "no-weights"
    (no_weights / "prior").mkdir(parents=True)
    for name in ("model_index.json",):
        (no_weights / name).write_bytes((prior / name).read_bytes())
    for sub in ("text_encoder", "tokenizer"):
        os.symlink(prior / sub, no_weights / sub)
    (no_weights / "prior" / "config.json").write_bytes((prior / "prior" / "config.json").read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    cases = [
        ({"prior": str(tmp_path / "missing")}, "missing"),
        ({"prior": str(decoder)}, "decoder"),
        ({"decoder": str(prior)}, "prior"),
        ({"prior": str(no_weights)}, "safetensors"),
        ({"decoder": "warp-ai/not-cached-anywhere"}, "local hugging face cache"),
    ]
    for fields, words in cases:
        out = tmp_path / "out"
        spec = make_spec(tiny_checkpoints, prompts, out, **fields)
        assert run_cli(spec, tmp_path) == 2, fields
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0].lower(), (fields, lines)
        # The lease is taken before these checks, and given back: nothing else is written.
        output = open_output(str(out))
        assert output.list() == ["lease.json"] and read_holder(output).released, fields


def test_a_placement_that_can_never_be_scheduled_is_refused(ray_local, tiny_checkpoints, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS[:1])
    cases = [
        ({"prior_gpus": 1.0}, "a prior actor needs CPU 0.5, GPU 1, and no node has enough GPU",
         "placement.prior_actors, prior_cpus, prior_gpus"),
        ({"prior_cpus": 1.0, "decoder_cpus": 1.0}, "must run at the same time, and together they need CPU 2.75",
         "lower placement.prior_cpus"),
        ({"decoder_resources": {"decoder_node": 0.01}}, "no node has enough decoder_node", "decoder_resources"),
    ]
    for placement, problem, advice in cases:
        spec = make_spec(tiny_checkpoints, prompts, tmp_path / "out", placement=placement)
        assert run_cli(spec, tmp_path) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and problem in lines[0] and advice in lines[0], lines
        assert "the cluster: 1 node(s) with CPU 2" in lines[0] and "no autoscaler" in lines[0]
        assert not (tmp_path / "out" / "job.json").exists()


def test_a_stalled_job_stops_and_says_what_ray_waits_for(ray_local, tiny_checkpoints, tmp_path, monkeypatch):
    """The CLI in a process of its own, as a scheduler runs it: the hung actor ends with the driver's Ray job
    (Ray Data only lets go of a stopped run's actors, and a hung one would hold its CPUs in the shared Ray)."""
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"hang": "prior"}))
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", PROMPTS[:2]), out,
                     resilience={"stall_s": 8.0})
    driver = start_driver(spec, tmp_path, ray_local, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, err[-2000:]
    assert "no image finished for" in err and "Ray is waiting to schedule" in err and "Traceback" not in err
    (record,) = read_runs(open_output(str(out)))
    assert record["state"] == "stopped" and record["exit_code"] == 1 and "resilience.stall_s" in record["message"]
    assert read_holder(open_output(str(out))).released


def test_sigterm_stops_the_run_cleanly_and_a_rerun_finishes(ray_local, tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", [f"{p}, take {i}" for i in range(3) for p in PROMPTS],
                            row_group_size=4)
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, prompts, out, prior_steps=12, decoder_steps=8,
                     placement={"prior_batch_size": 2, "decoder_batch_size": 2})
    driver = start_driver(spec, tmp_path, ray_local, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_parts(out, 1, driver)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    output = open_output(str(out))
    (record,) = read_runs(output)
    assert record["state"] == "interrupted" and record["exit_code"] == 143
    assert read_holder(output).released
    result = run_job(spec, progress=False)
    assert result.exit_code == 0 and result.summary["status"]["ok"] == 18
    keys = ok_keys_once(output)
    assert len(keys) == len(set(keys)) == 18


def s3_job_under(env: dict, tiny_checkpoints, tmp_path, bucket: str, monkeypatch, **fields):
    set_environment(monkeypatch, env)
    start_local_ray(env)
    prompts = write_prompts(tmp_path / "p.parquet", [f"{p}, take {i}" for i in range(2) for p in PROMPTS])
    return make_spec(tiny_checkpoints, prompts, f"s3://{bucket}/out", prior_steps=8, decoder_steps=6,
                     placement={"prior_batch_size": 2, "decoder_batch_size": 2}, **fields)


def with_outage(run, servers, bucket: str, down_s: float):
    """`run()`, while the S3 server goes away for `down_s` once the job's first manifest part is stored."""
    def outage():
        wait_for_parts(servers[0].root / bucket / "out", 1)
        restart_rclone(servers, down_s)

    fault = threading.Thread(target=outage)
    fault.start()
    try:
        return run()
    finally:
        fault.join()


@pytest.mark.own_ray
def test_an_s3_outage_of_10_s_mid_job_is_ridden_out(_ray_session, own_s3_server, tiny_checkpoints, tmp_path,
                                                    monkeypatch):
    server = own_s3_server[0]
    server.create_bucket("outage")
    spec = s3_job_under(s3_environment(server), tiny_checkpoints, tmp_path, "outage", monkeypatch)
    try:
        result = with_outage(lambda: run_job(spec, progress=False), own_s3_server, "outage", down_s=10)
    finally:
        ray.shutdown()
    assert len(own_s3_server) == 2  # the server really went away and came back
    assert result.exit_code == 0, result.message
    assert result.summary["status"] == {"ok": 12, "failed": 0}
    keys = ok_keys_once(open_output(spec.output))
    assert len(keys) == len(set(keys)) == 12


# Slow: tests/test_storage.py rides out the same faults at the storage layer every day.
@pytest.mark.slow
@pytest.mark.own_ray
def test_throttling_errors_and_dropped_connections_are_ridden_out(_ray_session, s3_server, s3_bucket,
                                                                 tiny_checkpoints, tmp_path, monkeypatch):
    proxy = FaultProxy(s3_server.endpoint, share=0.25, seed=11).start()
    try:
        spec = s3_job_under(s3_environment(s3_server, proxy.endpoint), tiny_checkpoints, tmp_path, s3_bucket,
                            monkeypatch, output_format="webdataset", shard_size=4)
        try:
            result = run_job(spec, progress=False)
        finally:
            ray.shutdown()
    finally:
        proxy.stop()
    assert result.exit_code == 0, result.message
    assert result.summary["status"] == {"ok": 12, "failed": 0}
    counts = proxy.counts
    assert counts.slow_down and counts.internal_error and counts.dropped
    set_environment(monkeypatch, s3_environment(s3_server))  # read back past the proxy
    output = open_output(spec.output)
    keys = ok_keys_once(output)
    assert len(keys) == len(set(keys)) == 12
    shards = [k for k in output.list("shards/") if k.endswith(".tar")]
    assert len(shards) == 3  # every image in exactly one finished shard, no orphans


@pytest.mark.own_ray
def test_a_storage_outage_that_outlasts_the_retries_stops_the_run_with_one_line(_ray_session, own_s3_server,
                                                                                 tiny_checkpoints, tmp_path,
                                                                                 monkeypatch, capsys):
    server = own_s3_server[0]
    server.create_bucket("gone")
    # The stopped run cannot release its lease while storage is away; a short stale time lets the rerun take it.
    spec = s3_job_under(s3_environment(server), tiny_checkpoints, tmp_path, "gone", monkeypatch,
                        resilience={"storage_outage_s": 3.0, "lease_stale_s": 5.0})
    try:
        code = with_outage(lambda: run_cli(spec, tmp_path), own_s3_server, "gone", down_s=15)
        err = capsys.readouterr().err
        assert code == 1
        assert "storage failed" in err and "run again to finish" in err and "Traceback" not in err
        output = open_output(spec.output)
        recorded = len(ok_keys_once(output))
        assert 0 < recorded < 12
        holder = read_holder(output)
        if not holder.released:  # it could not release its lease while storage was away: wait until it is stale
            time.sleep(max(0.0, 5.5 - holder.age_s()))
        # The rerun on the same Ray: the server came back at the same address with the same keys.
        result = run_job(spec, progress=False)
    finally:
        ray.shutdown()
    assert result.exit_code == 0 and result.summary["generated_now"] <= 12 - recorded
    keys = ok_keys_once(output)
    assert len(keys) == len(set(keys)) == 12


def on_a_terminal(command: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """`command` with its stdout and stderr on a pseudo-terminal, as in a user's shell: its exit code and everything
    the terminal was sent."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    shown, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # the command has ended and closed its side
                    break
                if not data:
                    break
                shown.append(data)
        return process.wait(timeout=30), b"".join(shown).decode("utf-8", "replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)


def test_a_healthy_run_shows_a_start_line_its_progress_and_a_summary_line(tiny_checkpoints, tmp_path):
    """The CLI in a fresh process on a terminal, starting its own local Ray, as the README's quick start does, for a
    job of the demo's size (36 images): no line of Ray's loggers at INFO and no warning, error or traceback; one
    start line, the progress bar, one summary line; nothing else."""
    prompts = write_prompts(tmp_path / "p.parquet", [f"{p}, take {i}" for i in range(6) for p in PROMPTS])
    spec = make_spec(tiny_checkpoints, prompts, tmp_path / "out", prior_steps=2, decoder_steps=2)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code, shown = on_a_terminal([sys.executable, "-m", "wurstfabrik.jobs.cli", "run",
                                 str(spec_file(spec, tmp_path / "j.yaml"))], env, timeout=400)
    assert code == 0, shown[-3000:]
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", part).strip() for part in re.split(r"[\r\n]+", shown)]
    lines = [line for line in lines if line]
    assert not [line for line in lines if re.search(r"\b(INFO|WARNING|ERROR|Error|Traceback)\b", line)], lines
    bar = [line for line in lines if line.startswith("images:")]
    assert bar and "36/36" in bar[-1]
    said = [line for line in lines if not line.startswith("images:")]
    assert len(said) == 2 and START_LINE.match(said[0]) and SUMMARY_LINE.match(said[1]), said
    start, summary = START_LINE.match(said[0]), SUMMARY_LINE.match(said[1])
    assert (start["total"], start["todo"], start["output"]) == ("36", "36", str(tmp_path / "out"))
    assert re.fullmatch(r"a local Ray started for this run \(\d+ CPUs\)", start["ray"])
    assert start["size"] == "128×128 png files"
    assert summary["counts"] == "36 ok, 0 failed, 0 missing of 36 images" and summary["made"] == "36"
    assert (summary["output"], summary["code"], summary["meaning"]) == (
        str(tmp_path / "out"), "0", "every image is recorded ok")
    assert len(image_files(tmp_path / "out")) == 36
