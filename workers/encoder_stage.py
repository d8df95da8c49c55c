"""The encoder stage: CPU tasks that turn decoded pixels into PNG, JPEG or WebP bytes, next to the decoder that
made them, so that compressed images, not raw pixels, travel on to the writers."""

import hashlib
import time

import numpy as np

from wurstfabrik.store.encoding import encode_image

from .batches import column
from .faults import fails_encoding, maybe_slow_encoding
from .metrics import MetricLabels, StageMeter


def encode_images(batch: dict[str, np.ndarray], image_format: str, quality: int,
                  labels: MetricLabels | None = None) -> dict[str, np.ndarray]:
    """Replaces `pixels` by `data` (the encoded file), `bytes` and `sha256`; an image that cannot be encoded
    fails alone, with its error."""
    meter = StageMeter("encode", labels)
    with meter.batch():
        batch = _encode(batch, image_format, quality)
    meter.images(s for s, error in zip(batch["encode_s"], batch["error"], strict=True) if not error)
    return batch


def _encode(batch: dict[str, np.ndarray], image_format: str, quality: int) -> dict[str, np.ndarray]:
    maybe_slow_encoding()
    n = len(batch["prompt_id"])
    errors = list(batch["error"])
    data, sizes, digests, seconds = [b""] * n, [0] * n, [""] * n, [0.0] * n
    for i in range(n):
        if errors[i]:
            continue
        start = time.perf_counter()
        try:
            if fails_encoding(str(batch["prompt"][i])):
                raise OSError("test fault: encoding refused")
            height, width = (int(v) for v in batch["image_size"][i])
            pixels = np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(height, width, 3)
            data[i] = encode_image(pixels, image_format, quality)
        except Exception as e:  # this image fails, the others go on; the manifest records why
            errors[i] = f"encode: {type(e).__name__}: {e}"
            continue
        sizes[i], digests[i] = len(data[i]), hashlib.sha256(data[i]).hexdigest()
        seconds[i] = time.perf_counter() - start
    del batch["pixels"]
    batch.update(data=column(data), bytes=column(sizes, np.int64), sha256=column(digests),
                 encode_s=column(seconds, np.float64), error=column(errors))
    return batch
