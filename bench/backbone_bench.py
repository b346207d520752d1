"""Backbone figures: GGUF -> HF conversion time, load time and weight bytes per dtype, greedy generation speed.

    python bench/backbone_bench.py [--base smollm2-135m] [--new-tokens 128] [--skip-convert] [--threads N]

Prints a table and writes bench/results/backbone.json. The conversion is timed into a throw-away cache folder
(the real cache is left alone); load and generation use the real cache (converting into it if needed).
"""
from __future__ import annotations

import argparse
import json
import sys
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.backbone import SMOLLM2, describe, load_model, load_tokenizer, resolve_model_path
from lcrec_chat.config import ModelConfig
from lcrec_chat.hardware import machine_record  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "backbone.json"
PROMPT = [{"role": "user", "content": "Recommend three classic science-fiction films and say why."}]


def time_conversion(base: str) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="lcrec-convert-"))
    try:
        start = time.perf_counter()
        resolve_model_path(base, str(tmp))
        return time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generation_speed(model, tokenizer, new_tokens: int) -> float:
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # warm-up
        start = time.perf_counter()
        out = model.generate(**ids, **kwargs)
    return (out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=SMOLLM2)
    parser.add_argument("--cache-dir", default=".cache/models")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-convert", action="store_true", help="do not time a fresh conversion")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch's default); 1 is far faster on a machine shared with other jobs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    result: dict = {"base": args.base, "machine": machine_record(),
                    "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
                    "load_average_at_start": os.getloadavg()[0], "runs": []}
    if not args.skip_convert and args.base == SMOLLM2:
        result["convert_seconds"] = round(time_conversion(args.base), 1)
    resolve_model_path(args.base, args.cache_dir)  # make sure the real cache has it before timing loads

    tokenizer = load_tokenizer(ModelConfig(base=args.base, cache_dir=args.cache_dir, device="cpu"))
    variants = [("fp32", True), ("bf16", True), ("nf4", True), ("nf4", False)]
    for dtype, guarded in variants:
        cfg = ModelConfig(base=args.base, dtype=dtype, cache_dir=args.cache_dir, device="auto")
        start = time.perf_counter()
        model = load_model(cfg)
        load_s = time.perf_counter() - start
        if dtype == "nf4" and not guarded:  # the fast, gradient-losing path, for comparison only
            for module in model.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = True
        info = describe(model)
        run = {"dtype": dtype, "guarded": guarded if dtype == "nf4" else None, "load_seconds": round(load_s, 2),
               "weight_mb": round(info["weight_bytes"] / 2**20, 1), "params": info["params"],
               "device": info["device"], "generate_tok_s": round(generation_speed(model, tokenizer,
                                                                                  args.new_tokens), 1)}
        result["runs"].append(run)
        del model

    result["load_average_at_end"] = os.getloadavg()[0]  # other processes on the machine skew every timing
    print(f"\nbase {args.base}; conversion {result.get('convert_seconds', '-')} s; "
          f"greedy generation of {args.new_tokens} tokens, {result['torch_threads']} threads; "
          f"load average {result['load_average_at_start']:.1f} -> {result['load_average_at_end']:.1f}")
    print(f"{'dtype':6} {'guard':6} {'load s':>7} {'weights MB':>11} {'gen tok/s':>10}")
    for run in result["runs"]:
        guard = "-" if run["guarded"] is None else ("yes" if run["guarded"] else "no")
        print(f"{run['dtype']:6} {guard:6} {run['load_seconds']:7.2f} {run['weight_mb']:11.1f} "
              f"{run['generate_tok_s']:10.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
