"""Any requested size: generated at the nearest size the stages make that covers it, then cut around the center or
resized to exactly the requested size; only sizes no decodable size covers are refused."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wurstfabrik.pipeline import Geometry, WuerstchenPipeline
from wurstfabrik.pipeline.sizes import fit_to_size

torch.set_num_threads(1)

FAST = dict(prior_steps=1, prior_guidance_scale=1.0, decoder_steps=1)  # big images: the fewest steps there are

# (height, width): generated when cut, generated when resized
GENERATED = {
    (1080, 1920): ((1152, 1920), (1152, 2048)),  # 16:9 exactly when resized
    (768, 1344): ((768, 1408), (896, 1536)),
    (1000, 1000): ((1024, 1024), (1024, 1024)),
    (1024, 2048): ((1024, 2048), (1024, 2048)),  # made directly
    (540, 960): ((640, 1024), (640, 1152)),
    (200, 128): ((256, 128), (256, 128)),  # a bigger pair would cost more than 1.5 times the pixels
    (1, 1): ((128, 128), (128, 128)),
    (12672, 12672): ((12672, 12672), (12672, 12672)),
}


@pytest.mark.parametrize("requested", GENERATED, ids=[f"{h}x{w}" for h, w in GENERATED])
def test_generated_size(requested):
    geometry = Geometry()
    cut, resized = GENERATED[requested]
    assert geometry.generated_size(*requested) == cut
    assert geometry.generated_size(*requested, resize=True) == resized
    for size in (cut, resized):
        geometry.check_prior_latent(*geometry.prior_latent(*size))  # Stage B can decode it
        assert geometry.generated_size(*size) == size  # and it is made as it is


def test_only_sizes_no_decodable_size_covers_are_refused():
    """Stage B's latent side int(10.67·p) is a multiple of 16 for p = 3, 6, …, 297, then not before p = 1600:
    up to the pipeline's limit of 16,384 px, 12,672 px is the largest side the stages make."""
    geometry = Geometry()
    sides = [geometry.pixels(p) for p in range(1, 1600) if geometry.decodable(p)]
    assert sides == list(range(128, 12672 + 1, 128))
    for side in (1, 127, 129, 12672):
        geometry.check_size(side, side)
    with pytest.raises(ValueError, match=r"^height/width 12673×100: 12673 px is larger than any image side"):
        geometry.check_size(12673, 100)


def test_cut_is_the_center_and_resize_keeps_the_aspect_ratio():
    images = torch.rand(2, 3, 256, 384, generator=torch.Generator().manual_seed(0))
    cut = fit_to_size(images, (200, 300))
    assert torch.equal(cut, images[:, :, 28:228, 42:342])
    same_aspect = fit_to_size(images, (128, 192), resize=True)
    expected = F.interpolate(images, size=(128, 192), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.equal(same_aspect, expected)
    other_aspect = fit_to_size(images, (120, 200), resize=True)  # scaled to 133×200, then 6 rows cut each side
    assert other_aspect.shape == (2, 3, 120, 200)
    scaled = F.interpolate(images, size=(133, 200), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert torch.equal(other_aspect, scaled[:, :, 6:126])
    assert fit_to_size(images, (512, 512), resize=True).shape == (2, 3, 512, 512)  # resizing may enlarge
    with pytest.raises(ValueError, match=r"^size: 300×300 is larger than the 256×384 image"):
        fit_to_size(images, (300, 300))


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    return WuerstchenPipeline.from_pretrained(*tiny_checkpoints, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("requested", [(1080, 1920), (768, 1344), (1000, 1000), (1024, 2048)],
                         ids=["1920x1080", "1344x768", "1000x1000", "2048x1024"])
def test_exact_sizes_through_the_pipeline(pipe, requested):
    height, width = requested
    result = pipe.generate(["a lighthouse at night"], [3], height=height, width=width, **FAST)
    assert result.images[0].size == (width, height)
    assert result.generated_size == GENERATED[requested][0]


def test_resized_image_through_the_pipeline(pipe):
    result = pipe.generate(["a lighthouse at night"], [3], height=1080, width=1920, resize=True, **FAST)
    assert result.images[0].size == (1920, 1080)
    assert result.generated_size == (1152, 2048)
    assert np.asarray(result.images[0]).std() > 10  # an image, not a flat fill


def test_decoder_cuts_the_image_its_latents_make(pipe):
    """The prior and decoder halves as a job runs them: the decoder is told the requested size."""
    prompts, seeds = ["a cat", "a dog"], [1, 2]
    latents = pipe.prior(prompts, seeds, height=200, width=300, **{"steps": 2, "guidance_scale": 1.0}).latents
    assert latents.shape[-2:] == (6, 9)  # 256×384
    whole = pipe.decoder.decode(latents, prompts, seeds, steps=2)
    cut = pipe.decoder.decode(latents, prompts, seeds, steps=2, size=(200, 300))
    assert whole.shape == (2, 256, 384, 3) and cut.shape == (2, 200, 300, 3)
    assert np.array_equal(cut, whole[:, 28:228, 42:342])
    resized = pipe.decoder.decode(latents, prompts, seeds, steps=2, size=(256, 384), resize=True)
    assert np.array_equal(resized, whole)  # the size the latents make: nothing to resize
    with pytest.raises(ValueError, match=r"^size: 300×300 is larger than the 256×384 image"):
        pipe.decoder.decode(latents, prompts, seeds, steps=2, size=(300, 300))
    with pytest.raises(ValueError, match=r"^size must be \(height, width\)"):
        pipe.decoder.decode(latents, prompts, seeds, size=(200,))
    with pytest.raises(ValueError, match=r"^resize"):
        pipe.decoder.decode(latents, prompts, seeds, size=(200, 300), resize="yes")
