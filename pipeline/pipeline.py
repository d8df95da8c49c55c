"""Text-to-image: the prior half (prompts → Stage C latents) and the decoder half (latents → images)."""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import inputs
from .checkpoint import (
    DEFAULT_PRIOR_TEXT,
    check_folder_kind,
    default_device,
    default_dtype,
    load_component,
    pipeline_folder,
    resolve_checkpoint,
)
from .compiled import Denoiser, compile_options, use_channels_last
from .conditioning import ConditionGroup, group_conditions
from .fp8 import check_fp8_device, check_quantize, quantize_linears
from .geometry import Geometry
from .noise import ImageNoise, decoder_seed
from .offload import Offloader, check_offload
from .prompt_syntax import check_syntax_name
from .sampler import DEFAULT_PRIOR_TIMESTEPS, as_timesteps, check_finite, evenly_spaced_timesteps, sample
from .sizes import check_fits, check_size, fit_to_size
from .text import TextEncoder, check_long_prompts


def _device_and_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype or default_dtype(device)


def _offloader(offload: str, compile, device: torch.device) -> Offloader:
    if check_offload(offload) != "none" and compile_options(compile) is not None:
        raise ValueError(f"offload={offload!r} cannot be combined with compile: a compiled step (and its CUDA graphs) "
                         f"keeps the device memory of the weights that offload frees")
    return Offloader(offload, device)


def _text_encoder(folder: Path, device: torch.device, dtype: torch.dtype, offload: Offloader) -> TextEncoder:
    text = TextEncoder.from_folders(folder / "tokenizer", folder / "text_encoder", device, dtype,
                                    keep_on_cpu=offload.mode != "none")
    offload.manage(text.model)
    return text


def _component(folder: Path, kind: str, device: torch.device, dtype: torch.dtype, offload: Offloader,
               quantize: str = "none"):
    """A stage's module, loaded straight to the device, or to the CPU for the offloader to manage; with
    quantize="fp8", its linear layers in float8 (pipeline.fp8), once the checkpoint's layout hooks have run."""
    module = load_component(folder, device if offload.mode == "none" else "cpu", dtype, kind=kind)
    if quantize == "fp8":
        quantize_linears(module)
    return offload.manage(module)


def _check_quantize(quantize: str, device: torch.device) -> str:
    if check_quantize(quantize) == "fp8":
        check_fp8_device(device)
    return quantize


def _repeat(items: list, times: int) -> list:
    return [item for item in items for _ in range(times)]


def _guided(model_step, scale: float):
    """Classifier-free guidance around a denoiser that takes a doubled batch: [conditional, unconditional]."""
    def denoise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        prediction = model_step(torch.cat([x, x]), torch.cat([r, r])).float()
        text, uncond = prediction.chunk(2)
        return torch.lerp(uncond, text, scale)
    return denoise


def _gather(groups: list[ConditionGroup], outputs: list[torch.Tensor], count: int) -> torch.Tensor:
    """Per-group results put back in the batch's order."""
    if len(groups) == 1:
        return outputs[0]
    out = torch.empty((count, *outputs[0].shape[1:]), dtype=outputs[0].dtype, device=outputs[0].device)
    for group, output in zip(groups, outputs, strict=True):
        out[group.rows] = output
    return out


@dataclass
class PriorResult:
    latents: torch.Tensor  # [N, 16, h, w] float32, Stage C latents rescaled for Stage B
    truncated: list[bool]  # per image: whether its prompt was cut to the tokenizer's limit


class PriorPipeline:
    """Stage C with its CLIP text encoder."""

    def __init__(self, prior, text: TextEncoder, latent_mean: float = 42.0, latent_std: float = 1.0,
                 resolution_multiple: float = 42.67, offload: Offloader | None = None):
        self.prior = prior
        self.text = text
        self.denoiser = Denoiser(prior)
        self.latent_mean = latent_mean
        self.latent_std = latent_std
        self.resolution_multiple = resolution_multiple
        # The sizes Stage C makes are those the decoder can decode: the published decoder's, unless a
        # WuerstchenPipeline (or a caller that knows its decoder) sets this from the decoder.
        self.geometry = Geometry(resolution_multiple=resolution_multiple)
        self.offload = offload or Offloader("none", self.device)

    @classmethod
    def from_pretrained(cls, checkpoint, device=None, dtype=None, compile=False, prior_text=DEFAULT_PRIOR_TEXT,
                        revision: str | None = None, prior_text_revision: str | None = None,
                        offload: str = "none", quantize: str = "none") -> "PriorPipeline":
        """A prior pipeline folder or hub id, or a model-only prior whose text encoder, tokenizer and
        model_index.json values come from the prior pipeline `prior_text`. Revisions apply to hub ids.
        quantize="fp8" runs Stage C's linear layers in float8 (pipeline.fp8)."""
        device, dtype = _device_and_dtype(device, dtype)
        quantize = _check_quantize(quantize, device)
        offloader = _offloader(offload, compile, device)
        folder = resolve_checkpoint(checkpoint, "prior", prefer_half=dtype != torch.float32, revision=revision)
        if check_folder_kind(folder, "prior") == "prior_model":
            text_folder = resolve_checkpoint(prior_text, "prior_text", prefer_half=dtype != torch.float32,
                                             revision=prior_text_revision)
            check_folder_kind(text_folder, "prior_text")
            index, model_folder = pipeline_folder(text_folder, "prior_text"), folder
        else:
            index, text_folder, model_folder = pipeline_folder(folder, "prior"), folder, folder / "prior"
        text = _text_encoder(text_folder, device, dtype, offloader)
        pipe = cls(_component(model_folder, "prior", device, dtype, offloader, quantize), text,
                   latent_mean=float(index.get("latent_mean", 42.0)), latent_std=float(index.get("latent_std", 1.0)),
                   resolution_multiple=float(index.get("resolution_multiple", 42.67)), offload=offloader)
        return pipe.compile(compile)

    def compile(self, options=True) -> "PriorPipeline":
        """Compiles Stage C's step (True, or a pipeline.compiled.CompileOptions); False goes back to eager."""
        self.denoiser = Denoiser(self.prior, compile_options(options))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.prior.parameters()).dtype

    def latent_size(self, height: int, width: int, resize: bool = False) -> tuple[int, int]:
        """The Stage C latent generated for a requested image size (pipeline.geometry)."""
        return self.geometry.prior_latent(height, width, resize)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], negative_prompts: list[str] | None = None,
                 height: int = 1024, width: int = 1024, timesteps=None, steps: int | None = None,
                 guidance_scale: float = 4.0, images_per_prompt: int = 1, prompt_syntax: str = "plain",
                 long_prompts: str = "truncate", resize: bool = False) -> PriorResult:
        """Stage C latents for images of the requested size (height, width): latents of the size generated for
        it, which DecoderPipeline.decode(..., size=(height, width), resize=resize) brings to exactly that size."""
        prompts = inputs.check_texts("prompts", prompts)
        images_per_prompt = inputs.check_positive_int("images_per_prompt", images_per_prompt)
        if negative_prompts is not None:
            negative_prompts = inputs.check_texts("negative_prompts", negative_prompts, len(prompts))
        seeds = inputs.check_seeds(seeds, len(prompts) * images_per_prompt)
        height, width = inputs.check_side("height", height), inputs.check_side("width", width)
        inputs.check_schedule("prior_timesteps", steps, timesteps, "prior_steps")
        guidance_scale = inputs.check_guidance("prior_guidance_scale", guidance_scale)
        check_syntax_name(prompt_syntax)
        check_long_prompts(long_prompts)
        resize = inputs.check_bool("resize", resize)
        self.geometry.check_size(height, width)

        if steps is not None:
            schedule = evenly_spaced_timesteps(steps)
        else:
            schedule = as_timesteps(timesteps if timesteps is not None else DEFAULT_PRIOR_TIMESTEPS)
        texts = _repeat(prompts, images_per_prompt)
        guided = guidance_scale > 1  # as the reference: a scale of 1 or less needs no unconditional pass
        negatives = _repeat(negative_prompts or [""] * len(prompts), images_per_prompt) if guided else []
        with self.offload.running(self.text.model, then=self.prior):
            embeddings = self.text.encode_prompts(texts + negatives, prompt_syntax, long_prompts)
            groups = group_conditions(embeddings.hidden_states[: len(texts)],
                                      embeddings.hidden_states[len(texts):] if guided else None, embeddings.padding)
        shape = (self.prior.config.c_in, *self.latent_size(height, width, resize))
        outputs = []
        with self.offload.running(self.prior):
            for group in groups:  # one group unless prompts' embeddings differ in length (pipeline.conditioning)
                cond = self.prior.condition(group.hidden_states.to(self.device, self.dtype))
                model_step = self.denoiser.bind(cond)
                noise = ImageNoise([seeds[i] for i in group.rows], shape).draw(len(schedule) - 1, self.device)
                outputs.append(sample(_guided(model_step, guidance_scale) if guided else model_step, noise, schedule))
        latents = _gather(groups, outputs, len(texts))
        check_finite(latents, "Stage C", self.dtype)
        return PriorResult(latents * self.latent_mean - self.latent_std, embeddings.truncated[: len(texts)])


class DecoderPipeline:
    """Stage B with its CLIP text encoder, and Stage A."""

    def __init__(self, decoder, vqgan, text: TextEncoder, latent_dim_scale: float = 10.67,
                 offload: Offloader | None = None):
        self.decoder = decoder
        self.vqgan = vqgan
        self.text = text
        self.denoiser = Denoiser(decoder)
        self.latent_dim_scale = latent_dim_scale
        self.offload = offload or Offloader("none", self.device)

    @classmethod
    def from_pretrained(cls, checkpoint, device=None, dtype=None, compile=False, revision: str | None = None,
                        offload: str = "none", quantize: str = "none") -> "DecoderPipeline":
        """quantize="fp8" runs Stage B's linear layers in float8 (pipeline.fp8); Stage A stays as it is."""
        device, dtype = _device_and_dtype(device, dtype)
        quantize = _check_quantize(quantize, device)
        offloader = _offloader(offload, compile, device)
        folder = resolve_checkpoint(checkpoint, "decoder", prefer_half=dtype != torch.float32, revision=revision)
        check_folder_kind(folder, "decoder")
        index = pipeline_folder(folder, "decoder")
        text = _text_encoder(folder, device, dtype, offloader)
        pipe = cls(_component(folder / "decoder", "decoder", device, dtype, offloader, quantize),
                   _component(folder / "vqgan", "vqgan", device, dtype, offloader), text,
                   latent_dim_scale=float(index.get("latent_dim_scale", 10.67)), offload=offloader)
        return pipe.compile(compile)

    def compile(self, options=True) -> "DecoderPipeline":
        """Compiles Stage B's step (True, or a pipeline.compiled.CompileOptions); False goes back to eager. On CUDA
        it also puts Stage B and Stage A in channels_last unless the options say otherwise."""
        options = compile_options(options)
        use_channels_last(self.decoder, options)
        use_channels_last(self.vqgan, options)
        self.denoiser = Denoiser(self.decoder, options)
        return self

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
    def decode(self, latents: torch.Tensor | np.ndarray, prompts: list[str], seeds: list[int],
               negative_prompts: list[str] | None = None, steps: int = 12, guidance_scale: float = 0.0,
               prompt_syntax: str = "plain", long_prompts: str = "truncate", size: tuple[int, int] | None = None,
               resize: bool = False) -> np.ndarray:
        """Images as uint8 arrays [N, H, W, 3], one per Stage C latent, with its own prompt and seed. With `size`
        (height, width), the requested size of PriorPipeline's call, each image is cut (or with `resize`, scaled
        and cut) from the size its latent makes to exactly that size (pipeline.sizes). `latents` may be a float32
        numpy array (what the decoder stage holds)."""
        if isinstance(latents, np.ndarray):
            latents = torch.from_numpy(latents)
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            raise ValueError("latents must be a tensor [N, C, h, w]")
        prompts = inputs.check_texts("prompts", prompts, latents.shape[0])
        if negative_prompts is not None:
            negative_prompts = inputs.check_texts("negative_prompts", negative_prompts, len(prompts))
        seeds = inputs.check_seeds(seeds, latents.shape[0])
        steps = inputs.check_positive_int("decoder_steps", steps)
        guidance_scale = inputs.check_guidance("decoder_guidance_scale", guidance_scale)
        check_syntax_name(prompt_syntax)
        check_long_prompts(long_prompts)
        size = check_size(size) if size is not None else None
        resize = inputs.check_bool("resize", resize)
        self.check_prior_latent_size(*latents.shape[-2:], what="latents")
        if size is not None and not resize:
            check_fits(self.geometry.image_size(*latents.shape[-2:]), size)

        guided = guidance_scale > 1
        texts = prompts + (negative_prompts or [""] * len(prompts) if guided else [])
        with self.offload.running(self.text.model, then=self.decoder):
            embeddings = self.text.encode_prompts(texts, prompt_syntax, long_prompts)
            groups = group_conditions(embeddings.hidden_states[: len(prompts)],
                                      embeddings.hidden_states[len(prompts):] if guided else None, embeddings.padding)
        all_effnet = latents.to(self.device, self.dtype)
        shape = (self.decoder.config.c_in, *self.latent_size(*latents.shape[-2:]))
        outputs = []
        with self.offload.running(self.decoder, then=self.vqgan):
            for group in groups:  # one group unless prompts' embeddings differ in length (pipeline.conditioning)
                effnet = all_effnet if len(groups) == 1 else all_effnet[group.rows]
                if guided:
                    effnet = torch.cat([effnet, torch.zeros_like(effnet)])
                cond = self.decoder.condition(effnet, group.hidden_states.to(self.device, self.dtype),
                                              latent_size=shape[1:])
                model_step = self.denoiser.bind(cond)
                noise = ImageNoise([decoder_seed(seeds[i]) for i in group.rows], shape).draw(steps, self.device)
                outputs.append(sample(_guided(model_step, guidance_scale) if guided else model_step, noise,
                                      evenly_spaced_timesteps(steps)))
        x = _gather(groups, outputs, len(prompts))
        check_finite(x, "Stage B", self.dtype)
        with self.offload.running(self.vqgan):
            images = check_finite(self.vqgan.decode((x * self.vqgan.config.scale_factor).to(self.dtype)), "Stage A",
                                  self.dtype).clamp(0, 1)
        if size is not None:
            images = fit_to_size(images, size, resize)
        return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy()

    def __call__(self, latents, prompts, seeds, negative_prompts=None, steps=12, guidance_scale=0.0,
                 **options) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.decode(latents, prompts, seeds, negative_prompts, steps,
                                                        guidance_scale, **options)]


@dataclass
class Generation:
    images: list[Image.Image]
    truncated: list[bool]  # per image: whether its prompt was cut to the tokenizer's limit
    generated_size: tuple[int, int] | None = None  # (height, width) the stages made before cutting or resizing


class WuerstchenPipeline:
    """The whole text-to-image model: Stage C, then Stage B and Stage A."""

    def __init__(self, prior: PriorPipeline, decoder: DecoderPipeline):
        self.prior = prior
        self.decoder = decoder
        self.prior.geometry = self.geometry  # Stage C makes the latent sizes this decoder decodes

    @classmethod
    def from_pretrained(cls, prior: str | Path = "warp-ai/wuerstchen-prior", decoder: str | Path = "warp-ai/wuerstchen",
                        device=None, dtype=None, compile=False, prior_text=DEFAULT_PRIOR_TEXT,
                        prior_revision: str | None = None, decoder_revision: str | None = None,
                        prior_text_revision: str | None = None, offload: str = "none",
                        quantize: str = "none") -> "WuerstchenPipeline":
        return cls(PriorPipeline.from_pretrained(prior, device, dtype, compile=compile, prior_text=prior_text,
                                                 revision=prior_revision, prior_text_revision=prior_text_revision,
                                                 offload=offload, quantize=quantize),
                   DecoderPipeline.from_pretrained(decoder, device, dtype, compile=compile, revision=decoder_revision,
                                                   offload=offload, quantize=quantize))

    def compile(self, options=True) -> "WuerstchenPipeline":
        self.prior.compile(options)
        self.decoder.compile(options)
        return self

    @property
    def geometry(self) -> Geometry:
        return replace(self.decoder.geometry, resolution_multiple=self.prior.resolution_multiple)

    def generate(self, prompts: list[str], seeds: list[int], negative_prompts: list[str] | None = None,
                 height: int = 1024, width: int = 1024, prior_timesteps=None, prior_steps: int | None = None,
                 prior_guidance_scale: float = 4.0, decoder_steps: int = 12, decoder_guidance_scale: float = 0.0,
                 images_per_prompt: int = 1, prompt_syntax: str = "plain", long_prompts: str = "truncate",
                 resize: bool = False) -> Generation:
        """Images of exactly height × width: generated at the nearest size the stages make that covers it, then
        cut around the center or, with `resize`, scaled and cut (pipeline.geometry)."""
        height, width = inputs.check_side("height", height), inputs.check_side("width", width)
        inputs.check_positive_int("decoder_steps", decoder_steps)
        inputs.check_guidance("decoder_guidance_scale", decoder_guidance_scale)
        resize = inputs.check_bool("resize", resize)
        self.geometry.check_size(height, width)
        prior = self.prior(prompts, seeds, negative_prompts, height, width, prior_timesteps, prior_steps,
                           prior_guidance_scale, images_per_prompt, prompt_syntax, long_prompts, resize)
        n = images_per_prompt
        arrays = self.decoder.decode(prior.latents, _repeat(prompts, n), seeds,
                                     _repeat(negative_prompts, n) if negative_prompts else None,
                                     decoder_steps, decoder_guidance_scale, prompt_syntax, long_prompts,
                                     size=(height, width), resize=resize)
        return Generation([Image.fromarray(a) for a in arrays], prior.truncated,
                          self.geometry.generated_size(height, width, resize))

    def __call__(self, *args, **kwargs) -> list[Image.Image]:
        return self.generate(*args, **kwargs).images
