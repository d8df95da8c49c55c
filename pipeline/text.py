"""CLIP text conditioning: a tokenizer and text encoder from transformers, loaded from safetensors."""

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import HALF_VARIANT, is_half_variant, weight_files
from .errors import CheckpointError


@dataclass
class TextEmbeddings:
    hidden_states: torch.Tensor  # [N, max_length, width], one row per text
    truncated: list[bool]  # whether a text was longer than the tokenizer's limit and was cut


class TextEncoder:
    """Last hidden states of a CLIP text model, as Würstchen's stages are conditioned on."""

    def __init__(self, tokenizer, model):
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def from_folders(cls, tokenizer_dir: Path, encoder_dir: Path, device: torch.device,
                     dtype: torch.dtype) -> "TextEncoder":
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        # Refuses pickle-only folders before transformers sees them, and finds the variant to ask for: a hub
        # download for a half-precision dtype holds only the fp16 weights where the repository has them.
        files = weight_files(encoder_dir, prefer_half=dtype != torch.float32)
        variant = HALF_VARIANT if is_half_variant(files[0].name) else None
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as e:
            raise CheckpointError(f"{tokenizer_dir}: cannot load the CLIP tokenizer ({e})") from None
        hf_logging.disable_progress_bar()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a CLIPTextModelWithProjection checkpoint's unused projection is expected
        try:
            model = CLIPTextModel.from_pretrained(str(encoder_dir), use_safetensors=True, dtype=dtype, variant=variant)
        except Exception as e:
            raise CheckpointError(f"{encoder_dir}: cannot load the CLIP text encoder ({e})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(tokenizer, model.to(device).eval().requires_grad_(False))

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    def truncated(self, texts: list[str]) -> list[bool]:
        """Whether each text is longer than the tokenizer's limit (and so is cut when encoded)."""
        limit = self.max_length
        ids = self.tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"]
        return [len(row) > limit for row in ids]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbeddings:
        """Embeds each distinct text once; texts longer than the tokenizer's limit are truncated."""
        unique = list(dict.fromkeys(texts))
        tokens = self.tokenizer(unique, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        device = self.model.device
        hidden = self.model(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        hidden = hidden.last_hidden_state
        row = {text: i for i, text in enumerate(unique)}
        index = torch.tensor([row[t] for t in texts], device=device)
        truncated = dict(zip(unique, self.truncated(unique), strict=True))
        return TextEmbeddings(hidden.index_select(0, index), [truncated[t] for t in texts])
