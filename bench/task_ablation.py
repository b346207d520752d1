"""Task ablation like LC-Rec's Table: sequential recommendation alone, then adding each alignment task.

Every row is a short, separate tuning run from the same base model and the same item codes (copied from a
run folder that went through `prepare` and `index`), evaluated on valid NDCG@10 by constrained generation
(dense history prompt) over the first `--users` users. Rows are cumulative, in the paper's order:

    seqrec -> + item2index/index2item (mutual) -> + fusionseqrec (asymmetric) -> + itemsearch/preferenceobtain
    (intention, preference) -> + chat (this app's request formats)

    python bench/task_ablation.py --from-run runs/ml-100k [--scale 1.0] [--users 300]

These are short runs (a few hundred samples per task): read them as directions, not converged figures.
Rows already finished are kept (results are written after every row), so an interrupted run resumes.
Writes bench/results/task_ablation.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat import run_folder, stages  # noqa: E402
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.evaluate import evaluate_sequential  # noqa: E402
from lcrec_chat.recommender import Recommender  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "task_ablation.json"
SHARED = ("catalog.sqlite", "split.json", "stats.json", "codes.json", "rqvae.pt", "item_emb.npy",
          "item_emb.json", "index_report.json", "code_usage.png", "stages.json")
# samples per task at --scale 1.0; rows add tasks cumulatively
BUDGET = {"seqrec_dense": 320, "seqrec": 60, "item2index": 160, "index2item": 80, "fusionseqrec": 80,
          "itemsearch": 120, "preferenceobtain": 40, "chat": 100}
ROWS = [
    ("seqrec", ["seqrec_dense", "seqrec"]),
    ("+ item2index, index2item (mutual)", ["item2index", "index2item"]),
    ("+ fusionseqrec (asymmetric)", ["fusionseqrec"]),
    ("+ itemsearch, preferenceobtain (intention, preference)", ["itemsearch", "preferenceobtain"]),
    ("+ chat (app request formats)", ["chat"]),
]


def prepare_row_dir(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if (source / name).exists() and not (target / name).exists():
            shutil.copy2(source / name, target / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ml-100k.yaml")
    parser.add_argument("--from-run", default="runs/ml-100k", help="run folder with prepare + index done")
    parser.add_argument("--work", default="runs/ablation", help="where the row runs go")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every task's sample budget")
    parser.add_argument("--users", type=int, default=300, help="valid users evaluated per row")
    parser.add_argument("--eval-dtype", default="bf16", help="model dtype for the evaluation (fp32 | bf16)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = results.setdefault("rows", [])
    done = {r["row"] for r in rows if r.get("scale") == args.scale and r.get("users") == args.users}
    tasks: list[str] = []
    for name, added in ROWS:
        tasks += added
        if name in done:
            continue
        run = Path(args.work) / f"row{len(tasks):02d}"
        prepare_row_dir(Path(args.from_run), run)
        budget = {t: max(1, round(BUDGET[t] * args.scale)) for t in tasks}
        cfg = load_config(args.config, [f"run_dir={run}", "train.max_minutes=0", "train.eval_every=100000",
                                        "train.save_every=50", f"train.task_budget={json.dumps(budget)}"])
        started = time.time()
        summary = stages.train(cfg)
        train_s = time.time() - started
        rec = Recommender.from_run(cfg, run, dtype=args.eval_dtype)
        started = time.time()
        metrics = evaluate_sequential(rec, run_folder.load_split(run), "valid", "dense", 0, args.users)
        rows.append({"row": name, "tasks": list(tasks), "budget": budget, "scale": args.scale,
                     "users": args.users, "steps": summary.get("steps"), "train_s": round(train_s, 1),
                     "eval_s": round(time.time() - started, 1), "valid": metrics})
        results["setup"] = {"config": args.config, "from_run": args.from_run,
                            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                            "machine": machine_record()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        del rec

    print(f"| tasks | samples | steps | valid HR@10 | valid NDCG@10 |  ({args.users} users, short runs)")
    print("|---|---|---|---|---|")
    for r in rows:
        if r.get("scale") == args.scale and r.get("users") == args.users:
            print(f"| {r['row']} | {sum(r['budget'].values())} | {r['steps']} | {r['valid']['hr@10']:.4f} | "
                  f"{r['valid']['ndcg@10']:.4f} |")


if __name__ == "__main__":
    main()
