"""Collaborative item vectors to index beside the text vectors (``index.collab_weight > 0``).

LC-Rec indexes items from their text alone. MovieLens text is a title and a few genres, so two films
watched by the same people rarely share a code prefix, and the tuned model has to learn all of the
collaborative structure from scratch. With ``collab_weight`` w > 0 each item's RQ-VAE input is
``[text vector, sqrt(w) * collaborative vector]``, both blocks first scaled to the same mean energy, so
w is the share of the CF block relative to the text block (1.0 = equal).

The collaborative vectors are a truncated SVD of the *training* user-item matrix (valid and test
targets never enter), columns cosine-normalised so popular items do not take over the first factors.
Items never seen in training get a zero collaborative block: their codes come from text.

``index.collab_source: sasrec`` takes the collaborative block from a trained SASRec's item embedding table
instead (`sequential_item_vectors`): the vectors SASRec scores the next item with, so items under one code
prefix are items SASRec scores alike, and SASRec's state in the prompt (``train.collab_tokens``) points at a
code prefix by a nearly linear map.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import svds

log = logging.getLogger(__name__)


def sequences_key(sequences: Sequence[Sequence[int]]) -> str:
    """A hash of the training sequences, so codes are rebuilt when the split changes."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def collaborative_vectors(sequences: Sequence[Sequence[int]], num_items: int, dim: int) -> np.ndarray:
    """[num_items, dim] item factors (V * singular values) of the binary user-item training matrix."""
    rows, cols = [], []
    for user, seq in enumerate(sequences):
        items = np.unique(np.asarray(seq, dtype=np.int64))
        if len(items) and (items.min() < 0 or items.max() >= num_items):
            raise ValueError(f"training sequence {user} names an item outside the catalogue of {num_items}")
        rows.append(np.full(len(items), user))
        cols.append(items)
    if not rows or sum(len(c) for c in cols) == 0:
        raise ValueError("collaborative vectors need training interactions; set index.collab_weight: 0")
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    matrix = csr_matrix((np.ones(len(rows_a), dtype=np.float64), (rows_a, cols_a)),
                        shape=(len(sequences), num_items))
    counts = np.asarray(matrix.sum(0)).ravel()
    matrix = matrix.multiply(1.0 / np.sqrt(np.maximum(counts, 1.0))).tocsc()   # cosine-normalised columns
    k = min(dim, min(matrix.shape) - 1)
    if k < 1:
        raise ValueError("too few users or items for collaborative vectors; set index.collab_weight: 0")
    _, s, vt = svds(matrix, k=k, random_state=0)
    order = np.argsort(-s)                                   # svds returns ascending singular values
    vectors = (vt[order].T * s[order]).astype(np.float32)
    vectors[counts == 0] = 0.0
    if k < dim:
        vectors = np.pad(vectors, ((0, 0), (0, dim - k)))
    log.info("collaborative vectors: %d users x %d items -> %d factors (%d items unseen in training)",
             matrix.shape[0], num_items, k, int((counts == 0).sum()))
    return vectors


def sequential_item_vectors(model_path: str | Path, sequences: Sequence[Sequence[int]],
                            num_items: int) -> np.ndarray:
    """[num_items, D] item embeddings of a saved SequentialRecommender (sasrec.pt); items absent from the
    training sequences get zeros (their embedding was only ever pushed down as a negative)."""
    from ..baselines import SequentialRecommender
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"index.collab_source: sasrec needs {path} (run the baselines stage first)")
    model = SequentialRecommender.load(path)
    if int(model.num_items) != num_items:
        raise ValueError(f"{path} scores {model.num_items} items but the catalogue has {num_items}")
    vectors = model.net.item_emb.weight[1:].detach().float().cpu().numpy().copy()
    seen = np.zeros(num_items, dtype=bool)
    for seq in sequences:
        seen[np.asarray(seq, dtype=np.int64)] = True
    vectors[~seen] = 0.0
    log.info("collaborative vectors: %s item embeddings, %d x %d (%d items unseen in training)",
             path.name, num_items, vectors.shape[1], int((~seen).sum()))
    return vectors.astype(np.float32)


def vectors_key(vectors: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()


def _unit_energy(block: np.ndarray) -> np.ndarray:
    centred = block - block.mean(0, keepdims=True)
    energy = float(np.sqrt((centred ** 2).sum(1).mean()))
    return centred / max(energy, 1e-12)


def with_collaborative(text: np.ndarray, collab: np.ndarray, weight: float) -> np.ndarray:
    """Concatenate the two blocks, each at unit mean energy, the collaborative one scaled by sqrt(weight)."""
    if len(text) != len(collab):
        raise ValueError(f"{len(text)} text vectors but {len(collab)} collaborative vectors")
    return np.concatenate([_unit_energy(text), np.sqrt(weight) * _unit_energy(collab)], 1).astype(np.float32)
