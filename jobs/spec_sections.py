"""The job spec's two sections that do not change the images: `placement` (how the stages spread over the Ray
cluster) and `resilience` (how long a run waits out trouble). jobs.spec holds them in JobSpec."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

# Ray wants CPU and GPU through num_cpus/num_gpus and refuses them as custom resources.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class Frozen(BaseModel):
    # Each field's docstring is its description in `wurstfabrik schema` and in docs/jobs.md's field table.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


class Placement(Frozen):
    """How the stages are spread over the Ray cluster; does not change the images."""

    prior_actors: StrictInt = Field(1, ge=1)
    """Prior (Stage C) actor pool size."""
    decoder_actors: StrictInt = Field(1, ge=1)
    """Decoder (Stage B and Stage A) actor pool size."""
    prior_gpus: StrictFloat | None = Field(None, ge=0)
    """GPUs per prior actor (fractions below 1 share a GPU; 0 runs on the CPU). Auto: 1 where the cluster has (or
    its autoscaler can add) a GPU per actor, an equal share where it has fewer (one GPU: 0.5 each), 0 without GPUs."""
    decoder_gpus: StrictFloat | None = Field(None, ge=0)
    """GPUs per decoder actor, as `prior_gpus`."""
    prior_cpus: StrictFloat = Field(1.0, gt=0)
    """CPUs reserved per prior actor."""
    decoder_cpus: StrictFloat = Field(1.0, gt=0)
    """CPUs reserved per decoder actor."""
    writer_cpus: StrictFloat = Field(0.5, gt=0)
    """CPUs reserved per encoder or writer task."""
    prior_batch_size: StrictInt = Field(8, ge=1)
    """Images per prior model batch."""
    decoder_batch_size: StrictInt = Field(8, ge=1)
    """Images per decoder model batch."""
    batches_per_block: StrictInt | None = Field(None, ge=1)
    """Prior batches per Ray Data block through the stages. Ray Data's driver and head spend about the same per
    block whatever it holds, so more rows per block cost the head less per image; one batch per block lets a small
    job reach every actor sooner. Auto: blocks of about 32 images, fewer while a job has under 8 such blocks per
    prior actor to make."""
    writer_concurrency: StrictInt | None = Field(None, ge=1)
    """Caps the encoder and the writer tasks, each; none lets Ray Data run as many as there are free CPUs."""
    prior_resources: dict[str, StrictFloat] = Field(default_factory=dict)
    """Custom Ray resources per prior actor, to pin the stage to a node type (e.g. `{prior_node: 0.01}`)."""
    decoder_resources: dict[str, StrictFloat] = Field(default_factory=dict)
    """Custom Ray resources per decoder actor, to pin the stage to a node type."""
    # -1 is Ray's "retry forever". A batch is retried for as long as its actor can be restarted: a restart on
    # another node (the first one lost) takes longer than a few quick retries.
    max_restarts: StrictInt = Field(3, ge=-1)
    """Restarts of a stage actor that dies (-1: without limit)."""
    max_task_retries: StrictInt = Field(-1, ge=-1)
    """Retries of a batch after its worker dies (-1: for as long as the actor can be restarted)."""
    fused: StrictBool = False
    """One actor pool instead of two: each actor holds the prior and the decoder and runs a batch through the one
    and then the other, so a GPU is not time-sliced between two processes. Its actors take prior_actors, prior_cpus,
    prior_gpus (auto: a whole GPU each) and prior_resources; decoder_batch_size still sets the decoder's batches
    inside an actor. The images are the same."""

    @model_validator(mode="after")
    def _fused_takes_the_prior_fields(self) -> Placement:
        if self.fused:
            unused = [name for name, default in (("decoder_actors", 1), ("decoder_gpus", None), ("decoder_cpus", 1.0),
                                                 ("decoder_resources", {})) if getattr(self, name) != default]
            if unused:
                raise ValueError(f"fused actors take prior_actors, prior_cpus, prior_gpus and prior_resources; "
                                 f"{', '.join(unused)} only apply to two pools: remove them or set fused: false")
        return self

    @field_validator("prior_gpus", "decoder_gpus")
    @classmethod
    def _whole_gpus_above_one(cls, gpus: float | None) -> float | None:
        # Ray only splits a single GPU; above one it wants whole numbers.
        if gpus is not None and gpus > 1 and not gpus.is_integer():
            raise ValueError(f"fractions are only allowed below 1 GPU (got {gpus})")
        return gpus

    @field_validator("prior_resources", "decoder_resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if not name:
                raise ValueError("resource names must not be empty")
            if name in RAY_BUILTIN_RESOURCES:
                raise ValueError(f"{name!r} is set by the *_gpus fields or by Ray, not as a custom resource")
            if amount < 0:
                raise ValueError(f"{name!r} must be >= 0 (got {amount})")
        return resources


class Resilience(Frozen):
    """How long a run waits out trouble before it gives up; does not change the images."""

    storage_outage_s: StrictFloat = Field(60.0, ge=0)
    """Seconds each S3 call retries transient failures before the run stops (exit 1)."""
    lease_stale_s: StrictFloat = Field(300.0, gt=0)
    """Seconds after which a lease not renewed belongs to a dead run, and the next run takes it over."""
    stall_s: StrictFloat = Field(1800.0, gt=0)
    """Seconds without a finished image after which the run reports what Ray is waiting to schedule and stops (exit
    1); a warning at half that."""
