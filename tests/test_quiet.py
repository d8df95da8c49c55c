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


def test_ray_datas_notes_on_our_gpu_placement_and_actor_memory_stay_out_of_a_run(monkeypatch):
    import ray.data
    from ray.data._internal.execution.operators.map_operator import _canonicalize_ray_remote_args

    caught = io.StringIO()
    handler = logging.StreamHandler(caught)
    logger = logging.getLogger("ray.data")
    logger.addHandler(handler)
    context = ray.data.DataContext.get_current()
    memory = context.issue_detectors_config.high_memory_detector_config
    monkeypatch.setattr(memory, "detection_time_interval_s", 30.0)  # Ray Data's default
    placement = logging.getLogger("ray.data._internal.execution.operators.map_operator")
    monkeypatch.setattr(placement, "filters", [])  # as before any run in this process
    try:
        _canonicalize_ray_remote_args({"num_cpus": 1, "num_gpus": 1})
        assert "num_cpus and num_gpus" in caught.getvalue()  # Ray Data says it on every GPU stage...
        caught.truncate(0)
        quiet_ray_logs()
        _canonicalize_ray_remote_args({"num_cpus": 1, "num_gpus": 1})
        assert caught.getvalue() == ""  # ...but not in a run
        placement.warning("something else")
        assert "something else" in caught.getvalue()
        # The high-memory detector, which repeats its advice every 30 s for every actor that holds a model, is off.
        assert memory.detection_time_interval_s == -1
    finally:
        logger.removeHandler(handler)
