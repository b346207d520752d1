"""The recommendation API shared by evaluation and the chat app.

`recommend(history=..., query=..., k=..., exclude=..., filters=...)`: a history alone is sent in the
chat/seqrec form, a query alone in the itemsearch form, both in the fused form (tasks.request_prompt);
generation is constrained to the trie of real item codes, minus excluded and filtered-out items.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from .catalog import Catalog
from .collab_prompt import CollabDensePrompts
from .config import Config
from .decoding import CollabInputs, GenerationStats, SharedPrefix, generate_items
from .tasks import TaskBuilder, chat_prompt
from .trie import CodeTrie

log = logging.getLogger(__name__)

STYLES = ("chat", "seqrec", "dense")


@dataclass
class Request:
    history: Sequence[int] = ()
    query: str = ""
    exclude: Sequence[int] = ()
    filters: dict | None = None
    style: str = "chat"          # chat | seqrec (LC-Rec instruction, template `template`) | dense (continuation)
    template: int = 0


@dataclass
class Recommendation:
    idx: int
    score: float
    item: dict = field(default_factory=dict)


class Recommender:
    def __init__(self, model, tokenizer, catalog: Catalog, builder: TaskBuilder, codes: Sequence[Sequence[int]],
                 num_beams: int = 20, batch_size: int = 8, prior_model=None, prior_weight: float = 0.0,
                 collab: CollabDensePrompts | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.builder = builder
        self.trie = CodeTrie.from_tokenizer(codes, tokenizer)
        self.num_items = len(codes)
        self.num_beams = num_beams
        self.batch_size = batch_size
        self.shared_prefix = SharedPrefix()   # the chat template's KV, computed once for all requests
        # hybrid decoding: a sequential model (baselines.SequentialRecommender) whose next-item probabilities
        # weight each code step by `prior_weight` (decoding.generate_items); 0 or no model = pure LC-Rec
        self.prior_model = prior_model
        self.prior_weight = prior_weight
        # an adapter trained with collaborative tokens (collab_prompt.py) gets them in its dense prompt
        self.collab = collab

    @classmethod
    def from_run(cls, cfg: Config, run_dir: str | Path | None = None, dtype: str = "",
                 prior_weight: float = 0.0, adapter_dir: str | Path | None = None) -> "Recommender":
        """Base model + index tokens + the run's adapter (merged into the weights unless 4-bit), in ``dtype``
        (auto | fp32 | bf16 | nf4; empty = the config's model.dtype). ``prior_weight`` > 0 decodes as the hybrid,
        with the run's sasrec.pt as the prior (a missing file is an error, not a silent fallback).
        ``adapter_dir``: another adapter of the run (an earlier phase's adapter.phase{i}) instead of adapter/."""
        from . import backbone
        from .run_folder import load_prior, task_builder
        run = Path(run_dir or cfg.run_dir)
        prior = load_prior(run) if prior_weight > 0 else None   # a missing sasrec.pt is an error, not pure LC-Rec
        builder, codes = task_builder(run, cfg)
        model_cfg = replace(cfg.model, dtype=dtype or cfg.model.dtype)
        adapter = Path(adapter_dir) if adapter_dir else run / "adapter"
        model, tokenizer = backbone.load_finetuned(model_cfg, adapter, merge=True)
        return cls(model, tokenizer, Catalog(run / "catalog.sqlite"), builder, codes,
                   num_beams=cfg.eval.num_beams, batch_size=cfg.eval.batch_size, prior_model=prior,
                   prior_weight=prior_weight,
                   collab=CollabDensePrompts.for_run(tokenizer, builder, run, adapter))

    def prompt(self, request: Request) -> str:
        """The formatted prompt, in the run's domain words (tasks.Prompts), that the item code continues."""
        history, prompts = list(request.history), self.builder.prompts
        if self._collaborative(request):
            return self.collab.inference_text(history)
        if request.style == "dense" and history and not request.query:
            return chat_prompt(self.tokenizer, prompts.dense) + self.builder.dense_continuation(history).prefix
        if request.style == "seqrec" and history and not request.query:
            text = prompts.seqrec[request.template % len(prompts.seqrec)].format(
                history=", ".join(self.builder.codes_of(history)))
            return chat_prompt(self.tokenizer, text)
        return chat_prompt(self.tokenizer, self.builder.request_prompt(self.builder.codes_of(history), request.query))

    def _collaborative(self, request: Request) -> bool:
        return self.collab is not None and request.style == "dense" and bool(request.history) and not request.query

    def _collab_vectors(self, requests: Sequence[Request]) -> CollabInputs | None:
        """The mapped SASRec states (and code additions) per request for decoding; None when no request has them."""
        rows = [i for i, r in enumerate(requests) if self._collaborative(r)]
        if not rows:
            return None
        vectors: list[torch.Tensor] = [torch.zeros(0) for _ in requests]
        on_codes: list[torch.Tensor] = [torch.zeros(0) for _ in requests]
        on_logits: list[torch.Tensor] = [torch.zeros(0) for _ in requests]
        with torch.no_grad():
            mapped, additions, heads, last = self.collab.inputs([list(requests[i].history) for i in rows])
        prefix = None
        if last is not None:   # the head's prefix MLP: the last state per request, zero where a request has none
            states, present = torch.zeros(len(requests), last.shape[1]), torch.zeros(len(requests), dtype=torch.bool)
            states[rows], present[rows] = last, True
            prefix = self.collab.prefix_head(states, present)
        for n, i in enumerate(rows):
            vectors[i] = mapped[n]
            if additions is not None:
                on_codes[i] = additions[n]
            if heads is not None:
                on_logits[i] = heads[n]
        return CollabInputs(self.collab.placeholder, vectors, on_codes if additions is not None else None,
                            on_logits if heads is not None else None, prefix)

    def allowed(self, request: Request) -> torch.Tensor:
        mask = torch.ones(self.num_items, dtype=torch.bool)
        if request.filters:
            keep = self.catalog.filter_indices(**request.filters)
            mask[:] = False
            mask[list(keep)] = True
        exclude = [i for i in request.exclude if 0 <= i < self.num_items]
        mask[exclude] = False
        return mask

    def prior(self, requests: Sequence[Request], weight: float) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(next-item probabilities of the prior model, (B,) weight) for hybrid decoding; requests without a
        history get weight 0 (the prior knows nothing about them). (None, zeros) when there is no prior."""
        weights = torch.zeros(len(requests))
        if self.prior_model is None or weight <= 0 or not any(r.history for r in requests):
            return None, weights
        probs = torch.softmax(self.prior_model.score([list(r.history) or [0] for r in requests]).float(), dim=-1)
        for row, r in enumerate(requests):
            weights[row] = weight if r.history else 0.0
        return probs, weights

    def recommend_batch(self, requests: Sequence[Request], k: int = 10, num_beams: int | None = None,
                        prior_weight: float | None = None, stats: GenerationStats | None = None
                        ) -> list[list[Recommendation]]:
        """``prior_weight`` overrides the recommender's own (0 = pure LC-Rec) for these requests; ``stats``
        counts the raw beams (decoding.GenerationStats)."""
        beams = max(k, num_beams or self.num_beams)
        prior, weights = self.prior(requests, self.prior_weight if prior_weight is None else prior_weight)
        results = generate_items(self.model, self.tokenizer, self.trie, [self.prompt(r) for r in requests],
                                 num_beams=beams, k=k, allowed=[self.allowed(r) for r in requests],
                                 batch_size=self.batch_size, shared_prefix=self.shared_prefix,
                                 prior=prior, prior_weight=weights, stats=stats,
                                 collab=self._collab_vectors(requests))
        return [[Recommendation(idx, score) for idx, score in ranked] for ranked in results]

    def recommend(self, history: Sequence[int] = (), query: str = "", k: int = 10, exclude: Sequence[int] = (),
                  filters: dict | None = None, num_beams: int | None = None, style: str = "chat"
                  ) -> list[Recommendation]:
        """Top-k items for one request, with catalogue rows attached. ``style`` picks the prompt of a history
        without a query (see Request); a query always gets the request prompt."""
        if style not in STYLES:
            raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
        request = Request(history=history, query=query, exclude=list(exclude) + list(history), filters=filters,
                          style=style)
        ranked = self.recommend_batch([request], k=k, num_beams=num_beams)[0]
        rows = self.catalog.items([r.idx for r in ranked])
        for rec, row in zip(ranked, rows):
            rec.item = row
        return ranked
