"""Every method of a run folder behind the chat engine's one recommend call, chosen by name.

The chat engine (chat.py) asks for "k items for this history and wish, none of these, within these filters". LC-Rec
answers that itself (Recommender.recommend: the wish goes into its prompt, the filters into its trie). The other
methods rank from a history alone, so `RankerService` turns the filters and exclusions into the exclusion list
of the one ranking interface (ranking.Ranker); a request without a history goes to popularity within the
filters, since those methods know nothing about a person they have no items for. CoLLM re-ranks LC-Rec's
candidates (which honour the wish and the filters) by its Yes probability.

`MethodRouter` loads each method on first use (the default one at start-up) and dispatches on the session's
method name (chat.method, `serve --method`, the page's method control).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Callable, Sequence

from .catalog import Catalog
from .config import Config
from .ranking import Ranker
from .recommender import Recommendation

log = logging.getLogger(__name__)

METHOD_LABELS = {"lcrec": "LC-Rec", "sasrec": "SASRec", "cllm4rec": "CLLM4Rec", "collm": "CoLLM (re-ranks LC-Rec)"}
# what each method needs in the run folder, besides the catalogue
NEEDS = {"lcrec": ("adapter",), "sasrec": ("sasrec.pt",), "cllm4rec": ("cllm4rec",),
         "collm": ("collm", "adapter", "sasrec.pt")}


def available_methods(run: str | Path) -> list[str]:
    """The methods whose artifacts are all in the run folder, in METHOD_LABELS order."""
    return [m for m, needs in NEEDS.items() if all((Path(run) / n).exists() for n in needs)]


class RankerService:
    """A Ranker as the chat engine's recommend call: filters and exclusions become its exclusion list."""

    def __init__(self, ranker: Ranker, catalog: Catalog, fallback: Ranker):
        self.ranker, self.catalog, self.fallback = ranker, catalog, fallback

    def __call__(self, history: Sequence[int] = (), query: str = "", k: int = 10, exclude: Sequence[int] = (),
                 filters: dict | None = None, num_beams: int | None = None) -> list[Recommendation]:
        blocked = set(exclude) | set(history)
        if filters:
            blocked |= set(range(len(self.catalog))) - self.catalog.filter_indices(**filters)
        ranker = self.ranker if history else self.fallback
        items = ranker.recommend([list(history)], [sorted(blocked)], k)[0]
        # these methods' scores are not comparable across methods; the card keeps only the order (1 / rank)
        return [Recommendation(idx, 1.0 / rank, row)
                for rank, (idx, row) in enumerate(zip(items, self.catalog.items(items)), 1)]


class CoLLMOnLCRec:
    """LC-Rec's top `depth` for the request (wish and filters included), re-ordered by CoLLM's P(Yes)."""

    def __init__(self, collm, lcrec: Callable[..., list[Recommendation]], depth: int):
        self.collm, self.lcrec, self.depth = collm, lcrec, depth

    def __call__(self, history: Sequence[int] = (), query: str = "", k: int = 10, exclude: Sequence[int] = (),
                 filters: dict | None = None, num_beams: int | None = None) -> list[Recommendation]:
        candidates = self.lcrec(history=history, query=query, k=max(k, self.depth), exclude=exclude,
                                filters=filters, num_beams=max(num_beams or 0, k, self.depth))
        if not candidates:
            return []
        probs = self.collm.candidate_probs(list(history), [c.idx for c in candidates]).tolist()
        order = sorted(range(len(candidates)), key=lambda i: -probs[i])   # stable: ties keep LC-Rec's order
        return [Recommendation(candidates[i].idx, float(probs[i]), candidates[i].item) for i in order[:k]]


class MethodRouter:
    """recommend(..., method=name) for every available method, each loaded once on first use (thread-safe)."""

    def __init__(self, cfg: Config, run: str | Path, default: str):
        self.cfg, self.run = cfg, Path(run)
        self.available = available_methods(self.run)
        if default not in NEEDS:   # LCREC_METHOD is read as it is typed
            raise ValueError(f"unknown method {default!r}; the app serves {', '.join(NEEDS)}")
        if default not in self.available:
            raise FileNotFoundError(f"method {default!r} cannot be served from {self.run}: it needs "
                                    f"{', '.join(NEEDS[default])} there (available: {', '.join(self.available)})")
        self.default = default
        self._loaded: dict[str, Callable[..., list[Recommendation]]] = {}
        self._lock = threading.Lock()
        self.catalog = Catalog(self.run / "catalog.sqlite")
        self.lcrec = None   # the Recommender, once loaded (LC-Rec and CoLLM's candidates)

    def __call__(self, history: Sequence[int] = (), query: str = "", k: int = 10, exclude: Sequence[int] = (),
                 filters: dict | None = None, num_beams: int | None = None, method: str = "") -> list[Recommendation]:
        return self.get(method or self.default)(history=history, query=query, k=k, exclude=exclude,
                                                filters=filters, num_beams=num_beams)

    def label(self, method: str = "") -> str:
        method = method or self.default
        if method in ("lcrec", "collm") and self.cfg.chat.prior_weight > 0:
            return f"{METHOD_LABELS[method]} + SASRec prior (w={self.cfg.chat.prior_weight:g})"
        return METHOD_LABELS[method]

    def get(self, method: str) -> Callable[..., list[Recommendation]]:
        if method not in self.available:
            raise ValueError(f"unknown or unavailable method {method!r}; this run serves "
                             f"{', '.join(self.available)}")
        with self._lock:
            if method not in self._loaded:
                log.info("serving: loading %s from %s", method, self.run)
                self._loaded[method] = self._load(method)
            return self._loaded[method]

    def _load(self, method: str) -> Callable[..., list[Recommendation]]:
        from .baselines import Popularity, SequentialRecommender
        from .hardware import resolve_dtype
        # CLLM4Rec and CoLLM keep LoRA beside the weights: served in the unquantised precision the CPU runs best
        plain = dataclasses.replace(self.cfg.model, dtype=resolve_dtype("auto", "cpu")) \
            if self.cfg.model.dtype in ("int8", "nf4") else self.cfg.model
        from .run_folder import load_split
        if method == "lcrec":
            from .recommender import Recommender
            self.lcrec = Recommender.from_run(self.cfg, self.run, prior_weight=self.cfg.chat.prior_weight)
            return functools.partial(self.lcrec.recommend, style=self.cfg.chat.history_prompt)
        if method == "collm":
            from .methods.collab_tokens import MFSource, SASRecSource
            from .methods.collm import CoLLM
            lcrec = self._loaded.get("lcrec") or self._load_unlocked("lcrec")
            mf = self.run / "collm" / "mf.pt"   # written when CoLLM was trained on MF (methods.collm.collab)
            source = MFSource.load(mf) if mf.exists() else SASRecSource.load(self.run / "sasrec.pt")
            collm = CoLLM.load(self.run / "collm", plain, source)
            return CoLLMOnLCRec(collm, lcrec, self.cfg.methods.collm.rerank_depth)
        fallback = Popularity().fit(load_split(self.run), len(self.catalog))
        if method == "sasrec":
            return RankerService(SequentialRecommender.load(self.run / "sasrec.pt"), self.catalog, fallback)
        from .methods.cllm4rec import CLLM4Rec
        return RankerService(CLLM4Rec.load(self.run / "cllm4rec", plain), self.catalog, fallback)

    def _load_unlocked(self, method: str) -> Callable[..., list[Recommendation]]:
        """Load a dependency while `get` holds the lock (CoLLM needs LC-Rec)."""
        self._loaded[method] = self._load(method)
        return self._loaded[method]
