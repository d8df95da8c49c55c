"""Per-image noise: every image draws from its own CPU generator, so it never depends on its batch."""

import hashlib

import torch

MAX_SEED = 2**63  # seeds are stored as int64 in manifests


def decoder_seed(seed: int) -> int:
    """The seed of an image's Stage B noise: the first 63 bits of sha256("wurstfabrik-decoder:<seed>")."""
    digest = hashlib.sha256(f"wurstfabrik-decoder:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class ImageNoise:
    """The noise of a whole sampling run for a batch, one row per image, each from that image's generator."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...]):
        self.seeds = list(seeds)
        self.shape = tuple(shape)

    def draw(self, steps: int, device: torch.device) -> torch.Tensor:
        """[steps + 1, N, *shape]: the initial noise, then one draw per sampler step.

        Each image's generator draws them in that order, one step's sample at a time, as the reference
        scheduler does (a draw of steps + 1 samples at once would consume the stream differently). Drawn on
        the CPU before sampling, so the loop never waits on the host; on CUDA into pinned memory and copied
        with one non-blocking transfer."""
        device = torch.device(device)
        pinned = device.type == "cuda"
        noise = torch.empty((steps + 1, len(self.seeds), *self.shape), pin_memory=pinned)
        for i, seed in enumerate(self.seeds):
            generator = torch.Generator().manual_seed(seed)
            for step in range(steps + 1):
                torch.randn(self.shape, generator=generator, out=noise[step, i])
        return noise.to(device, non_blocking=pinned)
