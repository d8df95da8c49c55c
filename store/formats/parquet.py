"""The `parquet` format: data/NNNNN.parquet files of up to `shard_size` images, whose `image` column is Hugging
Face's Image feature (a struct of `bytes` and `path`) and whose schema metadata says so, so that
`datasets.load_dataset("parquet", data_files="OUTPUT/data/*.parquet")` yields PIL images with the prompt and
metadata columns beside them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from wurstfabrik.store.encoding import extension
from wurstfabrik.store.ids import sample_key
from wurstfabrik.store.storage import StorageError

from .samples import Sample, checked_image
from .shards import shard_name

PREFIX = "data/"
# Small row groups: reading one image (a preview, a spot check) reads one group, not the whole file.
ROWS_PER_GROUP = 16
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
COLUMNS = {
    "key": pa.string(), "prompt_id": pa.string(), "image_index": pa.int32(), "prompt": pa.string(),
    "negative_prompt": pa.string(), "seed": pa.int64(), "width": pa.int32(), "height": pa.int32(),
    "sha256": pa.string(), "job_id": pa.string(), "metadata": pa.string(),
}


def _features() -> bytes:
    """The `datasets` feature description of the columns, as `datasets` itself writes it."""
    features = {"image": {"_type": "Image"}}
    features.update({name: {"dtype": str(kind), "_type": "Value"}
                     for name, kind in COLUMNS.items()})
    return json.dumps({"info": {"features": features}}).encode()


SCHEMA = pa.schema([pa.field("image", IMAGE_TYPE)] + [pa.field(n, t) for n, t in COLUMNS.items()],
                   metadata={b"huggingface": _features()})


class ParquetFormat:
    name = "parquet"
    shard_prefix = PREFIX

    def __init__(self, image_format: str, shard_size: int):
        self.image_format = image_format
        self.batch_size = shard_size

    def shard_objects(self, number: int) -> list[str]:
        return [f"{PREFIX}{shard_name(number)}.parquet"]

    def write(self, output, samples: list[Sample], claim_shard) -> None:
        good = [s for s in samples if s.ok]
        if not good:
            return
        ext = extension(self.image_format)
        keys = [sample_key(s.row["prompt_id"], s.row["image_index"]) for s in good]
        columns = {"image": pa.array([{"bytes": s.data, "path": f"{k}.{ext}"} for s, k in zip(good, keys,
                                                                                             strict=True)],
                                     type=IMAGE_TYPE),
                   "key": pa.array(keys, type=pa.string())}
        for name, kind in COLUMNS.items():
            if name == "metadata":
                values = [json.dumps(s.metadata, sort_keys=True, default=str) for s in good]
            elif name != "key":
                values = [s.row.get(name) for s in good]
            else:
                continue
            columns[name] = pa.array(values, type=kind)
        table = pa.table(columns).select(SCHEMA.names).cast(SCHEMA)
        with tempfile.TemporaryDirectory(prefix="wurstfabrik-shard-") as folder:
            path = Path(folder) / "shard.parquet"
            pq.write_table(table, path, row_group_size=ROWS_PER_GROUP, write_page_checksum=True)
            number = claim_shard()
            uri = output.put_file(self.shard_objects(number)[0], path, "application/vnd.apache.parquet")
        for sample, key in zip(good, keys, strict=True):
            sample.row.update(uri=uri, member=key, offset=None)

    def read_image(self, output, row: dict) -> bytes:
        name = "/".join(row["uri"].rsplit("/", 2)[-2:])
        try:
            with output.open_read(name) as file:
                table = pq.read_table(file, columns=["image", "key"], filters=[("key", "=", row["member"])],
                                      page_checksum_verification=True)
        except (pa.ArrowException, OSError) as err:
            raise StorageError(f"{output.uri(name)}: not a readable Parquet file ({err}); the shard is damaged: "
                               f"restore it, or delete it and its manifest rows so that a rerun makes its images "
                               f"again") from None
        return checked_image(row, table.column("image")[0]["bytes"].as_py())
