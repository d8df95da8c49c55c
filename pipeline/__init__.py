"""Würstchen v2 in plain PyTorch: Stage C (prior), Stage B (decoder) and Stage A (VQGAN)."""

from .checkpoint import DEFAULT_PRIOR_TEXT, load_component, resolve_checkpoint
from .checkpoint_info import CheckpointInfo, inspect_checkpoint
from .errors import CheckpointError
from .fp8 import QUANTIZE_MODES
from .geometry import Geometry
from .noise import decoder_seed
from .offload import OFFLOAD_MODES
from .pipeline import DecoderPipeline, Generation, PriorPipeline, PriorResult, WuerstchenPipeline
from .prompt_syntax import SYNTAXES, PromptSyntaxError, check_prompt_syntax
from .text import LONG_PROMPTS

__all__ = [
    "DEFAULT_PRIOR_TEXT",
    "LONG_PROMPTS",
    "OFFLOAD_MODES",
    "QUANTIZE_MODES",
    "SYNTAXES",
    "CheckpointError",
    "CheckpointInfo",
    "DecoderPipeline",
    "Generation",
    "Geometry",
    "PriorPipeline",
    "PriorResult",
    "PromptSyntaxError",
    "WuerstchenPipeline",
    "check_prompt_syntax",
    "decoder_seed",
    "inspect_checkpoint",
    "load_component",
    "resolve_checkpoint",
]
