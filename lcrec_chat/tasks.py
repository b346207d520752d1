"""The six LC-Rec alignment tasks, plus the chat app's own request formats.

Every sample is a (user message, assistant response) pair; the trainer puts the loss on the response only.
The chat app builds its requests with `request_prompt`, the same code that builds the `chat` task's samples,
so what the app sends is exactly what the model was tuned on.

MovieLens has no reviews or descriptions, so intentions and preference summaries are composed from what
the data holds: genres, decades, popularity and the user's own history (see `Describer`).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

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


# ---------------------------------------------------------------------------------------------------------
# Instruction templates: written for this project, one drawn at random per sample.
# {history} is a list of item codes (or titles), {item} one item, {code} one item code.

SEQREC = [
    "Here is what a user has watched, oldest first: {history}. Which movie will they watch next?",
    "A viewer's history, in order: {history}. Predict the next movie they will choose.",
    "Given this sequence of movies a person watched: {history}, recommend the next one.",
    "The user recently watched {history}. What should they watch next?",
    "Based on the viewing history {history}, which movie comes next?",
    "These are the movies someone watched, one after another: {history}. Suggest their next movie.",
    "History of a user: {history}. Recommend one movie for them to watch next.",
    "I have watched {history}, in that order. What would I most likely watch next?",
    "Using the interaction history {history}, generate the index of the next movie.",
]
ITEM2INDEX = [
    'What is the index of the movie "{item}"?',
    'Give the item index of "{item}".',
    'Which index stands for the movie "{item}"?',
    'Tell me the code of "{item}".',
    'Translate the movie "{item}" into its item index.',
    'The movie "{item}" is written with which index?',
    'I mean "{item}". What is its index?',
    'Find the index for this movie: "{item}".',
]
ITEM2INDEX_DETAILED = [
    'What is the index of the {genres} movie "{item}"?',
    'A {genres} movie called "{item}": which index does it have?',
    'Give the item index of "{item}", a {genres} movie.',
    'Which index corresponds to "{item}" ({genres})?',
    'Find the index of the movie "{item}". Genres: {genres}.',
    'Encode "{item}", a {genres} title, as an item index.',
    'The {genres} film "{item}" has which item index?',
    'Item: "{item}"; genres: {genres}. What is its index?',
]
INDEX2ITEM = [
    "Which movie has the index {code}?",
    "What is the title of item {code}?",
    "Tell me the movie behind the index {code}.",
    "Decode the item index {code} into a movie title.",
    "Item {code}: what movie is it?",
    "Name the movie whose index is {code}.",
    "{code} is the index of which movie?",
    "Give the title and year of the movie {code}.",
]
FUSION_CODES_TO_TITLE = [
    "A user watched {history}, in that order. What is the title of the next movie they will watch?",
    "Given the history {history}, name the next movie the user will watch.",
    "Here are a viewer's movies, oldest first: {history}. Write the title of the movie they watch next.",
    "Viewing history: {history}. Which movie title comes next?",
    "After watching {history}, which movie will this person pick? Answer with its title.",
    "Predict the title of the next movie for a user who watched {history}.",
    "The sequence {history} describes what someone watched. Give the title of their next movie.",
    "Someone has seen {history}. What movie, by title, should come next?",
]
FUSION_TITLES_TO_CODE = [
    "A user watched these movies in order: {history}. Give the index of the next movie.",
    "Viewing history by title: {history}. Which item index comes next?",
    "Someone watched {history}. Predict the index of their next movie.",
    "Here are movie titles a person watched, oldest first: {history}. Recommend the next one as an index.",
    "Given the titles {history}, generate the index of the movie the user watches next.",
    "I watched {history}. What should I watch next? Answer with an item index.",
    "History (titles): {history}. Next item index?",
    "The user's recent movies were {history}. Which movie index will they choose next?",
]
ITEMSEARCH = [
    "{query}",
    "A user asks: \"{query}\" Which movie fits?",
    "Find a movie for this request: {query}",
    "Search the catalogue for: {query}",
    "Here is what someone wants to watch: {query} Recommend one movie.",
    "Request: {query} Give the index of a matching movie.",
    "Which movie matches this wish? {query}",
    "Help me find something. {query}",
]
ITEMSEARCH_WITH_HISTORY = [
    "A user who watched {history} says: \"{query}\" Which movie should they watch?",
    "History: {history}. The user now asks: {query} Recommend one movie.",
    "Someone has watched {history}. Their request: \"{query}\" Find the right movie.",
    "Given the viewing history {history} and the wish \"{query}\", pick the next movie.",
    "I watched {history}. {query}",
    "Past movies: {history}. Current request: {query} Answer with a movie index.",
    "Considering {history}, find a movie for this request: {query}",
    "The user watched {history} and now wants this: {query} Which movie?",
]
PREFERENCE = [
    "A user watched {history}. Describe their taste in movies.",
    "Summarise the preferences of someone whose history is {history}.",
    "What kind of movies does a person who watched {history} like?",
    "From the viewing history {history}, write a short profile of the user's taste.",
    "Here are a user's movies: {history}. What do they enjoy?",
    "Describe the movie preferences shown by this history: {history}.",
    "Based on {history}, what genres and eras does this viewer prefer?",
    "Read this history and say what the viewer likes: {history}.",
]

# Dense seqrec: the assistant lists a user's items in order, so one pass supervises the next item at every
# position of the history (like SASRec's training), instead of one target per 150-token prompt.
DENSE_PROMPT = "List the movies this user watched, in order."

# The chat app's requests: one fixed wording each, so app and training agree token for token.
CHAT_HISTORY = "I liked these movies: {history}. Recommend a movie for me."
CHAT_QUERY = "Recommend a movie. My request: \"{query}\""
CHAT_BOTH = "I liked these movies: {history}. Recommend a movie. My request: \"{query}\""


def request_prompt(history_codes: Sequence[str] = (), query: str = "") -> str:
    """The user message the chat app and `recommend()` send: history alone, query alone, or both."""
    history = HISTORY_SEP.join(history_codes)
    if history and query:
        return CHAT_BOTH.format(history=history, query=query)
    if history:
        return CHAT_HISTORY.format(history=history)
    if query:
        return CHAT_QUERY.format(query=query)
    raise ValueError("a request needs a history, a query, or both")


# ---------------------------------------------------------------------------------------------------------
# Intentions and preference summaries composed from catalogue facts.

GENRE_ADJECTIVE = {
    "Comedy": "funny", "Horror": "scary", "Romance": "romantic", "Action": "action-packed",
    "Thriller": "suspenseful", "Animation": "animated", "Children's": "family-friendly",
    "Sci-Fi": "sci-fi", "Fantasy": "fantasy", "Musical": "musical", "Mystery": "mysterious",
    "War": "war", "Western": "western", "Crime": "crime", "Adventure": "adventurous", "Drama": "dramatic",
    "Film-Noir": "noir", "Documentary": "documentary",
}
GENRE_NOUN = {
    "Comedy": "comedy", "Drama": "drama", "Thriller": "thriller", "Horror": "horror movie",
    "Sci-Fi": "science-fiction movie", "Western": "western", "War": "war movie", "Musical": "musical",
    "Film-Noir": "film noir", "Mystery": "mystery", "Crime": "crime movie", "Documentary": "documentary",
    "Animation": "animated movie", "Children's": "children's movie", "Fantasy": "fantasy movie",
    "Adventure": "adventure movie", "Romance": "romance", "Action": "action movie",
}
OCCASION = {
    "Children's": "for a family night", "Animation": "to watch with the kids", "Romance": "for a date night",
    "Horror": "for a Halloween night", "Comedy": "to cheer me up", "Action": "for a Friday night with friends",
    "Thriller": "that keeps me on the edge of my seat", "Drama": "for a quiet evening",
}
INTENTION_FORMS = [
    "I'm looking for {phrase}.",
    "Can you suggest {phrase}?",
    "Recommend {phrase}.",
    "I want to watch {phrase} tonight.",
    "Any ideas for {phrase}?",
    "I'm in the mood for {phrase}.",
    "Find me {phrase}, please.",
    "What's {phrase} I could watch?",
]


def decade_of(year: int | None) -> str:
    if not year:
        return ""
    decade = year // 10 * 10
    return f"{decade % 100:02d}s" if 1950 <= decade < 2000 else f"{decade}s"


def article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


class Describer:
    """Turns items and histories into intentions and preference summaries, using catalogue facts only."""

    def __init__(self, items: Sequence[dict], popularity: Sequence[int]):
        self.items = items
        ranked = sorted(range(len(items)), key=lambda i: -popularity[i])
        self.pop_rank = {idx: r / max(1, len(items)) for r, idx in enumerate(ranked)}

    def display(self, idx: int) -> str:
        item = self.items[idx]
        return f"{item['title']} ({item['year']})" if item.get("year") else item["title"]

    def intention(self, idx: int, rng: random.Random, history: Sequence[int] = ()) -> str:
        """A request the target item satisfies, e.g. 'Can you suggest a funny 90s movie for a family night?'"""
        item = self.items[idx]
        genres = [g for g in item.get("genres") or [] if g in GENRE_NOUN] or list(item.get("genres") or [])
        similar = [h for h in history if set(self.items[h].get("genres") or []) & set(genres)]
        if similar and rng.random() < 0.25:
            other = self.display(rng.choice(similar))
            twist = rng.choice(["", " but a bit different", " from another era", " that I haven't seen"])
            return rng.choice(["Something like {x}{t}.", "More movies like {x}{t}, please.",
                               "I enjoyed {x}. Anything similar{t}?"]).format(x=other, t=twist)
        words = []
        if len(genres) > 1 and rng.random() < 0.6:
            words.append(GENRE_ADJECTIVE.get(genres[0], genres[0].lower()))
        decade = decade_of(item.get("year"))
        if decade and rng.random() < 0.7:
            words.append(decade)
        main = genres[-1] if genres else ""
        noun = GENRE_NOUN.get(main, f"{main.lower()} movie" if main else "movie")
        phrase = " ".join(words + [noun])
        rank = self.pop_rank.get(idx, 0.5)
        if rank < 0.1 and rng.random() < 0.5:
            phrase = rng.choice(["well-known ", "popular ", "classic "]) + phrase
        elif rank > 0.6 and rng.random() < 0.5:
            phrase = rng.choice(["lesser-known ", "little-known ", "hidden-gem "]) + phrase
        phrase = article(phrase)
        occasion = next((OCCASION[g] for g in genres if g in OCCASION), "")
        if occasion and rng.random() < 0.4:
            phrase += " " + occasion
        return rng.choice(INTENTION_FORMS).format(phrase=phrase)

    def preference(self, history: Sequence[int], rng: random.Random) -> str:
        """A short summary of the taste a history shows."""
        genres = Counter(g for h in history for g in (self.items[h].get("genres") or []) if g != "unknown")
        top = [GENRE_NOUN.get(g, g.lower()) for g, _ in genres.most_common(3)]
        decades = Counter(decade_of(self.items[h].get("year")) for h in history if self.items[h].get("year"))
        era = decades.most_common(1)[0][0] if decades else ""
        mainstream = sum(self.pop_rank.get(h, 0.5) < 0.2 for h in history) / max(1, len(history))
        taste = "popular, well-known titles" if mainstream > 0.5 else "a mix of hits and lesser-known titles"
        favourites = " and ".join(self.display(h) for h in list(history)[-2:])
        genre_text = _join(top) if top else "many kinds of movies"
        forms = [
            "This user mostly watches {g}, mainly from the {e}, and leans towards {t}. Recent favourites: {f}.",
            "They enjoy {g}; most of their movies are from the {e} and they like {t}. Lately: {f}.",
            "A fan of {g}, especially {e} movies, who picks {t}. They recently watched {f}.",
            "Their taste: {g}, with a soft spot for the {e}, and {t}. Recently: {f}.",
        ]
        if not era:
            return f"This user mostly watches {genre_text} and picks {taste}. Recent favourites: {favourites}."
        return rng.choice(forms).format(g=genre_text, e=era, t=taste, f=favourites)


def _join(words: Sequence[str]) -> str:
    if not words:
        return ""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ---------------------------------------------------------------------------------------------------------
# Sample builders.

class TaskBuilder:
    """Draws samples of every task from the training part of a split (targets of valid/test never used)."""

    def __init__(self, items: Sequence[dict], codes: Sequence[Sequence[int]], popularity: Sequence[int],
                 max_history: int = 20):
        self.items = items
        self.code_text = [code_tokens(c) for c in codes]
        self.describer = Describer(items, popularity)
        self.max_history = max_history

    def codes_of(self, history: Sequence[int]) -> list[str]:
        return [self.code_text[i] for i in history[-self.max_history:]]

    def _history(self, history: Sequence[int]) -> str:
        return HISTORY_SEP.join(self.codes_of(history))

    def _titles(self, history: Sequence[int]) -> str:
        return HISTORY_SEP.join(self.describer.display(i) for i in history[-self.max_history:])

    # one sample per call; `history` is what precedes `target` in the user's sequence
    def seqrec(self, history, target, rng) -> Sample:
        prompt = rng.choice(SEQREC).format(history=self._history(history))
        return Sample("seqrec", prompt, self.code_text[target], target)

    def item2index(self, idx, rng) -> Sample:
        item = self.items[idx]
        genres = _join([g for g in item.get("genres") or [] if g != "unknown"]) or ""
        if genres and rng.random() < 0.5:
            prompt = rng.choice(ITEM2INDEX_DETAILED).format(item=self.describer.display(idx), genres=genres)
        else:
            prompt = rng.choice(ITEM2INDEX).format(item=self.describer.display(idx))
        return Sample("item2index", prompt, self.code_text[idx], idx)

    def index2item(self, idx, rng) -> Sample:
        prompt = rng.choice(INDEX2ITEM).format(code=self.code_text[idx])
        return Sample("index2item", prompt, self.describer.display(idx), idx)

    def fusionseqrec(self, history, target, rng) -> Sample:
        if rng.random() < 0.5:
            prompt = rng.choice(FUSION_CODES_TO_TITLE).format(history=self._history(history))
            return Sample("fusionseqrec", prompt, self.describer.display(target), target)
        prompt = rng.choice(FUSION_TITLES_TO_CODE).format(history=self._titles(history))
        return Sample("fusionseqrec", prompt, self.code_text[target], target)

    def itemsearch(self, history, target, rng) -> Sample:
        query = self.describer.intention(target, rng, history)
        if history and rng.random() < 0.5:
            prompt = rng.choice(ITEMSEARCH_WITH_HISTORY).format(history=self._history(history), query=query)
        else:
            prompt = rng.choice(ITEMSEARCH).format(query=query)
        return Sample("itemsearch", prompt, self.code_text[target], target)

    def preferenceobtain(self, history, target, rng) -> Sample:
        full = list(history) + [target]
        prompt = rng.choice(PREFERENCE).format(history=self._history(full))
        return Sample("preferenceobtain", prompt, self.describer.preference(full, rng))

    def chat(self, history, target, rng) -> Sample:
        kind = rng.random()
        if kind < 0.4 or not history:
            query = self.describer.intention(target, rng, history) if kind < 0.4 else ""
            prompt = request_prompt(self.codes_of(history) if kind >= 0.2 else (), query)
        else:
            prompt = request_prompt(self.codes_of(history))
        return Sample("chat", prompt, self.code_text[target], target)

    def seqrec_dense(self, history, target, rng) -> Sample:
        """Train form: the whole window is the response; each item's code is predicted from the ones before."""
        window = list(history[-self.max_history:]) + [target]
        return Sample("seqrec_dense", DENSE_PROMPT, HISTORY_SEP.join(self.codes_of(window)), target)

    def dense_continuation(self, history, target: int = -1) -> Sample:
        """Inference/held-out form: the history is given as the start of the answer, only the next item is learned."""
        prefix = "".join(c + HISTORY_SEP for c in self.codes_of(history))
        return Sample("seqrec_dense", DENSE_PROMPT, self.code_text[target] if target >= 0 else "", target, prefix)

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
