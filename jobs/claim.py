"""A run's first step: open the output and take its lease, kept renewed from that moment on. Nothing here imports
torch or Ray, so a run on a held output is refused in about a second, before it loads a model or starts a cluster."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone

from wurstfabrik.store.lease import Holder, Lease
from wurstfabrik.store.storage import S3Settings, open_output

from .spec import JobSpec
from .supervisor import LeaseKeeper, Supervisor

log = logging.getLogger("wurstfabrik")
RELEASE_WAIT_S = 10.0  # how long giving the lease back waits for a renewal in flight


class Claim:
    """The output's lease, held by one run. Entered, it renews the lease (a LeaseKeeper) and turns signals into a
    clean stop (a Supervisor) for the whole run, the slow preflight included; on exit it gives the lease back."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.run_id = uuid.uuid4().hex[:12]
        self.started = now()
        self.clock = time.perf_counter()
        self.settings = S3Settings(outage_s=spec.resilience.storage_outage_s)
        self.output = open_output(spec.output, self.settings)
        self.lease = Lease(self.output, Holder.for_this_process(self.run_id, submission_id()),
                           spec.resilience.lease_stale_s)
        self.took_over: Holder | None = None
        self.supervisor = Supervisor()
        self.keeper = LeaseKeeper(self.supervisor, self.lease)

    def take(self) -> None:
        self.output.check_writable()
        self.took_over = self.lease.acquire()
        if self.took_over is not None:
            log.warning("took over the output's lease from %s, which %s", self.took_over.describe(),
                        "is no longer running here" if self.took_over.died_here() else
                        f"was not renewed for {self.took_over.age_s():.0f} s")

    def __enter__(self) -> Claim:
        self.supervisor.__enter__()
        self.keeper.start()
        return self

    def __exit__(self, *exc) -> None:
        self.keeper.done.set()
        self.keeper.join(RELEASE_WAIT_S)  # a renewal landing after the release would take the lease back
        try:
            with self.supervisor.critical():
                self.lease.release()
        except Exception as e:  # lost or unreachable: the lease goes stale on its own
            log.warning("could not release the output's lease: %s", e)
        finally:
            self.supervisor.__exit__(*exc)


def claim_output(spec: JobSpec) -> Claim:
    """Opens the spec's output and takes its lease. Raises StorageError if the output cannot be written, LeaseHeld
    (naming the holder) if a live run holds it."""
    claim = Claim(spec)
    claim.take()
    return claim


def submission_id() -> str | None:
    """The Ray job submission id when run by `ray job submit` (known before Ray is started or joined)."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        try:
            return json.loads(config)["metadata"]["job_submission_id"]
        except (ValueError, KeyError, TypeError):
            pass
    return None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
