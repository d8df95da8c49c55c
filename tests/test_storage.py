"""Tests for store.storage against local folders and real S3-compatible servers (rclone; moto for conditional
writes; a fault-injecting proxy in front of rclone for retries)."""

from __future__ import annotations

import os
import pickle
import re
import socket
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import s3_environment, set_environment
from fault_proxy import FaultProxy

from wurstfabrik.store.manifest import MANIFEST_SCHEMA, ManifestError, named_uris, read_manifest, write_part
from wurstfabrik.store.storage import (
    LocalOutput,
    S3Output,
    S3Settings,
    StorageError,
    list_files,
    open_input,
    open_output,
    safe_key,
)

MiB = 1024 * 1024
UNSAFE_KEYS = ["../x", "/abs", "a/../../b", "a\\b", "", "a//b", "a/./b", "a/", "a\x00b", "a\nb"]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return open_output(str(tmp_path / "out"))
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    return open_output(f"s3://{bucket}/runs/one")


def test_round_trip(output):
    output.check_writable()
    uri = output.put("images/ab/x_0.png", b"png bytes", content_type="image/png")
    output.put("images/cd/y_0.png", b"other")
    output.put("manifest.jsonl", b"{}\n")

    assert uri == output.uri("images/ab/x_0.png")
    assert uri.startswith(output.root_uri + "/")
    assert output.get("images/ab/x_0.png") == b"png bytes"
    assert output.get("images/missing.png") is None
    assert output.exists("images/cd/y_0.png")
    assert not output.exists("images/missing.png")
    assert sorted(output.list()) == ["images/ab/x_0.png", "images/cd/y_0.png", "manifest.jsonl"]
    assert sorted(output.list("images/")) == ["images/ab/x_0.png", "images/cd/y_0.png"]
    assert output.list("images/a") == ["images/ab/x_0.png"]
    assert output.list("nothing/") == []

    output.put("images/ab/x_0.png", b"replaced")
    assert output.get("images/ab/x_0.png") == b"replaced"
    output.delete("images/ab/x_0.png")
    output.delete("images/ab/x_0.png")
    assert not output.exists("images/ab/x_0.png")
    assert sorted(output.list()) == ["images/cd/y_0.png", "manifest.jsonl"]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_rejected(output, key):
    with pytest.raises(StorageError, match="unsafe storage key"):
        output.put(key, b"x")
    with pytest.raises(StorageError, match="unsafe storage key"):
        output.get(key)
    assert output.list() == []


def test_safe_key_names_the_key():
    with pytest.raises(StorageError, match=r"'a/\.\./\.\./b'"):
        safe_key("a/../../b")
    assert safe_key("images/ab/x_0.png") == "images/ab/x_0.png"


def test_local_write_leaves_no_temp_files(tmp_path):
    output = LocalOutput(tmp_path)
    for index in range(5):
        output.put(f"a/b/{index}.bin", os.urandom(1000))
    output.check_writable()
    assert sorted(path.name for path in (tmp_path / "a" / "b").iterdir()) == [f"{i}.bin" for i in range(5)]
    assert [path.name for path in tmp_path.iterdir()] == ["a"]


def test_local_symlink_out_of_root_is_rejected(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(outside)
    with pytest.raises(StorageError, match="outside the output root"):
        LocalOutput(root).put("escape/x.png", b"x")
    assert list(outside.iterdir()) == []


def test_local_root_that_is_a_file_is_not_writable(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="not a folder"):
        open_output(f"file://{tmp_path / 'file'}").check_writable()


def test_open_output_parses_uris(tmp_path, s3_env):
    assert isinstance(open_output(f"file://{tmp_path}"), LocalOutput)
    assert open_output(f"file://{tmp_path}").root_uri == tmp_path.as_uri()
    s3 = open_output("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Output)
    assert (s3.bucket, s3.prefix, s3.root_uri) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    assert open_output("s3://bucket").uri("k") == "s3://bucket/k"
    for bad in ("s3://", "s3://bucket/../x", "gs://bucket/x"):
        with pytest.raises(StorageError, match=re.escape(bad)):
            open_output(bad)


def test_large_object_goes_through_multipart(s3_env, s3_bucket):
    settings = S3Settings(multipart_threshold=6 * MiB, multipart_chunksize=5 * MiB)
    output = open_output(f"s3://{s3_bucket}/big", settings)
    parts = []
    output.client.meta.events.register("before-call.s3.UploadPart", lambda **kwargs: parts.append(1))
    data = os.urandom(13 * MiB)

    output.put("large.bin", data, content_type="application/octet-stream")

    assert len(parts) == 3
    assert output.get("large.bin") == data
    head = output.client.head_object(Bucket=s3_bucket, Key="big/large.bin")
    assert head["ContentType"] == "application/octet-stream"


def test_small_object_is_a_single_put(s3_env, s3_bucket):
    output = open_output(f"s3://{s3_bucket}", S3Settings(multipart_threshold=6 * MiB))
    calls = []
    output.client.meta.events.register("before-call.s3", lambda model, **kwargs: calls.append(model.name))
    output.put("small.bin", b"x" * MiB)
    assert calls == ["PutObject"]


def test_list_is_paginated(s3_env, s3_bucket):
    output = open_output(f"s3://{s3_bucket}")
    keys = [f"k/{index:02d}" for index in range(7)]
    for key in keys:
        output.put(key, b"")
    pages = []
    output.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kwargs: pages.append(1))
    output.client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", lambda params, **kwargs: params.update(MaxKeys=3)
    )
    assert output.list() == keys
    assert len(pages) == 3


def test_wrong_secret_is_reported_without_leaking_it(s3_env, s3_bucket, monkeypatch):
    wrong_secret = "wrong-secret-value-1234567890"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    output = open_output(f"s3://{s3_bucket}/x")
    with pytest.raises(StorageError) as check:
        output.check_writable()
    with pytest.raises(StorageError) as put:
        output.put("a.png", b"x")
    assert "access denied" in str(check.value)
    assert "rejected the credentials (SignatureDoesNotMatch)" in str(put.value)
    for error in (check.value, put.value):
        assert not error.transient  # a rerun meets it again
        assert f"s3://{s3_bucket}/x" in str(error)
        for secret in (wrong_secret, s3_env.secret_key, s3_env.access_key):
            assert secret not in str(error)
            assert secret not in str(error.__cause__)


def test_unknown_access_key_is_reported(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-access-key")
    with pytest.raises(StorageError, match="rejected the credentials") as put:
        open_output(f"s3://{s3_bucket}").put("a.png", b"x")
    assert "unknown-access-key" not in str(put.value)


def test_missing_bucket_is_reported(s3_env):
    output = open_output("s3://no-such-bucket-here/out")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        output.check_writable()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist") as put:
        output.put("a.png", b"x")
    assert not put.value.transient


def test_unreachable_endpoint_is_reported_quickly(s3_env, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    output = open_output("s3://bucket/out", S3Settings(max_attempts=1, connect_timeout=1, outage_s=0))
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}") as check:
        output.check_writable()
    assert check.value.transient  # it may answer again
    copied = pickle.loads(pickle.dumps(check.value))  # as it crosses from a Ray task to the driver
    assert copied.transient and str(copied) == str(check.value)


def test_attempts_come_from_settings_then_environment(s3_env, monkeypatch):
    assert open_output("s3://bucket").client.meta.config.retries["total_max_attempts"] == 3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert open_output("s3://bucket").client.meta.config.retries["total_max_attempts"] == 2
    output = open_output("s3://bucket", S3Settings(max_attempts=1))
    assert output.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 1}


def test_missing_credentials_are_reported(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no S3 credentials found"):
        open_output("s3://bucket/out").check_writable()
    with pytest.raises(StorageError, match="no S3 credentials found"):
        open_input("s3://bucket/in.parquet")


def test_s3_output_pickles(s3_env, s3_bucket):
    output = open_output(f"s3://{s3_bucket}/p")
    output.put("before.txt", b"1")
    copy = pickle.loads(pickle.dumps(output))
    assert copy.get("before.txt") == b"1"
    copy.put("after.txt", b"2")
    assert output.get("after.txt") == b"2"
    assert copy.root_uri == output.root_uri


def test_parquet_inputs_are_read_by_ranges_from_s3_and_locally(s3_env, s3_bucket, tmp_path):
    table = pa.table({"prompt": [f"a sausage {i}" for i in range(5000)], "seed": list(range(5000))})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1000)
    open_output(f"s3://{s3_bucket}").put("inputs/prompts.parquet", (tmp_path / "in.parquet").read_bytes())
    for uri in (f"s3://{s3_bucket}/inputs/prompts.parquet", f"file://{tmp_path}/in.parquet"):
        with open_input(uri) as file:
            parquet = pq.ParquetFile(file)
            assert parquet.num_row_groups == 5
            assert parquet.read_row_group(3, columns=["seed"]).column("seed").to_pylist() == list(range(3000, 4000))


def test_get_range(output):
    output.put("blob", bytes(range(256)) * 4)
    assert output.get_range("blob", 250, 10) == bytes(range(250, 256)) + bytes(range(4))
    assert output.get_range("blob", 0, 0) == b""


def test_put_file(output, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 1000)
    uri = output.put_file("shards/00000.tar", source, "application/x-tar")
    assert uri == output.uri("shards/00000.tar") and output.get("shards/00000.tar") == b"x" * 1000


def test_list_files_finds_files_folders_globs_and_prefixes(s3_env, s3_bucket, tmp_path):
    for name in ("a/one.parquet", "a/two.parquet", "a/notes.txt", "b/three.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
        open_output(f"s3://{s3_bucket}").put(f"in/{name}", b"x")
    assert list_files(str(tmp_path / "a"), ".parquet") == [str(tmp_path / "a/one.parquet"),
                                                           str(tmp_path / "a/two.parquet")]
    assert list_files(str(tmp_path / "*/t*.parquet")) == [str(tmp_path / "a/two.parquet"),
                                                         str(tmp_path / "b/three.parquet")]
    assert list_files(str(tmp_path / "a/one.parquet")) == [str(tmp_path / "a/one.parquet")]
    assert list_files(str(tmp_path / "missing")) is None
    base = f"s3://{s3_bucket}/in"
    assert list_files(f"{base}/a/", ".parquet") == [f"{base}/a/one.parquet", f"{base}/a/two.parquet"]
    assert list_files(f"{base}/*/t*.parquet") == [f"{base}/a/two.parquet", f"{base}/b/three.parquet"]
    assert list_files(f"{base}/b/three.parquet") == [f"{base}/b/three.parquet"]
    assert list_files(f"{base}/nothing-here/") is None


@pytest.fixture(params=["local", "moto"])
def conditional_output(request, tmp_path):
    if request.param == "local":
        return open_output(str(tmp_path / "out"))
    bucket = request.getfixturevalue("moto_env")
    return open_output(f"s3://{bucket}/out")


def test_conditional_writes_create_once_and_swap_only_the_version_read(conditional_output):
    output = conditional_output
    assert output.read_versioned("lease.json") is None
    first = output.put_new("lease.json", b"one")
    assert first is not None
    assert output.put_new("lease.json", b"two") is None  # it exists
    data, version = output.read_versioned("lease.json")
    assert (data, version) == (b"one", first)
    second = output.put_if_version("lease.json", b"three", version)
    assert second is not None and second != first
    assert output.put_if_version("lease.json", b"four", first) is None  # a stale version loses
    assert output.read_versioned("lease.json") == (b"three", second)


def test_local_exclusive_create_races_have_one_winner(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    output = open_output(str(tmp_path / "out"))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: output.put_new("lease.json", str(i).encode()), range(32)))
    assert sum(r is not None for r in results) == 1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


OBJECTS = 10


def test_s3_calls_ride_out_throttling_errors_and_dropped_connections(s3_server, s3_bucket, monkeypatch):
    # Ten objects: with this seed the proxy answers the first dozen requests with each kind of fault, some twice in a
    # row (asserted below: every kind was met).
    proxy = FaultProxy(s3_server.endpoint, share=0.4, seed=1).start()
    try:
        set_environment(monkeypatch, s3_environment(s3_server, proxy.endpoint))
        output = open_output(f"s3://{s3_bucket}/flaky", S3Settings(max_attempts=1, outage_s=30))
        for i in range(OBJECTS):
            output.put(f"objects/{i}.bin", bytes([i]) * 100)
        assert sorted(output.list("objects/")) == sorted(f"objects/{i}.bin" for i in range(OBJECTS))
        assert all(output.get(f"objects/{i}.bin") == bytes([i]) * 100 for i in range(OBJECTS))
        assert output.get_range("objects/7.bin", 10, 5) == bytes([7]) * 5
    finally:
        proxy.stop()
    counts = proxy.counts
    assert counts.slow_down and counts.internal_error and counts.dropped  # every kind of fault was met


def test_a_lasting_outage_fails_after_the_configured_time(s3_env, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    output = open_output("s3://bucket/out", S3Settings(max_attempts=1, connect_timeout=1, outage_s=3))
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        output.put("a", b"x")
    assert 3 <= time.monotonic() - start < 20


# S3-compatible stores with boto3's default checksums (boto3 >= 1.36 stores a CRC with every upload).


@pytest.mark.parametrize("store", ["rclone", "moto"])
def test_an_object_uploaded_with_boto3s_default_checksums_reads_back_by_range(store, request, tmp_path):
    if store == "rclone":
        server = request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("s3_bucket")
        client = server.client()
    else:
        bucket = request.getfixturevalue("moto_env")
        client = boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    table = pa.table({"prompt": [f"a sausage {i}" for i in range(3000)], "seed": list(range(3000))})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1000)
    data = (tmp_path / "in.parquet").read_bytes()
    client.put_object(Bucket=bucket, Key="inputs/in.parquet", Body=data)
    stored = client.head_object(Bucket=bucket, Key="inputs/in.parquet", ChecksumMode="ENABLED")
    assert any(name.startswith("Checksum") and name != "ChecksumType" for name in stored)  # the store keeps a CRC
    output = open_output(f"s3://{bucket}/inputs")
    assert output.get_range("in.parquet", 100, 50) == data[100:150]
    with output.open_read("in.parquet") as file:
        assert pq.ParquetFile(file).read_row_group(2, columns=["seed"]).column("seed").to_pylist() == \
            list(range(2000, 3000))
    assert output.get("in.parquet") == data


def test_a_custom_endpoint_asks_for_checksums_only_when_required_unless_the_user_says_otherwise(s3_env, monkeypatch,
                                                                                             tmp_path):
    def modes(output):
        config = output.client.meta.config
        return config.request_checksum_calculation, config.response_checksum_validation

    output = open_output("s3://bucket")
    assert modes(output) == ("when_required", "when_required")
    assert output.client.meta.config.s3["addressing_style"] == "path"
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    assert modes(open_output("s3://bucket")) == ("when_supported", "when_required")
    config_file = tmp_path / "aws-config"
    config_file.write_text("[default]\nresponse_checksum_validation = when_supported\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    output = open_output("s3://bucket")
    assert modes(output) == ("when_supported", "when_supported")
    assert output.ranged_client.meta.config.response_checksum_validation == "when_required"  # ranges: never


def test_aws_keeps_boto3s_checksum_defaults(s3_env, monkeypatch, tmp_path):
    """Only the client is built here; nothing contacts AWS."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    output = open_output("s3://bucket")
    config = output.client.meta.config
    assert "amazonaws.com" in output.client.meta.endpoint_url
    assert (config.request_checksum_calculation, config.response_checksum_validation) == ("when_supported",
                                                                                          "when_supported")
    assert (config.s3 or {}).get("addressing_style") != "path"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.eu-west-1.amazonaws.com")
    assert open_output("s3://bucket").client.meta.config.request_checksum_calculation == "when_supported"
    # An endpoint from the AWS config file is a custom one too.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config_file = tmp_path / "aws-config"
    config_file.write_text("[default]\nendpoint_url = http://127.0.0.1:9\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    output = open_output("s3://bucket")
    assert output.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert output.client.meta.config.request_checksum_calculation == "when_required"


def test_jobs_objects_work_on_rclone_with_every_checksum_setting(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_supported")
    output = open_output(f"s3://{s3_bucket}/out")
    key = write_part(output, [{"job_id": "j", "prompt_id": "p", "image_index": 0, "params": {}, "status": "failed",
                               "error": "boom"}])
    assert output.client.head_object(Bucket=s3_bucket, Key=f"out/{key}", ChecksumMode="ENABLED").get(
        "ChecksumCRC32")  # uploads carry boto3's CRC, as the user asked
    assert read_manifest(output, ["prompt_id", "error"]).to_pylist() == [{"prompt_id": "p", "error": "boom"}]
    assert output.get_range(key, 0, 4) == b"PAR1"


def test_an_object_changed_in_the_store_is_caught_on_read(s3_env, s3_bucket):
    output = open_output(f"s3://{s3_bucket}/out")
    output.put("job.json", b'{"job_id": "one"}')
    stored = s3_env.client().head_object(Bucket=s3_bucket, Key="out/job.json")["Metadata"]
    # Someone rewrites the object's bytes through the server and keeps its recorded sha256.
    s3_env.client().put_object(Bucket=s3_bucket, Key="out/job.json", Body=b'{"job_id": "two"}', Metadata=stored)
    for read in (output.get, output.read_versioned):
        with pytest.raises(StorageError, match=r"s3://.*/out/job\.json: the object's bytes do not match the sha256"):
            read("job.json")


def test_a_damaged_manifest_part_is_an_error_that_names_it(s3_env, s3_bucket):
    output = open_output(f"s3://{s3_bucket}/out")
    rows = [{"job_id": "j", "prompt_id": f"p{i}", "image_index": 0, "params": {}, "status": "failed",
             "error": f"a long enough error message number {i} " * 4} for i in range(50)]
    key = write_part(output, rows)
    data = bytearray(output.get(key))
    column = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata.row_group(0).column(
        MANIFEST_SCHEMA.get_field_index("error"))
    start = column.dictionary_page_offset or column.data_page_offset
    data[start + column.total_compressed_size // 2] ^= 0x01  # inside the error strings
    damaged = bytes(data)
    # Without page checksums this damage reads back silently as other text.
    silent = pq.read_table(pa.BufferReader(damaged), columns=["error"]).column("error").to_pylist()
    assert silent != [r["error"] for r in rows]
    named = rf"s3://{s3_bucket}/out/{re.escape(key)}: not a readable Parquet file "
    s3_env.client().put_object(Bucket=s3_bucket, Key=f"out/{key}", Body=damaged)  # no sha256 of ours to compare
    with pytest.raises(ManifestError, match=named + r".*CRC.*restore it, or delete it"):
        read_manifest(output, ["prompt_id", "error"])
    s3_env.client().put_object(Bucket=s3_bucket, Key=f"out/{key}", Body=b"not parquet at all")
    for read in (read_manifest, named_uris):  # the orphan sweep must not take a part it cannot read for none
        with pytest.raises(ManifestError, match=named):
            read(output)
