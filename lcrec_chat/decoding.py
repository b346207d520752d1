"""Trie-constrained generation of item codes: every returned code is a real, allowed item.

Two interchangeable ways to run the beam search over the L code tokens:

* ``method="loop"`` (default): our own loop. The prompt goes through the model once per request, its KV cache
  is then repeated for the beams; each of the L steps scores only the trie's candidate tokens of every beam
  (one gather) and keeps the best ``num_beams`` per request. ``generate`` instead repeats each prompt
  ``num_beams`` times *before* the prefill, so it pays the prompt ``num_beams`` times: for 20 beams and a
  150-token prompt that dominates the cost on CPU (see bench/decoding_bench.py). The loop also writes a
  preallocated KV cache in place and reorders only the few code positions when beams move.
* ``method="generate"``: ``model.generate`` beam search with :class:`TrieLogitsProcessor`, for parity with
  the library and for model classes whose cache our loop does not handle.

Both return the same beams (up to float ties); the score of an item is the sum of the log-probabilities of its
code tokens under the model, normalised over the whole vocabulary.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from .llama import KVCache
from .trie import CodeTrie, NoItemsLeft, TrieError, index_token  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

METHODS = ("loop", "generate")


class CollabInputs(NamedTuple):
    """What prompts with collaborative tokens put into the model (collab_prompt.py): the placeholder token id, per
    prompt the vectors of its placeholders [n_i, hidden] (in order), and optionally per prompt the additions on the
    code tokens after each placeholder [n_i, levels, hidden]; a prompt's last ones go on the codes decoding writes.
    `logit_vectors` (train.collab_head), per prompt [levels, hidden] or empty: added to the last hidden state
    where each level's code is written, i.e. the output head's image of it to that step's logits.
    `prefix_head` (train.collab_head_width): what each prompt's last state adds there given the codes written so far."""
    placeholder: int
    vectors: Sequence[torch.Tensor]
    code_vectors: Sequence[torch.Tensor] | None = None
    logit_vectors: Sequence[torch.Tensor] | None = None
    prefix_head: "PrefixHead | None" = None

    def rows(self, start: int, stop: int) -> "CollabInputs":
        return CollabInputs(self.placeholder, self.vectors[start:stop],
                            None if self.code_vectors is None else self.code_vectors[start:stop],
                            None if self.logit_vectors is None else self.logit_vectors[start:stop],
                            None if self.prefix_head is None else self.prefix_head.rows(start, stop))


class PrefixHead(NamedTuple):
    """Per prompt the state [collab_dim] (a zero row for a prompt without one, `present` False) and the map
    `head(states, level, prefix tokens) -> [R, hidden]` (CollabMapper.prefix_vectors) whose output is added to the
    last hidden state where the level's code is written."""
    head: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
    states: torch.Tensor
    present: torch.Tensor

    def rows(self, start: int, stop: int) -> "PrefixHead":
        return PrefixHead(self.head, self.states[start:stop], self.present[start:stop])

    @torch.no_grad()
    def __call__(self, request: torch.Tensor, level: int, written: torch.Tensor) -> torch.Tensor:
        """[R, hidden] for R beams of prompts `request` [R] that wrote the code tokens `written` [R, level]."""
        return self.head(self.states[request], level, written) * self.present[request, None]


class TrieLogitsProcessor:
    """Masks the scores of every beam to the code tokens that continue it towards an allowed item.

    ``prompt_length`` is the (left-padded) width of the prompt batch, ``num_beams`` the rows per request in
    ``generate``'s flattened ``(batch * num_beams, ...)`` layout, ``allowed`` an optional (B, num_items) bool
    mask. Each call derives every row's trie node from its generated tokens by table lookups (no state is
    carried between calls, so beam reordering cannot desynchronise it); after L code tokens only EOS remains.

    ``inplace=True`` masks ``scores`` itself instead of a fresh (rows, vocab) tensor: on CPU a new tensor of
    that size costs more than the masking (page faults). Safe in ``generate``'s beam search, which hands the
    processors a fresh log-softmax each step; not with greedy/sampling and ``output_logits=True``, which
    keep the very tensor the processors receive.
    """

    # a transformers LogitsProcessor by its call signature; not a subclass, so that importing this module (as
    # the app does) does not import transformers' generation code
    def __init__(self, trie: CodeTrie, prompt_length: int, num_beams: int, eos_token_id: int,
                 allowed: torch.Tensor | None = None, batch_size: int | None = None, inplace: bool = False):
        if allowed is None:
            if batch_size is None:
                raise ValueError("give either allowed (B, num_items) or batch_size")
            allowed = torch.ones(batch_size, trie.num_items, dtype=torch.bool)
        self.trie = trie
        self.prompt_length = prompt_length
        self.num_beams = num_beams
        self.eos_token_id = eos_token_id
        self.inplace = inplace
        self.counts = trie.alive(allowed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, expected = input_ids.shape[0], self.counts[0].shape[0] * self.num_beams
        if rows != expected:
            raise ValueError(f"TrieLogitsProcessor was built for {self.counts[0].shape[0]} requests x "
                             f"{self.num_beams} beams = {expected} rows, got {rows}")
        step = input_ids.shape[1] - self.prompt_length
        if step >= self.trie.depth:
            out = scores if self.inplace else torch.empty_like(scores)
            out.fill_(float("-inf"))[:, self.eos_token_id] = 0.0
            return out
        codes = self.trie.codes_of_tokens(input_ids[:, self.prompt_length:].cpu())
        nodes = self.trie.walk(codes)
        request = torch.arange(input_ids.shape[0]) // self.num_beams
        return self.trie.mask_scores(scores, nodes, step, self.counts[step + 1], request, inplace=self.inplace)


class GenerationStats:
    """What the beam search produced, counted before invalid or duplicate beams are dropped.

    ``sequences``: every returned beam (num_beams per request); ``valid``: those that are a real item of the
    catalogue with a finite score; ``duplicates``: valid beams repeating an item already in that request's list;
    ``short``: requests that got fewer than k items.
    """

    def __init__(self) -> None:
        self.sequences = self.valid = self.duplicates = self.requests = self.short = 0

    def add(self, items: torch.Tensor, scores: torch.Tensor, ranked: list[list[tuple[int, float]]],
            num_items: int, k: int) -> None:
        real = (items >= 0) & (items < num_items) & torch.isfinite(scores)
        self.sequences += items.numel()
        self.valid += int(real.sum())
        self.duplicates += int(real.sum()) - sum(len({i for i in row[ok].tolist()}) for row, ok in zip(items, real))
        self.requests += len(ranked)
        self.short += sum(len(r) < k for r in ranked)

    def as_dict(self) -> dict[str, float | int]:
        return {"valid_item_rate": self.valid / max(1, self.sequences), "generated_sequences": self.sequences,
                "duplicate_rate": self.duplicates / max(1, self.sequences),
                "short_list_rate": self.short / max(1, self.requests)}


class SharedPrefix:
    """The KV cache of the token prefix that prompts have in common (chat template, system prompt, instruction),
    computed once and copied into every later batch, so a prefill pays only for each prompt's own tokens.

    Keep one per model and pass it to :func:`generate_items` on every call. A causal model's KV of a prefix
    does not depend on what follows, so when a batch shares only part of the stored prefix the stored KV is
    cut to that part; when it shares less than ``min_tokens``, the batch's own common prefix replaces it.
    """

    def __init__(self, min_tokens: int = 8):
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.computed = 0   # how many times a prefix was run through the model (for tests and benchmarks)
        self._lock = threading.Lock()   # the app serves concurrent requests with one model

    def for_batch(self, model, token_lists: list[list[int]]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(P, per-layer (keys, values) of P tokens) that every prompt of the batch starts with; (0, []) if none."""
        own = _common_prefix(token_lists, limit=min(len(t) for t in token_lists) - 1)
        with self._lock:
            shared = _common_prefix([own, self.ids], limit=len(own))
            if len(shared) >= self.min_tokens:
                if len(shared) < len(self.ids):
                    self.ids = shared
                    self.layers = [(k[:, :, :len(shared)], v[:, :, :len(shared)]) for k, v in self.layers]
                return len(shared), self.layers
            if len(own) < self.min_tokens:
                return 0, []
            out = model(input_ids=torch.tensor([own], device=_device(model)), use_cache=True)
            self.ids, self.computed = own, self.computed + 1
            self.layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            return len(own), self.layers


def _common_prefix(lists: list[list[int]], limit: int) -> list[int]:
    first, n = lists[0], max(0, limit)
    for other in lists[1:]:
        n = min(n, len(other))
        for i in range(n):
            if other[i] != first[i]:
                n = i
                break
    return list(first[:n])


def generate_items(model, tokenizer, trie: CodeTrie, prompts: list[str], num_beams: int = 20, k: int = 10,
                   allowed: Sequence[torch.Tensor | None] | None = None, batch_size: int = 8,
                   method: str = "loop", shared_prefix: SharedPrefix | None = None,
                   prior: torch.Tensor | None = None, prior_weight: float | torch.Tensor = 0.0,
                   stats: GenerationStats | None = None,
                   collab: CollabInputs | tuple | None = None) -> list[list[tuple[int, float]]]:
    """Top-``k`` distinct allowed items for each prompt, best first, as (item index, summed code log-prob).

    ``prompts`` are fully formatted (chat template and response prefix included): the next tokens the model
    writes must be the item's L code tokens. ``allowed[i]`` is a (num_items,) bool mask for prompt i (None
    allows all). Each list has ``min(k, allowed items)`` entries. Raises :class:`NoItemsLeft` naming the first
    prompt with no allowed item. ``shared_prefix`` (loop only) reuses the KV of the prompts' common start.

    Hybrid decoding (loop only): ``prior`` (len(prompts), num_items) non-negative item weights, e.g. a sequential
    model's next-item probabilities. Each code step then adds ``prior_weight`` (a number, or one per prompt) times
    the log-probability of that step under the prior (its mass under the new prefix over the mass under the old),
    so an item's score is log P_model(item) + w * log P_prior(item | allowed items).

    ``stats``, if given, counts every beam the search ended with before anything is dropped (see GenerationStats).

    ``collab`` (loop only, :class:`CollabInputs` or its first two fields): the prompt positions holding the
    placeholder get those rows as their input embeddings instead of the token's own row, in order (collaborative
    tokens, methods/collab_tokens.py), and code additions are added to the code tokens after each placeholder,
    the prompt's and those the search writes. The shared prefix then stops before the first placeholder.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= k <= num_beams:
        raise ValueError(f"need 1 <= k <= num_beams, got k={k}, num_beams={num_beams}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    masks = trie.allowed_mask(allowed, len(prompts))
    trie.alive(masks)  # raises NoItemsLeft naming the prompt before any model work
    weights = None
    if prior is not None:
        if method != "loop":
            raise ValueError("a decoding prior needs method='loop'")
        if prior.shape != masks.shape:
            raise ValueError(f"prior must be (prompts, items) = {tuple(masks.shape)}, got {tuple(prior.shape)}")
        weights = torch.as_tensor(prior_weight, dtype=torch.float64).expand(len(prompts))
    if collab is not None:
        collab = CollabInputs(*collab)
        if method != "loop" or len(collab.vectors) != len(prompts) or (
                collab.code_vectors is not None and len(collab.code_vectors) != len(prompts)):
            raise ValueError("collaborative vectors need method='loop' and one tensor per prompt")
    results: list[list[tuple[int, float]]] = []
    starts = range(0, len(prompts), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="recommend", unit="batch", disable=len(starts) < 4, leave=False):
            batch_prompts, batch_masks = prompts[start:start + batch_size], masks[start:start + batch_size]
            if method == "loop":
                batch_prior = None
                if weights is not None:
                    end = start + len(batch_prompts)
                    batch_prior = (prior[start:end].double() * batch_masks, weights[start:end])
                batch_collab = None if collab is None else collab.rows(start, start + batch_size)
                items, scores = _beam_loop(model, tokenizer, trie, batch_prompts, num_beams, batch_masks,
                                           shared_prefix, batch_prior, batch_collab)
            else:
                input_ids, attention = _left_pad(tokenizer, batch_prompts, _device(model))
                items, scores = _beam_generate(model, tokenizer, trie, input_ids, attention, num_beams, batch_masks)
            ranked = _top_k(items, scores, k)
            if stats is not None:
                stats.add(items, scores, ranked, trie.num_items, k)
            results.extend(ranked)
    logger.debug("generated top-%d of %d beams for %d prompts (%s)", k, num_beams, len(prompts), method)
    return results


# ---- our beam loop --------------------------------------------------------------------------------------------
def _beam_loop(model, tokenizer, trie: CodeTrie, prompts: list[str], num_beams: int, allowed: torch.Tensor,
               shared_prefix: SharedPrefix | None = None,
               prior: tuple[torch.Tensor, torch.Tensor] | None = None,
               collab: CollabInputs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over the trie with one prefill per request; returns (items, scores), each (B, num_beams),
    sorted by score, item -1 / score -inf where fewer than num_beams items are allowed.

    With a shared prefix of P tokens the rows are laid out as [prefix | left-padded rest of each prompt]: the
    pads sit between the two, masked, and positions count real tokens only, which is the same computation as
    a left-padded prefill of the whole prompts. ``prior`` = ((B, items) weights, (B,) prior weight): see
    :func:`generate_items`; so is ``collab``."""
    counts = trie.alive(allowed)
    log_mass = None
    if prior is not None:
        # a tiny floor keeps items the prior gives (numerically) zero reachable, at a large but finite cost
        log_mass = [m.clamp(min=1e-300).log() for m in trie.mass(prior[0])]
        prior_weight = prior[1]
    device = _device(model)
    token_lists = _encode(tokenizer, prompts)
    cache = None
    # a placeholder's KV depends on its vector, which differs between prompts: share only what precedes it
    sharable = token_lists if collab is None else [_before(t, collab.placeholder) + [0] for t in token_lists]
    shared, prefix_kv = shared_prefix.for_batch(model, sharable) if shared_prefix is not None else (0, [])
    if shared:
        cache = _preallocated_cache(model, max(len(t) for t in token_lists) + trie.depth - 1)
        if cache is None:
            shared = 0
    rest, rest_attention = _left_pad_ids([t[shared:] for t in token_lists], _pad_id(tokenizer), device)
    batch = rest.shape[0]
    attention = torch.cat([torch.ones(batch, shared, dtype=rest_attention.dtype, device=device), rest_attention], 1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0
    prompt_width = attention.shape[1]
    if shared:
        for layer, (keys, values) in zip(cache.layers, prefix_kv):
            layer.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
    else:
        cache = _preallocated_cache(model, prompt_width + trie.depth - 1)
    inputs = {"input_ids": rest} if collab is None else {"inputs_embeds": _embed_with_vectors(model, rest, collab)}
    on_codes = _last_code_vectors(collab, model)   # [B, levels, hidden] for the codes this search writes, or None
    on_logits = _logit_additions(collab, model)    # [B, levels, vocab] added to each level's logits, or None
    out = model(**inputs, attention_mask=attention, position_ids=positions[:, shared:], use_cache=True,
                past_key_values=cache, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    # before the first code token there is one row per request; afterwards num_beams rows per request
    nodes, scores, request = torch.zeros(batch, dtype=torch.long), torch.zeros(batch), torch.arange(batch)
    written = torch.zeros(batch, 0, dtype=torch.long)   # the code tokens each row has written
    prefix_head = None if collab is None else collab.prefix_head
    last_position = positions[:, -1]
    for level in range(trie.depth):
        tokens, childs, valid = trie.candidates(nodes, level, counts[level + 1], request)
        logits = logits.float()  # log-probs normalised over the whole vocabulary, read only at the candidates
        if on_logits is not None and level < on_logits.shape[1]:
            logits = logits + on_logits[request, level]
        if prefix_head is not None:
            logits = logits + _through_head(model, prefix_head(request, level, written))
        log_probs = (logits.gather(1, tokens.to(device)) - torch.logsumexp(logits, dim=-1, keepdim=True)).cpu()
        if log_mass is not None:
            step = log_mass[level + 1][request[:, None], childs.clamp(min=0)] \
                - log_mass[level][request, nodes.clamp(min=0)][:, None]
            log_probs = log_probs + (prior_weight[request][:, None] * step).float()
        scores, parent, column = _best_continuations(scores[:, None] + log_probs, valid, batch, num_beams)
        nodes = torch.where(torch.isfinite(scores), childs[parent, column], -1)
        request = torch.arange(batch).repeat_interleave(num_beams)
        if level == trie.depth - 1:
            break
        parent_dev = parent.to(device)
        _reorder_beams(cache, parent_dev, level, prompt_width)
        written = torch.cat([written[parent], tokens[parent, column].view(-1, 1)], dim=1)
        next_tokens = tokens[parent, column].view(-1, 1).to(device)
        attention = torch.cat([attention[parent_dev], torch.ones_like(next_tokens)], dim=1)
        last_position = last_position[parent_dev] + 1
        feed = {"input_ids": next_tokens}
        if on_codes is not None and level < on_codes.shape[1]:   # the state's addition on the code just written
            embeds = model.get_input_embeddings()(next_tokens)
            feed = {"inputs_embeds": embeds + on_codes[request, level].to(embeds.dtype)[:, None]}
        out = model(**feed, attention_mask=attention, position_ids=last_position[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    items = torch.where(nodes >= 0, trie.leaf_item[nodes.clamp(min=0)], -1)
    return items.view(batch, num_beams), scores.view(batch, num_beams)


def _before(tokens: list[int], placeholder: int) -> list[int]:
    return tokens[:tokens.index(placeholder)] if placeholder in tokens else tokens


def _embed_with_vectors(model, input_ids: torch.Tensor, collab: CollabInputs) -> torch.Tensor:
    """Token embeddings of ``input_ids`` whose placeholder positions hold the rows of ``collab.vectors``
    (row-major), plus the code additions after each placeholder."""
    from .methods.collab_tokens import embed_with_collab
    width = model.get_input_embeddings().weight.shape[-1]
    vectors = collab.vectors
    rows = torch.cat([v.reshape(-1, width) for v in vectors]).to(input_ids.device) if len(vectors) else None
    present = [c for c in collab.code_vectors or () if len(c)]
    adds = torch.cat(present).to(input_ids.device) if present else None
    return embed_with_collab(model, input_ids, collab.placeholder, rows, adds)


def _last_code_vectors(collab: CollabInputs | None, model) -> torch.Tensor | None:
    """Per prompt, the code additions of its last placeholder (zeros for a prompt without one): [B, levels, H]."""
    if collab is None or collab.code_vectors is None or not any(len(c) for c in collab.code_vectors):
        return None
    levels, width = next(c.shape[1:] for c in collab.code_vectors if len(c))
    return torch.stack([c[-1] if len(c) else torch.zeros(levels, width) for c in collab.code_vectors]
                       ).to(_device(model))


def _logit_additions(collab: CollabInputs | None, model) -> torch.Tensor | None:
    """Per prompt and level, the output head applied to its `logit_vectors` (zeros for a prompt without them):
    [B, levels, vocab]. The head is linear, so head(h + v) = head(h) + head(v): the same logits as adding v to
    the last hidden state, as training does."""
    if collab is None or collab.logit_vectors is None or not any(len(v) for v in collab.logit_vectors):
        return None
    levels, width = next(v.shape for v in collab.logit_vectors if len(v))
    return _through_head(model, torch.stack([v if len(v) else torch.zeros(levels, width) for v in collab.logit_vectors]))


@torch.no_grad()
def _through_head(model, vectors: torch.Tensor) -> torch.Tensor:
    """The output head applied to hidden-state additions [..., hidden]: [..., vocab] fp32 logits."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)   # an int8 head has packed weights and takes fp32
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    return head(vectors.to(_device(model), dtype)).float()


def _preallocated_cache(model, max_length: int):
    """A cache whose layers are written in place, or None (the model's own DynamicCache) where the model has
    layer kinds other than plain attention. A DynamicCache concatenates every layer's whole cache at each
    step, which costs a quarter of a 20-beam decode step on CPU. The slim Llama (llama.py) brings its own."""
    if hasattr(model, "new_cache"):
        return model.new_cache(max_length)
    from transformers.cache_utils import StaticCache, StaticLayer
    try:
        cache = StaticCache(config=model.config, max_cache_len=max_length)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return cache if all(type(layer) is StaticLayer for layer in cache.layers) else None


def _reorder_beams(cache, parent: torch.Tensor, level: int, prompt_width: int) -> None:
    """Make cache row r hold the history of row ``parent[r]`` after the code token of ``level`` was chosen.

    After the first token each request's prompt rows are repeated for its beams. From then on beams only move
    within their own request, whose prompt rows are identical, so a preallocated cache needs to move just the
    code positions written so far.
    """
    if not _written_in_place(cache):
        cache.reorder_cache(parent)
        return
    generated = slice(prompt_width, prompt_width + level)
    for layer in cache.layers:
        if level == 0:
            layer.keys, layer.values = layer.keys[parent], layer.values[parent]
            layer.batch_size = parent.shape[0]
        else:
            layer.keys[:, :, generated] = layer.keys[parent, :, generated]
            layer.values[:, :, generated] = layer.values[parent, :, generated]


def _written_in_place(cache) -> bool:
    if isinstance(cache, KVCache):
        return all(layer.max_length is not None for layer in cache.layers)
    from transformers.cache_utils import StaticCache
    return isinstance(cache, StaticCache)


def _best_continuations(cand: torch.Tensor, valid: torch.Tensor, batch: int, num_beams: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the best ``num_beams`` (row, candidate) pairs of each request.

    ``cand`` (R, D) are the accumulated scores of every candidate of every row, rows grouped by request.
    Returns (scores, parent row, candidate column), each (batch * num_beams,), best first within a request;
    when a request has fewer valid candidates the rest have score -inf.
    """
    rows_per_request, width = cand.shape[0] // batch, cand.shape[1]
    flat = cand.masked_fill(~valid, float("-inf")).view(batch, rows_per_request * width)
    if flat.shape[1] < num_beams:
        flat = torch.nn.functional.pad(flat, (0, num_beams - flat.shape[1]), value=float("-inf"))
    scores, index = flat.topk(num_beams, dim=1)
    parent = (index // width).clamp(max=rows_per_request - 1) + torch.arange(batch)[:, None] * rows_per_request
    return scores.view(-1), parent.view(-1), (index % width).view(-1)


# ---- transformers generate ------------------------------------------------------------------------------------
def _beam_generate(model, tokenizer, trie: CodeTrie, input_ids: torch.Tensor, attention: torch.Tensor,
                   num_beams: int, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`_beam_loop`, through ``model.generate`` and :class:`TrieLogitsProcessor`."""
    from transformers import GenerationConfig, LogitsProcessorList
    batch, width = input_ids.shape
    eos = _eos_id(tokenizer)
    processor = TrieLogitsProcessor(trie, width, num_beams, eos, allowed=allowed, inplace=True)
    config = GenerationConfig(
        num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,  # do_sample=False: real beams
        max_new_tokens=trie.depth, min_new_tokens=0, length_penalty=0.0,       # score = plain sum of log-probs
        early_stopping=True, output_scores=True, return_dict_in_generate=True,
        pad_token_id=_pad_id(tokenizer), eos_token_id=eos)
    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                         logits_processor=LogitsProcessorList([processor]))
    generated = out.sequences[:, width:].cpu()
    items = torch.full((generated.shape[0],), -1, dtype=torch.long)
    if generated.shape[1] >= trie.depth:
        items = trie.items_of_codes(trie.codes_of_tokens(generated[:, :trie.depth]))
    scores = out.sequences_scores.float().cpu()
    scores = torch.where((items >= 0) & (scores > -1e8), scores, float("-inf"))  # -1e9: generate's empty slots
    return items.view(batch, num_beams), scores.view(batch, num_beams)


# ---- shared helpers -------------------------------------------------------------------------------------------
def _top_k(items: torch.Tensor, scores: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    results = []
    for row_items, row_scores in zip(items.tolist(), scores.tolist()):
        ranked = sorted(((s, i) for i, s in zip(row_items, row_scores) if i >= 0 and s != float("-inf")),
                        key=lambda p: -p[0])
        seen, best = set(), []
        for s, i in ranked:
            if i not in seen:
                seen.add(i)
                best.append((i, s))
        results.append(best[:k])
    return results


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Tokenise without adding special tokens (the prompts are already formatted)."""
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("an empty prompt cannot be continued")
    return encoded


def _left_pad(tokenizer, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _left_pad_ids(_encode(tokenizer, prompts), _pad_id(tokenizer), device)


def _left_pad_ids(encoded: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return input_ids, attention


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    return int(tokenizer.eos_token_id)


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---- the naive baseline (benchmark only) -------------------------------------------------------------------------
def python_trie_prefix_fn(trie: CodeTrie, prompt_length: int, eos_token_id: int
                          ) -> Callable[[int, torch.Tensor], list[int]]:
    """The usual dict-of-dicts trie as a ``prefix_allowed_tokens_fn`` for ``generate``: one Python walk per beam
    per step. Kept only as the benchmark's point of comparison for :class:`TrieLogitsProcessor`."""
    root: dict = {}
    for code in trie.codes.tolist():
        node = root
        for level, c in enumerate(code):
            node = node.setdefault(int(trie.token_ids[level][c]), {})

    def allowed_tokens(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        node = root
        for token in input_ids[prompt_length:].tolist():
            node = node.get(token)
            if node is None:
                return [eos_token_id]
        return list(node) or [eos_token_id]

    return allowed_tokens
