"""Watching a run as an operator does: Prometheus scraping the Ray node's metrics export port while the job runs and
after its processes are gone, the Grafana dashboard's queries against what was exported, and `wurstfabrik status
--watch` from another machine's point of view (reading the S3 output directly, without Ray). One run serves them
all: a CLI driver joining a Ray of this module's own, whose nodes reach S3 through a proxy that answers some
requests with 503 or 500 or drops them (so retries are counted), each encoder task paced to take seconds (so the
run lasts long enough to be seen going, whatever the machine's speed). Slow: about a minute and a half here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from conftest import s3_environment, set_environment
from fault_proxy import FaultProxy
from job_helpers import PROMPTS, make_spec, start_driver, start_local_ray, write_prompts
from prometheus_text import metrics_port, scrape, scrape_until, total

from wurstfabrik.store.manifest import read_manifest
from wurstfabrik.store.runs import read_runs
from wurstfabrik.store.storage import open_output
from wurstfabrik.workers.faults import FAULTS_ENV
from wurstfabrik.workers.metrics import METRICS, STAGES, exported_names

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 12
ENCODE_S = 2.5  # each encoder task (a batch of 2): 6 in a row, so images are recorded over 15 s or more
# Ray's own metric of GPU utilisation, by the name its reporter agent gives it (ray.dashboard.modules.reporter).
RAY_GPU_METRIC = "ray_node_gpus_utilization"
# A fresh driver on a Ray of its own takes about a minute on the 2-core development machine; the everyday suite
# checks a run's metrics against its manifest on the shared Ray (test_job.py) and the watch on a simulated run.
pytestmark = [pytest.mark.slow, pytest.mark.own_ray]


@dataclass
class Scrape:
    at: float  # time.monotonic()
    samples: list


class Scraper(threading.Thread):
    """Scrapes the node's metrics endpoint every second, as Prometheus would."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.scrapes, self.done = port, [], threading.Event()

    def scrape(self) -> Scrape:
        return Scrape(time.monotonic(), scrape(self.port))

    def run(self):
        while not self.done.is_set():
            try:
                self.scrapes.append(self.scrape())
            except OSError:
                pass
            self.done.wait(1.0)


@dataclass
class WatchedRun:
    run_id: str
    counts: dict  # the manifest's rows of the run, by status
    prompts: list[str]
    secrets: list[str]
    driver_started: float
    driver_ended: float
    driver_err: str
    during: list[Scrape]  # scrapes while the driver ran
    after: Scrape  # once its final counts were exported
    watch_code: int
    watch_lines: list[str]
    watch_ended: float


def wait_for_part(output, driver: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not output.list("manifest/"):
        assert driver.poll() is None, "the driver ended before it recorded anything"
        assert time.monotonic() < deadline, "no manifest part"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, tiny_checkpoints, _ray_session, s3_server) -> WatchedRun:
    folder = tmp_path_factory.mktemp("watched")
    bucket = s3_server.create_bucket("watched")
    prompts = [f"{p}, take {i}" for i in range(2) for p in PROMPTS]
    spec = make_spec(tiny_checkpoints, write_prompts(folder / "p.parquet", prompts), f"s3://{bucket}/out",
                     placement={"prior_batch_size": 2, "decoder_batch_size": 2})
    direct = s3_environment(s3_server)  # another machine reading the output: no proxy in the way
    proxy = FaultProxy(s3_server.endpoint, share=0.1, seed=3).start()
    pace = {"slow_encode": {"seconds": ENCODE_S, "log": str(folder)}}
    try:
        with pytest.MonkeyPatch.context() as patch:
            proxied = s3_environment(s3_server, proxy.endpoint)
            set_environment(patch, {**proxied, FAULTS_ENV: json.dumps(pace)})
            start_local_ray(proxied)
            scraper = Scraper(metrics_port())
            scraper.start()
            started = time.monotonic()
            driver = start_driver(spec, folder, ray.get_runtime_context().gcs_address, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            watch = None
            try:
                set_environment(patch, direct)
                output = open_output(spec.output)
                wait_for_part(output, driver)
                watch = subprocess.Popen([sys.executable, "-m", "wurstfabrik.jobs.cli", "status", "--watch",
                                          spec.output, "--interval", "1"], stdout=subprocess.PIPE, text=True)
                _, err = driver.communicate(timeout=400)
                ended = time.monotonic()
                watch_out, _ = watch.communicate(timeout=120)
                watch_ended = time.monotonic()
            finally:
                for process in (driver, watch):
                    if process is not None and process.poll() is None:
                        process.kill()
            assert driver.returncode == 0, err[-3000:]
            (record,) = read_runs(output)
            run_id = record["run_id"]
            statuses = read_manifest(output, ["status"], run_id=run_id).column("status").to_pylist()
            counts = {s: statuses.count(s) for s in ("ok", "failed")}
            # The node's agent serves what the processes sent before they exited.
            after = Scrape(time.monotonic(), scrape_until(
                scraper.port, lambda s: total(s, "ray_wurstfabrik_images_total", run_id=run_id) == IMAGES))
            scraper.done.set()
    finally:
        ray.shutdown()
        proxy.stop()
    assert proxy.counts.slow_down + proxy.counts.internal_error + proxy.counts.dropped > 0
    return WatchedRun(run_id, counts, prompts, [s3_server.access_key, s3_server.secret_key], started, ended, err,
                      [s for s in scraper.scrapes if s.at < ended], after, watch.returncode,
                      watch_out.splitlines(), watch_ended)


def test_the_run_is_seen_going_on_the_nodes_metrics_port(watched_run):
    run = watched_run.run_id
    seen = [(total(s.samples, "ray_wurstfabrik_images_total", run_id=run, status="ok"),
             total(s.samples, "ray_wurstfabrik_job_images_remaining", run_id=run)) for s in watched_run.during]
    assert any(0 < ok < IMAGES and remaining > 0 for ok, remaining in seen), seen
    assert any(total(s.samples, "ray_wurstfabrik_job_images_planned", run_id=run) == IMAGES
               for s in watched_run.during)


def test_after_the_run_its_metrics_equal_the_manifest(watched_run):
    samples, run = watched_run.after.samples, watched_run.run_id
    assert watched_run.counts == {"ok": IMAGES, "failed": 0}
    for status, count in watched_run.counts.items():
        assert total(samples, "ray_wurstfabrik_images_total", run_id=run, status=status) == count, status
    for stage in STAGES:  # every image went through every stage once, in processes that are gone now
        assert total(samples, "ray_wurstfabrik_stage_seconds_count", run_id=run, stage=stage) == IMAGES, stage
        assert total(samples, "ray_wurstfabrik_stage_seconds_bucket", run_id=run, stage=stage, le="+Inf") == IMAGES
    assert total(samples, "ray_wurstfabrik_job_images_planned", run_id=run) == IMAGES
    assert total(samples, "ray_wurstfabrik_job_images_done", run_id=run) == IMAGES
    assert total(samples, "ray_wurstfabrik_job_images_remaining", run_id=run) == 0
    assert total(samples, "ray_wurstfabrik_store_requests_total", run_id=run, kind="PutObject") >= IMAGES
    assert total(samples, "ray_wurstfabrik_store_retries_total", run_id=run) > 0  # the proxy's faults
    ours = [(name, labels) for name, labels, _ in samples if name.startswith("ray_wurstfabrik_")]
    assert {name for name, _ in ours} == exported_names()
    for name, labels in ours:
        assert labels["job_id"] and labels["run_id"] and labels.get("NodeAddress"), (name, labels)
    text = json.dumps(ours)
    for secret in [*watched_run.prompts, *watched_run.secrets]:
        assert secret not in text


def test_the_dashboard_names_only_metrics_that_were_exported(watched_run):
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "wurstfabrik.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    named = {name for q in queries for name in re.findall(r"\b(ray_[a-z0-9_]+)", q)}
    exported = {name for name, _, _ in watched_run.after.samples}
    assert {n for n in named if n.startswith("ray_wurstfabrik_")} <= exported
    assert named - exported == {RAY_GPU_METRIC}  # no GPU here
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    assert RAY_GPU_METRIC.removeprefix("ray_") in METRICS_GAUGES  # Ray's own name for it
    shown = {name for name in METRICS if any(n.startswith(f"ray_{name}") for n in named)}
    assert shown == set(METRICS)  # a panel for every metric


def test_status_watch_shows_the_count_rising_and_ends_with_the_run(watched_run):
    assert watched_run.watch_code == 0, watched_run.watch_lines
    progress = [line for line in watched_run.watch_lines if f"run {watched_run.run_id} " in line]
    ok = [int(re.search(r": (\d+) ok, ", line)[1]) for line in progress if " ok, " in line]
    assert ok == sorted(ok) and len(set(ok)) >= 3, progress  # rising, refreshed along the way
    assert any("images/s over the last minute" in line and "left" in line for line in progress), progress
    assert f"run {watched_run.run_id} finished: {IMAGES} ok, 0 failed, 0 missing of {IMAGES} images" in progress[-1]
    assert any(f"{IMAGES} ok, 0 failed, 0 missing of {IMAGES} images" in line and "job" in line
               for line in watched_run.watch_lines[len(progress):])  # then the status report
    assert watched_run.watch_ended - watched_run.driver_ended < 30  # it noticed the end within a few refreshes

