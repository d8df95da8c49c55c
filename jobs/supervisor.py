"""Stopping a run cleanly: SIGTERM and SIGINT from a scheduler, a job that makes no progress, a lease taken over.

Each becomes a RunStopped raised in the driver's main thread, outside the short critical sections that write
run records and release the lease, so the run still records how it ended. The watchdog and the lease keeper are
threads that ask for such a stop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from wurstfabrik.store.lease import Lease, LeaseLost
from wurstfabrik.store.storage import StorageError

log = logging.getLogger("wurstfabrik")
# Exit codes a scheduler can act on (also in the README).
EXIT_STOPPED = 1  # stopped with images left to make: a rerun makes them
_STOP_SIGNAL = signal.SIGUSR1  # how a thread wakes the main thread out of a blocking wait


class RunStopped(BaseException):
    """A stop, raised by a signal handler wherever the main thread is, library code included. A BaseException, as
    KeyboardInterrupt is, so that a library's `except Exception` cannot swallow it (Ray Data's statistics update
    caught it and logged a traceback, and the stop waited for the next batch)."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


class Supervisor:
    """Turns stop requests (signals, other threads) into RunStopped in the main thread."""

    def __init__(self):
        self.reason: str | None = None
        self.exit_code = EXIT_STOPPED
        self.keep_records = True  # whether the rows of images already made are still recorded (jobs.recorder)
        self._critical = 0
        self._main = threading.main_thread()
        self._previous: dict[int, object] = {}

    @property
    def active(self) -> bool:
        """Signals can only be handled when the run is driven from the main thread (the CLI, a plain script)."""
        return threading.current_thread() is self._main

    def __enter__(self):
        if self.active:
            for number in (signal.SIGTERM, signal.SIGINT, _STOP_SIGNAL):
                self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def reclaim_signals(self) -> None:
        """Takes back the signals a library claimed meanwhile (ray.init sets its own SIGTERM handler in the main
        thread); the library's handler is the one restored when the run ends."""
        for number in self._previous:
            current = signal.getsignal(number)
            if current != self._on_signal:
                self._previous[number] = current
                signal.signal(number, self._on_signal)

    def stop(self, reason: str, exit_code: int = EXIT_STOPPED, keep_records: bool = True) -> None:
        """Asks the run to stop; callable from any thread. The first reason wins. `keep_records` False: the output
        is no longer the run's to write (its lease is lost), so what it has not recorded yet is dropped."""
        self.keep_records = self.keep_records and keep_records
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code
            log.warning("stopping: %s", reason)
        if self._previous and threading.current_thread() is not self._main:
            signal.pthread_kill(self._main.ident, _STOP_SIGNAL)

    def check(self) -> None:
        """Raises RunStopped if a stop was asked for (for loops that poll between batches)."""
        if self.reason is not None and not self._critical:
            raise RunStopped(self.reason, self.exit_code)

    @contextmanager
    def critical(self):
        """A section that a stop must not cut in half (records, lease release); the stop waits until after."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1

    def _on_signal(self, number, frame) -> None:
        if number in (signal.SIGTERM, signal.SIGINT):
            if self.reason is not None and number == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the clean-up
            self.stop(f"interrupted by {signal.Signals(number).name}", 128 + number)
        self.check()


class Watchdog(threading.Thread):
    """Stops a run when no image has finished for `stall_s` seconds, saying what Ray is waiting for."""

    def __init__(self, supervisor: Supervisor, stall_s: float, pending: Callable[[], str]):
        super().__init__(name="wurstfabrik-watchdog", daemon=True)
        self.supervisor, self.stall_s, self.pending = supervisor, stall_s, pending
        self.last_progress = time.monotonic()
        self.done = threading.Event()

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def run(self) -> None:
        warned = False
        while not self.done.wait(min(10.0, self.stall_s / 4)):
            quiet = time.monotonic() - self.last_progress
            if quiet >= self.stall_s:
                self.supervisor.stop(f"no image finished for {quiet:.0f} s (resilience.stall_s = "
                                     f"{self.stall_s:g}); Ray is waiting to schedule: {self.pending()}")
                return
            if quiet >= self.stall_s / 2 and not warned:
                warned = True
                log.warning("no image finished for %.0f s; Ray is waiting to schedule: %s", quiet, self.pending())
            elif quiet < self.stall_s / 2:
                warned = False


class LeaseKeeper(threading.Thread):
    """Renews the output's lease well within its stale time; a lease taken over stops the run."""

    def __init__(self, supervisor: Supervisor, lease: Lease):
        super().__init__(name="wurstfabrik-lease", daemon=True)
        self.supervisor, self.lease = supervisor, lease
        self.interval = min(30.0, lease.stale_after_s / 5)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.lease.renew()
            except LeaseLost as e:
                self.supervisor.stop(f"lost the output's lease: {e}", keep_records=False)
                return
            except StorageError as e:  # an outage: the next renewal tries again, well before the lease is stale
                log.warning("could not renew the output's lease: %s", e)
