"""`wurstfabrik status`: an output's counts by final status, its failed images, its last runs and its lease."""

from __future__ import annotations

import pyarrow as pa

from wurstfabrik.store.lease import read_holder
from wurstfabrik.store.manifest import image_states, read_job_params
from wurstfabrik.store.runs import DID_NOT_FINISH, RUNNING, read_runs
from wurstfabrik.store.storage import open_output

SHOWN_FAILURES = 10
SHOWN_RUNS = 5


class NoJob(Exception):
    """The location holds no wurstfabrik job."""


def status_report(output_uri: str) -> tuple[list[str], int]:
    """The lines to print and the exit code: 0 when every image that can be made is made, else 1."""
    output = open_output(output_uri)
    recorded = read_job_params(output)
    if recorded is None:
        raise NoJob(f"{output_uri} holds no wurstfabrik job (no job.json)")
    current = recorded.get("job_id")
    states = image_states(output, current)
    counts, bad_input, failed = states.counts, states.bad_input, states.failed
    total = int(recorded.get("total_images", 0))
    missing = max(0, total - counts["ok"] - counts["failed"])
    lines = [f"{output_uri}: job {current}: {counts['ok']} ok, {counts['failed']} failed"
             + (f" ({bad_input} refused as bad input)" if bad_input else "") + f", {missing} missing of {total} images"]
    for row in _first(failed.sort_by([("finished_at", "ascending")]), SHOWN_FAILURES):
        where = f" ({row['source']})" if row.get("source") else ""
        lines.append(f"  failed {row['prompt_id']} image {row['image_index']}{where}: {row['error']}")
    if failed.num_rows > SHOWN_FAILURES:
        lines.append(f"  ... and {failed.num_rows - SHOWN_FAILURES} more failed")
    holder = read_holder(output)
    runs = read_runs(output, last=SHOWN_RUNS)
    if runs:
        lines.append("last runs:")
        for record in runs:
            lines.append("  " + _describe_run(record, holder))
    if holder is not None and not holder.released:
        lines.append(f"lease: held by {holder.describe()}, renewed {holder.age_s():.0f} s ago")
    retryable = counts["failed"] - bad_input
    return lines, 0 if not retryable and not missing else 1


def _first(table: pa.Table, n: int) -> list[dict]:
    return table.slice(0, n).to_pylist()


def _describe_run(record: dict, holder) -> str:
    state = record.get("state", "?")
    if state == RUNNING and (holder is None or holder.released or holder.run_id != record.get("run_id")):
        state = DID_NOT_FINISH  # killed, and no run since has noted it
    planned = record.get("planned") or {}
    parts = [f"{record.get('started', '?')} run {record.get('run_id', '?')}: {state}"]
    if planned:
        parts.append(f"planned {planned.get('to_generate', 0)} of {planned.get('total_images', 0)}")
    if "generated" in record:
        parts.append(f"generated {record['generated']}, failed {record.get('failed', 0)}")
    if record.get("images_per_s"):
        parts.append(f"{record['images_per_s']:.2f} images/s")
    if record.get("exit_code") is not None:
        parts.append(f"exit {record['exit_code']}")
    if record.get("message"):
        parts.append(record["message"])
    return ", ".join(parts)
