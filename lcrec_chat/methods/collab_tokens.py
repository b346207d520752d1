"""Collaborative vectors as LLM input tokens: the piece CoLLM uses (and LC-Rec can reuse).

A collaborative model (SASRec, or a matrix factorisation fitted here) gives a vector per user history and per
item. `CollabMapper`, a small MLP, maps such vectors into the LLM's token-embedding space, and
`embed_with_collab` builds the LLM's `inputs_embeds` from token ids in which a reserved placeholder id marks
the positions to fill with mapped vectors (row-major order: row 0's placeholders first, left to right).

Choices made here:
- Placeholder: an existing special token that movie text never contains, so neither the tokenizer nor the
  embedding matrix changes (no resize, nothing extra in the saved adapter). For SmolLM2 that is
  ``<gh_stars>`` (id 7, a marker of its GitHub pretraining data). Its own embedding row is never read: every
  occurrence is replaced. Prompts are assembled from token ids with the placeholder id inserted directly, so
  its text form only matters to callers that tokenize text containing it (`placeholder_id` checks it is one id).
- The mapper normalises its input (LayerNorm: SASRec's user states and item embeddings differ in scale by
  several times, and one mapper serves both) and rescales its output to the mean norm of the LLM's ordinary
  token embeddings, so mapped vectors enter at the scale the first layer expects.
- Sources (`CollabSource`): `user_vectors(histories)` [B, D] and `item_vectors()` [N, D], dot-product
  compatible (the source's own score of item i for a history is their dot product).
  - `SASRecSource`: the final state of a trained `SequentialRecommender` over the history (the vector SASRec
    scores with), and its item embedding table.
  - `MFSource`: a matrix factorisation fitted here with BPR on the training windows, whose user factor is the
    mean of the history items' factors (an asymmetric MF, as FISM, Kabbur et al. 2013). We state it so:
    a history's user vector is the mean of its items' history-side factors, never a user's own row, because
    the evaluated histories and the app's users come without a fitted user row; the same rule is used when
    fitting, so training and scoring agree. Item vectors are the target-side factors.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lcrec_chat.data.split import Split

log = logging.getLogger(__name__)

# Tried in order; the first that the tokenizer knows as one id is the placeholder (SmolLM2, Llama 3, Qwen 2).
PLACEHOLDER_CANDIDATES = ("<gh_stars>", "<|reserved_special_token_0|>", "<|fim_pad|>")


class CollabError(ValueError):
    """Collaborative vectors that do not fit the prompt or the model."""


# ---------------------------------------------------------------------------------- token side

def placeholder_id(tokenizer, candidates: Sequence[str] = PLACEHOLDER_CANDIDATES) -> tuple[str, int]:
    """(token text, id) of the first candidate the tokenizer encodes as exactly one known id."""
    vocab = tokenizer.get_vocab()
    for token in candidates:
        if token in vocab and tokenizer.encode(token, add_special_tokens=False) == [vocab[token]]:
            return token, vocab[token]
    raise CollabError(f"none of {list(candidates)} is a single token of this tokenizer; pass another placeholder")


def token_embedding_norm(model) -> float:
    """Mean L2 norm of the rows of the model's input embedding matrix."""
    with torch.no_grad():
        return float(model.get_input_embeddings().weight.float().norm(dim=1).mean())


class CollabMapper(nn.Module):
    """collab_dim -> hidden -> token_dim: LayerNorm, Linear, GELU, Linear, then each output row rescaled to
    norm `token_norm` (the mean norm of ordinary token embeddings).

    With `code_levels` > 0 it also gives, per vector, one addition for each of the `code_levels` code tokens
    that follow its placeholder (`code_vectors`; LC-Rec's collaborative prompt, collab_prompt.py): a linear map
    of the normalised vector, zero at the start, so a mapper continued with it begins as the one it came from.

    With `logit_levels` > 0 (train.collab_head) it gives, per vector, one vector for each code level that is added
    to the model's last hidden state where it writes that level's code after the vector's placeholder
    (`logit_vectors`): through the tied output head, a learned map of the state onto the code logits, beside the
    model's own. Linear and zero at the start, as the additions on the code tokens.

    With `prefix_tokens` (the code token ids) and `prefix_width` > 0 (train.collab_head_width), the head also has a
    small MLP per level of the state and the code tokens already written (`prefix_vectors`): one linear map of the
    state per level cannot rank a level's codes differently under each prefix, and the second and third code tokens
    are shared by every prefix (bench/code_learnability.py: such an MLP learns SASRec's code conditionals to 0.128
    valid NDCG@10, a linear map to 0.108). Its last layer starts at zero.

    With `head_extra_dim` > 0 (train.head_refit_sources) the head (not the prompt) also reads other sequential models'
    states: `logit_vectors` and `prefix_vectors` then take vectors of width collab_dim + head_extra_dim, the prompt's
    state first, and add a linear map of the rest (its own LayerNorm) to each; zero at the start.

    Every method takes the head's input layout (width collab_dim + head_extra_dim, the prompt's state first), so one
    pass of the sequential models serves the prompt and the head. `forward` and `code_vectors` read only the
    prompt's own state, unless `prompt_reads_extra` (train.prompt_reads_head_sources): then `forward` adds a linear
    map of the extra states (its own LayerNorm) to the first layer's output, before the GELU; zero at the start, so
    a mapper continued with it maps as the one it came from."""

    def __init__(self, collab_dim: int, token_dim: int, token_norm: float, hidden: int = 256,
                 code_levels: int = 0, logit_levels: int = 0, prefix_tokens: Sequence[int] = (),
                 prefix_width: int = 0, head_extra_dim: int = 0, prompt_reads_extra: bool = False) -> None:
        super().__init__()
        self.collab_dim, self.token_dim, self.hidden, self.code_levels = collab_dim, token_dim, hidden, code_levels
        self.logit_levels, self.head_extra_dim = logit_levels, head_extra_dim
        self.prompt_reads_extra = prompt_reads_extra
        self.net = nn.Sequential(nn.LayerNorm(collab_dim), nn.Linear(collab_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, token_dim))
        self.register_buffer("token_norm", torch.tensor(float(token_norm)))
        if code_levels:   # zeros made directly: an nn.Linear's random init would move the run's random stream
            self.on_codes_weight = nn.Parameter(torch.zeros(code_levels * token_dim, collab_dim))
            self.on_codes_bias = nn.Parameter(torch.zeros(code_levels * token_dim))
        if logit_levels:
            self.on_logits_weight = nn.Parameter(torch.zeros(logit_levels * token_dim, collab_dim))
            self.on_logits_bias = nn.Parameter(torch.zeros(logit_levels * token_dim))
        self.prefix_width = prefix_width
        if prefix_width:
            if not logit_levels or not len(prefix_tokens):
                raise CollabError("a prefix head needs logit_levels and the code token ids")
            # its own random stream: building the head must not move the run's (LoRA init, batches)
            rng = torch.Generator().manual_seed(0)
            tokens = sorted(set(prefix_tokens))   # a code token's row is its position here (prefix_vectors)
            levels, count, w = logit_levels, len(tokens), prefix_width

            def uniform(*shape: int, fan_in: int) -> torch.Tensor:
                return (torch.rand(*shape, generator=rng) * 2 - 1) / fan_in ** 0.5
            self.register_buffer("on_logits_prefix_tokens", torch.tensor(tokens))
            self.on_logits_prefix_in = nn.Parameter(uniform(levels, w, collab_dim, fan_in=collab_dim))
            self.on_logits_prefix_embed = nn.Parameter(uniform(levels, count, w, fan_in=max(1, levels - 1)))
            self.on_logits_prefix_mid = nn.Parameter(uniform(levels, w, w, fan_in=w))
            self.on_logits_prefix_bias = nn.Parameter(torch.zeros(levels, 2, w))
            self.on_logits_prefix_out = nn.Parameter(torch.zeros(levels, token_dim, w))
        if head_extra_dim:
            if not logit_levels:
                raise CollabError("a head's extra states need logit_levels")
            self.on_logits_extra_norm = nn.LayerNorm(head_extra_dim)
            self.on_logits_extra_weight = nn.Parameter(torch.zeros(logit_levels * token_dim, head_extra_dim))
            if prefix_width:
                self.on_logits_prefix_extra_in = nn.Parameter(torch.zeros(logit_levels, prefix_width, head_extra_dim))
        if prompt_reads_extra:   # trains with the mapper's own weights (train.mapper_lr), not with the head
            if not head_extra_dim:
                raise CollabError("the prompt can read extra states only where the head has some (head_extra_dim)")
            self.prompt_extra_norm = nn.LayerNorm(head_extra_dim)
            self.prompt_extra_in = nn.Parameter(torch.zeros(hidden, head_extra_dim))

    def _on_device(self, vectors: torch.Tensor) -> torch.Tensor:
        """`vectors` in fp32 on the mapper's device (the sequential models give CPU states; a trained mapper may
        sit on the GPU beside the LoRA)."""
        return vectors.to(self.token_norm.device, torch.float32)

    def _split(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the prompt's own states, the extra states or None) of input vectors, in fp32 on the mapper's device."""
        width = self.collab_dim + self.head_extra_dim
        if vectors.shape[-1] != width:
            raise CollabError(f"the mapper reads vectors of width {width} (collab_dim {self.collab_dim} + the head's "
                              f"extra states {self.head_extra_dim}), not {vectors.shape[-1]}")
        vectors = self._on_device(vectors)
        return vectors[..., :self.collab_dim], (vectors[..., self.collab_dim:] if self.head_extra_dim else None)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """[P, token_dim]: the placeholders' input embeddings of P input vectors."""
        own, extra = self._split(vectors)
        first = self.net[1](self.net[0](own))
        if self.prompt_reads_extra:
            first = first + F.linear(self.prompt_extra_norm(extra), self.prompt_extra_in)
        out = self.net[3](self.net[2](first))
        return F.normalize(out, dim=-1, eps=1e-8) * self.token_norm

    def code_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """[P, code_levels, token_dim]: what each of the code tokens after a vector's placeholder adds (from the
        prompt's own state)."""
        if not self.code_levels:
            raise CollabError("this mapper was built without code_levels")
        out = F.linear(self.net[0](self._split(vectors)[0]), self.on_codes_weight, self.on_codes_bias)
        return out.view(len(vectors), self.code_levels, self.token_dim)

    def _head_inputs(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the normalised prompt state, the normalised extra states or None) of the head's input vectors."""
        own, extra = self._split(vectors)
        return self.net[0](own), (None if extra is None else self.on_logits_extra_norm(extra))

    def logit_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """[P, logit_levels, token_dim]: what the last hidden state gets where each level's code is written after
        a vector's placeholder (`vectors`: the head's input, see `head_extra_dim`)."""
        if not self.logit_levels:
            raise CollabError("this mapper was built without logit_levels")
        own, extra = self._head_inputs(vectors)
        out = F.linear(own, self.on_logits_weight, self.on_logits_bias)
        if extra is not None:
            out = out + F.linear(extra, self.on_logits_extra_weight)
        return out.view(len(vectors), self.logit_levels, self.token_dim)

    def prefix_vectors(self, vectors: torch.Tensor, level: int, prefix: torch.Tensor) -> torch.Tensor:
        """[R, token_dim]: what the prefix head adds to the last hidden state where a level-`level` code is written
        after R head inputs [R, collab_dim + head_extra_dim] whose item's first `level` code tokens are `prefix`
        [R, level] (token ids)."""
        if not self.prefix_width:
            raise CollabError("this mapper was built without a prefix head")
        own, extra = self._head_inputs(vectors)
        x = F.linear(own, self.on_logits_prefix_in[level], self.on_logits_prefix_bias[level, 0])
        if extra is not None:
            x = x + F.linear(extra, self.on_logits_prefix_extra_in[level])
        if level:
            # the sorted code token ids: a token's position is its row (a non-code token past the last fails loudly)
            rows = torch.searchsorted(self.on_logits_prefix_tokens, prefix.to(self.on_logits_prefix_tokens.device))
            x = x + self.on_logits_prefix_embed[level][rows].sum(1)
        x = F.gelu(F.linear(F.gelu(x), self.on_logits_prefix_mid[level], self.on_logits_prefix_bias[level, 1]))
        return F.linear(x, self.on_logits_prefix_out[level])


def embed_with_collab(model, input_ids: torch.Tensor, placeholder: int,
                      collab_vectors: torch.Tensor | None = None,
                      code_vectors: torch.Tensor | None = None) -> torch.Tensor:
    """`inputs_embeds` [B, L, H] for `input_ids` [B, L]: the token embeddings, except that the placeholder
    positions (row-major order) hold the rows of `collab_vectors` [P, H] (already mapped to token space), and,
    with `code_vectors` [P, levels, H] (`CollabMapper.code_vectors`), the j-th placeholder's row l is added at the
    l-th position after it: the code tokens of the item that follows that state (positions past a row's end are
    left out).

    Differentiable in both (training tunes the mapper through it). With no placeholders, `collab_vectors` may be
    None or empty.
    """
    embeds = model.get_input_embeddings()(input_ids)
    mask = input_ids == placeholder
    count = int(mask.sum())
    given = 0 if collab_vectors is None else collab_vectors.shape[0]
    if count != given:
        raise CollabError(f"{count} placeholder positions but {given} collaborative vectors")
    if count == 0:
        return embeds
    if collab_vectors.shape[-1] != embeds.shape[-1]:
        raise CollabError(f"collaborative vectors have width {collab_vectors.shape[-1]}, "
                          f"token embeddings {embeds.shape[-1]}")
    # a mapper served on the CPU beside a model on the GPU (head_refit, decoding) gives CPU vectors
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), collab_vectors.to(embeds.device, embeds.dtype))
    if code_vectors is None:
        return embeds
    if len(code_vectors) != count:
        raise CollabError(f"{count} placeholders but code additions for {len(code_vectors)}")
    rows, cols = mask.nonzero(as_tuple=True)
    for level in range(code_vectors.shape[1]):
        at = cols + 1 + level
        inside = at < input_ids.shape[1]
        embeds = embeds.index_put((rows[inside], at[inside]),
                                  code_vectors[inside.to(code_vectors.device), level].to(embeds.device, embeds.dtype),
                                  accumulate=True)
    return embeds


# ---------------------------------------------------------------------------------- sources

@runtime_checkable
class CollabSource(Protocol):
    """Vectors of a collaborative model: a history's user vector and every item's vector, dot-compatible."""

    kind: str
    dim: int
    num_items: int

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:   # [B, dim], float32, CPU
        ...

    def item_vectors(self) -> torch.Tensor:                                        # [num_items, dim]
        ...


def source_scores(source: CollabSource, histories: Sequence[Sequence[int]],
                  candidates: Sequence[Sequence[int]]) -> torch.Tensor:
    """The source's own score (dot product) of each history's candidates: [B, C]."""
    users = source.user_vectors(histories)
    items = source.item_vectors()[torch.as_tensor([list(c) for c in candidates], dtype=torch.long)]
    return (items * users.unsqueeze(1)).sum(-1)


class SASRecSource:
    """User vector = the final state of a trained `SequentialRecommender` (SASRec or GRU4Rec) after the history
    (what it scores the catalogue with); item vectors = its item embedding table (padding row left out)."""

    kind = "sasrec"

    def __init__(self, model) -> None:
        if getattr(model, "net", None) is None:
            raise CollabError("SASRecSource needs a fitted SequentialRecommender")
        self.model = model
        self.model.net.eval()
        self.num_items = int(model.num_items)
        with torch.no_grad():
            self._items = model.net.item_emb.weight[1:].detach().float().cpu().clone()
        self.dim = int(self._items.shape[1])

    @classmethod
    def load(cls, path: str | Path) -> "SASRecSource":
        from lcrec_chat.baselines import SequentialRecommender
        return cls(SequentialRecommender.load(path))

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        self.model._check_histories(histories)
        net = self.model.net
        net.eval()
        device = next(net.parameters()).device
        return net(self.model.sequences(histories).to(device), last=1)[:, -1].float().cpu()

    @torch.no_grad()
    def states_after_each(self, histories: Sequence[Sequence[int]], own_prefix: bool = False) -> list[torch.Tensor]:
        """Per history, the state after each of its items, [len(history), dim]; the last row is `user_vectors`'.

        By default each row is the state at that item's place in one left-padded pass over the whole history (one
        pass per history). A transformer trained on the last places of left-padded windows (SASRec: the last
        `stride`) reads an item's earlier place with position embeddings it was never trained to predict from:
        on ML-100K's full training windows SASRec's next-item NDCG@10 from places 0-14 is 0.091 that way and 0.109
        from each prefix on its own (places 15-19 alike, 0.132); GRU4Rec, which reads its padding too, 0.097 and
        0.093 (bench/state_positions.py). `own_prefix` gives the prefix's own: row k is the state of the first k+1
        items as a history of their own (one pass per item)."""
        self.model._check_histories(histories)
        max_len = self.model.max_len
        if any(len(h) > max_len for h in histories):
            raise CollabError(f"a history longer than the model's {max_len} items has no state for each item")
        net = self.model.net
        net.eval()
        device = next(net.parameters()).device
        if own_prefix:
            prefixes = [list(h[:k + 1]) for h in histories for k in range(len(h))]
            if not prefixes:
                return [torch.zeros(0, self.dim) for _ in histories]
            states = net(self.model.sequences(prefixes).to(device), last=1)[:, -1].float().cpu()
            return list(states.split([len(h) for h in histories]))
        states = net(self.model.sequences(histories).to(device), last=max_len).float().cpu()   # left-padded
        return [states[row, max_len - len(h):] for row, h in enumerate(histories)]

    def item_vectors(self) -> torch.Tensor:
        return self._items


class MFSource:
    """Asymmetric matrix factorisation: score(history, i) = mean_{j in history} P_j . Q_i, BPR-trained on every
    training window (the previous `window` items -> the next item, one uniformly sampled negative the user
    never had in training). User vector = that mean of P rows; item vectors = Q."""

    kind = "mf"

    def __init__(self, history_factors: torch.Tensor, item_factors: torch.Tensor, window: int = 20) -> None:
        if history_factors.shape != item_factors.shape:
            raise CollabError(f"factor tables differ: {tuple(history_factors.shape)} vs {tuple(item_factors.shape)}")
        self.p = history_factors.detach().float().cpu()
        self.q = item_factors.detach().float().cpu()
        self.num_items, self.dim = self.q.shape
        self.window = window
        self.fit_log: list[dict[str, float]] = []

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        out = torch.zeros(len(histories), self.dim)
        for row, items in enumerate(histories):
            items = list(items)[-self.window:]
            if any(not 0 <= i < self.num_items for i in items):
                raise CollabError(f"history {row} holds an item outside 0..{self.num_items - 1}")
            if items:
                out[row] = self.p[items].mean(0)
        return out

    def item_vectors(self) -> torch.Tensor:
        return self.q

    def save(self, path: str | Path) -> None:
        torch.save({"kind": self.kind, "p": self.p, "q": self.q, "window": self.window,
                    "fit_log": self.fit_log}, path)

    @classmethod
    def load(cls, path: str | Path) -> "MFSource":
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("kind") != cls.kind:
            raise CollabError(f"{path}: not a saved MFSource")
        source = cls(saved["p"], saved["q"], saved["window"])
        source.fit_log = saved.get("fit_log", [])
        return source

    @classmethod
    def fit(cls, split: Split, num_items: int, dim: int = 64, window: int = 20, seconds: float = 10.0,
            epochs: int = 30, lr: float = 5e-3, batch_size: int = 1024, weight_decay: float = 1e-6,
            seed: int = 42) -> "MFSource":
        """BPR over every training window until `epochs` or `seconds` of wall time run out (a few seconds on
        ML-100K). Deterministic for a seed; leaves the global torch RNG untouched."""
        hist, pos, owner, seen = _mf_windows(split.train_sequences(), window)
        rng = np.random.default_rng(seed)
        start, log_rows = time.perf_counter(), []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            p = nn.Embedding(num_items + 1, dim, padding_idx=0)   # row 0: padding of short histories
            q = nn.Embedding(num_items, dim)
            for table in (p, q):
                nn.init.normal_(table.weight, std=0.1)
            with torch.no_grad():
                p.weight[0].zero_()
            opt = torch.optim.Adam([*p.parameters(), *q.parameters()], lr=lr, weight_decay=weight_decay)
            for epoch in range(1, epochs + 1):
                neg = torch.as_tensor(_sample_unseen(rng, owner, seen, num_items))
                order = torch.randperm(len(pos))
                total = 0.0
                for b in range(0, len(order), batch_size):
                    idx = order[b:b + batch_size]
                    h = hist[idx]
                    user = p(h).sum(1) / (h > 0).sum(1, keepdim=True).clamp(min=1)
                    diff = (user * (q(pos[idx]) - q(neg[idx]))).sum(-1)
                    loss = -F.logsigmoid(diff).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                log_rows.append({"epoch": epoch, "loss": total / len(order)})
                if time.perf_counter() - start > seconds:
                    break
        source = cls(p.weight[1:], q.weight, window)
        source.fit_log = log_rows
        log.info("MF (BPR, dim %d): %d epochs in %.1f s, loss %.4f -> %.4f", dim, len(log_rows),
                 time.perf_counter() - start, log_rows[0]["loss"], log_rows[-1]["loss"])
        return source


def _mf_windows(sequences: Sequence[Sequence[int]], window: int
                ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[set[int]]]:
    """(history [W, window] of item + 1 left-padded with 0, next item [W], owning sequence [W], item sets)."""
    hist, pos, owner = [], [], []
    for s, seq in enumerate(sequences):
        for t in range(1, len(seq)):
            h = [i + 1 for i in seq[max(0, t - window):t]]
            hist.append([0] * (window - len(h)) + h)
            pos.append(seq[t])
            owner.append(s)
    if not pos:
        raise CollabError("no training sequence has two or more items; there is nothing to fit")
    return (torch.tensor(hist), torch.tensor(pos), np.asarray(owner), [set(s) for s in sequences])


def _sample_unseen(rng: np.random.Generator, owner: np.ndarray, seen: list[set[int]], num_items: int
                   ) -> np.ndarray:
    """One uniform item per row that its owner never had (rejection; rows whose owner had every item keep
    their draw)."""
    draw = rng.integers(0, num_items, size=len(owner))
    for row in range(len(owner)):
        items = seen[owner[row]]
        for _ in range(100):
            if int(draw[row]) not in items:
                break
            draw[row] = rng.integers(0, num_items)
    return draw


def make_source(kind: str, split: Split | None = None, num_items: int = 0, sasrec_path: str | Path | None = None,
                seed: int = 42, **mf_options) -> CollabSource:
    """The source CoLLMConfig.collab names: "sasrec" loads `sasrec_path` (the baselines stage's sasrec.pt);
    "mf" fits an `MFSource` on `split` (options: those of `MFSource.fit`)."""
    if kind == "sasrec":
        if sasrec_path is None:
            raise CollabError("collab=sasrec needs the path of a saved SASRec (sasrec.pt)")
        return SASRecSource.load(sasrec_path)
    if kind == "mf":
        if split is None or num_items < 1:
            raise CollabError("collab=mf needs the split and the item count to fit on")
        return MFSource.fit(split, num_items, seed=seed, **mf_options)
    raise CollabError(f"collab must be sasrec or mf, not {kind!r}")
