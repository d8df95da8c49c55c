"""What the stage actors load, pinned by the driver: each checkpoint at the hub revision it resolved, the image
geometry of the checkpoints, and whether to compile (and where compiled kernels are kept)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wurstfabrik.pipeline import DecoderPipeline, PriorPipeline
from wurstfabrik.pipeline.geometry import Geometry

from .compile_cache import StageCompileCache


@dataclass(frozen=True)
class StageModels:
    geometry: Geometry
    prior_revision: str | None = None
    prior_text_revision: str | None = None
    decoder_revision: str | None = None
    storage: object = None  # S3Settings for an s3:// compile cache

    @classmethod
    def from_job(cls, params: dict, geometry: Geometry, storage=None) -> StageModels:
        prior, decoder = params["prior_checkpoint"], params["decoder_checkpoint"]
        return cls(geometry, prior.get("revision"), (prior.get("text") or {}).get("revision"),
                   decoder.get("revision"), storage)

    def load_prior(self, spec) -> tuple[PriorPipeline, StageCompileCache]:
        compile_it = _compile(spec)
        cache = StageCompileCache(spec.compile_cache if compile_it else None, "prior", self.storage)
        pipe = PriorPipeline.from_pretrained(spec.prior, dtype=spec.dtype, compile=compile_it,
                                             prior_text=spec.prior_text, revision=self.prior_revision,
                                             prior_text_revision=self.prior_text_revision, offload=spec.offload,
                                             quantize=spec.quantize)
        pipe.geometry = self.geometry  # the decoder's: the prior makes latents of a size the decoder can decode
        return pipe, cache

    def load_decoder(self, spec) -> tuple[DecoderPipeline, StageCompileCache]:
        compile_it = _compile(spec)
        cache = StageCompileCache(spec.compile_cache if compile_it else None, "decoder", self.storage)
        pipe = DecoderPipeline.from_pretrained(spec.decoder, dtype=spec.dtype, compile=compile_it,
                                               revision=self.decoder_revision, offload=spec.offload,
                                               quantize=spec.quantize)
        return pipe, cache


def _compile(spec) -> bool:
    """The spec's choice, or (auto) compiled on a CUDA device unless offloaded, which compiling would defeat."""
    if spec.compile is not None:
        return spec.compile
    return torch.cuda.is_available() and spec.offload == "none"
