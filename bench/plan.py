"""Planning, resume and status at scale: time and peak memory of the driver's planning path for outputs that
already record N done images, against planning the 16 new prompts alone, in one run.

    python bench/plan.py                   # N = 1,000,000
    python bench/plan.py --n 10000000      # N = 10,000,000 (writes ~1.5 GB of Parquet under --dir)

For each N it writes a prompt file of N + 16 tiny prompts and a manifest of N done images whose rows look like a
job's own (every column, the same kinds of values), laid out in size-tiered parts as `compact` leaves them.
Each measurement runs in a fresh process that imports the driver (Ray, torch) as a run does, so peak memory
(ru_maxrss) is the driver's: the planning steps of `wurstfabrik run` (read the manifest's state columns, find
done images, scan and check every input row, cut read units) and `wurstfabrik status`.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

NEW_PROMPTS = 16


def write_inputs(folder: Path, n: int) -> None:
    """prompts.parquet (n + 16 rows), new.parquet (the 16 alone), and out/ with a manifest of n done images."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from wurstfabrik.store.manifest import FANOUT, MANIFEST_SCHEMA, TIER_BASE, store_part, write_job_params
    from wurstfabrik.store.prompts import row_ids
    from wurstfabrik.store.storage import open_output

    rows = np.arange(n + NEW_PROMPTS)
    prompts = pc.binary_join_element_wise("a sausage stand at dusk, take", pc.cast(pa.array(rows), pa.string()), " ")
    pq.write_table(pa.table({"prompt": prompts}), folder / "prompts.parquet")
    (folder / "new").mkdir(exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts.slice(n)}), folder / "new" / "prompts.parquet")
    output = open_output(str(folder / "out"))
    ids = row_ids("prompts.parquet", 0, rows[:n])
    start = 0
    # Size-tiered parts as compaction leaves them: at most FANOUT - 1 parts per tier, biggest first.
    sizes = []
    remaining = n
    for tier in range(12, -1, -1):
        size = TIER_BASE * FANOUT ** tier
        while remaining >= size and sum(1 for s in sizes if s == size) < FANOUT - 1:
            sizes.append(size)
            remaining -= size
    sizes += [remaining] if remaining else []
    for size in sizes:
        store_part(output, _manifest_rows(ids.slice(start, size), prompts.slice(start, size), MANIFEST_SCHEMA))
        start += size
    write_job_params(output, {"job_id": "bench", "params": {}, "total_images": n + NEW_PROMPTS})


def _manifest_rows(ids, prompts, schema):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    k = len(ids)
    now = datetime.now(timezone.utc)
    hex_digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    random_bytes = np.random.default_rng(k).integers(0, 256, (k, 32), dtype=np.uint8)
    hex_chars = np.stack([hex_digits[random_bytes >> 4], hex_digits[random_bytes & 15]], axis=2).reshape(k, 64)
    digest = pa.array(hex_chars.view("S64").ravel(), pa.binary()).cast(pa.string())  # like sha256: incompressible
    columns = {
        "job_id": pa.array(["bench"] * k), "prompt_id": ids, "image_index": pa.array(np.zeros(k, np.int32)),
        "prompt": prompts, "negative_prompt": pa.array([""] * k), "seed": pa.array(np.arange(k, dtype=np.int64)),
        "width": pa.array(np.full(k, 1024, np.int32)), "height": pa.array(np.full(k, 1024, np.int32)),
        "params": pa.array(['{"decoder_guidance_scale": 0.0, "decoder_steps": 12, "prior_guidance_scale": 4.0, '
                            '"prior_steps": null, "prior_timesteps": null}'] * k),
        "truncated": pa.array(np.zeros(k, bool)),
        "uri": pc.binary_join_element_wise("s3://bucket/wurst/run-001/images/ab/", ids, "_0.png", ""),
        "bytes": pa.array(np.full(k, 1_500_000, np.int64)), "sha256": digest, "status": pa.array(["ok"] * k),
        "prior_s": pa.array(np.full(k, 0.2)), "decoder_s": pa.array(np.full(k, 0.1)),
        "write_s": pa.array(np.full(k, 0.05)), "prior_node": pa.array(["a" * 56] * k),
        "decoder_node": pa.array(["b" * 56] * k), "finished_at": pa.array([now] * k, schema.field("finished_at").type),
        "run_id": pa.array(["0123456789ab"] * k), "source": pc.binary_join_element_wise("prompts.parquet#",
                                                                                         pc.cast(pa.array(
                                                                                             np.arange(k)),
                                                                                             pa.string()), ""),
    }
    arrays = [columns[f.name].cast(f.type) if f.name in columns else pa.nulls(k, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


MEASURE = """
import json, sys, time
import wurstfabrik.jobs.driver  # the driver's imports (Ray, torch), as a run has them
from wurstfabrik.jobs.plan import plan_units, scan_inputs
from wurstfabrik.jobs.spec import JobSpec
from wurstfabrik.jobs.status import status_report
from wurstfabrik.store.manifest import read_manifest
from wurstfabrik.store.storage import open_output
what, prompts, out = sys.argv[1:4]
start = time.perf_counter()
if what == "status":
    lines, _ = status_report(out)
    detail = lines[0]
else:
    spec = JobSpec.from_dict({"prompts": prompts, "output": out, "height": 1024, "width": 1024})
    done = read_manifest(open_output(out), ["prompt_id", "image_index"], "bench", "ok")
    plan = plan_units(spec, scan_inputs(spec, lambda h, w: None), done)
    detail = f"{plan.total_images} images, {plan.done_images} done, {plan.pending_images} to plan"
elapsed = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "peak_mb": peak_kb / 1024, "detail": detail}))
"""


def measure(what: str, prompts: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, what, str(prompts), str(out)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="done images (one run each)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="keep the inputs here (n<N>/), and reuse them when they exist (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    results = []
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.dir / f"n{n}" if args.dir else Path(tmp)
            start = time.perf_counter()
            if not (folder / "out" / "job.json").exists():
                folder.mkdir(parents=True, exist_ok=True)
                write_inputs(folder, n)
            setup = time.perf_counter() - start
            manifest_mb = sum(p.stat().st_size for p in (folder / "out" / "manifest").iterdir()) / 2**20
            parts = len(list((folder / "out" / "manifest").iterdir()))
            alone = measure("plan", folder / "new" / "prompts.parquet", folder / "empty-out")
            fresh = measure("plan", folder / "prompts.parquet", folder / "empty-out")
            resume = measure("plan", folder / "prompts.parquet", folder / "out")
            status = measure("status", folder / "prompts.parquet", folder / "out")
        row = {"n": n, "manifest_parts": parts, "manifest_mb": round(manifest_mb, 1), "setup_s": round(setup, 1),
               "alone": alone, "fresh": fresh, "resume": resume, "status": status}
        results.append(row)
        print(f"\nN = {n:,}: manifest of {parts} parts, {manifest_mb:.0f} MB (written in {setup:.0f} s)")
        for name, label in (("alone", f"plan the {NEW_PROMPTS} new prompts alone"),
                            ("fresh", f"plan all {n + NEW_PROMPTS:,} prompts, nothing done"),
                            ("resume", f"resume: {n:,} done + {NEW_PROMPTS} new"),
                            ("status", "status")):
            r = row[name]
            print(f"  {label:45s} {r['seconds']:7.2f} s  peak {r['peak_mb']:7.0f} MB   {r['detail']}")
        print(f"  resume costs {resume['seconds'] - alone['seconds']:+.2f} s and "
              f"{resume['peak_mb'] - alone['peak_mb']:+.0f} MB more than the {NEW_PROMPTS} alone")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
