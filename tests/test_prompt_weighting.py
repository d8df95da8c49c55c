"""Prompt weighting and long prompts: Compel itself is the oracle of the compel syntax (its parser for the parse, its
embeddings on the tiny text encoders for the embeddings), the a1111 syntax is checked against its documented
meaning, and a long prompt's windows never change a short prompt's image in the same batch."""

import random

import numpy as np
import pytest
import torch
from compel import Compel
from compel.prompt_parser import Blend as CompelBlend
from compel.prompt_parser import PromptParser

from wurstfabrik.pipeline import WuerstchenPipeline, check_prompt_syntax
from wurstfabrik.pipeline.prompt_syntax import Blend, Fragment, PromptSyntaxError, parse_prompt

torch.set_num_threads(1)

SENTENCE = "a photo of a cat sitting on the red sofa next to a dog in the garden at night"
LONG = ". ".join([SENTENCE] * 4) + "."  # 80 tokens: two windows when chunked, split after a "."
LONG_COMMAS = ", ".join([SENTENCE] * 4)  # no sentence end: windows end at commas
COMPEL_PROMPTS = [
    "a cat",
    "",
    "a (cat)1.3 on a sofa",
    "a cat-- dog++, (red sofa)+",
    '"a red cat"0.8 (in the (garden)1.2 at night)1.1',
    "cat.attend(1.4) on a sofa",
    "(a red cat)0.5 on (the sofa)0",
    '("a cat", "a dog on a sofa").blend(0.7, 0.3)',
    '("a", "b c").blend(1, 2, no_normalize)',
    '("a cat", "a dog").and(1, 0.5)',
    "sausages (on a grill)--, 4k, cat(dog) (unclosed",
    LONG,
    LONG_COMMAS,
    "(" + LONG + ")0.8 dog++",
    '("' + LONG + '", "a dog").and()',
    "cat " * 80 + "(dog)0.5",
]


def compel_view(prompt: str):
    """Compel's parse as (parts, weights), parts as tuples of (text, weight) or blends."""
    conjunction = PromptParser().parse_conjunction(prompt)
    parts = []
    for part in conjunction.prompts:
        if isinstance(part, CompelBlend):
            parts.append(("blend", tuple(tuple((f.text, f.weight) for f in p.children) for p in part.prompts),
                          tuple(part.weights), part.normalize_weights))
        else:
            parts.append(tuple((f.text, f.weight) for f in part.children))
    return tuple(parts), tuple(conjunction.weights)


def our_view(prompt: str):
    parsed = parse_prompt(prompt, "compel")
    parts = []
    for part in parsed.parts:
        if isinstance(part, Blend):
            parts.append(("blend", tuple(tuple((f.text, f.weight) for f in run) for run in part.prompts),
                          part.weights, part.normalize))
        else:
            parts.append(tuple((f.text, f.weight) for f in part))
    return tuple(parts), parsed.weights


@pytest.mark.parametrize("prompt", COMPEL_PROMPTS[:11] + [
    "a red-haired woman, 1.5 meters tall", "(cat)-0.5", "(cat)1.2.3", "a++b", "x \\( y \\) \\, z", '"a\\tb"1.1',
    "(a - b)1.2", "((\"a\")1.2)1.1", "cat .attend(1.3)", "(cat).5", '("a", "").blend(1, 1)', "c++ code"])
def test_compel_parse_equals_compels(prompt):
    assert our_view(prompt) == compel_view(prompt)


def test_compel_parse_equals_compels_on_random_prompts():
    """Random strings of the grammar's characters and operators, where the two parsers' corner cases meet."""
    rng = random.Random(7)
    alphabet = ["a", "b", "cat", " ", " ", "(", ")", '"', ",", ".", "+", "-", "1", "\\", "=", "1.5", "++", "--",
                ")1.2", ".attend(", ".blend(", ".and(", "no_normalize", "\t"]
    compared = 0
    for _ in range(250):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        try:
            expected = compel_view(prompt)
        except Exception:
            expected = None  # Compel refuses it (or crashes on it): so must we
        try:
            ours = our_view(prompt)
        except PromptSyntaxError as e:
            # Refused where Compel parses: only what it would drop silently (text after .and(), nothing at all).
            assert expected is None or not expected[0] or "text after" in str(e), (prompt, e, expected)
            continue
        assert expected is not None, (prompt, ours)
        assert ours == expected, prompt
        compared += 1
    assert compared > 150


@pytest.mark.parametrize("prompt, reason", [
    ("a cat.swap(dog)", ".swap"), ("withLora(style, 0.5) a cat", "LoRA"), ('("a", "b").and() trailing', "after"),
    ('("a", "b").blend(1)', "2 prompts with 1 weights"), ('("a", "b").blend(x, y)', "not a number"), ("()", "no words"),
    ("a\x0bb", "unexpected character")])
def test_compel_syntax_errors(prompt, reason):
    with pytest.raises(ValueError, match=reason) as info:
        check_prompt_syntax(prompt, "compel")
    assert "\n" not in str(info.value) and str(info.value).startswith("compel prompt syntax: ")


A1111 = [
    ("a (red:1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
    ("((red) cat)", [("red", 1.1 * 1.1), (" cat", 1.1)]),
    ("((red:1.2) cat:0.5)", [("red", 1.2 * 0.5), (" cat", 0.5)]),
    ("[blurry] [[ugly]]", [("blurry", 1 / 1.1), (" ", 1.0), ("ugly", 1 / 1.1 / 1.1)]),
    ("\\(not a group\\) \\[x\\] a\\\\b", [("(not a group) [x] a\\b", 1.0)]),
    ("(4:3 aspect)", [("4:3 aspect", 1.1)]),
    ("(red : 0.5 )", [("red ", 0.5)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt, fragments", A1111, ids=[p for p, _ in A1111])
def test_a1111_parse(prompt, fragments):
    parsed = parse_prompt(prompt, "a1111")
    assert parsed.weights == (1.0,)
    assert [(f.text, pytest.approx(f.weight)) for f in parsed.parts[0]] == fragments


@pytest.mark.parametrize("prompt, reason", [
    ("smile :)", "closes nothing"), ("(unclosed", "never closed"), ("(a]", "closes"), ("[a:b:0.5]", "prompt editing"),
    ("[cat|dog]", "alternation"), ("a BREAK b", "BREAK"), ("<lora:style:1>", "extra networks"),
    ("(a:1.2.3)", "not a number")])
def test_a1111_syntax_errors(prompt, reason):
    with pytest.raises(ValueError, match=reason) as info:
        check_prompt_syntax(prompt, "a1111")
    assert "\n" not in str(info.value) and str(info.value).startswith("a1111 prompt syntax: ")


def test_plain_syntax_is_text_and_unknown_syntaxes_are_refused():
    assert parse_prompt("(cat:1.3) ((x)) [y]", "plain").parts == ((Fragment("(cat:1.3) ((x)) [y]"),),)
    check_prompt_syntax("(unclosed", "plain")
    with pytest.raises(ValueError, match="prompt_syntax must be one of plain, compel, a1111"):
        check_prompt_syntax("a cat", "bbcode")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    return WuerstchenPipeline.from_pretrained(*tiny_checkpoints, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_models(tiny_checkpoints):
    """transformers' CLIPTextModel of each half's text_encoder folder: Compel's encoder, the oracle's own."""
    from transformers import CLIPTextModel

    prior, decoder = tiny_checkpoints
    return {stage: CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
            for stage, folder in (("prior", prior), ("decoder", decoder))}


def encoders(pipe):
    return {"prior": pipe.prior.text, "decoder": pipe.decoder.text}


@pytest.mark.parametrize("stage", ["prior", "decoder"])
@pytest.mark.parametrize("long_prompts", ["truncate", "chunk"])
def test_compel_embeddings_equal_compels(pipe, reference_models, stage, long_prompts):
    """Both text encoders, long prompts cut or chunked (Compel's truncate_long_prompts), Würstchen's padding mask."""
    text = encoders(pipe)[stage]
    compel = Compel(tokenizer=text.tokenizer, text_encoder=reference_models[stage], padding_attention_mask_value=0,
                    truncate_long_prompts=long_prompts == "truncate")
    ours = text.encode_prompts(COMPEL_PROMPTS, "compel", long_prompts)
    for prompt, hidden in zip(COMPEL_PROMPTS, ours.hidden_states, strict=True):
        with torch.no_grad():
            expected = compel(prompt)[0]
        assert hidden.shape == expected.shape, prompt
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5, msg=prompt)
    long = [prompt.count("cat") >= 4 for prompt in COMPEL_PROMPTS]  # LONG and the prompts made from it
    assert ours.truncated == ([False] * len(COMPEL_PROMPTS) if long_prompts == "chunk" else long)
    assert [h.shape[0] for h in ours.hidden_states[11:13]] == ([77, 77] if long_prompts == "truncate" else [154, 154])


@pytest.mark.parametrize("long_prompts", ["truncate", "chunk"])
def test_plain_long_prompts_equal_compels_windows(pipe, reference_models, long_prompts):
    """Plain text (syntax characters included) chunked exactly as Compel chunks a prompt without syntax."""
    text = pipe.prior.text
    compel = Compel(tokenizer=text.tokenizer, text_encoder=reference_models["prior"], padding_attention_mask_value=0,
                    truncate_long_prompts=long_prompts == "truncate")
    provider = compel.conditioning_provider
    prompts = [LONG, LONG_COMMAS, "a cat", "(" + LONG + ")1.3"]
    ours = text.encode_prompts(prompts, "plain", long_prompts)
    for prompt, hidden in zip(prompts, ours.hidden_states, strict=True):
        with torch.no_grad():
            expected = provider.get_embeddings_for_weighted_prompt_fragments([[prompt]], [[1.0]])[0]
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_a1111_embeddings_equal_compels_for_the_same_weights(pipe, reference_models):
    """(word:w) means what Compel's procedure makes of weight w, downweights included."""
    text = pipe.decoder.text
    compel = Compel(tokenizer=text.tokenizer, text_encoder=reference_models["decoder"], padding_attention_mask_value=0)
    prompts = ["a (red:1.3) cat, [dog] on ((the sofa))", "(" + LONG + ":0.7) [[night]]"]
    ours = text.encode_prompts(prompts, "a1111")
    for prompt, hidden in zip(prompts, ours.hidden_states, strict=True):
        fragments = parse_prompt(prompt, "a1111").parts[0]
        with torch.no_grad():
            expected = compel.conditioning_provider.get_embeddings_for_weighted_prompt_fragments(
                [[f.text for f in fragments]], [[f.weight for f in fragments]])[0]
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    assert ours.truncated == [False, True]


def as_arrays(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


RUN = dict(height=128, width=128, prior_steps=3, decoder_steps=2, decoder_guidance_scale=2.0)


def test_weights_reach_both_stages_and_negative_prompts(pipe):
    """Weight-1 syntax gives the plain prompt's image exactly; a weight in the prompt or in the negative prompt
    changes it (the negative prompt guides both stages here)."""
    plain = as_arrays(pipe(["a red cat"], [5], ["blurry"], **RUN))
    same = as_arrays(pipe(["a (red)1 cat"], [5], ['"blurry"'], prompt_syntax="compel", **RUN))
    assert np.array_equal(plain, same)
    for prompt, negative in (("a (red)1.5 cat", "blurry"), ("a red cat", "(blurry)1.5")):
        weighted = as_arrays(pipe([prompt], [5], [negative], prompt_syntax="compel", **RUN))
        assert not np.array_equal(plain, weighted), (prompt, negative)
    a1111 = as_arrays(pipe(["a red cat"], [5], ["(blurry:1.5)"], prompt_syntax="a1111", **RUN))
    compel = as_arrays(pipe(["a red cat"], [5], ["(blurry)1.5"], prompt_syntax="compel", **RUN))
    assert np.array_equal(a1111, compel)


def test_bad_prompt_syntax_in_a_call_names_the_problem(pipe):
    with pytest.raises(ValueError, match="a1111 prompt syntax: '\\(' is never closed"):
        pipe(["(a cat"], [1], prompt_syntax="a1111", **RUN)
    with pytest.raises(ValueError, match="^prompt_syntax"):
        pipe(["a cat"], [1], prompt_syntax="markdown", **RUN)
    with pytest.raises(ValueError, match="^long_prompts"):
        pipe(["a cat"], [1], long_prompts="wrap", **RUN)


def test_a_long_prompt_does_not_change_a_short_prompts_image(pipe):
    """Chunked, the long prompt's embedding is 3 windows and the short one's 1: they run as separate forward
    passes, so the short prompt's image is its image alone, up to batched float rounding."""
    prompts, seeds, negatives = ["a cat on the sofa", LONG], [11, 12], ["blurry", ""]
    batch = pipe.generate(prompts, seeds, negatives, long_prompts="chunk", **RUN)
    alone = as_arrays(pipe(prompts[:1], seeds[:1], negatives[:1], long_prompts="chunk", **RUN))
    together = as_arrays(batch.images)
    diff = np.abs(together[:1].astype(np.int16) - alone.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert batch.truncated == [False, False]
    truncated = pipe.generate(prompts, seeds, negatives, **RUN)
    assert truncated.truncated == [False, True]
    assert not np.array_equal(as_arrays(truncated.images)[1], together[1])  # the later windows count
