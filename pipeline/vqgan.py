"""Stage A, Paella's VQGAN: turns Stage B's 4-channel latent into pixels (and pixels back into latents)."""

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import unset_embedding


@dataclass(frozen=True)
class VQGANConfig:
    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764

    @property
    def upscale(self) -> int:
        """Pixels per latent pixel, per side."""
        return self.up_down_scale_factor * 2 ** (self.levels - 1)


class MixingResidualBlock(nn.Module):
    def __init__(self, c: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, embed_dim), nn.GELU(), nn.Linear(embed_dim, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        x_temp = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(x_temp) * g[2]
        x_temp = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.channelwise(x_temp).permute(0, 3, 1, 2) * g[5]


class Codebook(nn.Module):
    """The vector-quantiser's codebook; decoding uses the unquantised latents, as the reference does."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = unset_embedding(num_embeddings, dim)


class StageA(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        cfg = config
        scale = cfg.up_down_scale_factor
        c_levels = [cfg.embed_dim // (2**i) for i in reversed(range(cfg.levels))]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(scale),
                                      nn.Conv2d(cfg.in_channels * scale**2, c_levels[0], kernel_size=1))
        down = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(c_levels[i], c_levels[i] * 4))
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], cfg.latent_channels, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(cfg.latent_channels)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = Codebook(cfg.num_vq_embeddings, cfg.latent_channels)

        up = [nn.Sequential(nn.Conv2d(cfg.latent_channels, c_levels[-1], kernel_size=1))]
        for i in range(cfg.levels):
            c = c_levels[cfg.levels - 1 - i]
            for _ in range(cfg.bottleneck_blocks if i == 0 else 1):
                up.append(MixingResidualBlock(c, c * 4))
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[cfg.levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], cfg.out_channels * scale**2, kernel_size=1),
                                       nn.PixelShuffle(scale))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.down_blocks(self.in_block(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.out_block(self.up_blocks(latents))
