"""Do fp32, bf16 and NF4 inference rank the same items? (eval.dtype=bf16 is the shipped evaluation precision,
NF4 the app's serving precision.)

Loads a run once per precision (LoRA folded into fp32/bf16 weights; kept beside the 4-bit weights for nf4),
generates the top 10 for the same valid users with the dense history prompt, and compares each precision with
the first: top-1 agreement, mean overlap of the top-10 sets, and NDCG@10 / HR@10, with the time each took.

    python bench/precision_agreement.py --run-dir runs/ml-100k --config configs/ml-100k.yaml [--users 100]
        [--dtypes fp32,bf16,nf4]

Writes bench/results/precision_agreement.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.evaluate import generate_ranked  # noqa: E402
from lcrec_chat.metrics import rank_metrics, stage_inputs  # noqa: E402
from lcrec_chat.recommender import Recommender, Request  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "precision_agreement.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ml-100k.yaml")
    parser.add_argument("--run-dir", default="runs/ml-100k")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--stage", default="valid", choices=["valid", "test"])
    parser.add_argument("--dtypes", default="fp32,bf16,nf4", help="comma-separated; the first is the reference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config)
    split = load_split(Path(args.run_dir))
    histories, exclude, targets = stage_inputs(split, args.stage, args.users)
    requests = [Request(history=h, exclude=e, style="dense") for h, e in zip(histories, exclude)]

    ranked: dict[str, list[list[int]]] = {}
    rows = {}
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        rec = Recommender.from_run(cfg, args.run_dir, dtype=dtype)
        started = time.perf_counter()
        ranked[dtype] = generate_ranked(rec, requests, 10, dtype)
        seconds = time.perf_counter() - started
        metrics = rank_metrics(ranked[dtype], targets, (10,))
        rows[dtype] = {"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"], "seconds": round(seconds, 1)}
        del rec
    agreement = {}
    for dtype in dtypes[1:]:
        pairs = list(zip(ranked[dtypes[0]], ranked[dtype]))
        agreement[f"{dtype}_vs_{dtypes[0]}"] = {
            "top1_same": sum(a[:1] == b[:1] for a, b in pairs) / len(pairs),
            "top10_overlap": sum(len(set(a) & set(b)) / 10 for a, b in pairs) / len(pairs)}
    result = {"users": len(requests), "stage": args.stage, "run_dir": args.run_dir, "precisions": rows,
              "agreement": agreement, "machine": {**machine_record(), "cpu_count": os.cpu_count(), "torch_threads":
                                                  torch.get_num_threads(), "platform": platform.platform()}}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"| precision | users | NDCG@10 | HR@10 | seconds |\n|---|---|---|---|---|")
    for dtype, row in rows.items():
        print(f"| {dtype} | {len(requests)} | {row['ndcg@10']:.4f} | {row['hr@10']:.4f} | {row['seconds']} |")
    for pair, value in agreement.items():
        print(f"{pair}: top-1 identical {value['top1_same']:.0%}, top-10 overlap {value['top10_overlap']:.0%}")


if __name__ == "__main__":
    main()
