"""Seconds per training step of the shipped model on this CPU, with and without the speed-ups of cpu_training.py.

Each option loads the shipped adapter afresh (SmolLM2-135M + LoRA rank 32, trainable), seeds torch alike and runs
the same length-grouped batches of real dense windows forward and backward with an AdamW step, under bf16 autocast
where the processor has native bf16 (as `train.autocast: auto` does) and in fp32 elsewhere. The first steps warm
up and are not timed. Losses are printed: each option computes the same function (other dropout draws, other
rounding), so they stay close.

    python bench/train_step_speed.py [--run-dir models/ml-100k] [--steps 8] [--warmup 2]

Prints a table with each option's mean step time and its ratio to the first; writes
bench/results/train_step_speed.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat import backbone, run_folder  # noqa: E402
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.cpu_training import fast_lora_dropout  # noqa: E402
from lcrec_chat.hardware import machine_record, native_bf16  # noqa: E402
from lcrec_chat.train import SupervisedLoss, collate, encode, length_grouped_batches  # noqa: E402

OPTIONS = {   # name: (NumPy dropout masks, attention implementation)
    "torch masks, SDPA attention": (False, "sdpa"),
    "NumPy dropout masks": (True, "sdpa"),
    "eager attention": (False, "eager"),
    "both (what train uses on a CPU)": (True, "eager"),
}


def run_option(run: Path, cfg, data, batches, pad_id: int, autocast: bool, option: tuple, steps: int,
               warmup: int) -> dict:
    numpy_masks, attention = option
    model, _ = backbone.load_finetuned(cfg.model, run / "adapter", for_training=True)
    model.set_attn_implementation(attention)
    torch.manual_seed(0)
    if numpy_masks:
        fast_lora_dropout(model, 0)
    loss_model = SupervisedLoss(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times, losses, tokens = [], [], 0
    for i, b in enumerate(batches[:warmup + steps]):
        start = time.perf_counter()
        batch = collate(data, b, pad_id, torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = loss_model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens += int(batch["attention_mask"].sum())
    return {"seconds_per_step": sum(times) / len(times), "tokens_per_s": tokens / sum(times), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="models/ml-100k")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml")
    split = run_folder.load_split(run)
    builder, _ = run_folder.task_builder(run, cfg, split)
    samples = builder.build(split.train_sequences(), {"seqrec_dense": 8 * (args.steps + args.warmup)}, 0)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")   # saved with the adapter: the index tokens too
    data = encode(tokenizer, samples, cfg.train.max_length)
    batches = length_grouped_batches(data, 8, 0)
    autocast = native_bf16("cpu")
    rows = []
    for name, option in OPTIONS.items():
        result = run_option(run, cfg, data, batches, tokenizer.pad_token_id, autocast, option, args.steps,
                            args.warmup)
        rows.append({"option": name, **result})
        print(f"{name}: {result['seconds_per_step']:.2f} s a step, losses {result['losses']}", flush=True)
    first = rows[0]["seconds_per_step"]
    print(f"\n{'option':34s} {'s/step':>7s} {'tok/s':>7s} {'vs first':>9s}")
    for r in rows:
        r["ratio_to_first"] = r["seconds_per_step"] / first
        print(f"{r['option']:34s} {r['seconds_per_step']:7.2f} {r['tokens_per_s']:7.0f} {r['ratio_to_first']:9.2f}")
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step_speed.json").write_text(json.dumps(
        {"machine": machine_record(), "autocast_bf16": autocast, "threads": torch.get_num_threads(),
         "steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
