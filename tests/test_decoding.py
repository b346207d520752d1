"""generate_items end to end: a tiny real Llama (backbone's ``tiny-llama``) with SmolLM2's real tokenizer."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache
from transformers.cache_utils import StaticLayer

from lcrec_chat.backbone import add_index_tokens, load_model, load_tokenizer
from lcrec_chat.config import ModelConfig
from lcrec_chat.decoding import (METHODS, CodeTrie, GenerationStats, NoItemsLeft, SharedPrefix, generate_items,
                                 python_trie_prefix_fn)
from lcrec_chat.trie import TrieError, index_token

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CACHE = str(Path(__file__).resolve().parents[1] / ".cache" / "models")
LEVELS, CODES_PER_LEVEL = 4, 8  # index tokens <a_0> .. <d_7> are added once for the whole module


@pytest.fixture(scope="module")
def lm():
    cfg = ModelConfig(base="tiny-llama", cache_dir=CACHE, device="cpu")
    tokenizer, model = load_tokenizer(cfg), load_model(cfg)
    add_index_tokens(model, tokenizer, [index_token(level, c) for level in range(LEVELS)
                                        for c in range(CODES_PER_LEVEL)], init="random")
    with torch.no_grad():  # spread the new output rows so items get clearly different scores (no near-ties)
        torch.manual_seed(0)
        model.get_output_embeddings().weight[-LEVELS * CODES_PER_LEVEL:] *= 50
    return model, tokenizer


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def random_codes(n: int, depth: int, seed: int) -> list[list[int]]:
    space = [[a, b, c, d][:depth] for a in range(8) for b in range(8) for c in range(8) for d in range(8)]
    unique = list({tuple(c): c for c in space}.values())
    return random.Random(seed).sample(unique, n)


def exact_scores(model, tokenizer, trie: CodeTrie, prompt: str) -> torch.Tensor:
    """Sum of the code tokens' log-probs for every item, by teacher forcing (no beams, no cache, no padding)."""
    prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    codes = torch.stack([trie.token_ids[level][trie.codes[:, level]] for level in range(trie.depth)], dim=1)
    ids = torch.cat([torch.tensor(prefix).expand(trie.num_items, -1), codes], dim=1)
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits.float().log_softmax(-1)
    start = len(prefix) - 1
    picked = log_probs[:, start:start + trie.depth].gather(2, codes[:, :, None]).squeeze(2)
    return picked.sum(dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_results_are_distinct_real_allowed_items_sorted_by_score(lm, method):
    model, tokenizer = lm
    codes = random_codes(30, 3, seed=1)
    trie = CodeTrie.from_tokenizer(codes, tokenizer)
    few = torch.zeros(30, dtype=torch.bool)
    few[[2, 11, 17]] = True
    most = torch.ones(30, dtype=torch.bool)
    most[::2] = False
    prompts = [chat(tokenizer, "I liked <a_1><b_2><c_3>. What next?"), chat(tokenizer, "hi"),
               chat(tokenizer, "a much longer request, so that the batch needs left padding for sure")]
    results = generate_items(model, tokenizer, trie, prompts, num_beams=8, k=5, allowed=[None, few, most],
                             method=method)
    for ranked, mask in zip(results, [torch.ones(30, dtype=torch.bool), few, most]):
        items = [i for i, _ in ranked]
        scores = [s for _, s in ranked]
        assert len(items) == min(5, int(mask.sum()))
        assert len(set(items)) == len(items) and all(0 <= i < 30 and mask[i] for i in items)
        assert scores == sorted(scores, reverse=True) and all(-1e4 < s < 0 for s in scores)


@pytest.mark.parametrize("method", METHODS)
def test_beams_covering_every_item_give_the_exact_ranking(lm, method):
    """With as many beams as items nothing is pruned, so the result must be the exhaustive ranking, and the
    scores the true summed log-probs; two prompt lengths in one batch check left padding and positions."""
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer(random_codes(12, 4, seed=2), tokenizer)
    prompts = [chat(tokenizer, "recommend"), chat(tokenizer, "recommend me something like <a_0><b_1><c_2><d_3>")]
    allowed = [None, torch.arange(12) % 3 != 0]
    results = generate_items(model, tokenizer, trie, prompts, num_beams=12, k=12, allowed=allowed, method=method)
    for prompt, mask, ranked in zip(prompts, [torch.ones(12, dtype=torch.bool), allowed[1]], results):
        exact = exact_scores(model, tokenizer, trie, prompt)
        expected = [i for i in exact.argsort(descending=True).tolist() if mask[i]]
        assert [i for i, _ in ranked] == expected
        assert torch.allclose(torch.tensor([s for _, s in ranked]), exact[expected], atol=1e-3)


def test_models_with_sliding_window_layers_use_a_growing_cache_and_stay_exact(lm):
    """A tiny Qwen2 with a sliding-window layer cannot use the preallocated cache; the loop falls back to the
    model's own cache and must still give the exhaustive ranking."""
    _, tokenizer = lm
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                         layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    layers = StaticCache(config=model.config, max_cache_len=32).layers
    assert not all(type(layer) is StaticLayer for layer in layers)  # so the preallocated cache is not used
    trie = CodeTrie.from_tokenizer(random_codes(10, 3, seed=7), tokenizer)
    prompts = [chat(tokenizer, "something short"), chat(tokenizer, "x")]
    results = generate_items(model, tokenizer, trie, prompts, num_beams=10, k=10)
    for prompt, ranked in zip(prompts, results):
        exact = exact_scores(model, tokenizer, trie, prompt)
        assert [i for i, _ in ranked] == exact.argsort(descending=True).tolist()
        assert torch.allclose(torch.tensor([s for _, s in ranked]), exact.sort(descending=True).values, atol=1e-3)


def test_methods_and_batch_sizes_agree(lm):
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer(random_codes(200, 4, seed=3), tokenizer)
    prompts = [chat(tokenizer, "x" * n) for n in (1, 9, 30, 4, 17)]
    reference = generate_items(model, tokenizer, trie, prompts, num_beams=6, k=6, batch_size=5)
    for method, batch_size in [("loop", 1), ("generate", 2)]:
        other = generate_items(model, tokenizer, trie, prompts, num_beams=6, k=6, batch_size=batch_size,
                               method=method)
        for a, b in zip(reference, other):
            assert [i for i, _ in a] == [i for i, _ in b]
            assert torch.allclose(torch.tensor([s for _, s in a]), torch.tensor([s for _, s in b]), atol=1e-3)


def test_python_dict_trie_baseline_generates_the_same_beams(lm):
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer(random_codes(50, 3, seed=4), tokenizer)
    prompt = chat(tokenizer, "hello")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    fn = python_trie_prefix_fn(trie, ids.shape[1], tokenizer.eos_token_id)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), prefix_allowed_tokens_fn=fn,
                         num_beams=5, num_return_sequences=5, do_sample=False, max_new_tokens=3,
                         length_penalty=0.0, pad_token_id=tokenizer.pad_token_id)
    items = trie.items_of_codes(trie.codes_of_tokens(out[:, ids.shape[1]:])).tolist()
    ours = generate_items(model, tokenizer, trie, [prompt], num_beams=5, k=5)[0]
    assert items == [i for i, _ in ours]


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 4), st.integers(1, 60), st.integers(0, 10**6), st.data())
def test_random_code_sets_only_yield_allowed_items(lm, depth, n, seed, data):
    model, tokenizer = lm
    n = min(n, 8 ** depth)
    trie = CodeTrie.from_tokenizer(random_codes(n, depth, seed), tokenizer)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any)))
    k = data.draw(st.integers(1, 6))
    ranked = generate_items(model, tokenizer, trie, [chat(tokenizer, "go")], num_beams=6, k=k, allowed=[mask])[0]
    items = [i for i, _ in ranked]
    assert len(items) == min(k, int(mask.sum())) == len(set(items))
    assert all(mask[i] for i in items)


def test_a_request_with_nothing_left_is_named(lm):
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer(random_codes(5, 2, seed=5), tokenizer)
    with pytest.raises(NoItemsLeft) as err:
        generate_items(model, tokenizer, trie, ["a", "b"], num_beams=2, k=1,
                       allowed=[None, torch.zeros(5, dtype=torch.bool)])
    assert err.value.request == 1


def test_bad_arguments_are_rejected(lm):
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer(random_codes(5, 2, seed=6), tokenizer)
    with pytest.raises(ValueError, match="k <= num_beams"):
        generate_items(model, tokenizer, trie, ["a"], num_beams=2, k=3)
    with pytest.raises(ValueError, match=r"allowed\[0\] must be a bool tensor of shape \(5,\)"):
        generate_items(model, tokenizer, trie, ["a"], num_beams=2, k=1, allowed=[torch.ones(4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="method"):
        generate_items(model, tokenizer, trie, ["a"], num_beams=2, k=1, method="greedy")
    with pytest.raises(TrieError, match="<a_8>"):
        CodeTrie.from_tokenizer([[8, 0]], tokenizer)  # only <a_0>..<a_7> were added


def test_only_the_tokens_of_used_codes_are_needed(lm):
    """The indexing stage adds tokens only for codes some item uses (index_token_strings)."""
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer([[5, 1], [2, 7]], tokenizer)
    assert trie.token_ids[0].tolist() == [-1, -1, tokenizer.convert_tokens_to_ids("<a_2>"), -1, -1,
                                          tokenizer.convert_tokens_to_ids("<a_5>")]
    ranked = generate_items(model, tokenizer, trie, [chat(tokenizer, "go")], num_beams=2, k=2)[0]
    assert sorted(i for i, _ in ranked) == [0, 1]


def test_a_shared_prompt_prefix_is_computed_once_and_keeps_the_exact_ranking(lm):
    """Prompts with a common start (the chat template) reuse its KV across calls; the rankings stay the
    exhaustive ones, and a batch that shares too little of the stored prefix gets its own."""
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer(random_codes(12, 4, seed=4), tokenizer)
    shared = SharedPrefix()
    calls = [[chat(tokenizer, "My movies: <a_0><b_1><c_2><d_3>"), chat(tokenizer, "My movies: <a_1>, more words")],
             [chat(tokenizer, "My movies: <a_2><b_2>")],                   # one prompt: reuses the stored start
             [chat(tokenizer, "My movies: <a_3><b_3><c_3><d_3> and a long tail of extra words")]]
    for prompts in calls:
        results = generate_items(model, tokenizer, trie, prompts, num_beams=12, k=12, shared_prefix=shared)
        for prompt, ranked in zip(prompts, results):
            exact = exact_scores(model, tokenizer, trie, prompt)
            assert [i for i, _ in ranked] == exact.argsort(descending=True).tolist()
            assert torch.allclose(torch.tensor([s for _, s in ranked]), exact.sort(descending=True).values,
                                  atol=1e-3)
    assert shared.computed == 1
    assert tokenizer.decode(shared.ids).rstrip().endswith("My movies:")   # cut to what all calls share
    plain = [{"role": "system", "content": "Another system prompt entirely."}, {"role": "user", "content": "hi"}]
    other = [tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)] * 2
    generate_items(model, tokenizer, trie, other, num_beams=12, k=3, shared_prefix=shared)
    assert shared.computed == 2 and "Another system prompt" in tokenizer.decode(shared.ids)


def test_hybrid_prior_adds_the_exact_item_log_prior_when_beams_cover_every_item(lm):
    """With beams enough for every item, hybrid scores equal log P_model(item) + w * log P_prior(item | allowed)."""
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer(random_codes(30, 3, seed=4), tokenizer)
    prompt = chat(tokenizer, "Recommend something.")
    prior = torch.rand(1, 30) + 0.01
    allowed = torch.ones(30, dtype=torch.bool)
    allowed[[3, 7]] = False
    exact = exact_scores(model, tokenizer, trie, prompt)
    for weight in (0.0, 0.7, 3.0):
        conditional = (prior[0] * allowed) / (prior[0] * allowed).sum()
        expected = exact + weight * conditional.clamp(min=1e-300).log()
        got = generate_items(model, tokenizer, trie, [prompt], num_beams=30, k=28, allowed=[allowed],
                             prior=prior, prior_weight=weight)[0]
        assert [i for i, _ in got] == [int(i) for i in expected.masked_fill(~allowed, -1e9).argsort(descending=True)[:28]]
        assert torch.allclose(torch.tensor([s for _, s in got]), expected[[i for i, _ in got]].float(), atol=1e-3)
    # a dominant prior decides the ranking; a prior of 0 weight changes nothing
    peaked = torch.full((1, 30), 1e-6)
    peaked[0, 11] = 1.0
    top = generate_items(model, tokenizer, trie, [prompt], num_beams=5, k=1, prior=peaked, prior_weight=50.0)
    assert top[0][0][0] == 11
    with pytest.raises(ValueError, match="prior must be"):
        generate_items(model, tokenizer, trie, [prompt], num_beams=5, k=1, prior=peaked[:, :5], prior_weight=1.0)


def test_generation_stats_count_every_beam_before_filtering(lm):
    model, tokenizer = lm
    trie = CodeTrie.from_tokenizer(random_codes(12, 3, seed=5), tokenizer)
    prompt = chat(tokenizer, "Recommend something.")
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[:4] = True                        # 4 allowed items for 6 beams and k=5: 2 empty beams, a short list
    stats = GenerationStats()
    generate_items(model, tokenizer, trie, [prompt, prompt], num_beams=6, k=5, allowed=[allowed, None], stats=stats)
    out = stats.as_dict()
    assert out["generated_sequences"] == 12 and out["valid_item_rate"] == pytest.approx(10 / 12)
    assert out["short_list_rate"] == 0.5 and out["duplicate_rate"] == 0.0
