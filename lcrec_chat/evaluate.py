"""Full-ranking evaluation of the tuned model by constrained generation, beside the baselines.

The protocol is fixed (architecture.md, metrics.py): leave-one-out, the whole catalogue ranked, the user's
known items excluded for every method, HR@1/5/10 and NDCG@5/10 on valid and test.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Sequence

from tqdm import tqdm

from .metrics import rank_metrics, stage_inputs
from .recommender import Recommender, Request
from .tasks import SEQREC, intention_queries

log = logging.getLogger(__name__)


def generate_ranked(rec: Recommender, requests: Sequence[Request], k: int, desc: str) -> list[list[int]]:
    """Top-k item indices per request, in batches of rec.batch_size, with a progress bar."""
    ranked = []
    step = rec.batch_size
    for start in tqdm(range(0, len(requests), step), desc=desc, leave=False):
        for recs in rec.recommend_batch(requests[start:start + step], k=k):
            ranked.append([r.idx for r in recs])
    return ranked


def valid_item_rate(rec: Recommender, ranked: list[list[int]]) -> float:
    """Share of generated sequences that decode to a real item (the trie makes this 1.0 by construction;
    measured anyway, from the returned indices against the catalogue size)."""
    total = sum(len(r) for r in ranked)
    return sum(0 <= i < rec.num_items for r in ranked for i in r) / max(1, total)


def evaluate_sequential(rec: Recommender, split, stage: str, style: str = "chat", template: int = 0,
                        max_users: int = 0, ks: Sequence[int] = (1, 5, 10)) -> dict:
    histories, exclude, targets = stage_inputs(split, stage, max_users)
    requests = [Request(history=h, exclude=e, style=style, template=template) for h, e in zip(histories, exclude)]
    started = time.perf_counter()
    ranked = generate_ranked(rec, requests, max(ks), f"{style} {stage}")
    return {**rank_metrics(ranked, targets, ks), "valid_item_rate": valid_item_rate(rec, ranked),
            "seconds": round(time.perf_counter() - started, 3)}


def evaluate_itemsearch(rec: Recommender, split, stage: str, max_users: int = 0, seed: int = 7,
                        ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Held-out intentions: each query is built only from the user's own held-out target item."""
    histories, exclude, targets = stage_inputs(split, stage, max_users)
    queries = intention_queries(rec.builder.describer, targets, seed)
    requests = [Request(query=q, exclude=e) for q, e in zip(queries, exclude)]
    started = time.perf_counter()
    ranked = generate_ranked(rec, requests, max(ks), f"itemsearch {stage}")
    return {**rank_metrics(ranked, targets, ks), "valid_item_rate": valid_item_rate(rec, ranked),
            "example_queries": queries[:5], "seconds": round(time.perf_counter() - started, 3)}


def template_spread(rec: Recommender, split, users: int, stage: str = "valid") -> dict:
    """NDCG@10 of the LC-Rec seqrec prompt under each instruction template, on the same users."""
    scores = [evaluate_sequential(rec, split, stage, "seqrec", t, users)["ndcg@10"] for t in range(len(SEQREC))]
    return {"ndcg@10_per_template": scores, "mean": statistics.mean(scores),
            "stdev": statistics.stdev(scores) if len(scores) > 1 else 0.0, "users": users}


def markdown_table(results: dict[str, dict[str, dict]], ks: Sequence[int] = (1, 5, 10)) -> str:
    """One row per method and stage: | method | stage | users | HR@k... | NDCG@5 | NDCG@10 |"""
    cols = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks if k > 1]
    lines = ["| method | stage | users | " + " | ".join(c.upper().replace("HR", "HR").replace("NDCG", "NDCG")
                                                     for c in cols) + " |",
             "|" + "---|" * (len(cols) + 3)]
    for method, stages in results.items():
        for stage in ("valid", "test"):
            m = stages.get(stage)
            if m:
                lines.append(f"| {method} | {stage} | {m['users']} | "
                             + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)
