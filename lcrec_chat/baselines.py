"""Reference recommenders scored under the exact protocol LC-Rec is scored under.

Three baselines, each a scorer over the full catalogue (`score(histories) -> [B, N] tensor`) with
`recommend(histories, exclude, k)` on top, so they share `metrics.topk_from_scores` and
`metrics.stage_inputs` (same users, same history window, same exclusion rule) with LC-Rec:

- `Popularity`: interaction counts over the training parts (what a non-personalised shop shows).
- `SASRec`: a self-attentive sequential model (Kang & McAuley, ICDM 2018), written here from the
  paper: causal self-attention over the last `max_history` items, learned positions, trained with
  full softmax cross-entropy over every item at every position (no sampled negatives, which
  inflate sampled metrics and under-train for full ranking), early stopping on valid NDCG@10.
- `TextKNN`: cosine between the mean text embedding of the history and every item's embedding:
  what the item text alone buys, with no collaborative signal.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lcrec_chat.config import EvalConfig
from lcrec_chat.data.split import Split
from lcrec_chat.metrics import STAGES, rank_metrics, stage_inputs, topk_from_scores

log = logging.getLogger(__name__)


class Baseline:
    """Scores every item for a batch of histories; ranks with the shared exclusion rule."""

    name = "baseline"
    num_items = 0

    def fit(self, split: Split, num_items: int) -> "Baseline":
        raise NotImplementedError

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        raise NotImplementedError

    def recommend(self, histories: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]],
                  k: int, batch_size: int = 512) -> list[list[int]]:
        """Top-k items per history, best first, never an item of the matching `exclude` list."""
        if len(histories) != len(exclude):
            raise ValueError(f"{len(histories)} histories but {len(exclude)} exclusion lists")
        out: list[list[int]] = []
        for start in range(0, len(histories), batch_size):
            scores = self.score(histories[start:start + batch_size])
            out += topk_from_scores(scores, exclude[start:start + batch_size], k)
        return out

    def _check_histories(self, histories: Sequence[Sequence[int]]) -> None:
        for row, items in enumerate(histories):
            for i in items:
                if not 0 <= i < self.num_items:
                    raise ValueError(f"history {row} holds item {i}, outside 0..{self.num_items - 1}")


class Popularity(Baseline):
    """Most interacted items first; ties go to the lower item index (deterministic)."""

    name = "pop"

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None

    def fit(self, split: Split, num_items: int) -> "Popularity":
        counts = torch.tensor(split.item_popularity(num_items), dtype=torch.float64)
        self.num_items = num_items
        # Integer counts plus a tie-break offset in [0, 1): never reorders different counts.
        self.counts = counts - torch.arange(num_items, dtype=torch.float64) / num_items
        return self

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        if self.counts is None:
            raise RuntimeError("Popularity.score called before fit")
        return self.counts.unsqueeze(0).expand(len(histories), -1)


class TextKNN(Baseline):
    """score(item) = cosine(mean embedding of the history, item embedding)."""

    name = "text_knn"

    def __init__(self, item_emb: np.ndarray) -> None:
        emb = torch.as_tensor(np.asarray(item_emb, dtype=np.float32))
        if emb.dim() != 2 or emb.shape[0] == 0:
            raise ValueError(f"item embeddings must be a non-empty [items, dim] array, got {tuple(emb.shape)}")
        self.emb = emb
        self.unit = F.normalize(emb, dim=1)
        self.num_items = emb.shape[0]

    def fit(self, split: Split | None = None, num_items: int | None = None) -> "TextKNN":
        """Nothing to learn; checks the embeddings cover the catalogue."""
        if num_items is not None and num_items != self.num_items:
            raise ValueError(f"{self.num_items} item embeddings for a catalogue of {num_items} items")
        return self

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        self._check_histories(histories)
        users = torch.zeros(len(histories), self.emb.shape[1])
        for row, items in enumerate(histories):
            if items:   # an empty history scores every item 0; the ranking is then arbitrary
                users[row] = self.emb[list(items)].mean(dim=0)
        return F.normalize(users, dim=1) @ self.unit.T


# ---------------------------------------------------------------------------------------- SASRec

class _Block(nn.Module):
    """Pre-norm transformer block: masked multi-head self-attention, then a point-wise FFN."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class _SASRecNet(nn.Module):
    """Input: [B, L] item index + 1, left-padded with 0. Output: [B, L, hidden]."""

    def __init__(self, num_items: int, max_len: int, hidden: int, heads: int, blocks: int,
                 dropout: float) -> None:
        super().__init__()
        self.hidden = hidden
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        nn.init.normal_(self.item_emb.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        n = seq.shape[1]
        real = seq > 0
        keep = real.unsqueeze(-1).to(self.item_emb.weight.dtype)
        pos = torch.arange(n, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.hidden) + self.pos_emb(pos)
        x = self.drop(x) * keep
        # Causal, and no attending to padding; the diagonal stays open so padded rows are not all-masked
        # (they would give NaN); those rows are zeroed by `keep` and never reach the loss.
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=seq.device)
        allowed = (causal & real[:, None, :]) | eye
        for block in self.blocks:
            x = block(x, allowed[:, None]) * keep
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the real items (row 0, padding, left out): item i is column i."""
        return hidden @ self.item_emb.weight[1:].T


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use `n` intra-op threads inside the block, then restore the caller's setting."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_windows(sequences: Sequence[Sequence[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each training sequence into (input, target) windows of `max_len` positions.

    Windows are right-aligned and step back by `max_len`, so every item after the first is a
    target exactly once, with up to `max_len` items of context (the most recent items get full
    windows, like the inference-time history). Inputs are item+1 left-padded with 0; targets are
    item indices, -100 (ignored by cross-entropy) under padding.
    """
    inputs, targets = [], []
    for seq in sequences:
        end = len(seq)
        while end > 1:
            window = list(seq[max(0, end - max_len - 1):end])
            pad = max_len - (len(window) - 1)
            inputs.append([0] * pad + [i + 1 for i in window[:-1]])
            targets.append([-100] * pad + list(window[1:]))
            end -= max_len
    if not inputs:
        raise ValueError("no training sequence has two or more items; SASRec has nothing to learn")
    return torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


class SASRec(Baseline):
    """Self-attentive sequential recommendation, full-softmax training, early stopping on valid."""

    name = "sasrec"

    def __init__(self, max_len: int = 20, hidden: int = 64, heads: int = 1, blocks: int = 2,
                 dropout: float = 0.2, lr: float = 1e-3, batch_size: int = 128, epochs: int = 200,
                 patience: int = 10, seed: int = 42, num_threads: int | None = None,
                 device: str = "cpu", progress: bool = True) -> None:
        if epochs < 1 or patience < 1:
            raise ValueError(f"epochs and patience must be >= 1, got {epochs}, {patience}")
        self.max_len, self.hidden, self.heads, self.blocks = max_len, hidden, heads, blocks
        self.dropout, self.lr, self.batch_size = dropout, lr, batch_size
        self.epochs, self.patience, self.seed = epochs, patience, seed
        self.num_threads, self.progress = num_threads, progress
        self.device = torch.device(device)
        self.net: _SASRecNet | None = None
        self.epochs_log: list[dict[str, float]] = []   # per epoch: loss, valid ndcg@10
        self.best_epoch = 0
        self.best_ndcg = 0.0
        self.fit_seconds = 0.0

    def fit(self, split: Split, num_items: int) -> "SASRec":
        """Train on every user's train part; keep the epoch with the best valid NDCG@10.

        `num_threads` (if set) applies only inside fit; the global torch RNG is left untouched
        (`fork_rng`), so fitting a baseline never changes another component's random stream.
        """
        self.num_items = num_items
        inputs, targets = training_windows(split.train_sequences(), self.max_len)
        if int(targets.max()) >= num_items:
            raise ValueError(f"training data holds item {int(targets.max())}, catalogue has {num_items}")
        valid_h, valid_x, valid_t = stage_inputs(split, "valid")
        start = time.perf_counter()
        with _torch_threads(self.num_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = _SASRecNet(num_items, self.max_len, self.hidden, self.heads, self.blocks,
                                  self.dropout).to(self.device)
            opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
            best_state, since_best = copy.deepcopy(self.net.state_dict()), 0
            self.epochs_log, self.best_epoch, self.best_ndcg = [], 0, -1.0
            bar = tqdm(range(1, self.epochs + 1), desc="SASRec", unit="epoch", disable=not self.progress)
            for epoch in bar:
                loss = self._train_epoch(inputs, targets, opt)
                ranked = self.recommend(valid_h, valid_x, 10)
                ndcg = float(rank_metrics(ranked, valid_t, ks=(10,))["ndcg@10"])
                self.epochs_log.append({"epoch": epoch, "loss": loss, "valid_ndcg@10": ndcg})
                if ndcg > self.best_ndcg:
                    self.best_ndcg, self.best_epoch, since_best = ndcg, epoch, 0
                    best_state = copy.deepcopy(self.net.state_dict())
                else:
                    since_best += 1
                bar.set_postfix(loss=f"{loss:.3f}", ndcg10=f"{ndcg:.4f}", best=self.best_epoch)
                if since_best >= self.patience:
                    break
            self.net.load_state_dict(best_state)
            self.net.eval()
        self.fit_seconds = time.perf_counter() - start
        log.info("SASRec: %d epochs in %.1f s, best valid NDCG@10 %.4f at epoch %d",
                 len(self.epochs_log), self.fit_seconds, self.best_ndcg, self.best_epoch)
        return self

    def _train_epoch(self, inputs: torch.Tensor, targets: torch.Tensor,
                     opt: torch.optim.Optimizer) -> float:
        assert self.net is not None
        self.net.train()
        order = torch.randperm(len(inputs))
        total, count = 0.0, 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x, y = inputs[idx].to(self.device), targets[idx].to(self.device)
            real = y >= 0
            hidden = self.net(x)[real]                      # only positions with a target
            loss = F.cross_entropy(self.net.logits(hidden), y[real])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * int(real.sum())
            count += int(real.sum())
        return total / max(count, 1)

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("SASRec.score called before fit")
        self._check_histories(histories)
        self.net.eval()
        seq = torch.zeros(len(histories), self.max_len, dtype=torch.long)
        for row, items in enumerate(histories):
            items = list(items)[-self.max_len:]
            if items:
                seq[row, -len(items):] = torch.tensor(items) + 1
        hidden = self.net(seq.to(self.device))[:, -1]
        return self.net.logits(hidden).cpu()


# ------------------------------------------------------------------------------ evaluation glue

def evaluate_baseline(model: Baseline, split: Split, stage: str, ks: Sequence[int] = (1, 5, 10),
                      max_users: int = 0) -> dict[str, float | int]:
    """HR/NDCG at `ks` for one stage ("valid" or "test"), through `metrics.stage_inputs`."""
    histories, exclude, targets = stage_inputs(split, stage, max_users)
    ranked = model.recommend(histories, exclude, max(ks))
    return rank_metrics(ranked, targets, ks)


def run_baselines(split: Split, num_items: int, item_emb: np.ndarray | None, cfg: EvalConfig,
                  seed: int = 42, num_threads: int | None = None, progress: bool = True
                  ) -> dict[str, dict[str, Any]]:
    """Fit and score every baseline: {method: {"valid": metrics, "test": metrics, "fit_seconds": s}}.

    Methods: "pop", "sasrec", and "text_knn" when `item_emb` is given ([num_items, dim]).
    Users are limited by `cfg.max_users` exactly as for LC-Rec; SASRec's early stopping uses the
    full valid set (model selection, not reporting).
    """
    models: list[Baseline] = [
        Popularity(),
        SASRec(max_len=split.max_history, epochs=cfg.sasrec_epochs, patience=cfg.sasrec_patience,
               seed=seed, num_threads=num_threads, progress=progress),
    ]
    if item_emb is not None:
        models.append(TextKNN(item_emb))
    else:
        log.info("no item embeddings given; skipping the text-kNN baseline")
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        start = time.perf_counter()
        model.fit(split, num_items)
        entry: dict[str, Any] = {"fit_seconds": round(time.perf_counter() - start, 2)}
        for stage in STAGES:
            entry[stage] = evaluate_baseline(model, split, stage, cfg.topk, cfg.max_users)
        if isinstance(model, SASRec):
            entry["best_epoch"] = model.best_epoch
            entry["epochs_run"] = len(model.epochs_log)
        log.info("%s: valid %s | test %s", model.name, entry["valid"], entry["test"])
        results[model.name] = entry
    return results
