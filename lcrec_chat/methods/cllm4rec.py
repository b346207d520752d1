"""CLLM4Rec (Zhu et al., WWW 2024, "Collaborative Large Language Model for Recommender Systems").

The LLM's vocabulary grows by one token per user (<user_u>) and per item (<item_i>), each with TWO rows: a
collaborative row and a content row (the backbone and its LoRA are shared by both). Nothing is added to the
tokenizer: the rows are our own parameters, placed at the right positions of `inputs_embeds`.

1. Pretraining, soft+hard prompts, two document kinds mixed batch by batch (one kind per batch):
   - collaborative: "<user_u> has interacted with <item_a> <item_b> ..." (collaborative rows). Loss: next-token
     prediction of the item tokens only, with the softmax over the collaborative item rows (hidden @ item_collab.T);
   - content: "<item_i> is a movie titled Toy Story (1995), genres: Animation, Comedy" (the content row), ordinary
     LM loss on the text tokens (LM head applied to the labelled positions only);
   - mutual regularisation, every step: reg_weight * mean over users and items of ||collab row - content row||^2
     (the paper's Gaussian priors that tie the two embeddings).
2. Fine-tuning for recommendation: "<user_u> has interacted with <item_a> ... <item_z> the user will interact with";
   the last hidden state times the collaborative item rows scores the whole catalogue in ONE forward pass.
   Trained with softmax cross-entropy over all items on windows of `window` + 1 training items in which every
   position predicts its next item causally (items' own positions for the inner targets, the prompt's last token
   for the window's last item), so each training item is a target once per epoch.

Choices where the paper leaves room (or where we depart from it, for a CPU):
- new rows start from the mean input embedding of the item's title tokens (collaborative and content alike, so
  they start tied); a user starts from the mean of their training items' rows (the mean item if none);
- collaborative documents are chunks of `window` items of a user's training sequence, not the whole sequence;
- the item head is the collaborative item rows themselves (weights tied with the input rows), no extra layer;
- fine-tuning keeps the mutual regularisation, with the content rows as a fixed prior (no content documents);
- a share (`no_user_share`, 20 %) of fine-tuning windows leaves the user token out, so a history alone (a new
  person in the chat app, `score(histories)` without `users`) is scored by the same prompt minus that token;
- budgets are wall time: shuffled batches until the minutes, `max_epochs` passes or `max_steps` run out; constant
  learning rates (AdamW, no weight decay: LoRA at `lr`, the token rows at `token_lr`), gradients clipped at 1.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lcrec_chat import backbone
from lcrec_chat.config import CLLM4RecConfig, ModelConfig
from lcrec_chat.data.split import Split
from lcrec_chat.metrics import ranked_row, stage_inputs, topk_from_scores
from lcrec_chat.ranking import Ranker

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS, SETTINGS, ITEMS = "cllm4rec.pt", "cllm4rec.json", "items.json"
TEXT = -1   # row reference of a position that holds an ordinary token (its own embedding)

# A document: (token ids, row references). A reference >= 0 replaces the token's embedding with row `ref` of
# cat([user rows, item rows]) (users first, so item i is row num_users + i); TEXT keeps the token's embedding.
Doc = tuple[list[int], list[int]]


class TokenRows(nn.Module):
    """The new tokens' embeddings: a collaborative and a content row per user and per item."""

    def __init__(self, num_users: int, num_items: int, hidden: int):
        super().__init__()
        self.user_collab = nn.Parameter(torch.zeros(num_users, hidden))
        self.item_collab = nn.Parameter(torch.zeros(num_items, hidden))
        self.user_content = nn.Parameter(torch.zeros(num_users, hidden))
        self.item_content = nn.Parameter(torch.zeros(num_items, hidden))

    def table(self, kind: str) -> torch.Tensor:
        """[users + items, H]: the rows of one kind ("collab" or "content"), users first."""
        return torch.cat([getattr(self, f"user_{kind}"), getattr(self, f"item_{kind}")])

    def distance(self, detach_content: bool = False) -> torch.Tensor:
        """Mean over users and items of the squared distance between the collaborative and the content row."""
        content = self.table("content")
        return (self.table("collab") - (content.detach() if detach_content else content)).pow(2).sum(-1).mean()


class CLLM4Rec(Ranker):
    """CLLM4Rec on `model_cfg`'s backbone; `fit` pretrains then fine-tunes, `score` ranks the whole catalogue."""

    name = "cllm4rec"

    def __init__(self, cfg: CLLM4RecConfig, model_cfg: ModelConfig, items: Sequence[dict], num_users: int, *,
                 no_user_share: float = 0.2, max_epochs: int = 1, max_steps: int = 0, max_text_tokens: int = 48,
                 lora_dropout: float = 0.05, eval_batch_size: int = 64, item_kind: str = "movie",
                 progress: bool = True):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.items = [_item_text(it) for it in items]
        self.num_users, self.num_items = num_users, len(items)
        self.options = dict(no_user_share=no_user_share, max_epochs=max_epochs, max_steps=max_steps,
                            max_text_tokens=max_text_tokens, lora_dropout=lora_dropout,
                            eval_batch_size=eval_batch_size, item_kind=item_kind, progress=progress)
        self.device = backbone.resolve_device(model_cfg.device)
        self.tokenizer = backbone.load_tokenizer(model_cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.lm = self._with_lora(backbone.load_model(model_cfg, for_training=True), lora_dropout)
        base = self.lm.get_base_model()
        self.decoder, self.embed = base.get_decoder(), base.get_input_embeddings()
        self.lm_head = base.get_output_embeddings()
        self.rows = TokenRows(num_users, self.num_items, self.embed.weight.shape[1]).to(self.device)
        self._init_item_rows()
        self.interacted = self.tokenizer.encode(" has interacted with", add_special_tokens=False)
        self.will = self.tokenizer.encode(" the user will interact with", add_special_tokens=False)
        self.fit_summary: dict = {}
        self.curves: dict[str, list[dict]] = {"pretrain": [], "finetune": []}

    # ------------------------------------------------------------------------------------------ set-up

    def _with_lora(self, model: nn.Module, dropout: float) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        present = {name.split(".")[-1] for name, _ in model.named_modules()}
        lora = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=dropout, bias="none",
                          target_modules=[t for t in LORA_TARGETS if t in present], task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    @torch.no_grad()
    def _init_item_rows(self) -> None:
        """Both rows of an item: the mean input embedding of its title's tokens (the mean token if it has none)."""
        weight = self.embed.weight.float()
        rows = []
        for item in self.items:
            ids = self.tokenizer.encode(" " + item["title"], add_special_tokens=False)
            rows.append(weight[ids].mean(0) if ids else weight.mean(0))
        self.rows.item_collab.copy_(torch.stack(rows))
        self.rows.item_content.copy_(self.rows.item_collab)

    @torch.no_grad()
    def _init_user_rows(self, split: Split) -> None:
        """Both rows of a user: the mean of their training items' rows (the mean item if they have none)."""
        items = self.rows.item_collab
        for u, user in enumerate(split.users):
            self.rows.user_collab[u] = items[user.train].mean(0) if user.train else items.mean(0)
        self.rows.user_collab[len(split.users):] = items.mean(0)
        self.rows.user_content.copy_(self.rows.user_collab)

    # ------------------------------------------------------------------------------------------ documents

    def _user(self, user: int | None) -> Doc:
        return ([], []) if user is None else ([self.tokenizer.pad_token_id], [user])

    def _item_tokens(self, items: Sequence[int]) -> Doc:
        return [self.tokenizer.pad_token_id] * len(items), [self.num_users + i for i in items]

    @staticmethod
    def _text(ids: list[int]) -> Doc:
        return list(ids), [TEXT] * len(ids)

    @staticmethod
    def _join(*parts: Doc) -> Doc:
        return [t for ids, _ in parts for t in ids], [r for _, refs in parts for r in refs]

    def prompt(self, user: int | None, history: Sequence[int]) -> Doc:
        """The recommendation prompt: "[<user_u>] has interacted with <item_a> ... the user will interact with"."""
        return self._join(self._user(user), self._text(self.interacted),
                          self._item_tokens(list(history)[-self.cfg.window:]), self._text(self.will))

    def content_doc(self, item: int) -> Doc:
        """"<item_i> is a movie titled Toy Story (1995), genres: Animation, Comedy" (text capped in tokens)."""
        it = self.items[item]
        text = f" is a {self.options['item_kind']} titled {it['title']}"
        text += f" ({it['year']})" if it["year"] else ""
        text += f", genres: {', '.join(it['genres'])}" if it["genres"] else ""
        ids = self.tokenizer.encode(text, add_special_tokens=False)[:self.options["max_text_tokens"]]
        return self._join(self._item_tokens([item]), self._text(ids))

    def _collate(self, docs: list[Doc]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (ids, refs, attention mask), each [B, T]."""
        width = max(1, max(len(ids) for ids, _ in docs))
        ids = torch.full((len(docs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        refs = torch.full((len(docs), width), TEXT, dtype=torch.long)
        mask = torch.zeros((len(docs), width), dtype=torch.long)
        for b, (tok, ref) in enumerate(docs):
            ids[b, :len(tok)], refs[b, :len(ref)], mask[b, :len(tok)] = torch.tensor(tok), torch.tensor(ref), 1
        return ids.to(self.device), refs.to(self.device), mask.to(self.device)

    def _hidden(self, docs: list[Doc], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states [B, T, H] in fp32, attention mask) of the documents, new tokens from `kind` rows."""
        ids, refs, mask = self._collate(docs)
        text = self.embed(ids)
        rows = self.rows.table(kind)[refs.clamp(min=0)].to(text.dtype)
        embeds = torch.where((refs >= 0).unsqueeze(-1), rows, text)
        return self.decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float(), mask

    def _item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.rows.item_collab.T

    # ------------------------------------------------------------------------------------------ losses

    def _collab_loss(self, docs: list[tuple[int | None, list[int]]]) -> torch.Tensor:
        """Next-item prediction of the item tokens of collaborative documents, softmax over the items only."""
        batch, rows, cols, targets = [], [], [], []
        for b, (user, items) in enumerate(docs):
            head = self._join(self._user(user), self._text(self.interacted))
            batch.append(self._join(head, self._item_tokens(items)))
            start = len(head[0])   # position of the first item; the position before it predicts it
            rows += [b] * len(items)
            cols += range(start - 1, start - 1 + len(items))
            targets += items
        hidden, _ = self._hidden(batch, "collab")
        return F.cross_entropy(self._item_logits(hidden[rows, cols]), torch.tensor(targets, device=self.device))

    def _content_loss(self, items: list[int]) -> torch.Tensor:
        """LM loss of the text of content documents, from the LM head on the labelled positions only."""
        docs = [self.content_doc(i) for i in items]
        hidden, mask = self._hidden(docs, "content")
        ids, _, _ = self._collate(docs)
        labelled = mask[:, 1:].bool()   # every next token after the item token is a text token
        logits = self.lm_head(hidden[:, :-1][labelled].to(self.lm_head.weight.dtype)).float()
        return F.cross_entropy(logits, ids[:, 1:][labelled])

    def _finetune_loss(self, windows: list[tuple[int | None, list[int]]]) -> torch.Tensor:
        """Softmax over all items: each item of a window predicts the next one, the prompt's end the last one."""
        docs, rows, cols, targets = [], [], [], []
        for b, (user, items) in enumerate(windows):
            history, last = items[:-1], items[-1]
            doc = self.prompt(user, history)
            start = len(self._user(user)[0]) + len(self.interacted)
            docs.append(doc)
            rows += [b] * len(history)
            cols += [*range(start, start + len(history) - 1), len(doc[0]) - 1]
            targets += [*history[1:], last]
        hidden, _ = self._hidden(docs, "collab")
        return F.cross_entropy(self._item_logits(hidden[rows, cols]), torch.tensor(targets, device=self.device))

    # ------------------------------------------------------------------------------------------ training

    def fit(self, split: Split, num_items: int) -> "CLLM4Rec":
        """Pretrain (collaborative + content documents + mutual regularisation), then fine-tune."""
        if num_items != self.num_items:
            raise ValueError(f"fit: {num_items} items but the model was built for {self.num_items}")
        if len(split.users) > self.num_users:
            raise ValueError(f"fit: the split has {len(split.users)} users but the model has {self.num_users} rows")
        self._init_user_rows(split)
        w = self.cfg.window
        users = [(u, s.train) for u, s in enumerate(split.users)] + [(None, s) for s in split.train_only.values()]
        # collaborative documents: chunks of `window` items; fine-tuning windows: `window` + 1 items ending every
        # `window` items from the end, so consecutive windows share one item and each item is a target once
        chunks = [(u, seq[i:i + w]) for u, seq in users for i in range(0, len(seq), w)]
        windows = [(u, seq[max(0, end - w - 1):end]) for u, seq in users if len(seq) >= 2
                   for end in range(len(seq), 1, -w)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            pre = self._stage("pretrain", self.cfg.pretrain_minutes, self._pretrain_batches(chunks),
                              self._pretrain_step)
            fine = self._stage("finetune", self.cfg.finetune_minutes, self._finetune_batches(windows),
                               self._finetune_step)
        self.fit_summary = {"pretrain": {**pre, "collab_docs": len(chunks), "content_docs": self.num_items},
                            "finetune": {**fine, "windows": len(windows),
                                         "targets": sum(len(x) - 1 for _, x in windows)},
                            "trainable_params": sum(p.numel() for p in self._parameters()),
                            "distance": self.rows.distance().item()}
        log.info("cllm4rec fitted: %s", self.fit_summary)
        return self

    def _pretrain_batches(self, chunks: list) -> Callable[[random.Random], list[tuple[str, list]]]:
        def epoch(rng: random.Random) -> list[tuple[str, list]]:
            docs, items = rng.sample(chunks, len(chunks)), rng.sample(range(self.num_items), self.num_items)
            batches = [("collab", b) for b in _batched(docs, self.cfg.batch_size)]
            batches += [("content", b) for b in _batched(items, self.cfg.batch_size)]
            return rng.sample(batches, len(batches))
        return epoch

    def _finetune_batches(self, windows: list) -> Callable[[random.Random], list[tuple[str, list]]]:
        def epoch(rng: random.Random) -> list[tuple[str, list]]:
            share = self.options["no_user_share"]
            drawn = [(None if rng.random() < share else u, x) for u, x in rng.sample(windows, len(windows))]
            return [("rec", b) for b in _batched(drawn, self.cfg.batch_size)]
        return epoch

    def _pretrain_step(self, kind: str, batch: list) -> tuple[torch.Tensor, dict]:
        loss = self._collab_loss(batch) if kind == "collab" else self._content_loss(batch)
        reg = self.rows.distance()
        return loss + self.cfg.reg_weight * reg, {kind: loss.item(), "reg": reg.item()}

    def _finetune_step(self, kind: str, batch: list) -> tuple[torch.Tensor, dict]:
        loss = self._finetune_loss(batch)
        reg = self.rows.distance(detach_content=True)
        return loss + self.cfg.reg_weight * reg, {kind: loss.item(), "reg": reg.item()}

    def _parameters(self) -> list[nn.Parameter]:
        return [p for p in self.lm.parameters() if p.requires_grad]

    def _stage(self, name: str, minutes: float, epoch_batches: Callable, step_fn: Callable) -> dict:
        """Shuffled batches until the wall-time budget, `max_epochs` passes or `max_steps` steps run out."""
        curve, start, steps = self.curves[name], time.perf_counter(), 0
        curve.clear()
        if minutes <= 0:
            return {"seconds": 0.0, "steps": 0, "epochs": 0}
        optimizer = torch.optim.AdamW([{"params": self._parameters(), "lr": self.cfg.lr},
                                       {"params": list(self.rows.parameters()), "lr": self.cfg.token_lr}],
                                      weight_decay=0.0)
        rng, deadline = random.Random(f"{self.cfg.seed}-{name}"), start + 60 * minutes
        max_steps, epochs = self.options["max_steps"], 0
        bar = tqdm(desc=f"cllm4rec {name}", unit="step", disable=not self.options["progress"])
        self.lm.train()
        done = False
        while not done and epochs < self.options["max_epochs"]:
            for kind, batch in epoch_batches(rng):
                if time.perf_counter() >= deadline or (max_steps and steps >= max_steps):
                    done = True
                    break
                loss, parts = step_fn(kind, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*self._parameters(), *self.rows.parameters()], 1.0)
                optimizer.step()
                steps += 1
                curve.append({"step": steps, "seconds": round(time.perf_counter() - start, 3), **parts})
                bar.update()
                bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
                if steps % 50 == 0:
                    log.info("cllm4rec %s step %d (%.0f s): %s", name, steps, time.perf_counter() - start, parts)
            else:
                epochs += 1
        bar.close()
        self.lm.eval()
        seconds = time.perf_counter() - start
        summary = {"seconds": round(seconds, 1), "steps": steps, "epochs": epochs,
                   "seconds_per_step": round(seconds / max(1, steps), 4)}
        for key in sorted({k for point in curve for k in point} - {"step", "seconds"}):
            tail = [p[key] for p in curve if key in p][-10:]
            summary[f"final_{key}"] = sum(tail) / len(tail)   # mean of the last 10 steps that report it
        log.info("cllm4rec %s: %s", name, summary)
        return summary

    # ------------------------------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]], users: Sequence[int] | None = None) -> torch.Tensor:
        """[B, num_items] scores: one forward pass per `eval_batch_size` histories; `users` (indices into
        split.users) put each user's token in the prompt, without them the prompt has no user token."""
        self._check_histories(histories)
        if users is not None:
            if len(users) != len(histories):
                raise ValueError(f"{len(histories)} histories but {len(users)} users")
            bad = [u for u in users if not 0 <= u < self.num_users]
            if bad:
                raise ValueError(f"user indices outside 0..{self.num_users - 1}: {bad[:5]}")
        self.lm.eval()
        size, out = self.options["eval_batch_size"], []
        for start in range(0, len(histories), size):
            part = histories[start:start + size]
            who = [None] * len(part) if users is None else list(users[start:start + size])
            hidden, mask = self._hidden([self.prompt(u, h) for u, h in zip(who, part)], "collab")
            last = hidden[torch.arange(len(part), device=self.device), mask.sum(1) - 1]
            out.append(self._item_logits(last).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_items)

    def recommend(self, histories: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]], k: int,
                  batch_size: int = 512, users: Sequence[int] | None = None) -> list[list[int]]:
        """Ranker.recommend, with the optional user indices passed on to `score`."""
        if len(histories) != len(exclude):
            raise ValueError(f"{len(histories)} histories but {len(exclude)} exclusion lists")
        out: list[list[int]] = []
        for s in range(0, len(histories), batch_size):
            who = None if users is None else users[s:s + batch_size]
            out += topk_from_scores(self.score(histories[s:s + batch_size], who), exclude[s:s + batch_size], k)
        return out

    # ------------------------------------------------------------------------------------------ persistence

    def save(self, folder: str | Path) -> None:
        """cllm4rec.pt (LoRA weights and the collaborative token rows), cllm4rec.json (settings, fit summary, curves),
        items.json. The content rows are left out: they only tie the collaborative rows during pretraining, and
        scoring never reads them (half the file: 16 instead of 22 MB for ML-100K); a loaded model cannot pretrain."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lora = {n: p.detach().cpu() for n, p in self.lm.named_parameters() if p.requires_grad}
        rows = {k: v.cpu() for k, v in self.rows.state_dict().items() if k.endswith("_collab")}
        torch.save({"lora": lora, "rows": rows}, folder / WEIGHTS)
        settings = {"method": self.name, "config": dataclasses.asdict(self.cfg), "base": self.model_cfg.base,
                    "num_users": self.num_users, "num_items": self.num_items, "options": self.options,
                    "fit_summary": self.fit_summary, "curves": self.curves}
        (folder / SETTINGS).write_text(json.dumps(settings, indent=1))
        (folder / ITEMS).write_text(json.dumps(self.items))

    @classmethod
    def load(cls, folder: str | Path, model_cfg: ModelConfig) -> "CLLM4Rec":
        """The model `save` wrote, on `model_cfg`'s backbone (which must be the one it was trained on)."""
        folder = Path(folder)
        settings = json.loads((folder / SETTINGS).read_text())
        if settings["base"] != model_cfg.base:
            raise ValueError(f"{folder} was trained on {settings['base']!r}, not {model_cfg.base!r}")
        model = cls(CLLM4RecConfig(**settings["config"]), model_cfg, json.loads((folder / ITEMS).read_text()),
                    settings["num_users"], **settings["options"])
        state = torch.load(folder / WEIGHTS, map_location=model.device, weights_only=True)
        params = dict(model.lm.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                params[name].copy_(value)
        missing, _ = model.rows.load_state_dict(state["rows"], strict=False)
        if any(k.endswith("_collab") for k in missing):
            raise ValueError(f"{folder / WEIGHTS} lacks the collaborative token rows {missing}")
        model.fit_summary, model.curves = settings["fit_summary"], settings["curves"]
        return model


def evaluate_with_users(model: CLLM4Rec, split: Split, stage: str, ks: Sequence[int] = (1, 5, 10),
                        max_users: int = 0) -> dict[str, float | int]:
    """`ranking.evaluate_ranker` with each user's token in the prompt (it passes histories only)."""
    histories, exclude, targets = stage_inputs(split, stage, max_users)
    ranked = model.recommend(histories, exclude, max(max(ks), 10), users=list(range(len(histories))))
    return ranked_row(ranked, targets, ks, split, model.num_items)


def _item_text(item) -> dict:
    """The fields a content document uses, from a catalogue dict or a `data.dataset.Item`."""
    get = item.get if isinstance(item, dict) else lambda key: getattr(item, key, None)
    return {"title": get("title") or "", "year": get("year"), "genres": list(get("genres") or [])}


def _batched(xs: list, size: int) -> list[list]:
    return [xs[i:i + size] for i in range(0, len(xs), size)]
