"""The index stage: items -> text vectors -> RQ-VAE -> distinct codes, with its run-folder artifacts.

Writes to the run folder: item_emb.npy (+ item_emb.json), rqvae.pt, index_report.json,
code_usage.png and, last, codes.json (so a crash never leaves codes that look complete).
"""
from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import Config, IndexConfig
from ..embed import item_dict, texts_key, check_embeddings, embed_items, item_texts
from ..locks import write_atomic
from .collab import collaborative_vectors, sequences_key, vectors_key, with_collaborative
from .fit import FitResult, fit_rqvae, torch_threads
from .report import code_usage, neighbour_first_code_share, plot_code_usage
from .rqvae import RQVAE, validate_index_config
from .sinkhorn import collision_rate, lcrec_reassign
from .unique import check_capacity, resolve_collisions

log = logging.getLogger(__name__)

CODES_FILE, MODEL_FILE, REPORT_FILE, PLOT_FILE = "codes.json", "rqvae.pt", "index_report.json", "code_usage.png"
# LC-Rec's published post-hoc procedure, for the comparison column (independent of our config)
LCREC_ROUNDS, LCREC_EPSILON, LCREC_ITERS = 20, 0.003, 50


class IndexArtifactError(ValueError):
    """A missing, unreadable or incompatible index artifact in a run folder."""


def dataset_fingerprint(items: Sequence[Any]) -> dict:
    """What ties codes to a catalogue: the number of items and a hash of their titles in order."""
    titles = "\n".join(str(item_dict(it).get("title", "")) for it in items)
    return {"num_items": len(items), "titles_sha256": hashlib.sha256(titles.encode()).hexdigest()}


def _stage_key(cfg: IndexConfig, texts_hash: str, fingerprint: dict, sequences_hash: str = "") -> str:
    payload = json.dumps({"index": asdict(cfg), "texts": texts_hash, "fingerprint": fingerprint,
                          "sequences": sequences_hash}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1))


def _try_skip(run: Path, key: str) -> dict | None:
    if not all((run / f).exists() for f in (CODES_FILE, MODEL_FILE, REPORT_FILE, PLOT_FILE)):
        return None
    try:
        if json.loads((run / CODES_FILE).read_text()).get("stage_key") != key:
            return None
        report = json.loads((run / REPORT_FILE).read_text())
    except (json.JSONDecodeError, OSError):
        return None
    log.info("index stage skipped: inputs and config unchanged (use force to rerun)")
    return {**report, "skipped": True}


def _last_residuals(latents: np.ndarray, codes: np.ndarray, books: list[np.ndarray]) -> np.ndarray:
    res = latents.copy()
    for level in range(len(books) - 1):
        res -= books[level][codes[:, level]]
    return res


def _recon_mse(model: RQVAE, x: torch.Tensor, codes: np.ndarray) -> float:
    """Reconstruction MSE (standardised space) when items are decoded from the given codes."""
    with torch.no_grad():
        z_q = sum(book[torch.from_numpy(codes[:, lvl])] for lvl, book in enumerate(model.codebooks))
        return float(((model.decoder(z_q) - model.normalise(x)) ** 2).mean())


def run_index(cfg: Config, items: Sequence[Any], force: bool = False, progress: bool = True,
              train_sequences: Sequence[Sequence[int]] | None = None,
              collab_vectors: np.ndarray | None = None) -> dict:
    """Build distinct item codes for ``items`` (Item objects or catalogue dicts, in index order).

    ``train_sequences`` (item indices per training user) are needed when ``index.collab_weight > 0``;
    ``collab_vectors`` ([N, D], e.g. `sequential_item_vectors`) when ``index.collab_source`` is "sasrec".

    Returns the report dict (also written as index_report.json); ``skipped`` is True when the run folder
    already held the artifacts of the same items and index config.
    """
    icfg = cfg.index
    validate_index_config(icfg)
    if not items:
        raise ValueError("no items to index")
    check_capacity(len(items), icfg.codebook_sizes)
    run = cfg.run_path
    run.mkdir(parents=True, exist_ok=True)
    if icfg.collab_weight > 0 and not train_sequences:
        raise ValueError("index.collab_weight > 0 needs the training sequences (run the prepare stage first)")
    from_model = icfg.collab_weight > 0 and icfg.collab_source != "svd"
    if from_model and (collab_vectors is None or len(collab_vectors) != len(items)):
        raise ValueError(f"index.collab_source: {icfg.collab_source} needs one collaborative vector per item")
    fingerprint = dataset_fingerprint(items)
    collab_key = (vectors_key(collab_vectors) if from_model else
                  sequences_key(train_sequences) if icfg.collab_weight > 0 else "")
    key = _stage_key(icfg, texts_key(icfg, item_texts(items, icfg.embed_fields, icfg.embed_separately)),
                     fingerprint, collab_key)
    if not force and (skipped := _try_skip(run, key)) is not None:
        return skipped

    times: dict[str, float] = {}
    t = time.perf_counter()
    emb = embed_items(items, icfg, cache_dir=run)
    check_embeddings(emb)
    times["embed_s"] = time.perf_counter() - t
    vectors = emb
    if icfg.collab_weight > 0:
        t = time.perf_counter()
        collab = collab_vectors if from_model else collaborative_vectors(train_sequences, len(items),
                                                                          icfg.collab_dim)
        vectors = with_collaborative(emb, collab, icfg.collab_weight)
        times["collab_s"] = time.perf_counter() - t

    t = time.perf_counter()
    fit = fit_rqvae(vectors, icfg, progress=progress)
    times["train_s"] = time.perf_counter() - t

    with torch_threads(1):   # from here on only small ops (one encoder pass, Sinkhorn on small groups)
        return _assign_and_save(cfg, items, emb, vectors, fit, fingerprint, key, times)


def _assign_and_save(cfg: Config, items: Sequence[Any], emb: np.ndarray, vectors: np.ndarray, fit: FitResult,
                     fingerprint: dict, key: str, times: dict[str, float]) -> dict:
    """``emb``: the text vectors (for the neighbour report); ``vectors``: what the RQ-VAE indexed."""
    icfg, run, model = cfg.index, cfg.run_path, fit.model
    t = time.perf_counter()
    x = torch.from_numpy(vectors)
    greedy, _ = model.greedy_codes(x)
    greedy = greedy.numpy().astype(np.int64)
    latents = model.latents(x).numpy()
    books = model.codebook_arrays()
    last_res = _last_residuals(latents, greedy, books)
    use_sk = icfg.sinkhorn_epsilon > 0 and icfg.reassign_rounds > 0
    balanced, rounds = (lcrec_reassign(greedy, last_res, books[-1], icfg.reassign_rounds,
                                       icfg.sinkhorn_epsilon, icfg.sinkhorn_iters) if use_sk else (greedy, 0))
    final, moved = resolve_collisions(balanced, latents, books)
    times["assign_s"] = time.perf_counter() - t

    t = time.perf_counter()
    same_as_ours = use_sk and (icfg.reassign_rounds, icfg.sinkhorn_epsilon, icfg.sinkhorn_iters) == (
        LCREC_ROUNDS, LCREC_EPSILON, LCREC_ITERS)
    lcrec = balanced if same_as_ours else lcrec_reassign(
        greedy, last_res, books[-1], LCREC_ROUNDS, LCREC_EPSILON, LCREC_ITERS)[0]
    times["lcrec_compare_s"] = time.perf_counter() - t

    n = len(items)
    report = {
        "items": n,
        "codebook_sizes": list(icfg.codebook_sizes),
        "capacity": int(np.prod(icfg.codebook_sizes, dtype=np.float64)),
        "collision_rate_greedy": collision_rate(greedy),
        "collision_rate_before_exact": collision_rate(balanced),
        "collision_rate_after_exact": collision_rate(final),
        "items_moved_by_exact_step": int(moved.sum()),
        "reassign_rounds_run": rounds,
        "lcrec_procedure": {"collision_rate": collision_rate(lcrec),
                            "distinct_codes": int(len(np.unique(lcrec, axis=0))),
                            "rounds": LCREC_ROUNDS, "epsilon": LCREC_EPSILON},
        "codes_used_per_level": code_usage(final, icfg.codebook_sizes),
        "recon_mse_greedy": _recon_mse(model, x, greedy),
        "recon_mse_final": _recon_mse(model, x, final),
        "neighbour_same_first_code": neighbour_first_code_share(emb, final),
        "training": {"epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch,
                     "stopped_early": fit.stopped_early, "threads": fit.threads, "history": fit.history},
        "embedding_dim": int(emb.shape[1]),
        "indexed_dim": int(vectors.shape[1]),
        "collab_weight": icfg.collab_weight,
        "collab_source": icfg.collab_source if icfg.collab_weight > 0 else "",
        "times_s": {k: round(v, 2) for k, v in times.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "skipped": False,
    }
    if report["collision_rate_after_exact"] != 0.0:   # resolve_collisions guarantees it; never ship otherwise
        raise RuntimeError("index codes still collide after the exact step")

    t = time.perf_counter()
    torch.save({"state_dict": model.state_dict(), "input_dim": int(vectors.shape[1]), "index_config": asdict(icfg),
                "fingerprint": fingerprint, "stage_key": key}, run / MODEL_FILE)
    plot_code_usage(final, icfg.codebook_sizes, run / PLOT_FILE)
    report["times_s"]["save_s"] = round(time.perf_counter() - t, 2)
    report["times_s"]["total_s"] = round(sum(report["times_s"].values()), 2)
    _write_json(run / REPORT_FILE, report)
    _write_json(run / CODES_FILE, {"codebook_sizes": list(icfg.codebook_sizes), "codes": final.tolist(),
                                   "fingerprint": fingerprint, "index_config": asdict(icfg), "stage_key": key})
    log.info("index: %d items, collisions greedy %.4f -> before exact %.4f -> 0 (%d moved); LC-Rec procedure %.4f",
             n, report["collision_rate_greedy"], report["collision_rate_before_exact"],
             report["items_moved_by_exact_step"], report["lcrec_procedure"]["collision_rate"])
    return report


def load_codes(run_path: str | Path, expected_fingerprint: dict | None = None,
               index_cfg: IndexConfig | None = None) -> list[list[int]]:
    """Codes per item index from ``run_path``/codes.json, checked to be complete and distinct.

    ``expected_fingerprint`` (from dataset_fingerprint) rejects codes built for another catalogue;
    ``index_cfg`` rejects codes built with another index config.
    """
    path = Path(run_path) / CODES_FILE
    if not path.exists():
        raise IndexArtifactError(f"{path} not found: run the index stage for this config first")
    try:
        data = json.loads(path.read_text())
        sizes, codes, fp = list(data["codebook_sizes"]), data["codes"], data["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise IndexArtifactError(f"{path}: not a codes file ({e}); rerun the index stage with force") from e
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise IndexArtifactError(
            f"{path} was built for another dataset ({fp.get('num_items')} items, titles hash "
            f"{str(fp.get('titles_sha256'))[:12]}) than this one ({expected_fingerprint.get('num_items')} items, "
            f"titles hash {str(expected_fingerprint.get('titles_sha256'))[:12]}); rerun the index stage with force")
    if index_cfg is not None:
        # a setting added after the codes were built counts as its default (what they were built with)
        built = {**asdict(IndexConfig()), **(data.get("index_config") or {})}
        diff = sorted(k for k, v in asdict(index_cfg).items() if built.get(k) != v)
        if diff:
            raise IndexArtifactError(f"{path} was built with another index config (differs in: "
                                     f"{', '.join('index.' + k for k in diff)}); rerun the index stage with force")
    if len(codes) != fp.get("num_items"):
        raise IndexArtifactError(f"{path}: {len(codes)} codes for {fp.get('num_items')} items")
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[1] != len(sizes) or (arr < 0).any() or (arr >= np.array(sizes)).any():
        raise IndexArtifactError(f"{path}: codes do not fit codebook sizes {sizes}")
    if len(np.unique(arr, axis=0)) != len(arr):
        raise IndexArtifactError(f"{path}: codes are not distinct; rerun the index stage with force")
    return [list(map(int, c)) for c in codes]


def load_rqvae(run_path: str | Path) -> RQVAE:
    """The trained RQ-VAE of a run folder (e.g. to encode new items), in eval mode."""
    path = Path(run_path) / MODEL_FILE
    if not path.exists():
        raise IndexArtifactError(f"{path} not found: run the index stage for this config first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = RQVAE(blob["input_dim"], IndexConfig(**blob["index_config"]))
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError, EOFError) as e:
        raise IndexArtifactError(f"{path}: not a usable RQ-VAE checkpoint ({e}); rerun the index stage") from e
    return model.eval()
