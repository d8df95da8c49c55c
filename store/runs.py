"""Run records: every run writes runs/<started>-<run id>.json when it starts ("running") and again when it ends,
so an output keeps the history of what each run planned, generated, skipped and failed, and how it ended. A run
that is killed leaves "running"; the next run notes it and marks it "did not finish"."""

from __future__ import annotations

import json
from typing import Any

RUNS_PREFIX = "runs/"
RUNNING = "running"
DID_NOT_FINISH = "did not finish"  # what the next run writes into a killed run's record


def run_key(started: str, run_id: str) -> str:
    """`started` is an ISO 8601 UTC time; the key sorts by it."""
    stamp = started.replace("-", "").replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
    return f"{RUNS_PREFIX}{stamp}-{run_id}.json"


def write_run(output, record: dict[str, Any]) -> str:
    data = json.dumps(record, indent=2, sort_keys=True, default=str).encode("utf-8")
    return output.put(run_key(record["started"], record["run_id"]), data, content_type="application/json")


def read_runs(output, last: int | None = None) -> list[dict[str, Any]]:
    """Run records oldest first (only the `last` few if given); an unreadable one is skipped."""
    keys = sorted(k for k in output.list(RUNS_PREFIX) if k.endswith(".json"))
    records = []
    for key in keys[-last:] if last else keys:
        try:
            record = json.loads(output.get(key) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def unfinished_runs(output, current_run: str) -> list[dict[str, Any]]:
    """Records still saying "running" that are not this run's: runs that were killed. Called under the lease,
    so none of them can still be going."""
    return [r for r in read_runs(output) if r.get("state") == RUNNING and r.get("run_id") != current_run]
