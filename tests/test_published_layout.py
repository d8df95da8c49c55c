"""Checkpoints at the published architecture sizes, written by diffusers' own pipelines in the published layout,
load strictly into our stages and compute what diffusers' modules compute.

Stage C and Stage B have about a billion parameters each, so this is the slow test of the suite (a minute or more
on two cores; marked slow: .ci/run runs it, a bare `pytest` does not): the reference modules are built on the meta
device and filled with random weights (their own initialisation of Stage B takes minutes), saved as the fp16
variant, and freed before ours are loaded. Only the text encoders are small: two layers, with the published hidden
widths (1280 for the prior, 1024 for the decoder).
"""

import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import (
    PaellaVQModel,
    WuerstchenDecoderPipeline,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    WuerstchenPriorPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from wurstfabrik.pipeline import WuerstchenPipeline, load_component
from wurstfabrik.pipeline.decoder import StageB
from wurstfabrik.pipeline.prior import StageC
from wurstfabrik.pipeline.tiny import write_tiny_checkpoints
from wurstfabrik.pipeline.vqgan import StageA

torch.set_num_threads(1)

pytestmark = pytest.mark.slow

PRIOR_SIZES = dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24)
DECODER_SIZES = dict(c_cond=1024, clip_embd=1024)  # the rest are WuerstchenDiffNeXt's defaults, as published
PROMPT = "a photo of a cat sitting on the red sofa"
NEEDED_MEMORY_GB = 13  # measured peak: 11 GB, while the whole pipeline is loaded in float32


def available_memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.inf  # unknown: try


def fill(module: torch.nn.Module, seed: int, head: str) -> None:
    """Random weights at a default-like scale, N(0, 1/fan_in); the output head `head` is scaled down further so
    that Stage C's 1 / |1 - b| and Stage B's 1 / sigmoid(b) stay moderate and do not amplify rounding."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() > 1:
                std = (0.25 if name == f"{head}.weight" else 1.0) / math.sqrt(param[0].numel())
            else:
                std = 0.02
            param.normal_(0.0, std, generator=generator)


def on_meta(cls, **config):
    """The reference module without its initialisation (Stage B's is quadratic in its depth: minutes)."""
    with torch.device("meta"), pytest.MonkeyPatch.context() as patch:
        if hasattr(cls, "_init_weights"):
            patch.setattr(cls, "_init_weights", lambda self, module: None)
        module = cls(**config)
    return module.to_empty(device="cpu").eval()


def text_encoder(tokenizer, width: int, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=width // 64, max_position_embeddings=77,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"], projection_dim=width)
    return CLIPTextModel(config).eval()


@dataclass
class Published:
    prior_dir: Path
    decoder_dir: Path
    inputs: dict = field(default_factory=dict)  # component -> its forward's inputs
    expected: dict = field(default_factory=dict)  # component -> the reference module's output
    keys: dict = field(default_factory=dict)  # component -> {state dict key: shape} of the reference module


@torch.no_grad()
def write_prior_repo(folder: Path, tokenizer, published: Published) -> None:
    prior = on_meta(WuerstchenPrior, **PRIOR_SIZES)
    fill(prior, seed=1, head="out.1")
    encoder = text_encoder(tokenizer, PRIOR_SIZES["c_cond"], seed=2)
    pipe = WuerstchenPriorPipeline(tokenizer=tokenizer, text_encoder=encoder.half(), prior=prior.half(),
                                   scheduler=DDPMWuerstchenScheduler())
    pipe.save_pretrained(str(folder), safe_serialization=True, variant="fp16")
    prior.float()  # the fp16-rounded weights that were saved, computed in float32 as ours will be
    encoder.float()

    generator = torch.Generator().manual_seed(3)
    x, r = torch.randn(1, 16, 2, 2, generator=generator), torch.tensor([0.6])
    c = torch.randn(1, 77, PRIOR_SIZES["c_cond"], generator=generator)
    heads = []
    prior.out.register_forward_hook(lambda module, args, output: heads.append(output))
    published.inputs["prior"] = (x, r, c)
    published.expected["prior"] = prior(x, r, c)
    # The output divides by |1 - b|: near b = 1 it would amplify rounding, and the comparison would say little.
    assert (1 - heads[-1].chunk(2, dim=1)[1]).abs().min() > 0.2
    published.keys["prior"] = {k: tuple(v.shape) for k, v in prior.state_dict().items()}
    tokens = tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    published.expected["prior text"] = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]


@torch.no_grad()
def write_decoder_repo(folder: Path, tokenizer, published: Published) -> None:
    decoder = on_meta(WuerstchenDiffNeXt, **DECODER_SIZES)
    fill(decoder, seed=4, head="clf.1")
    vqgan = on_meta(PaellaVQModel)
    fill(vqgan, seed=5, head="out_block.0")
    vqgan.down_blocks[-1][1].reset_running_stats()  # to_empty leaves the BatchNorm's statistics uninitialised
    encoder = text_encoder(tokenizer, DECODER_SIZES["clip_embd"], seed=6)
    pipe = WuerstchenDecoderPipeline(tokenizer=tokenizer, text_encoder=encoder.half(), decoder=decoder.half(),
                                     scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan.half())
    pipe.save_pretrained(str(folder), safe_serialization=True, variant="fp16")
    for module in (decoder, vqgan, encoder):
        module.float()

    generator = torch.Generator().manual_seed(7)
    x, r = torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([0.3])
    effnet = torch.randn(1, 16, 2, 2, generator=generator)
    clip = torch.randn(1, 77, DECODER_SIZES["clip_embd"], generator=generator)
    published.inputs["decoder"] = (x, r, effnet, clip)
    published.expected["decoder"] = decoder(x, r, effnet, clip)
    published.keys["decoder"] = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    latents = torch.randn(1, 4, 4, 4, generator=generator)
    published.inputs["vqgan"] = (latents,)
    published.expected["vqgan"] = vqgan.decode(latents).sample
    published.keys["vqgan"] = {k: tuple(v.shape) for k, v in vqgan.state_dict().items()}
    tokens = tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    published.expected["decoder text"] = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    if available_memory_gb() < NEEDED_MEMORY_GB:
        pytest.skip(f"needs about {NEEDED_MEMORY_GB} GB of free memory for the published sizes")
    root = tmp_path_factory.mktemp("published")
    tiny_prior, _ = write_tiny_checkpoints(root / "tiny")
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_prior / "tokenizer"))
    result = Published(root / "wuerstchen-prior", root / "wuerstchen")
    write_prior_repo(result.prior_dir, tokenizer, result)
    gc.collect()
    write_decoder_repo(result.decoder_dir, tokenizer, result)
    gc.collect()
    return result


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 throughout; the two implementations sum in different orders (fused q/k/v, SDPA), over a billion
    # parameters, so a few float32 ulps relative to the output's scale are expected, not more.
    assert got.shape == expected.shape
    assert torch.isfinite(expected).all()
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5 * max(scale, 1.0), (diff, scale)


def test_published_layout_folders(published):
    prior_index = json.loads((published.prior_dir / "model_index.json").read_text())
    decoder_index = json.loads((published.decoder_dir / "model_index.json").read_text())
    assert prior_index["_class_name"] == "WuerstchenPriorPipeline"
    assert decoder_index["_class_name"] == "WuerstchenDecoderPipeline"
    assert (published.prior_dir / "prior" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (published.decoder_dir / "decoder" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (published.decoder_dir / "text_encoder" / "model.fp16.safetensors").is_file()
    config = json.loads((published.prior_dir / "prior" / "config.json").read_text())
    assert {k: config[k] for k in PRIOR_SIZES} == PRIOR_SIZES


@pytest.mark.parametrize("kind, cls", [("prior", StageC), ("decoder", StageB), ("vqgan", StageA)])
def test_component_loads_strictly_and_matches_reference(published, kind, cls):
    repo = published.prior_dir if kind == "prior" else published.decoder_dir
    module = load_component(repo / kind, device="cpu", dtype=torch.float32)
    try:
        assert isinstance(module, cls)
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == published.keys[kind]
        with torch.no_grad():
            got = module.decode(*published.inputs[kind]) if kind == "vqgan" else module(*published.inputs[kind])
        assert_matches(got, published.expected[kind])
    finally:
        del module
        gc.collect()


def test_whole_pipeline_loads_the_published_layout(published):
    pipe = WuerstchenPipeline.from_pretrained(published.prior_dir, published.decoder_dir, device="cpu",
                                              dtype=torch.float32)
    try:
        with torch.no_grad():
            assert_matches(pipe.prior.prior(*published.inputs["prior"]), published.expected["prior"])
            assert_matches(pipe.decoder.decoder(*published.inputs["decoder"]), published.expected["decoder"])
            assert_matches(pipe.decoder.vqgan.decode(*published.inputs["vqgan"]), published.expected["vqgan"])
            assert_matches(pipe.prior.text.encode([PROMPT]).hidden_states, published.expected["prior text"])
            assert_matches(pipe.decoder.text.encode([PROMPT]).hidden_states, published.expected["decoder text"])
        # One step of each stage end to end at the smallest size: shapes and plumbing, not image quality.
        result = pipe.generate([PROMPT], [5], height=128, width=128, prior_steps=1, decoder_steps=1,
                               prior_guidance_scale=1.0)
        assert [image.size for image in result.images] == [(128, 128)] and result.truncated == [False]
    finally:
        del pipe
        gc.collect()
