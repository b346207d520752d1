"""report.md from metrics.json: the tables a reader (and the model card) needs, rendered in one place.

Rendering only: nothing here computes a metric. Every figure comes from the metrics dict the evaluate stage
wrote, so the report can be re-rendered from metrics.json alone (`render(metrics)`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

STAGE_ORDER = ("select", "valid", "test")   # select: LC-Rec arms trained with train.hold_out_last (split.py)


def markdown_table(results: dict[str, dict[str, dict]], ks: Sequence[int] = (1, 5, 10),
                   extra: Sequence[str] = ("coverage@10", "top50_share@10")) -> str:
    """One row per method and stage: | method | stage | users | HR@k... | NDCG@k... | coverage | top-50 share |.
    A column a row lacks is left blank; a row with several seeds shows its NDCG@10 spread."""
    cols = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks if k > 1] + list(extra)
    head = ["method", "stage", "users"] + [c.upper() if c.startswith(("hr", "ndcg")) else c for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, stages in results.items():
        for stage in STAGE_ORDER:
            m = stages.get(stage)
            if not m:
                continue
            cells = []
            for c in cols:
                value = m.get(c)
                text = "" if value is None else f"{value:.4f}"
                if c == "ndcg@10" and m.get("ndcg@10_std") and len(m.get("ndcg@10_per_seed", [])) > 1:
                    text += f" ± {m['ndcg@10_std']:.4f}"
                cells.append(text)
            lines.append(f"| {method} | {stage} | {m.get('users', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(metrics: dict[str, Any], ks: Sequence[int] = (1, 5, 10)) -> str:
    out = ["# Evaluation", "",
           "Leave-one-out by time, full ranking over the catalogue, the user's known items excluded, every method "
           f"on the same split. Precision {metrics.get('precision', '?')}, {metrics.get('num_beams', '?')} beams; "
           f"machine: {metrics.get('machine', '?')}. coverage@10: share of the catalogue in some user's top 10; "
           "top50_share@10: share of top-10 slots held by the 50 most popular training items. Sequential baselines: "
           "mean over seeds ± standard deviation of NDCG@10.", "",
           markdown_table(metrics["methods"], ks), ""]
    if "hybrid" in metrics:
        h = metrics["hybrid"]
        per = ", ".join(f"w={w}: {v:.4f}" for w, v in h["valid_ndcg@10_per_weight"].items())
        out += [f"Hybrid prior weight chosen on the first {h['users']} valid users (NDCG@10 {per}): w={h['weight']}; "
                "the hybrid's valid row is those users.", ""]
    if "itemsearch" in metrics:
        out += ["## Itemsearch (held-out intentions)", "",
                "One query per user, written from the held-out test item alone; the same queries for every row.", "",
                markdown_table(metrics["itemsearch"], ks), ""]
    generated = {f"{name} {stage}": m for name, per_stage in metrics["methods"].items()
                 for stage, m in per_stage.items() if isinstance(m, dict) and "generated_sequences" in m}
    lcrec_search = metrics.get("itemsearch", {}).get("LC-Rec", {})
    generated.update({f"itemsearch {stage}": m for stage, m in lcrec_search.items()})
    if generated:
        out += ["## Generation", "",
                "Counted over every beam the search returned, before invalid or repeated beams are dropped.", "",
                "| generation | users | valid item rate | repeated beams | lists shorter than 10 | seconds |",
                "|---|---|---|---|---|---|"]
        out += [f"| {name} | {m['users']} | {m['valid_item_rate']:.2%} | {m['duplicate_rate']:.2%} | "
                f"{m['short_list_rate']:.2%} | {m['seconds']:.1f} |" for name, m in generated.items()]
    if "template_spread" in metrics:
        spread = metrics["template_spread"]
        out += ["", f"Instruction-template spread (LC-Rec seqrec prompts, {len(spread['ndcg@10_per_template'])} "
                f"templates, first {spread['users']} users, valid NDCG@10): mean {spread['mean']:.4f}, stdev "
                f"{spread['stdev']:.4f}, per template " + ", ".join(f"{v:.4f}" for v in spread["ndcg@10_per_template"])
                + "."]
    if "collm_auc" in metrics:
        out += ["", "## CoLLM: will this user like X? (AUC)", "",
                "Each user's held-out target against unseen items sampled with a fixed seed; every row scores the "
                "same pairs. uAUC: the mean of per-user AUCs.", "",
                "| stage | scorer | users | AUC | uAUC |", "|---|---|---|---|---|"]
        for stage, rows in metrics["collm_auc"].items():
            out += [f"| {stage} | {name} | {r['users']} | {r['auc']:.4f} | {r['uauc']:.4f} |"
                    for name, r in rows.items()]
    if "cllm4rec_paper_metrics_test" in metrics:
        p = metrics["cllm4rec_paper_metrics_test"]
        out += ["", f"CLLM4Rec at the paper's cut-offs (test): Recall@20 {p['recall@20']:.4f}, Recall@40 "
                f"{p['recall@40']:.4f}, NDCG@100 {p['ndcg@100']:.4f}."]
    if metrics.get("train_seconds"):
        out += ["", "Training time: " + ", ".join(f"{name} {s / 60:.1f} min"
                                                  for name, s in metrics["train_seconds"].items())
                + "."]
    seconds = metrics.get("seconds", {})
    if seconds:
        out += ["", f"Time: baselines stage {seconds.get('baselines', 0):.0f} s, LC-Rec generation "
                f"{seconds.get('lcrec', 0):.0f} s (all rows, cached ones included), this evaluate call "
                f"{seconds.get('this_call', 0):.0f} s."]
    return "\n".join(out) + "\n"


def write_report(metrics: dict[str, Any], path: str | Path, cfg=None) -> None:
    ks = tuple(cfg.eval.cutoffs) if cfg is not None else (1, 5, 10)
    Path(path).write_text(render(metrics, ks))
