"""Keeping a healthy run's output free of messages a user can do nothing about: Ray Data's INFO lines go to its log
file only, and each message filtered here says why; everything else Ray prints, warnings and errors included, still
goes through."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import contextmanager

from .supervisor import RunStopped

# Lines the Ray core worker (C++) writes straight to the process's stderr.
NOISE_LINES = [
    # Ray Data hands every actor of a pool its map function by object reference and sets max_restarts itself, so
    # the core worker warns once per actor pool (ray-project/ray#53727). Ray Data keeps that reference for the
    # pool's lifetime, so the restart it warns about cannot fail for that reason.
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
               r"and max_restarts > 0"),
]
# Python log messages, by logger.
NOISE_LOGS = {
    # The driver draws its own progress bar, so Ray Data's are off; Ray Data warns about that on every run.
    "ray.data._internal.progress": [re.compile(r"^Progress bars disabled")],
    # Ray 2.60 turns token authentication on for the local cluster a run starts in-process (which only this
    # machine can reach and which ends with the run) and says so on every start, as a warning.
    "ray._private.authentication.authentication_token_setup": [
        re.compile(r"^Token authentication is enabled for this Ray cluster")],
    # A GPU stage reserves CPUs as well on purpose (placement.prior_cpus, decoder_cpus: its host-side work); Ray
    # Data calls that combination experimental, twice per run on every GPU cluster.
    "ray.data._internal.execution.operators.map_operator": [
        re.compile(r"^Specifying both num_cpus and num_gpus for map tasks is experimental")],
}


class _DropNoise(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


class _DropOwnStop(logging.Filter):
    """A run stopped on purpose (a signal, a stall, a storage outage) raises RunStopped in the driver's main thread,
    inside Ray Data's iterator, which reports any exception passing through it as an error in Ray's own code, with
    a traceback. The run reports the stop itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        active = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not isinstance(active, RunStopped)


def quiet_ray_logs() -> None:
    import ray.data  # its import sets up its loggers' handlers (ray imports it lazily), adjusted below

    # Ray's console handlers keep the stderr they were made with. One made while another stderr was in place (an
    # earlier run in a notebook cell, an app or a test that swaps sys.stderr) would write to a closed file, and
    # every Ray Data line would come out as a "--- Logging error ---" traceback. Each run points them at today's.
    # Only Ray's own handlers: others on these loggers (a host application's, pytest's) keep their streams.
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__module__.startswith("ray.") and isinstance(handler, logging.StreamHandler) \
                    and not isinstance(handler, logging.FileHandler):
                with handler.lock:
                    handler.stream = sys.stderr
                if name == "ray.data":
                    # Ray Data's INFO lines (each execution's start, plan and end) stay in its log file
                    # (logs/ray-data/ in Ray's session folder); its warnings and errors still reach the terminal.
                    handler.setLevel(max(handler.level, logging.WARNING))
    for name, patterns in NOISE_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(patterns))
    # Ray Data's high-memory detector says every 30 s, in 14 lines, that a stage actor uses more memory than it
    # reserved (none). Every stage actor holds a model, so it fires on every run that lasts; reserving `memory=`
    # per actor, as it advises, would only hold back a GPU node's RAM from the encoders beside it.
    config = ray.data.DataContext.get_current().issue_detectors_config.high_memory_detector_config
    config.detection_time_interval_s = -1
    exceptions = logging.getLogger("ray.data.exceptions")
    if not any(isinstance(f, _DropOwnStop) for f in exceptions.filters):
        exceptions.addFilter(_DropOwnStop())


@contextmanager
def filtered_stderr():
    """Routes this process's stderr (file descriptor 2, which C++ code writes to) through a filter that drops
    NOISE_LINES; partial lines (progress bars) pass at once."""
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError):  # no real stderr (a notebook, a test capture): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, original), daemon=True, name="wurstfabrik-stderr")
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end, so the pump drains and ends
        pump.join(timeout=5)
        os.close(original)


def _pump(read_end: int, out: int) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not _is_noise(line):
                    os.write(out, line + b"\n")
            # A glog line starts with "["; anything else without a newline yet (a progress bar) goes out now.
            if pending and not pending.startswith(b"["):
                os.write(out, pending)
                pending = b""
        if pending and not _is_noise(pending):
            os.write(out, pending)


def _is_noise(line: bytes) -> bool:
    text = line.decode("utf-8", "replace")
    return any(p.search(text) for p in NOISE_LINES)
