"""Tests for store.manifest on a local folder output."""

import io
import json
import math
import random
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from wurstfabrik.store.manifest import (
    FANOUT,
    MANIFEST_PREFIX,
    MANIFEST_SCHEMA,
    PARAMS_KEY,
    SUMMARY_KEY,
    ManifestError,
    compact,
    final_rows,
    image_states,
    latest_status,
    part_keys,
    part_tier,
    read_job_params,
    read_manifest,
    store_part,
    summarize,
    write_job_params,
    write_part,
    write_summary,
)
from wurstfabrik.store.storage import LocalOutput

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def output(tmp_path):
    return LocalOutput(tmp_path / "out")


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


def test_image_states_and_summary_count_final_states(output):
    write_part(output, [ok_row("a", 0, run_id="r1"), failed_row("b", 0, run_id="r1"), failed_row("c", 0, run_id="r1"),
                        failed_row("c", 0, minutes=2, error="input: p.parquet row 3: prompt is null", run_id="r1")])
    write_part(output, [ok_row("b", 0, minutes=1, prior_s=3.0, decoder_s=4.0, write_s=1.5, run_id="r2")])
    write_part(output, [ok_row("z", 0, job_id="job-2")])
    states = image_states(output, "job-1")
    assert states.counts == {"ok": 2, "failed": 1} and states.bad_input == 1
    assert states.failed.to_pylist()[0]["error"].startswith("input: ")  # the latest failure of "c"
    run_rows = read_manifest(output, ["run_id", "status", "prior_s", "decoder_s", "write_s"], "job-1")
    summary = summarize(states, run_rows.filter(pc.equal(run_rows.column("run_id"), "r2")), elapsed_s=4.0)
    assert summary["images"] == 3 and summary["status"] == {"ok": 2, "failed": 1} and summary["bad_input"] == 1
    assert summary["images_per_s"] == 0.25
    assert summary["mean_s"] == {"prior": 3.0, "decoder": 4.0, "write": 1.5}


def test_summarize_an_empty_manifest(output):
    summary = summarize(image_states(output, "job-1"), read_manifest(output, ["status"]), elapsed_s=0)
    assert summary["images"] == 0 and summary["status"] == {"ok": 0, "failed": 0}
    assert summary["images_per_s"] is None
    assert summary["mean_s"] == {"prior": None, "decoder": None, "write": None}


def test_summary_is_written_as_json(output):
    write_part(output, [ok_row()])
    summary = summarize(image_states(output, "job-1"), read_manifest(output), elapsed_s=2.0)
    uri = write_summary(output, summary)
    assert uri == output.uri(SUMMARY_KEY)
    assert json.loads(output.get(SUMMARY_KEY)) == summary


def test_reading_filters_by_job_and_status_part_by_part(output):
    write_part(output, [ok_row("a"), failed_row("b"), ok_row("c", job_id="job-2"), failed_row("d", job_id="job-2")])
    write_part(output, [ok_row("e")])
    assert sorted(read_manifest(output, ["prompt_id"], "job-1", "ok").column("prompt_id").to_pylist()) == ["a", "e"]
    assert read_manifest(output, ["prompt_id"], "job-2", "failed").column("prompt_id").to_pylist() == ["d"]
    assert read_manifest(output, ["prompt_id"], status="ok").num_rows == 3
    assert read_manifest(output, ["prompt_id"], "job-3").num_rows == 0


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


def test_compact_everything_merges_parts_and_keeps_rows(output):
    write_part(output, [ok_row("a")])
    write_part(output, [failed_row("b")])
    write_part(output, [ok_row("b", minutes=1)])
    before = latest_status(read_manifest(output))
    merged = compact(output, everything=True)
    assert part_keys(output) == merged and len(merged) == 1
    table = read_manifest(output)
    assert table.num_rows == 3
    assert latest_status(table) == before


def test_compact_leaves_fewer_than_fanout_parts_of_a_tier_alone(output):
    keys = [write_part(output, [ok_row(f"p{i}")]) for i in range(FANOUT - 1)]
    assert compact(output) == []
    assert part_keys(output) == sorted(keys)


def test_compaction_is_size_tiered_and_parts_grow_with_the_log_of_rows(output, monkeypatch):
    monkeypatch.setattr("wurstfabrik.store.manifest.FANOUT", 4)
    monkeypatch.setattr("wurstfabrik.store.manifest.TIER_BASE", 2)
    rows = 0
    for batch in range(64):
        write_part(output, [ok_row(f"b{batch}-{i}") for i in range(2)])
        rows += 2
        compact(output)
        # at most FANOUT - 1 parts per tier, and the tiers grow with log_FANOUT(rows / TIER_BASE)
        assert len(part_keys(output)) <= 3 * (1 + math.log(rows / 2, 4))
    table = read_manifest(output)
    assert table.num_rows == 128 and len(latest_status(table)) == 128
    assert max(part_tier(k) for k in part_keys(output)) >= 2


def test_parts_named_before_tiers_are_read_and_merged(output):
    sink = io.BytesIO()
    legacy = pa.Table.from_pylist([dict(ok_row("old"), params="{}")], schema=MANIFEST_SCHEMA)
    pq.write_table(legacy.drop_columns(["run_id", "source", "member", "offset", "generated_width",
                                        "generated_height"]), sink)
    output.put(MANIFEST_PREFIX + "part-20250101T000000000000Z-" + "ab" * 16 + "-merged.parquet", sink.getvalue())
    write_part(output, [ok_row("new")])
    assert part_tier(part_keys(output)[0]) == 1
    table = read_manifest(output)
    assert sorted(table.column("prompt_id").to_pylist()) == ["new", "old"]
    assert table.column("member").null_count == 2
    compact(output, everything=True)
    assert read_manifest(output).num_rows == 2


def test_final_rows_agree_with_a_plain_python_reference(tmp_path):
    rng = random.Random(7)
    rows = []
    for n in range(3000):
        key = (f"p{rng.randrange(600)}", rng.randrange(3))
        status = rng.choice(["ok", "failed", "failed"])
        row = ok_row(*key, minutes=rng.randrange(5)) if status == "ok" else failed_row(*key,
                                                                                     minutes=rng.randrange(5))
        rows.append(dict(row, params="{}", error=row.get("error") or None, uri=row.get("uri", f"u{n}")))
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    expected = {}
    for row in rows:  # ok beats failed, then later finished_at, then the later row
        key = (row["prompt_id"], row["image_index"])
        rank = (row["status"] == "ok", row["finished_at"])
        if key not in expected or rank >= expected[key][0]:
            expected[key] = (rank, row["uri"])
    final = final_rows(table)
    got = {(r["prompt_id"], r["image_index"]): r["uri"] for r in final.to_pylist()}
    assert got == {k: uri for k, (_, uri) in expected.items()}
    output = LocalOutput(tmp_path / "out")
    for part in range(0, len(rows), 700):
        store_part(output, table.slice(part, 700))
    states = image_states(output, "job-1")
    assert states.ok == sum(1 for (rank, _) in expected.values() if rank[0])
    assert {(r["prompt_id"], r["image_index"]) for r in states.failed.to_pylist()} == {
        k for k, (rank, _) in expected.items() if not rank[0]}


def test_reading_only_some_columns_of_one_job(output):
    write_part(output, [ok_row("a"), ok_row("b", job_id="job-2")])
    table = read_manifest(output, ["prompt_id", "status"], job_id="job-1")
    assert table.column_names == ["prompt_id", "status"]
    assert table.column("prompt_id").to_pylist() == ["a"]
