"""Before a job with quantize='fp8' starts its stages: a one-off Ray task on a GPU of the kind each stage will get,
asking whether it runs FP8 matmuls. The driver may have no GPU; the stages' actors check their own device as well."""

import ray

PROBE_TIMEOUT_S = 600.0  # long enough for an autoscaler to add a GPU node; past it the actors' own check decides


def _probe() -> str | None:
    import torch

    from wurstfabrik.pipeline.fp8 import fp8_problem

    if not torch.cuda.is_available():
        return None  # no GPU visible: the stage would run on the CPU, where FP8 works (slowly)
    return fp8_problem("cuda", torch.cuda.get_device_capability(), torch.cuda.get_device_name())


def fp8_gpu_problem(placement, gpus: tuple[float, float]) -> str | None:
    """Why a GPU the prior or decoder actors will get cannot run FP8, in one line; None when both can, when the
    stages run on CPUs, or when no such GPU answered within PROBE_TIMEOUT_S (the actors then refuse for
    themselves)."""
    stages = (("prior", gpus[0], placement.prior_resources), ("decoder", gpus[1], placement.decoder_resources))
    probes = {name: ray.remote(_probe).options(num_cpus=0, num_gpus=n, resources=resources or None).remote()
              for name, n, resources in stages if n > 0}
    if not probes:
        return None
    try:
        answers = ray.get(list(probes.values()), timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        for ref in probes.values():
            ray.cancel(ref)
        return None
    for name, problem in zip(probes, answers, strict=True):
        if problem:
            return f"{name} stage: {problem}"
    return None
