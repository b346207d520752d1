"""Sequential models as teachers of LC-Rec's code tokens (train.distill_weight, train.distill_teachers).

One held-out item per training position tells the LLM little: which code came next, not which others were
nearly as likely. A sequential model's next-item distribution (SASRec's, or a mixture of the run's models')
says that for every item. At each code token the LLM writes after a collaborative state (collab_prompt.py),
the target is that distribution summed onto the code tokens: at level l, the mass of the items that share the
true item's first l codes, grouped by their level-l code and renormalised. These are the conditionals whose
product is the teacher's probability of an item, so a student that matches them ranks as the teacher does
under trie-constrained beam search (SASRec decoded that way through the shipped trie with 20 beams scores as it
does ranking every item), and can add what it reads in the prompt.

The loss is the cross-entropy of the student's softmax (over its whole vocabulary, as in the ordinary loss)
against these soft targets, added to the ordinary loss with weight `train.distill_weight`.

Those targets only cover the prefixes of items the users took. Beam search also weighs the prefixes the teacher
likes that nobody took in that window; `teacher_paths` (train.teacher_paths) puts the student on such paths too:
sequence-level distillation, some written items replaced by the teacher's own draws.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .methods.collab_tokens import SASRecSource
from .run_folder import load_sequential
from .tasks import Sample, TaskBuilder

log = logging.getLogger(__name__)


class SequentialTeacher:
    """A mixture of the run's sequential models' next-item distributions: sum_m w_m softmax(model_m(history))."""

    def __init__(self, sources: dict[str, SASRecSource], weights: dict[str, float], own_prefix: bool = False) -> None:
        if set(sources) != set(weights) or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(f"teacher weights {weights} must be non-negative, not all zero, one per model "
                             f"({sorted(sources)})")
        total = sum(weights.values())
        self.sources = sources
        self.weights = {name: w / total for name, w in weights.items()}
        self.own_prefix = own_prefix   # train.teacher_prefix_states: each item scored from its prefix's own state

    @classmethod
    def from_run(cls, run: Path, weights: dict[str, float], loaded: dict[str, SASRecSource] | None = None,
                 own_prefix: bool = False) -> "SequentialTeacher":
        """The models named in `weights` ("sasrec", "gru4rec") from the run's baselines stage; `loaded` gives
        those already in memory (the collaborative prompt's SASRec)."""
        return cls(load_sequential(run, list(weights), loaded), weights, own_prefix)

    @torch.no_grad()
    def probabilities(self, histories: Sequence[Sequence[int]],
                      known_states: dict[str, list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """Per history, the next-item distribution after each of its items: [len(history), N]. `known_states`:
        a model's `states_after_each(histories)` where the caller has them already (the prompt's, which are the
        whole window's: not used where the teacher reads each prefix on its own)."""
        mixed, sizes = 0.0, [len(h) for h in histories]
        for name, source in self.sources.items():
            known = None if self.own_prefix else (known_states or {}).get(name)
            states = known or source.states_after_each(histories, own_prefix=self.own_prefix)
            mixed = mixed + self.weights[name] * torch.softmax(torch.cat(states) @ source.item_vectors().T, dim=-1)
        return list(mixed.split(sizes))


class CodeTeacher:
    """Soft targets over each level's code tokens from a teacher's item probabilities."""

    def __init__(self, item_tokens: torch.Tensor) -> None:
        """`item_tokens` [N, L]: item i's code token ids."""
        self.item_tokens = item_tokens.long()
        levels = self.item_tokens.shape[1]
        vocab = [torch.unique(self.item_tokens[:, level]) for level in range(levels)]
        width = max(len(v) for v in vocab)
        # level_tokens[l, s]: the token id of slot s at level l (padding slots repeat the first id, target 0)
        self.level_tokens = torch.stack([torch.cat([v, v[:1].expand(width - len(v))]) for v in vocab])
        # item_slot[i, l]: the slot of item i's level-l token
        self.item_slot = torch.stack([torch.searchsorted(vocab[level], self.item_tokens[:, level].contiguous())
                                      for level in range(levels)], dim=1)

    @classmethod
    def from_prompts(cls, prompts, num_items: int) -> "CodeTeacher":
        """The code token ids of a `CollabDensePrompts`."""
        return cls(torch.tensor([prompts.code_ids(i) for i in range(num_items)]))

    @torch.no_grad()
    def targets(self, probs: torch.Tensor, levels: torch.Tensor, items: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [P, S], probabilities [P, S]) for P points: the teacher's item probabilities [P, N], the
        code level written there and the true item (whose first `level` codes are already written)."""
        if probs.shape[1] != self.item_tokens.shape[0]:
            raise ValueError(f"{probs.shape[1]} item probabilities but {self.item_tokens.shape[0]} coded items")
        same = self.item_tokens.unsqueeze(0) == self.item_tokens[items].unsqueeze(1)             # [P, N, L]
        prefix = torch.cat([torch.ones_like(same[..., :1]), same.cumprod(-1)[..., :-1].bool()], dim=-1)
        allowed = prefix.gather(-1, levels.view(-1, 1, 1).expand(-1, same.shape[1], 1)).squeeze(-1)
        slots = self.item_slot[:, levels].T                                                       # [P, N]
        mass = torch.zeros(len(levels), self.level_tokens.shape[1]).scatter_add_(1, slots, probs.float() * allowed)
        return self.level_tokens[levels], mass / mass.sum(1, keepdim=True).clamp_min(1e-12)

    def loss(self, student_logits: torch.Tensor, probs: torch.Tensor, levels: torch.Tensor,
             items: torch.Tensor) -> torch.Tensor:
        """Mean over points of -sum_c target_c log p_student(c); `student_logits` [P, vocab]."""
        tokens, target = self.targets(probs, levels, items)
        log_probs = torch.log_softmax(student_logits.float(), dim=-1).gather(1, tokens.to(student_logits.device))
        return -(target.to(log_probs.device) * log_probs).sum(1).mean()


def point_tensors(points: Sequence[Sequence[tuple[int, int, int, int]]], vector_counts: Sequence[int]
                  ) -> dict[str, torch.Tensor]:
    """Batch tensors of the distillation points of each row (collab_prompt.distill_points): row, position,
    index into the batch's concatenated states, level, item."""
    rows, positions, vectors, levels, items = [], [], [], [], []
    offset = 0
    for row, (row_points, count) in enumerate(zip(points, vector_counts)):
        for pos, k, level, item in row_points:
            rows.append(row)
            positions.append(pos)
            vectors.append(offset + k)
            levels.append(level)
            items.append(item)
        offset += count
    return {name: torch.tensor(values, dtype=torch.long) for name, values in
            (("row", rows), ("position", positions), ("vector", vectors), ("level", levels), ("item", items))}


def teacher_paths(samples: Sequence[Sample], teacher: SequentialTeacher, share: float, seed: int,
                  builder: TaskBuilder, batch_size: int = 256) -> tuple[list[Sample], int]:
    """The samples with, in each dense window, every written item after the first replaced with probability
    `share` by a draw from the teacher's next-item distribution after the window's original items before it
    (items already in the window excluded, so a replacement is always another item and none appears twice).
    `builder` writes the dense sample of a rewritten window; returns (samples, items replaced).

    Why: a student trained only on the users' own windows learns the teacher's conditionals along the taken
    items' code paths (distill.CodeTeacher); a window with the teacher's draws in it trains them along the paths
    the teacher would take, with the states and soft targets computed on the rewritten window. The draw for a
    position reads the original items before it (one batched teacher pass), not earlier replacements."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"train.teacher_paths is a share of the written items, in [0, 1): {share}")
    out = list(samples)
    dense = [i for i, s in enumerate(samples) if s.task == "seqrec_dense" and len(s.items) > 1]
    if share == 0 or not dense:
        return out, 0
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    replaced = 0
    for start in tqdm(range(0, len(dense), batch_size), desc="teacher paths", unit="batch", leave=False):
        chunk = dense[start:start + batch_size]
        after_each = teacher.probabilities([samples[i].items[:-1] for i in chunk])
        for i, probs in zip(chunk, after_each):
            window = list(samples[i].items)
            positions = [t for t in range(1, len(window)) if rng.random() < share]
            for t in positions:
                weights = probs[t - 1].clone()
                weights[window] = 0.0
                if weights.sum() <= 0:
                    continue
                window[t] = int(torch.multinomial(weights, 1, generator=generator))
                replaced += 1
            if positions:
                out[i] = builder.seqrec_dense(window[:-1], window[-1], None)
    log.info("teacher paths: %d of %d written items replaced by the teacher's draws", replaced,
             sum(len(samples[i].items) - 1 for i in dense))
    return out, replaced
