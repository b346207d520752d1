"""Two rows compared user by user: NDCG@10 of B minus A on the same users, with a 95% paired bootstrap interval.

    python bench/paired_rows.py RUN_A RUN_B [--stages valid,test] [--k 10] [--samples 10000]

Each RUN is a run folder whose `bench/lever_rows.py` rows carry the users' target ranks
(`metrics.target_ranks`); rows computed before they were kept say so. The interval is the sampling part of the
noise only (which users happen to be in the sample): a method's run-to-run spread (seeds, the CPU it was trained on)
comes on top and is measured by training it again. Writes RUN_B/paired_rows.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.metrics import paired_difference, parse_target_ranks  # noqa: E402


def stage_row(run: Path, stage: str) -> dict:
    """The run's LC-Rec dense row for `stage` from lever_rows.json (lever_rows.py reuses the evaluate stage's cached
    row when it is current, so the row cache itself, which may hold rows of an older adapter, is not read here)."""
    path = run / "lever_rows.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    if stage in rows:
        return rows[stage]
    raise SystemExit(f"{run}: no {stage} row (run `python bench/lever_rows.py --run-dir {run} --stages {stage}`)")


def rank_depth(row: dict) -> int:
    """How deep the row's target ranks go: its largest cutoff (metrics.ranked_row keeps ranks to max(ks))."""
    return max(int(key.split("@")[1]) for key in row if key.startswith("ndcg@"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--stages", default="valid,test")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10_000)
    args = parser.parse_args()
    results = {}
    for stage in args.stages.split(","):
        rows = [stage_row(run, stage) for run in (args.run_a, args.run_b)]
        for run, row in zip((args.run_a, args.run_b), rows):
            if "target_ranks" not in row:
                raise SystemExit(f"{run}: its {stage} row predates the users' target ranks; compute it again "
                                 f"(`python bench/lever_rows.py --run-dir {run} --stages {stage}`)")
            if args.k > rank_depth(row):   # ranks deeper than this were not kept: they would all read as misses
                raise SystemExit(f"{run}: its {stage} row keeps the target's rank down to {rank_depth(row)} only; "
                                 f"--k {args.k} cannot be read from it")
        digests = {row.get("targets_digest") for row in rows}
        if len(digests) > 1 and None not in digests:
            raise SystemExit(f"the two {stage} rows score different targets (another split or stage): "
                             "a user-by-user comparison needs the same users and targets")
        results[stage] = paired_difference(*(parse_target_ranks(r["target_ranks"]) for r in rows),
                                           k=args.k, samples=args.samples)
    out = args.run_b / "paired_rows.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[str(args.run_a.resolve())] = results
    out.write_text(json.dumps(saved, indent=1))
    k = args.k
    print(f"A = {args.run_a}, B = {args.run_b}\n")
    print(f"| stage | NDCG@{k} A | NDCG@{k} B | B - A | 95% interval | users B better / A better |\n|---|---|---|---|---|---|")
    for stage, r in results.items():
        print(f"| {stage} | {r[f'ndcg@{k}_a']:.4f} | {r[f'ndcg@{k}_b']:.4f} | {r['difference']:+.4f} | "
              f"[{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}] | {r['users_b_better']} / {r['users_a_better']} |")


if __name__ == "__main__":
    main()
