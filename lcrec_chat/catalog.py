"""The item catalogue: one SQLite file (through sqlite-utils) that every later stage and the chat read.

Tables
  items  idx INTEGER PRIMARY KEY (= position in Dataset.items), item_id, title, year, genres ("|"-joined),
         description, brand, popularity (interactions), code ("12 3 200 7", NULL until indexing ran)
  items_fts  FTS5 over title, genres, description (porter stemming, accents folded)
  meta   key -> value: dataset name, number of items, schema version, code levels, item domain ("movie",
         "product": the words of the prompts); later stages compare these with their own inputs to detect an
         artifact from another dataset.

User text never becomes SQL: values are always bound parameters, FTS queries are built from quoted
tokens only, and column names in ``filter_indices(where=...)`` are checked against the table schema.
Rows are also cached in memory when the file is opened (a few MB even for 20k Amazon items), so
``item()`` and title resolution never touch the disk on the chat's hot path.
"""
from __future__ import annotations

import logging
import numbers
import os
import re
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import sqlite_utils

from lcrec_chat.data.dataset import Dataset
from lcrec_chat.data.domain import domain_named
from lcrec_chat.titles import Match, Resolution, TitleIndex

__all__ = ["Catalog", "CatalogError", "Match", "Resolution"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
# catalogues built before the domain was stored are all MovieLens ones (models/ml-100k ships one): same schema
DEFAULT_DOMAIN = "movie"
FTS_COLUMNS = ["title", "genres", "description"]
FTS_WEIGHTS = (10.0, 2.0, 1.0)           # bm25 weight per FTS column: a title hit counts most
FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"
MAX_SEARCH_TOKENS = 32
MAX_SEARCH_LIMIT = 1000
_STOPWORDS = frozenset("a an and any are as at be by for from i in is it me my of on or some something "
                       "that the this to want with".split())
_ITEM_COLUMNS = {"idx": int, "item_id": str, "title": str, "year": int, "genres": str, "description": str,
                 "brand": str, "popularity": int, "code": str}


class CatalogError(ValueError):
    """A missing or incompatible catalogue file, or a bad argument to a catalogue query."""


class Catalog:
    """Read (and, for codes, update) a catalogue built by :meth:`Catalog.build`.

    Safe to share between the chat's worker threads: the connection is opened with
    ``check_same_thread=False`` and every statement runs under one lock.
    """

    def __init__(self, path: str | Path, fuzzy_cutoff: float = 85.0, ambiguity_ratio: float = 1.5):
        self.path = Path(path)
        if not self.path.is_file():
            raise CatalogError(f"catalogue not found: {self.path} (run the 'prepare' stage to build it)")
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db = sqlite_utils.Database(self._conn)
        try:
            self._rows = self._load()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise CatalogError(f"{self.path}: not an SQLite catalogue ({e})") from e
        except CatalogError:
            self._conn.close()
            raise
        self._columns = set(self._db["items"].columns_dict)
        self._by_item_id = {r["item_id"]: r["idx"] for r in self._rows}
        # the catalogue's own item words decide which history labels ("I watched:", "I bought:") are stripped
        self._titles = TitleIndex(self._rows, fuzzy_cutoff=fuzzy_cutoff, ambiguity_ratio=ambiguity_ratio,
                                  domain=domain_named(self.domain))
        log.info("catalogue %s: %d items of %s", self.path, len(self._rows), self._meta.get("dataset"))

    def _load(self) -> list[dict]:
        """Check the file is a catalogue this code can read; return its rows in idx order."""
        missing = {"items", "items_fts", "meta"} - set(self._db.table_names())
        if missing:
            raise CatalogError(f"{self.path}: not a catalogue, missing tables {sorted(missing)}")
        self._meta = {r["key"]: r["value"] for r in self._db["meta"].rows}
        if self._meta.get("schema_version") != SCHEMA_VERSION:
            raise CatalogError(f"{self.path}: catalogue schema {self._meta.get('schema_version')!r}, this code "
                               f"reads {SCHEMA_VERSION!r}; rebuild it with the 'prepare' stage")
        rows = [self._row_to_item(r) for r in self._db.query("SELECT * FROM items ORDER BY idx")]
        if [r["idx"] for r in rows] != list(range(len(rows))) or str(len(rows)) != self._meta.get("num_items"):
            raise CatalogError(f"{self.path}: items are not numbered 0..{self._meta.get('num_items')}; "
                               "the file is damaged, rebuild it")
        return rows

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, path: str | Path, dataset: Dataset, popularity: list[int] | None = None) -> "Catalog":
        """Write a fresh catalogue for ``dataset`` (replacing any file at ``path``) and open it.

        ``popularity`` defaults to each item's number of interactions in ``dataset.sequences``; pass
        training-split counts instead when popularity must not see the held-out items.
        The file is written beside ``path`` and moved into place, so a crash never leaves half a file.
        """
        path = Path(path)
        items = dataset.items
        if not items:
            raise CatalogError(f"dataset {dataset.name!r} has no items")
        if popularity is None:
            counts = Counter(i for seq in dataset.sequences.values() for i in seq)
            popularity = [counts.get(i, 0) for i in range(len(items))]
        elif len(popularity) != len(items):
            raise CatalogError(f"popularity has {len(popularity)} entries for {len(items)} items")
        for pos, item in enumerate(items):
            bad = [g for g in item.genres if "|" in g]
            if bad:
                raise CatalogError(f"item {pos} ({item.id}): genre {bad[0]!r} contains '|', the separator")

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        db = sqlite_utils.Database(tmp)
        try:
            db["items"].create(_ITEM_COLUMNS, pk="idx", not_null={"title"})
            db["items"].insert_all(
                {"idx": pos, "item_id": str(item.id), "title": item.title, "year": item.year,
                 "genres": "|".join(item.genres), "description": item.description or "",
                 "brand": item.brand or "", "popularity": int(popularity[pos]), "code": None}
                for pos, item in enumerate(items))
            db["items"].enable_fts(FTS_COLUMNS, fts_version="FTS5", tokenize=FTS_TOKENIZER)
            db["meta"].create({"key": str, "value": str}, pk="key")
            db["meta"].insert_all([
                {"key": "schema_version", "value": SCHEMA_VERSION},
                {"key": "dataset", "value": dataset.name},
                {"key": "num_items", "value": str(len(items))},
                {"key": "code_levels", "value": ""},
                {"key": "domain", "value": dataset.domain},
            ])
        finally:
            db.close()
        os.replace(tmp, path)
        log.info("built catalogue %s: %d items", path, len(items))
        return cls(path)

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def meta(self) -> dict[str, str]:
        return dict(self._meta)

    @property
    def dataset_name(self) -> str:
        return self._meta.get("dataset", "")

    @property
    def domain(self) -> str:
        """The name of the items' domain (lcrec_chat.data.domain.DOMAINS), "movie" for older catalogues."""
        return self._meta.get("domain", DEFAULT_DOMAIN)

    def item(self, idx: int) -> dict:
        """One item as a fresh dict (idx, item_id, title, year, genres, description, brand, popularity, code)."""
        if isinstance(idx, bool) or not isinstance(idx, numbers.Integral) or not 0 <= idx < len(self._rows):
            raise IndexError(f"item index {idx!r} out of range 0..{len(self._rows) - 1}")
        row = self._rows[int(idx)]
        return {**row, "genres": list(row["genres"]),
                "code": list(row["code"]) if row["code"] is not None else None}

    def items(self, idxs: list[int]) -> list[dict]:
        return [self.item(i) for i in idxs]

    def index_of(self, item_id: str) -> int | None:
        """The idx of a source item id, or None."""
        return self._by_item_id.get(str(item_id))

    def genres(self) -> list[str]:
        return sorted({g for r in self._rows for g in r["genres"]})

    def years(self) -> tuple[int, int] | None:
        """The first and last year of the catalogue's items (None where no item has one)."""
        known = [r["year"] for r in self._rows if r["year"]]
        return (min(known), max(known)) if known else None

    def codes(self) -> list[list[int]] | None:
        """Every item's code, or None while any item has none (indexing has not run)."""
        if any(r["code"] is None for r in self._rows):
            return None
        return [list(r["code"]) for r in self._rows]

    # -- writing codes --------------------------------------------------------------------------
    def set_codes(self, codes: list[list[int]]) -> None:
        """Store one code per item (position = idx), all of the same length, non-negative integers."""
        codes = list(codes)
        if len(codes) != len(self._rows):
            raise CatalogError(f"got {len(codes)} codes for {len(self._rows)} items")
        clean: list[tuple[int, ...]] = []
        for idx, code in enumerate(codes):
            code = tuple(code)
            if not code or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in code):
                raise CatalogError(f"code of item {idx} must be non-negative integers, got {list(code)!r}")
            if len(code) != len(clean[0] if clean else code):
                raise CatalogError(f"code of item {idx} has {len(code)} levels, item 0 has {len(clean[0])}")
            clean.append(tuple(int(c) for c in code))
        with self._lock, self._conn:
            self._conn.executemany("UPDATE items SET code = ? WHERE idx = ?",
                                   [(" ".join(map(str, c)), idx) for idx, c in enumerate(clean)])
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'code_levels'", (str(len(clean[0])),))
        for row, code in zip(self._rows, clean):
            row["code"] = list(code)
        self._meta["code_levels"] = str(len(clean[0]))

    # -- queries --------------------------------------------------------------------------------
    def search(self, text: str, limit: int = 10) -> list[dict]:
        """Full-text search over title, genres and description; best matches first.

        Words of ``text`` are each quoted and OR-ed (so FTS operators, quotes and ``*`` are plain text),
        ranked by bm25 with title hits weighted highest, then by popularity.
        """
        tokens = re.findall(r"\w+", text.casefold())
        content = [t for t in tokens if t not in _STOPWORDS] or tokens
        content = list(dict.fromkeys(content))[:MAX_SEARCH_TOKENS]
        if not content:
            return []
        limit = max(1, min(int(limit), MAX_SEARCH_LIMIT))
        query = " OR ".join('"' + t.replace('"', '""') + '"' for t in content)
        weights = ", ".join(str(w) for w in FTS_WEIGHTS)
        sql = (f"SELECT items.idx FROM items_fts JOIN items ON items.idx = items_fts.rowid "
               f"WHERE items_fts MATCH ? ORDER BY bm25(items_fts, {weights}), items.popularity DESC LIMIT ?")
        with self._lock:
            idxs = [r[0] for r in self._conn.execute(sql, (query, limit))]
        return self.items(idxs)

    def filter_indices(self, genres: list[str] | None = None, year_min: int | None = None,
                       year_max: int | None = None, where: dict[str, object] | None = None,
                       genres_mode: str = "any") -> set[int]:
        """Indices of the items that pass every given filter.

        genres: item has any of them (``genres_mode="all"``: all of them); names are matched
        case-insensitively and an unknown name is an error (not an empty result).
        year_min/year_max: inclusive; items without a year fail a year filter.
        where: column -> value equality (None = IS NULL; a list/tuple/set = IN); the column must exist.
        """
        clauses: list[str] = []
        params: list[object] = []
        if genres:
            if genres_mode not in ("any", "all"):
                raise CatalogError(f"genres_mode must be 'any' or 'all', got {genres_mode!r}")
            known = {g.casefold(): g for g in self.genres()}
            names = []
            for g in genres:
                if not isinstance(g, str) or g.casefold() not in known:
                    raise CatalogError(f"unknown genre {g!r} (known: {', '.join(sorted(known.values()))})")
                names.append(known[g.casefold()])
            tests = ["instr('|' || genres || '|', ?) > 0"] * len(names)
            clauses.append("(" + (" OR " if genres_mode == "any" else " AND ").join(tests) + ")")
            params += [f"|{n}|" for n in names]
        for name, bound, op in (("year_min", year_min, ">="), ("year_max", year_max, "<=")):
            if bound is not None:
                if isinstance(bound, bool) or not isinstance(bound, numbers.Integral):
                    raise CatalogError(f"{name} must be an integer year, got {bound!r}")
                clauses.append(f"year {op} ?")
                params.append(int(bound))
        for column, value in (where or {}).items():
            if column not in self._columns:
                known = ", ".join(sorted(self._columns))
                raise CatalogError(f"unknown column {column!r} in where (columns: {known})")
            quoted = '"' + column + '"'   # safe: column is one of the schema's own names
            if value is None:
                clauses.append(f"{quoted} IS NULL")
            elif isinstance(value, (list, tuple, set, frozenset)):
                values = list(value)
                clauses.append(f"{quoted} IN ({', '.join('?' * len(values))})" if values else "0")
                params += values
            else:
                clauses.append(f"{quoted} = ?")
                params.append(value)
        sql = "SELECT idx FROM items" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        with self._lock:
            return {r[0] for r in self._conn.execute(sql, params)}

    def resolve_titles(self, text: str, max_pieces: int = 50) -> Resolution:
        """Titles named in free text -> items; see lcrec_chat.titles for the rules (splitting, typos,
        year hints, duplicate titles, when it asks back)."""
        res = self._titles.resolve(text, max_pieces=max_pieces)
        res.ambiguous = [(q, self.items([c["idx"] for c in cands])) for q, cands in res.ambiguous]
        return res

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _row_to_item(row: dict) -> dict:
        return {
            "idx": row["idx"], "item_id": row["item_id"], "title": row["title"], "year": row["year"],
            "genres": row["genres"].split("|") if row["genres"] else [],
            "description": row["description"] or "", "brand": row["brand"] or "",
            "popularity": row["popularity"] or 0,
            "code": [int(c) for c in row["code"].split()] if row["code"] else None,
        }
