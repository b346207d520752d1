"""The shipped default run in models/ml-100k: artifacts consistent with each other and with the base model."""
import json
from pathlib import Path

import pytest

from lcrec_chat.catalog import Catalog
from lcrec_chat.config import load_config, train_phases
from lcrec_chat.indexing import index_token_strings, load_codes

SHIPPED = Path("models/ml-100k")
pytestmark = pytest.mark.skipif(not (SHIPPED / "adapter").exists(), reason="no shipped run in models/ml-100k")


def test_every_code_is_a_distinct_catalogue_item():
    catalog = Catalog(SHIPPED / "catalog.sqlite")
    codes = load_codes(SHIPPED)
    assert len(catalog) == len(codes) == 1682
    assert len({tuple(c) for c in codes}) == len(codes)                 # conflict-free
    assert catalog.codes() == [list(c) for c in codes]                  # the catalogue holds the same codes
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    assert metrics["indexing"]["collision_rate_after_exact"] == 0.0


def test_adapter_matches_base_model_and_recommends_real_items():
    from lcrec_chat.recommender import Recommender
    cfg = load_config(SHIPPED / "config.yaml", [f"run_dir={SHIPPED}"])
    adapter = json.loads((SHIPPED / "adapter" / "adapter_config.json").read_text())
    last = train_phases(cfg)[-1]   # the phase that wrote the adapter (a later phase may widen the rank)
    assert adapter["r"] == last.lora_r and set(adapter["target_modules"]) == set(last.lora_targets)
    rec = Recommender.from_run(cfg, SHIPPED)        # fails if shapes or vocabulary disagree with the base
    codes = load_codes(SHIPPED)
    vocab = rec.tokenizer.get_vocab()
    assert all(t in vocab for t in index_token_strings(codes))
    toy_story = 0
    recs = rec.recommend(history=[toy_story], k=5, num_beams=5)
    assert len(recs) == 5 and all(0 <= r.idx < 1682 and r.idx != toy_story for r in recs)
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
