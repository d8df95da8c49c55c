"""The prompt files a job reads: which columns it needs, their ids and the problems of their rows, computed a row
group at a time with Arrow compute, so that planning ten million prompts never holds them as Python objects.

The planner (jobs.plan) and the reader stage (workers.reader_stage) both use these, so they agree on every id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .ids import MAX_ID_LENGTH, SEED_LIMIT, InputError, explicit_seed, image_seed, row_id, sanitize_id
from .storage import S3Settings, open_input

MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; a prompt far longer than that is a wrong column, not a prompt
MAX_SIDE = 4096
# An id that sanitize_id passes through unchanged; anything else goes through sanitize_id itself.
_CLEAN_ID = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$"


@dataclass(frozen=True)
class Columns:
    """The input columns of a spec by role; None where the spec names none."""

    prompt: str
    id: str | None = None
    negative_prompt: str | None = None
    seed: str | None = None
    height: str | None = None
    width: str | None = None

    @classmethod
    def of(cls, spec) -> Columns:
        return cls(spec.prompt_column, spec.id_column, spec.negative_prompt_column, spec.seed_column,
                   spec.height_column, spec.width_column)

    def types(self) -> dict[str, Callable[[pa.DataType], bool]]:
        """Each column read, with the check its Arrow type must pass."""
        roles = [(self.prompt, _is_text), (self.id, lambda t: _is_text(t) or pa.types.is_integer(t)),
                 (self.negative_prompt, _is_text), (self.seed, pa.types.is_integer),
                 (self.height, pa.types.is_integer), (self.width, pa.types.is_integer)]
        return {column: accepts for column, accepts in roles if column is not None}

    def names(self) -> list[str]:
        return list(self.types())


@dataclass(frozen=True)
class ReadUnit:
    uri: str  # the Parquet file
    row_group: int
    first_row: int  # row number in the file of the unit's first row
    start: int  # the unit's rows within the row group: [start, stop)
    stop: int
    # row offset × images_per_prompt + image index of the images to generate, as int32 bytes; None: all of them
    pending: bytes | None = None

    def offsets(self, images_per_prompt: int) -> np.ndarray:
        if self.pending is None:
            return np.arange((self.stop - self.start) * images_per_prompt, dtype=np.int32)
        return np.frombuffer(self.pending, dtype=np.int32)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def file_name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def check_columns(columns: Columns, uri: str, schema: pa.Schema) -> None:
    for column, accepts in columns.types().items():
        if column not in schema.names:
            raise InputError(f"{uri}: no column {column!r} (columns: {', '.join(schema.names)})")
        if not accepts(schema.field(column).type):
            raise InputError(f"{uri}: column {column!r} has type {schema.field(column).type}, which cannot be used")


def open_parquet(uri: str, settings: S3Settings | None = None) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(open_input(uri, settings))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{uri}: not a readable Parquet file ({e})") from None


def read_row_group(uri: str, row_group: int, columns: list[str], settings: S3Settings | None = None) -> pa.Table:
    parquet = open_parquet(uri, settings)
    try:
        return parquet.read_row_group(row_group, columns=columns)
    finally:
        parquet.close()


def prompt_ids(columns: Columns, uri: str, first_row: int, table: pa.Table) -> pa.Array:
    """The sanitized prompt id of every row (null where the id column is null or empty)."""
    if columns.id is None:
        return row_ids(uri, first_row, np.arange(table.num_rows))
    raw = table.column(columns.id).combine_chunks()
    if not _is_text(raw.type):
        raw = pc.cast(raw, pa.string())
    raw = pc.if_else(pc.equal(raw, ""), pa.scalar(None, pa.string()), raw)
    clean = pc.and_(pc.match_substring_regex(raw, _CLEAN_ID), pc.less_equal(pc.utf8_length(raw), MAX_ID_LENGTH))
    unclean = np.flatnonzero(~pc.fill_null(clean, True).to_numpy(zero_copy_only=False))
    if len(unclean) == 0:
        return raw
    values = raw.to_pylist()  # rare: only ids that need cleaning go through Python
    for i in unclean:
        values[i] = sanitize_id(values[i])
    return pa.array(values, type=pa.string())


def row_ids(uri: str, first_row: int, offsets: np.ndarray) -> pa.Array:
    """store.ids.row_id of the rows at `offsets` from `first_row`, computed for all of them at once."""
    stem = row_id(file_name(uri), 0).rsplit("-", 1)[0]
    numbers = pc.cast(pa.array(np.asarray(offsets, dtype=np.int64) + first_row), pa.string())
    return pc.binary_join_element_wise(stem, pc.utf8_lpad(numbers, 6, "0"), "-")


def row_problems(columns: Columns, uri: str, first_row: int, table: pa.Table, defaults: tuple[int, int],
                 check_size: Callable[[int, int], str | None],
                 check_prompt: Callable[[str], str | None] | None = None) -> dict[int, str]:
    """The rows of a row group that cannot be generated, by offset in the group, each with a one-line reason
    naming file, row and column."""
    problems = row_reasons(columns, table, defaults, check_size, check_prompt)
    return {i: f"{uri} row {first_row + i}: {reason}" for i, reason in problems.items()}


def row_reasons(columns: Columns, table: pa.Table, defaults: tuple[int, int],
                check_size: Callable[[int, int], str | None],
                check_prompt: Callable[[str], str | None] | None = None) -> dict[int, str]:
    """The rows of a table that cannot be generated, by offset, each with a one-line reason naming the column."""
    n = table.num_rows
    masks: list[tuple[pa.Array, Callable[[int], str]]] = []
    prompt = table.column(columns.prompt)
    name = columns.prompt
    masks.append((pc.is_null(prompt), lambda i: f"{name} is null"))
    masks.append((pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(prompt)), 0), lambda i: f"{name} is empty"))
    lengths = pc.utf8_length(prompt)
    masks.append((pc.greater(lengths, MAX_PROMPT_CHARS),
                  lambda i: f"{name} has {lengths[i].as_py()} characters, more than {MAX_PROMPT_CHARS}; is "
                            f"{name!r} the prompt column?"))
    if columns.id is not None:
        ids = table.column(columns.id)
        empty = pc.equal(pc.cast(ids, pa.string()), "") if not pa.types.is_integer(ids.type) else None
        missing = pc.is_null(ids) if empty is None else pc.or_kleene(pc.is_null(ids), empty)
        masks.append((missing, lambda i: f"id {columns.id} is null or empty"))
        if pa.types.is_integer(ids.type):
            masks.append((pc.less(ids, 0), lambda i: f"id {columns.id} is negative"))
    heights, widths = requested_sizes(columns, table, defaults)
    size_problem = _size_problems(heights, widths, check_size)
    masks.append((pa.array(size_problem != None), lambda i: size_problem[i]))  # noqa: E711 - elementwise
    if columns.seed is not None:
        seeds = table.column(columns.seed)
        out_of_range = pc.less(seeds, 0)
        if pa.types.is_unsigned_integer(seeds.type):
            out_of_range = pc.greater_equal(seeds, pa.scalar(SEED_LIMIT, pa.uint64()))
        masks.append((out_of_range, lambda i: f"seed: must be in [0, 2**63) (got {seeds[i].as_py()})"))
    problems: dict[int, str] = {}
    for mask, describe in masks:
        for i in np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False)):
            problems.setdefault(int(i), describe(int(i)))
    if check_prompt is not None:
        for i, text in enumerate(prompt.to_pylist()):
            if i not in problems and text is not None:
                reason = check_prompt(text)
                if reason:
                    problems[i] = f"{name}: {reason}"
    if len(problems) > n:
        raise AssertionError("more problems than rows")
    return dict(sorted(problems.items()))


def requested_sizes(columns: Columns, table: pa.Table, defaults: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Requested height and width of every row: its own where the row has one, else the spec's."""
    sides = []
    for column, default in ((columns.height, defaults[0]), (columns.width, defaults[1])):
        if column is None:
            sides.append(np.full(table.num_rows, default, dtype=np.int64))
        else:
            values = pc.fill_null(pc.cast(table.column(column), pa.int64()), default)
            sides.append(values.to_numpy(zero_copy_only=False).astype(np.int64))
    return sides[0], sides[1]


def size_keys(heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """One int32 per row that is equal for rows of equal requested size and orders sizes by height, then width
    (sides outside 1..MAX_SIDE belong to bad rows, which are never planned: they are clipped only to fit)."""
    return (np.clip(heights, 0, MAX_SIDE) * (MAX_SIDE + 1) + np.clip(widths, 0, MAX_SIDE)).astype(np.int32)


def _size_problems(heights: np.ndarray, widths: np.ndarray, check_size) -> np.ndarray:
    """Each row's size problem or None; each distinct size is checked once."""
    problems = np.full(len(heights), None, dtype=object)
    for height, width in {(int(h), int(w)) for h, w in zip(heights, widths, strict=True)}:
        if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
            reason = f"height/width {height}×{width} is outside 1..{MAX_SIDE}"
        else:
            reason = check_size(height, width)
        if reason:
            problems[(heights == height) & (widths == width)] = reason
    return problems


def image_rows(spec, uri: str, first_row: int, table: pa.Table, offsets: np.ndarray) -> list[dict]:
    """The image rows for `offsets` (row offset in the table × images_per_prompt + image index), ready for the
    stages: id, prompt, negative prompt, seed, requested size and source. The planner validated these rows."""
    columns = Columns.of(spec)
    per_prompt = spec.images_per_prompt
    rows = sorted({int(o) // per_prompt for o in offsets})
    picked = table.take(pa.array(rows, type=pa.int64()))
    ids = prompt_ids(columns, uri, first_row, table).take(pa.array(rows, type=pa.int64())).to_pylist()
    prompts = picked.column(columns.prompt).to_pylist()
    negatives = picked.column(columns.negative_prompt).to_pylist() if columns.negative_prompt else [None] * len(rows)
    seeds = picked.column(columns.seed).to_pylist() if columns.seed else [None] * len(rows)
    heights, widths = requested_sizes(columns, picked, (spec.height, spec.width))
    position = {row: i for i, row in enumerate(rows)}
    name = file_name(uri)
    images = []
    for offset in offsets:
        row, index = divmod(int(offset), per_prompt)
        i = position[row]
        seed = explicit_seed(seeds[i], index) if seeds[i] is not None else image_seed(spec.seed, ids[i], index)
        images.append({
            "prompt_id": ids[i], "image_index": index, "prompt": prompts[i],
            "negative_prompt": negatives[i] if negatives[i] is not None else spec.negative_prompt, "seed": seed,
            "height": int(heights[i]), "width": int(widths[i]), "source": f"{name}#{first_row + row}",
        })
    return images


def unit_images(spec, unit: ReadUnit, settings: S3Settings | None = None) -> list[dict]:
    """The image rows of one read unit that are still to be generated, neighbours of one size together."""
    table = read_row_group(unit.uri, unit.row_group, Columns.of(spec).names(), settings)
    table = table.slice(unit.start, unit.stop - unit.start)
    images = image_rows(spec, unit.uri, unit.first_row, table, unit.offsets(spec.images_per_prompt))
    # Neighbours of one size fill model batches that need no splitting by size.
    return sorted(images, key=lambda image: (image["height"], image["width"]))
