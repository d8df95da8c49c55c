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
}
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


def load_component(folder, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """The Stage C, Stage B or Stage A module of one component folder (config.json + safetensors), in eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such component folder")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    config_path = folder / "config.json"
    raw = read_json(config_path)
    kind = component_kind(folder, raw)
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


def hub_patterns(repo_files: list[str], kind: str, prefer_half: bool) -> list[str]:
    """The files of a hub repository that loading reads, one weight variant per component."""
    patterns = ["model_index.json"]
    for sub in PIPELINE_FOLDERS[kind]:
        names = [f for f in repo_files if f.startswith(f"{sub}/")]
        if sub == "tokenizer":
            patterns += names
            continue
        patterns += [f for f in names if f.endswith(".json") and ".safetensors" not in f]
        weights = [f for f in names if ".safetensors" in f]
        half = [f for f in weights if is_half_variant(f)]
        full = [f for f in weights if not is_half_variant(f)]
        patterns += (half or full) if prefer_half else (full or half)
    return patterns


def resolve_checkpoint(name_or_path: str, kind: str, prefer_half: bool = False) -> Path:
    """A local checkpoint folder for a folder path or a hub id (downloading only the files we read)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    looks_local = str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1
    if looks_local or path.exists():
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder")
    return download(str(name_or_path), kind, prefer_half)


def download(repo_id: str, kind: str, prefer_half: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError

    hint = (f"To use a local copy, download it where the hub is reachable (`hf download {repo_id} "
            f"--local-dir DIR`) and pass the folder instead of the hub id.")
    try:
        files = HfApi().list_repo_files(repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=hub_patterns(files, kind, prefer_half)))
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise CheckpointError(f"{repo_id}: no such {kind} checkpoint on the Hugging Face hub "
                              f"({type(e).__name__})") from None
    except OfflineModeIsEnabled:
        try:  # a copy downloaded earlier still serves
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:
            raise CheckpointError(f"{repo_id}: cannot download the {kind} checkpoint: offline mode is on "
                                  f"(HF_HUB_OFFLINE) and it is not in the local cache. {hint}") from None
    except Exception as e:  # connection errors of the hub's HTTP client have no common base class
        raise CheckpointError(f"{repo_id}: cannot reach the Hugging Face hub to download the {kind} checkpoint "
                              f"({type(e).__name__}: {e}). {hint}") from None


def pipeline_folder(checkpoint: Path, kind: str) -> dict:
    """Check a checkpoint folder's layout and return its model_index.json."""
    index = read_json(checkpoint / "model_index.json")
    for sub in PIPELINE_FOLDERS[kind]:
        if not (checkpoint / sub).is_dir():
            raise CheckpointError(f"{checkpoint}: missing the {sub}/ folder of a {kind} checkpoint")
    return index
