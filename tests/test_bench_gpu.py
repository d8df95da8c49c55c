"""bench/gpu.py end to end on the CPU (--dry-run: tiny sizes, dynamo-only compiles), bfloat16 and fp8 rows in one run,
so that it cannot rot between the runs on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["ours eager", "reference eager", "ours compiled", "ours compiled + CUDA graphs", "reference compiled",
           "ours compiled fp8", "ours compiled fp8 + CUDA graphs"]


@pytest.mark.slow  # a benchmark's whole dry run: a minute here
def test_dry_run_measures_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--batches", "2", "--quantize", "none,fp8",
                           "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["gpu"] == "cpu" and result["quantize"] == ["none", "fp8"]
    rows = {r["system"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(SYSTEMS)
    for row in rows.values():
        assert row["note"] is None and row["batch"] == 2 and row["images_per_s"] > 0, row
        assert row["ratio_to_reference_eager"] > 0 and row["ratio_to_reference_compiled"] > 0
    assert rows["reference eager"]["ratio_to_reference_eager"] == 1.0
    assert result["tflop"]["per_image"] > 0 and result["best"]["tflops_achieved"] > 0
    for stage_ms in (result["stage_ms"], result["stage_ms_fp8"]):
        assert {"stage_c_step", "stage_b_step", "stage_a", "prior_text_encoder", "decoder_text_encoder"} <= set(
            stage_ms)
    assert "fp8" not in result["best"]["system"] and "fp8" in result["stage_ms_fp8"]["system"]
    # fp8 really ran: its images differ from bfloat16's (a PSNR, not None for identical images), and stay close.
    fp8 = result["fp8_vs_bf16"]
    assert fp8["batch"] == 2 and fp8["images"] == 2 and fp8["psnr_db_min"] is not None and fp8["psnr_db_min"] > 40
    assert set(result["compile_s"]) >= {"cold", "reference_cold", "warm"}
    assert 0 <= result["bf16_vs_float32"]["mean_levels"] < 255
    assert "images/s" in done.stdout and f"wrote {out}" in done.stdout
