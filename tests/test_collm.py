"""CoLLM on the tiny Llama (SmolLM2's real tokenizer) and 30 real MovieLens users: placeholders, the two
stages, the prefix-cache scorer, AUC, re-ranking and save/load."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lcrec_chat.baselines import SASRec
from lcrec_chat.config import CoLLMConfig, ModelConfig
from lcrec_chat.data.movielens import load_ml100k
from lcrec_chat.data.split import leave_one_out
from lcrec_chat.methods.collab_tokens import (CollabError, CollabMapper, CollabSource, MFSource, SASRecSource,
                                              embed_with_collab, source_scores)
from lcrec_chat.methods.collm import (USER, CoLLM, CoLLMReranker, auc_of, sample_candidates, source_auc)
from lcrec_chat.metrics import stage_inputs
from lcrec_chat.ranking import evaluate_ranker

CACHE = str(Path(__file__).resolve().parents[1] / ".cache" / "models")
TINY = ModelConfig(base="tiny-llama", cache_dir=CACHE, device="cpu")
STEPS = 30


@pytest.fixture(scope="module")
def data():
    dataset = load_ml100k(max_users=30)
    split = leave_one_out(dataset, 20)
    items = [{"title": i.title, "year": i.year, "genres": i.genres} for i in dataset.items]
    return split, items, len(items)


@pytest.fixture(scope="module")
def sasrec(data):
    split, _, n = data
    return SASRec(hidden=32, inner=64, epochs=1, patience=1, stride=5, seed=0, num_threads=1,
                  progress=False).fit(split, n)


def _snapshot(model: CoLLM) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([p.detach().clone() for p in model.lora_parameters()],
            [p.detach().clone() for p in model.mapper.parameters()])


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def trained(data, sasrec):
    """A CoLLM trained stage by stage on 8 fixed training positions (so the loss can fall in 30 steps), with
    the parameters before, between and after the stages."""
    split, items, n = data
    cfg = CoLLMConfig(history=5, batch_size=8, lr=3e-3, text_minutes=5, mapping_minutes=5, negatives=4,
                      rerank_depth=8, seed=0)
    model = CoLLM(cfg, TINY, items, SASRecSource(sasrec), train_pairs=8, max_steps=STEPS, progress=False)
    assert model.set_training_data(split, n) == 8
    before = _snapshot(model)
    text = model.train_stage("text")
    between = _snapshot(model)
    mapping = model.train_stage("mapping")
    return model, {"before": before, "between": between, "after": _snapshot(model), "text": text,
                   "mapping": mapping}


# ------------------------------------------------------------------------------- placeholders

def test_placeholders_are_replaced_by_the_mapped_vectors(trained):
    model, _ = trained
    prompt = model.prompts.full([3, 7, 11], 42, collab=True)
    assert prompt.slots == [3, 7, 11, USER, 42]
    ids = torch.tensor([prompt.ids])
    user = model.source.user_vectors([[3, 7, 11]])
    with torch.no_grad():
        embeds = model._embed(ids, [prompt], user)
        plain = model.model.get_input_embeddings()(ids)
        raw = torch.cat([model.item_raw[[3, 7, 11]], user, model.item_raw[[42]]])
        mapped = model.mapper(raw)
    where = ids[0] == model.placeholder
    assert int(where.sum()) == 5
    torch.testing.assert_close(embeds[0, where], mapped)           # in order: items, the user, the target
    torch.testing.assert_close(embeds[0, ~where], plain[0, ~where])
    norms = mapped.norm(dim=1)                                     # mapped rows at the scale of token rows
    torch.testing.assert_close(norms, torch.full_like(norms, float(model.mapper.token_norm)))
    with pytest.raises(CollabError, match="5 placeholder positions but 4"):
        embed_with_collab(model.model, ids, model.placeholder, mapped[:4])


def test_prompts_split_into_prefix_and_suffix(trained):
    model, _ = trained
    tok = model.tokenizer
    full = model.prompts.full(list(range(12)), 99, collab=False)
    assert full.slots == [] and model.placeholder not in full.ids
    text = tok.decode(full.ids)
    assert text.startswith("A user watched:") and text.endswith("? Answer:")
    assert text.count(",") >= 4 and "The user is" not in text                 # the last 5 titles, no user slot
    head, tail = model.prompts.prefix(list(range(12)), True), model.prompts.suffix(99, True)
    assert model.prompts.full(list(range(12)), 99, True).ids == head.ids + tail.ids
    assert tok.convert_ids_to_tokens(model.answer_ids) == tok.convert_ids_to_tokens(
        [tok.encode(" Yes")[0], tok.encode(" No")[0]])


def test_mapper_is_a_small_mlp_with_token_scale():
    mapper = CollabMapper(16, 24, token_norm=2.5, hidden=8)
    out = mapper(torch.randn(5, 16))
    assert out.shape == (5, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.full((5,), 2.5))


# ------------------------------------------------------------------------------- training

def test_each_stage_trains_only_its_own_parameters_and_the_loss_falls(trained):
    _, run = trained
    before, between, after = run["before"], run["between"], run["after"]
    assert not _same(before[0], between[0]) and _same(before[1], between[1])    # stage 1: LoRA only
    assert _same(between[0], after[0]) and not _same(between[1], after[1])      # stage 2: mapper only
    for stage in ("text", "mapping"):
        summary = run[stage]
        assert summary["steps"] == STEPS and summary["seconds"] > 0 and summary["pairs_seen"] == 4 * STEPS
        losses = summary["losses"]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, (stage, losses)


def test_fit_respects_the_wall_time_budget(data, sasrec):
    split, items, n = data
    cfg = CoLLMConfig(history=3, batch_size=4, text_minutes=0.02, mapping_minutes=0.0, seed=1)
    model = CoLLM(cfg, TINY, items, SASRecSource(sasrec), progress=False).fit(split, n)
    summary = model.fit_summary
    assert summary["train_positions"] == sum(len(s) - 1 for s in split.train_sequences())
    assert summary["text"]["steps"] >= 1 and 1.2 <= summary["text"]["seconds"] < 1.2 + 5
    assert summary["mapping"]["steps"] == 0


# ------------------------------------------------------------------------------- scoring

def test_prefix_cache_scores_equal_full_prompts(trained, data):
    model, _ = trained
    split, _, _ = data
    histories = [split.history(u, "valid") for u in split.users[:3]] + [[]]
    candidates = [[5, 17, 200, 1000, 3, 8, 1500]] * 4
    for collab in (True, False):
        cached = model.yes_probability(histories, candidates, collab=collab)
        model.options["eval_batch_size"] = 3                     # several candidate chunks over cache copies
        chunked = model.yes_probability(histories, candidates, collab=collab)
        model.options["eval_batch_size"] = 32
        full = model.yes_probability(histories, candidates, collab=collab, use_cache=False)
        assert cached.shape == (4, 7) and ((cached > 0) & (cached < 1)).all()
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
        torch.testing.assert_close(chunked, full, atol=1e-4, rtol=0)
    assert not torch.allclose(model.yes_probability(histories, candidates, collab=True),
                              model.yes_probability(histories, candidates, collab=False))
    with pytest.raises(ValueError, match="same number of candidates"):
        model.yes_probability(histories[:2], [[1, 2], [3]])


def test_auc_of_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, 200)
        scores = np.round(rng.normal(size=200) + labels, 1)                   # rounding makes ties
        assert auc_of(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert auc_of([0.1, 0.9], [0, 1]) == 1.0 and auc_of([0.5, 0.5], [0, 1]) == 0.5
    assert np.isnan(auc_of([0.1, 0.2], [1, 1]))


def test_auc_on_sampled_pairs(trained, data, sasrec):
    model, _ = trained
    split, _, n = data
    histories, candidates = sample_candidates(split, "valid", n, 4, max_users=6, seed=3)
    _, exclude, targets = stage_inputs(split, "valid", 6)
    for cands, banned, target in zip(candidates, exclude, targets):
        assert cands[0] == target and len(set(cands)) == 5 and not set(cands[1:]) & set(banned)
    assert sample_candidates(split, "valid", n, 4, 6, 3) == (histories, candidates)   # seeded
    result = model.auc(split, "valid", max_users=6, seed=3)
    assert result["users"] == 6 and result["pairs"] == 30
    assert 0 <= result["auc"] <= 1 and 0 <= result["uauc"] <= 1 and result["seconds_per_pair"] > 0
    source = SASRecSource(sasrec)
    alone = source_auc(source, split, "valid", negatives=4, max_users=6, seed=3)
    assert alone["users"] == 6 and alone["pairs"] == 30 and 0 <= alone["auc"] <= 1
    # the source's score is SASRec's own score of those items
    scores = source_scores(source, histories, candidates)
    full = sasrec.score(histories)
    torch.testing.assert_close(scores, torch.gather(full, 1, torch.tensor(candidates)), atol=1e-4, rtol=1e-4)


def test_reranker_reorders_the_base_candidates(trained, data, sasrec):
    model, _ = trained
    split, _, _ = data
    reranker = CoLLMReranker(model, sasrec)
    assert reranker.depth == 8 and reranker.num_items == sasrec.num_items
    histories, exclude, _ = stage_inputs(split, "test", 5)
    ranked = reranker.recommend(histories, exclude, 5)
    pools = sasrec.recommend(histories, exclude, 8)
    for items, pool, banned, history in zip(ranked, pools, exclude, histories):
        assert len(items) == 5 and len(set(items)) == 5
        assert set(items) <= set(pool) and not set(items) & set(banned)
        probs = model.candidate_probs(history, pool)
        assert items[0] == pool[int(probs.argmax())]
    metrics = evaluate_ranker(reranker, split, "test", ks=(1, 5, 10), max_users=5)
    assert metrics["users"] == 5 and 0 <= metrics["ndcg@10"] <= 1


def test_save_and_load_give_identical_probabilities(trained, data, sasrec, tmp_path):
    model, _ = trained
    split, _, _ = data
    model.save(tmp_path / "collm")
    again = CoLLM.load(tmp_path / "collm", TINY, SASRecSource(sasrec))
    histories = [split.history(u, "test") for u in split.users[:2]]
    candidates = [[1, 2, 3], [4, 5, 6]]
    torch.testing.assert_close(again.yes_probability(histories, candidates),
                               model.yes_probability(histories, candidates), atol=1e-6, rtol=0)
    assert again.source_window == model.source_window and again.item_texts == model.item_texts
    with pytest.raises(CollabError, match="trained with a sasrec source"):
        CoLLM.load(tmp_path / "collm", TINY, MFSource(torch.zeros(5, 32), torch.zeros(5, 32)))


# ------------------------------------------------------------------------------- MF source

def test_mf_source_fits_and_round_trips(data, tmp_path):
    split, _, n = data
    mf = MFSource.fit(split, n, dim=16, epochs=3, seconds=30, seed=0)
    assert isinstance(mf, CollabSource) and mf.dim == 16 and mf.item_vectors().shape == (n, 16)
    assert len(mf.fit_log) == 3 and mf.fit_log[-1]["loss"] < mf.fit_log[0]["loss"]
    torch.testing.assert_close(mf.user_vectors([[4, 9], []]), torch.stack([mf.p[[4, 9]].mean(0), torch.zeros(16)]))
    mf.save(tmp_path / "mf.pt")
    again = MFSource.load(tmp_path / "mf.pt")
    assert torch.equal(again.p, mf.p) and torch.equal(again.q, mf.q)
