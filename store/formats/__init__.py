"""Output formats behind one interface: a format takes a batch of encoded samples, stores them, and tells each
sample where it went (the object's URI, and its member key and byte offset inside a shard).

- `files`: one object per image under images/<ab>/ (store.ids.image_key);
- `webdataset`: tar shards shards/00000.tar with <key>.<ext>, <key>.txt and <key>.json per sample, and a
  metadata .parquet and _stats.json beside each shard, as img2dataset writes them;
- `parquet`: Parquet files data/00000.parquet whose `image` column is Hugging Face's Image feature.

Shard formats write whole shards of up to `shard_size` samples; a shard only becomes visible complete (one PUT
or rename), and the manifest is written after it, so a shard that the manifest does not name is an orphan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .files import FilesFormat
from .parquet import ParquetFormat
from .samples import Sample
from .webdataset import WebDatasetFormat

__all__ = ["FORMATS", "OutputFormat", "Sample", "open_format"]


class OutputFormat(Protocol):
    name: str
    # Images per write call: a whole shard for the shard formats, None for "whatever batch arrives".
    batch_size: int | None
    # Shard formats name their objects by number (shards/00012.tar); None for one file per image.
    shard_prefix: str | None

    def write(self, output, samples: list[Sample], claim_shard: Callable[[], int] | None) -> None:
        """Stores the ok samples and sets each sample's `uri`, `member` and `offset`; raises StorageError."""

    def read_image(self, output, row: dict[str, Any]) -> bytes:
        """The encoded image a manifest row points at, checked against the row's sha256; raises StorageError."""

    def shard_objects(self, number: int) -> list[str]:
        """The keys one shard consists of (empty for one file per image)."""


FORMATS: dict[str, type] = {"files": FilesFormat, "webdataset": WebDatasetFormat, "parquet": ParquetFormat}


def open_format(name: str, image_format: str, shard_size: int) -> OutputFormat:
    return FORMATS[name](image_format, shard_size)
