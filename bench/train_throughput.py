"""Training throughput of the tuning loop on this machine, one row per option.

Measures, in the same run: the fp32 matmul peak (2048x2048), then for each option a few LoRA training steps
of SmolLM2-135M on real ML-100K samples: tokens/s, supervised (target) tokens/s, and achieved GFLOP/s as a
share of the peak (LoRA fwd+bwd ~ 4 x params FLOPs per token, the head counted only where it runs).

    python bench/train_throughput.py [--steps 6] [--run-dir runs/ml-100k]

Needs a run folder that went through `prepare` and `index`. Prints a table, writes bench/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat import backbone, run_folder  # noqa: E402
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.indexing import index_token_strings  # noqa: E402
from lcrec_chat.train import IGNORE, SupervisedLoss, collate, encode, length_grouped_batches  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402


def matmul_peak(dtype=torch.float32, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


class FullHeadLoss(torch.nn.Module):
    """The usual causal-LM loss: logits at every position (what transformers' model(labels=...) does)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return out.loss, int((labels[:, 1:] != IGNORE).sum())


def measure(model, data, batches, loss_cls, steps: int, autocast: bool) -> dict:
    loss_model = loss_cls(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens = supervised = 0
    head_tokens = 0
    start = None
    for i, b in enumerate(batches[:steps + 1]):
        if i == 1:           # the first step warms up allocators and kernels
            start, tokens, supervised, head_tokens = time.perf_counter(), 0, 0, 0
        batch = collate(data, b, 0, torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, n = loss_model(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["input_ids"].numel())
        supervised += n
        head_tokens += n if loss_cls is SupervisedLoss else int(batch["input_ids"].numel())
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "supervised": supervised, "head_tokens": head_tokens, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default="runs/ml-100k")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config("configs/ml-100k.yaml", [f"run_dir={args.run_dir}"])
    run = Path(args.run_dir)
    split = run_folder.load_split(run)
    builder, codes = run_folder.task_builder(run, cfg, split)
    budget = {t: 24 for t in cfg.train.task_budget}
    samples = builder.build(split.train_sequences(), budget, 0)
    dense = builder.build(split.train_sequences(), {"seqrec_dense": 64}, 0)
    instr = builder.build(split.train_sequences(), {"seqrec": 64}, 0)

    tokenizer = backbone.load_tokenizer(cfg.model)
    model = backbone.load_model(cfg.model, for_training=True)
    tokens = index_token_strings(codes)
    ids = backbone.add_index_tokens(model, tokenizer, tokens)
    from peft import get_peft_model
    model = get_peft_model(model, backbone.lora_config(cfg.train, ids, model))
    n_params = sum(p.numel() for p in model.parameters())
    head_params = model.get_output_embeddings().weight.numel() if model.get_output_embeddings() is not None else 0
    body_params = n_params - head_params   # tied SmolLM2: the embedding matrix is the head; lookups cost nothing

    peak = matmul_peak()
    options = [
        ("mixed tasks, full LM head, random batches", samples, FullHeadLoss, False, False),
        ("mixed tasks, full LM head, length-grouped", samples, FullHeadLoss, False, True),
        ("mixed tasks, head on labels only, length-grouped", samples, SupervisedLoss, False, True),
        ("mixed tasks, head on labels only, bf16 autocast", samples, SupervisedLoss, True, True),
        ("seqrec instruction form, head on labels", instr, SupervisedLoss, False, True),
        ("seqrec dense form, head on labels", dense, SupervisedLoss, False, True),
    ]
    rows = []
    for name, sample_set, loss_cls, autocast, grouped in options:
        data = encode(tokenizer, sample_set, cfg.train.max_length)
        if grouped:
            batches = length_grouped_batches(data, args.batch_size, 0)
        else:
            order = list(range(len(data)))
            random.Random(0).shuffle(order)
            batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        m = measure(model, data, batches, loss_cls, args.steps, autocast)
        # fwd+bwd ~ 3 x 2 FLOPs per parameter per token for the body (activations' grads + LoRA's),
        # the environment notes' "~4 x params" rule of thumb; the head only where it runs
        flops = 4 * body_params * m["tokens"] + 4 * head_params * m["head_tokens"]
        gflops = flops / m["seconds"] / 1e9
        rows.append({"option": name, "tokens_per_s": m["tokens"] / m["seconds"],
                     "supervised_per_s": m["supervised"] / m["seconds"], "gflops": gflops,
                     "share_of_peak": gflops / peak})
    print(f"matmul peak (fp32, 2048^2, this run): {peak:.1f} GFLOP/s; model params {n_params / 1e6:.1f}M")
    print(f"{'option':52s} {'tok/s':>8s} {'target tok/s':>13s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for r in rows:
        print(f"{r['option']:52s} {r['tokens_per_s']:8.1f} {r['supervised_per_s']:13.1f} {r['gflops']:8.1f} "
              f"{r['share_of_peak']:8.0%}")
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(
        {"machine": machine_record(), "matmul_peak_gflops": peak, "params": n_params, "batch_size": args.batch_size, "steps": args.steps,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
