"""The manifest: one row per image attempt, written as Parquet parts while the job runs.

Resume and status read it back column by column; an image's final state is decided by `final_rows`, a sort and
a group-by in Arrow. Parts are merged size-tiered (`compact`), so their number grows with the log of the rows.
Every page of a part carries a CRC32 that reads verify, so a part damaged in the store fails loudly, by name.
"""

from __future__ import annotations

import io
import json
import math
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .membership import count_distinct, is_member

MANIFEST_PREFIX = "manifest/"
SUMMARY_KEY = MANIFEST_PREFIX + "summary.json"
PARAMS_KEY = "job.json"

STATUSES = ("ok", "failed")
# A failed row whose error starts with this was refused at planning (bad_rows: skip); rerunning cannot fix it.
INPUT_ERROR_PREFIX = "input: "

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int32(), nullable=False),
        # A row that failed on bad input may lack any of these, so they are only required for "ok".
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("width", pa.int32()),  # the delivered image
        pa.field("height", pa.int32()),
        pa.field("params", pa.string(), nullable=False),
        pa.field("truncated", pa.bool_()),
        pa.field("uri", pa.string()),  # the object holding the image: its own file, or its shard
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
        # Added with output formats and run records; parts written before them read these as null.
        pa.field("run_id", pa.string()),
        pa.field("source", pa.string()),  # input file name and row: "prompts.parquet#12"
        pa.field("member", pa.string()),  # the sample's key inside its shard; null for one file per image
        pa.field("offset", pa.int64()),  # where the image's bytes start inside its shard, if it is a tar
        pa.field("generated_width", pa.int32()),  # the size the stages generated before cropping to width/height
        pa.field("generated_height", pa.int32()),
    ]
)
LATER_COLUMNS = ("run_id", "source", "member", "offset", "generated_width", "generated_height")

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

# Size tiers: a part of fewer than TIER_BASE * FANOUT**(n+1) rows is in tier n, and FANOUT parts of one tier
# are merged into one. Parts written at decoder batch 8 reach tier 4 (≥ 1M rows) at ~8M images.
TIER_BASE = 16
FANOUT = 16
_PART_NAME = re.compile(r"part-(?P<stamp>\d{8}T\d{6}\d*Z)-(?:T(?P<tier>\d+)-)?[0-9a-f]+(?P<merged>-merged)?\.parquet$")
READ_THREADS = 8


class ManifestError(Exception):
    """A manifest row that does not fit the schema, or a stored manifest file that cannot be read."""


def write_part(output, rows: list[dict[str, Any]]) -> str:
    """Validates rows against MANIFEST_SCHEMA, stores them as one new Parquet part, and returns its key.

    A row's `params` may be a dict (stored as sorted JSON); a missing `finished_at` means now.
    """
    if not rows:
        raise ManifestError("manifest part: no rows to write")
    return store_part(output, rows_table(rows))


def store_part(output, table: pa.Table) -> str:
    """Stores a table that already has MANIFEST_SCHEMA as a new part, named by write time and size tier."""
    sink = io.BytesIO()
    pq.write_table(table, sink, write_page_checksum=True)
    # The timestamp first makes key order follow write order, which breaks finished_at ties.
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    key = f"{MANIFEST_PREFIX}part-{stamp}-T{tier_of(table.num_rows)}-{uuid.uuid4().hex}.parquet"
    output.put(key, sink.getvalue(), content_type="application/vnd.apache.parquet")
    return key


def tier_of(rows: int) -> int:
    return max(0, int(math.log(max(rows, 1) / TIER_BASE, FANOUT)))


def rows_table(rows: list[dict[str, Any]], check: bool = True) -> pa.Table:
    """Rows as a table with MANIFEST_SCHEMA, each checked against it unless `check` is off (rows that will not be
    stored, such as a writer's whose storage failed)."""
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
        if check:
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


def read_manifest(output, columns: list[str] | None = None, job_id: str | None = None,
                  status: str | None = None, run_id: str | None = None) -> pa.Table:
    """All parts concatenated in key order: only `columns`, and only the rows of `job_id`, with `status` and of
    `run_id` if given (filtered part by part, so rows that are not wanted never pile up). An empty table with the
    schema when there are none. A part merged away while this reads makes it read the new listing."""
    names = list(columns or MANIFEST_SCHEMA.names)
    schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in names])
    wanted = {"job_id": job_id, "status": status, "run_id": run_id}
    for attempt in range(3):
        keys = part_keys(output)
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            tables = list(pool.map(lambda key: _read_part(output, key, schema, wanted), keys))
        if all(t is not None for t in tables):
            # The parts' decoding buffers go back to the system now, not at the allocator's leisure: a resume of 16
            # million images holds the inputs' ids and these side by side (bench/plan.py, the 1.5 GB bound).
            pa.default_memory_pool().release_unused()
            return pa.concat_tables(tables) if tables else schema.empty_table()
        if attempt == 2:
            raise ManifestError(f"{output.uri(MANIFEST_PREFIX)}: parts keep disappearing while being read; is "
                                f"another process merging them?")
    raise AssertionError("unreachable")


def part_keys(output) -> list[str]:
    # Keys from Output.list are relative to the output root, like the keys put and get take.
    listed = output.list(MANIFEST_PREFIX)
    return sorted(key for key in listed if key.startswith(MANIFEST_PREFIX + "part-") and key.endswith(".parquet"))


def _read_part(output, key: str, schema: pa.Schema, wanted: dict[str, str | None]) -> pa.Table | None:
    """One part's rows that have the `wanted` values, in `schema`; None if the part vanished (merged) since it
    was listed. The filter columns are read first, dictionary-encoded (a few distinct values, compared once each),
    and the other columns only when some row matches: most parts hold no failed row, for instance."""
    filters = {name: value for name, value in wanted.items() if value is not None}
    try:
        with output.open_read(key) as file:
            parquet = pq.ParquetFile(file, read_dictionary=list(filters), page_checksum_verification=True)
            present = set(parquet.schema_arrow.names)
            needed = list(dict.fromkeys(schema.names + list(filters)))
            missing = [n for n in needed if n not in present and n not in LATER_COLUMNS]
            if missing:
                raise ManifestError(f"{key}: missing manifest column(s) {', '.join(missing)}")
            if any(name not in present for name in filters):
                return schema.empty_table()  # a part written before the filter column existed holds no such rows
            mask = _matching(parquet.read(columns=list(filters)), filters) if filters else None
            if mask is not None and not pc.any(mask).as_py():
                return schema.empty_table()
            if mask is not None and pc.all(mask).as_py():
                mask = None  # filtering would copy every row for nothing
            table = parquet.read(columns=[n for n in schema.names if n in present])
    except ManifestError:
        raise
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(output, key, err) from None
    except Exception:  # the storage layer's error; a part merged away since the listing is not one
        if not output.exists(key):
            return None
        raise
    if mask is not None:
        table = table.filter(mask)
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, MANIFEST_SCHEMA.field(name).type))
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise ManifestError(f"{key}: columns do not match the manifest schema: {err}") from None


def _matching(columns: pa.Table, filters: dict[str, str]) -> pa.ChunkedArray:
    """A mask of the rows whose filter columns hold the wanted values."""
    mask = None
    for name, value in filters.items():
        match = _equals(columns.column(name), value)
        mask = match if mask is None else pc.and_(mask, match)
    return mask


def _equals(column: pa.ChunkedArray, value: str) -> pa.ChunkedArray:
    """column == value, comparing a dictionary column's few distinct values instead of every row."""
    chunks = []
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            hits = pc.equal(chunk.dictionary, value).to_numpy(zero_copy_only=False)
            match = pa.array(hits[chunk.indices.to_numpy(zero_copy_only=False)]) if len(chunk) else \
                pa.array([], pa.bool_())
            chunks.append(pc.and_(match, pc.is_valid(chunk)))
        else:
            chunks.append(pc.fill_null(pc.equal(chunk, value), False))
    return pa.chunked_array(chunks, type=pa.bool_())


def named_uris(output) -> set[str]:
    """Every object URI that some manifest row names, of any job. Read dictionary-encoded part by part: a shard's
    URI repeats on each of its rows, so this stays small however many images there are."""
    def part_uris(key: str) -> list[str]:
        try:
            with output.open_read(key) as file:
                parquet = pq.ParquetFile(file, read_dictionary=["uri"], page_checksum_verification=True)
                column = parquet.read(columns=["uri"]).column("uri")
        except (pa.ArrowException, OSError) as err:
            raise _unreadable(output, key, err) from None
        return [u for u in pc.unique(column).to_pylist() if u]

    # Parts read side by side, as read_manifest does: on a store 80 ms away, one after another took seconds.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        return {u for found in pool.map(part_uris, part_keys(output)) for u in found}


def _unreadable(output, key: str, err: Exception) -> ManifestError:
    return ManifestError(f"{output.uri(key)}: not a readable Parquet file ({err}); this manifest part is damaged: "
                         f"restore it, or delete it so that a rerun makes its images again")


def final_rows(table: pa.Table) -> pa.Table:
    """The final row of each image (prompt_id, image_index), in no particular order.

    An "ok" row beats any "failed" one, whatever their order, because the image it points at exists;
    among rows of the same status the latest finished_at wins, and on a tie the later row.
    """
    if table.num_rows == 0:
        return table
    order = pa.table({
        "ok": pc.equal(table.column("status"), "ok"),
        "finished_at": table.column("finished_at"),
        "row": np.arange(table.num_rows),
    }).sort_by([("ok", "ascending"), ("finished_at", "ascending"), ("row", "ascending")]).column("row")
    ranked = pa.table({"prompt_id": table.column("prompt_id").take(order),
                       "image_index": table.column("image_index").take(order), "row": order})
    # Without threads, a group-by keeps input order within each group, so "last" is the best-ranked row.
    last = ranked.group_by(["prompt_id", "image_index"], use_threads=False).aggregate([("row", "last")])
    return table.take(last.column("row_last"))


def latest_status(table: pa.Table) -> dict[tuple[str, int], dict[str, Any]]:
    """The final row of each image as a dict keyed by (prompt_id, image_index); for small tables."""
    return {(row["prompt_id"], row["image_index"]): row for row in final_rows(table).to_pylist()}


def keys_in(table: pa.Table, keys: pa.Table) -> np.ndarray:
    """A mask of the rows of `table` whose (prompt_id, image_index) is among `keys`' rows; duplicates in `keys`
    are fine. The keys are hashed once per image index."""
    found = np.zeros(table.num_rows, dtype=bool)
    if table.num_rows == 0 or keys.num_rows == 0:
        return found
    indices = table.column("image_index").to_numpy()
    for index in pc.unique(table.column("image_index")).to_pylist():
        ids = keys.filter(pc.equal(keys.column("image_index"), index)).column("prompt_id")
        if len(ids):
            found |= is_member(table.column("prompt_id"), ids) & (indices == index)
    return found


@dataclass
class ImageStates:
    """Where a job's images stand: how many are made, and the final row of each image that only failed."""

    ok: int
    failed: pa.Table  # prompt_id, image_index, status, error, source, finished_at

    @property
    def bad_input(self) -> int:
        return int(pc.sum(input_failures(self.failed)).as_py() or 0)

    @property
    def counts(self) -> dict[str, int]:
        return {"ok": self.ok, "failed": self.failed.num_rows}


def image_states(output, job_id: str) -> ImageStates:
    """The final state of every image of a job, without reading more than the ids of the images made: failed
    rows are few, and only those are ranked."""
    ok = read_manifest(output, ["prompt_id", "image_index"], job_id, "ok")
    indices = pc.unique(ok.column("image_index")).to_pylist()
    if len(indices) == 1:  # one image per prompt: filtering by it would copy every row for nothing
        made = count_distinct(ok.column("prompt_id"))
    else:
        made = sum(count_distinct(ok.filter(pc.equal(ok.column("image_index"), index)).column("prompt_id"))
                   for index in indices)
    failed = read_manifest(output, ["prompt_id", "image_index", "status", "error", "source", "finished_at"], job_id,
                           "failed")
    failed = failed.filter(pa.array(~keys_in(failed, ok)))
    return ImageStates(made, final_rows(failed))


def input_failures(final: pa.Table) -> pa.Array:
    """A mask of final rows that failed on bad input (refused at planning), which rerunning cannot fix."""
    if "error" not in final.column_names or final.num_rows == 0:
        return pa.array([False] * final.num_rows, type=pa.bool_())
    failed = pc.equal(final.column("status"), "failed")
    refused = pc.fill_null(pc.starts_with(final.column("error"), INPUT_ERROR_PREFIX), False)
    return pc.and_(failed, refused)


def summarize(states: ImageStates, run_rows: pa.Table, elapsed_s: float | None = None) -> dict[str, Any]:
    """Counts by final status over the job, and this run's throughput and mean seconds per stage per image."""
    mean_s = {}
    for name in _STAGE_SECONDS:
        values = run_rows.column(name) if name in run_rows.column_names else None
        mean_s[name.removesuffix("_s")] = pc.mean(values).as_py() if values is not None and len(values) else None
    made_now = int(pc.sum(pc.equal(run_rows.column("status"), "ok")).as_py() or 0) if run_rows.num_rows else 0
    return {
        "images": states.ok + states.failed.num_rows,
        "status": states.counts,
        "bad_input": states.bad_input,
        "elapsed_s": elapsed_s,
        "images_per_s": made_now / elapsed_s if elapsed_s else None,
        "mean_s": mean_s,
    }


def write_summary(output, summary: dict[str, Any]) -> str:
    """Stores the summary as manifest/summary.json and returns its URI."""
    data = json.dumps(summary, indent=2, sort_keys=True, default=str).encode("utf-8")
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


def part_tier(key: str) -> int:
    """A part's size tier from its name; parts named before tiers were small (0) or merged (1)."""
    found = _PART_NAME.search(key)
    if found is None:
        return 0
    if found["tier"] is not None:
        return int(found["tier"])
    return 1 if found["merged"] else 0


def compact(output, everything: bool = False) -> list[str]:
    """Merges parts size-tiered and returns the keys of the merged parts it wrote.

    Whenever FANOUT parts share a tier, the oldest FANOUT of them become one part (of a higher tier, once it is
    big enough), so an output of n rows holds at most about (FANOUT - 1) · log_FANOUT(n / TIER_BASE) parts.
    With `everything`, all parts become one. A merged part is stored before its inputs are deleted; a crash
    in between leaves duplicate rows, which final_rows already tolerates.
    """
    written = []
    while True:
        keys = part_keys(output)
        if everything:
            batch = keys if len(keys) > 1 else []
        else:
            tiers: dict[int, list[str]] = {}
            for key in keys:
                tiers.setdefault(part_tier(key), []).append(key)
            full = [group for _, group in sorted(tiers.items()) if len(group) >= FANOUT]
            batch = full[0][:FANOUT] if full else []
        if not batch:
            return written
        tables = [_read_part(output, key, MANIFEST_SCHEMA, {}) for key in batch]
        present = [(k, t) for k, t in zip(batch, tables, strict=True) if t is not None]
        written.append(store_part(output, pa.concat_tables([t for _, t in present])))
        for key, _ in present:
            output.delete(key)
        if everything:
            return written
