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

from .decoding import GenerationStats
from .metrics import ranked_row, stage_inputs
from .ranking import Ranker, evaluate_ranker
from .recommender import Recommender, Request
from .tasks import intention_queries

log = logging.getLogger(__name__)


def generate_ranked(rec: Recommender, requests: Sequence[Request], k: int, desc: str,
                    prior_weight: float = 0.0, stats: GenerationStats | None = None) -> list[list[int]]:
    """Top-k item indices per request, in batches of rec.batch_size, with a progress bar. ``prior_weight`` > 0
    decodes with the recommender's collaborative prior (hybrid); ``stats`` counts the raw beams."""
    ranked = []
    step = rec.batch_size
    for start in tqdm(range(0, len(requests), step), desc=desc, leave=False):
        for recs in rec.recommend_batch(requests[start:start + step], k=k, prior_weight=prior_weight, stats=stats):
            ranked.append([r.idx for r in recs])
    return ranked


class LCRecRanker(Ranker):
    """LC-Rec behind the one ranking interface: trie-constrained generation from a history prompt of ``style``
    (with a collaborative prior when ``prior_weight`` > 0). ``stats`` counts every raw beam it generated."""

    def __init__(self, rec: Recommender, style: str = "dense", template: int = 0, prior_weight: float = 0.0,
                 desc: str = "lcrec") -> None:
        self.rec, self.style, self.template, self.prior_weight, self.desc = rec, style, template, prior_weight, desc
        self.name = f"lcrec-{style}{'-hybrid' if prior_weight else ''}"
        self.num_items = rec.num_items
        self.stats = GenerationStats()

    def recommend(self, histories: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]], k: int,
                  batch_size: int = 0, users: Sequence[int] | None = None) -> list[list[int]]:
        requests = [Request(history=list(h), exclude=list(e), style=self.style, template=self.template)
                    for h, e in zip(histories, exclude)]
        return generate_ranked(self.rec, requests, k, self.desc, self.prior_weight, self.stats)


def _with_generation_facts(ranker: LCRecRanker, run) -> dict:
    """One evaluator for every method (ranking.evaluate_ranker), plus what only generation has: raw-beam
    statistics and the seconds the pass took."""
    started = time.perf_counter()
    row = run()
    return {**row, **ranker.stats.as_dict(), "seconds": round(time.perf_counter() - started, 3)}


def evaluate_sequential(rec: Recommender, split, stage: str, style: str = "chat", template: int = 0,
                        max_users: int = 0, ks: Sequence[int] = (1, 5, 10), prior_weight: float = 0.0) -> dict:
    """Next-item metrics of one prompt style on one stage, with list and raw-beam statistics."""
    ranker = LCRecRanker(rec, style, template, prior_weight, f"{style}{' hybrid' if prior_weight else ''} {stage}")
    return _with_generation_facts(ranker, lambda: evaluate_ranker(ranker, split, stage, ks, max_users))


def evaluate_itemsearch(rec: Recommender, split, stage: str, max_users: int = 0, seed: int = 7,
                        ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Held-out intentions: each query is built only from the user's own held-out target item."""
    histories, exclude, targets = stage_inputs(split, stage, max_users)
    queries = intention_queries(rec.builder.describer, targets, seed)
    requests = [Request(query=q, exclude=e) for q, e in zip(queries, exclude)]
    ranker = LCRecRanker(rec, desc=f"itemsearch {stage}")

    def run() -> dict:
        ranked = generate_ranked(rec, requests, max(max(ks), 10), ranker.desc, 0.0, ranker.stats)
        return ranked_row(ranked, targets, ks, split, rec.num_items)
    return {**_with_generation_facts(ranker, run), "example_queries": queries[:5]}


def choose_prior_weight(rec: Recommender, split, style: str, weights: Sequence[float], users: int) -> dict:
    """Valid NDCG@10 of hybrid decoding for each candidate weight on the first `users` users; the best wins
    (ties go to the smaller weight, i.e. closer to pure LC-Rec). Test data is never looked at."""
    runs = {float(w): evaluate_sequential(rec, split, "valid", style, 0, users, (1, 5, 10), float(w)) for w in weights}
    scores = {w: r["ndcg@10"] for w, r in runs.items()}
    best = max(sorted(scores), key=lambda w: scores[w])
    log.info("hybrid prior weight: valid NDCG@10 %s -> %s", scores, best)
    return {"weight": best, "valid_ndcg@10_per_weight": scores, "users": users, "valid_at_weight": runs[best],
            "seconds": round(sum(r["seconds"] for r in runs.values()), 3)}


def template_spread(rec: Recommender, split, users: int, stage: str = "valid") -> dict:
    """NDCG@10 of the LC-Rec seqrec prompt under each instruction template, on the same users."""
    scores = [evaluate_sequential(rec, split, stage, "seqrec", t, users)["ndcg@10"] for t in range(len(rec.builder.prompts.seqrec))]
    return {"ndcg@10_per_template": scores, "mean": statistics.mean(scores),
            "stdev": statistics.stdev(scores) if len(scores) > 1 else 0.0, "users": users}


def itemsearch_baselines(split, catalog, encoder, item_emb, stage: str, max_users: int = 0, seed: int = 7,
                         ks: Sequence[int] = (1, 5, 10), describer=None) -> dict[str, dict]:
    """What a person or a search box would do with the same held-out intentions as `evaluate_itemsearch`:

    - "filter + popularity": the genres and years the query names (the app's own parser, intents.py) filter the
      catalogue, the most popular matching items first, then the other items by popularity;
    - "query text kNN": cosine between the query's sentence embedding and every item's text embedding.
    Both rank the full catalogue with the user's known items excluded, as every method.
    """
    import numpy as np
    import torch

    from .intents import Filters, Vocabulary, extract_filters
    from .metrics import topk_from_scores
    histories, exclude, targets = stage_inputs(split, stage, max_users)
    queries = intention_queries(describer, targets, seed)
    num_items = len(item_emb)
    popularity = torch.tensor(split.item_popularity(num_items), dtype=torch.float64)
    popularity = popularity / (popularity.max() + 1)              # in [0, 1): a match always outranks a miss
    vocab = Vocabulary(catalog.genres(), years=catalog.years())
    scores = popularity.repeat(len(queries), 1)
    for row, query in enumerate(queries):
        change, _ = extract_filters(query, vocab)
        filters, _ = change.apply(Filters())
        if not filters:
            continue
        keep = catalog.filter_indices(**(filters.catalog_filters() or {}))
        if filters.excluded_genres:
            keep -= catalog.filter_indices(genres=list(filters.excluded_genres))
        scores[row, sorted(keep)] += 1.0
    depth = max(max(ks), 10)
    out = {}
    ranked = topk_from_scores(scores, exclude, depth)
    out["filter + popularity"] = ranked_row(ranked, targets, ks, split, num_items)
    query_emb = np.asarray(encoder.encode(queries, convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
    unit = torch.nn.functional.normalize(torch.as_tensor(np.asarray(item_emb, dtype=np.float32)), dim=1)
    cosine = torch.nn.functional.normalize(torch.as_tensor(query_emb), dim=1) @ unit.T
    ranked = topk_from_scores(cosine, exclude, depth)
    out["query text kNN"] = ranked_row(ranked, targets, ks, split, num_items)
    return out


def calibration_maxima(rec: Recommender, split, users: int = 16, seed: int = 0) -> dict:
    """Each norm's output maxima (smoothing.record_input_maxima) while ``rec`` answers ``users`` training-split
    histories as a dense continuation and as a request, beams and all. Only training items enter (each user's
    history before the valid target)."""
    import random

    from .smoothing import record_input_maxima
    candidates = [u for u in split.users if u.valid >= 0]
    chosen = random.Random(seed).sample(candidates, min(users, len(candidates)))
    requests = [Request(history=split.history(u, "valid"), style=style) for u in chosen for style in ("dense", "chat")]
    with record_input_maxima(evaluation_model(rec)) as maxima:
        for start in tqdm(range(0, len(requests), rec.batch_size), desc="int8 calibration", leave=False):
            rec.recommend_batch(requests[start:start + rec.batch_size], k=10)
    return maxima


def evaluation_model(rec: Recommender):
    """The plain causal LM under ``rec`` (a PEFT wrapper's base model where the adapter is not merged)."""
    return getattr(rec.model, "get_base_model", lambda: rec.model)()


def calibrate_int8_smoothing(rec: Recommender, split, adapter_dir) -> bool:
    """Store SmoothQuant scales (smoothing.py) for ``adapter_dir``, measured with ``rec`` (the fp32 or bf16
    evaluation model), unless current ones are there. Returns True when it calibrated."""
    from .smoothing import load_smoothing, save_smoothing, smoothing_scales
    if load_smoothing(adapter_dir) is not None:
        return False
    maxima = calibration_maxima(rec, split)
    path = save_smoothing(adapter_dir, smoothing_scales(evaluation_model(rec), maxima))
    log.info("int8 smoothing: calibrated on %d norms' inputs -> %s", len(maxima), path)
    return True
