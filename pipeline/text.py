"""CLIP text conditioning: transformers' tokenizer and our CLIP text model (pipeline.clip_text), from safetensors."""

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import weight_files
from .clip_text import load_clip_text
from .errors import CheckpointError
from .prompt_embeddings import WeightedPromptEncoder
from .prompt_syntax import check_syntax_name, parse_prompt

LONG_PROMPTS = ("truncate", "chunk")


@dataclass
class TextEmbeddings:
    hidden_states: torch.Tensor  # [N, max_length, width], one row per text
    truncated: list[bool]  # whether a text was longer than the tokenizer's limit and was cut


@dataclass
class PromptEmbeddings:
    hidden_states: list[torch.Tensor]  # per text [77·k, width]: k windows (long prompts, Compel's .and())
    truncated: list[bool]  # whether a text was cut to its first 77-token window
    padding: torch.Tensor | None  # [77, width] what lengthens an embedding where two of different lengths meet


def check_long_prompts(value) -> str:
    if value not in LONG_PROMPTS:
        raise ValueError(f"long_prompts must be one of {', '.join(LONG_PROMPTS)}, got {value!r}")
    return value


class TextEncoder:
    """Last hidden states of a CLIP text model, as Würstchen's stages are conditioned on."""

    def __init__(self, tokenizer, model, device=None):
        self.tokenizer = tokenizer
        self.model = model
        self.device = torch.device(device) if device is not None else model.device  # where the model runs

    @classmethod
    def from_folders(cls, tokenizer_dir: Path, encoder_dir: Path, device: torch.device,
                     dtype: torch.dtype, keep_on_cpu: bool = False) -> "TextEncoder":
        """`keep_on_cpu` leaves the model's weights on the CPU, for an offloader to move while it runs."""
        from transformers import CLIPTokenizer

        # Refuses pickle-only folders, and finds the variant to read: a hub download for a half-precision dtype
        # holds only the fp16 weights where the repository has them.
        files = weight_files(encoder_dir, prefer_half=dtype != torch.float32)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as e:
            raise CheckpointError(f"{tokenizer_dir}: cannot load the CLIP tokenizer ({e})") from None
        model = load_clip_text(encoder_dir, files, dtype)
        return cls(tokenizer, model.to("cpu" if keep_on_cpu else device), device)

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
        device = self.device
        hidden = self.model(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        hidden = hidden.last_hidden_state
        row = {text: i for i, text in enumerate(unique)}
        index = torch.tensor([row[t] for t in texts], device=device)
        truncated = dict(zip(unique, self.truncated(unique), strict=True))
        return TextEmbeddings(hidden.index_select(0, index), [truncated[t] for t in texts])

    def encode_prompts(self, texts: list[str], syntax: str = "plain",
                       long_prompts: str = "truncate") -> PromptEmbeddings:
        """Embeds each distinct text once, read in a prompt syntax (pipeline.prompt_syntax) and with long texts
        cut or encoded window by window (pipeline.prompt_embeddings); plain and truncate as `encode`."""
        check_syntax_name(syntax)
        check_long_prompts(long_prompts)
        if syntax == "plain" and long_prompts == "truncate":
            plain = self.encode(texts)
            return PromptEmbeddings(list(plain.hidden_states.unbind(0)), plain.truncated, None)
        unique = list(dict.fromkeys(texts))
        parsed = [parse_prompt(text, syntax) for text in unique]
        encoder = WeightedPromptEncoder(self.tokenizer, self.model, self.device, chunk=long_prompts == "chunk")
        hidden, truncated, padding = encoder.encode(parsed)
        row = {text: i for i, text in enumerate(unique)}
        return PromptEmbeddings([hidden[row[t]] for t in texts], [truncated[row[t]] for t in texts], padding)
