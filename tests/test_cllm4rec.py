"""CLLM4Rec on the tiny test backbone (2-layer random Llama, SmolLM2's tokenizer) and 30 real ML-100K users."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lcrec_chat.config import CLLM4RecConfig, ModelConfig
from lcrec_chat.data.movielens import load_ml100k
from lcrec_chat.data.split import leave_one_out
from lcrec_chat.methods.cllm4rec import CLLM4Rec, evaluate_with_users
from lcrec_chat.metrics import stage_inputs
from lcrec_chat.ranking import evaluate_ranker

CACHE = str(Path(__file__).resolve().parents[1] / ".cache" / "models")
TINY = ModelConfig(base="tiny-llama", cache_dir=CACHE, device="cpu")
STEPS = 40


def config(**changes) -> CLLM4RecConfig:
    # budgets are a safety net only (generous, so a busy machine cannot cut a run short): `max_steps` decides,
    # so every run does the same steps. token_lr is 10x
    # below the default because the tiny model's embeddings are ~7x smaller than SmolLM2's (std 0.02 vs 0.14)
    return CLLM4RecConfig(**{"batch_size": 8, "window": 10, "lr": 3e-3, "token_lr": 1e-3, "pretrain_minutes": 10.0,
                             "finetune_minutes": 10.0, "seed": 0, **changes})


@pytest.fixture(scope="module")
def data():
    dataset = load_ml100k(max_users=30)
    return dataset, leave_one_out(dataset, 20)


@pytest.fixture(scope="module")
def fitted(data):
    dataset, split = data
    model = CLLM4Rec(config(), TINY, dataset.items, len(split.users), max_steps=STEPS, max_epochs=5, progress=False)
    return model.fit(split, len(dataset.items))


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_every_loss_falls_over_training(fitted):
    pre, fine = fitted.curves["pretrain"], fitted.curves["finetune"]
    assert len(pre) == len(fine) == STEPS
    for curve, kind in ((pre, "collab"), (pre, "content"), (fine, "rec")):
        losses = [p[kind] for p in curve if kind in p]
        assert len(losses) >= 8, kind
        assert mean(losses[-4:]) < mean(losses[:4]), (kind, losses)
    summary = fitted.fit_summary
    assert summary["pretrain"]["steps"] == summary["finetune"]["steps"] == STEPS
    assert summary["finetune"]["targets"] > summary["finetune"]["windows"]   # several targets per window
    assert summary["pretrain"]["seconds"] > 0 and "final_rec" in summary["finetune"]


def test_documents_put_one_token_per_user_and_item(fitted):
    n_users = fitted.num_users
    ids, refs = fitted.prompt(3, [5, 6, 7])
    assert refs[0] == 3 and refs[-len(fitted.will) - 3:-len(fitted.will)] == [n_users + 5, n_users + 6, n_users + 7]
    assert len(ids) == 1 + len(fitted.interacted) + 3 + len(fitted.will)
    assert fitted.prompt(None, [5, 6, 7])[1][0] == -1          # no user token
    assert len(fitted.prompt(None, list(range(50)))[0]) == len(fitted.interacted) + fitted.cfg.window + len(fitted.will)
    _, refs = fitted.content_doc(0)                              # item 0 is Toy Story
    assert refs[0] == n_users and all(r == -1 for r in refs[1:])
    assert "Toy Story" in fitted.tokenizer.decode(fitted.content_doc(0)[0][1:])


def test_score_is_one_forward_pass_over_the_whole_catalogue(fitted, data):
    dataset, split = data
    histories, _, _ = stage_inputs(split, "valid")
    calls = []
    hook = fitted.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        anonymous = fitted.score(histories[:6])
        known = fitted.score(histories[:6], users=[0, 1, 2, 3, 4, 5])
    finally:
        hook.remove()
    assert len(calls) == 2
    for scores in (anonymous, known):
        assert scores.shape == (6, len(dataset.items)) and torch.isfinite(scores).all()
    assert not torch.allclose(anonymous, known)                  # the user token changes the scores
    assert fitted.score([[]]).shape == (1, len(dataset.items))   # a chat user with no history yet
    with pytest.raises(ValueError, match="outside"):
        fitted.score([[0]], users=[len(split.users)])
    with pytest.raises(ValueError, match="outside"):
        fitted.score([[len(dataset.items)]])


def test_evaluate_runs_with_and_without_user_tokens(fitted, data):
    _, split = data
    for metrics in (evaluate_ranker(fitted, split, "valid"), evaluate_with_users(fitted, split, "valid")):
        assert metrics["users"] == len(split.users)
        assert {"hr@10", "ndcg@10", "coverage@10"} <= set(metrics)
    histories, exclude, _ = stage_inputs(split, "valid")
    ranked = fitted.recommend(histories, exclude, 10, users=list(range(len(histories))))
    assert all(len(r) == 10 and not set(r) & set(x) for r, x in zip(ranked, exclude))


def test_some_finetuning_windows_leave_the_user_out(fitted):
    windows = [(u, [1, 2, 3]) for u in range(200)]
    batches = fitted._finetune_batches(windows)(random.Random(0))
    anonymous = sum(u is None for _, batch in batches for u, _ in batch)
    assert 20 < anonymous < 60                                    # no_user_share = 0.2 of 200


def test_save_and_load_give_identical_scores(fitted, data, tmp_path):
    _, split = data
    histories, _, _ = stage_inputs(split, "test", max_users=5)
    fitted.save(tmp_path)
    again = CLLM4Rec.load(tmp_path, TINY)
    assert again.fit_summary == fitted.fit_summary and again.num_users == fitted.num_users
    assert torch.equal(again.score(histories), fitted.score(histories))
    assert torch.equal(again.score(histories, users=[0, 1, 2, 3, 4]), fitted.score(histories, users=[0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="trained on"):
        CLLM4Rec.load(tmp_path, ModelConfig(base="smollm2-135m"))


def test_mutual_regularisation_ties_the_two_row_sets(data):
    dataset, split = data
    distance = {}
    for weight in (0.0, 10.0):
        model = CLLM4Rec(config(reg_weight=weight, finetune_minutes=0.0), TINY, dataset.items, len(split.users),
                         max_steps=15, max_epochs=5, progress=False)
        assert model.rows.distance().item() == 0.0               # both rows start from the same title mean
        distance[weight] = model.fit(split, len(dataset.items)).fit_summary["distance"]
    assert distance[10.0] < 0.5 * distance[0.0], distance
