"""One lever's LC-Rec rows without the whole evaluate stage: the dense prompt on valid and test, all users, in the
precision given (fp32 by default), under the evaluation protocol. For lever tables: the evaluate stage adds the
baselines, itemsearch, the hybrid and the served rows, over an hour more on 2 cores.

    python bench/lever_rows.py --run-dir RUN [--stages valid,test] [--dtype fp32] [--max-users N]

Writes RUN/lever_rows.json (a stage already there is kept unless listed) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.evaluate import evaluate_sequential  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402
from lcrec_chat.recommender import Recommender  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a trained run (config.yaml, adapter/)")
    parser.add_argument("--stages", default="valid,test")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--max-users", type=int, default=0, help="the first N users only (0 = all)")
    args = parser.parse_args()
    cfg = load_config(args.run_dir / "config.yaml")
    rec = Recommender.from_run(cfg, args.run_dir, dtype=args.dtype)
    split = load_split(args.run_dir)
    out = args.run_dir / "lever_rows.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    for stage in args.stages.split(","):
        rows[stage] = {**evaluate_sequential(rec, split, stage, "dense", 0, args.max_users, cfg.eval.cutoffs),
                       "dtype": args.dtype, "max_users": args.max_users, "machine": machine_record()}
        out.write_text(json.dumps(rows, indent=1))
    print("| stage | NDCG@10 | HR@10 | coverage@10 | top-50 share |\n|---|---|---|---|---|")
    for stage, r in rows.items():
        print(f"| {stage} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} | {r['coverage@10']:.3f} | {r['top50_share@10']:.3f} |")


if __name__ == "__main__":
    main()
