"""`wurstfabrik.generate`, the stages as a Ray Data transform: docs/ray-data.md's example run as written (with tiny
checkpoints, local paths and a placement for the 2-CPU test Ray in place of its own), its images byte for byte
those of a CLI job over the same prompts and seeds; rows that fail and the user's own columns; and what it refuses
before any work."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import shared_ray
from job_helpers import PROMPTS, SMALL_PLACEMENT, make_spec, ok_rows, spec_file
from PIL import Image

from wurstfabrik.jobs.cli import main
from wurstfabrik.jobs.generate import NOT_FOR_DATASETS, generate
from wurstfabrik.jobs.spec import JobSpec
from wurstfabrik.store.storage import open_output

ROOT = Path(__file__).resolve().parents[1]
ROWS = 12


def docs_example() -> str:
    """The Python block of docs/ray-data.md's example."""
    text = (ROOT / "docs" / "ray-data.md").read_text(encoding="utf-8")
    section = text.split("## An example", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)[1]


@dataclass
class SameImages:
    job_rows: dict  # the job's manifest rows by prompt id
    job_params: dict  # its job.json
    shards: Path  # where the docs example wrote its WebDataset shards
    samples: dict  # key -> {member extension: bytes}


@pytest.fixture(scope="module")
def same_images(tmp_path_factory, tiny_checkpoints, _ray_session, s3_server) -> SameImages:
    """A CLI job over 12 prompts with seeds and ids, then the docs example over the same Parquet file."""
    shared_ray(s3_server)
    folder = tmp_path_factory.mktemp("generate")
    captions = [f"{p}, take {i}" for i in range(2) for p in PROMPTS]
    prompts = folder / "captions.parquet"
    pq.write_table(pa.table({"key": [f"k-{i:02d}" for i in range(ROWS)], "caption": captions,
                             "seed": [1000 + 7 * i for i in range(ROWS)]}), prompts, row_group_size=4)
    spec = make_spec(tiny_checkpoints, prompts, folder / "out", prompt_column="caption", seed_column="seed",
                     id_column="key")
    assert main(["run", str(spec_file(spec, folder / "job.yaml")), "--no-progress"]) == 0
    prior, decoder = (str(p) for p in tiny_checkpoints)
    code = docs_example()
    replacements = {
        '"s3://my-bucket/captions/"': repr(str(prompts)),
        '"s3://my-bucket/shards/"': repr(str(folder / "shards")),
        '"warp-ai/wuerstchen-prior"': repr(prior),
        '"warp-ai/wuerstchen"': repr(decoder),
        "height=1024, width=1024,": "height=128, width=128, prior_steps=4, decoder_steps=3,",
        '{"prior_actors": 2, "decoder_actors": 2, "prior_gpus": 1, "decoder_gpus": 1}': repr(SMALL_PLACEMENT),
    }
    for written, here in replacements.items():
        assert written in code, f"docs/ray-data.md's example no longer says {written}"
        code = code.replace(written, here)
    exec(compile(code, "docs/ray-data.md", "exec"), {"__name__": "docs_example"})
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((folder / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    output = open_output(str(folder / "out"))
    return SameImages({row["prompt_id"]: row for row in ok_rows(output).values()},
                      json.loads(output.get("job.json")), folder / "shards", samples)


def test_the_docs_example_makes_the_cli_jobs_images(same_images):
    assert len(same_images.job_rows) == len(same_images.samples) == ROWS
    for key, sample in same_images.samples.items():
        row = same_images.job_rows[key]
        assert hashlib.sha256(sample["png"]).hexdigest() == row["sha256"], key  # byte for byte
        assert sample["txt"].decode() == row["prompt"]
        made_by = json.loads(sample["json"])
        assert made_by["seed"] == row["seed"]
        provenance = made_by["provenance"]
        params = same_images.job_params["params"]
        assert provenance["prior"] == params["prior_checkpoint"]
        assert provenance["decoder"] == params["decoder_checkpoint"]
        assert provenance["sampler"]["prior_steps"] == 4 and provenance["sampler"]["decoder_steps"] == 3


def test_the_docs_examples_shards_read_back_with_webdataset(same_images):
    import webdataset as wds

    shards = sorted(str(p) for p in same_images.shards.glob("*.tar"))
    read = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    assert sorted(read) == sorted(same_images.job_rows)
    for sample in read.values():
        assert Image.open(io.BytesIO(sample["png"])).size == (128, 128)


def test_rows_that_cannot_be_made_fail_alone_and_the_users_columns_come_back(ray_local, tiny_checkpoints):
    rows = [{"text": "a red fox", "prompt": "mine", "h": 128, "source": "table 1"},
            {"text": "   ", "prompt": "mine too", "h": 128, "source": "table 2"},
            {"text": "a lighthouse", "prompt": "and mine", "h": 256, "source": "table 3"}]
    prior, decoder = (str(p) for p in tiny_checkpoints)
    out = generate(ray.data.from_items(rows), prompt_column="text", height_column="h", width=128, prior=prior,
                   decoder=decoder, images_per_prompt=2, prior_steps=2, decoder_steps=2, format="jpeg",
                   placement=SMALL_PLACEMENT).take_all()
    assert len(out) == 6
    by_text = {}
    for row in out:
        by_text.setdefault(row["text"], []).append(row)
    assert {r["prompt"] for r in out} == {"mine", "mine too", "and mine"}  # their own columns of these names
    assert {r["source"] for r in out} == {"table 1", "table 2", "table 3"}
    for row in by_text["   "]:
        assert row["error"] == "input: text is empty" and row["image"] == b"" and row["sha256"] is None
    for text, height in (("a red fox", 128), ("a lighthouse", 256)):
        made = by_text[text]
        assert sorted(r["image_index"] for r in made) == [0, 1] and len({r["seed"] for r in made}) == 2
        for row in made:
            assert row["error"] is None and row["image"][:2] == b"\xff\xd8"  # JPEG
            assert Image.open(io.BytesIO(row["image"])).size == (128, height) == (row["width"], row["height"])
            assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]


def test_what_generate_refuses_before_any_work(ray_local, tiny_checkpoints):
    prior, decoder = (str(p) for p in tiny_checkpoints)
    ds = ray.data.from_items([{"text": "a cat"}])
    cases = [({"output": "s3://b/out"}, "does not take output"), ({"bogus": 1}, "does not take bogus"),
             ({"height": 0}, "height: must be > 0"), ({"prompt_column": "caption"}, "no column 'caption'"),
             ({"prompt_column": "text", "placement": {"prior_gpus": 1.0}}, "no node has enough GPU")]
    for fields, problem in cases:
        with pytest.raises(ValueError, match=re.escape(problem)):
            generate(ds, **{"prior": prior, "decoder": decoder, **fields})
    signature = generate.__kwdefaults__
    defaults = JobSpec.model_fields
    for name in ("prompt_column", "seed_column", "height", "width", "prior", "decoder"):
        assert signature[name] == defaults[name].default, name  # the job spec's defaults
    assert set(NOT_FOR_DATASETS) <= set(defaults)
