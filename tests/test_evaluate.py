"""The evaluate stage end to end on the tiny run: every method on the same users, a report, skip on rerun."""
from __future__ import annotations

import json

from lcrec_chat import stages
from lcrec_chat.config import load_config


def test_evaluate_stage_writes_metrics_and_report_for_every_method(tiny_run, tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tiny_run.run_dir}", "eval.max_users=6",
                                            "eval.styles=[dense, chat]", "eval.template_users=2",
                                            "eval.sasrec_epochs=2", "eval.num_beams=10", "eval.dtype=bf16"])
    metrics = stages.evaluate(cfg, force=True)
    methods = metrics["methods"]
    assert set(methods) == {"LC-Rec (dense)", "LC-Rec (chat)", "Popularity", "SASRec", "Text-embedding kNN"}
    for name, per_stage in methods.items():
        for stage in ("valid", "test"):
            m = per_stage[stage]
            assert m["users"] == 6 and 0 <= m["ndcg@10"] <= m["hr@10"] <= 1, (name, stage)
            if name.startswith("LC-Rec"):
                assert m["valid_item_rate"] == 1.0 and m["seconds"] > 0
    assert metrics["itemsearch"]["test"]["users"] == 6 and metrics["itemsearch"]["test"]["example_queries"]
    assert len(metrics["template_spread"]["ndcg@10_per_template"]) >= 2
    report = (tiny_run.run_path / "report.md").read_text()
    for line in ("| SASRec | test | 6 |", "| LC-Rec (chat) | valid | 6 |", "| LC-Rec itemsearch | test | 6 |",
                 "Valid item rate of every LC-Rec generation: 100.00%", "Precision bf16", "| itemsearch valid | 6 |"):
        assert line in report, line
    assert json.loads((tiny_run.run_path / "metrics.json").read_text())["methods"].keys() == methods.keys()
    assert stages.evaluate(cfg) == json.loads((tiny_run.run_path / "metrics.json").read_text())  # up to date
