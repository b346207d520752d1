"""The six LC-Rec alignment tasks, plus the chat app's own request formats.

Every sample is a (user message, assistant response) pair; the trainer puts the loss on the response only.
The chat app builds its requests with `request_prompt`, the same code that builds the `chat` task's samples,
so what the app sends is exactly what the model was tuned on.

MovieLens has no reviews or descriptions, so intentions and preference summaries are composed from what
the data holds: genres, decades, popularity and the user's own history (see `Describer`).

The words about items come from the dataset's `Domain` (lcrec_chat.data.domain): a MovieLens user "watched"
movies, an Amazon shopper "bought" products. The module-level constants (SEQREC, DENSE_PROMPT, CHAT_*, ...)
and `request_prompt` without a domain are the MovieLens wording; `TaskBuilder(..., domain=...).prompts` and
`TaskBuilder.request_prompt` give a run's own wording.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from string import Template
from typing import Sequence

from .data.domain import MOVIE, Domain, article
from .indexing import code_tokens

TASKS = ("seqrec", "item2index", "index2item", "fusionseqrec", "itemsearch", "preferenceobtain", "chat",
         "seqrec_dense")
HISTORY_SEP = ", "
SYSTEM = "You are a recommender that answers with item indices."


@dataclass
class Sample:
    task: str
    prompt: str        # the user message
    response: str      # what the assistant must produce (loss goes here)
    target: int = -1   # item index of the answer, when the answer is an item
    prefix: str = ""   # start of the assistant turn that is given, not learned (dense seqrec continuation)
    items: tuple[int, ...] = ()   # seqrec_dense: the window's items (the history, then the target if learned)


# ---------------------------------------------------------------------------------------------------------
# Instruction templates: written for this project, one drawn at random per sample.
# $word is a word of the dataset's Domain ($kind "movie" / "product", $watched "watched" / "bought", ...; a
# capitalised $Word is the word capitalised), filled once per domain by `prompts_for`. {history} is a list of
# item codes (or titles), {item} one item, {code} one item code, filled per sample.
# MovieLens renders every template exactly as before the words became per-dataset: the shipped adapter was
# tuned on those strings (tests/test_task_wording.py holds them).

TEMPLATES: dict[str, list[str] | str] = {
    "seqrec": [
        "Here is what a user has $watched, oldest first: {history}. Which $kind will they $watch next?",
        "$A_person's history, in order: {history}. Predict the next $kind they will choose.",
        "Given this sequence of $kinds a person $watched: {history}, recommend the next one.",
        "The user recently $watched {history}. What should they $watch next?",
        "Based on the $history_name {history}, which $kind comes next?",
        "These are the $kinds someone $watched, one after another: {history}. Suggest their next $kind.",
        "History of a user: {history}. Recommend one $kind for them to $watch next.",
        "I have $watched {history}, in that order. What would I most likely $watch next?",
        "Using the interaction history {history}, generate the index of the next $kind.",
    ],
    "item2index": [
        'What is the index of the $kind "{item}"?',
        'Give the item index of "{item}".',
        'Which index stands for the $kind "{item}"?',
        'Tell me the code of "{item}".',
        'Translate the $kind "{item}" into its item index.',
        'The $kind "{item}" is written with which index?',
        'I mean "{item}". What is its index?',
        'Find the index for this $kind: "{item}".',
    ],
    "item2index_detailed": [
        'What is the index of the {genres} $kind "{item}"?',
        'A {genres} $kind called "{item}": which index does it have?',
        'Give the item index of "{item}", a {genres} $kind.',
        'Which index corresponds to "{item}" ({genres})?',
        'Find the index of the $kind "{item}". $Genre_word: {genres}.',
        'Encode "{item}", a {genres} $entry, as an item index.',
        'The {genres} $synonym "{item}" has which item index?',
        'Item: "{item}"; $genre_word: {genres}. What is its index?',
    ],
    "index2item": [
        "Which $kind has the index {code}?",
        "What is the title of item {code}?",
        "Tell me the $kind behind the index {code}.",
        "Decode the item index {code} into $a_kind title.",
        "Item {code}: what $kind is it?",
        "Name the $kind whose index is {code}.",
        "{code} is the index of which $kind?",
        "Give the $naming of the $kind {code}.",
    ],
    "fusion_codes_to_title": [
        "A user $watched {history}, in that order. What is the title of the next $kind they will $watch?",
        "Given the history {history}, name the next $kind the user will $watch.",
        "Here are $a_person's $kinds, oldest first: {history}. Write the title of the $kind they $watch next.",
        "$History_name: {history}. Which $kind title comes next?",
        "After $watching {history}, which $kind will this person pick? Answer with its title.",
        "Predict the title of the next $kind for a user who $watched {history}.",
        "The sequence {history} describes what someone $watched. Give the title of their next $kind.",
        "Someone has $seen {history}. What $kind, by title, should come next?",
    ],
    "fusion_titles_to_code": [
        "A user $watched these $kinds in order: {history}. Give the index of the next $kind.",
        "$History_name by title: {history}. Which item index comes next?",
        "Someone $watched {history}. Predict the index of their next $kind.",
        "Here are $kind titles a person $watched, oldest first: {history}. Recommend the next one as an index.",
        "Given the titles {history}, generate the index of the $kind the user $watches next.",
        "I $watched {history}. What should I $watch next? Answer with an item index.",
        "History (titles): {history}. Next item index?",
        "The user's recent $kinds were {history}. Which $kind index will they choose next?",
    ],
    "itemsearch": [
        "{query}",
        "A user asks: \"{query}\" Which $kind fits?",
        "Find $a_kind for this request: {query}",
        "Search the catalogue for: {query}",
        "Here is what someone wants to $watch: {query} Recommend one $kind.",
        "Request: {query} Give the index of a matching $kind.",
        "Which $kind matches this wish? {query}",
        "Help me find something. {query}",
    ],
    "itemsearch_with_history": [
        "A user who $watched {history} says: \"{query}\" Which $kind should they $watch?",
        "History: {history}. The user now asks: {query} Recommend one $kind.",
        "Someone has $watched {history}. Their request: \"{query}\" Find the right $kind.",
        "Given the $history_name {history} and the wish \"{query}\", pick the next $kind.",
        "I $watched {history}. {query}",
        "Past $kinds: {history}. Current request: {query} Answer with $a_kind index.",
        "Considering {history}, find $a_kind for this request: {query}",
        "The user $watched {history} and now wants this: {query} Which $kind?",
    ],
    "preference": [
        "A user $watched {history}. Describe their taste in $kinds.",
        "Summarise the preferences of someone whose history is {history}.",
        "What kind of $kinds does a person who $watched {history} like?",
        "From the $history_name {history}, write a short profile of the user's taste.",
        "Here are a user's $kinds: {history}. What do they enjoy?",
        "Describe the $kind preferences shown by this history: {history}.",
        "Based on {history}, what $genre_word and ${era}s does this $person prefer?",
        "Read this history and say what the $person likes: {history}.",
    ],
    # Dense seqrec: the assistant lists a user's items in order, so one pass supervises the next item at every
    # position of the history (like SASRec's training), instead of one target per 150-token prompt.
    "dense": "List the $kinds this user $watched, in order.",
    # The chat app's requests: one fixed wording each, so app and training agree token for token.
    "chat_history": "I liked these $kinds: {history}. Recommend $a_kind for me.",
    "chat_query": "Recommend $a_kind. My request: \"{query}\"",
    "chat_both": "I liked these $kinds: {history}. Recommend $a_kind. My request: \"{query}\"",
    # Intentions ({phrase}: "a funny 90s comedy"; {x}: a liked item, {t}: one of the twists)
    "intention_forms": [
        "I'm looking for {phrase}.",
        "Can you suggest {phrase}?",
        "Recommend {phrase}.",
        "I want to $watch {phrase}$moment.",
        "Any ideas for {phrase}?",
        "I'm in the mood for {phrase}.",
        "Find me {phrase}, please.",
        "What's {phrase} I could $watch?",
    ],
    "like_forms": ["Something like {x}{t}.", "More $kinds like {x}{t}, please.", "I enjoyed {x}. Anything similar{t}?"],
    "twists": ["", " but a bit different", " from another $era", " that I haven't $seen"],
    # Preference summaries ({g}: genres, {e}: decade, {t}: one of the tastes, {f}: the last two items)
    "summaries": [
        "This user mostly $watches {g}, mainly from the {e}, and leans towards {t}. Recent favourites: {f}.",
        "They enjoy {g}; most of their $kinds are from the {e} and they like {t}. Lately: {f}.",
        "A fan of {g}, especially {e} $kinds, who picks {t}. They recently $watched {f}.",
        "Their taste: {g}, with a soft spot for the {e}, and {t}. Recently: {f}.",
    ],
    "summary_without_era": "This user mostly $watches {g} and picks {t}. Recent favourites: {f}.",
    "tastes": ["popular, well-known $entries", "a mix of hits and lesser-known $entries"],
    "any_genre": "many kinds of $kinds",
}


@dataclass(frozen=True)
class Prompts:
    """Every template of TEMPLATES in one domain's words; lists become tuples."""
    seqrec: tuple[str, ...]
    item2index: tuple[str, ...]
    item2index_detailed: tuple[str, ...]
    index2item: tuple[str, ...]
    fusion_codes_to_title: tuple[str, ...]
    fusion_titles_to_code: tuple[str, ...]
    itemsearch: tuple[str, ...]
    itemsearch_with_history: tuple[str, ...]
    preference: tuple[str, ...]
    dense: str
    chat_history: str
    chat_query: str
    chat_both: str
    intention_forms: tuple[str, ...]
    like_forms: tuple[str, ...]
    twists: tuple[str, ...]
    summaries: tuple[str, ...]
    summary_without_era: str
    tastes: tuple[str, ...]
    any_genre: str

    def request(self, history_codes: Sequence[str] = (), query: str = "") -> str:
        """The user message of a chat request: history alone, query alone, or both."""
        history = HISTORY_SEP.join(history_codes)
        if history and query:
            return self.chat_both.format(history=history, query=query)
        if history:
            return self.chat_history.format(history=history)
        if query:
            return self.chat_query.format(query=query)
        raise ValueError("a request needs a history, a query, or both")


@lru_cache(maxsize=None)
def prompts_for(domain: Domain) -> Prompts:
    """TEMPLATES rendered in `domain`'s words (once per domain)."""
    words = domain.words()

    def fill(template: str) -> str:
        return Template(template).substitute(words)   # a misspelt $word fails here, never reaches a prompt
    return Prompts(**{name: fill(t) if isinstance(t, str) else tuple(map(fill, t)) for name, t in TEMPLATES.items()})


# The MovieLens wording under its historical names (recommender.py, evaluate.py and intents.py import them).
_MOVIE = prompts_for(MOVIE)
SEQREC = list(_MOVIE.seqrec)
ITEM2INDEX = list(_MOVIE.item2index)
ITEM2INDEX_DETAILED = list(_MOVIE.item2index_detailed)
INDEX2ITEM = list(_MOVIE.index2item)
FUSION_CODES_TO_TITLE = list(_MOVIE.fusion_codes_to_title)
FUSION_TITLES_TO_CODE = list(_MOVIE.fusion_titles_to_code)
ITEMSEARCH = list(_MOVIE.itemsearch)
ITEMSEARCH_WITH_HISTORY = list(_MOVIE.itemsearch_with_history)
PREFERENCE = list(_MOVIE.preference)
INTENTION_FORMS = list(_MOVIE.intention_forms)
DENSE_PROMPT = _MOVIE.dense
CHAT_HISTORY = _MOVIE.chat_history
CHAT_QUERY = _MOVIE.chat_query
CHAT_BOTH = _MOVIE.chat_both
GENRE_ADJECTIVE = MOVIE.genre_adjectives
GENRE_NOUN = MOVIE.genre_nouns
OCCASION = MOVIE.occasions


def request_prompt(history_codes: Sequence[str] = (), query: str = "", domain: Domain = MOVIE) -> str:
    """The user message the chat app and `recommend()` send: history alone, query alone, or both."""
    return prompts_for(domain).request(history_codes, query)


# ---------------------------------------------------------------------------------------------------------
# Intentions and preference summaries composed from catalogue facts.


def decade_of(year: int | None) -> str:
    if not year:
        return ""
    decade = year // 10 * 10
    return f"{decade % 100:02d}s" if 1950 <= decade < 2000 else f"{decade}s"


class Describer:
    """Turns items and histories into intentions and preference summaries, using catalogue facts only."""

    def __init__(self, items: Sequence[dict], popularity: Sequence[int], domain: Domain = MOVIE):
        self.items = items
        self.domain = domain
        self.prompts = prompts_for(domain)
        ranked = sorted(range(len(items)), key=lambda i: -popularity[i])
        self.pop_rank = {idx: r / max(1, len(items)) for r, idx in enumerate(ranked)}

    def display(self, idx: int) -> str:
        item = self.items[idx]
        return f"{item['title']} ({item['year']})" if item.get("year") else item["title"]

    def intention(self, idx: int, rng: random.Random, history: Sequence[int] = ()) -> str:
        """A request the target item satisfies, e.g. 'Can you suggest a funny 90s movie for a family night?'"""
        item, domain, prompts = self.items[idx], self.domain, self.prompts
        genres = [g for g in item.get("genres") or [] if g in domain.genre_nouns] or list(item.get("genres") or [])
        similar = [h for h in history if set(self.items[h].get("genres") or []) & set(genres)]
        if similar and rng.random() < 0.25:
            other = self.display(rng.choice(similar))
            twist = rng.choice(prompts.twists)
            return rng.choice(prompts.like_forms).format(x=other, t=twist)
        words = []
        if len(genres) > 1 and rng.random() < 0.6:
            adjective = domain.adjective_of(genres[0])
            if adjective:   # a domain without genre adjectives (products) leaves the phrase plain
                words.append(adjective)
        decade = decade_of(item.get("year"))
        if decade and rng.random() < 0.7:
            words.append(decade)
        main = genres[-1] if genres else ""
        noun = domain.noun_of(main) if main else domain.kind
        phrase = " ".join(words + [noun])
        rank = self.pop_rank.get(idx, 0.5)
        if rank < 0.1 and rng.random() < 0.5:
            phrase = rng.choice(["well-known ", "popular ", "classic "]) + phrase
        elif rank > 0.6 and rng.random() < 0.5:
            phrase = rng.choice(["lesser-known ", "little-known ", "hidden-gem "]) + phrase
        phrase = article(phrase)
        occasion = next((domain.occasions[g] for g in genres if g in domain.occasions), "")
        if occasion and rng.random() < 0.4:
            phrase += " " + occasion
        return rng.choice(prompts.intention_forms).format(phrase=phrase)

    def preference(self, history: Sequence[int], rng: random.Random) -> str:
        """A short summary of the taste a history shows."""
        prompts = self.prompts
        genres = Counter(g for h in history for g in (self.items[h].get("genres") or []) if g != "unknown")
        top = [self.domain.genre_nouns.get(g, g.lower()) for g, _ in genres.most_common(3)]
        decades = Counter(decade_of(self.items[h].get("year")) for h in history if self.items[h].get("year"))
        era = decades.most_common(1)[0][0] if decades else ""
        mainstream = sum(self.pop_rank.get(h, 0.5) < 0.2 for h in history) / max(1, len(history))
        taste = prompts.tastes[0] if mainstream > 0.5 else prompts.tastes[1]
        favourites = " and ".join(self.display(h) for h in list(history)[-2:])
        genre_text = _join(top) if top else prompts.any_genre
        if not era:
            return prompts.summary_without_era.format(g=genre_text, t=taste, f=favourites)
        return rng.choice(prompts.summaries).format(g=genre_text, e=era, t=taste, f=favourites)


def _join(words: Sequence[str]) -> str:
    if not words:
        return ""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ---------------------------------------------------------------------------------------------------------
# Sample builders.

class TaskBuilder:
    """Draws samples of every task from the training part of a split (targets of valid/test never used)."""

    def __init__(self, items: Sequence[dict], codes: Sequence[Sequence[int]], popularity: Sequence[int],
                 max_history: int = 20, domain: Domain = MOVIE):
        self.items = items
        self.code_text = [code_tokens(c) for c in codes]
        self.domain = domain
        self.prompts = prompts_for(domain)
        self.describer = Describer(items, popularity, domain)
        self.max_history = max_history

    def request_prompt(self, history_codes: Sequence[str] = (), query: str = "") -> str:
        """The chat app's user message in this builder's words (what the `chat` task trains on)."""
        return self.prompts.request(history_codes, query)

    def codes_of(self, history: Sequence[int]) -> list[str]:
        return [self.code_text[i] for i in history[-self.max_history:]]

    def _history(self, history: Sequence[int]) -> str:
        return HISTORY_SEP.join(self.codes_of(history))

    def _titles(self, history: Sequence[int]) -> str:
        return HISTORY_SEP.join(self.describer.display(i) for i in history[-self.max_history:])

    # one sample per call; `history` is what precedes `target` in the user's sequence
    def seqrec(self, history, target, rng) -> Sample:
        prompt = rng.choice(self.prompts.seqrec).format(history=self._history(history))
        return Sample("seqrec", prompt, self.code_text[target], target)

    def item2index(self, idx, rng) -> Sample:
        item = self.items[idx]
        genres = _join([g for g in item.get("genres") or [] if g != "unknown"]) or ""
        if genres and rng.random() < 0.5:
            template = rng.choice(self.prompts.item2index_detailed)
            prompt = template.format(item=self.describer.display(idx), genres=genres)
        else:
            prompt = rng.choice(self.prompts.item2index).format(item=self.describer.display(idx))
        return Sample("item2index", prompt, self.code_text[idx], idx)

    def index2item(self, idx, rng) -> Sample:
        prompt = rng.choice(self.prompts.index2item).format(code=self.code_text[idx])
        return Sample("index2item", prompt, self.describer.display(idx), idx)

    def fusionseqrec(self, history, target, rng) -> Sample:
        if rng.random() < 0.5:
            prompt = rng.choice(self.prompts.fusion_codes_to_title).format(history=self._history(history))
            return Sample("fusionseqrec", prompt, self.describer.display(target), target)
        prompt = rng.choice(self.prompts.fusion_titles_to_code).format(history=self._titles(history))
        return Sample("fusionseqrec", prompt, self.code_text[target], target)

    def itemsearch(self, history, target, rng) -> Sample:
        query = self.describer.intention(target, rng, history)
        if history and rng.random() < 0.5:
            template = rng.choice(self.prompts.itemsearch_with_history)
            prompt = template.format(history=self._history(history), query=query)
        else:
            prompt = rng.choice(self.prompts.itemsearch).format(query=query)
        return Sample("itemsearch", prompt, self.code_text[target], target)

    def preferenceobtain(self, history, target, rng) -> Sample:
        full = list(history) + [target]
        prompt = rng.choice(self.prompts.preference).format(history=self._history(full))
        return Sample("preferenceobtain", prompt, self.describer.preference(full, rng))

    def chat(self, history, target, rng) -> Sample:
        kind = rng.random()
        if kind < 0.4 or not history:
            query = self.describer.intention(target, rng, history) if kind < 0.4 else ""
            prompt = self.request_prompt(self.codes_of(history) if kind >= 0.2 else (), query)
        else:
            prompt = self.request_prompt(self.codes_of(history))
        return Sample("chat", prompt, self.code_text[target], target)

    def seqrec_dense(self, history, target, rng) -> Sample:
        """Train form: the whole window is the response; each item's code is predicted from the ones before."""
        window = list(history[-self.max_history:]) + [target]
        return Sample("seqrec_dense", self.prompts.dense, HISTORY_SEP.join(self.codes_of(window)), target,
                      items=tuple(window))

    def dense_continuation(self, history, target: int = -1) -> Sample:
        """Inference/held-out form: the history is given as the start of the answer, only the next item is learned."""
        prefix = "".join(c + HISTORY_SEP for c in self.codes_of(history))
        return Sample("seqrec_dense", self.prompts.dense, self.code_text[target] if target >= 0 else "", target, prefix,
                      items=tuple(history[-self.max_history:]))

    def build(self, sequences: Sequence[Sequence[int]], budget: dict[str, int], seed: int) -> list[Sample]:
        """`budget[task]` samples per task from training sequences (every prefix is a candidate)."""
        unknown = set(budget) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) in task_budget: {sorted(unknown)}; known: {list(TASKS)}")
        rng = random.Random(seed)
        positions = [(u, t) for u, seq in enumerate(sequences) for t in range(1, len(seq))]
        if not positions:
            raise ValueError("no training sequence has two or more items; nothing to learn from")
        samples: list[Sample] = []
        for task, n in budget.items():
            if n <= 0:
                continue
            if task in ("item2index", "index2item"):
                idxs = [rng.randrange(len(self.items)) for _ in range(n)] if n > len(self.items) else \
                    rng.sample(range(len(self.items)), n)
                samples += [getattr(self, task)(i, rng) for i in idxs]
                continue
            if task == "seqrec_dense":   # windows ending every max_history/2 items, so each item is a target once
                stride = max(1, self.max_history // 2)
                ends = [(u, t) for u, seq in enumerate(sequences)
                        for t in range(len(seq) - 1, 0, -stride)]
                chosen = rng.sample(ends, n) if n <= len(ends) else ends
                samples += [self.seqrec_dense(sequences[u][max(0, t - self.max_history):t], sequences[u][t], rng)
                            for u, t in chosen]
                continue
            for u, t in rng.sample(positions, n) if n <= len(positions) else rng.choices(positions, k=n):
                seq = sequences[u]
                samples.append(getattr(self, task)(seq[max(0, t - self.max_history):t], seq[t], rng))
        rng.shuffle(samples)
        return samples

    def drop_window_items(self, samples: Sequence[Sample], share: float, seed: int) -> tuple[list[Sample], int]:
        """The samples with each item of every dense window removed with probability `share` (a window left with
        fewer than two items is kept whole; other tasks untouched); returns (samples, items removed).

        Why (train.window_dropout): the phases pass over the same users' windows many times, and the LLM learns
        them: its loss on training windows falls far under its teacher's while test, whose history ends with an
        item it never read, stays above it (model card). A window with items taken out is a sequence the model
        has not read, so it has to predict from what the items say rather than from where the window is.
        The rewritten window is an ordinary dense sample: its collaborative states and soft targets are computed
        on the items it keeps."""
        if not 0.0 <= share < 1.0:
            raise ValueError(f"train.window_dropout is a share of a window's items, in [0, 1): {share}")
        out = list(samples)
        if share == 0:
            return out, 0
        rng = random.Random(f"window_dropout:{seed}")   # not the stream `build` drew the windows with
        removed = 0
        for i, sample in enumerate(samples):
            if sample.task != "seqrec_dense" or not sample.items:
                continue
            kept = [item for item in sample.items if rng.random() >= share]
            if len(kept) < 2 or len(kept) == len(sample.items):
                continue
            out[i] = self.seqrec_dense(kept[:-1], kept[-1], rng)
            removed += len(sample.items) - len(kept)
        return out, removed

    def heldout(self, histories: Sequence[Sequence[int]], targets: Sequence[int], task: str,
                seed: int) -> list[Sample]:
        """Samples whose answers are held-out targets (valid/test): for validation loss and itemsearch eval."""
        rng = random.Random(seed)
        if task == "seqrec_dense":
            return [self.dense_continuation(h, t) for h, t in zip(histories, targets)]
        if task in ("item2index", "index2item"):   # item tasks have no held-out part: a fixed probe of items
            return [getattr(self, task)(t, rng) for t in targets]
        return [getattr(self, task)(h, t, rng) for h, t in zip(histories, targets)]


def chat_prompt(tokenizer, user_message: str) -> str:
    """The full prompt text up to where the assistant's answer starts, in the backbone's chat format."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_message}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"### Instruction:\n{user_message}\n\n### Response:\n"


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn (ChatML: '<|im_end|>'), found by rendering a probe turn."""
    if getattr(tokenizer, "chat_template", None):
        probe = "PROBE-ANSWER"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], tokenize=False)
        tail = text.split(probe, 1)[1].strip()
        if tail:
            return tail
    return tokenizer.eos_token or ""


def render(tokenizer, sample: Sample) -> tuple[str, str]:
    """(context text, supervised text) of a sample: the trainer learns only the second part."""
    return chat_prompt(tokenizer, sample.prompt) + sample.prefix, sample.response + end_of_turn(tokenizer)


def intention_queries(describer: Describer, targets: Sequence[int], seed: int) -> list[str]:
    """One intention per held-out target, built only from that target (no other user data)."""
    rng = random.Random(seed)
    return [describer.intention(t, rng) for t in targets]
