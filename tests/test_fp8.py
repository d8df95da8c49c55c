"""quantize='fp8' on the CPU (torch._scaled_mm runs there too): which layers turn float8, how close a float8 layer
and a whole tiny generation stay to bfloat16, whole-graph compiles, the device check, and the job's records.

The refusal on a real GPU below compute capability 8.9 needs such a GPU; here the check is tested on its inputs."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from wurstfabrik.jobs.driver import JobError, check_resume
from wurstfabrik.jobs.provenance import job_id, job_params, sample_provenance
from wurstfabrik.jobs.spec import GENERATION_FIELDS, SpecError, default_spec
from wurstfabrik.pipeline import DecoderPipeline, PriorPipeline, WuerstchenPipeline, load_component
from wurstfabrik.pipeline.compiled import CompileOptions
from wurstfabrik.pipeline.fp8 import E4M3_MAX, Float8Linear, check_quantize, fp8_problem, quantize_linears, rowwise_fp8
from wurstfabrik.pipeline.geometry import Geometry
from wurstfabrik.store.manifest import write_job_params
from wurstfabrik.store.storage import open_output
from wurstfabrik.workers.fp8_probe import fp8_gpu_problem
from wurstfabrik.workers.models import StageModels

torch.set_num_threads(1)

PROMPTS = ["a cat", "sausages on a grill", "portrait of an astronaut"]
SEEDS = [1, 2, 3]
SETTINGS = dict(height=128, width=128, prior_steps=10, decoder_steps=6)

# Bounds from measurement on the tiny checkpoints (bfloat16 against fp8, these prompts and settings), with margin:
# - One layer: relative error (Frobenius) of a 256→512 layer on Gaussian inputs, measured 0.037. e4m3 keeps 3
#   mantissa bits, so each operand is rounded by up to 2^-4 = 6.25% of its value; sums of many terms average that.
LAYER_REL_ERROR = 0.06
# - Stage C's latents after 10 steps: relative error measured 0.018 (0.006 after 20 steps; after 3 it is 0.23, as
#   large as bfloat16's own difference between inductor and eager: the tiny random Stage C divides by |1 - b|
#   close to 0, so few steps amplify any rounding); two different seeds' latents differ by 1.33.
LATENT_REL_ERROR = 0.05
# - Images: PSNR measured 65-66 dB; two different seeds' images (the tiny random Stage A saturates half of the
#   pixels) already differ at 44 dB, so 50 dB tells close from unrelated.
MIN_PSNR_DB = 50.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rowwise_scales_map_each_row_onto_the_e4m3_range():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1e6, 3.0, -7.0]])
    quantized, scale = rowwise_fp8(x)
    assert quantized.dtype == torch.float8_e4m3fn and scale.shape == (3, 1) and scale.dtype == torch.float32
    assert quantized.float().abs().amax(dim=1).tolist() == [E4M3_MAX, 0.0, E4M3_MAX]
    assert torch.isfinite(scale).all() and (scale > 0).all()  # a zero row gets the floor, not a division by zero
    assert torch.allclose(quantized.float() * scale, x, rtol=2**-4, atol=1e-3 * 1e6 / E4M3_MAX)


def test_float8_linear_stays_close_to_linear():
    torch.manual_seed(0)
    linear = nn.Linear(256, 512).to(torch.bfloat16)
    layer = Float8Linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 512)
    x = torch.randn(2, 32, 256, dtype=torch.bfloat16)  # a batch of token sequences: rows are scaled one by one
    with torch.no_grad():
        expected, got = linear(x), layer(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert 0 < relative_error(got, expected) < LAYER_REL_ERROR
    zero = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert torch.equal(layer(zero)[0], linear.bias.detach())  # all-zero inputs: only the bias, finite


def test_quantize_linears_keeps_layers_cuda_cannot_take():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Sequential(nn.Linear(64, 24), nn.Linear(24, 16)))
    kept = quantize_linears(model)
    assert kept == ["2.0", "2.1"]  # 24 features is not a multiple of 16
    assert isinstance(model[0], Float8Linear) and type(model[2][0]) is nn.Linear


def test_every_float8_matmul_meets_cudas_layout_rules(tiny_checkpoints):
    """On the meta device, torch._scaled_mm checks what CUDA's kernel requires (row-major activations, a column-major
    weight, sizes divisible by 16, (rows, 1) and (1, out) float32 scales) without a GPU: whole Stage C and Stage B
    steps, Stage B in channels_last as compile puts it on CUDA."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    prior = load_component(tiny_checkpoints[0] / "prior", "cpu", torch.bfloat16, kind="prior")
    assert quantize_linears(prior) == []
    prior = prior.to("meta")
    cond = prior.condition(torch.empty(4, 77, prior.config.c_cond, **meta))
    assert prior.denoise(torch.empty(4, 16, 3, 3, **meta), torch.empty(4, device="meta"), cond).shape == (4, 16, 3, 3)
    decoder = load_component(tiny_checkpoints[1] / "decoder", "cpu", torch.bfloat16, kind="decoder")
    assert quantize_linears(decoder) == ["clip_mapper"]
    decoder = decoder.to("meta").to(memory_format=torch.channels_last)
    cond = decoder.condition(torch.empty(4, 16, 3, 3, **meta), torch.empty(4, 77, decoder.config.clip_embd, **meta),
                             latent_size=(32, 32))
    x = torch.empty(4, 4, 32, 32, **meta).contiguous(memory_format=torch.channels_last)
    assert decoder.denoise(x, torch.empty(4, device="meta"), cond).shape == (4, 4, 32, 32)
    with pytest.raises(RuntimeError, match="divisible by 16"):  # what keeps a layer in bfloat16
        Float8Linear(nn.Linear(24, 32)).to("meta")(torch.empty(2, 24, **meta))


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoints):
    prior, decoder = tiny_checkpoints
    return {q: WuerstchenPipeline.from_pretrained(prior, decoder, device="cpu", dtype=torch.bfloat16, quantize=q)
            for q in ("none", "fp8")}


def float8_layers(module: nn.Module) -> int:
    return sum(isinstance(m, Float8Linear) for m in module.modules())


def test_stage_c_and_stage_b_linear_layers_turn_float8_and_nothing_else(pipelines):
    plain, fp8 = pipelines["none"], pipelines["fp8"]
    for stage in (fp8.prior.prior, fp8.decoder.decoder):
        linear = [name for name, m in stage.named_modules() if type(m) is nn.Linear]
        # Tiny Stage B's CLIP mapper takes 24 features: the one layer CUDA's FP8 matmul cannot take.
        assert linear == ([] if stage is fp8.prior.prior else ["clip_mapper"])
        assert float8_layers(stage) > 0
    originals = sum(type(m) is nn.Linear for m in (*plain.prior.prior.modules(), *plain.decoder.decoder.modules()))
    assert float8_layers(fp8.prior.prior) + float8_layers(fp8.decoder.decoder) == originals - 1
    attention = fp8.prior.prior.blocks[2].attention
    assert isinstance(attention.to_qkv, Float8Linear) and isinstance(attention.to_out, Float8Linear)
    for untouched in (fp8.prior.text.model, fp8.decoder.text.model, fp8.decoder.vqgan):
        assert float8_layers(untouched) == 0
    assert fp8.prior.dtype == fp8.decoder.dtype == torch.bfloat16  # read from parameters, which stay bfloat16


def test_fp8_images_differ_from_bfloat16_and_stay_close(pipelines):
    latents = {q: p.prior(PROMPTS, SEEDS, height=128, width=128, steps=SETTINGS["prior_steps"]).latents
               for q, p in pipelines.items()}
    assert not torch.equal(latents["fp8"], latents["none"])
    assert relative_error(latents["fp8"], latents["none"]) < LATENT_REL_ERROR
    images = {q: np.stack([np.asarray(i) for i in p(PROMPTS, SEEDS, **SETTINGS)]) for q, p in pipelines.items()}
    assert not np.array_equal(images["fp8"], images["none"])
    for fp8_image, plain_image in zip(images["fp8"], images["none"], strict=True):
        assert psnr(fp8_image, plain_image) >= MIN_PSNR_DB


def test_fp8_stages_compile_to_whole_graphs(tiny_checkpoints, pipelines):
    prior, decoder = tiny_checkpoints
    options = CompileOptions(backend="aot_eager")  # dynamo's graphs and guards, without inductor's C++ build
    assert options.compile_kwargs()["fullgraph"] is True  # any graph break fails the call
    compiled_prior = PriorPipeline.from_pretrained(prior, device="cpu", dtype=torch.bfloat16, compile=options,
                                                   quantize="fp8")
    compiled_decoder = DecoderPipeline.from_pretrained(decoder, device="cpu", dtype=torch.bfloat16, compile=options,
                                                       quantize="fp8")
    eager = pipelines["fp8"]
    before = counters["stats"]["unique_graphs"]
    latents = compiled_prior(PROMPTS[:2], SEEDS[:2], height=128, width=128, steps=3).latents
    images = compiled_decoder.decode(latents, PROMPTS[:2], SEEDS[:2], steps=2)
    assert counters["stats"]["unique_graphs"] == before + 2  # one graph per stage
    assert torch.equal(latents, eager.prior(PROMPTS[:2], SEEDS[:2], height=128, width=128, steps=3).latents)
    assert np.array_equal(images, eager.decoder.decode(latents, PROMPTS[:2], SEEDS[:2], steps=2))


def test_fp8_offloads(tiny_checkpoints, pipelines):
    """Offloading moves a float8 layer's buffers like any weights: the same latents, block by block."""
    offloaded = PriorPipeline.from_pretrained(tiny_checkpoints[0], device="cpu", dtype=torch.bfloat16, quantize="fp8",
                                              offload="sequential")
    expected = pipelines["fp8"].prior(PROMPTS[:2], SEEDS[:2], height=128, width=128, steps=3).latents
    assert torch.equal(offloaded(PROMPTS[:2], SEEDS[:2], height=128, width=128, steps=3).latents, expected)


def test_fp8_needs_compute_capability_8_9():
    assert fp8_problem("cpu", None) is None
    for capability in ((8, 9), (9, 0), (10, 0), (12, 0)):
        assert fp8_problem("cuda", capability, "GPU") is None
    problem = fp8_problem("cuda", (8, 0), "NVIDIA A100-SXM4-80GB")
    assert "\n" not in problem and "8.9" in problem and "NVIDIA A100-SXM4-80GB has 8.0" in problem
    assert "has 7.5" in fp8_problem("cuda", (7, 5), "Tesla T4")
    assert "not on mps" in fp8_problem("mps", None)
    assert fp8_gpu_problem(default_spec("p", "o").placement, (0.0, 0.0)) is None  # CPU stages: nothing to probe


def test_a_wrong_quantize_mode_is_refused_in_one_line(tiny_checkpoints):
    with pytest.raises(ValueError, match="^quantize must be one of none, fp8, got 'int8'$"):
        check_quantize("int8")
    with pytest.raises(ValueError, match="^quantize must be one of"):
        PriorPipeline.from_pretrained(tiny_checkpoints[0], device="cpu", quantize="int8")
    with pytest.raises(SpecError, match="^quantize: must be one of"):
        default_spec("p", "o", quantize="int8")


def test_the_job_records_quantize_and_resume_refuses_a_change(tmp_path):
    plain, fp8 = default_spec("p", str(tmp_path)), default_spec("p", str(tmp_path), quantize="fp8")
    assert plain.quantize == "none"
    identity = {"given": "x", "source": "local", "revision": None, "fingerprint": "f"}
    params = job_params(fp8, identity, identity)
    assert params["quantize"] == "fp8" and fp8.sampler_params()["quantize"] == "fp8"  # job.json, manifest rows
    assert sample_provenance(params, "job")["sampler"]["quantize"] == "fp8"  # every image's metadata
    output = open_output(str(tmp_path))
    write_job_params(output, {"job_id": "job", "params": job_params(plain, identity, identity)})
    with pytest.raises(JobError, match=r"other generation parameters \(changed: quantize\)"):
        check_resume(params, output, False, fp8)
    check_resume(params, output, True, fp8)  # --force regenerates
    check_resume(job_params(plain, identity, identity), output, False, plain)
    # and the other way: an fp8 output resumed without quantize (its default, which the params leave out)
    write_job_params(output, {"job_id": "job", "params": params})
    with pytest.raises(JobError, match=r"other generation parameters \(changed: quantize\)"):
        check_resume(job_params(plain, identity, identity), output, False, plain)
    check_resume(params, output, False, fp8)


def test_outputs_made_before_quantize_existed_keep_their_job_id():
    """An output made before the field existed recorded no `quantize`: the default leaves the job id unchanged."""
    identity = {"given": "x", "source": "local", "revision": None, "fingerprint": "f"}
    spec = default_spec("p", "o")
    plain = job_params(spec, identity, identity)
    # What job_params gave before `quantize` was a field: every generation field but it.
    before = {**spec.model_dump(mode="json", include=set(GENERATION_FIELDS) - {"quantize"}),
              "prior_checkpoint": identity, "decoder_checkpoint": identity}
    assert job_id(plain) == job_id(before)
    assert job_id(job_params(default_spec("p", "o", quantize="fp8"), identity, identity)) != job_id(plain)
    assert sample_provenance(plain, "job")["sampler"]["quantize"] == "none"


def test_the_stage_actors_load_what_the_spec_asks(tiny_checkpoints, tmp_path):
    prior, decoder = tiny_checkpoints
    spec = default_spec("p", str(tmp_path), prior=str(prior), prior_text=str(prior), decoder=str(decoder),
                        quantize="fp8", dtype="bfloat16")
    models = StageModels(Geometry.from_checkpoints(prior, decoder))
    assert float8_layers(models.load_prior(spec)[0].prior) > 0
    assert float8_layers(models.load_decoder(spec)[0].decoder) > 0
