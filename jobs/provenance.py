"""What made a job's images: the checkpoints as given and resolved (a hub revision, or a fingerprint of a
folder), the wurstfabrik version and the generation parameters. The job id is a hash of all of it, and a resumed
run must match it exactly."""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from wurstfabrik.pipeline.checkpoint_info import inspect_checkpoint

from .spec import LATER_GENERATION_DEFAULTS


def wurstfabrik_version() -> str:
    try:
        return version("wurstfabrik")
    except PackageNotFoundError:
        return "unknown"


def checkpoint_identity(name: str, kind: str, prior_text: str | None = None) -> dict[str, Any]:
    """One checkpoint as given and as resolved; raises CheckpointError (one line) when it cannot be used. A
    model-only prior's identity includes that of the pipeline its text encoder comes from (`prior_text`)."""
    info = inspect_checkpoint(name, kind)
    identity = {"given": name, "source": info.source, "revision": info.revision, "fingerprint": info.fingerprint}
    if info.model_only:
        identity["text"] = checkpoint_identity(prior_text, "prior_text")
    return identity


def job_params(spec, prior: dict[str, Any], decoder: dict[str, Any]) -> dict[str, Any]:
    """The parameters that decide a job's images: the spec's generation fields and both checkpoints' identity."""
    return {**spec.generation_params(), "prior_checkpoint": prior, "decoder_checkpoint": decoder}


def job_id(params: dict[str, Any]) -> str:
    """Names the set of images a spec describes: a hash of what decides their content."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def sample_provenance(params: dict[str, Any], current_job: str) -> dict[str, Any]:
    """What every sample's metadata carries about the job that made it."""
    sampler = {k: params[k] for k in ("prior_steps", "prior_timesteps", "prior_guidance_scale", "decoder_steps",
                                      "decoder_guidance_scale", "dtype") if k in params}
    sampler.update({k: params.get(k, default) for k, default in LATER_GENERATION_DEFAULTS.items()})
    return {"job_id": current_job, "wurstfabrik": wurstfabrik_version(), "prior": params["prior_checkpoint"],
            "decoder": params["decoder_checkpoint"], "sampler": sampler}
