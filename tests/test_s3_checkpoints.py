"""Jobs whose checkpoints are s3:// prefixes written by `wurstfabrik mirror`, with boto3's defaults against rclone
and moto: the images are byte for byte those of the same job on the local folders; two actors on one node fetch
each file once between them; a checkpoint whose weights changed under its prefix is refused on resume, naming it;
a missing index, a missing file and no read permission are each one line, exit 2, before Ray is started."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import moto_environment, s3_environment, set_environment, shared_ray
from fault_proxy import FaultProxy
from job_helpers import PROMPTS, make_spec, spec_file, start_local_ray, write_prompts
from safetensors.torch import load_file, save_file

from wurstfabrik.jobs.cli import main
from wurstfabrik.jobs.mirror import mirror
from wurstfabrik.jobs.provenance import CheckpointChecks
from wurstfabrik.pipeline import PriorPipeline
from wurstfabrik.pipeline.geometry import Geometry
from wurstfabrik.pipeline.tiny import write_model_only_prior
from wurstfabrik.store.checkpoint_index import INDEX_FILE
from wurstfabrik.store.storage import open_output
from wurstfabrik.workers.models import StageModels
from wurstfabrik.workers.prior_stage import PriorStage

PRIOR_WEIGHTS = "prior/diffusion_pytorch_model.safetensors"


def job_spec(tiny_checkpoints, folder: Path, **fields):
    """Two images of the tiny checkpoints, the same job for every store (the prompt file's name makes the ids)."""
    prompts = write_prompts(folder / "p.parquet", PROMPTS[:2])
    return make_spec(tiny_checkpoints, prompts, folder / "out", **fields)


def images(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()}


def said(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def mirror_tiny(tiny_checkpoints, bucket: str) -> tuple[str, str]:
    prior, decoder = f"s3://{bucket}/wuerstchen/prior/", f"s3://{bucket}/wuerstchen/decoder/"
    mirror(str(tiny_checkpoints[0]), prior)
    mirror(str(tiny_checkpoints[1]), decoder)
    return prior, decoder


@pytest.fixture(scope="session")
def local_images(tiny_checkpoints, s3_server, tmp_path_factory) -> dict[str, bytes]:
    """The job's images made from the local folders, on the tests' shared Ray."""
    folder = tmp_path_factory.mktemp("local-job")
    spec = job_spec(tiny_checkpoints, folder)
    shared_ray(s3_server)
    assert main(["run", str(spec_file(spec, folder / "job.yaml")), "--no-progress"]) == 0
    made = images(folder / "out")
    assert len(made) == 2
    return made


def test_a_job_on_mirrored_checkpoints_makes_the_local_folders_images_and_refuses_changed_weights(
        local_images, s3_env, s3_bucket, ray_local, tiny_checkpoints, tmp_path, capsys):
    prior, decoder = mirror_tiny(tiny_checkpoints, s3_bucket)
    spec = job_spec(tiny_checkpoints, tmp_path, prior=prior, decoder=decoder, checkpoint_cache=str(tmp_path / "c"))
    job = spec_file(spec, tmp_path / "job.yaml")
    assert main(["run", str(job), "--no-progress"]) == 0
    assert images(tmp_path / "out") == local_images
    recorded = json.loads((tmp_path / "out" / "job.json").read_text())["params"]["prior_checkpoint"]
    assert (recorded["given"], recorded["source"]) == (prior, "s3")
    assert recorded["files"][PRIOR_WEIGHTS] == {
        "bytes": (tiny_checkpoints[0] / PRIOR_WEIGHTS).stat().st_size,
        "sha256": hashlib.sha256((tiny_checkpoints[0] / PRIOR_WEIGHTS).read_bytes()).hexdigest()}

    retrained = shutil.copytree(tiny_checkpoints[0], tmp_path / "retrained")
    weights = load_file(retrained / PRIOR_WEIGHTS)
    weights["projection.bias"] += 1  # other values, the same size
    save_file(weights, retrained / PRIOR_WEIGHTS)
    assert mirror(str(retrained), prior).copied == [PRIOR_WEIGHTS]
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress"]) == 2
    (line,) = said(capsys.readouterr().err)
    assert (f"(changed: prior_checkpoint: {prior} is not the checkpoint those images were made with ({PRIOR_WEIGHTS} "
            "changed))") in line and line.endswith("pass --force to regenerate them all")


@pytest.mark.slow
@pytest.mark.own_ray
def test_a_job_on_checkpoints_mirrored_to_moto_makes_the_local_folders_images(local_images, moto_env, moto_server,
                                                                              tiny_checkpoints, tmp_path):
    prior, decoder = mirror_tiny(tiny_checkpoints, moto_env)
    spec = job_spec(tiny_checkpoints, tmp_path, prior=prior, decoder=decoder, checkpoint_cache=str(tmp_path / "c"))
    start_local_ray(moto_environment(moto_server))  # moto's settings on every node
    try:
        assert main(["run", str(spec_file(spec, tmp_path / "job.yaml")), "--no-progress"]) == 0
    finally:
        ray.shutdown()
    assert images(tmp_path / "out") == local_images


def test_two_actors_on_one_node_fetch_each_file_once_and_both_load(s3_server, s3_bucket, ray_local, monkeypatch,
                                                                   tiny_checkpoints, tmp_path):
    set_environment(monkeypatch, s3_environment(s3_server))
    prior = f"s3://{s3_bucket}/prior"
    mirror(str(tiny_checkpoints[0]), prior)
    # Slow answers, so that the two actors' starts overlap; every request counted.
    proxy = FaultProxy(s3_server.endpoint, share=0.0, delay_s=0.1).start()
    try:
        env = s3_environment(s3_server, proxy.endpoint)
        set_environment(monkeypatch, env)
        spec = job_spec(tiny_checkpoints, tmp_path, prior=prior, checkpoint_cache=str(tmp_path / "cache"))
        identity = CheckpointChecks(cache=spec.checkpoint_cache).identity(prior, "prior")  # the driver's check
        params = {"prior_checkpoint": identity, "decoder_checkpoint": {"given": spec.decoder, "source": "folder"}}
        models = StageModels.from_job(params, Geometry())
        stage = ray.remote(PriorStage).options(num_cpus=0.5, runtime_env={"env_vars": {
            k: v for k, v in env.items() if v is not None}})
        actors = [stage.remote(spec, models) for _ in range(2)]
        batch = {"prompt_id": np.array(["a", "b"], dtype=object), "prompt": np.array(PROMPTS[:2], dtype=object),
                 "negative_prompt": np.array(["", ""], dtype=object), "seed": np.array([1, 2]),
                 "height": np.array([128, 128]), "width": np.array([128, 128])}
        outputs = ray.get([actor.__call__.remote(dict(batch)) for actor in actors], timeout=300)
    finally:
        proxy.stop()
    assert list(outputs[0]["error"]) == ["", ""] and list(outputs[0]["latent"]) == list(outputs[1]["latent"])
    prefix = f"/{s3_bucket}/prior/"
    got = [path[len(prefix):] for method, path, _ in proxy.requests if method == "GET" and path.startswith(prefix)]
    files = sorted(p.relative_to(tiny_checkpoints[0]).as_posix() for p in tiny_checkpoints[0].rglob("*")
                   if p.is_file() and not p.relative_to(tiny_checkpoints[0]).as_posix().startswith("scheduler/"))
    assert sorted(got) == sorted([*files, INDEX_FILE])  # each once: the driver's configs, then one actor's weights


def test_a_model_only_prior_and_its_text_encoder_from_s3_load_as_from_folders(s3_env, s3_bucket, tiny_checkpoints,
                                                                               tmp_path):
    model_only = write_model_only_prior(tmp_path / "prior-model")
    prior, text = f"s3://{s3_bucket}/prior-model", f"s3://{s3_bucket}/prior"
    mirror(str(model_only), prior)
    mirror(str(tiny_checkpoints[0]), text)
    identity = CheckpointChecks(cache=str(tmp_path / "cache")).identity(prior, "prior", text)
    assert identity["text"]["given"] == text and "prior/config.json" not in identity["text"]["files"]
    spec = job_spec(tiny_checkpoints, tmp_path, prior=prior, prior_text=text, dtype="float32",
                    checkpoint_cache=str(tmp_path / "cache"))
    params = {"prior_checkpoint": identity, "decoder_checkpoint": {"given": spec.decoder, "source": "folder"}}
    pipe, _ = StageModels.from_job(params, Geometry()).load_prior(spec)
    reference = PriorPipeline.from_pretrained(model_only, device="cpu", dtype=torch.float32,
                                              prior_text=tiny_checkpoints[0])
    run = dict(height=128, width=128, steps=3)
    assert torch.equal(pipe(PROMPTS[:2], [1, 2], **run).latents, reference(PROMPTS[:2], [1, 2], **run).latents)


def damage(case: str, s3_server, bucket: str, prefix: str) -> str:
    """Breaks a mirrored prior as each case says; returns what the one line must say."""
    client, uri = s3_server.client(), f"s3://{bucket}/{prefix}"
    if case == "missing index":
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{INDEX_FILE}")
        return f"error: {uri}: no checkpoint index ({INDEX_FILE}) there: not a checkpoint written by `wurstfabrik"
    if case == "a file the index leaves out":
        remote = open_output(uri)
        index = json.loads(remote.get(INDEX_FILE))
        del index["files"]["prior/config.json"]
        remote.put(INDEX_FILE, json.dumps(index).encode())
        return f"error: {uri}/prior/config.json: missing"
    if case == "an object missing from the store":
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{PRIOR_WEIGHTS}")
        return f"error: {uri}/{PRIOR_WEIGHTS}: named by the checkpoint index but not in the store"
    if case == "an object changed since it was mirrored":
        client.put_object(Bucket=bucket, Key=f"{prefix}/{PRIOR_WEIGHTS}", Body=b"other weights")
        return f"error: {uri}/{PRIOR_WEIGHTS}: changed since the checkpoint was mirrored (13 bytes where the index says"
    return f"error: {uri}/{INDEX_FILE}: access denied (HTTP 403)"


@pytest.mark.own_ray  # needs no Ray at all: the shared one is shut down to show that none is started
@pytest.mark.parametrize("case", ["missing index", "a file the index leaves out", "an object missing from the store",
                                  "an object changed since it was mirrored", "no read permission"])
def test_a_broken_s3_checkpoint_is_one_line_and_exit_2_before_ray_starts(case, s3_server, s3_bucket, monkeypatch,
                                                                         tiny_checkpoints, tmp_path, capsys):
    ray.shutdown()
    set_environment(monkeypatch, s3_environment(s3_server))
    mirror(str(tiny_checkpoints[0]), f"s3://{s3_bucket}/prior")
    expected = damage(case, s3_server, s3_bucket, "prior")
    proxy = None
    if case == "no read permission":  # a bucket policy that lets these credentials write the output, not read this
        proxy = FaultProxy(s3_server.endpoint, share=0.0, refuse=lambda method, path: "/prior/" in path).start()
        set_environment(monkeypatch, s3_environment(s3_server, proxy.endpoint))
    out = tmp_path / "out"
    spec = job_spec(tiny_checkpoints, tmp_path, prior=f"s3://{s3_bucket}/prior", checkpoint_cache=str(tmp_path / "c"))
    capsys.readouterr()
    try:
        assert main(["run", str(spec_file(spec, tmp_path / "job.yaml")), "--no-progress"]) == 2
    finally:
        if proxy:
            proxy.stop()
    lines = said(capsys.readouterr().err)
    (line,) = [line for line in lines if line.startswith("error: ")]
    assert line.startswith(expected), line
    assert not [line for line in lines if "Traceback" in line]
    if case == "no read permission":
        assert "use credentials that may read it" in line
    assert not ray.is_initialized()  # refused before Ray was started or joined
    assert sorted(p.name for p in out.iterdir()) == ["lease.json"]  # released, and nothing else written
