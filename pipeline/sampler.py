"""The DDPM-Würstchen sampler: a cosine noise schedule, its timesteps, one stochastic step and the loop."""

import math
from collections.abc import Callable

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


def ddpm_step(prediction: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """One DDPM step from noise ratio t to t_prev given the model's noise prediction; no noise at t_prev = 0."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    a_t = alpha_cumprod(t.expand(x.shape[0]).to(x.device)).view(shape)
    a_prev = alpha_cumprod(t_prev.expand(x.shape[0]).to(x.device)).view(shape)
    alpha = a_t / a_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * prediction / (1 - a_t).sqrt())
    std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt() * noise
    return mu + std * (t_prev != 0).float()


def sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
           timesteps: torch.Tensor, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """DDPM-Würstchen sampling: walks `timesteps` (decreasing, ending at 0) from the initial noise `x`.

    `denoise(x, r)` predicts the noise at ratios r; `noise()` draws the next step's noise, shaped like x."""
    for t, t_prev in zip(timesteps[:-1], timesteps[1:], strict=True):
        prediction = denoise(x, t.expand(x.shape[0]).to(x.device))
        x = ddpm_step(prediction.float(), t, t_prev, x, noise())
    return x


def is_valid_schedule(timesteps) -> bool:
    try:
        values = [float(t) for t in timesteps]
    except (TypeError, ValueError):
        return False
    return (len(values) >= 2 and all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values)
            and all(a > b for a, b in zip(values, values[1:], strict=False)))
