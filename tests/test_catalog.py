"""The catalogue on the real MovieLens-100K items: build, read, search, filters, codes, title resolution,
and hostile input (SQL/FTS syntax, huge text, non-Latin scripts)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lcrec_chat.catalog import Catalog, CatalogError
from lcrec_chat.data.movielens import load_ml100k


@pytest.fixture(scope="module")
def ml100k():
    return load_ml100k()


@pytest.fixture(scope="module")
def catalog(ml100k, tmp_path_factory) -> Catalog:
    path = tmp_path_factory.mktemp("catalog") / "catalog.sqlite"
    cat = Catalog.build(path, ml100k)
    yield cat
    cat.close()


def _idx(catalog: Catalog, title: str, year: int | None = None) -> int:
    hits = [i for i in range(len(catalog)) if catalog.item(i)["title"] == title
            and (year is None or catalog.item(i)["year"] == year)]
    assert len(hits) == 1, (title, year, hits)
    return hits[0]


def _db_intact(catalog: Catalog) -> None:
    with sqlite3.connect(catalog.path) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 1682
        assert conn.execute("SELECT count(*) FROM meta").fetchone()[0] >= 3
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM items_fts WHERE items_fts MATCH 'toy'").fetchone()[0] > 0


# -- building and reading --------------------------------------------------------------------------

def test_build_stores_every_item_with_popularity_and_meta(catalog, ml100k):
    assert len(catalog) == 1682 == len(ml100k.items)
    toy = catalog.item(0)
    assert toy["title"] == "Toy Story" and toy["year"] == 1995 and toy["item_id"] == "1"
    assert toy["genres"] == ["Animation", "Children's", "Comedy"]
    assert toy["code"] is None and toy["popularity"] == 452   # 452 ratings of Toy Story in ML-100K
    assert sum(catalog.item(i)["popularity"] for i in range(len(catalog))) == 100_000
    assert catalog.meta["dataset"] == "ml-100k" and catalog.meta["num_items"] == "1682"
    assert catalog.dataset_name == "ml-100k"
    assert [r["idx"] for r in catalog.items([5, 0, 3])] == [5, 0, 3]
    assert catalog.index_of("2") == 1 and catalog.index_of("no such id") is None


def test_item_out_of_range_and_returned_dicts_are_copies(catalog):
    with pytest.raises(IndexError, match="out of range"):
        catalog.item(1682)
    with pytest.raises(IndexError):
        catalog.item(-1)
    row = catalog.item(0)
    row["genres"].append("Horror")
    row["title"] = "changed"
    assert catalog.item(0)["genres"] == ["Animation", "Children's", "Comedy"]
    assert catalog.item(0)["title"] == "Toy Story"


def test_genres_lists_all_ml100k_genres(catalog):
    genres = catalog.genres()
    assert len(genres) == 18 and "Film-Noir" in genres and "Sci-Fi" in genres and "unknown" not in genres


def test_build_rejects_wrong_popularity_length(ml100k, tmp_path):
    with pytest.raises(CatalogError, match="popularity has 3 entries for 1682 items"):
        Catalog.build(tmp_path / "c.sqlite", ml100k, popularity=[1, 2, 3])
    assert not (tmp_path / "c.sqlite").exists()


def test_build_replaces_existing_file(ml100k, tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_text("stale")
    cat = Catalog.build(path, ml100k, popularity=[7] * len(ml100k.items))
    assert len(cat) == 1682 and cat.item(3)["popularity"] == 7
    cat.close()


def test_opening_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="catalogue not found: .*nope.sqlite"):
        Catalog(tmp_path / "nope.sqlite")
    assert not (tmp_path / "nope.sqlite").exists()          # opening must not create an empty db
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="not an SQLite catalogue"):
        Catalog(junk)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE things (x)")
    with pytest.raises(CatalogError, match="missing tables"):
        Catalog(other)


# -- item domain ----------------------------------------------------------------------------------

def test_domain_is_stored_and_older_catalogues_read_as_movies(ml100k, tmp_path):
    from dataclasses import replace
    assert Catalog.build(tmp_path / "m.sqlite", ml100k).domain == "movie"
    products = Catalog.build(tmp_path / "p.sqlite", replace(ml100k, domain="product"))
    assert products.domain == "product" and products.meta["domain"] == "product"
    products.close()
    assert Catalog(tmp_path / "p.sqlite").domain == "product"       # read back from the file
    with sqlite3.connect(tmp_path / "p.sqlite") as conn:            # as written before the domain was stored
        conn.execute("DELETE FROM meta WHERE key = 'domain'")
    assert Catalog(tmp_path / "p.sqlite").domain == "movie"


@pytest.mark.skipif(not Path("models/ml-100k/catalog.sqlite").exists(), reason="no shipped catalogue")
def test_shipped_catalogue_is_movies():
    with Catalog(Path("models/ml-100k/catalog.sqlite")) as shipped:
        assert shipped.domain == "movie"


# -- codes -----------------------------------------------------------------------------------------

def test_set_codes_round_trip_and_persist(ml100k, tmp_path):
    cat = Catalog.build(tmp_path / "c.sqlite", ml100k)
    assert cat.codes() is None
    codes = [[i % 256, (i // 256) % 256, 200, 7] for i in range(len(cat))]
    cat.set_codes(codes)
    assert cat.codes() == codes and cat.item(300)["code"] == [44, 1, 200, 7]
    cat.close()
    reopened = Catalog(tmp_path / "c.sqlite")
    assert reopened.codes() == codes and reopened.meta["code_levels"] == "4"
    with sqlite3.connect(tmp_path / "c.sqlite") as conn:
        assert conn.execute("SELECT code FROM items WHERE idx = 300").fetchone()[0] == "44 1 200 7"
    reopened.close()


def test_set_codes_rejects_bad_codes(catalog):
    n = len(catalog)
    with pytest.raises(CatalogError, match="got 2 codes for 1682 items"):
        catalog.set_codes([[1], [2]])
    with pytest.raises(CatalogError, match="item 5 has 2 levels"):
        catalog.set_codes([[1, 2, 3]] * 5 + [[1, 2]] + [[1, 2, 3]] * (n - 6))
    with pytest.raises(CatalogError, match="code of item 0 must be non-negative integers"):
        catalog.set_codes([[1, -2, 3]] + [[1, 2, 3]] * (n - 1))
    assert catalog.codes() is None   # nothing was written by the failed calls


# -- filters ---------------------------------------------------------------------------------------

def test_filter_indices_genres_years_where(catalog):
    noir = catalog.filter_indices(genres=["film-noir"])           # case-insensitive genre names
    assert len(noir) == 24 and all("Film-Noir" in catalog.item(i)["genres"] for i in noir)
    either = catalog.filter_indices(genres=["Film-Noir", "Western"])
    both = catalog.filter_indices(genres=["Animation", "Musical"], genres_mode="all")
    assert len(either) == len(noir | catalog.filter_indices(genres=["Western"]))
    assert _idx(catalog, "Lion King, The") in both and _idx(catalog, "Toy Story") not in both
    nineties = catalog.filter_indices(year_min=1990, year_max=1994)
    assert nineties and all(1990 <= catalog.item(i)["year"] <= 1994 for i in nineties)
    old_noir = catalog.filter_indices(genres=["Film-Noir"], year_max=1950)
    assert old_noir == {i for i in noir if catalog.item(i)["year"] <= 1950}
    assert catalog.filter_indices(where={"title": "Toy Story"}) == {0}
    assert catalog.filter_indices(where={"item_id": ["1", "2"]}) == {0, 1}
    assert catalog.filter_indices(where={"code": None}) == set(range(len(catalog)))
    assert catalog.filter_indices() == set(range(len(catalog)))


def test_filter_indices_bad_arguments_are_clear_errors(catalog):
    with pytest.raises(CatalogError, match="unknown column 'titel'.*columns: .*title"):
        catalog.filter_indices(where={"titel": "Toy Story"})
    with pytest.raises(CatalogError, match="unknown column"):
        catalog.filter_indices(where={"title = title OR 1=1 --": "x"})
    with pytest.raises(CatalogError, match="unknown genre 'Cartoon'.*Animation"):
        catalog.filter_indices(genres=["Cartoon"])
    with pytest.raises(CatalogError, match="year_min must be an integer"):
        catalog.filter_indices(year_min="1990")
    # a hostile value is only ever a parameter: it matches nothing and harms nothing
    assert catalog.filter_indices(where={"title": "x' OR '1'='1"}) == set()
    _db_intact(catalog)


# -- search ----------------------------------------------------------------------------------------

def test_search_ranks_title_hits_first(catalog):
    titles = [r["title"] for r in catalog.search("toy story")]
    assert titles[0] == "Toy Story"
    assert [r["title"] for r in catalog.search("lion king", limit=3)][0] == "Lion King, The"
    noir = catalog.search("film noir", limit=5)
    assert len(noir) == 5 and all("Film-Noir" in r["genres"] for r in noir)
    assert len(catalog.search("drama", limit=7)) == 7
    assert catalog.search("") == [] and catalog.search("   ...  ") == []


# -- title resolution ------------------------------------------------------------------------------

def test_resolves_the_mixed_example(catalog):
    res = catalog.resolve_titles("toy story, The Lion King (1994); goldeneye, Lion King")
    assert [m.title for m in res.matches] == ["Toy Story", "Lion King, The", "GoldenEye"]  # repeat reported once
    assert all(m.confidence == 1.0 for m in res.matches)
    assert res.unknown == [] and res.ambiguous == []


def test_resolves_a_sentence_with_filler(catalog):
    res = catalog.resolve_titles("I loved Toy Story, Aladdin and GoldenEye")
    assert res.idxs == [_idx(catalog, "Toy Story"), _idx(catalog, "Aladdin"), _idx(catalog, "GoldenEye")]
    assert res.unknown == []


@pytest.mark.parametrize("text", ["The Lion King", "Lion King, The", "lion king (1994)", "LION KING 1994",
                                  '"The Lion King"', "- the lion king!"])
def test_lion_king_spellings(catalog, text):
    res = catalog.resolve_titles(text)
    assert [m.title for m in res.matches] == ["Lion King, The"] and res.unknown == []


def test_titles_containing_commas_and_and(catalog):
    res = catalog.resolve_titles("Good, the Bad and the Ugly, The, Aladdin and the King of Thieves and "
                                 "Mr. Holland's Opus; The Good, The Bad and The Ugly")
    assert [m.title for m in res.matches] == ["Good, The Bad and The Ugly, The", "Aladdin and the King of Thieves",
                                              "Mr. Holland's Opus"]
    assert res.unknown == []


def test_foreign_articles_accents_and_alternative_titles(catalog):
    res = catalog.resolve_titles("Les Miserables\nLa Femme Nikita\nSe7en\nThe Blue Angel")
    assert [m.title for m in res.matches] == ["Misérables, Les", "Nikita (La Femme Nikita)", "Seven (Se7en)",
                                              "Blue Angel, The (Blaue Engel, Der)"]
    assert res.matches[1].confidence < 1.0 and "alternative title" in res.matches[1].note


def test_typos_are_matched_with_lower_confidence(catalog):
    res = catalog.resolve_titles("Goldeneye, Aladin, Shawshank Redemtion")
    assert [m.title for m in res.matches] == ["GoldenEye", "Aladdin", "Shawshank Redemption, The"]
    assert res.matches[0].confidence == 1.0                   # only case differs: exact
    assert 0.85 <= res.matches[1].confidence < 1.0 and "closest title" in res.matches[1].note


def test_unknown_titles_are_reported(catalog):
    res = catalog.resolve_titles("Toy Story, The Matrix Reloaded, Qwertyuiop")
    assert [m.title for m in res.matches] == ["Toy Story"]
    assert res.unknown == ["The Matrix Reloaded", "Qwertyuiop"]


def test_short_words_are_not_fuzzy_matched(catalog):
    res = catalog.resolve_titles("Heal, Fargp, Heat")     # one letter off "Heat"/"Fargo": too short to guess
    assert [m.title for m in res.matches] == ["Heat"] and res.unknown == ["Heal", "Fargp"]


def test_request_phrasing_around_titles(catalog):
    res = catalog.resolve_titles("Recommend me something like Toy Story please")
    assert [m.title for m in res.matches] == ["Toy Story"] and res.unknown == []
    res = catalog.resolve_titles("suggest movies similar to Heat and Casino. I also watched Twister too!")
    assert [m.title for m in res.matches] == ["Heat", "Casino", "Twister"] and res.unknown == []


def test_duplicate_titles_pick_by_year_hint_or_popularity(catalog):
    # Sabrina: 1995 (190 ratings) and 1954 (64 ratings) in ML-100K
    res = catalog.resolve_titles("Sabrina (1954), Sabrina")
    assert [(m.title, m.year) for m in res.matches] == [("Sabrina", 1954), ("Sabrina", 1995)]
    assert "picked 1954 by year hint" in res.matches[0].note and res.matches[0].confidence == 1.0
    assert "2 films share this title; picked the more popular (1995)" in res.matches[1].note
    assert 0.5 < res.matches[1].confidence < 1.0
    # Chasing Amy: two entries of the same 1997 film (ids 246 and 268); the more rated one (268) wins
    res = catalog.resolve_titles("chasing amy")
    assert res.matches[0].idx == catalog.index_of("268") and res.matches[0].year == 1997
    assert "2 entries share this title and year (1997)" in res.matches[0].note


def test_too_close_to_call_is_asked_back(ml100k, tmp_path):
    flat = Catalog.build(tmp_path / "flat.sqlite", ml100k, popularity=[10] * len(ml100k.items))
    res = flat.resolve_titles("Sabrina and Toy Story")
    assert [m.title for m in res.matches] == ["Toy Story"]
    (query, candidates), = res.ambiguous
    assert query == "Sabrina" and sorted(c["year"] for c in candidates) == [1954, 1995]
    assert all(set(c) >= {"idx", "title", "year", "genres", "popularity"} for c in candidates)
    flat.close()


def test_numbered_and_bulleted_lists(catalog):
    res = catalog.resolve_titles("My favourite movies are:\n1. Heat\n2) Casino\n- the godfather\n• Fargo")
    assert [m.title for m in res.matches] == ["Heat", "Casino", "Godfather, The", "Fargo"]
    assert res.unknown == []


# -- hostile and odd input -------------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE items; --",
    'toy" OR 1=1 --',
    'NEAR(toy story, 2) OR lion* AND ^king NOT "',
    "title:toy {title genres}: x",
    '"""""',
    "\x00\x01 toy",
    "トイ・ストーリー と ライオン・キング",
    "أحب فيلم الأسد الملك",
    "🎬🍿 Toy Story 🦁",
    "Toy Story; " * 1000,
    "x" * 10_000,
    "and, and; also, too",
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_handled_and_db_stays_intact(catalog, text):
    hits = catalog.search(text, limit=5)
    assert isinstance(hits, list) and len(hits) <= 5
    res = catalog.resolve_titles(text)
    assert len(res.matches) + len(res.ambiguous) + len(res.unknown) <= 50
    assert all(len(u) <= 80 for u in res.unknown)
    _db_intact(catalog)


def test_emoji_around_a_title_and_unicode_unknowns(catalog):
    res = catalog.resolve_titles("🎬🍿 Toy Story 🦁, トイ・ストーリー")
    assert [m.title for m in res.matches] == ["Toy Story"] and res.unknown == ["トイ・ストーリー"]


def test_huge_input_is_capped(catalog):
    text = ", ".join(f"Qwerty Asdf {i}" for i in range(500))
    res = catalog.resolve_titles(text)
    assert len(res.unknown) == 50 and res.skipped == 450 and res.matches == []
    res = catalog.resolve_titles("Toy Story, " + "y" * 30_000)
    assert res.truncated and res.idxs == [0]


def test_catalog_is_usable_from_worker_threads(catalog):
    # the chat serves requests from a thread pool; sqlite3 refuses cross-thread use unless told otherwise
    from concurrent.futures import ThreadPoolExecutor

    def work(n: int) -> tuple[str, list[int]]:
        return catalog.search("lion king")[0]["title"], catalog.resolve_titles("toy story, heat").idxs

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(16)))
    assert results == [("Lion King, The", [0, _idx(catalog, "Heat")])] * 16


def test_fts_operators_are_plain_words(catalog):
    # unquoted, "NOT" would exclude items and "*" would be a prefix query; quoted they are just tokens
    assert [r["title"] for r in catalog.search("toy NOT story", limit=1)] == ["Toy Story"]
    assert catalog.search("lio*") == []          # no prefix expansion to "Lion King"
    stories = catalog.search("story*", limit=20)
    assert len(stories) >= 5 and all("stor" in r["title"].lower() for r in stories)
