"""Kill -9 of the driver at random moments, again and again, then a rerun: every image exactly once, in files or in
finished shards that the manifest names, and no orphan shard left. Half the kills come at a random time after the
start, half once a random number of new images is recorded (plus a random moment), so that some land mid-run
however slowly this machine starts Ray. The stages are bench/simulated_engine.py's
(through run_job's stage_models), so a run is quick and the kills land anywhere: while Ray starts, while planning,
while images are being recorded (jobs.recorder holds up to 4096 unstored rows), while compacting."""

import glob
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from job_helpers import image_files, make_spec, ok_keys_once, ok_rows, spec_file, write_prompts

from wurstfabrik.store.storage import open_output

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

ROOT = Path(__file__).resolve().parent.parent
KILLS = 10
DRIVER = """
import sys
from bench.simulated_engine import SimulatedModels
from wurstfabrik.jobs.driver import run_job
from wurstfabrik.jobs.spec import load_spec
result = run_job(load_spec(sys.argv[1]), progress=False, stage_models=SimulatedModels(speedup=4.0))
sys.exit(result.exit_code)
"""


def start(job: Path) -> subprocess.Popen:
    """A driver with a local Ray of its own (which the kill ends with it), in its own process group."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # bench/ for the actors
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(job)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def recorded(out: Path) -> int:
    """Images recorded ok so far (parts merged away while this reads are read again)."""
    return len(ok_keys_once(open_output(str(out)))) if (out / "manifest").is_dir() else 0


def _ends_within(driver: subprocess.Popen, seconds: float, until=None) -> bool:
    """Waits `seconds` (or until `until()` is true); whether the driver ended meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            return True
        if until is not None and until():
            return False
        time.sleep(0.2)
    return driver.poll() is not None


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_kills_at_random_moments_leave_every_image_exactly_once(tiny_checkpoints, tmp_path, output_format):
    n = 1200
    prompts = write_prompts(tmp_path / "p.parquet", [f"a sausage stand, take {i}" for i in range(n)],
                            row_group_size=300)
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, prompts, out, output_format=output_format, shard_size=8, format="jpeg",
                     placement={"prior_batch_size": 4, "decoder_batch_size": 4, "writer_concurrency": 2})
    job = spec_file(spec, tmp_path / "job.json")
    chance = random.Random(20261207)
    moments, done_at_kills = [], []
    while len(moments) < KILLS:
        before = recorded(out)
        driver = start(job)
        started = time.monotonic()
        if len(moments) % 2 == 0 or before >= n:  # in the first 20 s: Ray starting, planning, the first batches
            wait = chance.uniform(1.0, 20.0)
            ended = _ends_within(driver, wait)
        else:  # once a random number of new images is recorded, and a random moment after that
            target = before + chance.randint(1, 150)
            ended = _ends_within(driver, 180, until=lambda target=target: recorded(out) >= target)
            ended = ended or _ends_within(driver, chance.uniform(0.0, 2.0))
        if ended:
            assert driver.returncode == 0, f"a run exited {driver.returncode} after the kills at {moments}"
            continue
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        moments.append(round(time.monotonic() - started, 1))
        done_at_kills.append(recorded(out))
    # Some kills landed while images were being made and recorded, not only before or after.
    assert any(0 < done < n for done in done_at_kills), (moments, done_at_kills)
    final = start(job)
    assert final.wait(timeout=300) == 0

    output = open_output(str(out))
    keys = ok_keys_once(output)
    assert len(keys) == len(set(keys)) == n, f"kills at {moments} s"
    if output_format == "files":
        assert len(image_files(out)) == n
    else:
        named = {row["uri"].removeprefix("file://") for row in ok_rows(output).values()}
        assert set(glob.glob(str(out / "shards/*.tar"))) == named  # no orphan: each shard is named by a row
        import webdataset as wds

        members = [s["__key__"] for s in wds.WebDataset(sorted(named), shardshuffle=False)]
        assert len(members) == len(set(members)) == n
