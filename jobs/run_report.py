"""What a run tells its terminal: one line when it starts (what, where, how many, on which Ray) and one when it ends
(images ok and failed, rate, elapsed, where the output is, what the exit code means). `--json` prints the summary
itself instead of the last line, for scripts."""

from __future__ import annotations

import json

from .exit_codes import EXIT_DONE, EXIT_INCOMPLETE, EXIT_LEASED, EXIT_REFUSED

EXIT_MEANINGS = {
    EXIT_DONE: "every image is recorded ok",
    EXIT_INCOMPLETE: "run again to finish",
    EXIT_REFUSED: "fix the problem first; a rerun alone cannot",
    EXIT_LEASED: "another run holds the output",
}


def start_line(spec, plan, cluster: str, run_id: str) -> str:
    """`run <id>: <n> images from <prompts> into <output> (<to generate>, <done before>[, <bad>]), <size> <format>
    <output format>, on <which Ray>`."""
    counts = [f"{plan.pending_images} to generate", f"{plan.done_images} already done"]
    if plan.bad.num_rows:
        counts.append(f"{plan.bad.num_rows} refused as bad input")
    sides = [spec.height_column or str(spec.height), spec.width_column or str(spec.width)]
    size = "×".join(sides) if not (spec.height_column or spec.width_column) else f"sizes from {'×'.join(sides)}"
    return (f"run {run_id}: {plan.total_images} images from {spec.prompts} into {spec.output} "
            f"({', '.join(counts)}), {size} {spec.format} {spec.output_format}, on {cluster}")


def summary_line(summary: dict, exit_code: int) -> str:
    """`<outcome>: <ok> ok, <failed> failed, <missing> missing of <total> images; <made now> made in <s> s
    (<rate> images/s); output in <where>; exit <code>: <meaning>`."""
    status = summary["status"]
    outcome = "done" if exit_code == EXIT_DONE else "interrupted" if exit_code > 128 else "stopped"
    if status.get("ok") is None:
        counts = "the manifest could not be read"
    else:
        counts = (f"{status['ok']} ok, {status['failed']} failed, {summary.get('missing', 0)} missing of "
                  f"{summary.get('total_images', summary['images'])} images")
    elapsed = summary.get("elapsed_s")
    made = f"{summary.get('generated_now', 0)} made"
    if elapsed:
        rate = summary.get("images_per_s")
        made += f" in {elapsed:.1f} s" + (f" ({rate:.2f} images/s)" if rate is not None else "")
    meaning = EXIT_MEANINGS.get(exit_code, "stopped by a signal; run again to finish" if exit_code > 128 else "")
    return f"{outcome}: {counts}; {made}; output in {summary['output']}; exit {exit_code}: {meaning}"


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, default=str)
