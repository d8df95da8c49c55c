"""The job against the bare pipeline on one machine, in one run: the same prompts through the whole job (a local
Ray, Ray Data's chain, encoders, writers, manifest) and through the bare pipeline in one process, on the same
device, checkpoint and settings. Per job: images/s, per-stage busy seconds, and whether the encoders held the
decoder back; for both placements (two actor pools, or one fused pool) and for PNG and JPEG. Compiled (the
default on cuda), all rows share one compile cache: the first job row compiles with it empty (cold), the next
row's new actors load what it kept (warm), and the bare run restores it too.

    python bench/job.py                               # tiny random checkpoint, 256², on cuda if there is one
    python bench/job.py --full --device cuda          # the published sizes with random weights at 1024²
    python bench/job.py --dry-run --out job.json      # all of it on the CPU at tiny sizes, eager

--full builds the published architecture sizes with random weights (bench/pipeline.py's builders) and saves them
once to --checkpoint-dir, which later runs reuse; nothing is downloaded. Rows run in order of importance: each
placement with the first format, the bare pipeline, then the other formats with the faster placement; a row that
would not fit in --budget-s (judged by the longest row after the first) is skipped and says so. The JSON is
rewritten after every row.
"""

import sys
from pathlib import Path

# Run as `python bench/job.py`: the repository root replaces this folder on sys.path, so that this folder's
# modules import as `bench.*`.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: shared cores make threaded small ops crawl

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from wurstfabrik.jobs.driver import run_job  # noqa: E402
from wurstfabrik.jobs.ray_connection import connect_ray  # noqa: E402
from wurstfabrik.jobs.spec import JobSpec  # noqa: E402
from wurstfabrik.pipeline import WuerstchenPipeline  # noqa: E402
from wurstfabrik.pipeline.compile_cache import CompileCache  # noqa: E402
from wurstfabrik.pipeline.tiny import write_tiny_checkpoints  # noqa: E402
from wurstfabrik.store.encoding import encode_image  # noqa: E402
from wurstfabrik.store.manifest import read_manifest  # noqa: E402
from wurstfabrik.store.runs import read_runs  # noqa: E402
from wurstfabrik.store.storage import open_output  # noqa: E402

SUBJECTS = ("a red fox", "a lighthouse", "a bowl of ramen", "an astronaut", "a sausage stand", "a sailing boat",
            "a mountain lake", "a robot barista")
STYLES = ("watercolor", "oil painting", "photo at dusk", "pixel art", "pencil sketch", "isometric render")
PLACEMENTS = {"two-pools": False, "fused": True}
HELD_BACK_S = 1.0  # the decoder's finished batches waited this long in all for room downstream: held back


def prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[(i // len(SUBJECTS)) % len(STYLES)]}, take {i}" for i in range(n)]


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def checkpoints(args, work: Path) -> tuple[Path, Path, str]:
    """The prior and decoder folders the run loads, and what they are."""
    if args.checkpoints:
        return args.checkpoints / "prior", args.checkpoints / "decoder", str(args.checkpoints)
    tiny = write_tiny_checkpoints(work / "tiny")
    if not args.full:
        return *tiny, "tiny (random weights)"
    folder = args.checkpoint_dir or work / "full"
    if not (folder / "prior").is_dir() or not (folder / "decoder").is_dir():
        from bench.pipeline import write_full_checkpoints  # diffusers: only for building the published sizes

        start = time.perf_counter()
        staging = folder.with_name(folder.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        write_full_checkpoints(*tiny, staging, args.device if args.device.type == "cuda" else torch.device("cpu"),
                               torch.bfloat16)
        staging.rename(folder)  # whole or absent: a run killed while writing leaves only the .partial folder
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"wrote the published sizes with random weights to {folder} in {time.perf_counter() - start:.0f} s",
              flush=True)
    return folder / "prior", folder / "decoder", f"published sizes, random weights ({folder})"


def bare(prior: Path, decoder: Path, texts: list[str], args, cache: Path | None) -> dict:
    """The pipeline in this process: load, then batches of --batch, each image encoded as the job's first format;
    steady images/s leaves out the first batch (warm-up). Compiled, it first restores what the job's actors
    kept in `cache`, as a job's actor would."""
    start = time.perf_counter()
    if cache is not None:
        for stage in ("prior", "decoder"):
            CompileCache(cache / stage).restore()
    pipe = WuerstchenPipeline.from_pretrained(prior, decoder, device=args.device, dtype=args.dtype,
                                              compile=cache is not None)
    loaded = time.perf_counter()
    batch_s = []
    for i in range(0, len(texts), args.batch):
        began = time.perf_counter()
        images = pipe(texts[i:i + args.batch], list(range(i, i + len(texts[i:i + args.batch]))), height=args.height,
                      width=args.height, prior_steps=args.prior_steps, decoder_steps=args.decoder_steps)
        for image in images:
            encode_image(np.asarray(image), args.formats[0], 90)
        batch_s.append(time.perf_counter() - began)
    total = time.perf_counter() - start
    del pipe
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    steady = batch_s[1:] or batch_s
    steady_images = len(texts) - (args.batch if len(batch_s) > 1 else 0)
    return {"wall_s": round(total, 3), "load_s": round(loaded - start, 3),
            "images_per_s": round(len(texts) / total, 4), "steady_images_per_s": round(steady_images / sum(steady), 4),
            "batch_s": [round(s, 3) for s in batch_s]}


def job_spec(prior: Path, decoder: Path, prompt_file: Path, out: Path, args, fused: bool, image_format: str,
             compile_cache: Path | None) -> JobSpec:
    placement = {"prior_batch_size": args.batch, "decoder_batch_size": args.batch, "prior_cpus": 1.0,
                 "writer_cpus": 0.5, "fused": fused}
    if args.device.type == "cpu":
        placement["prior_gpus"] = 0.0
        if not fused:
            placement["decoder_gpus"] = 0.0
    return JobSpec.from_dict({
        "prompts": str(prompt_file), "output": str(out), "prior": str(prior), "decoder": str(decoder),
        "height": args.height, "width": args.height, "prior_steps": args.prior_steps,
        "decoder_steps": args.decoder_steps, "dtype": str(args.dtype).removeprefix("torch."), "format": image_format,
        "compile": compile_cache is not None, "compile_cache": str(compile_cache) if compile_cache else None,
        "placement": placement})


def stage_seconds(table: pa.Table, column: str) -> dict:
    """A stage's busy seconds from the manifest (each row holds its batch's seconds per image), its first batch
    (the one with the most seconds per image: where compiling happens) and its median batch."""
    values = [v for v in table.column(column).to_pylist() if v]
    if not values:
        return {"busy_s": None, "first_batch_s": None, "median_batch_s": None}
    batches = Counter(values)  # the rows of one batch share their seconds per image
    per_batch = [per_image * count for per_image, count in batches.items()]
    slowest = max(batches)
    return {"busy_s": round(sum(values), 3), "first_batch_s": round(slowest * batches[slowest], 3),
            "median_batch_s": round(statistics.median(per_batch), 3)}


def encoder_backlog(dataflow: dict | None) -> dict:
    """Whether the encoders held the decoder back, from Ray Data's operator stats in the run record: the seconds
    the decoder's finished batches were not taken for want of room downstream, how long encoder tasks waited to
    start, how many cores they kept busy, and how long they ran on after the decoder's last batch."""
    if not dataflow:
        return {"held_back": None, "note": "no dataflow stats in the run record"}
    decoder = next((op for op in dataflow if "DecoderStage" in op["operator"] or "FusedStage" in op["operator"]),
                   None)
    encoder = next((op for op in dataflow if "encode_images" in op["operator"]), None)
    if decoder is None or encoder is None:
        return {"held_back": None, "note": f"operators not found in {[op['operator'] for op in dataflow]}"}
    span = (encoder["ended"] or 0) - (encoder["started"] or 0)
    held = decoder["output_backpressure_s"]
    return {"held_back": None if held is None else held >= HELD_BACK_S, "decoder_output_backpressure_s": held,
            "decoder_submission_backpressure_s": decoder["submission_backpressure_s"],
            "encoder_operator": encoder["operator"], "encoder_busy_s": encoder["busy_s"],
            "encoder_tasks": encoder["tasks"],
            "encoder_cores_busy": round(encoder["busy_s"] / span, 2) if encoder["busy_s"] and span > 0 else None,
            "encoder_mean_wait_s": encoder["mean_scheduling_s"],
            "encoder_after_decoder_s": round(encoder["ended"] - decoder["ended"], 3)
            if encoder["ended"] and decoder["ended"] else None}


def start_ray(spec: JobSpec, tries: int = 3) -> None:
    """The job's own local Ray, started again where a loaded machine's raylet misses Ray's start deadline."""
    import ray

    for attempt in range(tries):
        if ray.is_initialized():
            return
        try:
            connect_ray(spec)
        except Exception as e:
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == tries - 1:
                raise
            print(f"Ray did not start ({_first_line(e)[:80]}...); trying again", flush=True)


def job(name: str, spec: JobSpec, n: int) -> dict:
    started = time.perf_counter()
    start_ray(spec)  # a cluster is up before its jobs: Ray's own start is left out of the row's time
    start = time.perf_counter()
    result = run_job(spec, progress=False)
    wall = time.perf_counter() - start
    output = open_output(spec.output)
    table = read_manifest(output, ["status", "prior_s", "decoder_s", "write_s", "finished_at"], status="ok")
    record = (read_runs(output, last=1) or [{}])[-1]
    finished = sorted(t.timestamp() for t in table.column("finished_at").to_pylist())
    batch = spec.placement.prior_batch_size
    # Steady: from the first batch's images written to the last image, leaving out start, loading and compiling.
    steady = (len(finished) - batch) / (finished[-1] - finished[batch - 1]) \
        if len(finished) > batch and finished[-1] > finished[batch - 1] else None
    prior, decoder = stage_seconds(table, "prior_s"), stage_seconds(table, "decoder_s")
    elapsed = record.get("elapsed_s") or wall
    row = {"row": name, "placement": "fused" if spec.placement.fused else "two-pools", "format": spec.format,
           "compile": spec.compile, "exit_code": result.exit_code, "ok": table.num_rows, "prompts": n,
           "wall_s": round(wall, 3), "images_per_s": round(table.num_rows / wall, 4),
           "steady_images_per_s": round(steady, 4) if steady else None,
           "prior": prior, "decoder": decoder,
           "stage_busy_over_elapsed": round((prior["busy_s"] + decoder["busy_s"]) / elapsed, 3)
           if prior["busy_s"] and decoder["busy_s"] else None,
           "encoders": encoder_backlog(record.get("dataflow")), "dataflow": record.get("dataflow"),
           "ray_start_s": round(start - started, 3)}
    if result.exit_code:
        row["note"] = f"exit code {result.exit_code}: {result.message}"
    return row


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[-1][:300] if text else ""


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/job.py", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU, the tiny checkpoint at 128², 4 prompts in batches of 2, 2 steps each")
    parser.add_argument("--full", action="store_true", help="the published sizes with random weights")
    parser.add_argument("--device", help="cuda or cpu (default: cuda if there is one; cpu with --dry-run)")
    parser.add_argument("--prompts", type=int, help="default 32 (4 dry)")
    parser.add_argument("--height", type=int, help="image side, square (default 256; 1024 with --full; 128 dry)")
    parser.add_argument("--batch", type=int, help="model batch size, for the job and the bare run (default 8; 2 dry)")
    parser.add_argument("--prior-steps", type=int, default=None, help="default: Würstchen's 30-step schedule")
    parser.add_argument("--decoder-steps", type=int, default=None, help="default 12 (2 dry)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--checkpoints", type=Path, help="an existing folder with prior/ and decoder/")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="where --full saves the published sizes once, and finds them on later runs "
                             "(default: a temporary folder)")
    parser.add_argument("--placements", default="two-pools,fused", help="comma-separated: two-pools, fused")
    parser.add_argument("--formats", default="png,jpeg", help="comma-separated image formats (the first for all "
                                                                  "placements, the others with the faster one)")
    parser.add_argument("--compile", choices=["on", "off"],
                        help="compile every row, sharing one compile cache: the first job row compiles (cold), the "
                             "others and the bare run load what it kept (warm). Default: on for cuda, off for cpu")
    parser.add_argument("--budget-s", type=float, default=1e9, help="seconds for the whole run; rows that would "
                                                                    "not fit are skipped (default: no limit)")
    parser.add_argument("--out", type=Path, help="JSON file of the results, rewritten after every row")
    args = parser.parse_args(argv)
    args.placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    unknown = [p for p in args.placements if p not in PLACEMENTS]
    if unknown or not args.placements:
        parser.error(f"--placements: unknown {', '.join(unknown) or '(none given)'}; use two-pools and/or fused")
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()] or ["png"]
    if args.dry_run:
        args.device = args.device or "cpu"
        args.prompts, args.height, args.batch = args.prompts or 4, args.height or 128, args.batch or 2
        args.prior_steps, args.decoder_steps = args.prior_steps or 2, args.decoder_steps or 2
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    args.prompts = args.prompts or 32
    args.height = args.height or (1024 if args.full else 256)
    args.batch = args.batch or 8
    args.decoder_steps = args.decoder_steps or 12
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    args.compile = (args.compile or ("on" if args.device.type == "cuda" else "off")) == "on"
    if min(args.prompts, args.batch, args.height) < 1:
        parser.error("--prompts, --batch and --height must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    # A `timeout` sends SIGTERM: end like Ctrl-C, so that Ray is shut down and the rows so far are written.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.device.type == "cpu":
        torch.set_num_threads(1)
    gpu = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None
    result = {"date": datetime.date.today().isoformat(), "device": str(args.device), "gpu": gpu,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "dry_run": args.dry_run, "prompts": args.prompts, "height": args.height,
              "batch": args.batch, "prior_steps": args.prior_steps or "default (30)",
              "decoder_steps": args.decoder_steps, "dtype": str(args.dtype).removeprefix("torch."),
              "compile": args.compile, "rows": []}
    print(f"device {args.device}{f' ({gpu})' if gpu else ''}, {result['machine']}, torch {torch.__version__}, "
          f"{args.prompts} prompts at {args.height}², batch {args.batch}", flush=True)

    def write() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    def skipped(name: str, needs_s: float) -> bool:
        if budget.left() >= needs_s:
            return False
        note = f"skipped: needs about {needs_s:.0f} s, {max(budget.left(), 0):.0f} s of the budget left"
        if name == "bare pipeline":
            result["bare_note"] = note
        else:
            result["rows"].append({"row": name, "note": note})
        print(f"  {name:28s} {note}", flush=True)
        write()
        return True

    def report(row: dict) -> None:
        result["rows"].append(row)
        write()
        enc = row.get("encoders") or {}
        print(f"  {row['row']:28s} {row['images_per_s']:8.3f} images/s (steady {row['steady_images_per_s'] or 0:.3f})"
              f"  {row['wall_s']:7.1f} s" + (f"  encoders held the decoder back: {enc['held_back']}"
                                              if "held_back" in enc else "")
              + (f"  [{row['note']}]" if row.get("note") else ""), flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
            work = Path(tmp)
            prior, decoder, result["checkpoint"] = checkpoints(args, work)
            texts = prompts(args.prompts)
            prompt_file = work / "prompts.parquet"
            pq.write_table(pa.table({"prompt": texts}), prompt_file)

            cache = work / "compile-cache" if args.compile else None
            row_s = 0.0  # the longest row after the first: what the next row is expected to take

            def run(name: str, fused: bool, image_format: str) -> dict | None:
                nonlocal row_s
                if skipped(name, row_s):
                    return None
                began = time.perf_counter()
                try:
                    row = job(name, job_spec(prior, decoder, prompt_file, work / name, args, fused, image_format,
                                             cache), len(texts))
                except Exception as e:  # a row that fails (out of memory, a compile error) is a result too
                    result["rows"].append({"row": name, "note": f"failed: {type(e).__name__}: {_first_line(e)}"})
                    print(f"  {name:28s} {result['rows'][-1]['note']}", flush=True)
                    write()
                    return None
                row_s = max(row_s, time.perf_counter() - began) if result["rows"] else row_s
                report(row)
                if row["exit_code"] > 128:  # interrupted (the suite's timeout): no further rows
                    raise KeyboardInterrupt
                return row

            # The first job row compiles with an empty cache (cold); every later one, and the bare run, loads
            # what it kept (warm).
            measured = [run(f"{p} {args.formats[0]}", PLACEMENTS[p], args.formats[0]) for p in args.placements]
            if not skipped("bare pipeline", row_s):
                try:
                    result["bare"] = bare(prior, decoder, texts, args, cache)
                    print(f"  {'bare pipeline':28s} {result['bare']['images_per_s']:8.3f} images/s (steady "
                          f"{result['bare']['steady_images_per_s']:.3f})  {result['bare']['wall_s']:7.1f} s",
                          flush=True)
                except Exception as e:  # the job rows still say what they can without it
                    result["bare_note"] = f"failed: {type(e).__name__}: {_first_line(e)}"
                    print(f"  {'bare pipeline':28s} {result['bare_note']}", flush=True)
                write()
            measured = [r for r in measured if r and r.get("steady_images_per_s")]
            faster = max(measured, key=lambda r: r["steady_images_per_s"])["placement"] if measured \
                else args.placements[0]
            result["faster_placement"] = faster if len(measured) > 1 else None
            for image_format in args.formats[1:]:
                run(f"{faster} {image_format}", PLACEMENTS[faster], image_format)
    except KeyboardInterrupt:
        result["interrupted"] = True
        print("interrupted: the rows so far are kept", flush=True)
    finally:
        import ray

        ray.shutdown()
        summarize(result)
        write()
    print_table(result)
    if args.out:
        print(f"wrote {args.out}")
    return result


def summarize(result: dict) -> None:
    """Each job row against the bare run; cold and warm compiles as first-batch seconds per stage."""
    bare_rate = (result.get("bare") or {}).get("steady_images_per_s")
    for row in result["rows"]:
        if row.get("steady_images_per_s") and bare_rate:
            row["steady_ratio_to_bare"] = round(row["steady_images_per_s"] / bare_rate, 3)
    measured = [r for r in result["rows"] if r.get("ok")]
    if result["compile"] and measured:
        # The first job row's actors compiled; the next row's (new actors, same cache) loaded what they kept.
        result["compile_cache"] = {
            temperature: {"row": row["row"], **{stage: {k: row[stage][k] for k in ("first_batch_s", "median_batch_s")}
                                                 for stage in ("prior", "decoder")}}
            for temperature, row in zip(("cold", "warm"), measured[:2], strict=False)}


def print_table(result: dict) -> None:
    print(f"\n{result['gpu'] or result['device']}, {result['height']}², {result['prompts']} prompts, "
          f"batch {result['batch']}, {result['date']}")
    print(f"{'run':30s} {'images/s':>9s} {'steady':>8s} {'× bare':>7s} {'prior s':>8s} {'decoder s':>9s} "
          f"{'held back':>9s}")
    bare = result.get("bare")
    if bare:
        print(f"{'bare pipeline':30s} {bare['images_per_s']:9.3f} {bare['steady_images_per_s']:8.3f} {'1.00':>7s}")
    for row in result["rows"]:
        if "images_per_s" not in row:
            print(f"{row['row']:30s}  {row['note']}")
            continue
        enc = row["encoders"].get("held_back")
        print(f"{row['row']:30s} {row['images_per_s']:9.3f} {row['steady_images_per_s'] or 0:8.3f} "
              f"{row.get('steady_ratio_to_bare') or 0:7.2f} {row['prior']['busy_s'] or 0:8.1f} "
              f"{row['decoder']['busy_s'] or 0:9.1f} {'-' if enc is None else 'yes' if enc else 'no':>9s}")
    if result.get("bare_note"):
        print(f"{'bare pipeline':30s}  {result['bare_note']}")
    for temperature, stages in (result.get("compile_cache") or {}).items():
        print(f"compile cache {temperature} ({stages['row']}): first batch s prior {stages['prior']['first_batch_s']}, "
              f"decoder {stages['decoder']['first_batch_s']} (median batch {stages['prior']['median_batch_s']}, "
              f"{stages['decoder']['median_batch_s']})")


if __name__ == "__main__":
    main()
