"""Model-only priors (a WuerstchenPrior config.json and weights, as the hub's warp-ai/wuerstchen-prior-model-*
repositories hold them): loaded as diffusers loads them, run with the text encoder of a companion prior pipeline,
and refused with a clear message wherever a different kind of checkpoint was expected."""

import json
import shutil

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

from wurstfabrik.pipeline import CheckpointError, DecoderPipeline, PriorPipeline, WuerstchenPipeline, load_component
from wurstfabrik.pipeline.text import TextEncoder
from wurstfabrik.pipeline.tiny import write_model_only_prior

torch.set_num_threads(1)

PROMPTS, SEEDS = ["a red cat", "a lighthouse at night"], [3, 4]
RUN = dict(height=128, width=128, steps=4)


@pytest.fixture(scope="module")
def model_only(tmp_path_factory):
    return write_model_only_prior(tmp_path_factory.mktemp("model-only") / "prior-model")


def load(checkpoint, **kwargs) -> PriorPipeline:
    return PriorPipeline.from_pretrained(checkpoint, device="cpu", dtype=torch.float32, **kwargs)


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        call(*args, **kwargs)
    return str(info.value)


def test_layout_is_the_hubs(model_only):
    assert sorted(p.name for p in model_only.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((model_only / "config.json").read_text())
    assert config["_class_name"] == "WuerstchenPrior" and config["dropout"] == 0.1


def test_loads_as_diffusers_loads_it(model_only):
    reference = WuerstchenPrior.from_pretrained(str(model_only)).eval()
    ours = load_component(model_only, device="cpu", dtype=torch.float32, kind="prior")
    expected_state = reference.state_dict()
    assert sorted(ours.state_dict()) == sorted(expected_state)
    assert all(torch.equal(v, expected_state[k]) for k, v in ours.state_dict().items())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 9, generator=generator)
    r = torch.tensor([0.9, 0.3])
    c = torch.randn(2, 77, ours.config.c_cond, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, r, c), reference(x, r, c), rtol=1e-5, atol=1e-5)


def test_generates_with_the_companions_text_encoder(model_only, tiny_checkpoints):
    prior_dir, decoder_dir = tiny_checkpoints
    pipe = load(model_only, prior_text=prior_dir)
    # The same as assembling it by hand: this prior's weights, the companion's text encoder and index values.
    text = TextEncoder.from_folders(prior_dir / "tokenizer", prior_dir / "text_encoder", torch.device("cpu"),
                                    torch.float32)
    by_hand = PriorPipeline(load_component(model_only, "cpu", torch.float32), text)
    latents = pipe(PROMPTS, SEEDS, **RUN).latents
    assert torch.equal(latents, by_hand(PROMPTS, SEEDS, **RUN).latents)
    assert not torch.allclose(latents, load(prior_dir)(PROMPTS, SEEDS, **RUN).latents)  # other weights
    images = WuerstchenPipeline.from_pretrained(model_only, decoder_dir, device="cpu", dtype=torch.float32,
                                                prior_text=prior_dir)(PROMPTS, SEEDS, height=128, width=256,
                                                                      prior_steps=3, decoder_steps=2)
    assert [image.size for image in images] == [(256, 128)] * 2


def test_training_keys_are_ignored_and_architecture_keys_refused(model_only, tmp_path, tiny_checkpoints):
    folder = shutil.copytree(model_only, tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dropout": 0.3, "c_hidden": [320, 640]}))
    message = error_of(load, folder, prior_text=tiny_checkpoints[0])
    assert "config.json" in message and "c_hidden" in message and "dropout" not in message


def test_wrong_kinds_are_named(model_only, tiny_checkpoints):
    prior_dir, decoder_dir = tiny_checkpoints
    assert "a decoder checkpoint where a prior was expected" in error_of(load, decoder_dir)
    message = error_of(DecoderPipeline.from_pretrained, model_only, device="cpu", dtype=torch.float32)
    assert "a model-only prior (no text encoder) where a decoder was expected" in message
    message = error_of(DecoderPipeline.from_pretrained, prior_dir, device="cpu", dtype=torch.float32)
    assert "a prior checkpoint where a decoder was expected" in message
    message = error_of(load, model_only, prior_text=model_only)
    assert "a model-only prior (no text encoder) where a prior pipeline (with text encoder) was expected" in message
    assert "a decoder checkpoint where a prior pipeline" in error_of(load, model_only, prior_text=decoder_dir)


def test_a_decoder_component_folder_is_not_a_model_only_prior(tiny_checkpoints):
    message = error_of(load, tiny_checkpoints[1] / "vqgan")
    assert "a vqgan component folder (config.json), not a checkpoint" in message
