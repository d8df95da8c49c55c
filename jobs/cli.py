"""The `wurstfabrik` command: run a job spec, report an output's status, preview it, run the offline demo, or mirror
a checkpoint to S3.

Exit codes (for schedulers, jobs.exit_codes): 0 every image recorded ok (a failed manifest merge or record write
is a warning); 1 a rerun can finish: images failed or missing, the run stopped (stall, lost lease), storage
unreachable or throttling; 2 a rerun alone cannot: a spec, input, checkpoint or placement problem, or storage that
refuses (credentials, access denied, missing bucket, a damaged or mismatching object), named in one line with what
to do; 3 another run holds the output's lease (refused before torch or Ray is imported); 128 + N when stopped by
signal N (130 SIGINT, 143 SIGTERM). `wurstfabrik status` exits 0, 1 or 2 the same way.
"""

import argparse
import logging
import sys
from contextlib import redirect_stdout
from pathlib import Path

from wurstfabrik.store.ids import InputError
from wurstfabrik.store.lease import LeaseHeld
from wurstfabrik.store.manifest import ManifestError
from wurstfabrik.store.storage import StorageError

from .claim import claim_output
from .exit_codes import EXIT_INCOMPLETE, EXIT_LEASED, EXIT_REFUSED, help_table
from .preview import NothingToPreview, write_preview
from .quiet import filtered_stderr
from .run_report import summary_json, summary_line
from .schema import schema_text
from .spec import JobSpec, SpecError, load_spec
from .status import NoJob, status_report
from .status_watch import DEFAULT_INTERVAL_S, watch_status
from .supervisor import RunStopped

# CheckpointError (pipeline/, which imports torch) is caught in run(), once the lease is taken.
USER_ERRORS = (SpecError, InputError, StorageError, ManifestError, NoJob, NothingToPreview)
FIX_FIRST = "a rerun alone cannot fix this"
# The demo's model: a tiny Würstchen trained on a toy world of coloured shapes (train/tiny_world.py writes it, with
# its 36 prompts). It runs at the size it was trained at, with the step counts its accuracy was measured at.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO_SETTINGS = {"height": 128, "width": 128, "prior_steps": 12, "decoder_steps": 8}
# Small CPU shares: both actors, a reader, an encoder and a writer fit a 2-core machine's Ray, a local one started
# by the demo or one started by hand (`ray start --head`) that the demo joins.
DEMO_PLACEMENT = {"prior_cpus": 0.5, "decoder_cpus": 0.5, "writer_cpus": 0.25}


def run(spec: JobSpec, force: bool, progress: bool, as_json: bool = False) -> int:
    """Runs the spec: a start line, the progress bar and one summary line on stdout (the summary's JSON with
    `as_json`); problems on stderr, one line each."""
    if not as_json:
        return _run(spec, force, progress, sys.stdout, summary_line)
    # stdout holds the JSON alone: what Ray forwards from its workers and raylets, which it prints to stdout (a
    # dying actor's "(raylet) A worker died ..."), goes to stderr with every other message of the run.
    stdout = sys.stdout
    with redirect_stdout(sys.stderr):
        return _run(spec, force, progress, stdout, lambda summary, code: summary_json(summary))


def _run(spec: JobSpec, force: bool, progress: bool, stdout, summary_text) -> int:
    try:
        with claim_output(spec) as claim:
            # Imported once the output is ours: a run refused by the lease never loads torch or Ray.
            from wurstfabrik.pipeline.errors import CheckpointError

            from .driver import JobError, run_claimed
            from .ray_connection import ClusterUnusable

            try:
                result = run_claimed(claim, force=force, progress=progress)
            except (JobError, CheckpointError, ClusterUnusable) as e:
                print(f"error: {e}", file=sys.stderr)
                return EXIT_REFUSED
    except LeaseHeld as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LEASED
    except RunStopped as e:  # before any work began
        print(f"error: {e.reason} before the run began; run again", file=sys.stderr)
        return e.exit_code
    print(summary_text(result.summary, result.exit_code), file=stdout, flush=True)
    if result.message and result.exit_code == EXIT_REFUSED:
        print(f"error: {result.message}; {FIX_FIRST}", file=sys.stderr)
    elif result.message and result.exit_code != 0:
        print(f"error: {result.message}; run again to finish", file=sys.stderr)
    elif result.exit_code == EXIT_INCOMPLETE:
        print("error: images failed or are missing; run again to make them", file=sys.stderr)
    elif result.summary.get("bad_input"):
        print(f"note: {result.summary['bad_input']} image(s) of bad input rows were skipped; "
              f"`wurstfabrik status {spec.output}` lists them", file=sys.stderr)
    return result.exit_code


def status(output_uri: str, watch: bool = False, interval_s: float = DEFAULT_INTERVAL_S) -> int:
    if watch:
        return watch_status(output_uri, interval_s)
    lines, code = status_report(output_uri)
    print("\n".join(lines))
    return code


def preview(output_uri: str, n: int, to: str | None) -> int:
    sheet, page, shown = write_preview(output_uri, n, to)
    print(f"{shown} images\ncontact sheet: {sheet}\npage: {page}")
    return 0


def write_demo_inputs(folder: Path) -> tuple[Path, Path, Path]:
    """The demo model's checkpoints, copied from the package, and a Parquet file of its prompts, written once."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    prior, decoder = folder / "checkpoints" / "prior", folder / "checkpoints" / "decoder"
    for name, target in (("prior", prior), ("decoder", decoder)):
        if not (target / "model_index.json").exists():
            shutil.copytree(DEMO_MODEL / name, target, dirs_exist_ok=True)
    prompts = folder / "prompts.parquet"
    if not prompts.exists():
        rows = (DEMO_MODEL / "prompts.txt").read_text().splitlines()
        pq.write_table(pa.table({"prompt": rows}), prompts)
    return prompts, prior, decoder


def demo(folder: Path, overrides: list[str], progress: bool) -> int:
    prompts, prior, decoder = write_demo_inputs(folder)
    print(f"demo: a tiny Würstchen trained on coloured shapes (train/tiny_world.py), in {prior.parent}; "
          f"{prompts} holds its prompts")
    spec = JobSpec.from_dict({"prompts": str(prompts), "output": str(folder / "output"), "prior": str(prior),
                              "decoder": str(decoder), **DEMO_SETTINGS,
                              "placement": DEMO_PLACEMENT}).with_overrides(overrides)
    code = run(spec, force=False, progress=progress)
    print(f"output: {spec.output} (`wurstfabrik status {spec.output}`, `wurstfabrik preview {spec.output}`)")
    return code


RUN_EXIT_CODES = (help_table() + "\n\nThe job spec's fields, the output layout, resuming and these codes: "
                  "docs/jobs.md\n(`wurstfabrik schema` prints the spec's JSON Schema).")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


class _ShowVersions(argparse.Action):
    """--version: computed only when asked, since it imports torch."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .versions import version_report

        print(version_report())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wurstfabrik", description="Batch image generation with Würstchen on Ray.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"{help_table()}\n\n`wurstfabrik run --help` says more; docs/jobs.md has "
                                       "the whole reference.")
    p.add_argument("--version", action=_ShowVersions,
                   help="print the versions of wurstfabrik, Python, Ray and torch, and whether CUDA is available")
    sub = p.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="generate the images of a job spec (YAML)", epilog=RUN_EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    run_p.add_argument("spec", help="job spec, a YAML file")
    run_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec field, e.g. --set height=512 --set placement.prior_actors=2")
    run_p.add_argument("--force", action="store_true",
                       help="run even if the output holds images made with other generation parameters")
    run_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_p.add_argument("--json", action="store_true",
                       help="print the run's summary as JSON (as in OUTPUT/manifest/summary.json) instead of its "
                            "summary line, for scripts")
    status_p = sub.add_parser("status", help="counts by status, failed images, last runs and lease of an output")
    status_p.add_argument("output", help="the job's output folder or s3:// prefix")
    status_p.add_argument("--watch", action="store_true",
                          help="while a run is going: its counts, rate over the last minute, time left and new "
                               "failures, every few seconds until it ends (then the report)")
    status_p.add_argument("--interval", type=_seconds, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                          help=f"seconds between refreshes with --watch (default {DEFAULT_INTERVAL_S:g})")
    preview_p = sub.add_parser("preview", help="a contact sheet and an HTML page of a sample of an output")
    preview_p.add_argument("output", help="the job's output folder or s3:// prefix")
    preview_p.add_argument("--n", type=int, default=64, help="how many images (default 64)")
    preview_p.add_argument("--to", default=None, help="where to write (default: OUTPUT/preview/)")
    demo_p = sub.add_parser("demo", help="run a job of a few dozen prompts on a tiny offline checkpoint")
    demo_p.add_argument("--dir", default="demo", type=Path, help="where the demo's inputs and output go")
    demo_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo_p.add_argument("--no-progress", action="store_true")
    sub.add_parser("schema", help="print the job spec's JSON Schema (as in schema/job.schema.json)")
    mirror_p = sub.add_parser("mirror", help="copy a checkpoint (a hub repo@revision or a folder) to an s3:// "
                              "prefix, with the index jobs load it by (docs/operations.md)")
    mirror_p.add_argument("source", help="owner/name@revision on the Hugging Face hub, or a checkpoint folder")
    mirror_p.add_argument("destination", help="s3://bucket/prefix/")
    mirror_p.add_argument("--variant", choices=("all", "fp16", "full"), default="all",
                          help="which weight variant where there are two (default: all, for every dtype)")
    mirror_p.add_argument("--parallel", type=int, default=8, help="files copied at once (default 8)")
    return p


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged (the driver's threads log after main returns)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _log_to_stderr() -> None:
    """wurstfabrik's own messages, as plain lines on stderr; other libraries keep their own logging."""
    logger = logging.getLogger("wurstfabrik")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _log_to_stderr()
    try:
        if args.command == "run":
            spec = load_spec(args.spec, args.overrides)
            with filtered_stderr():
                return run(spec, args.force, not args.no_progress, args.json)
        if args.command == "status":
            return status(args.output, args.watch, args.interval)
        if args.command == "preview":
            return preview(args.output, args.n, args.to)
        if args.command == "schema":
            print(schema_text(), end="")
            return 0
        if args.command == "mirror":
            from .mirror import mirror_command  # imports torch, as checking a checkpoint does

            return mirror_command(args.source, args.destination, args.variant, args.parallel)
        with filtered_stderr():
            return demo(args.dir, args.overrides, not args.no_progress)
    except (StorageError, ManifestError) as e:
        if isinstance(e, StorageError) and e.transient:
            print(f"error: {e}; run again once storage answers", file=sys.stderr)
            return EXIT_INCOMPLETE
        advice = "restore or remove that object; " if isinstance(e, ManifestError) else ""
        print(f"error: {e}; {advice}{FIX_FIRST}", file=sys.stderr)
        return EXIT_REFUSED
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
