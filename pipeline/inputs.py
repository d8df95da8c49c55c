"""Checks of the pipeline's arguments: each failure is a ValueError that names the argument."""

import math
import numbers

from .noise import MAX_SEED
from .sampler import is_valid_schedule

MAX_SIDE = 16384


def check_texts(name: str, texts, count: int | None = None) -> list[str]:
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{name} is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(text).__name__}")
    if count is not None and len(texts) != count:
        raise ValueError(f"{name} has {len(texts)} entries, expected {count}")
    return list(texts)


def check_seeds(seeds, count: int) -> list[int]:
    if not isinstance(seeds, (list, tuple)):
        raise ValueError(f"seeds must be a list of integers, got {type(seeds).__name__}")
    if len(seeds) != count:
        raise ValueError(f"seeds has {len(seeds)} entries, expected one per image: {count}")
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
            raise ValueError(f"seeds[{i}] must be an integer in [0, 2**63), got {seed!r}")
    return [int(s) for s in seeds]


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_side(name: str, value) -> int:
    value = check_positive_int(name, value)
    if value > MAX_SIDE:
        raise ValueError(f"{name} {value} is too large: its latents would not fit (at most {MAX_SIDE})")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_guidance(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_schedule(name: str, steps, timesteps, steps_name: str):
    if steps is not None and timesteps is not None:
        raise ValueError(f"give either {steps_name} or {name}, not both")
    if steps is not None:
        check_positive_int(steps_name, steps)
    if timesteps is not None and not is_valid_schedule(timesteps):
        raise ValueError(f"{name} must be at least two numbers in [0, 1], strictly decreasing, got {timesteps!r}")
