"""Input planning: find the prompt files, check every row before any work starts, and cut the work into read
units (slices of Parquet row groups) holding only the images that are not done yet.

Everything is Arrow: each row group's prompt column is read, checked with pyarrow.compute and dropped; the driver
keeps only the prompt ids (to find duplicates and done images) and per-unit offsets of what is left to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wurstfabrik.store.ids import InputError
from wurstfabrik.store.manifest import INPUT_ERROR_PREFIX
from wurstfabrik.store.membership import is_member
from wurstfabrik.store.prompts import (
    Columns,
    ReadUnit,
    check_columns,
    file_name,
    open_parquet,
    prompt_ids,
    requested_sizes,
    row_ids,
    row_problems,
    size_keys,
)
from wurstfabrik.store.storage import S3Settings, StorageError, list_files

MAX_REPORTED_PROBLEMS = 20
# Rows per read unit: one read task's worth; a row group of a million rows becomes a few dozen units.
UNIT_ROWS = 16384


@dataclass
class Plan:
    units: list[ReadUnit] = field(default_factory=list)
    total_images: int = 0
    done_images: int = 0
    # Images of rows refused as bad input (bad_rows: skip): prompt_id, image_index, source, error.
    bad: pa.Table = field(default_factory=lambda: BAD_SCHEMA.empty_table())

    @property
    def pending_images(self) -> int:
        return self.total_images - self.done_images - self.bad.num_rows


BAD_SCHEMA = pa.schema([("prompt_id", pa.string()), ("image_index", pa.int32()), ("source", pa.string()),
                        ("error", pa.string())])


def list_input_files(prompts: str, settings: S3Settings | None = None) -> list[str]:
    """The Parquet files of a spec's `prompts`: a file, a folder, a glob, or an s3:// prefix; as URIs."""
    try:
        files = list_files(prompts, suffix=".parquet", settings=settings)
    except OSError as e:
        raise StorageError(f"prompts: cannot list {prompts} ({e})") from None
    if files is None and not prompts.startswith("s3://") and not any(c in prompts for c in "*?["):
        raise InputError(f"prompts: {prompts} does not exist")
    if not files:
        raise InputError(f"prompts: no Parquet files found at {prompts}")
    return files


@dataclass
class Scan:
    """What planning keeps of every input row: its id and where it is, and the problems of bad rows."""

    files: list[str]
    ids: list[pa.Array] = field(default_factory=list)  # one array of prompt ids per row group
    groups: list[tuple[int, int, int, int]] = field(default_factory=list)  # file, group, first row, rows
    bad: dict[int, dict[int, str]] = field(default_factory=dict)  # group number → row offset → problem
    # With height_column/width_column: one array per row group of each row's store.prompts.size_keys.
    sizes: list[np.ndarray] = field(default_factory=list)


def scan_inputs(spec, check_size: Callable[[int, int], str | None],
                check_prompt: Callable[[str], str | None] | None = None,
                settings: S3Settings | None = None) -> Scan:
    """Reads and checks every input row. With bad_rows: refuse, problems are collected (up to a limit) and
    raised together as one InputError; with skip, they stay in the scan and become failed rows."""
    files = list_input_files(spec.prompts, settings)
    by_name: dict[str, str] = {}
    for uri in files:
        other = by_name.setdefault(file_name(uri), uri)
        if other != uri and spec.id_column is None:
            raise InputError(f"prompts: {other} and {uri} have the same file name, so their row ids would "
                             f"collide; rename one or set id_column")
    skip = spec.bad_rows == "skip"
    scan = _scan(spec, files, check_size, check_prompt, settings, stop_early=not skip)
    pa.default_memory_pool().release_unused()  # the row groups' buffers: only the ids are kept
    if spec.id_column is not None:  # row ids (file name and row number) cannot repeat
        _mark_duplicates(scan)
    problems = [p for group in scan.bad.values() for p in group.values()]
    if problems and not skip:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = "" if len(problems) <= len(shown) else f"\n... and more (first {len(shown)} shown)"
        raise InputError(f"{len(problems)} bad input row(s), nothing was generated:\n  " + "\n  ".join(shown) + more)
    return scan


def plan_job(spec, check_size: Callable[[int, int], str | None], done: pa.Table | None = None,
             check_prompt: Callable[[str], str | None] | None = None, settings: S3Settings | None = None) -> Plan:
    """scan_inputs, then plan_units: the read units of every image not in `done`."""
    return plan_units(spec, scan_inputs(spec, check_size, check_prompt, settings), done)


def _scan(spec, files, check_size, check_prompt, settings, stop_early: bool) -> Scan:
    columns = Columns.of(spec)
    scan = Scan(files)
    reported = 0
    for file_index, uri in enumerate(files):
        parquet = open_parquet(uri, settings)
        try:
            check_columns(columns, uri, parquet.schema_arrow)
            first_row = 0
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=columns.names())
                problems = row_problems(columns, uri, first_row, table, (spec.height, spec.width), check_size,
                                        check_prompt)
                if problems:
                    scan.bad[len(scan.groups)] = problems
                    reported += len(problems)
                scan.ids.append(prompt_ids(columns, uri, first_row, table))
                if columns.height is not None or columns.width is not None:
                    scan.sizes.append(size_keys(*requested_sizes(columns, table, (spec.height, spec.width))))
                scan.groups.append((file_index, group, first_row, table.num_rows))
                first_row += table.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{uri}: not a readable Parquet file ({e})") from None
        finally:
            parquet.close()
        if stop_early and reported >= MAX_REPORTED_PROBLEMS:
            break
    return scan


def _mark_duplicates(scan: Scan) -> None:
    """Every row whose id an earlier row already has becomes a bad row naming that earlier row."""
    if not scan.ids:
        return
    ids = pa.chunked_array(scan.ids, type=pa.string())
    if pc.count_distinct(ids).as_py() + ids.null_count >= len(ids):
        return
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    first_seen: dict[str, str] = {}
    for number, (chunk, (file_index, _, first_row, _)) in enumerate(zip(scan.ids, scan.groups, strict=True)):
        hits = np.flatnonzero(pc.fill_null(pc.is_in(chunk, value_set=repeated), False).to_numpy(
            zero_copy_only=False))
        uri = scan.files[file_index]
        for i in hits:
            prompt_id = chunk[int(i)].as_py()
            where = f"{file_name(uri)}#{first_row + int(i)}"
            earlier = first_seen.setdefault(prompt_id, where)
            if earlier != where and int(i) not in scan.bad.get(number, {}):
                scan.bad.setdefault(number, {})[int(i)] = (f"{uri} row {first_row + int(i)}: duplicate id "
                                                           f"{prompt_id!r} (also {earlier})")


def plan_units(spec, scan: Scan, done: pa.Table | None = None) -> Plan:
    """The read units of every checked image not in `done` (prompt_id, image_index), and the bad rows' images."""
    per_prompt = spec.images_per_prompt
    # One membership test per image index over all ids at once: the done set is hashed once, not per group.
    all_ids = pa.chunked_array(scan.ids, type=pa.string()) if scan.ids else None
    done_masks = {index: is_member(all_ids, ids)
                  for index, ids in _done_ids(done, per_prompt).items()} if all_ids is not None else {}
    plan = Plan()
    bad_parts = []
    position = 0  # of the group's first row among all rows
    for number, (ids, (file_index, group, first_row, rows)) in enumerate(zip(scan.ids, scan.groups, strict=True)):
        uri = scan.files[file_index]
        pending = np.ones((rows, per_prompt), dtype=bool)
        for index, mask in done_masks.items():
            is_done = mask[position:position + rows]
            plan.done_images += int(is_done.sum())
            pending[:, index] &= ~is_done
        bad = scan.bad.get(number, {})
        if bad:
            offsets = np.fromiter(bad, dtype=np.int64)
            bad_parts.append(_bad_images(uri, first_row, offsets, [bad[o] for o in offsets], ids, per_prompt))
            pending[offsets, :] = False
        plan.total_images += rows * per_prompt
        for start in range(0, rows, UNIT_ROWS):
            stop = min(rows, start + UNIT_ROWS)
            todo = np.flatnonzero(pending[start:stop].reshape(-1)).astype(np.int32)
            if len(todo) == 0:
                continue
            whole = len(todo) == (stop - start) * per_prompt
            for part in _by_size(todo, scan.sizes[number][start:stop] if scan.sizes else None, per_prompt):
                plan.units.append(ReadUnit(uri, group, first_row + start, start, stop,
                                           None if whole and part is todo else part.tobytes()))
        position += rows
    if bad_parts:
        plan.bad = pa.concat_tables(bad_parts)
    return plan


def _by_size(todo: np.ndarray, sizes: np.ndarray | None, per_prompt: int) -> list[np.ndarray]:
    """A unit's pending images split by requested size, smallest first: read units of one size each, so that the
    stages' batches are cut from rows of one size and stay full (jobs.driver.build_dataset)."""
    if sizes is None:
        return [todo]
    keys = sizes[todo // per_prompt]
    distinct = np.unique(keys)
    return [todo] if len(distinct) == 1 else [todo[keys == key] for key in distinct]


def _done_ids(done: pa.Table | None, per_prompt: int) -> dict[int, pa.Array]:
    """The prompt ids done, per image index, for the indices this spec makes."""
    if done is None or done.num_rows == 0:
        return {}
    if pc.max(done.column("image_index")).as_py() == 0:  # the common case: one image per prompt, nothing to copy
        return {0: done.column("prompt_id")}
    found = {}
    for index in range(per_prompt):
        ids = done.filter(pc.equal(done.column("image_index"), index)).column("prompt_id")
        if len(ids):
            found[index] = ids
    return found


def _bad_images(uri: str, first_row: int, offsets: np.ndarray, problems: list[str], ids: pa.Array,
                per_prompt: int) -> pa.Table:
    """The images of bad rows, as failed rows: a row with no usable id takes its file-and-row id."""
    name = file_name(uri)
    given = ids.take(pa.array(offsets)).to_pylist()
    fallback = row_ids(uri, first_row, offsets).to_pylist()
    duplicate = [" duplicate id " in p for p in problems]
    # A duplicate's id belongs to the row that keeps it; the refused row is recorded under its file-and-row id.
    chosen = [f if d or g is None else g for g, f, d in zip(given, fallback, duplicate, strict=True)]
    return pa.table({
        "prompt_id": pa.array([c for c in chosen for _ in range(per_prompt)], type=pa.string()),
        "image_index": pa.array([i for _ in chosen for i in range(per_prompt)], type=pa.int32()),
        "source": pa.array([f"{name}#{first_row + int(o)}" for o in offsets for _ in range(per_prompt)]),
        "error": pa.array([INPUT_ERROR_PREFIX + p for p in problems for _ in range(per_prompt)]),
    }, schema=BAD_SCHEMA)
