"""A simulated GPU engine for bench/fleet.py: what the prior and decoder actors load through run_job's
`stage_models` seam instead of the job's checkpoints. Each call sleeps for the time the batch would take on a GPU
(no CPU while it waits) and returns correctly shaped outputs: float32 Stage C latents, then uint8 RGB images of the
requested size. It imports neither torch nor the pipeline, so 64 simulated actors fit on a small machine.

Per-image times default to one H200's, compiled, at batch 8 and 1024² (docs/benchmarks.md, 2026-11-28): Stage C
29 steps × 42.1 ms + text encoders 34 ms = 1.255 s per batch of 8; Stage B 12 × 85.9 ms + Stage A 164.9 ms =
1.196 s per batch of 8. At batch 16 the same table gives 2.41 s and 2.34 s: time per image is flat in the batch
size, so a batch of n sleeps n times the per-image figure, divided by the speed-up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

H200_PRIOR_S_PER_IMAGE = (29 * 0.0421 + 0.034) / 8
H200_DECODER_S_PER_IMAGE = (12 * 0.0859 + 0.1649) / 8
LATENT_CHANNELS = 16
PIXELS_PER_LATENT = 1024 / 24  # Würstchen v2's Stage C compression: 24×24 latents for 1024² images


@dataclass(frozen=True)
class SimulatedModels:
    """run_job's stage_models: each actor loads a simulated pipeline that sleeps `speedup` times less than the
    H200 took for its batch."""

    speedup: float = 1.0
    prior_s_per_image: float = H200_PRIOR_S_PER_IMAGE
    decoder_s_per_image: float = H200_DECODER_S_PER_IMAGE

    def load_prior(self, spec):
        return SimulatedPrior(self.prior_s_per_image / self.speedup), NoCompileCache()

    def load_decoder(self, spec):
        return SimulatedDecoder(self.decoder_s_per_image / self.speedup), NoCompileCache()

    def images_per_s(self, prior_actors: int, decoder_actors: int) -> float:
        """The rate the simulated GPUs give when nothing else holds them back: the slower pool's."""
        return min(prior_actors * self.speedup / self.prior_s_per_image,
                   decoder_actors * self.speedup / self.decoder_s_per_image)


class NoCompileCache:
    def after_first_batch(self) -> None:
        pass


@dataclass
class SimulatedPriorResult:
    latents: np.ndarray
    truncated: list[bool]


class SimulatedGeometry:
    def image_size(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        return round(latent_height * PIXELS_PER_LATENT), round(latent_width * PIXELS_PER_LATENT)


class SimulatedPrior:
    def __init__(self, s_per_image: float):
        self.s_per_image = s_per_image
        self.geometry = SimulatedGeometry()

    def __call__(self, prompts, seeds, negative_prompts, height, width, **settings) -> SimulatedPriorResult:
        time.sleep(self.s_per_image * len(prompts))
        shape = (len(prompts), LATENT_CHANNELS, math.ceil(height / PIXELS_PER_LATENT),
                 math.ceil(width / PIXELS_PER_LATENT))
        return SimulatedPriorResult(np.zeros(shape, np.float32), [False] * len(prompts))


class SimulatedDecoder:
    def __init__(self, s_per_image: float):
        self.s_per_image = s_per_image
        self.geometry = SimulatedGeometry()
        self._bases: dict[tuple[int, int], np.ndarray] = {}

    def decode(self, latents, prompts, seeds, negative_prompts=None, size=None, **settings) -> list[np.ndarray]:
        time.sleep(self.s_per_image * len(prompts))
        height, width = size or self.geometry.image_size(*latents.shape[-2:])
        images = []
        for seed in seeds:
            image = self._base(height, width).copy()
            image[0, :8, 0] = np.frombuffer(int(seed).to_bytes(8, "little"), np.uint8)  # each image its own bytes
            images.append(image)
        return images

    def _base(self, height: int, width: int) -> np.ndarray:
        """A smooth gradient with some noise: encodes about as a generated image does (not as flat colour or
        pure noise)."""
        if (height, width) not in self._bases:
            y, x = np.mgrid[0:height, 0:width]
            noise = np.random.default_rng(0).integers(0, 24, (height, width, 3))
            image = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                              (x + y) * 255 // max(1, height + width - 2)], axis=2) + noise
            self._bases[(height, width)] = np.clip(image, 0, 255).astype(np.uint8)
        return self._bases[(height, width)]
