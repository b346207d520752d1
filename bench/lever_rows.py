"""One lever's LC-Rec rows without the whole evaluate stage: the dense prompt on valid and test, all users, under the
evaluation protocol. For lever tables: the evaluate stage adds the baselines, itemsearch, the hybrid and the served
rows, over an hour more on 2 cores.

    python bench/lever_rows.py --run-dir RUN [--stages valid,test] [--dtype fp32] [--max-users N] [--drop-head prefix]

`--stages select,valid,test` adds the select stage (split.py): for arms trained with train.hold_out_last 2 it is the
stage arms are chosen on, its history ending with an item the LLM never read, as test's does.
Writes RUN/lever_rows.json (a stage already there is kept unless listed) and prints a markdown table; each row
keeps the users' target ranks, so two arms' rows can be compared user by user (bench/paired_rows.py).
`--drop-head prefix|all` decodes with the collaborative head's prefix MLP (or the whole head) switched off: how
much of a trained model's ranking comes through it (rows stored as "STAGE without ..."). In the
evaluate stage's own precision (the default) and on all users, each row goes through the stage's row cache
(RUN/eval_rows.json), so the lever whose valid row wins is shipped without computing its rows twice.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.backbone import resolve_device  # noqa: E402
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.evaluate import evaluate_sequential  # noqa: E402
from lcrec_chat.hardware import machine_record, resolve_dtype  # noqa: E402
from lcrec_chat.recommender import Recommender  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402
from lcrec_chat.stages import lcrec_row_cache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a trained run (config.yaml, adapter/)")
    parser.add_argument("--stages", default="valid,test")
    parser.add_argument("--dtype", default="", help="default: the evaluate stage's (eval.dtype, auto = native)")
    parser.add_argument("--max-users", type=int, default=0, help="the first N users only (0 = all)")
    parser.add_argument("--drop-head", choices=["prefix", "all"], default="",
                        help="switch off the collaborative head's prefix MLP or the whole head when decoding")
    args = parser.parse_args()
    cfg = load_config(args.run_dir / "config.yaml")
    cfg.run_dir = str(args.run_dir)
    stage_dtype = resolve_dtype(cfg.eval.dtype or cfg.model.dtype, resolve_device(cfg.model.device))
    dtype = args.dtype or stage_dtype
    # the stage's rows are every user's in its precision; anything else is computed here only
    cache = lcrec_row_cache(cfg, dtype) if dtype == stage_dtype and args.max_users == cfg.eval.max_users \
        and not args.drop_head else None
    rec = Recommender.from_run(cfg, args.run_dir, dtype=dtype)
    if args.drop_head:
        drop_head(rec, args.drop_head)
    split = load_split(args.run_dir)
    out = args.run_dir / "lever_rows.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    if cache is not None:   # rows of an adapter trained since (another fingerprint) must not be read beside new ones
        stale = [key for key, row in rows.items() if row.get("fingerprint") not in (None, cache.fingerprint)]
        for key in stale:
            print(f"dropping the {key} row of {out}: it scored another adapter or protocol")
            del rows[key]
    for stage in args.stages.split(","):
        def compute(stage=stage) -> dict:
            return evaluate_sequential(rec, split, stage, "dense", 0, args.max_users, cfg.eval.cutoffs)
        row = cache.get(f"dense {stage}", compute) if cache is not None else compute()
        key = f"{stage} without {DROPPED[args.drop_head]}" if args.drop_head else stage
        rows[key] = {**row, "dtype": dtype, "max_users": args.max_users, "machine": machine_record(),
                     "fingerprint": cache.fingerprint if cache is not None else None}
        out.write_text(json.dumps(rows, indent=1))
    print("| stage | NDCG@10 | HR@10 | coverage@10 | top-50 share |\n|---|---|---|---|---|")
    for stage, r in rows.items():
        print(f"| {stage} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} | {r['coverage@10']:.3f} | {r['top50_share@10']:.3f} |")


DROPPED = {"prefix": "the head's prefix MLP", "all": "the collaborative head"}


def drop_head(rec: Recommender, which: str) -> None:
    """Zero the last layer of the collaborative head's prefix MLP ("prefix") and also its linear map ("all")."""
    mapper = rec.collab.mapper if rec.collab is not None else None
    if mapper is None or not mapper.logit_levels or (which == "prefix" and not mapper.prefix_width):
        raise SystemExit(f"--drop-head {which}: this adapter has no collaborative head with that part (train.collab_head, "
                         "train.collab_head_width)")
    with torch.no_grad():
        if mapper.prefix_width:
            mapper.on_logits_prefix_out.zero_()
        if which == "all":
            mapper.on_logits_weight.zero_()
            mapper.on_logits_bias.zero_()


if __name__ == "__main__":
    main()
