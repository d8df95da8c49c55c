"""Tests for jobs.manifest against a minimal local-folder Output."""

import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import (
    MANIFEST_PREFIX,
    MANIFEST_SCHEMA,
    PARAMS_KEY,
    SUMMARY_KEY,
    ManifestError,
    compact,
    latest_status,
    read_job_params,
    read_manifest,
    summarize,
    write_job_params,
    write_part,
    write_summary,
)

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


class FolderOutput:
    """Just enough of the Output interface over a local folder; keys are relative to the root."""

    def __init__(self, root: Path):
        self.root = root

    def put(self, key, data, content_type=None):
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.uri(key)

    def get(self, key):
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def list(self, prefix=""):
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix))

    def exists(self, key):
        return (self.root / key).is_file()

    def delete(self, key):
        (self.root / key).unlink(missing_ok=True)

    def uri(self, key):
        return (self.root / key).as_uri()


@pytest.fixture
def output(tmp_path):
    return FolderOutput(tmp_path / "out")


def ok_row(prompt_id="p-000001", index=0, minutes=0, **changes):
    row = {
        "job_id": "job-1",
        "prompt_id": prompt_id,
        "image_index": index,
        "prompt": "a sausage factory",
        "negative_prompt": "",
        "seed": 123,
        "width": 1024,
        "height": 1024,
        "params": {"prior_guidance_scale": 4.0, "decoder_steps": 12},
        "truncated": False,
        "uri": f"file:///out/images/ab/{prompt_id}_{index}.png",
        "bytes": 1000,
        "sha256": "0" * 64,
        "status": "ok",
        "error": None,
        "prior_s": 1.0,
        "decoder_s": 2.0,
        "write_s": 0.5,
        "finished_at": T0 + timedelta(minutes=minutes),
    }
    row.update(changes)
    return row


def failed_row(prompt_id="p-000001", index=0, minutes=0, **changes):
    row = {
        "job_id": "job-1",
        "prompt_id": prompt_id,
        "image_index": index,
        "params": "{}",
        "status": "failed",
        "error": "CUDA out of memory",
        "finished_at": T0 + timedelta(minutes=minutes),
    }
    row.update(changes)
    return row


def test_empty_output_reads_as_empty_table(output):
    table = read_manifest(output)
    assert table.num_rows == 0
    assert table.schema == MANIFEST_SCHEMA


def test_parts_round_trip(output):
    first = write_part(output, [ok_row("a", 0), ok_row("a", 1)])
    second = write_part(output, [failed_row("b", 0, prompt="bad", seed=None)])
    assert first != second
    for key in (first, second):
        assert key.startswith(MANIFEST_PREFIX + "part-") and key.endswith(".parquet")
        assert output.exists(key)
    table = read_manifest(output)
    assert table.schema == MANIFEST_SCHEMA
    rows = sorted(table.to_pylist(), key=lambda r: (r["prompt_id"], r["image_index"]))
    assert [(r["prompt_id"], r["image_index"], r["status"]) for r in rows] == [
        ("a", 0, "ok"),
        ("a", 1, "ok"),
        ("b", 0, "failed"),
    ]
    assert rows[0]["finished_at"] == T0
    assert json.loads(rows[0]["params"]) == {"decoder_steps": 12, "prior_guidance_scale": 4.0}
    assert rows[2]["seed"] is None and rows[2]["uri"] is None and rows[2]["error"] == "CUDA out of memory"


def test_part_is_plain_parquet_with_the_schema(output):
    key = write_part(output, [ok_row()])
    table = pq.read_table(io.BytesIO(output.get(key)))
    assert table.schema.equals(MANIFEST_SCHEMA)


def test_missing_finished_at_means_now(output):
    row = ok_row()
    del row["finished_at"]
    before = datetime.now(timezone.utc)
    write_part(output, [row])
    (stored,) = read_manifest(output).to_pylist()
    assert before - timedelta(seconds=1) <= stored["finished_at"] <= datetime.now(timezone.utc)


def test_non_parquet_keys_are_ignored(output):
    write_part(output, [ok_row()])
    write_summary(output, {"images": 1})
    output.put(MANIFEST_PREFIX + "notes.txt", b"hello")
    output.put("images/ab/p_0.parquet", b"not a manifest part")
    assert read_manifest(output).num_rows == 1


def test_corrupt_part_is_named(output):
    output.put(MANIFEST_PREFIX + "part-broken.parquet", b"garbage")
    with pytest.raises(ManifestError, match="part-broken.parquet: not a readable Parquet file"):
        read_manifest(output)


def test_part_with_foreign_columns_is_named(output):
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}), sink)
    output.put(MANIFEST_PREFIX + "part-foreign.parquet", sink.getvalue())
    with pytest.raises(ManifestError, match="part-foreign.parquet: missing manifest column"):
        read_manifest(output)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (ok_row(status="done"), "status must be one of ok, failed"),
        (ok_row(uri=None), "uri is required when status is 'ok'"),
        (ok_row(prior_s=None), "prior_s is required when status is 'ok'"),
        (failed_row(error=None), "error is required when status is 'failed'"),
        (ok_row(job_id=None), "job_id is required"),
        (ok_row(colour="red"), "unknown column(s) colour"),
        (ok_row(finished_at=datetime(2025, 1, 1)), "finished_at must be timezone-aware"),
        (ok_row(seed="abc"), "manifest column seed"),
        (ok_row(width=2**40), "manifest column width"),
    ],
)
def test_bad_rows_are_refused(output, row, expected):
    with pytest.raises(ManifestError) as caught:
        write_part(output, [ok_row("first"), row])
    assert expected in str(caught.value)
    assert output.list(MANIFEST_PREFIX) == []


def test_row_error_names_the_row(output):
    with pytest.raises(ManifestError, match=r"manifest row 1 \('p-000001', image 0\)"):
        write_part(output, [ok_row("x"), ok_row(status="nope")])


def test_empty_part_is_refused(output):
    with pytest.raises(ManifestError, match="no rows"):
        write_part(output, [])


def test_latest_status_later_ok_beats_failed(output):
    write_part(output, [failed_row("a", minutes=0)])
    write_part(output, [ok_row("a", minutes=5)])
    final = latest_status(read_manifest(output))
    assert final[("a", 0)]["status"] == "ok"


def test_latest_status_ok_beats_later_failed(output):
    write_part(output, [ok_row("a", minutes=0)])
    write_part(output, [failed_row("a", minutes=5)])
    assert latest_status(read_manifest(output))[("a", 0)]["status"] == "ok"


def test_latest_status_latest_among_equals_wins(output):
    write_part(output, [ok_row("a", minutes=9, uri="file:///new.png")])
    write_part(output, [ok_row("a", minutes=1, uri="file:///old.png")])
    write_part(output, [failed_row("b", minutes=3, error="late"), failed_row("b", minutes=2, error="early")])
    final = latest_status(read_manifest(output))
    assert final[("a", 0)]["uri"] == "file:///new.png"
    assert final[("b", 0)]["error"] == "late"


def test_latest_status_tie_goes_to_later_row():
    rows = [ok_row("a", uri="file:///first.png"), ok_row("a", uri="file:///second.png")]
    table = pa.Table.from_pylist(
        [dict(r, params=json.dumps(r["params"])) for r in rows], schema=MANIFEST_SCHEMA
    )
    assert latest_status(table)[("a", 0)]["uri"] == "file:///second.png"


def test_latest_status_keys_by_prompt_and_index(output):
    write_part(output, [ok_row("a", 0), ok_row("a", 1), failed_row("b", 0)])
    final = latest_status(read_manifest(output))
    assert set(final) == {("a", 0), ("a", 1), ("b", 0)}


def test_summarize_counts_final_states(output):
    write_part(output, [ok_row("a", 0), failed_row("b", 0), failed_row("c", 0)])
    write_part(output, [ok_row("b", 0, minutes=1, prior_s=3.0, decoder_s=4.0, write_s=1.5)])
    summary = summarize(read_manifest(output), elapsed_s=4.0)
    assert summary["images"] == 3
    assert summary["rows"] == 4
    assert summary["status"] == {"ok": 2, "failed": 1}
    assert summary["images_per_s"] == 0.5
    assert summary["mean_s"] == {"prior": 2.0, "decoder": 3.0, "write": 1.0}


def test_summarize_empty_manifest(output):
    summary = summarize(read_manifest(output))
    assert summary["images"] == 0
    assert summary["status"] == {"ok": 0, "failed": 0}
    assert summary["images_per_s"] is None
    assert summary["mean_s"] == {"prior": None, "decoder": None, "write": None}


def test_summarize_zero_elapsed_has_no_rate(output):
    write_part(output, [ok_row()])
    assert summarize(read_manifest(output), elapsed_s=0)["images_per_s"] is None


def test_summary_is_written_as_json(output):
    write_part(output, [ok_row()])
    summary = summarize(read_manifest(output), elapsed_s=2.0)
    uri = write_summary(output, summary)
    assert uri == output.uri(SUMMARY_KEY)
    assert json.loads(output.get(SUMMARY_KEY)) == summary


def test_job_params_round_trip(output):
    assert read_job_params(output) is None
    params = {"seed": 0, "prior_timesteps": [1.0, 0.5, 0.0], "dtype": None}
    uri = write_job_params(output, params)
    assert uri == output.uri(PARAMS_KEY)
    assert read_job_params(output) == params


def test_malformed_job_params_are_named(output):
    output.put(PARAMS_KEY, b"{not json")
    with pytest.raises(ManifestError, match="job.json: not valid JSON"):
        read_job_params(output)
    output.put(PARAMS_KEY, b"[1, 2]")
    with pytest.raises(ManifestError, match="job.json: expected a JSON object"):
        read_job_params(output)


def test_compact_merges_parts_and_keeps_rows(output):
    write_part(output, [ok_row("a")])
    write_part(output, [failed_row("b")])
    write_part(output, [ok_row("b", minutes=1)])
    before = latest_status(read_manifest(output))
    merged = compact(output)
    parts = [k for k in output.list(MANIFEST_PREFIX) if k.endswith(".parquet")]
    assert parts == [merged]
    table = read_manifest(output)
    assert table.num_rows == 3
    assert latest_status(table) == before


def test_compact_with_one_part_does_nothing(output):
    key = write_part(output, [ok_row()])
    assert compact(output) is None
    assert output.list(MANIFEST_PREFIX) == [key]


def test_compacting_small_parts_leaves_merged_parts_alone(output):
    write_part(output, [ok_row("a")])
    write_part(output, [ok_row("b")])
    first = compact(output, small_only=True)
    write_part(output, [ok_row("c")])
    assert compact(output, small_only=True) is None  # one small part and one merged part: nothing to do
    write_part(output, [failed_row("d")])
    second = compact(output, small_only=True)
    parts = sorted(k for k in output.list(MANIFEST_PREFIX) if k.endswith(".parquet"))
    assert parts == sorted([first, second])
    final = compact(output)
    assert [k for k in output.list(MANIFEST_PREFIX) if k.endswith(".parquet")] == [final]
    assert sorted(k[0] for k in latest_status(read_manifest(output))) == ["a", "b", "c", "d"]
