"""Per-image noise: each image's whole run drawn up front from its own generator, in the order the sampler drew it
step by step before (and the reference scheduler draws it), whatever the batch."""

import hashlib

import pytest
import torch

from wurstfabrik.pipeline.noise import MAX_SEED, ImageNoise, decoder_seed

torch.set_num_threads(1)
CPU = torch.device("cpu")


class BeforeImageNoise:
    """pipeline/noise.py's ImageNoise before issue 6, verbatim (git show e6d43b0:pipeline/noise.py): one call per
    sampler step, each image's row from its own generator. The oracle for bit-identity."""

    def __init__(self, seeds, shape, device):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.shape = shape
        self.device = device

    def __call__(self):
        rows = [torch.randn((1, *self.shape), generator=g) for g in self.generators]
        return torch.cat(rows).to(self.device)


# (2, 3, 3) has 18 values: a draw of several steps at once would consume the stream differently there.
@pytest.mark.parametrize("seeds, shape", [([5], (4, 6, 5)), ([5, 6, 7], (2, 3, 3)), ([0, 2**63 - 1], (16, 3, 3))])
def test_draw_is_the_per_step_draws_before(seeds, shape):
    steps = 6
    before = BeforeImageNoise(seeds, shape, CPU)
    drawn = ImageNoise(seeds, shape).draw(steps, CPU)
    assert drawn.shape == (steps + 1, len(seeds), *shape) and drawn.dtype == torch.float32
    for step in range(steps + 1):
        assert torch.equal(drawn[step], before())


def test_rows_do_not_depend_on_the_batch():
    shape = (2, 3, 3)
    together = ImageNoise([5, 6, 7], shape).draw(3, CPU)
    alone = torch.cat([ImageNoise([s], shape).draw(3, CPU) for s in (5, 6, 7)], dim=1)
    assert torch.equal(together, alone)


def test_cpu_noise_is_not_pinned():
    assert not ImageNoise([1], (2, 3, 3)).draw(2, CPU).is_pinned()


def test_decoder_seed_is_a_hash_of_the_seed():
    for seed in (0, 1, 2**62 + 5, MAX_SEED - 1):
        expected = int.from_bytes(hashlib.sha256(f"wurstfabrik-decoder:{seed}".encode()).digest()[:8], "big") >> 1
        assert decoder_seed(seed) == expected and 0 <= expected < MAX_SEED
    assert decoder_seed(1) != decoder_seed(2)
