"""Images per second of our Würstchen pipeline against diffusers' reference pipelines, on identical weights,
prompts, seeds and settings, in one run.

    python bench/pipeline.py --batch 4 --repeats 2    # tiny random checkpoint, on the CPU
    python bench/pipeline.py --full                   # the published sizes with random weights, meant for a GPU
    python bench/pipeline.py --full --dry-run         # build, save and load the published sizes; no timing

Ours generates the whole batch of different prompts in one call. The reference is run the way a user of it
has to: its prior takes the batch in one call (a generator per image), but its decoder repeats the text
embeddings batch × batch when given several images, so a batch of different prompts fails there and the
decoder is called once per prompt. The warm-up tries the batched calls and says what it found.
"""

import argparse
import contextlib
import gc
import json
import math
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import (
    DEFAULT_STAGE_C_TIMESTEPS,
    PaellaVQModel,
    WuerstchenDecoderPipeline,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    WuerstchenPriorPipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from wurstfabrik.pipeline import WuerstchenPipeline, decoder_seed
from wurstfabrik.pipeline.tiny import write_tiny_checkpoints

# The published architecture sizes (warp-ai/wuerstchen-prior and warp-ai/wuerstchen).
FULL_PRIOR = dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24)
FULL_DECODER = dict(c_cond=1024, clip_embd=1024)  # with WuerstchenDiffNeXt's defaults for everything else
FULL_PRIOR_TEXT = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120)  # bigG
FULL_DECODER_TEXT = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)  # H
FULL_TEXT = dict(vocab_size=49408, hidden_act="gelu", max_position_embeddings=77)
PRIOR_GUIDANCE = 4.0
DECODER_STEPS = 12
DECODER_GUIDANCE = 0.0
SUBJECTS = ["a cat sitting on the red sofa", "sausages on a grill", "an astronaut riding a horse in space",
            "mountains and a lake under the blue sky", "the city street in the rain with neon lights",
            "a dog in the garden at night", "portrait of an old fisherman", "a bowl of ramen"]
STYLES = ["a photo of", "an oil painting of", "a pencil sketch of", "a watercolour of"]


def batch_prompts(n: int) -> list[str]:
    """n different prompts."""
    return [f"{STYLES[(i // len(SUBJECTS)) % len(STYLES)]} {SUBJECTS[i % len(SUBJECTS)]}"
            + (f", variation {i // (len(SUBJECTS) * len(STYLES))}" if i >= len(SUBJECTS) * len(STYLES) else "")
            for i in range(n)]


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype):
    """New modules are created on `device` in `dtype`, so that nothing full-size passes through float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_stage(cls, config: dict, head: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A reference Stage C or B module with random weights N(0, 1/fan_in), built on the meta device: Stage B's own
    initialisation runs a loop over all its blocks for each of its modules, minutes at the published size.
    The output head is scaled down, as training leaves it, so that the stages' divisions by 1 - b and
    sigmoid(b) stay moderate."""
    own_init = cls.__dict__.get("_init_weights")
    if own_init is not None:
        cls._init_weights = lambda self, module: None
    try:
        with torch.device("meta"):
            module = cls(**config)
    finally:
        if own_init is not None:
            cls._init_weights = own_init
    module = module.to(dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() > 1:
                scale = 0.05 if name == f"{head}.weight" else 1.0
                param.normal_(0.0, scale / math.sqrt(param[0].numel()), generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return module.eval()


def random_text_encoder(tiny_folder: Path, sizes: dict, device: torch.device, dtype: torch.dtype,
                        seed: int) -> CLIPTextModel:
    """A CLIP text encoder of the published size, keeping the tiny tokenizer's special token ids."""
    config = CLIPTextConfig.from_pretrained(str(tiny_folder))
    for key, value in {**FULL_TEXT, **sizes, "projection_dim": sizes["hidden_size"]}.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    with building(device, dtype):
        return CLIPTextModel(config).eval()


def random_vqgan(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> PaellaVQModel:
    """The reference Stage A with random weights (its own initialisation); config {} is the published size."""
    torch.manual_seed(seed)
    with building(device, dtype):
        vqgan = PaellaVQModel(**config).eval()
    with torch.no_grad():
        vqgan.out_block[0].bias.fill_(0.5)  # pixels spread around mid-grey rather than clamped to black
    return vqgan


def write_full_checkpoints(tiny_prior: Path, tiny_decoder: Path, out: Path, device: torch.device,
                           dtype: torch.dtype) -> tuple[Path, Path]:
    """The published layout at the published sizes, written by the reference modules' own save_pretrained
    (safetensors, weights stored in `dtype`); tokenizers, scheduler configs and model_index.json come from the
    tiny checkpoint. Each module is freed once written, so that memory holds one at a time."""
    prior_dir, decoder_dir = out / "prior", out / "decoder"
    for tiny, folder in ((tiny_prior, prior_dir), (tiny_decoder, decoder_dir)):
        folder.mkdir(parents=True)
        for sub in ("tokenizer", "scheduler"):
            shutil.copytree(tiny / sub, folder / sub)
        shutil.copy(tiny / "model_index.json", folder / "model_index.json")

    def save(module, folder: Path) -> None:
        module.save_pretrained(str(folder), safe_serialization=True)

    save(random_text_encoder(tiny_prior / "text_encoder", FULL_PRIOR_TEXT, device, dtype, seed=1),
         prior_dir / "text_encoder")
    save(random_stage(WuerstchenPrior, FULL_PRIOR, "out.1", device, dtype, seed=2), prior_dir / "prior")
    save(random_text_encoder(tiny_decoder / "text_encoder", FULL_DECODER_TEXT, device, dtype, seed=3),
         decoder_dir / "text_encoder")
    save(random_stage(WuerstchenDiffNeXt, FULL_DECODER, "clf.1", device, dtype, seed=4), decoder_dir / "decoder")
    save(random_vqgan({}, device, dtype, seed=5), decoder_dir / "vqgan")
    gc.collect()
    return prior_dir, decoder_dir


def load_reference(prior_dir: Path, decoder_dir: Path, device: torch.device, dtype: torch.dtype):
    """diffusers' prior and decoder pipelines, assembled in memory from the component folders (their
    DiffusionPipeline.from_pretrained of a folder is broken upstream)."""
    def text_encoder(folder: Path) -> CLIPTextModel:
        return CLIPTextModel.from_pretrained(str(folder), dtype=dtype).eval()

    prior = dict(tokenizer=CLIPTokenizer.from_pretrained(str(prior_dir / "tokenizer")),
                 text_encoder=text_encoder(prior_dir / "text_encoder"),
                 prior=WuerstchenPrior.from_pretrained(str(prior_dir / "prior"), torch_dtype=dtype).eval())
    decoder = dict(tokenizer=CLIPTokenizer.from_pretrained(str(decoder_dir / "tokenizer")),
                   text_encoder=text_encoder(decoder_dir / "text_encoder"),
                   decoder=WuerstchenDiffNeXt.from_pretrained(str(decoder_dir / "decoder"), torch_dtype=dtype).eval(),
                   vqgan=PaellaVQModel.from_pretrained(str(decoder_dir / "vqgan"), torch_dtype=dtype).eval())
    return assemble_reference(prior, decoder, prior_dir, decoder_dir, device)


def assemble_reference(prior: dict, decoder: dict, prior_dir: Path, decoder_dir: Path, device: torch.device):
    """diffusers' prior and decoder pipelines from their modules (prior: tokenizer, text_encoder, prior; decoder:
    tokenizer, text_encoder, decoder, vqgan), with the settings of the folders' model_index.json."""
    prior_index = json.loads((prior_dir / "model_index.json").read_text())
    decoder_index = json.loads((decoder_dir / "model_index.json").read_text())
    prior = WuerstchenPriorPipeline(
        **prior, scheduler=DDPMWuerstchenScheduler(),
        latent_mean=prior_index["latent_mean"], latent_std=prior_index["latent_std"],
        resolution_multiple=prior_index["resolution_multiple"],
    )
    decoder = WuerstchenDecoderPipeline(**decoder, scheduler=DDPMWuerstchenScheduler(),
                                        latent_dim_scale=decoder_index["latent_dim_scale"])
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
    return prior, decoder


def short(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:160]}"


class ReferenceRun:
    """The reference's text to image for a batch of different prompts, one image each: each pipeline gets the
    whole batch in one call where that works, and one call per prompt where it fails (found out in the first run).
    The prior's generator per image is seeded with the image's seed, the decoder's with decoder_seed(seed)."""

    def __init__(self, prior, decoder, height: int, width: int):
        self.prior = prior
        self.decoder = decoder
        self.height, self.width = height, width
        self.batched = {"prior": None, "decoder": None}  # None until tried
        self.errors = {}

    def _prior(self, prompts, generator) -> torch.Tensor:
        return self.prior(prompts, height=self.height, width=self.width, timesteps=DEFAULT_STAGE_C_TIMESTEPS,
                          guidance_scale=PRIOR_GUIDANCE, generator=generator).image_embeddings

    def _decoder(self, latents, prompts, generator) -> list:
        return self.decoder(latents, prompts, num_inference_steps=DECODER_STEPS, guidance_scale=DECODER_GUIDANCE,
                            generator=generator, output_type="pil").images

    def _batched(self, stage: str, call):
        """The result of the batched call, or None where it fails the first time."""
        if self.batched[stage] is False:
            return None
        try:
            result = call()
        except (RuntimeError, ValueError) as e:
            if self.batched[stage]:
                raise
            self.batched[stage], self.errors[stage] = False, e
            return None
        self.batched[stage] = True
        return result

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        def generators(values):
            return [torch.Generator().manual_seed(v) for v in values]

        latents = self._batched("prior", lambda: self._prior(prompts, generators(seeds)))
        if latents is None:
            latents = torch.cat([self._prior([p], generators([s])[0]) for p, s in zip(prompts, seeds, strict=True)])
        decoder_seeds = [decoder_seed(s) for s in seeds]
        images = self._batched("decoder", lambda: self._decoder(latents, prompts, generators(decoder_seeds)))
        if images is None:
            images = [image for i, (p, s) in enumerate(zip(prompts, decoder_seeds, strict=True))
                      for image in self._decoder(latents[i: i + 1], [p], generators([s])[0])]
        return images

    def describe(self, stage: str, n: int) -> str:
        if self.batched[stage]:
            return f"one call for the batch of {n} prompts" + (" (a generator per image)" if stage == "prior" else "")
        failure = f" (a batch of {n} different prompts fails: {short(self.errors[stage])})" if stage in self.errors \
            else ""
        return f"one call per prompt, {n} calls{failure}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


def parameters(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:,.1f}M"


def describe_ours(ours: WuerstchenPipeline) -> str:
    return (f"prior {parameters(ours.prior.prior)} + text {parameters(ours.prior.text.model)}, "
            f"decoder {parameters(ours.decoder.decoder)} + text {parameters(ours.decoder.text.model)}, "
            f"vqgan {parameters(ours.decoder.vqgan)} parameters")


def folder_size(folder: Path) -> str:
    return f"{sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 2**30:.2f} GiB"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/pipeline.py", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="the published architecture sizes with random weights instead of the tiny checkpoint")
    parser.add_argument("--dry-run", action="store_true",
                        help="build, save and load both pipelines, then stop: no generation, no timing")
    parser.add_argument("--batch", type=int, default=8, help="different prompts per run, one image each (default 8)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each system after one warm-up run, alternating (default 3)")
    parser.add_argument("--height", type=int, help="image height (default 256; 1024 with --full)")
    parser.add_argument("--width", type=int, help="image width (default 256; 1024 with --full)")
    parser.add_argument("--device", help="cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="bfloat16 on cuda, else float32")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads (default 1 on the CPU, where two threads on shared cores make "
                             "small ops hundreds of times slower; torch's default on cuda)")
    parser.add_argument("--seed", type=int, default=1000, help="the seed of the first image; image i gets seed + i")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    height = args.height or (1024 if args.full else 256)
    width = args.width or (1024 if args.full else 256)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()  # the deprecation notices of the Würstchen pipelines, on every call
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"device {device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"dtype {str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="bench-wuerstchen-") as tmp:
        start = time.perf_counter()
        prior_dir, decoder_dir = write_tiny_checkpoints(Path(tmp) / "tiny")
        if args.full:
            # Stored in half precision: half the bytes to write and read, and what the GPU runs in anyway.
            stored = dtype if dtype != torch.float32 else torch.bfloat16
            build_device = device if device.type == "cuda" else torch.device("cpu")
            prior_dir, decoder_dir = write_full_checkpoints(prior_dir, decoder_dir, Path(tmp) / "full",
                                                            build_device, stored)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the freed build copies
            print(f"config full: published sizes, random weights stored in {str(stored).removeprefix('torch.')}; "
                  f"prior {folder_size(prior_dir)}, decoder {folder_size(decoder_dir)}; "
                  f"written in {time.perf_counter() - start:.1f} s")
        else:
            print(f"config tiny: pipeline.tiny random checkpoint, written in {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        ours = WuerstchenPipeline.from_pretrained(prior_dir, decoder_dir, device=device, dtype=dtype)
        print(f"ours loaded in {time.perf_counter() - start:.1f} s: {describe_ours(ours)}")
        if args.dry_run:
            del ours  # one pipeline in memory at a time: the published sizes in float32 are 12 GB each
            gc.collect()
        start = time.perf_counter()
        reference = load_reference(prior_dir, decoder_dir, device, dtype)
        print(f"reference loaded in {time.perf_counter() - start:.1f} s: prior {parameters(reference[0].prior)}, "
              f"decoder {parameters(reference[1].decoder)}, vqgan {parameters(reference[1].vqgan)} parameters")
        if args.dry_run:
            print("dry run: built, saved and loaded both; no timing")
            return

        prompts = batch_prompts(args.batch)
        seeds = [args.seed + i for i in range(args.batch)]
        reference_run = ReferenceRun(*reference, height, width)
        settings = dict(height=height, width=width, prior_timesteps=list(DEFAULT_STAGE_C_TIMESTEPS),
                        prior_guidance_scale=PRIOR_GUIDANCE, decoder_steps=DECODER_STEPS,
                        decoder_guidance_scale=DECODER_GUIDANCE)

        def run_ours():
            return ours(prompts, seeds, **settings)

        def run_reference():
            return reference_run(prompts, seeds)

        print(f"batch {args.batch} different prompts, {height}x{width}; prior {len(DEFAULT_STAGE_C_TIMESTEPS)} "
              f"timesteps (DEFAULT_STAGE_C_TIMESTEPS, {len(DEFAULT_STAGE_C_TIMESTEPS) - 1} steps), guidance "
              f"{PRIOR_GUIDANCE}; decoder {DECODER_STEPS} steps, guidance {DECODER_GUIDANCE}; one warm-up run each, "
              f"then {args.repeats} timed runs each, alternating")
        warm_ours, ours_images = timed(run_ours, device)
        warm_reference, reference_images = timed(run_reference, device)
        print(f"warm-up: ours {warm_ours:.2f} s, reference {warm_reference:.2f} s")
        ours_times, reference_times = [], []
        for _ in range(args.repeats):
            ours_times.append(timed(run_ours, device)[0])
            reference_times.append(timed(run_reference, device)[0])

    ours_s, reference_s = statistics.median(ours_times), statistics.median(reference_times)
    ours_rate, reference_rate = args.batch / ours_s, args.batch / reference_s
    print(f"ours:      one call for the whole batch of {args.batch}")
    print(f"reference: prior {reference_run.describe('prior', args.batch)}")
    print(f"           decoder {reference_run.describe('decoder', args.batch)}")
    print(f"ours       {ours_s:8.3f} s per run (median of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in ours_times)})  {ours_rate:8.3f} images/s")
    print(f"reference  {reference_s:8.3f} s per run (median of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in reference_times)})  {reference_rate:8.3f} images/s")
    print(f"ratio ours / reference: {ours_rate / reference_rate:.2f}x images/s")
    ours_first = np.asarray(ours_images[0]).astype(np.int16)
    reference_first = np.asarray(reference_images[0]).astype(np.int16)
    difference = np.abs(ours_first - reference_first)
    print(f"first prompt's image, ours vs reference (warm-up run, uint8 levels): max |diff| {int(difference.max())}, "
          f"{int((difference != 0).sum())} of {difference.size} values differ; pixel std ours {ours_first.std():.1f}, "
          f"reference {reference_first.std():.1f}")


if __name__ == "__main__":
    main()
