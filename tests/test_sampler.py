"""The DDPM-Würstchen sampler against diffusers' DDPMWuerstchenScheduler (schedules, single steps and whole runs),
and against the sampler as it was before its noise and schedule moved out of the loop: bit for bit, pipelines
included."""

import numpy as np
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS
from test_noise import BeforeImageNoise

from wurstfabrik.pipeline import WuerstchenPipeline, decoder_seed
from wurstfabrik.pipeline.noise import ImageNoise
from wurstfabrik.pipeline.sampler import (
    DEFAULT_PRIOR_TIMESTEPS,
    alpha_cumprod,
    as_timesteps,
    check_finite,
    ddpm_step,
    evenly_spaced_timesteps,
    is_valid_schedule,
    sample,
    sample_loop,
    schedule_for,
)

torch.set_num_threads(1)


def test_default_prior_schedule_is_the_reference_one():
    ours = as_timesteps(DEFAULT_PRIOR_TIMESTEPS)
    reference = torch.Tensor(DEFAULT_STAGE_C_TIMESTEPS)  # as the reference pipeline turns it into a tensor
    assert ours.dtype == torch.float32 and len(ours) == len(DEFAULT_STAGE_C_TIMESTEPS) == 30
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("steps", [1, 2, 3, 12, 30, 60])
def test_evenly_spaced_timesteps_are_the_schedulers(steps):
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(steps)
    assert torch.equal(evenly_spaced_timesteps(steps), scheduler.timesteps)


def test_alpha_cumprod_is_the_schedulers():
    scheduler = DDPMWuerstchenScheduler()
    t = torch.cat([torch.linspace(0, 1, 101), torch.tensor([0.0, 1.0, 2 / 3])])
    assert torch.equal(alpha_cumprod(t), scheduler._alpha_cumprod(t, torch.device("cpu")))


SCHEDULES = {
    "prior-default": [float(t) for t in DEFAULT_STAGE_C_TIMESTEPS],
    "decoder-12": evenly_spaced_timesteps(12).tolist(),
    "custom": [1.0, 0.93, 0.5, 0.2, 0.01, 0.0],
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_each_step_matches_the_scheduler(name):
    timesteps = SCHEDULES[name]
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=timesteps)
    ours_schedule = as_timesteps(timesteps)
    data = torch.Generator().manual_seed(0)
    for i in range(len(timesteps) - 1):  # includes the last step, to t = 0, which adds no noise
        x = torch.randn(3, 4, 5, 6, generator=data)
        prediction = torch.randn(3, 4, 5, 6, generator=data)
        t = scheduler.timesteps[i].expand(3)
        expected = scheduler.step(prediction, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        got = ddpm_step(prediction, ours_schedule[i], ours_schedule[i + 1], x, noise)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (name, i, (got - expected).abs().max())


def test_last_step_ignores_the_noise():
    x, prediction = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, t_prev = torch.tensor(0.1), torch.tensor(0.0)
    quiet = ddpm_step(prediction, t, t_prev, x, torch.zeros_like(x))
    assert torch.equal(ddpm_step(prediction, t, t_prev, x, torch.randn_like(x)), quiet)
    assert not torch.equal(ddpm_step(prediction, t, torch.tensor(0.05), x, torch.randn_like(x)),
                           ddpm_step(prediction, t, torch.tensor(0.05), x, torch.zeros_like(x)))


def toy_denoiser(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a model: depends on both the sample and the noise ratio."""
    return 0.3 * x + torch.sin(3 * x) * r.view(-1, 1, 1, 1)


@pytest.mark.parametrize("name", SCHEDULES)
def test_whole_run_matches_a_scheduler_loop(name):
    """One image: the reference draws its start noise and every step's noise from one generator, in that order;
    ImageNoise with the same seed must hand out the same draws."""
    timesteps, seed, shape = SCHEDULES[name], 1234, (4, 6, 5)
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=timesteps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, *shape), generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:-1]:
        ratio = t.expand(1)
        latents = scheduler.step(toy_denoiser(latents, ratio), ratio, latents, generator=generator).prev_sample

    noise = ImageNoise([seed], shape).draw(len(timesteps) - 1, torch.device("cpu"))
    ours = sample(toy_denoiser, noise, as_timesteps(timesteps))
    assert torch.allclose(ours, latents, rtol=1e-5, atol=1e-5), (ours - latents).abs().max()


# The sampler as it was before issue 6, verbatim (git show e6d43b0:pipeline/sampler.py): the noise drawn and the
# step's factors computed inside the loop, step by step. It is the oracle for bit-identity.
def before_ddpm_step(prediction, t, t_prev, x, noise):
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    a_t = alpha_cumprod(t.expand(x.shape[0]).to(x.device)).view(shape)
    a_prev = alpha_cumprod(t_prev.expand(x.shape[0]).to(x.device)).view(shape)
    alpha = a_t / a_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * prediction / (1 - a_t).sqrt())
    std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt() * noise
    return mu + std * (t_prev != 0).float()


def before_sample(denoise, x, timesteps, noise):
    for t, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
        prediction = denoise(x, t.expand(x.shape[0]).to(x.device))
        x = before_ddpm_step(prediction.float(), t, t_prev, x, noise())
    return x


def before_guided(model_step, scale):
    def denoise(x, r):
        prediction = model_step(torch.cat([x, x]), torch.cat([r, r])).float()
        text, uncond = prediction.chunk(2)
        return torch.lerp(uncond, text, scale)
    return denoise


# Shapes whose size is not a multiple of 16 draw differently when drawn at once; batches of 16 or more take CPU
# kernels' vectorised paths.
@pytest.mark.parametrize("batch, shape", [(1, (4, 6, 5)), (3, (2, 3, 3)), (17, (16, 3, 3))])
@pytest.mark.parametrize("name", SCHEDULES)
def test_sample_is_bit_identical_to_the_loop_before(name, batch, shape):
    timesteps = as_timesteps(SCHEDULES[name])
    seeds = [2**40 + 7 * i for i in range(batch)]
    before_noise = BeforeImageNoise(seeds, shape, torch.device("cpu"))
    expected = before_sample(toy_denoiser, before_noise(), timesteps, before_noise)
    ours = sample(toy_denoiser, ImageNoise(seeds, shape).draw(len(timesteps) - 1, torch.device("cpu")), timesteps)
    assert torch.equal(ours, expected)


def test_the_loop_never_waits_on_the_host():
    """Dynamo with fullgraph=True refuses .item(), .tolist() and Python branches on tensor values, anything that
    would make the loop wait for the device: so the loop traces into one graph."""
    timesteps, shape = as_timesteps(SCHEDULES["custom"]), (4, 6, 5)
    noise = ImageNoise([1, 2], shape).draw(len(timesteps) - 1, torch.device("cpu"))
    schedule = schedule_for(timesteps, 2, torch.device("cpu"))
    traced = torch.compile(sample_loop, fullgraph=True, backend="eager")
    assert torch.equal(traced(toy_denoiser, noise, schedule), sample(toy_denoiser, noise, timesteps))


def test_schedule_is_computed_once_for_the_whole_run():
    timesteps = as_timesteps(SCHEDULES["decoder-12"])
    schedule = schedule_for(timesteps, 3, torch.device("cpu"))
    assert schedule.steps == 12 and schedule.ratios.shape == (12, 3) and schedule.coefficients.shape == (12, 5, 3)
    assert torch.equal(schedule.ratios[:, 0], timesteps[:-1])
    assert schedule.coefficients[-1, 4].eq(0).all() and schedule.coefficients[:-1, 4].eq(1).all()  # noise_on


def test_sample_refuses_noise_of_the_wrong_length():
    noise = ImageNoise([1], (2, 3, 3)).draw(3, torch.device("cpu"))
    with pytest.raises(ValueError, match="noise holds 4 draws for 5 steps"):
        sample(toy_denoiser, noise, evenly_spaced_timesteps(5))


def test_check_finite_names_stage_and_dtype():
    x = torch.zeros(2, 3)
    assert check_finite(x, "Stage C", torch.float16) is x
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^Stage C in float16 .*non-finite.*use bfloat16"):
        check_finite(x, "Stage C", torch.float16)
    x[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match=r"^Stage B in bfloat16 .*non-finite"):
        check_finite(x, "Stage B", torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_checkpoints):
    return WuerstchenPipeline.from_pretrained(*tiny_checkpoints, device="cpu", dtype=torch.float32)


def before_prior(prior, prompts, seeds, negatives, timesteps, guidance, height, width):
    """PriorPipeline.__call__'s sampling as it was, on the pipeline's own models."""
    guided = guidance > 1
    embeddings = prior.text.encode(prompts + negatives if guided else prompts)
    cond = prior.prior.condition(embeddings.hidden_states.to(prior.dtype))

    def model_step(x, r):
        return prior.prior.denoise(x.to(prior.dtype), r, cond)

    noise = BeforeImageNoise(seeds, (prior.prior.config.c_in, *prior.latent_size(height, width)), prior.device)
    latents = before_sample(before_guided(model_step, guidance) if guided else model_step, noise(), timesteps, noise)
    return latents * prior.latent_mean - prior.latent_std


def before_decode(decoder, latents, prompts, seeds, steps, guidance):
    """DecoderPipeline.decode's sampling as it was, on the pipeline's own models."""
    guided = guidance > 1
    embeddings = decoder.text.encode(prompts + [""] * len(prompts) if guided else prompts)
    effnet = latents.to(decoder.device, decoder.dtype)
    if guided:
        effnet = torch.cat([effnet, torch.zeros_like(effnet)])
    cond = decoder.decoder.condition(effnet, embeddings.hidden_states.to(decoder.dtype))

    def model_step(x, r):
        return decoder.decoder.denoise(x.to(decoder.dtype), r, cond)

    shape = (decoder.decoder.config.c_in, *decoder.latent_size(*latents.shape[-2:]))
    noise = BeforeImageNoise([decoder_seed(s) for s in seeds], shape, decoder.device)
    x = before_sample(before_guided(model_step, guidance) if guided else model_step, noise(),
                      evenly_spaced_timesteps(steps), noise)
    images = decoder.vqgan.decode((x * decoder.vqgan.config.scale_factor).to(decoder.dtype)).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy()


PROMPTS = ["a cat", "sausages on a grill in the garden at night", "", "portrait of an astronaut"]


@pytest.mark.parametrize("prompts, seeds, guidance, steps, size", [
    (PROMPTS, [1, 2, 3, 4], 4.0, None, (128, 128)),  # the published 29-step schedule
    (PROMPTS[1:2], [2], 4.0, 7, (256, 128)),
    (PROMPTS[:3], [9, 10, 2**62], 1.0, 5, (128, 128)),  # unguided
])
def test_prior_is_bit_identical_to_the_sampler_before(tiny_pipeline, prompts, seeds, guidance, steps, size):
    prior = tiny_pipeline.prior
    timesteps = evenly_spaced_timesteps(steps) if steps else as_timesteps(DEFAULT_PRIOR_TIMESTEPS)
    expected = before_prior(prior, prompts, seeds, [""] * len(prompts), timesteps, guidance, *size)
    latents = prior(prompts, seeds, height=size[0], width=size[1], steps=steps, guidance_scale=guidance).latents
    assert torch.equal(latents, expected)


@pytest.mark.parametrize("batch, guidance", [(1, 0.0), (3, 0.0), (2, 2.0)])
def test_decoder_is_bit_identical_to_the_sampler_before(tiny_pipeline, batch, guidance):
    prompts, seeds = PROMPTS[:batch], [11 + i for i in range(batch)]
    latents = torch.randn(batch, 16, 3, 3, generator=torch.Generator().manual_seed(batch))
    expected = before_decode(tiny_pipeline.decoder, latents, prompts, seeds, 4, guidance)
    images = tiny_pipeline.decoder.decode(latents, prompts, seeds, steps=4, guidance_scale=guidance)
    assert np.array_equal(images, expected)


@pytest.mark.parametrize("timesteps, valid", [
    ([1.0, 0.0], True),
    (DEFAULT_PRIOR_TIMESTEPS, True),
    (torch.linspace(1, 0, 5), True),
    ([1.0], False),
    ([], False),
    ([1.0, 0.5, 0.5, 0.0], False),
    ([0.0, 1.0], False),
    ([1.5, 0.0], False),
    ([1.0, -0.1], False),
    ([1.0, float("nan"), 0.0], False),
    (["a", "b"], False),
    (None, False),
])
def test_schedule_validation(timesteps, valid):
    assert is_valid_schedule(timesteps) is valid
