"""bench/fleet.py's dry run: a small simulated fleet (2 simulated GPUs on a Ray cluster of its own), the job on rclone
behind the latency proxy, and every figure the bench reports, from one run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.own_ray

ROOT = Path(__file__).resolve().parent.parent


def test_the_dry_run_reports_every_figure(tmp_path):
    out = tmp_path / "fleet.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet.py"), "--dry-run", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["engine"]["images"] == 48 and result["engine"]["sustained_images_per_s"] > 0
    [job] = result["jobs"]
    assert job["exit_code"] == 0 and job["images"] == 48 and job["resume_made"] == 0
    assert job["sustained_images_per_s"] > 0 and job["driver_cpu_ms_per_image"] > 0
    # Each image is one PUT at least, and the manifest's parts, the lease and the run records come on top.
    assert job["requests"]["PUT"] >= 48 and job["requests_per_image"] > 1
    assert job["manifest_parts_stored"] >= 1 and job["manifest_parts_left"] >= 1
    assert [op["operator"] for op in job["dataflow"]][-3:-1] == ["MapBatches(PriorStage)", "MapBatches(DecoderStage)"]
    assert job["cap"] and "cap: " in done.stdout
