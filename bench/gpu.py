"""The engine on one GPU against diffusers' reference on the same GPU, in one run: images/s at 1024×1024 for the
reference (eager, and compiled as its docs say) and ours (eager, compiled, compiled + CUDA graphs) at batch 1 and
batch 8, per-stage milliseconds, achieved TFLOP/s against the FLOP count, peak GPU memory, cold and warm compile
times, and the bfloat16-vs-float32 image difference. With --quantize none,fp8, also ours compiled with Stage C's and
Stage B's linear layers in float8 (with and without CUDA graphs) and the fp8-vs-bfloat16 image difference.

    python bench/gpu.py                 # one H100/H200 in under 8 minutes; writes bench/results/gpu-<gpu>.json
    python bench/gpu.py --dry-run       # the whole script on the CPU at tiny sizes (compiles with dynamo only)
    python bench/gpu.py --batches 8,16 --quantize none,fp8   # bfloat16 and fp8 rows (fp8 needs sm_89 or newer)

It needs torch, transformers, safetensors, pillow, numpy, pyarrow and diffusers 0.42.1: no Ray, no download. The
published architecture sizes are built in memory with random weights (bench/pipeline.py's builders) and ours holds
the reference's very weights. The reference cannot batch different prompts, so its batch is one prompt with
num_images_per_prompt; ours is that many different prompts. Rows run in order of importance; a row that would not
fit in --budget-s is skipped and says so.
"""

import sys
from pathlib import Path

# Run as `python bench/gpu.py`: the repository root replaces this folder on sys.path, so that this folder's
# modules import as `bench.*`.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import datetime
import json
import math
import re
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import __version__ as diffusers_version
from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS, WuerstchenDiffNeXt, WuerstchenPrior
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTokenizer
from transformers.utils import logging as hf_logging

from bench.pipeline import (
    DECODER_GUIDANCE,
    DECODER_STEPS,
    FULL_DECODER,
    FULL_DECODER_TEXT,
    FULL_PRIOR,
    FULL_PRIOR_TEXT,
    PRIOR_GUIDANCE,
    assemble_reference,
    batch_prompts,
    random_stage,
    random_text_encoder,
    random_vqgan,
    timed,
)
from wurstfabrik.pipeline import DecoderPipeline, PriorPipeline, WuerstchenPipeline, decoder_seed
from wurstfabrik.pipeline.checkpoint import COMPONENTS, build_config
from wurstfabrik.pipeline.compile_cache import CompileCache
from wurstfabrik.pipeline.compiled import CompileOptions
from wurstfabrik.pipeline.fp8 import QUANTIZE_MODES, fp8_problem, quantize_linears
from wurstfabrik.pipeline.text import TextEncoder
from wurstfabrik.pipeline.tiny import (
    DECODER_TEXT_WIDTH,
    PRIOR_TEXT_WIDTH,
    TINY_DECODER,
    TINY_PRIOR,
    TINY_VQGAN,
    write_tiny_checkpoints,
)

# The issue's count (torch's FlopCounter on the published configs at 1024², default settings) and one H100's bf16
# dense matrix throughput as the issue takes it; this script counts its own FLOPs as well.
ISSUE_TFLOP_PER_IMAGE = 103.0
H100_BF16_TFLOPS = 790.0
PRIOR_STEPS = len(DEFAULT_STAGE_C_TIMESTEPS) - 1
TINY_PRIOR_TEXT = dict(hidden_size=PRIOR_TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=2 * PRIOR_TEXT_WIDTH)
TINY_DECODER_TEXT = dict(hidden_size=DECODER_TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=2 * DECODER_TEXT_WIDTH)
FIRST_SEED = 1000
GRAPH_COMPILE_GUESS_S = 60.0  # one stage's graph, cold, until one is measured
RECIPE_FLAGS = dict(conv_1x1_as_mm=True, coordinate_descent_tuning=True, epilogue_fusion=False)


@dataclass
class Row:
    system: str
    batch: int
    s_per_batch: float | None = None
    images_per_s: float | None = None
    timed_runs: list | None = None
    first_call_s: float | None = None  # the warm-up call: compiles and captures where there is anything to do
    peak_memory_gib: float | None = None
    ratio_to_reference_eager: float | None = None
    ratio_to_reference_compiled: float | None = None
    note: str | None = None  # why it was skipped or failed


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def reference_config(config) -> dict:
    """One of our config dataclasses as the reference class's arguments (lists where we hold tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def build_reference(tokenizers: Path, full: bool, device: torch.device, dtype: torch.dtype):
    """diffusers' prior and decoder pipelines with random weights, the published sizes or tiny ones."""
    prior_dir, decoder_dir = tokenizers / "prior", tokenizers / "decoder"
    sizes = (FULL_PRIOR_TEXT, FULL_PRIOR, FULL_DECODER_TEXT, FULL_DECODER, {}) if full else \
        (TINY_PRIOR_TEXT, reference_config(TINY_PRIOR), TINY_DECODER_TEXT, reference_config(TINY_DECODER),
         reference_config(TINY_VQGAN))
    prior = dict(tokenizer=CLIPTokenizer.from_pretrained(str(prior_dir / "tokenizer")),
                 text_encoder=random_text_encoder(prior_dir / "text_encoder", sizes[0], device, dtype, seed=1),
                 prior=random_stage(WuerstchenPrior, sizes[1], "out.1", device, dtype, seed=2))
    decoder = dict(tokenizer=CLIPTokenizer.from_pretrained(str(decoder_dir / "tokenizer")),
                   text_encoder=random_text_encoder(decoder_dir / "text_encoder", sizes[2], device, dtype, seed=3),
                   decoder=random_stage(WuerstchenDiffNeXt, sizes[3], "clf.1", device, dtype, seed=4),
                   vqgan=random_vqgan(sizes[4], device, dtype, seed=5))
    return assemble_reference(prior, decoder, prior_dir, decoder_dir, device)


def ours_from_reference(prior_pipe, decoder_pipe) -> WuerstchenPipeline:
    """Our pipeline on the reference's weights: the same tensors (our fused q/k/v aside) and the same text encoders."""
    def stage(kind: str, module: torch.nn.Module) -> torch.nn.Module:
        config = build_config(kind, dict(module.config), Path(f"<{kind} in memory>"))
        with torch.device("meta"):
            ours = COMPONENTS[kind][2](config)
        ours.load_state_dict(module.state_dict(), strict=True, assign=True)
        return ours.eval().requires_grad_(False)

    prior = PriorPipeline(stage("prior", prior_pipe.prior), TextEncoder(prior_pipe.tokenizer, prior_pipe.text_encoder),
                          latent_mean=prior_pipe.config.latent_mean, latent_std=prior_pipe.config.latent_std,
                          resolution_multiple=prior_pipe.config.resolution_multiple)
    decoder = DecoderPipeline(stage("decoder", decoder_pipe.decoder), stage("vqgan", decoder_pipe.vqgan),
                              TextEncoder(decoder_pipe.tokenizer, decoder_pipe.text_encoder),
                              latent_dim_scale=decoder_pipe.config.latent_dim_scale)
    return WuerstchenPipeline(prior, decoder)


class Systems:
    """Each system's text to image for a batch of b images at the benchmark's settings."""

    def __init__(self, reference, ours: WuerstchenPipeline, height: int, width: int):
        self.reference_prior, self.reference_decoder = reference
        self.ours = ours
        self.height, self.width = height, width

    def reference(self, b: int) -> list:
        prompt = batch_prompts(1)[0]
        seeds = [FIRST_SEED + i for i in range(b)]
        latents = self.reference_prior(prompt, height=self.height, width=self.width, num_images_per_prompt=b,
                                       timesteps=DEFAULT_STAGE_C_TIMESTEPS, guidance_scale=PRIOR_GUIDANCE,
                                       generator=[torch.Generator().manual_seed(s) for s in seeds]).image_embeddings
        generators = [torch.Generator().manual_seed(decoder_seed(s)) for s in seeds]
        return self.reference_decoder(latents, prompt, num_inference_steps=DECODER_STEPS,
                                      guidance_scale=DECODER_GUIDANCE, generator=generators, output_type="pil").images

    def ours_run(self, b: int) -> list:
        return self.ours(batch_prompts(b), [FIRST_SEED + i for i in range(b)], height=self.height, width=self.width,
                         prior_timesteps=list(DEFAULT_STAGE_C_TIMESTEPS), prior_guidance_scale=PRIOR_GUIDANCE,
                         decoder_steps=DECODER_STEPS, decoder_guidance_scale=DECODER_GUIDANCE)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def memory_held(device: torch.device) -> dict:
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)} \
        if device.type == "cuda" else {}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(row: Row, run, repeats: int, device: torch.device, budget: Budget, estimate_s: float) -> Row:
    """One warm-up call, then `repeats` timed ones; skipped if the estimate does not fit in the budget."""
    if budget.left() < estimate_s:
        row.note = f"skipped: needs about {estimate_s:.0f} s, {max(budget.left(), 0):.0f} s of the budget left"
        print(f"  {row.system:34s} batch {row.batch}: {row.note}", flush=True)
        return row
    reset_peak(device)
    try:
        row.first_call_s, _ = timed(lambda: run(row.batch), device)
        row.timed_runs = [round(timed(lambda: run(row.batch), device)[0], 4) for _ in range(repeats)]
    except Exception as e:  # a system that fails (a graph break, out of memory) is a result, not the end of the run
        row.note = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        print(f"  {row.system:34s} batch {row.batch}: {row.note}", flush=True)
        return row
    row.s_per_batch = statistics.median(row.timed_runs)
    row.images_per_s = row.batch / row.s_per_batch
    row.peak_memory_gib = peak_memory(device)
    print(f"  {row.system:34s} batch {row.batch}: {row.images_per_s:8.3f} images/s  {row.s_per_batch:8.3f} s/batch  "
          f"first call {row.first_call_s:7.2f} s" + (f"  peak {row.peak_memory_gib:.1f} GiB" if
                                                     row.peak_memory_gib else ""), flush=True)
    return row


def count_flops(ours: WuerstchenPipeline, height: int, width: int) -> dict:
    """TFLOP per image at these settings by torch's FlopCounter: text encoders, one guided Stage C step (two rows),
    one Stage B step, Stage A."""
    prior, decoder = ours.prior, ours.decoder
    h, w = prior.latent_size(height, width)
    bh, bw = decoder.latent_size(h, w)
    counts = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            prior.text.encode(["a photo of a cat", ""])
            decoder.text.encode(["a photo of a cat"])
        counts["text_encoders"] = counter.get_total_flops()
        hidden = prior.text.encode(["a photo of a cat", ""]).hidden_states
        cond = prior.prior.condition(hidden)
        x = torch.randn(2, prior.prior.config.c_in, h, w, device=prior.device, dtype=prior.dtype)
        with FlopCounterMode(display=False) as counter:
            prior.prior.denoise(x, torch.full((2,), 0.5, device=prior.device), cond)
        counts["stage_c_step"] = counter.get_total_flops()
        effnet = torch.randn(1, prior.prior.config.c_in, h, w, device=decoder.device, dtype=decoder.dtype)
        cond = decoder.decoder.condition(effnet, decoder.text.encode(["a cat"]).hidden_states, latent_size=(bh, bw))
        x = torch.randn(1, decoder.decoder.config.c_in, bh, bw, device=decoder.device, dtype=decoder.dtype)
        with FlopCounterMode(display=False) as counter:
            decoder.decoder.denoise(x, torch.full((1,), 0.5, device=decoder.device), cond)
        counts["stage_b_step"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            decoder.vqgan.decode(x)
        counts["stage_a"] = counter.get_total_flops()
    tflop = {k: v / 1e12 for k, v in counts.items()}
    tflop["per_image"] = (tflop["text_encoders"] + PRIOR_STEPS * tflop["stage_c_step"]
                          + DECODER_STEPS * tflop["stage_b_step"] + tflop["stage_a"])
    return tflop


def stage_times(ours: WuerstchenPipeline, b: int, height: int, width: int, device: torch.device) -> dict:
    """Milliseconds per batch of b: each text encoder, a Stage C step, a Stage B step, Stage A. The steps are a
    stage's call less its text encoder (and, for Stage B, less Stage A), divided by its steps."""
    prompts, seeds = batch_prompts(b), [FIRST_SEED + i for i in range(b)]
    prior, decoder = ours.prior, ours.decoder
    settings = dict(height=height, width=width, timesteps=list(DEFAULT_STAGE_C_TIMESTEPS),
                    guidance_scale=PRIOR_GUIDANCE)
    prior_text_s, _ = timed(lambda: prior.text.encode(prompts + [""] * b), device)
    prior_s, result = timed(lambda: prior(prompts, seeds, **settings), device)
    decoder_text_s, _ = timed(lambda: decoder.text.encode(prompts), device)
    h, w = decoder.latent_size(*result.latents.shape[-2:])
    latent = torch.randn(b, decoder.decoder.config.c_in, h, w, device=device, dtype=decoder.dtype)
    with torch.no_grad():
        stage_a_s, _ = timed(lambda: decoder.vqgan.decode(latent), device)
    decode_s, _ = timed(lambda: decoder.decode(result.latents, prompts, seeds, steps=DECODER_STEPS,
                                               guidance_scale=DECODER_GUIDANCE), device)
    ms = {"batch": b, "prior_text_encoder": prior_text_s * 1e3, "decoder_text_encoder": decoder_text_s * 1e3,
          "stage_c_step": (prior_s - prior_text_s) / PRIOR_STEPS * 1e3,
          "stage_b_step": (decode_s - decoder_text_s - stage_a_s) / DECODER_STEPS * 1e3, "stage_a": stage_a_s * 1e3,
          "prior_call": prior_s * 1e3, "decoder_call": decode_s * 1e3}
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in ms.items()}


def image_difference(a, b) -> dict:
    a, b = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    return {"max_levels": float(np.abs(a - b).max()), "mean_levels": float(np.abs(a - b).mean()),
            "psnr_db": float(10 * math.log10(255**2 / mse)) if mse else None}


def quantized(ours: WuerstchenPipeline) -> WuerstchenPipeline:
    """Ours with Stage C's and Stage B's linear layers in float8, as from_pretrained(quantize="fp8") makes them."""
    quantize_linears(ours.prior.prior)
    quantize_linears(ours.decoder.decoder)
    return ours


def image_differences(a: list, b: list) -> dict:
    """Per-image PSNR of two runs on the same prompts and seeds, and the first image's difference in levels."""
    psnr = [image_difference(x, y)["psnr_db"] for x, y in zip(a, b, strict=True)]
    finite = [v for v in psnr if v is not None]  # None: identical images
    return {**image_difference(a[0], b[0]), "images": len(psnr), "psnr_db_per_image": psnr,
            "psnr_db_min": min(finite) if finite else None}


def to_float32(ours: WuerstchenPipeline) -> None:
    """Ours in float32, eager, without TF32 (cuDNN's convolutions default to it)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for module in (ours.prior.prior, ours.prior.text.model, ours.decoder.decoder, ours.decoder.vqgan,
                   ours.decoder.text.model):
        module.float()
    ours.compile(False)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU (128×128), compiling with dynamo only (backend eager)")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    parser.add_argument("--repeats", type=int, help="timed runs per row after its warm-up (default 2; 1 dry)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the whole run; rows that would not fit are skipped (default 420)")
    parser.add_argument("--backend", help="torch.compile backend (default inductor; eager with --dry-run)")
    parser.add_argument("--recipe-flags", action="store_true",
                        help="compile ours with the inductor flags of PyTorch's SDXL recipe (conv_1x1_as_mm, "
                             "coordinate_descent_tuning, epilogue_fusion off); compare with a run without")
    parser.add_argument("--max-autotune", action="store_true", help="compile ours with inductor's max_autotune")
    parser.add_argument("--quantize", default="none",
                        help="ours' precisions, comma-separated: none (bfloat16) and/or fp8, which adds the rows "
                             "'ours compiled fp8' and 'ours compiled fp8 + CUDA graphs'; the bfloat16 rows always run "
                             "(default none)")
    parser.add_argument("--out", help="JSON file to write (default bench/results/gpu-<gpu name>.json; none dry)")
    parser.add_argument("--device", help="cuda if available, else cpu")
    args = parser.parse_args(argv)
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    if min(args.batches) < 1:
        parser.error("--batches must be positive")
    args.quantize = [q.strip() for q in args.quantize.split(",")]
    if not set(args.quantize) <= set(QUANTIZE_MODES):
        parser.error(f"--quantize takes {', '.join(QUANTIZE_MODES)}, comma-separated")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    dtype = torch.bfloat16
    full = not args.dry_run
    height = width = 1024 if full else 128
    repeats = args.repeats or (1 if args.dry_run else 2)
    backend = args.backend or ("eager" if args.dry_run else "inductor")
    if device.type == "cpu":
        torch.set_num_threads(1)  # two threads on shared cores make small ops hundreds of times slower
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({gpu}), bfloat16, torch {torch.__version__}, diffusers {diffusers_version}, "
          f"{'tiny sizes (dry run)' if args.dry_run else 'published sizes, random weights'}, {height}x{width}",
          flush=True)

    result = {"gpu": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "diffusers": diffusers_version, "dtype": "bfloat16", "height": height, "width": width,
              "dry_run": args.dry_run, "backend": backend, "quantize": args.quantize,
              "settings": {"prior_steps": PRIOR_STEPS, "prior_guidance": PRIOR_GUIDANCE, "decoder_steps": DECODER_STEPS,
                           "decoder_guidance": DECODER_GUIDANCE, "repeats": repeats},
              "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        cold_cache = CompileCache(tmp / "cold")
        cold_cache.restore()  # an empty inductor cache: the first compiles are cold, and the user's cache untouched
        start = time.perf_counter()
        write_tiny_checkpoints(tmp / "tiny")  # for the tokenizers and the pipelines' settings
        reference = build_reference(tmp / "tiny", full, device, dtype)
        ours = ours_from_reference(*reference)
        # Built before the reference is compiled (its compiled modules' state dicts have other names); it holds the
        # reference's tensors but its own float8 copies of the linear layers' weights.
        fp8_skip = fp8_problem(device.type, torch.cuda.get_device_capability(device) if device.type == "cuda"
                               else None, gpu) if "fp8" in args.quantize else None
        ours_fp8 = quantized(ours_from_reference(*reference)) if "fp8" in args.quantize and not fp8_skip else None
        result["build_s"] = round(time.perf_counter() - start, 1)
        print(f"built both in {result['build_s']} s", flush=True)

        flops = count_flops(ours, height, width)
        result["tflop"] = {k: float(f"{v:.6g}") for k, v in flops.items()}
        print(f"TFLOP per image: {flops['per_image']:.4g} (Stage C step {flops['stage_c_step']:.4g} × {PRIOR_STEPS}, "
              f"Stage B step {flops['stage_b_step']:.4g} × {DECODER_STEPS}, Stage A {flops['stage_a']:.4g}, "
              f"text {flops['text_encoders']:.3g}); the issue counts {ISSUE_TFLOP_PER_IMAGE} at 1024²", flush=True)

        systems = Systems(reference, ours, height, width)
        # Each batch size is measured at its own bucket (no padding into an earlier, larger graph).
        compile_options = CompileOptions(backend=backend, cuda_graphs=False, compile_smaller_after=0,
                                         max_autotune=args.max_autotune,
                                         **(RECIPE_FLAGS if args.recipe_flags else {}))
        result["compile_options"] = {k: v for k, v in asdict(compile_options).items() if k != "cuda_graphs"}
        reference_compile = dict(fullgraph=True, mode="reduce-overhead") if backend == "inductor" else \
            dict(fullgraph=True, backend=backend)
        result["reference_compile"] = {k: str(v) for k, v in reference_compile.items()}
        rows = {}
        per_graph_s = [GRAPH_COMPILE_GUESS_S]

        def row(system: str, b: int, run, graphs: int = 0) -> Row:
            eager = rows.get(("ours eager", b)) or rows.get(("reference eager", b))
            per_call = eager.s_per_batch if eager and eager.s_per_batch else 0.0
            estimate = graphs * per_graph_s[-1] + (1 + repeats) * per_call
            rows[system, b] = measure(Row(system, b), run, repeats, device, budget, estimate)
            return rows[system, b]

        def set_cuda_graphs(on: bool, pipe: WuerstchenPipeline = ours) -> None:
            """At every batch size, whatever the default's cuda_graph_max_batch."""
            for denoiser in (pipe.prior.denoiser, pipe.decoder.denoiser):
                denoiser.cuda_graphs, denoiser.cuda_graph_max_batch = on, None

        def keeping(system: str, run):
            """run, with the images of each batch kept for the precision comparisons."""
            def call(b: int) -> list:
                images[system, b] = run(b)
                return images[system, b]
            return call

        # Eager first, then compiled (which puts Stage B and Stage A in channels_last on CUDA); in each, the largest
        # batch first: what a job runs.
        images, graph_memory = {}, {}
        result["cuda_graph_memory_gib"] = graph_memory
        batches = sorted(args.batches, reverse=True)
        eager_steps = (ours.prior.denoiser, ours.decoder.denoiser)
        for b in batches:
            row("ours eager", b, keeping("ours eager", systems.ours_run))
            row("reference eager", b, systems.reference)
        ours.compile(compile_options)
        reference[0].prior = torch.compile(reference[0].prior, **reference_compile)
        reference[1].decoder = torch.compile(reference[1].decoder, **reference_compile)
        for b in batches:
            compiled = row("ours compiled", b, keeping("ours compiled", systems.ours_run), graphs=2)
            if compiled.first_call_s and compiled.s_per_batch and backend == "inductor":
                per_graph_s.append(max(compiled.first_call_s - compiled.s_per_batch, 1.0) / 2)
            set_cuda_graphs(True)  # the same compiled steps, now captured (on the CPU: replayed on static buffers)
            held = memory_held(device)
            row("ours compiled + CUDA graphs", b, systems.ours_run)
            if device.type == "cuda":  # what the captured graphs keep: static buffers and their memory pool
                graph_memory[f"batch {b}"] = {k: round((v - held[k]) / 2**30, 3)
                                              for k, v in memory_held(device).items()}
            set_cuda_graphs(False)
            row("reference compiled", b, systems.reference, graphs=2)
        if fp8_skip:
            for b in batches:
                rows["ours compiled fp8", b] = Row("ours compiled fp8", b, note=f"skipped: {fp8_skip}")
        elif ours_fp8 is not None:
            fp8_systems = Systems(reference, ours_fp8, height, width)
            ours_fp8.compile(compile_options)
            for b in batches:
                row("ours compiled fp8", b, keeping("ours compiled fp8", fp8_systems.ours_run), graphs=2)
                set_cuda_graphs(True, ours_fp8)
                row("ours compiled fp8 + CUDA graphs", b, fp8_systems.ours_run)
                set_cuda_graphs(False, ours_fp8)
            both = [b for b in batches if ("ours compiled fp8", b) in images and ("ours compiled", b) in images]
            if both:
                b = min(both)
                result["fp8_vs_bf16"] = {"batch": b, "compared": "ours compiled fp8 against ours compiled (bfloat16)",
                                         **image_differences(images["ours compiled fp8", b],
                                                             images["ours compiled", b]),
                                         "note": "random weights: the published weights may differ more or less"}
                print(f"fp8 vs bfloat16, batch {b} (levels of 255, PSNR dB): {result['fp8_vs_bf16']}", flush=True)

        for (_, b), r in rows.items():
            for name in ("eager", "compiled"):
                base = rows.get((f"reference {name}", b))
                if r.images_per_s and base and base.images_per_s:
                    setattr(r, f"ratio_to_reference_{name}", round(r.images_per_s / base.images_per_s, 3))
        result["rows"] = [asdict(r) for r in rows.values()]

        # The best bfloat16 row, measured against bfloat16's bound; fp8's best gets its per-stage times apart.
        best = max((r for r in rows.values() if r.system.startswith("ours") and "fp8" not in r.system
                    and r.images_per_s), key=lambda r: (r.batch, r.images_per_s), default=None)
        if best is not None:
            result["best"] = {"system": best.system, "batch": best.batch, "images_per_s": best.images_per_s,
                              "tflops_achieved": best.images_per_s * flops["per_image"]}
            if re.search(r"H100|H200", gpu):
                result["best"]["fraction_of_bound"] = result["best"]["tflops_achieved"] / H100_BF16_TFLOPS
            if budget.left() > 30:
                if "compiled" in best.system:
                    set_cuda_graphs("graphs" in best.system)
                else:
                    ours.prior.denoiser, ours.decoder.denoiser = eager_steps
                result["stage_ms"] = {"system": best.system, **stage_times(ours, best.batch, height, width, device)}
                print(f"per stage ({best.system}, batch {best.batch}), ms: {result['stage_ms']}", flush=True)
        best_fp8 = max((r for r in rows.values() if "fp8" in r.system and r.images_per_s),
                       key=lambda r: (r.batch, r.images_per_s), default=None)
        if best_fp8 is not None and budget.left() > 30:
            set_cuda_graphs("graphs" in best_fp8.system, ours_fp8)
            result["stage_ms_fp8"] = {"system": best_fp8.system,
                                      **stage_times(ours_fp8, best_fp8.batch, height, width, device)}
            print(f"per stage ({best_fp8.system}, batch {best_fp8.batch}), ms: {result['stage_ms_fp8']}", flush=True)

        # Compile times: cold from the rows above; warm from the saved artifacts alone, in an empty inductor cache.
        cold = {f"batch {b}": round(r.first_call_s - r.s_per_batch, 2) for (s, b), r in rows.items()
                if s == "ours compiled" and r.s_per_batch}
        result["compile_s"] = {"cold": cold, "reference_cold": {
            f"batch {b}": round(r.first_call_s - r.s_per_batch, 2) for (s, b), r in rows.items()
            if s == "reference compiled" and r.s_per_batch}}
        b = max(args.batches)
        if cold.get(f"batch {b}") is not None and budget.left() > cold[f"batch {b}"] + 30:
            saved = cold_cache.save()
            warm_cache = CompileCache(tmp / "warm")
            warm_cache.folder.mkdir()
            if saved is not None:
                shutil.copy(saved, warm_cache.artifacts)
                result["compile_s"]["artifacts_mib"] = round(saved.stat().st_size / 2**20, 2)
            warm_cache.restore()
            torch.compiler.reset()
            ours.compile(compile_options)
            first, _ = timed(lambda: systems.ours_run(b), device)
            steady, _ = timed(lambda: systems.ours_run(b), device)
            result["compile_s"]["warm"] = {f"batch {b}": round(first - steady, 2)}
        print(f"compile s: {result['compile_s']}", flush=True)

        b = min(args.batches)
        if budget.left() > 20 and ("ours eager", b) in images:
            to_float32(ours)
            float32 = systems.ours_run(b)
            result["bf16_vs_float32"] = {"image": 0, "batch": b,
                                         **image_difference(images["ours eager", b][0], float32[0]),
                                         "note": "random weights: the published weights may differ more or less"}
            print(f"bfloat16 vs float32, first image (levels of 255): {result['bf16_vs_float32']}", flush=True)

    print_table(result)
    out = args.out or (None if args.dry_run else
                       Path(__file__).parent / "results" / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}.json")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['gpu']}, {result['height']}x{result['width']}, {result['date']}")
    print(f"{'system':34s} {'batch':>5s} {'images/s':>9s} {'× ref eager':>11s} {'× ref compiled':>14s} "
          f"{'peak GiB':>8s}")
    for r in result["rows"]:
        if r["images_per_s"] is None:
            print(f"{r['system']:34s} {r['batch']:5d}  {r['note']}")
            continue
        ratios = [f"{r[k]:.2f}" if r[k] else "-" for k in ("ratio_to_reference_eager", "ratio_to_reference_compiled")]
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        print(f"{r['system']:34s} {r['batch']:5d} {r['images_per_s']:9.3f} {ratios[0]:>11s} {ratios[1]:>14s} "
              f"{memory:>8s}")


if __name__ == "__main__":
    main()
