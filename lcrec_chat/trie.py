"""The prefix trie over item codes, stored as tensors.

Every step of constrained beam search asks, for every beam of every request at once, "which code tokens may
come next?". A Python dict trie answers that one beam at a time; here the trie is a few integer tensors per
level, so the answer for all beams is one gather (as in STATIC, arXiv 2602.22647):

* nodes at depth ``l`` are the distinct code prefixes of length ``l``, numbered in lexicographic order
  (depth 0 is the root, node 0; depth L nodes are the leaves, one per item);
* level ``l`` holds the edges depth l -> depth l+1 as sorted keys ``node * C_l + code`` (CSR order: a node's
  edges are contiguous, ``row_ptr`` marks them). Because child ids are lexicographic ranks, the child of the
  edge at position ``p`` is ``p`` itself, so ``searchsorted`` on the keys is the sparse transition lookup;
* where ``nodes * C_l`` is small, a dense ``[node, code] -> child or -1`` table replaces the search.

Per-request restrictions (exclusions, filters) are a bool mask over items; :meth:`CodeTrie.alive` turns it into
per-node leaf counts by summing up the levels, so prefixes whose every item is disallowed are pruned.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .indexing.tokens import index_token  # noqa: F401  (re-exported: the trie speaks these tokens)

logger = logging.getLogger(__name__)

DENSE_LIMIT = 1 << 22  # dense transition tables up to 4M entries (32 MB of int64) per level


class TrieError(ValueError):
    """Codes or token ids that cannot form a trie (duplicates, ragged rows, negative codes, missing tokens)."""


class NoItemsLeft(ValueError):
    """Restrictions left a request without any allowed item; ``request`` is its position in the batch."""

    def __init__(self, request: int, reason: str = "every item is excluded or filtered out"):
        super().__init__(f"request {request}: no item left to recommend ({reason})")
        self.request = request
        self.reason = reason


@dataclass(frozen=True)
class TrieLevel:
    """Edges from the nodes at one depth to the next (see the module docstring)."""

    num_nodes: int             # nodes at this depth
    codebook: int              # C: codes at this level are 0..C-1
    keys: torch.Tensor         # (E,) int64, sorted, node * C + code; the child of edge p is node p of depth+1
    row_ptr: torch.Tensor      # (num_nodes + 1,) int64: edges of node n are keys[row_ptr[n]:row_ptr[n+1]]
    dense: torch.Tensor | None  # (num_nodes, C) int64 child or -1, when small enough
    max_degree: int            # most children of one node

    @property
    def parent(self) -> torch.Tensor:
        """(E,) node at this depth of each node at the next depth."""
        return self.keys // self.codebook

    def step(self, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Child of each (node, code), or -1 where there is none (``nodes`` may already be -1)."""
        ok = (nodes >= 0) & (codes >= 0) & (codes < self.codebook)
        n, c = nodes.clamp(min=0), codes.clamp(0, self.codebook - 1)
        if self.dense is not None:
            child = self.dense[n, c]
        else:
            key = n * self.codebook + c
            pos = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
            child = torch.where(self.keys[pos] == key, pos, -1)
        return torch.where(ok, child, -1)

    def children(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every (code, child) edge of each node, padded: (codes, childs, valid), each (R, D).

        Dense levels give D = C with codes 0..C-1; sparse levels gather a padded CSR window of D = max_degree.
        Rows of node -1 are all invalid. Codes of valid entries are distinct within a row.
        """
        n = nodes.clamp(min=0)
        if self.dense is not None:
            childs = self.dense[n]
            codes = torch.arange(self.codebook, device=nodes.device).expand_as(childs)
            valid = childs >= 0
        else:
            offsets = torch.arange(self.max_degree, device=nodes.device)
            start, end = self.row_ptr[n], self.row_ptr[n + 1]
            pos = start[:, None] + offsets
            valid = pos < end[:, None]
            childs = pos.clamp(max=self.keys.numel() - 1)
            codes = self.keys[childs] % self.codebook
        valid = valid & (nodes >= 0)[:, None]
        return codes, torch.where(valid, childs, -1), valid


class CodeTrie:
    """Prefix trie of item codes; item ``i`` is ``codes[i]``.

    ``token_ids[l][c]`` is the vocabulary id of the token writing code ``c`` at level ``l`` (-1 allowed for a
    code no item uses); build it from a tokenizer with :meth:`from_tokenizer`. ``dense_limit`` caps the entries
    of a dense transition table.
    """

    def __init__(self, codes: Sequence[Sequence[int]] | torch.Tensor,
                 token_ids: Sequence[Sequence[int]] | Sequence[torch.Tensor], dense_limit: int = DENSE_LIMIT):
        self.codes = _as_code_tensor(codes)
        self.num_items, self.depth = self.codes.shape
        self.levels: list[TrieLevel] = []
        nodes = torch.zeros(self.num_items, dtype=torch.long)  # depth-0 node of every item: the root
        num_nodes = 1
        for level in range(self.depth):
            codebook = int(self.codes[:, level].max()) + 1
            keys, child_of_item = torch.unique(nodes * codebook + self.codes[:, level], return_inverse=True)
            self.levels.append(_make_level(num_nodes, codebook, keys, dense_limit))
            nodes, num_nodes = child_of_item, keys.numel()
        if num_nodes != self.num_items:
            raise TrieError(_duplicate_message(nodes))
        # leaves are numbered in lexicographic order of codes; map them back to item indices and vice versa
        self.leaf_item = torch.empty(self.num_items, dtype=torch.long)
        self.leaf_item[nodes] = torch.arange(self.num_items)
        self.item_leaf = nodes
        self.token_ids = _as_token_tables(token_ids, self.levels)
        self.code_of_token = _inverse_token_table(self.token_ids)
        logger.debug("trie: %d items, %d levels, nodes per depth %s, dense levels %s", self.num_items, self.depth,
                     [lv.num_nodes for lv in self.levels] + [self.num_items],
                     [lv.dense is not None for lv in self.levels])

    @classmethod
    def from_tokenizer(cls, codes: Sequence[Sequence[int]] | torch.Tensor, tokenizer,
                       dense_limit: int = DENSE_LIMIT) -> "CodeTrie":
        """Look up the id of every ``<a_12>``-style index token; a token missing from the vocabulary is an error."""
        code_tensor = _as_code_tensor(codes)
        token_ids = []
        for level in range(code_tensor.shape[1]):
            used = torch.unique(code_tensor[:, level]).tolist()
            names = [index_token(level, c) for c in used]
            ids = tokenizer.convert_tokens_to_ids(names)
            missing = [n for n, i in zip(names, ids) if i is None or tokenizer.convert_ids_to_tokens(i) != n]
            if missing:
                raise TrieError(f"{len(missing)} index tokens are not in the tokenizer (first: {missing[0]}); "
                                "add them before building the trie")
            table = torch.full((used[-1] + 1,), -1, dtype=torch.long)  # -1: a code no item uses at this level
            table[used] = torch.tensor(ids, dtype=torch.long)
            token_ids.append(table)
        return cls(code_tensor, token_ids, dense_limit)

    # ---- walking ------------------------------------------------------------------------------------------
    def walk(self, codes: torch.Tensor) -> torch.Tensor:
        """Node reached by each row of codes (R, l) at depth l, or -1 if the prefix is no item's prefix."""
        nodes = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        for level in range(codes.shape[1]):
            nodes = self.levels[level].step(nodes, codes[:, level])
        return nodes

    def items_of_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Item index of each full code row (R, L), or -1 where the code is no item."""
        leaves = self.walk(codes)
        return torch.where(leaves >= 0, self.leaf_item[leaves.clamp(min=0)], -1)

    def codes_of_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code of each token (R, l) read at its level (column j is level j); -1 where it is not that level's token."""
        table = self.code_of_token
        levels = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        inside = (tokens >= 0) & (tokens < table.shape[1])
        return torch.where(inside, table[levels, tokens.clamp(0, table.shape[1] - 1)], -1)

    def paths(self) -> torch.Tensor:
        """Every root-to-leaf code path read back from the tables alone, row i = leaf i (lexicographic order)."""
        prefixes = torch.zeros(1, 0, dtype=torch.long)
        for level in self.levels:
            parent, code = level.keys // level.codebook, level.keys % level.codebook
            prefixes = torch.cat([prefixes[parent], code[:, None]], dim=1)
        return prefixes

    # ---- restrictions -------------------------------------------------------------------------------------
    def allowed_mask(self, allowed: Sequence[torch.Tensor | None] | None, batch: int) -> torch.Tensor:
        """Stack per-request item masks into (batch, num_items) bool; None (or a None entry) allows every item."""
        if allowed is None:
            return torch.ones(batch, self.num_items, dtype=torch.bool)
        if len(allowed) != batch:
            raise ValueError(f"allowed has {len(allowed)} masks for {batch} requests")
        rows = []
        for i, mask in enumerate(allowed):
            if mask is None:
                rows.append(torch.ones(self.num_items, dtype=torch.bool))
                continue
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or mask.shape != (self.num_items,):
                raise ValueError(f"allowed[{i}] must be a bool tensor of shape ({self.num_items},), "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            rows.append(mask.cpu())
        return torch.stack(rows)

    def alive(self, allowed: torch.Tensor) -> list[torch.Tensor]:
        """Allowed-leaf counts per node for each request: list over depth 0..L of (B, nodes at depth) int32.

        A node with count 0 is a pruned prefix. Raises :class:`NoItemsLeft` for the first request with none.
        """
        counts = [allowed[:, self.leaf_item].to(torch.int32)]
        for level in reversed(self.levels):
            up = torch.zeros(allowed.shape[0], level.num_nodes, dtype=torch.int32)
            counts.append(up.index_add_(1, level.parent, counts[-1]))
        counts.reverse()
        empty = (counts[0][:, 0] == 0).nonzero()
        if empty.numel():
            raise NoItemsLeft(int(empty[0, 0]))
        return counts

    def mass(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """Summed item weights under every node, for each request: list over depth 0..L of (B, nodes at depth).

        ``weights`` (B, num_items) are non-negative (e.g. a sequential model's next-item probabilities, zero for
        disallowed items). ``mass[l+1][child] / mass[l][node]`` is then the probability of that code step under
        the weights, which is how hybrid decoding adds a collaborative prior to each beam step.
        """
        if weights.shape[-1] != self.num_items:
            raise ValueError(f"weights cover {weights.shape[-1]} items, the trie has {self.num_items}")
        masses = [weights[:, self.leaf_item].to(torch.float64)]
        for level in reversed(self.levels):
            up = torch.zeros(weights.shape[0], level.num_nodes, dtype=torch.float64)
            masses.append(up.index_add_(1, level.parent, masses[-1]))
        masses.reverse()
        return masses

    # ---- the masking step ---------------------------------------------------------------------------------
    def candidates(self, nodes: torch.Tensor, level: int, alive_next: torch.Tensor,
                   request: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Allowed next tokens of every row: (token ids, child nodes, valid), each (R, D).

        Invalid entries hold token 0 and child -1, so the tokens can index a logits row as they are.

        ``nodes`` (R,) are depth-``level`` nodes, ``request`` (R,) the request of each row, ``alive_next``
        (B, nodes at depth level+1) the leaf counts of the next depth for those requests.
        """
        lv = self.levels[level]
        codes, childs, valid = lv.children(nodes)
        counts = alive_next[request[:, None], childs.clamp(min=0)]
        valid = valid & (counts > 0)
        tokens = torch.where(valid, self.token_ids[level][codes], 0)
        return tokens, torch.where(valid, childs, -1), valid

    def mask_scores(self, scores: torch.Tensor, nodes: torch.Tensor, level: int, alive_next: torch.Tensor,
                    request: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``scores`` (R, V) with -inf wherever the token does not extend the row's prefix to an allowed item
        (all -inf for rows whose prefix is already invalid); a copy unless ``inplace``."""
        tokens, _, valid = self.candidates(nodes, level, alive_next, request)
        rows = torch.arange(scores.shape[0])[:, None].expand_as(tokens)
        flat = (rows * scores.shape[1] + tokens)[valid].to(scores.device)
        kept = scores.reshape(-1)[flat]  # a small copy of the allowed entries
        out = scores if inplace and scores.is_contiguous() else torch.empty(scores.shape, dtype=scores.dtype,
                                                                             device=scores.device)
        out.fill_(float("-inf")).view(-1)[flat] = kept
        return out


def _as_code_tensor(codes) -> torch.Tensor:
    if isinstance(codes, torch.Tensor):
        t = codes
    else:
        rows = [list(r) for r in codes]
        if not rows:
            raise TrieError("no item codes given")
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            bad = next(i for i, r in enumerate(rows) if len(r) != len(rows[0]))
            raise TrieError(f"codes must all have the same length: item 0 has {len(rows[0])}, "
                            f"item {bad} has {len(rows[bad])}")
        t = torch.tensor(rows)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise TrieError(f"codes must be a non-empty (items, levels) table, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TrieError(f"codes must be integers, got {t.dtype}")
    if (t < 0).any():
        item, level = (t < 0).nonzero()[0].tolist()
        raise TrieError(f"negative code {int(t[item, level])} at item {item}, level {level}")
    return t.to(torch.long).cpu()


def _make_level(num_nodes: int, codebook: int, keys: torch.Tensor, dense_limit: int) -> TrieLevel:
    parents = keys // codebook
    row_ptr = torch.searchsorted(parents, torch.arange(num_nodes + 1))
    dense = None
    if num_nodes * codebook <= dense_limit:
        dense = torch.full((num_nodes * codebook,), -1, dtype=torch.long)
        dense[keys] = torch.arange(keys.numel())
        dense = dense.view(num_nodes, codebook)
    degree = int((row_ptr[1:] - row_ptr[:-1]).max())
    return TrieLevel(num_nodes, codebook, keys, row_ptr, dense, degree)


def _duplicate_message(leaf_of_item: torch.Tensor) -> str:
    _, inverse, counts = torch.unique(leaf_of_item, return_inverse=True, return_counts=True)
    shared = (counts[inverse] > 1).nonzero().flatten()
    first = shared[leaf_of_item[shared] == leaf_of_item[shared[0]]].tolist()
    return (f"{len(shared)} items share a full code with another item (e.g. items {first}); "
            "codes must be distinct (resolve collisions in indexing first)")


def _as_token_tables(token_ids, levels: list[TrieLevel]) -> list[torch.Tensor]:
    if len(token_ids) != len(levels):
        raise TrieError(f"token_ids has {len(token_ids)} levels, codes have {len(levels)}")
    tables = []
    for level, (ids, lv) in enumerate(zip(token_ids, levels)):
        t = torch.as_tensor(ids, dtype=torch.long).flatten()
        if t.numel() < lv.codebook:
            raise TrieError(f"level {level} uses codes up to {lv.codebook - 1} but token_ids has only {t.numel()} ids")
        t = t[:lv.codebook]
        used = torch.unique(lv.keys % lv.codebook)
        if (t[used] < 0).any():
            raise TrieError(f"level {level}: no token id for code {int(used[t[used] < 0][0])}, which items use")
        tables.append(t)
    every = torch.cat(tables)
    every = every[every >= 0]
    if torch.unique(every).numel() != every.numel():
        raise TrieError("token_ids repeat a token id; every (level, code) needs its own token")
    return tables


def _inverse_token_table(tables: list[torch.Tensor]) -> torch.Tensor:
    """(L, max id + 1) table: code of a token at a level, -1 elsewhere."""
    width = int(max(int(t.max()) for t in tables)) + 1
    inverse = torch.full((len(tables), width), -1, dtype=torch.long)
    for level, t in enumerate(tables):
        codes = (t >= 0).nonzero().flatten()
        inverse[level, t[codes]] = codes
    return inverse
