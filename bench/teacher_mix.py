"""Which teacher for distillation (train.distill_teachers)? The run's SASRec and GRU4Rec, and mixtures of their
next-item distributions, ranked under the evaluation protocol (valid and test, all users).

    python bench/teacher_mix.py --run-dir RUN [--shares 0 0.3 0.5 1] [--mix sasrec=0.35,sasrec_s43=0.35,gru4rec=0.3]

A share s scores log((1 - s) softmax(SASRec) + s softmax(GRU4Rec)); pick it on valid. `--mix` ranks any
mixture of the run's `<name>.pt` models (e.g. more seeds of each, an ensemble teacher), one per argument. Adds the
rows to bench/results/teacher_mix.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.distill import SequentialTeacher  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402
from lcrec_chat.ranking import Ranker, evaluate_ranker  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_mix.json"


class MixtureRanker(Ranker):
    """Ranks by the teacher's mixed next-item probability after the whole history."""

    def __init__(self, teacher: SequentialTeacher) -> None:
        self.teacher = teacher
        self.num_items = next(iter(teacher.sources.values())).num_items

    def score(self, histories):
        window = min(s.model.max_len for s in self.teacher.sources.values())
        probs = self.teacher.probabilities([list(h)[-window:] for h in histories])
        return torch.log(torch.stack([p[-1] for p in probs]).clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run with sasrec.pt and gru4rec.pt")
    parser.add_argument("--shares", type=float, nargs="*", default=[0.0, 0.3, 0.5, 1.0], help="GRU4Rec's share")
    parser.add_argument("--mix", nargs="*", default=[], help="name=weight,name=weight,... (the run's <name>.pt)")
    args = parser.parse_args()
    split = load_split(args.run_dir)
    table = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    mixtures = {f"gru4rec share {share:g}": {name: w for name, w in (("sasrec", 1 - share), ("gru4rec", share)) if w > 0}
                for share in args.shares}
    for spec in args.mix:
        try:
            mixtures[spec] = {name: float(w) for name, w in (part.split("=") for part in spec.split(","))}
        except ValueError:
            raise SystemExit(f"--mix {spec!r}: expected name=weight,name=weight,...") from None
    print("| teacher | valid NDCG@10 | valid HR@10 | test NDCG@10 | test HR@10 |\n|---|---|---|---|---|")
    for label, weights in mixtures.items():
        ranker = MixtureRanker(SequentialTeacher.from_run(args.run_dir, weights))
        row = {stage: evaluate_ranker(ranker, split, stage) for stage in ("valid", "test")}
        table[f"{args.run_dir.name}: {label}"] = {**row, "machine": machine_record()}
        print(f"| {label} | {row['valid']['ndcg@10']:.4f} | {row['valid']['hr@10']:.4f} | "
              f"{row['test']['ndcg@10']:.4f} | {row['test']['hr@10']:.4f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
