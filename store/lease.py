"""The output's lease: OUTPUT/lease.json names the one run that may write there.

A run creates it with a conditional write (S3 If-None-Match, or an exclusive create), renews it by compare-and-
swap on its version (If-Match on the ETag, or a locked compare-and-replace), and marks it released at the end.
A lease not renewed for `stale_after_s` belongs to a run that died, and so does one whose process on this same
host is gone; the next run takes it over. On an S3 server
that ignores conditional headers the lease is advisory: two runs started at the same moment may both win.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

LEASE_KEY = "lease.json"
DEFAULT_STALE_S = 300.0
TRIES = 5


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    ray_job: str | None  # the Ray job submission id (or job id) when the driver runs under Ray Jobs
    started: str  # ISO 8601, UTC
    renewed: str
    released: bool = False

    @classmethod
    def for_this_process(cls, run_id: str, ray_job: str | None) -> Holder:
        now = _now()
        return cls(run_id, socket.gethostname(), os.getpid(), ray_job, now, now)

    def describe(self) -> str:
        ray_job = f", Ray job {self.ray_job}" if self.ray_job else ""
        return f"run {self.run_id} on {self.host} (pid {self.pid}{ray_job}, started {self.started})"

    def age_s(self) -> float:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(self.renewed)).total_seconds()

    def died_here(self) -> bool:
        """Whether the holder ran on this host and its process is gone (killed): no need to wait until stale."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


class LeaseHeld(Exception):
    """Another live run holds the output."""

    def __init__(self, uri: str, holder: Holder, stale_after_s: float):
        self.holder = holder
        super().__init__(f"{uri} is in use by {holder.describe()}, last renewed {holder.age_s():.0f} s ago; "
                         f"a lease not renewed for {stale_after_s:.0f} s is taken over")


class LeaseLost(Exception):
    """This run's lease was taken over (it was not renewed in time); it must stop writing."""


class Lease:
    def __init__(self, output, holder: Holder, stale_after_s: float = DEFAULT_STALE_S):
        self.output = output
        self.holder = holder
        self.stale_after_s = stale_after_s
        self.version: str | None = None

    def acquire(self) -> Holder | None:
        """Takes the lease; returns the holder of a stale lease it took over (None if it was free or released).
        Raises LeaseHeld if a live run holds it."""
        for _ in range(TRIES):
            current = self.output.read_versioned(LEASE_KEY)
            if current is None:
                self.version = self.output.put_new(LEASE_KEY, self._data(self.holder))
                if self.version is not None:
                    return None
                continue  # another run created it first; look at what it wrote
            other, version = _parse(current[0]), current[1]
            if other is not None and other.run_id == self.holder.run_id:
                self.version = version  # our own write, answered late: a retried request lost its reply
                return None
            if (other is not None and not other.released and other.age_s() < self.stale_after_s
                    and not other.died_here()):
                raise LeaseHeld(self.output.uri(LEASE_KEY), other, self.stale_after_s)
            self.version = self.output.put_if_version(LEASE_KEY, self._data(self.holder), version)
            if self.version is not None:
                if other is None:
                    return _unreadable()
                return None if other.released else other
        current = self.output.read_versioned(LEASE_KEY)
        other = _parse(current[0]) if current else None
        raise LeaseHeld(self.output.uri(LEASE_KEY), other or _unreadable(), self.stale_after_s)

    def renew(self) -> None:
        self.holder = replace(self.holder, renewed=_now())
        self._swap(self.holder)

    def release(self) -> None:
        self.holder = replace(self.holder, renewed=_now(), released=True)
        self._swap(self.holder)

    def _swap(self, holder: Holder) -> None:
        version = self.output.put_if_version(LEASE_KEY, self._data(holder), self.version)
        if version is None:
            current = self.output.read_versioned(LEASE_KEY)
            other = _parse(current[0]) if current else None
            if other is None or other.run_id != holder.run_id:
                taker = other.describe() if other else "nobody (the lease was deleted)"
                raise LeaseLost(f"{self.output.uri(LEASE_KEY)} was taken over by {taker}")
            version = current[1]
        self.version = version

    @staticmethod
    def _data(holder: Holder) -> bytes:
        return json.dumps(asdict(holder), indent=2, sort_keys=True).encode()


def read_holder(output) -> Holder | None:
    current = output.read_versioned(LEASE_KEY)
    return _parse(current[0]) if current else None


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None  # an unreadable lease is treated as stale


def _unreadable() -> Holder:
    return Holder("unknown", "unknown", 0, None, _now(), "1970-01-01T00:00:00+00:00")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
