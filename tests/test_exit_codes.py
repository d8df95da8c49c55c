"""One test per row of the exit-code table (jobs.exit_codes), each against a real S3 server: 0 every image ok
though some storage writes failed; 1 what a rerun can finish; 2 what needs a fix first, in one line naming the
object; `wurstfabrik status` the same way. Rows 3 (held lease) and 128 + N (signals) are in test_claim.py and
test_unattended.py."""

import json
import re
from urllib.parse import unquote

import pytest
import ray
from conftest import s3_environment, set_environment
from fault_proxy import FaultProxy
from job_helpers import PROMPTS, make_spec, ok_keys_once, spec_file, start_local_ray, write_prompts

from wurstfabrik.jobs.cli import main
from wurstfabrik.store.lease import read_holder
from wurstfabrik.store.manifest import write_job_params
from wurstfabrik.store.storage import open_output


def run_cli(spec, tmp_path) -> int:
    return main(["run", str(spec_file(spec, tmp_path / "job.yaml")), "--no-progress"])


def said(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def proxied(s3_server, monkeypatch):
    """Starts a FaultProxy in front of the S3 test server and points the product's environment at it."""
    proxies = []

    def start(**faults) -> FaultProxy:
        proxy = FaultProxy(s3_server.endpoint, **faults).start()
        proxies.append(proxy)
        set_environment(monkeypatch, s3_environment(s3_server, proxy.endpoint))
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def prompts(tmp_path):
    return write_prompts(tmp_path / "p.parquet", PROMPTS[:2])


def test_storage_that_denies_access_exits_2_in_one_line(proxied, s3_bucket, tiny_checkpoints, prompts, tmp_path,
                                                        capsys):
    proxy = proxied(share=0.0, refuse=lambda method, path: method == "PUT")  # a bucket policy that denies writes
    spec = make_spec(tiny_checkpoints, prompts, f"s3://{s3_bucket}/out")
    assert run_cli(spec, tmp_path) == 2
    (line,) = said(capsys.readouterr().err)
    assert line.startswith(f"error: s3://{s3_bucket}/out/") and "access denied (HTTP 403)" in line
    assert "use credentials that may read and write it" in line and line.endswith("a rerun alone cannot fix this")
    assert proxy.counts.refused == 1  # refused at once, not retried


def test_an_outage_that_outlasts_the_retries_exits_1_and_says_run_again(proxied, s3_bucket, tiny_checkpoints,
                                                                         prompts, tmp_path, capsys):
    proxy = proxied(share=1.0)  # every request answered 503 or 500, or dropped
    spec = make_spec(tiny_checkpoints, prompts, f"s3://{s3_bucket}/out", resilience={"storage_outage_s": 1.0})
    assert run_cli(spec, tmp_path) == 1
    (line,) = [line for line in said(capsys.readouterr().err) if line.startswith("error: ")]
    assert line.startswith(f"error: s3://{s3_bucket}/out") and line.endswith("run again once storage answers")
    assert proxy.counts.forwarded == 0


def test_a_damaged_job_record_exits_2_naming_it(s3_env, s3_bucket, tiny_checkpoints, prompts, tmp_path, capsys):
    s3_env.client().put_object(Bucket=s3_bucket, Key="out/job.json", Body=b"{not json")
    spec = make_spec(tiny_checkpoints, prompts, f"s3://{s3_bucket}/out")
    assert run_cli(spec, tmp_path) == 2
    (line,) = said(capsys.readouterr().err)
    assert line.startswith(f"error: s3://{s3_bucket}/out/job.json: not valid JSON")
    assert line.endswith("restore or remove that object; a rerun alone cannot fix this")
    output = open_output(spec.output)
    assert read_holder(output).released and output.get("job.json") == b"{not json"


def test_status_exits_0_1_or_2_as_run_does(s3_env, s3_bucket, capsys):
    uri = f"s3://{s3_bucket}/out"
    output = open_output(uri)
    write_job_params(output, {"job_id": "j1", "params": {}, "total_images": 3})
    assert main(["status", uri]) == 1  # three images missing: a run makes them
    assert "0 ok, 0 failed, 3 missing of 3 images" in capsys.readouterr().out
    part = "out/manifest/part-20260101T000000000000Z-T0-0123abcd.parquet"
    s3_env.client().put_object(Bucket=s3_bucket, Key=part, Body=b"PAR1 not really")
    assert main(["status", uri]) == 2
    (line,) = said(capsys.readouterr().err)
    assert "part-20260101T000000000000Z-T0-0123abcd.parquet: not a readable Parquet file" in line
    assert line.endswith("restore or remove that object; a rerun alone cannot fix this")
    assert main(["status", "s3://no-such-bucket-here/out"]) == 2
    (line,) = said(capsys.readouterr().err)
    assert "bucket 'no-such-bucket-here' does not exist; create it or correct the URI" in line


@pytest.mark.own_ray
def test_refused_writes_mid_run_exit_2_and_once_fixed_the_rerun_exits_0_though_record_writes_fail(
        s3_server, s3_bucket, tiny_checkpoints, tmp_path, monkeypatch, capsys):
    """Two runs through one proxy (one Ray start): the first meets a policy that denies writing shards; the second
    finishes every image, while run records, the summary and the final shard listing are denied."""
    parts = []

    def deny_shards(method: str, path: str) -> bool:
        return method == "PUT" and "/out/shards/" in unquote(path)

    def deny_records(method: str, path: str) -> bool:
        path = unquote(path)
        if method == "PUT" and "/out/manifest/part-" in path:
            parts.append(path)
        if method == "PUT" and ("/out/runs/" in path or path.endswith("/out/manifest/summary.json")):
            return True
        # The shard listing after the last image is recorded (the clean-up of orphan shards).
        return method == "GET" and "prefix=out/shards/" in path and len(parts) == 3

    proxy = FaultProxy(s3_server.endpoint, share=0.0, refuse=deny_shards).start()
    try:
        set_environment(monkeypatch, s3_environment(s3_server, proxy.endpoint))
        start_local_ray(s3_environment(s3_server, proxy.endpoint))
        prompts = write_prompts(tmp_path / "p.parquet", PROMPTS)
        spec = make_spec(tiny_checkpoints, prompts, f"s3://{s3_bucket}/out", output_format="webdataset",
                         shard_size=2, placement={"prior_batch_size": 2, "decoder_batch_size": 2})
        try:
            refused = run_cli(spec, tmp_path)
            refused_err = capsys.readouterr().err
            proxy.refuse = deny_records
            done = run_cli(spec, tmp_path)
            done_err = capsys.readouterr().err
        finally:
            ray.shutdown()
    finally:
        proxy.stop()
    assert refused == 2, refused_err[-3000:]
    errors = [line for line in said(refused_err) if line.startswith("error: ")]
    assert len(errors) == 1 and "storage failed: s3://" in errors[0] and "/out/shards/" in errors[0]
    assert "access denied (HTTP 403)" in errors[0] and errors[0].endswith("a rerun alone cannot fix this")

    assert done == 0, done_err[-3000:]
    assert "could not write the run record" in done_err and "could not write the summary" in done_err
    assert re.search(r"every image is recorded ok, though storage failed: s3://\S+/out: access denied", done_err)
    assert "run again" not in done_err and "Traceback" not in done_err
    set_environment(monkeypatch, s3_environment(s3_server))
    output = open_output(spec.output)
    keys = ok_keys_once(output)
    assert len(keys) == len(set(keys)) == len(PROMPTS)
    (record,) = [json.loads(output.get(key)) for key in output.list("runs/")]  # the second run's were denied
    assert record["state"] == "stopped" and record["exit_code"] == 2
