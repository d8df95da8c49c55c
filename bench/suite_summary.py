"""The GPU suite's summary: one table from the results folder's gpu.json and job.json, printed and written to
summary.md and summary.json; exits 1 if a part did not end cleanly (a time limit counts).

    python bench/suite_summary.py RESULTS_DIR --part gpu=0 --part job=124
"""

import argparse
import json
import sys
from pathlib import Path

TIMED_OUT = (124, 137)


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gpu_lines(gpu: dict) -> list[str]:
    lines = [f"### bench/gpu.py: {gpu.get('gpu')}, {gpu.get('height')}x{gpu.get('width')}", "",
             "| system | batch | images/s | × reference eager | × reference compiled | peak GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in gpu.get("rows", []):
        if r.get("images_per_s") is None:
            lines.append(f"| {r['system']} | {r['batch']} | {r.get('note')} | | | |")
            continue
        cells = [f"{r[k]:.2f}" if r.get(k) else "-" for k in ("ratio_to_reference_eager",
                                                               "ratio_to_reference_compiled", "peak_memory_gib")]
        lines.append(f"| {r['system']} | {r['batch']} | {r['images_per_s']:.3f} | {' | '.join(cells)} |")
    if gpu.get("compile_s"):
        lines += ["", f"compile seconds: {json.dumps(gpu['compile_s'])}"]
    return lines


def job_lines(job: dict) -> list[str]:
    lines = [f"### bench/job.py: {job.get('gpu') or job.get('device')}, {job.get('height')}², "
             f"{job.get('prompts')} prompts, batch {job.get('batch')}", "",
             "| run | images/s | steady images/s | steady × bare | prior busy s | decoder busy s | busy ÷ elapsed | "
             "encoders held the decoder back |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    bare = job.get("bare")
    if bare:
        lines.append(f"| bare pipeline | {bare['images_per_s']:.3f} | {bare['steady_images_per_s']:.3f} | 1.00 "
                     "| | | | |")
    elif job.get("bare_note"):
        lines.append(f"| bare pipeline | {job['bare_note']} | | | | | | |")
    for r in job.get("rows", []):
        if "images_per_s" not in r:
            lines.append(f"| {r['row']} | {r.get('note')} | | | | | | |")
            continue
        enc = r.get("encoders") or {}
        held = enc.get("held_back")
        verdict = "-" if held is None else (
            f"{'yes' if held else 'no'} ({enc['decoder_output_backpressure_s']} s waiting; encoders busy "
            f"{enc.get('encoder_cores_busy')} cores, ended {enc.get('encoder_after_decoder_s')} s after it)")
        num = [r.get("steady_images_per_s"), r.get("steady_ratio_to_bare"), r["prior"]["busy_s"],
               r["decoder"]["busy_s"], r.get("stage_busy_over_elapsed")]
        lines.append(f"| {r['row']} | {r['images_per_s']:.3f} | "
                     + " | ".join("-" if v is None else f"{v:.3f}" if i < 2 else f"{v:.1f}" if i < 4 else f"{v:.2f}"
                                  for i, v in enumerate(num)) + f" | {verdict} |")
    if job.get("faster_placement"):
        lines += ["", f"faster placement: {job['faster_placement']}"]
    for temperature, stages in (job.get("compile_cache") or {}).items():
        lines.append(f"compile cache {temperature}: first batch seconds prior {stages['prior']['first_batch_s']}, "
                     f"decoder {stages['decoder']['first_batch_s']} (a batch after it: "
                     f"{stages['prior']['median_batch_s']}, {stages['decoder']['median_batch_s']})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--part", action="append", default=[], help="NAME=EXIT_STATUS of a part that ran")
    args = parser.parse_args(argv)
    parts = {name: int(status) for name, status in (p.split("=", 1) for p in args.part)}
    gpu, job = read(args.dir / "gpu.json"), read(args.dir / "job.json")
    lines = ["## GPU suite", "", "| part | exit | result |", "|---|---:|---|"]
    for name, status in parts.items():
        found = {"gpu": gpu, "job": job}.get(name)
        state = "ok" if status == 0 else "time limit reached" if status in TIMED_OUT else "failed"
        lines.append(f"| {name} | {status} | {state}{'' if found else ', no results file'} |")
    for found, render in ((gpu, gpu_lines), (job, job_lines)):
        if found:
            lines += [""] + render(found)
    text = "\n".join(lines) + "\n"
    print(text)
    (args.dir / "summary.md").write_text(text)
    (args.dir / "summary.json").write_text(json.dumps({"parts": parts, "gpu": gpu, "job": job}, indent=2) + "\n")
    return 0 if parts and all(status == 0 for status in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
