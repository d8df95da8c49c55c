"""Half precision, as GPUs run the pipeline: the same images as float32 up to half-precision rounding."""

import numpy as np
import pytest
import torch

from wurstfabrik.pipeline import WuerstchenPipeline

torch.set_num_threads(1)


def images(tiny_checkpoints, dtype: torch.dtype) -> np.ndarray:
    pipe = WuerstchenPipeline.from_pretrained(*tiny_checkpoints, device="cpu", dtype=dtype)
    assert next(pipe.prior.prior.parameters()).dtype == dtype
    assert next(pipe.decoder.vqgan.parameters()).dtype == dtype
    out = pipe(["a red fox in the snow", "a bowl of ramen"], seeds=[1, 2], height=128, width=128, prior_steps=6,
               decoder_steps=4)
    return np.stack([np.asarray(image) for image in out]).astype(np.float64)


@pytest.mark.parametrize("dtype, mean_levels", [(torch.bfloat16, 1.0), (torch.float16, 0.25)])
def test_half_precision_matches_float32(tiny_checkpoints, dtype, mean_levels):
    reference = images(tiny_checkpoints, torch.float32)
    half = images(tiny_checkpoints, dtype)
    assert np.abs(half - reference).mean() < mean_levels
    assert np.corrcoef(half.ravel(), reference.ravel())[0, 1] > 0.99
