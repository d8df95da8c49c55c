"""Sizes through the stages: pixels → Stage C latent → Stage B latent → decoded pixels, and which requested sizes
are generated at which size the stages can make.

Stage B halves its latent per level and joins skips by shape, so each side of its latent must be a multiple of 16
(the published decoder's patch size × 2³). With the published ratios (42.67 pixels per Stage C latent pixel, 10.67
Stage B per Stage C, 4 pixels per Stage B latent pixel) the sides the stages make are the multiples of 128 px from
128 to 12,672 px, and then none up to 68,288 px (10.67 is not exactly 32/3: from 300 Stage C latent pixels on,
int(10.67·p) drifts off the multiples of 16 for a long while). Any other requested side is generated at a side
they make that covers it, and the image is then brought to exactly the requested size:

- crop (the default): each side is generated at the smallest side the stages make that is at least the requested
  one, the smallest image that covers the request, and the image is cut around its center: 1920×1080 (width ×
  height) is made at 1920×1152 and loses 36 rows at the top and at the bottom;
- resize: each side at that smallest side or the next one up, the pair whose aspect ratio is closest to the
  request's among those with at most 1.5 times the pixels of the smallest (then the one with fewer pixels); the
  image is scaled, keeping its aspect ratio, to the smallest size that covers the request, and what is left over
  (a few pixels, where the aspect ratios still differ) is cut around the center: 1920×1080 is made at 2048×1152,
  exactly 16:9, and scaled by 0.9375.

A size the stages make directly is generated as it is, in both modes. So every side from 1 to 12,672 px can be
delivered, and only larger sides are refused (the pipeline's input checks also refuse sides above 16,384).
"""

import math
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_config, read_json

SEARCH_STEPS = 256  # Stage C latent sides tried above the first candidate before a side counts as unmakeable
RESIZE_MAX_AREA = 1.5  # resize mode: the most pixels, relative to the smallest covering size, spent on a better aspect


@dataclass(frozen=True)
class Geometry:
    resolution_multiple: float = 42.67  # pixels per Stage C latent pixel (prior model_index.json)
    latent_dim_scale: float = 10.67  # Stage B latent pixels per Stage C latent pixel (decoder model_index.json)
    decoder_unit: int = 16  # Stage B's patch size × 2^(levels-1): each latent side must be a multiple
    vqgan_upscale: int = 4  # Stage A pixels per Stage B latent pixel

    @classmethod
    def from_checkpoints(cls, prior: Path | None, decoder: Path | None) -> "Geometry":
        """Read from local checkpoint folders' configs; the published values for what is not local. A model-only
        prior has no model_index.json: its resolution multiple is its text companion's, the published one."""
        values = {}
        if prior is not None and (prior / "model_index.json").is_file():
            index = read_json(prior / "model_index.json")
            values["resolution_multiple"] = float(index.get("resolution_multiple", cls.resolution_multiple))
        if decoder is not None:
            index = read_json(decoder / "model_index.json")
            values["latent_dim_scale"] = float(index.get("latent_dim_scale", cls.latent_dim_scale))
            values["decoder_unit"] = read_config(decoder / "decoder", "decoder").downscale
            values["vqgan_upscale"] = read_config(decoder / "vqgan", "vqgan").upscale
        return cls(**values)

    def decoder_latent(self, prior_height: int, prior_width: int) -> tuple[int, int]:
        return int(prior_height * self.latent_dim_scale), int(prior_width * self.latent_dim_scale)

    def decodable(self, prior_side: int) -> bool:
        """Whether Stage B can decode a Stage C latent side of this length."""
        side = int(prior_side * self.latent_dim_scale)
        return side >= self.decoder_unit and side % self.decoder_unit == 0

    def pixels(self, prior_side: int) -> int:
        """The image side generated from a Stage C latent side."""
        return int(prior_side * self.latent_dim_scale) * self.vqgan_upscale

    def covering_latent_sides(self, side: int, count: int = 1) -> list[int]:
        """Up to `count` decodable Stage C latent sides, the smallest whose images are at least `side` pixels."""
        start = max(1, math.floor(side / (self.latent_dim_scale * self.vqgan_upscale)) - 1)
        found = [p for p in range(start, start + SEARCH_STEPS) if self.decodable(p) and self.pixels(p) >= side]
        if not found:
            raise ValueError(f"{side} px is larger than any image side the stages can make (Stage B's latent "
                             f"sides must be multiples of {self.decoder_unit})")
        return found[:count]

    def prior_latent(self, height: int, width: int, resize: bool = False) -> tuple[int, int]:
        """The Stage C latent size generated for a requested image size (see the module's docstring)."""
        smallest = self.covering_latent_sides(height)[0], self.covering_latent_sides(width)[0]
        if not resize:
            return smallest
        aspect = math.log(height / width)
        max_area = RESIZE_MAX_AREA * self.pixels(smallest[0]) * self.pixels(smallest[1])
        pairs = [(h, w) for h in self.covering_latent_sides(height, 2) for w in self.covering_latent_sides(width, 2)
                 if self.pixels(h) * self.pixels(w) <= max_area]
        return min(pairs, key=lambda hw: (round(abs(math.log(self.pixels(hw[0]) / self.pixels(hw[1])) - aspect), 9),
                                          self.pixels(hw[0]) * self.pixels(hw[1])))

    def generated_size(self, height: int, width: int, resize: bool = False) -> tuple[int, int]:
        """The pixel size generated for a requested size, before it is cropped or resized to the request."""
        prior_height, prior_width = self.prior_latent(height, width, resize)
        return self.pixels(prior_height), self.pixels(prior_width)

    def image_size(self, prior_height: int, prior_width: int) -> tuple[int, int]:
        """The pixel size decoded from a Stage C latent size."""
        return self.pixels(prior_height), self.pixels(prior_width)

    def check_prior_latent(self, prior_height: int, prior_width: int, what: str = "height/width") -> None:
        """Stage B halves its latent per level and joins skips by shape, so each side must divide evenly."""
        if not (self.decodable(prior_height) and self.decodable(prior_width)):
            h, w = self.decoder_latent(prior_height, prior_width)
            raise ValueError(
                f"{what}: Stage B's latent would be {h}×{w}, which the decoder cannot process; "
                f"each side must be a positive multiple of {self.decoder_unit}"
            )

    def check_size(self, height: int, width: int) -> None:
        """Refuses only a size that cannot be delivered: one no decodable size covers (never, with the published
        checkpoints; the side limits are the pipeline's input checks)."""
        for side in (height, width):
            try:
                self.covering_latent_sides(side)
            except ValueError as e:
                raise ValueError(f"height/width {height}×{width}: {e}") from None
