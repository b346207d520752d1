"""Leave-one-out ranking metrics, and the one exclusion rule every method shares.

Protocol (docs: architecture.md, "Evaluation protocol"): each user has a single held-out target;
a method ranks the full catalogue; HR@K = 1 if the target is in the top K; NDCG@K =
1 / log2(rank + 2) with a 0-based rank, 0 if the target is not in the top K (with one relevant
item the ideal DCG is 1, so DCG is already normalised).

Exclusion rule: an item the user already interacted with before the target is never recommended.
"Already interacted" means the user's *whole* known past for that stage, not only the (at most
20-item) history window shown to the model: the train part for "valid", train + the valid item for
"test". Reason: a recommender that re-suggests a movie the user rated 200 interactions ago is as
wrong as one that repeats the last one, and a window-only rule would let methods gain or lose
by how far back they happen to look. The target itself is never excluded, even if the user had
it before (impossible on MovieLens and on LC-Rec's de-duplicated Amazon data, where each
user-item pair appears once); excluding it would make that user a guaranteed miss.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import torch

from lcrec_chat.data.split import STAGES, Split, UserSplit, past_items, target_item


def rank_metrics(ranked: Sequence[Sequence[int]], targets: Sequence[int],
                 ks: Iterable[int] = (1, 5, 10)) -> dict[str, float | int]:
    """HR@k and NDCG@k for every k in `ks`, averaged over users, plus "users" (the count).

    `ranked[u]` is user u's recommendation list, best first (it may be shorter than max(ks)).
    Returns e.g. {"hr@1": .., "hr@5": .., "hr@10": .., "ndcg@1": .., "ndcg@5": .., "ndcg@10": ..,
    "users": 943}. With no users every metric is 0.0.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs must be positive integers, got {ks}")
    if len(ranked) != len(targets):
        raise ValueError(f"{len(ranked)} ranked lists but {len(targets)} targets")
    hits = {k: 0.0 for k in ks}
    gains = {k: 0.0 for k in ks}
    for items, target in zip(ranked, targets):
        rank = _rank_of(items, target, ks[-1])
        if rank is None:
            continue
        gain = _ndcg_gain(rank)
        for k in ks:
            if rank < k:
                hits[k] += 1.0
                gains[k] += gain
    n = len(targets)
    out: dict[str, float | int] = {}
    for k in ks:
        out[f"hr@{k}"] = hits[k] / n if n else 0.0
    for k in ks:
        out[f"ndcg@{k}"] = gains[k] / n if n else 0.0
    out["users"] = n
    return out


def list_metrics(ranked: Sequence[Sequence[int]], split: Split, num_items: int, depth: int = 10,
                 popular: int = 50) -> dict[str, float]:
    """What the top-`depth` lists look like as a whole: "coverage@10", the share of the catalogue that
    appears in at least one user's list, and "top50_share@10", the share of all list slots held by the
    `popular` most interacted items of the training parts (popularity-bound models score near 1)."""
    lists = [list(items)[:depth] for items in ranked]
    slots = sum(len(items) for items in lists)
    counts = split.item_popularity(num_items)
    top = set(sorted(range(num_items), key=lambda i: (-counts[i], i))[:popular])
    return {f"coverage@{depth}": len({i for items in lists for i in items}) / max(1, num_items),
            f"top{popular}_share@{depth}": sum(i in top for items in lists for i in items) / max(1, slots)}


def ranked_row(ranked: Sequence[Sequence[int]], targets: Sequence[int], ks: Sequence[int], split: Split,
               num_items: int) -> dict[str, float | int | str]:
    """One method's row on one stage: HR/NDCG at `ks` (`rank_metrics`), what its top-10 lists look like as a whole
    (`list_metrics`) and each user's rank of the target (`target_ranks`), on which two rows are compared user by
    user (bench/paired_rows.py)."""
    return {**rank_metrics(ranked, targets, ks), **list_metrics(ranked, split, num_items),
            "target_ranks": target_ranks(ranked, targets, max(ks)), "targets_digest": targets_digest(targets)}


def targets_digest(targets: Sequence[int]) -> str:
    """A short fingerprint of the users' targets in order: two rows are compared user by user only where it agrees
    (the same users, the same split and stage), which equal lengths alone do not show."""
    return hashlib.sha1(",".join(map(str, targets)).encode()).hexdigest()[:16]


def target_ranks(ranked: Sequence[Sequence[int]], targets: Sequence[int], depth: int) -> str:
    """Each user's 0-based rank of the target in the first `depth` entries ("-" where absent), comma-joined: the
    per-user outcome two methods are compared on user by user (`paired_difference`), one short string per row so
    a row stays one line in the JSON files it is kept in."""
    ranks = (_rank_of(items, target, depth) for items, target in zip(ranked, targets))
    return ",".join("-" if r is None else str(r) for r in ranks)


def parse_target_ranks(text: str) -> list[int | None]:
    """The inverse of `target_ranks`."""
    return [None if r == "-" else int(r) for r in text.split(",")] if text else []


def paired_difference(ranks_a: Sequence[int | None], ranks_b: Sequence[int | None], k: int = 10,
                      samples: int = 10_000, seed: int = 0) -> dict[str, float | int]:
    """NDCG@k of B minus A on the same users, with a 95% paired bootstrap interval (users resampled, the pairs kept
    together): how far a difference between two rows could come from which users happen to be in the sample. It
    says nothing about a method's own run-to-run spread (seeds), which has to be measured by running it again."""
    import numpy as np
    if len(ranks_a) != len(ranks_b) or not ranks_a:
        raise ValueError(f"paired rows need the same users: {len(ranks_a)} against {len(ranks_b)}")

    def gains(ranks: Sequence[int | None]) -> np.ndarray:
        return np.array([_ndcg_gain(r) if r is not None and r < k else 0.0 for r in ranks])
    a, b = gains(ranks_a), gains(ranks_b)
    diff = b - a
    means = diff[np.random.default_rng(seed).integers(0, len(diff), (samples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {f"ndcg@{k}_a": float(a.mean()), f"ndcg@{k}_b": float(b.mean()), "difference": float(diff.mean()),
            "ci95_low": float(low), "ci95_high": float(high), "users": len(diff),
            "users_b_better": int((diff > 0).sum()), "users_a_better": int((diff < 0).sum())}


def _ndcg_gain(rank: int) -> float:
    """NDCG of a hit at 0-based `rank` with one relevant item (the ideal DCG is 1)."""
    return 1.0 / math.log2(rank + 2)


def _rank_of(items: Sequence[int], target: int, depth: int) -> int | None:
    """0-based position of `target` in the first `depth` entries, None if absent."""
    for i, item in enumerate(items[:depth]):
        if item == target:
            return i
    return None


def topk_from_scores(scores: torch.Tensor, exclude: Sequence[Sequence[int]], k: int) -> list[list[int]]:
    """Top-k item indices per row of a [U, N] score matrix, never returning an excluded item.

    Excluded items get -inf before the top-k; if fewer than k items remain, the list is shorter
    rather than padded with excluded ones. Ties are broken by torch.topk (lowest index first is
    not guaranteed), which only matters for degenerate scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [users, items], got shape {tuple(scores.shape)}")
    num_users, num_items = scores.shape
    if len(exclude) != num_users:
        raise ValueError(f"{num_users} score rows but {len(exclude)} exclusion lists")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    masked = scores.detach().clone()
    if not masked.is_floating_point():
        masked = masked.float()
    rows, cols = [], []
    for u, items in enumerate(exclude):
        for i in items:
            if not 0 <= i < num_items:
                raise ValueError(f"excluded item {i} of user row {u} is outside 0..{num_items - 1}")
            rows.append(u)
            cols.append(i)
    if rows:
        masked[torch.tensor(rows), torch.tensor(cols)] = float("-inf")
    values, indices = masked.topk(min(k, num_items), dim=1)
    keep = values > float("-inf")
    return [idx[ok].tolist() for idx, ok in zip(indices, keep)]


def known_items(user_split: UserSplit, stage: str) -> list[int]:
    """Everything the user interacted with before this stage's target (the exclusion set, see top)."""
    _check_stage(stage)
    target = target_item(user_split, stage)
    return [i for i in dict.fromkeys(past_items(user_split, stage)) if i != target]


def stage_inputs(split: Split, stage: str, max_users: int = 0
                 ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(histories, exclusions, targets) for `stage`, one entry per user of `split.users`, in order.

    Histories are the model-visible window (`split.history`, at most max_history items); exclusions
    follow `known_items`. `max_users` > 0 keeps only the first N users, so every method run with
    the same value sees the same users. (Users too short for a split live in `split.train_only`
    and are never evaluated.)
    """
    _check_stage(stage)
    users = list(split.users)
    if max_users > 0:
        users = users[:max_users]
    histories = [list(split.history(u, stage)) for u in users]
    exclusions = [known_items(u, stage) for u in users]
    targets = [int(split.target(u, stage)) for u in users]
    return histories, exclusions, targets


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
