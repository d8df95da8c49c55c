"""A user's Ray Dataset in and out of the stages (for `wurstfabrik.generate`): their rows become image rows as the
job's reader makes them (id, prompt, negative prompt, seed, size, and an error for a row that cannot be
generated), and the stages' rows become theirs again with the image and what made it. Columns of theirs that the
stages would overwrite are kept aside and put back."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from wurstfabrik.store.ids import explicit_seed, image_seed
from wurstfabrik.store.manifest import INPUT_ERROR_PREFIX
from wurstfabrik.store.prompts import Columns, check_columns, requested_sizes, row_reasons, size_keys

from .batches import column
from .metrics import MetricLabels, images_recorded

# What the stages read and add, and are dropped again: a user's own column of one of these names is kept aside.
STAGE_COLUMNS = ("prompt_id", "prompt", "negative_prompt", "source", "image_size", "generated_size", "data", "bytes",
                 "prior_node", "decoder_node", "latent", "latent_shape", "pixels")
# What generate adds to every row (replacing a user's column of the same name).
OUTPUT_COLUMNS = ("image", "image_index", "seed", "height", "width", "generated_height", "generated_width", "sha256",
                  "truncated", "error", "prior_s", "decoder_s", "encode_s", "provenance")
ASIDE = "__wurstfabrik_user_"  # prefix of a user's column kept aside while the stages run


def image_rows(batch: pa.Table, spec, check_size: Callable[[int, int], str | None],
               check_prompt: Callable[[str], str | None] | None) -> pa.Table:
    """Each row `spec.images_per_prompt` times, with the stages' input columns: seeds from the seed column, or
    derived from the job seed and the row's id (its prompt when there is no id column), as the job derives them.
    A row that cannot be generated keeps its place with an `error` ("input: ..."), as the job records it."""
    columns = Columns.of(spec)
    check_columns(columns, "the Dataset", batch.schema)
    aside = {f"{ASIDE}{name}": batch.column(name) for name in STAGE_COLUMNS if name in batch.column_names}
    per_prompt = spec.images_per_prompt
    reasons = row_reasons(columns, batch, (spec.height, spec.width), check_size, check_prompt)
    heights, widths = requested_sizes(columns, batch, (spec.height, spec.width))
    prompts = batch.column(columns.prompt).to_pylist()
    ids = batch.column(columns.id).to_pylist() if columns.id else prompts
    seeds = batch.column(columns.seed).to_pylist() if columns.seed else [None] * batch.num_rows
    negatives = (batch.column(columns.negative_prompt).to_pylist() if columns.negative_prompt
                 else [None] * batch.num_rows)
    rows = np.repeat(np.arange(batch.num_rows), per_prompt)
    index = np.tile(np.arange(per_prompt), batch.num_rows)
    stage_input = {
        "prompt_id": [str(ids[r]) if ids[r] is not None else "" for r in rows],
        "image_index": index.astype(np.int32),
        "prompt": [prompts[r] or "" for r in rows],
        "negative_prompt": [negatives[r] if negatives[r] is not None else spec.negative_prompt for r in rows],
        "seed": [_seed(spec.seed, seeds[r], ids[r], int(i)) if r not in reasons else 0
                 for r, i in zip(rows, index, strict=True)],
        "height": heights[rows], "width": widths[rows],
        "error": [f"{INPUT_ERROR_PREFIX}{reasons[r]}" if r in reasons else "" for r in rows],
    }
    taken = pa.array(rows)
    kept = {name: batch.column(name) for name in batch.column_names
            if name not in stage_input and name not in STAGE_COLUMNS}
    table = pa.table({**{name: values.take(taken) for name, values in {**kept, **aside}.items()},
                      **{name: pa.array(values) for name, values in stage_input.items()}})
    # Neighbours of one size fill model batches that need no splitting by size (as the job's read units do).
    order = np.argsort(size_keys(heights[rows], widths[rows]), kind="stable")
    return table.take(pa.array(order))


def _seed(job_seed: int, seed: int | None, row_id, index: int) -> int:
    return explicit_seed(seed, index) if seed is not None else image_seed(job_seed, str(row_id), index)


def user_rows(batch: dict[str, np.ndarray], provenance: dict, labels: MetricLabels | None) -> dict[str, np.ndarray]:
    """The stages' rows as the user gets them: `image` (the encoded file, empty bytes where the row failed), the
    size made and delivered, `error` (None when the image was made) and `provenance` (JSON: checkpoints, sampler,
    version); the stages' own columns go, and the user's columns kept aside come back."""
    n = len(batch["prompt_id"])
    errors = [str(e) or None for e in batch["error"]]
    generated = [[int(v) for v in size] for size in batch["generated_size"]]
    out = {name: values for name, values in batch.items() if name not in STAGE_COLUMNS}
    out.update(
        image=column([bytes(d) if not e else b"" for d, e in zip(batch["data"], errors, strict=True)]),
        generated_height=column([g[0] or None for g in generated]),
        generated_width=column([g[1] or None for g in generated]),
        sha256=column([str(d) or None for d in batch["sha256"]]), error=column(errors),
        provenance=column([json.dumps(provenance, sort_keys=True)] * n),
    )
    for name in [k for k in out if k.startswith(ASIDE)]:
        out[name.removeprefix(ASIDE)] = out.pop(name)
    if labels is not None:
        failed = sum(e is not None for e in errors)
        images_recorded(labels, n - failed, failed)
    return out
