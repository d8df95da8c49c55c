"""Sizes through the stages: pixels → Stage C latent → Stage B latent → decoded pixels."""

import math
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_config, read_json


@dataclass(frozen=True)
class Geometry:
    resolution_multiple: float = 42.67  # pixels per Stage C latent pixel (prior model_index.json)
    latent_dim_scale: float = 10.67  # Stage B latent pixels per Stage C latent pixel (decoder model_index.json)
    decoder_unit: int = 16  # Stage B's patch size × 2^(levels-1): each latent side must be a multiple
    vqgan_upscale: int = 4  # Stage A pixels per Stage B latent pixel

    @classmethod
    def from_checkpoints(cls, prior: Path | None, decoder: Path | None) -> "Geometry":
        """Read from local checkpoint folders' configs; the published values for what is not local."""
        values = {}
        if prior is not None:
            index = read_json(prior / "model_index.json")
            values["resolution_multiple"] = float(index.get("resolution_multiple", cls.resolution_multiple))
        if decoder is not None:
            index = read_json(decoder / "model_index.json")
            values["latent_dim_scale"] = float(index.get("latent_dim_scale", cls.latent_dim_scale))
            values["decoder_unit"] = read_config(decoder / "decoder", "decoder").downscale
            values["vqgan_upscale"] = read_config(decoder / "vqgan", "vqgan").upscale
        return cls(**values)

    def prior_latent(self, height: int, width: int) -> tuple[int, int]:
        return math.ceil(height / self.resolution_multiple), math.ceil(width / self.resolution_multiple)

    def decoder_latent(self, prior_height: int, prior_width: int) -> tuple[int, int]:
        return int(prior_height * self.latent_dim_scale), int(prior_width * self.latent_dim_scale)

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """The pixel size of the image generated for a requested size (the stages round it)."""
        h, w = self.decoder_latent(*self.prior_latent(height, width))
        return h * self.vqgan_upscale, w * self.vqgan_upscale

    def check_prior_latent(self, prior_height: int, prior_width: int, what: str = "height/width") -> None:
        """Stage B halves its latent per level and joins skips by shape, so each side must divide evenly."""
        h, w = self.decoder_latent(prior_height, prior_width)
        unit = self.decoder_unit
        if h < unit or w < unit or h % unit or w % unit:
            raise ValueError(
                f"{what}: Stage B's latent would be {h}×{w}, which the decoder cannot process; "
                f"each side must be a positive multiple of {unit}"
            )

    def check_size(self, height: int, width: int) -> None:
        self.check_prior_latent(*self.prior_latent(height, width), what=f"height/width {height}×{width}")
