"""`wurstfabrik.generate`: a user's Ray Dataset of prompts in, the same rows out with their generated images, through
the job's own stages (jobs.stage_chain: batches of one size, the prior and decoder actor pools, the compile cache,
FP8). It keeps no manifest, takes no lease and resumes nothing: the user's pipeline owns its output."""

from __future__ import annotations

import uuid
from typing import Any

import ray

from wurstfabrik.store.prompts import Columns
from wurstfabrik.store.storage import S3Settings
from wurstfabrik.workers.dataset_columns import image_rows, user_rows
from wurstfabrik.workers.metrics import MetricLabels
from wurstfabrik.workers.models import StageModels

from . import stage_chain as stages
from .provenance import CheckpointChecks, job_id, job_params, sample_provenance
from .spec import JobSpec, SpecError

# The job spec's fields about its input files, its output and its runs: a Dataset and its user settle those.
NOT_FOR_DATASETS = ("prompts", "output", "output_format", "shard_size", "bad_rows", "resilience")


def generate(ds: ray.data.Dataset, *, prompt_column: str = "prompt", seed_column: str | None = None,
             height: int = 1024, width: int = 1024, prior: str = "warp-ai/wuerstchen-prior",
             decoder: str = "warp-ai/wuerstchen", placement: dict | None = None, **fields: Any) -> ray.data.Dataset:
    """Maps `ds` to a Dataset of the same rows (each `images_per_prompt` times) with these columns added or replaced:
    `image` (the encoded PNG, JPEG or WebP file; empty where the row failed), `image_index`, `seed` (the one used),
    `height` and `width` (as delivered), `generated_height` and `generated_width` (as made), `sha256` (of the image),
    `truncated`, `error` (None, or why this row has no image), `prior_s`, `decoder_s`, `encode_s` (seconds per
    image) and `provenance` (JSON: checkpoints as resolved, sampler settings, wurstfabrik version, the job id that a
    job of the same settings would have).

    `fields` are the job spec's fields by the same names (docs/jobs.md#fields) but for those about files, outputs
    and runs (NOT_FOR_DATASETS); `placement` is the spec's `placement`. Without a seed column, seeds derive from
    `seed` and the `id_column`, or from the prompt itself (one prompt, one image), as a job derives them from its
    ids. Checkpoints and the placement are checked now (CheckpointError; ValueError for a bad argument or a
    placement the cluster can never schedule); Ray is started if it is not yet, as Ray Data would. The images are
    made when the Dataset is consumed, exactly as a job with the same fields makes them."""
    spec = dataset_spec(prompt_column=prompt_column, seed_column=seed_column, height=height, width=width,
                        prior=prior, decoder=decoder, placement=placement or {}, **fields)
    checkpoints = CheckpointChecks(S3Settings(), spec.checkpoint_cache)
    params = job_params(spec, checkpoints.identity(spec.prior, "prior", spec.prior_text),
                        checkpoints.identity(spec.decoder, "decoder"))
    geometry = checkpoints.geometry(spec.prior, spec.decoder)
    _check_columns(ds, spec)
    if not ray.is_initialized():
        ray.init()
    gpus, problem = stages.placed_gpus(spec)
    if problem:
        raise ValueError(f"placement: {problem}")
    labels = MetricLabels(job_id(params), f"generate-{uuid.uuid4().hex[:12]}")
    workers = stages.for_workers(spec)
    rows = ds.map_batches(image_rows, batch_format="pyarrow", batch_size=None, runtime_env=stages.stage_runtime_env(),
                          fn_kwargs={"spec": workers, "check_size": stages.size_problem(geometry),
                                     "check_prompt": stages.prompt_problem(spec.prompt_syntax)})
    made = stages.append_stages(rows, workers, StageModels.from_job(params, geometry, S3Settings()), gpus,
                                labels)
    return made.map_batches(user_rows, batch_size=None, num_cpus=spec.placement.writer_cpus,
                            fn_kwargs={"provenance": sample_provenance(params, labels.job_id), "labels": labels})


def _check_columns(ds: ray.data.Dataset, spec: JobSpec) -> None:
    """The columns the fields name, where the Dataset knows its schema without running (a read does)."""
    schema = ds.schema(fetch_if_missing=False)
    if schema is None:
        return  # checked on the rows themselves, in their first task
    missing = [name for name in Columns.of(spec).names() if name not in schema.names]
    if missing:
        raise ValueError(f"the Dataset has no column {', '.join(map(repr, missing))} (columns: "
                         f"{', '.join(schema.names)})")


def dataset_spec(**fields: Any) -> JobSpec:
    """The job spec the stages get for a Dataset's rows; ValueError names a field that is wrong or not taken."""
    refused = sorted(name for name in fields if name in NOT_FOR_DATASETS or name not in JobSpec.model_fields)
    if refused:
        raise ValueError(f"generate() does not take {', '.join(refused)}: it takes the job spec's fields "
                         f"(docs/jobs.md#fields) except {', '.join(NOT_FOR_DATASETS)}")
    try:
        # `prompts` names a job's files; here the rows come from the Dataset, and no stage reads the field.
        return JobSpec.from_dict({"prompts": "ray.data.Dataset", **fields})
    except SpecError as e:
        raise ValueError(str(e)) from None
