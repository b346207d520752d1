"""Reading a chat message: plain rules, no model output (the model only ever ranks items).

A message is read in this order; the first rule that applies wins.

0. **help** ("help", "hi", an empty message) and **thanks** ("thanks", "ok", "great"): a short answer.
1. **reset**: "start over", "restart", "reset", "new search", "forget everything" (what follows, as in
   "start over: 80s comedies", is then read as a new message).
2. **item commands**, which point at the cards on screen by number ("#2", "number 2", "the second one",
   "the 3rd", "the last one") or at the item last talked about ("that one", "this movie", "it"):
   - *reject*: "not #2", "no to the second one", "seen #3", "skip that one", "I don't like #1";
   - *like*: "more like the second one", "I loved #1", "#2 looks good";
   - *info*: "what is #3?", "tell me about the first one", "#2?" (an item reference with no verb).
3. **more**: "more", "show me more", "something else", "other ones".
4. **refine**: a message made only of filter phrases and filler words changes the filters of the current
   request and keeps its history and intention: "only comedies", "no horror", "something older" / "newer",
   "from the 80s", "before 1990", "between 1980 and 1990", "any genre", "any year", and mood words
   (``MOOD_WORDS``: "something lighter", "feel-good", "darker", "mind-bending", "not too gory").
5. **request**: anything else. The engine resolves titles in it through the catalogue and decides what is a
   pasted history and what is an intention (see :func:`split_request` and ``chat.ChatEngine``); filter words
   inside the intention part become that request's filters.

Genre phrases: adjacent genre words are one compound that needs every genre ("romantic comedy", "action-comedy",
"sci-fi thriller", "a funny 90s drama", "rom-com" = Romance AND Comedy); words joined by "or"/"and"/commas need
any of them ("comedy or romance"). A mood wants some genres and avoids others ("lighter": Comedy, Animation, ...
and no Horror, War, Crime, Thriller); a genre the message names wins over the mood's wanted genres.

Item words and verbs ("this movie", "seen #2", "I watched ...") are those of the catalogue's domain
(``patterns_for``: "this product", "bought #2", "I bought ..." for Amazon); the examples here are MovieLens ones.

Numbers and ordinals count as item references only in forms a title rarely takes ("#2", "number 2", "the
second one", "the second" at the end of a message), so "First Knight" or "The Last of the Mohicans" stay titles.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

from .data.domain import MOVIE, Domain
from .tasks import GENRE_ADJECTIVE, GENRE_NOUN

MAX_QUERY_CHARS = 200

# word or phrase -> catalogue genre (MovieLens names); phrases the intention templates use are included
# (tasks.GENRE_ADJECTIVE / GENRE_NOUN), so what the model was tuned on maps back to the same genre. Like the
# mood table below, it serves any domain: a Vocabulary only keeps the genres its catalogue has.
GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "Comedy": ("comedy", "comedies", "funny", "funnier", "comedic", "humor", "humour", "hilarious", "laugh",
               "laughs", "rom-com", "romcom", "rom-coms"),
    "Horror": ("horror", "horrors", "scary", "scarier", "frightening", "creepy", "spooky", "terrifying"),
    "Romance": ("romance", "romances", "romantic", "love story", "love stories", "rom-com", "romcom", "rom-coms"),
    "Action": ("action", "action-packed", "action movies"),
    "Thriller": ("thriller", "thrillers", "suspense", "suspenseful", "edge of my seat"),
    "Animation": ("animation", "animated", "cartoon", "cartoons", "anime"),
    "Children's": ("children's", "childrens", "children", "kids", "kid", "family", "family-friendly"),
    "Sci-Fi": ("sci-fi", "scifi", "science fiction", "science-fiction"),
    "Fantasy": ("fantasy", "magical"),
    "Musical": ("musical", "musicals"),
    "Mystery": ("mystery", "mysteries", "mysterious", "whodunit", "whodunnit"),
    "War": ("war",),
    "Western": ("western", "westerns", "cowboy", "cowboys"),
    "Crime": ("crime", "gangster", "gangsters", "heist", "heists", "mafia"),
    "Adventure": ("adventure", "adventures", "adventurous"),
    "Drama": ("drama", "dramas", "dramatic"),
    "Film-Noir": ("noir", "film noir", "film-noir", "films noirs"),
    "Documentary": ("documentary", "documentaries"),
}
for _g, _w in GENRE_ADJECTIVE.items():
    GENRE_WORDS[_g] = tuple(dict.fromkeys(GENRE_WORDS.get(_g, ()) + (_w,)))
for _g, _w in GENRE_NOUN.items():
    GENRE_WORDS[_g] = tuple(dict.fromkeys(GENRE_WORDS.get(_g, ()) + (_w.removesuffix(" movie"),)))

# mood word -> (genres wanted, any of them; genres to avoid). A mood's wanted genres are a preference: they
# only become the filter when the message names no genre itself ("a dark comedy" stays a comedy, minus the
# kids' genres). Negated ("not too gory", "less dark", "nothing light") the wanted genres are avoided instead.
_LIGHT = (("Comedy", "Animation", "Children's", "Musical"), ("Horror", "War", "Crime", "Thriller", "Film-Noir"))
MOOD_WORDS: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("light", "lighter", "lighthearted", "light-hearted", "feel-good", "feel good", "feelgood", "uplifting",
     "cheerful", "happy", "happier", "heartwarming", "heart-warming", "wholesome", "cozy", "cosy", "relaxing",
     "easygoing", "easy-going", "upbeat", "fun", "silly", "goofy"): _LIGHT,
    ("dark", "darker", "gritty", "grittier", "grim", "bleak", "disturbing", "sinister"):
        (("Crime", "Thriller", "Film-Noir", "Horror"), ("Children's", "Animation", "Musical")),
    ("gory", "gorier", "gore", "bloody", "gruesome", "slasher", "splatter"): (("Horror",), ()),
    ("violent", "violence"): (("Action", "Crime", "Horror", "War"), ()),
    ("mind-bending", "mind bending", "mindbending", "mind-blowing", "mind blowing", "mind-bender", "trippy",
     "twisty", "cerebral", "thought-provoking", "thought provoking", "surreal", "puzzling", "head-scratcher"):
        (("Sci-Fi", "Mystery", "Thriller"), ()),
    ("exciting", "thrilling", "intense", "gripping", "adrenaline", "fast-paced", "fast paced", "epic"):
        (("Action", "Adventure", "Thriller"), ()),
    ("sad", "sadder", "tearjerker", "tear-jerker", "weepy", "emotional", "touching", "melancholic", "moving"):
        (("Drama",), ("Comedy", "Horror")),
}
KNOWN_MOODS = "lighter, feel-good, darker, scary, funny, mind-bending, exciting, sad, not too gory"

_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
             "eighth": 8, "ninth": 9, "tenth": 10, "last": -1}
_DECADE_WORDS = {"twenties": 1920, "thirties": 1930, "forties": 1940, "fifties": 1950, "sixties": 1960,
                 "seventies": 1970, "eighties": 1980, "nineties": 1990}
_ORD = "|".join(_ORDINALS)
_ORDINAL = rf"(?P<n>{_ORD}|\d{{1,2}}(?:st|nd|rd|th))"
# item references that name no item word; group "n" holds the number or ordinal word (the ones that do,
# "the second movie", are in DomainPatterns)
_REF_PATTERNS = [
    re.compile(r"#\s?(?P<n>\d{1,2})\b"),
    re.compile(r"\b(?:number|no\.|nr\.?|item|option|pick)\s?(?P<n>\d{1,2})\b", re.I),
    re.compile(rf"\bthe\s+{_ORDINAL}\b(?=\s*(?:$|[?.!,;]|and\b|or\b))", re.I),
]

_RESET = re.compile(r"^\W*(?:please\s+)?(?:let'?s\s+)?(?:start\s+(?:over|again|afresh)|restart|reset|"
                    r"new\s+(?:search|conversation|chat|session)|forget\s+(?:it|that|everything|all)|"
                    r"begin\s+again|clear(?:\s+(?:all|everything|the\s+chat))?(?=\W*$|\s*[:,.;!-]))"
                    r"\b[\s:,.!-]*", re.I)   # "clear" alone, not "Clear and Present Danger"
_REJECT_WORDS = (r"not|no|nope|never|without|skip|drop|remove|hide|exclude|hate|hated|dislike|disliked|don'?t|"
                 r"didn'?t|already|boring|meh")
_LIKE = re.compile(r"\b(?:more\s+like|like|liked|love|loved|enjoy|enjoyed|similar|yes|good|great|nice|"
                   r"perfect|keep)\b", re.I)
_INFO = re.compile(r"\b(?:what|which|who|tell|about|info|information|details?|describe|explain|why)\b|\?", re.I)

_THANKS = re.compile(r"\W*(?:(?:thanks?|thank\s+you|thx|ok(?:ay)?|cool|nice|great|awesome|perfect|got\s+it|"
                     r"a\s+lot|so\s+much|much\s+appreciated)[\s,!.]*)+", re.I)

_YEAR = r"(1[89]\d\d|20\d\d)"
_YEAR_RANGE = [
    (re.compile(rf"\bbetween\s+{_YEAR}\s+and\s+{_YEAR}\b", re.I), "between"),
    (re.compile(rf"\bfrom\s+{_YEAR}\s+(?:to|until|till)\s+{_YEAR}\b", re.I), "between"),
    (re.compile(rf"\b{_YEAR}\s*(?:-|–|to)\s*{_YEAR}\b", re.I), "between"),
    (re.compile(rf"\b(?:before|until|till|older\s+than|earlier\s+than|pre-?)\s*{_YEAR}\b", re.I), "before"),
    (re.compile(rf"\b(?:after|newer\s+than|later\s+than|post-?)\s*{_YEAR}\b", re.I), "after"),
    (re.compile(rf"\bsince\s+{_YEAR}\b", re.I), "since"),
    (re.compile(rf"\b(?:from|in|of)\s+{_YEAR}\b(?!s)", re.I), "in"),
]
_DECADE = re.compile(r"(?<![\w])(?:the\s+)?(?:'|’)?(?P<c>19|20)?(?P<d>\d)0(?:'|’)?s\b|"
                     r"\b(?:the\s+)?(?P<w>" + "|".join(_DECADE_WORDS) + r")\b", re.I)
_OLDER = re.compile(r"\b(?:older|earlier|less\s+recent|not\s+so\s+(?:new|recent))\b", re.I)
_NEWER = re.compile(r"\b(?:newer|more\s+recent|recent|modern|later|latest|less\s+old)\b", re.I)
_ANY_GENRE = re.compile(r"\b(?:any|all|every)\s+(?:genres?|kinds?|types?)\b", re.I)
_ANY_YEAR = re.compile(r"\b(?:any|all)\s+(?:years?|decades?|eras?|time)\b", re.I)
_CLEAR_FILTERS = re.compile(r"\b(?:clear|remove|drop|reset|no)\s+(?:the\s+)?filters?\b", re.I)
_NEGATION = (r"(?:no|not|without|nothing|non|less|except|but\s+not|anything\s+but|not\s+too|nothing\s+too|hate|"
             r"dislike|avoid|don'?t\s+(?:like|want)|can'?t\s+stand|not\s+into)")
_NEGATION_GAP = r"(?:(?:a|an|any|more|so|very|too|that|overly)\s+)?"
# between the two genre words of a compound: a space or a hyphen, optionally a decade ("a funny 90s drama",
# the form the intention templates of tasks.py use for an item with both genres)
_COMPOUND_GAP = r"(?:\s*-\s*|\s+(?:(?:'|’)?(?:19|20)?\d0(?:'|’)?s\s+)?)"

# words that carry no request of their own (a refinement is filter phrases plus these, and the item words)
_FILLER = frozenset("""
a an the only just something anything some more ones one please pls show me give
make it them those these instead but and or now then from in of with about maybe lets let's let try rather
ok okay i want would like prefer could you can bit little slightly stuff that are is be to what how also
really very much too so thanks thank same kind sort type types kinds genre genres year years decade decades
era eras time ones please stick keep keeping limit restrict filter filtered by only that's thats which
""".split())

# where a pasted history turns into a wish: split there so each side is read on its own. Not inside a title: a
# full stop only ends a sentence before a space (or the end) and after neither an initial ("E.T.") nor a title
# word ("Mrs. Doubtfire", "Dr. Strangelove"); "now" only after a comma or before more words, not an "and"
# ("Apocalypse Now and Heat"); a list's numbering ("1. Toy Story") is taken off first (_LIST_MARKER).
_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Mt", "vs", "Vol", "No")
_CLAUSE_SPLIT = re.compile(
    r"\s*(?:" + "".join(rf"(?<!\b{a})" for a in _ABBREVIATIONS) + r"(?<!\b[a-z])\.+(?=\s|$)|[!?]+(?=\s|$)|[;\n]+|"
    r",?\s+\b(?:but|though|although|however|except)\b|,\s*now\b|\s+now\s+(?!(?:and|or)\b)(?=\w))\s*", re.I)
_LIST_MARKER = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*\u2022])\s+", re.M)


def _words(words: Iterable[str]) -> str:
    """A regex alternation of literal words."""
    return "|".join(re.escape(w) for w in words)


@dataclass(frozen=True)
class DomainPatterns:
    """The patterns that name items or what people do with them ("the second movie", "seen #2", "I watched
    ..."), in the words of one Domain; see ``patterns_for``."""
    focus_ref: re.Pattern        # "that movie", "seen it": the item last talked about
    noun_ref: re.Pattern         # "the second movie"
    bare_number: re.Pattern      # "seen 3"
    reject: re.Pattern           # "seen #2", "not #3"
    more: re.Pattern             # "show me more movies"
    more_like: re.Pattern        # "more like Raiders of the Lost Ark": steer towards titles, new items only
    like_preamble: re.Pattern    # "movies like Toy Story": cut after the preamble so the title stands alone
    history_cue: re.Pattern      # "loved", "watched", "my watchlist": the titles named are a history
    intention_words: re.Pattern  # an unknown piece holding one of these (or a filter word) is part of a wish
    mood_shape: re.Pattern       # "something quirky": its one word should be a mood we know
    filler: frozenset[str]       # words that carry no request of their own


@functools.cache      # a handful of domains; every Vocabulary of one domain shares its compiled patterns
def patterns_for(domain: Domain) -> DomainPatterns:
    """The compiled item patterns of ``domain``; generic words ("recommend", "something", "like") are the same
    for every domain."""
    nouns = _words(domain.nouns())
    noun = rf"(?:one|{_words([domain.kind, domain.synonym])}|title|item|pick|suggestion|recommendation|option)s?"
    seen = re.escape(domain.seen)
    past = _words(domain.past_verbs)
    return DomainPatterns(
        focus_ref=re.compile(rf"\b(?:that|this|the\s+same)\s+{noun}\b|^\W*(?:that|this)\W*$|"
                             rf"\b(?:about|like|liked|love|loved|not|{seen}|skip|drop)\s+(?:it|that|this)\W*$",
                             re.I),
        noun_ref=re.compile(rf"\b(?:the\s+)?{_ORDINAL}\s+{noun}\b", re.I),
        bare_number=re.compile(rf"^\W*(?:not|no|skip|drop|hide|remove|{seen}|more\s+like|like|what\s+is|what's|"
                               r"tell\s+me\s+about|about|info|details)?\s*(?P<n>\d{1,2})\s*[?.!]*\s*$", re.I),
        reject=re.compile(rf"\b(?:{_REJECT_WORDS}|{past})\b", re.I),
        more=re.compile(r"^\W*(?:(?:show|give)\s+(?:me\s+)?)?(?:some\s+)?(?:more|others?|other\s+ones|"
                        r"something\s+else|anything\s+else|different\s+ones|next(?:\s+ones)?|more\s+please|"
                        rf"more\s+(?:recommendations|suggestions|{_words([domain.kinds, domain.synonyms])}|picks))"
                        r"(?:\s+please)?\W*$", re.I),
        more_like=re.compile(r"^\W*(?:(?:show|give)\s+(?:me\s+)?)?(?:some\s+)?(?:more|others?|other\s+ones)"
                             rf"(?:\s+(?:{nouns}|ones?|titles?|stuff|things))?\s+(?:like|similar\s+to)\b", re.I),
        like_preamble=re.compile(rf"\b((?:something|anything|stuff|more|{nouns}|ones?|titles?)\s+"
                                 r"(?:like|similar\s+to|such\s+as|in\s+the\s+vein\s+of))\s+", re.I),
        # "rewatched", "rebought": the past forms with "re" count too
        history_cue=re.compile(rf"\b(?:loved?|liked|like|enjoy(?:ed)?|adored?|(?:re)?(?:{past})|"
                               r"favou?rites?|fan\s+of|similar\s+to|such\s+as|into|grew\s+up\s+with|history|"
                               rf"{re.escape(domain.list_name)})\b", re.I),
        intention_words=re.compile(
            rf"\b(?:{nouns}|something|anything|want|wanna|need|looking|look|recommend|suggest|mood|tonight|"
            rf"night|evening|weekend|{re.escape(domain.watch)}|classic|old|new|recent|good|great|fun|light|dark|"
            r"feel-good|date|friends|scarier|funnier|darker|lighter|similar|different|about|set\s+in|starring|"
            r"with\s+a|for\s+a)\b", re.I),
        mood_shape=re.compile(r"^\W*(?:(?:i(?:'?d|\s+would)?\s+(?:want|like|prefer)|give\s+me|show\s+me|maybe)\s+)?"
                              r"(?:something|anything|a\s+bit|a\s+little|more|less|not\s+(?:too|so)|"
                              r"nothing(?:\s+too)?)\s+(?:more\s+|less\s+)?(?P<w>[a-z][a-z'-]*)"
                              rf"(?:\s+(?:one|ones|{nouns}|please|instead|now|then|tonight))*\W*$", re.I),
        filler=_FILLER | {w.casefold() for w in domain.nouns()},
    )


_LEADING_CONNECTOR = re.compile(r"^(?:(?:and|but|now|so|then|also|though|although|however|except|well|ok|"
                                r"okay|plus)\b[\s,]*)+", re.I)


@dataclass(frozen=True)
class Filters:
    """Catalogue constraints of the current request; empty = anything goes."""
    genres: tuple[str, ...] = ()            # item must have one of these (all of them with genres_mode "all")
    excluded_genres: tuple[str, ...] = ()   # item must have none of these
    year_min: int | None = None
    year_max: int | None = None
    genres_mode: str = "any"                # "all" for a compound genre: a romantic comedy is Romance AND Comedy

    def __bool__(self) -> bool:
        return bool(self.genres or self.excluded_genres or self.year_min or self.year_max)

    def catalog_filters(self) -> dict | None:
        """The keyword arguments for Catalog.filter_indices / Recommender.recommend(filters=...)."""
        out: dict = {}
        if self.genres:
            out["genres"] = list(self.genres)
            if self.genres_mode == "all" and len(self.genres) > 1:
                out["genres_mode"] = "all"
        if self.year_min is not None:
            out["year_min"] = self.year_min
        if self.year_max is not None:
            out["year_max"] = self.year_max
        return out or None

    def describe(self) -> str:
        parts = []
        if self.genres:
            parts.append((" and " if self.genres_mode == "all" else " or ").join(self.genres))
        if self.excluded_genres:
            parts.append("no " + ", no ".join(self.excluded_genres))
        if self.year_min is not None and self.year_max is not None:
            parts.append(str(self.year_min) if self.year_min == self.year_max else f"{self.year_min}–{self.year_max}")
        elif self.year_min is not None:
            parts.append(f"{self.year_min} or later")
        elif self.year_max is not None:
            parts.append(f"{self.year_max} or earlier")
        return ", ".join(parts)


@dataclass(frozen=True)
class Wish:
    """One filter phrase of a message ("funny" -> Comedy, "90s" -> 1990-1999, "lighter" -> Comedy or ...
    and no Horror, ...), kept to explain picks."""
    text: str
    genres: tuple[str, ...] = ()
    year_min: int | None = None
    year_max: int | None = None
    negated: bool = False
    all_genres: bool = False                # a compound ("romantic comedy"): every genre, not any
    excluded: tuple[str, ...] = ()          # a mood's genres to avoid ("lighter": no Horror, ...)

    @property
    def is_genre(self) -> bool:
        """A genre or mood phrase (as opposed to a year phrase)."""
        return bool(self.genres or self.excluded)

    def fits(self, item: dict) -> bool:
        if self.is_genre:
            have = set(item.get("genres") or [])
            wanted = set(self.genres)
            ok = (not wanted or (wanted <= have if self.all_genres else bool(wanted & have))) \
                and not set(self.excluded) & have
            return ok != self.negated
        year = item.get("year")
        return year is not None and (self.year_min is None or year >= self.year_min) and \
            (self.year_max is None or year <= self.year_max)

    def meaning(self) -> str:
        if self.is_genre:
            parts = [(" and " if self.all_genres else " or ").join(self.genres)] if self.genres else []
            parts += ["no " + ", no ".join(self.excluded)] if self.excluded else []
            return ("not " if self.negated else "") + ", ".join(parts)
        return Filters(year_min=self.year_min, year_max=self.year_max).describe()


@dataclass
class FilterChange:
    """Filter phrases found in a message, before they are applied to a session's filters."""
    genres: list[str] = field(default_factory=list)
    excluded_genres: list[str] = field(default_factory=list)
    year_min: int | None = None
    year_max: int | None = None
    genres_mode: str = "any"           # "all": one compound genre phrase ("romantic comedy")
    shift: str = ""                    # "older" | "newer": relative to what was shown
    clear_genres: bool = False
    clear_years: bool = False
    wishes: list[Wish] = field(default_factory=list)       # each phrase as written and what it means

    def __bool__(self) -> bool:
        return bool(self.genres or self.excluded_genres or self.year_min is not None or self.year_max is not None
                    or self.shift or self.clear_genres or self.clear_years)

    def apply(self, base: Filters, reference_years: Iterable[int] = ()) -> tuple[Filters, str]:
        """New filters from ``base`` plus this change; the note says what could not be applied."""
        genres, excluded = list(base.genres), list(base.excluded_genres)
        year_min, year_max = base.year_min, base.year_max
        mode = base.genres_mode
        note = ""
        if self.clear_genres:
            genres, excluded, mode = [], [], "any"
        if self.clear_years:
            year_min = year_max = None
        if self.genres:
            genres = list(dict.fromkeys(self.genres))
            mode = self.genres_mode
            excluded = [g for g in excluded if g not in genres]
        if self.excluded_genres:
            excluded = list(dict.fromkeys(excluded + self.excluded_genres))
            genres = [g for g in genres if g not in excluded]
        if self.year_min is not None or self.year_max is not None:
            year_min, year_max = self.year_min, self.year_max
        if self.shift:
            years = sorted(y for y in reference_years if y)
            if not years:
                note = f"'{self.shift}' needs something to compare with; ask for some movies first."
            else:
                median = years[len(years) // 2]
                if self.shift == "older":
                    year_max = min(median - 1, year_max if year_max is not None else median - 1)
                    year_min = year_min if year_min is not None and year_min <= year_max else None
                else:
                    year_min = max(median + 1, year_min if year_min is not None else median + 1)
                    year_max = year_max if year_max is not None and year_max >= year_min else None
        mode = mode if len(genres) > 1 else "any"
        return Filters(tuple(genres), tuple(excluded), year_min, year_max, mode), note


@dataclass
class Command:
    """A message that acts on the conversation rather than asking for new items."""
    kind: str                           # reset | reject | like | info | more | refine | help | thanks
    refs: list[int] = field(default_factory=list)   # 1-based card positions; -1 = the last card
    focus: bool = False                 # refers to "that one" (the item last talked about)
    change: FilterChange | None = None  # refine
    rest: str = ""                      # reset: the message after "start over"


class Mention(NamedTuple):
    """A genre phrase of a message: one word ("funny") or a compound ("romantic comedy", "sci-fi thriller")."""
    text: str
    genres: tuple[str, ...]
    negated: bool
    all_genres: bool          # the item must have every genre (a compound, or one word for two: "rom-com")


class Mood(NamedTuple):
    """A mood phrase of a message ("something lighter", "not too gory"), negation included in ``text``."""
    text: str
    wanted: tuple[str, ...]   # any of these, when the message names no genre itself
    avoided: tuple[str, ...]


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))   # longest first


class Vocabulary:
    """The words of one catalogue: its genre and mood words (only genres the catalogue has are recognised) and
    the item words of its domain (``patterns``: "movie", "watched" or "product", "bought")."""

    def __init__(self, genres: Iterable[str], domain: Domain = MOVIE, years: tuple[int, int] | None = None):
        self.domain = domain
        self.years = years    # the catalogue's first and last year: which century "the 20s" means
        self.patterns = patterns_for(domain)
        known = {g.casefold(): g for g in genres}
        table: dict[str, set[str]] = {}
        for genre, words in GENRE_WORDS.items():
            if genre.casefold() in known:
                for w in words:
                    table.setdefault(w.casefold(), set()).add(known[genre.casefold()])
        for folded, genre in known.items():      # the catalogue's own names (Amazon categories, ...)
            if folded and folded != "unknown":
                for w in (folded, folded + "s"):
                    table.setdefault(w, set()).add(genre)
        self.words = {w: tuple(sorted(gs)) for w, gs in table.items()}
        self.moods: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for words, (wanted, avoided) in MOOD_WORDS.items():
            wanted = tuple(known[g.casefold()] for g in wanted if g.casefold() in known)
            avoided = tuple(known[g.casefold()] for g in avoided if g.casefold() in known)
            if wanted or avoided:                # a mood this catalogue cannot express stays unknown
                self.moods.update({w: (wanted, avoided) for w in words})
        self._pattern = self._negated = self._compound = self._inner = self._mood = None
        if self.words:
            alt = _alternation(self.words)
            self._pattern = re.compile(rf"(?<![\w-])({alt})(?![\w-])", re.I)
            self._negated = re.compile(rf"\b{_NEGATION}\s+{_NEGATION_GAP}({alt})(?![\w-])", re.I)
            self._compound = re.compile(rf"(?<![\w-])((?:{alt})(?:{_COMPOUND_GAP}(?:{alt}))+)(?![\w-])", re.I)
            self._inner = re.compile(rf"(?<!\w)({alt})(?!\w)", re.I)
        if self.moods:
            self._mood = re.compile(rf"(?:\b(?P<neg>{_NEGATION})\s+{_NEGATION_GAP})?(?<![\w-])"
                                    rf"(?P<w>{_alternation(self.moods)})(?![\w-])", re.I)

    def decade_start(self, digit: int, default_century: int) -> int:
        """The first year of "the <digit>0s": the latest century in which that decade holds catalogue years
        ("the 20s" are the 1920s in MovieLens, 1922-1998), else `default_century`'s."""
        if self.years is not None:
            first, last = self.years
            for century in (2000, 1900):
                if century + digit * 10 <= last and century + digit * 10 + 9 >= first:
                    return century + digit * 10
        return default_century + digit * 10

    def genre_mentions(self, text: str) -> list[Mention]:
        """Every genre phrase in ``text``, in order; adjacent genre words are one compound phrase."""
        if not self._pattern:
            return []
        negated_starts = {m.start(1) for m in self._negated.finditer(text)}
        found: list[tuple[int, Mention]] = []
        compound_spans: list[tuple[int, int]] = []
        for m in self._compound.finditer(text):
            words = [w.group(1).casefold() for w in self._inner.finditer(m.group(1))]
            genres = tuple(dict.fromkeys(g for w in words for g in self.words[w]))
            phrase = re.sub(r"\s+", " ", m.group(1))
            found.append((m.start(1), Mention(phrase, genres, m.start(1) in negated_starts, len(genres) > 1)))
            compound_spans.append(m.span(1))
        for m in self._pattern.finditer(text):
            if any(a <= m.start(1) < b for a, b in compound_spans):
                continue
            genres = self.words[m.group(1).casefold()]
            found.append((m.start(1), Mention(m.group(1), genres, m.start(1) in negated_starts, len(genres) > 1)))
        return [mention for _, mention in sorted(found)]

    def mood_mentions(self, text: str) -> list[Mood]:
        """Every mood phrase in ``text``; a negated mood avoids what it would otherwise want."""
        if not self._mood:
            return []
        out = []
        for m in self._mood.finditer(text):
            wanted, avoided = self.moods[m.group("w").casefold()]
            if m.group("neg"):
                wanted, avoided = (), wanted
            out.append(Mood(m.group(0).strip(), wanted, avoided))
        return out

    def strip(self, text: str) -> str:
        """``text`` without its genre and mood phrases."""
        for pattern in (self._mood, self._compound, self._pattern):
            if pattern:
                text = pattern.sub(" ", text)
        return text


# ---------------------------------------------------------------------------------------------- filters

def extract_filters(text: str, vocab: Vocabulary) -> tuple[FilterChange, str]:
    """Filter phrases in ``text`` and the text left once they are removed."""
    change = FilterChange()
    rest = text
    for pattern, kind in _YEAR_RANGE:
        m = pattern.search(rest)
        if not m:
            continue
        a = int(m.group(1))
        if kind == "between":
            b = int(m.group(2))
            change.year_min, change.year_max = min(a, b), max(a, b)
        elif kind == "before":
            change.year_max = a - 1
        elif kind == "after":
            change.year_min = a + 1
        elif kind == "since":
            change.year_min = a
        else:
            change.year_min = change.year_max = a
        change.wishes.append(Wish(m.group(0).strip(), year_min=change.year_min, year_max=change.year_max))
        rest = rest[:m.start()] + " " + rest[m.end():]
        break
    decades = []
    for m in _DECADE.finditer(rest):
        if m.group("w"):   # "the twenties": the 1920s unless the catalogue has only the 2020s
            start = vocab.decade_start(_DECADE_WORDS[m.group("w").casefold()] % 100 // 10, 1900)
        else:              # "the 20s": the 2020s unless the catalogue says otherwise; "the 80s": the 1980s
            d = int(m.group("d"))
            default_century = 2000 if d <= 2 else 1900
            start = int(m.group("c")) * 100 + d * 10 if m.group("c") else vocab.decade_start(d, default_century)
        decades.append(start)
        text = re.sub(r"^the\s+", "", m.group(0).strip(), flags=re.I)
        change.wishes.append(Wish(text, year_min=start, year_max=start + 9))
    if decades:
        change.year_min, change.year_max = min(decades), max(decades) + 9
        rest = _DECADE.sub(" ", rest)
    if _OLDER.search(rest):
        change.shift = "older"
        rest = _OLDER.sub(" ", rest)
    elif _NEWER.search(rest):
        change.shift = "newer"
        rest = _NEWER.sub(" ", rest)
    if _ANY_GENRE.search(rest) or _CLEAR_FILTERS.search(rest):
        change.clear_genres = True
    if _ANY_YEAR.search(rest) or _CLEAR_FILTERS.search(rest):
        change.clear_years = True
    rest = _CLEAR_FILTERS.sub(" ", _ANY_YEAR.sub(" ", _ANY_GENRE.sub(" ", rest)))
    _genre_filters(change, vocab, rest)
    return change, vocab.strip(rest)


def _genre_filters(change: FilterChange, vocab: Vocabulary, text: str) -> None:
    """Genre and mood phrases of ``text`` into ``change``. One compound phrase ("romantic comedy", "a funny 90s
    drama") means every genre of it; anything else ("comedy or romance", "comedies and dramas") means any."""
    moods = vocab.mood_mentions(text)
    mentions = vocab.genre_mentions(vocab._mood.sub(" ", text) if vocab._mood else text)
    for m in mentions:
        (change.excluded_genres if m.negated else change.genres).extend(m.genres)
        change.wishes.append(Wish(m.text, genres=m.genres, negated=m.negated,
                                  all_genres=m.all_genres and not m.negated))
    groups = {frozenset(m.genres) for m in mentions if not m.negated}
    groups = {g for g in groups if not any(g < other for other in groups)}   # "funny romantic comedy": one group
    if len(groups) == 1 and any(m.all_genres for m in mentions if not m.negated):
        change.genres_mode = "all"
    named = {g for group in groups for g in group}
    for mood in moods:
        # a genre the message names wins over a mood: "a dark comedy" is a comedy, "light horror" is horror
        wanted = () if named else mood.wanted
        avoided = tuple(g for g in mood.avoided if g not in named)
        change.genres.extend(wanted)
        change.excluded_genres.extend(avoided)
        if wanted or avoided:
            change.wishes.append(Wish(mood.text, genres=wanted, excluded=avoided))
    change.genres = list(dict.fromkeys(g for g in change.genres if g not in change.excluded_genres))
    change.excluded_genres = list(dict.fromkeys(change.excluded_genres))


def _only_filler(text: str, vocab: Vocabulary) -> bool:
    words = re.findall(r"[\w']+", text.casefold())
    return all(w in vocab.patterns.filler or re.fullmatch(_NEGATION, w) for w in words)


# ---------------------------------------------------------------------------------------------- commands

def _refs(text: str, patterns: DomainPatterns) -> list[int]:
    found: list[tuple[int, int]] = []
    for pattern in _REF_PATTERNS + [patterns.noun_ref]:
        for m in pattern.finditer(text):
            word = m.group("n").casefold()
            n = _ORDINALS.get(word)
            if n is None:
                n = int(re.match(r"\d+", word).group(0))
            if n != 0:
                found.append((m.start(), n))
    if not found:
        m = patterns.bare_number.match(text)
        if m and int(m.group("n")) > 0:
            found.append((0, int(m.group("n"))))
    return list(dict.fromkeys(n for _, n in sorted(found)))


def parse_command(text: str, vocab: Vocabulary) -> Command | None:
    """The command a message gives, or None when it is a request (titles and/or an intention)."""
    stripped = text.strip()
    if not stripped or re.fullmatch(r"\W*(?:help|\?|hi|hello|hey)\W*", stripped, re.I):
        return Command("help")
    if _THANKS.fullmatch(stripped):
        return Command("thanks")
    m = _RESET.match(stripped)
    if m:
        return Command("reset", rest=stripped[m.end():].strip())
    patterns = vocab.patterns
    refs = _refs(stripped, patterns)
    focus = not refs and bool(patterns.focus_ref.search(stripped))
    if refs or focus:
        # "seen #2" drops it, but "watched #2 and loved it" is praise: a past verb rejects only without a like word
        rejects = {m.group(0).casefold() for m in patterns.reject.finditer(stripped)}
        only_seen = rejects <= {v.casefold() for v in vocab.domain.past_verbs} and bool(_LIKE.search(stripped))
        if rejects and not only_seen and not re.search(r"\b(?:more\s+like|not\s+bad)\b", stripped, re.I):
            return Command("reject", refs, focus)
        if _LIKE.search(stripped):
            return Command("like", refs, focus)
        return Command("info", refs, focus)
    if patterns.more.match(stripped):
        return Command("more")
    change, rest = extract_filters(stripped, vocab)
    if change and _only_filler(rest, vocab):
        return Command("refine", change=change)
    return None


# ---------------------------------------------------------------------------------------------- requests

def split_request(text: str, vocab: Vocabulary) -> list[str]:
    """Clauses of a request, cut where a history turns into a wish ("I loved X, but now something
    scary") and after "something like" (so "movies like Toy Story" gives the title on its own)."""
    clauses = []
    for clause in _CLAUSE_SPLIT.split(_LIST_MARKER.sub("", text)):
        clause = vocab.patterns.like_preamble.sub(lambda m: m.group(1) + "; ", clause)
        clauses.extend(c.strip() for c in clause.split(";"))
    return [c for c in clauses if c]


def is_intention_piece(piece: str, vocab: Vocabulary) -> bool:
    """Whether text left over after title resolution reads as a wish rather than an unknown title."""
    if vocab.patterns.intention_words.search(piece) or vocab.genre_mentions(piece) or vocab.mood_mentions(piece):
        return True
    change, _ = extract_filters(piece, vocab)
    return bool(change)


def asks_more_like(text: str, vocab: Vocabulary) -> bool:
    """"more like <title>", "others similar to <title>": the titles steer, and only new items are wanted."""
    return bool(vocab.patterns.more_like.match(text))


def unknown_mood_word(text: str, vocab: Vocabulary) -> str | None:
    """The word of a mood-shaped message ("something quirky") when it is no genre, mood or wish word we know."""
    m = vocab.patterns.mood_shape.match(text.strip())
    if not m:
        return None
    word = m.group("w")
    folded = word.casefold()
    known = (folded in vocab.words or folded in vocab.moods or folded in vocab.patterns.filler
             or vocab.patterns.intention_words.fullmatch(word) or extract_filters(word, vocab)[0])
    return None if known else word


def has_content(piece: str, vocab: Vocabulary) -> bool:
    """False for pieces made only of filler ("I want something like")."""
    return not _only_filler(vocab.patterns.history_cue.sub(" ", piece), vocab)


def sanitize_query(text: str, max_chars: int = MAX_QUERY_CHARS) -> str:
    """Make user text safe to quote inside the model's prompt: one line, no quote marks, brackets or
    pipes (so it cannot close the prompt's quoting, imitate index tokens like ``<a_1>`` or chat markers like
    ``<|im_start|>``), no control characters, at most ``max_chars`` characters (cut at a word)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = re.sub(r"[\"“”„‟«»`´\\<>{}\[\]|]", " ", text)
    text = _LEADING_CONNECTOR.sub("", re.sub(r"\s+", " ", text).strip(" ,;:-"))
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text.strip(" ,;:-")


def resolve_refs(refs: list[int], shown: list[int]) -> tuple[list[int], list[int]]:
    """Card positions -> item indices of the list on screen; also returns the positions out of range."""
    items, bad = [], []
    for n in refs:
        pos = len(shown) if n == -1 else n
        if 1 <= pos <= len(shown):
            items.append(shown[pos - 1])
        else:
            bad.append(n)
    return list(dict.fromkeys(items)), bad


__all__ = ["Command", "FilterChange", "Filters", "Wish", "Mention", "Mood", "Vocabulary", "extract_filters",
           "parse_command", "split_request", "is_intention_piece", "has_content", "sanitize_query", "resolve_refs",
           "asks_more_like", "unknown_mood_word", "DomainPatterns", "patterns_for", "GENRE_WORDS", "MOOD_WORDS",
           "KNOWN_MOODS", "MAX_QUERY_CHARS"]
