"""The manifest: one row per image attempt, written as Parquet parts while the job runs.

Resume and status read it back; the final state of an image is decided by latest_status.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MANIFEST_PREFIX = "manifest/"
SUMMARY_KEY = MANIFEST_PREFIX + "summary.json"
PARAMS_KEY = "job.json"
MERGED_SUFFIX = "-merged.parquet"

STATUSES = ("ok", "failed")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int32(), nullable=False),
        # A row that failed on bad input may lack any of these, so they are only required for "ok".
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("params", pa.string(), nullable=False),
        pa.field("truncated", pa.bool_()),
        pa.field("uri", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("prior_s", pa.float64()),
        pa.field("decoder_s", pa.float64()),
        pa.field("write_s", pa.float64()),
        # The Ray node ids the image's prior and decoder actors ran on.
        pa.field("prior_node", pa.string()),
        pa.field("decoder_node", pa.string()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

_REQUIRED_WHEN_OK = (
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "truncated",
    "uri",
    "bytes",
    "sha256",
    "prior_s",
    "decoder_s",
    "write_s",
)
_STAGE_SECONDS = ("prior_s", "decoder_s", "write_s")


class ManifestError(Exception):
    """A manifest row that does not fit the schema, or a stored manifest file that cannot be read."""


def write_part(output, rows: list[dict[str, Any]]) -> str:
    """Validates rows against MANIFEST_SCHEMA, stores them as one new Parquet part, and returns its key.

    A row's `params` may be a dict (stored as sorted JSON); a missing `finished_at` means now.
    """
    if not rows:
        raise ManifestError("manifest part: no rows to write")
    return _store_part(output, _rows_to_table(rows))


def _store_part(output, table: pa.Table, suffix: str = ".parquet") -> str:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    # The timestamp first makes key order follow write order, which breaks finished_at ties.
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    key = f"{MANIFEST_PREFIX}part-{stamp}-{uuid.uuid4().hex}{suffix}"
    output.put(key, sink.getvalue(), content_type="application/vnd.apache.parquet")
    return key


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    now = datetime.now(timezone.utc)
    names = set(MANIFEST_SCHEMA.names)
    complete = []
    for number, row in enumerate(rows):
        unknown = sorted(set(row) - names)
        if unknown:
            raise ManifestError(f"manifest row {number}: unknown column(s) {', '.join(unknown)}")
        full = {name: row.get(name) for name in MANIFEST_SCHEMA.names}
        full["params"] = _params_json(full["params"])
        if full["finished_at"] is None:
            full["finished_at"] = now
        _check_row(number, full)
        complete.append(full)
    arrays = []
    for field in MANIFEST_SCHEMA:
        try:
            arrays.append(pa.array([row[field.name] for row in complete], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            raise ManifestError(f"manifest column {field.name}: {err}") from None
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def _params_json(params: Any) -> Any:
    return json.dumps(params, sort_keys=True) if isinstance(params, dict) else params


def _check_row(number: int, row: dict[str, Any]) -> None:
    where = f"manifest row {number} ({row['prompt_id']!r}, image {row['image_index']!r})"
    for field in MANIFEST_SCHEMA:
        if not field.nullable and row[field.name] is None:
            raise ManifestError(f"{where}: {field.name} is required")
    status = row["status"]
    if status not in STATUSES:
        raise ManifestError(f"{where}: status must be one of {', '.join(STATUSES)} (got {status!r})")
    if status == "ok":
        for name in _REQUIRED_WHEN_OK:
            if row[name] is None:
                raise ManifestError(f"{where}: {name} is required when status is 'ok'")
    elif not row["error"]:
        raise ManifestError(f"{where}: error is required when status is 'failed'")
    finished_at = row["finished_at"]
    if isinstance(finished_at, datetime) and finished_at.tzinfo is None:
        raise ManifestError(f"{where}: finished_at must be timezone-aware")


def read_manifest(output) -> pa.Table:
    """All parts concatenated in key order; an empty table with MANIFEST_SCHEMA when there are none."""
    tables = [_read_part(output, key) for key in _part_keys(output)]
    if not tables:
        return MANIFEST_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def _part_keys(output) -> list[str]:
    # Keys from Output.list are relative to the output root, like the keys put and get take.
    listed = output.list(MANIFEST_PREFIX)
    return sorted(key for key in listed if key.startswith(MANIFEST_PREFIX) and key.endswith(".parquet"))


def _read_part(output, key: str) -> pa.Table:
    data = output.get(key)
    if data is None:
        raise ManifestError(f"{key}: listed but could not be fetched")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        raise ManifestError(f"{key}: not a readable Parquet file: {err}") from None
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ManifestError(f"{key}: missing manifest column(s) {', '.join(missing)}")
    try:
        return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise ManifestError(f"{key}: columns do not match the manifest schema: {err}") from None


def job_rows(table: pa.Table, job_id: str) -> pa.Table:
    """The rows of one job: an output regenerated with --force also holds an earlier job's rows."""
    return table.filter(pc.equal(table.column("job_id"), job_id))


def latest_status(table: pa.Table) -> dict[tuple[str, int], dict[str, Any]]:
    """The final row of each image, keyed by (prompt_id, image_index).

    An "ok" row beats any "failed" one, whatever their order, because the image it points at exists;
    among rows of the same status the latest finished_at wins, and on a tie the later row.
    """
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in table.to_pylist():
        key = (row["prompt_id"], row["image_index"])
        current = latest.get(key)
        if current is None or _rank(row) >= _rank(current):
            latest[key] = row
    return latest


def _rank(row: dict[str, Any]) -> tuple[bool, datetime]:
    return (row["status"] == "ok", row["finished_at"])


def summarize(table: pa.Table, elapsed_s: float | None = None) -> dict[str, Any]:
    """Counts by final status, throughput, and mean seconds per stage over the final rows."""
    final = list(latest_status(table).values())
    counts = dict.fromkeys(STATUSES, 0)
    for row in final:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    mean_s = {}
    for name in _STAGE_SECONDS:
        values = [row[name] for row in final if row[name] is not None]
        mean_s[name.removesuffix("_s")] = sum(values) / len(values) if values else None
    throughput = counts["ok"] / elapsed_s if elapsed_s else None
    return {
        "images": len(final),
        "rows": table.num_rows,
        "status": counts,
        "elapsed_s": elapsed_s,
        "images_per_s": throughput,
        "mean_s": mean_s,
    }


def write_summary(output, summary: dict[str, Any]) -> str:
    """Stores the summary as manifest/summary.json and returns its URI."""
    data = json.dumps(summary, indent=2, sort_keys=True).encode("utf-8")
    return output.put(SUMMARY_KEY, data, content_type="application/json")


def write_job_params(output, params: dict[str, Any]) -> str:
    """Records the generation params of the job as job.json and returns its URI."""
    data = json.dumps(params, indent=2, sort_keys=True).encode("utf-8")
    return output.put(PARAMS_KEY, data, content_type="application/json")


def read_job_params(output) -> dict[str, Any] | None:
    """The recorded generation params, or None when this output has none yet."""
    data = output.get(PARAMS_KEY)
    if data is None:
        return None
    try:
        params = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{output.uri(PARAMS_KEY)}: not valid JSON: {err}") from None
    if not isinstance(params, dict):
        raise ManifestError(f"{output.uri(PARAMS_KEY)}: expected a JSON object")
    return params


def compact(output, small_only: bool = False) -> str | None:
    """Merges parts into one and deletes them; returns the new key, or None if there were not two to merge.

    With small_only, parts that are themselves merges are left alone, so merging as a job goes costs each
    part one read. The merged part is stored before any old one is deleted; a crash in between leaves
    duplicate rows, which latest_status already tolerates.
    """
    keys = [k for k in _part_keys(output) if not (small_only and k.endswith(MERGED_SUFFIX))]
    if len(keys) <= 1:
        return None
    merged = _store_part(output, pa.concat_tables([_read_part(output, key) for key in keys]), MERGED_SUFFIX)
    for key in keys:
        output.delete(key)
    return merged
