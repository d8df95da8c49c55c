"""Compel's prompt syntax (compel 2.x), read exactly as Compel reads it; pipeline.prompt_syntax says what it means."""

import re
import string
from dataclasses import dataclass

from .prompt_syntax import Blend, Fragment, PromptSyntaxError, WeightedPrompt

_SPACE = " \t\r\n"  # what Compel's grammar skips between tokens
_SYNTAX_CHARS = '()",.+-='
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_INTEGER = re.compile(r"-?\d+")
_QUOTED = re.compile(r'"((?:\\"|[^"\n\r])*)"')
_WHITESPACE_ESCAPES = {"\\t": "\t", "\\n": "\n", "\\f": "\f", "\\r": "\r"}
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+")


def _unescape(text: str) -> str:
    # Compel unescapes a fragment's text each time it builds one (parse, flatten, fuse); repeated here to match.
    if '\\"' in text or "\\(" in text or "\\)" in text:
        text = text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')
    return text


@dataclass
class _Words:
    text: str


@dataclass
class _Weighted:
    weight: float
    children: list


class _NoMatch(Exception):
    pass


class _CompelParser:
    """A recursive-descent reading of Compel's grammar: ordered choice, each alternative tried from the same
    position, a failed sequence failing its alternative (the semantics of the pyparsing grammar Compel uses)."""

    def __init__(self, text: str, whole_prompt: bool = True):
        # Compel puts a space after every comma of a whole prompt first; a quoted group's text is read as it is.
        self.s = re.sub(r",(\S)", r", \1", text) if whole_prompt else text

    def fail(self, reason: str, at: int):
        snippet = self.s[max(0, at - 10): at + 20]
        raise PromptSyntaxError(f"compel prompt syntax: {reason} (at character {at}: {snippet!r})")

    def skip(self, i: int) -> int:
        while i < len(self.s) and self.s[i] in _SPACE:
            i += 1
        return i

    def literal(self, i: int, text: str) -> int:
        i = self.skip(i)
        if not self.s.startswith(text, i):
            raise _NoMatch
        return i + len(text)

    def attempt(self, rule, i: int, *args):
        try:
            return rule(i, *args)
        except _NoMatch:
            return None

    # words
    def word(self, i: int):
        """Characters that are not syntax: escaped syntax characters, and + or - inside a word."""
        s, i = self.s, self.skip(i)
        j = i
        while j < len(s):
            c = s[j]
            if c == "\\" and j + 1 < len(s) and s[j + 1] in _SYNTAX_CHARS:
                j += 2
            elif c in "+-" and j + 1 < len(s) and s[j + 1] not in _SPACE and s[j + 1] not in _SYNTAX_CHARS:
                j += 1
            elif c not in string.whitespace and c not in _SYNTAX_CHARS:
                j += 1
            else:
                break
        if j == i:
            raise _NoMatch
        return [_Words(_unescape(s[i:j]))], j

    def free_word(self, i: int):
        s, i = self.s, self.skip(i)
        j = i
        while j < len(s) and s[j] not in string.whitespace:
            j += 1
        if j == i:
            raise _NoMatch
        return [_Words(_unescape(s[i:j]))], j

    def number(self, i: int):
        i = self.skip(i)
        match = _REAL.match(self.s, i) or _INTEGER.match(self.s, i)
        if not match:
            raise _NoMatch
        return float(match.group()), match.end()

    def weight_operator(self, i: int):
        i = self.skip(i)
        for sign in "+-":
            j = i
            while j < len(self.s) and self.s[j] == sign:
                j += 1
            if j > i:
                return self.s[i:j], j
        return self.number(i)

    # groups
    def quoted(self, i: int, inner: str = "fragments"):
        i = self.skip(i)
        match = _QUOTED.match(self.s, i)
        if not match:
            raise _NoMatch
        content = re.sub(r"\\[tnfr]", lambda m: _WHITESPACE_ESCAPES[m.group()], match.group(1))
        content = content.replace('\\"', '"')
        if not content.strip():
            return [[_Words("")]], match.end()
        sub = _CompelParser(content.replace('"', '\\"'), whole_prompt=False)
        if inner == "prompt":
            items = sub.prompt(0)
        else:
            items, j = sub.fragments(0)
            if sub.skip(j) != len(sub.s):
                raise _NoMatch
        return [items], match.end()

    def parenthesized(self, i: int):
        i = self.literal(i, "(")
        items, i = self.fragments(i)
        return items, self.literal(i, ")")

    def target(self, i: int):
        for rule in (self.quoted, self.parenthesized, self.word):
            result = self.attempt(rule, i)
            if result is not None:
                return result
        raise _NoMatch

    def attention(self, i: int):
        """`target.attend(w)`; `(group)w`, `"group"w` with w a number or a run of + or -; `word+`, `word--`."""
        explicit = self.attempt(self.target, i)
        if explicit is not None:
            children, j = explicit
            try:
                j = self.literal(j, ".attend")
                j = self.literal(j, "(")
                weight, j = self.weight_operator(j)
                return [self.weighted(weight, children)], self.literal(j, ")")
            except _NoMatch:
                pass
        for rule, numbers in ((self.quoted, True), (self.parenthesized, True), (self.word, False)):
            result = self.attempt(rule, i)
            if result is None:
                continue
            children, j = result
            if j >= len(self.s) or self.s[j] in _SPACE:  # the operator must follow without a space
                continue
            operator = self.attempt(self.weight_operator, j)
            if operator is None or (isinstance(operator[0], float) and not numbers):
                continue
            return [self.weighted(operator[0], children)], operator[1]
        raise _NoMatch

    @staticmethod
    def weighted(operator, children: list) -> _Weighted:
        if isinstance(operator, str):
            return _Weighted(pow(1.1 if operator[0] == "+" else 0.9, len(operator)), children)
        return _Weighted(operator, children)

    def refuse_unsupported(self, i: int) -> None:
        j = self.skip(i)
        for name in ("withLora", "useLora"):
            if self.s.startswith(name, j) and self.s[self.skip(j + len(name)): self.skip(j + len(name)) + 1] == "(":
                self.fail(f"LoRAs ({name}) are not supported", j)
        result = self.attempt(self.target, i)
        if result is not None:
            k = self.skip(result[1])
            if self.s.startswith(".swap", k) and self.s[self.skip(k + 5): self.skip(k + 5) + 1] == "(":
                self.fail("prompt-to-prompt .swap() is not supported", k)

    def fragments(self, i: int):
        """Words, weighted groups, nested groups, commas and periods: what may stand inside ( ) and " "."""
        items = []
        while True:
            self.refuse_unsupported(i)
            for rule in (self.attention, self.parenthesized, self.quoted, self.word, self.punctuation):
                result = self.attempt(rule, i)
                if result is not None:
                    break
            else:
                return items, i
            items += result[0]
            i = result[1]

    def punctuation(self, i: int):
        i = self.skip(i)
        if i < len(self.s) and self.s[i] in ",.":
            return [_Words(self.s[i])], i + 1
        raise _NoMatch

    def prompt(self, i: int) -> list:
        """A whole prompt: as `fragments`, but any other run of non-space characters is a word too."""
        items = []
        while self.skip(i) < len(self.s):
            self.refuse_unsupported(i)
            for rule in (self.attention, self.quoted, self.parenthesized, self.free_word):
                result = self.attempt(rule, i)
                if result is not None:
                    break
            else:  # a vertical tab or form feed, which Compel's grammar neither skips nor reads
                self.fail(f"unexpected character {self.s[self.skip(i)]!r}", self.skip(i))
            items += result[0]
            i = result[1]
        return items

    # blends and conjunctions
    def operands(self, i: int):
        """`("a", b, (c d))`: the prompts a .blend() or .and() applies to."""
        i = self.literal(i, "(")
        operands = []
        while True:
            result = self.attempt(self.target, i) or self.attempt(self.quoted, i, "prompt")
            if result is None:
                if not operands:
                    raise _NoMatch
                break
            operands.append(result[0])
            i = result[1]
            try:
                following = self.literal(i, ",")
            except _NoMatch:
                break
            if self.attempt(self.target, following) is None and self.attempt(self.quoted, following, "prompt") is None:
                break
            i = following
        return operands, self.literal(i, ")")

    def options(self, i: int):
        """The arguments of .blend(...) or .and(...): numbers, keywords or key=value, separated by commas."""
        i = self.literal(i, "(")
        options = []
        while True:
            option = self.attempt(self.option, i)
            if option is None:
                break
            options.append(option[0])
            i = option[1]
            try:
                following = self.literal(i, ",")
            except _NoMatch:
                break
            if self.attempt(self.option, following) is None:
                break
            i = following
        return options, self.literal(i, ")")

    def option(self, i: int):
        i = self.skip(i)
        keyword = _KEYWORD.match(self.s, i)
        if keyword:
            try:
                j = self.literal(keyword.end(), "=")
                value = self.attempt(self.number, j) or self.attempt(self.keyword, j)
                if value is not None:
                    return keyword.group(), value[1]
            except _NoMatch:
                pass
        number = self.attempt(self.number, i)
        if number is not None:
            return str(number[0]), number[1]
        if keyword:
            return keyword.group(), keyword.end()
        raise _NoMatch

    def keyword(self, i: int):
        match = _KEYWORD.match(self.s, self.skip(i))
        if not match:
            raise _NoMatch
        return match.group(), match.end()

    def operator_call(self, i: int, names: tuple[str, ...]):
        operands, i = self.operands(i)
        j = self.skip(i)
        name = next((n for n in names if self.s.startswith(n, j)), None)
        if name is None:
            raise _NoMatch
        options, end = self.options(j + len(name))
        return operands, name, options, end

    def weights(self, options: list[str], count: int, what: str, at: int) -> list[float]:
        values = []
        for option in options:
            try:
                values.append(float(option))
            except ValueError:
                self.fail(f"{what} weight {option!r} is not a number", at)
        if values and len(values) != count:
            self.fail(f"{what} of {count} prompts with {len(values)} weights", at)
        return values or [1.0] * count

    def parse(self) -> WeightedPrompt:
        s = self.s
        if not s.strip():
            return WeightedPrompt.text("")
        self.refuse_unsupported(0)
        conjunction = self.attempt(self.operator_call, 0, (".and", ".add"))
        if conjunction is not None:
            operands, name, options, end = conjunction
            if self.skip(end) < len(s):
                self.fail(f"text after {name}(...), which Compel would ignore", self.skip(end))
            weights = self.weights(options, len(operands), name, 0)
            kept = [(runs, w) for runs, w in ((_flatten_prompt(op), w) for op, w in zip(operands, weights, strict=True))
                    if runs]
        else:
            blend = self.attempt(self.operator_call, 0, (".blend",))
            if blend is not None:
                operands, _, options, end = blend
                if self.skip(end) < len(s):
                    self.fail("text after .blend(...); a blend must be the whole prompt", self.skip(end))
                normalize = not (options and options[-1] == "no_normalize")
                weights = self.weights(options if normalize else options[:-1], len(operands), ".blend", 0)
                runs = [_flatten_prompt(op) for op in operands]
                if any(not run for run in runs):
                    self.fail(f".blend of {len(weights)} weights over a prompt with no words", 0)
                kept = [(Blend(tuple(runs), tuple(weights), normalize), 1.0)]
            else:
                run = _flatten_prompt(self.prompt(0))
                kept = [(run, 1.0)] if run else []
        if not kept:
            self.fail("no words to encode, only empty groups", 0)
        return WeightedPrompt(tuple(part for part, _ in kept), tuple(w for _, w in kept))


def _flatten(node, scale: float) -> list[Fragment]:
    if isinstance(node, list):
        return [fragment for child in node for fragment in _flatten(child, scale)]
    if isinstance(node, _Weighted):
        return _flatten(node.children, scale * node.weight)
    return [Fragment(_unescape(node.text), 1.0 * scale)]


def _flatten_prompt(items: list) -> tuple[Fragment, ...]:
    """A prompt's fragments with their weights multiplied out; neighbours of equal weight joined by a space."""
    fused: list[Fragment] = []
    for fragment in _flatten(items, 1.0):
        if fused and fused[-1].weight == fragment.weight:
            fused[-1] = Fragment(_unescape(fused[-1].text + " " + fragment.text), fragment.weight)
        else:
            fused.append(fragment)
    return tuple(fused)


def parse_compel(text: str) -> WeightedPrompt:
    return _CompelParser(text).parse()
