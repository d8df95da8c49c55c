"""Tests for jobs.claim: a run takes the output's lease before it imports torch or Ray, and keeps it renewed from
that moment; on a local folder and on moto's S3 server, which honours conditional writes."""

import os
import subprocess
import sys
import time

import pytest
from job_helpers import PROMPTS, make_spec, spec_file, write_prompts

from wurstfabrik.jobs.claim import claim_output
from wurstfabrik.store.lease import Holder, Lease, LeaseHeld, read_holder
from wurstfabrik.store.storage import open_output

REFUSED_WITHIN_S = 3.0


@pytest.fixture(params=["local", "moto"])
def output_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('moto_env')}/out"


def imported_modules(stderr_lines: list[str]) -> set[str]:
    """The modules `python -X importtime` reports on stderr."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr_lines if line.startswith("import time:")}


def test_a_run_on_a_held_output_is_refused_in_seconds_before_torch_or_ray(output_uri, tiny_checkpoints, tmp_path):
    output = open_output(output_uri)
    Lease(output, Holder.for_this_process("nightly-1", "raysubmit_abc")).acquire()
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", PROMPTS[:2]), output_uri)
    command = [sys.executable, "-X", "importtime", "-m", "wurstfabrik.jobs.cli", "run",
               str(spec_file(spec, tmp_path / "j.yaml")), "--no-progress"]
    with open(tmp_path / "stderr", "w+") as stderr:
        started = time.monotonic()
        driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(driver.pid, 0)
        driver.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        stderr.seek(0)
        lines = stderr.read().splitlines()
    assert driver.returncode == 3, lines[-20:]
    said = [line for line in lines if line.strip() and not line.startswith("import time:")]
    assert len(said) == 1 and said[0].startswith("error: ") and "in use by run nightly-1" in said[0], said
    assert "raysubmit_abc" in said[0] and "last renewed" in said[0]
    imported = imported_modules(lines)
    assert "wurstfabrik.jobs.claim" in imported  # the report is there to read
    assert not {"torch", "ray", "wurstfabrik.jobs.driver"} & imported
    # CPU time, not wall time: the bound holds on an idle 2-core machine, and a loaded test machine does not
    # stretch the CPU a run spends.
    cpu = usage.ru_utime + usage.ru_stime
    assert cpu <= REFUSED_WITHIN_S, f"{cpu:.2f} s of CPU ({wall:.1f} s wall)"
    holder = read_holder(output)
    assert holder.run_id == "nightly-1" and not holder.released
    assert output.list() == ["lease.json"]  # the refused run wrote nothing


def test_a_claim_keeps_its_lease_renewed_until_it_gives_it_back(output_uri, tiny_checkpoints, tmp_path):
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", PROMPTS[:2]), output_uri,
                     resilience={"lease_stale_s": 2.0})
    with claim_output(spec) as claim:
        time.sleep(3.0)  # longer than the stale time: only its renewals keep the lease this run's
        with pytest.raises(LeaseHeld, match=f"in use by run {claim.run_id}"):
            claim_output(spec)
        assert read_holder(claim.output).age_s() < 2.0
    holder = read_holder(claim.output)
    assert holder.run_id == claim.run_id and holder.released
    with claim_output(spec) as again:  # a given-back lease is free at once
        assert again.took_over is None
