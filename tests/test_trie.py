"""CodeTrie and TrieLogitsProcessor on random code sets and random logits (no model needed)."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcrec_chat.decoding import TrieLogitsProcessor
from lcrec_chat.trie import CodeTrie, NoItemsLeft, TrieError, index_token

VOCAB = 300  # token ids of the tests' code tokens live in 100..VOCAB; 0..99 are "ordinary" tokens
EOS = 7


@st.composite
def code_sets(draw, max_items: int = 40):
    """Random distinct codes: random depth, random codebook size per level, random token ids, dense or sparse."""
    depth = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 6), min_size=depth, max_size=depth))
    space = list(itertools.product(*[range(s) for s in sizes]))
    n = draw(st.integers(1, min(max_items, len(space))))
    codes = draw(st.lists(st.sampled_from(space), min_size=n, max_size=n, unique=True))
    ids = draw(st.permutations(range(100, VOCAB)))
    token_ids, start = [], 0
    for level, s in enumerate(sizes):
        used = {c[level] for c in codes}
        # a code no item uses may have no token at all (-1), as when only used tokens were added
        token_ids.append([i if c in used or draw(st.booleans()) else -1
                          for c, i in enumerate(ids[start:start + s])])
        start += s
    dense_limit = draw(st.sampled_from([0, 1 << 22]))  # 0: every level sparse (CSR + searchsorted)
    return codes, token_ids, dense_limit


def allowed_prefixes(codes, allowed, depth):
    """Brute force: the set of length-`depth` prefixes of allowed items."""
    return {tuple(c[:depth]) for c, ok in zip(codes, allowed) if ok}


@settings(max_examples=60, deadline=None)
@given(code_sets())
def test_tables_hold_exactly_the_items(case):
    codes, token_ids, dense_limit = case
    trie = CodeTrie(codes, token_ids, dense_limit=dense_limit)
    paths = trie.paths()
    assert sorted(map(tuple, paths.tolist())) == sorted(codes)                      # every item reachable
    assert [tuple(codes[i]) for i in trie.leaf_item.tolist()] == list(map(tuple, paths.tolist()))
    assert trie.items_of_codes(torch.tensor(codes)).tolist() == list(range(len(codes)))
    others = [c for c in itertools.product(*[range(lv.codebook + 1) for lv in trie.levels]) if c not in set(codes)]
    if others:
        assert (trie.items_of_codes(torch.tensor(others)) == -1).all()                 # nothing else is an item


@settings(max_examples=60, deadline=None)
@given(code_sets(), st.data())
def test_restrictions_prune_exactly_the_empty_prefixes(case, data):
    codes, token_ids, dense_limit = case
    trie = CodeTrie(codes, token_ids, dense_limit=dense_limit)
    masks = data.draw(st.lists(st.lists(st.booleans(), min_size=len(codes), max_size=len(codes)),
                               min_size=1, max_size=3))
    allowed = torch.tensor(masks)
    if not allowed.any(dim=1).all():
        with pytest.raises(NoItemsLeft) as err:
            trie.alive(allowed)
        assert err.value.request == int((~allowed.any(dim=1)).nonzero()[0])
        return
    counts = trie.alive(allowed)
    for b, mask in enumerate(masks):
        for depth in range(1, trie.depth + 1):
            nodes = trie.walk(torch.tensor(codes)[:, :depth])
            for item, node in enumerate(nodes.tolist()):
                prefix = tuple(codes[item][:depth])
                expected = sum(1 for c, ok in zip(codes, mask) if ok and tuple(c[:depth]) == prefix)
                assert counts[depth][b, node] == expected


@settings(max_examples=60, deadline=None)
@given(code_sets(), st.data())
def test_candidates_are_the_allowed_continuations(case, data):
    codes, token_ids, dense_limit = case
    trie = CodeTrie(codes, token_ids, dense_limit=dense_limit)
    mask = data.draw(st.lists(st.booleans(), min_size=len(codes), max_size=len(codes)).filter(any))
    counts = trie.alive(torch.tensor([mask]))
    for depth in range(trie.depth):
        prefixes = sorted({tuple(c[:depth]) for c in codes}) + [(99,) * depth] * (depth > 0)
        nodes = trie.walk(torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), depth))
        tokens, childs, valid = trie.candidates(nodes, depth, counts[depth + 1], torch.zeros(len(prefixes),
                                                                                             dtype=torch.long))
        for row, prefix in enumerate(prefixes):
            expected = {token_ids[depth][p[depth]] for p in allowed_prefixes(codes, mask, depth + 1)
                        if p[:depth] == prefix}
            assert set(tokens[row][valid[row]].tolist()) == expected


def greedy_walk(processor: TrieLogitsProcessor, logits: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Greedy decoding driven by fixed per-step logits (steps, R, V); returns the generated tokens (R, steps)."""
    input_ids = prompt
    for step_logits in logits:
        scores = processor(input_ids, step_logits.clone())
        assert torch.isfinite(scores.max(dim=1).values).all(), "a live beam was left without any token"
        input_ids = torch.cat([input_ids, scores.argmax(dim=1, keepdim=True)], dim=1)
    return input_ids[:, prompt.shape[1]:]


@settings(max_examples=60, deadline=None)
@given(code_sets(), st.data())
def test_processor_only_lets_allowed_items_through(case, data):
    codes, token_ids, dense_limit = case
    trie = CodeTrie(codes, token_ids, dense_limit=dense_limit)
    batch, beams = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    masks = data.draw(st.lists(st.lists(st.booleans(), min_size=len(codes), max_size=len(codes)).filter(any),
                               min_size=batch, max_size=batch))
    prompt = torch.randint(0, 100, (batch * beams, data.draw(st.integers(1, 5))))
    processor = TrieLogitsProcessor(trie, prompt.shape[1], beams, EOS, allowed=torch.tensor(masks))
    seed = data.draw(st.integers(0, 2**31 - 1))
    logits = torch.randn(trie.depth + 1, batch * beams, VOCAB, generator=torch.Generator().manual_seed(seed))
    generated = greedy_walk(processor, logits, prompt)
    items = trie.items_of_codes(trie.codes_of_tokens(generated[:, :trie.depth]))
    for row, item in enumerate(items.tolist()):
        assert item >= 0 and masks[row // beams][item]
    assert (generated[:, trie.depth] == EOS).all()                                     # EOS forced after L codes


@settings(max_examples=40, deadline=None)
@given(code_sets(max_items=12), st.data())
def test_every_allowed_item_is_reachable_and_no_other(case, data):
    """Logits biased towards one item's tokens lead the greedy walk to exactly that item when it is allowed."""
    codes, token_ids, dense_limit = case
    trie = CodeTrie(codes, token_ids, dense_limit=dense_limit)
    mask = data.draw(st.lists(st.booleans(), min_size=len(codes), max_size=len(codes)).filter(any))
    processor = TrieLogitsProcessor(trie, 2, 1, EOS, allowed=torch.tensor([mask]))
    for target, code in enumerate(codes):
        logits = torch.zeros(trie.depth, 1, VOCAB)
        for level, c in enumerate(code):
            logits[level, 0, token_ids[level][c]] = 10.0
        generated = greedy_walk(processor, logits, torch.tensor([[1, 2]]))
        item = int(trie.items_of_codes(trie.codes_of_tokens(generated))[0])
        if mask[target]:
            assert item == target
        else:
            assert item != target and mask[item]


def test_invalid_prefix_rows_are_fully_masked():
    trie = CodeTrie([[0, 1], [1, 0]], [[100, 101], [110, 111]])
    processor = TrieLogitsProcessor(trie, 1, 1, EOS, batch_size=2)
    scores = processor(torch.tensor([[5, 101], [5, 42]]), torch.zeros(2, VOCAB))
    assert scores[0].isfinite().nonzero().flatten().tolist() == [110]                   # <a_1> -> only <b_0>
    assert not scores[1].isfinite().any()                                                # 42 is no code token


def test_duplicate_codes_are_rejected_naming_the_items():
    with pytest.raises(TrieError, match=r"items \[1, 3\]"):
        CodeTrie([[0, 1], [2, 2], [1, 1], [2, 2]], [[10, 11, 12], [20, 21, 22]])


@pytest.mark.parametrize("codes, message", [
    ([], "no item codes"),
    ([[0, 1], [1]], "same length"),
    ([[0, -1]], "negative code"),
    (torch.zeros(2, 2), "integers"),
])
def test_malformed_codes_are_rejected(codes, message):
    with pytest.raises(TrieError, match=message):
        CodeTrie(codes, [[10, 11], [20, 21]])


def test_token_tables_must_cover_the_codes_and_be_distinct():
    with pytest.raises(TrieError, match="only 2 ids"):
        CodeTrie([[0, 2]], [[10], [20, 21]])
    with pytest.raises(TrieError, match="no token id for code 2"):
        CodeTrie([[0, 2]], [[10], [20, 21, -1]])
    assert CodeTrie([[0, 2]], [[10], [-1, -1, 22]]).items_of_codes(torch.tensor([[0, 2]])).tolist() == [0]
    with pytest.raises(TrieError, match="repeat a token id"):
        CodeTrie([[0, 1]], [[10], [20, 10]])


def test_index_token_convention():
    assert [index_token(level, 12) for level in range(4)] == ["<a_12>", "<b_12>", "<c_12>", "<d_12>"]


def test_processor_rejects_a_batch_it_was_not_built_for():
    trie = CodeTrie([[0, 1], [1, 0]], [[100, 101], [110, 111]])
    processor = TrieLogitsProcessor(trie, 1, num_beams=2, eos_token_id=EOS, batch_size=1)
    with pytest.raises(ValueError, match="1 requests x 2 beams = 2 rows, got 3"):
        processor(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, VOCAB))


def test_inplace_masking_gives_the_same_scores_in_the_same_tensor():
    trie = CodeTrie([[0, 1], [1, 0], [1, 1]], [[100, 101], [110, 111]])
    copy = TrieLogitsProcessor(trie, 1, 2, EOS, batch_size=1)
    inplace = TrieLogitsProcessor(trie, 1, 2, EOS, batch_size=1, inplace=True)
    for ids in (torch.tensor([[5], [6]]), torch.tensor([[5, 101], [6, 100]]), torch.tensor([[5, 101, 110]] * 2)):
        scores = torch.randn(2, VOCAB)
        expected = copy(ids, scores)
        assert expected is not scores and torch.isfinite(scores).all()          # the default leaves its input alone
        assert inplace(ids, scores) is scores and torch.equal(scores, expected)
