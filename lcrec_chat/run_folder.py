"""Reading a run folder's artifacts: the one place that knows their names and which stage writes them.

Components (the recommender, the app, benchmarks) read a run through these functions; the pipeline
(`stages.py`) writes the artifacts and imports them from here too, so nothing below the pipeline imports it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .catalog import Catalog
from .config import Config
from .data.split import Split


class MissingArtifact(FileNotFoundError):
    """A stage needs the output of an earlier stage that is not in the run folder."""


def require(run: Path, name: str, stage: str) -> Path:
    """The path of artifact `name`, or MissingArtifact naming the stage that makes it."""
    path = Path(run) / name
    if not path.exists():
        raise MissingArtifact(f"{path} is missing: run `python -m lcrec_chat {stage} --config ...` first")
    return path


def read_json(path: Path) -> Any:
    """A run folder's JSON file; one that does not parse (cut off by a kill, edited by hand) is an error that
    names it and what to do, not a bare decoder message."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); delete it, or rerun its stage "
                         "with --force") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason}); delete it, or rerun its stage with --force") \
            from None


def load_items(run: Path) -> list[dict]:
    """Every catalogue row, in item-index order."""
    catalog = Catalog(require(run, "catalog.sqlite", "prepare"))
    return catalog.items(list(range(len(catalog))))


def load_split(run: Path) -> Split:
    return Split.load(require(run, "split.json", "prepare"))


def task_builder(run: Path, cfg: Config, split: Split | None = None):
    """(TaskBuilder over the run's items, codes and training popularity, the item codes)."""
    from .data.domain import domain_named
    from .indexing import dataset_fingerprint, load_codes
    from .tasks import TaskBuilder
    # the catalogue knows what its items are (movies, products): the prompts use those words
    with Catalog(require(run, "catalog.sqlite", "prepare")) as catalog:
        items = catalog.items(list(range(len(catalog))))
        domain = domain_named(catalog.domain)
    codes = load_codes(run, expected_fingerprint=dataset_fingerprint(items))   # codes of this catalogue only
    split = split or load_split(run)
    return TaskBuilder(items, codes, split.item_popularity(len(items)), cfg.data.max_history, domain), codes


def load_sequential(run: Path, names: Sequence[str], loaded: dict | None = None) -> dict:
    """The baselines stage's fitted sequential models by file name ("sasrec", "gru4rec_s43": <name>.pt), in the
    order given, as collaborative sources (`SASRecSource`); `loaded` gives those already in memory."""
    from .methods.collab_tokens import SASRecSource
    loaded = loaded or {}
    return {name: loaded[name] if name in loaded else SASRecSource.load(require(run, f"{name}.pt", "baselines"))
            for name in names}


def load_prior(run: Path):
    """The SASRec the baselines stage saved for hybrid decoding (sasrec.pt)."""
    from .baselines import SequentialRecommender
    return SequentialRecommender.load(require(run, "sasrec.pt", "baselines"))
