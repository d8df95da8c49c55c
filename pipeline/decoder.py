"""Stage B, the decoder diffusion model: denoises Stage A's 4-channel latent, conditioned on a Stage C latent."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, LayerNorm2d, ResBlockStageB, TimestepBlock, timestep_embedding


@dataclass(frozen=True)
class DecoderConfig:
    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: tuple = (320, 640, 1280, 1280)
    nhead: tuple = (-1, 10, 20, 20)
    blocks: tuple = (4, 4, 14, 4)
    level_config: tuple = ("CT", "CTA", "CTA", "CTA")
    inject_effnet: tuple = (False, True, True, True)
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3

    @property
    def downscale(self) -> int:
        """How many latent pixels one pixel of the deepest level spans, per side."""
        return self.patch_size * 2 ** (len(self.c_hidden) - 1)


class StageB(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        cfg = config
        levels = len(cfg.c_hidden)
        inject = list(cfg.inject_effnet)
        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond)
        self.effnet_mappers = nn.ModuleList(
            [nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if i else None for i in inject + inject[::-1]]
        )
        self.seq_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_in * cfg.patch_size**2, cfg.c_hidden[0], kernel_size=1),
            LayerNorm2d(cfg.c_hidden[0]),
        )

        def block(kind: str, c: int, nhead: int, c_skip: int) -> nn.Module:
            if kind == "C":
                return ResBlockStageB(c, c_skip, kernel_size=cfg.kernel_size)
            if kind == "A":
                return AttnBlock(c, cfg.c_cond, nhead)
            if kind == "T":
                return TimestepBlock(c, cfg.c_r)
            raise ValueError(f"level_config: block type {kind!r} is not one of C, T, A")

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(cfg.c_hidden[i - 1]),
                                           nn.Conv2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], kernel_size=2, stride=2)))
            c_skip = cfg.c_cond if inject[i] else 0
            for _ in range(cfg.blocks[i]):
                for kind in cfg.level_config[i]:
                    level.append(block(kind, cfg.c_hidden[i], cfg.nhead[i], c_skip))
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(cfg.blocks[i]):
                for k, kind in enumerate(cfg.level_config[i]):
                    c_skip = cfg.c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    c_skip += cfg.c_cond if inject[i] else 0
                    level.append(block(kind, cfg.c_hidden[i], cfg.nhead[i], c_skip))
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(cfg.c_hidden[i]),
                                           nn.ConvTranspose2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], kernel_size=2,
                                                              stride=2)))
            self.up_blocks.append(level)

        self.clf = nn.Sequential(
            LayerNorm2d(cfg.c_hidden[0]),
            nn.Conv2d(cfg.c_hidden[0], 2 * cfg.c_out * cfg.patch_size**2, kernel_size=1),
            nn.PixelShuffle(cfg.patch_size),
        )

    def condition(self, effnet: torch.Tensor, clip: torch.Tensor, latent_size: tuple[int, int] | None = None) -> dict:
        """Everything that depends only on the conditions, reusable across sampler steps: the keys and
        values of the CLIP embedding for each attention block, and the Stage C latent mapped per level.

        Given the size of the latent to denoise, the mapped Stage C latent of every level is computed here
        rather than at the first step, so that the steps only read `cond` (a compiled step must not write
        to it: that would change its guards and compile a second graph)."""
        clip = self.seq_norm(self.clip_mapper(clip))
        cond = {block: block.condition(clip) for block in self.modules() if isinstance(block, AttnBlock)}
        cond["effnet"] = effnet
        if latent_size is not None:
            sizes = self.level_sizes(*latent_size)
            for index, size in enumerate(sizes + sizes[::-1]):  # down levels, then up levels from the deepest
                self._effnet_features(index, size, cond)
        return cond

    def level_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The feature-map size of each level for a latent of height×width."""
        h, w = height // self.config.patch_size, width // self.config.patch_size
        return [(h // 2**i, w // 2**i) for i in range(len(self.config.c_hidden))]

    def _effnet_features(self, index: int, size: torch.Size, cond: dict) -> torch.Tensor | None:
        mapper = self.effnet_mappers[index]
        if mapper is None:
            return None
        key = ("effnet", index, tuple(size))
        if key not in cond:
            effnet = cond["effnet"]
            resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
            cond[key] = mapper(resized.to(effnet.dtype))
        return cond[key]

    def _run(self, block: nn.Module, x: torch.Tensor, r_embed: torch.Tensor, cond: dict, skip=None):
        if isinstance(block, ResBlockStageB):
            return block(x, skip)
        if isinstance(block, AttnBlock):
            return block(x, cond[block])
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)

    def denoise(self, x: torch.Tensor, r: torch.Tensor, cond: dict, eps: float = 1e-3) -> torch.Tensor:
        x_in = x
        r_embed = timestep_embedding(r, self.config.c_r).to(x.dtype)
        x = self.embedding(x)
        level_outputs = []
        for i, level in enumerate(self.down_blocks):
            for block in level:
                skip = self._effnet_features(i, x.shape[-2:], cond) if isinstance(block, ResBlockStageB) else None
                x = self._run(block, x, r_embed, cond, skip)
            level_outputs.insert(0, x)

        x = level_outputs[0]
        for i, level in enumerate(self.up_blocks):
            for j, block in enumerate(level):
                skip = None
                if isinstance(block, ResBlockStageB):
                    effnet_c = self._effnet_features(len(self.down_blocks) + i, x.shape[-2:], cond)
                    skip = level_outputs[i] if j == 0 and i > 0 else None
                    if effnet_c is not None:
                        skip = effnet_c if skip is None else torch.cat([skip, effnet_c], dim=1)
                x = self._run(block, x, r_embed, cond, skip)

        a, b = self.clf(x).chunk(2, dim=1)
        b = b.sigmoid() * (1 - eps * 2) + eps
        return (x_in - a) / b

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, r, self.condition(effnet, clip))
