"""Jobs on multi-node Ray clusters: stage placement by custom resources, a node lost mid-job, a writer pool that
grows with the cluster. Each starts Ray clusters of its own, so all are marked slow (.ci/run runs them). `ray job
submit` with token authentication as the README does it is in test_deploy.py, on the head its tests share."""

import json
import logging
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from wurstfabrik.jobs.driver import run_job
from wurstfabrik.jobs.spec import JobSpec
from wurstfabrik.store.manifest import latest_status, read_manifest
from wurstfabrik.store.storage import open_output
from wurstfabrik.workers.faults import FAULTS_ENV

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

PROMPTS = ["a red fox in the snow", "a lighthouse at night", "a bowl of ramen", "an astronaut riding a horse"]


def job_spec(tiny_checkpoints, tmp_path: Path, **placement) -> JobSpec:
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "prompts.parquet")
    prior, decoder = tiny_checkpoints
    small = {"prior_cpus": 0.5, "decoder_cpus": 0.5, "writer_cpus": 0.25, "writer_concurrency": 1}
    if placement.get("fused"):  # one pool: the decoder's fields do not apply
        del small["decoder_cpus"]
    return JobSpec.from_dict({
        "prompts": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"), "prior": str(prior),
        "decoder": str(decoder), "height": 128, "width": 128, "prior_steps": 3, "decoder_steps": 2,
        "placement": {**small, **placement}})


@pytest.fixture
def three_node_cluster(_ray_session):
    """A head and two workers, one advertising `prior_node`, one `decoder_node`; the shared Ray comes back
    afterwards through the `ray_local` fixture."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    prior_node = cluster.add_node(num_cpus=1, resources={"prior_node": 1})
    decoder_node = cluster.add_node(num_cpus=1, resources={"decoder_node": 1})
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield prior_node.node_id, decoder_node.node_id
    ray.shutdown()
    cluster.shutdown()


def test_each_stage_runs_on_the_node_type_its_placement_names(three_node_cluster, tiny_checkpoints, tmp_path):
    prior_node, decoder_node = three_node_cluster
    spec = job_spec(tiny_checkpoints, tmp_path, prior_resources={"prior_node": 0.5},
                    decoder_resources={"decoder_node": 0.5})
    result = run_job(spec, progress=False)

    assert result.summary["status"] == {"ok": 4, "failed": 0}
    rows = latest_status(read_manifest(open_output(spec.output))).values()
    assert {r["prior_node"] for r in rows} == {prior_node}
    assert {r["decoder_node"] for r in rows} == {decoder_node}


@pytest.fixture
def two_worker_cluster(_ray_session):
    """A head that runs no stage, and two workers that can each hold both actors."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, resources={"worker": 1}) for _ in range(2)]
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_a_node_lost_mid_job_costs_no_image(two_worker_cluster, tiny_checkpoints, tmp_path):
    cluster, workers = two_worker_cluster
    prompts = [f"{p}, take {i}" for i in range(4) for p in PROMPTS]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "many.parquet")
    spec = job_spec(tiny_checkpoints, tmp_path, prior_resources={"worker": 0.1}, decoder_resources={"worker": 0.1},
                    prior_batch_size=2, decoder_batch_size=2).model_copy(
        update={"prompts": str(tmp_path / "many.parquet"), "prior_steps": 10, "decoder_steps": 8})
    output = open_output(spec.output)
    lost = []

    def remove_the_decoders_node():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = [r for r in latest_status(read_manifest(output)).values() if r["decoder_node"]]
            if rows:
                node = next(w for w in workers if w.node_id == rows[0]["decoder_node"])
                cluster.remove_node(node, allow_graceful=False)
                lost.append(node.node_id)
                return
            time.sleep(0.2)

    remover = threading.Thread(target=remove_the_decoders_node)
    remover.start()
    try:
        result = run_job(spec, progress=False)
    finally:
        remover.join()
    assert lost, "the decoder's node was never removed"
    assert result.exit_code == 0 and result.summary["status"] == {"ok": 16, "failed": 0}
    # Every image exactly once: one object per (id, index). Work Ray redid after the loss (a writer task whose
    # output block was on the lost node) may have recorded an image a second time, at the same key.
    images = sorted(p.name for p in (tmp_path / "out" / "images").rglob("*.png"))
    assert len(images) == len(set(images)) == 16
    final = latest_status(read_manifest(output))
    assert len(final) == 16 and all(r["status"] == "ok" for r in final.values())
    assert {r["decoder_node"] for r in final.values()} - set(lost), "no image was decoded after the node was lost"


def test_the_writer_pool_grows_with_the_cluster(_ray_session, tiny_checkpoints, tmp_path, monkeypatch):
    log = tmp_path / "encoder-tasks"
    log.mkdir()
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"slow_encode": {"seconds": 1.5, "log": str(log)}}))
    ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, logging_level=logging.WARNING)  # a node with spare CPUs
    try:
        prompts = [f"{p}, take {i}" for i in range(2) for p in PROMPTS]
        pq.write_table(pa.table({"prompt": prompts}), tmp_path / "many.parquet")
        spec = job_spec(tiny_checkpoints, tmp_path, prior_batch_size=1, decoder_batch_size=1,
                        writer_concurrency=None).model_copy(update={"prompts": str(tmp_path / "many.parquet")})
        result = run_job(spec, progress=False)
    finally:
        ray.shutdown()
    assert result.exit_code == 0 and result.summary["status"]["ok"] == 8
    spans = [tuple(map(float, p.read_text().split()[1:])) for p in log.iterdir()]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most > 2, f"at most {most} encoder tasks ran at once"


@pytest.fixture
def gpu_cluster(_ray_session):
    """A head without GPUs and a worker with two logical GPUs, as a GPU cluster shows itself to Ray."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield worker.node_id
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("fused", [False, True])
def test_a_job_runs_on_a_cluster_whose_nodes_have_gpus(gpu_cluster, tiny_checkpoints, tmp_path, fused):
    # Ray Data refused GPU actors that take one block per batch (batch_size=None): no job could start on GPUs.
    spec = job_spec(tiny_checkpoints, tmp_path, fused=fused)
    result = run_job(spec, progress=False)

    assert result.summary["status"] == {"ok": 4, "failed": 0}
    rows = latest_status(read_manifest(open_output(spec.output))).values()
    assert {r["prior_node"] for r in rows} == {r["decoder_node"] for r in rows} == {gpu_cluster}
