"""CoLLM (Zhang et al., arXiv 2310.19488): an LLM that answers "will this user like X?" with collaborative
vectors in its prompt.

A collaborative model (`collab_tokens.CollabSource`: SASRec or a matrix factorisation) gives a vector for the
user's history and for every item; `CollabMapper` maps them into the token-embedding space, where they fill
placeholder positions beside the titles:

    A user watched: Toy Story <c>, GoldenEye <c>. The user is <u>. Will they like Heat (1995) <c>? Answer:

The score is P(Yes) = softmax over the logits of " Yes" and " No" at the last position (both are single tokens
of SmolLM2's tokenizer, with the leading space the answer would have after "Answer:"). Two stages, as the paper:
1. "text": LoRA on the text-only prompt (the same prompt with every placeholder, and the "The user is <u>."
   sentence, left out: TALLRec's prompt, as the paper's first step). The mapper is not used.
2. "mapping": the mapper only, on the full prompt, LoRA frozen (and its dropout off: the LLM is a fixed function).
Each stage loops over shuffled batches until its wall-time budget (or `max_steps`) runs out.

Choices where the paper leaves room:
- Implicit feedback: our data has no ratings, so "like" means the user's real next item (label Yes) against one
  item sampled uniformly among those the user never had in the training data (label No), drawn once, seeded.
  A training sample is a position t >= 1 of a user's training sequence: the prompt shows the last `history`
  titles before t; the collaborative model sees up to the split's `max_history` items before t, the same
  window it sees at evaluation.
- Loss: binary cross-entropy on logit(Yes) - logit(No) (= 2-way softmax cross-entropy), last position only,
  computed from the last hidden state and the two LM-head rows (no full-vocabulary logits).
- One mapper for user and item vectors (they live in one dot-product space in both sources).
- Prompts are assembled from token ids (titles tokenized once per item, at most `max_title_tokens` tokens of
  title; the year only after the candidate's title, as SmolLM2 spends 6 tokens on " (1995)", which would be
  40% of a 10-title history), so a prompt splits exactly into a history prefix and a candidate suffix; scoring runs
  the prefix once per history and the candidates' suffixes as one batch over a copy of its KV cache
  (`DynamicCache.batch_repeat_interleave`); `yes_probability(use_cache=False)` is the plain full-prompt path.
- Evaluation: AUC / per-user AUC (the paper's metrics) on each user's held-out target against `negatives`
  unseen items (fixed seed), and `CoLLMReranker`, which re-ranks a base ranker's top `rerank_depth` for
  HR/NDCG under the project's protocol (`ranking.evaluate_ranker`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lcrec_chat.backbone import load_model, load_tokenizer, resolve_device
from lcrec_chat.config import CoLLMConfig, ModelConfig
from lcrec_chat.data.split import Split
from lcrec_chat.metrics import stage_inputs
from lcrec_chat.methods.collab_tokens import (CollabError, CollabMapper, CollabSource, embed_with_collab,
                                              placeholder_id, source_scores, token_embedding_norm)
from lcrec_chat.ranking import Ranker
from lcrec_chat.titles import display_title, split_alt_title

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANSWERS = (" Yes", " No")
USER = -1          # a prompt slot holding the user vector (other slots hold an item index)
STAGES = ("text", "mapping")


# ------------------------------------------------------------------------------------------ prompts

def item_text(item: dict) -> str:
    """' Title (year)' as a person writes it (a leading space: it follows a word or a colon in the prompt)."""
    year = item.get("year")
    return f" {display_title(str(item['title']))}" + (f" ({year})" if year else "")


def _split_year(text: str) -> tuple[str, str]:
    """' Heat (1995)' -> (' Heat', ' (1995)'); a text without a trailing 4-digit year -> (text, '')."""
    match = re.fullmatch(r"(.*?)( \(\d{4}\))", text)
    return (match[1], match[2]) if match else (text, "")


@dataclass
class Prompt:
    ids: list[int]
    slots: list[int] = field(default_factory=list)   # per placeholder, in order: an item index or USER


class PromptBuilder:
    """Token ids of CoLLM prompts; the history prefix and the candidate suffix concatenate to the full prompt."""

    def __init__(self, tokenizer, item_texts: Sequence[str], placeholder: int, history: int,
                 max_title_tokens: int = 16, history_years: bool = False, watched: str = "watched") -> None:
        self.tokenizer, self.item_texts, self.placeholder = tokenizer, list(item_texts), placeholder
        self.history, self.max_title_tokens, self.history_years = history, max_title_tokens, history_years
        enc = self._encode
        self.open, self.none, self.sep, self.stop = enc(f"A user {watched}:"), enc(" nothing"), enc(","), enc(".")
        self.user, self.ask, self.close = enc(" The user is"), enc(" Will they like"), enc("? Answer:")
        self._items: dict[tuple[int, bool], list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def item_ids(self, item: int, year: bool = True) -> list[int]:
        """The item's title tokens (at most `max_title_tokens`; a title too long loses its alternative title
        in parentheses first, then its tail), then those of its year if `year`."""
        if (item, year) not in self._items:
            title, year_text = _split_year(self.item_texts[item])
            ids = self._encode(title)
            if len(ids) > self.max_title_tokens:
                ids = self._encode(" " + split_alt_title(title)[0].strip())[:self.max_title_tokens]
            self._items[item, year] = ids + (self._encode(year_text) if year and year_text else [])
        return self._items[item, year]

    def _item(self, item: int, collab: bool, year: bool) -> Prompt:
        ids = self.item_ids(item, year)
        return Prompt(ids + [self.placeholder], [item]) if collab else Prompt(ids)

    def prefix(self, history: Sequence[int], collab: bool) -> Prompt:
        """Everything before the candidate: the last `history` titles, the user slot, the question's start."""
        out = Prompt(list(self.open))
        shown = list(history)[-self.history:] if self.history > 0 else []
        for k, item in enumerate(shown):
            part = self._item(item, collab, self.history_years)
            out.ids += (self.sep if k else []) + part.ids
            out.slots += part.slots
        out.ids += (self.stop if shown else self.none + self.stop)
        if collab:
            out.ids += self.user + [self.placeholder] + self.stop
            out.slots.append(USER)
        out.ids += self.ask
        return out

    def suffix(self, item: int, collab: bool) -> Prompt:
        part = self._item(item, collab, True)
        return Prompt(part.ids + self.close, part.slots)

    def full(self, history: Sequence[int], item: int, collab: bool) -> Prompt:
        head, tail = self.prefix(history, collab), self.suffix(item, collab)
        return Prompt(head.ids + tail.ids, head.slots + tail.slots)


# ------------------------------------------------------------------------------------------ AUC

def auc_of(scores: Sequence[float] | np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney
    with average ranks). NaN when either class is absent."""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0          # 1-based mean rank of each distinct value
    rank_sum = average_rank[inverse][y].sum()
    return float((rank_sum - pos * (pos + 1) / 2.0) / (pos * neg))


def sample_candidates(split: Split, stage: str, num_items: int, negatives: int, max_users: int = 0,
                      seed: int = 42) -> tuple[list[list[int]], list[list[int]]]:
    """(histories, candidates) for `stage`: per user (`stage_inputs` order) the held-out target first, then
    `negatives` distinct items drawn uniformly (seeded) among those outside the user's exclusion list and
    not the target."""
    histories, exclude, targets = stage_inputs(split, stage, max_users)
    rng = np.random.default_rng(seed)
    candidates = []
    for banned, target in zip(exclude, targets):
        banned = set(banned) | {target}
        if num_items - len(banned) < negatives:
            raise ValueError(f"only {num_items - len(banned)} items left to sample {negatives} negatives from")
        drawn: list[int] = []
        while len(drawn) < negatives:
            item = int(rng.integers(0, num_items))
            if item not in banned:
                banned.add(item)
                drawn.append(item)
        candidates.append([target] + drawn)
    return histories, candidates


def auc_summary(scores: torch.Tensor) -> dict[str, float | int]:
    """AUC metrics of a [users, 1 + negatives] score matrix whose first column is each user's positive."""
    scores = scores.detach().cpu().double()
    labels = torch.zeros_like(scores, dtype=torch.long)
    labels[:, 0] = 1
    per_user = [auc_of(row, lab) for row, lab in zip(scores, labels)]
    return {"auc": auc_of(scores.flatten(), labels.flatten()), "uauc": float(np.mean(per_user)) if per_user else
            float("nan"), "users": int(scores.shape[0]), "pairs": int(scores.numel())}


def source_auc(source: CollabSource, split: Split, stage: str, negatives: int = 9, max_users: int = 0,
               seed: int = 42) -> dict[str, float | int]:
    """The collaborative source alone (dot product) on the very pairs `CoLLM.auc` scores with the same
    arguments: the "SASRec alone" row beside CoLLM."""
    histories, candidates = sample_candidates(split, stage, source.num_items, negatives, max_users, seed)
    return auc_summary(source_scores(source, histories, candidates))


# ------------------------------------------------------------------------------------------ the method

class CoLLM:
    """The CoLLM scorer over `items` (prompt titles) and `source` (collaborative vectors, one per item).

    Keywords beyond CoLLMConfig: `mapper_hidden` (MLP width), `lora_dropout`, `max_title_tokens`,
    `history_years` (years after the history's titles too; off: SmolLM2 spends 6 tokens on " (1995)"),
    `max_steps` (per stage, 0 = only the time budget), `train_pairs` (keep a seeded random subset of this many
    training positions, 0 = all), `eval_batch_size` (prompts per forward when scoring), `progress` (tqdm),
    `item_texts` (the prompt text of every item, instead of building it from `items`; `load` uses it) and
    `adapter_dir` (a saved LoRA adapter to start from instead of a fresh one).
    """

    def __init__(self, cfg: CoLLMConfig, model_cfg: ModelConfig, items: Sequence[dict] | None,
                 source: CollabSource, *, mapper_hidden: int = 256, lora_dropout: float = 0.05,
                 max_title_tokens: int = 16, history_years: bool = False, max_steps: int = 0,
                 train_pairs: int = 0, eval_batch_size: int = 32, progress: bool = True,
                 item_texts: Sequence[str] | None = None, adapter_dir: str | Path | None = None,
                 watched: str = "watched") -> None:
        texts = list(item_texts) if item_texts is not None else [item_text(it) for it in items or []]
        if len(texts) != source.num_items:
            raise CollabError(f"{len(texts)} items but the collaborative source knows {source.num_items}")
        self.cfg, self.model_cfg, self.source = cfg, model_cfg, source
        self.options = dict(mapper_hidden=mapper_hidden, lora_dropout=lora_dropout, max_title_tokens=max_title_tokens,
                            history_years=history_years, max_steps=max_steps, train_pairs=train_pairs,
                            eval_batch_size=eval_batch_size, watched=watched)   # watched: the domain's verb
        self.progress, self.num_items, self.item_texts = progress, len(texts), texts
        self.device = torch.device(resolve_device(model_cfg.device))
        self.tokenizer = load_tokenizer(model_cfg)
        self.placeholder_token, self.placeholder = placeholder_id(self.tokenizer)
        self.answer_ids = [self._single_token(a) for a in ANSWERS]
        self.prompts = PromptBuilder(self.tokenizer, texts, self.placeholder, cfg.history, max_title_tokens,
                                     history_years, watched)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = self._with_lora(load_model(model_cfg, for_training=True), adapter_dir, lora_dropout)
            token_dim = self.model.get_input_embeddings().weight.shape[1]
            self.mapper = CollabMapper(source.dim, token_dim, token_embedding_norm(self.model),
                                       mapper_hidden).to(self.device)
        self._base = self.model.get_base_model()
        self._decoder = getattr(self._base, self._base.base_model_prefix)
        self.item_raw = source.item_vectors().float().to(self.device)
        self.source_window = 20            # history items the source sees; set to the split's max_history by fit
        self.fit_summary: dict = {}
        self._sequences: list[list[int]] = []
        self._pairs: list[tuple[int, int, int]] = []

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise CollabError(f"the answer {text!r} is {len(ids)} tokens for this tokenizer; CoLLM needs one")
        return ids[0]

    def _with_lora(self, base, adapter_dir: str | Path | None, dropout: float):
        from peft import LoraConfig, PeftModel, get_peft_model
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        else:
            model = get_peft_model(base, LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha,
                                                    lora_dropout=dropout, target_modules=LORA_TARGETS,
                                                    task_type="CAUSAL_LM", bias="none"))
        model.eval()
        return model

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    # -------------------------------------------------------------------------------- forward pieces

    def _user_raw(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        windows = [list(h)[-self.source_window:] for h in histories]
        return self.source.user_vectors(windows).float().to(self.device)

    def _embed(self, ids: torch.Tensor, prompts: Sequence[Prompt], user_raw: torch.Tensor | None) -> torch.Tensor:
        """inputs_embeds with each prompt's slots filled by mapped vectors (prompt b's USER slot: user_raw[b])."""
        slots = [s if s != USER else self.num_items + b for b, p in enumerate(prompts) for s in p.slots]
        if not slots:
            return embed_with_collab(self._base, ids, self.placeholder)
        if user_raw is None and max(slots) >= self.num_items:
            raise CollabError("a prompt has a user slot but no user vectors were given")
        table = self.item_raw if user_raw is None else torch.cat([self.item_raw, user_raw])
        mapped = self.mapper(table[torch.tensor(slots, device=self.device)])
        return embed_with_collab(self._base, ids, self.placeholder, mapped)

    def _last_logits(self, prompts: Sequence[Prompt], user_raw: torch.Tensor | None, cache=None) -> torch.Tensor:
        """[B, 2] logits of (Yes, No) after each prompt, right-padded into one batch (causal attention: a real
        token never sees the padding after it, so no mask is needed); after `cache` when given."""
        lengths = [len(p.ids) for p in prompts]
        ids = torch.full((len(prompts), max(lengths)), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, :len(p.ids)] = torch.tensor(p.ids)
        ids = ids.to(self.device)
        out = self._decoder(inputs_embeds=self._embed(ids, prompts, user_raw), past_key_values=cache,
                            use_cache=cache is not None)
        last = out.last_hidden_state[torch.arange(len(prompts), device=self.device),
                                     torch.tensor(lengths, device=self.device) - 1]
        head = self._base.get_output_embeddings()
        bias = head.bias[self.answer_ids] if getattr(head, "bias", None) is not None else None
        return F.linear(last, head.weight[self.answer_ids], bias).float()

    def _answer_logits(self, histories: Sequence[Sequence[int]], items: Sequence[int], collab: bool) -> torch.Tensor:
        prompts = [self.prompts.full(h, i, collab) for h, i in zip(histories, items)]
        return self._last_logits(prompts, self._user_raw(histories) if collab else None)

    # -------------------------------------------------------------------------------- training

    def set_training_data(self, split: Split, num_items: int) -> int:
        """Training positions (sequence, t, sampled negative) from the split's training sequences; returns
        their count. Each position gives one Yes prompt (the item at t) and one No prompt (the negative)."""
        if num_items != self.num_items:
            raise CollabError(f"the split's catalogue has {num_items} items, this CoLLM {self.num_items}")
        self.source_window = split.max_history
        rng = random.Random(self.cfg.seed)
        self._sequences = [list(s) for s in split.train_sequences()]
        pairs = []
        for s, seq in enumerate(self._sequences):
            seen = set(seq)
            for t in range(1, len(seq)):
                pairs.append((s, t, _unseen_item(rng, seen, num_items)))
        limit = self.options["train_pairs"]
        self._pairs = rng.sample(pairs, limit) if 0 < limit < len(pairs) else pairs
        if not self._pairs:
            raise CollabError("no training sequence has two or more items; there is nothing to learn")
        return len(self._pairs)

    def _batches(self, rng: random.Random) -> Iterator[tuple[list[list[int]], list[int], torch.Tensor]]:
        """Endless shuffled epochs of (histories, items, labels): batch_size prompts, half Yes, half No."""
        per_step = max(1, self.cfg.batch_size // 2)
        while True:
            order = list(range(len(self._pairs)))
            rng.shuffle(order)
            for start in range(0, len(order), per_step):
                histories, items, labels = [], [], []
                for s, t, negative in (self._pairs[i] for i in order[start:start + per_step]):
                    seq = self._sequences[s]
                    history = seq[max(0, t - self.source_window):t]
                    histories += [history, history]
                    items += [seq[t], negative]
                    labels += [1.0, 0.0]
                yield histories, items, torch.tensor(labels, device=self.device)

    def train_stage(self, stage: str, minutes: float | None = None, max_steps: int | None = None) -> dict:
        """Stage "text" (LoRA, text-only prompts) or "mapping" (mapper only, full prompts, LoRA frozen) for
        `minutes` of wall time (default: the config's budget) or `max_steps` steps, whichever ends first."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        if not self._pairs:
            raise RuntimeError("call set_training_data (or fit) first")
        collab = stage == "mapping"
        minutes = (self.cfg.mapping_minutes if collab else self.cfg.text_minutes) if minutes is None else minutes
        max_steps = self.options["max_steps"] if max_steps is None else max_steps
        lora = self.lora_parameters()
        for p in lora:
            p.requires_grad_(not collab)
        for p in self.mapper.parameters():
            p.requires_grad_(collab)
        params = list(self.mapper.parameters()) if collab else lora
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        self.model.train(not collab)
        self.mapper.train(collab)
        batches = self._batches(random.Random(self.cfg.seed + STAGES.index(stage)))
        losses: list[float] = []
        start = time.perf_counter()
        deadline = start + minutes * 60
        bar = tqdm(desc=f"CoLLM {stage}", unit="step", disable=not self.progress)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            while time.perf_counter() < deadline and (max_steps <= 0 or len(losses) < max_steps):
                histories, items, labels = next(batches)
                logits = self._answer_logits(histories, items, collab)
                loss = F.binary_cross_entropy_with_logits(logits[:, 0] - logits[:, 1], labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        self.model.eval()
        self.mapper.eval()
        seconds = time.perf_counter() - start
        summary = _stage_summary(losses, seconds, max(1, self.cfg.batch_size // 2))
        log.info("CoLLM %s stage: %d steps in %.1f s (%.3f s/step), loss %.4f -> %.4f", stage, summary["steps"],
                 seconds, summary["seconds_per_step"], summary["loss_first"], summary["loss_last"])
        return summary

    def fit(self, split: Split, num_items: int) -> "CoLLM":
        """Both stages on the split's training sequences; `fit_summary` records losses and seconds."""
        pairs = self.set_training_data(split, num_items)
        text = self.train_stage("text")
        mapping = self.train_stage("mapping")
        self.fit_summary = {"train_positions": pairs, "text": text, "mapping": mapping}
        return self

    # -------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def candidate_probs(self, history: Sequence[int], candidates: Sequence[int], collab: bool = True) -> torch.Tensor:
        """P(Yes) [C] for one history's candidates: the prefix once, the suffixes batched over its KV cache."""
        candidates = list(candidates)
        self._check_items([history, candidates])
        if not candidates:
            return torch.zeros(0)
        self.model.eval()
        self.mapper.eval()
        prefix = self.prompts.prefix(history, collab)
        ids = torch.tensor([prefix.ids], device=self.device)
        users = self._user_raw([history]) if collab else None
        cache = self._decoder(inputs_embeds=self._embed(ids, [prefix], users), use_cache=True).past_key_values
        chunk = self.options["eval_batch_size"]
        probs = []
        for start in range(0, len(candidates), chunk):
            part = candidates[start:start + chunk]
            copied = copy.deepcopy(cache) if len(candidates) > chunk else cache
            copied.batch_repeat_interleave(len(part))
            logits = self._last_logits([self.prompts.suffix(i, collab) for i in part], None, cache=copied)
            probs.append(logits.softmax(-1)[:, 0])
        return torch.cat(probs).cpu()

    @torch.no_grad()
    def yes_probability(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                        collab: bool = True, use_cache: bool = True) -> torch.Tensor:
        """P(Yes) [B, C] of each history's C candidates. `collab=False` scores the text-only prompt (the
        model after stage 1 alone: TALLRec); `use_cache=False` runs every full prompt (the reference path)."""
        if len(histories) != len(candidates):
            raise ValueError(f"{len(histories)} histories but {len(candidates)} candidate lists")
        width = {len(c) for c in candidates}
        if len(width) > 1:
            raise ValueError(f"every history needs the same number of candidates, got {sorted(width)}")
        if use_cache:
            rows = [self.candidate_probs(h, c, collab) for h, c in zip(histories, candidates)]
            return torch.stack(rows) if rows else torch.zeros(0, 0)
        self.model.eval()
        self.mapper.eval()
        pairs = [(h, i) for h, c in zip(histories, candidates) for i in c]
        self._check_items([[i for _, i in pairs], *histories])
        probs = []
        step = self.options["eval_batch_size"]
        for start in range(0, len(pairs), step):
            part = pairs[start:start + step]
            logits = self._answer_logits([h for h, _ in part], [i for _, i in part], collab)
            probs.append(logits.softmax(-1)[:, 0].cpu())
        flat = torch.cat(probs) if probs else torch.zeros(0)
        return flat.view(len(histories), -1) if histories else torch.zeros(0, 0)

    def _check_items(self, lists: Sequence[Sequence[int]]) -> None:
        for items in lists:
            for i in items:
                if not 0 <= int(i) < self.num_items:
                    raise ValueError(f"item {i} outside 0..{self.num_items - 1}")

    def auc(self, split: Split, stage: str, negatives: int | None = None, max_users: int = 0,
            seed: int | None = None, collab: bool = True) -> dict[str, float | int]:
        """{"auc", "uauc", "users", "pairs", "seconds", "seconds_per_pair"} on each user's held-out target of
        `stage` against `negatives` sampled unseen items (the pairs `source_auc` scores with the same args)."""
        negatives = self.cfg.negatives if negatives is None else negatives
        seed = self.cfg.seed if seed is None else seed
        histories, candidates = sample_candidates(split, stage, self.num_items, negatives, max_users, seed)
        start = time.perf_counter()
        rows = [self.candidate_probs(h, c, collab)
                for h, c in tqdm(list(zip(histories, candidates)), desc=f"CoLLM AUC {stage}", unit="user",
                                 disable=not self.progress)]
        seconds = time.perf_counter() - start
        out = auc_summary(torch.stack(rows))
        return {**out, "seconds": round(seconds, 3), "seconds_per_pair": seconds / max(1, out["pairs"])}

    # -------------------------------------------------------------------------------- persistence

    def save(self, folder: str | Path) -> None:
        """adapter/ (peft), mapper.pt and collm.json (settings, prompt texts, fit summary)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder / "adapter"))
        torch.save(self.mapper.state_dict(), folder / "mapper.pt")
        settings = {"config": dataclasses.asdict(self.cfg), "options": self.options,
                    "source": {"kind": self.source.kind, "dim": self.source.dim, "num_items": self.source.num_items},
                    "source_window": self.source_window, "placeholder": self.placeholder_token,
                    "answers": list(ANSWERS), "item_texts": self.item_texts, "fit_summary": self.fit_summary}
        (folder / "collm.json").write_text(json.dumps(settings))

    @classmethod
    def load(cls, folder: str | Path, model_cfg: ModelConfig, source: CollabSource,
             progress: bool = False) -> "CoLLM":
        """A saved CoLLM on `model_cfg`'s base model, with `source` (it must match the saved one's kind and size)."""
        folder = Path(folder)
        settings = json.loads((folder / "collm.json").read_text())
        saved = settings["source"]
        if (source.kind, source.dim, source.num_items) != (saved["kind"], saved["dim"], saved["num_items"]):
            raise CollabError(f"{folder} was trained with a {saved['kind']} source of {saved['num_items']} items x "
                              f"{saved['dim']}; got {source.kind}, {source.num_items} x {source.dim}")
        model = cls(CoLLMConfig(**settings["config"]), model_cfg, None, source, progress=progress,
                    item_texts=settings["item_texts"], adapter_dir=folder / "adapter", **settings["options"])
        model.mapper.load_state_dict(torch.load(folder / "mapper.pt", map_location=model.device))
        model.source_window = settings["source_window"]
        model.fit_summary = settings.get("fit_summary", {})
        return model


def _unseen_item(rng: random.Random, seen: set[int], num_items: int) -> int:
    """A uniform item outside `seen` (rejection; gives up after 100 draws for a user who had nearly all)."""
    item = rng.randrange(num_items)
    for _ in range(100):
        if item not in seen:
            break
        item = rng.randrange(num_items)
    return item


def _stage_summary(losses: list[float], seconds: float, pairs_per_step: int) -> dict:
    head, tail = losses[:10], losses[-10:]
    return {"steps": len(losses), "seconds": round(seconds, 2),
            "seconds_per_step": seconds / len(losses) if losses else 0.0,
            "pairs_seen": len(losses) * pairs_per_step,
            "loss_first": float(np.mean(head)) if head else float("nan"),
            "loss_last": float(np.mean(tail)) if tail else float("nan"),
            "losses": [round(x, 5) for x in losses]}


# ------------------------------------------------------------------------------------------ re-ranking

class CoLLMReranker(Ranker):
    """Top-k by P(Yes) among a base ranker's top `depth` items (default: the CoLLM's rerank_depth), which
    already follow the shared exclusion rule; ties keep the base's order."""

    name = "collm"

    def __init__(self, collm: CoLLM, base: Ranker, depth: int | None = None, collab: bool = True,
                 progress: bool = False) -> None:
        self.collm, self.base, self.collab, self.progress = collm, base, collab, progress
        self.depth = collm.cfg.rerank_depth if depth is None else depth
        self.num_items = base.num_items
        if self.num_items != collm.num_items:
            raise CollabError(f"base ranker has {self.num_items} items, CoLLM {collm.num_items}")

    def fit(self, split: Split, num_items: int) -> "CoLLMReranker":
        raise NotImplementedError("fit the CoLLM and the base ranker, then wrap them")

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        raise NotImplementedError("CoLLMReranker scores only the base ranker's candidates: use recommend")

    def recommend(self, histories: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]],
                  k: int, batch_size: int = 512, users: Sequence[int] | None = None) -> list[list[int]]:
        """The base's top max(depth, k) per history (`batch_size` and `users` go to the base), re-ranked."""
        pools = self.base.recommend(histories, exclude, max(self.depth, k), batch_size, users=users)
        out = []
        for history, pool in tqdm(list(zip(histories, pools)), desc="CoLLM rerank", unit="user",
                                  disable=not self.progress):
            probs = self.collm.candidate_probs(history, pool, self.collab).tolist()
            order = sorted(range(len(pool)), key=lambda j: (-probs[j], j))
            out.append([pool[j] for j in order[:k]])
        return out
