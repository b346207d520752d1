"""The conversation: per-session state, what each message does to it, and the replies (no UI code here).

``ChatEngine.respond(message, session)`` yields replies progressively: first what was understood (recognised
and unknown titles, the filters), then the same text with the item cards. The engine is shared by every
session and holds no user state; everything a user said lives in their own :class:`Session`.

How a request is read (``intents`` has the commands and filter phrases):

* The message is cut into clauses where a history turns into a wish ("..., but now ...", "something like X").
  Titles in each clause are resolved through the catalogue (exact, typo-tolerant, year hints, see
  ``lcrec_chat.titles``). Text left over is an *intention piece* when it holds wish words (a genre word,
  a decade, "movie", "something", "tonight", ...), otherwise it is reported as an *unrecognised title*.
* **History** = the recognised titles, used when the message has a history cue ("loved", "watched",
  "like", "favourites", ...) or when at least as many pieces resolved as stayed unknown (a bare list of
  titles). **Intention** = the intention pieces; a message with no recognised title and no history cue
  is an intention as a whole. Both present = a fused request (history + intention).
* Genre, mood and decade words of the intention become catalogue filters as well ("a funny 90s movie" only
  returns Comedy items from 1990-1999, "a romantic comedy" items that are both); "any genre" / "any year" lift
  them. A message in which nothing is recognised (no title, no wish, genre, mood or decade word, no word of the
  catalogue's text) is answered with a request for titles or a wish, and changes nothing.

What reaches the model: resolved item indices (as their codes) and the intention, cleaned by
``intents.sanitize_query`` (one line, no quotes/brackets, at most 200 characters) and quoted by the prompt
template. Unrecognised text is only echoed back to the user, never sent. No SQL is built from user text.

Which items may be shown:
  always excluded: every title the person named in the session (liked, capped out of the history, or read
  inside a wish) and rejected items;
  a new request with titles: nothing else; a rejection: items of earlier lists (the list on screen stays
  eligible, so "not #2" keeps the rest and brings one new item); a refinement ("only comedies", "something
  lighter"), a wish without titles after earlier turns, "more", "more like #n" and "more like <title>": every
  item shown.

Reasons on the cards come from catalogue data (wish words matched, genres and decade shared with a named title,
co-viewing counts of the training split, popularity, the model's rank among the candidates), never from the
model's raw scores.
"""
from __future__ import annotations

import bisect
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from .catalog import Catalog
from .config import ChatConfig
from .data.domain import MOVIE, Domain, article, domain_named
from .intents import (KNOWN_MOODS, Command, FilterChange, Filters, Vocabulary, Wish, asks_more_like, extract_filters,
                      has_content, is_intention_piece, parse_command, resolve_refs, sanitize_query, split_request,
                      unknown_mood_word)
from .titles import display_title

log = logging.getLogger(__name__)

MAX_RESOLVE_PIECES = 60        # pieces of a pasted history examined per message
MIN_COWATCH = 2                # "watched by 1 of the 3 people who watched X" says nothing


class RecommendFn(Protocol):
    """``Recommender.recommend`` (or any function with its signature)."""

    def __call__(self, history: Sequence[int] = (), query: str = "", k: int = 10, exclude: Sequence[int] = (),
                 filters: dict | None = None, num_beams: int | None = None) -> list: ...


@dataclass
class Session:
    """Everything one user has said that matters; one per browser session (gr.State) or API call."""
    liked: list[int] = field(default_factory=list)      # history sent to the model, oldest first
    query: str = ""                                     # the current intention, already sanitised
    wishes: list[Wish] = field(default_factory=list)    # the intention's filter phrases (explain the picks)
    filters: Filters = field(default_factory=Filters)
    rejected: list[int] = field(default_factory=list)
    shown: list[int] = field(default_factory=list)      # every item shown, in order
    current: list[int] = field(default_factory=list)    # the list on screen: "#2" points into it
    focus: int | None = None                            # the item last talked about ("that one")
    named: list[int] = field(default_factory=list)      # every title the person named: never recommended back
    last_named: list[int] = field(default_factory=list)  # the titles named by the message of turn last_named_turn
    last_named_turn: int = 0
    k: int = 5
    turns: int = 0
    method: str = ""                                    # the recommender chosen on the page ("" = the app's default)

    def summary(self) -> dict:
        return {"liked": list(self.liked), "query": self.query, "filters": self.filters.describe(),
                "rejected": list(self.rejected), "shown": len(self.shown), "on_screen": list(self.current),
                "named": list(self.named)}

    def name(self, idxs: Iterable[int]) -> None:
        self.named += [i for i in dict.fromkeys(idxs) if i not in self.named]


class CoWatch:
    """Who interacted with what in the training split: grounds "watched by 12 of the 40 people who watched
    Fargo" in data (the model learnt from the same sequences). Item -> set of users, ~100k entries for ML-100K."""

    def __init__(self, sequences: Iterable[Sequence[int]]):
        by_item: dict[int, set[int]] = {}
        for user, seq in enumerate(sequences):
            for idx in seq:
                by_item.setdefault(int(idx), set()).add(user)
        self._users: dict[int, frozenset[int]] = {i: frozenset(u) for i, u in by_item.items()}

    def viewers(self, idx: int) -> int:
        return len(self._users.get(idx, ()))

    def both(self, a: int, b: int) -> int:
        return len(self._users.get(a, frozenset()) & self._users.get(b, frozenset()))


@dataclass
class Card:
    rank: int
    idx: int
    title: str
    year: int | None
    genres: list[str]
    reason: str
    score: float

    def as_text(self) -> str:
        year = f" ({self.year})" if self.year else ""
        genres = ", ".join(self.genres)
        return f"{self.rank}. {self.title}{year} - {genres} - {self.reason}"


@dataclass
class Reply:
    """One streamed state of an answer. Text lines are plain (unescaped) text: the UI escapes them."""
    lines: list[str] = field(default_factory=list)
    cards: list[Card] = field(default_factory=list)
    done: bool = True
    kind: str = "message"                # message | recommend | info | error
    request: dict | None = None          # what was sent to the model, for transparency and tests
    recognised: list[dict] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def as_text(self) -> str:
        return "\n".join(self.lines + [c.as_text() for c in self.cards])

    def as_dict(self) -> dict:
        return {"text": self.as_text(), "kind": self.kind, "items": [asdict(c) for c in self.cards],
                "recognised": self.recognised, "unknown": self.unknown, "request": self.request}


def _quoted(text: str) -> str:
    """' ("text")' to quote an example after a phrase, or "" where there is none."""
    return f" (\"{text}\")" if text else ""


def help_lines(domain: Domain) -> list[str]:
    """The answer to "help", "hi" or an empty message, with the examples and words of ``domain``."""
    refinements = ["more like #2", "not #3", "what is #1?", *domain.example_filters, "more", "start over"]
    return [f"Tell me what you feel like {domain.watching}{_quoted(domain.example_wish)}, or paste {domain.kinds} "
            f"you liked{_quoted(domain.example_history)}, or both.",
            "Then refine: " + ", ".join(f"\"{r}\"" for r in refinements) + "."]


def _merge_wishes(old: list[Wish], change: FilterChange) -> list[Wish]:
    """The wishes that still hold after a refinement: new genre or mood words replace old ones, new years
    replace old years, and a wish for a genre that is now excluded is dropped."""
    new_genres = any(w.is_genre for w in change.wishes if not w.negated)
    new_years = change.shift or any(not w.is_genre for w in change.wishes)
    kept = [w for w in old
            if (w.is_genre and not new_genres and not change.clear_genres
                and not (w.genres and set(w.genres) <= set(change.excluded_genres)))
            or (not w.is_genre and not new_years and not change.clear_years)]
    return kept + [w for w in change.wishes if not w.negated]


def _failure(error: Exception) -> Reply:
    """The answer to a bug or a model failure: the session lives on, the server log has the trace."""
    return Reply([f"Sorry, something went wrong while answering ({type(error).__name__}); the server log has the "
                  "details. Try again, or \"start over\"."], kind="error")


def _label(item: dict) -> str:
    title = display_title(item["title"])
    return f"{title} ({item['year']})" if item.get("year") else title


class ChatEngine:
    """Conversation logic over a catalogue and a recommend function; shared by all sessions, stateless itself.

    ``recommend`` may be None (the model failed to load): the engine then still resolves titles and answers
    questions about items, and says why it cannot recommend (``model_error``).
    """

    def __init__(self, catalog: Catalog | None, recommend: RecommendFn | Callable | None, cfg: ChatConfig,
                 model_error: str = "", catalog_error: str = "", cowatch: CoWatch | None = None):
        if cfg.default_k > cfg.max_k or cfg.max_k > cfg.num_beams:
            raise ValueError(f"chat: need default_k <= max_k <= num_beams, got {cfg.default_k}, {cfg.max_k}, "
                             f"{cfg.num_beams}")
        self.catalog = catalog
        self.recommend_fn = recommend
        self.cfg = cfg
        self.model_error = model_error or ("" if recommend else "no model is loaded")
        self.catalog_error = catalog_error or ("" if catalog else "no catalogue is loaded")
        # the words of replies and of the message patterns ("movie"/"watched" or "product"/"bought"); without a
        # catalogue, those of MovieLens, the domain of catalogues that do not name theirs
        self.domain = domain_named(catalog.domain) if catalog else MOVIE
        self.vocab = Vocabulary(catalog.genres() if catalog else [], self.domain, catalog.years() if catalog else None)
        self.help = help_lines(self.domain)
        self.cowatch = cowatch
        # every item's popularity, ascending: "one of the 5% most watched titles" in a reason
        self._popularity = sorted(catalog.item(i)["popularity"] or 0 for i in range(len(catalog))) if catalog else []

    # ------------------------------------------------------------------------------------------ entry points
    def new_session(self) -> Session:
        return Session(k=self.cfg.default_k)

    def respond(self, message: str, session: Session) -> Iterator[Reply]:
        """Answer one message, updating ``session``; yields partial replies, the last one has done=True."""
        if not isinstance(message, str):
            yield Reply([f"Expected a text message, got {type(message).__name__}."], kind="error")
            return
        if len(message) > self.cfg.max_message_chars:
            yield Reply([f"Your message is {len(message):,} characters long; the limit is "
                         f"{self.cfg.max_message_chars:,}. Please shorten it (a list of up to "
                         f"{self.cfg.max_history_items} titles is plenty)."], kind="error")
            return
        if self.catalog is None:
            yield Reply([f"The app is not ready: {self.catalog_error}"], kind="error")
            return
        session.turns += 1
        try:
            yield from self._dispatch(message.strip(), session)
        except Exception as e:   # a bug or a model failure must not kill the session; the log has the trace
            log.exception("chat: failed to answer %r", message[:200])
            yield _failure(e)

    def answer(self, message: str, liked: Sequence[str | int] | None = None, k: int | None = None,
               method: str = "") -> dict:
        """Stateless API: one message (+ optional liked titles or item indices) -> the final reply as a dict.
        ``method`` picks one of the app's recommenders (MethodRouter); "" = the default."""
        if self.catalog is None:
            return Reply([f"The app is not ready: {self.catalog_error}"], kind="error").as_dict()
        session = self.new_session()
        session.k = self._clamp_k(k)
        session.method = method if isinstance(method, str) else ""
        seeded: list[Reply] = []
        if liked:
            if len(liked) > self.cfg.max_history_items * 5:
                return Reply([f"history has {len(liked)} entries; the limit is {self.cfg.max_history_items * 5}"],
                             kind="error").as_dict()
            idxs, notes = self._seed(liked)
            session.liked = idxs[-self.cfg.max_history_items:]
            session.name(idxs)
            seeded.append(Reply(notes))
        text = message if message and message.strip() else ""
        if not text and not session.liked:   # nothing to go on: what was not found, then how to ask
            notes = seeded[0].lines if seeded else []
            return Reply(notes + self.help, kind="error" if notes else "message").as_dict()
        if text:
            replies = list(self.respond(text, session))
        else:
            try:
                replies = list(self._recommend(session, [], exclude_shown="none"))
            except Exception as e:   # as in respond: a model failure is an answer, not a server error
                log.exception("chat: failed to recommend from a history of %d items", len(session.liked))
                replies = [_failure(e)]
        final = replies[-1]
        if seeded and seeded[0].lines:
            final.lines = seeded[0].lines + final.lines
        return final.as_dict()

    # ------------------------------------------------------------------------------------------ dispatch
    def _dispatch(self, text: str, session: Session) -> Iterator[Reply]:
        command = parse_command(text, self.vocab)
        if command is not None and command.kind == "info" and command.refs:
            # "#1 Fargo #2 Heat" is a ranked list of titles, not questions about cards
            unnumbered = re.sub(r"#\s?\d{1,2}\b", ",", text)
            if len(self.catalog.resolve_titles(unnumbered, max_pieces=MAX_RESOLVE_PIECES).matches) >= 2:
                command, text = None, unnumbered
        if command is None:
            yield from self._request(text, session)
        elif command.kind == "help":
            yield Reply(self.help)
        elif command.kind == "thanks":
            yield Reply(["Glad to help. Say \"more\", refine the list, or \"start over\"."])
        elif command.kind == "reset":   # the person's settings on the page (list length, recommender) stay
            k, method = session.k, session.method
            session.__dict__.update(self.new_session().__dict__)
            session.k, session.method = k, method
            if command.rest:
                yield from self._dispatch(command.rest, session)
            else:
                yield Reply(["Starting over: I forgot your titles, wishes, filters and what I showed you."])
        elif command.kind == "more":
            yield from self._more(session)
        elif command.kind == "refine":
            yield from self._refine(command.change, session, text)
        else:
            yield from self._item_command(command, session)

    def _targets(self, command: Command, session: Session) -> tuple[list[int], list[str]]:
        if command.focus:
            if session.focus is not None:
                return [session.focus], []
            if len(session.current) == 1:
                return list(session.current), []
            return [], ["Which one? Say e.g. \"not #2\" or \"more like #1\"." if session.current else
                        "There is nothing on screen yet to point at."]
        idxs, bad = resolve_refs(command.refs, session.current)
        notes = []
        if bad:
            nums = ", ".join("last" if n == -1 else f"#{n}" for n in bad)
            notes.append(f"There is no {nums} on screen" +
                         (f" (I showed {len(session.current)})." if session.current else "; ask for something first."))
        return idxs, notes

    def _position_notes(self, command: Command, session: Session) -> list[str]:
        """Right after a pasted list, "the third one" could mean the third card shown or the third title named:
        cards are what numbers point at, and the answer says so."""
        if command.focus or session.last_named_turn != session.turns - 1 or len(session.last_named) < 2:
            return []
        notes = []
        for n in command.refs:
            card_pos, named_pos = (len(session.current), len(session.last_named)) if n == -1 else (n, n)
            if not (1 <= card_pos <= len(session.current) and 1 <= named_pos <= len(session.last_named)):
                continue
            card = self.catalog.item(session.current[card_pos - 1])
            named = self.catalog.item(session.last_named[named_pos - 1])
            which = "the last one" if n == -1 else f"#{n}"
            hint = f" Say \"more like {display_title(named['title'])}\" if you meant that one." \
                if command.kind == "like" else ""
            notes.append(f"I took {which} to be card #{card_pos} of my list, {_label(card)}, not "
                         f"{_label(named)} from the titles you named.{hint}")
        return notes

    def _item_command(self, command: Command, session: Session) -> Iterator[Reply]:
        idxs, notes = self._targets(command, session)
        if not idxs:
            yield Reply(notes, kind="error")
            return
        notes = self._position_notes(command, session) + notes
        items = self.catalog.items(idxs)
        session.focus = idxs[-1]
        if command.kind == "info":
            lines = notes[:]
            for item in items:
                lines += self._describe(item, session)
            yield Reply(lines, kind="info")
            return
        if command.kind == "reject":
            session.rejected = list(dict.fromkeys(session.rejected + idxs))
            session.liked = [i for i in session.liked if i not in idxs]
            session.focus = None
            lines = notes + [f"Noted, not {', '.join(_label(i) for i in items)}. Here is the list without it:"]
            yield from self._recommend(session, lines, exclude_shown="earlier")
            return
        # like: the item joins the history (as the most recent), new items only
        session.liked = [i for i in session.liked if i not in idxs] + idxs
        session.liked = session.liked[-self.cfg.max_history_items:]
        session.rejected = [i for i in session.rejected if i not in idxs]
        lines = notes + [f"Added {', '.join(_label(i) for i in items)} to what you like. More like it:"]
        yield from self._recommend(session, lines, exclude_shown="all")

    def _more(self, session: Session) -> Iterator[Reply]:
        if not (session.liked or session.query or session.filters):
            yield Reply([f"More of what? Tell me a few {self.domain.kinds} you liked or what you are in the mood for."])
            return
        yield from self._recommend(session, ["Here are more:"], exclude_shown="all")

    def _refine(self, change: FilterChange, session: Session, text: str) -> Iterator[Reply]:
        lines: list[str] = []
        as_wish = not (session.liked or session.query or session.filters)   # nothing to refine: it is the wish
        years = [i["year"] for i in self.catalog.items(session.current or session.liked)]
        filters, note = change.apply(session.filters, years)
        if note:   # nothing changes when the refinement cannot be applied
            yield Reply([note], kind="error")
            return
        reading = ""
        if as_wish:
            session.query = sanitize_query(text)
            session.wishes = []
            reading = f"Reading \"{session.query}\" as your wish"
        titled = self._title_named_like(text)
        if titled is not None:   # "Kids", "The War": a filter first, the title one message away
            reading = (reading or f"Reading \"{text}\" as a filter") + \
                f"; if you meant the {self.domain.kind} {_label(titled)}, say \"I liked {_label(titled)}\""
        if reading:
            lines.append(reading + ".")
        session.filters = filters
        session.wishes = _merge_wishes(session.wishes, change)
        what = filters.describe() or "no filters"
        # a refinement asks for something different: the cards already shown are not shown again
        yield from self._recommend(session, lines + [f"Filters now: {what}."], exclude_shown="all")

    def _title_named_like(self, text: str) -> dict | None:
        """The catalogue item whose title is exactly the whole message, if one is (a film called "Kids")."""
        res = self.catalog.resolve_titles(text, max_pieces=1)
        if len(res.matches) == 1 and not (res.unknown or res.ambiguous) and res.matches[0].confidence >= 1.0 \
                and res.matches[0].query.strip().casefold() == text.strip().casefold():
            return self.catalog.item(res.matches[0].idx)
        return None

    # ------------------------------------------------------------------------------------------ requests
    def _request(self, text: str, session: Session) -> Iterator[Reply]:
        matches, ambiguous, unknown_titles, intention, skipped = [], [], [], [], 0
        cue = bool(self.vocab.patterns.history_cue.search(text))
        for clause in split_request(text, self.vocab):
            res = self.catalog.resolve_titles(clause, max_pieces=MAX_RESOLVE_PIECES)
            skipped += res.skipped
            matches += [m for m in res.matches if m.idx not in {x.idx for x in matches}]
            ambiguous += res.ambiguous
            wishes = [p for p in res.unknown if is_intention_piece(p, self.vocab)]
            if wishes and not (res.matches or res.ambiguous) and len(wishes) == len(res.unknown):
                wishes = [clause]            # the clause as written reads better than its filler-stripped pieces
            intention += wishes
            unknown_titles += [p for p in res.unknown if not is_intention_piece(p, self.vocab)]
        # whatever the person named is never recommended back, a title read as part of a wish included
        session.name([m.idx for m in matches] + [c["idx"] for _, cands in ambiguous for c in cands])
        if matches and not cue and len(matches) < len(intention):
            intention, matches, unknown_titles = [text], [], []   # a stray title match inside a wish
        if not matches and not cue and not ambiguous:
            intention, unknown_titles = [text], []              # no title named: the message is the wish

        recognised = [self.catalog.item(m.idx) for m in matches]
        lines = self._understanding(recognised, matches, ambiguous, unknown_titles, skipped)
        intention_text = " ".join(p for p in intention if has_content(p, self.vocab))
        change, _ = extract_filters(intention_text, self.vocab) if intention_text else (FilterChange(), "")
        query = sanitize_query(intention_text) if intention_text else ""
        if not recognised and not query:
            lines.append("I could not find any of those titles, so I have nothing to go on yet. "
                         "Check the spelling, or tell me what you are in the mood for.")
            yield Reply(lines, kind="error", unknown=unknown_titles)
            return
        if not recognised and not ambiguous and not self._understood(intention_text):
            yield Reply(lines + self._not_understood(text, session, self.domain), kind="error")
            return

        # a wish without titles after earlier turns refines them: show new items, not the same list again
        follow_up = not recognised and bool(session.liked or session.query)
        more_like = bool(recognised) and asks_more_like(text, self.vocab)
        if recognised:
            lines += self._add_liked([i["idx"] for i in recognised], session)
        if more_like:
            lines.append(f"More like {', '.join(_label(i) for i in recognised)}: new {self.domain.entries} only.")
        session.last_named, session.last_named_turn = [i["idx"] for i in recognised], session.turns
        # "older"/"newer" in a wish compare with the titles it names ("like Star Wars but older"), else with the
        # list on screen or the history
        reference = [i["idx"] for i in recognised] or session.current or session.liked
        lines += self._set_wish(query, change, session, [i["year"] for i in self.catalog.items(reference)])
        yield from self._recommend(session, lines, exclude_shown="all" if more_like or follow_up else "none",
                                   recognised=[{"idx": i["idx"], "title": i["title"], "year": i["year"]}
                                               for i in recognised], unknown=unknown_titles)

    def _understanding(self, recognised: list[dict], matches: list, ambiguous: list, unknown_titles: list[str],
                       skipped: int) -> list[str]:
        """The first lines of an answer: what was recognised, what could be several items, what was not found."""
        lines: list[str] = []
        if recognised:
            lines.append("Recognised: " + ", ".join(
                _label(i) + (f" [{m.note}]" if m.note and m.confidence < 1 else "")
                for i, m in zip(recognised, matches)) + ".")
        for query, candidates in ambiguous:
            options = " or ".join(_label(c) for c in candidates[:4])
            lines.append(f"\"{query}\" could be {options}; add the year to pick one.")
        if unknown_titles:
            shown = ", ".join(f"\"{u}\"" for u in unknown_titles[:8])
            more = f" and {len(unknown_titles) - 8} more" if len(unknown_titles) > 8 else ""
            lines.append(f"Not found in the catalogue: {shown}{more}.")
        if skipped:
            lines.append(f"(I only read the first {MAX_RESOLVE_PIECES} titles; {skipped} more were skipped.)")
        return lines

    def _understood(self, wish: str) -> bool:
        """Whether a wish holds anything to act on: a wish, genre, mood or year word, or a word that occurs in the
        catalogue's titles, genres or descriptions. Gibberish holds none, and must not become a sticky wish."""
        return is_intention_piece(wish, self.vocab) or bool(self.catalog.search(wish, limit=1))

    @staticmethod
    def _not_understood(text: str, session: Session, domain: Domain) -> list[str]:
        shown = text if len(text) <= 60 else text[:60].rsplit(" ", 1)[0] + "…"
        lines = [f"Sorry, I did not understand \"{shown}\": it holds no title, genre, decade or mood I know.",
                 f"Tell me a few {domain.entries} you liked{_quoted(domain.example_history)} or what you are in the "
                 f"mood for{_quoted(domain.example_wish)}."]
        if session.liked or session.query:
            lines.append("Your earlier titles and wishes are unchanged.")
        return lines

    def _add_liked(self, new: list[int], session: Session) -> list[str]:
        """Named titles join the history as its most recent entries."""
        liked = [i for i in session.liked if i not in new] + new
        session.liked = liked[-self.cfg.max_history_items:]
        session.rejected = [i for i in session.rejected if i not in new]
        if len(liked) > self.cfg.max_history_items:
            return [f"I keep the last {self.cfg.max_history_items} {self.domain.entries} you liked."]
        return []

    def _set_wish(self, query: str, change: FilterChange, session: Session,
                  reference_years: Sequence[int] = ()) -> list[str]:
        """A new wish replaces the old one (and its filters); no wish keeps the old one. Returns what to say.
        ``reference_years``: what "older" / "newer" in the wish compare with."""
        if not query:
            if not (session.query or session.filters):
                return []
            kept = [f"your wish \"{session.query}\""] if session.query else []
            kept += [f"filters {session.filters.describe()}"] if session.filters else []
            return [f"Still using {' and '.join(kept)} (say \"start over\" to drop it)."]
        session.query = query
        session.wishes = [w for w in change.wishes if not w.negated]
        session.filters, note = change.apply(Filters(), reference_years)
        lines = [f"Reading \"{query}\" as your wish" +
                 (f"; filters: {session.filters.describe()}." if session.filters else ".")]
        if note:
            lines.append(note)
        mood = unknown_mood_word(query, self.vocab)
        if mood:
            known = f" (moods I know: {KNOWN_MOODS})" if self.vocab.moods else ""   # none fit this catalogue's genres
            lines.append(f"I have no filter for \"{mood}\"{known}; the model reads it as part of your wish.")
        return lines

    # ------------------------------------------------------------------------------------------ recommending
    def _clamp_k(self, k: int | None) -> int:
        if k is None:
            return self.cfg.default_k
        return max(1, min(int(k), self.cfg.max_k))

    def _recommend(self, session: Session, lines: list[str], exclude_shown: str,
                   recognised: list[dict] | None = None, unknown: list[str] | None = None) -> Iterator[Reply]:
        """exclude_shown: none | earlier (all but the list on screen) | all."""
        extra = {"recognised": recognised or [], "unknown": unknown or []}
        if self.recommend_fn is None:
            yield Reply(lines + [f"I cannot recommend right now: {self.model_error}"], kind="error", **extra)
            return
        if not (session.liked or session.query):
            yield Reply(lines + [f"Tell me {article(self.domain.kind)} you liked or what you are in the mood for."],
                        kind="error", **extra)
            return
        exclude = set(session.rejected) | set(session.named)
        if exclude_shown == "all":
            exclude |= set(session.shown)
        elif exclude_shown == "earlier":
            exclude |= set(session.shown) - set(session.current)
        if session.filters.excluded_genres:
            exclude |= self.catalog.filter_indices(genres=list(session.filters.excluded_genres))
        filters = session.filters.catalog_filters()
        pool = self.catalog.filter_indices(**filters) if filters else set(range(len(self.catalog)))
        pool -= exclude | set(session.liked)
        if not pool:
            what = session.filters.describe()
            yield Reply(lines + [f"No items are left that match{' ' + what if what else ''} and that you have "
                                 "not seen here. Try \"any genre\", \"any year\" or \"start over\"."],
                        kind="error", **extra)
            return
        k = min(session.k, len(pool))
        request = {"history": list(session.liked), "query": session.query, "filters": filters, "method": session.method,
                   "excluded_genres": list(session.filters.excluded_genres), "exclude": len(exclude), "k": k}
        yield Reply(lines + ["Looking for recommendations…"], done=False, kind="recommend", request=request, **extra)
        chosen = {"method": session.method} if session.method else {}   # only a MethodRouter takes a method
        ranked = self.recommend_fn(history=list(session.liked), query=session.query, k=k,
                                   exclude=sorted(exclude), filters=filters, num_beams=self.cfg.num_beams, **chosen)
        cards = []
        for rank, rec in enumerate(ranked[:k], 1):
            item = rec.item or self.catalog.item(rec.idx)
            cards.append(Card(rank, rec.idx, display_title(item["title"]), item.get("year"),
                              list(item.get("genres") or []), self.reason(item, session, rank, len(pool)),
                              rec.score))
        session.current = [c.idx for c in cards]
        session.shown += [i for i in session.current if i not in session.shown]
        session.focus = None
        if not cards:
            lines = lines + ["The model returned no item for this request."]
        yield Reply(lines, cards, kind="recommend", request=request, **extra)

    # ------------------------------------------------------------------------------------------ explaining
    def reason(self, item: dict, session: Session, rank: int = 1, candidates: int = 0) -> str:
        """One line a person can check against the data, in the words of the catalogue's domain: the wish words
        it fits, the genres it shares with a title they named, how many viewers of that title watched it too, the
        same decade; else how widely it was watched and where the model ranked it. No model probability: spread
        over a whole catalogue it reads as "0.01%" for a good pick and says nothing to a person."""
        parts = []
        fits = [w for w in session.wishes if not w.negated and w.fits(item)]
        if fits:
            parts.append("fits " + ", ".join(f"\"{w.text}\" ({self._fit_detail(w, item)})" for w in fits[:3]))
        named = self.catalog.items(list(reversed(session.liked)))   # the most recent title wins ties
        parts += [p for p in (self._shared_genres(item, named), self._cowatched(item, named)) if p]
        if not any(w.year_min is not None or w.year_max is not None for w in fits):
            parts += [p for p in (self._same_decade(item, named),) if p]
        if len(parts) < 2:
            parts.append(self._standing(item, rank, candidates))
        return "; ".join(parts[:3])

    @staticmethod
    def _shared_genres(item: dict, named: list[dict]) -> str:
        genres = set(item.get("genres") or []) - {"unknown"}
        best, shared = None, set()
        for h in named:
            common = genres & set(h.get("genres") or [])
            if len(common) > len(shared):
                best, shared = h, common
        return f"{', '.join(sorted(shared))}, like {display_title(best['title'])}" if best else ""

    def _cowatched(self, item: dict, named: list[dict]) -> str:
        """"watched by 12 of the 40 people who watched Fargo" ("bought by ..." for products): the share, not the
        count, picks the title."""
        if self.cowatch is None:
            return ""
        best = None
        for h in named:
            both, viewers = self.cowatch.both(h["idx"], item["idx"]), self.cowatch.viewers(h["idx"])
            if both >= MIN_COWATCH and (best is None or both / viewers > best[0] / best[1]):
                best = (both, viewers, h)
        if best is None:
            return ""
        both, viewers, h = best
        watched = self.domain.watched
        return f"{watched} by {both:,} of the {viewers:,} people who {watched} {display_title(h['title'])}"

    @staticmethod
    def _same_decade(item: dict, named: list[dict]) -> str:
        year = item.get("year")
        if not year:
            return ""
        same = next((h for h in named if h.get("year") and h["year"] // 10 == year // 10), None)
        return f"also from the {year // 10 * 10}s, like {display_title(same['title'])}" if same else ""

    def _standing(self, item: dict, rank: int, candidates: int) -> str:
        pop = item.get("popularity") or 0
        n = len(self._popularity)
        place = n - bisect.bisect_right(self._popularity, pop) + 1      # 1 = the most watched item
        d = self.domain
        if pop and place <= n * 0.1:
            known = f"one of the {math.ceil(100 * place / n)}% most {d.watched} {d.entries} ({pop:,} {d.person}s)"
        else:
            known = f"{pop:,} {d.person}{'s' if pop != 1 else ''} in the data" if pop else \
                f"{article(d.entry)} few have rated"
        of = f" of {candidates:,} candidates" if candidates else ""
        return f"{known}; the model's pick #{rank}{of}"

    @staticmethod
    def _fit_detail(wish: Wish, item: dict) -> str:
        if wish.genres:
            return ", ".join(g for g in wish.genres if g in (item.get("genres") or []))
        if wish.excluded:
            return "no " + ", ".join(wish.excluded[:3]) + (" …" if len(wish.excluded) > 3 else "")
        return str(item.get("year"))

    def _describe(self, item: dict, session: Session) -> list[str]:
        pos = session.current.index(item["idx"]) + 1 if item["idx"] in session.current else None
        head = f"#{pos} " if pos else ""
        genres = ", ".join(g for g in item.get("genres") or [] if g != "unknown") or "no genre listed"
        lines = [f"{head}{_label(item)}: {genres}."]
        if item.get("popularity"):
            lines.append(f"{item['popularity']:,} users in the training data interacted with it.")
        if item.get("description"):
            text = item["description"]
            lines.append(text if len(text) <= 400 else text[:400].rsplit(" ", 1)[0] + "…")
        if item.get("brand"):
            lines.append(f"By {item['brand']}.")
        if item["idx"] in session.liked:
            lines.append(f"It is in your list of liked {self.domain.entries}.")
        if pos:
            lines.append(f"Say \"more like #{pos}\" to steer towards it, or \"not #{pos}\" to drop it.")
        return lines

    def _seed(self, liked: Sequence[str | int]) -> tuple[list[int], list[str]]:
        """API history entries (titles or item indices) -> item indices, plus notes on what was not found."""
        idxs: list[int] = []
        unknown: list[str] = []
        for entry in liked:
            if isinstance(entry, int) and not isinstance(entry, bool):
                if 0 <= entry < len(self.catalog):
                    idxs.append(entry)
                else:
                    unknown.append(f"item {entry}")
                continue
            text = str(entry)[:300]
            res = self.catalog.resolve_titles(text.replace(";", " "), max_pieces=3)
            if res.matches:
                idxs.append(res.matches[0].idx)
            else:
                unknown.append(text)
        notes = [f"History: not found in the catalogue: {', '.join(repr(u) for u in unknown[:8])}."] if unknown else []
        return list(dict.fromkeys(idxs)), notes
