"""Text to image end to end: against diffusers' Würstchen pipelines on the same tiny checkpoints, independent of
batching, with truncation flags and argument checks."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import (
    DEFAULT_STAGE_C_TIMESTEPS,
    PaellaVQModel,
    WuerstchenDecoderPipeline,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    WuerstchenPriorPipeline,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from wurstfabrik.pipeline import WuerstchenPipeline, decoder_seed
from wurstfabrik.pipeline.tiny import write_tiny_checkpoints

torch.set_num_threads(1)

WEIGHTS = "diffusion_pytorch_model.safetensors"
LONG_PROMPT = " ".join(["a photo of a cat sitting on the red sofa next to a dog in the garden at night"] * 5)
PROMPTS = [
    "a cat",
    "sausages on a grill in the garden at night",
    LONG_PROMPT,
    "",
    "portrait of an astronaut riding a horse in space, oil painting, high quality, detailed",
    "the city street in the rain with neon lights",
]
SEEDS = [101, 2**62 + 5, 0, 77, 31337, 9]


def redraw_weights(path, seed: int, std: float, overrides: dict | None = None) -> None:
    """Replaces a checkpoint's random weights by N(0, std²) ones. The tiny checkpoints' default initialisation
    makes Stage C's |1 - b| come close to 0, and 30 guided steps then amplify float rounding into noise; small
    weights keep every stage well conditioned, so that a comparison with the reference can be tight."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = load_file(path)
    for key, value in state_dict.items():
        if value.is_floating_point() and "running_" not in key:
            state_dict[key] = torch.randn(value.shape, generator=generator) * std
    state_dict.update(overrides or {})
    save_file(state_dict, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    prior_dir, decoder_dir = write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    redraw_weights(prior_dir / "prior" / WEIGHTS, seed=1, std=0.02)
    redraw_weights(decoder_dir / "decoder" / WEIGHTS, seed=2, std=0.05)
    # Stage A's output bias at mid-grey spreads the pixels over [0, 1] instead of clamping most of them to 0.
    redraw_weights(decoder_dir / "vqgan" / WEIGHTS, seed=3, std=0.2,
                   overrides={"out_block.0.bias": torch.full((12,), 0.5)})
    return prior_dir, decoder_dir


@pytest.fixture(scope="module")
def ours(checkpoints):
    return WuerstchenPipeline.from_pretrained(*checkpoints, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """diffusers' prior and decoder pipelines, assembled in memory from the same component folders."""
    prior_dir, decoder_dir = checkpoints
    prior_index = json.loads((prior_dir / "model_index.json").read_text())
    decoder_index = json.loads((decoder_dir / "model_index.json").read_text())
    prior = WuerstchenPriorPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(str(prior_dir / "tokenizer")),
        text_encoder=CLIPTextModel.from_pretrained(str(prior_dir / "text_encoder")).eval(),
        prior=WuerstchenPrior.from_pretrained(str(prior_dir / "prior")).eval(),
        scheduler=DDPMWuerstchenScheduler(),
        latent_mean=prior_index["latent_mean"], latent_std=prior_index["latent_std"],
        resolution_multiple=prior_index["resolution_multiple"],
    )
    decoder = WuerstchenDecoderPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(str(decoder_dir / "tokenizer")),
        text_encoder=CLIPTextModel.from_pretrained(str(decoder_dir / "text_encoder")).eval(),
        decoder=WuerstchenDiffNeXt.from_pretrained(str(decoder_dir / "decoder")).eval(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=PaellaVQModel.from_pretrained(str(decoder_dir / "vqgan")).eval(),
        latent_dim_scale=decoder_index["latent_dim_scale"],
    )
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    return prior, decoder


def as_arrays(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def level_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


CASES = {
    "default-schedule": dict(seed=11, prompt="a photo of a cat", negative=None, prior_steps=None),
    "negative-prompt": dict(seed=12, prompt="sausages on a grill", negative="blurry, low quality", prior_steps=None),
    "prior-steps": dict(seed=13, prompt="mountains and a lake", negative=None, prior_steps=10),
    "decoder-guidance-non-square": dict(seed=14, prompt="a dog in the garden", negative="a cat", prior_steps=None,
                                        decoder_guidance=3.0, height=256, width=128),
    "long-prompt-unguided-prior": dict(seed=2**40, prompt=LONG_PROMPT, negative=None, prior_steps=6,
                                       prior_guidance=1.0),
}


@pytest.mark.parametrize("name", CASES)
def test_one_image_matches_reference(name, ours, reference):
    case = CASES[name]
    seed, prompt, negative = case["seed"], case["prompt"], case["negative"]
    height, width = case.get("height", 128), case.get("width", 128)
    prior_guidance, decoder_guidance = case.get("prior_guidance", 4.0), case.get("decoder_guidance", 0.0)
    if case["prior_steps"]:
        schedule = dict(num_inference_steps=case["prior_steps"])
    else:
        schedule = dict(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
    reference_prior, reference_decoder = reference

    expected_latents = reference_prior(prompt, negative_prompt=negative, height=height, width=width,
                                       guidance_scale=prior_guidance, generator=torch.Generator().manual_seed(seed),
                                       **schedule).image_embeddings
    expected = reference_decoder(expected_latents, prompt, negative_prompt=negative, guidance_scale=decoder_guidance,
                                 generator=torch.Generator().manual_seed(decoder_seed(seed)), output_type="np").images
    expected = (np.clip(expected, 0, 1) * 255).round().astype(np.uint8)

    negatives = [negative] if negative is not None else None
    latents = ours.prior([prompt], [seed], negatives, height=height, width=width, steps=case["prior_steps"],
                         guidance_scale=prior_guidance).latents
    assert latents.shape == expected_latents.shape
    # Compared where the sampler works, before the rescaling by latent_mean (42) that scales rounding up with it.
    latent_diff = ((latents - expected_latents) / ours.prior.latent_mean).abs().max().item()
    assert latent_diff <= 1e-5
    images = as_arrays(ours([prompt], [seed], negatives, height=height, width=width,
                            prior_steps=case["prior_steps"], prior_guidance_scale=prior_guidance,
                            decoder_guidance_scale=decoder_guidance))
    assert images.shape == (1, height, width, 3)
    assert 20 < images.std()  # a spread of pixel values, not a clamped flat image
    assert level_diff(images, expected) <= 1
    print(f"\n{name}: |Δlatents| / latent_mean {latent_diff:.2e}, "
          f"pixels equal to the reference: {(images == expected).mean():.4%}")


def test_batch_gives_the_images_of_single_runs(ours):
    negatives = ["blurry", "", "low quality", "a dog", "", "text"]
    batch = ours.generate(PROMPTS, SEEDS, negatives, height=128, width=128, prior_steps=8, decoder_steps=6,
                          decoder_guidance_scale=2.0)
    together = as_arrays(batch.images)
    alone = np.concatenate([as_arrays(ours([p], [s], [n], height=128, width=128, prior_steps=8, decoder_steps=6,
                                           decoder_guidance_scale=2.0))
                            for p, s, n in zip(PROMPTS, SEEDS, negatives, strict=True)])
    assert level_diff(together, alone) <= 1
    print(f"\nbatch of {len(PROMPTS)} vs one by one: {(together == alone).mean():.4%} of pixels exactly equal, "
          f"{sum(np.array_equal(a, b) for a, b in zip(together, alone, strict=True))} of {len(PROMPTS)} images")
    # Different seeds and prompts give different images.
    assert len({image.tobytes() for image in together}) == len(PROMPTS)


def test_images_per_prompt_are_prompt_major(ours):
    prompts, seeds = PROMPTS[:3], SEEDS
    negatives = ["blurry", "", "low quality"]
    per_prompt = ours.generate(prompts, seeds, negatives, height=128, width=128, prior_steps=6, decoder_steps=4,
                               images_per_prompt=2)
    repeated = ours.generate([p for p in prompts for _ in range(2)], seeds, [n for n in negatives for _ in range(2)],
                             height=128, width=128, prior_steps=6, decoder_steps=4)
    assert len(per_prompt.images) == 6
    assert np.array_equal(as_arrays(per_prompt.images), as_arrays(repeated.images))
    assert per_prompt.truncated == repeated.truncated == [False, False, False, False, True, True]
    first = as_arrays(ours([prompts[0]], seeds[:2], [negatives[0]], height=128, width=128, prior_steps=6,
                          decoder_steps=4, images_per_prompt=2))
    assert level_diff(first, as_arrays(per_prompt.images[:2])) <= 1


def test_only_the_long_prompt_is_truncated(ours):
    result = ours.generate(PROMPTS, SEEDS, height=128, width=128, prior_steps=2, decoder_steps=2)
    assert result.truncated == [p == LONG_PROMPT for p in PROMPTS]


def test_truncation_boundary(ours):
    """77 tokens with the start and end tokens fit; one more word is cut."""
    text = ours.prior.text
    fits, cut = "cat " * 75, "cat " * 76
    assert len(text.tokenizer(fits).input_ids) == text.max_length == 77
    assert text.truncated([fits, cut, "a cat", ""]) == [False, True, False, False]
    assert text.encode([cut, fits]).truncated == [True, False]


BASE = dict(prompts=["a cat"], seeds=[1], height=128, width=128, prior_steps=2, decoder_steps=2)
BAD_ARGUMENTS = [
    (dict(prompts=[]), r"^prompts"),
    (dict(prompts=None), r"^prompts"),
    (dict(prompts="a cat"), r"^prompts"),
    (dict(prompts=[None]), r"^prompts\[0\]"),
    (dict(prompts=[3]), r"^prompts\[0\]"),
    (dict(prompts=["a cat", 3], seeds=[1, 2]), r"^prompts\[1\]"),
    (dict(seeds=[1, 2]), r"^seeds"),
    (dict(seeds=[]), r"^seeds"),
    (dict(seeds=None), r"^seeds"),
    (dict(seeds=7), r"^seeds"),
    (dict(seeds=[True]), r"^seeds\[0\]"),
    (dict(seeds=[-1]), r"^seeds\[0\]"),
    (dict(seeds=[2**63]), r"^seeds\[0\]"),
    (dict(seeds=[1.0]), r"^seeds\[0\]"),
    (dict(seeds=["1"]), r"^seeds\[0\]"),
    (dict(images_per_prompt=2), r"^seeds"),  # one seed per image: two are needed
    (dict(images_per_prompt=0), r"^images_per_prompt"),
    (dict(height=0), r"^height"),
    (dict(height=-128), r"^height"),
    (dict(width=0), r"^width"),
    (dict(height=16385), r"^height"),
    (dict(width=10**6), r"^width"),
    (dict(height=128.0), r"^height"),
    (dict(height=True), r"^height"),
    (dict(height=12800), r"^height/width"),  # no image side the stages make covers it (tests/test_sizes.py)
    (dict(prior_steps=0), r"^prior_steps"),
    (dict(prior_steps=-3), r"^prior_steps"),
    (dict(decoder_steps=0), r"^decoder_steps"),
    (dict(decoder_steps=2.5), r"^decoder_steps"),
    (dict(prior_steps=None, prior_timesteps=[1.0, 0.5, 0.5, 0.0]), r"^prior_timesteps"),
    (dict(prior_steps=None, prior_timesteps=[0.0, 0.5, 1.0]), r"^prior_timesteps"),
    (dict(prior_steps=None, prior_timesteps=[1.5, 0.0]), r"^prior_timesteps"),
    (dict(prior_steps=None, prior_timesteps=[1.0, -0.1]), r"^prior_timesteps"),
    (dict(prior_steps=None, prior_timesteps=[1.0]), r"^prior_timesteps"),
    (dict(prior_timesteps=[1.0, 0.0]), r"prior_steps.*prior_timesteps"),
    (dict(prior_guidance_scale=-1.0), r"^prior_guidance_scale"),
    (dict(prior_guidance_scale=float("nan")), r"^prior_guidance_scale"),
    (dict(decoder_guidance_scale=-0.5), r"^decoder_guidance_scale"),
    (dict(negative_prompts=["a", "b"]), r"^negative_prompts"),
    (dict(negative_prompts=[None]), r"^negative_prompts\[0\]"),
    (dict(negative_prompts="blurry"), r"^negative_prompts"),
]


@pytest.mark.parametrize("overrides, names", BAD_ARGUMENTS, ids=[str(o) for o, _ in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error_naming_them(ours, overrides, names):
    with pytest.raises(ValueError, match=names):
        ours.generate(**{**BASE, **overrides})


def test_the_decoder_takes_latents_as_a_numpy_array_as_the_decoder_stage_hands_them(ours):
    latents = ours.prior(["a cat"], [3], height=256, width=256, steps=2).latents
    from_tensor = ours.decoder.decode(latents, ["a cat"], [3], steps=2)
    from_array = ours.decoder.decode(latents.float().numpy(), ["a cat"], [3], steps=2)
    assert np.array_equal(from_tensor, from_array)


def test_decoder_checks_its_arguments(ours):
    latents = torch.zeros(1, 16, 3, 3)
    with pytest.raises(ValueError, match=r"^latents"):
        ours.decoder.decode(latents.tolist(), ["a cat"], [1])
    with pytest.raises(ValueError, match=r"^latents"):
        ours.decoder.decode(latents[0].numpy(), ["a cat"], [1])  # an array is taken, but it needs 4 dimensions
    with pytest.raises(ValueError, match=r"^latents"):
        ours.decoder.decode(torch.zeros(1, 16, 5, 5), ["a cat"], [1])  # Stage B latent 53×53
    with pytest.raises(ValueError, match=r"^prompts"):
        ours.decoder.decode(latents, ["a cat", "a dog"], [1])
    with pytest.raises(ValueError, match=r"^seeds"):
        ours.decoder.decode(latents, ["a cat"], [1, 2])
    with pytest.raises(ValueError, match=r"^decoder_steps"):
        ours.decoder.decode(latents, ["a cat"], [1], steps=0)
    with pytest.raises(ValueError, match=r"^decoder_guidance_scale"):
        ours.decoder.decode(latents, ["a cat"], [1], guidance_scale=-2)
