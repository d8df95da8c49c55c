"""Jobs on S3-compatible stores (rclone, moto) with boto3's default configuration, as users run them: a job in
every output format is killed with SIGKILL mid-run and resumed, and ends with each image stored exactly once."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from conftest import moto_environment, s3_environment, set_environment, shared_ray
from job_helpers import (
    PROMPTS,
    make_spec,
    ok_keys_once,
    ok_rows,
    spec_file,
    start_driver,
    start_local_ray,
    write_prompts,
)

from wurstfabrik.jobs.cli import main
from wurstfabrik.store.formats import open_format
from wurstfabrik.store.ids import image_key, sample_key
from wurstfabrik.store.manifest import part_keys
from wurstfabrik.store.storage import open_output

# Enough that the run is still making images when the test sees its first manifest part and kills it: with 12, the
# tiny model sometimes recorded them all in the ~0.3 s the test takes to see a part.
IMAGES = 36


def store_environment(store: str, request) -> tuple[dict, str]:
    """boto3's standard configuration pointed at the store, and a fresh bucket on it."""
    if store == "rclone":
        server = request.getfixturevalue("s3_server")
        return s3_environment(server), request.getfixturevalue("s3_bucket")
    bucket = request.getfixturevalue("moto_env")
    return moto_environment(request.getfixturevalue("moto_server")), bucket


def wait_for_s3_parts(output, count: int, driver: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"the driver finished before the fault:\n{log.read_text()[-3000:]}"
        if len(part_keys(output)) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {count} manifest parts after {timeout} s")


def stored_images(output, output_format: str, ext: str) -> list[str]:
    """Every image the output's objects hold, read from the objects themselves: its key for the files format, its
    sample key inside a shard for the others."""
    if output_format == "files":
        return output.list("images/")
    if output_format == "webdataset":
        keys = []
        for shard in (k for k in output.list("shards/") if k.endswith(".tar")):
            with tarfile.open(fileobj=io.BytesIO(output.get(shard))) as tar:
                keys += [n.removesuffix(f".{ext}") for n in tar.getnames() if n.endswith(f".{ext}")]
        return keys
    keys = []
    for shard in (k for k in output.list("data/") if k.endswith(".parquet")):
        keys += pq.read_table(io.BytesIO(output.get(shard)), columns=["key"]).column("key").to_pylist()
    return keys


@pytest.mark.parametrize("store, output_format", [
    ("rclone", "webdataset"),
    pytest.param("rclone", "files", marks=pytest.mark.slow),
    pytest.param("rclone", "parquet", marks=pytest.mark.slow),
    pytest.param("moto", "files", marks=[pytest.mark.slow, pytest.mark.own_ray]),
    pytest.param("moto", "webdataset", marks=[pytest.mark.slow, pytest.mark.own_ray]),
    pytest.param("moto", "parquet", marks=[pytest.mark.slow, pytest.mark.own_ray]),
])
def test_a_killed_s3_job_resumes_to_every_image_exactly_once(store, output_format, request, _ray_session,
                                                            tiny_checkpoints, tmp_path, monkeypatch, capsys):
    env, bucket = store_environment(store, request)
    set_environment(monkeypatch, env)
    uri = f"s3://{bucket}/out"
    prompts = write_prompts(tmp_path / "p.parquet", [f"{p}, take {i}" for i in range(IMAGES // 6) for p in PROMPTS])
    spec = make_spec(tiny_checkpoints, prompts, uri, prior_steps=8, decoder_steps=6, output_format=output_format,
                     shard_size=2, placement={"prior_batch_size": 2, "decoder_batch_size": 2})
    output = open_output(uri)
    # The store's settings on every node: the tests' shared Ray holds rclone's; moto's need a Ray of their own.
    own_ray = store != "rclone"
    if own_ray:
        start_local_ray(env)
    else:
        shared_ray(request.getfixturevalue("s3_server"))
    try:
        log = tmp_path / "driver.log"
        with log.open("w") as driver_output:
            driver = start_driver(spec, tmp_path, ray.get_runtime_context().gcs_address, stdout=driver_output,
                                  stderr=subprocess.STDOUT)
        try:
            wait_for_s3_parts(output, 1, driver, log)
            os.killpg(driver.pid, signal.SIGKILL)
        finally:
            driver.wait()
        made_before = len(ok_keys_once(output))
        assert 0 < made_before < IMAGES
        code = main(["run", str(spec_file(spec, tmp_path / "job.yaml")), "--no-progress"])
    finally:
        if own_ray:
            ray.shutdown()
    assert code == 0, capsys.readouterr().err[-3000:]
    keys = ok_keys_once(output)
    assert len(keys) == len(set(keys)) == IMAGES
    expected = [image_key(*key, "png") if output_format == "files" else sample_key(*key) for key in keys]
    assert sorted(stored_images(output, output_format, "png")) == sorted(expected)  # no orphan, no image twice
    fmt = open_format(output_format, "png", 2)
    for row in ok_rows(output).values():  # each image read back as the format reads it (ranges into shards)
        assert hashlib.sha256(fmt.read_image(output, row)).hexdigest() == row["sha256"]
    capsys.readouterr()
    assert main(["status", uri]) == 0
    assert f"{IMAGES} ok, 0 failed, 0 missing of {IMAGES} images" in capsys.readouterr().out
