"""FP8 linear layers for Stage C and Stage B (`quantize="fp8"`): float8 e4m3 weights scaled per output channel
once at load, activations scaled per row (per token) at every call, multiplied by torch._scaled_mm.

Why torch._scaled_mm and not torchao: the GPU machines this project targets run without network and without
torchao, and the recipe needs nothing torchao adds (rowwise scales, dynamic activations, whole graphs under
torch.compile). torch._scaled_mm also runs on the CPU, so the numerics are tested where there is no GPU.

What stays in the model's dtype: convolutions, norms, attention's softmax (SDPA), the text encoders, Stage A, and a
linear layer whose in or out features are not multiples of 16, which CUDA's FP8 matmul cannot take (the same
layers stay unquantized on every device, so a CPU run computes what a GPU run does).
"""

import torch
from torch import nn

QUANTIZE_MODES = ("none", "fp8")
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448: values are saturated to it rather than overflowing to NaN
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero
MATMUL_MULTIPLE = 16  # CUDA's FP8 matmul needs in and out features divisible by this
FP8_CAPABILITY = (8, 9)  # Ada and Hopper (sm_89, sm_90) and newer


def check_quantize(mode) -> str:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    return mode


def fp8_problem(device_type: str, capability: tuple[int, int] | None, name: str = "") -> str | None:
    """Why a device cannot run FP8 matmuls, in one line; None when it can (any CPU can, slowly)."""
    if device_type == "cpu":
        return None
    if device_type != "cuda":
        return f"quantize='fp8' runs on NVIDIA GPUs and the CPU, not on {device_type}"
    if capability is None or tuple(capability) < FP8_CAPABILITY:
        found = "?" if capability is None else ".".join(map(str, capability))
        return (f"quantize='fp8' needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                f"{name or 'this GPU'} has {found}: use quantize='none' there")
    return None


def check_fp8_device(device: torch.device) -> None:
    """Raises ValueError (one line) when `device` cannot run FP8 matmuls."""
    device = torch.device(device)
    capability = name = None
    if device.type == "cuda":
        capability, name = torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    problem = fp8_problem(device.type, capability, name)
    if problem:
        raise ValueError(problem)


def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] as float8 e4m3 and its float32 scales [rows, 1]: x ≈ fp8 × scale, each row's largest magnitude
    mapped to E4M3_MAX."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=AMAX_FLOOR) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Float8Linear(nn.Module):
    """nn.Linear's y = x Wᵀ + b with W in float8 e4m3 (one scale per output feature) and x quantized per row at
    each call. The product comes out in bfloat16 (what CUDA's rowwise-scaled matmul gives) and returns in the
    input's dtype. Buffers, not parameters: nothing here is trained, and a stage's dtype is read from its
    parameters, which this layer must not turn into float8."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, weight_scale = rowwise_fp8(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in], row-major: its transpose is the column-major mat2
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).contiguous())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        quantized, scale = rowwise_fp8(rows)
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16)
        out = out.to(x.dtype)
        if self.bias is not None:  # added apart: not every CUDA build takes a bias with rowwise scales
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fits_fp8(linear: nn.Linear) -> bool:
    return linear.in_features % MATMUL_MULTIPLE == 0 and linear.out_features % MATMUL_MULTIPLE == 0


def quantize_linears(module: nn.Module) -> list[str]:
    """Replaces, in place, every nn.Linear under `module` whose sizes FP8 matmuls take by a Float8Linear; returns
    the names of those left as they were. Run it after loading: the checkpoints' layout hooks expect nn.Linear."""
    kept = []
    for name, child in list(module.named_modules()):
        for attr, layer in list(child.named_children()):
            if type(layer) is not nn.Linear:
                continue
            if fits_fp8(layer):
                setattr(child, attr, Float8Linear(layer))
            else:
                kept.append(f"{name}.{attr}" if name else attr)
    return kept
