"""Offload: the same images with the modules waiting on the CPU (whole, or block by block), every use of a module
inside its move, and no CUDA-only call on other devices (mps included, exercised here with a device argument)."""

import numpy as np
import pytest
import torch
from torch import nn

from wurstfabrik.pipeline import WuerstchenPipeline
from wurstfabrik.pipeline.checkpoint import default_dtype
from wurstfabrik.pipeline.offload import CopyStream, Offloader, host_copy

torch.set_num_threads(1)

RUN = dict(height=128, width=256, prior_steps=3, decoder_steps=2, decoder_guidance_scale=2.0)
PROMPTS, SEEDS, NEGATIVES = ["a red cat", "a lighthouse at night"], [7, 8], ["blurry", ""]


def load(checkpoints, offload: str) -> WuerstchenPipeline:
    return WuerstchenPipeline.from_pretrained(*checkpoints, device="cpu", dtype=torch.float32, offload=offload)


def generate(pipe: WuerstchenPipeline) -> np.ndarray:
    return np.stack([np.asarray(image) for image in pipe(PROMPTS, SEEDS, NEGATIVES, **RUN)])


def offloaders(pipe: WuerstchenPipeline) -> list[Offloader]:
    return [pipe.prior.offload, pipe.decoder.offload]


@pytest.fixture(scope="module")
def expected(tiny_checkpoints) -> np.ndarray:
    return generate(load(tiny_checkpoints, "none"))


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloaded_images_are_identical(tiny_checkpoints, expected, mode):
    pipe = load(tiny_checkpoints, mode)
    assert all(not offload.resident() for offload in offloaders(pipe))  # nothing on the device before a call
    assert np.array_equal(generate(pipe), expected)
    assert all(not offload.resident() for offload in offloaders(pipe))  # nor after it
    text = torch.zeros(1, 77, pipe.prior.prior.config.c_cond)
    if mode == "model":  # the weights really are away between uses: Stage C used outside its move fails
        with pytest.raises(RuntimeError):
            pipe.prior.prior.condition(text)
    else:  # its blocks move themselves, whoever calls them
        pipe.prior.prior.condition(text)
        assert not pipe.prior.offload.resident()


def test_sequential_offload_holds_one_block_at_a_time(tiny_checkpoints):
    pipe = load(tiny_checkpoints, "sequential")
    most, blocks = [0], 0
    for offload in offloaders(pipe):
        for unit in offload.slots:
            unit.register_forward_pre_hook(
                lambda module, args, offload=offload: most.__setitem__(0, max(most[0], len(offload.resident()))))
            blocks += 1
    generate(pipe)
    assert most[0] == 1 and blocks > 50


def test_model_offload_holds_one_module_at_a_time_without_cuda(tiny_checkpoints):
    """Off CUDA there is no copy stream, so the next module is copied when it starts, not while another runs."""
    pipe = load(tiny_checkpoints, "model")
    seen = []
    for offload in offloaders(pipe):
        for stage in offload.slots:
            for module in stage.modules():  # every layer of every stage, as it runs
                module.register_forward_pre_hook(
                    lambda module, args, offload=offload: seen.append(len(offload.resident())))
    generate(pipe)
    assert len(seen) > 300 and set(seen) == {1}
    assert sorted(type(m).__name__ for o in offloaders(pipe) for m in o.slots) == \
        ["ClipTextModel", "ClipTextModel", "StageA", "StageB", "StageC"]


def test_offload_and_compile_are_refused_together(tiny_checkpoints):
    with pytest.raises(ValueError, match="offload='model' cannot be combined with compile"):
        WuerstchenPipeline.from_pretrained(*tiny_checkpoints, device="cpu", dtype=torch.float32, offload="model",
                                           compile=True)
    with pytest.raises(ValueError, match="^offload must be one of none, model, sequential"):
        load(tiny_checkpoints, "cpu")


@pytest.mark.parametrize("device", ["cpu", "mps", "meta"])
def test_device_specific_paths_make_no_cuda_call_elsewhere(device):
    """This torch has no CUDA: an unguarded CUDA call here (pinning memory, a stream) raises."""
    device = torch.device(device)
    tensor = torch.arange(6.0)
    copy = host_copy(tensor, device)
    assert not copy.is_pinned() and torch.equal(copy, tensor)
    stream = CopyStream(device)
    assert stream.stream is None
    with stream.copying():
        stream.hand_over([tensor])
    assert default_dtype(device) == torch.float32  # half precision on mps only when asked for
    if device.type != "cpu":
        return  # placing modules allocates (placeholders) on the device: mps cannot here, meta is not dense
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for mode in ("model", "sequential"):
        offload = Offloader(mode, device)
        offload.manage(module)
        assert offload.slots and not offload.resident()
        assert all(p.device == device and p.numel() == 0 for p in module.parameters())  # placeholders, no memory
        with offload.running(module):
            pass
