"""The DDPM-Würstchen sampler against diffusers' DDPMWuerstchenScheduler: schedules, single steps and whole runs."""

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS

from pipeline.noise import ImageNoise
from pipeline.sampler import (
    DEFAULT_PRIOR_TIMESTEPS,
    alpha_cumprod,
    as_timesteps,
    ddpm_step,
    evenly_spaced_timesteps,
    is_valid_schedule,
    sample,
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

    noise = ImageNoise([seed], shape, torch.device("cpu"))
    ours = sample(toy_denoiser, noise(), as_timesteps(timesteps), noise)
    assert torch.allclose(ours, latents, rtol=1e-5, atol=1e-5), (ours - latents).abs().max()


def test_image_noise_rows_do_not_depend_on_the_batch():
    shape = (2, 3, 3)
    together = ImageNoise([5, 6, 7], shape, torch.device("cpu"))
    alone = [ImageNoise([s], shape, torch.device("cpu")) for s in (5, 6, 7)]
    for _ in range(3):
        assert torch.equal(together(), torch.cat([n() for n in alone]))


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
