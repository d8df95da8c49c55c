"""Bringing generated images to exactly the requested size: cut around the center, or scaled (keeping the aspect
ratio) to the smallest size that covers the request and then cut. pipeline.geometry says which size is generated."""

import torch
import torch.nn.functional as F


def check_size(size) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size must be (height, width), two positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def check_fits(generated: tuple[int, int], size: tuple[int, int]) -> None:
    """A size can be cut from a generated image only if it is no larger on either side."""
    if generated[0] < size[0] or generated[1] < size[1]:
        raise ValueError(f"size: {size[0]}×{size[1]} is larger than the {generated[0]}×{generated[1]} image these "
                         f"latents make; generate at least that size (or pass resize=True)")


def fit_to_size(images: torch.Tensor, size: tuple[int, int], resize: bool = False) -> torch.Tensor:
    """Images [N, C, H, W] with values in [0, 1], cut (or scaled and cut) to `size` (height, width)."""
    height, width = size
    generated = tuple(images.shape[-2:])
    if resize and generated != (height, width):
        scale = max(height / generated[0], width / generated[1])
        scaled = (max(height, round(generated[0] * scale)), max(width, round(generated[1] * scale)))
        if scaled != generated:
            # Antialiased bicubic has no MPS kernel to rely on; the images go to the CPU next anyway.
            work = images.cpu() if images.device.type == "mps" else images
            work = F.interpolate(work.float(), size=scaled, mode="bicubic", antialias=True, align_corners=False)
            images = work.clamp(0, 1).to(images.device)
    h, w = images.shape[-2:]
    check_fits((h, w), size)
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top: top + height, left: left + width]
