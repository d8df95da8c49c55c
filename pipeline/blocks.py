"""Building blocks shared by Stage C and Stage B, with parameter names of the published checkpoints."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def unset_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An nn.Embedding whose weight a checkpoint will set. Its own random init, run on the meta device the loader
    builds modules on, imports dynamo: seconds of CPU in every stage actor, for values that are replaced."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor, without affine parameters."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.c = c
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.c,), eps=self.eps)
        return x.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response normalisation over the spatial axes of an NHWC tensor."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        agg_norm = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        stand_div_norm = agg_norm / (agg_norm.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * stand_div_norm) + self.beta + x


def channel_mlp(c_in: int, c: int) -> nn.Sequential:
    # Index 3 held a Dropout in training; an Identity keeps the checkpoint's indices.
    return nn.Sequential(nn.Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Identity(),
                         nn.Linear(c * 4, c))


class ResBlock(nn.Module):
    """Stage C's residual block: the skip joins before the depthwise convolution."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = channel_mlp(c, c)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        x_res = x
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = self.norm(self.depthwise(x)).permute(0, 2, 3, 1)
        return self.channelwise(x).permute(0, 3, 1, 2) + x_res


class ResBlockStageB(nn.Module):
    """Stage B's residual block: the skip joins after the depthwise convolution."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = channel_mlp(c + c_skip, c)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        x_res = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        return self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x_res


class TimestepBlock(nn.Module):
    def __init__(self, c: int, c_timestep: int):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(t)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with one fused q/k/v projection. Its state dict keeps the checkpoints' layout
    (separate `to_q`/`to_k`/`to_v`, `to_out.0`): hooks split and fuse on save and load."""

    def __init__(self, c: int, nhead: int):
        super().__init__()
        self.nhead = nhead
        self.inner = nhead * (c // nhead)
        self.to_qkv = nn.Linear(c, 3 * self.inner)
        self.to_out = nn.Linear(self.inner, c)
        self.register_load_state_dict_pre_hook(_fuse_qkv)
        self.register_state_dict_post_hook(_split_qkv)

    def key_value(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.to_qkv, nn.Linear):  # a quantized projection (pipeline.fp8): all of it, once a run
            return self.to_qkv(tokens)[..., self.inner:].chunk(2, dim=-1)
        w = self.to_qkv.weight[self.inner:]
        b = self.to_qkv.bias[self.inner:]
        return F.linear(tokens, w, b).chunk(2, dim=-1)

    def forward(self, x_tokens: torch.Tensor, cond_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Self-attention over `x_tokens` joined with precomputed keys and values of the condition."""
        q, k, v = self.to_qkv(x_tokens).chunk(3, dim=-1)
        k = torch.cat([k, cond_kv[0]], dim=1)
        v = torch.cat([v, cond_kv[1]], dim=1)
        batch, n_q, _ = q.shape
        q, k, v = (t.unflatten(-1, (self.nhead, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, n_q, self.inner))


def _fuse_qkv(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    # Problems are reported under the checkpoint's key names, which are the ones a user can look up. A part that
    # is missing or misshapen is replaced by the module's own tensor, so that torch does not report the fused
    # key a second time; the load fails on the reported problem all the same.
    def take(key: str, expected: tuple) -> torch.Tensor | None:
        tensor = state_dict.pop(key, None)
        if tensor is None:
            missing_keys.append(key)
        elif tuple(tensor.shape) != expected:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(tensor.shape)} from "
                              f"checkpoint, the shape in current model is {expected}.")
            return None
        return tensor

    for p in ("weight", "bias"):
        fused, out = getattr(module.to_qkv, p), getattr(module.to_out, p)
        parts = [take(f"{prefix}to_{n}.{p}", (module.inner, *fused.shape[1:])) for n in "qkv"]
        ok = all(part is not None for part in parts)
        state_dict[f"{prefix}to_qkv.{p}"] = torch.cat(parts, dim=0) if ok else fused
        part = take(f"{prefix}to_out.0.{p}", tuple(out.shape))
        state_dict[f"{prefix}to_out.{p}"] = out if part is None else part


def _split_qkv(module, state_dict, prefix, local_metadata):
    for p in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}to_qkv.{p}")
        for n, part in zip("qkv", fused.chunk(3, dim=0), strict=True):
            state_dict[f"{prefix}to_{n}.{p}"] = part.clone()  # safetensors refuses tensors sharing memory
        state_dict[f"{prefix}to_out.0.{p}"] = state_dict.pop(f"{prefix}to_out.{p}")


class AttnBlock(nn.Module):
    """Self-attention over the feature map, with the mapped condition appended to keys and values."""

    def __init__(self, c: int, c_cond: int, nhead: int):
        super().__init__()
        self.norm = LayerNorm2d(c)
        self.attention = Attention(c, nhead)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def condition(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the condition: fixed for a whole sampling run, so computed once."""
        return self.attention.key_value(self.kv_mapper(cond))

    def forward(self, x: torch.Tensor, cond_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        out = self.attention(tokens, cond_kv)
        return x + out.transpose(1, 2).reshape(batch, c, h, w)


def timestep_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise ratio r in [0, 1], computed in float32."""
    r = r.float() * max_positions
    half_dim = c_r // 2
    freqs = torch.arange(half_dim, device=r.device).float().mul(-math.log(max_positions) / (half_dim - 1)).exp()
    emb = r[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb
