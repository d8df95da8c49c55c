"""Input planning: find the prompt files, validate every row before any work starts, and cut the work into
read units (one per Parquet row group) holding only the images that are not done yet."""

import fnmatch
import glob
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.geometry import Geometry

from .ids import InputError, explicit_seed, image_seed, row_id, sanitize_id
from .spec import MAX_SIDE, JobSpec
from .storage import StorageError, parquet_filesystem

MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; a prompt far longer than that is a wrong column, not a prompt
MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class ReadUnit:
    uri: str  # the Parquet file, as given to parquet_filesystem
    row_group: int
    first_row: int  # row number in the file of the group's first row
    done: tuple[int, ...] = ()  # row * images_per_prompt + image_index of images already generated


@dataclass
class Plan:
    units: list[ReadUnit] = field(default_factory=list)
    total_images: int = 0
    done_images: int = 0

    @property
    def pending_images(self) -> int:
        return self.total_images - self.done_images


def _glob_to_files(fs: pafs.FileSystem, base: str, pattern: str | None) -> list[str]:
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    files = [info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]
    if pattern is not None:
        return sorted(p for p in files if fnmatch.fnmatch(p, pattern))
    return sorted(p for p in files if p.endswith(".parquet"))


def list_input_files(prompts: str) -> list[str]:
    """The Parquet files of a spec's `prompts`: a file, a folder, a glob, or an s3:// prefix; as URIs."""
    try:
        fs, path = parquet_filesystem(prompts)
        scheme = "s3://" if prompts.startswith("s3://") else ""
        if any(c in path for c in "*?["):
            if scheme:
                base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
                files = _glob_to_files(fs, base, path)
            else:
                files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                files = [path]
            elif info.type == pafs.FileType.Directory or scheme:
                files = _glob_to_files(fs, path.rstrip("/"), None)
            else:
                raise InputError(f"prompts: {prompts} does not exist")
    except OSError as e:
        raise StorageError(f"prompts: cannot list {prompts} ({e})") from None
    if not files:
        raise InputError(f"prompts: no Parquet files found at {prompts}")
    return [scheme + f for f in files]


def _file_name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _column_types(spec: JobSpec) -> dict:
    """The input columns a spec reads, each with the check its Arrow type must pass."""
    roles = [(spec.prompt_column, _is_text), (spec.id_column, lambda t: _is_text(t) or pa.types.is_integer(t)),
             (spec.negative_prompt_column, _is_text), (spec.seed_column, pa.types.is_integer),
             (spec.height_column, pa.types.is_integer), (spec.width_column, pa.types.is_integer)]
    return {column: accepts for column, accepts in roles if column is not None}


def _columns(spec: JobSpec) -> list[str]:
    return list(_column_types(spec))


def _check_columns(spec: JobSpec, uri: str, schema: pa.Schema) -> None:
    for column, accepts in _column_types(spec).items():
        if column not in schema.names:
            raise InputError(f"{uri}: no column {column!r} (columns: {', '.join(schema.names)})")
        if not accepts(schema.field(column).type):
            raise InputError(f"{uri}: column {column!r} has type {schema.field(column).type}, which cannot be used")


def image_rows(spec: JobSpec, geometry: Geometry, uri: str, first_row: int, table: pa.Table):
    """The images of one row group: yields (row number, image index, image row or None, problem or None)."""
    data = {name: table.column(name).to_pylist() for name in _columns(spec)}
    file_name = _file_name(uri)
    for offset, prompt in enumerate(data[spec.prompt_column]):
        row = first_row + offset
        where = f"{uri} row {row}"
        try:
            if prompt is None:
                raise InputError(f"{where}: {spec.prompt_column} is null")
            if not prompt.strip():
                raise InputError(f"{where}: {spec.prompt_column} is empty")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise InputError(f"{where}: {spec.prompt_column} has {len(prompt)} characters, more than "
                                 f"{MAX_PROMPT_CHARS}; is {spec.prompt_column!r} the prompt column?")
            raw_id = data[spec.id_column][offset] if spec.id_column else None
            if spec.id_column and raw_id is None:
                raise InputError(f"{where}: {spec.id_column} is null")
            prompt_id = sanitize_id(raw_id) if spec.id_column else row_id(file_name, row)
            negative = data[spec.negative_prompt_column][offset] if spec.negative_prompt_column else None
            height = data[spec.height_column][offset] if spec.height_column else None
            width = data[spec.width_column][offset] if spec.width_column else None
            height, width = height or spec.height, width or spec.width
            try:
                if not 0 < height <= MAX_SIDE or not 0 < width <= MAX_SIDE:
                    raise ValueError(f"height/width {height}×{width} is outside 1..{MAX_SIDE}")
                geometry.check_size(height, width)
            except ValueError as e:
                raise InputError(f"{where}: {e}") from None
            row_seed = data[spec.seed_column][offset] if spec.seed_column else None
        except InputError as e:
            yield row, None, None, str(e).replace("id: ", f"{where}: id ")
            continue
        for index in range(spec.images_per_prompt):
            try:
                seed = explicit_seed(row_seed, index) if row_seed is not None else image_seed(spec.seed, prompt_id,
                                                                                               index)
            except InputError as e:
                yield row, index, None, f"{where}: {e}"
                continue
            yield row, index, {
                "prompt_id": prompt_id, "image_index": index, "prompt": prompt,
                "negative_prompt": negative if negative is not None else spec.negative_prompt,
                "seed": seed, "height": height, "width": width, "source": f"{file_name}#{row}",
            }, None


def read_row_group(uri: str, row_group: int, columns: list[str]) -> pa.Table:
    fs, path = parquet_filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_group(row_group, columns=columns)


def plan_job(spec: JobSpec, geometry: Geometry, done: set[tuple[str, int]]) -> Plan:
    """Validates every input row and returns the read units of the images not in `done`.

    All problems are collected (up to a limit) and raised together as one InputError, before any work."""
    files = list_input_files(spec.prompts)
    by_name: dict[str, str] = {}
    for uri in files:
        other = by_name.setdefault(_file_name(uri), uri)
        if other != uri and spec.id_column is None:
            raise InputError(f"prompts: {other} and {uri} have the same file name, so their row ids would "
                             f"collide; rename one or set id_column")
    plan = Plan()
    problems: list[str] = []
    seen: dict[str, str] = {}
    for uri in files:
        fs, path = parquet_filesystem(uri)
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                _check_columns(spec, uri, parquet.schema_arrow)
                first_row = 0
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group, columns=_columns(spec))
                    done_here = []
                    for row, index, image, problem in image_rows(spec, geometry, uri, first_row, table):
                        if problem is not None:
                            problems.append(problem)
                            continue
                        if index == 0:
                            where = seen.setdefault(image["prompt_id"], image["source"])
                            if where != image["source"]:
                                problems.append(f"{uri} row {row}: duplicate id {image['prompt_id']!r} "
                                                f"(also {where})")
                        plan.total_images += 1
                        if (image["prompt_id"], index) in done:
                            done_here.append(row * spec.images_per_prompt + index)
                    if len(done_here) < table.num_rows * spec.images_per_prompt:
                        plan.units.append(ReadUnit(uri, group, first_row, tuple(done_here)))
                    plan.done_images += len(done_here)
                    first_row += table.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{uri}: not a readable Parquet file ({e})") from None
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            break
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = "" if len(problems) <= len(shown) else f"\n... and more (first {len(shown)} shown)"
        raise InputError(f"{len(problems)} bad input row(s), nothing was generated:\n  " + "\n  ".join(shown) + more)
    return plan


def unit_images(spec: JobSpec, geometry: Geometry, unit: ReadUnit) -> list[dict]:
    """The image rows of one read unit that are still to be generated (the planner validated them)."""
    table = read_row_group(unit.uri, unit.row_group, _columns(spec))
    done = set(unit.done)
    images = [image for row, index, image, problem in image_rows(spec, geometry, unit.uri, unit.first_row, table)
              if problem is None and row * spec.images_per_prompt + index not in done]
    # Neighbours of one size fill model batches that need no splitting by size.
    return sorted(images, key=lambda image: (image["height"], image["width"]))
