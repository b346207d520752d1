"""The one in-memory shape every source loader produces."""
from __future__ import annotations

from dataclasses import dataclass, field

from .domain import MOVIE


class DataError(ValueError):
    """Bad input data; the message names the file and, where known, the line."""


@dataclass
class Item:
    id: str                      # the source's item id (a string, whatever the source uses)
    title: str
    year: int | None = None
    genres: list[str] = field(default_factory=list)   # genres (MovieLens) or categories (Amazon)
    description: str = ""
    brand: str = ""


@dataclass
class Dataset:
    name: str
    items: list[Item]                        # catalogue order; an item's position is its integer index
    sequences: dict[str, list[int]]          # user id -> item indices, sorted by time (stable)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count of input rows dropped
    domain: str = MOVIE.name                 # what the items are (data.domain.DOMAINS): the words of the prompts

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences.values())

    def stats(self) -> dict:
        users, items, inter = len(self.sequences), len(self.items), self.num_interactions
        return {
            "dataset": self.name,
            "domain": self.domain,
            "users": users,
            "items": items,
            "interactions": inter,
            "avg_sequence_length": round(inter / users, 2) if users else 0.0,
            "sparsity": round(1 - inter / (users * items), 6) if users and items else 1.0,
            "skipped": dict(self.skipped),
        }
