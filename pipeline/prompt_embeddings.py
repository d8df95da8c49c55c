"""Text embeddings of weighted and long prompts, computed by Compel's procedure (compel 2.x, whose results the tests
compare on the tiny text encoders).

A prompt (pipeline.prompt_syntax.WeightedPrompt) is encoded part by part:

- A run of weighted fragments is tokenized fragment by fragment, every token carrying its fragment's weight, and cut
  into windows of 75 tokens, each encoded as its own 77-token CLIP sequence: start token, the window, end token,
  padding with attention mask 0. With long_prompts="truncate" only the first window is kept (the rest is cut, as
  the pipeline always did); with "chunk" every window is, and the hidden states of the windows are concatenated.
  A window that is not the last ends after its last '.', else its last ',', ';' or ':', else its last whole word,
  else after 75 tokens: how Compel splits with truncate_long_prompts=False.
- A token of weight w ≠ 1 has its hidden state h moved from the hidden state e of the empty sequence at the same
  position: h' = e + (h − e)·w. Each fragment of weight w < 1 then adds the run encoded with that fragment's tokens
  masked out, E_i, to a weighted average with the run E: (E + Σ t_i·E_i) / (1 + Σ t_i), t_i = tan((1 − w_i)·π/2).
- A blend is the weighted sum of its runs' embeddings (weights divided by their sum unless no_normalize); the
  parts of a conjunction are concatenated, a part of weight w ≠ 1 first moved from the empty prompt's embedding by w.
  Where embeddings of different lengths meet (a blend, a conjunction's weighting), the shorter is padded with e.

As in Compel, e (the "empty sequence") is encoded without an attention mask, and the empty prompt of a
conjunction's weights with one.
"""

import math
from dataclasses import dataclass

import torch

from .prompt_syntax import Blend, Fragment, WeightedPrompt

ENCODER_BATCH = 64  # 77-token sequences per text-encoder forward pass
PAD_MASK = 0  # the attention mask of padding, as the pipeline's plain encoding and Würstchen's training have it


@dataclass
class _Run:
    """A run of weighted fragments, planned as 77-token sequences: one per window, and one more set per fragment
    of weight below 1 (with that fragment masked)."""

    weights: list[float]  # per token of all windows
    windows: list[int]  # sequence index per window
    masked: list[tuple[float, list[int]]]  # per fragment of weight < 1: its weight, its masked windows
    truncated: bool


class _Sequences:
    """The distinct 77-token sequences that a batch of prompts needs, encoded together."""

    def __init__(self):
        self.index: dict[tuple, int] = {}

    def add(self, ids: list[int], mask: list[int] | None) -> int:
        return self.index.setdefault((tuple(ids), None if mask is None else tuple(mask)), len(self.index))

    def encode(self, model, device) -> torch.Tensor:
        keys = list(self.index)
        ids = torch.tensor([k[0] for k in keys], device=device)
        masks = torch.tensor([k[1] if k[1] is not None else [1] * len(k[0]) for k in keys], device=device)
        hidden = [model(ids[i: i + ENCODER_BATCH], attention_mask=masks[i: i + ENCODER_BATCH]).last_hidden_state
                  for i in range(0, len(keys), ENCODER_BATCH)]
        return torch.cat(hidden).float()


class WeightedPromptEncoder:
    """Encodes WeightedPrompts with one tokenizer and text model (see the module's docstring)."""

    def __init__(self, tokenizer, model, device, chunk: bool):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.chunk = chunk
        self.length = tokenizer.model_max_length
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.window = self.length - len(self.bos) - len(self.eos)
        self.sequences = _Sequences()
        self.empty_sequence = self.sequences.add(self.bos + self.eos + [tokenizer.pad_token_id] * self.window, None)

    @torch.no_grad()
    def encode(self, prompts: list[WeightedPrompt]) -> tuple[list[torch.Tensor], list[bool], torch.Tensor]:
        """Per prompt its hidden states [77·k, width] (float32) and whether it was cut; and e, the empty
        sequence's hidden states [77, width], the padding of embeddings of different lengths."""
        empty_run = self.plan_run((Fragment(""),))
        plans = []
        for prompt in prompts:
            parts = []
            for part in prompt.parts:
                if isinstance(part, Blend):
                    parts.append(Blend(tuple(self.plan_run(run) for run in part.prompts), part.weights,
                                       part.normalize))
                else:
                    parts.append(self.plan_run(part))
            plans.append(parts)
        hidden = self.sequences.encode(self.model, self.device)
        empty = hidden[self.empty_sequence]
        results, truncated = [], []
        for prompt, parts in zip(prompts, plans, strict=True):
            pieces = []
            for part, weight in zip(parts, prompt.weights, strict=True):
                if isinstance(part, Blend):
                    embedding = self.blend([self.run_embedding(run, hidden, empty) for run in part.prompts],
                                           part.weights, part.normalize, empty)
                else:
                    embedding = self.run_embedding(part, hidden, empty)
                if weight != 1:
                    base = pad_to(self.run_embedding(empty_run, hidden, empty), embedding.shape[0], empty)
                    embedding = base + (embedding - base) * weight
                pieces.append(embedding)
            results.append(torch.cat(pieces))
            runs = [r for part in parts for r in (part.prompts if isinstance(part, Blend) else (part,))]
            truncated.append(any(run.truncated for run in runs))
        return results, truncated, empty

    def fragment_tokens(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids without start and end tokens, uncut."""
        rows = self.tokenizer(texts, truncation=False, padding="do_not_pad", verbose=False)["input_ids"]
        out = []
        for ids in rows:
            if self.bos and ids and ids[0] == self.bos[0]:
                ids = ids[1:]
            if self.eos and ids and ids[-1] == self.eos[0]:
                ids = ids[:-1]
            out.append(ids)
        return out

    def plan_run(self, fragments: tuple[Fragment, ...]) -> _Run:
        fragments = fragments or (Fragment(""),)
        per_fragment = self.fragment_tokens([f.text for f in fragments])
        truncated = sum(len(ids) for ids in per_fragment) > self.window
        if not self.chunk:
            per_fragment = [ids[: self.window] for ids in per_fragment]
        ids = [t for tokens in per_fragment for t in tokens]
        token_weights = [f.weight for f, tokens in zip(fragments, per_fragment, strict=True) for _ in tokens]
        all_ids, weights, mask = self.windows(ids, token_weights)
        windows = self.add_windows(all_ids, mask)
        masked = []
        spans = self.fragment_spans(all_ids, per_fragment)
        for fragment, span in zip(fragments, spans, strict=False):
            if fragment.weight >= 1 or span is None:
                continue
            without = list(mask)
            without[span[0]: span[1] + 1] = [0] * (span[1] + 1 - span[0])
            if self.chunk:  # the start and end markers of each window stay visible
                without[0:: self.length] = [1] * len(without[0:: self.length])
                without[self.length - 1:: self.length] = [1] * len(without[self.length - 1:: self.length])
            masked.append((fragment.weight, self.add_windows(all_ids, without)))
        return _Run(weights, windows, masked, truncated and not self.chunk)

    def windows(self, ids: list[int], weights: list[float]) -> tuple[list[int], list[float], list[int]]:
        """Token ids, weights and attention mask of the 77-token sequences of a run, one after the other."""
        all_ids, all_weights, all_mask = [], [], []
        while True:
            split = self.split_point(ids)
            window, ids = ids[:split], ids[split:]
            window_weights, weights = weights[:split], weights[split:]
            sequence = self.bos + window + self.eos
            padding = self.length - len(sequence)
            all_ids += sequence + [self.tokenizer.pad_token_id] * padding
            all_weights += [1.0] * len(self.bos) + window_weights + [1.0] * len(self.eos) + [1.0] * padding
            all_mask += [1] * len(sequence) + [PAD_MASK] * padding
            if not self.chunk or not ids:
                return all_ids, all_weights, all_mask

    def split_point(self, ids: list[int]) -> int:
        """Where a window ends: after the last sentence end, else phrase end, else word end, else when full."""
        if not self.chunk or len(ids) <= self.window:
            return self.window
        tokens = self.tokenizer.convert_ids_to_tokens(ids)[: self.window]
        for ends in ({".</w>"}, {".</w>", ",</w>", ";</w>", ":</w>"}, None):
            for i in reversed(range(len(tokens))):
                if (tokens[i].endswith("</w>") if ends is None else tokens[i] in ends):
                    return i + 1
        return self.window

    def add_windows(self, ids: list[int], mask: list[int]) -> list[int]:
        n = self.length
        return [self.sequences.add(ids[i: i + n], mask[i: i + n]) for i in range(0, len(ids), n)]

    def fragment_spans(self, ids: list[int], per_fragment: list[list[int]]) -> list[tuple[int, int] | None]:
        """First and last position of each fragment's tokens, found as Compel finds them: searching forward from
        the end of the previous fragment, stepping over window markers; at the cut, a span ends at the last
        position."""
        truncate, last = not self.chunk, len(ids) - 1
        markers = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.tokenizer.bos_token_id}
        spans, start = [], 0
        for tokens in per_fragment:
            if not tokens:
                spans.append(None)
                continue
            if truncate and start >= self.length - 1:
                break
            while start < last and ids[start] != tokens[0]:
                start += 1
            if start >= last:
                if not truncate:
                    raise RuntimeError(f"fragment tokens {tokens} not found in {ids}")
                start = last
            end, matched = start, 0
            while end < last:
                if ids[end] == tokens[matched]:
                    matched += 1
                    if matched == len(tokens):
                        break
                    end += 1
                elif not truncate and ids[end] in markers:
                    end += 1
                else:
                    raise RuntimeError(f"fragment tokens {tokens} do not match {ids[start:end + 1]}")
            else:
                if not truncate:
                    raise RuntimeError(f"fragment tokens {tokens} run past the end of {ids}")
                end = last
            spans.append((start, end))
            start = end + 1
        return spans

    def run_embedding(self, run: _Run, hidden: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        embeddings = [self.weighted(run.windows, run.weights, hidden, empty)]
        lerp = [1.0]
        for weight, windows in run.masked:
            embeddings.append(self.weighted(windows, run.weights, hidden, empty))
            lerp.append(math.tan((1.0 - max(1e-5, weight)) * math.pi / 2))
        factors = torch.tensor(lerp, dtype=embeddings[0].dtype, device=embeddings[0].device)
        factors = factors / factors.sum()
        return (torch.stack(embeddings) * factors[:, None, None]).sum(dim=0)

    def weighted(self, windows: list[int], weights: list[float], hidden: torch.Tensor,
                 empty: torch.Tensor) -> torch.Tensor:
        n, out = self.length, []
        for k, index in enumerate(windows):
            h = hidden[index]
            w = torch.tensor(weights[k * n: (k + 1) * n], dtype=h.dtype, device=h.device)[:, None].expand_as(h)
            unchanged = w == 1
            out.append(h if bool(unchanged.all()) else torch.where(unchanged, h, empty + (h - empty) * w))
        return torch.cat(out)

    @staticmethod
    def blend(embeddings: list[torch.Tensor], weights: tuple[float, ...], normalize: bool,
              empty: torch.Tensor) -> torch.Tensor:
        length = max(e.shape[0] for e in embeddings)
        stacked = torch.stack([pad_to(e, length, empty) for e in embeddings])
        factors = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        if normalize:
            factors = factors / factors.sum()
        return (stacked * factors[:, None, None]).sum(dim=0)


def pad_to(embedding: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """An embedding [L, width] lengthened to `length` tokens by repeating the empty sequence's hidden states."""
    missing = length - embedding.shape[0]
    if missing <= 0:
        return embedding
    if missing % empty.shape[0]:
        raise ValueError(f"cannot pad {embedding.shape[0]} tokens to {length} with windows of {empty.shape[0]}")
    return torch.cat([embedding, empty.to(embedding.dtype).repeat(missing // empty.shape[0], 1)])
