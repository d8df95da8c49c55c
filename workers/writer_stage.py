"""The writer stage: encodes images, uploads them under the output prefix, and records manifest rows."""

import hashlib
import io
import json
import time
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from jobs.ids import image_key
from jobs.manifest import write_part
from jobs.storage import open_output

from .batches import column
from .faults import fails_encoding

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
RESULT_COLUMNS = ("prompt_id", "image_index", "status")


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    pil_format, _ = FORMATS[image_format]
    options = {"quality": quality} if image_format in ("jpeg", "webp") else {}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def write_images(batch: dict[str, np.ndarray], spec, job_id: str) -> dict[str, np.ndarray]:
    """Stores the batch's images and their manifest rows (one part per batch); returns each image's status."""
    output = open_output(spec.output)
    params = json.dumps(spec.sampler_params(), sort_keys=True)
    _, content_type = FORMATS[spec.format]
    rows = []
    for i in range(len(batch["prompt_id"])):
        start = time.perf_counter()
        row = {"job_id": job_id, "prompt_id": str(batch["prompt_id"][i]), "image_index": int(batch["image_index"][i]),
               "prompt": str(batch["prompt"][i]), "negative_prompt": str(batch["negative_prompt"][i]),
               "seed": int(batch["seed"][i]), "params": params, "truncated": bool(batch["truncated"][i]),
               "prior_s": float(batch["prior_s"][i]), "decoder_s": float(batch["decoder_s"][i]),
               "prior_node": str(batch["prior_node"][i]), "decoder_node": str(batch["decoder_node"][i]),
               "uri": None, "bytes": None, "sha256": None, "error": batch["error"][i] or None}
        height, width = (int(v) for v in batch["image_size"][i])
        row.update(height=height or None, width=width or None)
        if row["error"] is None:
            try:
                if fails_encoding(row["prompt"]):
                    raise OSError("test fault: encoding refused")
                pixels = np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(height, width, 3)
                data = encode_image(pixels, spec.format, spec.quality)
                key = image_key(row["prompt_id"], row["image_index"], EXTENSIONS[spec.format])
                row.update(uri=output.put(key, data, content_type), bytes=len(data),
                           sha256=hashlib.sha256(data).hexdigest())
            except Exception as e:  # this image fails, the others go on; the manifest records why
                row["error"] = f"write: {type(e).__name__}: {e}"
        row.update(status="ok" if row["error"] is None else "failed", write_s=time.perf_counter() - start,
                   finished_at=datetime.now(timezone.utc))
        rows.append(row)
    if rows:
        write_part(output, rows)
    return {name: column([r[name] for r in rows]) for name in RESULT_COLUMNS}
