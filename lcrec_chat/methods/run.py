"""Fit and score the LLM methods beside LC-Rec on a run's split: what the `methods` stage runs.

Each function trains one method under its wall-time budgets, saves it into ``run/<name>/`` (the app serves it
from there) and scores it with the one evaluator (ranking.evaluate_ranker) on the run's protocol. CLLM4Rec
scores the whole catalogue in one forward pass, so it is scored on every user of valid and test, also at the
paper's cut-offs (Recall@20/40 = HR@20/40 with one held-out item, NDCG@100). CoLLM answers Yes/No per
candidate: it is scored by AUC on held-out targets against sampled unseen items (beside the collaborative model
alone on the same pairs) and, for top-K, as a re-ranker of SASRec's top `rerank_depth`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..locks import file_lock, process_alive, write_atomic
from ..data.split import EVAL_STAGES, Split
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
    for stage in EVAL_STAGES:
        scored = time.perf_counter()
        entry[stage] = evaluate_ranker(model, split, stage, cfg.eval.cutoffs, cfg.eval.max_users)
        entry[stage]["seconds"] = round(time.perf_counter() - scored, 1)
    paper = evaluate_ranker(model, split, "test", PAPER_CUTOFFS, cfg.eval.max_users)
    entry["paper_metrics_test"] = {"recall@20": paper["hr@20"], "recall@40": paper["hr@40"],
                                   "ndcg@100": paper["ndcg@100"]}
    log.info("CLLM4Rec: valid NDCG@10 %.4f | test NDCG@10 %.4f (trained %.0f s)", entry["valid"]["ndcg@10"],
             entry["test"]["ndcg@10"], train_seconds)
    return entry


def _load_or_fit_collm(cfg: Config, run: Path, split: Split, items: list[dict], fingerprint: str):
    """(model, source, train_seconds): the CoLLM saved in run/collm if it was trained from these inputs, else
    a new one trained and saved."""
    from .collab_tokens import MFSource, make_source
    from .collm import CoLLM
    c, sasrec_path, folder = cfg.methods.collm, run / "sasrec.pt", run / "collm"
    train_seconds = _trained_seconds(folder, fingerprint)
    if train_seconds is not None:
        log.info("CoLLM: scoring the model trained in %s", folder)
        source = MFSource.load(folder / "mf.pt") if c.collab == "mf" else make_source(c.collab, sasrec_path=sasrec_path)
        return CoLLM.load(folder, cfg.model, source, progress=True), source, train_seconds
    started = time.perf_counter()
    source = make_source(c.collab, split=split, num_items=len(items), sasrec_path=sasrec_path, seed=c.seed)
    model = CoLLM(c, cfg.model, items, source, watched=_domain(run).watched)
    model.fit(split, len(items))
    train_seconds = time.perf_counter() - started
    model.save(folder)
    if c.collab == "mf":
        source.save(folder / "mf.pt")
    _mark_trained(folder, fingerprint, train_seconds)
    return model, source, train_seconds


# longest first, so two processes sharing the work finish together (see score_collm_pieces)
COLLM_PIECES = ("rerank/valid", "rerank/test", "auc/test", "auc/valid", "text_only_auc/test")
SCORES = "scores.json"   # CoLLM's scored pieces, each under the inputs it was computed from
WAIT_SECONDS = 30        # how often a process re-checks pieces another process is scoring


def score_collm_pieces(cfg: Config, run: Path, split: Split, model, source, fingerprint: str,
                       names: tuple[str, ...] = COLLM_PIECES) -> dict[str, Any]:
    """CoLLM's scoring, piece by piece ("auc/test", "rerank/valid", ...), each saved to run/collm/scores.json
    under a key of everything it depends on. Scoring every user takes over an hour on 2 cores, so:
    - a stage stopped while scoring resumes at the first unfinished piece;
    - a piece being scored is claimed (the process id is saved in its place), so a second `methods` process on
      the same run takes the next unclaimed piece instead: two processes with one thread each
      (OMP_NUM_THREADS=1) score side by side faster than one with two threads. A claim whose process is gone
      is taken over."""
    from ..baselines import SequentialRecommender
    from .collm import CoLLMReranker, source_auc
    c, path = cfg.methods.collm, run / "collm" / SCORES
    lock = path.with_suffix(".lock")
    users = {"test": c.test_users or cfg.eval.max_users, "valid": c.valid_users or cfg.eval.max_users}

    def compute(name: str) -> dict[str, Any]:
        kind, stage = name.split("/")
        if kind == "auc":
            return {"CoLLM": model.auc(split, stage, c.negatives, users[stage], c.seed),
                    f"{c.collab} alone": source_auc(source, split, stage, c.negatives, users[stage], c.seed)}
        if kind == "text_only_auc":
            return model.auc(split, stage, c.negatives, c.text_only_users, c.seed, collab=False)
        # top-K: re-rank SASRec's top candidates (SASRec is the strongest model the run has)
        reranker = CoLLMReranker(model, SequentialRecommender.load(run / "sasrec.pt"), depth=c.rerank_depth,
                                 progress=True)
        scored = time.perf_counter()
        row = evaluate_ranker(reranker, split, stage, cfg.eval.cutoffs, users[stage])
        return {**row, "seconds": round(time.perf_counter() - scored, 1)}

    def saved() -> dict:
        return json.loads(path.read_text()) if path.exists() else {}

    def write(key: str, value: dict | None) -> None:
        """Save one piece (None removes it), under the lock: another process may have saved others meanwhile."""
        with file_lock(lock):
            pieces = saved()
            pieces.pop(key, None)
            write_atomic(path, json.dumps({**pieces, **({key: value} if value is not None else {})}, indent=1))

    def take(key: str) -> tuple[dict | None, bool]:
        """(the finished piece or None, whether this process now holds its claim), read and claimed as one step."""
        with file_lock(lock):
            pieces = saved()
            value = pieces.get(key)
            claim = value["scoring_pid"] if isinstance(value, dict) and set(value) == {"scoring_pid"} else None
            if value is not None and claim is None:
                return value, False
            if claim is not None and claim != os.getpid() and process_alive(claim):
                return None, False   # another process is scoring it
            write_atomic(path, json.dumps({**pieces, key: {"scoring_pid": os.getpid()}}, indent=1))
            return None, True

    keys = {name: json.dumps([fingerprint, name, dataclasses.asdict(c), cfg.eval.cutoffs, cfg.eval.max_users])
            for name in names}
    results: dict[str, Any] = {}
    while len(results) < len(names):
        for name in [n for n in names if n not in results]:
            value, mine = take(keys[name])
            if value is not None:
                results[name] = value
            elif mine:
                log.info("CoLLM: scoring %s", name)
                try:
                    results[name] = compute(name)
                except BaseException:   # stopped or failed: leave the piece to whoever runs next
                    write(keys[name], None)
                    raise
                write(keys[name], results[name])
        if len(results) < len(names):
            time.sleep(WAIT_SECONDS)
    return results


def run_collm(cfg: Config, run: Path, split: Split, items: list[dict], fingerprint: str = "") -> dict[str, Any]:
    c = cfg.methods.collm
    model, source, train_seconds = _load_or_fit_collm(cfg, run, split, items, fingerprint)
    pieces = score_collm_pieces(cfg, run, split, model, source, fingerprint)
    auc = {stage: pieces[f"auc/{stage}"] for stage in EVAL_STAGES}
    auc["test"]["text only (stage 1, TALLRec-style)"] = pieces["text_only_auc/test"]
    entry: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "fit": model.fit_summary,
                             "collab": c.collab, "auc": auc,
                             "valid": pieces["rerank/valid"], "test": pieces["rerank/test"]}
    log.info("CoLLM: test AUC %.4f (%s alone %.4f) | re-ranked test NDCG@10 %.4f (trained %.0f s)",
             auc["test"]["CoLLM"]["auc"], c.collab, auc["test"][f"{c.collab} alone"]["auc"],
             entry["test"]["ndcg@10"], train_seconds)
    return entry


RUNNERS = {"cllm4rec": run_cllm4rec, "collm": run_collm}
