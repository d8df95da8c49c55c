"""What the stage actors load, pinned by the driver: each checkpoint at the hub revision it resolved (or, for an
s3:// checkpoint, the files and sha256s it inspected, fetched into the node's cache), the image geometry of the
checkpoints, and whether to compile (and where compiled kernels are kept)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wurstfabrik.pipeline import DecoderPipeline, PriorPipeline
from wurstfabrik.pipeline.checkpoint import default_device, default_dtype
from wurstfabrik.pipeline.geometry import Geometry
from wurstfabrik.store.checkpoint_index import IndexedFile

from .compile_cache import StageCompileCache
from .s3_checkpoint import fetch_s3_checkpoint, naming_objects


@dataclass(frozen=True)
class StageModels:
    geometry: Geometry
    prior_revision: str | None = None
    prior_text_revision: str | None = None
    decoder_revision: str | None = None
    storage: object = None  # S3Settings for an s3:// compile cache or checkpoint
    # For each s3:// checkpoint ("prior", "prior_text", "decoder"): its files as the driver found them.
    pinned: dict[str, dict[str, IndexedFile]] = field(default_factory=dict)

    @classmethod
    def from_job(cls, params: dict, geometry: Geometry, storage=None) -> StageModels:
        prior, decoder = params["prior_checkpoint"], params["decoder_checkpoint"]
        text = prior.get("text") or {}
        pinned = {kind: {path: IndexedFile(f["bytes"], f["sha256"]) for path, f in identity["files"].items()}
                  for kind, identity in (("prior", prior), ("prior_text", text), ("decoder", decoder))
                  if identity.get("source") == "s3"}
        return cls(geometry, prior.get("revision"), text.get("revision"), decoder.get("revision"), storage, pinned)

    def load_prior(self, spec) -> tuple[PriorPipeline, StageCompileCache]:
        compile_it = _compile(spec)
        cache = StageCompileCache(spec.compile_cache if compile_it else None, "prior", self.storage)
        prior, prior_text = self._local(spec, spec.prior, "prior"), self._local(spec, spec.prior_text, "prior_text")
        with naming_objects({prior: spec.prior, prior_text: spec.prior_text}):
            # An s3:// checkpoint's revision is its files' sha256s: a hub revision applies to hub ids only.
            pipe = PriorPipeline.from_pretrained(prior, dtype=spec.dtype, compile=compile_it, prior_text=prior_text,
                                                 revision=self.prior_revision if prior == spec.prior else None,
                                                 prior_text_revision=self.prior_text_revision
                                                 if prior_text == spec.prior_text else None,
                                                 offload=spec.offload, quantize=spec.quantize)
        pipe.geometry = self.geometry  # the decoder's: the prior makes latents of a size the decoder can decode
        return pipe, cache

    def load_decoder(self, spec) -> tuple[DecoderPipeline, StageCompileCache]:
        compile_it = _compile(spec)
        cache = StageCompileCache(spec.compile_cache if compile_it else None, "decoder", self.storage)
        decoder = self._local(spec, spec.decoder, "decoder")
        with naming_objects({decoder: spec.decoder}):
            pipe = DecoderPipeline.from_pretrained(decoder, dtype=spec.dtype, compile=compile_it,
                                                   revision=self.decoder_revision if decoder == spec.decoder else None,
                                                   offload=spec.offload, quantize=spec.quantize)
        return pipe, cache

    def _local(self, spec, name: str, kind: str) -> str:
        """The checkpoint as the pipeline takes it: an s3:// one fetched into this node's cache (the first actor on
        the node fetches, the others wait for it), anything else as it is."""
        if kind not in self.pinned:
            return name
        folder = fetch_s3_checkpoint(name, kind, _prefers_half(spec), self.storage, spec.checkpoint_cache,
                                     self.pinned[kind])
        return str(folder)


def _prefers_half(spec) -> bool:
    """Whether the stage runs in a half dtype, for which the fp16 weights are fetched where there are both."""
    dtype = getattr(torch, spec.dtype) if spec.dtype else default_dtype(default_device())
    return dtype != torch.float32


def _compile(spec) -> bool:
    """The spec's choice, or (auto) compiled on a CUDA device unless offloaded, which compiling would defeat."""
    if spec.compile is not None:
        return spec.compile
    return torch.cuda.is_available() and spec.offload == "none"
