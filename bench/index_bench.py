"""Index stage benchmark: time per phase, peak memory and index quality on ML-100K and/or ML-1M.

    python bench/index_bench.py --dataset ml-100k            # or ml-1m, or both
    python bench/index_bench.py --dataset ml-100k --set index.codebook_sizes=[64,64,64] --tag 3x64

Runs the whole stage (embeddings included unless --keep-embeddings) into runs/bench-index/<name>,
prints a table and writes bench/results/index_<name>[_<tag>].json.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.data import load_dataset  # noqa: E402
from lcrec_chat.indexing import run_index  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402

CONFIGS = {"ml-100k": ROOT / "configs/ml-100k.yaml", "ml-1m": ROOT / "configs/ml-1m.yaml"}


def bench_one(name: str, overrides: list[str], keep_embeddings: bool, tag: str) -> dict:
    run_dir = ROOT / "runs/bench-index" / (name + (f"_{tag}" if tag else ""))
    cfg = load_config(CONFIGS[name], [f"run_dir={run_dir}", *overrides])
    if run_dir.exists() and not keep_embeddings:
        shutil.rmtree(run_dir)
    t = time.perf_counter()
    items = load_dataset(cfg.data).items
    load_s = time.perf_counter() - t
    report = run_index(cfg, items, force=True)
    report["times_s"]["load_items_s"] = round(load_s, 2)
    return {
        "dataset": name, "tag": tag, "overrides": overrides, "index_config": cfg.to_dict()["index"],
        "torch_threads": torch.get_num_threads(), "machine": machine_record(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **{k: v for k, v in report.items() if k not in ("peak_rss_mb", "training")},
        "training": {k: v for k, v in report["training"].items() if k != "history"},
        "training_history": report["training"]["history"],
    }


def print_table(r: dict) -> None:
    usage = " ".join(f"{u['level']}:{u['used']}/{u['size']}" for u in r["codes_used_per_level"])
    rows = [
        ("items", r["items"]), ("codebook sizes", r["codebook_sizes"]),
        ("collision rate, greedy codes", f"{r['collision_rate_greedy']:.4f}"),
        ("collision rate, before exact step", f"{r['collision_rate_before_exact']:.4f}"),
        ("collision rate, after exact step", f"{r['collision_rate_after_exact']:.4f}"),
        ("items moved by exact step", r["items_moved_by_exact_step"]),
        ("LC-Rec procedure collision rate", f"{r['lcrec_procedure']['collision_rate']:.4f}"),
        ("codes used per level", usage),
        ("recon MSE greedy / final", f"{r['recon_mse_greedy']:.4f} / {r['recon_mse_final']:.4f}"),
        ("NN shares first code (chance)",
         f"{r['neighbour_same_first_code']['share']:.3f} ({r['neighbour_same_first_code']['chance']:.3f})"),
        ("epochs run / best", f"{r['training']['epochs_run']} / {r['training']['best_epoch']}"),
        *((f"time {k[:-2]} (s)", v) for k, v in r["times_s"].items()),
        ("peak RSS (MB)", r["peak_rss_mb"]), ("torch threads (training)", r["training"]["threads"]),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n== index stage: {r['dataset']} {r['tag']}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["ml-100k", "ml-1m", "both"], default="ml-100k")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--tag", default="", help="suffix for the run folder and result file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--keep-embeddings", action="store_true", help="reuse cached item embeddings")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = ROOT / "bench/results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (["ml-100k", "ml-1m"] if args.dataset == "both" else [args.dataset]):
        result = bench_one(name, args.set, args.keep_embeddings, args.tag)
        print_table(result)
        path = out_dir / f"index_{name}{'_' + args.tag if args.tag else ''}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
