"""One encoded image on its way into an output format, with its manifest row and its metadata."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from wurstfabrik.store.storage import StorageError


@dataclass
class Sample:
    row: dict[str, Any]  # the image's manifest row as far as it is known: ids, prompt, seed, sizes, status, error
    data: bytes | None  # the encoded image; None when an earlier stage failed it
    metadata: dict[str, Any]  # what the image's .json says: the row's fields and the job's provenance

    @property
    def ok(self) -> bool:
        return self.data is not None and not self.row.get("error")


def checked_image(row: dict[str, Any], data: bytes | None) -> bytes | None:
    """The image bytes read back for a manifest row, once they match the row's sha256 (when it has one): reads
    by range inside a shard have no whole-object checksum to lean on."""
    expected = row.get("sha256")
    if data is not None and expected and hashlib.sha256(data).hexdigest() != expected:
        where = f"{row['uri']}, member {row['member']}" if row.get("member") else row["uri"]
        raise StorageError(f"{where}: the image's bytes do not match the sha256 in the manifest; the object was "
                           f"changed or damaged in the store: restore it, or delete it and its manifest rows so "
                           f"that a rerun makes the image again")
    return data
