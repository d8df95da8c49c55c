"""The demo's model, trained on the toy world (train/tiny_world.py): its checkpoint, its prompts, the toy world's judge,
and what of its prompts it draws on held-out colour pairs, through the product's own pipeline.

Of issue 27's accuracy thresholds on the held-out pairs, only the background's is asserted: the committed model meets
it and not the others (docs/benchmarks.md has the figures: shape colour 70 %, shape 34 %, position 16 % against 85, 70
and 80 %). A negative prompt naming the shape's colour and Compel weights on it pull its share of the image their way.
Not asserted: a `left` shape in the left half of a 256×128 image (measured: 11 of 20 left or right shapes in the named
half, chance; its Stage C was trained at 128² only and does not place shapes where the caption says)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train import tiny_world, toy_world  # noqa: E402
from wurstfabrik.jobs.cli import DEMO_MODEL, DEMO_SETTINGS  # noqa: E402

CAPTION = re.compile(r"a (?:(small|large) )?(\w+) (circle|square|triangle) on a (\w+) background(?:, at the (\w+))?")


@pytest.fixture(scope="module")
def toy():
    from wurstfabrik.pipeline.pipeline import WuerstchenPipeline

    return WuerstchenPipeline.from_pretrained(DEMO_MODEL / "prior", DEMO_MODEL / "decoder", device="cpu",
                                              dtype=torch.float32)


def test_the_demo_runs_the_model_at_the_settings_its_accuracy_was_measured_at():
    assert DEMO_SETTINGS == {k: v for k, v in tiny_world.EVAL.items() if k in DEMO_SETTINGS}
    assert tiny_world.EVAL["prior_guidance_scale"] == 4.0  # the job's default, which the demo keeps


def test_the_demo_prompts_follow_the_grammar_with_held_out_pairs_among_them():
    prompts = (DEMO_MODEL / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 36 and len(set(prompts)) == 36
    parsed = [CAPTION.fullmatch(p) for p in prompts]
    assert all(parsed), [p for p, m in zip(prompts, parsed, strict=True) if not m]
    pairs = [(m[2], m[4]) for m in parsed]
    assert all(colour in toy_world.PALETTE and back in toy_world.PALETTE for colour, back in pairs)
    assert sum(pair in toy_world.HELD_OUT for pair in pairs) >= 12
    assert {m[3] for m in parsed} == set(toy_world.SHAPES)
    assert {m[5] for m in parsed} - {None} == set(toy_world.POSITIONS)


def test_held_out_pairs_are_a_fixed_fifth_never_trained_on():
    assert len(toy_world.HELD_OUT) == len(toy_world.PAIRS) // 5 == 11
    assert not set(toy_world.TRAIN_PAIRS) & toy_world.HELD_OUT
    # each held-out pair's colours are seen in training, in both roles
    for colour, back in toy_world.HELD_OUT:
        assert any(c == colour for c, _ in toy_world.TRAIN_PAIRS) and any(b == back for _, b in toy_world.TRAIN_PAIRS)


def test_the_judge_reads_rendered_scenes_right():
    import random

    scenes = toy_world.held_out_scenes(60)
    images = [toy_world.render(s, 128, 128, random.Random(i)) for i, s in enumerate(scenes)]
    assert toy_world.accuracy(scenes, images) == {"background": 1.0, "colour": 1.0, "shape": 1.0, "position": 1.0}


def test_the_checkpoint_is_small_half_precision_safetensors():
    files = [f for f in DEMO_MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 10_000_000
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == 5 and not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    for path in weights:
        with safe_open(path, framework="pt") as f:
            floats = {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64"}  # BatchNorm's batch count
            assert floats == {"F16"}, path


def test_held_out_scenes_get_the_background_of_issue_27_and_mostly_the_shapes_colour(toy):
    """The 110 held-out scenes of docs/benchmarks.md's table, at the demo's settings."""
    scenes = toy_world.held_out_scenes(110)
    scores = toy_world.accuracy(scenes, tiny_world.generate(toy, scenes))
    assert scores["background"] >= 0.85, scores  # issue 27's threshold
    # Not issue 27's 85 %: that the shape is drawn, in its colour, in most images (the model before drew it in 9 %).
    assert scores["colour"] > 0.5, scores


def test_guidance_raises_accuracy(toy):
    scenes = toy_world.held_out_scenes(55, seed=2)
    unguided = toy_world.accuracy(scenes, tiny_world.generate(toy, scenes, prior_guidance_scale=1.0))
    guided = toy_world.accuracy(scenes, tiny_world.generate(toy, scenes, prior_guidance_scale=4.0))
    assert sum(guided.values()) > sum(unguided.values()), (unguided, guided)


def colour_shares(toy, scenes, prompts, **options) -> list[float]:
    """Each image's share of pixels nearest its scene's shape colour, generated at the demo's settings."""
    images = toy.generate(prompts, list(range(len(scenes))), **{**tiny_world.EVAL, **options}).images
    return [toy_world.colour_share(np.asarray(image), s.colour) for image, s in zip(images, scenes, strict=True)]


def test_a_negative_prompt_naming_the_shapes_colour_lowers_its_share(toy):
    scenes = toy_world.held_out_scenes(22, seed=3)
    captions = [s.caption for s in scenes]
    plain = colour_shares(toy, scenes, captions)
    negated = colour_shares(toy, scenes, captions, negative_prompts=[s.colour for s in scenes])
    assert np.mean(negated) < 0.75 * np.mean(plain), (np.mean(plain), np.mean(negated))
    assert sum(n < p for n, p in zip(negated, plain, strict=True)) >= 0.6 * len(scenes)


def test_compel_weights_on_the_shapes_colour_move_its_share_their_way(toy):
    scenes = toy_world.held_out_scenes(22, seed=3)

    def weighted(weight: float) -> list[str]:
        return [s.caption.replace(f" {s.colour} ", f" ({s.colour}){weight} ", 1) for s in scenes]

    up = colour_shares(toy, scenes, weighted(1.5), prompt_syntax="compel")
    down = colour_shares(toy, scenes, weighted(0.5), prompt_syntax="compel")
    assert np.mean(up) > 2 * np.mean(down), (np.mean(up), np.mean(down))
    assert sum(u > d for u, d in zip(up, down, strict=True)) >= 0.8 * len(scenes)


@pytest.mark.slow
def test_the_training_script_runs_end_to_end(tmp_path):
    """A few dozen steps of every stage: it writes a checkpoint the pipeline loads, and measures it."""
    out = tmp_path / "model"
    done = subprocess.run([sys.executable, str(ROOT / "train" / "tiny_world.py"), "--out", str(out), "--scale", "0.01",
                           "--eval-count", "11"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"held-out accuracy: background \d", done.stdout), done.stdout[-2000:]
    assert len((out / "prompts.txt").read_text().splitlines()) == 36
    from wurstfabrik.pipeline.pipeline import WuerstchenPipeline

    pipe = WuerstchenPipeline.from_pretrained(out / "prior", out / "decoder", device="cpu", dtype=torch.float32)
    images = tiny_world.generate(pipe, toy_world.held_out_scenes(2))
    assert [image.shape for image in images] == [(128, 128, 3)] * 2
