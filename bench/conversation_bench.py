"""Conversation benchmark: scripted multi-turn conversations against the real chat app, checked on every reply.

Starts the app (``lcrec_chat.ui.serve``, as ``app.py`` does) on a run folder in a child process bound to
127.0.0.1 on a free port, and plays each conversation through ``gradio_client`` on the ``/chat`` endpoint the
page's text box uses, one fresh client (= one browser session) per conversation. Every reply is checked:

* on every reply: no title the person named so far is recommended; every card agrees with the catalogue (title,
  year, genres of its item) and appears once; reasons are human-readable (no raw probabilities such as "0.01%" or
  "6.5e-05"); no internal error;
* per turn, the properties the conversation is about: titles resolved and acknowledged ("Recognised: ..."),
  cards fitting the stated genres / years (compound genres need all of their genres), refinements bringing new
  titles and not repeating the ones shown where the app promises it, mood words mapped to genre filters (or
  the reply saying the word is not understood), gibberish answered with "did not understand" and no cards, and
  the next turn not polluted by it, item commands pointing at the right card.

Catalogue facts (genres, years, titles) come from the run's SQLite catalogue (``lcrec_chat.catalog.Catalog``),
card data from the structured reply the endpoint returns (``items``, ``recognised``, ``unknown``, ``request``).
Prints one row per conversation, the pass rates (conversations passing every check, and checks), reply
latency p50/p95 and the machine; writes bench/results/conversation.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/conversation_bench.py [--run-dir models/ml-100k] [--dtype auto]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
from app_server import start_server, timed_reply  # noqa: E402  (bench/app_server.py)
sys.path.insert(0, str(ROOT))

from lcrec_chat.catalog import Catalog  # noqa: E402
from lcrec_chat.titles import display_title  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "conversation.json"

LIGHT = ("Comedy", "Animation", "Children's", "Musical")
NOT_LIGHT = ("Horror", "War", "Crime", "Thriller", "Film-Noir")
DARK = ("Crime", "Thriller", "Film-Noir", "Horror")
NOT_DARK = ("Children's", "Animation", "Musical")
# a reason a person cannot read: a model probability or score, scientific notation, a fractional percentage
UNREADABLE = re.compile(r"probab|log-?prob|logit|\bscore\b|\d\.?\d*e-\d|\b0\.\d+\s*%|\d\.\d{3,}", re.I)


# ------------------------------------------------------------------------------------------ catalogue facts

class Facts:
    """What the catalogue says about items, independent of the app's title resolution."""

    def __init__(self, path: Path):
        self.catalog = Catalog(path)
        self._by_label: dict[tuple[str, int | None], int] = {}
        for i in range(len(self.catalog)):
            item = self.catalog.item(i)
            self._by_label.setdefault((display_title(item["title"]).casefold(), item["year"]), i)

    def idx(self, label: str) -> int:
        """'The Empire Strikes Back (1980)' -> its item index (exact catalogue title and year)."""
        m = re.fullmatch(r"(?P<t>.+) \((?P<y>\d{4})\)", label)
        key = (m["t"].casefold(), int(m["y"])) if m else (label.casefold(), None)
        if key not in self._by_label:
            raise KeyError(f"no catalogue item {label!r}")
        return self._by_label[key]

    def item(self, idx: int) -> dict:
        return self.catalog.item(idx)

    def label(self, idx: int) -> str:
        item = self.item(idx)
        return f"{display_title(item['title'])} ({item['year']})" if item["year"] else display_title(item["title"])

    def describe(self, idx: int) -> str:
        item = self.item(idx)
        return f"{self.label(idx)} [{'|'.join(item['genres'])}]"


# ------------------------------------------------------------------------------------------ conversation state

@dataclass
class Ctx:
    """What the checks of one conversation know: catalogue facts and the replies so far."""
    facts: Facts
    k: int
    named: set[int] = field(default_factory=set)           # every title the person named (never shown back)
    lists: list[list[int]] = field(default_factory=list)   # every earlier list of cards, oldest first
    previous: list[dict] = field(default_factory=list)     # cards of the list on screen before this reply

    def prev_card(self, n: int) -> dict:
        if not 1 <= n <= len(self.previous):
            raise LookupError(f"no card #{n} on screen before this turn ({len(self.previous)} cards)")
        return self.previous[n - 1]


Result = str | None          # None: the check passed; else why it failed
CheckFn = Callable[[Ctx, dict], Result]


@dataclass
class Check:
    name: str
    fn: CheckFn


@dataclass
class Turn:
    message: str
    checks: list[Check]
    names: tuple[str, ...] = ()      # titles this message names ("Title (year)"): resolved + never shown back
    reset: bool = False              # the message starts over: what was named or shown before is forgotten


@dataclass
class Conversation:
    cid: str
    description: str
    turns: list[Turn]


def items(data: dict) -> list[dict]:
    return list(data.get("items") or [])


def ids(data: dict) -> list[int]:
    return [int(i["idx"]) for i in items(data)]


def text(data: dict) -> str:
    return data.get("text") or ""


# ------------------------------------------------------------------------------------------ checks

def resolved(*labels: str) -> Check:
    """The reply recognised each title (structured ``recognised``) and says so ("Recognised: Fargo (1996)")."""
    def fn(ctx: Ctx, data: dict) -> Result:
        got = [r["idx"] for r in data.get("recognised") or []]
        missing = [lb for lb in labels if ctx.facts.idx(lb) not in got]
        if missing:
            return f"not recognised: {missing}; recognised {[ctx.facts.label(i) for i in got]}"
        if "Recognised:" not in text(data):
            return "no 'Recognised:' line"
        unsaid = [lb for lb in labels if ctx.facts.label(ctx.facts.idx(lb)) not in text(data)]
        return f"not acknowledged in the text: {unsaid}" if unsaid else None
    return Check(f"resolved {', '.join(labels)}", fn)


def nothing_unknown() -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        if data.get("unknown") or "Not found" in text(data):
            return f"reported as not found: {data.get('unknown')}"
        return None
    return Check("nothing reported unknown", fn)


def unknown(piece: str) -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        if piece not in (data.get("unknown") or []) or piece not in text(data):
            return f"{piece!r} not reported as not found (unknown={data.get('unknown')})"
        return None
    return Check(f"{piece!r} reported not found", fn)


def cards(n: int | None = None, at_least: int | None = None) -> Check:
    """A list of cards: exactly n (default: the app's default_k), or at least ``at_least`` (small pools)."""
    def fn(ctx: Ctx, data: dict) -> Result:
        got = len(items(data))
        if at_least is not None:
            return None if got >= at_least else f"{got} cards, expected at least {at_least}"
        want = n if n is not None else ctx.k
        return None if got == want else f"{got} cards, expected {want} ({text(data)[:160]!r})"
    return Check(f"cards ({n or ('>=%d' % at_least if at_least else 'k')})", fn)


def fits(all_of: tuple[str, ...] = (), any_of: tuple[str, ...] = (), none_of: tuple[str, ...] = (),
         year_min: int | None = None, year_max: int | None = None) -> Check:
    """Every card's catalogue item has all of ``all_of``, one of ``any_of``, none of ``none_of``, and a year in
    range. Vacuous on an empty list (``cards`` checks there is one)."""
    parts = ([" and ".join(all_of)] if all_of else []) + ([" or ".join(any_of)] if any_of else []) + \
        (["no " + "/".join(none_of)] if none_of else []) + \
        ([f"{year_min or ''}-{year_max or ''}"] if year_min is not None or year_max is not None else [])

    def fn(ctx: Ctx, data: dict) -> Result:
        bad = []
        for idx in ids(data):
            item = ctx.facts.item(idx)
            genres, year = set(item["genres"]), item["year"]
            ok = set(all_of) <= genres and (not any_of or bool(set(any_of) & genres)) \
                and not set(none_of) & genres
            if year_min is not None or year_max is not None:
                ok = ok and year is not None and (year_min is None or year >= year_min) \
                    and (year_max is None or year <= year_max)
            if not ok:
                bad.append(ctx.facts.describe(idx))
        return f"{len(bad)} card(s) do not fit: {'; '.join(bad[:3])}" if bad else None
    return Check(f"cards fit {', '.join(parts)}", fn)


def changed() -> Check:
    """At least one title that was not on the list before."""
    def fn(ctx: Ctx, data: dict) -> Result:
        before = {c["idx"] for c in ctx.previous}
        return None if set(ids(data)) - before else "no new title: same cards as the list before"
    return Check("list changed (a new title)", fn)


def fresh() -> Check:
    """No card of any earlier list comes back (refinements, "more", "more like", follow-up wishes)."""
    def fn(ctx: Ctx, data: dict) -> Result:
        seen = {i for lst in ctx.lists for i in lst}
        again = [ctx.facts.label(i) for i in ids(data) if i in seen]
        if not ids(data):
            return "no cards"
        return f"shown before: {again}" if again else None
    return Check("only titles not shown before", fn)


def fresh_but_screen() -> Check:
    """After a rejection: nothing from lists before the one on screen comes back (that one stays eligible)."""
    def fn(ctx: Ctx, data: dict) -> Result:
        seen = {i for lst in ctx.lists[:-1] for i in lst}
        again = [ctx.facts.label(i) for i in ids(data) if i in seen]
        return f"shown in an earlier list: {again}" if again else None
    return Check("nothing from earlier lists", fn)


def absent(n: int) -> Check:
    """Card #n of the list on screen (the one rejected) is gone."""
    def fn(ctx: Ctx, data: dict) -> Result:
        card = ctx.prev_card(n)
        return f"rejected {card['title']} came back" if card["idx"] in ids(data) else None
    return Check(f"rejected card #{n} gone", fn)


def _years(ctx: Ctx, idxs: list[int]) -> list[int]:
    return sorted(y for y in (ctx.facts.item(i)["year"] for i in idxs) if y)


def older() -> Check:
    """"something older": every card older than the median year of the list on screen (the app's rule)."""
    def fn(ctx: Ctx, data: dict) -> Result:
        years = _years(ctx, [c["idx"] for c in ctx.previous])
        median = years[len(years) // 2]
        bad = [ctx.facts.label(i) for i in ids(data) if not (ctx.facts.item(i)["year"] or 9999) < median]
        return f"not older than {median}: {bad}" if bad else None
    return Check("older than the list before", fn)


def newer() -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        years = _years(ctx, [c["idx"] for c in ctx.previous])
        median = years[len(years) // 2]
        bad = [ctx.facts.label(i) for i in ids(data) if not (ctx.facts.item(i)["year"] or 0) > median]
        return f"not newer than {median}: {bad}" if bad else None
    return Check("newer than the list before", fn)


def older_than_named(*labels: str) -> Check:
    """"like X but older": every card older than the titles named."""
    def fn(ctx: Ctx, data: dict) -> Result:
        years = _years(ctx, [ctx.facts.idx(lb) for lb in labels])
        median = years[len(years) // 2]
        bad = [ctx.facts.label(i) for i in ids(data) if not (ctx.facts.item(i)["year"] or 9999) < median]
        return f"not older than {median}: {bad}" if bad else None
    return Check(f"older than {', '.join(labels)}", fn)


def history_last_is_card(n: int) -> Check:
    """"more like the second one": card #n of the list on screen is now the most recent title of the history."""
    def fn(ctx: Ctx, data: dict) -> Result:
        card = ctx.prev_card(n)
        history = (data.get("request") or {}).get("history") or []
        return None if history[-1:] == [card["idx"]] else f"history ends with {history[-1:]}, not {card['title']}"
    return Check(f"card #{n} steers the history", fn)


def history_last_is(label: str) -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        history = (data.get("request") or {}).get("history") or []
        return None if history[-1:] == [ctx.facts.idx(label)] else f"history ends with {history[-1:]}"
    return Check(f"{label} steers the history", fn)


def history_is(*labels: str) -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        history = (data.get("request") or {}).get("history")
        want = [ctx.facts.idx(lb) for lb in labels]
        return None if history == want else f"history {history}, expected {want}"
    return Check(f"history = {', '.join(labels) or 'empty'}", fn)


def query_is(query: str) -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        got = (data.get("request") or {}).get("query")
        return None if got == query else f"query {got!r}, expected {query!r}"
    return Check(f"wish = {query!r}", fn)


def not_polluted(*words: str) -> Check:
    """The turn after gibberish: nothing of it reached the request, no "Still using" an earlier wish."""
    def fn(ctx: Ctx, data: dict) -> Result:
        request = data.get("request") or {}
        blob = json.dumps(request).casefold()
        leaked = [w for w in words if w.casefold() in blob]
        if leaked:
            return f"gibberish reached the request: {leaked}"
        if "Still using" in text(data):
            return "says 'Still using' an earlier wish after gibberish"
        return None
    return Check("not polluted by the gibberish", fn)


def no_filters() -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        request = data.get("request") or {}
        if request.get("filters") or request.get("excluded_genres"):
            return f"filters {request.get('filters')}, excluded {request.get('excluded_genres')}"
        return None
    return Check("no filters", fn)


def not_understood(*, unchanged: bool = False) -> Check:
    """Gibberish: says it did not understand, asks for titles or a wish, no cards, nothing sent to the model."""
    def fn(ctx: Ctx, data: dict) -> Result:
        t = text(data)
        if "did not understand" not in t:
            return f"does not say it did not understand ({t[:120]!r})"
        if "Tell me" not in t:
            return "does not ask for titles or a wish"
        if items(data) or data.get("request"):
            return f"{len(items(data))} cards / a model request for gibberish"
        if unchanged and "unchanged" not in t:
            return "does not say the earlier titles and wishes are kept"
        return None
    return Check("gibberish: 'did not understand', asks, no cards", fn)


def mood(word: str, any_of: tuple[str, ...] = (), none_of: tuple[str, ...] = ()) -> Check:
    """A mood word is a genre filter (every card fits) or the reply says the word is not understood."""
    inner = fits(any_of=any_of, none_of=none_of)

    def fn(ctx: Ctx, data: dict) -> Result:
        if f'no filter for "{word}"' in text(data):
            return None
        return inner.fn(ctx, data)
    return Check(f"mood {word!r} -> {inner.name[len('cards fit '):]}", fn)


def says(snippet: str) -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        return None if snippet in text(data) else f"missing {snippet!r} in {text(data)[:160]!r}"
    return Check(f"says {snippet!r}", fn)


def no_cards() -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        return f"{len(items(data))} cards" if items(data) else None
    return Check("no cards", fn)


def info_about(n: int) -> Check:
    """"what is #1?": an answer about card #n of the list on screen, without a new list."""
    def fn(ctx: Ctx, data: dict) -> Result:
        card = ctx.prev_card(n)
        if data.get("kind") != "info" or items(data):
            return f"kind {data.get('kind')} with {len(items(data))} cards"
        return None if card["title"] in text(data) else f"{card['title']!r} not in the answer"
    return Check(f"describes card #{n}", fn)


# checks applied to every reply
def never_back() -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        back = [ctx.facts.label(i) for i in ids(data) if i in ctx.named]
        return f"named title recommended back: {back}" if back else None
    return Check("named titles never recommended", fn)


def readable_reasons() -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        bad = [i["reason"] for i in items(data) if not i.get("reason") or UNREADABLE.search(i["reason"])]
        return f"unreadable reason: {bad[0]!r}" if bad else None
    return Check("reasons human-readable", fn)


def cards_match_catalogue() -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        got = ids(data)
        if len(set(got)) != len(got):
            return "a title appears twice in one list"
        for rank, card in enumerate(items(data), 1):
            item = ctx.facts.item(card["idx"])
            if (card["rank"], card["title"], card["year"], list(card["genres"])) != \
                    (rank, display_title(item["title"]), item["year"], item["genres"]):
                return (f"card {card['rank']} {card['title']} disagrees with catalogue item "
                        f"{ctx.facts.describe(card['idx'])}")
        return None
    return Check("cards agree with the catalogue", fn)


def no_crash() -> Check:
    def fn(ctx: Ctx, data: dict) -> Result:
        return "internal error" if "something went wrong" in text(data) else None
    return Check("no internal error", fn)


GLOBAL = [no_crash(), never_back(), cards_match_catalogue(), readable_reasons()]


# ------------------------------------------------------------------------------------------ the conversations

def T(message: str, *checks: Check, names: tuple[str, ...] = (), reset: bool = False) -> Turn:
    return Turn(message, list(checks), names, reset)


TS, ALADDIN, GOLDENEYE, FARGO = "Toy Story (1995)", "Aladdin (1992)", "GoldenEye (1995)", "Fargo (1996)"
STAR_WARS, PULP = "Star Wars (1977)", "Pulp Fiction (1994)"

CONVERSATIONS = [
    # --- titles named: resolved, acknowledged, never recommended back -------------------------------
    Conversation("hist-3", "pasted history, then more, then only comedies", [
        T("I loved Toy Story, Aladdin and GoldenEye", resolved(TS, ALADDIN, GOLDENEYE), nothing_unknown(), cards(),
          names=(TS, ALADDIN, GOLDENEYE)),
        T("more", cards(), fresh()),
        T("only comedies", cards(), fits(all_of=("Comedy",)), fresh())]),
    Conversation("label-history", "'My history:' label before a ;-list", [
        T("My history: Toy Story; Fargo", resolved(TS, FARGO), nothing_unknown(), cards(), names=(TS, FARGO)),
        T("more", cards(), fresh()),
        T("any genre", cards(), fresh())]),
    Conversation("label-watch", "'Watch history:' with three titles, then only sci-fi", [
        T("Watch history: Star Wars; The Empire Strikes Back; Return of the Jedi",
          resolved(STAR_WARS, "The Empire Strikes Back (1980)", "Return of the Jedi (1983)"), nothing_unknown(),
          cards(), names=(STAR_WARS, "The Empire Strikes Back (1980)", "Return of the Jedi (1983)")),
        T("only sci-fi", cards(), fits(all_of=("Sci-Fi",)), fresh())]),
    Conversation("label-liked", "'I liked:' label, then a mood refinement", [
        T("I liked: Pulp Fiction; Reservoir Dogs", resolved(PULP, "Reservoir Dogs (1992)"), nothing_unknown(),
          cards(), names=(PULP, "Reservoir Dogs (1992)")),
        T("something lighter", cards(), mood("lighter", LIGHT, NOT_LIGHT), fresh(),
          history_is(PULP, "Reservoir Dogs (1992)"))]),
    Conversation("fused-80s", "history + wish with genre and decade, then more", [
        T("I watched Fargo and Pulp Fiction, now I want something scary from the 80s", resolved(FARGO, PULP),
          cards(), fits(all_of=("Horror",), year_min=1980, year_max=1989), names=(FARGO, PULP)),
        T("more", cards(), fits(all_of=("Horror",), year_min=1980, year_max=1989), fresh())]),
    Conversation("typos", "titles with typos, then reject #1", [
        T("I loved Goldeneye and Aladin", resolved(GOLDENEYE, ALADDIN), cards(), names=(GOLDENEYE, ALADDIN)),
        T("not #1", cards(), absent(1), changed(), fresh_but_screen())]),
    Conversation("unknown-title", "an unknown title among known ones, then more like the second card", [
        T("I loved Toy Story, Aladdin, Blorpfest 3000 and GoldenEye", resolved(TS, ALADDIN, GOLDENEYE),
          unknown("Blorpfest 3000"), cards(), names=(TS, ALADDIN, GOLDENEYE)),
        T("more like the second one", cards(), history_last_is_card(2), fresh())]),
    Conversation("like-older", "'something like Star Wars but older'", [
        T("something like Star Wars but older", resolved(STAR_WARS), cards(), older_than_named(STAR_WARS),
          names=(STAR_WARS,)),
        T("more", cards(), older_than_named(STAR_WARS), fresh())]),
    Conversation("lion-beauty", "titles containing 'and' and a year hint, then only animated", [
        T("I loved The Lion King (1994) and Beauty and the Beast", resolved("The Lion King (1994)",
          "Beauty and the Beast (1991)"), nothing_unknown(), cards(),
          names=("The Lion King (1994)", "Beauty and the Beast (1991)")),
        T("only animated movies", cards(), fits(all_of=("Animation",)), fresh())]),
    Conversation("godfather", "'Godfather' without its article, then 70s crime (4 items, it is one)", [
        T("My favourites are Godfather and Goodfellas", resolved("The Godfather (1972)", "GoodFellas (1990)"),
          cards(), names=("The Godfather (1972)", "GoodFellas (1990)")),
        T("a crime movie from the 70s", cards(at_least=1), fits(all_of=("Crime",), year_min=1970, year_max=1979),
          fresh())]),
    Conversation("favourites-newer", "'Favourites:' label with classics, then something newer", [
        T("Favourites: Casablanca; Vertigo; Rear Window",
          resolved("Casablanca (1942)", "Vertigo (1958)", "Rear Window (1954)"), nothing_unknown(), cards(),
          names=("Casablanca (1942)", "Vertigo (1958)", "Rear Window (1954)")),
        T("something newer", cards(), newer(), fresh())]),
    Conversation("named-sci-fi", "named titles that fit later filters stay excluded", [
        T("I watched Star Wars, Fargo and Toy Story", resolved(STAR_WARS, FARGO, TS), cards(),
          names=(STAR_WARS, FARGO, TS)),
        T("only sci-fi", cards(), fits(all_of=("Sci-Fi",)), fresh()),
        T("a space adventure", cards(), fits(all_of=("Adventure",)), fresh())]),

    # --- wishes with genre / decade filters, compound genres ------------------------------------------
    Conversation("funny-90s", "funny 90s family movie, then something older", [
        T("a funny 90s movie for a family night", cards(),
          fits(any_of=("Comedy", "Children's"), year_min=1990, year_max=1999)),
        T("something older", cards(), fits(any_of=("Comedy", "Children's")), older(), fresh())]),
    Conversation("romcom-90s", "compound 'romantic comedy' + decade, then more", [
        T("recommend me a romantic comedy from the 90s", cards(),
          fits(all_of=("Romance", "Comedy"), year_min=1990, year_max=1999)),
        T("more", cards(), fits(all_of=("Romance", "Comedy"), year_min=1990, year_max=1999), fresh())]),
    Conversation("scifi-thriller", "compound 'sci-fi thriller', then reject #2", [
        T("a sci-fi thriller", cards(), fits(all_of=("Sci-Fi", "Thriller"))),
        T("not #2", cards(), fits(all_of=("Sci-Fi", "Thriller")), absent(2), changed(), fresh_but_screen())]),
    Conversation("animated-musical", "compound 'animated musical', then more", [
        T("an animated musical", cards(), fits(all_of=("Animation", "Musical"))),
        T("more", cards(), fits(all_of=("Animation", "Musical")), fresh())]),
    Conversation("rom-com-date", "'rom-com' for a date night, then something older", [
        T("a rom-com for a date night", cards(), fits(all_of=("Romance", "Comedy"))),
        T("something older", cards(), fits(all_of=("Romance", "Comedy")), older(), fresh())]),
    Conversation("action-comedy-80s", "compound 'action comedy' in the 80s (4 items), then any year", [
        T("an action comedy from the 80s", cards(at_least=1),
          fits(all_of=("Action", "Comedy"), year_min=1980, year_max=1989)),
        T("any year", cards(), fits(all_of=("Action", "Comedy")), fresh())]),
    Conversation("comedy-or-romance", "'comedy or romance' means either, then only romance", [
        T("comedy or romance", cards(), fits(any_of=("Comedy", "Romance"))),
        T("only romance", cards(), fits(all_of=("Romance",)), fresh())]),
    Conversation("western-older", "a western, then something older", [
        T("a western", cards(), fits(all_of=("Western",))),
        T("something older", cards(), fits(all_of=("Western",)), older(), fresh())]),
    Conversation("documentary", "documentaries, then more", [
        T("a documentary", cards(), fits(all_of=("Documentary",))),
        T("more", cards(), fits(all_of=("Documentary",)), fresh())]),
    Conversation("thriller-example", "the page's example: thriller, older, not #1, 70s (3 in the catalogue)", [
        T("a suspenseful thriller", cards(), fits(all_of=("Thriller",))),
        T("something older", cards(), fits(all_of=("Thriller",)), older(), fresh()),
        T("not #1", cards(), fits(all_of=("Thriller",)), absent(1), changed(), fresh_but_screen()),
        T("from the 70s", cards(at_least=1), fits(all_of=("Thriller",), year_min=1970, year_max=1979), fresh())]),
    Conversation("scary-70s-comedy", "scary 70s, then only comedies (decade kept)", [
        T("a scary movie from the 70s", cards(), fits(all_of=("Horror",), year_min=1970, year_max=1979)),
        T("only comedies", cards(), fits(all_of=("Comedy",), year_min=1970, year_max=1979), fresh())]),
    Conversation("crime-before-1980", "90s crime, then before 1980 (genre kept)", [
        T("a crime movie from the 90s", cards(), fits(all_of=("Crime",), year_min=1990, year_max=1999)),
        T("before 1980", cards(), fits(all_of=("Crime",), year_max=1979), fresh())]),
    Conversation("noir", "film noir, then more", [
        T("a film noir", cards(), fits(all_of=("Film-Noir",))),
        T("more", cards(), fits(all_of=("Film-Noir",)), fresh())]),

    # --- moods --------------------------------------------------------------------------------------
    Conversation("mood-light-gory", "history, then 'something lighter', then 'not too gory'", [
        T("I loved Toy Story and Fargo", resolved(TS, FARGO), cards(), names=(TS, FARGO)),
        T("something lighter", cards(), mood("lighter", LIGHT, NOT_LIGHT), fresh(), history_is(TS, FARGO)),
        T("not too gory", cards(), mood("gory", none_of=("Horror",)), fresh())]),
    Conversation("mood-feel-good", "'something feel-good' as a first message, then more", [
        T("something feel-good", cards(), mood("feel-good", LIGHT, NOT_LIGHT)),
        T("more", cards(), mood("feel-good", LIGHT, NOT_LIGHT), fresh())]),
    Conversation("mood-scary-gory", "history, 'something scary', then 'not too gory'", [
        T("I liked Pulp Fiction", resolved(PULP), cards(), names=(PULP,)),
        T("something scary", cards(), mood("scary", ("Horror",)), fresh()),
        T("not too gory", cards(), mood("gory", none_of=("Horror",)), fresh())]),
    Conversation("mood-darker", "alternative title (Se7en), then something darker", [
        T("I loved Se7en and The Silence of the Lambs",
          resolved("Seven (Se7en) (1995)", "The Silence of the Lambs (1991)"), cards(),
          names=("Seven (Se7en) (1995)", "The Silence of the Lambs (1991)")),
        T("something darker", cards(), mood("darker", DARK, NOT_DARK), fresh())]),
    Conversation("mood-mind-bending", "'something mind-bending', then from the 90s", [
        T("something mind-bending", cards(), mood("mind-bending", ("Sci-Fi", "Mystery", "Thriller"))),
        T("from the 90s", cards(), fits(any_of=("Sci-Fi", "Mystery", "Thriller"), year_min=1990, year_max=1999),
          fresh())]),
    Conversation("mood-quirky", "an unknown mood word is named as not understood", [
        T("I loved Titanic", resolved("Titanic (1997)"), cards(), names=("Titanic (1997)",)),
        T("something quirky", cards(), says('no filter for "quirky"'), mood("quirky"), fresh())]),
    Conversation("mood-sad", "history, then something sad", [
        T("I watched Heat", resolved("Heat (1995)"), cards(), names=("Heat (1995)",)),
        T("something sad", cards(), mood("sad", ("Drama",), ("Comedy", "Horror")), fresh())]),

    # --- gibberish ----------------------------------------------------------------------------------
    Conversation("gibberish-first", "gibberish first, then a title", [
        T("asdkjh qweoiu zzzz", not_understood(), no_cards()),
        T("I loved Fargo", resolved(FARGO), cards(), query_is(""), not_polluted("asdkjh", "qweoiu", "zzzz"),
          names=(FARGO,))]),
    Conversation("gibberish-mid", "gibberish after a history leaves it unchanged", [
        T("I loved Toy Story", resolved(TS), cards(), names=(TS,)),
        T("qqqq wxwxwx", not_understood(unchanged=True), no_cards()),
        T("more", cards(), history_is(TS), query_is(""), no_filters(), not_polluted("qqqq", "wxwxwx"), fresh())]),
    Conversation("gibberish-then-wish", "gibberish, then a wish", [
        T("zxqv wrrpt gkjhx", not_understood(), no_cards()),
        T("a scary movie", cards(), query_is("a scary movie"), fits(all_of=("Horror",)),
          not_polluted("zxqv", "wrrpt", "gkjhx"))]),

    # --- item commands and "more like" ------------------------------------------------------------------
    Conversation("more-like-title", "'more like <title>' shows new titles only", [
        T("I loved Raiders of the Lost Ark", resolved("Raiders of the Lost Ark (1981)"), cards(),
          names=("Raiders of the Lost Ark (1981)",)),
        T("more like Raiders of the Lost Ark", cards(), history_last_is("Raiders of the Lost Ark (1981)"),
          says("new titles only"), fresh(), names=("Raiders of the Lost Ark (1981)",))]),
    Conversation("more-like-third", "'more like the third one' after a list, then 'what is #1?'", [
        T("I loved Toy Story, Aladdin and GoldenEye", resolved(TS, ALADDIN, GOLDENEYE), cards(),
          names=(TS, ALADDIN, GOLDENEYE)),
        T("more like the third one", cards(), history_last_is_card(3), says("card #3 of my list"), fresh()),
        T("what is #1?", info_about(1), no_cards())]),
    Conversation("not-that-one", "ask about #2, then 'not that one'", [
        T("a funny 90s movie", cards(), fits(all_of=("Comedy",), year_min=1990, year_max=1999)),
        T("what is #2?", info_about(2), no_cards()),
        T("not that one", cards(), absent(2), changed(), fresh_but_screen(),
          fits(all_of=("Comedy",), year_min=1990, year_max=1999))]),
    Conversation("example-star-wars", "the page's example: history, no horror, more, start over", [
        T("I liked Star Wars and Blade Runner", resolved(STAR_WARS, "Blade Runner (1982)"), cards(),
          names=(STAR_WARS, "Blade Runner (1982)")),
        T("no horror", cards(), fits(none_of=("Horror",)), fresh()),
        T("more", cards(), fits(none_of=("Horror",)), fresh()),
        T("start over", no_cards(), says("Starting over"), reset=True)]),
    Conversation("start-over-with-wish", "'start over: 80s comedies' forgets the history", [
        T("I loved Star Wars", resolved(STAR_WARS), cards(), names=(STAR_WARS,)),
        T("start over: 80s comedies", cards(), history_is(), fits(all_of=("Comedy",), year_min=1980, year_max=1989),
          reset=True),
        T("more", cards(), fits(all_of=("Comedy",), year_min=1980, year_max=1989), fresh())]),
    Conversation("full-stops-in-titles", "titles with full stops and 'Now', then a sentence that is a wish", [
        T("I loved Mrs. Doubtfire, E.T. the Extra-Terrestrial and Apocalypse Now",
          resolved("Mrs. Doubtfire (1993)", "E.T. the Extra-Terrestrial (1982)", "Apocalypse Now (1979)"),
          nothing_unknown(), cards(),
          names=("Mrs. Doubtfire (1993)", "E.T. the Extra-Terrestrial (1982)", "Apocalypse Now (1979)")),
        T("Dr. Strangelove. Now something scary",
          resolved("Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963)"), cards(),
          fits(all_of=("Horror",)),
          names=("Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963)",))]),
    Conversation("numbered-lists", "a numbered list, then a ranking written with #", [
        T("1. Toy Story\n2. Fargo\n3. Heat", resolved(TS, FARGO, "Heat (1995)"), nothing_unknown(), cards(),
          names=(TS, FARGO, "Heat (1995)")),
        T("My top 3: #1 Pulp Fiction #2 Reservoir Dogs #3 Star Wars",
          resolved(PULP, "Reservoir Dogs (1992)", STAR_WARS), nothing_unknown(), cards(),
          names=(PULP, "Reservoir Dogs (1992)", STAR_WARS))]),
    Conversation("title-like-a-command", "'Clear and Present Danger' is a title, not a reset; 'Kids' a filter", [
        T("I loved Heat", resolved("Heat (1995)"), cards(), names=("Heat (1995)",)),
        T("Clear and Present Danger", resolved("Clear and Present Danger (1994)"), cards(),
          history_is("Heat (1995)", "Clear and Present Danger (1994)"), names=("Clear and Present Danger (1994)",)),
        T("Kids", cards(), fits(all_of=("Children's",)), says("if you meant the movie Kids (1995)"))]),
]


# ------------------------------------------------------------------------------------------ running





def server_status(url: str) -> str:
    """The status line the page shows (model, precision, run folder), read from the page's config."""
    config = httpx.get(url.rstrip("/") + "/config", timeout=10).json()
    for comp in config.get("components", []):
        if comp.get("props", {}).get("elem_id") == "lcrec-status":
            return str(comp["props"].get("value", ""))
    return ""




def play(conv: Conversation, url: str, facts: Facts, k: int) -> dict:
    from gradio_client import Client
    client = Client(url, verbose=False)          # a fresh client = a fresh session, like a new browser tab
    ctx = Ctx(facts, k)
    turns = []
    for n, turn in enumerate(conv.turns, 1):
        if turn.reset:
            ctx.named, ctx.lists, ctx.previous = set(), [], []
        ctx.named |= {facts.idx(lb) for lb in turn.names}
        record = {"turn": n, "message": turn.message, "checks": []}
        try:
            first, total, data = timed_reply(client, turn.message)
        except Exception as e:      # a transport failure fails the turn's checks, the run goes on
            record.update(error=f"{type(e).__name__}: {e}")
            record["checks"] = [{"check": c.name, "ok": False, "detail": record["error"]}
                                for c in GLOBAL + turn.checks]
            turns.append(record)
            continue
        ctx.named |= {int(r["idx"]) for r in data.get("recognised") or []}
        record.update(first_update_s=round(first, 3), reply_s=round(total, 3), kind=data.get("kind"),
                      cards=[f"{c['title']} ({c['year']})" for c in items(data)],
                      text=text(data)[:600], request=data.get("request"))
        for check in turn.checks + GLOBAL:
            try:
                detail = check.fn(ctx, data)
            except Exception as e:   # a check that cannot be evaluated (e.g. no card #2 on screen) fails
                detail = f"could not check: {type(e).__name__}: {e}"
            record["checks"].append({"check": check.name, "ok": detail is None,
                                     **({"detail": detail} if detail else {})})
        if items(data):
            ctx.previous = items(data)
            ctx.lists.append(ids(data))
        turns.append(record)
    failed = [(t["turn"], c) for t in turns for c in t["checks"] if not c["ok"]]
    return {"id": conv.cid, "description": conv.description, "passed": not failed, "turns": turns,
            "failed": [{"turn": n, **c} for n, c in failed]}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="models/ml-100k")
    ap.add_argument("--config", help="preset; default: RUN_DIR/config.yaml, else configs/ml-100k.yaml")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "int8", "nf4"],
                    help="serving precision; auto = what the app serves (lcrec_chat.hardware.serving_dtype: int8 on a CPU "
                         "with PyTorch's x86 kernels)")
    ap.add_argument("--url", help="talk to an app already running there instead of starting one")
    ap.add_argument("--only", action="append", default=[], help="conversation id to play (repeatable)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    from lcrec_chat.config import load_config
    from lcrec_chat.hardware import describe, machine_record, serving_dtype
    run_dir = Path(args.run_dir)
    config = args.config or (str(run_dir / "config.yaml") if (run_dir / "config.yaml").exists()
                             else "configs/ml-100k.yaml")
    cfg = load_config(config, [f"run_dir={run_dir}"])
    dtype = serving_dtype(args.dtype, "cpu")
    why = "the app's default (hardware.serving_dtype)" if args.dtype == "auto" else "as asked"
    conversations = [c for c in CONVERSATIONS if not args.only or c.cid in args.only]
    assert len({c.cid for c in CONVERSATIONS}) == len(CONVERSATIONS), "conversation ids must be unique"
    facts = Facts(run_dir / "catalog.sqlite")

    machine = describe()
    print(f"machine: {machine}")
    proc = None
    t0 = time.perf_counter()
    if args.url:
        url, startup = args.url, 0.0
        print(f"app: {url} (already running; its precision is its own)")
    else:
        print(f"precision: {dtype} ({args.dtype}: {why})")
        proc, url = start_server(config, str(run_dir), ["model.dtype=" + dtype], args.startup_timeout)
        startup = time.perf_counter() - t0
    try:
        status = server_status(url)
        print(f"app status: {status}  [started in {startup:.1f} s]")
        if status.startswith("⚠"):
            raise SystemExit(f"the app cannot recommend: {status}")
        wall = time.perf_counter()
        results = []
        for conv in conversations:
            res = play(conv, url, facts, cfg.chat.default_k)
            results.append(res)
            first = res["failed"][0] if res["failed"] else None
            print(f"  {conv.cid:<22} {'PASS' if res['passed'] else 'FAIL'}"
                  + (f"  turn {first['turn']}: {first['check']}: {first['detail']}" if first else ""), flush=True)
        wall = time.perf_counter() - wall
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    checks = [c for r in results for t in r["turns"] for c in t["checks"]]
    replies = [t for r in results for t in r["turns"] if "reply_s" in t]
    totals, firsts = [t["reply_s"] for t in replies], [t["first_update_s"] for t in replies]
    passed = sum(r["passed"] for r in results)
    summary = {
        "conversations": len(results), "conversations_passed": passed,
        "conversation_pass_rate": round(passed / len(results), 4) if results else None,
        "checks": len(checks), "checks_passed": sum(c["ok"] for c in checks),
        "check_pass_rate": round(sum(c["ok"] for c in checks) / len(checks), 4) if checks else None,
        "replies": len(replies), "reply_p50_s": round(pct(totals, 0.5), 3), "reply_p95_s": round(pct(totals, 0.95), 3),
        "first_update_p50_s": round(pct(firsts, 0.5), 3), "first_update_p95_s": round(pct(firsts, 0.95), 3),
        "wall_s": round(wall, 1), "startup_s": round(startup, 1),
    }

    # the table
    print()
    width = max(len(r["description"]) for r in results)
    print(f"{'id':<22} {'description':<{width}}  result  failed check")
    for r in results:
        first = r["failed"][0] if r["failed"] else None
        failed = f"turn {first['turn']}: {first['check']} ({first['detail']})" if first else ""
        more = f" (+{len(r['failed']) - 1} more)" if len(r["failed"]) > 1 else ""
        print(f"{r['id']:<22} {r['description']:<{width}}  {'pass' if r['passed'] else 'FAIL':<6}  {failed}{more}")
    print()
    print(f"conversations passing every check: {passed}/{len(results)} = {summary['conversation_pass_rate']:.1%}")
    print(f"checks passing: {summary['checks_passed']}/{summary['checks']} = {summary['check_pass_rate']:.1%}")
    print(f"reply latency over {len(replies)} replies: p50 {summary['reply_p50_s']:.2f} s, "
          f"p95 {summary['reply_p95_s']:.2f} s (first streamed update p50 {summary['first_update_p50_s']:.2f} s, "
          f"p95 {summary['first_update_p95_s']:.2f} s)")
    print(f"machine: {machine}; precision {dtype if not args.url else 'as served'}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "run_dir": str(run_dir), "config": config, "dtype": dtype if not args.url else None,
        "dtype_choice": why if not args.url else None, "url": args.url, "app_status": status,
        "machine": {**machine_record(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "summary": summary, "conversations": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
