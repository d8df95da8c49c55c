"""Trains a tiny Würstchen on the toy world (train/toy_world.py) and writes it as a checkpoint the job loads.

    python train/tiny_world.py                       # about 45 minutes on one CPU core; writes jobs/demo_model/
    python train/tiny_world.py --out DIR --scale 0.02  # a few dozen steps, to check that it runs
    python train/tiny_world.py --measure               # trains nothing: the accuracy table of jobs/demo_model/

All three stages are the product's own classes (wurstfabrik.pipeline), scaled down, trained as in the paper:

1. Stage A, a VQGAN without its GAN loss: images ↔ a 4-channel latent at 1/8 of the image's side.
2. Stage B learns to denoise Stage A's latents, conditioned on the semantic latent of a small image encoder
   trained with it (the EfficientNet's role: 16 channels at 1/32 of the side). An auxiliary head that predicts
   Stage A's latent from the semantic latent alone, dropped afterwards, makes the encoder informative early.
3. Stage C learns to denoise the encoder's semantic latents from the captions' CLIP hidden states; its CLIP text
   encoder trains with it. One caption in six is dropped (the empty caption), so that classifier-free guidance
   has an unconditional model to push away from. Its loss weights high noise ratios up (loss_weight), and it trains
   at 128² only: trained unweighted and at 128×256 and 256×128 too, it drew the background and hardly ever a shape.

Nothing of a held-out (shape colour, background colour) pair is ever drawn. Everything is seeded; the script ends by
generating the held-out test scenes through the product's pipeline from the written checkpoint and printing the
judge's accuracy.
"""

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train import toy_world  # noqa: E402
from wurstfabrik.pipeline.blocks import LayerNorm2d  # noqa: E402
from wurstfabrik.pipeline.decoder import DecoderConfig, StageB  # noqa: E402
from wurstfabrik.pipeline.prior import PriorConfig, StageC  # noqa: E402
from wurstfabrik.pipeline.sampler import alpha_cumprod, evenly_spaced_timesteps, sample  # noqa: E402
from wurstfabrik.pipeline.tiny import (  # noqa: E402
    SCHEDULER_CONFIG,
    learn_bpe,
    write_component,
    write_index,
    write_tokenizer,
)
from wurstfabrik.pipeline.vqgan import StageA, VQGANConfig  # noqa: E402

DEFAULT_OUT = ROOT / "jobs" / "demo_model"
SIDE = 128  # training images are 128²
PRIOR_TEXT_WIDTH, DECODER_TEXT_WIDTH = 64, 32
SEMANTIC_CHANNELS = 16
VQGAN = VQGANConfig(up_down_scale_factor=4, levels=2, bottleneck_blocks=1, embed_dim=64, num_vq_embeddings=64,
                    scale_factor=1.0)  # 8 pixels per Stage B latent pixel
DECODER = DecoderConfig(c_cond=64, c_hidden=(48, 96), nhead=(-1, 4), blocks=(2, 2), level_config=("CT", "CTA"),
                        inject_effnet=(True, True), effnet_embd=SEMANTIC_CHANNELS, clip_embd=DECODER_TEXT_WIDTH)
PRIOR = PriorConfig(c_in=SEMANTIC_CHANNELS, c=128, c_cond=PRIOR_TEXT_WIDTH, c_r=64, depth=4, nhead=4)
LATENT_DIM_SCALE = 4.0  # Stage B latent pixels per Stage C latent pixel: 32 pixels per Stage C latent pixel
CAPTION_DROPOUT = 1 / 6
MIN_CONTRAST = 0.2  # Stage B trains on semantic latents whose spatial contrast is cut to between this and 1
MAX_LOSS_WEIGHT = 20.0  # see loss_weight
STEPS = {"a": 800, "b": 2000, "c": 8000}
BATCH = {"a": 16, "b": 32, "c": 32}
# How the measurement generates: the demo's settings (jobs.cli), on the held-out pairs.
EVAL = {"height": SIDE, "width": SIDE, "prior_steps": 12, "decoder_steps": 8, "prior_guidance_scale": 4.0}
VOCABULARY = ("a on background at the , " + " ".join(toy_world.COLOURS + toy_world.SHAPES + toy_world.SIZES +
                                                     toy_world.POSITIONS) + " no not without and with")


class SemanticEncoder(nn.Module):
    """The EfficientNet's role, scaled down: an image in [0, 1] to 16 channels at 1/32 of its side, normalised per
    position so that Stage C's target has unit scale."""

    def __init__(self, channels: int = SEMANTIC_CHANNELS):
        super().__init__()
        self.net = nn.Sequential(
            nn.PixelUnshuffle(4), nn.Conv2d(48, 48, 1), nn.GELU(),
            nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(96, 96, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(96, channels, 1), LayerNorm2d(channels))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class LatentHead(nn.Module):
    """Training only: Stage A's latent predicted from the semantic latent alone."""

    def __init__(self, channels: int = SEMANTIC_CHANNELS):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, 64, 3, padding=1), nn.GELU(), nn.Upsample(scale_factor=2),
                                 nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.Upsample(scale_factor=2),
                                 nn.Conv2d(64, 4, 3, padding=1))

    def forward(self, semantic: torch.Tensor) -> torch.Tensor:
        return self.net(semantic)


def batch_of_scenes(rng: random.Random, n: int, height: int = SIDE, width: int = SIDE):
    scenes = [toy_world.random_scene(rng) for _ in range(n)]
    images = np.stack([toy_world.render(s, height, width, rng) for s in scenes])
    return scenes, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def noised(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 at a random noise ratio r of the cosine schedule the sampler walks: (x_r, r, the noise)."""
    r = torch.rand(x0.shape[0], generator=generator)
    a = alpha_cumprod(r).view(-1, *(1,) * (x0.dim() - 1))
    noise = torch.randn(x0.shape, generator=generator)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, r, noise


def warmup_cosine(optimizer, steps: int):
    """A linear warm-up over the first 5 % of the steps, then a cosine decay to a tenth."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def descend(loss: torch.Tensor, optimizer, schedule, params: list) -> None:
    """One optimizer step on `loss`, its gradients clipped to norm 1."""
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()


def log(stage: str, step: int, steps: int, loss: float, started: float) -> None:
    print(f"stage {stage} step {step}/{steps} loss {loss:.4f} ({time.time() - started:.0f} s)", flush=True)


def train_stage_a(steps: int, rng: random.Random) -> StageA:
    vqgan = StageA(VQGAN)
    nn.init.normal_(vqgan.vquantizer.embedding.weight)
    optimizer = torch.optim.AdamW(vqgan.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    started = time.time()
    for step in range(1, steps + 1):
        _, images = batch_of_scenes(rng, BATCH["a"])
        decoded = vqgan.decode(vqgan.encode(images) * VQGAN.scale_factor)
        loss = F.l1_loss(decoded, images) + F.mse_loss(decoded, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log("A", step, steps, loss.item(), started)
    return vqgan.eval().requires_grad_(False)


def fill_codebook(vqgan: StageA, rng: random.Random, generator: torch.Generator) -> None:
    """The codebook the reference quantises with: k-means of the encoder's latents (decoding never uses it)."""
    with torch.no_grad():
        _, images = batch_of_scenes(rng, 64)
        vectors = vqgan.encode(images).permute(0, 2, 3, 1).reshape(-1, VQGAN.latent_channels)
        codes = vectors[torch.randperm(len(vectors), generator=generator)[: VQGAN.num_vq_embeddings]].clone()
        for _ in range(10):
            nearest = torch.cdist(vectors, codes).argmin(1)
            for k in range(len(codes)):
                members = vectors[nearest == k]
                if len(members):
                    codes[k] = members.mean(0)
        vqgan.vquantizer.embedding.weight.copy_(codes)


def text_model(vocab: dict[str, int], width: int, layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=width * 2,
                            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"], projection_dim=width)
    return CLIPTextModel(config)


class Captions:
    """Tokenized captions, cached: the toy world has few distinct ones."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for text in texts:
            if text not in self.cache:
                t = self.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
                self.cache[text] = (t.input_ids[0], t.attention_mask[0])
        return (torch.stack([self.cache[t][0] for t in texts]), torch.stack([self.cache[t][1] for t in texts]))


def train_stage_b(steps: int, vqgan: StageA, text, captions: Captions, rng: random.Random,
                  generator: torch.Generator) -> tuple[StageB, SemanticEncoder]:
    decoder, encoder, head = StageB(DECODER), SemanticEncoder(), LatentHead()
    with torch.no_grad():
        decoder.clf[1].weight.mul_(0.02)
        decoder.clf[1].bias.zero_()
    params = list(decoder.parameters()) + list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    started = time.time()
    for step in range(1, steps + 1):
        scenes, images = batch_of_scenes(rng, BATCH["b"])
        with torch.no_grad():
            latents = vqgan.encode(images) / VQGAN.scale_factor
            ids, mask = captions([s.caption for s in scenes])
            clip = text(ids, attention_mask=mask).last_hidden_state
        semantic = encoder(images)
        # Stage C's samples are close to the encoder's latents, not equal: Stage B learns to take them a little off,
        # and to draw the shape from a latent whose shape stands out less from its background than the encoder's
        # (an undertrained Stage C's samples do: with spatial contrast halved, Stage B trained without this drew a
        # quarter of the shapes' colours right, and with it more than half).
        mean = semantic.mean((2, 3), keepdim=True)
        contrast = MIN_CONTRAST + (1 - MIN_CONTRAST) * torch.rand((len(scenes), 1, 1, 1), generator=generator)
        effnet = mean + contrast * (semantic - mean) + 0.1 * torch.randn(semantic.shape, generator=generator)
        x, r, noise = noised(latents, generator)
        loss_b = F.mse_loss(decoder(x, r, effnet, clip), noise)
        loss_head = F.mse_loss(head(semantic), latents)
        loss = loss_b + loss_head
        descend(loss, optimizer, schedule, params)
        if step % 100 == 0 or step == steps:
            log("B", step, steps, loss_b.item(), started)
    return decoder.eval().requires_grad_(False), encoder.eval().requires_grad_(False)


@torch.no_grad()
def check_stage_b(decoder: StageB, encoder: SemanticEncoder, vqgan: StageA, text, captions: Captions,
                  rng: random.Random, generator: torch.Generator, count: int = 33) -> dict[str, float]:
    """Stage B and A alone: the judge's accuracy on images decoded from the semantic latents of rendered
    held-out scenes (what Stage C has to get right is then all that is left)."""
    scenes = toy_world.held_out_scenes(count)
    images = torch.from_numpy(np.stack([toy_world.render(s, SIDE, SIDE, rng) for s in scenes]))
    images = images.permute(0, 3, 1, 2).float() / 255
    ids, mask = captions([s.caption for s in scenes])
    cond = decoder.condition(encoder(images), text(ids, attention_mask=mask).last_hidden_state)
    steps = EVAL["decoder_steps"]
    noise = torch.randn((steps + 1, count, 4, SIDE // VQGAN.upscale, SIDE // VQGAN.upscale), generator=generator)
    latents = sample(lambda x, r: decoder.denoise(x, r, cond), noise, evenly_spaced_timesteps(steps))
    decoded = vqgan.decode(latents * VQGAN.scale_factor).clamp(0, 1)
    arrays = (decoded.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return toy_world.accuracy(scenes, list(arrays))


def loss_weight(r: torch.Tensor) -> torch.Tensor:
    """Stage C's per-sample weight on the noise's squared error: 1 + 1/SNR (the v-prediction loss, clamped), which
    puts the high noise ratios back in, where a sample's layout is decided. Unweighted, Stage C learned the
    background and no shape: their errors on the semantic latent count SNR times less in the noise's error."""
    snr = alpha_cumprod(r) / (1 - alpha_cumprod(r))
    return (1 + 1 / snr).clamp(max=MAX_LOSS_WEIGHT)


def train_stage_c(steps: int, encoder: SemanticEncoder, text, captions: Captions, rng: random.Random,
                  generator: torch.Generator) -> StageC:
    prior = StageC(PRIOR)
    with torch.no_grad():
        prior.out[1].weight.mul_(0.02)
        prior.out[1].bias.zero_()
    text.train().requires_grad_(True)
    params = list(prior.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    started = time.time()
    for step in range(1, steps + 1):
        scenes, images = batch_of_scenes(rng, BATCH["c"])
        texts = ["" if rng.random() < CAPTION_DROPOUT else s.caption for s in scenes]
        with torch.no_grad():
            semantic = encoder(images)
        ids, mask = captions(texts)
        clip = text(ids, attention_mask=mask).last_hidden_state
        x, r, noise = noised(semantic, generator)
        loss = (((prior(x, r, clip) - noise) ** 2).mean((1, 2, 3)) * loss_weight(r)).mean()
        descend(loss, optimizer, schedule, params)
        if step % 100 == 0 or step == steps:
            log("C", step, steps, loss.item(), started)
    text.eval().requires_grad_(False)
    return prior.eval().requires_grad_(False)


def write_checkpoint(out: Path, vocab, merges, prior_text, decoder_text, prior: StageC, decoder: StageB,
                     vqgan: StageA) -> tuple[Path, Path]:
    """The published layout, in float16: prior/ and decoder/ pipeline folders, as pipeline.tiny writes them."""
    if out.exists():
        shutil.rmtree(out)
    prior_dir, decoder_dir = out / "prior", out / "decoder"
    for folder, text in ((prior_dir, prior_text), (decoder_dir, decoder_text)):
        write_tokenizer(folder / "tokenizer", vocab, merges)
        text.half().save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
        text.float()
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    write_component(prior_dir / "prior", prior.half())
    write_index(prior_dir, "WuerstchenPriorPipeline", {"prior": ("wuerstchen", "WuerstchenPrior"),
                "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
                "scheduler": ("diffusers", "DDPMWuerstchenScheduler")},
                latent_mean=1.0, latent_std=0.0, resolution_multiple=LATENT_DIM_SCALE * VQGAN.upscale)
    write_component(decoder_dir / "decoder", decoder.half())
    write_component(decoder_dir / "vqgan", vqgan.half())
    write_index(decoder_dir, "WuerstchenDecoderPipeline", {"decoder": ("wuerstchen", "WuerstchenDiffNeXt"),
                "vqgan": ("wuerstchen", "PaellaVQModel"), "text_encoder": ("transformers", "CLIPTextModel"),
                "tokenizer": ("transformers", "CLIPTokenizer"), "scheduler": ("diffusers", "DDPMWuerstchenScheduler")},
                latent_dim_scale=LATENT_DIM_SCALE)
    scenes = toy_world.demo_scenes()
    (out / "prompts.txt").write_text("".join(f"{s.caption}\n" for s in scenes))
    return prior_dir, decoder_dir


def generate(pipe, scenes: list, seed: int = 0, **overrides) -> list[np.ndarray]:
    """Images of the scenes' captions through the product's pipeline, with EVAL's settings unless overridden."""
    settings = {**EVAL, **overrides}
    images = pipe.generate([s.caption for s in scenes], [seed + i for i in range(len(scenes))], **settings).images
    return [np.asarray(image) for image in images]


def measure(checkpoint: Path, count: int = 110, trained_pairs: bool = False, **overrides) -> dict[str, float]:
    """The judge's accuracy on `count` held-out scenes (or scenes of trained pairs), generated from the
    checkpoint folder."""
    from wurstfabrik.pipeline.pipeline import WuerstchenPipeline

    pipe = WuerstchenPipeline.from_pretrained(checkpoint / "prior", checkpoint / "decoder", device="cpu",
                                              dtype=torch.float32)
    scenes = (toy_world.trained_pair_scenes if trained_pairs else toy_world.held_out_scenes)(count)
    return toy_world.accuracy(scenes, generate(pipe, scenes, **overrides))


def print_table(checkpoint: Path, count: int) -> None:
    """The judge's accuracy on the held-out scenes, at the demo's settings and without guidance, as a table; then
    on scenes of trained pairs, which separates not following the caption from not generalising."""
    print(f"| {count} scenes, {checkpoint.name} | background | shape colour | shape | position |")
    print("|---|---|---|---|---|")
    for trained_pairs in (False, True):
        for scale in (EVAL["prior_guidance_scale"], 1.0):
            scores = measure(checkpoint, count, trained_pairs, prior_guidance_scale=scale)
            pairs = "trained pairs" if trained_pairs else "held-out pairs"
            print(f"| {pairs}, prior guidance {scale:g} | " + " | ".join(
                f"{scores[k]:.1%}" for k in ("background", "colour", "shape", "position")) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint folder (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the training steps to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more are slower on a shared CPU)")
    parser.add_argument("--eval-count", type=int, default=110, help="held-out scenes measured at the end")
    parser.add_argument("--measure", action="store_true", help="train nothing: measure the checkpoint in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        print_table(args.out, args.eval_count)
        return
    torch.manual_seed(args.seed)
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    steps = {k: max(1, round(v * args.scale)) for k, v in STEPS.items()}
    started = time.time()

    from transformers import CLIPTokenizer

    vocab, merges = learn_bpe(VOCABULARY, merges=400)
    tokenizer_dir = args.out.parent / f".{args.out.name}-tokenizer"
    write_tokenizer(tokenizer_dir, vocab, merges)
    captions = Captions(CLIPTokenizer.from_pretrained(str(tokenizer_dir)))
    shutil.rmtree(tokenizer_dir)
    prior_text = text_model(vocab, PRIOR_TEXT_WIDTH, layers=2)
    decoder_text = text_model(vocab, DECODER_TEXT_WIDTH, layers=1).eval().requires_grad_(False)

    vqgan = train_stage_a(steps["a"], rng)
    fill_codebook(vqgan, rng, generator)
    decoder, encoder = train_stage_b(steps["b"], vqgan, decoder_text, captions, rng, generator)
    scores = check_stage_b(decoder, encoder, vqgan, decoder_text, captions, rng, generator)
    print("stages B and A from rendered held-out scenes: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()),
          flush=True)
    prior = train_stage_c(steps["c"], encoder, prior_text, captions, rng, generator)
    prior_dir, decoder_dir = write_checkpoint(args.out, vocab, merges, prior_text, decoder_text, prior, decoder, vqgan)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) after {(time.time() - started) / 60:.1f} min", flush=True)
    scores = measure(args.out, args.eval_count)
    print("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
