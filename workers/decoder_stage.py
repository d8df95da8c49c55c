"""The decoder stage: a Ray Data actor that holds Stage B and Stage A on its device."""

import time

import numpy as np
import ray
import torch

from pipeline import DecoderPipeline

from .batches import column, group_rows
from .faults import maybe_kill


class DecoderStage:
    """Replaces each Stage C latent with its decoded image (uint8 RGB bytes and size) and decoder seconds."""

    def __init__(self, spec):
        self.spec = spec
        self.pipe = DecoderPipeline.from_pretrained(spec.decoder, dtype=spec.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maybe_kill("decoder")
        n = len(batch["prompt_id"])
        errors = list(batch["error"])
        pixels, sizes, seconds = [b""] * n, [[0, 0]] * n, [0.0] * n
        for _, rows in group_rows(batch, ("height", "width")).items():
            start = time.perf_counter()
            try:
                latents = torch.from_numpy(np.stack([
                    np.frombuffer(batch["latent"][i], dtype=np.float32).reshape(batch["latent_shape"][i])
                    for i in rows]))
                images = self.pipe.decode(latents, [str(batch["prompt"][i]) for i in rows],
                                          [int(batch["seed"][i]) for i in rows],
                                          [str(batch["negative_prompt"][i]) for i in rows],
                                          steps=self.spec.decoder_steps,
                                          guidance_scale=self.spec.decoder_guidance_scale)
            except Exception as e:  # the rows fail, the job goes on; the manifest records why
                for i in rows:
                    errors[i] = f"decoder: {type(e).__name__}: {e}"
                continue
            per_image = (time.perf_counter() - start) / len(rows)
            for j, i in enumerate(rows):
                pixels[i] = images[j].tobytes()
                sizes[i] = list(images[j].shape[:2])
                seconds[i] = per_image
        del batch["latent"], batch["latent_shape"]
        batch.update(pixels=column(pixels), image_size=column(sizes), decoder_s=column(seconds, np.float64),
                     error=column(errors), decoder_node=column([ray.get_runtime_context().get_node_id()] * n))
        return batch
