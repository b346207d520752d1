"""Pop, SASRec and text-kNN on ML-100K under the project's leave-one-out protocol.

    .venv/bin/python bench/baselines_bench.py [--epochs 200] [--patience 10] [--threads 1]

Prints a table (valid and test, HR@1/5/10, NDCG@5/10, users) and the SASRec training time, and
writes bench/results/baselines.json. Item embeddings for text-kNN: all-MiniLM-L6-v2 over
"title (year). Genres: ..." (lcrec_chat.embed, cached under .cache/bench/).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lcrec_chat.baselines import run_baselines  # noqa: E402
from lcrec_chat.config import EvalConfig, IndexConfig  # noqa: E402
from lcrec_chat.data.movielens import load_ml100k  # noqa: E402
from lcrec_chat.data.split import leave_one_out  # noqa: E402
from lcrec_chat.embed import embed_items  # noqa: E402

COLUMNS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10")


def table(results: dict) -> str:
    lines = [f"{'method':<10}{'stage':<7}" + "".join(f"{c:>9}" for c in COLUMNS) + f"{'users':>7}{'fit s':>8}"]
    for method, entry in results.items():
        for stage in ("valid", "test"):
            m = entry[stage]
            lines.append(f"{method:<10}{stage:<7}" + "".join(f"{m[c]:>9.4f}" for c in COLUMNS)
                         + f"{m['users']:>7}{entry['fit_seconds']:>8.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EvalConfig.sasrec_epochs)
    parser.add_argument("--patience", type=int, default=EvalConfig.sasrec_patience)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for SASRec training (1 is safest on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=str(ROOT / "bench/results/baselines.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    dataset = load_ml100k()
    split = leave_one_out(dataset, 20)
    num_items = len(dataset.items)
    start = time.perf_counter()
    item_emb = embed_items(dataset.items, IndexConfig(), cache_dir=ROOT / ".cache/bench")
    embed_seconds = time.perf_counter() - start

    cfg = EvalConfig(sasrec_epochs=args.epochs, sasrec_patience=args.patience)
    results = run_baselines(split, num_items, item_emb, cfg, seed=args.seed, num_threads=args.threads)
    print(f"\nML-100K: {len(dataset.sequences)} users, {num_items} items, "
          f"{dataset.num_interactions} interactions; full ranking, history items excluded\n")
    print(table(results))
    sasrec = results["sasrec"]
    print(f"\nSASRec: {sasrec['epochs_run']} epochs, best at epoch {sasrec['best_epoch']}, "
          f"{sasrec['fit_seconds']:.1f} s on {args.threads} thread(s); "
          f"item embeddings {embed_seconds:.1f} s (0 if cached)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "dataset": "ml-100k", "users": len(dataset.sequences), "items": num_items,
        "protocol": "leave-one-out, full ranking, whole known past excluded, history window 20",
        "machine": {"cpu_threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "processor": platform.processor()},
        "sasrec": {"epochs_max": args.epochs, "patience": args.patience, "seed": args.seed,
                   "hidden": 64, "blocks": 2, "heads": 1, "max_len": 20, "dropout": 0.2,
                   "lr": 1e-3, "batch_size": 128, "loss": "full softmax cross-entropy"},
        "embed_seconds": round(embed_seconds, 1),
        "results": results,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
