"""Refit the collaborative head on the tuned model's frozen features (`train.head_refit_epochs`).

The collaborative head (collab_prompt.py: SASRec's state mapped onto the code logits, with its prefix MLP) trains
inside the LoRA phases, at the rate their schedule gives it, for a couple of thousand steps in all. Once the
model's other weights are final they give the same last hidden states every epoch, so the head alone can be fitted
to convergence in minutes: one pass of the frozen model over the training windows (no gradient) caches, at every
code written after a collaborative state, the last hidden state before the head, then epochs run over the cache.

The loss is the training loss where decoding reads it (decoding.generate_items): at each such code, the
cross-entropy of the true code plus `distill_weight` x the teacher's soft targets (distill.CodeTeacher), over that
level's code tokens and one slot for every other token of the vocabulary, held where the phases' head left it
(exact at the start; the whole vocabulary's logits at every step would cost ~50x more per point).
The windows cover every training position once (`training_windows`); the valid users' held-out items are the
report's held-out loss (the head starts from the one the phases trained, so the first row is the model as it was).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .collab_prompt import CollabDensePrompts
from .distill import CodeTeacher, SequentialTeacher
from .train import Encoded, collate

log = logging.getLogger(__name__)


def training_windows(sequences: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Windows of `size` items (the dense prompt's history + 1) that together write every item of every sequence
    after its first once with a state before it: consecutive windows overlap by one item (the first item of a
    window has no state before it); the last window is aligned to its sequence's end."""
    out = []
    for seq in sequences:
        seq = list(seq)
        if len(seq) < 2:
            continue
        if len(seq) <= size:
            out.append(seq)
            continue
        starts = list(range(0, len(seq) - size + 1, size - 1))
        if starts[-1] + size < len(seq):
            starts.append(len(seq) - size)
        out += [seq[s:s + size] for s in starts]
    return out


@dataclass
class HeadFeatures:
    """Per code point: the frozen last hidden state before the head [P, H] (bf16), the head's input after the
    items before it [P, D] (CollabDensePrompts.head_states), its code level and item, the log-sum-exp of every logit but the level's codes [P], and the
    teacher's soft targets over the level's code slots [P, S] (fp16)."""
    hidden: torch.Tensor
    state: torch.Tensor
    level: torch.Tensor
    item: torch.Tensor
    rest: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.level)


class HeadRefit:
    """The head's loss on cached features (see the module docstring); `collab.mapper` holds the head."""

    def __init__(self, model, collab: CollabDensePrompts, teacher: SequentialTeacher, distill_weight: float):
        # a 4-bit model keeps its adapter unmerged (Recommender.from_run): the causal LM is under the PEFT wrapper
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.causal_lm, self.collab, self.teacher, self.distill_weight = causal_lm, collab, teacher, distill_weight
        self.codes = CodeTeacher.from_prompts(collab, collab.source.num_items)
        # the head is fitted on the CPU (it is small; the mapper is served there): only the frozen model's pass runs
        # on the model's device
        self.device = causal_lm.get_output_embeddings().weight.device
        self.output = causal_lm.get_output_embeddings().weight.detach().float().cpu()  # [V, H]
        self.level_rows = self.output[self.codes.level_tokens]                         # [L, S, H]
        # a level with fewer codes than the widest pads its last slots (CodeTeacher): out of the softmax
        tokens = self.codes.level_tokens
        distinct = torch.tensor([len(torch.unique(row)) for row in tokens])
        self.padding = torch.arange(tokens.shape[1]) >= distinct[:, None]

    @torch.no_grad()
    def features(self, data: Sequence[Encoded], batch_size: int = 8, desc: str = "features") -> HeadFeatures:
        """Features of encoded dense samples (train.encode: a training window writes every item after its first, a
        held-out history only its target), batched as training batches them (train.collate)."""
        collab, lm = self.collab, self.causal_lm
        tokenizer = collab.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = self.device
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in HeadFeatures.__dataclass_fields__}
        for start in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False):
            batch = collate(data, list(range(start, min(start + batch_size, len(data)))), pad, device)
            if "distill" not in batch:
                continue
            states = collab.states(batch["vector_items"])
            inputs = collab.head_states(batch["vector_items"], states)   # the prompt's and the head's
            hidden = lm.model(inputs_embeds=collab.embed(lm, batch["input_ids"], inputs),
                              attention_mask=batch["attention_mask"]).last_hidden_state
            points = batch["distill"]
            levels, items = points["level"], points["item"]
            # the logits that predict the code at a position come from the position before it
            h = hidden[points["row"].to(device), points["position"].to(device) - 1].float().cpu()
            state = torch.cat(inputs)[points["vector"]].float()
            # the rest of the vocabulary as decoding sees it with the head the phases trained (exact at the start)
            logits = (h + collab.head_vectors(state, levels, items)) @ self.output.T
            own = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, self.codes.level_tokens[levels], True)
            probs = torch.cat(self.teacher.probabilities(batch["vector_items"], {"sasrec": states}))[points["vector"]]
            parts["hidden"].append(h.bfloat16())
            parts["state"].append(state)
            parts["level"].append(levels)
            parts["item"].append(items)
            parts["rest"].append(torch.logsumexp(logits.masked_fill(own, float("-inf")), -1))
            parts["target"].append(self.codes.targets(probs, levels, items)[1].half())
        return HeadFeatures(**{k: torch.cat(v) for k, v in parts.items()})

    def losses(self, f: HeadFeatures, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy of the true code, soft cross-entropy against the teacher) per point of `idx`."""
        level, item = f.level[idx], f.item[idx]
        x = f.hidden[idx].float() + self.collab.head_vectors(f.state[idx], level, item)
        code_logits = torch.einsum("ph,psh->ps", x, self.level_rows[level]).masked_fill(self.padding[level],
                                                                                         float("-inf"))
        log_probs = torch.log_softmax(torch.cat([code_logits, f.rest[idx, None]], 1), -1)[:, :-1]
        true = self.codes.item_slot[item, level]
        ce = -log_probs.gather(1, true[:, None]).squeeze(1)
        soft = -(f.target[idx].float() * log_probs.masked_fill(self.padding[level], 0.0)).sum(1)
        return ce, soft

    @torch.no_grad()
    def held_out(self, f: HeadFeatures, chunk: int = 4096) -> dict[str, float]:
        """Mean negative log-likelihood of the true code per level, and per item (their sum); in chunks, so the
        training points' hundreds of thousands fit in memory too."""
        ce = torch.cat([self.losses(f, torch.arange(start, min(start + chunk, len(f))))[0]
                        for start in range(0, len(f), chunk)])
        return _per_level(ce, f.level)

    def teacher_nll(self, f: HeadFeatures) -> dict[str, float]:
        """The teacher's own NLL on the same points (its soft target at the true code), as `held_out`."""
        at_true = f.target.float().gather(1, self.codes.item_slot[f.item, f.level][:, None]).squeeze(1)
        return _per_level(-at_true.clamp_min(1e-12).log(), f.level)

    def fit(self, train: HeadFeatures, valid: HeadFeatures | None, epochs: int, lr: float, batch_size: int = 2048,
            seed: int = 0) -> list[dict]:
        """AdamW on the head's parameters only (cosine from `lr` to 0); one log row per epoch."""
        mapper = self.collab.mapper
        params = [p for n, p in mapper.named_parameters() if n.startswith("on_logits_")]
        for n, p in mapper.named_parameters():
            p.requires_grad_(n.startswith("on_logits_"))
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        total, step, rows = epochs * math.ceil(len(train) / batch_size), 0, []
        for epoch in tqdm(range(epochs), desc="head refit", unit="epoch"):
            order, seen = torch.randperm(len(train), generator=generator), 0.0
            for start in range(0, len(train), batch_size):
                idx = order[start:start + batch_size]
                ce, soft = self.losses(train, idx)
                loss = ce.mean() + self.distill_weight * soft.mean()
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                seen += float(loss.detach()) * len(idx)
            row = {"epoch": epoch + 1, "train_loss": round(seen / len(train), 4)}
            if valid is not None:
                row["valid"] = self.held_out(valid)
            log.info("head refit %s", row)
            rows.append(row)
        for p in mapper.parameters():
            p.requires_grad_(False)
        return rows

    def fit_averaged(self, train: HeadFeatures, valid: HeadFeatures | None, epochs: int, lr: float, seeds: int,
                     first_seed: int = 0) -> list[list[dict]]:
        """`fit` once per seed (batch order), each from the same starting head, then the head set to the mean of
        the fitted ones: the fits share their start and their features, so their mean is a head of the same kind,
        with less of any one batch order's noise (on ML-100K single fits moved valid NDCG@10 by 0% to +2.6%)."""
        head = {n: p for n, p in self.collab.mapper.named_parameters() if n.startswith("on_logits_")}
        start = {n: p.detach().clone() for n, p in head.items()}
        total = {n: torch.zeros_like(p) for n, p in head.items()}
        logs = []
        for seed in range(first_seed, first_seed + seeds):
            with torch.no_grad():
                for n, p in head.items():
                    p.copy_(start[n])
            logs.append(self.fit(train, valid, epochs, lr, seed=seed))
            for n, p in head.items():
                total[n] += p.detach()
        with torch.no_grad():
            for n, p in head.items():
                p.copy_(total[n] / seeds)
        return logs


def _per_level(nll: torch.Tensor, levels: torch.Tensor) -> dict[str, float]:
    per_level = [float(nll[levels == level].mean()) for level in range(int(levels.max()) + 1)]
    return {"nll_per_level": [round(v, 4) for v in per_level], "nll_per_item": round(sum(per_level), 4)}
