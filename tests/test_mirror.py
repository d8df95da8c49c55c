"""`wurstfabrik mirror` against rclone on loopback: it copies only the files loading reads, each object with its
sha256, and the index last; a second run copies nothing, a killed one is finished by the next; a hub repository is
mirrored at a pinned commit (from a hub on loopback), and offline a hub source fails in one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from conftest import s3_environment, set_environment
from fake_hub import FakeHub, use_endpoint
from fault_proxy import FaultProxy
from job_helpers import kill_when

from wurstfabrik.jobs.cli import main
from wurstfabrik.jobs.mirror import mirror
from wurstfabrik.pipeline.tiny import write_model_only_prior
from wurstfabrik.store.checkpoint_index import INDEX_FILE
from wurstfabrik.store.storage import S3Settings, open_output

TOKENIZER = ["tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json"]
COMMON = ["model_index.json", "prior/config.json", "text_encoder/config.json", *TOKENIZER]
FULL = "prior/diffusion_pytorch_model.safetensors"
HALF = "prior/diffusion_pytorch_model.fp16.safetensors"
SELECTED = {"all": [*COMMON, FULL, HALF, "text_encoder/model.safetensors"],
            "fp16": [*COMMON, HALF, "text_encoder/model.safetensors"],  # the encoder has no fp16 variant
            "full": [*COMMON, FULL, "text_encoder/model.safetensors"]}


@pytest.fixture(scope="module")
def hub_layout(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny prior laid out as a hub repository is: an fp16 variant beside the weights, a pickle copy of the
    text encoder, a README, .gitattributes and the scheduler, none of which but the fp16 weights loading reads."""
    folder = shutil.copytree(tiny_checkpoints[0], tmp_path_factory.mktemp("hub-layout") / "prior")
    shutil.copy(folder / FULL, folder / HALF)
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle, never copied")
    (folder / "README.md").write_text("# a model card\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return folder


def objects(server, bucket: str, prefix: str) -> dict[str, dict]:
    """Every object under the prefix, as the server holds it: key -> its user metadata."""
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])]
    return {key[len(prefix) + 1:]: client.head_object(Bucket=bucket, Key=key)["Metadata"] for key in keys}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def said(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("variant", ["all", "fp16", "full"])
def test_mirror_copies_what_loading_reads_each_object_with_its_sha256(hub_layout, s3_env, s3_bucket, variant,
                                                                      capsys):
    uri = f"s3://{s3_bucket}/prior/"
    assert main(["mirror", str(hub_layout), uri, "--variant", variant]) == 0
    (line,) = said(capsys.readouterr().out)
    files = SELECTED[variant]
    assert line == (f"{uri}: copied {len(files)} of {len(files)} files of {hub_layout} "
                    f"({sum((hub_layout / f).stat().st_size for f in files) / 1e6:.1f} MB), 0 were there already; "
                    f"index {INDEX_FILE} written")
    stored = objects(s3_env, s3_bucket, "prior")
    assert sorted(stored) == sorted([*files, INDEX_FILE])
    for key in files:
        metadata = {name.lower(): value for name, value in stored[key].items()}
        assert metadata["sha256"] == sha256(hub_layout / key)
    index = json.loads(open_output(uri).get(INDEX_FILE))
    assert (index["source"], index["source_kind"], index["revision"]) == (str(hub_layout), "folder", None)
    assert index["files"] == {f: {"size": (hub_layout / f).stat().st_size, "sha256": sha256(hub_layout / f)}
                              for f in files}


def test_a_second_mirror_copies_nothing_and_a_changed_file_is_copied_again(hub_layout, s3_server, s3_bucket,
                                                                             monkeypatch, tmp_path, capsys):
    folder = shutil.copytree(hub_layout, tmp_path / "prior")
    uri = f"s3://{s3_bucket}/prior"
    proxy = FaultProxy(s3_server.endpoint, share=0.0).start()
    try:
        set_environment(monkeypatch, s3_environment(s3_server, proxy.endpoint))
        assert main(["mirror", str(folder), uri]) == 0
        capsys.readouterr()
        proxy.requests.clear()
        assert main(["mirror", str(folder), uri]) == 0
        assert said(capsys.readouterr().out) == [f"{uri}/: nothing to copy: it holds all 10 files of {folder} already"]
        assert not [r for r in proxy.requests if r[0] in ("PUT", "POST", "DELETE")]  # nothing written
        config = json.loads((folder / "prior" / "config.json").read_text())
        (folder / "prior" / "config.json").write_text(json.dumps({**config, "dropout": 0.2}))
        assert main(["mirror", str(folder), uri]) == 0
    finally:
        proxy.stop()
    set_environment(monkeypatch, s3_environment(s3_server))
    size = (folder / "prior" / "config.json").stat().st_size
    assert said(capsys.readouterr().out) == [f"{uri}/: copied 1 of 10 files of {folder} ({size} bytes), 9 were there "
                                             f"already; index {INDEX_FILE} written"]
    index = json.loads(open_output(uri).get(INDEX_FILE))
    assert index["files"]["prior/config.json"]["sha256"] == sha256(folder / "prior" / "config.json")


def test_a_mirror_killed_halfway_is_finished_by_the_next_run(hub_layout, s3_server, s3_bucket, monkeypatch,
                                                             capsys):
    uri = f"s3://{s3_bucket}/prior"
    slow = FaultProxy(s3_server.endpoint, share=0.0, delay_s=0.15).start()
    try:
        env = {**os.environ, **{k: v for k, v in s3_environment(s3_server, slow.endpoint).items() if v is not None}}
        for name, value in s3_environment(s3_server).items():
            if value is None:
                env.pop(name, None)
        copy = subprocess.Popen([sys.executable, "-m", "wurstfabrik.jobs.cli", "mirror", str(hub_layout), uri,
                                 "--parallel", "1"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        kill_when(copy, lambda: len(objects(s3_server, s3_bucket, "prior")) >= 4)
    finally:
        slow.stop()
    stored = objects(s3_server, s3_bucket, "prior")
    assert INDEX_FILE not in stored and 4 <= len(stored) < 10  # no index: loading refuses a copy not finished
    set_environment(monkeypatch, s3_environment(s3_server))
    assert main(["mirror", str(hub_layout), uri]) == 0
    (line,) = said(capsys.readouterr().out)
    assert line.startswith(f"{uri}/: copied {10 - len(stored)} of 10 files of {hub_layout} (")
    assert line.endswith(f"{len(stored)} were there already; index {INDEX_FILE} written")
    assert sorted(objects(s3_server, s3_bucket, "prior")) == sorted([*SELECTED["all"], INDEX_FILE])


def test_large_files_go_up_as_multipart_uploads_with_their_sha256(hub_layout, s3_server, s3_bucket, monkeypatch,
                                                                  tmp_path):
    folder = shutil.copytree(hub_layout, tmp_path / "prior")
    large = "text_encoder/model.fp16.safetensors"  # bytes only: mirroring checks configs, never reads weights
    (folder / large).write_bytes(os.urandom(11 * 1024 * 1024))
    proxy = FaultProxy(s3_server.endpoint, share=0.0).start()
    try:
        set_environment(monkeypatch, s3_environment(s3_server, proxy.endpoint))
        # Parts of 5 MiB, the smallest S3 (and boto3) takes: three parts, which boto3 sends on up to 10 threads.
        settings = S3Settings(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
        result = mirror(str(folder), f"s3://{s3_bucket}/prior", settings=settings)
    finally:
        proxy.stop()
    assert large in result.copied
    started = [path.split("?")[0] for method, path, _ in proxy.requests if method == "POST" and "uploads" in path]
    assert started == [f"/{s3_bucket}/prior/{large}"]
    parts = [path for method, path, _ in proxy.requests if method == "PUT" and "partNumber=" in path]
    assert len(parts) == 3
    stored = objects(s3_server, s3_bucket, "prior")
    assert {k.lower(): v for k, v in stored[large].items()}["sha256"] == sha256(folder / large)


def test_a_model_only_prior_is_mirrored_as_it_is(s3_env, s3_bucket, tmp_path):
    folder = write_model_only_prior(tmp_path / "prior-model")
    (folder / "README.md").write_text("# card\n")
    result = mirror(str(folder), f"s3://{s3_bucket}/prior-model")
    assert sorted(result.copied) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(objects(s3_env, s3_bucket, "prior-model")) == sorted([*result.copied, INDEX_FILE])


def test_a_hub_repository_is_mirrored_at_its_pinned_commit(fake_hub, hub_layout, s3_env, s3_bucket):
    """The hub's own path, against a hub on loopback: the revision resolved to its commit, only the files loading
    reads downloaded, the index naming the repository and commit."""
    fake_hub.repos["someone/prior"] = hub_layout
    commit = FakeHub.commit("someone/prior")
    result = mirror(f"someone/prior@{commit}", f"s3://{s3_bucket}/hub-prior", variant="fp16")
    assert result.source == f"someone/prior@{commit}"
    assert sorted(result.copied) == sorted(SELECTED["fp16"])
    assert fake_hub.files("someone/prior") == set(SELECTED["fp16"])  # nothing else came down
    assert {revision for _, revision, _ in fake_hub.served} == {commit}
    index = json.loads(open_output(f"s3://{s3_bucket}/hub-prior").get(INDEX_FILE))
    assert (index["source"], index["source_kind"], index["revision"]) == ("someone/prior", "hub", commit)
    assert mirror("someone/prior", f"s3://{s3_bucket}/hub-prior", variant="fp16").copied == []  # main: same commit


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_source_fails_in_one_line_offline_or_unreachable(s3_env, s3_bucket, monkeypatch, tmp_path, capsys,
                                                                offline):
    # huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT once, at import: its constants stand for them here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    use_endpoint(monkeypatch, "http://127.0.0.1:9")  # nothing listens there
    source = "warp-ai/wuerstchen-prior@0123abc" if offline else "warp-ai/wuerstchen-prior"
    assert main(["mirror", source, f"s3://{s3_bucket}/prior"]) == 2
    out, err = capsys.readouterr()
    (line,) = said(err)
    why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face hub cannot be reached (ConnectError)"
    at = " at revision 0123abc" if offline else ""
    assert line == (f"error: warp-ai/wuerstchen-prior: cannot mirror it{at}: {why}, and it is not in the local "
                    "Hugging Face cache; run the mirror where the hub is reachable, or download it there (`hf download "
                    "warp-ai/wuerstchen-prior --local-dir DIR`), bring DIR here and mirror the folder")
    assert not out and objects(s3_env, s3_bucket, "prior") == {}


def test_what_cannot_be_mirrored_is_named_in_one_line(tiny_checkpoints, s3_env, s3_bucket, tmp_path, capsys):
    cases = [([str(tmp_path), f"s3://{s3_bucket}/x"], f"{tmp_path / 'model_index.json'}: missing, and no "
                                                      "config.json of a model-only prior either"),
             ([str(tiny_checkpoints[1] / "vqgan"), f"s3://{s3_bucket}/x"], "a vqgan component folder"),
             ([str(tiny_checkpoints[0]), str(tmp_path / "out")], "the destination must be an s3:// prefix"),
             (["no/such/thing/here", f"s3://{s3_bucket}/x"], "no such checkpoint folder, nor a hub repository")]
    for args, expected in cases:
        assert main(["mirror", *args]) == 2
        (line,) = said(capsys.readouterr().err)
        assert line.startswith("error: ") and expected in line, line
    assert objects(s3_env, s3_bucket, "x") == {}
