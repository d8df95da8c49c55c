"""The writer stage: stores a batch of encoded images in the job's output format, then records their manifest rows
(one part per batch), and returns each image's status to the driver."""

import hashlib
import time
from datetime import datetime, timezone

import numpy as np
import ray

from store.formats import Sample, open_format
from store.manifest import write_part
from store.storage import StorageError

from .batches import column

RESULT_COLUMNS = ("prompt_id", "image_index", "status")
# Manifest fields copied from the batch as they are.
# Row fields that say how the job ran, not what the image is; a sample's metadata leaves them out.
NOT_METADATA = {"uri", "member", "offset", "params", "error", "prior_s", "decoder_s", "prior_node", "decoder_node"}
ROW_FIELDS = ("prompt_id", "image_index", "prompt", "negative_prompt", "seed", "truncated", "prior_s", "decoder_s",
              "prior_node", "decoder_node", "source", "bytes", "sha256")


def write_images(batch: dict[str, np.ndarray], output, output_format: str, image_format: str, shard_size: int,
                 job: dict, shard_numbers=None) -> dict[str, np.ndarray]:
    """`job` holds job_id, run_id, params (the sampler settings) and provenance (what each sample's metadata
    carries). A storage failure that outlasts the retries leaves the batch unrecorded: its images are not in the
    manifest, so a rerun makes them again, and the driver is told through `storage_error` and `storage_transient`
    (whether a rerun can get past it as it is: StorageError.transient)."""
    start = time.perf_counter()
    samples = [_sample(batch, i, job) for i in range(len(batch["prompt_id"]))]
    batch_key = hashlib.sha256("\n".join(sorted(f"{s.row['prompt_id']}/{s.row['image_index']}"
                                                 for s in samples)).encode()).hexdigest()
    claim = (lambda: ray.get(shard_numbers.claim.remote(batch_key))) if shard_numbers is not None else None
    storage_error, transient = "", False
    for sample in samples:
        sample.row["status"] = "ok" if sample.ok else "failed"
    try:
        open_format(output_format, image_format, shard_size).write(output, samples, claim)
        per_image = (time.perf_counter() - start) / max(1, len(samples))
        now = datetime.now(timezone.utc)
        for sample in samples:
            sample.row.update(write_s=per_image, finished_at=now)
        if samples:
            write_part(output, [s.row for s in samples])
    except StorageError as e:
        storage_error, transient = str(e), e.transient
    statuses = [("unrecorded" if storage_error else s.row["status"]) for s in samples]
    return {"prompt_id": column([s.row["prompt_id"] for s in samples]),
            "image_index": column([s.row["image_index"] for s in samples], np.int64),
            "status": column(statuses), "storage_error": column([storage_error] * len(samples)),
            "storage_transient": column([transient] * len(samples), bool)}


def _sample(batch: dict[str, np.ndarray], i: int, job: dict) -> Sample:
    row = {name: _plain(batch[name][i]) for name in ROW_FIELDS if name in batch}
    height, width = (int(v) for v in batch["image_size"][i])
    error = str(batch["error"][i]) or None
    row.update(job_id=job["job_id"], run_id=job["run_id"], params=job["params"], error=error,
               height=height or None, width=width or None, uri=None, member=None, offset=None)
    if "generated_size" in batch:
        generated = [int(v) for v in batch["generated_size"][i]]
        row.update(generated_height=generated[0] or None, generated_width=generated[1] or None)
    if error:
        row.update(bytes=None, sha256=None)
    data = bytes(batch["data"][i]) if not error else None
    metadata = {**{k: v for k, v in row.items() if k not in NOT_METADATA}, **job["provenance"]}
    return Sample(row, data, metadata)


def _plain(value):
    """A numpy scalar as the Python value the manifest and JSON want."""
    return value.item() if isinstance(value, np.generic) else value
