"""Exactly once across shards when Ray runs a writer task again: a writer killed after it stored its images (or with
its result ready) is rerun by Ray, and still every image ends in exactly one stored file, shard member or Parquet
row, named by one manifest row, with no shard on storage that the manifest does not name."""

import glob
import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from job_helpers import PROMPTS, make_spec, write_prompts

from wurstfabrik.jobs.driver import run_job
from wurstfabrik.store.encoding import encode_image
from wurstfabrik.store.ids import image_key, sample_key
from wurstfabrik.store.manifest import MANIFEST_PREFIX, read_manifest
from wurstfabrik.store.storage import open_output
from wurstfabrik.workers.batches import column
from wurstfabrik.workers.faults import FAULTS_ENV
from wurstfabrik.workers.writer_stage import STORAGE_ERROR, manifest_rows, write_images

IMAGES_PER_PROMPT = 2
PROMPT_IDS = ["fox", "lighthouse", "ramen", "astro"]
EXPECTED = {(p, i) for p in PROMPT_IDS for i in range(IMAGES_PER_PROMPT)}
SLOW = pytest.mark.slow
# (format, kill point, whether the rerun claims another shard number than the lost attempt did)
CASES = [
    pytest.param("files", "return", False, id="files-return"),
    pytest.param("files", "store", False, id="files-store", marks=SLOW),
    pytest.param("webdataset", "return", True, id="webdataset-return-regrouped", marks=SLOW),
    pytest.param("webdataset", "store", False, id="webdataset-store", marks=SLOW),
    pytest.param("webdataset", "return", False, id="webdataset-return", marks=SLOW),
    pytest.param("parquet", "store", True, id="parquet-store-regrouped"),
    pytest.param("parquet", "return", False, id="parquet-return", marks=SLOW),
    pytest.param("parquet", "return", True, id="parquet-return-regrouped", marks=SLOW),
]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "p.parquet", PROMPTS[:4], key=PROMPT_IDS)


def stored_images(output_format: str, root: Path) -> tuple[Counter, set[str]]:
    """How often each sample key is stored, read from the data itself, and the objects that hold them."""
    if output_format == "files":
        paths = [Path(p) for p in glob.glob(str(root / "images/*/*"))]
        return Counter(p.stem for p in paths), {str(p) for p in paths}
    if output_format == "webdataset":
        paths = glob.glob(str(root / "shards/*.tar"))
        keys = Counter()
        for path in paths:
            with tarfile.open(path) as tar:
                keys.update(m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".png"))
        return keys, set(paths)
    paths = glob.glob(str(root / "data/*.parquet"))
    return Counter(k for p in paths for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()), set(paths)


def shard_objects_on_storage(output_format: str, root: Path) -> set[str]:
    """Every object a shard consists of, sidecars included (an orphan's sidecars must go too)."""
    folder = {"files": "images/*", "webdataset": "shards", "parquet": "data"}[output_format]
    return {p for p in glob.glob(str(root / folder / "*")) if Path(p).is_file()}


@pytest.mark.parametrize(("output_format", "after", "regroup"), CASES)
def test_a_rerun_writer_leaves_every_image_in_exactly_one_named_place(output_format, after, regroup, ray_local,
                                                                     tiny_checkpoints, prompt_file, tmp_path,
                                                                     monkeypatch):
    marker = tmp_path / "killed.json"
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"kill_writer": {"after": after, "marker": str(marker),
                                                               "regroup": regroup}}))
    root = tmp_path / "out"
    spec = make_spec(tiny_checkpoints, prompt_file, root, id_column="key", images_per_prompt=IMAGES_PER_PROMPT,
                     output_format=output_format, shard_size=3, height=64, width=64)
    result = run_job(spec, progress=False)

    assert result.exit_code == 0 and result.summary["status"] == {"ok": 8, "failed": 0}
    killed = json.loads(marker.read_text())  # the fault happened: a writer attempt stored images and died
    assert killed and {(r["prompt_id"], r["image_index"]) for r in killed} <= EXPECTED

    rows = read_manifest(open_output(str(root))).to_pylist()
    assert sorted((r["prompt_id"], r["image_index"]) for r in rows) == sorted(EXPECTED)  # one row per image
    assert {r["status"] for r in rows} == {"ok"}
    stored, holders = stored_images(output_format, root)
    assert stored == Counter({sample_key(p, i): 1 for p, i in EXPECTED})  # each image stored exactly once
    named = {r["uri"].removeprefix("file://") for r in rows}
    assert holders == named  # the manifest names every object holding images, and only those
    if output_format == "files":
        assert named == {str(root / image_key(p, i, "png")) for p, i in EXPECTED}
    else:
        sidecars = shard_objects_on_storage(output_format, root) - holders
        assert {Path(p).name.split(".")[0].removesuffix("_stats") for p in sidecars} <= \
            {Path(p).name.split(".")[0] for p in holders}  # no sidecar of a removed shard is left behind

    # Ray ran the killed task again: the images that attempt stored are recorded, by the rerun.
    lost_uris = {r["uri"].removeprefix("file://") for r in killed}
    by_key = {(r["prompt_id"], r["image_index"]): r["uri"].removeprefix("file://") for r in rows}
    assert all((r["prompt_id"], r["image_index"]) in by_key for r in killed)
    if regroup:  # the rerun stored them in a shard of its own; the lost attempt's shard was an orphan, now gone
        assert not lost_uris & named and not any(Path(u).exists() for u in lost_uris)
    else:  # the rerun wrote the same files or the same shard number again
        assert lost_uris <= named
    if output_format == "webdataset":  # each row points at its image in the shard as stored, not the lost one's
        for row in rows:
            with open(row["uri"].removeprefix("file://"), "rb") as shard:
                shard.seek(row["offset"])
                assert hashlib.sha256(shard.read(row["bytes"])).hexdigest() == row["sha256"]



def test_a_writer_stores_images_but_leaves_recording_them_to_the_driver(tmp_path):
    """What makes a rerun harmless: a writer attempt records nothing itself; its rows go back with its result."""
    png = encode_image(np.zeros((8, 8, 3), np.uint8), "png", 90)
    n = 2
    batch = {"prompt_id": column(["fox", "fox"]), "image_index": column([0, 1], np.int64),
             "prompt": column(["a fox"] * n), "negative_prompt": column([""] * n), "seed": column([1, 2], np.int64),
             "truncated": column([False] * n), "prior_s": column([0.1] * n), "decoder_s": column([0.2] * n),
             "image_size": column([(8, 8)] * n), "error": column(["", "decode: boom"]),
             "data": column([png, b""]), "bytes": column([len(png), 0], np.int64),
             "sha256": column([hashlib.sha256(png).hexdigest(), ""])}
    output = open_output(str(tmp_path))
    job = {"job_id": "j", "run_id": "r", "params": "{}", "provenance": {}}
    result = write_images(batch, output, "files", "png", 3, job)

    assert output.list(MANIFEST_PREFIX) == []
    assert output.exists(image_key("fox", 0, "png")) and not output.exists(image_key("fox", 1, "png"))
    rows = manifest_rows(result).to_pylist()
    assert [(r["prompt_id"], r["image_index"], r["status"]) for r in rows] == [("fox", 0, "ok"), ("fox", 1, "failed")]
    assert rows[0]["uri"] == output.uri(image_key("fox", 0, "png")) and rows[1]["error"] == "decode: boom"
    assert result.column(STORAGE_ERROR).to_pylist() == ["", ""]
