"""The driver's side of the manifest while a job runs: the writers' rows, gathered briefly and stored as one part.

Writers store images; only the driver records them (workers.writer_stage says why). Recording each writer batch as
its own part would make the driver one PUT per batch, one after another, which a fleet of GPUs filling small batches
can outrun; gathering for up to a second costs at most that second's images on a kill (a rerun makes them again)."""

from __future__ import annotations

import time

import pyarrow as pa

from store.manifest import store_part
from store.storage import Output

RECORD_EVERY_S = 1.0
RECORD_ROWS = 2048


class ManifestRecorder:
    """Stores rows handed to `add` as a manifest part once `max_rows` have gathered or `every_s` has passed since
    the last part; `flush` stores what is left. Sparse batches are still stored as they come."""

    def __init__(self, output: Output, every_s: float = RECORD_EVERY_S, max_rows: int = RECORD_ROWS):
        self.output, self.every_s, self.max_rows = output, every_s, max_rows
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.last = time.monotonic()

    def add(self, rows: pa.Table) -> None:
        self.pending.append(rows)
        self.rows += rows.num_rows
        if self.rows >= self.max_rows or time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            store_part(self.output, pa.concat_tables(self.pending))
            self.pending, self.rows = [], 0
        self.last = time.monotonic()
