"""bench/actor_start.py end to end (one fresh process per load), so that it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a benchmark's whole run: fresh processes importing torch
def test_each_load_is_measured_and_only_transformers_class_imports_its_model_module():
    done = subprocess.run([sys.executable, "bench/actor_start.py", "--tries", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in results.values())
    assert results["prior (ours)"]["imported"] == results["decoder (ours)"]["imported"] == []
    assert "transformers.models.clip.modeling_clip" in results["prior text encoder (transformers)"]["imported"]
