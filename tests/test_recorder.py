"""The recorder's rules (jobs.recorder), pinned by counts and order: how many rows may wait unstored, what a flush,
a discard and a failed part do. Parts go to a real local output; a gate holds its writes where a test needs the
store to be slow."""

import threading

import pyarrow as pa
import pytest

from wurstfabrik.jobs.recorder import Recorder
from wurstfabrik.store.local_output import LocalOutput
from wurstfabrik.store.manifest import MANIFEST_SCHEMA, part_keys, read_manifest, rows_table
from wurstfabrik.store.storage import StorageError


class GatedOutput(LocalOutput):
    """A local output whose manifest parts wait for the gate; `broken` makes them fail as a store past its
    retries does."""

    def __init__(self, root):
        super().__init__(root)
        self.gate = threading.Event()
        self.waiting = threading.Semaphore(0)  # released once per part that reached the gate
        self.broken = False

    def put(self, key, data, content_type=None):
        if key.startswith("manifest/part-"):
            self.waiting.release()
            self.gate.wait()
            if self.broken:
                raise StorageError(f"{key}: the store is away")
        return super().put(key, data, content_type)


def rows(first: int, n: int) -> pa.Table:
    return rows_table([{"job_id": "j", "prompt_id": f"p{i:05d}", "image_index": 0, "prompt": "x", "params": "{}",
                        "status": "failed", "error": "input: test row"}
                       for i in range(first, first + n)]).cast(MANIFEST_SCHEMA)


def stored_ids(output) -> list[str]:
    return sorted(read_manifest(output, ["prompt_id"]).column("prompt_id").to_pylist())


def test_every_row_handed_over_is_stored_once_by_the_flush(tmp_path):
    output = LocalOutput(tmp_path)
    recorder = Recorder(output, max_rows=64, group_s=0)
    for batch in range(40):
        recorder.add(rows(batch * 8, 8))
    recorder.flush()
    assert recorder.unstored == 0 and recorder.rows == 320
    assert stored_ids(output) == [f"p{i:05d}" for i in range(320)]
    assert len(part_keys(output)) == recorder.parts <= 40
    recorder.close()


def test_a_slow_store_holds_the_loop_only_once_the_bound_is_reached(tmp_path):
    output = GatedOutput(tmp_path)
    recorder = Recorder(output, max_rows=32, threads=2, group_s=0)
    recorder.add(rows(0, 8))
    output.waiting.acquire()  # the first thread holds it at the gate
    recorder.add(rows(8, 8))
    output.waiting.acquire()  # and the second this one
    for batch in range(2, 4):  # 32 rows: the bound, each batch handed over at once though no part is stored
        recorder.add(rows(batch * 8, 8))
    assert recorder.unstored == 32 and recorder.parts == 0
    more = threading.Thread(target=recorder.add, args=(rows(32, 8),))
    more.start()
    more.join(timeout=0.5)
    assert more.is_alive(), "a hand-over past the bound must wait for the store"
    assert recorder.unstored == 32
    output.gate.set()
    more.join(timeout=30)
    assert not more.is_alive()
    recorder.flush()
    assert stored_ids(output) == [f"p{i:05d}" for i in range(40)]
    # The threads took what was queued when they got to it: fewer parts than batches.
    assert recorder.parts < 5
    recorder.close()


def test_a_batch_larger_than_the_bound_still_goes_alone(tmp_path):
    output = LocalOutput(tmp_path)
    recorder = Recorder(output, max_rows=8, group_s=0)
    recorder.add(rows(0, 20))
    recorder.add(rows(20, 4))
    recorder.flush()
    assert stored_ids(output) == [f"p{i:05d}" for i in range(24)]
    recorder.close()


def test_a_part_that_cannot_be_stored_stops_the_recording_and_surfaces_in_the_loop(tmp_path):
    output = GatedOutput(tmp_path)
    output.broken = True
    recorder = Recorder(output, max_rows=64, threads=1, group_s=0)
    recorder.add(rows(0, 8))
    output.waiting.acquire()  # the thread holds the first part
    recorder.add(rows(8, 8))  # queued behind it
    output.gate.set()
    with pytest.raises(StorageError, match="the store is away"):
        recorder.flush()
    assert recorder.failed and recorder.unstored == 0 and recorder.parts == 0
    with pytest.raises(StorageError, match="the store is away"):
        recorder.add(rows(16, 8))
    recorder.close()
    assert part_keys(output) == []


def test_a_discard_drops_what_no_thread_has_taken(tmp_path):
    output = GatedOutput(tmp_path)
    recorder = Recorder(output, max_rows=64, threads=1, group_s=0)
    recorder.add(rows(0, 8))
    output.waiting.acquire()  # the first part is being stored
    recorder.add(rows(8, 8))
    recorder.add(rows(16, 8))
    assert recorder.discard() == 16
    output.gate.set()
    recorder.flush()
    recorder.close()
    assert stored_ids(output) == [f"p{i:05d}" for i in range(8)]


def test_while_the_queue_is_short_a_thread_groups_what_arrives_into_one_part(tmp_path):
    output = LocalOutput(tmp_path)
    recorder = Recorder(output, max_rows=4096, threads=1, group_s=3600)
    recorder.add(rows(0, 8))
    recorder.flush()  # a flush cuts the rest short
    assert recorder.parts == 1
    for batch in range(1, 30):  # the thread rests: these wait, in order, for the next flush
        recorder.add(rows(batch * 8, 8))
    assert recorder.parts == 1 and recorder.unstored == 29 * 8
    recorder.flush()
    assert recorder.parts == 2
    assert stored_ids(output) == [f"p{i:05d}" for i in range(240)]
    recorder.close()
