"""Item indexing: text vectors -> RQ-VAE -> Sinkhorn-balanced, guaranteed-distinct item codes.

rqvae.py (model, k-means init), fit.py (training + stopping rule), sinkhorn.py (uniform mapping,
LC-Rec's re-assignment), unique.py (the exact collision step), report.py (metrics, plot),
tokens.py (code <-> "<a_12><b_3>" strings), stage.py (run_index / load_codes and the run folder).
"""
from .stage import IndexArtifactError, dataset_fingerprint, load_codes, load_rqvae, run_index
from .tokens import code_tokens, index_token_strings, parse_code_tokens
from .unique import CapacityError, resolve_collisions

__all__ = [
    "CapacityError", "IndexArtifactError", "code_tokens", "dataset_fingerprint", "index_token_strings",
    "load_codes", "load_rqvae", "parse_code_tokens", "resolve_collisions", "run_index",
]
