"""CLIP's text transformer, the forward pass of transformers' CLIPTextModel up to its last hidden states, built from
a checkpoint's text_encoder folder (config.json and safetensors). Ours rather than transformers' class: importing
that one pulls in torch.distributed and dynamo, seconds of CPU in every stage actor before its first batch."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import unset_embedding
from .checkpoint import read_json, read_state_dict
from .errors import CheckpointError

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI's CLIP
    "gelu": F.gelu,  # OpenCLIP's bigG (Würstchen's prior)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# Weights of a CLIPTextModelWithProjection checkpoint that the last hidden states do not use.
UNUSED_WEIGHTS = {"text_projection.weight"}
# transformers before 5 saved the text model's weights under this prefix; 5 saves them without it.
WEIGHT_PREFIX = "text_model."


@dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> "ClipTextConfig":
        raw = read_json(path)
        raw = raw.get("text_config", raw)  # a whole CLIPModel's config nests the text half
        missing = [name for name in cls.__dataclass_fields__ if name not in raw]
        if missing:
            raise CheckpointError(f"{path}: not a CLIP text config (missing {', '.join(missing)})")
        config = cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        if config.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"{path}: hidden_act {config.hidden_act!r} is not supported "
                                  f"(supported: {', '.join(ACTIVATIONS)})")
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(f"{path}: hidden_size {config.hidden_size} is not a multiple of "
                                  f"num_attention_heads {config.num_attention_heads}")
        return config


@dataclass
class TextModelOutput:
    last_hidden_state: torch.Tensor  # [N, tokens, hidden_size]


class Embeddings(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.token_embedding = unset_embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = unset_embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class Attention(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, tokens, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, tokens, self.heads, width // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, tokens, width))


class MLP(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class ClipTextModel(nn.Module):
    """Token ids (and the tokenizer's attention mask) to CLIP's last hidden states, after the final layer norm.
    Module names follow the checkpoint's keys, so its safetensors load as they are."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextModelOutput:
        tokens = input_ids.shape[1]
        # Causal, and a padding token is never attended to (it still attends, as in CLIP, and is returned).
        mask = torch.ones(tokens, tokens, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return TextModelOutput(self.final_layer_norm(x))


def load_clip_text(folder: Path, files: list[Path], dtype: torch.dtype) -> ClipTextModel:
    """The text model of a text_encoder folder from its safetensors `files`, in eval mode on the CPU."""
    config = ClipTextConfig.from_json(folder / "config.json")
    weights = read_state_dict(files, dtype)
    state = {k.removeprefix(WEIGHT_PREFIX): v for k, v in weights.items() if k not in UNUSED_WEIGHTS}
    state.pop("embeddings.position_ids", None)  # a buffer older transformers saved; positions are 0..n-1
    with torch.device("meta"):
        model = ClipTextModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        problems = [f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{folder}: weights do not match the CLIP text config.json ({'; '.join(problems)})")
    return model.eval().requires_grad_(False)
