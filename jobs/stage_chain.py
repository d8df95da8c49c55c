"""The stages of every dataflow we build, and what they need settled first: blocks of a few prior batches → the prior
and decoder actor pools (or one fused pool) → CPU encoders. The job's chain (jobs.driver.build_dataset) and
`wurstfabrik.generate` both append exactly these, so a user's Dataset gets the job's batching, actors, compile cache
and precision."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import ray

from wurstfabrik.pipeline.geometry import Geometry
from wurstfabrik.pipeline.prompt_syntax import check_prompt_syntax
from wurstfabrik.workers.decoder_stage import DecoderStage
from wurstfabrik.workers.encoder_stage import encode_images
from wurstfabrik.workers.faults import FAULTS_ENV
from wurstfabrik.workers.fp8_probe import fp8_gpu_problem
from wurstfabrik.workers.fused_stage import FusedStage
from wurstfabrik.workers.metrics import MetricLabels
from wurstfabrik.workers.prior_stage import PriorStage

from .resources import ClusterShape, demands, stage_gpus, unschedulable
from .spec import JobSpec

# Rows per block the stages aim for when the placement does not say (block_rows): at 8 or more, Ray Data's cost on
# the driver and head per image falls with the rows per block (docs/benchmarks.md, fleet).
BLOCK_ROWS = 32


def local_folder(name: str) -> Path | None:
    """A checkpoint named by a path that exists here, made absolute; None for a hub id or an s3:// prefix."""
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def for_workers(spec: JobSpec) -> JobSpec:
    """The spec as the stages get it: local folders made absolute, since workers may run elsewhere."""
    local = {name: str(local_folder(getattr(spec, name))) for name in ("prior", "prior_text", "decoder")
             if local_folder(getattr(spec, name))}
    if spec.compile_cache and not spec.compile_cache.startswith("s3://"):
        local["compile_cache"] = str(Path(spec.compile_cache).expanduser().absolute())
    return spec.model_copy(update=local)


def size_problem(geometry: Geometry):
    def check(height: int, width: int) -> str | None:
        try:
            geometry.check_size(height, width)
        except ValueError as e:
            return str(e)
        return None

    return check


def prompt_problem(syntax: str):
    """The planner's check of a prompt's weighting syntax (None for plain prompts, which need none)."""
    if syntax == "plain":
        return None

    def check(text: str) -> str | None:
        try:
            check_prompt_syntax(text, syntax)
        except ValueError as e:
            return str(e)
        return None

    return check


def placed_gpus(spec: JobSpec) -> tuple[tuple[float, float], str | None]:
    """GPUs per prior and decoder actor on the connected cluster, and why the placement can never be scheduled
    (or the GPUs cannot run FP8) in one line; None when it can."""
    cluster = ClusterShape.current()
    place = spec.placement
    gpus = stage_gpus(place, cluster)
    problem = unschedulable(demands(place, *gpus), cluster)
    if problem is None and spec.quantize == "fp8":
        problem = fp8_gpu_problem(place, gpus)
    return gpus, problem


def stage_runtime_env() -> dict | None:
    """What the stages' processes need of the driver's environment: only the test fault switch (workers.faults)."""
    env = {FAULTS_ENV: os.environ[FAULTS_ENV]} if os.environ.get(FAULTS_ENV) else {}
    return {"env_vars": env} if env else None


def block_rows(place, images: int | None) -> int:
    """Rows per block through the stages: whole prior batches, `batches_per_block` of them, or auto: about
    BLOCK_ROWS, but fewer while `images` (the rows to make, None when unknown) are under 8 such blocks per prior
    actor, down to one batch, so that a small job still spreads over every actor."""
    batch = place.prior_batch_size
    if place.batches_per_block is not None:
        return batch * place.batches_per_block
    batches = max(1, BLOCK_ROWS // batch)
    if images is not None:
        batches = max(1, min(batches, images // (8 * batch * place.prior_actors)))
    return batch * batches


def append_stages(rows: ray.data.Dataset, spec: JobSpec, models, gpus: tuple[float, float],
                  labels: MetricLabels | None, images: int | None = None) -> ray.data.Dataset:
    """`rows` (image rows: prompt_id, prompt, negative_prompt, seed, height, width) through the prior and decoder
    and encoded; each row gains the stages' columns (`data`, the encoded image, and its `error`, "" when none).
    `spec` is as the workers get it (for_workers); `models` what the actors load (workers.models.StageModels);
    `images` the number of rows, where known (block_rows)."""
    place = spec.placement
    runtime_env = stage_runtime_env()
    actor_args = {"max_restarts": place.max_restarts, "max_task_retries": place.max_task_retries,
                  "fn_constructor_kwargs": {"spec": spec, "models": models, "labels": labels},
                  "runtime_env": runtime_env}
    # Ray 2.60 has no named parameter for actor restarts; its generic remote args warn of deprecation.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    # A read unit's rows would otherwise travel as one block, and the decoder would wait for the prior to finish all
    # of them; blocks of a few prior batches keep both pools busy from the first blocks on. The stages take a block
    # whole (batch_size=None) and cut it into model batches of one size each (workers.batches.model_batches): a
    # batch filled up from the next block could mix sizes, which would run as two part-empty model batches (the
    # job's read units hold one size each; a user's Dataset is as its user made it).
    blocks = rows.repartition(target_num_rows_per_block=block_rows(place, images))
    prior_pool = dict(batch_size=None, compute=ray.data.ActorPoolStrategy(size=place.prior_actors),
                      num_gpus=gpus[0], num_cpus=place.prior_cpus, resources=place.prior_resources or None,
                      **actor_args)
    if place.fused:  # one pool whose actors run each batch through the prior and then the decoder
        decoded = map_stage(blocks, FusedStage, **prior_pool)
    else:
        decoded = map_stage(
            map_stage(blocks, PriorStage, **prior_pool),
            # the prior's blocks as they are (the decoder cuts them into its own batches) when the sizes agree
            DecoderStage, batch_size=None if place.decoder_batch_size == place.prior_batch_size else
            place.decoder_batch_size,
            compute=ray.data.ActorPoolStrategy(size=place.decoder_actors), num_gpus=gpus[1],
            num_cpus=place.decoder_cpus, resources=place.decoder_resources or None, **actor_args)
    # Ray's default scheduling puts a task where its input block is: encoding runs beside the decoder that made the
    # pixels (when that node has a free CPU), so only compressed images cross the network.
    return decoded.map_batches(encode_images, fn_kwargs={"image_format": spec.format, "quality": spec.quality,
                                                         "labels": labels},
                               batch_size=None, num_cpus=place.writer_cpus, compute=encoder_pool(spec),
                               scheduling_strategy="DEFAULT", runtime_env=runtime_env)


def map_stage(dataset: ray.data.Dataset, fn, **options) -> ray.data.Dataset:
    """`dataset.map_batches(fn, **options)`, GPU actors with one block per batch included. Ray Data refuses
    batch_size=None for actors that ask for GPUs (its advice: pick the largest batch that fits the GPU's memory),
    which would keep every job off a GPU cluster; our batch is the placement's batch size, which the blocks already
    have, so such a pool goes through map_batches_internal: the same call, without that one check."""
    if options.get("batch_size") is None and (options.get("num_gpus") or 0) > 0:
        return dataset.map_batches_internal(fn, **options)
    return dataset.map_batches(fn, **options)


def encoder_pool(spec: JobSpec) -> ray.data.TaskPoolStrategy:
    """The encoders' and writers' tasks: as many as the cluster's free CPUs allow, or writer_concurrency."""
    return ray.data.TaskPoolStrategy(size=spec.placement.writer_concurrency)
