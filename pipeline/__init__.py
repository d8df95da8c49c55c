"""Würstchen v2 in plain PyTorch: Stage C (prior), Stage B (decoder) and Stage A (VQGAN)."""

from .checkpoint import load_component, resolve_checkpoint
from .errors import CheckpointError
from .noise import decoder_seed
from .pipeline import DecoderPipeline, Generation, PriorPipeline, PriorResult, WuerstchenPipeline

__all__ = [
    "CheckpointError",
    "DecoderPipeline",
    "Generation",
    "PriorPipeline",
    "PriorResult",
    "WuerstchenPipeline",
    "decoder_seed",
    "load_component",
    "resolve_checkpoint",
]
