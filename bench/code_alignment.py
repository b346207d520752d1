"""How well do a run's item codes line up with what SASRec predicts? (issue 12's lever "the codes")

For every valid user, SASRec's next-item distribution (softmax over the catalogue, the user's past excluded) is
summed over the items under each code prefix; a code set whose prefixes group the items SASRec scores alike puts
more of that mass on the target's prefix, and a model that sees SASRec's state in its prompt (train.collab_tokens)
has an easier map from that state to the first code. Reported per prefix length: the share of users whose
target's prefix holds the most mass (top-1), is among the 5 heaviest, and the mean mass on it. Then the ceiling
of a student that matches SASRec's code conditionals exactly (train.distill_weight): SASRec's distribution
decoded through the trie with beam search (the beams kept by prefix mass, as LC-Rec decodes), NDCG@10 beside
SASRec ranking every item.

    python bench/code_alignment.py --run-dir RUN [--codes OTHER/codes.json ...]

RUN gives the split and sasrec.pt; each codes file (default: RUN/codes.json) is scored against them. Adds its rows
to bench/results/code_alignment.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.hardware import machine_record  # noqa: E402
from lcrec_chat.methods.collab_tokens import SASRecSource  # noqa: E402
from lcrec_chat.metrics import rank_metrics, stage_inputs  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "code_alignment.json"


def prefix_alignment(probs: np.ndarray, codes: np.ndarray, targets: np.ndarray, length: int) -> dict:
    """top-1 / top-5 share and mean mass of the target's code prefix of `length` levels under `probs` [U, N]."""
    _, group = np.unique(codes[:, :length], axis=0, return_inverse=True)
    group = group.ravel()
    mass = np.zeros((len(probs), group.max() + 1))
    np.add.at(mass.T, group, probs.T)
    target_mass = mass[np.arange(len(probs)), group[targets]]
    heavier = (mass > target_mass[:, None]).sum(1)
    return {"prefixes": int(group.max() + 1), "top1": float(np.mean(heavier == 0)),
            "top5": float(np.mean(heavier < 5)), "target_mass": float(target_mass.mean())}


def trie_decoded(probs: np.ndarray, codes: np.ndarray, beams: int = 20, k: int = 10) -> np.ndarray:
    """[U, k] items of beam search over the code trie scored by prefix mass under `probs` [U, N]."""
    levels = codes.shape[1]
    groups = [np.unique(codes[:, :length], axis=0, return_inverse=True)[1].ravel() for length in range(1, levels + 1)]
    out = np.zeros((len(probs), k), dtype=int)
    for row, p in enumerate(probs):
        alive = np.ones(len(p), dtype=bool)              # items under a kept prefix
        for group in groups:
            mass = np.bincount(group, weights=p * alive, minlength=group.max() + 1)
            kept = np.argsort(-mass, kind="stable")[:beams]
            kept = kept[mass[kept] > 0]
            alive = np.isin(group, kept)
        # the last level's prefixes are items (codes are unique): rank the surviving items by probability
        survivors = np.flatnonzero(alive)
        out[row] = survivors[np.argsort(-p[survivors], kind="stable")][:k]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run with split.json and sasrec.pt")
    parser.add_argument("--codes", type=Path, nargs="*", help="codes.json files (default: the run's)")
    args = parser.parse_args()
    split = load_split(args.run_dir)
    source = SASRecSource.load(args.run_dir / "sasrec.pt")
    histories, exclude, targets = stage_inputs(split, "valid", 0)
    with torch.no_grad():
        scores = source.user_vectors(histories) @ source.item_vectors().T
    for row, past in enumerate(exclude):
        scores[row, past] = float("-inf")
    probs = torch.softmax(scores, 1).numpy()
    table = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    exact = rank_metrics(np.argsort(-probs, axis=1, kind="stable")[:, :10].tolist(), targets, [10])["ndcg@10"]
    decoded_rows = []
    print("| codes | prefix | prefixes | top-1 | top-5 | mass on the target's prefix |\n|---|---|---|---|---|---|")
    for path in args.codes or [args.run_dir / "codes.json"]:
        data = json.loads(Path(path).read_text())
        codes = np.asarray(data["codes"])
        index = data.get("index_config", {})
        name = f"collab_weight {index.get('collab_weight', 0)}, {index.get('collab_source', 'svd')} vectors"
        rows = {length: prefix_alignment(probs, codes, np.asarray(targets), length) for length in (1, 2)}
        decoded = rank_metrics(trie_decoded(probs, codes).tolist(), targets, [10])["ndcg@10"]
        table[name] = {"valid_users": len(targets), "by_prefix_length": rows, "machine": machine_record(),
                       "sasrec_ndcg@10": {"ranking every item": exact, "decoded through the trie, 20 beams": decoded}}
        for length, r in rows.items():
            print(f"| {name} | {length} | {r['prefixes']} | {r['top1']:.3f} | {r['top5']:.3f} | {r['target_mass']:.3f} |")
        decoded_rows.append(f"| {name} | {exact:.4f} | {decoded:.4f} |")
    print("\n| codes | SASRec valid NDCG@10, every item ranked | decoded through the trie, 20 beams |\n|---|---|---|")
    print("\n".join(decoded_rows))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
