"""Stage C, B and A against diffusers' Würstchen modules: identical random weights, saved by the reference's own
`save_pretrained` and read back by `pipeline.load_component`, must give the same outputs and state dicts."""

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

from wurstfabrik.pipeline import load_component
from wurstfabrik.pipeline.decoder import StageB
from wurstfabrik.pipeline.prior import StageC
from wurstfabrik.pipeline.vqgan import StageA

torch.set_num_threads(1)

TOLERANCE = 1e-5


def randomize(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """Every parameter drawn from N(0, std²): small enough that outputs stay O(1) (Stage C divides by |1 - b|)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module.eval()


def save_and_load(reference: torch.nn.Module, folder):
    reference.save_pretrained(str(folder), safe_serialization=True)
    return load_component(folder, device="cpu", dtype=torch.float32)


def assert_same_state_dict(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert mine[key].shape == value.shape, key
        assert torch.equal(mine[key], value), key


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    assert torch.isfinite(b).all()
    return (a - b).abs().max().item()


PRIOR_CONFIGS = {
    "tiny": dict(c_in=16, c=64, c_cond=32, c_r=64, depth=2, nhead=4),
    "odd-c_r-and-heads": dict(c_in=3, c=48, c_cond=20, c_r=33, depth=2, nhead=5),  # 48 // 5: inner width 45
    "one-head": dict(c_in=16, c=24, c_cond=8, c_r=16, depth=3, nhead=1),
}
PRIOR_INPUTS = [(2, 3, 3), (1, 1, 1), (3, 4, 7), (2, 5, 2)]  # batch, height, width


@pytest.mark.parametrize("name", PRIOR_CONFIGS)
def test_stage_c_matches_reference(name, tmp_path):
    config = PRIOR_CONFIGS[name]
    reference = randomize(WuerstchenPrior(**config), seed=1, std=0.02)
    ours = save_and_load(reference, tmp_path)
    assert isinstance(ours, StageC)
    assert_same_state_dict(ours, reference)
    heads = []
    reference.out.register_forward_hook(lambda module, args, output: heads.append(output))
    generator = torch.Generator().manual_seed(2)
    for batch, h, w in PRIOR_INPUTS:
        x = torch.randn(batch, config["c_in"], h, w, generator=generator)
        r = torch.rand(batch, generator=generator)
        if batch > 1:  # the ends of the schedule too
            r[0], r[-1] = 1.0, 0.0
        c = torch.randn(batch, 7, config["c_cond"], generator=generator)
        with torch.no_grad():
            expected, got = reference(x, r, c), ours(x, r, c)
        # The output divides by |1 - b|: near b = 1 it would amplify rounding, and the comparison would say little.
        assert (1 - heads[-1].chunk(2, dim=1)[1]).abs().min() > 0.2
        assert max_diff(got, expected) <= TOLERANCE, (batch, h, w)


DECODER_CONFIGS = {
    # name: (config, [(batch, latent height, latent width, effnet height, effnet width)])
    "three-levels": (
        dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=24, c_hidden=[16, 24, 32], nhead=[-1, 2, 4],
             blocks=[1, 1, 1], level_config=["CT", "CTA", "CTA"], inject_effnet=[False, True, True],
             effnet_embd=16, clip_embd=20),
        [(2, 16, 16, 3, 3), (1, 8, 24, 3, 5), (1, 32, 8, 12, 2)],
    ),
    "two-levels-odd": (
        dict(c_in=3, c_out=3, c_r=17, patch_size=1, c_cond=12, c_hidden=[10, 14], nhead=[3, 4], blocks=[2, 1],
             level_config=["CTA", "AC"], inject_effnet=[True, False], effnet_embd=5, clip_embd=9, kernel_size=5),
        [(2, 6, 10, 3, 5), (1, 2, 2, 7, 7), (1, 14, 4, 1, 1)],
    ),
    "three-levels-mixed": (
        dict(c_in=4, c_out=4, c_r=32, patch_size=2, c_cond=16, c_hidden=[12, 16, 20], nhead=[5, -1, 3],
             blocks=[2, 2, 1], level_config=["TCA", "CT", "ACT"], inject_effnet=[True, False, True],
             effnet_embd=16, clip_embd=16),
        [(2, 8, 8, 2, 2), (1, 24, 16, 5, 3)],
    ),
    "one-level-odd-size": (
        dict(c_in=4, c_out=4, c_r=64, patch_size=1, c_cond=8, c_hidden=[8], nhead=[2], blocks=[1],
             level_config=["CTA"], inject_effnet=[True], effnet_embd=16, clip_embd=8),
        [(1, 7, 5, 3, 3), (2, 3, 9, 4, 1)],
    ),
}


@pytest.mark.parametrize("name", DECODER_CONFIGS)
def test_stage_b_matches_reference(name, tmp_path):
    config, inputs = DECODER_CONFIGS[name]
    reference = randomize(WuerstchenDiffNeXt(**config), seed=3, std=0.05)
    ours = save_and_load(reference, tmp_path)
    assert isinstance(ours, StageB)
    assert_same_state_dict(ours, reference)
    generator = torch.Generator().manual_seed(4)
    for batch, h, w, eh, ew in inputs:
        x = torch.randn(batch, config["c_in"], h, w, generator=generator)
        r = torch.rand(batch, generator=generator)
        effnet = torch.randn(batch, config["effnet_embd"], eh, ew, generator=generator)
        clip = torch.randn(batch, 6, config["clip_embd"], generator=generator)
        with torch.no_grad():
            expected, got = reference(x, r, effnet, clip), ours(x, r, effnet, clip)
        assert max_diff(got, expected) <= TOLERANCE, (batch, h, w, eh, ew)


def test_stage_b_reuses_its_condition_across_steps(tmp_path):
    """The sampler computes the condition once per run; reusing it for another r must not change the output."""
    config, _ = DECODER_CONFIGS["three-levels"]
    reference = randomize(WuerstchenDiffNeXt(**config), seed=5, std=0.05)
    ours = save_and_load(reference, tmp_path)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    effnet = torch.randn(2, 16, 3, 3, generator=generator)
    clip = torch.randn(2, 6, 20, generator=generator)
    with torch.no_grad():
        cond = ours.condition(effnet, clip)
        for r in (0.9, 0.5, 0.1):
            ratio = torch.full((2,), r)
            assert max_diff(ours.denoise(x, ratio, cond), reference(x, ratio, effnet, clip)) <= TOLERANCE


VQGAN_CONFIGS = {
    "two-levels": dict(levels=2, bottleneck_blocks=2, embed_dim=16, num_vq_embeddings=32),
    "three-levels": dict(levels=3, bottleneck_blocks=1, embed_dim=24, latent_channels=4, num_vq_embeddings=16),
    "scale-3": dict(up_down_scale_factor=3, levels=2, bottleneck_blocks=1, embed_dim=12, latent_channels=3,
                    num_vq_embeddings=8, in_channels=2, out_channels=5),
}


@pytest.mark.parametrize("name", VQGAN_CONFIGS)
def test_stage_a_matches_reference(name, tmp_path):
    config = VQGAN_CONFIGS[name]
    reference = randomize(PaellaVQModel(**config), seed=7, std=0.2)
    ours = save_and_load(reference, tmp_path)
    assert isinstance(ours, StageA)
    assert_same_state_dict(ours, reference)
    generator = torch.Generator().manual_seed(8)
    for batch, h, w in [(2, 4, 4), (1, 5, 3), (1, 1, 1)]:
        latents = torch.randn(batch, reference.config.latent_channels, h, w, generator=generator)
        with torch.no_grad():
            expected, got = reference.decode(latents).sample, ours.decode(latents)
        assert max_diff(got, expected) <= TOLERANCE, (batch, h, w)
    scale = reference.config.up_down_scale_factor * 2 ** (reference.config.levels - 1)
    images = torch.rand(2, reference.config.in_channels, 3 * scale, 2 * scale, generator=generator)
    with torch.no_grad():
        assert max_diff(ours.encode(images), reference.encode(images).latents) <= TOLERANCE


def test_state_dict_round_trips_through_our_own_modules(tmp_path):
    """Saving our module's state dict (q/k/v split again) and loading it into a fresh one changes nothing."""
    reference = randomize(WuerstchenPrior(**PRIOR_CONFIGS["odd-c_r-and-heads"]), seed=9, std=0.05)
    ours = save_and_load(reference, tmp_path)
    again = StageC(ours.config)
    again.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
