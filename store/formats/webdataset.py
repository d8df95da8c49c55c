"""The `webdataset` format: tar shards of up to `shard_size` samples, each `<key>.<ext>` (the image), `<key>.txt`
(the prompt) and `<key>.json` (its metadata), with `NNNNN.parquet` (one metadata row per sample, failed ones
too) and `NNNNN_stats.json` beside each shard, as img2dataset lays them out."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from wurstfabrik.store.encoding import extension
from wurstfabrik.store.ids import sample_key

from .samples import Sample, checked_image
from .shards import shard_name

PREFIX = "shards/"
BLOCK = tarfile.BLOCKSIZE
# The sample's fields in the per-shard .parquet (and its .json, with the job's provenance).
SIDECAR_COLUMNS = {
    "key": pa.string(), "prompt_id": pa.string(), "image_index": pa.int32(), "prompt": pa.string(),
    "negative_prompt": pa.string(), "seed": pa.int64(), "width": pa.int32(), "height": pa.int32(),
    "generated_width": pa.int32(), "generated_height": pa.int32(), "sha256": pa.string(), "bytes": pa.int64(),
    "status": pa.string(), "error": pa.string(), "source": pa.string(), "job_id": pa.string(),
}


class WebDatasetFormat:
    name = "webdataset"
    shard_prefix = PREFIX

    def __init__(self, image_format: str, shard_size: int):
        self.image_format = image_format
        self.batch_size = shard_size

    def shard_objects(self, number: int) -> list[str]:
        name = shard_name(number)
        return [f"{PREFIX}{name}.tar", f"{PREFIX}{name}.parquet", f"{PREFIX}{name}_stats.json"]

    def write(self, output, samples: list[Sample], claim_shard) -> None:
        started = time.perf_counter()
        ext = extension(self.image_format)
        good = [s for s in samples if s.ok]
        if not good:
            return  # the failed rows go to the manifest; a shard of nothing is not written
        with tempfile.TemporaryDirectory(prefix="wurstfabrik-shard-") as folder:
            tar_path = Path(folder) / "shard.tar"
            offsets = {}
            # PAX headers where a name is longer than ustar's 100 characters; the data offsets account for them.
            with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
                for sample in good:
                    key = sample_key(sample.row["prompt_id"], sample.row["image_index"])
                    _add(tar, f"{key}.{ext}", sample.data)
                    offsets[id(sample)] = (key, tar.offset - _padded(len(sample.data)))
                    _add(tar, f"{key}.txt", sample.row["prompt"].encode("utf-8"))
                    _add(tar, f"{key}.json", json.dumps(sample.metadata, sort_keys=True, default=str).encode())
            number = claim_shard()
            tar_key, sidecar_key, stats_key = self.shard_objects(number)
            uri = output.put_file(tar_key, tar_path, "application/x-tar")
            for sample in good:
                key, offset = offsets[id(sample)]
                sample.row.update(uri=uri, member=key, offset=offset)
            output.put(sidecar_key, _sidecar(samples), "application/vnd.apache.parquet")
            stats = {"shard": tar_key, "count": len(samples), "successes": len(good),
                     "failed_to_generate": len(samples) - len(good), "bytes": sum(len(s.data) for s in good),
                     "seconds": round(time.perf_counter() - started, 3),
                     "finished_at": datetime.now(timezone.utc).isoformat()}
            output.put(stats_key, json.dumps(stats, indent=2).encode(), "application/json")

    def read_image(self, output, row: dict) -> bytes:
        shard = "/".join(row["uri"].rsplit("/", 2)[-2:])
        return checked_image(row, output.get_range(shard, row["offset"], row["bytes"]))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o444
    tar.addfile(info, io.BytesIO(data))


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _sidecar(samples: list[Sample]) -> bytes:
    columns = {name: [] for name in SIDECAR_COLUMNS}
    for sample in samples:
        values = {**sample.row, "key": sample_key(sample.row["prompt_id"], sample.row["image_index"])}
        for name in SIDECAR_COLUMNS:
            columns[name].append(values.get(name))
    table = pa.table({name: pa.array(values, type=SIDECAR_COLUMNS[name]) for name, values in columns.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink, write_page_checksum=True)
    return sink.getvalue()
