"""jobs.quiet: Ray's console handlers follow the stderr of the run that uses them, not the one they were made with."""

import io
import logging
import sys

from wurstfabrik.jobs.quiet import quiet_ray_logs


def test_a_ray_data_handler_made_under_another_stderr_writes_to_the_current_one(monkeypatch):
    from ray._private.log import PlainRayHandler

    old = io.StringIO()
    monkeypatch.setattr(sys, "stderr", old)
    handler = PlainRayHandler()  # made while `old` was stderr
    logger = logging.getLogger("ray.data")
    logger.addHandler(handler)
    kept = io.StringIO()
    others = logging.StreamHandler(kept)
    logger.addHandler(others)
    try:
        old.close()  # that stderr is gone: a notebook cell, an app or a test capture ended
        now = io.StringIO()
        monkeypatch.setattr(sys, "stderr", now)
        quiet_ray_logs()
        logger.warning("execution finished")
        assert "execution finished" in now.getvalue() and "Logging error" not in now.getvalue()
        assert others.stream is kept  # a handler that is not Ray's keeps its stream
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(others)
