"""The `files` format: one object per image, at a key that depends only on its prompt id and index."""

from __future__ import annotations

from wurstfabrik.store.encoding import content_type, extension
from wurstfabrik.store.ids import image_key

from .samples import Sample, checked_image


class FilesFormat:
    name = "files"
    batch_size = None
    shard_prefix = None

    def __init__(self, image_format: str, shard_size: int | None = None):
        self.image_format = image_format

    def write(self, output, samples: list[Sample], claim_shard=None) -> None:
        for sample in samples:
            if sample.ok:
                key = image_key(sample.row["prompt_id"], sample.row["image_index"], extension(self.image_format))
                sample.row.update(uri=output.put(key, sample.data, content_type(self.image_format)), member=None,
                                  offset=None)

    def read_image(self, output, row: dict) -> bytes:
        # The key from the URI's last segments, not the URI itself: an output copied elsewhere still reads.
        return checked_image(row, output.get("/".join(row["uri"].rsplit("/", 3)[-3:])))

    def shard_objects(self, number: int) -> list[str]:
        return []
