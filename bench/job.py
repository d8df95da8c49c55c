"""The job's overhead: the same prompts through the whole job on a local Ray and through the bare pipeline in
one process, same checkpoint and settings, in one run.

    python bench/job.py [--prompts 32] [--height 256] [--checkpoints DIR]

Without --checkpoints it writes the tiny random checkpoint (its images are noise) to a temporary folder.
The bare run also encodes each image to PNG, so both sides produce the same files' worth of work; the job
adds Ray's start, model loading in actors, the object store hops, uploads and the manifest.
"""

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/job.py`, this folder comes first on sys.path, and bench/pipeline.py would shadow the package.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: shared cores make threaded small ops crawl

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from jobs.driver import run_job  # noqa: E402
from jobs.spec import JobSpec  # noqa: E402
from pipeline import WuerstchenPipeline  # noqa: E402
from pipeline.tiny import write_tiny_checkpoints  # noqa: E402

SUBJECTS = ("a red fox", "a lighthouse", "a bowl of ramen", "an astronaut", "a sausage stand", "a sailing boat",
            "a mountain lake", "a robot barista")
STYLES = ("watercolor", "oil painting", "photo at dusk", "pixel art", "pencil sketch", "isometric render")


def prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[(i // len(SUBJECTS)) % len(STYLES)]}, take {i}" for i in range(n)]


def bare(prior: Path, decoder: Path, texts: list[str], seeds: list[int], args) -> float:
    start = time.perf_counter()
    pipe = WuerstchenPipeline.from_pretrained(prior, decoder, dtype=args.dtype)
    for i in range(0, len(texts), args.batch):
        images = pipe(texts[i:i + args.batch], seeds[i:i + args.batch], height=args.height, width=args.height,
                      prior_steps=args.prior_steps, decoder_steps=args.decoder_steps)
        for image in images:
            image.save(io.BytesIO(), format="PNG")
    return time.perf_counter() - start


def job(prior: Path, decoder: Path, texts: list[str], work: Path, args) -> tuple[float, dict]:
    pq.write_table(pa.table({"prompt": texts}), work / "prompts.parquet")
    spec = JobSpec.from_dict({
        "prompts": str(work / "prompts.parquet"), "output": str(work / "out"), "prior": str(prior),
        "decoder": str(decoder), "height": args.height, "width": args.height, "prior_steps": args.prior_steps,
        "decoder_steps": args.decoder_steps, "dtype": args.dtype,
        "placement": {"prior_batch_size": args.batch, "decoder_batch_size": args.batch, "prior_cpus": 1.0,
                      "decoder_cpus": 1.0, "writer_cpus": 0.5}})
    start = time.perf_counter()
    result = run_job(spec, progress=False)
    return time.perf_counter() - start, result.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--height", type=int, default=256, help="image side (square)")
    parser.add_argument("--batch", type=int, default=8, help="model batch size, for both")
    parser.add_argument("--prior-steps", type=int, default=None, help="default: Würstchen's 30-step schedule")
    parser.add_argument("--decoder-steps", type=int, default=12)
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: per device)")
    parser.add_argument("--checkpoints", type=Path, default=None, help="folder with prior/ and decoder/")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.checkpoints:
            prior, decoder = args.checkpoints / "prior", args.checkpoints / "decoder"
        else:
            prior, decoder = write_tiny_checkpoints(work / "checkpoints")
        texts = prompts(args.prompts)
        job_s, summary = job(prior, decoder, texts, work, args)
        seeds = list(range(len(texts)))  # the cost does not depend on the seeds
        bare_s = bare(prior, decoder, texts, seeds, args)

    n = len(texts)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, cuda={torch.cuda.is_available()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"checkpoint: {args.checkpoints or 'tiny (random weights)'}, {n} prompts at {args.height}², "
          f"batch {args.batch}, prior steps {args.prior_steps or 'default (30)'}, decoder steps {args.decoder_steps}")
    print(f"job (local Ray, start and model loading included): {job_s:7.2f} s  {n / job_s:7.3f} images/s  "
          f"(ok {summary['status'].get('ok', 0)}, mean s/image prior {summary['mean_s']['prior']:.3f} "
          f"decoder {summary['mean_s']['decoder']:.3f} write {summary['mean_s']['write']:.3f})")
    print(f"bare pipeline (one process, model loading included): {bare_s:7.2f} s  {n / bare_s:7.3f} images/s")
    print(f"job / bare throughput: {bare_s / job_s:.2f}")


if __name__ == "__main__":
    main()
