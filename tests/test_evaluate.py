"""The evaluate stage end to end on the tiny run: every method on the same users, a report, skip on rerun."""
from __future__ import annotations

import json

import pytest
import torch

from lcrec_chat.backbone import INT8_RECIPE
from lcrec_chat import stages
from lcrec_chat.config import load_config
from lcrec_chat.smoothing import load_smoothing


def test_evaluate_stage_writes_metrics_and_report_for_every_method(tiny_run, tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tiny_run.run_dir}", "eval.max_users=6",
                                            "eval.styles=[dense, chat]", "eval.template_users=2",
                                            "eval.baseline_epochs=2", "eval.num_beams=10", "eval.dtype=bf16"])
    metrics = stages.evaluate(cfg, force=True)
    methods = metrics["methods"]
    dense, chat = "LC-Rec (dense prompt, text+collaborative codes)", "LC-Rec (request prompt, text+collaborative codes)"
    hybrid = next(name for name in methods if name.startswith("Hybrid: LC-Rec (dense prompt) + SASRec prior, w="))
    # the precision the app serves on a CPU (int8), beside the evaluated one: a test row of its own (a GPU serves
    # NF4 where bitsandbytes is installed, else the evaluated precision itself: no row of its own then)
    on_cpu = not torch.cuda.is_available()
    served = f"LC-Rec (dense prompt), served {INT8_RECIPE}" if on_cpu else \
        next((name for name in methods if ", served " in name), None)
    if on_cpu:
        assert metrics["served_precision"] == INT8_RECIPE and set(methods[served]) == {"test"}
        # the served model was smoothed with scales calibrated on this adapter, stored where the app finds them
        scales = load_smoothing(tiny_run.run_path / "adapter")
        assert scales is not None and len(scales) == 2 * 2 and all((s > 0).all() for s in scales.values())
    assert set(methods) - {served} == {dense, chat, hybrid, "Popularity", "SASRec", "GRU4Rec", "Text-embedding kNN"}
    for name, per_stage in methods.items():
        for stage in ("valid", "test")[1 if name == served else 0:]:
            m = per_stage[stage]
            assert m["users"] == (metrics["hybrid"]["users"] if (name, stage) == (hybrid, "valid") else 6)
            assert 0 <= m["ndcg@10"] <= m["hr@10"] <= 1, (name, stage)
            assert 0 < m["coverage@10"] <= 1 and 0 <= m["top50_share@10"] <= 1, (name, stage)
            if "LC-Rec" in name:   # 10 beams per user: every generated sequence counted
                assert m["generated_sequences"] == 10 * m["users"] and 0 < m["valid_item_rate"] <= 1 and m["seconds"] > 0
    assert set(metrics["hybrid"]["valid_ndcg@10_per_weight"]) == {0.5, 1.0, 2.0}
    # generation time counts every LLM pass: both prompts, itemsearch, the whole weight search, the hybrid test
    passes = [methods[n][s]["seconds"] for n in (dense, chat) for s in ("valid", "test")]
    passes += [metrics["itemsearch"]["LC-Rec"]["test"]["seconds"], metrics["hybrid"]["seconds"],
               methods[hybrid]["test"]["seconds"]] + ([methods[served]["test"]["seconds"]] if served else [])
    assert metrics["hybrid"]["seconds"] > methods[hybrid]["valid"]["seconds"]       # three weights, not one
    assert metrics["seconds"]["lcrec"] == pytest.approx(sum(passes), abs=0.2)
    search = metrics["itemsearch"]
    assert set(search) == {"LC-Rec", "filter + popularity", "query text kNN"}
    assert search["LC-Rec"]["test"]["users"] == 6 and search["LC-Rec"]["test"]["example_queries"]
    assert all(set(search[name]) == {"test"} and search[name]["test"]["users"] == 6 for name in search)
    assert len(metrics["template_spread"]["ndcg@10_per_template"]) >= 2
    report = (tiny_run.run_path / "report.md").read_text()
    for line in ("| SASRec | test | 6 |", f"| {chat} | valid | 6 |", "| LC-Rec | test | 6 |",
                 "| filter + popularity | test | 6 |", "Precision bf16", "| itemsearch test | 6 | "):
        assert line in report, line
    assert json.loads((tiny_run.run_path / "metrics.json").read_text())["methods"].keys() == methods.keys()
    assert stages.evaluate(cfg) == json.loads((tiny_run.run_path / "metrics.json").read_text())  # up to date


def test_history_prompt_styles_recommend_real_unseen_items(tiny_run):
    from lcrec_chat.recommender import Recommender, Request
    rec = Recommender.from_run(tiny_run, tiny_run.run_dir)
    history = [0, 1, 2]
    dense, chat = (rec.prompt(Request(history=history, style=s)) for s in ("dense", "chat"))
    assert dense != chat and dense.endswith(rec.builder.dense_continuation(history).prefix)
    # a wish always gets the request prompt, whatever the style
    assert rec.prompt(Request(history=history, query="a comedy", style="dense")) == \
        rec.prompt(Request(history=history, query="a comedy"))
    for style in ("dense", "chat"):
        recs = rec.recommend(history=history, k=4, num_beams=6, style=style)
        assert len(recs) == 4 and all(0 <= r.idx < rec.num_items and r.idx not in history for r in recs)
        assert all(r.item["title"] for r in recs)
    with pytest.raises(ValueError, match="unknown prompt style 'fancy'"):
        rec.recommend(history=history, style="fancy")


def test_a_cached_row_without_the_users_ranks_is_computed_again(tmp_path):
    """A row cached before rows kept each user's target rank must not be served where a paired reading needs them."""
    path = tmp_path / "eval_rows.json"
    stages.RowCache(path, "adapter A").get("dense valid", lambda: {"ndcg@10": 0.1})   # a row of the older format
    computed = []

    def ranked_row() -> dict:
        computed.append(1)
        return {"ndcg@10": 0.2, "target_ranks": "0,-"}

    assert stages.RowCache(path, "adapter A").get("dense valid", ranked_row)["target_ranks"] == "0,-"
    assert computed == [1]
    # saved in place of the old one: read again, nothing is computed
    never = lambda: pytest.fail("a current cached row was computed again")   # noqa: E731
    assert stages.RowCache(path, "adapter A").get("dense valid", never)["ndcg@10"] == 0.2
    assert stages.RowCache(path, "adapter A").get("dense valid", never)["target_ranks"] == "0,-"
    # a row that is not a ranked one (the hybrid weight's choice) is served as cached
    stages.RowCache(path, "adapter A").get("hybrid weight", lambda: {"weight": 2.0})
    assert stages.RowCache(path, "adapter A").get("hybrid weight", never) == {"weight": 2.0}
    # another adapter's cache starts empty
    assert stages.RowCache(path, "adapter B").get("dense valid", ranked_row)["ndcg@10"] == 0.2
    assert computed == [1, 1]



def test_a_damaged_row_cache_is_set_aside_and_a_damaged_record_is_named(tmp_path):
    path = tmp_path / "eval_rows.json"
    path.write_text('{"fingerprint": "adapter A", "rows": {"dense val')          # cut off mid-write
    row = {"ndcg@10": 0.3, "target_ranks": "0"}
    assert stages.RowCache(path, "adapter A").get("dense valid", lambda: row) == row
    assert (tmp_path / "eval_rows.json.bad").read_text().endswith('"dense val')   # kept for a look, not lost
    assert stages.RowCache(path, "adapter A").get("dense valid", lambda: pytest.fail("recomputed"))["ndcg@10"] == 0.3
    (tmp_path / "stages.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"stages.json: not valid JSON .*--force"):
        stages.StageRecord(tmp_path)