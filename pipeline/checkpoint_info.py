"""Checking a checkpoint as the stages will load it, without loading weights: for a driver, before any actor starts.

`inspect_checkpoint(name_or_path, kind)` reads a folder's configs and lists its weight files, or asks the hub for a
repository's commit and file list (offline, or when the hub cannot be reached: the local Hugging Face cache), and
raises a CheckpointError whose one line says what is wrong and what to do. What it returns pins what the actors
load: the hub commit (pass it as `revision`), or a fingerprint of the folder's layout.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import (
    PIPELINE_FOLDERS,
    cached_snapshot,
    check_folder_kind,
    is_model_only_repo,
    looks_like_hub_id,
    offline_hint,
    pipeline_folder,
    read_config,
    refuse_s3,
    weight_files,
)
from .errors import CheckpointError

KINDS = ("prior", "decoder", "prior_text")
HASHED_SUFFIXES = (".json", ".txt")  # files fingerprinted by content; others by name and size
MODEL_FOLDERS = {"prior": ("prior",), "decoder": ("decoder", "vqgan"), "prior_text": ()}


@dataclass(frozen=True)
class CheckpointInfo:
    name: str  # as given
    kind: str  # "prior", "decoder" or "prior_text" (the text encoder a model-only prior takes from a pipeline)
    source: str  # "folder" or "hub"
    folder: Path | None  # the folder, or a hub id's copy in the local cache when there is one
    revision: str | None  # a hub id's commit
    fingerprint: str | None  # a folder's: sha256 of its configs, tokenizer files and weight file names and sizes
    model_only: bool = False  # a model-only prior: its text encoder comes from a `prior_text` pipeline


def inspect_checkpoint(name_or_path, kind: str, revision: str | None = None) -> CheckpointInfo:
    """What a checkpoint folder or hub id is, checked the way loading will read it, weights unread."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = str(name_or_path)
    refuse_s3(name)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        model_only = check_folder(path, kind)
        return CheckpointInfo(name, kind, "folder", path, None, fingerprint(path, kind, model_only), model_only)
    if not looks_like_hub_id(name):
        raise CheckpointError(f"{name}: no such checkpoint folder (nor a hub id, which has the form owner/name)")
    return inspect_hub(name, kind, revision)


def check_folder(folder: Path, kind: str) -> bool:
    """Checks a folder's layout, configs and weight files for `kind`; returns whether it is a model-only prior."""
    found = check_folder_kind(folder, kind)
    if found == "prior_model":
        read_config(folder, "prior")
        check_weights(folder)
        return True
    pipeline_folder(folder, kind)
    for sub in MODEL_FOLDERS[kind]:
        read_config(folder / sub, sub)
        check_weights(folder / sub)
    if not (folder / "text_encoder" / "config.json").is_file():
        raise CheckpointError(f"{folder / 'text_encoder' / 'config.json'}: missing")
    check_weights(folder / "text_encoder")
    if not any((folder / "tokenizer").glob("*")):
        raise CheckpointError(f"{folder / 'tokenizer'}: empty; a CLIP tokenizer's files are missing")
    return False


def check_weights(folder: Path) -> None:
    """The component's safetensors files exist (either variant); pickle-only folders are refused."""
    for prefer_half in (False, True):
        missing = [f for f in weight_files(folder, prefer_half) if not f.is_file()]
        if missing:
            raise CheckpointError(f"{missing[0]}: missing weight shard")


def checkpoint_files(folder: Path, kind: str, model_only: bool) -> list[Path]:
    if model_only:
        return [p for p in folder.iterdir() if p.is_file()]
    files = [folder / "model_index.json"]
    for sub in PIPELINE_FOLDERS[kind]:
        files += [p for p in (folder / sub).iterdir() if p.is_file()]
    return files


def fingerprint(folder: Path, kind: str, model_only: bool) -> str:
    """sha256 over the files loading reads: configs and tokenizer files by content, weights by name and size."""
    digest = hashlib.sha256()
    for path in sorted(checkpoint_files(folder, kind, model_only)):
        relative = path.relative_to(folder).as_posix()
        if path.name.endswith(HASHED_SUFFIXES):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = f"{path.stat().st_size} bytes"
        digest.update(f"{relative}\0{content}\n".encode())
    return digest.hexdigest()


def hub_info(repo_id: str, revision: str | None):
    """The hub's model info of a repository at a revision (its commit, `sha`, and files, `siblings`), and None when
    the hub cannot be asked; then also why, in words. Raises CheckpointError when it has no such repository or
    revision."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return HfApi().model_info(repo_id, revision=revision), None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        at = f" at revision {revision}" if revision else ""
        raise CheckpointError(f"{repo_id}: no such checkpoint{at} on the Hugging Face hub ({type(e).__name__}); "
                              f"check the id, or pass a local folder") from None
    except Exception as e:  # offline mode, or a connection error (the hub's HTTP client has no common base class)
        return None, ("offline mode is on (HF_HUB_OFFLINE)" if isinstance(e, OfflineModeIsEnabled) else
                      f"the Hugging Face hub cannot be reached ({type(e).__name__})")


def inspect_hub(repo_id: str, kind: str, revision: str | None) -> CheckpointInfo:
    info, why = hub_info(repo_id, revision)
    if info is None:
        return inspect_cached(repo_id, kind, revision, why)
    files = [sibling.rfilename for sibling in info.siblings or []]
    model_only = check_repo_files(repo_id, files, kind)
    cached = cached_snapshot(repo_id, info.sha)
    return CheckpointInfo(repo_id, kind, "hub", cached, info.sha, None, model_only)


def check_repo_files(repo_id: str, files: list[str], kind: str) -> bool:
    """Checks a hub repository's file list as check_folder checks a folder; returns whether it is model-only."""
    if kind == "prior" and is_model_only_repo(files):
        if not any(f.endswith(".safetensors") and "/" not in f for f in files):
            raise CheckpointError(f"{repo_id}: a model-only repository without .safetensors weights")
        return True
    if "model_index.json" not in files:
        raise CheckpointError(f"{repo_id}: no model_index.json: not a Würstchen {kind.replace('_text', '')} "
                              f"pipeline repository")
    other = {"prior": "decoder", "decoder": "prior", "prior_text": "decoder"}[kind]
    if any(f.startswith(f"{other}/") for f in files) and not any(f.startswith(f"{kind}/") for f in files):
        raise CheckpointError(f"{repo_id}: a {other} checkpoint where a "
                              f"{'prior pipeline' if kind == 'prior_text' else kind} was expected")
    for sub in PIPELINE_FOLDERS[kind]:
        names = [f for f in files if f.startswith(f"{sub}/")]
        if not names:
            raise CheckpointError(f"{repo_id}: missing the {sub}/ folder of a {kind} checkpoint")
        if sub != "tokenizer" and not any(".safetensors" in f for f in names):
            pickles = [f for f in names if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            detail = f" (only pickle weights: {', '.join(pickles)}; they are never loaded)" if pickles else ""
            raise CheckpointError(f"{repo_id}: no .safetensors weights in {sub}/{detail}")
    return False


def inspect_cached(repo_id: str, kind: str, revision: str | None, why: str) -> CheckpointInfo:
    at = f" at revision {revision}" if revision else ""
    folder = cached_snapshot(repo_id, revision)
    if folder is None:
        raise CheckpointError(f"{repo_id}: {why} and the checkpoint{at} is not in the local Hugging Face cache. "
                              f"{offline_hint(repo_id)}")
    model_only = check_folder(folder, kind)
    return CheckpointInfo(repo_id, kind, "hub", folder, folder.name, None, model_only)

