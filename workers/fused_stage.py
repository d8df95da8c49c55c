"""The fused stage: a Ray Data actor that holds both halves of the pipeline on one device and runs each batch
through the prior and then the decoder, so that one process, not two time-slicing it, drives a GPU."""

import numpy as np

from .decoder_stage import DecoderStage
from .prior_stage import PriorStage


class FusedStage:
    """The prior stage's columns, then the decoder stage's: a block comes out as it would from the two pools, each
    stage running it in model batches of its own placement size."""

    def __init__(self, spec, models, labels=None):
        self.prior = PriorStage(spec, models, labels)
        self.decoder = DecoderStage(spec, models, labels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decoder(self.prior(batch))
