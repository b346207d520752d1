"""The LLM methods beside LC-Rec through the pipeline: the `methods` stage trains CLLM4Rec and CoLLM on the tiny
run, `evaluate` puts their rows in metrics.json, and every method answers through a real app server."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from lcrec_chat import stages
from lcrec_chat.locks import write_atomic
from lcrec_chat.serving import available_methods
from lcrec_chat.ui import serve

from test_ui import client, free_port   # pytest puts tests/ on the path (rootdir-relative test modules)


@pytest.fixture(scope="module")
def methods_run(tiny_run, tmp_path_factory):
    cfg = copy.deepcopy(tiny_run)
    cfg.run_dir = str(tmp_path_factory.mktemp("methods") / "run")
    shutil.copytree(tiny_run.run_dir, cfg.run_dir)
    cfg.eval.baseline_epochs, cfg.eval.baseline_seeds = 1, [42]
    stages.baselines(cfg)
    rows = stages.methods(cfg)
    return cfg, rows


def test_methods_stage_trains_saves_and_scores_each_method(methods_run):
    cfg, rows = methods_run
    run = Path(cfg.run_dir)
    assert set(rows) == {"cllm4rec", "collm"}
    for name, entry in rows.items():
        assert (run / name).is_dir() and entry["train_seconds"] > 0
        for stage in ("valid", "test"):
            assert 0.0 <= entry[stage]["ndcg@10"] <= entry[stage]["hr@10"] <= 1.0 and entry[stage]["users"] > 0
    assert rows["cllm4rec"]["test"]["users"] == cfg.eval.max_users    # one forward pass per user: every user
    paper = rows["cllm4rec"]["paper_metrics_test"]
    assert 0.0 <= paper["recall@20"] <= paper["recall@40"] <= 1.0
    auc = rows["collm"]["auc"]["test"]
    assert {"CoLLM", "sasrec alone", "text only (stage 1, TALLRec-style)"} <= set(auc)
    assert all(0.0 <= r["auc"] <= 1.0 and r["pairs"] == r["users"] * (1 + cfg.methods.collm.negatives)   # scored (user, item)
               for r in auc.values())
    again = stages.methods(cfg)   # unchanged inputs: read back, never retrained
    assert again["cllm4rec"]["train_seconds"] == rows["cllm4rec"]["train_seconds"]
    (run / "methods.json").unlink()   # a stage stopped while scoring: the trained models are scored, not retrained
    resumed = stages.methods(cfg)
    for name in rows:
        assert resumed[name]["train_seconds"] == rows[name]["train_seconds"]
        assert resumed[name]["test"]["ndcg@10"] == pytest.approx(rows[name]["test"]["ndcg@10"])


def test_evaluate_reports_every_method_in_one_table(methods_run):
    cfg, _ = methods_run
    metrics = stages.evaluate(cfg)
    names = list(metrics["methods"])
    assert any(n.startswith("CLLM4Rec") for n in names) and any(n.startswith("CoLLM-sasrec") for n in names)
    assert any(n.startswith("SASRec") for n in names) and any(n.startswith("LC-Rec") for n in names)
    assert "collm_auc" in metrics and set(metrics["train_seconds"]) >= {n for n in names if n.startswith(("CL", "Co"))}
    report = (Path(cfg.run_dir) / "report.md").read_text()
    assert "CoLLM: will this user like X?" in report and "CLLM4Rec at the paper's cut-offs" in report
    assert json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["methods"].keys() == metrics["methods"].keys()


def test_every_method_answers_through_a_real_server(methods_run):
    cfg, _ = methods_run
    assert available_methods(cfg.run_dir) == ["lcrec", "sasrec", "cllm4rec", "collm"]
    cfg = copy.deepcopy(cfg)
    cfg.chat.num_beams = max(cfg.chat.num_beams, cfg.methods.collm.rerank_depth)
    demo, url = serve(cfg, block=False, port=free_port())
    try:
        app = client(url)
        for method in ("lcrec", "sasrec", "cllm4rec", "collm"):
            out = app.predict("", ["Toy Story", "Fargo"], 3, method, api_name="/recommend")
            titles = [i["title"] for i in out["items"]]
            assert out["kind"] == "recommend" and out["request"]["method"] == method, (method, out["text"])
            assert len(set(titles)) == 3 and not set(titles) & {"Toy Story", "Fargo"}, (method, titles)
            assert all(i["reason"] for i in out["items"])   # cards and reasons work for every method
        # a filter holds for a method that ranks from the history alone
        out = app.predict("only comedies", ["Toy Story", "Fargo"], 3, "sasrec", api_name="/recommend")
        assert out["items"] and all("Comedy" in i["genres"] for i in out["items"])
        bad = app.predict("", ["Toy Story"], 3, "bert4rec", api_name="/recommend")
        assert bad["kind"] == "error" and "bert4rec" in bad["text"] and not bad["items"]
    finally:
        demo.close()


def test_collm_scoring_resumes_by_piece_and_shares_pieces_between_processes(methods_run, monkeypatch):
    from lcrec_chat.methods import run as method_run
    from lcrec_chat.run_folder import load_items, load_split
    cfg, rows = methods_run
    run = Path(cfg.run_dir)
    _, train_fp = stages.method_fingerprints(cfg, "collm")
    split = load_split(run)
    scores = run / "collm" / method_run.SCORES
    saved = json.loads(scores.read_text())
    assert len(saved) == len(method_run.COLLM_PIECES)
    # every piece saved: nothing is computed again (no model is needed)
    pieces = method_run.score_collm_pieces(cfg, run, split, None, None, train_fp)
    assert pieces["rerank/test"] == rows["collm"]["test"]
    # a claim left by a process that is gone is taken over and scored again, to the same figures
    key = next(k for k in saved if '"auc/valid"' in k)
    dead = subprocess.Popen(["true"])
    dead.wait()
    scores.write_text(json.dumps({**saved, key: {"scoring_pid": dead.pid}}))
    model, source, _ = method_run._load_or_fit_collm(cfg, run, split, load_items(run), train_fp)
    again = method_run.score_collm_pieces(cfg, run, split, model, source, train_fp, ("auc/valid",))
    assert again["auc/valid"]["CoLLM"]["auc"] == pytest.approx(saved[key]["CoLLM"]["auc"])
    # a piece claimed by a live process is waited for, not scored twice
    monkeypatch.setattr(method_run, "WAIT_SECONDS", 0.05)
    scores.write_text(json.dumps({**saved, key: {"scoring_pid": os.getppid()}}))
    # the other process saves its piece as every scorer does, in one step (a plain write_text can be read half
    # written: this test once failed on an empty file while the machine was busy)
    threading.Timer(0.3, lambda: write_atomic(scores, json.dumps(saved))).start()
    waited = method_run.score_collm_pieces(cfg, run, split, None, None, train_fp, ("auc/valid",))
    assert waited["auc/valid"] == saved[key]


def test_a_file_written_in_one_step_is_never_read_half_written(tmp_path):
    """locks.write_atomic, how CoLLM's scoring pieces are saved: a reader polling the file while another thread
    rewrites it always reads a whole JSON document, and no temporary file is left behind."""
    path = tmp_path / "scores.json"
    documents = [json.dumps({"piece": i, "pad": "x" * 200_000}) for i in range(30)]
    write_atomic(path, documents[0])
    writer = threading.Thread(target=lambda: [write_atomic(path, d) for d in documents])
    writer.start()
    read = []
    while writer.is_alive():
        read.append(json.loads(path.read_text())["piece"])   # raises on a partly written file
    writer.join()
    assert json.loads(path.read_text())["piece"] == 29 and read
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]
