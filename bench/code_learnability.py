"""How learnable are a run's item codes for a student that reads SASRec's state? (issue 12: where the gap sits)

LC-Rec's model writes an item as shared code tokens, one level at a time: the second code's token means a
different item under each first code, so the model has to turn SASRec's state into a different ranking of the
same tokens for every prefix. This bench asks, without training the LLM, how much that costs with a given set
of codes: small students are distilled from SASRec on the training split exactly as the LLM is (at each level
the teacher's mass summed onto the codes under the true item's prefix) and then rank the valid items by their
product of conditionals (every item scored, which is what 20 beams gave for SASRec: 0.1312 against 0.1315).

  linear:  level-l logits = U_l (A_l h + sum_{j<l} P_lj[c_j]) + b_l: one map of the state per level, the prefix only
           a bias; the teacher is learnable this way where its code scores add up across levels;
  mlp:     level-l logits from an MLP of (h, embeddings of the prefix codes): the prefix can re-map the state.

Codes: the run's codes.json, and residual k-means on SASRec's item vectors (same levels and sizes; items whose
codes collide move to the nearest free last-level code), a linear stand-in for the RQ-VAE.

    python bench/code_learnability.py --run-dir RUN [--epochs 8] [--threads 1]

Prints a markdown table and writes bench/results/code_learnability.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.hardware import machine_record  # noqa: E402
from lcrec_chat.methods.collab_tokens import SASRecSource  # noqa: E402
from lcrec_chat.metrics import rank_metrics, stage_inputs  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "code_learnability.json"


def residual_kmeans(vectors: np.ndarray, sizes: list[int], seed: int = 0, iters: int = 50) -> np.ndarray:
    """[N, levels] codes: k-means on the vectors, then on what each level's centroid leaves; collisions moved
    to the nearest free last-level code."""
    rng = np.random.default_rng(seed)
    residual, codes, books = vectors.astype(np.float64).copy(), [], []
    for k in sizes:
        centroids = residual[rng.choice(len(residual), k, replace=False)]
        for _ in range(iters):
            assign = ((residual[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
            for c in range(k):
                if (assign == c).any():
                    centroids[c] = residual[assign == c].mean(0)
        codes.append(assign)
        books.append(centroids)
        residual = residual - centroids[assign]
    codes = np.stack(codes, 1)
    taken: set[tuple[int, ...]] = set()
    last = books[-1]
    before = residual + last[codes[:, -1]]   # what the last level quantised
    for i in range(len(codes)):
        key = tuple(codes[i])
        if key in taken:
            order = ((before[i][None] - last) ** 2).sum(-1).argsort()
            for c in order:
                if tuple(codes[i, :-1]) + (int(c),) not in taken:
                    codes[i, -1] = c
                    break
        taken.add(tuple(codes[i]))
    return codes


def positions(split, source: SASRecSource, max_len: int, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [P, dim], next items [P]) of training-split windows of max_len + 1 items."""
    histories, nexts = [], []
    for seq in split.train_sequences():
        for end in range(len(seq), 1, -max_len):
            window = seq[max(0, end - max_len - 1):end]
            histories.append(window[:-1])
            nexts.append(window[1:])
    states = []
    for start in range(0, len(histories), 256):
        states += source.states_after_each(histories[start:start + 256])
    states, items = torch.cat(states), torch.tensor([i for n in nexts for i in n])
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:limit]
    return states[keep], items[keep]


class Student(torch.nn.Module):
    def __init__(self, dim: int, sizes: list[int], kind: str, width: int = 256):
        super().__init__()
        self.kind, self.sizes = kind, sizes
        if kind == "linear":
            self.maps = torch.nn.ModuleList(torch.nn.Linear(dim, width) for _ in sizes)
            self.prefix = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Embedding(s, width) for s in sizes[:level])
                                              for level in range(len(sizes)))
            self.heads = torch.nn.ModuleList(torch.nn.Linear(width, s) for s in sizes)
        else:
            self.prefix = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Embedding(s, 64) for s in sizes[:level])
                                              for level in range(len(sizes)))
            self.maps = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(dim + 64 * level, width), torch.nn.GELU(),
                                                                torch.nn.Linear(width, width), torch.nn.GELU())
                                            for level in range(len(sizes)))
            self.heads = torch.nn.ModuleList(torch.nn.Linear(width, s) for s in sizes)

    def forward(self, h: torch.Tensor, prefix: torch.Tensor, level: int) -> torch.Tensor:
        """Level-`level` logits for states h [B, dim] and prefixes [B, level]."""
        embedded = [self.prefix[level][j](prefix[:, j]) for j in range(level)]
        if self.kind == "linear":
            return self.heads[level](self.maps[level](h) + sum(embedded, torch.zeros(())))
        return self.heads[level](self.maps[level](torch.cat([h, *embedded], 1)))


def conditional_targets(probs: torch.Tensor, codes: torch.Tensor, items: torch.Tensor, level: int, size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher's mass over level-`level` codes under each true item's prefix [B, size], allowed-children mask)."""
    same = (codes[None, :, :level] == codes[items][:, None, :level]).all(-1)          # [B, N]
    mass = torch.zeros(len(items), size).scatter_add_(1, codes[:, level].expand(len(items), -1), probs * same)
    allowed = torch.zeros(len(items), size).scatter_add_(1, codes[:, level].expand(len(items), -1), same.float()) > 0
    return mass / mass.sum(1, keepdim=True).clamp_min(1e-12), allowed


def fit(student: Student, states, items, teacher_items: torch.Tensor, codes: torch.Tensor, epochs: int, seed: int
        ) -> float:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    start = time.time()
    for _ in range(epochs):
        for idx in torch.randperm(len(items)).split(512):
            h, item = states[idx], items[idx]
            with torch.no_grad():
                probs = torch.softmax(h @ teacher_items.T, 1)
            loss = 0.0
            for level, size in enumerate(student.sizes):
                target, allowed = conditional_targets(probs, codes, item, level, size)
                logits = student(h, codes[item, :level], level).masked_fill(~allowed, -1e9)
                loss = loss - (target * torch.log_softmax(logits, 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.time() - start


@torch.no_grad()
def item_scores(student: Student, states: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[U, N] log-probability of every item as the product of the student's conditionals over the trie."""
    n, levels = codes.shape
    total = torch.zeros(len(states), n)
    for level, size in enumerate(student.sizes):
        prefixes, owner = torch.unique(codes[:, :level], dim=0, return_inverse=True) if level else \
            (torch.zeros(1, 0, dtype=torch.long), torch.zeros(n, dtype=torch.long))
        allowed = torch.zeros(len(prefixes), size, dtype=torch.bool)
        allowed[owner, codes[:, level]] = True
        for row, h in enumerate(states):
            logits = student(h.expand(len(prefixes), -1), prefixes, level).masked_fill(~allowed, -1e9)
            logp = torch.log_softmax(logits, 1)
            total[row] += logp[owner, codes[:, level]]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run with split.json, codes.json, sasrec.pt")
    parser.add_argument("--positions", type=int, default=40000, help="training positions sampled")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = load_split(args.run_dir)
    source = SASRecSource.load(args.run_dir / "sasrec.pt")
    teacher_items = source.item_vectors().float()
    run_codes = json.loads((args.run_dir / "codes.json").read_text())
    sizes = list(run_codes["codebook_sizes"])
    code_sets = {"run's codes (codes.json)": np.asarray(run_codes["codes"]),
                 "residual k-means on SASRec item vectors": residual_kmeans(teacher_items.numpy(), sizes, args.seed)}
    states, items = positions(split, source, split.max_history, args.positions, args.seed)
    histories, exclude, targets = stage_inputs(split, "valid", 0)
    with torch.no_grad():
        valid_states = source.user_vectors(histories).float()
        exact = valid_states @ teacher_items.T
    for row, past in enumerate(exclude):
        exact[row, past] = float("-inf")
    top = lambda scores: torch.topk(scores, 10, dim=1).indices.tolist()   # noqa: E731
    table = {"teacher": {"valid_ndcg@10": rank_metrics(top(exact), targets, [10])["ndcg@10"]},
             "positions": len(items), "epochs": args.epochs, "machine": machine_record(), "codes": {}}
    print(f"SASRec ranking every item: valid NDCG@10 {table['teacher']['valid_ndcg@10']:.4f}\n")
    print("| codes | distinct full codes | student | valid NDCG@10 | HR@10 | fit s |\n|---|---|---|---|---|---|")
    for name, codes in code_sets.items():
        codes_t = torch.as_tensor(codes, dtype=torch.long)
        distinct = len({tuple(c) for c in codes.tolist()})
        rows = {}
        for kind in ("linear", "mlp"):
            torch.manual_seed(args.seed)
            student = Student(teacher_items.shape[1], sizes, kind)
            seconds = fit(student, states, items, teacher_items, codes_t, args.epochs, args.seed)
            scores = item_scores(student.eval(), valid_states, codes_t)
            for row, past in enumerate(exclude):
                scores[row, past] = float("-inf")
            metrics = rank_metrics(top(scores), targets, [10])
            rows[kind] = {**{k: metrics[k] for k in ("ndcg@10", "hr@10")}, "fit_seconds": round(seconds, 1)}
            print(f"| {name} | {distinct} | {kind} | {metrics['ndcg@10']:.4f} | {metrics['hr@10']:.4f} | {seconds:.0f} |")
        table["codes"][name] = {"distinct": distinct, "students": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
