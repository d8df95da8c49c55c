"""What each operator of a finished dataflow did, from Ray Data's own stats, for the run record: how long its
tasks were busy, and how long Ray Data held it back (it could not launch tasks, or its finished outputs were not
taken because the operators after it were full). Stages that keep up leave the ones before them unheld."""

from __future__ import annotations

import logging

log = logging.getLogger("wurstfabrik")


def operator_stats(dataset) -> list[dict] | None:
    """One entry per operator, in dataflow order: its name (operator), busy_s (its tasks' wall time, summed),
    tasks, rows out, started/ended (epoch seconds), submission_backpressure_s, output_backpressure_s,
    mean_scheduling_s (a task's wait from launch to start: a queue for CPUs or actors); None where Ray Data does
    not say."""
    try:
        summary = dataset.get_stats_summary()  # Ray Data's DeveloperAPI: read defensively
        chain = []
        while summary is not None:
            chain.append(summary)
            summary = summary.parents[0] if summary.parents else None
        stats = []
        for part in reversed(chain):
            metrics = part.extra_metrics or {}
            for op in part.operators_stats:
                wall, rows = op.wall_time, op.output_num_rows
                stats.append({
                    "operator": op.operator_name, "busy_s": _round(wall.sum if wall else None),
                    "tasks": wall.count if wall else None,
                    "rows": rows.sum if rows else None,
                    "started": op.earliest_start_time, "ended": op.latest_end_time,
                    "submission_backpressure_s": _round(metrics.get("task_submission_backpressure_time")),
                    "output_backpressure_s": _round(metrics.get("task_output_backpressure_time")),
                    "mean_scheduling_s": _round(metrics.get("average_task_scheduling_time_s")),
                })
        return stats
    except Exception as e:  # the record is for people: without Ray Data's stats it just lacks them
        log.debug("no dataflow stats: %s", e)
        return None


def _round(value) -> float | None:
    return round(float(value), 3) if isinstance(value, (int, float)) else None
