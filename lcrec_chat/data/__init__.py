"""Data: one loader per source format, all producing a `Dataset`, and the leave-one-out split."""
from __future__ import annotations

from collections.abc import Callable

from ..config import DataConfig
from .amazon import load_amazon
from .dataset import DataError, Dataset, Item
from .domain import DOMAINS, MOVIE, PRODUCT, Domain, domain_named
from .filters import first_users
from .lcrec_json import load_lcrec
from .movielens import load_ml1m, load_ml100k
from .split import Split, UserSplit, leave_one_out


def _named(cfg: DataConfig) -> str:
    if not cfg.path or not cfg.name:
        raise DataError(f"data.source '{cfg.source}' needs data.path (a folder) and data.name "
                        f"(got path={cfg.path!r}, name={cfg.name!r})")
    return cfg.name


LOADERS: dict[str, Callable[[DataConfig], Dataset]] = {
    # MovieLens: the packaged copy, or a folder holding NAME.inter / NAME.item of the same format
    "ml-100k": lambda cfg: load_ml100k(path=cfg.path or None),
    "ml-1m": lambda cfg: load_ml1m(path=cfg.path or None),
    "lcrec": lambda cfg: load_lcrec(cfg.path, _named(cfg)),
    "amazon": lambda cfg: load_amazon(cfg.path, _named(cfg), cfg.min_interactions),
}


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset `cfg` describes, cut to the first `cfg.max_users` users when that is > 0."""
    loader = LOADERS.get(cfg.source)
    if loader is None:
        raise DataError(f"unknown data.source '{cfg.source}' (known: {', '.join(LOADERS)})")
    return first_users(loader(cfg), cfg.max_users)


__all__ = ["DOMAINS", "DataError", "Dataset", "Domain", "Item", "MOVIE", "PRODUCT", "Split", "UserSplit",
           "domain_named", "leave_one_out", "load_amazon", "load_dataset", "load_lcrec", "load_ml100k", "load_ml1m"]
