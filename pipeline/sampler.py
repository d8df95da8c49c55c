"""The DDPM-Würstchen sampler: a cosine noise schedule, its timesteps, one stochastic step and the loop.

The loop never synchronises with the host: every step's noise ratio and coefficients are computed on the CPU
before it starts and reach the device in one transfer, and it branches on no tensor value."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Stage C's published schedule: 20 timesteps from 1.0 to 2/3, then 10 more down to 0 (29 steps).
DEFAULT_PRIOR_TIMESTEPS = tuple(
    [1.0 + (2 / 3 - 1.0) * i / 19 for i in range(20)] + [2 / 3 * (1 - i / 10) for i in range(1, 11)]
)


def evenly_spaced_timesteps(steps: int) -> torch.Tensor:
    """`steps` evenly spaced sampler steps from 1 to 0 (steps + 1 timesteps)."""
    return torch.linspace(1.0, 0.0, steps + 1)


def as_timesteps(timesteps) -> torch.Tensor:
    return torch.tensor([float(t) for t in timesteps], dtype=torch.float32)


def alpha_cumprod(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule ᾱ(t) of Nichol & Dhariwal, normalised so that ᾱ(0) = 1, clamped as Würstchen trains it."""
    s = torch.tensor([s])
    init = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    return (torch.cos((t + s.to(t.device)) / (1 + s.to(t.device)) * torch.pi * 0.5) ** 2
            / init.to(t.device)).clamp(0.0001, 0.9999)


# The per-row factors of one DDPM step, in the order ddpm_update reads them.
COEFFICIENTS = ("sqrt_recip_alpha", "one_minus_alpha", "sqrt_one_minus_alpha_cumprod", "noise_scale", "noise_on")


def step_coefficients(t: torch.Tensor, t_prev: torch.Tensor, batch: int) -> torch.Tensor:
    """[5, batch] factors of the step from noise ratio t to t_prev (see COEFFICIENTS), on the CPU.

    Computed per step at the batch's size with the same operations as the step always used, so that the
    images stay bit-identical: CPU kernels round transcendental functions differently by tensor length."""
    a_t = alpha_cumprod(t.expand(batch))
    a_prev = alpha_cumprod(t_prev.expand(batch))
    alpha = a_t / a_prev
    return torch.stack([(1.0 / alpha).sqrt(), 1 - alpha, (1 - a_t).sqrt(),
                        ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt(), (t_prev != 0).float().expand(batch)])


def ddpm_update(prediction: torch.Tensor, x: torch.Tensor, noise: torch.Tensor,
                coefficients: torch.Tensor) -> torch.Tensor:
    """One DDPM step given the model's noise prediction and the step's [5, N] coefficients; the last step
    (to t = 0) adds no noise."""
    c = coefficients.view(*coefficients.shape[:2], *(1,) * (x.dim() - 1))
    # The factors apply one by one, in the reference's order: folding them would round differently.
    mu = c[0] * (x - c[1] * prediction / c[2])
    return mu + c[3] * noise * c[4]


def ddpm_step(prediction: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """One DDPM step from noise ratio t to t_prev given the model's noise prediction; no noise at t_prev = 0."""
    coefficients = step_coefficients(t, t_prev, x.shape[0]).to(x.device)
    return ddpm_update(prediction, x, noise, coefficients)


@dataclass(frozen=True)
class Schedule:
    """A sampling run's per-step values for a batch, on the device."""

    ratios: torch.Tensor  # [steps, N]: the noise ratio r the model sees at each step
    coefficients: torch.Tensor  # [steps, 5, N]: step_coefficients of each step

    @property
    def steps(self) -> int:
        return self.ratios.shape[0]


def schedule_for(timesteps: torch.Tensor, batch: int, device: torch.device) -> Schedule:
    """Computed on the CPU once, then copied to the device in one transfer (pinned, non-blocking on CUDA)."""
    device = torch.device(device)
    steps = len(timesteps) - 1
    table = torch.empty((steps, 6, batch), pin_memory=device.type == "cuda")
    for i in range(steps):
        table[i, 0] = timesteps[i]
        table[i, 1:] = step_coefficients(timesteps[i], timesteps[i + 1], batch)
    table = table.to(device, non_blocking=device.type == "cuda")
    return Schedule(table[:, 0], table[:, 1:])


def sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
           timesteps: torch.Tensor) -> torch.Tensor:
    """DDPM-Würstchen sampling: walks `timesteps` (decreasing, ending at 0) from the initial noise noise[0].

    `denoise(x, r)` predicts the noise at ratios r; `noise` is [steps + 1, N, ...] (see ImageNoise.draw)."""
    schedule = schedule_for(timesteps, noise.shape[1], noise.device)
    if noise.shape[0] != schedule.steps + 1:
        raise ValueError(f"noise holds {noise.shape[0]} draws for {schedule.steps} steps; expected steps + 1")
    return sample_loop(denoise, noise, schedule)


def sample_loop(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                schedule: Schedule) -> torch.Tensor:
    """The steps of `sample`: device work only, nothing that waits on the host."""
    x = noise[0]
    for i in range(schedule.steps):
        prediction = denoise(x, schedule.ratios[i])
        x = ddpm_update(prediction.float(), x, noise[i + 1], schedule.coefficients[i])
    return x


def check_finite(x: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
    """Raises FloatingPointError if x holds NaN or infinity: once per batch (it waits for the device), so that
    an overflow in half precision fails clearly instead of becoming black images."""
    if not bool(torch.isfinite(x).all()):
        name = str(dtype).removeprefix("torch.")
        hint = " (float16 overflows here; use bfloat16 or float32)" if dtype == torch.float16 else ""
        raise FloatingPointError(f"{what} in {name} produced non-finite values (NaN or infinity){hint}")
    return x


def is_valid_schedule(timesteps) -> bool:
    try:
        values = [float(t) for t in timesteps]
    except (TypeError, ValueError):
        return False
    return (len(values) >= 2 and all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values)
            and all(a > b for a, b in zip(values, values[1:], strict=False)))
