"""The alignment tasks on the real ML-100K split: formats, grammar of composed text, and no leakage."""
import random
import re

import pytest

from lcrec_chat.catalog import Catalog
from lcrec_chat.data import leave_one_out, load_ml100k
from lcrec_chat.tasks import (DENSE_PROMPT, TASKS, Describer, TaskBuilder, intention_queries, render,
                              request_prompt)

CODE = re.compile(r"^(<[a-z]_\d+>)+$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    dataset = load_ml100k()
    split = leave_one_out(dataset, 20)
    path = tmp_path_factory.mktemp("cat") / "catalog.sqlite"
    popularity = split.item_popularity(len(dataset.items))
    catalog = Catalog.build(path, dataset, popularity)
    items = catalog.items(list(range(len(catalog))))
    rng = random.Random(0)
    codes = [[i // 256, (i // 16) % 16, i % 16] for i in rng.sample(range(4096), len(items))]
    return split, items, codes, TaskBuilder(items, codes, popularity, 20)


def test_every_task_has_well_formed_samples(world):
    split, items, codes, builder = world
    budget = {t: 30 for t in TASKS}
    samples = builder.build(split.train_sequences()[:100], budget, seed=1)
    assert {s.task for s in samples} == set(TASKS)
    code_of = {builder.code_text[i]: i for i in range(len(items))}
    for s in samples:
        assert s.prompt and s.response, s
        if s.task in ("seqrec", "item2index", "itemsearch", "chat"):
            assert CODE.match(s.response) and code_of[s.response] == s.target
        if s.task == "index2item":
            assert s.response == builder.describer.display(s.target)
            assert builder.code_text[s.target] in s.prompt
        if s.task == "seqrec_dense":
            listed = s.response.split(", ")
            assert 2 <= len(listed) <= 21 and all(CODE.match(c) for c in listed)
            assert s.prompt == DENSE_PROMPT
        if s.task in ("seqrec", "preferenceobtain"):
            assert len(re.findall(r"<a_\d+>", s.prompt)) <= 21   # history capped at max_history (+ target)


def test_no_valid_or_test_target_leaks_into_training(world):
    split, items, codes, builder = world
    train_items = {i for seq in split.train_sequences() for i in seq}
    heldout_only = {u.valid for u in split.users} | {u.test for u in split.users}
    heldout_only -= train_items
    assert heldout_only, "ML-100K has items that appear only as held-out targets"
    samples = builder.build(split.train_sequences(), {t: 400 for t in TASKS if t not in
                                                     ("item2index", "index2item")}, seed=3)
    leaked_codes = {builder.code_text[i] for i in heldout_only}
    for s in samples:
        assert s.target not in heldout_only
        assert not any(code in s.prompt or code in s.response for code in leaked_codes), s


def test_intentions_are_grammatical_and_come_from_the_target(world):
    split, items, codes, builder = world
    describer = builder.describer
    toy_story = next(i for i, it in enumerate(items) if it["title"] == "Toy Story")
    queries = intention_queries(describer, [toy_story] * 40, seed=0)
    assert len(set(queries)) > 10                          # varied phrasing
    for q in queries:
        assert q[0].isupper() and q[-1] in ".?!", q
        assert "  " not in q and " a a" not in q and "an a " not in q
        assert re.search(r"comedy|funny|animated|children|family|kids|90s", q), q
    assert describer.intention(toy_story, random.Random(1)) != ""


def test_preference_summary_reflects_history(world):
    split, items, codes, builder = world
    comedies = [i for i, it in enumerate(items) if it["genres"] == ["Comedy"]][:10]
    text = builder.describer.preference(comedies, random.Random(0))
    assert "comed" in text and items[comedies[-1]]["title"] in text


def test_request_prompt_and_rendering_with_real_tokenizer(world):
    from lcrec_chat import backbone
    from lcrec_chat.config import ModelConfig
    split, items, codes, builder = world
    tokenizer = backbone.load_tokenizer(ModelConfig(base="tiny-llama"))
    with pytest.raises(ValueError, match="history, a query, or both"):
        request_prompt()
    history = builder.codes_of([0, 1, 2])
    assert history[0] in request_prompt(history) and "funny" in request_prompt(history, "funny")
    sample = builder.chat([0, 1, 2], 3, random.Random(0))
    context, answer = render(tokenizer, sample)
    assert context.endswith("assistant\n") and answer.endswith("<|im_end|>")
    dense = builder.dense_continuation([0, 1, 2], 3)
    context, answer = render(tokenizer, dense)
    assert context.endswith(", ") and answer.startswith(builder.code_text[3])


def test_window_dropout_takes_items_out_of_dense_windows_only(world):
    """TaskBuilder.drop_window_items: about `share` of the dense windows' items are taken out, the rest keep their
    order and the rewritten sample is the dense sample of the kept items (codes, target, items agree); other tasks
    are the very same samples; the same seed gives the same samples, share 0 none, a share of 1 is refused."""
    split, items, codes, builder = world
    samples = builder.build(split.train_sequences()[:200], {"seqrec_dense": 150, "item2index": 20, "seqrec": 20}, 4)
    dropped, removed = builder.drop_window_items(samples, 0.2, seed=9)
    written = sum(len(s.items) for s in samples if s.task == "seqrec_dense")
    taken = 0
    for before, after in zip(samples, dropped):
        if before.task != "seqrec_dense":
            assert after is before
            continue
        it = iter(before.items)
        assert all(item in it for item in after.items)           # a subsequence: the kept items in their order
        assert 2 <= len(after.items) <= len(before.items)
        assert after == builder.seqrec_dense(list(after.items[:-1]), after.items[-1], None)
        assert after.response.split(", ") == builder.codes_of(after.items)
        taken += len(before.items) - len(after.items)
    assert taken == removed and 0.15 * written < removed < 0.25 * written
    assert builder.drop_window_items(samples, 0.2, seed=9) == (dropped, removed)
    assert builder.drop_window_items(samples, 0.2, seed=10)[0] != dropped
    assert builder.drop_window_items(samples, 0.0, seed=9) == (list(samples), 0)
    with pytest.raises(ValueError, match="window_dropout"):
        builder.drop_window_items(samples, 1.0, seed=9)
