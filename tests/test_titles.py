"""Title keys and display forms (the pure-text half of title resolution; the catalogue tests cover the rest)."""
from __future__ import annotations

import pytest

from lcrec_chat.titles import TitleIndex, bare_key, display_title, split_alt_title, title_key, unmove_article


@pytest.mark.parametrize("title, shown", [
    ("Lion King, The", "The Lion King"),
    ("Good, The Bad and The Ugly, The", "The Good, The Bad and The Ugly"),
    ("Misérables, Les", "Les Misérables"),
    ("Star Maker, The (Uomo delle stelle, L')", "The Star Maker (L'Uomo delle stelle)"),
    ("Paris, Texas", "Paris, Texas"),
    ("Toy Story", "Toy Story"),
])
def test_display_title_puts_articles_back(title, shown):
    assert display_title(title) == shown


def test_keys_fold_case_accents_punctuation_and_articles():
    assert title_key("Lion King, The") == title_key("the LION king") == "the lion king"
    assert bare_key(title_key("The Lion King")) == "lion king"
    assert title_key("Misérables, Les") == "les miserables"
    assert title_key("Schindler's List") == title_key("Schindlers List") == "schindlers list"
    assert title_key("Wallace & Gromit") == "wallace and gromit"
    assert title_key("That Darn Cat!") == "that darn cat"
    assert title_key("トイ・ストーリー") == "トイ ストーリー"        # other scripts are kept, not mangled
    assert title_key("🎬🍿") == ""


def test_split_alt_title_and_unmove_article():
    assert split_alt_title("Seven (Se7en)") == ("Seven", "Se7en")
    assert split_alt_title("Heat") == ("Heat", "")
    assert unmove_article("Uomo delle stelle, L'") == "L'Uomo delle stelle"
    assert unmove_article("Niagara, Niagara") == "Niagara, Niagara"


def test_full_title_beats_a_partial_alias_and_the_bare_key():
    rows = [
        {"idx": 0, "item_id": "a", "title": "Alien", "year": 1979, "popularity": 10},
        {"idx": 1, "item_id": "b", "title": "Alien: Resurrection", "year": 1997, "popularity": 500},
        {"idx": 2, "item_id": "c", "title": "Saint, The", "year": 1997, "popularity": 5},
        {"idx": 3, "item_id": "d", "title": "Saint", "year": 2004, "popularity": 50},
            {"idx": 4, "item_id": "e", "title": "Star Wars: Episode V - The Empire Strikes Back",
         "year": 1980, "popularity": 9},
    ]
    index = TitleIndex(rows)
    res = index.resolve("Alien, The Saint, saint, Empire Strikes Back")
    assert res.idxs == [0, 2, 3, 4]
    assert res.matches[3].confidence < 1.0 and "part of the title" in res.matches[3].note


@pytest.mark.parametrize("text", ["My history: Toy Story; Fargo", "I liked: Toy Story, Fargo",
                                  "I watched Toy Story and Fargo",
                                  "history - Toy Story, Fargo", "Watch history: Toy Story; Fargo",
                                  "Here is my list: Toy Story, Fargo", "My ratings - Toy Story\nFargo"])
def test_a_label_before_a_list_is_stripped(text):
    rows = [{"idx": 0, "item_id": "a", "title": "Toy Story", "year": 1995, "popularity": 9},
            {"idx": 1, "item_id": "b", "title": "Fargo", "year": 1996, "popularity": 9},
            {"idx": 2, "item_id": "c", "title": "My Favorite Year", "year": 1982, "popularity": 9}]
    res = TitleIndex(rows).resolve(text)
    assert res.idxs == [0, 1] and res.unknown == []


def test_a_label_word_that_starts_a_title_stays_part_of_it():
    rows = [{"idx": 0, "item_id": "a", "title": "My Favorite Year", "year": 1982, "popularity": 9},
            {"idx": 1, "item_id": "b", "title": "Fargo", "year": 1996, "popularity": 9}]
    index = TitleIndex(rows)
    assert index.resolve("My Favorite Year, Fargo").idxs == [0, 1]
    assert index.resolve("History of the World: Part I").unknown == ["History of the World: Part I"]
