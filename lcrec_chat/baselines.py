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
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lcrec_chat.config import EvalConfig
from lcrec_chat.data.split import EVAL_STAGES, Split
from lcrec_chat.metrics import rank_metrics, stage_inputs
from lcrec_chat.ranking import Ranker, evaluate_ranker

log = logging.getLogger(__name__)


class Popularity(Ranker):
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


class TextKNN(Ranker):
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


# ---------------------------------------------------------------------------- sequential models
#
# Both follow RecBole 1.2.1's settings on this protocol (the reference figures in the model card come from
# it): every prefix of a user's training sequence is one sample (history window -> next item), the loss is
# full softmax cross-entropy over every item at the window's last position, scores are the final state times
# the item embedding table (shared input/output embeddings), Adam, early stopping on valid NDCG@10.

class _Dropout(nn.Module):
    """Inverted dropout drawing its mask with torch.rand: the same distribution as nn.Dropout, whose CPU
    bernoulli_ kernel took 40% of a SASRec training step here (3-4x slower than rand + compare)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))


class _SASRecNet(nn.Module):
    """Post-norm transformer (as in SASRec / RecBole): [B, L] item index + 1, left-padded with 0 -> [B, last,
    hidden] states at the `last` rightmost positions (the last is the state after the newest item)."""

    def __init__(self, num_items: int, max_len: int, hidden: int = 64, heads: int = 2, blocks: int = 2,
                 inner: int = 256, dropout: float = 0.5, recbole_block: bool = False) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = _Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, inner, dropout, activation="gelu", batch_first=True,
                                           norm_first=False, layer_norm_eps=1e-12)
        # By default one deviation from RecBole's block, kept because it measured no weaker: torch's layer also
        # drops out after the feed-forward activation (RecBole only after its second linear layer) and its fused
        # query/key/value projection keeps torch's xavier init. `recbole_block` is RecBole's exactly; three seeds
        # on our protocol (bench/baselines_bench.py --recbole-block): valid NDCG@10 0.1300, test 0.1119 +- 0.0034;
        # the default: valid 0.1327 (the protocol chooses on valid), test 0.1111 +- 0.0040 (model card).
        inner_drop = nn.Identity() if recbole_block else _Dropout(dropout)
        layer.dropout, layer.dropout1, layer.dropout2 = inner_drop, _Dropout(dropout), _Dropout(dropout)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.apply(_init_normal)
        if recbole_block:   # the fused projection is no nn.Linear, so _init_normal did not reach it
            for block in self.encoder.layers:
                nn.init.normal_(block.self_attn.in_proj_weight, std=0.02)

    def forward(self, seq: torch.Tensor, last: int = 1) -> torch.Tensor:
        n = seq.shape[1]
        pos = torch.arange(n, device=seq.device)
        x = self.drop(self.norm(self.item_emb(seq) + self.pos_emb(pos)))
        # causal mask; padding keys masked too, except that each position may see itself (no all-masked rows,
        # which would give NaN; padded positions never reach the output, which is the last position)
        blocked = torch.ones(n, n, dtype=torch.bool, device=seq.device).triu(1)
        blocked = blocked | ((seq == 0)[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=seq.device))
        heads = self.encoder.layers[0].self_attn.num_heads
        mask = blocked.repeat_interleave(heads, dim=0)
        return self.encoder(x, mask=mask)[:, -last:]


class _GRU4RecNet(nn.Module):
    """GRU4Rec as in RecBole: embedding dropout, one GRU layer, a dense layer back to the embedding size."""

    def __init__(self, num_items: int, max_len: int, hidden: int = 64, gru_hidden: int = 128,
                 dropout: float = 0.3) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.drop = _Dropout(dropout)
        self.gru = nn.GRU(hidden, gru_hidden, batch_first=True, bias=False)
        self.dense = nn.Linear(gru_hidden, hidden)
        nn.init.xavier_normal_(self.item_emb.weight)
        for weight in (self.gru.weight_ih_l0, self.gru.weight_hh_l0):
            nn.init.xavier_uniform_(weight)

    def forward(self, seq: torch.Tensor, last: int = 1) -> torch.Tensor:
        # left padding: the GRU reads the zero rows first; the state after the last (rightmost) real item is
        # what we score with. Padding rows have embedding 0 (padding_idx), so they barely move the state.
        out, _ = self.gru(self.drop(self.item_emb(seq)))
        return self.dense(out[:, -last:])


def _init_normal(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


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


def training_windows(sequences: Sequence[Sequence[int]], max_len: int, stride: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) windows over the training sequences: inputs [W, max_len] of item + 1 left-padded with 0,
    targets [W, stride] of the next item at each of the window's last `stride` positions (-100 where none).

    Windows end every `stride` items from the end of each sequence, so every item after a user's first is a
    target exactly once, seeing at least `max_len - stride + 1` items of history where the user has them.
    `stride=1` is RecBole's sequential data augmentation (every prefix a sample, the target seeing the full
    window); a larger stride trains on `stride` targets per forward pass for a `stride`-fold saving, at the cost
    of shorter context for the earlier targets of each window.
    """
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in 1..{max_len}, got {stride}")
    inputs, targets = [], []
    for seq in sequences:
        end = len(seq)
        while end > 1:
            window = [i + 1 for i in seq[max(0, end - 1 - max_len):end - 1]]
            inputs.append([0] * (max_len - len(window)) + window)
            first = max(1, end - stride)
            targets.append([-100] * (stride - (end - first)) + list(seq[first:end]))
            end -= stride
    if not inputs:
        raise ValueError("no training sequence has two or more items; there is nothing to learn")
    return torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


class SequentialRecommender(Ranker):
    """A next-item model over the history window, trained with full-softmax cross-entropy; subclasses build
    the network (`_make_net`). Keeps the epoch with the best valid NDCG@10 (patience in epochs)."""

    def __init__(self, max_len: int = 20, lr: float = 1e-3, batch_size: int = 256, epochs: int = 200,
                 patience: int = 10, seed: int = 42, stride: int = 1, num_threads: int | None = None,
                 device: str = "cpu", progress: bool = True, **net_options: Any) -> None:
        if epochs < 1 or patience < 1:
            raise ValueError(f"epochs and patience must be >= 1, got {epochs}, {patience}")
        self.max_len, self.lr, self.batch_size, self.stride = max_len, lr, batch_size, stride
        self.epochs, self.patience, self.seed = epochs, patience, seed
        self.num_threads, self.progress = num_threads, progress
        self.net_options = net_options
        self.device = torch.device(device)
        self.net: nn.Module | None = None
        self.epochs_log: list[dict[str, float]] = []   # per epoch: loss, valid ndcg@10
        self.best_epoch = 0
        self.best_ndcg = 0.0
        self.fit_seconds = 0.0

    def _make_net(self, num_items: int) -> nn.Module:
        raise NotImplementedError

    def fit(self, split: Split, num_items: int) -> "SequentialRecommender":
        """Train on every user's train part; keep the epoch with the best valid NDCG@10.

        `num_threads` (if set) applies only inside fit; the global torch RNG is left untouched
        (`fork_rng`), so fitting a baseline never changes another component's random stream.
        """
        self.num_items = num_items
        inputs, targets = training_windows(split.train_sequences(), self.max_len, self.stride)
        if int(targets.max()) >= num_items:
            raise ValueError(f"training data holds item {int(targets.max())}, catalogue has {num_items}")
        valid_h, valid_x, valid_t = stage_inputs(split, "valid")
        start = time.perf_counter()
        with _torch_threads(self.num_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = self._make_net(num_items).to(self.device)
            opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
            best_state, since_best = copy.deepcopy(self.net.state_dict()), 0
            self.epochs_log, self.best_epoch, self.best_ndcg = [], 0, -1.0
            bar = tqdm(range(1, self.epochs + 1), desc=self.name, unit="epoch", disable=not self.progress)
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
                if since_best >= self.patience:   # RecBole waits one epoch more (no change on GRU4Rec's 3 seeds)
                    break
            self.net.load_state_dict(best_state)
            self.net.eval()
        self.fit_seconds = time.perf_counter() - start
        log.info("%s: %d epochs in %.1f s, best valid NDCG@10 %.4f at epoch %d", self.name,
                 len(self.epochs_log), self.fit_seconds, self.best_ndcg, self.best_epoch)
        return self

    def _logits(self, seq: torch.Tensor, last: int = 1) -> torch.Tensor:
        """Scores over the real items (row 0, padding, left out) at the `last` positions: [B, last, items],
        item i in column i."""
        assert self.net is not None
        return self.net(seq, last) @ self.net.item_emb.weight[1:].T

    def _train_epoch(self, inputs: torch.Tensor, targets: torch.Tensor, opt: torch.optim.Optimizer) -> float:
        assert self.net is not None
        self.net.train()
        order = torch.randperm(len(inputs))
        total = 0.0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x, y = inputs[idx].to(self.device), targets[idx].to(self.device)
            loss = F.cross_entropy(self._logits(x, self.stride).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        return total / len(order)   # per window; with stride 1, per target

    def sequences(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """The model's input for each history: its last `max_len` items + 1, left-padded with 0."""
        seq = torch.zeros(len(histories), self.max_len, dtype=torch.long)
        for row, items in enumerate(histories):
            items = list(items)[-self.max_len:]
            if items:
                seq[row, -len(items):] = torch.tensor(items) + 1
        return seq

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        self._check_histories(histories)
        self.net.eval()
        return self._logits(self.sequences(histories).to(self.device))[:, -1].cpu()

    def save(self, path: str | Path) -> None:
        """Weights and settings, enough for `load` to score without the training data."""
        if self.net is None:
            raise RuntimeError("nothing to save: fit first")
        torch.save({"kind": self.name, "num_items": self.num_items, "max_len": self.max_len,
                    "net_options": self.net_options, "state": self.net.state_dict(),
                    "best_epoch": self.best_epoch, "best_ndcg": self.best_ndcg}, path)

    @staticmethod
    def load(path: str | Path) -> "SequentialRecommender":
        saved = torch.load(path, weights_only=False, map_location="cpu")
        kinds = {cls.name: cls for cls in (SASRec, GRU4Rec)}
        if saved.get("kind") not in kinds:
            raise ValueError(f"{path}: not a saved sequential recommender (kind {saved.get('kind')!r})")
        model = kinds[saved["kind"]](max_len=saved["max_len"], progress=False, **saved["net_options"])
        model.num_items = saved["num_items"]
        model.net = model._make_net(model.num_items)
        model.net.load_state_dict(saved["state"])
        model.net.eval()
        model.best_epoch, model.best_ndcg = saved["best_epoch"], saved["best_ndcg"]
        return model


class SASRec(SequentialRecommender):
    """Self-attentive sequential recommendation (Kang & McAuley, ICDM 2018). Defaults: RecBole's (2 blocks x
    2 heads, hidden 64, inner 256, dropout 0.5)."""

    name = "sasrec"

    def _make_net(self, num_items: int) -> nn.Module:
        return _SASRecNet(num_items, self.max_len, **self.net_options)


class GRU4Rec(SequentialRecommender):
    """Session-based recommendation with a GRU (Hidasi et al., ICLR 2016). Defaults: RecBole's (embedding 64,
    GRU hidden 128, embedding dropout 0.3)."""

    name = "gru4rec"

    def _make_net(self, num_items: int) -> nn.Module:
        return _GRU4RecNet(num_items, self.max_len, **self.net_options)


# ------------------------------------------------------------------------------ evaluation glue

def _mean_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of every metric over seeds, with the NDCG@10 of each seed and its standard deviation; the users'
    target ranks per seed (a mean has no user-by-user outcome of its own)."""
    out: dict[str, Any] = {}
    for stage in EVAL_STAGES:
        rows = [r[stage] for r in runs]
        # the users and their targets are the same for every seed: kept once, not averaged
        out[stage] = {key: rows[0][key] if key in ("users", "targets_digest") else
                      float(np.mean([r[key] for r in rows])) for key in rows[0] if key != "target_ranks"}
        if "target_ranks" in rows[0]:
            out[stage]["target_ranks_per_seed"] = [r["target_ranks"] for r in rows]
        per_seed = [r["ndcg@10"] for r in rows]
        out[stage]["ndcg@10_per_seed"] = per_seed
        out[stage]["ndcg@10_std"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    out["fit_seconds"] = round(float(np.mean([r["fit_seconds"] for r in runs])), 2)
    out["best_epoch"] = [r["best_epoch"] for r in runs]
    out["epochs_run"] = [r["epochs_run"] for r in runs]
    return out


SEQUENTIAL = {"sasrec": SASRec, "gru4rec": GRU4Rec}


def model_file(name: str, seeds: Sequence[int], index: int) -> str:
    """The file of the `index`-th seed's fitted `name` model in a run folder: <name>.pt, then <name>_s<seed>.pt."""
    return f"{name}.pt" if index == 0 else f"{name}_s{seeds[index]}.pt"


def saved_model_files(seeds: Sequence[int]) -> list[str]:
    """Every sequential model file `run_baselines` writes for these seeds."""
    return [model_file(name, seeds, i) for name in SEQUENTIAL for i in range(len(seeds))]


def run_baselines(split: Split, num_items: int, item_emb: np.ndarray | None, cfg: EvalConfig,
                  num_threads: int | None = None, progress: bool = True, save_dir: str | Path | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Fit and score every baseline: {method: {"valid": metrics, "test": metrics, "fit_seconds": s, ...}}.

    Methods: "pop", "sasrec", "gru4rec" and "text_knn" when `item_emb` is given ([num_items, dim]). The
    sequential models are fitted once per seed of `cfg.baseline_seeds`; their row is the mean over seeds
    with each seed's NDCG@10 and the spread. Users are limited by `cfg.max_users` exactly as for LC-Rec; early
    stopping uses the full valid set (model selection, not reporting). With `save_dir`, every seed's fitted
    sequential model is written there (`model_file`: the first seed's as `<name>.pt`, which hybrid decoding and the
    collaborative prompt read; the others as `<name>_s<seed>.pt`, for teacher ensembles and the head's extra states).
    """
    results: dict[str, dict[str, Any]] = {}
    single: list[Ranker] = [Popularity()]
    if item_emb is not None:
        single.append(TextKNN(item_emb))
    else:
        log.info("no item embeddings given; skipping the text-kNN baseline")
    for model in single:
        start = time.perf_counter()
        model.fit(split, num_items)
        entry: dict[str, Any] = {"fit_seconds": round(time.perf_counter() - start, 2)}
        for stage in EVAL_STAGES:
            entry[stage] = evaluate_ranker(model, split, stage, cfg.cutoffs, cfg.max_users)
        results[model.name] = entry
    for name, cls in SEQUENTIAL.items():
        runs = []
        for i, seed in enumerate(cfg.baseline_seeds):
            model = cls(max_len=split.max_history, epochs=cfg.baseline_epochs, patience=cfg.baseline_patience,
                        seed=seed, stride=cfg.baseline_stride, num_threads=num_threads, progress=progress).fit(split, num_items)
            run: dict[str, Any] = {"fit_seconds": round(model.fit_seconds, 2), "best_epoch": model.best_epoch,
                                   "epochs_run": len(model.epochs_log)}
            for stage in EVAL_STAGES:
                run[stage] = evaluate_ranker(model, split, stage, cfg.cutoffs, cfg.max_users)
            runs.append(run)
            if save_dir is not None:
                Path(save_dir).mkdir(parents=True, exist_ok=True)
                model.save(Path(save_dir) / model_file(name, cfg.baseline_seeds, i))
        results[name] = _mean_over_seeds(runs)
    for name, entry in results.items():
        log.info("%s: valid NDCG@10 %.4f | test NDCG@10 %.4f", name, entry["valid"]["ndcg@10"],
                 entry["test"]["ndcg@10"])
    return results
