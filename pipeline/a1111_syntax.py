"""AUTOMATIC1111's emphasis syntax; pipeline.prompt_syntax says what it means and where it is stricter."""

import math
import re

from .prompt_syntax import Fragment, PromptSyntaxError, WeightedPrompt

_A1111_TOKEN = re.compile(r"""
    \\[()\[\]\\]          # an escaped bracket or backslash
  | \\                    # a lone backslash (dropped, as AUTOMATIC1111 does)
  | [(\[]
  | :\s*([+-]?[.\d]+)\s*\)  # a weight closing a round bracket
  | [)\]]
  | [^\\()\[\]:]+
  | :
""", re.X)
_A1111_UNSUPPORTED = [
    (re.compile(r"\bBREAK\b"), "BREAK is not supported"),
    (re.compile(r"<\s*(lora|lyco|hypernet)\s*:", re.I), "extra networks (<lora:...>) are not supported"),
]


def parse_a1111(text: str) -> WeightedPrompt:
    def fail(reason: str, at: int):
        snippet = text[max(0, at - 10): at + 20]
        raise PromptSyntaxError(f"a1111 prompt syntax: {reason} (at character {at}: {snippet!r})")

    for pattern, reason in _A1111_UNSUPPORTED:
        found = pattern.search(text)
        if found:
            fail(reason, found.start())
    pieces: list[list] = []  # [text, weight]
    open_brackets: list[tuple[str, int, int]] = []  # (bracket, first piece, character)

    def close(bracket: str, multiplier: float, at: int) -> None:
        if not open_brackets:
            fail(f"'{bracket}' closes nothing; write \\{bracket} for the character", at)
        opened, first, _ = open_brackets.pop()
        expected = ")" if opened == "(" else "]"
        if bracket != expected:
            fail(f"'{bracket}' closes '{opened}'", at)
        for piece in pieces[first:]:
            piece[1] *= multiplier

    for match in _A1111_TOKEN.finditer(text):
        token, weight, at = match.group(), match.group(1), match.start()
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in "([":
            open_brackets.append((token, len(pieces), at))
        elif weight is not None:
            try:
                value = float(weight)
            except ValueError:
                fail(f"weight {weight!r} is not a number", at)
            if not math.isfinite(value):
                fail(f"weight {weight!r} is not finite", at)
            close(")", value, at)
        elif token in ")]":
            close(token, 1.1 if token == ")" else 1 / 1.1, at)
        else:
            inside_square = open_brackets and open_brackets[-1][0] == "["
            if inside_square and token == ":":
                fail("prompt editing [from:to:when] is not supported", at)
            if inside_square and "|" in token:
                fail("alternation [a|b] is not supported", at + token.index("|"))
            pieces.append([token, 1.0])
    if open_brackets:
        bracket, _, at = open_brackets[-1]
        fail(f"'{bracket}' is never closed; write \\{bracket} for the character", at)
    merged: list[Fragment] = []
    for piece_text, weight in pieces or [["", 1.0]]:
        if merged and merged[-1].weight == weight:
            merged[-1] = Fragment(merged[-1].text + piece_text, weight)
        else:
            merged.append(Fragment(piece_text, weight))
    return WeightedPrompt((tuple(merged),), (1.0,))
