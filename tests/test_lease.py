"""Tests for store.lease on a local folder and on moto's S3 server, which honours conditional writes."""

import json
from dataclasses import asdict, replace

import pytest

from wurstfabrik.store.lease import LEASE_KEY, Holder, Lease, LeaseHeld, LeaseLost, read_holder
from wurstfabrik.store.storage import open_output


@pytest.fixture(params=["local", "moto"])
def output(request, tmp_path):
    if request.param == "local":
        return open_output(str(tmp_path / "out"))
    return open_output(f"s3://{request.getfixturevalue('moto_env')}/out")


def holder(run_id: str) -> Holder:
    return Holder.for_this_process(run_id, ray_job=f"raysubmit_{run_id}")


def test_a_held_lease_refuses_a_second_run_naming_the_holder(output):
    first = Lease(output, holder("first"))
    assert first.acquire() is None
    with pytest.raises(LeaseHeld) as caught:
        Lease(output, holder("second")).acquire()
    message = str(caught.value)
    assert "run first on" in message and "raysubmit_first" in message and "last renewed" in message
    assert read_holder(output).run_id == "first"


def test_a_released_lease_is_free(output):
    first = Lease(output, holder("first"))
    first.acquire()
    first.release()
    assert read_holder(output).released
    assert Lease(output, holder("second")).acquire() is None
    assert read_holder(output).run_id == "second"


def test_a_stale_lease_is_taken_over_and_its_holder_learns_it_lost(output):
    first = Lease(output, holder("first"), stale_after_s=60)
    first.acquire()
    old = replace(first.holder, renewed="2020-01-01T00:00:00+00:00")
    output.put_if_version(LEASE_KEY, json.dumps(asdict(old)).encode(), first.version)
    first.version = output.read_versioned(LEASE_KEY)[1]  # the first run is alive but stopped renewing
    second = Lease(output, holder("second"), stale_after_s=60)
    taken = second.acquire()
    assert taken is not None and taken.run_id == "first" and taken.age_s() > 60
    with pytest.raises(LeaseLost, match="taken over by run second"):
        first.renew()
    second.renew()
    assert read_holder(output).run_id == "second"


def test_renewing_moves_the_renewed_time(output):
    lease = Lease(output, replace(holder("r"), renewed="2020-01-01T00:00:00+00:00"))
    lease.acquire()
    lease.renew()
    assert read_holder(output).age_s() < 60


def test_an_unreadable_lease_is_taken_over(output):
    output.put(LEASE_KEY, b"not json")
    assert Lease(output, holder("new")).acquire().run_id == "unknown"
    assert read_holder(output).run_id == "new"
