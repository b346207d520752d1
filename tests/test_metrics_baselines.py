"""Metrics by hand, the shared exclusion rule, and the three baselines doing their real job."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lcrec_chat.baselines import Popularity, SASRec, TextKNN, evaluate_baseline, run_baselines
from lcrec_chat.config import EvalConfig
from lcrec_chat.metrics import known_items, rank_metrics, stage_inputs, topk_from_scores

try:
    from lcrec_chat.data.split import Split, UserSplit
except ImportError:   # STAND-IN until lcrec_chat/data/split.py lands; same interface
    from dataclasses import dataclass

    @dataclass
    class UserSplit:
        user: str
        train: list[int]
        valid: int
        test: int

    @dataclass
    class Split:
        users: list[UserSplit]
        max_history: int = 20

        def history(self, u: UserSplit, stage: str) -> list[int]:
            past = u.train if stage == "valid" else [*u.train, u.valid]
            return past[-self.max_history:]

        def target(self, u: UserSplit, stage: str) -> int:
            return u.valid if stage == "valid" else u.test

        def train_sequences(self) -> list[list[int]]:
            return [u.train for u in self.users]

        def item_popularity(self, num_items: int) -> np.ndarray:
            return np.bincount([i for u in self.users for i in u.train], minlength=num_items)


def make_split(sequences: list[list[int]], max_history: int = 20) -> Split:
    """Leave-one-out by hand: last = test, second-to-last = valid, rest = train."""
    users = [UserSplit(str(u), s[:-2], s[-2], s[-1]) for u, s in enumerate(sequences)]
    return Split(users, max_history)


# ------------------------------------------------------------------------------------ metrics

def test_rank_metrics_hand_computed():
    ranked = [[5, 1, 2], [3, 4, 5], [7, 8, 9], [9], [0, 1, 2, 3, 4, 6, 7]]
    targets = [5, 5, 1, 9, 6]   # ranks 0, 2, miss, 0, 5
    m = rank_metrics(ranked, targets, ks=(1, 5, 10))
    assert m["users"] == 5
    assert m["hr@1"] == pytest.approx(2 / 5)
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["hr@10"] == pytest.approx(4 / 5)        # rank 5 is inside the top 10 only
    assert m["ndcg@1"] == pytest.approx(2 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5 + 0 + 1) / 5)   # rank 2 -> 1/log2(4) = 0.5
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 0 + 1 + 1 / math.log2(7)) / 5)


def test_rank_metrics_single_cases_and_errors():
    assert rank_metrics([[3]], [3], ks=(5, 10))["ndcg@10"] == 1.0
    assert rank_metrics([[1, 2]], [3], ks=(5,)) == {"hr@5": 0.0, "ndcg@5": 0.0, "users": 1}
    with pytest.raises(ValueError, match="2 ranked lists but 1 targets"):
        rank_metrics([[1], [2]], [1])
    with pytest.raises(ValueError, match="positive"):
        rank_metrics([[1]], [1], ks=(0,))


def test_topk_from_scores_never_returns_excluded_items():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    assert topk_from_scores(scores, [[0], []], 2) == [[1, 2], [3, 2]]
    # everything but one item excluded: the list is shorter, not padded with excluded items
    assert topk_from_scores(scores, [[0, 1, 2], [0, 1, 2, 3]], 3) == [[3], []]
    with pytest.raises(ValueError, match="outside 0..3"):
        topk_from_scores(scores, [[4], []], 2)
    with pytest.raises(ValueError, match="2 score rows but 1"):
        topk_from_scores(scores, [[]], 2)


def test_exclusion_covers_the_whole_past_not_only_the_window():
    split = make_split([[0, 1, 2, 3, 4, 5]], max_history=2)
    user = split.users[0]
    assert known_items(user, "valid") == [0, 1, 2, 3]
    assert known_items(user, "test") == [0, 1, 2, 3, 4]
    histories, exclude, targets = stage_inputs(split, "test")
    assert histories == [[3, 4]] and exclude == [[0, 1, 2, 3, 4]] and targets == [5]
    with pytest.raises(ValueError, match="stage"):
        stage_inputs(split, "train")


# ---------------------------------------------------------------------------------- baselines

def test_popularity_order_and_exclusion():
    # train parts: item 3 x3, item 1 x2, item 0 x1 ; valid/test items are not counted
    split = make_split([[3, 1, 0, 7, 8], [3, 1, 9, 8], [3, 5, 9]])
    pop = Popularity().fit(split, 10)
    assert pop.recommend([[], [3]], [[], [3]], 3) == [[3, 1, 0], [1, 0, 2]]
    # the evaluation path excludes each user's own past: user 0 has 3, 1, 0 in train
    m = evaluate_baseline(pop, split, "valid", ks=(1, 5))
    assert m["users"] == 3


def test_text_knn_returns_nearest_items():
    emb = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1], [0.7, 0.7, 0]], dtype=np.float32)
    knn = TextKNN(emb).fit(num_items=5)
    assert knn.recommend([[0]], [[0]], 2) == [[1, 4]]
    # mean of items 2 and 3 points between them: those two first, then item 4 (shares the y axis)
    assert knn.recommend([[2, 3]], [[]], 3)[0][:2] in ([2, 3], [3, 2])
    with pytest.raises(ValueError, match="outside 0..4"):
        knn.score([[5]])
    with pytest.raises(ValueError, match="5 item embeddings for a catalogue of 6"):
        TextKNN(emb).fit(num_items=6)


def successor_split(num_items: int = 30, users: int = 120, length: int = 14, seed: int = 0) -> Split:
    """Every user walks i, i+1, i+2, ... (mod num_items): the next item is always last + 1."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, num_items, size=users)
    return make_split([[(int(s) + j) % num_items for j in range(length)] for s in starts], max_history=8)


def test_sasrec_learns_a_sequential_pattern():
    split = successor_split()
    model = SASRec(max_len=8, hidden=32, heads=2, lr=5e-3, batch_size=32)
    model.fit(split, 30, epochs=6, patience=6, seed=1, num_threads=1, progress=False)
    test = evaluate_baseline(model, split, "test")
    # chance HR@1 is about 1/20 (30 items minus ~12 excluded); the pattern is deterministic
    assert test["hr@1"] > 0.8, test
    assert model.best_ndcg == max(e["valid_ndcg@10"] for e in model.epochs_log)


def test_sasrec_leaves_global_state_and_restores_best_epoch():
    split = successor_split(users=40)
    threads, rng_state = torch.get_num_threads(), torch.random.get_rng_state()
    model = SASRec(max_len=8, hidden=16, heads=1).fit(split, 30, epochs=3, patience=3, seed=3,
                                                      num_threads=1, progress=False)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert len(model.epochs_log) == 3
    # the restored weights are the best epoch's: re-scoring valid reproduces its NDCG@10
    again = evaluate_baseline(model, split, "valid", ks=(10,))["ndcg@10"]
    assert again == pytest.approx(model.best_ndcg)
    same = SASRec(max_len=8, hidden=16, heads=1).fit(split, 30, epochs=3, patience=3, seed=3,
                                                     num_threads=1, progress=False)
    assert same.epochs_log == model.epochs_log           # seeded: identical run


def test_run_baselines_reports_every_method_and_stage():
    split = successor_split(users=30)
    emb = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    cfg = EvalConfig(sasrec_epochs=2, sasrec_patience=2, max_users=20)
    out = run_baselines(split, 30, emb, cfg, num_threads=1, progress=False)
    assert set(out) == {"pop", "sasrec", "text_knn"}
    for method in out.values():
        for stage in ("valid", "test"):
            assert method[stage]["users"] == 20
            assert set(method[stage]) == {"hr@1", "hr@5", "hr@10", "ndcg@1", "ndcg@5", "ndcg@10", "users"}
    assert out["sasrec"]["epochs_run"] == 2
    assert "text_knn" not in run_baselines(split, 30, None, cfg, num_threads=1, progress=False)
