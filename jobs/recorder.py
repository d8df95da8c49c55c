"""Recording a run's manifest rows off the driver's loop: the loop hands each writer batch's rows to a Recorder and
takes the next batch at once; a few storing threads write them as manifest parts.

The rules, which the tests drive by counts and order:
- At most `max_rows` rows are handed over and not yet stored. A hand-over that would pass that waits until the
  storing threads have made room (a single batch larger than the bound still goes, alone). So a kill -9 of the
  driver loses at most `max_rows` records: those images are made again by the next run, their files rewritten
  and their shards removed as orphans at its start (jobs.driver._remove_orphan_shards).
- A storing thread takes everything queued when it gets to it (up to `max_rows` rows) and stores it as one part,
  then rests `group_s` before it takes more, unless half the bound is queued or a flush or close waits: so a
  thread stores about one part per `group_s` (two threads: ~170,000 parts a day at most, not one per batch), and
  a fast run never waits for the rest.
- `flush()` returns once every row handed over is stored. The driver flushes at the end of the dataflow and on a
  stop by signal or stall (the images are written; recording them spares the next run remaking them), before it
  looks for orphan shards, so a shard recorded late is never taken for an orphan.
- `discard()` drops what is not stored yet (a lost lease: the output is another run's now).
- A part that cannot be stored (the store's retries ran out) stops the recording: nothing more is stored, and the
  next `add` or `flush` raises that StorageError in the driver's loop, the exit a synchronous write had.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import pyarrow as pa

from wurstfabrik.store.manifest import store_part
from wurstfabrik.store.storage import StorageError

# Unstored rows the driver may hold: what a kill -9 can lose. At 1,000 images/s that is about 4 s of records.
MAX_UNSTORED_ROWS = 4096
STORING_THREADS = 2
GROUP_S = 1.0  # a storing thread's rest between parts while the queue is short


class Recorder:
    """Manifest parts stored by `threads` threads from a bounded queue of rows."""

    def __init__(self, output, max_rows: int = MAX_UNSTORED_ROWS, threads: int = STORING_THREADS,
                 group_s: float = GROUP_S, store: Callable[[object, pa.Table], str] = store_part):
        self.output, self.max_rows, self.group_s, self._store = output, max_rows, group_s, store
        self._queue: deque[pa.Table] = deque()
        self._changed = threading.Condition()
        self._unstored = 0  # rows handed over and not stored yet (queued or being stored)
        self._error: StorageError | None = None
        self._closing = False
        self._flushing = 0  # flush calls waiting
        self.parts = 0  # parts stored
        self.rows = 0  # rows stored
        self.cpu_s = 0.0  # the storing threads' CPU seconds
        self._threads = [threading.Thread(target=self._run, name=f"wurstfabrik-recorder-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def unstored(self) -> int:
        with self._changed:
            return self._unstored

    @property
    def failed(self) -> bool:
        """Whether a part could not be stored (the recording has stopped)."""
        with self._changed:
            return self._error is not None

    def add(self, rows: pa.Table) -> None:
        """Queues the rows; waits only while the queue holds `max_rows` unstored rows. Raises StorageError if a
        part could not be stored."""
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or self._unstored == 0
                                   or self._unstored + rows.num_rows <= self.max_rows)
            self._raise_error()
            if self._closing:
                raise RuntimeError("the recorder is closed")
            self._queue.append(rows)
            self._unstored += rows.num_rows
            self._changed.notify_all()

    def flush(self) -> None:
        """Waits until every row handed over is stored; raises StorageError if a part could not be."""
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
            try:
                self._changed.wait_for(lambda: self._error is not None or self._unstored == 0)
            finally:
                self._flushing -= 1
            self._raise_error()

    def discard(self) -> int:
        """Drops the queued rows that no thread has taken yet and returns their number; parts being stored finish."""
        with self._changed:
            dropped = sum(t.num_rows for t in self._queue)
            self._queue.clear()
            self._unstored -= dropped
            self._changed.notify_all()
        return dropped

    def close(self) -> None:
        """Ends the storing threads once they have stored what they hold (call flush or discard first)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _hurried(self) -> bool:
        return (self._closing or self._error is not None or (self._flushing > 0 and self._unstored > 0)
                or self._unstored >= self.max_rows // 2)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closing or self._error is not None)
                if self._error is not None or (self._closing and not self._queue):
                    return
                taken = [self._queue.popleft()]
                count = taken[0].num_rows
                while self._queue and count + self._queue[0].num_rows <= self.max_rows:
                    count += self._queue[0].num_rows
                    taken.append(self._queue.popleft())
            started = time.thread_time()
            try:
                self._store(self.output, pa.concat_tables(taken) if len(taken) > 1 else taken[0])
            except BaseException as e:  # noqa: BLE001 - a bug must not leave the driver waiting forever either
                error = e if isinstance(e, StorageError) else StorageError(
                    f"could not store a manifest part: {type(e).__name__}: {e}")
                with self._changed:
                    # What is queued is not stored either: the run stops with this error, and the next run makes
                    # those images again, as after a kill.
                    self._error = error
                    self._unstored -= count + sum(t.num_rows for t in self._queue)
                    self._queue.clear()
                    self._changed.notify_all()
                return
            with self._changed:
                self.cpu_s += time.thread_time() - started
                self._unstored -= count
                self.parts += 1
                self.rows += count
                self._changed.notify_all()
                if self.group_s > 0:
                    self._changed.wait_for(self._hurried, timeout=self.group_s)
