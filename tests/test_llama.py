"""The small serving Llama (llama.py) against transformers' LlamaForCausalLM: same weights, same logits, same
generated items; and the serving load path built on it (merge, int8, fast tokenizer)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lcrec_chat.backbone import (_load_saved_tokenizer, add_index_tokens, load_for_serving, load_model, load_tokenizer,
                                 quantize_int8)
from lcrec_chat.config import ModelConfig
from lcrec_chat.decoding import SharedPrefix, generate_items
from lcrec_chat.llama import KVCache, SlimLlama, UnsupportedModel, load_llama
from lcrec_chat.trie import CodeTrie, index_token

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CACHE = str(Path(__file__).resolve().parents[1] / ".cache" / "models")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, slim model of the same saved weights, tokenizer) with 2 x 6 index tokens added."""
    cfg = ModelConfig(base="tiny-llama", cache_dir=CACHE, device="cpu")
    tokenizer, model = load_tokenizer(cfg), load_model(cfg)
    add_index_tokens(model, tokenizer, [index_token(level, c) for level in range(2) for c in range(6)], init="random")
    with torch.no_grad():
        torch.manual_seed(0)
        model.get_output_embeddings().weight[-12:] *= 50   # clearly different item scores
    folder = tmp_path_factory.mktemp("tiny-saved")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), load_llama(folder), tokenizer, folder


def padded(tokenizer, texts):
    batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return batch.input_ids, batch.attention_mask, positions


def test_logits_match_transformers_on_a_left_padded_batch(pair):
    hf, slim, tokenizer, _ = pair
    ids, mask, positions = padded(tokenizer, ["a longer prompt with <a_1><b_2> in it", "hi"])
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = slim(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert torch.isfinite(got).all()   # pad rows attend to themselves: no NaN to leak into a cache


def test_cached_steps_equal_one_full_forward(pair):
    _, slim, tokenizer, _ = pair
    ids = tokenizer("one two three four five", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        full = slim(input_ids=ids).logits
        cache = slim.new_cache(max_length=ids.shape[1])
        first = slim(input_ids=ids[:, :3], past_key_values=cache).logits
        rest = [slim(input_ids=ids[:, i:i + 1], past_key_values=cache).logits for i in range(3, ids.shape[1])]
    assert torch.allclose(torch.cat([first, *rest], 1), full, atol=1e-5)
    assert isinstance(cache, KVCache) and cache.get_seq_length() == ids.shape[1]


def test_generated_items_and_scores_match_transformers(pair):
    """The beam loop (shared prefix, left padding, in-place cache, beam reordering) gives the same lists."""
    hf, slim, tokenizer, _ = pair
    codes = [[a, b] for a in range(6) for b in range(6)][::2]
    trie = CodeTrie.from_tokenizer(codes, tokenizer)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
               for text in ("I liked <a_1><b_2>. More?", "recommend", "a much longer request that needs padding")]
    allowed = [None, torch.arange(len(codes)) % 3 != 0, None]
    results = [generate_items(m, tokenizer, trie, prompts, num_beams=6, k=5, allowed=allowed,
                              shared_prefix=SharedPrefix()) for m in (hf, slim)]
    for want, got in zip(*results):
        assert [i for i, _ in got] == [i for i, _ in want]
        assert torch.allclose(torch.tensor([s for _, s in got]), torch.tensor([s for _, s in want]), atol=1e-4)


def test_collaborative_vectors_enter_at_the_placeholders(pair):
    """Vectors equal to the placeholder's own embedding row change nothing; other vectors change the scores the
    same way in both models."""
    hf, slim, tokenizer, _ = pair
    trie = CodeTrie.from_tokenizer([[a, b] for a in range(6) for b in range(6)], tokenizer)
    placeholder = tokenizer.convert_tokens_to_ids("<gh_stars>")
    prompts = ["List: <a_1><b_1>, <gh_stars><a_2><b_3>, <gh_stars>", "List: <a_0><b_0>, <gh_stars>"]
    own = slim.get_input_embeddings().weight[placeholder].detach()
    same = [own.expand(2, -1), own.expand(1, -1)]
    plain = generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5)
    assert generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5, collab=(placeholder, same)) == plain
    torch.manual_seed(1)
    other = [torch.randn(2, own.shape[0]) * own.norm(), torch.randn(1, own.shape[0]) * own.norm()]
    moved = [generate_items(m, tokenizer, trie, prompts, num_beams=8, k=5, collab=(placeholder, other),
                            shared_prefix=SharedPrefix(min_tokens=2)) for m in (hf, slim)]
    assert [[i for i, _ in r] for r in moved[0]] == [[i for i, _ in r] for r in moved[1]]
    assert moved[1] != plain
    with pytest.raises(ValueError, match="placeholder"):
        generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5, collab=(placeholder, [other[0], other[0]]))


def _two_prompts_with_states(pair, seed: int):
    """(hf, slim, tokenizer, a 6x6 code trie, the placeholder id, two dense prompts with 2 and 1 placeholders,
    random vectors for those placeholders)."""
    hf, slim, tokenizer, _ = pair
    trie = CodeTrie.from_tokenizer([[a, b] for a in range(6) for b in range(6)], tokenizer)
    placeholder = tokenizer.convert_tokens_to_ids("<gh_stars>")
    prompts = ["List: <a_1><b_1>, <gh_stars><a_2><b_3>, <gh_stars>", "List: <a_0><b_0>, <gh_stars>"]
    width = slim.get_input_embeddings().weight.shape[1]
    torch.manual_seed(seed)
    return hf, slim, tokenizer, trie, placeholder, prompts, [torch.randn(2, width), torch.randn(1, width)]


def _one_forward_score(model, tokenizer, trie, placeholder, prompt, item, vectors, add=None, head=None) -> float:
    """The log-likelihood of `item`'s codes after `prompt` in one forward of transformers' model (`model`) over
    prompt + codes, placed as training
    places them: `vectors` on the placeholders, `add` on the code tokens after each (embed_with_collab), and
    `head[level]` added to the last hidden state that writes each code (train.collab_head)."""
    from lcrec_chat.methods.collab_tokens import embed_with_collab
    code = "".join(index_token(level, c) for level, c in enumerate(trie.codes[item].tolist()))
    ids = tokenizer(prompt + code, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = embed_with_collab(model, ids, placeholder, vectors, add)
        hidden = model.model(inputs_embeds=embeds).last_hidden_state[0]
        total = 0.0
        for level, pos in enumerate(range(ids.shape[1] - trie.depth, ids.shape[1])):
            state = hidden[pos - 1] + (head[level] if head is not None else 0)
            total += float(torch.log_softmax(model.lm_head(state).float(), -1)[ids[0, pos]])
    return total


def test_code_additions_score_as_one_forward_of_the_prompt_and_the_item(pair):
    """With additions on the code tokens after each placeholder (train.collab_on_codes), an item's score from the
    beam loop is the log-likelihood of its codes in one forward of prompt + codes with the additions placed as in
    training (embed_with_collab); zero additions change nothing; both models give the same lists."""
    from lcrec_chat.decoding import CollabInputs
    hf, slim, tokenizer, trie, placeholder, prompts, vectors = _two_prompts_with_states(pair, seed=2)
    width = vectors[0].shape[1]
    adds = [torch.randn(2, 2, width) * 3, torch.randn(1, 2, width) * 3]
    without = generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5, collab=(placeholder, vectors))
    zero = CollabInputs(placeholder, vectors, [torch.zeros_like(a) for a in adds])
    assert generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5, collab=zero) == without
    given = CollabInputs(placeholder, vectors, adds)
    got = [generate_items(m, tokenizer, trie, prompts, num_beams=8, k=5, collab=given,
                          shared_prefix=SharedPrefix(min_tokens=2)) for m in (hf, slim)]
    assert [[i for i, _ in r] for r in got[0]] == [[i for i, _ in r] for r in got[1]]
    assert got[1] != without
    for prompt, vec, add, ranked in zip(prompts, vectors, adds, got[1]):
        for item, score in ranked[:3]:
            assert _one_forward_score(hf, tokenizer, trie, placeholder, prompt, item, vec, add=add) == \
                pytest.approx(score, abs=1e-3)


def test_logit_vectors_score_as_the_last_hidden_state_plus_the_vector(pair):
    """train.collab_head: a prompt's logit vectors change each code step as adding them to the last hidden state
    before the output head would (what training does); zero vectors change nothing; both models agree."""
    from lcrec_chat.decoding import CollabInputs
    hf, slim, tokenizer, trie, placeholder, prompts, vectors = _two_prompts_with_states(pair, seed=3)
    width = vectors[0].shape[1]
    heads = [torch.randn(2, width) * 2, torch.randn(2, width) * 2]   # per prompt: one per code level
    without = generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5, collab=(placeholder, vectors))
    zero = CollabInputs(placeholder, vectors, None, [torch.zeros_like(h) for h in heads])
    assert generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5, collab=zero) == without
    given = CollabInputs(placeholder, vectors, None, heads)
    got = [generate_items(m, tokenizer, trie, prompts, num_beams=8, k=5, collab=given) for m in (hf, slim)]
    assert [[i for i, _ in r] for r in got[0]] == [[i for i, _ in r] for r in got[1]]
    assert got[1] != without
    for prompt, vec, head, ranked in zip(prompts, vectors, heads, got[1]):
        for item, score in ranked[:3]:
            assert _one_forward_score(hf, tokenizer, trie, placeholder, prompt, item, vec, head=head) == \
                pytest.approx(score, abs=1e-3)


def test_prefix_head_scores_as_the_last_hidden_state_plus_its_vector_for_the_written_codes(pair):
    """train.collab_head_width: the head's prefix MLP adds at each code step what it computes from the prompt's
    state and the code tokens that beam has written, as training adds it for the item's own prefix; a prompt
    without a state (present False) gets nothing; both models agree."""
    from lcrec_chat.decoding import CollabInputs, PrefixHead
    from lcrec_chat.methods.collab_tokens import CollabMapper
    hf, slim, tokenizer, trie, placeholder, prompts, vectors = _two_prompts_with_states(pair, seed=4)
    width = vectors[0].shape[1]
    code_tokens = tokenizer.convert_tokens_to_ids([index_token(level, c) for level in range(2) for c in range(6)])
    mapper = CollabMapper(8, width, 1.0, logit_levels=2, prefix_tokens=code_tokens, prefix_width=16)
    with torch.no_grad():
        mapper.on_logits_prefix_out.normal_(0, 0.5)
    states = torch.randn(2, 8)
    without = generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5, collab=(placeholder, vectors))
    absent = CollabInputs(placeholder, vectors, prefix_head=PrefixHead(mapper.prefix_vectors, states, torch.zeros(2)))
    assert generate_items(slim, tokenizer, trie, prompts, num_beams=8, k=5, collab=absent) == without
    given = CollabInputs(placeholder, vectors, prefix_head=PrefixHead(mapper.prefix_vectors, states, torch.ones(2)))
    got = [generate_items(m, tokenizer, trie, prompts, num_beams=8, k=5, collab=given) for m in (hf, slim)]
    assert [[i for i, _ in r] for r in got[0]] == [[i for i, _ in r] for r in got[1]]
    assert got[1] != without
    for row, (prompt, vec, ranked) in enumerate(zip(prompts, vectors, got[1])):
        for item, score in ranked[:3]:
            codes = torch.tensor([tokenizer.convert_tokens_to_ids(index_token(level, c))
                                  for level, c in enumerate(trie.codes[item].tolist())])
            with torch.no_grad():
                head = [mapper.prefix_vectors(states[row:row + 1], level, codes[None, :level])[0] for level in range(2)]
            assert _one_forward_score(hf, tokenizer, trie, placeholder, prompt, item, vec, head=head) == \
                pytest.approx(score, abs=1e-3)


def test_serving_load_path_is_slim_int8_and_its_tokenizer_matches(pair):
    hf, _, tokenizer, folder = pair
    model = quantize_int8(load_for_serving(folder))
    assert isinstance(model, SlimLlama)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear" and \
        type(model.model.layers[0].self_attn.q_proj).__module__.startswith("torch.ao")   # int8 dynamic
    fast = _load_saved_tokenizer(folder, fast_only=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Liked <a_1><b_2>, <a_3><b_4>"}],
                                         tokenize=False, add_generation_prompt=True)
    assert fast(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert fast.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    ids, mask, positions = padded(tokenizer, ["Liked <a_1><b_2>", "hello"])
    with torch.no_grad():
        agree = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1) == \
            hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
    assert agree.all()


def test_other_architectures_fall_back_to_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 8}))
    with pytest.raises(UnsupportedModel, match="not a plain Llama"):
        load_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}))
    with pytest.raises(UnsupportedModel):
        load_llama(tmp_path)
