"""bench/gpu_suite.sh --dry-run end to end on the CPU: both parts (bench/gpu.py and bench/job.py) at tiny sizes
under their time limits, every results file, and the summary table, so that the suite cannot rot between the runs
on a GPU. It starts its own Ray and compiles with dynamo, so it is marked slow (several minutes here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_every_part_and_prints_the_summary(tmp_path):
    results = tmp_path / "results"
    done = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", str(results)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]

    gpu = json.loads((results / "gpu.json").read_text())
    assert gpu["dry_run"] and all(r["images_per_s"] > 0 for r in gpu["rows"]), gpu["rows"]
    job = json.loads((results / "job.json").read_text())
    assert job["dry_run"] and job["bare"]["steady_images_per_s"] > 0
    faster = job["faster_placement"]
    rows = {r["row"]: r for r in job["rows"]}
    assert sorted(rows) == sorted(["two-pools png", "fused png", f"{faster} jpeg"])
    for row in rows.values():
        assert row["exit_code"] == 0 and row["ok"] == job["prompts"] == 4, row
        assert row["prior"]["busy_s"] > 0 and row["decoder"]["busy_s"] > 0 and row["steady_ratio_to_bare"] > 0
        encoders = row["encoders"]
        assert encoders["held_back"] in (True, False) and encoders["encoder_busy_s"] > 0, encoders
        assert encoders["decoder_output_backpressure_s"] >= 0
        assert any(("FusedStage" if row["placement"] == "fused" else "DecoderStage") in op["operator"]
                   for op in row["dataflow"])
    assert rows[f"{faster} jpeg"]["format"] == "jpeg"

    summary = (results / "summary.md").read_text()
    assert "| gpu | 0 | ok |" in summary and "| job | 0 | ok |" in summary
    for name in rows:
        assert f"| {name} |" in summary
    assert summary.strip() in done.stdout
    assert json.loads((results / "summary.json").read_text())["parts"] == {"gpu": 0, "job": 0}
    log = (results / "suite.log").read_text()
    assert "== gpu: exit 0" in log and "== job: exit 0" in log


def test_a_part_over_its_limit_is_stopped_and_reported(tmp_path):
    """The summary of a part that hit its time limit says so, and the suite's status is not 0."""
    results = tmp_path / "results"
    results.mkdir()
    done = subprocess.run(["python", "bench/suite_summary.py", str(results), "--part", "gpu=124", "--part", "job=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "| gpu | 124 | time limit reached, no results file |" in done.stdout


@pytest.mark.parametrize("installed", [True, False], ids=["installed", "a copy installed nowhere"])
def test_the_suite_imports_this_checkout_as_wurstfabrik(tmp_path, installed):
    """On the GPU machines the checkout is a copy of the working tree that no pip installed: bench/package_path.sh
    (sourced by the suite) must make `import wurstfabrik` find it there, and change nothing where it is installed.
    A `python` that skips site-packages (-S) stands for the GPU machine's: the editable install is not seen."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if not installed:
        (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
        (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    script = (". bench/package_path.sh && python -c 'import wurstfabrik.jobs.exit_codes as m; print(m.__file__)' "
              "&& echo \"$PYTHONPATH\"")
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    module, path = done.stdout.splitlines()
    assert Path(module).resolve() == ROOT / "jobs" / "exit_codes.py"
    assert path.split(os.pathsep)[0] == str(ROOT)
    assert (len(path.split(os.pathsep)) == 1) == installed
