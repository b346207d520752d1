"""MovieLens wording is frozen: the shipped adapter (models/ml-100k) was tuned on exactly these strings, and the
app sends DENSE_PROMPT / CHAT_* at inference. The hashes below were recorded from the code before the wording
became per-dataset (issue "Domain words come from the dataset"); a change to any MovieLens prompt, response,
intention or preference summary fails here and names the group that moved.
"""
import hashlib
import json
import random

import pytest

from lcrec_chat import tasks
from lcrec_chat.catalog import Catalog
from lcrec_chat.data import MOVIE, domain_named, leave_one_out, load_ml100k
from lcrec_chat.tasks import TASKS, Describer, TaskBuilder, intention_queries, prompts_for, request_prompt

TEMPLATE_LISTS = ("SEQREC", "ITEM2INDEX", "ITEM2INDEX_DETAILED", "INDEX2ITEM", "FUSION_CODES_TO_TITLE",
                  "FUSION_TITLES_TO_CODE", "ITEMSEARCH", "ITEMSEARCH_WITH_HISTORY", "PREFERENCE", "INTENTION_FORMS")
# one value for every placeholder any template uses (format ignores the ones a template does not)
VALUES = {"history": "<a_1><b_2><c_3>, <a_4><b_5><c_6>", "item": "Toy Story (1995)", "code": "<a_7><b_8><c_9>",
          "genres": "Animation, Children's and Comedy", "query": "Something funny for tonight.",
          "phrase": "a funny 90s comedy"}
# synthetic items that reach the fallbacks ML-100K rarely or never does: no genre, a genre outside the maps,
# no year, a year after 2000
ODD_ITEMS = [
    {"title": "Nothing Known", "year": None, "genres": []},
    {"title": "Odd One", "year": 1987, "genres": ["Cyberpunk"]},
    {"title": "Odd Two", "year": 2003, "genres": ["Cyberpunk", "Comedy"]},
    {"title": "Unknown Genre", "year": 1995, "genres": ["unknown"]},
    {"title": "Old Comedy", "year": 1934, "genres": ["Comedy", "Romance"]},
    {"title": "Yearless Horror", "year": None, "genres": ["Horror", "Thriller"]},
]

EXPECTED_CONSTANTS = {
    "DENSE_PROMPT": "List the movies this user watched, in order.",
    "CHAT_HISTORY": "I liked these movies: {history}. Recommend a movie for me.",
    "CHAT_QUERY": "Recommend a movie. My request: \"{query}\"",
    "CHAT_BOTH": "I liked these movies: {history}. Recommend a movie. My request: \"{query}\"",
    "SYSTEM": "You are a recommender that answers with item indices.",
}

EXPECTED_SHA256 = {   # recorded from the pre-change code, see the module docstring
    "SEQREC": "a572083fc31096da4dc33cb21fbd38fc98e456329b9f2c7f26832c1938c1ea14",
    "ITEM2INDEX": "4e158ec37e18ea061c0c63cf74c68c547de5b5ad873ff7b6c1fa98022ab41556",
    "ITEM2INDEX_DETAILED": "83a5325e71606a32d42366ec24eba09757a4fff3358cfcdb9afbc1189063d939",
    "INDEX2ITEM": "50a50839f2e05c5fe6a6c4175f8d2c4c530b5208fcd0c08d307b246a86614fe2",
    "FUSION_CODES_TO_TITLE": "699f5249b8d4475c47a7d22d291afd726f9495ce290e3833c89e13d322d82489",
    "FUSION_TITLES_TO_CODE": "76adb156def55bf9d8d813ffb3b2357c51cd2cb83f244365c96607ff0af4709c",
    "ITEMSEARCH": "32d26203c4fdc957823324c017b5326139368a566e7eb7efc6791bd283a63d1e",
    "ITEMSEARCH_WITH_HISTORY": "1920f3df8f4e0c18622dc11bf6ec6006438e06da79384a1d4d832f0ed7a65070",
    "PREFERENCE": "b93994eae663add5777d7b9669d4458344f482d59aaad019b55c367f5561384b",
    "INTENTION_FORMS": "139fc39b0033e8d06e883d3c3f2123c698c8e4c92539e3f20ea9a6dcb01f0506",
    "genre_maps": "335801eb103d6f2b192ed9740e47cd3c9cde41b16ffa31920a52aadb5dc450ee",
    "request_prompt": "0865e9892d429fbf436a8b7878f1517aa447f6465f36b143c0f680af2d3a9c93",
    "build:seqrec": "8429ea86295cd8796f5f1a7160b2ad6a50ee2986326030d572009909ce3fece9",
    "build:item2index": "2af269607fd39b11af260ce3d866285bbb3b74e89d9cb7102aee6c0611131422",
    "build:index2item": "394dc3bc0bf3f51bc52df6fa94edb4ea44ab94c9a50ee999777696c9aec3706c",
    "build:fusionseqrec": "17aeb7df15b722c221484d6b43de2ed98dc92c88579105a9eed3918ff80cb479",
    "build:itemsearch": "d69002e9da9093087443d2d4749f933da423a0deb184ae57bdd6e9d0e42efde5",
    "build:preferenceobtain": "54386d0e45f1d3cc99785ea7028a1ba1dcf926d571406f46cd1be0283bc465d1",
    "build:chat": "d71b258b3a2086dfe3a4359daf3e952ec298953195167e4684dbb215648cb199",
    "build:seqrec_dense": "e68ea0bc22a9ec994e01ef48dc0b9012173bd88d5511154ec3f5a5e8bd3ac8a1",
    "heldout:seqrec": "c2399e65c7abf95d100ec3c79edfe46215477d071d714645feec8c5a73de8775",
    "heldout:item2index": "6fcca43fafb3d8c5fddff63bda65064d4bea1c0e8a71f4bdc9a04d022c2feaac",
    "heldout:index2item": "0e9ed0764ce3c2ed0454383d803bd527fa5fdcd929914840510355152cb0d93d",
    "heldout:fusionseqrec": "5a438dc485cb473a94e0932e38cbcdeca9d2df33a1692b29b1f36068034e1c7d",
    "heldout:itemsearch": "7d26e875273bf4f29301264ceaf293eafbb227215015b63cb2ef9b879e7e82ea",
    "heldout:preferenceobtain": "9b9743fd837101a2ad3bb061f9a8dcf630af7dfd557ea078384ea0c38c5742e5",
    "heldout:chat": "1c08cde150be9deb7e6a23dfdf14fb2c853676abcc1e889b704fdb01be89bd80",
    "heldout:seqrec_dense": "ff5cfe351ab7de522c944f76ad6899eb17079d693998e4614028b8c728d5b0a5",
    "intention": "67c3baa98630e771c26c6b704e63c6a51db173c2c570163c1bc829c08d657907",
    "intention_queries": "1b6f4f22bfe40a6f2932a415748441a1416c424fae9aafccbb7821fa65078423",
    "preference": "697d9d249a6e0950312164c8709b3892183e407a304499cde4dae95769f9d72c",
    "odd_items": "845f3a00982c964873bb464f4f5663e55f67657ec3cfdb364e4a255e58614049",
}


@pytest.fixture(scope="module")
def movie_builder(tmp_path_factory):
    dataset = load_ml100k()
    split = leave_one_out(dataset, 20)
    popularity = split.item_popularity(len(dataset.items))
    with Catalog.build(tmp_path_factory.mktemp("cat") / "catalog.sqlite", dataset, popularity) as catalog:
        items = catalog.items(list(range(len(catalog))))
        domain = domain_named(catalog.domain)       # the way run_folder.task_builder finds the words
    assert domain == MOVIE
    rng = random.Random(0)
    codes = [[i // 256, (i // 16) % 16, i % 16] for i in rng.sample(range(4096), len(items))]
    return split, items, TaskBuilder(items, codes, popularity, 20, domain)


def _samples(samples) -> list:
    return [[s.task, s.prompt, s.response, s.target, s.prefix] for s in samples]


def rendered(split, items, builder) -> dict[str, list]:
    """Every MovieLens string the tasks module produces, by group."""
    groups: dict[str, list] = {}
    prompts = builder.prompts
    for name in TEMPLATE_LISTS:
        assert list(getattr(prompts, name.lower())) == getattr(tasks, name), name
        groups[name] = [t.format(**VALUES) for t in getattr(prompts, name.lower())]
    groups["genre_maps"] = [sorted(tasks.GENRE_ADJECTIVE.items()), sorted(tasks.GENRE_NOUN.items()),
                            sorted(tasks.OCCASION.items())]
    history = builder.codes_of([0, 1, 2])
    groups["request_prompt"] = [request_prompt(history), request_prompt((), VALUES["query"]),
                                request_prompt(history, VALUES["query"])]
    assert groups["request_prompt"] == [builder.request_prompt(history), builder.request_prompt((), VALUES["query"]),
                                        builder.request_prompt(history, VALUES["query"])]
    train = split.train_sequences()
    samples = builder.build(train[:150], {t: 40 for t in TASKS}, seed=11)
    for task in TASKS:
        groups[f"build:{task}"] = _samples(s for s in samples if s.task == task)
    histories = [split.history(u, "valid") for u in split.users[:25]]
    targets = [split.target(u, "valid") for u in split.users[:25]]
    for task in TASKS:
        groups[f"heldout:{task}"] = _samples(builder.heldout(histories, targets, task, seed=5))
    describer = builder.describer
    rng = random.Random(3)
    picks = rng.sample(range(len(items)), 80)
    groups["intention"] = [describer.intention(i, random.Random(i), picks[:k % 7])
                           for k, i in enumerate(picks)]
    groups["intention_queries"] = intention_queries(describer, picks, seed=9)
    groups["preference"] = [describer.preference(picks[k:k + 3 + k % 9], random.Random(k)) for k in range(40)]
    odd = Describer(ODD_ITEMS, [5, 1, 0, 3, 9, 2])
    groups["odd_items"] = ([odd.intention(i, random.Random(s), range(len(ODD_ITEMS)))
                            for i in range(len(ODD_ITEMS)) for s in range(12)]
                           + [odd.preference(h, random.Random(s)) for s in range(6)
                              for h in ([0], [1, 3], [2, 4, 5], [0, 5], list(range(6)))])
    return groups


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()


def test_movie_constants_are_unchanged():
    for name, text in EXPECTED_CONSTANTS.items():
        assert getattr(tasks, name) == text, name
    prompts = prompts_for(MOVIE)
    assert (prompts.dense, prompts.chat_history, prompts.chat_query, prompts.chat_both) == \
        tuple(EXPECTED_CONSTANTS[n] for n in ("DENSE_PROMPT", "CHAT_HISTORY", "CHAT_QUERY", "CHAT_BOTH"))


def test_movie_prompts_are_byte_for_byte_unchanged(movie_builder):
    groups = rendered(*movie_builder)
    assert set(groups) == set(EXPECTED_SHA256)
    moved = [name for name, value in groups.items() if digest(value) != EXPECTED_SHA256[name]]
    assert not moved, f"MovieLens wording changed in: {moved}"
