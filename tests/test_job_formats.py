"""End-to-end jobs in each output format: the same images as one file per image, read back by `webdataset` and by
Hugging Face `datasets`; a killed driver leaves every image in exactly one finished shard; `preview` works on
all three."""

import glob
import hashlib
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_ray
from job_helpers import PROMPTS, kill_driver_after_parts, make_spec, ok_keys_once, ok_rows, write_prompts
from PIL import Image

from wurstfabrik.jobs.cli import main
from wurstfabrik.jobs.driver import run_job
from wurstfabrik.jobs.preview import THUMB, grid, write_preview
from wurstfabrik.store.storage import open_output

FORMATS = ("files", "webdataset", "parquet")
# One image per model batch: each image is then computed alone and comes out bit-identical in every run.
ONE_AT_A_TIME = {"prior_batch_size": 1, "decoder_batch_size": 1}


def read_back(output_format: str, root: Path) -> dict[str, str]:
    """sha256 of each image as a reader of the format sees it, by sample key or file name."""
    if output_format == "files":
        return {Path(p).stem: hashlib.sha256(Path(p).read_bytes()).hexdigest()
                for p in glob.glob(str(root / "images/*/*.png"))}
    if output_format == "webdataset":
        import webdataset as wds

        shards = sorted(glob.glob(str(root / "shards/*.tar")))
        return {s["__key__"]: hashlib.sha256(s["png"]).hexdigest() for s in wds.WebDataset(shards,
                                                                                          shardshuffle=False)}
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=sorted(glob.glob(str(root / "data/*.parquet"))),
                                   split="train").cast_column("image", datasets.Image(decode=False))
    return {row["key"]: hashlib.sha256(row["image"]["bytes"]).hexdigest() for row in loaded}


def format_spec(tiny_checkpoints, prompts, output, output_format):
    return make_spec(tiny_checkpoints, prompts, output, id_column="key", images_per_prompt=2,
                     output_format=output_format, shard_size=3, placement=ONE_AT_A_TIME)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "p.parquet", PROMPTS[:4],
                         key=["fox", "light.house", "ramen", "astro"])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_checkpoints, prompt_file, _ray_session, s3_server):
    """The same spec run in each format into a local folder; the runs share the test Ray."""
    shared_ray(s3_server)
    tmp = tmp_path_factory.mktemp("formats")
    roots = {}
    for output_format in FORMATS:
        result = run_job(format_spec(tiny_checkpoints, prompt_file, tmp / output_format, output_format),
                         progress=False)
        assert result.exit_code == 0 and result.summary["status"] == {"ok": 8, "failed": 0}, output_format
        roots[output_format] = tmp / output_format
    return roots


def test_every_format_holds_the_same_images(outputs):
    manifests = {f: ok_rows(open_output(str(root))) for f, root in outputs.items()}
    digests = {f: {key: row["sha256"] for key, row in rows.items()} for f, rows in manifests.items()}
    assert digests["files"] == digests["webdataset"] == digests["parquet"] and len(digests["files"]) == 8
    for output_format, root in outputs.items():
        read = read_back(output_format, root)
        assert sorted(read.values()) == sorted(digests["files"].values()), output_format


# Slow: the rest of the store × format matrix; tests/test_s3_stores.py runs an S3 job in a shard format every day.
@pytest.mark.slow
def test_s3_jobs_in_every_format_hold_the_same_images_as_local_ones(outputs, tiny_checkpoints, prompt_file, s3_env,
                                                                    s3_bucket, tmp_path):
    local = {key: row["sha256"] for key, row in ok_rows(open_output(str(outputs["files"]))).items()}
    for output_format in FORMATS:
        uri = f"s3://{s3_bucket}/{output_format}"
        result = run_job(format_spec(tiny_checkpoints, prompt_file, uri, output_format), progress=False)
        assert result.exit_code == 0, output_format
        output = open_output(uri)
        rows = ok_rows(output)
        assert {key: row["sha256"] for key, row in rows.items()} == local, output_format
        copy = tmp_path / output_format  # read back by the format's own reader, from a copy of what S3 holds
        for key in output.list():
            (copy / key).parent.mkdir(parents=True, exist_ok=True)
            (copy / key).write_bytes(output.get(key))
        assert sorted(read_back(output_format, copy).values()) == sorted(local.values()), output_format
        sheet, page, shown = write_preview(uri, n=3)  # the preview works on S3 too, written beside the output
        assert shown == 3 and page == output.uri("preview/index.html") and output.exists("preview/contact-sheet.png")
        assert len([k for k in output.list("preview/images/")]) == 3


def test_manifest_rows_say_where_each_image_went(outputs):
    wds_rows = ok_rows(open_output(str(outputs["webdataset"])))
    for (_, index), row in wds_rows.items():
        assert re.search(r"/shards/\d{5}\.tar$", row["uri"]) and "." not in row["member"]
        assert row["member"].endswith(f"_{index}")
        with open(row["uri"].removeprefix("file://"), "rb") as shard:
            shard.seek(row["offset"])
            assert hashlib.sha256(shard.read(row["bytes"])).hexdigest() == row["sha256"]
    parquet_rows = ok_rows(open_output(str(outputs["parquet"])))
    assert all(re.search(r"/data/\d{5}\.parquet$", r["uri"]) for r in parquet_rows.values())
    assert {r["source"] for r in parquet_rows.values()} == {f"p.parquet#{i}" for i in range(4)}
    stats = json.loads((outputs["webdataset"] / "shards" / "00000_stats.json").read_text())
    assert stats["count"] == 3 and stats["successes"] == 3  # shard_size images per shard


def test_samples_and_job_json_carry_the_provenance(outputs):
    import webdataset as wds

    job = json.loads((outputs["webdataset"] / "job.json").read_text())
    prior = job["params"]["prior_checkpoint"]
    assert prior["source"] == "folder" and len(prior["fingerprint"]) == 64
    assert job["wurstfabrik"] and job["params"]["decoder_checkpoint"]["fingerprint"]
    shard = sorted(glob.glob(str(outputs["webdataset"] / "shards/*.tar")))[0]
    sample = next(iter(wds.WebDataset(shard, shardshuffle=False)))
    meta = json.loads(sample["json"])
    assert meta["prior"] == prior and meta["decoder"] == job["params"]["decoder_checkpoint"]
    assert meta["job_id"] == job["job_id"] and meta["wurstfabrik"] == job["wurstfabrik"]
    assert {"prompt", "negative_prompt", "seed", "width", "height", "sampler"} <= set(meta)
    assert meta["sampler"]["prior_steps"] == 4 and sample["txt"].decode() == meta["prompt"]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [value for name, value in attrs if name in ("src", "href")]


@pytest.mark.parametrize("output_format", FORMATS)
def test_preview_draws_a_contact_sheet_and_a_page_whose_links_resolve(outputs, output_format, capsys):
    root = outputs[output_format]
    assert main(["preview", str(root), "--n", "5"]) == 0
    assert "5 images" in capsys.readouterr().out
    sheet = Image.open(root / "preview" / "contact-sheet.png")
    columns, rows = grid(5)
    assert sheet.width == columns * THUMB
    cells = np.asarray(sheet.convert("L"))
    cell_height = sheet.height // rows
    drawn = sum(1 for i in range(columns * rows)
                if cells[(i // columns) * cell_height:(i // columns) * cell_height + THUMB,
                         (i % columns) * THUMB:(i % columns + 1) * THUMB].min() < 250)
    assert drawn == 5
    links = Links()
    links.feed((root / "preview" / "index.html").read_text())
    assert len(links.targets) == 10
    for target in links.targets:
        Image.open(root / "preview" / target).verify()  # every thumbnail and full image is there and decodes


# Slow: tests/test_kill_anywhere.py (10 kills of a webdataset run) and the S3 kill test cover this more ways.
@pytest.mark.slow
def test_a_killed_driver_leaves_every_image_in_exactly_one_finished_shard(ray_local, tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", [f"{p}, take {i}" for i in range(4) for p in PROMPTS],
                            row_group_size=6)
    out = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, prompts, out, prior_steps=12, decoder_steps=8, output_format="webdataset",
                     shard_size=4, placement={"prior_batch_size": 2, "decoder_batch_size": 2})
    kill_driver_after_parts(spec, tmp_path, ray_local)
    output = open_output(str(out))
    before = ok_keys_once(output)
    assert 0 < len(before) < 24
    # Finished shards are those the manifest names; one stored but not yet recorded when the driver died is an
    # orphan, which the next run removes (and whose number it may give to a new shard).
    finished = {p: Path(p).stat().st_mtime_ns for p in {r["uri"].removeprefix("file://")
                                                          for r in ok_rows(output).values()}}
    assert finished

    result = run_job(spec, progress=False)
    assert result.exit_code == 0 and result.summary["status"] == {"ok": 24, "failed": 0}
    keys = ok_keys_once(output)
    assert len(keys) == len(set(keys)) == 24
    named = {row["uri"].removeprefix("file://") for row in ok_rows(output).values()}
    shards = set(glob.glob(str(out / "shards/*.tar")))
    assert shards == named  # no orphan shard: each one on disk is named by the manifest
    for path, mtime in finished.items():  # a finished shard is never rewritten
        assert path in shards and Path(path).stat().st_mtime_ns == mtime
    import webdataset as wds

    members = [s["__key__"] for s in wds.WebDataset(sorted(shards), shardshuffle=False)]
    assert len(members) == len(set(members)) == 24


def test_one_image_can_be_fetched_from_a_shard_by_its_offset(outputs):
    rows = ok_rows(open_output(str(outputs["webdataset"])))
    row = next(iter(rows.values()))
    data = open_output(str(outputs["webdataset"])).get_range(
        "shards/" + row["uri"].rsplit("/", 1)[-1], row["offset"], row["bytes"])
    assert Image.open(io.BytesIO(data)).size == (row["width"], row["height"])
