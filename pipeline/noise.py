"""Per-image noise: every image draws from its own CPU generator, so it never depends on its batch."""

import hashlib

import torch

MAX_SEED = 2**63  # seeds are stored as int64 in manifests


def decoder_seed(seed: int) -> int:
    """The seed of an image's Stage B noise: the first 63 bits of sha256("wurstfabrik-decoder:<seed>")."""
    digest = hashlib.sha256(f"wurstfabrik-decoder:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class ImageNoise:
    """Draws noise for a batch, one row per image, each row from that image's generator in turn."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.shape = shape
        self.device = device

    def __call__(self) -> torch.Tensor:
        rows = [torch.randn((1, *self.shape), generator=g) for g in self.generators]
        return torch.cat(rows).to(self.device)
