"""Text conditions batched for a stage, when prompts' embeddings have different lengths.

An embedding is 77 tokens per window: one window, unless long_prompts="chunk" keeps a long prompt's later windows
or a Compel `.and()` joins prompts. Stage C and Stage B attend over every token of it, so padding an embedding
changes what its image sees. Hence:

- within one image, the prompt's and the negative prompt's embeddings are brought to one length, because a guided
  step runs both in one forward pass: the shorter gets the empty sequence's hidden states appended, window by
  window (as Compel pads them, pipeline.prompt_embeddings);
- across images nothing is padded: a batch runs as one forward pass per condition length, in the order of their
  first images. An image therefore depends on its own prompts, never on what else is in its batch (up to the
  rounding of batched float kernels).

With the defaults (plain prompts, truncated), every embedding is one window and a batch is one group.
"""

from dataclasses import dataclass

import torch

from .prompt_embeddings import pad_to


@dataclass
class ConditionGroup:
    rows: list[int]  # the batch's images in this group, in order
    hidden_states: torch.Tensor  # [n, L, width], then the n unconditional rows when guided: [2n, L, width]


def group_conditions(conditional: list[torch.Tensor], unconditional: list[torch.Tensor] | None,
                     padding: torch.Tensor | None) -> list[ConditionGroup]:
    """Per-image embeddings [L_i, width] (and their negatives) grouped by length, each group stacked."""
    if unconditional is not None:
        pairs = []
        for cond, uncond in zip(conditional, unconditional, strict=True):
            if cond.shape[0] != uncond.shape[0]:
                length = max(cond.shape[0], uncond.shape[0])
                cond, uncond = pad_to(cond, length, padding), pad_to(uncond, length, padding)
            pairs.append((cond, uncond))
    else:
        pairs = [(cond, None) for cond in conditional]
    by_length: dict[int, list[int]] = {}
    for i, (cond, _) in enumerate(pairs):
        by_length.setdefault(cond.shape[0], []).append(i)
    groups = []
    for rows in by_length.values():
        hidden = [pairs[i][0] for i in rows]
        if unconditional is not None:
            hidden += [pairs[i][1] for i in rows]
        groups.append(ConditionGroup(rows, torch.stack(hidden)))
    return groups
