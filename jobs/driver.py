"""The driver: checks the spec against its output, plans the work, and runs the Ray Data chain
read → prior → decoder → write, with progress, resume and a final summary."""

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from tqdm import tqdm

from pipeline.geometry import Geometry
from workers.decoder_stage import DecoderStage
from workers.faults import FAULTS_ENV
from workers.prior_stage import PriorStage
from workers.writer_stage import write_images

from .manifest import (
    compact,
    job_rows,
    latest_status,
    read_job_params,
    read_manifest,
    summarize,
    write_job_params,
    write_summary,
)
from .plan import Plan, ReadUnit, plan_job, unit_images
from .spec import JobSpec
from .storage import Output, open_output

log = logging.getLogger("wurstfabrik")
# Writer batches between merges of the manifest's small parts: a long job leaves hundreds, not millions.
COMPACT_EVERY = 256


class JobError(Exception):
    """A job that cannot start or resume as asked; the message says why and what to do."""


@dataclass
class JobResult:
    summary: dict
    output: str

    @property
    def failed(self) -> int:
        return self.summary["status"].get("failed", 0)


def job_id(spec: JobSpec) -> str:
    """Names the set of images a spec describes: a hash of the fields that decide their content."""
    params = json.dumps(spec.generation_params(), sort_keys=True)
    return hashlib.sha256(params.encode()).hexdigest()[:16]


def done_images(output: Output, current_job: str) -> set[tuple[str, int]]:
    return {key for key, row in latest_status(job_rows(read_manifest(output), current_job)).items()
            if row["status"] == "ok"}


def check_resume(spec: JobSpec, output: Output, force: bool) -> None:
    recorded = read_job_params(output)
    if recorded is None or recorded.get("params") == spec.generation_params() or force:
        return
    current, before = spec.generation_params(), recorded.get("params", {})
    changed = sorted(k for k in current if before.get(k) != current[k])
    raise JobError(f"{spec.output} holds images made with other generation parameters (changed: "
                   f"{', '.join(changed) or 'unknown'}); name a new output, or pass --force to regenerate them all")


def local_folder(name: str) -> Path | None:
    """A checkpoint named by a path that exists here, made absolute; None for a hub id."""
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def local_geometry(spec: JobSpec) -> Geometry:
    """Image sizes as the checkpoints define them, read from local folders (published values for hub ids)."""
    return Geometry.from_checkpoints(local_folder(spec.prior), local_folder(spec.decoder))


def for_workers(spec: JobSpec) -> JobSpec:
    """The spec as the stages get it: local checkpoint folders made absolute, since workers may run elsewhere."""
    local = {name: str(local_folder(getattr(spec, name))) for name in ("prior", "decoder")
             if local_folder(getattr(spec, name))}
    return spec.model_copy(update=local)


def connect_ray() -> None:
    """Joins the cluster in RAY_ADDRESS (as under `ray job submit`), or starts a local Ray in-process."""
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=max(4, os.cpu_count() or 1), logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def stage_gpus(requested: float | None) -> float:
    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def read_unit(item: dict, spec: JobSpec, geometry: Geometry) -> list[dict]:
    return unit_images(spec, geometry, ReadUnit(**item))


def build_dataset(spec: JobSpec, plan: Plan, geometry: Geometry, current_job: str) -> "ray.data.Dataset":
    """The whole dataflow: one read task per row group, then two GPU actor pools, then CPU writers."""
    place = spec.placement
    env = {FAULTS_ENV: os.environ[FAULTS_ENV]} if os.environ.get(FAULTS_ENV) else {}
    runtime_env = {"env_vars": env} if env else None
    actor_args = {"max_restarts": place.max_restarts, "max_task_retries": place.max_task_retries}
    # Ray 2.60 has no named parameter for actor restarts; its generic remote args warn of deprecation.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    return (
        ray.data.from_items([asdict(u) for u in plan.units], override_num_blocks=max(1, len(plan.units)))
        .flat_map(read_unit, fn_kwargs={"spec": spec, "geometry": geometry}, num_cpus=0.25,
                  runtime_env=runtime_env)
        # A read unit's rows would otherwise travel as one block, and the decoder would wait for the prior to
        # finish all of them; blocks of one prior batch keep both pools busy from the first batch on.
        .repartition(target_num_rows_per_block=place.prior_batch_size)
        .map_batches(PriorStage, fn_constructor_kwargs={"spec": spec}, batch_size=place.prior_batch_size,
                     compute=ray.data.ActorPoolStrategy(size=place.prior_actors), num_gpus=stage_gpus(place.prior_gpus),
                     num_cpus=place.prior_cpus, resources=place.prior_resources or None, runtime_env=runtime_env,
                     **actor_args)
        .map_batches(DecoderStage, fn_constructor_kwargs={"spec": spec}, batch_size=place.decoder_batch_size,
                     compute=ray.data.ActorPoolStrategy(size=place.decoder_actors),
                     num_gpus=stage_gpus(place.decoder_gpus), num_cpus=place.decoder_cpus,
                     resources=place.decoder_resources or None, runtime_env=runtime_env, **actor_args)
        .map_batches(write_images, fn_kwargs={"spec": spec, "job_id": current_job}, batch_size=None,
                     num_cpus=place.writer_cpus, compute=ray.data.TaskPoolStrategy(size=place.writer_concurrency),
                     runtime_env=runtime_env)
    )


def run_job(spec: JobSpec, force: bool = False, progress: bool = True) -> JobResult:
    """Generates every image of the spec that its output does not hold yet."""
    started = time.perf_counter()
    output = open_output(spec.output)
    output.check_writable()
    check_resume(spec, output, force)
    current_job = job_id(spec)
    geometry = local_geometry(spec)
    plan = plan_job(spec, geometry, done_images(output, current_job))
    write_job_params(output, {"job_id": current_job, "params": spec.generation_params(),
                              "total_images": plan.total_images, "spec": spec.model_dump(mode="json")})
    log.info("%d images in all, %d already done, %d to generate", plan.total_images, plan.done_images,
             plan.pending_images)
    generated = failed = 0
    if plan.units:
        connect_ray()
        bar = tqdm(total=plan.total_images, initial=plan.done_images, unit="img", disable=not progress,
                   desc="images", dynamic_ncols=True)
        with bar:
            dataset = build_dataset(for_workers(spec), plan, geometry, current_job)
            for number, batch in enumerate(dataset.iter_batches(batch_size=None), start=1):
                if number % COMPACT_EVERY == 0:
                    compact(output, small_only=True)
                generated += int((batch["status"] == "ok").sum())
                failed += int((batch["status"] == "failed").sum())
                bar.update(len(batch["status"]))
                bar.set_postfix(failed=failed)
    elapsed = time.perf_counter() - started
    compact(output)  # one part per batch is durable while running; one part in all is quick to resume from
    summary = summarize(job_rows(read_manifest(output), current_job), elapsed_s=elapsed)
    # Throughput of this run alone: images recorded by earlier runs took none of its time.
    summary.update(job_id=current_job, total_images=plan.total_images, generated_now=generated,
                   failed_now=failed, images_per_s=generated / elapsed,
                   missing=max(0, plan.total_images - sum(summary["status"].values())), output=spec.output)
    write_summary(output, summary)
    return JobResult(summary, spec.output)
