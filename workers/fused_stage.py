"""The fused stage: a Ray Data actor that holds both halves of the pipeline on one device and runs each batch
through the prior and then the decoder, so that one process, not two time-slicing it, drives a GPU."""

import numpy as np

from .decoder_stage import DecoderStage
from .prior_stage import PriorStage


class FusedStage:
    """The prior stage's columns, then the decoder stage's: a batch comes out as it would from the two pools. The
    decoder takes it in slices of decoder_batch_size, as its own pool would."""

    def __init__(self, spec, models, labels=None):
        self.prior = PriorStage(spec, models, labels)
        self.decoder = DecoderStage(spec, models, labels)
        self.decoder_batch_size = spec.placement.decoder_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.prior(batch)
        n, size = len(batch["prompt_id"]), self.decoder_batch_size
        if n <= size:
            return self.decoder(batch)
        parts = [self.decoder({name: values[i:i + size] for name, values in batch.items()})
                 for i in range(0, n, size)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
