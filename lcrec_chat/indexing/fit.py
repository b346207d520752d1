"""Training of the RQ-VAE with a stopping rule instead of a fixed epoch count.

Every ``eval_every`` epochs the whole catalogue is encoded with nearest codes and two numbers are
taken: reconstruction MSE and collision rate (1 - distinct codes / items). Training stops when neither
improved for ``patience`` evaluations in a row (recon must drop by at least MIN_REL_IMPROVEMENT of its
best to count, so a slow endless creep does not keep it alive), or at ``max_epochs``. The weights kept
are the best evaluation by (collision rate, then recon): fewer collisions means fewer items that
post-hoc steps must move away from their nearest code.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import IndexConfig
from ..embed import check_embeddings
from .rqvae import RQVAE, validate_index_config
from .sinkhorn import collision_rate

log = logging.getLogger(__name__)

MIN_REL_IMPROVEMENT = 0.01     # a recon improvement smaller than 1% of the best does not reset patience
KMEANS_MAX_SAMPLES = 65536     # k-means init on all items up to this many (a random subset beyond)
SMALL_STEP_MACS = 2e7          # below this many multiply-adds per step, train on one thread


@dataclass
class FitResult:
    model: RQVAE
    history: list[dict] = field(default_factory=list)   # one row per evaluation
    best_epoch: int = 0
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    threads: int = 0                                    # torch intra-op threads used for training


def _lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to 10% of the peak by ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (0 = unchanged), then restore the old count."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def training_threads(macs_per_step: float) -> int:
    """1 when the model is tiny or torch has at most 2 threads, else 0 (torch's default).

    The steps are short (a few ms), so threads spend their time handing off; as soon as anything else
    runs on a 2-core machine it gets much worse: ML-100K trained in 102 s on 1 thread but 503 s on 2
    (same codes). Bigger machines keep torch's default (large catalogues need the threads).
    """
    return 1 if macs_per_step < SMALL_STEP_MACS or torch.get_num_threads() <= 2 else 0


@torch.no_grad()
def evaluate(model: RQVAE, x: torch.Tensor) -> dict:
    model.eval()
    codes, err = model.greedy_codes(x)
    model.train()
    return {"recon_mse": float(err.mean()), "collision_rate": collision_rate(codes.numpy())}


def fit_rqvae(emb: np.ndarray, cfg: IndexConfig, progress: bool = True) -> FitResult:
    """Train an RQ-VAE on item vectors ``emb`` [N, D] (float32); deterministic for a given cfg.seed."""
    validate_index_config(cfg)
    check_embeddings(emb)
    dims = [emb.shape[1], *cfg.hidden_dims, cfg.code_dim]
    macs = 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:])) * min(cfg.batch_size, len(emb))
    with torch_threads(training_threads(macs)):
        result = _fit(emb, cfg, progress)
        result.threads = torch.get_num_threads()
    return result


def _fit(emb: np.ndarray, cfg: IndexConfig, progress: bool) -> FitResult:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    n = x.shape[0]
    model = RQVAE(x.shape[1], cfg)
    model.set_input_stats(x)
    if cfg.kmeans_init:
        sample = x if n <= KMEANS_MAX_SAMPLES else x[torch.randperm(n, generator=gen)[:KMEANS_MAX_SAMPLES]]
        model.init_codebooks(sample, gen)
    model.train()
    n_batches = max(1, math.ceil(n / cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg.warmup_epochs * n_batches, cfg.max_epochs * n_batches))

    result = FitResult(model=model)
    best_key, best_state = (math.inf, math.inf), None
    best_coll = best_recon = math.inf
    stale = 0
    bar = tqdm(range(1, cfg.max_epochs + 1), desc="rq-vae", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        # equal-sized batches: no 1-row tail batch (BatchNorm would fail, Sinkhorn would be trivial)
        for idx in torch.tensor_split(torch.randperm(n, generator=gen), n_batches):
            xb = x[idx]
            recon_loss, _, q_loss = model(xb, use_sinkhorn=True)
            loss = recon_loss + q_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
        result.epochs_run = epoch
        if epoch % cfg.eval_every and epoch != cfg.max_epochs:
            continue
        row = {"epoch": epoch, "loss": float(loss.detach()), **evaluate(model, x)}
        result.history.append(row)
        improved = (row["collision_rate"] < best_coll - 1e-12
                    or row["recon_mse"] < best_recon * (1 - MIN_REL_IMPROVEMENT))
        best_coll, best_recon = min(best_coll, row["collision_rate"]), min(best_recon, row["recon_mse"])
        stale = 0 if improved else stale + 1
        key = (row["collision_rate"], row["recon_mse"])
        if key < best_key:
            best_key, best_state, result.best_epoch = key, copy.deepcopy(model.state_dict()), epoch
        bar.set_postfix(recon=f"{row['recon_mse']:.2e}", coll=f"{row['collision_rate']:.3f}")
        log.debug("epoch %d: %s", epoch, row)
        if stale >= cfg.patience:
            result.stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - start
    log.info("rq-vae: %d epochs, best epoch %d (collision %.4f, recon %.3e), %.1fs", result.epochs_run,
             result.best_epoch, best_key[0], best_key[1], result.seconds)
    return result
