"""Quality figures of an item index and the code-usage plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .tokens import level_letter


def code_usage(codes: np.ndarray, sizes: list[int]) -> list[dict]:
    """Per level: codes used of the codebook, the most items on one code, and the perplexity of the
    code distribution (exp of its entropy: equals `size` when every code is used equally)."""
    rows = []
    for level, size in enumerate(sizes):
        counts = np.bincount(codes[:, level], minlength=size) if len(codes) else np.zeros(size, int)
        p = counts[counts > 0] / max(1, counts.sum())
        rows.append({"level": level_letter(level), "size": int(size), "used": int((counts > 0).sum()),
                     "max_items_per_code": int(counts.max()) if len(codes) else 0,
                     "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2) if len(p) else 0.0})
    return rows


def neighbour_first_code_share(emb: np.ndarray, codes: np.ndarray, chunk: int = 2048) -> dict:
    """Share of items whose nearest other item (cosine, on the text vectors) has the same first-level
    code, beside what random codes with the same usage would give (sum of squared code shares)."""
    n = len(emb)
    if n < 2:
        return {"share": 1.0, "chance": 1.0}
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    nearest = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        sim = unit[start:start + chunk] @ unit.T
        sim[np.arange(sim.shape[0]), np.arange(start, start + sim.shape[0])] = -np.inf
        nearest[start:start + chunk] = sim.argmax(1)
    first = codes[:, 0]
    p = np.bincount(first) / n
    return {"share": round(float((first == first[nearest]).mean()), 4), "chance": round(float((p ** 2).sum()), 4)}


def plot_code_usage(codes: np.ndarray, sizes: list[int], path: Path) -> None:
    """One panel per level: items per code, codes sorted by use (a flat profile = even use)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # no pyplot: no global GUI state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(sizes), 2.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for level, (ax, size) in enumerate(zip(axes, sizes)):
        counts = np.sort(np.bincount(codes[:, level], minlength=size))[::-1]
        ax.bar(np.arange(size), counts, width=1.0, color="#4472c4")
        ax.set_title(f"level {level_letter(level)}: {(counts > 0).sum()}/{size} codes used", fontsize=9)
        ax.set_xlabel("code (by use)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("items", fontsize=8)
    fig.savefig(path, dpi=110)
