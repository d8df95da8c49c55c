"""Text-to-image: the prior half (prompts → Stage C latents) and the decoder half (latents → images)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import inputs
from .checkpoint import default_device, default_dtype, load_component, pipeline_folder, resolve_checkpoint
from .geometry import Geometry
from .noise import ImageNoise, decoder_seed
from .sampler import DEFAULT_PRIOR_TIMESTEPS, as_timesteps, evenly_spaced_timesteps, sample
from .text import TextEncoder


def _device_and_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype or default_dtype(device)


def _open_checkpoint(checkpoint, kind: str, device, dtype):
    """A pipeline checkpoint's folder, model_index.json and text encoder, on the resolved device and dtype."""
    device, dtype = _device_and_dtype(device, dtype)
    folder = resolve_checkpoint(checkpoint, kind, prefer_half=dtype != torch.float32)
    index = pipeline_folder(folder, kind)
    text = TextEncoder.from_folders(folder / "tokenizer", folder / "text_encoder", device, dtype)
    return folder, index, text, device, dtype


def _repeat(items: list, times: int) -> list:
    return [item for item in items for _ in range(times)]


def _guided(model_step, scale: float):
    """Classifier-free guidance around a denoiser that takes a doubled batch: [conditional, unconditional]."""
    def denoise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        prediction = model_step(torch.cat([x, x]), torch.cat([r, r])).float()
        text, uncond = prediction.chunk(2)
        return torch.lerp(uncond, text, scale)
    return denoise


@dataclass
class PriorResult:
    latents: torch.Tensor  # [N, 16, h, w] float32, Stage C latents rescaled for Stage B
    truncated: list[bool]  # per image: whether its prompt was cut to the tokenizer's limit


class PriorPipeline:
    """Stage C with its CLIP text encoder."""

    def __init__(self, prior, text: TextEncoder, latent_mean: float = 42.0, latent_std: float = 1.0,
                 resolution_multiple: float = 42.67):
        self.prior = prior
        self.text = text
        self.latent_mean = latent_mean
        self.latent_std = latent_std
        self.resolution_multiple = resolution_multiple

    @classmethod
    def from_pretrained(cls, checkpoint, device=None, dtype=None) -> "PriorPipeline":
        folder, index, text, device, dtype = _open_checkpoint(checkpoint, "prior", device, dtype)
        return cls(load_component(folder / "prior", device, dtype), text,
                   latent_mean=float(index.get("latent_mean", 42.0)), latent_std=float(index.get("latent_std", 1.0)),
                   resolution_multiple=float(index.get("resolution_multiple", 42.67)))

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.prior.parameters()).dtype

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        return Geometry(resolution_multiple=self.resolution_multiple).prior_latent(height, width)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], negative_prompts: list[str] | None = None,
                 height: int = 1024, width: int = 1024, timesteps=None, steps: int | None = None,
                 guidance_scale: float = 4.0, images_per_prompt: int = 1) -> PriorResult:
        prompts = inputs.check_texts("prompts", prompts)
        images_per_prompt = inputs.check_positive_int("images_per_prompt", images_per_prompt)
        if negative_prompts is not None:
            negative_prompts = inputs.check_texts("negative_prompts", negative_prompts, len(prompts))
        seeds = inputs.check_seeds(seeds, len(prompts) * images_per_prompt)
        height, width = inputs.check_side("height", height), inputs.check_side("width", width)
        inputs.check_schedule("prior_timesteps", steps, timesteps, "prior_steps")
        guidance_scale = inputs.check_guidance("prior_guidance_scale", guidance_scale)

        if steps is not None:
            schedule = evenly_spaced_timesteps(steps)
        else:
            schedule = as_timesteps(timesteps if timesteps is not None else DEFAULT_PRIOR_TIMESTEPS)
        texts = _repeat(prompts, images_per_prompt)
        guided = guidance_scale > 1  # as the reference: a scale of 1 or less needs no unconditional pass
        if guided:
            negatives = _repeat(negative_prompts or [""] * len(prompts), images_per_prompt)
            embeddings = self.text.encode(texts + negatives)
        else:
            embeddings = self.text.encode(texts)
        cond = self.prior.condition(embeddings.hidden_states.to(self.dtype))

        def model_step(x, r):
            return self.prior.denoise(x.to(self.dtype), r, cond)

        shape = (self.prior.config.c_in, *self.latent_size(height, width))
        noise = ImageNoise(seeds, shape, self.device)
        latents = sample(_guided(model_step, guidance_scale) if guided else model_step, noise(), schedule, noise)
        return PriorResult(latents * self.latent_mean - self.latent_std, embeddings.truncated[: len(texts)])


class DecoderPipeline:
    """Stage B with its CLIP text encoder, and Stage A."""

    def __init__(self, decoder, vqgan, text: TextEncoder, latent_dim_scale: float = 10.67):
        self.decoder = decoder
        self.vqgan = vqgan
        self.text = text
        self.latent_dim_scale = latent_dim_scale

    @classmethod
    def from_pretrained(cls, checkpoint, device=None, dtype=None) -> "DecoderPipeline":
        folder, index, text, device, dtype = _open_checkpoint(checkpoint, "decoder", device, dtype)
        return cls(load_component(folder / "decoder", device, dtype), load_component(folder / "vqgan", device, dtype),
                   text, latent_dim_scale=float(index.get("latent_dim_scale", 10.67)))

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    @property
    def geometry(self) -> Geometry:
        return Geometry(latent_dim_scale=self.latent_dim_scale, decoder_unit=self.decoder.config.downscale,
                        vqgan_upscale=self.vqgan.config.upscale)

    def latent_size(self, prior_height: int, prior_width: int) -> tuple[int, int]:
        return self.geometry.decoder_latent(prior_height, prior_width)

    def check_prior_latent_size(self, prior_height: int, prior_width: int, what: str = "height/width") -> None:
        self.geometry.check_prior_latent(prior_height, prior_width, what)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, prompts: list[str], seeds: list[int],
               negative_prompts: list[str] | None = None, steps: int = 12, guidance_scale: float = 0.0) -> np.ndarray:
        """Images as uint8 arrays [N, H, W, 3], one per Stage C latent, with its own prompt and seed."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            raise ValueError("latents must be a tensor [N, C, h, w]")
        prompts = inputs.check_texts("prompts", prompts, latents.shape[0])
        if negative_prompts is not None:
            negative_prompts = inputs.check_texts("negative_prompts", negative_prompts, len(prompts))
        seeds = inputs.check_seeds(seeds, latents.shape[0])
        steps = inputs.check_positive_int("decoder_steps", steps)
        guidance_scale = inputs.check_guidance("decoder_guidance_scale", guidance_scale)
        self.check_prior_latent_size(*latents.shape[-2:], what="latents")

        guided = guidance_scale > 1
        embeddings = self.text.encode(prompts + (negative_prompts or [""] * len(prompts)) if guided else prompts)
        effnet = latents.to(self.device, self.dtype)
        if guided:
            effnet = torch.cat([effnet, torch.zeros_like(effnet)])
        cond = self.decoder.condition(effnet, embeddings.hidden_states.to(self.dtype))

        def model_step(x, r):
            return self.decoder.denoise(x.to(self.dtype), r, cond)

        shape = (self.decoder.config.c_in, *self.latent_size(*latents.shape[-2:]))
        noise = ImageNoise([decoder_seed(s) for s in seeds], shape, self.device)
        x = sample(_guided(model_step, guidance_scale) if guided else model_step, noise(),
                   evenly_spaced_timesteps(steps), noise)
        images = self.vqgan.decode((x * self.vqgan.config.scale_factor).to(self.dtype)).clamp(0, 1)
        return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy()

    def __call__(self, latents, prompts, seeds, negative_prompts=None, steps=12,
                 guidance_scale=0.0) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.decode(latents, prompts, seeds, negative_prompts, steps,
                                                        guidance_scale)]


@dataclass
class Generation:
    images: list[Image.Image]
    truncated: list[bool]  # per image: whether its prompt was cut to the tokenizer's limit


class WuerstchenPipeline:
    """The whole text-to-image model: Stage C, then Stage B and Stage A."""

    def __init__(self, prior: PriorPipeline, decoder: DecoderPipeline):
        self.prior = prior
        self.decoder = decoder

    @classmethod
    def from_pretrained(cls, prior: str | Path = "warp-ai/wuerstchen-prior", decoder: str | Path = "warp-ai/wuerstchen",
                        device=None, dtype=None) -> "WuerstchenPipeline":
        return cls(PriorPipeline.from_pretrained(prior, device, dtype),
                   DecoderPipeline.from_pretrained(decoder, device, dtype))

    def generate(self, prompts: list[str], seeds: list[int], negative_prompts: list[str] | None = None,
                 height: int = 1024, width: int = 1024, prior_timesteps=None, prior_steps: int | None = None,
                 prior_guidance_scale: float = 4.0, decoder_steps: int = 12, decoder_guidance_scale: float = 0.0,
                 images_per_prompt: int = 1) -> Generation:
        height, width = inputs.check_side("height", height), inputs.check_side("width", width)
        inputs.check_positive_int("decoder_steps", decoder_steps)
        inputs.check_guidance("decoder_guidance_scale", decoder_guidance_scale)
        self.decoder.check_prior_latent_size(*self.prior.latent_size(height, width))
        prior = self.prior(prompts, seeds, negative_prompts, height, width, prior_timesteps, prior_steps,
                           prior_guidance_scale, images_per_prompt)
        n = images_per_prompt
        arrays = self.decoder.decode(prior.latents, _repeat(prompts, n), seeds,
                                     _repeat(negative_prompts, n) if negative_prompts else None,
                                     decoder_steps, decoder_guidance_scale)
        return Generation([Image.fromarray(a) for a in arrays], prior.truncated)

    def __call__(self, *args, **kwargs) -> list[Image.Image]:
        return self.generate(*args, **kwargs).images
