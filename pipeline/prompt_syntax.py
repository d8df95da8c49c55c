"""Prompt syntaxes that weight parts of a prompt, parsed into weighted text fragments without loading a model.

The syntax is chosen per call (`prompt_syntax`); weighting is off unless asked for.

`plain` (the default): the prompt is text; nothing in it is syntax.

`compel`: Compel's syntax (https://github.com/damian0815/compel), read exactly as Compel 2.x reads it (the tests
compare both parsers on hand-picked and random prompts):

    (red cat)1.3   "red cat"1.3   cat.attend(1.3)    these words at weight 1.3
    cat+   (red cat)++   cat-   (red cat)--          weight 1.1 per +, 0.9 per -
    ((red)1.2 cat)1.1                                weights multiply when nested: red 1.32, cat 1.1
    ("a red cat", "a dog").blend(0.7, 0.3)           a weighted average of the prompts' embeddings, the weights
                                                     divided by their sum unless the last argument is no_normalize
    ("a red cat", "a dog").and(1, 0.5)               the prompts' embeddings one after the other, each moved from
                                                     the empty prompt's embedding by its weight (default 1)
    \\( \\) \\"                                         literal characters

  A blend or `.and()` is the whole prompt. Text that Compel does not read as syntax stays words, as in Compel: an
  unclosed "(cat" or "cat(dog)" is those characters. Refused, because nothing here would apply them: Compel's
  prompt-to-prompt `.swap()`, LoRAs (`withLora()`, `useLora()`), and text after `.and(...)` (Compel drops it).

`a1111`: AUTOMATIC1111's emphasis syntax, as most Stable Diffusion users type it:

    (red cat)        weight × 1.1          ((red cat))      × 1.21: each pair multiplies
    [red cat]        weight ÷ 1.1          (red cat:1.3)    × 1.3 (any decimal number)
    \\( \\) \\[ \\] \\\\    literal characters

  Weights multiply through nesting: `((red:1.2) cat)` gives red 1.32 and cat 1.1. Stricter than AUTOMATIC1111:
  an unbalanced bracket is refused (AUTOMATIC1111 reads a stray one as text and closes an open one at the end), and
  so are its constructs that need more than text embeddings: BREAK, prompt editing `[from:to:when]`, alternation
  `[a|b]` and extra networks `<lora:...>`.

What a weight does is the same in both syntaxes, so `(red:1.3)` in a1111 means exactly `(red)1.3` in compel: each
token of a fragment of weight w ≠ 1 has its text-encoder hidden state h moved from the empty prompt's hidden state
e at its position to e + (h − e)·w; for w < 1 the result is then blended towards the prompt encoded with that
fragment masked out, the masked version weighted tan((1 − w)·π/2) against 1 (so a weight of 0 or less all but
removes the words). This is Compel's procedure (pipeline.prompt_embeddings). AUTOMATIC1111 itself multiplies hidden
states by the weight and restores their mean; its numbers are not reproduced.
"""

from dataclasses import dataclass

SYNTAXES = ("plain", "compel", "a1111")


class PromptSyntaxError(ValueError):
    """A prompt that does not parse in its syntax; the message says where and why, in one line."""


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class Blend:
    prompts: tuple[tuple[Fragment, ...], ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class WeightedPrompt:
    """What a prompt asks for: parts whose embeddings are joined one after the other (one part, unless `.and()`),
    each a run of weighted fragments or a blend of runs, and each part moved from the empty prompt by its weight."""

    parts: tuple[tuple[Fragment, ...] | Blend, ...]
    weights: tuple[float, ...]

    @classmethod
    def text(cls, text: str) -> "WeightedPrompt":
        return cls(((Fragment(text),),), (1.0,))


def check_syntax_name(syntax) -> str:
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")
    return syntax


def parse_prompt(text: str, syntax: str) -> WeightedPrompt:
    """The weighted fragments of a prompt; a PromptSyntaxError (a ValueError) when it does not parse."""
    check_syntax_name(syntax)
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    if syntax == "plain":
        return WeightedPrompt.text(text)
    if syntax == "compel":
        from .compel_syntax import parse_compel

        return parse_compel(text)
    from .a1111_syntax import parse_a1111

    return parse_a1111(text)


def check_prompt_syntax(text: str, syntax: str) -> None:
    """Raises a ValueError with a one-line reason when `text` does not parse in `syntax`; needs no model."""
    parse_prompt(text, syntax)
