"""pipeline.clip_text against transformers' CLIPTextModel, the reference it replaces: the same last hidden states
from the same safetensors (both key layouts transformers has saved), padding masked as CLIP masks it; clear
refusals; and loading a pipeline imports neither transformers' model classes nor dynamo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from wurstfabrik.pipeline.clip_text import load_clip_text
from wurstfabrik.pipeline.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
TOKENS = torch.tensor([[49, 7, 12, 50, 0, 0, 0, 0], [49, 3, 4, 5, 6, 7, 8, 50], [49, 50, 0, 0, 0, 0, 0, 0]])
MASK = (torch.arange(8)[None] < torch.tensor([[4], [8], [2]])).long()


def reference(folder: Path, act: str, projection: bool = False) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=8, hidden_act=act, eos_token_id=50,
                            projection_dim=16)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    model.save_pretrained(folder)
    return model


def ours(folder: Path, dtype=torch.float32):
    return load_clip_text(folder, sorted(folder.glob("*.safetensors")), dtype)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_pytorch_tanh"])
def test_the_last_hidden_states_are_transformers_own(tmp_path, act):
    expected = reference(tmp_path, act)
    with torch.no_grad():
        for mask in (MASK, None):
            want = expected(TOKENS, attention_mask=mask).last_hidden_state
            got = ours(tmp_path)(TOKENS, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_with_a_projection_and_the_old_key_layout_loads_the_same(tmp_path):
    """CLIPTextModelWithProjection's folder (its projection unused), and the keys older transformers saved:
    under text_model., with the position_ids buffer."""
    expected = reference(tmp_path / "new", "gelu", projection=True)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    weights = load_file(tmp_path / "new" / "model.safetensors")
    assert "text_projection.weight" in weights
    renamed = {k if k.startswith("text_projection") else f"text_model.{k.removeprefix('text_model.')}": v
               for k, v in weights.items()}
    renamed["text_model.embeddings.position_ids"] = torch.arange(8)[None]
    save_file(renamed, old / "model.safetensors")
    with torch.no_grad():
        want = expected(TOKENS, attention_mask=MASK).last_hidden_state
        for folder in (tmp_path / "new", old):
            torch.testing.assert_close(ours(folder)(TOKENS, attention_mask=MASK).last_hidden_state, want,
                                       rtol=1e-5, atol=1e-5)


def test_bfloat16_stays_close_to_float32(tmp_path):
    reference(tmp_path, "gelu")
    with torch.no_grad():
        full = ours(tmp_path)(TOKENS, attention_mask=MASK).last_hidden_state
        half = ours(tmp_path, torch.bfloat16)(TOKENS, attention_mask=MASK).last_hidden_state
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)


def test_what_is_not_a_clip_text_model_is_refused_naming_the_folder(tmp_path):
    reference(tmp_path, "gelu")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))
    with pytest.raises(CheckpointError, match=r"config.json: hidden_act 'swish' is not supported"):
        ours(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(CheckpointError, match=r"not a CLIP text config \(missing hidden_size\)"):
        ours(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "final_layer_norm.bias" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weights do not match the CLIP text config.json.*final_layer_norm"):
        ours(tmp_path)


def test_loading_both_halves_imports_neither_transformers_models_nor_dynamo(tiny_checkpoints):
    """What a stage actor pays before its first batch: transformers' CLIP model module and dynamo cost seconds of
    CPU each to import, and a job starts two actors."""
    prior, decoder = tiny_checkpoints
    code = ("import sys, torch\nfrom wurstfabrik.pipeline import PriorPipeline, DecoderPipeline\n"
            f"p = PriorPipeline.from_pretrained({str(prior)!r}, dtype=torch.float32)\n"
            f"d = DecoderPipeline.from_pretrained({str(decoder)!r}, dtype=torch.float32)\n"
            "heavy = ('torch._dynamo', 'transformers.models.clip.modeling')\n"
            "print(sorted(m for m in sys.modules if m.startswith(heavy)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
