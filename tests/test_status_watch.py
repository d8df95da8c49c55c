"""`wurstfabrik status --watch` on an output that a run is writing, as it writes it: the lease, the run record,
job.json and one manifest part per batch (here written by a thread through the store's own functions, so the test
needs no Ray; tests/test_run_metrics.py watches a real job). The watch shows the count rise and the failures, and
ends when the run record says the run ended, or when a killed run's lease is given up."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timezone

from wurstfabrik.jobs.cli import main
from wurstfabrik.store.lease import Holder, Lease
from wurstfabrik.store.manifest import write_job_params, write_part
from wurstfabrik.store.runs import write_run
from wurstfabrik.store.storage import open_output

IMAGES = 12


def row(run_id: str, number: int, failed: bool = False) -> dict:
    row = {"job_id": "job-1", "run_id": run_id, "prompt_id": f"p-{number:06d}", "image_index": 0, "params": "{}",
           "finished_at": datetime.now(timezone.utc)}
    if failed:
        return {**row, "status": "failed", "error": "encode: OSError: test fault: encoding refused"}
    return {**row, "status": "ok", "prompt": "a sausage stand", "negative_prompt": "", "seed": number, "width": 64,
            "height": 64, "truncated": False, "uri": f"file:///out/{number}.png", "bytes": 10, "sha256": "0" * 64,
            "prior_s": 0.1, "decoder_s": 0.1, "write_s": 0.01}


def a_run(output, run_id: str, end: str | None, batches: int = 6, every_s: float = 0.5) -> threading.Thread:
    """What a driver writes: its lease and record, job.json, a part of two images per batch (the last image
    failed), then its final record and the lease given back; `end` None: killed after its batches (lease given up
    by whoever finds it, the record left "running")."""
    lease = Lease(output, Holder.for_this_process(run_id, None))
    lease.acquire()
    record = {"run_id": run_id, "job_id": "job-1", "started": lease.holder.started, "state": "running"}
    write_run(output, record)
    write_job_params(output, {"job_id": "job-1", "params": {}, "total_images": IMAGES})

    def go():
        try:
            for batch in range(batches):
                time.sleep(every_s)
                write_part(output, [row(run_id, 2 * batch), row(run_id, 2 * batch + 1, failed=batch == batches - 1)])
            if end is not None:
                write_run(output, {**record, "state": end, "exit_code": 1})
        finally:  # a watch must end, whatever happened here
            lease.release()

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def progress(printed: str, run_id: str) -> list[str]:
    return [line for line in printed.splitlines() if f"run {run_id} " in line]


def test_watch_shows_the_count_rising_and_ends_when_the_record_says_so(tmp_path, capsys):
    output = open_output(str(tmp_path / "out"))
    run = a_run(output, "run-1", end="finished")
    try:
        code = main(["status", "--watch", str(tmp_path / "out"), "--interval", "0.2"])
        ended = time.monotonic()
    finally:
        run.join()
    printed = capsys.readouterr().out
    lines = progress(printed, "run-1")
    ok = [int(re.search(r": (\d+) ok, ", line)[1]) for line in lines if " ok, " in line]
    assert ok == sorted(ok) and len(set(ok)) >= 4, lines  # refreshed batch by batch
    assert all("images/s over the last minute" in line for line in lines if " ok, " in line and
               not line.endswith(" 0 ok, 0 failed, 12 missing of 12 images"))
    assert any(re.search(r"; about \d+ s left$", line) for line in lines), lines
    assert lines[-1].startswith(lines[-1][:9] + "run run-1 finished: 11 ok, 1 failed, 0 missing of 12 images")
    failures = [line for line in printed.splitlines() if line.startswith("  failed ")]
    assert failures[0] == "  failed p-000011 image 0: encode: OSError: test fault: encoding refused"
    assert printed.count("failed p-000011 image 0") == 2  # once as it happened, once in the report at the end
    assert "out: job job-1: 11 ok, 1 failed, 0 missing of 12 images" in printed
    assert code == 1  # an image failed: a rerun makes it
    assert time.monotonic() - ended < 5


def test_a_killed_runs_watch_ends_when_its_lease_is_given_up(tmp_path, capsys):
    output = open_output(str(tmp_path / "out"))
    run = a_run(output, "run-2", end=None, batches=2, every_s=0.3)
    try:
        code = main(["status", "--watch", str(tmp_path / "out"), "--interval", "0.2"])
    finally:
        run.join()
    lines = progress(capsys.readouterr().out, "run-2")
    assert lines[-1].endswith("run run-2 running: 3 ok, 1 failed, 8 missing of 12 images") or \
        "run run-2 running: 3 ok, 1 failed, 8 missing of 12 images;" in lines[-1], lines
    assert code == 1


def test_watch_with_no_run_going_prints_the_report(tmp_path, capsys):
    output = open_output(str(tmp_path / "out"))
    a_run(output, "run-3", end="finished", batches=1, every_s=0).join()
    assert main(["status", "--watch", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("no run is going on this output\n") and "1 ok, 1 failed, 10 missing" in printed
