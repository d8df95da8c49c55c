"""Loading checkpoints: every way a folder or hub id can be wrong raises a CheckpointError that names the file,
tensor or setting at fault; variants and shards load the weights they should; hub downloads read only what loading
reads (against a hub served on loopback); inspect_checkpoint checks folders and hub ids without loading weights."""

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
from fake_hub import FakeHub, use_endpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from wurstfabrik.pipeline import (
    CheckpointError,
    PriorPipeline,
    WuerstchenPipeline,
    inspect_checkpoint,
    load_component,
    resolve_checkpoint,
)
from wurstfabrik.pipeline.checkpoint import hub_patterns
from wurstfabrik.pipeline.tiny import write_model_only_prior, write_tiny_checkpoints

torch.set_num_threads(1)

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def prior_copy(tiny, tmp_path):
    """A copy of the tiny prior checkpoint folder, free to damage."""
    return shutil.copytree(tiny[0], tmp_path / "prior-checkpoint")


@pytest.fixture
def component(prior_copy):
    """The prior component folder of `prior_copy`."""
    return prior_copy / "prior"


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Pickle files must never be opened: any torch.load fails the test instead of running."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


def load(folder, dtype=torch.float32):
    return load_component(folder, device="cpu", dtype=dtype)


def edit_weights(folder, edit) -> None:
    path = folder / WEIGHTS
    state_dict = load_file(path)
    edit(state_dict)
    save_file(state_dict, path)


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        call(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.ckpt", "weights.pt"])
def test_pickle_only_weights_are_refused_unread(component, name):
    (component / WEIGHTS).unlink()
    (component / name).write_bytes(b"\x80\x04\x95 not a pickle, and loading it would crash differently")
    message = error_of(load, component)
    assert str(component) in message and name in message
    assert "pickle" in message and ".safetensors" in message


def test_no_weights_at_all(component):
    (component / WEIGHTS).unlink()
    assert "no .safetensors weights" in error_of(load, component)


def test_damaged_safetensors_file(component):
    (component / WEIGHTS).write_bytes(b"\x00" * 5 + b"garbage")
    message = error_of(load, component)
    assert WEIGHTS in message and "not a readable safetensors file" in message


@pytest.mark.parametrize("key", ["blocks.0.depthwise.weight", "projection.bias", "blocks.2.attention.to_k.bias",
                                 "blocks.5.attention.to_out.0.weight"])
def test_missing_tensor_is_named(component, key):
    edit_weights(component, lambda sd: sd.pop(key))
    message = error_of(load, component)
    assert "Missing" in message and f'"{key}"' in message
    assert "to_qkv" not in message and "Unexpected" not in message  # only the checkpoint's own names


def test_unexpected_tensor_is_named(component):
    edit_weights(component, lambda sd: sd.__setitem__("extra.weight", torch.zeros(3)))
    message = error_of(load, component)
    assert "Unexpected" in message and '"extra.weight"' in message and "Missing" not in message


@pytest.mark.parametrize("key, shape, expected", [
    ("projection.weight", (64, 15, 1, 1), (64, 16, 1, 1)),
    ("blocks.2.attention.to_q.weight", (64, 63), (64, 64)),
    ("blocks.2.attention.to_v.bias", (65,), (64,)),
    ("blocks.2.attention.to_out.0.weight", (32, 64), (64, 64)),
])
def test_wrong_shape_names_tensor_and_both_shapes(component, key, shape, expected):
    edit_weights(component, lambda sd: sd.__setitem__(key, torch.zeros(shape)))
    message = error_of(load, component)
    assert f"size mismatch for {key}:" in message
    for size in (shape, expected):
        assert str(tuple(size)) in message or str(torch.Size(size)) in message
    assert "to_qkv" not in message and "Missing" not in message and "Unexpected" not in message


def test_missing_config(component):
    (component / "config.json").unlink()
    message = error_of(load, component)
    assert "config.json" in message and "missing" in message


def test_invalid_json_config(component):
    (component / "config.json").write_text('{"_class_name": "WuerstchenPrior", "c": ')
    message = error_of(load, component)
    assert "config.json" in message and "not valid JSON" in message


def test_config_that_is_not_an_object(component):
    (component / "config.json").write_text("[1, 2]")
    assert "expected a JSON object" in error_of(load, component)


@pytest.mark.parametrize("folder_name", ["prior", "some-model"])
def test_unknown_class_name(component, folder_name):
    """An unknown class is refused even in a folder whose name is a known component's."""
    folder = component.rename(component.parent / folder_name) if folder_name != component.name else component
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    message = error_of(load, folder)
    assert "config.json" in message and "UNet2DConditionModel" in message and "WuerstchenPrior" in message


def test_config_without_class_name_uses_the_folder_name(component):
    config = json.loads((component / "config.json").read_text())
    del config["_class_name"]
    (component / "config.json").write_text(json.dumps(config))
    assert type(load(component)).__name__ == "StageC"


def test_unknown_config_key(component):
    config = json.loads((component / "config.json").read_text())
    (component / "config.json").write_text(json.dumps({**config, "dropout": 0.1, "c_hidden_extra": 3}))
    message = error_of(load, component)
    assert "config.json" in message and "c_hidden_extra" in message and "dropout" not in message


def test_config_disagreeing_with_weights(component):
    config = json.loads((component / "config.json").read_text())
    (component / "config.json").write_text(json.dumps({**config, "depth": 3}))
    message = error_of(load, component)
    assert "Missing" in message and '"blocks.6.depthwise.weight"' in message


def test_missing_component_folder(tmp_path):
    assert "no such component folder" in error_of(load, tmp_path / "nothing-here")


def test_text_encoder_with_only_pickle_weights(prior_copy, tiny):
    encoder = prior_copy / "text_encoder"
    (encoder / "model.safetensors").unlink()
    (encoder / "pytorch_model.bin").write_bytes(b"\x80\x04 garbage")
    message = error_of(PriorPipeline.from_pretrained, prior_copy, device="cpu", dtype=torch.float32)
    assert str(encoder) in message and "pytorch_model.bin" in message and "pickle" in message
    message = error_of(WuerstchenPipeline.from_pretrained, prior_copy, tiny[1], device="cpu", dtype=torch.float32)
    assert "pytorch_model.bin" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_text_encoder_with_only_the_fp16_variant(prior_copy, dtype):
    """What a hub download for a half-precision dtype leaves where the repository has fp16 text encoder weights."""
    encoder = prior_copy / "text_encoder"
    model = CLIPTextModel.from_pretrained(str(encoder))
    (encoder / "model.safetensors").unlink()
    model.half().save_pretrained(str(encoder), safe_serialization=True, variant="fp16")
    assert sorted(p.name for p in encoder.iterdir()) == ["config.json", "model.fp16.safetensors"]
    prior = PriorPipeline.from_pretrained(prior_copy, device="cpu", dtype=dtype)
    loaded = prior.text.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value.to(dtype)), key


def test_hub_download_reads_one_variant_of_each_component():
    shards = [f"prior/diffusion_pytorch_model{v}-0000{i}-of-00002.safetensors" for v in ("", ".fp16") for i in (1, 2)]
    files = ["model_index.json", "README.md", "prior/config.json",
             "prior/diffusion_pytorch_model.safetensors.index.json",
             "prior/diffusion_pytorch_model.safetensors.index.fp16.json", *shards, "text_encoder/config.json",
             "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
             "scheduler/scheduler_config.json", "decoder/config.json"]
    common = ["model_index.json", "prior/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
              "tokenizer/merges.txt", "tokenizer/tokenizer_config.json"]
    assert sorted(hub_patterns(files, "prior", prefer_half=True)) == sorted(common + [
        "prior/diffusion_pytorch_model.safetensors.index.fp16.json", shards[2], shards[3],
        "text_encoder/model.fp16.safetensors"])
    assert sorted(hub_patterns(files, "prior", prefer_half=False)) == sorted(common + [
        "prior/diffusion_pytorch_model.safetensors.index.json", shards[0], shards[1], "text_encoder/model.safetensors"])


def test_missing_model_index(prior_copy, tiny):
    (prior_copy / "model_index.json").unlink()
    message = error_of(WuerstchenPipeline.from_pretrained, prior_copy, tiny[1], device="cpu", dtype=torch.float32)
    assert "model_index.json" in message and "missing" in message


@pytest.mark.parametrize("kind, sub", [("prior", "prior"), ("prior", "tokenizer"), ("decoder", "vqgan"),
                                       ("decoder", "text_encoder")])
def test_missing_pipeline_folder(tiny, tmp_path, kind, sub):
    prior = shutil.copytree(tiny[0], tmp_path / "p")
    decoder = shutil.copytree(tiny[1], tmp_path / "d")
    shutil.rmtree((prior if kind == "prior" else decoder) / sub)
    message = error_of(WuerstchenPipeline.from_pretrained, prior, decoder, device="cpu", dtype=torch.float32)
    assert f"missing the {sub}/ folder" in message


def write_half_variant(folder) -> dict[str, torch.Tensor]:
    """Next to the full weights, an fp16 variant with other values, so that loading shows which file it read."""
    half = {k: (-v).half() if v.is_floating_point() else v for k, v in load_file(folder / WEIGHTS).items()}
    save_file(half, folder / "diffusion_pytorch_model.fp16.safetensors")
    return half


def test_fp16_variant_is_read_for_half_precision_only(component):
    full = load_file(component / WEIGHTS)
    half = write_half_variant(component)
    key = "projection.weight"
    assert torch.equal(load(component, torch.float16).state_dict()[key], half[key])
    assert torch.equal(load(component, torch.bfloat16).state_dict()[key], half[key].to(torch.bfloat16))
    assert torch.equal(load(component, torch.float32).state_dict()[key], full[key])


def test_fp16_variant_alone_serves_float32(component):
    half = write_half_variant(component)
    (component / WEIGHTS).unlink()
    module = load(component, torch.float32)
    assert module.state_dict()["projection.weight"].dtype == torch.float32
    assert torch.equal(module.state_dict()["projection.weight"], half["projection.weight"].float())


def write_shards(folder, count: int, index_name: str, shard_name: str, dtype=None) -> None:
    state_dict = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    keys = sorted(state_dict)
    weight_map = {}
    for i in range(count):
        name = shard_name.format(i + 1, count)
        part = {k: state_dict[k] if dtype is None else state_dict[k].to(dtype) for k in keys[i::count]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state_dict.values())
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def assert_same_module(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_checkpoint_loads_like_a_single_file(component, tiny):
    single = load(tiny[0] / "prior")
    write_shards(component, 3, WEIGHTS + ".index.json", "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors")
    assert_same_module(load(component), single)


def test_sharded_fp16_variant_in_diffusers_naming(component, tiny):
    single = load(tiny[0] / "prior", torch.float16)
    write_shards(component, 2, "diffusion_pytorch_model.safetensors.index.fp16.json",
                 "diffusion_pytorch_model.fp16-{:05d}-of-{:05d}.safetensors", dtype=torch.float16)
    assert_same_module(load(component, torch.float16), single)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_diffusers_own_sharded_save_loads(tmp_path, variant):
    generator = torch.Generator().manual_seed(0)
    reference = WuerstchenPrior(c_in=16, c=32, c_cond=16, c_r=16, depth=2, nhead=2)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    if variant:
        reference = reference.half()
    reference.save_pretrained(str(tmp_path), safe_serialization=True, variant=variant, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*-of-*.safetensors"))) > 1
    dtype = torch.float16 if variant else torch.float32
    ours = load(tmp_path, dtype)
    expected = reference.state_dict()
    assert sorted(ours.state_dict()) == sorted(expected)
    assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())


def test_shard_missing_from_its_index(component):
    write_shards(component, 2, WEIGHTS + ".index.json", "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors")
    (component / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    message = error_of(load, component)
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in message and "missing weight shard" in message


def test_index_without_weight_map(component):
    (component / WEIGHTS).unlink()
    (component / (WEIGHTS + ".index.json")).write_text(json.dumps({"metadata": {}}))
    message = error_of(load, component)
    assert WEIGHTS + ".index.json" in message and "weight_map" in message


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub in offline mode, with an empty cache of our own. huggingface_hub reads HF_HUB_OFFLINE once, at
    import, so its constant is patched as well as the environment."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_while_offline(offline):
    message = error_of(resolve_checkpoint, "warp-ai/wuerstchen-prior", "prior")
    assert "warp-ai/wuerstchen-prior" in message and "offline" in message
    assert "local" in message and "folder" in message  # says how to use a local copy instead
    message = error_of(WuerstchenPipeline.from_pretrained, device="cpu", dtype=torch.float32)
    assert "warp-ai/wuerstchen-prior" in message and "offline" in message


def test_hub_id_while_offline_uses_the_cache(offline, tiny):
    """A checkpoint downloaded earlier still loads offline, from the hub's cache layout."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "models--someone--tiny-prior"
    shutil.copytree(tiny[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_checkpoint("someone/tiny-prior", "prior") == repo / "snapshots" / commit
    prior = PriorPipeline.from_pretrained("someone/tiny-prior", device="cpu", dtype=torch.float32)
    assert type(prior.prior).__name__ == "StageC"


@pytest.mark.parametrize("path", ["/nonexistent/wuerstchen-prior", "./no/such/folder", "no-such-folder",
                                  "a/b/c", "~/no-such-wuerstchen-folder"])
def test_non_existent_local_path(path):
    message = error_of(resolve_checkpoint, path, "prior")
    assert path in message and "no such checkpoint folder" in message


def test_non_existent_local_folder_for_the_pipeline(tmp_path, tiny):
    missing = tmp_path / "missing"
    message = error_of(WuerstchenPipeline.from_pretrained, missing, tiny[1], device="cpu", dtype=torch.float32)
    assert str(missing) in message and "no such checkpoint folder" in message


def test_index_naming_a_file_outside_its_folder(component, tmp_path):
    (component / WEIGHTS).rename(tmp_path / "elsewhere.safetensors")
    weight_map = {"projection.weight": "../elsewhere.safetensors"}
    (component / (WEIGHTS + ".index.json")).write_text(json.dumps({"weight_map": weight_map}))
    message = error_of(load, component)
    assert "outside its folder" in message and "../elsewhere.safetensors" in message


def test_hub_download_of_a_model_only_prior_and_its_text_companion():
    files = ["config.json", "diffusion_pytorch_model.safetensors", "README.md", ".gitattributes"]
    assert hub_patterns(files, "prior", prefer_half=True) == ["config.json", "diffusion_pytorch_model.safetensors"]
    pipeline_files = ["model_index.json", "prior/config.json", "prior/diffusion_pytorch_model.safetensors",
                      "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                      "scheduler/scheduler_config.json"]
    assert hub_patterns(pipeline_files, "prior_text", prefer_half=False) == [
        "model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json"]


@pytest.fixture(scope="module")
def model_only(tmp_path_factory):
    return write_model_only_prior(tmp_path_factory.mktemp("model-only") / "prior-model")


def test_model_only_prior_from_the_hub_downloads_only_what_it_reads(fake_hub, model_only, tiny):
    fake_hub.repos.update({"someone/prior-model": model_only, "warp-ai/wuerstchen-prior": tiny[0]})
    pipe = PriorPipeline.from_pretrained("someone/prior-model", device="cpu", dtype=torch.float32)
    assert type(pipe.prior).__name__ == "StageC"
    assert fake_hub.files("someone/prior-model") == {"config.json", WEIGHTS}
    tokenizer = {f"tokenizer/{p.name}" for p in (tiny[0] / "tokenizer").iterdir()}
    assert fake_hub.files("warp-ai/wuerstchen-prior") == {  # not the companion's own prior, nor its scheduler
        "model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors", *tokenizer}


def test_revisions_reach_the_hub(fake_hub, model_only, tiny):
    fake_hub.repos.update({"someone/prior-model": model_only, "someone/text": tiny[0]})
    commit = FakeHub.commit("someone/prior-model")
    info = inspect_checkpoint("someone/prior-model", "prior")
    assert (info.source, info.revision, info.model_only, info.folder) == ("hub", commit, True, None)
    PriorPipeline.from_pretrained("someone/prior-model", device="cpu", dtype=torch.float32, revision=commit,
                                  prior_text="someone/text", prior_text_revision="v1.0")
    assert {revision for repo, revision, _ in fake_hub.served if repo == "someone/prior-model"} == {commit}
    assert "/api/models/someone/text/revision/v1.0" in fake_hub.requests  # a tag, resolved to its commit
    assert {revision for repo, revision, _ in fake_hub.served if repo == "someone/text"} == {FakeHub.commit(
        "someone/text")}
    # Downloaded, the commit's files are in the cache, which inspect then names; unreachable, the cache serves it
    # (at that commit: a download of an explicit commit records no branch in the cache).
    cached = inspect_checkpoint("someone/prior-model", "prior").folder
    assert cached is not None and (cached / "config.json").is_file()
    fake_hub.server.shutdown()
    fake_hub.server.server_close()  # connections are refused now
    offline_info = inspect_checkpoint("someone/prior-model", "prior", revision=commit)
    assert (offline_info.revision, offline_info.folder, offline_info.model_only) == (commit, cached, True)


def test_inspecting_hub_ids(fake_hub, tiny):
    fake_hub.repos.update({"someone/prior": tiny[0], "someone/decoder": tiny[1]})
    assert inspect_checkpoint("someone/prior", "prior").model_only is False
    assert inspect_checkpoint("someone/prior", "prior_text").revision == FakeHub.commit("someone/prior")
    assert "a decoder checkpoint where a prior was expected" in error_of(inspect_checkpoint, "someone/decoder",
                                                                         "prior")
    assert "a prior checkpoint where a decoder was expected" in error_of(inspect_checkpoint, "someone/prior",
                                                                         "decoder")
    message = error_of(inspect_checkpoint, "nobody/nothing", "decoder")
    assert "nobody/nothing: no such checkpoint on the Hugging Face hub" in message


def test_inspecting_a_hub_id_that_cannot_be_reached(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    use_endpoint(monkeypatch, "http://127.0.0.1:9")  # nothing listens there
    message = error_of(inspect_checkpoint, "someone/prior", "prior")
    assert "the Hugging Face hub cannot be reached" in message and "not in the local Hugging Face cache" in message
    assert "hf download someone/prior --local-dir" in message


def test_inspecting_a_hub_id_offline(offline, tiny):
    message = error_of(inspect_checkpoint, "warp-ai/wuerstchen-prior", "prior")
    assert "offline mode is on (HF_HUB_OFFLINE)" in message and "not in the local Hugging Face cache" in message
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / "models--someone--tiny-prior"
    shutil.copytree(tiny[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    info = inspect_checkpoint("someone/tiny-prior", "prior")
    assert (info.source, info.revision, info.folder) == ("hub", commit, repo / "snapshots" / commit)
    assert "a prior checkpoint where a decoder was expected" in error_of(inspect_checkpoint, "someone/tiny-prior",
                                                                         "decoder")


def test_inspecting_folders(tiny, model_only):
    prior = inspect_checkpoint(tiny[0], "prior")
    assert (prior.source, prior.folder, prior.revision, prior.model_only) == ("folder", tiny[0], None, False)
    assert len(prior.fingerprint) == 64 and inspect_checkpoint(tiny[0], "prior").fingerprint == prior.fingerprint
    assert inspect_checkpoint(model_only, "prior").model_only is True
    decoder = inspect_checkpoint(tiny[1], "decoder")
    assert decoder.fingerprint not in (None, prior.fingerprint)
    assert inspect_checkpoint(tiny[0], "prior_text").fingerprint != prior.fingerprint  # not its prior's files


def test_fingerprint_follows_configs_and_weight_files_not_weight_values(prior_copy):
    before = inspect_checkpoint(prior_copy, "prior").fingerprint
    edit_weights(prior_copy / "prior", lambda sd: sd.__setitem__("projection.bias", sd["projection.bias"] + 1))
    assert inspect_checkpoint(prior_copy, "prior").fingerprint == before  # same names and sizes: unread values
    config = json.loads((prior_copy / "prior" / "config.json").read_text())
    (prior_copy / "prior" / "config.json").write_text(json.dumps({**config, "dropout": 0.2}))
    changed = inspect_checkpoint(prior_copy, "prior").fingerprint
    assert changed != before
    write_half_variant(prior_copy / "prior")
    assert inspect_checkpoint(prior_copy, "prior").fingerprint != changed


def test_inspecting_bad_folders(prior_copy, tiny, model_only, tmp_path):
    assert "no such checkpoint folder" in error_of(inspect_checkpoint, tmp_path / "missing", "prior")
    assert "a decoder checkpoint where a prior was expected" in error_of(inspect_checkpoint, tiny[1], "prior")
    assert "a prior checkpoint where a decoder was expected" in error_of(inspect_checkpoint, tiny[0], "decoder")
    message = error_of(inspect_checkpoint, model_only, "decoder")
    assert "a model-only prior (no text encoder) where a decoder was expected" in message
    (prior_copy / "prior" / WEIGHTS).unlink()
    assert "no .safetensors weights" in error_of(inspect_checkpoint, prior_copy, "prior")
    (prior_copy / "prior" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 not read")
    assert "only pickle weights" in error_of(inspect_checkpoint, prior_copy, "prior")
    encoder = shutil.copytree(tiny[0], tmp_path / "encoder-less") / "text_encoder"
    (encoder / "model.safetensors").unlink()
    assert f"{encoder}: no .safetensors weights" in error_of(inspect_checkpoint, encoder.parent, "prior_text")
    with pytest.raises(ValueError, match="^kind must be one of prior, decoder, prior_text"):
        inspect_checkpoint(tiny[0], "vqgan")
