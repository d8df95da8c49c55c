"""The `files` format: one object per image, at a key that depends only on its prompt id and index."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from wurstfabrik.store.encoding import content_type, extension
from wurstfabrik.store.ids import image_key

from .samples import Sample, checked_image

PUT_THREADS = 8  # concurrent PUTs per writer task (S3 clients pool 32 connections per process: store.s3_output)


class FilesFormat:
    name = "files"
    batch_size = None
    shard_prefix = None

    def __init__(self, image_format: str, shard_size: int | None = None):
        self.image_format = image_format

    def write(self, output, samples: list[Sample], claim_shard=None) -> None:
        """Stores the batch's images PUT_THREADS at a time: a writer task waits about one round trip per
        PUT_THREADS images, not per image. Every PUT is finished before this returns or raises."""
        ok = [sample for sample in samples if sample.ok]
        if len(ok) <= 1:
            for sample in ok:
                self._put(output, sample)
            return
        with ThreadPoolExecutor(min(PUT_THREADS, len(ok)), thread_name_prefix="wurstfabrik-put") as pool:
            for done in [pool.submit(self._put, output, sample) for sample in ok]:
                done.result()  # the first failure (StorageError) is raised, once every PUT has ended

    def _put(self, output, sample: Sample) -> None:
        key = image_key(sample.row["prompt_id"], sample.row["image_index"], extension(self.image_format))
        sample.row.update(uri=output.put(key, sample.data, content_type(self.image_format)), member=None,
                          offset=None)

    def read_image(self, output, row: dict) -> bytes:
        # The key from the URI's last segments, not the URI itself: an output copied elsewhere still reads.
        return checked_image(row, output.get("/".join(row["uri"].rsplit("/", 3)[-3:])))

    def shard_objects(self, number: int) -> list[str]:
        return []
