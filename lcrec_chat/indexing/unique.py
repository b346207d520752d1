"""The exact step: make every item's code distinct, moving as little quantisation error as possible.

A pure function of (codes, latents, codebooks), so it is testable without training. The cost of
giving item i the full code c = (c_1..c_L) is its quantisation error ||z_i - sum_l C_l[c_l]||^2.

1. Items whose code nobody else holds keep it.
2. The items of each shared code are placed, per prefix (all levels but the last), by optimal
   assignment (scipy linear_sum_assignment) onto the free last-level codes under that prefix plus the
   shared code itself. When an item's nearest last-level code is the shared one (greedy RQ codes), one
   of them always keeps it and the rest move to the nearest free codes.
3. Items that do not fit (the prefix is full) move one level up: they are assigned to free codes under
   the nearest other prefixes sharing the first L-2 levels, then L-3, ... up to the whole code space.
   There, candidates are enumerated nearest-first (depth-first, children by distance to the group's
   mean residual) and capped at ``max_candidates``; the assignment over them is still exact.
Capacity (product of codebook sizes) below the number of items is an error before anything runs.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy.optimize import linear_sum_assignment


CHUNK = 256   # at most this many items per assignment problem


class CapacityError(ValueError):
    """The code space cannot hold one distinct code per item."""


def check_capacity(num_items: int, codebook_sizes: list[int]) -> None:
    capacity = math.prod(codebook_sizes)
    if capacity < num_items:
        raise CapacityError(
            f"index.codebook_sizes {list(codebook_sizes)} give {capacity} distinct codes for {num_items} "
            "items; raise a codebook size or add a level so that their product is at least the item count")


class _Occupancy:
    """Which full codes are taken, with counts per prefix so full subtrees are skipped in O(1)."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.under = [math.prod(sizes[d:]) for d in range(len(sizes) + 1)]   # capacity below depth d
        self.count: dict[tuple, int] = defaultdict(int)

    def take(self, code: tuple) -> None:
        for d in range(len(code) + 1):
            self.count[code[:d]] += 1

    def full(self, prefix: tuple) -> bool:
        return self.count.get(prefix, 0) >= self.under[len(prefix)]


def _free_codes(prefix: tuple, residual: np.ndarray, books: list[np.ndarray], occ: _Occupancy,
                want: int) -> list[tuple]:
    """Up to ``want`` free full codes under ``prefix``, nearest-first to ``residual`` (depth-first)."""
    found: list[tuple] = []
    levels = len(books)

    def visit(pre: tuple, res: np.ndarray) -> None:
        depth = len(pre)
        order = np.argsort(((books[depth] - res) ** 2).sum(1), kind="stable")
        for k in order:
            child = pre + (int(k),)
            if occ.full(child):
                continue
            if depth == levels - 1:
                found.append(child)
            else:
                visit(child, res - books[depth][k])
            if len(found) >= want:
                return

    if not occ.full(prefix):
        visit(prefix, residual - sum((books[d][c] for d, c in enumerate(prefix)), np.zeros_like(residual)))
    return found


def resolve_collisions(codes: np.ndarray, latents: np.ndarray, codebooks: list[np.ndarray],
                       max_candidates: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Distinct codes for every item. Returns (codes [N, L], moved: bool [N]).

    ``codes`` [N, L] ints (any assignment, e.g. greedy RQ codes after Sinkhorn), ``latents`` [N, d]
    the encoder outputs, ``codebooks`` one [K_l, d] array per level.
    """
    codes = np.asarray(codes, dtype=np.int64)
    latents = np.asarray(latents, dtype=np.float64)
    books = [np.asarray(b, dtype=np.float64) for b in codebooks]
    sizes = [b.shape[0] for b in books]
    n, levels = codes.shape if codes.ndim == 2 else (len(codes), 0)
    if levels != len(books) or latents.shape[0] != n:
        raise ValueError(f"shapes disagree: codes {codes.shape}, latents {latents.shape}, {len(books)} codebooks")
    if n and ((codes < 0).any() or (codes >= np.array(sizes)).any()):
        raise ValueError("codes out of range of their codebooks")
    check_capacity(n, sizes)
    out = codes.copy()
    if n == 0:
        return out, np.zeros(0, bool)

    keys = [tuple(c) for c in codes.tolist()]
    holders: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        holders[key].append(i)
    occ = _Occupancy(sizes)
    pending: list[int] = []
    for key, items in holders.items():
        if len(items) == 1:
            occ.take(key)
        else:
            pending.extend(items)

    for depth in range(levels - 1, -1, -1):
        if not pending:
            break
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in pending:
            groups[keys[i][:depth]].append(i)
        pending = []
        # chunks bound each assignment problem (LSA is cubic); only pathological inputs, such as
        # hundreds of identical vectors, put more than CHUNK items on one prefix
        chunks = [(p, g[s:s + CHUNK]) for p, g in sorted(groups.items()) for s in range(0, len(g), CHUNK)]
        for prefix, items in chunks:
            want = sizes[-1] if depth == levels - 1 else max(len(items), min(max_candidates, 4 * len(items) + 64))
            free = _free_codes(prefix, latents[items].mean(0), books, occ, want)
            if not free:
                pending.extend(items)
                continue
            cand = np.array(free)
            quantised = sum(books[d][cand[:, d]] for d in range(levels))
            z = latents[items]
            cost = (z ** 2).sum(1)[:, None] + (quantised ** 2).sum(1)[None, :] - 2 * z @ quantised.T
            rows, cols = linear_sum_assignment(cost)
            placed = set(rows.tolist())
            for r, c in zip(rows, cols):
                out[items[r]] = cand[c]
                occ.take(tuple(cand[c].tolist()))
            pending.extend(i for r, i in enumerate(items) if r not in placed)
    if pending:   # cannot happen after check_capacity; guard against a silent wrong result
        raise RuntimeError(f"{len(pending)} items left without a distinct code")
    return out, (out != codes).any(1)
