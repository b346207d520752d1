"""PNG plots for the run report (matplotlib, no display)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(log_path: Path, out: Path) -> None:
    """Training loss per step and validation loss per task."""
    entries = []
    for line in Path(log_path).read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut off mid-write: the plot does without it
            continue
    fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [e["step"] for e in entries if "loss" in e]
    ax_train.plot(steps, [e["loss"] for e in entries if "loss" in e], lw=0.6)
    ax_train.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    evals = [e for e in entries if "valid" in e]
    for task in sorted({t for e in evals for t in e["valid"]}):
        ax_valid.plot([e["step"] for e in evals], [e["valid"][task] for e in evals], marker="o", label=task)
    ax_valid.set(title="validation loss per task", xlabel="step")
    if evals:
        ax_valid.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
