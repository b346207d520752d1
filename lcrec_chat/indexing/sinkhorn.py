"""Uniform semantic mapping (LC-Rec): Sinkhorn-Knopp assignment of items to last-level codes.

Sinkhorn turns a [items x codes] distance matrix into a transport plan whose rows carry equal mass
and whose columns carry equal mass, so the argmax of each row spreads items evenly over the codes.
This is a balancing heuristic: it does not promise distinct codes (see unique.py for that).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def sinkhorn_assign(dist: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Code index per row of ``dist`` [B, K] from a Sinkhorn plan with uniform marginals.

    Distances are first scaled to [-1, 1] (as LC-Rec does) so that ``epsilon`` means the same thing
    whatever the scale of the latents. In float64 the kernel exp(-d/eps) spans e^(2/eps); up to e^600 it
    fits without underflow and the fast multiplicative updates are used. Smaller epsilons run in the
    log domain (exact, several times slower: an exp per entry and iteration). float32 is avoided:
    its tiny entries fall into denormals, which are ~50x slower on CPUs.
    """
    d = dist.double()
    lo, hi = d.min(), d.max()
    d = (d - (hi + lo) / 2) / ((hi - lo) / 2 + 1e-5)          # now in [-1, 1]
    b, k = d.shape
    if 2.0 / epsilon <= 600:
        q = torch.exp(-(d + 1) / epsilon)                       # in [e^-600, 1]
        for _ in range(iters):
            q = q / (q.sum(0, keepdim=True).clamp(min=1e-300) * k)   # every code gets 1/K
            q = q / (q.sum(1, keepdim=True).clamp(min=1e-300) * b)   # every item gets 1/B
        return q.argmax(1)
    log_q = -d / epsilon
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - math.log(b)
    return log_q.argmax(1)


def collision_groups(codes: np.ndarray) -> list[np.ndarray]:
    """Item indices of every full code held by more than one item."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [order[starts[g]:starts[g + 1]] for g in np.flatnonzero(counts > 1)]


def collision_rate(codes: np.ndarray) -> float:
    """LC-Rec's collision rate: 1 - distinct full codes / items, i.e. the share of items that would
    have to move for every code to be distinct."""
    if len(codes) == 0:
        return 0.0
    return 1.0 - len(np.unique(codes, axis=0)) / len(codes)


def lcrec_reassign(codes: np.ndarray, last_residuals: np.ndarray, last_codebook: np.ndarray,
                   rounds: int, epsilon: float, iters: int) -> tuple[np.ndarray, int]:
    """LC-Rec's post-hoc fix: for up to ``rounds`` rounds, re-pick the last-level code of each group of
    items sharing a full code with Sinkhorn over that group alone (blind to codes held by others, so
    it can create new collisions). Returns (new codes, rounds run).

    ``last_residuals`` [N, d] are the items' residuals entering the last level (they do not change:
    only the last level is re-picked); ``last_codebook`` [K, d].
    """
    codes = codes.copy()
    book = torch.from_numpy(np.asarray(last_codebook, dtype=np.float32))
    res = torch.from_numpy(np.asarray(last_residuals, dtype=np.float32))
    ran = 0
    for ran in range(1, rounds + 1):
        groups = collision_groups(codes)
        if not groups:
            return codes, ran - 1
        for group in groups:
            r = res[torch.from_numpy(group)]
            d = (r.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * r @ book.T).clamp(min=0)
            codes[group, -1] = sinkhorn_assign(d, epsilon, iters).numpy()
    return codes, ran
