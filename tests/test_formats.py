"""Tests for store.formats: each output format writes what its readers (webdataset, Hugging Face datasets) read
back, and tells the manifest where every image went."""

import hashlib
import io
import itertools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wurstfabrik.store.encoding import encode_image
from wurstfabrik.store.formats import Sample, open_format
from wurstfabrik.store.formats.shards import stored_shard_numbers
from wurstfabrik.store.ids import image_key
from wurstfabrik.store.storage import StorageError, open_output
from wurstfabrik.workers.shard_numbers import ShardNumberBook


def samples(n: int, failed: tuple[int, ...] = (), prefix: str = "p") -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        data = encode_image(pixels, "png", 90)
        row = {"prompt_id": f"{prefix}.{i}" if i % 3 == 0 else f"{prefix}-{i}", "image_index": i % 2,
               "prompt": f"a sausage number {i}", "negative_prompt": "", "seed": 1000 + i, "width": 24, "height": 16,
               "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "job_id": "job", "source": f"f#{i}",
               "error": "decoder: boom" if i in failed else None}
        out.append(Sample(row, None if i in failed else data, {**row, "wurstfabrik": "test"}))
    return out


def counter(start: int = 0):
    numbers = itertools.count(start)
    return lambda: next(numbers)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return open_output(str(tmp_path / "out"))
    request.getfixturevalue("s3_env")
    return open_output(f"s3://{request.getfixturevalue('s3_bucket')}/out")


def test_files_format_writes_one_object_per_image(output):
    batch = samples(5, failed=(2,))
    open_format("files", "png", 256).write(output, batch, None)
    for sample in batch:
        if sample.ok:
            key = image_key(sample.row["prompt_id"], sample.row["image_index"], "png")
            assert sample.row["uri"] == output.uri(key) and output.get(key) == sample.data
            assert open_format("files", "png", 256).read_image(output, sample.row) == sample.data
        else:
            assert "uri" not in sample.row
    assert len(output.list("images/")) == 4


def test_webdataset_shards_read_back_with_webdataset(tmp_path):
    import webdataset as wds

    output = open_output(str(tmp_path / "out"))
    fmt = open_format("webdataset", "png", 4)
    claim = counter()
    first, second = samples(4, failed=(1,)), samples(3, prefix="q")
    fmt.write(output, first, claim)
    fmt.write(output, second, claim)
    assert sorted(output.list("shards/")) == ["shards/00000.parquet", "shards/00000.tar", "shards/00000_stats.json",
                                              "shards/00001.parquet", "shards/00001.tar", "shards/00001_stats.json"]
    read = {}
    for sample in wds.WebDataset([str(tmp_path / "out/shards/00000.tar"), str(tmp_path / "out/shards/00001.tar")],
                                 shardshuffle=False):
        assert "." not in sample["__key__"]
        assert set(sample) >= {"png", "txt", "json"}
        read[sample["__key__"]] = sample
    good = [s for s in first + second if s.ok]
    assert len(read) == len(good) == 6
    for sample in good:
        got = read[sample.row["member"]]
        assert got["png"] == sample.data and got["txt"].decode() == sample.row["prompt"]
        assert json.loads(got["json"])["seed"] == sample.row["seed"]
        assert Image.open(io.BytesIO(got["png"])).size == (24, 16)
        assert fmt.read_image(output, sample.row) == sample.data  # by byte offset into the shard
    stats = json.loads(output.get("shards/00000_stats.json"))
    assert stats["count"] == 4 and stats["successes"] == 3 and stats["failed_to_generate"] == 1
    sidecar = pq.read_table(tmp_path / "out/shards/00000.parquet").to_pylist()
    assert len(sidecar) == 4  # one metadata row per sample, the failed one too
    assert sorted(r["error"] or "" for r in sidecar) == ["", "", "", "decoder: boom"]


def test_a_shard_of_only_failed_images_is_not_written(tmp_path):
    output = open_output(str(tmp_path / "out"))
    open_format("webdataset", "png", 4).write(output, samples(2, failed=(0, 1)), counter())
    assert output.list("shards/") == []


def test_shard_numbers_skip_stored_shards_and_repeat_for_a_batch_written_again(tmp_path):
    output = open_output(str(tmp_path / "out"))
    output.put("shards/00000.tar", b"a finished shard")
    output.put("shards/00002_stats.json", b"{}")  # an orphan's sidecar holds its number too
    book = ShardNumberBook(sorted(stored_shard_numbers(output, "shards/")))
    assert [book.claim("batch a"), book.claim("batch b"), book.claim("batch a"), book.claim("batch c")] == [1, 3, 1, 4]
    batch = samples(2)
    open_format("webdataset", "png", 4).write(output, batch, lambda: book.claim("batch d"))
    assert batch[0].row["uri"].endswith("shards/00005.tar")
    assert output.get("shards/00000.tar") == b"a finished shard"


def test_parquet_shards_load_with_hugging_face_datasets(output, tmp_path):
    import datasets

    fmt = open_format("parquet", "png", 8)
    batch = samples(6, failed=(4,))
    fmt.write(output, batch, counter())
    (key,) = output.list("data/")
    local = tmp_path / "copy.parquet"
    local.write_bytes(output.get(key))
    loaded = datasets.load_dataset("parquet", data_files=str(local), split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    good = [s for s in batch if s.ok]
    assert loaded.num_rows == len(good)
    for row, sample in zip(loaded, good, strict=True):
        assert isinstance(row["image"], Image.Image) and row["image"].size == (24, 16)
        assert row["prompt"] == sample.row["prompt"] and row["seed"] == sample.row["seed"]
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(io.BytesIO(sample.data))))
        assert json.loads(row["metadata"])["wurstfabrik"] == "test"
    for sample in good:
        assert fmt.read_image(output, sample.row) == sample.data


@pytest.mark.parametrize("output_format, problem", [
    ("files", "the image's bytes do not match the sha256 in the manifest"),
    ("webdataset", "the image's bytes do not match the sha256 in the manifest"),
    ("parquet", "not a readable Parquet file .*CRC"),  # its page checksums catch it before the sha256 could
])
def test_an_image_damaged_in_the_store_is_caught_when_read_back(tmp_path, output_format, problem):
    output = open_output(str(tmp_path / "out"))
    fmt = open_format(output_format, "png", 4)
    written = samples(3)
    fmt.write(output, written, counter())
    data, row = written[1].data, written[1].row
    piece = data[len(data) // 2:len(data) // 2 + 16]  # the image's pixels, not its header
    (path,) = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and piece in p.read_bytes()
               and p.suffix != ".json"]
    assert path.read_bytes().count(piece) == 1
    path.write_bytes(path.read_bytes().replace(piece, bytes(16)))
    with pytest.raises(StorageError, match=problem):
        fmt.read_image(output, row)
