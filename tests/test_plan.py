"""Tests for jobs.plan and store.prompts: row checks, ids, bad rows, done images and read units, in Arrow; and a
fabricated manifest of 100,000 images whose resume and status answers match a plain-Python reference."""

import random
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wurstfabrik.jobs.plan import plan_job, plan_units, scan_inputs
from wurstfabrik.jobs.spec import JobSpec
from wurstfabrik.jobs.status import status_report
from wurstfabrik.store.ids import InputError, image_seed, row_id, sanitize_id
from wurstfabrik.store.manifest import MANIFEST_SCHEMA, read_manifest, store_part, write_job_params
from wurstfabrik.store.prompts import ReadUnit, unit_images
from wurstfabrik.store.storage import open_output


def fits(height: int, width: int) -> str | None:
    return None if height % 128 == 0 and width % 128 == 0 else f"height/width {height}×{width} is not a multiple"


def spec_for(prompts, **fields) -> JobSpec:
    return JobSpec.from_dict({"prompts": str(prompts), "output": "unused", "height": 128, "width": 128, **fields})


def images_of(spec, plan) -> list[tuple[str, int]]:
    return [(image["prompt_id"], image["image_index"]) for unit in plan.units for image in unit_images(spec, unit)]


def test_row_ids_and_seeds_match_the_id_functions(tmp_path):
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(5)]}), tmp_path / "batch.parquet", row_group_size=2)
    spec = spec_for(tmp_path / "batch.parquet", images_per_prompt=2, seed=7)
    plan = plan_job(spec, fits)
    assert plan.total_images == 10 and plan.pending_images == 10 and len(plan.units) == 3
    images = [image for unit in plan.units for image in unit_images(spec, unit)]
    assert [(i["prompt_id"], i["image_index"]) for i in images] == [
        (row_id("batch.parquet", r), k) for r in range(5) for k in range(2)]
    assert all(i["seed"] == image_seed(7, i["prompt_id"], i["image_index"]) for i in images)
    assert images[3]["source"] == "batch.parquet#1"


def test_id_column_values_are_sanitized_like_sanitize_id(tmp_path):
    raw = ["clean-id", "../../etc/passwd", "with space", ".hidden", "x" * 150, "ok.png"]
    pq.write_table(pa.table({"prompt": ["a"] * 6, "key": raw}), tmp_path / "p.parquet")
    spec = spec_for(tmp_path / "p.parquet", id_column="key")
    assert [i for i, _ in images_of(spec, plan_job(spec, fits))] == [sanitize_id(r) for r in raw]


def test_integer_ids_and_per_row_sizes_and_seeds(tmp_path):
    table = pa.table({"prompt": ["a", "b", "c"], "id": [3, 1, 2], "h": [256, None, 128], "s": [5, None, 9]})
    pq.write_table(table, tmp_path / "p.parquet")
    spec = spec_for(tmp_path / "p.parquet", id_column="id", height_column="h", width_column="h", seed_column="s")
    images = {i["prompt_id"]: i for unit in plan_job(spec, fits).units for i in unit_images(spec, unit)}
    assert images["3"]["height"] == 256 and images["1"]["height"] == 128
    assert images["3"]["seed"] == 5 and images["1"]["seed"] == image_seed(0, "1", 0)


@pytest.mark.parametrize("prompts, columns, problem", [
    ([None, "a"], {}, "row 0: prompt is null"),
    (["a", " \t"], {}, "row 1: prompt is empty"),
    (["a", "x" * 3000], {}, "row 1: prompt has 3000 characters"),
    (["a", "b"], {"key": ["k", None]}, "row 1: id key is null or empty"),
    (["a", "b"], {"key": ["k", "k"]}, "row 1: duplicate id 'k' (also p.parquet#0)"),
    (["a", "b"], {"h": [128, 100]}, "row 1: height/width 100×128 is not a multiple"),
    (["a", "b"], {"h": [128, 9000]}, "row 1: height/width 9000×128 is outside"),
    (["a", "b"], {"s": [1, -4]}, "row 1: seed: must be in [0, 2**63)"),
])
def test_bad_rows_are_refused_naming_file_row_and_problem(tmp_path, prompts, columns, problem):
    pq.write_table(pa.table({"prompt": prompts, **columns}), tmp_path / "p.parquet")
    extra = {"id_column": "key"} if "key" in columns else {}
    extra |= {"height_column": "h"} if "h" in columns else {}
    extra |= {"seed_column": "s"} if "s" in columns else {}
    spec = spec_for(tmp_path / "p.parquet", **extra)
    with pytest.raises(InputError) as caught:
        plan_job(spec, fits)
    assert problem in str(caught.value) and "p.parquet" in str(caught.value)


def test_skipped_bad_rows_become_failed_images_and_the_rest_is_planned(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", None, "c", "", "e"], "key": ["k1", "k2", "k1", "k4", "k5"]}),
                   tmp_path / "p.parquet")
    spec = spec_for(tmp_path / "p.parquet", id_column="key", bad_rows="skip", images_per_prompt=2)
    plan = plan_job(spec, fits)
    assert plan.total_images == 10 and plan.bad.num_rows == 6 and plan.pending_images == 4
    assert sorted(images_of(spec, plan)) == [("k1", 0), ("k1", 1), ("k5", 0), ("k5", 1)]
    bad = plan.bad.to_pylist()
    assert {(b["prompt_id"], b["source"]) for b in bad} == {("k2", "p.parquet#1"), ("p-000002", "p.parquet#2"),
                                                           ("k4", "p.parquet#3")}
    assert all(b["error"].startswith("input: ") and "p.parquet row" in b["error"] for b in bad)


def test_done_images_are_left_out_and_partial_units_keep_their_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr("wurstfabrik.jobs.plan.UNIT_ROWS", 4)
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(10)]}), tmp_path / "p.parquet")
    spec = spec_for(tmp_path / "p.parquet", images_per_prompt=2)
    done = pa.table({"prompt_id": [row_id("p.parquet", r) for r in (0, 1, 1, 2, 3, 9)],
                     "image_index": pa.array([0, 0, 1, 1, 0, 1], pa.int32())})
    scan = scan_inputs(spec, fits)
    plan = plan_units(spec, scan, done)
    assert plan.done_images == 6 and plan.pending_images == 14
    expected = {(row_id("p.parquet", r), k) for r in range(10) for k in range(2)} - {
        (row_id("p.parquet", r), k) for r, k in [(0, 0), (1, 0), (1, 1), (2, 1), (3, 0), (9, 1)]}
    assert sorted(images_of(spec, plan)) == sorted(expected)
    assert [(u.start, u.stop, u.pending is None) for u in plan.units] == [(0, 4, False), (4, 8, True),
                                                                         (8, 10, False)]


def test_read_units_hold_images_of_one_size(tmp_path, monkeypatch):
    """With per-row sizes, each unit's pending images are split by requested size (smallest first), done images left
    out as before; without size columns, a unit stays whole."""
    monkeypatch.setattr("wurstfabrik.jobs.plan.UNIT_ROWS", 4)
    sides = [256, 128, 256, 128, 128, 128, 256]
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(7)], "side": sides}), tmp_path / "p.parquet")
    spec = spec_for(tmp_path / "p.parquet", images_per_prompt=2, height_column="side", width_column="side")
    done = pa.table({"prompt_id": [row_id("p.parquet", 1)], "image_index": pa.array([0], pa.int32())})
    plan = plan_units(spec, scan_inputs(spec, fits), done)
    units = [(u.start, {image["height"] for image in unit_images(spec, u)}, len(unit_images(spec, u)))
             for u in plan.units]
    assert units == [(0, {128}, 3), (0, {256}, 4), (4, {128}, 4), (4, {256}, 2)]
    assert sorted(images_of(spec, plan)) == sorted({(row_id("p.parquet", r), k) for r in range(7) for k in range(2)}
                                                   - {(row_id("p.parquet", 1), 0)})
    one_size = spec_for(tmp_path / "p.parquet", images_per_prompt=2, height_column="side", width_column="side")
    pq.write_table(pa.table({"prompt": ["a", "b"], "side": [128, 128]}), tmp_path / "p.parquet")
    assert [u.pending for u in plan_job(one_size, fits).units] == [None]
    assert [u.pending for u in plan_job(spec_for(tmp_path / "p.parquet"), fits).units] == [None]


def test_everything_done_plans_nothing(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "p.parquet")
    spec = spec_for(tmp_path / "p.parquet")
    done = pa.table({"prompt_id": [row_id("p.parquet", 0), row_id("p.parquet", 1)],
                     "image_index": pa.array([0, 0], pa.int32())})
    plan = plan_job(spec, fits, done)
    assert plan.units == [] and plan.done_images == 2 and plan.pending_images == 0


# --- 100,000 images: the Arrow path against a plain-Python reference of the old, row-by-row code ---

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def reference_final(rows: list[dict]) -> dict:
    """latest_status as it was: ok beats failed, then the later finished_at, then the later row."""
    final = {}
    for row in rows:
        key = (row["prompt_id"], row["image_index"])
        rank = (row["status"] == "ok", row["finished_at"])
        if key not in final or rank >= (final[key]["status"] == "ok", final[key]["finished_at"]):
            final[key] = row
    return final


def test_resume_and_status_of_100000_images_match_the_row_by_row_reference(tmp_path):
    n, new = 100_000, 16
    rng = random.Random(1)
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(n + new)]}), tmp_path / "p.parquet",
                   row_group_size=30_000)
    spec = spec_for(tmp_path / "p.parquet")
    output = open_output(str(tmp_path / "out"))
    ids = [row_id("p.parquet", r) for r in range(n)]
    rows = []
    for i, prompt_id in enumerate(ids):
        attempts = rng.choice([["ok"], ["ok"], ["ok"], ["failed", "ok"], ["failed"], ["ok", "failed"]])
        for k, status in enumerate(attempts):
            rows.append({"job_id": "job", "prompt_id": prompt_id, "image_index": 0, "status": status,
                         "finished_at": T0 + timedelta(seconds=i % 97 + k), "params": "{}",
                         "error": None if status == "ok" else "boom", "uri": f"u{i}-{k}"})
    rng.shuffle(rows)
    for part in np.array_split(np.arange(len(rows)), 7):
        store_part(output, pa.Table.from_pylist([rows[i] for i in part], schema=MANIFEST_SCHEMA))
    write_job_params(output, {"job_id": "job", "total_images": n + new, "params": {}})

    final = reference_final(rows)
    expected_done = {k for k, r in final.items() if r["status"] == "ok"}
    done = read_manifest(output, ["prompt_id", "image_index"], "job", "ok")
    plan = plan_units(spec, scan_inputs(spec, fits), done)
    assert plan.done_images == len(expected_done)
    planned = set(images_of(spec, plan))
    everything = {(row_id("p.parquet", r), 0) for r in range(n + new)}
    assert planned == everything - expected_done

    lines, code = status_report(str(tmp_path / "out"))
    ok = sum(1 for r in final.values() if r["status"] == "ok")
    failed = len(final) - ok
    assert lines[0].endswith(f"{ok} ok, {failed} failed, {new} missing of {n + new} images")
    assert code == 1
    first_failed = [line for line in lines if line.startswith("  failed ")]
    assert first_failed and all(final[(line.split()[1], 0)]["status"] == "failed" for line in first_failed)


def test_a_read_unit_round_trips_through_ray_items():
    unit = ReadUnit("s3://b/p.parquet", 2, 100, 0, 8, np.array([1, 5], dtype=np.int32).tobytes())
    from dataclasses import asdict

    assert ReadUnit(**asdict(unit)).offsets(1).tolist() == [1, 5]
