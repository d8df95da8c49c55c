"""What made a job's images: the checkpoints as given and resolved (a hub revision, a fingerprint of a folder, or
the sha256s of an s3:// checkpoint's files), the wurstfabrik version and the generation parameters. The job id is a
hash of all of it, and a resumed run must match it exactly."""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from wurstfabrik.pipeline.checkpoint_info import inspect_checkpoint
from wurstfabrik.pipeline.geometry import Geometry
from wurstfabrik.workers.s3_checkpoint import inspect_s3_checkpoint, is_s3

from .spec import LATER_GENERATION_DEFAULTS


def wurstfabrik_version() -> str:
    try:
        return version("wurstfabrik")
    except PackageNotFoundError:
        return "unknown"


class CheckpointChecks:
    """The driver's checks of a job's checkpoints, before any actor starts: each one's identity, and the folders
    whose configs define the image geometry (an s3:// checkpoint's configs are fetched into this node's cache,
    `cache`, through S3 `settings`)."""

    def __init__(self, settings=None, cache: str | None = None):
        self.settings, self.cache = settings, cache
        self.config_folders: dict[str, Path] = {}

    def identity(self, name: str, kind: str, prior_text: str | None = None) -> dict[str, Any]:
        """One checkpoint as given and as resolved; raises CheckpointError (one line) when it cannot be used, or
        StorageError when an s3:// one's store refuses or is away. A model-only prior's identity includes that of
        the pipeline its text encoder comes from (`prior_text`)."""
        if is_s3(name):
            checkpoint = inspect_s3_checkpoint(name, kind, self.settings, self.cache)
            identity, model_only = checkpoint.identity(), checkpoint.model_only
            self.config_folders[name] = checkpoint.folder
        else:
            info = inspect_checkpoint(name, kind)
            identity, model_only = {"given": name, "source": info.source, "revision": info.revision,
                                    "fingerprint": info.fingerprint}, info.model_only
            if info.source == "folder":
                self.config_folders[name] = info.folder.resolve()
        if model_only:
            identity["text"] = self.identity(prior_text, "prior_text")
        return identity

    def geometry(self, prior: str, decoder: str) -> Geometry:
        """Image sizes as the checkpoints' configs define them (published values for hub ids)."""
        return Geometry.from_checkpoints(self.config_folders.get(prior), self.config_folders.get(decoder))


def checkpoint_change(key: str, before: Any, now: Any) -> str:
    """A changed generation parameter in words; for a checkpoint, which one and, where known, which files."""
    if not (key.endswith("_checkpoint") and isinstance(before, dict) and isinstance(now, dict)):
        return key
    if before.get("given") != now.get("given"):
        return f"{key}: {before.get('given')} -> {now.get('given')}"
    old_files, new_files = before.get("files") or {}, now.get("files") or {}
    files = sorted(path for path in set(old_files) | set(new_files) if old_files.get(path) != new_files.get(path))
    shown = f" ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''} changed)" if files else ""
    return f"{key}: {now.get('given')} is not the checkpoint those images were made with{shown}"


def job_params(spec, prior: dict[str, Any], decoder: dict[str, Any]) -> dict[str, Any]:
    """The parameters that decide a job's images: the spec's generation fields and both checkpoints' identity."""
    return {**spec.generation_params(), "prior_checkpoint": prior, "decoder_checkpoint": decoder}


def job_id(params: dict[str, Any]) -> str:
    """Names the set of images a spec describes: a hash of what decides their content."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _without_files(identity: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's identity less its list of files (job.json keeps that; the fingerprint stands for it)."""
    short = {k: v for k, v in identity.items() if k != "files"}
    if isinstance(short.get("text"), dict):
        short["text"] = _without_files(short["text"])
    return short


def sample_provenance(params: dict[str, Any], current_job: str) -> dict[str, Any]:
    """What every sample's metadata carries about the job that made it."""
    sampler = {k: params[k] for k in ("prior_steps", "prior_timesteps", "prior_guidance_scale", "decoder_steps",
                                      "decoder_guidance_scale", "dtype") if k in params}
    sampler.update({k: params.get(k, default) for k, default in LATER_GENERATION_DEFAULTS.items()})
    return {"job_id": current_job, "wurstfabrik": wurstfabrik_version(),
            "prior": _without_files(params["prior_checkpoint"]),
            "decoder": _without_files(params["decoder_checkpoint"]), "sampler": sampler}
