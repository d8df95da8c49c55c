"""Ray Data batches as the stage adapters use them: error-free rows grouped by size, and columns from lists."""

from collections import defaultdict

import numpy as np


def group_rows(batch: dict[str, np.ndarray], key_columns: tuple[str, ...]) -> dict[tuple, list[int]]:
    """Indices of the rows without an error, grouped by the values of `key_columns`: a model batch never
    mixes shapes. Errors are strings, "" for none (a column of Nones would not survive Arrow as strings)."""
    groups = defaultdict(list)
    for i, error in enumerate(batch["error"]):
        if not error:
            groups[tuple(int(batch[c][i]) for c in key_columns)].append(i)
    return dict(groups)


def model_batches(batch: dict[str, np.ndarray], size: int) -> list[tuple[tuple[int, int], list[int]]]:
    """The error-free rows of a block as model batches: one (height, width) each, at most `size` rows. A block may
    hold several GPU batches (jobs.stage_chain.block_rows), and a batch never grows past the placement's size."""
    return [(shape, rows[start:start + size])
            for shape, rows in group_rows(batch, ("height", "width")).items()
            for start in range(0, len(rows), size)]


def column(values: list, dtype=None) -> np.ndarray:
    """A batch column from a list, kept one-dimensional even when its items are sequences."""
    if dtype is not None:
        return np.asarray(values, dtype=dtype)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
