"""End-to-end jobs on a real local Ray: local and S3 outputs, reruns and run records, resume, faults and bad
input."""

import hashlib
import io
import json
import os
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import shared_ray
from job_helpers import PROMPTS, image_files, kill_driver_after_parts, make_spec, ok_rows, spec_file, write_prompts
from PIL import Image
from prometheus_text import metrics_port, scrape_until, total

from wurstfabrik.jobs.cli import main
from wurstfabrik.jobs.driver import JobResult, run_job
from wurstfabrik.jobs.spec import JobSpec
from wurstfabrik.pipeline import WuerstchenPipeline
from wurstfabrik.store.ids import image_key
from wurstfabrik.store.manifest import latest_status, read_manifest
from wurstfabrik.store.runs import read_runs
from wurstfabrik.store.storage import open_output
from wurstfabrik.workers.faults import FAULTS_ENV
from wurstfabrik.workers.metrics import STAGES

torch.set_num_threads(1)


def test_local_job_writes_every_image_once_and_matches_the_bare_pipeline(ray_local, tiny_checkpoints, tmp_path,
                                                                         monkeypatch):
    # merge the manifest's parts while the job runs, too
    monkeypatch.setattr("wurstfabrik.jobs.driver.COMPACT_EVERY_S", 0)
    prompts = write_prompts(tmp_path / "prompts.parquet", row_group_size=4,
                            size=[128, 256, 128, 256, 128, 128])
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, prompts, out, images_per_prompt=2, height_column="size", width_column="size")
    result = run_job(spec, progress=False)

    assert result.summary["status"] == {"ok": 12, "failed": 0}
    assert result.summary["missing"] == 0
    rows = ok_rows(open_output(str(out)))
    assert len(rows) == 12 and len(image_files(out)) == 12
    for (prompt_id, index), row in rows.items():
        path = out / image_key(prompt_id, index, "png")
        data = path.read_bytes()
        assert row["uri"] == path.as_uri() and row["bytes"] == len(data)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert Image.open(io.BytesIO(data)).size == (row["width"], row["height"])
    sizes = {row["prompt"]: row["height"] for row in rows.values()}
    assert sizes["a lighthouse at night"] == 256 and sizes["a red fox in the snow"] == 128
    summary = json.loads((out / "manifest" / "summary.json").read_text())
    assert summary["status"]["ok"] == 12

    # The job's image for a row is what the bare pipeline makes from that row's prompt and seed alone, up to
    # the rounding of batched float kernels (the job ran it in a batch of others).
    (prompt_id, index), row = sorted(rows.items())[3]
    pipe = WuerstchenPipeline.from_pretrained(*tiny_checkpoints, device="cpu", dtype=torch.float32)
    alone = pipe([row["prompt"]], seeds=[row["seed"]], height=row["height"], width=row["width"], prior_steps=4,
                 decoder_steps=3)[0]
    stored = Image.open(out / image_key(prompt_id, index, "png"))
    diff = np.abs(np.asarray(alone).astype(int) - np.asarray(stored).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@dataclass
class TwoRuns:
    """One output run twice with the same spec, as it stood after each run."""

    spec: JobSpec
    folder: Path
    first: JobResult
    again: JobResult
    parts: tuple[list[str], list[str]]  # the manifest folder's files after the first run and after the second
    mtimes: tuple[dict, dict]  # each image file's mtime after the first run and after the second
    runs: list[dict]  # the run records after both
    status: tuple[int, str]  # `wurstfabrik status` after both: exit code and what it printed
    metrics: list  # a scrape of the Ray node's metrics export port, once the first run's counts were exported


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_checkpoints, _ray_session, s3_server) -> TwoRuns:
    """The tests of a rerun and of run records check different things of the same two runs, made once."""
    shared_ray(s3_server)
    folder = tmp_path_factory.mktemp("two-runs")
    out = folder / "out"
    spec = make_spec(tiny_checkpoints, write_prompts(folder / "prompts.parquet", PROMPTS[:3]), out)

    def manifest_and_images():
        return (sorted(p.name for p in (out / "manifest").iterdir()),
                {p: (out / p).stat().st_mtime_ns for p in image_files(out)})

    first = run_job(spec, progress=False)
    after_first = manifest_and_images()
    again = run_job(spec, progress=False)
    after_again = manifest_and_images()
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["status", str(out)])
    metrics = scrape_until(metrics_port(), lambda samples: (  # both runs' and every stage's last values reported
        total(samples, "ray_wurstfabrik_images_total", run_id=first.summary["run_id"]) == 3
        and total(samples, "ray_wurstfabrik_job_images_done", run_id=again.summary["run_id"]) == 3
        and all(total(samples, "ray_wurstfabrik_stage_seconds_count", run_id=first.summary["run_id"], stage=stage)
                == 3 for stage in STAGES)))
    return TwoRuns(spec, folder, first, again, (after_first[0], after_again[0]), (after_first[1], after_again[1]),
                   read_runs(open_output(str(out))), (code, printed.getvalue()), metrics)


def test_rerun_generates_nothing_and_changed_params_are_refused(two_runs, ray_local, capsys):
    again, out = two_runs.again, two_runs.folder / "out"
    assert again.summary["generated_now"] == 0 and again.summary["status"]["ok"] == 3
    assert two_runs.parts[1] == two_runs.parts[0]
    assert two_runs.mtimes[1] == two_runs.mtimes[0]

    job = spec_file(two_runs.spec, two_runs.folder / "job.yaml")
    assert main(["run", str(job), "--set", "seed=7", "--no-progress"]) == 2
    assert "other generation parameters (changed: seed)" in capsys.readouterr().err
    assert main(["run", str(job), "--set", "seed=7", "--no-progress", "--force"]) == 0
    assert main(["status", str(out)]) == 0
    assert "3 ok, 0 failed, 0 missing of 3 images" in capsys.readouterr().out


def test_run_records_tell_each_runs_story(two_runs):
    out = two_runs.folder / "out"
    assert two_runs.first.exit_code == two_runs.again.exit_code == 0
    runs = two_runs.runs
    assert [r["state"] for r in runs] == ["finished", "finished"]
    assert runs[0]["planned"] == {"total_images": 3, "done_before": 0, "to_generate": 3, "bad_input": 0}
    assert runs[0]["generated"] == 3 and runs[0]["exit_code"] == 0 and runs[0]["spec"]["output"] == str(out)
    assert runs[1]["planned"]["to_generate"] == 0 and runs[1]["generated"] == 0  # it says it had nothing to do
    assert {"host", "pid", "started", "finished", "elapsed_s", "job_id", "ray_job"} <= set(runs[1])
    code, shown = two_runs.status
    assert code == 0
    assert "3 ok, 0 failed, 0 missing of 3 images" in shown and shown.count(": finished") == 2


def test_s3_job(ray_local, tiny_checkpoints, tmp_path, s3_env, s3_bucket):
    prompts = write_prompts(tmp_path / "prompts.parquet", PROMPTS[:4])
    inputs = open_output(f"s3://{s3_bucket}/inputs")
    inputs.put("batch-1.parquet", prompts.read_bytes())
    spec = make_spec(tiny_checkpoints, f"s3://{s3_bucket}/inputs/", f"s3://{s3_bucket}/runs/one", format="webp")
    result = run_job(spec, progress=False)

    assert result.summary["status"] == {"ok": 4, "failed": 0}
    output = open_output(f"s3://{s3_bucket}/runs/one")
    images = [k for k in output.list("images/")]
    assert len(images) == 4 and all(k.endswith(".webp") for k in images)
    for row in ok_rows(output).values():
        key = row["uri"].removeprefix(f"s3://{s3_bucket}/runs/one/")
        assert hashlib.sha256(output.get(key)).hexdigest() == row["sha256"]
    assert output.exists("manifest/summary.json") and output.exists("job.json")


def test_a_runs_metrics_equal_its_manifest(two_runs):
    """Counted by the driver (images, the job's progress) and by the stages' processes, which Ray Data has ended by
    now: what they recorded was exported before they exited (tests/test_run_metrics.py has the whole story)."""
    samples, first, again = two_runs.metrics, two_runs.first.summary["run_id"], two_runs.again.summary["run_id"]
    assert total(samples, "ray_wurstfabrik_images_total", run_id=first, status="ok") == 3
    assert total(samples, "ray_wurstfabrik_images_total", run_id=first, status="failed") == 0
    for stage in STAGES:
        assert total(samples, "ray_wurstfabrik_stage_seconds_count", run_id=first, stage=stage) == 3, stage
    for run in (first, again):
        assert total(samples, "ray_wurstfabrik_job_images_planned", run_id=run) == 3
    assert total(samples, "ray_wurstfabrik_job_images_done", run_id=again) == 3
    assert total(samples, "ray_wurstfabrik_job_images_remaining", run_id=again) == 0
    labels = json.dumps([labels for name, labels, _ in samples if name.startswith("ray_wurstfabrik_")])
    assert not [prompt for prompt in PROMPTS if prompt in labels]  # ids, stages and statuses; never a prompt


@dataclass
class FaultedRun:
    """One CLI run in which the decoder actor dies mid-batch and the ramen image cannot be encoded."""

    out: Path
    killed: Path  # the marker the dying actor leaves
    exit_code: int
    printed: str  # its stdout: the summary's JSON and nothing else


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory, tiny_checkpoints, _ray_session, s3_server) -> FaultedRun:
    """The tests of a dying actor and of an image that cannot be encoded check different things of one run, which
    prints its summary as JSON (`--json`, for scripts)."""
    shared_ray(s3_server)
    folder = tmp_path_factory.mktemp("faulted")
    marker, out = folder / "killed", folder / "out"
    spec = make_spec(tiny_checkpoints, write_prompts(folder / "prompts.parquet"), out,
                     placement={"decoder_batch_size": 2})
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as env, redirect_stdout(printed):
        env.setenv(FAULTS_ENV, json.dumps({"kill": {"stage": "decoder", "marker": str(marker)},
                                           "fail_encode": "ramen"}))
        code = main(["run", str(spec_file(spec, folder / "job.yaml")), "--no-progress", "--json"])
    return FaultedRun(out, marker, code, printed.getvalue())


def test_a_dying_actor_is_replaced_and_no_image_is_lost_or_doubled(faulted_run):
    assert faulted_run.killed.exists()  # the decoder actor really died mid-batch
    table = read_manifest(open_output(str(faulted_run.out)))
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("image_index").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == 6
    assert len(image_files(faulted_run.out)) == 5  # all but the one that could not be encoded


def test_an_image_that_cannot_be_encoded_fails_alone(faulted_run):
    assert faulted_run.exit_code == 1
    latest = latest_status(read_manifest(open_output(str(faulted_run.out))))
    failed = [r for r in latest.values() if r["status"] == "failed"]
    assert [r["prompt"] for r in failed] == ["a bowl of ramen"]
    assert "encoding refused" in failed[0]["error"]
    assert len(image_files(faulted_run.out)) == 5
    summary = json.loads(faulted_run.printed)  # all of stdout, as a script reads it
    assert summary["status"] == {"ok": 5, "failed": 1} and summary["missing"] == 0
    assert summary["generated_now"] == 5 and summary["failed_now"] == 1 and summary["output"] == str(faulted_run.out)


# Slow: the everyday S3 kill test (tests/test_s3_stores.py) and tests/test_kill_anywhere.py cover a kill and its resume.
@pytest.mark.slow
def test_resume_after_the_driver_is_killed(ray_local, tiny_checkpoints, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.parquet", [f"{p}, take {i}" for i in range(4) for p in PROMPTS],
                            row_group_size=4)
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, prompts, out, prior_steps=12, decoder_steps=8,
                     placement={"prior_batch_size": 2, "decoder_batch_size": 2})
    kill_driver_after_parts(spec, tmp_path, ray_local)
    output = open_output(str(out))
    before = ok_rows(output)
    assert 0 < len(before) < 24
    mtimes = {k: (out / image_key(*k, "png")).stat().st_mtime_ns for k in before}

    result = run_job(spec, progress=False)
    assert result.summary["status"] == {"ok": 24, "failed": 0}
    assert result.summary["generated_now"] == 24 - len(before)
    assert len(image_files(out)) == 24 and not list(out.rglob("*.tmp*"))
    table = read_manifest(output)
    ok_keys = [k for k, s in zip(zip(table.column("prompt_id").to_pylist(), table.column("image_index").to_pylist(),
                                     strict=True), table.column("status").to_pylist(), strict=True) if s == "ok"]
    assert all(ok_keys.count(k) == 1 for k in before)  # nothing that was ok was generated again
    assert {k: (out / image_key(*k, "png")).stat().st_mtime_ns for k in before} == mtimes
    killed, rerun = read_runs(output)
    assert "finished" not in killed and rerun["unfinished_before"] == [killed["run_id"]]
    assert killed["state"] == "did not finish" and killed["noted_by"] == rerun["run_id"]  # the next run noted it
    assert rerun["state"] == "finished"
    assert main(["status", str(out)]) == 0
    assert f"run {killed['run_id']}: did not finish" in capsys.readouterr().out


@pytest.mark.parametrize("prompts, problem", [
    ([None, "a cat"], "row 0: prompt is null"),
    (["a cat", "   "], "row 1: prompt is empty"),
    (["a cat", "x" * 10_000], "row 1: prompt has 10000 characters"),
])
def test_bad_prompts_are_refused_before_any_output(tiny_checkpoints, tmp_path, capsys, prompts, problem):
    path = write_prompts(tmp_path / "p.parquet", prompts)
    spec = make_spec(tiny_checkpoints, path, tmp_path / "out")
    (tmp_path / "job.yaml").write_text(json.dumps(spec.model_dump(mode="json")))
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err
    assert not (tmp_path / "out" / "images").exists() and not (tmp_path / "out" / "job.json").exists()


def test_input_problems_name_the_file_and_column(tiny_checkpoints, tmp_path, capsys):
    cases = {
        "missing.parquet": "does not exist",
        "nocolumn.parquet": "no column 'prompt' (columns: text)",
        "numbers.parquet": "column 'prompt' has type int64",
        "dupes.parquet": "duplicate id 'a'",
        "notparquet.parquet": "not a readable Parquet file",
    }
    pq.write_table(pa.table({"text": ["a cat"]}), tmp_path / "nocolumn.parquet")
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "numbers.parquet")
    write_prompts(tmp_path / "dupes.parquet", ["a cat", "a dog"], key=["a", "a"])
    (tmp_path / "notparquet.parquet").write_text("hello")
    for name, problem in cases.items():
        extra = {"id_column": "key"} if name == "dupes.parquet" else {}
        spec = make_spec(tiny_checkpoints, tmp_path / name, tmp_path / "out", **extra)
        (tmp_path / "job.yaml").write_text(json.dumps(spec.model_dump(mode="json")))
        assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, (name, err)
        assert name in err
        assert not (tmp_path / "out" / "job.json").exists()


def test_s3_problems_are_clear(tiny_checkpoints, tmp_path, capsys, s3_env, s3_bucket, monkeypatch):
    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS[:1])

    def run(output):
        spec = make_spec(tiny_checkpoints, prompts, output, resilience={"storage_outage_s": 1.0})
        (tmp_path / "job.yaml").write_text(json.dumps(spec.model_dump(mode="json")))
        code = main(["run", str(tmp_path / "job.yaml"), "--no-progress"])
        return code, capsys.readouterr().err

    code, err = run("s3://no-such-bucket-here/out")
    assert code == 2 and "bucket" in err.lower() and "Traceback" not in err
    secret, endpoint = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    code, err = run(f"s3://{s3_bucket}/out")
    assert code == 2 and "credential" in err.lower() and "wrong-secret" not in err and secret not in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, err = run(f"s3://{s3_bucket}/out")  # an endpoint away may come back: a rerun may finish
    assert code == 1 and "127.0.0.1:9" in err and "run again" in err and "Traceback" not in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert open_output(f"s3://{s3_bucket}/out").list() == []


def test_a_model_only_prior_takes_its_text_encoder_from_prior_text(ray_local, tiny_checkpoints, tmp_path):
    from wurstfabrik.pipeline.tiny import write_model_only_prior

    prior, _ = tiny_checkpoints
    model_only = write_model_only_prior(tmp_path / "prior-model-interpolated")
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", PROMPTS[:2]), out, prior=str(model_only),
                     prior_text=str(prior))
    result = run_job(spec, progress=False)
    assert result.exit_code == 0 and result.summary["status"] == {"ok": 2, "failed": 0}
    identity = json.loads((out / "job.json").read_text())["params"]["prior_checkpoint"]
    assert identity["given"] == str(model_only) and identity["text"]["given"] == str(prior)
    assert identity["fingerprint"] != identity["text"]["fingerprint"]


def test_weighted_long_and_odd_sized_prompts_and_a_bad_one_skipped(ray_local, tiny_checkpoints, tmp_path, capsys):
    long_prompt = "a very long caption about a sausage stand " * 12  # more than CLIP's 77 tokens
    prompts = ["a (red)1.4 fox in the snow", long_prompt, "a bowl of ramen++", "(\"a cat\", \"a dog\").blend(0.7)"]
    sizes = {"h": [200, 128, 256, 128], "w": [300, 128, 192, 128]}
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", prompts, **sizes), out,
                     prompt_syntax="compel", long_prompts="chunk", bad_rows="skip", height_column="h",
                     width_column="w")
    assert main(["run", str(spec_file(spec, tmp_path / "job.yaml")), "--no-progress"]) == 0
    assert "1 image(s) of bad input rows were skipped" in capsys.readouterr().err
    rows = {r["source"]: r for r in latest_status(read_manifest(open_output(str(out)))).values()}
    bad = rows["p.parquet#3"]
    assert bad["status"] == "failed" and bad["error"].startswith("input: ") and "p.parquet row 3" in bad["error"]
    for source, (height, width) in {"p.parquet#0": (200, 300), "p.parquet#1": (128, 128),
                                    "p.parquet#2": (256, 192)}.items():
        row = rows[source]
        assert row["status"] == "ok" and (row["height"], row["width"]) == (height, width)
        assert row["generated_height"] >= height and row["generated_width"] >= width
        with Image.open(row["uri"].removeprefix("file://")) as image:
            assert image.size == (width, height)  # exactly what was asked, cut from what was generated
    assert rows["p.parquet#1"]["truncated"] is False  # chunked, not cut
    assert main(["status", str(out)]) == 0
    assert "(1 refused as bad input)" in capsys.readouterr().out
    assert main(["run", str(spec_file(spec, tmp_path / "job.yaml")), "--no-progress"]) == 0
    assert read_manifest(open_output(str(out))).num_rows == 4  # the bad row is not recorded twice


def test_a_checkpoint_changed_under_the_same_folder_is_refused_on_resume(ray_local, tiny_checkpoints, tmp_path,
                                                                          capsys):
    import shutil

    prior = shutil.copytree(tiny_checkpoints[0], tmp_path / "prior")
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, write_prompts(tmp_path / "p.parquet", PROMPTS[:1]), out, prior=str(prior))
    assert main(["run", str(spec_file(spec, tmp_path / "job.yaml")), "--no-progress"]) == 0
    index = json.loads((prior / "model_index.json").read_text())
    (prior / "model_index.json").write_text(json.dumps({**index, "_retrained": "2026-11-27"}))
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 2
    assert (f"other generation parameters (changed: prior_checkpoint: {prior} is not the checkpoint those images "
            "were made with)") in capsys.readouterr().err
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress", "--force"]) == 0


def test_a_job_of_two_sizes_runs_full_batches_of_one_size(ray_local, tiny_checkpoints, tmp_path, monkeypatch):
    """Rows of two sizes, interleaved in the prompt file, reach the models as batches of one size each, all of the
    configured batch size (4) except each size's last: the planner's read units hold one size each, and each block
    of a prior batch is one batch. The stages log every model batch (workers.faults' batch_log)."""
    log = tmp_path / "batches"
    log.mkdir()
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"batch_log": str(log)}))
    sides = [128, 256, 128, 256, 128, 256, 128, 256, 128, 256, 128]  # 6 of 128 px, 5 of 256 px
    prompts = write_prompts(tmp_path / "prompts.parquet", prompts=[f"prompt {i}" for i in range(11)], side=sides)
    result = run_job(make_spec(tiny_checkpoints, prompts, tmp_path / "out", height_column="side",
                               width_column="side", prior_steps=2, decoder_steps=2), progress=False)
    assert result.summary["status"] == {"ok": 11, "failed": 0}
    batches: dict[tuple, list[int]] = {}
    for path in log.iterdir():
        batch = json.loads(path.read_text())
        assert batch["height"] == batch["width"]
        batches.setdefault((batch["stage"], batch["height"]), []).append(batch["images"])
    assert {key: sorted(sizes, reverse=True) for key, sizes in batches.items()} == {
        ("prior", 128): [4, 2], ("prior", 256): [4, 1], ("decoder", 128): [4, 2], ("decoder", 256): [4, 1]}


def test_a_fused_placement_with_blocks_of_several_batches_makes_the_same_images_as_two_pools(
        ray_local, tiny_checkpoints, tmp_path, monkeypatch):
    """One pool whose actors hold both halves, fed blocks of three prior batches (batches_per_block), against two
    pools fed one batch per block: the same images, and in both each stage runs model batches of its own placement
    size (the stages' batch log). The run record names the operators that ran, with their busy and backpressure
    seconds, and the rows per block."""
    log = tmp_path / "batches"
    log.mkdir()
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"batch_log": str(log)}))
    prompts = write_prompts(tmp_path / "prompts.parquet", [f"prompt {i}" for i in range(7)])
    digests, dataflow, batches = {}, {}, {}
    for fused in (False, True):
        out = tmp_path / f"out-{'fused' if fused else 'two-pools'}"
        placement = {"fused": True, "decoder_cpus": 1.0, "batches_per_block": 3} if fused else {"batches_per_block": 1}
        spec = make_spec(tiny_checkpoints, prompts, out, prior_steps=2, decoder_steps=2,
                         placement={**placement, "prior_batch_size": 2, "decoder_batch_size": 2})
        result = run_job(spec, progress=False)
        assert result.exit_code == 0 and result.summary["status"] == {"ok": 7, "failed": 0}
        digests[fused] = {key: row["sha256"] for key, row in ok_rows(open_output(str(out))).items()}
        dataflow[fused] = read_runs(open_output(str(out)))[-1]["dataflow"]
        batches[fused] = sorted(json.loads(p.read_text())["images"] for p in log.iterdir())
        for path in log.iterdir():
            path.unlink()
    assert len(digests[True]) == 7 and digests[True] == digests[False]
    assert batches == dict.fromkeys(digests, [1, 1, 2, 2, 2, 2, 2, 2])  # prior and decoder: 2 + 2 + 2 + 1 each
    stages = {fused: [op["operator"] for op in ops if "Stage" in op["operator"]] for fused, ops in dataflow.items()}
    assert stages == {True: ["MapBatches(FusedStage)"],
                      False: ["MapBatches(PriorStage)", "MapBatches(DecoderStage)"]}, stages
    for fused, ops in dataflow.items():
        rows = 6 if fused else 2
        assert any(f"num_rows_per_block={rows}," in op["operator"] for op in ops), ops
        assert "encode_images" in ops[-1]["operator"]  # in dataflow order, the encoders (with the writers) last
        for op in ops:
            if "Stage" in op["operator"]:
                assert op["busy_s"] > 0 and op["rows"] == 7 and op["ended"] > op["started"] > 0, op
                assert op["output_backpressure_s"] >= 0 and op["submission_backpressure_s"] >= 0
