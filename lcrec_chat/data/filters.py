"""Source-independent filters on interaction sequences: k-core and the first-N-users slice."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable
from dataclasses import replace
from typing import TypeVar

from .dataset import Dataset

log = logging.getLogger(__name__)
T = TypeVar("T", bound=Hashable)


def k_core(sequences: dict[str, list[T]], k: int) -> tuple[dict[str, list[T]], int]:
    """Drop users and items with fewer than `k` interactions, repeatedly, until none is left.

    One pass is not enough: removing a user lowers the counts of that user's items, which can
    push an item below `k`, which in turn can push another user below `k`. Returns the
    surviving sequences (user order and within-user order kept) and the number of
    interactions removed. `k <= 1` keeps everything.
    """
    current = {u: list(s) for u, s in sequences.items() if s}
    before = sum(len(s) for s in sequences.values())
    if k > 1:
        rounds = 0
        while True:
            rounds += 1
            item_count = Counter(i for s in current.values() for i in s)
            weak_items = {i for i, c in item_count.items() if c < k}
            weak_users = {u for u, s in current.items() if len(s) < k}
            if not weak_items and not weak_users:
                break
            current = {u: [i for i in s if i not in weak_items]
                       for u, s in current.items() if u not in weak_users}
            current = {u: s for u, s in current.items() if s}
        log.info("%d-core filtering converged after %d rounds", k, rounds)
    after = sum(len(s) for s in current.values())
    return current, before - after


def first_users(dataset: Dataset, max_users: int) -> Dataset:
    """Keep the first `max_users` users in the dataset's user order (0 = all) and every item.

    Items stay so that item indices, and everything keyed on them, agree with the full dataset.
    """
    if max_users < 0:
        raise ValueError(f"max_users must be >= 0, got {max_users}")
    if max_users == 0 or max_users >= len(dataset.sequences):
        return dataset
    kept = dict(list(dataset.sequences.items())[:max_users])
    return replace(dataset, sequences=kept, skipped=dict(dataset.skipped))   # keeps name, items and domain
