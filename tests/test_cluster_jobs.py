"""Jobs on multi-node Ray clusters: stage placement by custom resources, and `ray job submit`."""

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from jobs.driver import run_job
from jobs.manifest import latest_status, read_manifest
from jobs.spec import JobSpec
from jobs.storage import open_output

PROMPTS = ["a red fox in the snow", "a lighthouse at night", "a bowl of ramen", "an astronaut riding a horse"]


def job_spec(tiny_checkpoints, tmp_path: Path, **placement) -> JobSpec:
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "prompts.parquet")
    prior, decoder = tiny_checkpoints
    return JobSpec.from_dict({
        "prompts": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"), "prior": str(prior),
        "decoder": str(decoder), "height": 128, "width": 128, "prior_steps": 3, "decoder_steps": 2,
        "placement": {"prior_cpus": 0.5, "decoder_cpus": 0.5, "writer_cpus": 0.25, "writer_concurrency": 1,
                      **placement}})


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "ray start --head exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing answered on port {port}")


def test_ray_job_submit_runs_the_cli_on_a_started_head(tiny_checkpoints, tmp_path):
    spec = job_spec(tiny_checkpoints, tmp_path)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.yaml").write_text(json.dumps(spec.model_dump(mode="json")))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": "",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS")
    dashboard, gcs = free_port(), free_port()
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    # --block keeps the head in this process group, so ending it cannot touch the tests' own Ray.
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--include-dashboard=true", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                             f"--temp-dir={ray_dir}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(dashboard, head)
        submit = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
             "--working-dir", str(job_dir), "--", "wurstfabrik", "run", "job.yaml", "--no-progress"],
            env=env, capture_output=True, text=True, timeout=300)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "4 ok, 0 failed, 0 missing of 4 images" in submit.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
    rows = latest_status(read_manifest(open_output(spec.output))).values()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
