"""The decoder stage: a Ray Data actor that holds Stage B and Stage A on its device, and delivers each image at
exactly the size its row asked for."""

import time

import numpy as np
import ray

from .batches import column, model_batches
from .faults import maybe_kill, record_batch
from .metrics import StageMeter


class DecoderStage:
    """Replaces each Stage C latent with its decoded image (uint8 RGB bytes and size) and decoder seconds."""

    def __init__(self, spec, models, labels=None):
        self.spec = spec
        self.meter = StageMeter("decoder", labels)
        self.pipe, self.compile_cache = models.load_decoder(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.meter.batch():
            return self._run(batch)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maybe_kill("decoder")
        n = len(batch["prompt_id"])
        errors = list(batch["error"])
        pixels, sizes, generated, seconds = [b""] * n, [[0, 0]] * n, [[0, 0]] * n, [0.0] * n
        spec = self.spec
        for (height, width), rows in model_batches(batch, spec.placement.decoder_batch_size):
            record_batch("decoder", height, width, len(rows))
            start = time.perf_counter()
            try:
                # An array: the pipeline takes it to its device (no torch here, so simulated actors need none).
                latents = np.stack([
                    np.frombuffer(batch["latent"][i], dtype=np.float32).reshape(batch["latent_shape"][i])
                    for i in rows])
                images = self.pipe.decode(latents, [str(batch["prompt"][i]) for i in rows],
                                          [int(batch["seed"][i]) for i in rows],
                                          [str(batch["negative_prompt"][i]) for i in rows],
                                          steps=spec.decoder_steps, guidance_scale=spec.decoder_guidance_scale,
                                          prompt_syntax=spec.prompt_syntax, long_prompts=spec.long_prompts,
                                          size=(height, width), resize=spec.resize)
            except Exception as e:  # the rows fail, the job goes on; the manifest records why
                for i in rows:
                    errors[i] = f"decoder: {type(e).__name__}: {e}"
                continue
            per_image = (time.perf_counter() - start) / len(rows)
            made = list(self.pipe.geometry.image_size(*latents.shape[-2:]))  # before the cut to the request
            for j, i in enumerate(rows):
                pixels[i] = images[j].tobytes()
                sizes[i] = list(images[j].shape[:2])
                generated[i] = made
                seconds[i] = per_image
            self.meter.images([per_image] * len(rows))
        self.compile_cache.after_first_batch()
        del batch["latent"], batch["latent_shape"]
        batch.update(pixels=column(pixels), image_size=column(sizes), generated_size=column(generated),
                     decoder_s=column(seconds, np.float64),
                     error=column(errors), decoder_node=column([ray.get_runtime_context().get_node_id()] * n))
        return batch
