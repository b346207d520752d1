"""What a dataset's items are called, and the words that go with them.

Prompts about guitar strings must not ask "which movie will they watch next?", so every loader names its
item kind (`Dataset.domain`), the catalogue stores that name in its meta table, and the task templates are
written with these words (`lcrec_chat.tasks`). A domain is looked up by name with `domain_named`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Mapping


def _frozen(mapping: dict[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Domain:
    """The vocabulary of one item kind. Each text field is a word or phrase the templates (and the chat's
    replies, lcrec_chat.chat) insert as-is; the verb tuples are what the chat reads in messages (intents).

    Verbs are given in every form the templates need, because English forms ("watched", "bought") cannot be
    derived reliably. `genre_noun` / `genre_adjective` are format strings for a genre missing from the maps
    ("{}" is the lower-cased genre); an empty `genre_adjective` means genres are never used as adjectives.
    """
    name: str              # stored in the catalogue's meta table; key of DOMAINS
    kind: str              # "movie": one item
    kinds: str             # "movies"
    synonym: str           # "film": another word for one item, for varied phrasing
    synonyms: str          # "films"
    entry: str             # "title": one catalogue entry, as in "a comedy title"
    entries: str           # "titles", as in "popular, well-known titles"
    watch: str             # the verb of an interaction, in the forms the templates use
    watched: str
    watches: str
    watching: str
    seen: str              # "seen", as in "that I haven't seen"
    person: str            # "viewer": someone with a history
    history_name: str      # "viewing history"
    genre_word: str        # "genres": what Item.genres holds for this kind
    era: str               # "era": what else tells items apart ("from another era")
    naming: str            # "title and year": what names one item
    moment: str            # " tonight": when a wish is for ("I want to watch X tonight"); may be empty
    list_name: str         # "watchlist": a list a person keeps of items ("my watchlist: X, Y")
    # what the chat quotes as examples: a wish, and a pasted history ("" where no title suits every dataset
    # of the kind)
    example_wish: str
    example_history: str
    genre_noun: str = "{}"
    genre_adjective: str = "{}"
    # hash=False: mappings cannot be hashed, and equal domains still hash equal without them
    genre_nouns: Mapping[str, str] = field(default_factory=dict, hash=False)
    genre_adjectives: Mapping[str, str] = field(default_factory=dict, hash=False)
    occasions: Mapping[str, str] = field(default_factory=dict, hash=False)
    # the chat reads these in messages: forms saying a person already had an item ("I've seen X", "seen #2")
    # and the other forms that may lead a pasted list ("I watch X"); English forms cannot be derived
    past_verbs: tuple[str, ...] = ()
    present_verbs: tuple[str, ...] = ()
    example_filters: tuple[str, ...] = ()   # refinements the chat's help quotes ("only comedies")

    def nouns(self) -> tuple[str, ...]:
        """Every word for items, singular and plural: "movie", "movies", "film", "films"."""
        return self.kind, self.kinds, self.synonym, self.synonyms

    def words(self) -> dict[str, str]:
        """Template words: every text field, a capitalised form of each ("History_name") and the article
        forms "a_kind" and "a_person"."""
        words = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), str)}
        words["a_kind"] = article(self.kind)
        words["a_person"] = article(self.person)
        return {**words, **{key[:1].upper() + key[1:]: text[:1].upper() + text[1:] for key, text in words.items()}}

    def noun_of(self, genre: str) -> str:
        """A noun phrase for one item of `genre`: "comedy", "horror movie", "strings product"."""
        return self.genre_nouns.get(genre, self.genre_noun.format(genre.lower()))

    def adjective_of(self, genre: str) -> str:
        """An adjective for `genre` ("funny"), or "" when this kind does not describe items that way."""
        return self.genre_adjectives.get(genre, self.genre_adjective.format(genre.lower()))


def article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


MOVIE = Domain(
    name="movie", kind="movie", kinds="movies", synonym="film", synonyms="films", entry="title", entries="titles",
    watch="watch", watched="watched", watches="watches", watching="watching", seen="seen", person="viewer",
    history_name="viewing history", genre_word="genres", era="era", naming="title and year", moment=" tonight",
    list_name="watchlist", example_wish="a funny 90s movie for a family night",
    example_history="I loved Toy Story, Aladdin and GoldenEye",
    past_verbs=("watched", "seen", "saw"), present_verbs=("watch", "watching", "see"),
    example_filters=("only comedies", "no horror", "something older", "from the 80s"),
    genre_noun="{} movie", genre_adjective="{}",
    genre_adjectives=_frozen({
        "Comedy": "funny", "Horror": "scary", "Romance": "romantic", "Action": "action-packed",
        "Thriller": "suspenseful", "Animation": "animated", "Children's": "family-friendly",
        "Sci-Fi": "sci-fi", "Fantasy": "fantasy", "Musical": "musical", "Mystery": "mysterious",
        "War": "war", "Western": "western", "Crime": "crime", "Adventure": "adventurous", "Drama": "dramatic",
        "Film-Noir": "noir", "Documentary": "documentary",
    }),
    genre_nouns=_frozen({
        "Comedy": "comedy", "Drama": "drama", "Thriller": "thriller", "Horror": "horror movie",
        "Sci-Fi": "science-fiction movie", "Western": "western", "War": "war movie", "Musical": "musical",
        "Film-Noir": "film noir", "Mystery": "mystery", "Crime": "crime movie", "Documentary": "documentary",
        "Animation": "animated movie", "Children's": "children's movie", "Fantasy": "fantasy movie",
        "Adventure": "adventure movie", "Romance": "romance", "Action": "action movie",
    }),
    occasions=_frozen({
        "Children's": "for a family night", "Animation": "to watch with the kids", "Romance": "for a date night",
        "Horror": "for a Halloween night", "Comedy": "to cheer me up", "Action": "for a Friday night with friends",
        "Thriller": "that keeps me on the edge of my seat", "Drama": "for a quiet evening",
    }),
)

# Amazon categories are a path from the store's top level ("Musical Instruments") down to the shelf
# ("Electric Guitar Strings"): the shelf names the item ("an electric guitar strings product"), and the top
# level is the same for every item, so it is not used as an adjective.
PRODUCT = Domain(
    name="product", kind="product", kinds="products", synonym="item", synonyms="items", entry="product",
    entries="products", watch="buy", watched="bought", watches="buys", watching="buying", seen="bought",
    person="shopper", history_name="purchase history", genre_word="categories", era="brand", naming="title",
    moment="", list_name="wishlist", example_wish="a gift for a beginner", example_history="",
    past_verbs=("bought", "purchased", "ordered", "owned", "used"), present_verbs=("buy", "buying", "own", "use"),
    genre_noun="{} product", genre_adjective="",
)

DOMAINS: dict[str, Domain] = {d.name: d for d in (MOVIE, PRODUCT)}


def domain_named(name: str) -> Domain:
    """The preset called `name` ("movie", "product")."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown item domain {name!r} (known: {', '.join(DOMAINS)})") from None
