"""The node-local checkpoint cache (store/checkpoint_cache.py) against rclone on loopback: processes on one node
fetch each file once between them, a damaged or truncated cached file is fetched again, and a fetch that is killed
or brings other bytes than the index's leaves nothing that a later load would use."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import s3_environment, set_environment
from fault_proxy import FaultProxy
from job_helpers import kill_when

from wurstfabrik.store.checkpoint_cache import PART_PREFIX, cache_root, fetch_files
from wurstfabrik.store.checkpoint_index import INDEX_FILE, CheckpointIndex, IndexedFile, read_index
from wurstfabrik.store.storage import StorageError, open_output

CHUNK = 64 * 1024
FILES = {"model_index.json": b'{"_class_name": "WuerstchenPriorPipeline"}', "prior/config.json": b"{}",
         "prior/weights.safetensors": os.urandom(CHUNK * 5 + 123), "tokenizer/vocab.json": b'{"a": 1}',
         "tokenizer/empty.txt": b"", "text_encoder/model.safetensors": os.urandom(CHUNK // 2)}
FETCH = """
import json, sys
from pathlib import Path
from wurstfabrik.store.checkpoint_cache import fetch_files
from wurstfabrik.store.checkpoint_index import read_index
from wurstfabrik.store.storage import open_output
remote = open_output(sys.argv[1])
cached = fetch_files(remote, read_index(remote).files, Path(sys.argv[2]), threads=int(sys.argv[3]),
                     chunk_bytes=int(sys.argv[4]))
print(json.dumps({"folder": str(cached.folder), "fetched": cached.fetched}))
"""


def put_checkpoint(uri: str, files: dict[str, bytes]) -> CheckpointIndex:
    """The objects and the index that `wurstfabrik mirror` would write for these files."""
    remote = open_output(uri)
    for key, data in files.items():
        remote.put(key, data)
    index = CheckpointIndex("test", "folder", None, {key: IndexedFile(len(data), hashlib.sha256(data).hexdigest())
                                                     for key, data in files.items()})
    remote.put(INDEX_FILE, index.to_json())
    return index


@pytest.fixture
def checkpoint(s3_env, s3_bucket) -> str:
    uri = f"s3://{s3_bucket}/checkpoints/prior"
    put_checkpoint(uri, FILES)
    return uri


@pytest.fixture
def slow_proxy(s3_server, monkeypatch):
    """A proxy in front of the S3 test server that logs requests and answers each after 0.3 s, so that fetches
    started together overlap; the product's environment points at it."""
    proxy = FaultProxy(s3_server.endpoint, share=0.0, delay_s=0.3).start()
    set_environment(monkeypatch, s3_environment(s3_server, proxy.endpoint))
    yield proxy
    proxy.stop()


def start_fetch(uri: str, cache: Path, threads: int = 4) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FETCH, uri, str(cache), str(threads), str(CHUNK)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
                            start_new_session=True)


def gets(proxy: FaultProxy, uri: str) -> dict[str, list[str | None]]:
    """The GETs the proxy forwarded for each key under the checkpoint, with their Range headers."""
    prefix = "/" + uri.removeprefix("s3://") + "/"
    found: dict[str, list[str | None]] = {}
    for method, path, span in proxy.requests:
        if method == "GET" and path.startswith(prefix):
            found.setdefault(path[len(prefix):].split("?")[0], []).append(span)
    return found


def covered_once(spans: list[str | None], size: int) -> bool:
    """Whether the ranges cover every byte of an object exactly once."""
    counts = Counter()
    for span in spans:
        start, end = (int(x) for x in span.removeprefix("bytes=").split("-"))
        counts.update(range(start, end + 1))
    return set(counts) == set(range(size)) and set(counts.values()) == {1}


def held(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_two_processes_on_a_node_fetch_each_file_once(checkpoint, slow_proxy, tmp_path):
    cache = tmp_path / "cache"
    fetches = [start_fetch(checkpoint, cache), start_fetch(checkpoint, cache)]
    results = []
    for fetch in fetches:
        out, err = fetch.communicate(timeout=120)
        assert fetch.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["folder"] == results[1]["folder"]
    assert held(Path(results[0]["folder"])) == FILES  # each reads the same, complete files
    fetched = [set(r["fetched"]) for r in results]
    assert fetched[0] | fetched[1] == set(FILES)
    assert not fetched[0] & fetched[1]
    requests = gets(slow_proxy, checkpoint)
    empty = requests.pop("tokenizer/empty.txt", [])
    assert empty == []  # nothing to GET for an empty file
    objects = {key: data for key, data in FILES.items() if data}
    assert sorted(requests) == sorted([*objects, INDEX_FILE])
    assert len(requests.pop(INDEX_FILE)) == 2  # each process read the index; every file came once
    for key, spans in requests.items():
        assert covered_once(spans, len(FILES[key])), (key, spans)
    assert len(requests["prior/weights.safetensors"]) == 6  # ranged GETs of CHUNK bytes


@pytest.mark.parametrize("damage", ["a changed byte", "truncated", "removed"])
def test_a_damaged_cached_file_is_fetched_again(checkpoint, tmp_path, caplog, damage):
    remote = open_output(checkpoint)
    files = read_index(remote).files
    first = fetch_files(remote, files, tmp_path, chunk_bytes=CHUNK)
    assert sorted(first.fetched) == sorted(FILES)
    assert fetch_files(remote, files, tmp_path, chunk_bytes=CHUNK).fetched == []  # all cached
    blob = (first.folder / "prior" / "weights.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    if damage == "a changed byte":
        data[1000] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "truncated":
        blob.write_bytes(bytes(data[:-10]))
    else:
        blob.unlink()
    with caplog.at_level(logging.WARNING, logger="wurstfabrik"):
        again = fetch_files(remote, files, tmp_path, chunk_bytes=CHUNK)
    assert again.fetched == ["prior/weights.safetensors"] and again.folder == first.folder
    assert held(again.folder) == FILES
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if damage == "removed":
        assert not warnings
    else:
        (warning,) = warnings
        assert "prior/weights.safetensors" in warning and "is damaged" in warning and "fetching it again" in warning


def test_an_object_changed_after_mirroring_is_refused_and_never_cached(checkpoint, s3_server, tmp_path):
    remote = open_output(checkpoint)
    files = read_index(remote).files
    bucket, _, prefix = checkpoint.removeprefix("s3://").partition("/")
    other = os.urandom(len(FILES["prior/weights.safetensors"]))  # same size: only the bytes tell
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/prior/weights.safetensors", Body=other)
    with pytest.raises(StorageError) as info:
        fetch_files(remote, files, tmp_path, chunk_bytes=CHUNK)
    message = str(info.value)
    assert message.startswith(f"{checkpoint}/prior/weights.safetensors: its bytes are not those the checkpoint "
                              "index records") and "mirror the checkpoint again" in message
    blobs = tmp_path / "blobs"
    assert files["prior/weights.safetensors"].sha256 not in os.listdir(blobs)
    assert not [name for name in os.listdir(blobs) if name.startswith(PART_PREFIX)]
    assert not (tmp_path / "snapshots").exists() or not any((tmp_path / "snapshots").iterdir())


def test_a_fetch_killed_halfway_leaves_nothing_a_load_would_use(checkpoint, s3_server, monkeypatch, tmp_path):
    slow = FaultProxy(s3_server.endpoint, share=0.0, delay_s=0.3).start()
    try:
        set_environment(monkeypatch, s3_environment(s3_server, slow.endpoint))
        weights = read_index(open_output(checkpoint)).files["prior/weights.safetensors"]
        fetch = start_fetch(checkpoint, tmp_path, threads=1)
        blobs = tmp_path / "blobs"
        # Killed while the weights come in, range by range.
        kill_when(fetch, lambda: blobs.is_dir() and any(n.startswith(PART_PREFIX + weights.sha256)
                                                        for n in os.listdir(blobs)))
    finally:
        slow.stop()
    blobs_there = {n for n in os.listdir(tmp_path / "blobs") if not n.startswith(PART_PREFIX)}
    assert weights.sha256 not in blobs_there  # the part never took the blob's name
    assert not (tmp_path / "snapshots").exists() or not any((tmp_path / "snapshots").iterdir())
    set_environment(monkeypatch, s3_environment(s3_server))
    cached = fetch_files(open_output(checkpoint), read_index(open_output(checkpoint)).files, tmp_path,
                         chunk_bytes=CHUNK)
    assert held(cached.folder) == FILES
    assert not [n for n in os.listdir(tmp_path / "blobs") if n.startswith(PART_PREFIX)]  # the leftover is gone


def test_a_fetch_rides_out_a_flaky_store(checkpoint, s3_server, monkeypatch, tmp_path):
    """The outputs' retries: 503s, 500s and dropped connections are retried, and what arrives is still checked."""
    files = read_index(open_output(checkpoint)).files
    flaky = FaultProxy(s3_server.endpoint, share=0.3, seed=3).start()
    try:
        set_environment(monkeypatch, s3_environment(s3_server, flaky.endpoint))
        cached = fetch_files(open_output(checkpoint), files, tmp_path, chunk_bytes=CHUNK)
    finally:
        flaky.stop()
    assert held(cached.folder) == FILES
    assert flaky.counts.slow_down + flaky.counts.internal_error + flaky.counts.dropped > 0


def test_each_set_of_files_gets_a_folder_of_exactly_those_files(checkpoint, tmp_path):
    remote = open_output(checkpoint)
    files = read_index(remote).files
    configs = {key: entry for key, entry in files.items() if key.endswith(".json")}
    small = fetch_files(remote, configs, tmp_path)
    whole = fetch_files(remote, files, tmp_path)
    assert small.folder != whole.folder
    assert held(small.folder) == {key: FILES[key] for key in configs}
    assert sorted(whole.fetched) == sorted(set(files) - set(configs))  # the configs' blobs were there already
    assert held(whole.folder) == FILES
    assert all(p.is_symlink() for p in whole.folder.rglob("*") if not p.is_dir())


def test_the_cache_folder_is_the_setting_or_the_users_cache(monkeypatch, tmp_path):
    assert cache_root(str(tmp_path / "c")) == tmp_path / "c"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "wurstfabrik" / "checkpoints"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "wurstfabrik" / "checkpoints"
