"""Metrics by hand, the shared exclusion rule, and the three baselines doing their real job."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lcrec_chat.ranking import evaluate_ranker
from lcrec_chat.baselines import (GRU4Rec, Popularity, SASRec, SequentialRecommender, TextKNN,
                                  run_baselines, saved_model_files, training_windows)
from lcrec_chat.config import EvalConfig
from lcrec_chat.data.dataset import Dataset, Item
from lcrec_chat.data.movielens import load_ml100k
from lcrec_chat.data.split import Split, UserSplit, leave_one_out
from lcrec_chat.metrics import (list_metrics, known_items, paired_difference, parse_target_ranks, rank_metrics,
                                stage_inputs, target_ranks, targets_digest, topk_from_scores)

ROOT = Path(__file__).resolve().parents[1]


def make_split(sequences: list[list[int]], max_history: int = 20, num_items: int = 0) -> Split:
    """The project's leave-one-out split of hand-written sequences (last = test, then valid)."""
    num_items = num_items or max(i for s in sequences for i in s) + 1
    items = [Item(str(i), f"item {i}") for i in range(num_items)]
    return leave_one_out(Dataset("hand", items, {f"u{u}": s for u, s in enumerate(sequences)}), max_history)


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
    # repeats: the past is de-duplicated, and the target itself is never excluded (a sure miss)
    again = UserSplit("r", [4, 2, 4], 2, 4)
    assert known_items(again, "valid") == [4] and known_items(again, "test") == [2]
    # the select stage (split.py): the last training item from those before it, all of them excluded
    assert known_items(user, "select") == [0, 1, 2]
    assert stage_inputs(split, "select") == ([[1, 2]], [[0, 1, 2]], [3])


# ---------------------------------------------------------------------------------- baselines

def test_popularity_order_and_exclusion():
    # train parts: item 3 x3, item 1 x2, item 0 x1 ; valid/test items are not counted
    split = make_split([[3, 1, 0, 7, 8], [3, 1, 9, 8], [3, 5, 9]])
    pop = Popularity().fit(split, 10)
    assert pop.recommend([[], [3]], [[], [3]], 3) == [[3, 1, 0], [1, 0, 2]]
    # valid: each user's own past is skipped, so targets 7, 9, 5 sit at ranks 4, 7, 4
    m = evaluate_ranker(pop, split, "valid", ks=(1, 5))
    assert m.pop("target_ranks") == "4,-,4"   # each user's rank in the top max(ks) = 5, "-" past it
    assert m.pop("targets_digest") == targets_digest([7, 9, 5])
    assert m == pytest.approx({"hr@1": 0.0, "hr@5": 2 / 3, "ndcg@1": 0.0,
                               "ndcg@5": 2 / math.log2(6) / 3, "users": 3,
                               # lists: 7, 8 and 9 items once the past is excluded; every item but 3 appears
                               "coverage@10": 0.9, "top50_share@10": 1.0})


def test_target_ranks_round_trip_and_the_paired_difference_by_hand():
    ranked, targets = [[5, 1, 2], [7, 8], [3, 9, 4]], [2, 6, 3]
    text = target_ranks(ranked, targets, depth=3)
    assert text == "2,-,0" and parse_target_ranks(text) == [2, None, 0] and parse_target_ranks("") == []
    assert target_ranks(ranked, targets, depth=2) == "-,-,0"
    # B finds user 1's target at rank 0 where A missed it; user 0 worse (rank 2 -> miss); user 2 alike
    a, b = [2, None, 0], [None, 0, 0]
    out = paired_difference(a, b, k=10, samples=2000, seed=1)
    assert out["ndcg@10_a"] == pytest.approx((1 / math.log2(4) + 1) / 3)
    assert out["ndcg@10_b"] == pytest.approx(2 / 3)
    assert out["difference"] == pytest.approx(out["ndcg@10_b"] - out["ndcg@10_a"])
    assert (out["users_b_better"], out["users_a_better"], out["users"]) == (1, 1, 3)
    assert out["ci95_low"] < out["difference"] < out["ci95_high"]
    # the same outcomes on both sides: no difference and no interval; a cut-off past a rank drops it
    same = paired_difference(a, a)
    assert same["difference"] == same["ci95_low"] == same["ci95_high"] == 0.0
    assert paired_difference([2], [None], k=2)["difference"] == 0.0
    # B better for every one of 200 users: the interval leaves 0 out
    assert paired_difference([None] * 200, [0] * 100 + [3] * 100)["ci95_low"] > 0.5
    with pytest.raises(ValueError, match="same users"):
        paired_difference([0, 1], [0])



def _paired_rows(tmp_path, row_a: dict, row_b: dict, *flags: str) -> subprocess.CompletedProcess:
    """bench/paired_rows.py run as a person runs it, on two run folders holding one valid row each."""
    runs = []
    for name, row in (("a", row_a), ("b", row_b)):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "lever_rows.json").write_text(json.dumps({"valid": row}))
        runs.append(str(tmp_path / name))
    return subprocess.run([sys.executable, str(ROOT / "bench/paired_rows.py"), *runs, "--stages", "valid", *flags],
                          capture_output=True, text=True, timeout=120)


def test_paired_rows_refuses_rows_of_other_targets_and_ranks_it_did_not_keep(tmp_path):
    ranked = [[5, 1, 2], [7, 8], [3, 9, 4]]
    row_a = ranked_row_like(ranked, [2, 6, 3])
    row_b = ranked_row_like([[2, 1, 5], [6, 8], [9, 3, 4]], [2, 6, 3])
    done = _paired_rows(tmp_path / "same", row_a, row_b)
    assert done.returncode == 0, done.stderr
    assert "| valid |" in done.stdout and json.loads((tmp_path / "same/b/paired_rows.json").read_text())
    other = ranked_row_like(ranked, [2, 7, 3])   # another split's targets, the same number of users
    refused = _paired_rows(tmp_path / "other", row_a, other)
    assert refused.returncode != 0 and "different targets" in refused.stderr
    deep = _paired_rows(tmp_path / "deep", row_a, row_b, "--k", "20")   # ranks were kept down to 10 only
    assert deep.returncode != 0 and "--k 20" in deep.stderr


def ranked_row_like(ranked: list[list[int]], targets: list[int]) -> dict:
    """The fields of a metrics.ranked_row that paired_rows.py reads, at the evaluator's cutoffs (1, 5, 10)."""
    return {**rank_metrics(ranked, targets, (1, 5, 10)), "target_ranks": target_ranks(ranked, targets, 10),
            "targets_digest": targets_digest(targets)}

def test_list_metrics_by_hand():
    split = make_split([[3, 1, 0, 7, 8], [3, 1, 9, 8], [3, 5, 9]])   # train popularity: 3 > 1 > 0 > the rest
    ranked = [[3, 1, 2], [3, 0], [4]]
    m = list_metrics(ranked, split, num_items=10, popular=2)
    assert m == pytest.approx({"coverage@10": 5 / 10, "top2_share@10": 3 / 6})   # 3, 1, 3 of the 6 slots


def test_text_knn_returns_nearest_items():
    emb = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1], [0.7, 0.7, 0]], dtype=np.float32)
    knn = TextKNN(emb).fit(num_items=5)
    assert knn.recommend([[0]], [[0]], 2) == [[1, 4]]
    # mean of items 2 and 3 points between them: those two first, then item 4 (shares the y axis)
    ranked = knn.recommend([[2, 3]], [[]], 3)[0]
    assert sorted(ranked[:2]) == [2, 3] and ranked[2] == 4
    with pytest.raises(ValueError, match="outside 0..4"):
        knn.score([[5]])
    with pytest.raises(ValueError, match="5 item embeddings for a catalogue of 6"):
        TextKNN(emb).fit(num_items=6)


def successor_split(num_items: int = 30, users: int = 120, length: int = 14, seed: int = 0) -> Split:
    """Every user walks i, i+1, i+2, ... (mod num_items): the next item is always last + 1."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, num_items, size=users)
    return make_split([[(int(s) + j) % num_items for j in range(length)] for s in starts], 8, num_items)


def test_sasrec_learns_a_sequential_pattern():
    split = successor_split()
    model = SASRec(max_len=8, hidden=32, heads=2, dropout=0.1, lr=5e-3, batch_size=32, epochs=6, patience=6,
                   seed=1, num_threads=1, progress=False).fit(split, 30)
    test = evaluate_ranker(model, split, "test")
    # chance HR@1 is 1/17 (30 items minus the 13 already seen); the pattern is deterministic
    assert test["hr@1"] > 0.8, test
    assert model.best_ndcg == max(e["valid_ndcg@10"] for e in model.epochs_log)



def test_sasrec_with_recboles_block_learns_and_reloads_as_that_block(tmp_path):
    split = successor_split()
    model = SASRec(max_len=8, hidden=32, heads=2, dropout=0.1, lr=5e-3, batch_size=32, epochs=6, patience=6,
                   seed=1, num_threads=1, progress=False, recbole_block=True).fit(split, 30)
    assert evaluate_ranker(model, split, "test")["hr@1"] > 0.8
    block = model.net.encoder.layers[0]
    # RecBole's feed-forward drops out after its second linear layer only; the default also after the activation
    assert isinstance(block.dropout, torch.nn.Identity) and not isinstance(block.dropout2, torch.nn.Identity)
    default = SASRec(max_len=8, hidden=32, seed=1, progress=False)._make_net(30)
    assert not isinstance(default.encoder.layers[0].dropout, torch.nn.Identity)
    # its fused query/key/value projection starts from normal(0.02), as every other linear layer does
    fresh = SASRec(max_len=8, hidden=64, recbole_block=True, progress=False)._make_net(1000)
    assert abs(float(fresh.encoder.layers[0].self_attn.in_proj_weight.std()) - 0.02) < 0.002
    model.save(tmp_path / "sasrec.pt")
    again = SequentialRecommender.load(tmp_path / "sasrec.pt")
    assert isinstance(again.net.encoder.layers[0].dropout, torch.nn.Identity)
    assert torch.allclose(again.score([[1, 2, 3]]), model.score([[1, 2, 3]]))

def test_gru4rec_learns_a_sequential_pattern_and_reloads(tmp_path):
    split = successor_split()
    model = GRU4Rec(max_len=8, hidden=32, gru_hidden=32, dropout=0.0, lr=1e-2, batch_size=32, epochs=8,
                    patience=8, seed=1, num_threads=1, progress=False).fit(split, 30)
    assert evaluate_ranker(model, split, "test")["hr@1"] > 0.8
    model.save(tmp_path / "gru.pt")
    again = SequentialRecommender.load(tmp_path / "gru.pt")
    assert isinstance(again, GRU4Rec) and torch.allclose(again.score([[1, 2, 3]]), model.score([[1, 2, 3]]))


def test_training_windows_make_every_later_item_a_target_once():
    sequences = [[0, 1, 2, 3, 4, 5, 6], [7, 8]]
    for stride in (1, 3, 5):
        inputs, targets = training_windows(sequences, max_len=5, stride=stride)
        assert inputs.shape[1] == 5 and targets.shape[1] == stride
        assert sorted(targets[targets >= 0].tolist()) == [1, 2, 3, 4, 5, 6, 8]
        for x, y in zip(inputs.tolist(), targets.tolist()):
            for pos, target in enumerate(y):           # each target's input position holds the item before it
                if target >= 0:
                    assert x[5 - stride + pos] - 1 == target - 1
    inputs, targets = training_windows(sequences, max_len=5, stride=1)   # RecBole: every prefix, full window
    assert inputs.tolist()[0] == [2, 3, 4, 5, 6] and targets.tolist()[0] == [6]
    with pytest.raises(ValueError, match="stride"):
        training_windows(sequences, max_len=5, stride=6)


def test_sasrec_leaves_global_state_and_restores_best_epoch():
    split = successor_split(users=40)
    threads, rng_state = torch.get_num_threads(), torch.random.get_rng_state()
    small = dict(max_len=8, hidden=16, heads=2, inner=32, epochs=3, patience=3, seed=3, num_threads=1,
                 progress=False)
    model = SASRec(**small).fit(split, 30)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert len(model.epochs_log) == 3
    # the restored weights are the best epoch's: re-scoring valid reproduces its NDCG@10
    again = evaluate_ranker(model, split, "valid", ks=(10,))["ndcg@10"]
    assert again == pytest.approx(model.best_ndcg)
    same = SASRec(**small).fit(split, 30)
    assert same.epochs_log == model.epochs_log           # seeded: identical run


def test_run_baselines_reports_every_method_and_stage(tmp_path):
    split = successor_split(users=30)
    emb = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    cfg = EvalConfig(baseline_epochs=2, baseline_patience=2, baseline_seeds=[42], max_users=20)
    out = run_baselines(split, 30, emb, cfg, num_threads=1, progress=False, save_dir=tmp_path)
    assert set(out) == {"pop", "sasrec", "gru4rec", "text_knn"}
    for method in out.values():
        for stage in ("valid", "test"):
            assert method[stage]["users"] == 20
            assert {"hr@1", "hr@5", "hr@10", "ndcg@1", "ndcg@5", "ndcg@10", "users", "coverage@10",
                    "top50_share@10"} <= set(method[stage])
    assert out["sasrec"]["epochs_run"] == [2] and out["sasrec"]["test"]["ndcg@10_per_seed"]
    assert SequentialRecommender.load(tmp_path / "sasrec.pt").num_items == 30
    two = run_baselines(split, 30, None, EvalConfig(baseline_epochs=1, baseline_seeds=[1, 2], max_users=20),
                        num_threads=1, progress=False, save_dir=tmp_path / "two")
    per_seed = two["gru4rec"]["test"]["ndcg@10_per_seed"]
    assert len(per_seed) == 2 and two["gru4rec"]["test"]["ndcg@10"] == pytest.approx(sum(per_seed) / 2)
    # every seed's model is kept: the first as <name>.pt, the others by seed (teacher ensembles, the head's states)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(saved_model_files([1, 2])) == [
        "gru4rec.pt", "gru4rec_s2.pt", "sasrec.pt", "sasrec_s2.pt"]
    second = SequentialRecommender.load(tmp_path / "two" / "sasrec_s2.pt")
    histories, exclude, targets = stage_inputs(split, "test", 20)
    ranked = second.recommend(histories, exclude, 10)
    second_ndcg = two["sasrec"]["test"]["ndcg@10_per_seed"][1]
    assert rank_metrics(ranked, targets, (10,))["ndcg@10"] == pytest.approx(second_ndcg)
    # the users' outcomes are kept per seed, not averaged: the second seed's are its own model's
    assert two["sasrec"]["test"]["target_ranks_per_seed"][1] == target_ranks(ranked, targets, 10)
    assert "target_ranks" not in two["sasrec"]["test"]
    assert "text_knn" not in run_baselines(split, 30, None, cfg, num_threads=1, progress=False)


def test_every_baseline_excludes_the_past_on_real_movielens():
    dataset = load_ml100k(max_users=50)
    split = leave_one_out(dataset, 20)
    n = len(dataset.items)
    emb = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    sasrec = SASRec(epochs=2, patience=2, num_threads=1, progress=False).fit(split, n)
    assert sasrec.epochs_log[1]["loss"] < sasrec.epochs_log[0]["loss"]      # it is learning
    for model in (Popularity().fit(split, n), sasrec, TextKNN(emb).fit(split, n)):
        for stage in ("valid", "test"):
            histories, exclude, targets = stage_inputs(split, stage)
            ranked = model.recommend(histories, exclude, 50)
            assert all(len(r) == 50 and not set(r) & set(x) for r, x in zip(ranked, exclude))
            assert evaluate_ranker(model, split, stage)["users"] == 50
