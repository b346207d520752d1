"""Each dataset names its item kind: Amazon products are bought by shoppers, never watched by viewers.

The Amazon case goes the way a real run does: raw files -> the amazon loader -> the prepare stage (catalogue
meta) -> run_folder.task_builder -> every task's samples.
"""
import gzip
import json
import random
import re
from dataclasses import fields

import pytest

from lcrec_chat import run_folder, stages
from lcrec_chat.catalog import Catalog
from lcrec_chat.chat import ChatEngine, CoWatch
from lcrec_chat.config import ChatConfig, Config, load_config
from lcrec_chat.data import DOMAINS, MOVIE, PRODUCT, domain_named, load_ml100k
from lcrec_chat.indexing import dataset_fingerprint
from lcrec_chat.intents import Vocabulary, has_content, parse_command, split_request
from lcrec_chat.recommender import Recommendation
from lcrec_chat.tasks import TASKS, TEMPLATES, Describer, intention_queries, prompts_for
from lcrec_chat.titles import TitleIndex

MOVIE_WORDS = ("movie", "film", "watch", "viewer", "viewing", "cinema", "tonight", "genre")
PRODUCT_WORDS = ("product", "products", "bought", "buy", "buys", "buying", "shopper", "purchase history",
                 "categories", "brand")

# (asin, title, category path); the store's top level is on every item, as in the real 2018 files
SHELVES = {
    "Strings": ["Musical Instruments", "Instrument Accessories", "Guitar & Bass Accessories", "Strings"],
    "Picks": ["Musical Instruments", "Instrument Accessories", "Guitar & Bass Accessories", "Picks & Pick Holders"],
    "Tuners": ["Musical Instruments", "Instrument Accessories", "Tuners"],
    "Pedals": ["Musical Instruments", "Amplifiers & Effects", "Guitar Effects", "Distortion & Overdrive"],
    "Cables": ["Musical Instruments", "Instrument Accessories", "Cables", "Instrument Cables"],
}
PRODUCTS = [
    ("B01", "Elixir Nanoweb Electric Guitar Strings", "Strings"), ("B02", "Ernie Ball Regular Slinky", "Strings"),
    ("B03", "D'Addario Phosphor Bronze Acoustic Strings", "Strings"), ("B04", "Dunlop Tortex Standard Picks", "Picks"),
    ("B05", "Fender Medium Celluloid Picks", "Picks"), ("B06", "Snark SN-5 Clip-On Tuner", "Tuners"),
    ("B07", "Korg GA1 Guitar and Bass Tuner", "Tuners"), ("B08", "Boss DS-1 Distortion Pedal", "Pedals"),
    ("B09", "Ibanez Tube Screamer", "Pedals"), ("B10", "Hosa Guitar Cable 10 ft", "Cables"),
    ("B11", "Kyser Quick-Change Capo", None),              # no category at all
]


def _write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def amazon_run(tmp_path_factory):
    """A prepared run folder of written Amazon files (16 shoppers, 11 products), with made-up codes."""
    folder = tmp_path_factory.mktemp("amazon")
    meta = [json.dumps({"asin": asin, "title": title, "brand": title.split()[0],
                        **({"category": SHELVES[shelf]} if shelf else {})}) for asin, title, shelf in PRODUCTS]
    _write_gz(folder / "meta_Instruments.json.gz", meta)
    rng = random.Random(0)
    ratings = [f"{asin},u{u},5.0,{1000 + 10 * t}" for u in range(16)
               for t, (asin, _, _) in enumerate(rng.sample(PRODUCTS, rng.randint(4, 9)))]
    (folder / "Instruments.csv").write_text("\n".join(ratings) + "\n")
    run = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/amazon-instruments.yaml",
                      [f"run_dir={run}", f"data.path={folder}", "data.name=Instruments", "data.min_interactions=2"])
    stages.prepare(cfg)
    items = run_folder.load_items(run)
    codes = [[i // 16, i % 16, 0] for i in range(len(items))]
    (run / "codes.json").write_text(json.dumps({"codebook_sizes": [16, 16, 16], "codes": codes,
                                                "fingerprint": dataset_fingerprint(items)}))
    builder, _ = run_folder.task_builder(run, cfg)
    return run, builder


def _texts(samples) -> list[str]:
    return [text for s in samples for text in (s.prompt, s.prefix, s.response)]


def _movie_words(text: str) -> list[str]:
    return [w for w in MOVIE_WORDS if w in text.lower()]


def test_amazon_run_is_a_product_domain(amazon_run):
    run, builder = amazon_run
    assert json.loads((run / "stats.json").read_text())["domain"] == "product"
    assert builder.domain is PRODUCT and builder.describer.domain is PRODUCT
    assert builder.prompts.dense == "List the products this user bought, in order."
    assert builder.request_prompt(["<a_1><b_2><c_0>"], "a cheap tuner") == \
        'I liked these products: <a_1><b_2><c_0>. Recommend a product. My request: "a cheap tuner"'


def test_amazon_tasks_have_no_movie_words(amazon_run):
    run, builder = amazon_run
    split = run_folder.load_split(run)
    samples = builder.build(split.train_sequences(), {t: 300 for t in TASKS}, seed=4)
    users = split.users
    for task in TASKS:
        samples += builder.heldout([split.history(u, "test") for u in users],
                                   [split.target(u, "test") for u in users], task, seed=2)
    samples.append(builder.dense_continuation(split.history(users[0], "test")))
    assert {s.task for s in samples} == set(TASKS)
    texts = _texts(samples) + intention_queries(builder.describer, list(range(len(builder.items))) * 5, seed=1)
    offending = [(t, _movie_words(t)) for t in texts if _movie_words(t)]
    assert not offending, offending[:5]
    joined = " ".join(texts).lower()
    missing = [w for w in PRODUCT_WORDS if not re.search(rf"\b{w}\b", joined)]
    assert not missing, missing
    assert "shopper's" in joined and "purchase history" in joined


def test_product_intentions_name_the_shelf_not_the_store(amazon_run):
    run, builder = amazon_run
    items = builder.items
    strings = next(i for i, it in enumerate(items) if it["genres"] and it["genres"][-1] == "Strings")
    capo = next(i for i, it in enumerate(items) if not it["genres"])
    queries = intention_queries(builder.describer, [strings] * 30, seed=0)
    assert all("strings product" in q for q in queries), queries
    assert not any("musical instruments" in q.lower() for q in queries)   # the top level is not an adjective
    assert all(q[0].isupper() and q[-1] in ".?!" and "  " not in q for q in queries)
    assert any("product" in q for q in intention_queries(builder.describer, [capo] * 10, seed=0))
    summary = builder.describer.preference([strings, capo], random.Random(0))
    assert summary.startswith("This user mostly buys ") and items[capo]["title"] in summary


def test_every_domain_renders_every_template():
    for domain in DOMAINS.values():
        prompts = prompts_for(domain)
        assert prompts is prompts_for(domain_named(domain.name))          # rendered once per domain
        for f in fields(prompts):
            value = getattr(prompts, f.name)
            texts = [value] if isinstance(value, str) else list(value)
            assert len(texts) == (1 if isinstance(TEMPLATES[f.name], str) else len(TEMPLATES[f.name]))
            assert not any("$" in t for t in texts), (domain.name, f.name)
            if domain is not MOVIE:   # placeholders ({genres}) are filled with the item's own categories
                words = [_movie_words(re.sub(r"\{\w+\}", "", t)) for t in texts]
                assert not any(words), (domain.name, f.name, words)


def test_domain_lookup_and_words():
    assert domain_named("movie") is MOVIE and domain_named("product") is PRODUCT
    with pytest.raises(ValueError, match="unknown item domain 'book' .*movie, product"):
        domain_named("book")
    words = PRODUCT.words()
    assert words["a_kind"] == "a product" and words["History_name"] == "Purchase history"
    assert MOVIE.noun_of("Horror") == "horror movie" and MOVIE.noun_of("Cyberpunk") == "cyberpunk movie"
    assert MOVIE.adjective_of("Comedy") == "funny" and MOVIE.adjective_of("Cyberpunk") == "cyberpunk"
    assert PRODUCT.noun_of("Tuners") == "tuners product" and PRODUCT.adjective_of("Musical Instruments") == ""
    assert hash(MOVIE) != hash(PRODUCT) and MOVIE == domain_named("movie")


def test_describer_defaults_to_movies():
    items = [{"title": "A", "year": None, "genres": ["Comedy"]}, {"title": "B", "year": None, "genres": ["Horror"]}]
    text = Describer(items, [1, 1]).preference([0, 1], random.Random(0))
    assert text == ("This user mostly watches comedy and horror movie and picks a mix of hits and lesser-known "
                    "titles. Recent favourites: A and B.")


# ------------------------------------------------------------------------------------------- the chat

CHAT_MOVIE_WORDS = ("movie", "film", "watch")


def popularity_recommender(catalog: Catalog):
    """Recommender.recommend's signature over catalogue popularity (as tests/test_chat.py's recommender)."""
    def recommend(history=(), query="", k=10, exclude=(), filters=None, num_beams=None):
        allowed = catalog.filter_indices(**filters) if filters else set(range(len(catalog)))
        ranked = sorted(allowed - set(exclude) - set(history), key=lambda i: (-catalog.item(i)["popularity"], i))
        return [Recommendation(i, -1.0 - r, catalog.item(i)) for r, i in enumerate(ranked[:k])]
    return recommend


def final_text(engine: ChatEngine, message: str) -> str:
    return list(engine.respond(message, engine.new_session()))[-1].as_text()


@pytest.fixture(scope="module")
def product_engine(amazon_run):
    run, _ = amazon_run
    catalog = Catalog(run / "catalog.sqlite")
    cowatch = CoWatch(run_folder.load_split(run).train_sequences())
    return ChatEngine(catalog, popularity_recommender(catalog), ChatConfig(), cowatch=cowatch)


def test_product_chat_speaks_of_products(product_engine):
    assert product_engine.domain is PRODUCT
    welcome = final_text(product_engine, "hi")
    assert "products" in welcome and "buying" in welcome
    assert not [w for w in CHAT_MOVIE_WORDS if w in welcome.lower()], welcome
    reply = list(product_engine.respond("I bought: Snark SN-5 Clip-On Tuner; Boss DS-1 Distortion Pedal",
                                        product_engine.new_session()))[-1]
    assert [r["title"] for r in reply.recognised] == ["Snark SN-5 Clip-On Tuner", "Boss DS-1 Distortion Pedal"]
    assert reply.unknown == [] and reply.cards
    text = reply.as_text()
    assert not [w for w in CHAT_MOVIE_WORDS if w in text.lower()], text
    assert re.search(r"\b(bought|shoppers?|products)\b", " ".join(c.reason for c in reply.cards)), text


def test_movie_chat_still_speaks_of_movies(tmp_path):
    catalog = Catalog.build(tmp_path / "catalog.sqlite", load_ml100k(max_users=20))
    engine = ChatEngine(catalog, popularity_recommender(catalog), ChatConfig())
    assert engine.domain is MOVIE
    welcome = final_text(engine, "hi")
    assert "movies you liked" in welcome and "watching" in welcome and "bought" not in welcome
    assert "viewer" in final_text(engine, "I watched Toy Story and Fargo")


def test_the_intent_parser_reads_product_cues():
    products, movies = Vocabulary(["Tuners"], PRODUCT), Vocabulary(["Comedy"], MOVIE)
    message = "I bought: Snark Tuner; Boss Pedal"
    assert products.patterns.history_cue.search(message) and not movies.patterns.history_cue.search(message)
    assert parse_command(message, products) is None and not has_content("I bought", products)
    assert split_request("products like Snark Tuner", products) == ["products like", "Snark Tuner"]
    assert parse_command("I already bought #2", products).kind == "reject"
    assert parse_command("bought #2", movies).kind == "info"           # "bought" is no movie word
    assert parse_command("that product", products).focus and parse_command("more items", products).kind == "more"


def test_titles_strip_the_labels_of_a_domain():
    rows = [{"idx": 0, "item_id": "a", "title": "Snark Tuner", "year": None, "popularity": 3},
            {"idx": 1, "item_id": "b", "title": "Boss Pedal", "year": None, "popularity": 2}]
    for text in ("I bought: Snark Tuner; Boss Pedal", "My purchase history: Snark Tuner, Boss Pedal",
                 "Wishlist - Snark Tuner; Boss Pedal", "items like Snark Tuner and Boss Pedal"):
        assert TitleIndex(rows, domain=PRODUCT).resolve(text).idxs == [0, 1], text
        assert TitleIndex(rows).resolve(text).idxs == [0, 1], text        # no domain: every domain's words
    assert TitleIndex(rows, domain=MOVIE).resolve("I bought: Snark Tuner").unknown == ["bought: Snark Tuner"]


def test_the_page_names_the_catalogues_items(product_engine):
    from lcrec_chat.ui import build_app, input_placeholder
    demo = build_app(product_engine, Config(), "ready")
    assert demo.title == "LC-Rec chat: product recommendations"
    boxes = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lcrec-input"]
    assert boxes[0].placeholder == input_placeholder(PRODUCT) == "e.g. a gift for a beginner"
    assert input_placeholder(MOVIE).startswith("e.g. I loved Toy Story")


def test_the_llm_methods_use_the_domain_words():
    """CoLLM's prompt and CLLM4Rec's content documents speak of products for a product catalogue."""
    from lcrec_chat.backbone import load_tokenizer
    from lcrec_chat.config import CLLM4RecConfig, ModelConfig
    from lcrec_chat.data.domain import PRODUCT
    from lcrec_chat.methods.cllm4rec import CLLM4Rec
    from lcrec_chat.methods.collm import PromptBuilder
    tiny = ModelConfig(base="tiny-llama")
    tokenizer = load_tokenizer(tiny)
    builder = PromptBuilder(tokenizer, ["Snark SN-5 Clip-On Tuner", "Boss DS-1 Distortion Pedal"], placeholder=7,
                            history=2, watched=PRODUCT.watched)
    opening = tokenizer.decode(builder.open)
    assert opening == f"A user {PRODUCT.watched}:" and "watch" not in opening
    items = [{"title": "Snark SN-5 Clip-On Tuner", "year": None, "genres": ["Tuners"]}]
    model = CLLM4Rec(CLLM4RecConfig(), tiny, items, num_users=1, item_kind=PRODUCT.kind, progress=False)
    text = tokenizer.decode(model.content_doc(0)[0][1:])
    assert f"is a {PRODUCT.kind} titled Snark" in text and "movie" not in text
