"""LC-Rec's processed datasets: NAME.inter.json, NAME.item.json (and optionally NAME.index.json).

`NAME.inter.json` maps a user id to that user's item ids in time order (already deduplicated
and k-core filtered by LC-Rec's own preprocessing); `NAME.item.json` maps an item id to
{title, description, brand, categories}. Item ids are integers written as strings; the
catalogue is sorted by that integer, so an item's index here equals its id in LC-Rec's files
(and in their released NAME.index.json code files) whenever the ids are 0..N-1.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .dataset import DataError, Dataset, Item
from .domain import PRODUCT
from .filters import first_users
from .textio import read_json

log = logging.getLogger(__name__)
UNKNOWN_ITEM = "interaction with an item id missing from NAME.item.json"
EMPTY_USER = "user with an empty sequence"


def load_lcrec(folder: str | Path, name: str, max_users: int = 0) -> Dataset:
    """Read LC-Rec's `folder/NAME.*.json` files; `max_users > 0` keeps the first N users."""
    folder = Path(folder)
    items, index = _read_items(folder / f"{name}.item.json")
    sequences, skipped = _read_sequences(folder / f"{name}.inter.json", index)
    _check_codes(folder / f"{name}.index.json", index)
    # LC-Rec's processed datasets are Amazon review categories: products people bought
    dataset = Dataset(name=name, items=items, sequences=sequences, skipped=skipped, domain=PRODUCT.name)
    log.info("%s: %d users, %d items, %d interactions from %s", name, len(sequences), len(items),
             dataset.num_interactions, folder)
    return first_users(dataset, max_users)


def _read_items(path: Path) -> tuple[list[Item], dict[str, int]]:
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON object {{item id: {{title, ...}}}}")
    keys = list(raw)
    if all(k.isdigit() for k in keys):
        keys.sort(key=int)
    items: list[Item] = []
    for key in keys:
        fields = raw[key]
        if not isinstance(fields, dict):
            raise DataError(f"{path}: item {key!r}: expected an object, got {type(fields).__name__}")
        title = _text(fields.get("title"), path, key, "title")
        if not title:
            raise DataError(f"{path}: item {key!r}: missing or empty 'title'")
        categories = fields.get("categories", "")
        if isinstance(categories, str):  # LC-Rec writes them comma-joined
            categories = categories.split(",")
        items.append(Item(
            id=key,
            title=title,
            description=_text(fields.get("description"), path, key, "description"),
            brand=_text(fields.get("brand"), path, key, "brand"),
            genres=[c.strip() for c in categories if isinstance(c, str) and c.strip()],
        ))
    return items, {item.id: n for n, item in enumerate(items)}


def _read_sequences(path: Path, index: dict[str, int]) -> tuple[dict[str, list[int]], dict[str, int]]:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object {{user id: [item ids]}}")
    sequences: dict[str, list[int]] = {}
    skipped = {UNKNOWN_ITEM: 0, EMPTY_USER: 0}
    for user, ids in raw.items():
        if not isinstance(ids, list):
            raise DataError(f"{path}: user {user!r}: expected a list of item ids")
        seq = []
        for item_id in ids:
            if isinstance(item_id, bool) or not isinstance(item_id, (int, str)):
                raise DataError(f"{path}: user {user!r}: item id {item_id!r} is not an int or string")
            item = index.get(str(item_id))
            if item is None:
                skipped[UNKNOWN_ITEM] += 1
            else:
                seq.append(item)
        if seq:
            sequences[user] = seq
        else:
            skipped[EMPTY_USER] += 1
    if not sequences:
        raise DataError(f"{path}: no user has an interaction with a known item")
    skipped = {reason: n for reason, n in skipped.items() if n}
    if skipped:
        log.warning("%s: skipped %s", path, skipped)
    return sequences, skipped


def _check_codes(path: Path, index: dict[str, int]) -> None:
    """LC-Rec's code file is not used (codes are learned here), but one for other items is a mix-up."""
    if not path.exists():
        return
    codes = read_json(path)
    if not isinstance(codes, dict):
        raise DataError(f"{path}: expected a JSON object {{item id: [code tokens]}}")
    strangers = [k for k in codes if k not in index]
    if strangers:
        raise DataError(f"{path}: {len(strangers)} item ids not in the item file, e.g. {strangers[0]!r}")


def _text(value: object, path: Path, key: str, name: str) -> str:
    """A string field; LC-Rec sometimes keeps a list of strings (descriptions)."""
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(v.strip() for v in value if v.strip())
    if not isinstance(value, str):
        raise DataError(f"{path}: item {key!r}: '{name}' should be text, got {type(value).__name__}")
    return value.strip()
