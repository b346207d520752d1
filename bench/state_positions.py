"""How well a sequential model predicts the next item from the state at each place of a left-padded window (what the
collaborative prompt and, by default, the distillation teacher read) against the state of the same prefix as a
history of its own (train.teacher_prefix_states).

    python bench/state_positions.py [--run-dir models/ml-100k] [--model sasrec] [--out FILE]

Over every user's last full training window (20 items and the one after each), the next item's NDCG@10 among all
items, the window's items so far excluded, per place k = 0..19. Prints a table and writes
bench/results/state_positions.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lcrec_chat.hardware import machine_record  # noqa: E402
from lcrec_chat.methods.collab_tokens import SASRecSource  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402


def ndcg_at_10(scores: torch.Tensor, target: int, seen: list[int]) -> float:
    scores = scores.clone()
    scores[seen] = -math.inf
    rank = int((scores > scores[target]).sum())
    return 1 / math.log2(rank + 2) if rank < 10 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "models" / "ml-100k")
    parser.add_argument("--model", default="sasrec", help="a sequential model file of the run (sasrec, gru4rec_s43)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "state_positions.json")
    args = parser.parse_args()
    source = SASRecSource.load(args.run_dir / f"{args.model}.pt")
    length = source.model.max_len
    windows = [s[-(length + 1):] for s in load_split(args.run_dir).train_sequences() if len(s) > length]
    items = source.item_vectors()
    by_place = {"window": [[] for _ in range(length)], "own_prefix": [[] for _ in range(length)]}
    for window in windows:
        history = window[:length]
        for mode in by_place:
            scores = source.states_after_each([history], own_prefix=mode == "own_prefix")[0] @ items.T
            for k in range(length):
                by_place[mode][k].append(ndcg_at_10(scores[k], window[k + 1], history[:k + 1]))
    mean = {mode: [sum(v) / len(v) for v in places] for mode, places in by_place.items()}

    def span(mode: str, places: range) -> float:
        values = [x for k in places for x in by_place[mode][k]]
        return sum(values) / len(values)
    print(f"{args.run_dir / args.model}: {len(windows)} full windows of {length} items\n")
    print("| place | NDCG@10 from the window's state | from the prefix's own state |\n|---|---|---|")
    for k in range(length):
        print(f"| {k} | {mean['window'][k]:.4f} | {mean['own_prefix'][k]:.4f} |")
    spans = {f"places {a}-{b - 1}": {mode: span(mode, range(a, b)) for mode in by_place}
             for a, b in ((0, length - 5), (length - 5, length))}
    for name, row in spans.items():
        print(f"| {name} | {row['window']:.4f} | {row['own_prefix']:.4f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "model": args.model, "windows": len(windows),
                                    "ndcg@10_by_place": mean, "spans": spans, "machine": machine_record()}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
