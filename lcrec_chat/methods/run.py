"""Fit and score the LLM methods beside LC-Rec on a run's split: what the `methods` stage runs.

Each function trains one method under its wall-time budgets, saves it into ``run/<name>/`` (the app serves it
from there) and scores it with the one evaluator (ranking.evaluate_ranker) on the run's protocol. CLLM4Rec
scores the whole catalogue in one forward pass, so it is scored on every user of valid and test, also at the
paper's cut-offs (Recall@20/40 = HR@20/40 with one held-out item, NDCG@100). CoLLM answers Yes/No per
candidate: it is scored by AUC on held-out targets against sampled unseen items (beside the collaborative model
alone on the same pairs) and, for top-K, as a re-ranker of SASRec's top `rerank_depth`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..data.split import Split
from ..metrics import STAGES
from ..ranking import evaluate_ranker

log = logging.getLogger(__name__)

PAPER_CUTOFFS = (20, 40, 100)   # CLLM4Rec reports Recall@20/40 and NDCG@100
TRAINED = "trained.json"        # {fingerprint, train_seconds}: the saved model is the finished training of these inputs


def _domain(run: Path):
    """The run's item words (data.domain): content documents and prompts say "movie"/"watched" or "product"/"bought"."""
    from ..catalog import Catalog
    from ..data.domain import domain_named
    with Catalog(run / "catalog.sqlite") as catalog:
        return domain_named(catalog.domain)


def _trained_seconds(folder: Path, fingerprint: str) -> float | None:
    """Training seconds of the model saved in `folder` if it was trained from these inputs, else None: a stage
    stopped while scoring resumes without retraining."""
    path = folder / TRAINED
    if not fingerprint or not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["train_seconds"] if saved.get("fingerprint") == fingerprint else None


def _mark_trained(folder: Path, fingerprint: str, seconds: float) -> None:
    (folder / TRAINED).write_text(json.dumps({"fingerprint": fingerprint, "train_seconds": round(seconds, 1)}))


def run_cllm4rec(cfg: Config, run: Path, split: Split, items: list[dict], fingerprint: str = "") -> dict[str, Any]:
    from .cllm4rec import CLLM4Rec
    folder = run / "cllm4rec"
    train_seconds = _trained_seconds(folder, fingerprint)
    if train_seconds is not None:
        log.info("CLLM4Rec: scoring the model trained in %s", folder)
        model = CLLM4Rec.load(folder, cfg.model)
    else:
        started = time.perf_counter()
        model = CLLM4Rec(cfg.methods.cllm4rec, cfg.model, items, num_users=len(split.users),
                         item_kind=_domain(run).kind)
        model.fit(split, len(items))
        train_seconds = time.perf_counter() - started
        model.save(folder)
        _mark_trained(folder, fingerprint, train_seconds)
    entry: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "fit": model.fit_summary}
    for stage in STAGES:
        scored = time.perf_counter()
        entry[stage] = evaluate_ranker(model, split, stage, cfg.eval.cutoffs, cfg.eval.max_users)
        entry[stage]["seconds"] = round(time.perf_counter() - scored, 1)
    paper = evaluate_ranker(model, split, "test", PAPER_CUTOFFS, cfg.eval.max_users)
    entry["paper_metrics_test"] = {"recall@20": paper["hr@20"], "recall@40": paper["hr@40"],
                                   "ndcg@100": paper["ndcg@100"]}
    log.info("CLLM4Rec: valid NDCG@10 %.4f | test NDCG@10 %.4f (trained %.0f s)", entry["valid"]["ndcg@10"],
             entry["test"]["ndcg@10"], train_seconds)
    return entry


def run_collm(cfg: Config, run: Path, split: Split, items: list[dict], fingerprint: str = "") -> dict[str, Any]:
    from ..baselines import SequentialRecommender
    from .collab_tokens import MFSource, make_source
    from .collm import CoLLM, CoLLMReranker, source_auc
    c = cfg.methods.collm
    sasrec_path, folder = run / "sasrec.pt", run / "collm"
    train_seconds = _trained_seconds(folder, fingerprint)
    if train_seconds is not None:
        log.info("CoLLM: scoring the model trained in %s", folder)
        source = MFSource.load(folder / "mf.pt") if c.collab == "mf" else make_source(c.collab, sasrec_path=sasrec_path)
        model = CoLLM.load(folder, cfg.model, source)
    else:
        started = time.perf_counter()
        source = make_source(c.collab, split=split, num_items=len(items), sasrec_path=sasrec_path, seed=c.seed)
        model = CoLLM(c, cfg.model, items, source, watched=_domain(run).watched)
        model.fit(split, len(items))
        train_seconds = time.perf_counter() - started
        model.save(folder)
        if c.collab == "mf":
            source.save(folder / "mf.pt")
        _mark_trained(folder, fingerprint, train_seconds)
    entry: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "fit": model.fit_summary,
                             "collab": c.collab}
    # AUC: every test user (and `valid_users` valid users), the held-out target against `negatives` unseen items
    auc: dict[str, Any] = {}
    test_users = c.test_users or cfg.eval.max_users
    for stage, users in (("test", test_users), ("valid", c.valid_users)):
        auc[stage] = {"CoLLM": model.auc(split, stage, c.negatives, users, c.seed),
                      f"{c.collab} alone": source_auc(source, split, stage, c.negatives, users, c.seed)}
    auc["test"]["text only (stage 1, TALLRec-style)"] = model.auc(split, "test", c.negatives, c.valid_users,
                                                                  c.seed, collab=False)
    entry["auc"] = auc
    # top-K: re-rank SASRec's top candidates (SASRec is the strongest model the run has)
    base = SequentialRecommender.load(sasrec_path)
    reranker = CoLLMReranker(model, base, depth=c.rerank_depth)
    for stage, users in (("valid", c.valid_users), ("test", test_users)):
        scored = time.perf_counter()
        entry[stage] = evaluate_ranker(reranker, split, stage, cfg.eval.cutoffs, users)
        entry[stage]["seconds"] = round(time.perf_counter() - scored, 1)
    log.info("CoLLM: test AUC %.4f (%s alone %.4f) | re-ranked test NDCG@10 %.4f (trained %.0f s)",
             auc["test"]["CoLLM"]["auc"], c.collab, auc["test"][f"{c.collab} alone"]["auc"],
             entry["test"]["ndcg@10"], train_seconds)
    return entry


RUNNERS = {"cllm4rec": run_cllm4rec, "collm": run_collm}
