"""The `wurstfabrik` command: run a job spec, report an output's status, or run the offline demo."""

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.errors import CheckpointError

from .ids import InputError
from .manifest import ManifestError, job_rows, latest_status, read_job_params, read_manifest
from .spec import JobSpec, SpecError, load_spec
from .storage import StorageError, open_output

USER_ERRORS = (SpecError, InputError, StorageError, CheckpointError, ManifestError)
DEMO_SUBJECTS = ("a red fox", "a lighthouse", "a bowl of ramen", "an astronaut", "a sausage stand", "a sailing boat")
DEMO_STYLES = ("watercolor", "oil painting", "photo at dusk", "pixel art", "pencil sketch", "isometric render")


def print_summary(summary: dict) -> None:
    status = summary["status"]
    print(f"\n{summary['output']}: {status.get('ok', 0)} ok, {status.get('failed', 0)} failed, "
          f"{summary.get('missing', 0)} missing of {summary.get('total_images', summary['images'])} images")
    print(json.dumps(summary, indent=2, default=str))


def run(spec: JobSpec, force: bool, progress: bool) -> int:
    from .driver import JobError, run_job  # imports Ray and torch: only when a job runs

    try:
        result = run_job(spec, force=force, progress=progress)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(result.summary)
    return 1 if result.failed or result.summary.get("missing") else 0


def status(output_uri: str) -> int:
    output = open_output(output_uri)
    recorded = read_job_params(output)
    if recorded is None:
        print(f"error: {output_uri} holds no wurstfabrik job (no job.json)", file=sys.stderr)
        return 2
    current = recorded.get("job_id")
    latest = list(latest_status(job_rows(read_manifest(output), current)).values())
    counts = {"ok": 0, "failed": 0}
    for row in latest:
        counts[row["status"]] += 1
    total = int(recorded.get("total_images", 0))
    print(f"{output_uri}: job {current}: {counts['ok']} ok, {counts['failed']} failed, "
          f"{max(0, total - len(latest))} missing of {total} images")
    for row in [r for r in latest if r["status"] == "failed"][:10]:
        print(f"  failed {row['prompt_id']} image {row['image_index']}: {row['error']}")
    return 0 if counts["ok"] == total else 1


def write_demo_inputs(folder: Path) -> tuple[Path, Path, Path]:
    """Tiny offline checkpoints and a Parquet file of a few dozen prompts, written once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.tiny import write_tiny_checkpoints

    prior, decoder = folder / "checkpoints" / "prior", folder / "checkpoints" / "decoder"
    if not (prior / "model_index.json").exists() or not (decoder / "model_index.json").exists():
        write_tiny_checkpoints(folder / "checkpoints")
    prompts = folder / "prompts.parquet"
    if not prompts.exists():
        rows = [f"{subject}, {style}" for subject in DEMO_SUBJECTS for style in DEMO_STYLES]
        pq.write_table(pa.table({"prompt": rows}), prompts)
    return prompts, prior, decoder


def demo(folder: Path, overrides: list[str], progress: bool) -> int:
    prompts, prior, decoder = write_demo_inputs(folder)
    print(f"demo: tiny random-weight checkpoints in {prior.parent} (their images are noise), "
          f"{prompts} holds the prompts")
    spec = JobSpec.from_dict({"prompts": str(prompts), "output": str(folder / "output"), "prior": str(prior),
                              "decoder": str(decoder), "height": 256, "width": 256}).with_overrides(overrides)
    code = run(spec, force=False, progress=progress)
    print(f"images: {folder / 'output' / 'images'}\nmanifest: {folder / 'output' / 'manifest'}")
    return code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wurstfabrik", description="Batch image generation with Würstchen on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="generate the images of a job spec (YAML)")
    run_p.add_argument("spec", help="job spec, a YAML file")
    run_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec field, e.g. --set height=512 --set placement.prior_actors=2")
    run_p.add_argument("--force", action="store_true",
                       help="run even if the output holds images made with other generation parameters")
    run_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    status_p = sub.add_parser("status", help="counts by status and missing images of an output")
    status_p.add_argument("output", help="the job's output folder or s3:// prefix")
    demo_p = sub.add_parser("demo", help="run a job of a few dozen prompts on a tiny offline checkpoint")
    demo_p.add_argument("--dir", default="demo", type=Path, help="where the demo's inputs and output go")
    demo_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo_p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "run":
            return run(load_spec(args.spec, args.overrides), args.force, not args.no_progress)
        if args.command == "status":
            return status(args.output)
        return demo(args.dir, args.overrides, not args.no_progress)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
