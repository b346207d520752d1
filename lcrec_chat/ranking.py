"""The one ranking interface every method answers, and the one evaluator that scores them all.

A `Ranker` ranks the whole catalogue for a batch of histories: `score(histories) -> [B, N]` (higher is better)
and, on top of it, `recommend(histories, exclude, k)` with the shared exclusion rule (metrics.topk_from_scores).
Methods that cannot score every item cheaply (LC-Rec generates over a trie, CoLLM answers Yes/No per candidate)
override `recommend` instead. `evaluate_ranker` feeds every method the same users, history windows and
exclusions (metrics.stage_inputs), so the protocol holds by construction.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lcrec_chat.data.split import Split
from lcrec_chat.metrics import ranked_row, stage_inputs, topk_from_scores


class Ranker:
    """Scores every item for a batch of histories; ranks with the shared exclusion rule."""

    name = "ranker"
    num_items = 0
    # True for methods with a learned row per training user (CLLM4Rec's user tokens): `recommend` then passes the
    # users' indices in `split.users` to `score(histories, users)`; a history from the app comes without one
    knows_users = False

    def fit(self, split: Split, num_items: int) -> "Ranker":
        raise NotImplementedError

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        raise NotImplementedError

    def recommend(self, histories: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]],
                  k: int, batch_size: int = 512, users: Sequence[int] | None = None) -> list[list[int]]:
        """Top-k items per history, best first, never an item of the matching `exclude` list. `users`: each
        history's index in `split.users` where it is known (used only by methods that know users)."""
        if len(histories) != len(exclude):
            raise ValueError(f"{len(histories)} histories but {len(exclude)} exclusion lists")
        out: list[list[int]] = []
        for start in range(0, len(histories), batch_size):
            batch = histories[start:start + batch_size]
            if self.knows_users and users is not None:
                scores = self.score(batch, users=users[start:start + batch_size])
            else:
                scores = self.score(batch)
            out += topk_from_scores(scores, exclude[start:start + batch_size], k)
        return out

    def _check_histories(self, histories: Sequence[Sequence[int]]) -> None:
        for row, items in enumerate(histories):
            for i in items:
                if not 0 <= i < self.num_items:
                    raise ValueError(f"history {row} holds item {i}, outside 0..{self.num_items - 1}")


def evaluate_ranker(model: Ranker, split: Split, stage: str, ks: Sequence[int] = (1, 5, 10),
                    max_users: int = 0) -> dict[str, float | int | str]:
    """HR/NDCG at `ks` for one stage ("valid", "test" or "select"), through `metrics.stage_inputs`, plus the
    catalogue coverage and popular-item share of the top-10 lists and each user's rank of the target
    (`metrics.ranked_row`)."""
    histories, exclude, targets = stage_inputs(split, stage, max_users)
    ranked = model.recommend(histories, exclude, max(max(ks), 10), users=list(range(len(histories))))
    return ranked_row(ranked, targets, ks, split, model.num_items)
