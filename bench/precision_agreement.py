"""Do fp32, bf16, NF4 and int8 inference rank the same items? (fp32/bf16: the evaluation precisions; int8 the app's
CPU serving precision, NF4 its GPU one.)

Loads a run once per precision (LoRA folded into fp32/bf16 weights; kept beside the 4-bit weights for nf4),
generates the top 10 for the same valid users with the dense history prompt, and compares each precision with
the first: top-1 agreement, mean overlap of the top-10 sets, and NDCG@10 / HR@10, with the time each took.

    python bench/precision_agreement.py --run-dir runs/ml-100k --config configs/ml-100k.yaml [--users 100]
        [--dtypes fp32,bf16,nf4]

int8 variants decode one request per pass, as the app does: ``int8`` as served (the adapter's stored smoothing
scales, smoothing.py, when present), ``int8-plain`` without smoothing, ``int8-a0.5`` with scales calibrated here
(evaluate.calibration_maxima on the first precision's model) at that alpha.

Adds its result to bench/results/precision_agreement.json (one entry per precisions and stage) and prints a
markdown table.
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
from lcrec_chat import backbone  # noqa: E402
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.evaluate import calibration_maxima, evaluation_model, generate_ranked  # noqa: E402
from lcrec_chat.smoothing import smoothing_scales  # noqa: E402
from lcrec_chat.metrics import rank_metrics, stage_inputs  # noqa: E402
from lcrec_chat.recommender import Recommender, Request  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "precision_agreement.json"
stored_smoothing = backbone.load_smoothing   # what the int8 loader reads the adapter's scales with


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
    calibrated = None
    for dtype in dtypes:
        if dtype.startswith("int8-"):   # the variants stand in for the loader's reading of the stored scales
            variant = dtype.split("-", 1)[1]
            if variant != "plain" and calibrated is None:
                parser.error(f"{dtype}: list an fp32 or bf16 precision before it (its model is calibrated on)")
            scales = None if variant == "plain" else smoothing_scales(evaluation_model(calibrated), calibration_maxima(
                calibrated, split), alpha=float(variant.lstrip("a")))
            backbone.load_smoothing = lambda _adapter, scales=scales: scales
        else:
            backbone.load_smoothing = stored_smoothing
        rec = Recommender.from_run(cfg, args.run_dir, dtype=dtype.split("-")[0])
        if dtype.startswith("int8"):
            rec.batch_size = 1   # int8 activations are scaled per call: a batch would couple its prompts
        started = time.perf_counter()
        ranked[dtype] = generate_ranked(rec, requests, 10, dtype)
        seconds = time.perf_counter() - started
        metrics = rank_metrics(ranked[dtype], targets, (10,))
        rows[dtype] = {"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"], "seconds": round(seconds, 1)}
        if calibrated is None and not dtype.startswith("int8"):
            calibrated = rec   # kept: the int8-a<alpha> variants calibrate on it
        else:
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
    table = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if "precisions" in table:   # a file from before results were kept per comparison
        table = {f"{','.join(table['precisions'])} {table['stage']}": table}
    table[f"{args.dtypes} {args.stage}"] = result
    RESULTS.write_text(json.dumps(table, indent=1))
    print(f"| precision | users | NDCG@10 | HR@10 | seconds |\n|---|---|---|---|---|")
    for dtype, row in rows.items():
        print(f"| {dtype} | {len(requests)} | {row['ndcg@10']:.4f} | {row['hr@10']:.4f} | {row['seconds']} |")
    for pair, value in agreement.items():
        print(f"{pair}: top-1 identical {value['top1_same']:.0%}, top-10 overlap {value['top10_overlap']:.0%}")


if __name__ == "__main__":
    main()
