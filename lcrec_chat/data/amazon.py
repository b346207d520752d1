"""Amazon reviews 2018 (and 2014) raw files, cleaned the way LC-Rec prepared its datasets.

Interactions come from the ratings-only CSV (`CATEGORY.csv`: item,user,rating,timestamp, no
header) or from review JSON lines (`CATEGORY.json[.gz]`, `CATEGORY_5.json[.gz]`: reviewerID,
asin, unixReviewTime); item text from `meta_CATEGORY.json[.gz]` JSON lines (asin, title,
description, brand, category). Steps, each counted in `Dataset.skipped`:
  1. meta: HTML unescaped, tags stripped, whitespace collapsed; items whose title is empty or
     page-script junk are dropped; a repeated asin keeps its first line; a line that is neither
     JSON nor a Python literal dict (2014 files) is skipped;
  2. interactions with items that have no usable meta are dropped;
  3. each user's interactions are sorted by the integer time (stable: ties keep file order) and a
     repeated user-item pair keeps its first occurrence;
  4. iterative k-core on users and items (`min_interactions`).
The catalogue is the surviving items in meta-file order.
"""
from __future__ import annotations

import ast
import html
import json
import logging
import re
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path

from .dataset import DataError, Dataset, Item
from .domain import PRODUCT
from .filters import first_users, k_core
from .textio import iter_lines

log = logging.getLogger(__name__)

INTERACTION_FILES = ("{c}.csv", "{c}.csv.gz", "{c}.json.gz", "{c}.json", "{c}_5.json.gz", "{c}_5.json",
                     "reviews_{c}.json.gz", "reviews_{c}_5.json.gz")
META_FILES = ("meta_{c}.json.gz", "meta_{c}.json")
# Page-script fragments that the 2018 crawl left in place of some titles.
_JUNK_MARKERS = ("getTime()", "aPageStart", "ue_csm", "function(")
_MAX_TITLE_CHARS = 2000  # LC-Rec treats longer "titles" as junk too
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")

MALFORMED_META = "meta line that is neither JSON nor a Python dict"
META_NO_ASIN = "meta line without asin"
META_REPEAT = "meta line repeating an asin"
NO_TITLE = "item without a usable title"
NO_META = "interaction with an item without usable meta"
REPEAT = "repeated user-item interaction"
K_CORE = "interaction removed by k-core filtering"


def load_amazon(folder: str | Path, category: str, min_interactions: int = 5,
                max_users: int = 0) -> Dataset:
    """Load one Amazon category from `folder`, e.g. category="Musical_Instruments"."""
    folder = Path(folder)
    inter_path = _find(folder, category, INTERACTION_FILES, "interaction (ratings or reviews)")
    meta_path = _find(folder, category, META_FILES, "meta")
    skipped: dict[str, int] = {}
    meta = _read_meta(meta_path, skipped)
    by_user: dict[str, list[tuple[int, str]]] = {}
    no_meta = 0
    for user, asin, stamp in _read_interactions(inter_path):
        if asin in meta:
            by_user.setdefault(user, []).append((stamp, asin))
        else:
            no_meta += 1
    skipped[NO_META] = no_meta
    sequences, skipped[REPEAT] = _ordered_without_repeats(by_user)
    sequences, skipped[K_CORE] = k_core(sequences, min_interactions)
    if not sequences:
        raise DataError(f"{inter_path}: no user left after joining with {meta_path.name} and "
                        f"{min_interactions}-core filtering (skipped: {skipped})")
    used = {asin for seq in sequences.values() for asin in seq}
    items = [item for asin, item in meta.items() if asin in used]
    index = {item.id: n for n, item in enumerate(items)}
    dataset = Dataset(name=category, items=items,
                      sequences={u: [index[a] for a in seq] for u, seq in sequences.items()},
                      skipped={reason: n for reason, n in skipped.items() if n}, domain=PRODUCT.name)
    log.info("%s: %d users, %d items, %d interactions; skipped %s", category, len(sequences),
             len(items), dataset.num_interactions, dataset.skipped)
    return first_users(dataset, max_users)


def clean_text(value: object) -> str:
    """HTML-unescaped, tag-free, single-spaced text; a list of strings is joined with spaces."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(filter(None, (clean_text(v) for v in value)))
    text = _TAG.sub(" ", html.unescape(str(value)))
    return _SPACE.sub(" ", text).strip()


def _find(folder: Path, category: str, patterns: tuple[str, ...], what: str) -> Path:
    candidates = [folder / p.format(c=category) for p in patterns]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"no {what} file for '{category}' in {folder}; looked for "
                    + ", ".join(p.name for p in candidates))


def _read_meta(path: Path, skipped: dict[str, int]) -> dict[str, Item]:
    meta: dict[str, Item | None] = {}
    counts = dict.fromkeys((MALFORMED_META, META_NO_ASIN, META_REPEAT, NO_TITLE), 0)
    lines = 0
    for lineno, line in iter_lines(path, progress=path.name):
        if not line.strip():
            continue
        lines += 1
        record = _parse_record(line)
        if record is None:
            if not counts[MALFORMED_META]:
                log.warning("%s: line %d is not a JSON or Python dict; skipping such lines (counted)",
                            path, lineno)
            counts[MALFORMED_META] += 1
            continue
        asin = str(record.get("asin") or "").strip()
        if not asin:
            counts[META_NO_ASIN] += 1
        elif asin in meta:
            counts[META_REPEAT] += 1
        else:
            item = _item(asin, record)
            if item is None:
                counts[NO_TITLE] += 1
                meta[asin] = None  # remembered, so a later repeat still counts as a repeat
            else:
                meta[asin] = item
    if lines == 0:
        raise DataError(f"{path}: file is empty")
    skipped.update(counts)
    usable = {asin: item for asin, item in meta.items() if item is not None}
    if not usable:
        raise DataError(f"{path}: no item has a usable title (counts: {counts})")
    return usable


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        try:  # the 2014 dumps are Python literals: single quotes, True/False
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return record if isinstance(record, dict) else None


def _item(asin: str, record: dict) -> Item | None:
    raw_title = record.get("title")
    title = clean_text(raw_title)
    if (not title or len(title) > _MAX_TITLE_CHARS
            or any(marker in str(raw_title) for marker in _JUNK_MARKERS)):
        return None
    return Item(id=asin, title=title, description=clean_text(record.get("description")),
                brand=clean_text(record.get("brand")).removeprefix("by ").strip(),
                genres=_categories(record))


def _categories(record: dict) -> list[str]:
    """2018 `category` is a list of strings, 2014 `categories` a list of lists; the 2018 crawl
    sometimes appends HTML fragments after the real path, so stop at the first tag."""
    raw = record.get("category") or record.get("categories") or []
    if raw and isinstance(raw[0], list):
        raw = raw[0]
    out: list[str] = []
    for value in raw if isinstance(raw, list) else [raw]:
        if not isinstance(value, str) or "<" in value:
            break
        text = clean_text(value)
        if text and text not in out:
            out.append(text)
    return out


def _read_interactions(path: Path) -> Iterator[tuple[str, str, int]]:
    """Yield (user, asin, integer time) from a ratings CSV or review JSON lines."""
    is_csv = path.name.endswith((".csv", ".csv.gz"))
    for lineno, line in iter_lines(path, progress=path.name):
        if not line.strip():
            continue
        if is_csv:
            fields = line.split(",")
            if len(fields) != 4:
                raise DataError(f"{path}: line {lineno}: expected item,user,rating,timestamp "
                                f"(4 comma-separated fields), got {len(fields)}")
            asin, user, _, stamp = fields
        else:
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e}); truncated file?") from e
            missing = [k for k in ("reviewerID", "asin", "unixReviewTime")
                       if not isinstance(record, dict) or k not in record]
            if missing:
                raise DataError(f"{path}: line {lineno}: missing {', '.join(missing)}")
            user, asin, stamp = record["reviewerID"], record["asin"], record["unixReviewTime"]
        try:
            stamp = int(stamp)
        except (TypeError, ValueError):
            raise DataError(f"{path}: line {lineno}: time {stamp!r} is not an integer") from None
        if not user or not asin:
            raise DataError(f"{path}: line {lineno}: empty user or item id")
        yield str(user), str(asin), stamp


def _ordered_without_repeats(by_user: dict[str, list[tuple[int, str]]]) -> tuple[dict[str, list[str]], int]:
    """Sort each user's (time, asin) stably by time, keep the first of repeated asins."""
    sequences: dict[str, list[str]] = {}
    repeats = 0
    for user, rows in by_user.items():
        seen: set[str] = set()
        seq = []
        for _, asin in sorted(rows, key=itemgetter(0)):
            if asin in seen:
                repeats += 1
            else:
                seen.add(asin)
                seq.append(asin)
        sequences[user] = seq
    return sequences, repeats
