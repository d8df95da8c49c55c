"""Stage C, the text-conditional prior: denoises the 16-channel image latent that Stage B decodes."""

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, timestep_embedding


@dataclass(frozen=True)
class PriorConfig:
    c_in: int = 16
    c: int = 1536
    c_cond: int = 1280
    c_r: int = 64
    depth: int = 32
    nhead: int = 24


class StageC(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        c = config.c
        self.projection = nn.Conv2d(config.c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(config.c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(config.depth):
            self.blocks.append(ResBlock(c))
            self.blocks.append(TimestepBlock(c, config.c_r))
            self.blocks.append(AttnBlock(c, c, config.nhead))
        self.out = nn.Sequential(LayerNorm2d(c), nn.Conv2d(c, config.c_in * 2, kernel_size=1))

    def condition(self, c: torch.Tensor) -> dict:
        """Keys and values of the text condition for each attention block, reusable across sampler steps."""
        c_embed = self.cond_mapper(c)
        return {block: block.condition(c_embed) for block in self.blocks if isinstance(block, AttnBlock)}

    def denoise(self, x: torch.Tensor, r: torch.Tensor, cond: dict) -> torch.Tensor:
        x_in = x
        x = self.projection(x)
        r_embed = timestep_embedding(r, self.config.c_r).to(x.dtype)
        for block in self.blocks:
            if isinstance(block, AttnBlock):
                x = block(x, cond[block])
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            else:
                x = block(x)
        a, b = self.out(x).chunk(2, dim=1)
        return (x_in - a) / ((1 - b).abs() + 1e-5)

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, r, self.condition(c))
