"""Finding and reading checkpoints in the published (diffusers) layout: safetensors weights only."""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .decoder import DecoderConfig, StageB
from .errors import CheckpointError
from .prior import PriorConfig, StageC
from .vqgan import StageA, VQGANConfig

COMPONENTS = {
    "prior": ("WuerstchenPrior", PriorConfig, StageC),
    "decoder": ("WuerstchenDiffNeXt", DecoderConfig, StageB),
    "vqgan": ("PaellaVQModel", VQGANConfig, StageA),
}
PIPELINE_FOLDERS = {
    "prior": ("prior", "text_encoder", "tokenizer"),
    "decoder": ("decoder", "vqgan", "text_encoder", "tokenizer"),
    "prior_text": ("text_encoder", "tokenizer"),  # what a model-only prior takes from its companion pipeline
}
PIPELINE_CLASSES = {"WuerstchenPriorPipeline": "prior", "WuerstchenDecoderPipeline": "decoder"}
DEFAULT_PRIOR_TEXT = "warp-ai/wuerstchen-prior"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HALF_VARIANT = "fp16"
# Config keys of training only, with no effect on inference.
IGNORED_CONFIG_KEYS = {"dropout"}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA; float32 elsewhere, mps included (half precision runs there when asked for, but is not
    the default: it is untested on Apple GPUs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def component_kind(folder: Path, config: dict) -> str:
    class_name = config.get("_class_name")
    for kind, (name, _, _) in COMPONENTS.items():
        if class_name == name:
            return kind
    if class_name is None and folder.name in COMPONENTS:
        return folder.name
    raise CheckpointError(f"{folder / 'config.json'}: _class_name {class_name!r} is not one of "
                          f"{', '.join(name for name, _, _ in COMPONENTS.values())}")


def build_config(kind: str, config: dict, path: Path):
    _, config_type, _ = COMPONENTS[kind]
    fields = config_type.__dataclass_fields__
    unknown = sorted(k for k in config if k not in fields and not k.startswith("_") and k not in IGNORED_CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown {kind} config keys: {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    return config_type(**values)


def read_config(folder: Path, kind: str):
    """The config dataclass of a component folder, checked to be of the expected kind."""
    path = folder / "config.json"
    raw = read_json(path)
    found = component_kind(folder, raw)
    if found != kind:
        raise CheckpointError(f"{path}: a {found} config where a {kind} was expected")
    return build_config(kind, raw, path)


def is_half_variant(name: str) -> bool:
    """Whether a weight file belongs to the fp16 variant: `x.fp16.safetensors`, and when sharded
    `x.safetensors.index.fp16.json` with shards `x.fp16-00001-of-00002.safetensors`."""
    return f".{HALF_VARIANT}." in name or f".{HALF_VARIANT}-" in name


def weight_files(folder: Path, prefer_half: bool) -> list[Path]:
    """The safetensors files holding a component's weights, sharded or not, fp16 variant where preferred."""
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    index_suffixes = (".safetensors.index.json", f".safetensors.index.{HALF_VARIANT}.json")
    index_names = [n for n in names if n.endswith(index_suffixes)]
    single_names = [n for n in names if n.endswith(".safetensors") and "-of-" not in n]  # not a shard
    for half in (True, False) if prefer_half else (False, True):
        for name in index_names:
            if is_half_variant(name) != half:
                continue
            index = read_json(folder / name)
            weight_map = index.get("weight_map")
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
            if not shards:
                raise CheckpointError(f"{folder / name}: no weight_map")
            outside = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in (".", "..")]
            if outside:
                raise CheckpointError(f"{folder / name}: weight_map names files outside its folder: {outside}")
            return [folder / shard for shard in shards]
        for name in single_names:
            if is_half_variant(name) == half:
                return [folder / name]
    pickles = [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights ({', '.join(pickles)}); they are never loaded because "
                              "unpickling can run arbitrary code. Convert them to .safetensors.")
    raise CheckpointError(f"{folder}: no .safetensors weights")


def read_state_dict(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state_dict = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing weight shard")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state_dict[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises several types for a damaged file
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return state_dict


def load_component(folder, device=None, dtype: torch.dtype | None = None, kind: str | None = None) -> nn.Module:
    """The Stage C, Stage B or Stage A module of one component folder (config.json + safetensors), in eval mode;
    with `kind`, refused unless it is that component ("prior", "decoder" or "vqgan")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such component folder")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    config_path = folder / "config.json"
    raw = read_json(config_path)
    found = component_kind(folder, raw)
    if kind is not None and found != kind:
        raise CheckpointError(f"{config_path}: a {found} config where a {kind} was expected")
    kind = found
    config = build_config(kind, raw, config_path)
    files = weight_files(folder, prefer_half=dtype != torch.float32)
    state_dict = read_state_dict(files, dtype)
    with torch.device("meta"):
        module = COMPONENTS[kind][2](config)
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        detail = str(e).replace("\n\t", "\n  ")
        raise CheckpointError(f"{folder}: weights do not match the {kind} config.json: {detail}") from None
    return module.to(device).eval().requires_grad_(False)


def one_variant(weights: list[str], prefer_half: bool | None) -> list[str]:
    """The weight files of one variant, the preferred one where there are both; prefer_half None: every variant."""
    if prefer_half is None:
        return weights
    half = [f for f in weights if is_half_variant(f)]
    full = [f for f in weights if not is_half_variant(f)]
    return (half or full) if prefer_half else (full or half)


def is_model_only_repo(repo_files: list[str]) -> bool:
    """A hub repository holding one model (config.json and its weights at the top), not a pipeline."""
    return "model_index.json" not in repo_files and "config.json" in repo_files


def hub_patterns(repo_files: list[str], kind: str, prefer_half: bool | None) -> list[str]:
    """The files of a hub repository (or any checkpoint's file list) that loading reads, one weight variant per
    component (prefer_half None: each variant, for a copy that serves every dtype). A model-only prior: its
    config.json and weights; `prior_text`: a prior pipeline's model_index.json, text encoder and tokenizer."""
    if kind == "prior" and is_model_only_repo(repo_files):
        top = [f for f in repo_files if "/" not in f]
        return ["config.json"] + one_variant([f for f in top if ".safetensors" in f], prefer_half)
    patterns = ["model_index.json"]
    for sub in PIPELINE_FOLDERS[kind]:
        names = [f for f in repo_files if f.startswith(f"{sub}/")]
        if sub == "tokenizer":
            patterns += names
            continue
        patterns += [f for f in names if f.endswith(".json") and ".safetensors" not in f]
        patterns += one_variant([f for f in names if ".safetensors" in f], prefer_half)
    return patterns


def looks_like_hub_id(name_or_path) -> bool:
    text = str(name_or_path)
    return not text.startswith((".", "/", "~")) and text.count("/") == 1 and not Path(text).exists()


def refuse_s3(name: str) -> None:
    """The engine reads folders and hub ids; an s3:// checkpoint reaches it through a node's cache (workers/)."""
    if name.startswith("s3://"):
        raise CheckpointError(f"{name}: the engine loads checkpoint folders and hub ids; name an s3:// checkpoint "
                              "in a job spec, or fetch it into a folder first with "
                              "wurstfabrik.workers.s3_checkpoint.fetch_s3_checkpoint")


def resolve_checkpoint(name_or_path: str, kind: str, prefer_half: bool = False, revision: str | None = None) -> Path:
    """A local checkpoint folder for a folder path or a hub id (downloading only the files we read). `revision`
    (a branch, tag or commit) applies to hub ids only."""
    refuse_s3(str(name_or_path))
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    if not looks_like_hub_id(name_or_path):
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder")
    return download(str(name_or_path), kind, prefer_half, revision)


def offline_hint(repo_id: str) -> str:
    return (f"To use a local copy, download it where the hub is reachable (`hf download {repo_id} "
            f"--local-dir DIR`) and pass the folder instead of the hub id, or mirror it to S3 once "
            f"(`wurstfabrik mirror {repo_id}@REVISION s3://BUCKET/PREFIX/`) and pass that prefix.")


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local Hugging Face cache's copy of a repository at a revision (default: main), if there is one."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and relatives), or an invalid id
        return None


def download(repo_id: str, kind: str, prefer_half: bool, revision: str | None = None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = "prior text encoder" if kind == "prior_text" else kind
    at = f" at revision {revision}" if revision else ""
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=hub_patterns(files, kind, prefer_half)))
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        raise CheckpointError(f"{repo_id}: no such {what} checkpoint{at} on the Hugging Face hub "
                              f"({type(e).__name__})") from None
    except OfflineModeIsEnabled:
        cached = cached_snapshot(repo_id, revision)  # a copy downloaded earlier still serves
        if cached is None:
            raise CheckpointError(f"{repo_id}: cannot download the {what} checkpoint{at}: offline mode is on "
                                  f"(HF_HUB_OFFLINE) and it is not in the local cache. {offline_hint(repo_id)}"
                                  ) from None
        return cached
    except Exception as e:  # connection errors of the hub's HTTP client have no common base class
        raise CheckpointError(f"{repo_id}: cannot reach the Hugging Face hub to download the {what} checkpoint "
                              f"({type(e).__name__}: {e}). {offline_hint(repo_id)}") from None


def folder_kind(folder: Path) -> str:
    """What a checkpoint folder holds: "prior" or "decoder" (pipelines, by their model_index.json), or
    "prior_model" (a model-only prior: a WuerstchenPrior config.json and weights, no model_index.json)."""
    index_path = folder / "model_index.json"
    if index_path.is_file():
        index = read_json(index_path)
        found = PIPELINE_CLASSES.get(index.get("_class_name"))
        if found is None and "_class_name" not in index:
            found = "prior" if (folder / "prior").is_dir() else "decoder" if (folder / "decoder").is_dir() else None
        if found is None:
            raise CheckpointError(f"{index_path}: _class_name {index.get('_class_name')!r} is not one of "
                                  f"{', '.join(PIPELINE_CLASSES)}")
        return found
    if (folder / "config.json").is_file():
        found = component_kind(folder, read_json(folder / "config.json"))
        if found == "prior":
            return "prior_model"
        raise CheckpointError(f"{folder}: a {found} component folder (config.json), not a checkpoint; give the "
                              f"pipeline folder that holds it (with model_index.json)")
    raise CheckpointError(f"{index_path}: missing, and no config.json of a model-only prior either: not a "
                          f"Würstchen checkpoint folder")


def check_folder_kind(folder: Path, kind: str) -> str:
    """folder_kind, refused with a message naming both when it is not what `kind` ("prior", "decoder" or
    "prior_text") takes: a prior takes a prior pipeline or a model-only prior, the others a pipeline."""
    found = folder_kind(folder)
    accepted = {"prior": ("prior", "prior_model"), "decoder": ("decoder",), "prior_text": ("prior",)}[kind]
    if found not in accepted:
        names = {"prior": "a prior checkpoint", "decoder": "a decoder checkpoint",
                 "prior_model": "a model-only prior (no text encoder)"}
        wanted = {"prior": "a prior", "decoder": "a decoder", "prior_text": "a prior pipeline (with text encoder)"}
        raise CheckpointError(f"{folder}: {names[found]} where {wanted[kind]} was expected")
    return found


def pipeline_folder(checkpoint: Path, kind: str) -> dict:
    """Check a checkpoint folder's layout and return its model_index.json."""
    index = read_json(checkpoint / "model_index.json")
    for sub in PIPELINE_FOLDERS[kind]:
        if not (checkpoint / sub).is_dir():
            raise CheckpointError(f"{checkpoint}: missing the {sub}/ folder of a {kind} checkpoint")
    return index
