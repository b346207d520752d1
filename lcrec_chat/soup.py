"""A model soup: the element-wise average of adapters trained from the same start under other seeds.

Members that start from one adapter and move little (a short, low-rate phase) stay in one basin, so their average
keeps each one's skill and drops part of each one's seed noise, at the cost of one model when serving (an ensemble
would run every member). LoRA deltas are averaged exactly: the mean of the members' s * B_i A_i is one adapter of
rank n * r whose A stacks the members' A and whose B stacks their B divided by n, at the same scaling s. Every other
trained tensor (the new index-token rows, the collaborative mapper and its head) is averaged element-wise."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch

from .collab_prompt import MAPPER_FILE
from .smoothing import SMOOTHING_FILE

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# a member's training record, and what later stages wrote for the adapter they found (the head a refit started
# from, the int8 calibration): the soup is another model, so they stay with the member
NOT_CARRIED = {"collab_mapper.phases.pt", SMOOTHING_FILE, "head_refit.json", "train_log.jsonl", "train_summary.json",
               "loss_curves.png"}


def average_adapters(members: list[Path], out: Path) -> None:
    """out/: the soup of the member adapter folders (same base, config, index tokens and mapper layout)."""
    if len(members) < 2:
        raise ValueError(f"a soup needs at least two adapters, got {len(members)}")
    configs = [json.loads((m / CONFIG).read_text()) for m in members]
    for c in configs:   # PEFT writes the target modules from a set, in any order
        if isinstance(c.get("target_modules"), list):
            c["target_modules"] = sorted(c["target_modules"])
    if any(c != configs[0] for c in configs[1:]):
        raise ValueError(f"soup members must share one adapter config: {members[0]} and another differ")
    config = dict(configs[0])
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("a soup of adapters with per-module ranks (rank_pattern, alpha_pattern) is not supported")
    from safetensors.torch import load_file, save_file
    states = [load_file(str(m / WEIGHTS)) for m in members]
    if any(s.keys() != states[0].keys() for s in states[1:]):
        raise ValueError("soup members must train the same tensors: their adapter weights' names differ")
    n = len(members)
    weights = {}
    for key, first in states[0].items():
        tensors = [s[key] for s in states]
        if "lora_A" in key:       # [r, in] each: stacked to [n r, in]
            weights[key] = torch.cat(tensors, 0)
        elif "lora_B" in key:     # [out, r] each: stacked to [out, n r], each divided by n
            weights[key] = torch.cat([t.float() / n for t in tensors], 1).to(first.dtype)
        else:
            weights[key] = _mean(tensors, key)

    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    config["r"] = n * r           # the same scaling at the wider rank, so B A * scaling is the mean delta
    config["lora_alpha"] = scaling * (math.sqrt(n * r) if config.get("use_rslora") else n * r)

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in members[0].iterdir():   # tokenizer, chat template, card: the members share them
        if path.is_file() and path.name not in NOT_CARRIED | {WEIGHTS, CONFIG, MAPPER_FILE}:
            shutil.copy2(path, out / path.name)
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    if (members[0] / MAPPER_FILE).is_file():
        _average_mappers([m / MAPPER_FILE for m in members], out / MAPPER_FILE)
    log.info("soup of %d adapters -> %s (rank %d)", n, out, config["r"])


def _average_mappers(files: list[Path], out: Path) -> None:
    saved = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    def layout(mapper: dict) -> dict:   # everything but the weights: sizes, levels, the models the head reads
        return {k: v for k, v in mapper.items() if k != "state"}
    for other, f in zip(saved[1:], files[1:]):
        if layout(other) != layout(saved[0]) or other["state"].keys() != saved[0]["state"].keys():
            raise ValueError(f"soup members' collaborative mappers differ in layout: {files[0]} and {f}")
    state = {k: _mean([s["state"][k] for s in saved], k) for k in saved[0]["state"]}
    torch.save({**layout(saved[0]), "state": state}, out)


def _mean(tensors: list[torch.Tensor], key: str) -> torch.Tensor:
    first = tensors[0]
    if not first.is_floating_point():   # token ids and counts are the members' shared layout, not weights
        if any(not torch.equal(t, first) for t in tensors[1:]):
            raise ValueError(f"soup members differ in {key}, which is not a weight")
        return first
    return (sum(t.float() for t in tensors) / len(tensors)).to(first.dtype)
