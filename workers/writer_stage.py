"""The writer stage: stores a batch of encoded images in the job's output format and returns their manifest rows.

The driver records the rows of each batch Ray hands it, and only those: Ray delivers a writer task's result once,
however often it ran the task, so an image is recorded once, in the shard of the attempt whose result arrived. An
attempt that stored its images and was then lost (its node died before Ray saw it finish) leaves either files or a
shard number that the rerun writes again (same block, same batch key, same number), or a shard that no row names,
which the driver removes as an orphan."""

import hashlib
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import ray

from wurstfabrik.store.formats import Sample, open_format
from wurstfabrik.store.manifest import MANIFEST_SCHEMA, rows_table
from wurstfabrik.store.storage import StorageError

from .faults import attempt_key, maybe_kill_writer
from .metrics import MetricLabels, StageMeter

# The column beside the manifest rows that says why the batch could not be stored ("" when it was).
STORAGE_ERROR = "storage_error"
# Beside it: whether a rerun can get past that failure as it is (an outage that outlasted the retries).
STORAGE_TRANSIENT = "storage_transient"
# Row fields that say how the job ran, not what the image is; a sample's metadata leaves them out.
NOT_METADATA = {"uri", "member", "offset", "params", "error", "prior_s", "decoder_s", "prior_node", "decoder_node"}
# Manifest fields copied from the batch as they are.
ROW_FIELDS = ("prompt_id", "image_index", "prompt", "negative_prompt", "seed", "truncated", "prior_s", "decoder_s",
              "prior_node", "decoder_node", "source", "bytes", "sha256")


def write_images(batch: dict[str, np.ndarray], output, output_format: str, image_format: str, shard_size: int,
                 job: dict, shard_numbers=None) -> pa.Table:
    """The batch's manifest rows and the STORAGE_ERROR and STORAGE_TRANSIENT columns, after storing its images.
    `job` holds job_id, run_id, params (the sampler settings) and provenance (what each sample's metadata carries).
    A storage failure that outlasts the retries is named in STORAGE_ERROR, and STORAGE_TRANSIENT says whether a
    rerun can get past it as it is (StorageError.transient); the driver then records none of the rows, so a rerun
    makes the images again."""
    meter = StageMeter("write", MetricLabels(job["job_id"], job["run_id"]))
    with meter.batch():
        result = _write(batch, output, output_format, image_format, shard_size, job, shard_numbers)
    if result.num_rows and not result.column(STORAGE_ERROR)[0].as_py():  # rows the driver will record
        meter.images(result.column("write_s").to_pylist())
    return result


def _write(batch: dict[str, np.ndarray], output, output_format: str, image_format: str, shard_size: int, job: dict,
           shard_numbers) -> pa.Table:
    start = time.perf_counter()
    samples = [_sample(batch, i, job) for i in range(len(batch["prompt_id"]))]
    batch_key = hashlib.sha256("\n".join(sorted(f"{s.row['prompt_id']}/{s.row['image_index']}"
                                                 for s in samples)).encode()).hexdigest()
    claim = (lambda: ray.get(shard_numbers.claim.remote(attempt_key(batch_key)))) if shard_numbers is not None \
        else None
    storage_error, transient = "", False
    for sample in samples:
        sample.row["status"] = "ok" if sample.ok else "failed"
    try:
        open_format(output_format, image_format, shard_size).write(output, samples, claim)
        maybe_kill_writer("store", [s.row for s in samples])
    except StorageError as e:
        storage_error, transient = str(e), e.transient
    per_image = (time.perf_counter() - start) / max(1, len(samples))
    now = datetime.now(timezone.utc)
    for sample in samples:
        sample.row.update(write_s=per_image, finished_at=now)
    rows = rows_table([s.row for s in samples], check=not storage_error)
    result = rows.append_column(STORAGE_ERROR, pa.array([storage_error] * len(samples), pa.string()))
    result = result.append_column(STORAGE_TRANSIENT, pa.array([transient] * len(samples), pa.bool_()))
    maybe_kill_writer("return", [s.row for s in samples])
    return result


def manifest_rows(result: pa.Table) -> pa.Table:
    """The manifest rows of a writer's result, as the driver records them."""
    return result.drop_columns([STORAGE_ERROR, STORAGE_TRANSIENT]).cast(MANIFEST_SCHEMA)


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
