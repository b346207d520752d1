"""Pop, SASRec, GRU4Rec and text-kNN on ML-100K under the project's leave-one-out protocol.

    .venv/bin/python bench/baselines_bench.py [--epochs 200] [--patience 10] [--threads 2] [--seeds 42 43 44]
        [--stride 5] [--only sasrec gru4rec] [--recbole-block] [--out FILE]

Prints a table (valid and test, HR@1/5/10, NDCG@5/10, users; sequential models: mean over seeds, with the
spread of test NDCG@10) and the training times, and
writes bench/results/baselines.json. Item embeddings for text-kNN: all-MiniLM-L6-v2 over
"title (year). Genres: ..." (lcrec_chat.embed, cached under .cache/bench/).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lcrec_chat.baselines import SEQUENTIAL, run_baselines  # noqa: E402
from lcrec_chat.config import EvalConfig, IndexConfig  # noqa: E402
from lcrec_chat.data.movielens import load_ml100k  # noqa: E402
from lcrec_chat.data.split import leave_one_out  # noqa: E402
from lcrec_chat.embed import embed_items  # noqa: E402
from lcrec_chat.hardware import describe, machine_record  # noqa: E402

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
    parser.add_argument("--epochs", type=int, default=EvalConfig.baseline_epochs)
    parser.add_argument("--patience", type=int, default=EvalConfig.baseline_patience)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    parser.add_argument("--stride", type=int, default=EvalConfig.baseline_stride)
    parser.add_argument("--only", nargs="+", default=None, help="sequential models to run (sasrec gru4rec)")
    parser.add_argument("--seeds", type=int, nargs="+", default=EvalConfig().baseline_seeds)
    parser.add_argument("--recbole-block", action="store_true",
                        help="SASRec with RecBole's transformer block exactly (baselines._SASRecNet)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/baselines.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    for name in list(SEQUENTIAL):
        if args.only and name not in args.only:
            del SEQUENTIAL[name]
    if args.recbole_block and "sasrec" in SEQUENTIAL:
        SEQUENTIAL["sasrec"] = functools.partial(SEQUENTIAL["sasrec"], recbole_block=True)
    dataset = load_ml100k()
    split = leave_one_out(dataset, 20)
    num_items = len(dataset.items)
    start = time.perf_counter()
    item_emb = embed_items(dataset.items, IndexConfig(), cache_dir=ROOT / ".cache/bench")
    embed_seconds = time.perf_counter() - start

    cfg = EvalConfig(baseline_epochs=args.epochs, baseline_patience=args.patience, baseline_seeds=args.seeds,
                     baseline_stride=args.stride)
    results = run_baselines(split, num_items, item_emb, cfg, num_threads=args.threads)
    print(f"\nML-100K: {len(dataset.sequences)} users, {num_items} items, "
          f"{dataset.num_interactions} interactions; full ranking, history items excluded\n")
    print(table(results))
    for name in SEQUENTIAL:
        entry = results[name]
        print(f"{name}: test NDCG@10 per seed {[round(v, 4) for v in entry['test']['ndcg@10_per_seed']]}, "
              f"std {entry['test']['ndcg@10_std']:.4f}; epochs run {entry['epochs_run']}, best {entry['best_epoch']}, "
              f"{entry['fit_seconds']:.1f} s per fit on {args.threads} thread(s)")
    print(f"item embeddings {embed_seconds:.1f} s (0 if cached); machine: {describe()}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "dataset": "ml-100k", "users": len(dataset.sequences), "items": num_items,
        "protocol": "leave-one-out, full ranking, whole known past excluded, history window 20",
        "machine": {**machine_record(), "threads": args.threads},
        "training": {"epochs_max": args.epochs, "patience": args.patience, "seeds": args.seeds, "max_len": 20,
                     "lr": 1e-3, "batch_size": 256, "stride": args.stride,
                     "loss": "full softmax cross-entropy, " + (
                         "every training prefix" if args.stride == 1 else f"{args.stride} targets per window"),
                     "sasrec": "2 blocks x 2 heads, hidden 64, inner 256, dropout 0.5 (RecBole)"
                               + (", RecBole's block exactly" if args.recbole_block else ""),
                     "gru4rec": "embedding 64, GRU hidden 128, embedding dropout 0.3 (RecBole)"},
        "embed_seconds": round(embed_seconds, 1),
        "results": results,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
