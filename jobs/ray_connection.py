"""Which Ray a run uses: the cluster in RAY_ADDRESS (as under `ray job submit`), or a local Ray started in-process
for the run."""

from __future__ import annotations

import logging
import math
import os

import ray

from .quiet import quiet_ray_logs
from .resources import demands
from .spec import JobSpec


def connect_ray(spec: JobSpec) -> str:
    """Joins the cluster in RAY_ADDRESS, or starts a local Ray in-process with enough logical CPUs for the placement
    (they are scheduling slots; the stages share the real cores). Returns which Ray the run is on, in words."""
    quiet_ray_logs()
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING, log_to_driver=True)
        else:
            needed = sum(d.count * d.bundle.get("CPU", 0) for d in demands(spec.placement, 0, 0))
            # "local": a Ray of the run's own, even where another runs on this machine (ray.init() would join the
            # latest one started here, and refuse the CPU count as a setting that only a new Ray takes).
            ray.init(address="local", num_cpus=max(math.ceil(needed), os.cpu_count() or 1),
                     logging_level=logging.WARNING, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows its own
    address = ray.get_runtime_context().gcs_address
    return f"the Ray cluster at {address}" if os.environ.get("RAY_ADDRESS") else "a local Ray started for this run"
