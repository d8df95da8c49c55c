"""`wurstfabrik status --watch`: an output's counts, its rate over the last minute, the time left and new failures,
refreshed every few seconds until the run going on it ends, then the status report. Read from the output alone
(the lease, the run records, job.json and the manifest), never from Ray: it works on any machine that can read the
output. Rates come from the manifest rows' `finished_at`, stamped by the writers' clocks (NTP-synced, as a
cluster's are), so a watch started mid-run shows the rate at once."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pyarrow.compute as pc

from wurstfabrik.store.lease import DEFAULT_STALE_S, Holder, read_holder
from wurstfabrik.store.manifest import image_states, read_job_params, read_manifest
from wurstfabrik.store.runs import RUNNING, read_runs
from wurstfabrik.store.storage import open_output

from .status import SHOWN_FAILURES, status_report

RATE_WINDOW_S = 60.0
DEFAULT_INTERVAL_S = 5.0


@dataclass
class Watch:
    """The run being watched and the failures already shown."""

    run_id: str | None
    started: datetime | None
    shown_failures: set = field(default_factory=set)


def watch_status(output_uri: str, interval_s: float = DEFAULT_INTERVAL_S, out=None) -> int:
    """Prints a progress line every `interval_s` while a run holds the output, then the status report; returns the
    status's exit code. With no run going, the report alone."""
    out = out or sys.stdout
    output = open_output(output_uri)
    holder = _live_holder(output)
    if holder is None:
        out.write("no run is going on this output\n")
    else:
        watched = Watch(holder.run_id, datetime.fromisoformat(holder.started))
        overwrite = out.isatty()
        while True:
            record = _record_of(output, watched.run_id)
            ended = record is not None and record.get("state") != RUNNING
            if not ended and _live_holder(output, watched.run_id) is None:
                ended = True  # its lease was given back or went stale without a final record: it was killed
            for line in _new_failures(output, watched):
                out.write(("\r\x1b[K" if overwrite else "") + line + "\n")
            line = _progress_line(output, watched, record)
            out.write(f"\r\x1b[K{line}" if overwrite else f"{line}\n")
            out.flush()
            if ended:
                break
            time.sleep(interval_s)
        if overwrite:
            out.write("\n")
    lines, code = status_report(output_uri)
    out.write("\n".join(lines) + "\n")
    return code


def _live_holder(output, run_id: str | None = None) -> Holder | None:
    """The lease's holder while it is held and renewed (by `run_id`, if given)."""
    holder = read_holder(output)
    if holder is None or holder.released or holder.died_here() or (run_id and holder.run_id != run_id):
        return None
    record = _record_of(output, holder.run_id) or {}
    stale_s = ((record.get("spec") or {}).get("resilience") or {}).get("lease_stale_s", DEFAULT_STALE_S)
    return holder if holder.age_s() < stale_s else None


def _record_of(output, run_id: str) -> dict | None:
    """The run's record; a run writes it once its checks pass, so a run that is still starting has none."""
    return next((r for r in reversed(read_runs(output, last=3)) if r.get("run_id") == run_id), None)


def _progress_line(output, watched: Watch, record: dict | None) -> str:
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    state = (record or {}).get("state", "starting")
    head = f"{stamp} run {watched.run_id} {state}"
    job = read_job_params(output)
    if record is None or job is None or job.get("job_id") != record.get("job_id"):
        return f"{head}: checking its inputs and starting its stages"
    states = image_states(output, job["job_id"])
    ok, failed = states.ok, states.failed.num_rows
    total = int(job.get("total_images", 0))
    missing = max(0, total - ok - failed)
    line = f"{head}: {ok} ok, {failed} failed, {missing} missing of {total} images"
    rate = _recent_rate(output, job["job_id"], watched)
    if rate is None:
        return line
    line += f"; {rate:.2f} images/s over the last minute"
    if missing and rate > 0:
        line += f"; about {_duration(missing / rate)} left"
    return line


def _recent_rate(output, job_id: str, watched: Watch) -> float | None:
    """Images this run recorded per second over the last minute (or since it started, if that is shorter)."""
    now = datetime.now(timezone.utc)
    window = RATE_WINDOW_S if watched.started is None else \
        min(RATE_WINDOW_S, (now - watched.started).total_seconds())
    if window <= 0:
        return None
    rows = read_manifest(output, ["finished_at"], job_id, run_id=watched.run_id)
    since = now - timedelta(seconds=window)
    recent = int(pc.sum(pc.greater_equal(rows.column("finished_at"), since)).as_py() or 0) if rows.num_rows else 0
    return recent / window


def _new_failures(output, watched: Watch) -> list[str]:
    """A line for each failed image of the watched run not shown before (up to SHOWN_FAILURES in all)."""
    if watched.run_id is None or len(watched.shown_failures) >= SHOWN_FAILURES:
        return []
    rows = read_manifest(output, ["prompt_id", "image_index", "error"], status="failed", run_id=watched.run_id)
    lines = []
    for row in rows.to_pylist():
        key = (row["prompt_id"], row["image_index"])
        if key not in watched.shown_failures and len(watched.shown_failures) < SHOWN_FAILURES:
            watched.shown_failures.add(key)
            lines.append(f"  failed {key[0]} image {key[1]}: {row['error']}")
    return lines


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"
