"""Helpers shared by the end-to-end job tests: prompt files, specs sized for the 2-CPU test machine, and reading an
output's final rows back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import start_ray

from wurstfabrik.jobs.spec import JobSpec
from wurstfabrik.store.manifest import latest_status, read_manifest

PROMPTS = ["a red fox in the snow", "a lighthouse at night", "a bowl of ramen", "an astronaut riding a horse",
           "sausages on a grill", "a city street in the rain"]
# The one line a run prints when it starts, and the one when it ends (jobs.run_report).
START_LINE = re.compile(r"^run [0-9a-f]{12}: (?P<total>\d+) images from (?P<prompts>.+) into (?P<output>.+) "
                        r"\((?P<todo>\d+) to generate, (?P<done>\d+) already done(?:, (?P<bad>\d+) refused as bad "
                        r"input)?\), (?P<size>\S+ \S+ \S+), on (?P<ray>.+)$")
SUMMARY_LINE = re.compile(r"^(?P<outcome>done|stopped|interrupted): (?P<counts>\d+ ok, \d+ failed, \d+ missing of "
                          r"\d+ images); (?P<made>\d+) made in [\d.]+ s \([\d.]+ images/s\); output in "
                          r"(?P<output>.+); exit (?P<code>\d+): (?P<meaning>.+)$")
# Stage placement that fits the 2-CPU test cluster: both actors, a reader, an encoder and a writer at once.
SMALL_PLACEMENT = {"prior_cpus": 0.5, "decoder_cpus": 0.5, "writer_cpus": 0.25, "writer_concurrency": 1,
                   "prior_batch_size": 4, "decoder_batch_size": 4}


def lines_like(text: str, line: re.Pattern) -> list[re.Match]:
    """Every line of `text` that `line` matches (START_LINE, SUMMARY_LINE)."""
    return [found for found in map(line.match, text.splitlines()) if found]


def write_prompts(path, prompts=PROMPTS, row_group_size=None, **columns):
    table = pa.table({"prompt": prompts, **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_spec(tiny_checkpoints, prompts, output, **fields) -> JobSpec:
    prior, decoder = tiny_checkpoints
    placement = {**SMALL_PLACEMENT, **fields.pop("placement", {})}
    return JobSpec.from_dict({"prompts": str(prompts), "output": str(output), "prior": str(prior),
                              "decoder": str(decoder), "height": 128, "width": 128, "prior_steps": 4,
                              "decoder_steps": 3, "placement": placement, **fields})


def spec_file(spec: JobSpec, path: Path) -> Path:
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    return path


def ok_rows(output) -> dict:
    return {k: r for k, r in latest_status(read_manifest(output)).items() if r["status"] == "ok"}


def image_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "images").rglob("*") if p.is_file())


def ok_keys_once(output) -> list[tuple[str, int]]:
    """The (prompt id, image index) of every ok manifest row; a test asserts there are no repeats."""
    table = read_manifest(output, ["prompt_id", "image_index", "status"])
    rows = table.to_pylist()
    return [(r["prompt_id"], r["image_index"]) for r in rows if r["status"] == "ok"]


def start_local_ray(env: dict[str, str | None], num_cpus: int = 2) -> None:
    """A fresh local Ray whose nodes hold `env` (e.g. another S3 endpoint); the shared one comes back through the
    ray_local fixture once this one is shut down."""
    import ray

    ray.shutdown()
    start_ray(env, num_cpus)


def start_driver(spec: JobSpec, folder: Path, ray_address: str, **popen) -> subprocess.Popen:
    """`wurstfabrik run` of the spec in a process of its own, joining the test Ray, in its own process group."""
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.Popen([sys.executable, "-m", "wurstfabrik.jobs.cli", "run",
                             str(spec_file(spec, folder / "job.yaml")), "--no-progress"],
                            env=env, start_new_session=True, **popen)


def wait_for_parts(out: Path, count: int, process: subprocess.Popen | None = None, timeout: float = 240) -> None:
    """Until the output holds `count` manifest parts; the driver, if given, must still be running by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "manifest").is_dir() and len(list((out / "manifest").glob("part-*"))) >= count:
            assert process is None or process.poll() is None, "the driver finished before the fault"
            return
        assert process is None or process.poll() is None, "the driver finished before the fault"
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {count} manifest parts after {timeout} s")


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """Kills the process's group (SIGKILL) once `ready()` is true; the process must still be running by then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the process ended before it could be killed"
        assert time.monotonic() < deadline, f"not ready after {timeout} s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def kill_driver_after_parts(spec: JobSpec, folder: Path, ray_address: str, parts: int = 2) -> None:
    """Starts a driver and kills it (SIGKILL, its whole process group) once `parts` manifest parts exist."""
    driver = start_driver(spec, folder, ray_address, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_parts(Path(spec.output), parts, driver)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()


def with_s3_checkpoints(text: str) -> str:
    """An example spec's YAML with the s3:// checkpoint lines it shows as comments in place of the hub ids."""
    keys = "prior|decoder|checkpoint_cache"
    active = re.sub(rf"^(\s*)({keys}): .*\n", "", text, flags=re.M)
    return re.sub(rf"^(\s*)# ({keys}): ", r"\1\2: ", active, flags=re.M)
