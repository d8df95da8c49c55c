"""wurstfabrik's metrics, recorded through Ray (`ray.util.metrics`) in whichever process does the work and exported
by each node's metrics agent in Prometheus format, where Ray's dashboard, KubeRay's Prometheus and
`ray metrics launch-prometheus` scrape them. Ray prefixes every name with `ray_` and adds the node, the worker and
the session as labels: `wurstfabrik_images` is scraped as `ray_wurstfabrik_images_total{status="ok", job_id=...}`.

Every metric carries the job id and the run id. Their other labels are a stage, a status or an S3 operation, never a
prompt or a credential. A process exports what it recorded every few seconds (Ray's metrics_report_interval_ms),
and once more when it exits: actors Ray Data ends, task workers and the driver lose nothing they recorded
(tests/test_run_metrics.py scrapes a job's counts once its processes are gone)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from ray.util.metrics import Counter, Gauge, Histogram

from wurstfabrik.store import requests

STAGES = ("prior", "decoder", "encode", "write")
# Seconds one image spends in one stage: a few milliseconds (JPEG encoding) to a minute (a big image on a CPU).
SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0]
RUN_TAGS = ("job_id", "run_id")

# name: (kind, description, tags beyond the run's), as recorded; the Prometheus names are in `exported_names`.
METRICS = {
    "wurstfabrik_images": (Counter, "Images recorded by the run, by final status of their attempt", ("status",)),
    "wurstfabrik_stage_seconds": (Histogram, "Seconds one image spent in a stage: its batch's seconds divided by "
                                             "its images", ("stage",)),
    "wurstfabrik_batches_in_flight": (Gauge, "Batches a stage's process is working on", ("stage",)),
    "wurstfabrik_store_requests": (Counter, "S3 requests sent, retries included, by S3 operation", ("kind",)),
    "wurstfabrik_store_retries": (Counter, "S3 requests that repeat a failed one, by S3 operation", ("kind",)),
    "wurstfabrik_job_images_planned": (Gauge, "Images the job holds, made or not", ()),
    "wurstfabrik_job_images_done": (Gauge, "Images of the job recorded ok, by this run or earlier ones", ()),
    "wurstfabrik_job_images_remaining": (Gauge, "Images of the job still to make (planned, less done, less bad "
                                                "input rows no run can make)", ()),
}


@dataclass(frozen=True)
class MetricLabels:
    """What every metric of a run is tagged with."""

    job_id: str
    run_id: str

    def tags(self, **more: str) -> dict[str, str]:
        return {"job_id": self.job_id, "run_id": self.run_id, **more}


_made: dict[str, object] = {}
_lock = threading.Lock()


def _metric(name: str):
    """The process's one instance of a metric, made on first use (after Ray is connected)."""
    with _lock:
        if name not in _made:
            kind, description, tags = METRICS[name]
            extra = {"boundaries": SECONDS_BUCKETS} if kind is Histogram else {}
            _made[name] = kind(name, description, tag_keys=RUN_TAGS + tags, **extra)
        return _made[name]


def exported_names() -> set[str]:
    """The names a Prometheus scrape shows for METRICS (Ray's prefix, and the counters' and histograms' suffixes)."""
    suffixes = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_count", "_sum")}
    return {f"ray_{name}{suffix}" for name, (kind, _, _) in METRICS.items() for suffix in suffixes[kind]}


class StageMeter:
    """One stage's metrics in one process: its batches in flight and each image's seconds. Made with labels None
    (a stage used outside a run), it records nothing."""

    _in_flight: dict[tuple, int] = {}

    def __init__(self, stage: str, labels: MetricLabels | None):
        self.stage, self.labels = stage, labels
        if labels is not None:
            count_store_requests(labels)

    @contextmanager
    def batch(self) -> Iterator[None]:
        if self.labels is None:
            yield
            return
        self._add_in_flight(1)
        try:
            yield
        finally:
            self._add_in_flight(-1)

    def _add_in_flight(self, change: int) -> None:
        key = (self.stage, self.labels)
        with _lock:
            count = self._in_flight[key] = self._in_flight.get(key, 0) + change
        _metric("wurstfabrik_batches_in_flight").set(count, self.labels.tags(stage=self.stage))

    def images(self, seconds: Iterable[float]) -> None:
        """Each image's seconds in this stage (only images the stage made: failed ones spent none)."""
        if self.labels is None:
            return
        histogram, tags = _metric("wurstfabrik_stage_seconds"), self.labels.tags(stage=self.stage)
        for value in seconds:
            histogram.observe(float(value), tags)


def images_recorded(labels: MetricLabels, ok: int, failed: int) -> None:
    counter = _metric("wurstfabrik_images")
    for status, count in (("ok", ok), ("failed", failed)):
        if count:
            counter.inc(count, labels.tags(status=status))


class RunMeter:
    """The driver's metrics of one run: the images it records, by status, and where the job stands (planned, done,
    remaining). Bad input rows count as planned, never as remaining: no run can make them."""

    def __init__(self, labels: MetricLabels, planned: int, done: int, bad_input: int):
        self.labels, self.planned, self.done, self.bad_input = labels, planned, done, bad_input
        self._progress()

    def recorded(self, ok: int = 0, failed: int = 0) -> None:
        images_recorded(self.labels, ok, failed)
        self.done += ok
        self._progress()

    def recorded_statuses(self, statuses: np.ndarray) -> None:
        """A recorded batch's `status` column."""
        self.recorded(int((statuses == "ok").sum()), int((statuses == "failed").sum()))

    def _progress(self) -> None:
        tags = self.labels.tags()
        _metric("wurstfabrik_job_images_planned").set(self.planned, tags)
        _metric("wurstfabrik_job_images_done").set(self.done, tags)
        _metric("wurstfabrik_job_images_remaining").set(max(0, self.planned - self.done - self.bad_input), tags)


_store_labels: MetricLabels | None = None


def count_store_requests(labels: MetricLabels) -> None:
    """Counts this process's S3 requests under `labels` from now on (a task worker takes each task's run's)."""
    global _store_labels
    _store_labels = labels
    requests.listen(_on_store_request)


def _on_store_request(operation: str, retry: bool) -> None:
    labels = _store_labels
    if labels is None:
        return
    tags = labels.tags(kind=operation)
    _metric("wurstfabrik_store_requests").inc(1, tags)
    if retry:
        _metric("wurstfabrik_store_retries").inc(1, tags)
