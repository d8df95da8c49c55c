"""The driver's manifest recorder: writer batches gathered into one part while they come fast, each stored as it
comes while they come slowly, and nothing left behind by a flush."""

from test_manifest import ok_row

from jobs.recorder import ManifestRecorder
from store.manifest import MANIFEST_PREFIX, read_manifest, rows_table
from store.storage import LocalOutput


def batch(first: int, n: int):
    return rows_table([ok_row(f"p-{i:06d}") for i in range(first, first + n)])


def parts(output) -> list[str]:
    return output.list(MANIFEST_PREFIX)


def test_fast_batches_gather_into_one_part_until_enough_rows(tmp_path):
    output = LocalOutput(tmp_path)
    recorder = ManifestRecorder(output, every_s=3600, max_rows=10)
    recorder.add(batch(0, 4))
    recorder.add(batch(4, 4))
    assert parts(output) == []  # neither enough rows nor time yet
    recorder.add(batch(8, 4))
    assert len(parts(output)) == 1 and recorder.rows == 0
    recorder.add(batch(12, 3))
    recorder.flush()
    assert len(parts(output)) == 2
    ids = read_manifest(output, ["prompt_id"]).column("prompt_id").to_pylist()
    assert sorted(ids) == [f"p-{i:06d}" for i in range(15)]
    recorder.flush()  # nothing pending: no empty part
    assert len(parts(output)) == 2


def test_slow_batches_are_stored_as_they_come(tmp_path):
    output = LocalOutput(tmp_path)
    recorder = ManifestRecorder(output, every_s=0, max_rows=10_000)
    for first in range(0, 6, 2):
        recorder.add(batch(first, 2))
        assert len(parts(output)) == first // 2 + 1
