"""The prior stage: a Ray Data actor that holds the prior half of the pipeline on its device."""

import time

import numpy as np
import ray

from .batches import column, model_batches
from .faults import maybe_hang, maybe_kill, record_batch
from .metrics import StageMeter


class PriorStage:
    """Adds each image's Stage C latent (float32 bytes and shape), its truncation flag and prior seconds."""

    def __init__(self, spec, models, labels=None):
        self.spec = spec
        self.meter = StageMeter("prior", labels)
        self.pipe, self.compile_cache = models.load_prior(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.meter.batch():
            return self._run(batch)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maybe_kill("prior")
        maybe_hang("prior")
        n = len(batch["prompt_id"])
        batch.setdefault("error", column([""] * n))
        errors = list(batch["error"])
        latents, shapes = [b""] * n, [[0, 0, 0]] * n
        truncated, seconds = [False] * n, [0.0] * n
        spec = self.spec
        for (height, width), rows in model_batches(batch, spec.placement.prior_batch_size):
            record_batch("prior", height, width, len(rows))
            start = time.perf_counter()
            try:
                result = self.pipe([str(batch["prompt"][i]) for i in rows], [int(batch["seed"][i]) for i in rows],
                                   [str(batch["negative_prompt"][i]) for i in rows], height, width,
                                   timesteps=spec.prior_timesteps, steps=spec.prior_steps,
                                   guidance_scale=spec.prior_guidance_scale, prompt_syntax=spec.prompt_syntax,
                                   long_prompts=spec.long_prompts, resize=spec.resize)
            except Exception as e:  # the rows fail, the job goes on; the manifest records why
                for i in rows:
                    errors[i] = f"prior: {type(e).__name__}: {e}"
                continue
            per_image = (time.perf_counter() - start) / len(rows)
            array = _array(result.latents)
            for j, i in enumerate(rows):
                latents[i] = array[j].tobytes()
                shapes[i] = list(array[j].shape)
                truncated[i] = result.truncated[j]
                seconds[i] = per_image
            self.meter.images([per_image] * len(rows))
        self.compile_cache.after_first_batch()
        batch.update(latent=column(latents), latent_shape=column(shapes), truncated=column(truncated, bool),
                     prior_s=column(seconds, np.float64), error=column(errors),
                     prior_node=column([ray.get_runtime_context().get_node_id()] * n))
        return batch


def _array(latents) -> np.ndarray:
    """The latents as float32 numpy: a torch tensor from the real pipeline, an array from a simulated one."""
    if isinstance(latents, np.ndarray):
        return latents.astype(np.float32, copy=False)
    return latents.float().cpu().numpy()
