"""Image encoding: the three file formats a job can write, their extensions and content types."""

import io

import numpy as np
from PIL import Image

# format → (PIL's name, extension, content type)
IMAGE_FORMATS = {
    "png": ("PNG", "png", "image/png"),
    "jpeg": ("JPEG", "jpg", "image/jpeg"),
    "webp": ("WEBP", "webp", "image/webp"),
}


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 RGB pixels [H, W, 3] as the bytes of a PNG, JPEG or WebP file."""
    pil_format = IMAGE_FORMATS[image_format][0]
    options = {"quality": quality} if image_format in ("jpeg", "webp") else {}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def extension(image_format: str) -> str:
    return IMAGE_FORMATS[image_format][1]


def content_type(image_format: str) -> str:
    return IMAGE_FORMATS[image_format][2]
