"""Speed of trie-constrained decoding on SmolLM2-135M (CPU).

Measures, on 1,682 random distinct 4-level codes over 64-code levels (added as 256 index tokens; the model is
untrained, which does not change the speed):
  1. masking: TrieLogitsProcessor vs the naive dict trie behind ``prefix_allowed_tokens_fn``, per call, on the
     beams of a real search (20 rows = 1 request, 160 rows = 8 requests);
  2. masking overhead: generate() with the trie vs the same beam search unconstrained, the processor's own
     share of generate(), and the trie's share of our own beam loop;
  3. latency of one recommendation (history of 20 items, ~150 prompt tokens, 20 beams, top 10), p50/p95, for
     our loop and for generate(), fp32 and bf16;
  4. throughput at batch 8 (requests/s).
Prints a table and writes bench/results/decoding.json.

    .venv/bin/python bench/decoding_bench.py [--reps 20] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from math import nan
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lcrec_chat import decoding  # noqa: E402
from lcrec_chat.backbone import add_index_tokens, load_model, load_tokenizer  # noqa: E402
from lcrec_chat.config import ModelConfig  # noqa: E402
from lcrec_chat.decoding import (CodeTrie, TrieLogitsProcessor, generate_items,  # noqa: E402
                                 python_trie_prefix_fn)
from lcrec_chat.trie import index_token  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402

NUM_ITEMS, LEVELS, CODEBOOK = 1682, 4, 64
BEAMS, TOP_K, HISTORY = 20, 10, 20
RESULTS = Path(__file__).resolve().parent / "results" / "decoding.json"
SECTIONS = ("masking", "breakdown", "latency", "throughput", "overhead")


def random_codes(seed: int = 0) -> list[list[int]]:
    rng, seen = random.Random(seed), set()
    while len(seen) < NUM_ITEMS:
        seen.add(tuple(rng.randrange(CODEBOOK) for _ in range(LEVELS)))
    codes = [list(c) for c in seen]
    rng.shuffle(codes)
    return codes


def item_text(code: list[int]) -> str:
    return "".join(index_token(level, c) for level, c in enumerate(code))


def history_prompt(tokenizer, codes: list[list[int]], seed: int) -> str:
    history = random.Random(seed).sample(range(NUM_ITEMS), HISTORY)
    text = ("Here are the movies I watched, oldest first: " + ", ".join(item_text(codes[i]) for i in history)
            + ". Which movie should I watch next?")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@contextmanager
def timing_calls(obj, name: str, bucket: list[float]):
    """Temporarily wrap ``obj.name`` so every call's wall time lands in ``bucket``."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        bucket.append(time.perf_counter() - start)
        return result

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, original)


def beam_states(tokenizer, trie, prompts: list[str], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, scores) as a logits processor sees them at each of the L steps: every beam holds a prefix of
    a real item (random items, random log-probs; masking cost does not depend on the values)."""
    prompt_ids, _ = decoding._left_pad(tokenizer, prompts, torch.device("cpu"))
    rows = len(prompts) * BEAMS
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(0, trie.num_items, (rows,), generator=generator)
    code_tokens = torch.stack([trie.token_ids[level][trie.codes[items, level]] for level in range(LEVELS)], dim=1)
    vocab = len(tokenizer)
    states = []
    for step in range(LEVELS):
        ids = torch.cat([prompt_ids.repeat_interleave(BEAMS, dim=0), code_tokens[:, :step]], dim=1)
        scores = torch.randn(rows, vocab, generator=generator).log_softmax(-1)
        states.append((ids, scores))
    return states


def bench_masking(tokenizer, trie, prompts_of, reps: int) -> dict:
    """Per-step cost of masking 20 / 160 beams: TrieLogitsProcessor (new tensor, and in place) vs the dict trie
    behind transformers' PrefixConstrainedLogitsProcessor."""
    out = {}
    for batch in (1, 8):
        states = beam_states(tokenizer, trie, prompts_of(batch))
        width = states[0][0].shape[1]
        ours = TrieLogitsProcessor(trie, width, BEAMS, tokenizer.eos_token_id, batch_size=batch)
        ours_inplace = TrieLogitsProcessor(trie, width, BEAMS, tokenizer.eos_token_id, batch_size=batch,
                                           inplace=True)
        naive = PrefixConstrainedLogitsProcessor(python_trie_prefix_fn(trie, width, tokenizer.eos_token_id), BEAMS)
        for (ids, scores) in states:  # the two must agree on what they allow
            assert torch.equal(ours(ids, scores).isfinite(), naive(ids, scores).isfinite())
        # our beam loop never masks the vocabulary: it carries each row's trie node and gathers the logits of
        # the allowed children only (trie.candidates + gather), which is its whole masking work per step
        counts = ours.counts
        request = torch.arange(batch * BEAMS) // BEAMS
        loop_inputs = [(trie.walk(trie.codes_of_tokens(ids[:, width:])), step, s)
                       for step, (ids, s) in enumerate(states)]

        def loop_masking():
            for nodes, step, s in loop_inputs:
                tokens, _, valid = trie.candidates(nodes, step, counts[step + 1], request)
                s.gather(1, tokens).masked_fill_(~valid, float("-inf"))

        timings = {"beam_loop_candidates": timed(loop_masking, reps, warmup=2),
                   "tensor_trie": timed(lambda: [ours(ids, s) for ids, s in states], reps, warmup=2),
                   "python_trie": timed(lambda: [naive(ids, s) for ids, s in states], reps, warmup=2),
                   "tensor_trie_inplace": timed(lambda: [ours_inplace(ids, s) for ids, s in states], reps,
                                                warmup=2)}
        entry: dict = {"rows": batch * BEAMS}
        for stat, f in (("median", statistics.median), ("min", min)):  # min: robust to other jobs on the cores
            ms = {name: f(t) / LEVELS * 1e3 for name, t in timings.items()}
            entry[stat] = {f"ms_per_step_{name}": v for name, v in ms.items()}
            entry[stat]["speedup"] = ms["python_trie"] / ms["tensor_trie"]
            entry[stat]["speedup_inplace"] = ms["python_trie"] / ms["tensor_trie_inplace"]
            entry[stat]["speedup_beam_loop"] = ms["python_trie"] / ms["beam_loop_candidates"]
        out[f"batch{batch}"] = entry
    return out


def bench_overhead(model, tokenizer, trie, prompt: str, reps: int) -> dict:
    """Same beam search with and without the trie; and where the trie's time goes inside each loop."""
    input_ids, attention = decoding._left_pad(tokenizer, [prompt], torch.device("cpu"))
    width = input_ids.shape[1]
    kwargs = dict(input_ids=input_ids, attention_mask=attention, num_beams=BEAMS, num_return_sequences=BEAMS,
                  do_sample=False, max_new_tokens=LEVELS, length_penalty=0.0,
                  pad_token_id=tokenizer.pad_token_id)
    processor = TrieLogitsProcessor(trie, width, BEAMS, tokenizer.eos_token_id, batch_size=1, inplace=True)
    naive_fn = python_trie_prefix_fn(trie, width, tokenizer.eos_token_id)
    calls: list[float] = []
    naive_calls: list[float] = []
    with torch.inference_mode():
        t_free = timed(lambda: model.generate(**kwargs), reps)
        with timing_calls(TrieLogitsProcessor, "__call__", calls):
            t_trie = timed(lambda: model.generate(**kwargs, logits_processor=LogitsProcessorList([processor])),
                           reps)
        with timing_calls(PrefixConstrainedLogitsProcessor, "__call__", naive_calls):
            t_naive = timed(lambda: model.generate(**kwargs, prefix_allowed_tokens_fn=naive_fn), reps)
    g_free, g_trie, g_naive = statistics.median(t_free), statistics.median(t_trie), statistics.median(t_naive)
    processor_s = statistics.median(calls) * LEVELS
    naive_s = statistics.median(naive_calls) * LEVELS

    trie_calls: list[float] = []
    loop_total: list[float] = []
    with timing_calls(CodeTrie, "candidates", trie_calls), timing_calls(CodeTrie, "alive", trie_calls):
        for _ in range(reps):
            start = time.perf_counter()
            generate_items(model, tokenizer, trie, [prompt], num_beams=BEAMS, k=TOP_K)
            loop_total.append(time.perf_counter() - start)
    loop_trie_s = sum(trie_calls) / reps  # every trie call of a search: alive() twice, candidates() L times
    return {"generate_unconstrained_s": g_free, "generate_constrained_s": g_trie,
            "generate_overhead_pct": 100 * (g_trie - g_free) / g_free,
            "processor_s_per_search": processor_s, "processor_share_pct": 100 * processor_s / g_trie,
            "generate_python_trie_s": g_naive, "python_trie_s_per_search": naive_s,
            "python_trie_share_pct": 100 * naive_s / g_naive,
            "loop_s": statistics.median(loop_total), "loop_trie_s_per_search": loop_trie_s,
            "loop_trie_share_pct": 100 * loop_trie_s / statistics.median(loop_total)}


def bench_breakdown(model, tokenizer, prompt: str, reps: int) -> dict:
    """Where one request's time goes in our loop: the prompt's prefill and one decode step of 20 beam rows."""
    input_ids, attention = decoding._left_pad(tokenizer, [prompt], torch.device("cpu"))
    beams_attention = torch.cat([attention.expand(BEAMS, -1), torch.ones(BEAMS, 1, dtype=attention.dtype)], 1)
    position = torch.full((BEAMS, 1), input_ids.shape[1])
    token = torch.full((BEAMS, 1), tokenizer.eos_token_id)

    def prefill():
        return model(input_ids=input_ids, attention_mask=attention, use_cache=True, logits_to_keep=1)

    def step():
        cache = prefill().past_key_values
        cache.reorder_cache(torch.zeros(BEAMS, dtype=torch.long))
        start = time.perf_counter()
        model(input_ids=token, attention_mask=beams_attention, position_ids=position, past_key_values=cache,
              use_cache=True)
        return time.perf_counter() - start

    with torch.inference_mode():
        t_prefill = statistics.median(timed(prefill, reps))
        step()
        t_step = statistics.median([step() for _ in range(reps)])
    return {"prefill_s": t_prefill, "decode_step_20_rows_s": t_step}


def bench_latency(model, tokenizer, trie, prompts: list[str], methods) -> dict:
    out = {}
    for method, method_reps in methods:
        times = []
        generate_items(model, tokenizer, trie, prompts[:1], num_beams=BEAMS, k=TOP_K, method=method)  # warm-up
        for r in range(method_reps):
            prompt = prompts[r % len(prompts)]
            start = time.perf_counter()
            generate_items(model, tokenizer, trie, [prompt], num_beams=BEAMS, k=TOP_K, method=method)
            times.append(time.perf_counter() - start)
        out[method] = {"p50_s": statistics.median(times), "p95_s": percentile(times, 0.95), "min_s": min(times),
                       "reps": method_reps}
    return out


def bench_throughput(model, tokenizer, trie, prompts: list[str], methods) -> dict:
    out = {}
    batch = prompts[:8]
    for method, method_reps in methods:
        times = timed(lambda: generate_items(model, tokenizer, trie, batch, num_beams=BEAMS, k=TOP_K,
                                             batch_size=8, method=method), method_reps, warmup=0)
        out[method] = {"requests_per_s": len(batch) / statistics.median(times),
                       "requests_per_s_best": len(batch) / min(times), "batch_s": statistics.median(times),
                       "reps": method_reps}
    return out


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="repetitions of the fast measurements")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated model dtypes to measure")
    parser.add_argument("--quick", action="store_true", help="few repetitions, fp32 only (smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (e.g. latency only when the "
                             "machine is quiet for a short while)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else args.reps
    slow_reps = 2 if args.quick else max(3, reps // 5)   # generate() is many times slower
    dtypes = ["fp32"] if args.quick else args.dtypes.split(",")
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    report_sections = sorted(sections)
    load_before = os.getloadavg()

    codes = random_codes()
    report: dict = {"setup": {"items": NUM_ITEMS, "levels": LEVELS, "codebook": CODEBOOK, "beams": BEAMS,
                              "top_k": TOP_K, "history_items": HISTORY, "torch_threads": torch.get_num_threads(),
                              "cpu_count": os.cpu_count(), "machine": machine_record(),
                              "load_avg_before": load_before, "sections": report_sections}}
    rows = []
    for dtype in dtypes:
        progress(f"loading SmolLM2-135M ({dtype})")
        cfg = ModelConfig(dtype=dtype, device="cpu")
        tokenizer, model = load_tokenizer(cfg), load_model(cfg)
        add_index_tokens(model, tokenizer, [index_token(level, c) for level in range(LEVELS)
                                            for c in range(CODEBOOK)], init="random")
        trie = CodeTrie.from_tokenizer(codes, tokenizer)
        prompts = [history_prompt(tokenizer, codes, seed) for seed in range(16)]
        prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        report["setup"]["prompt_tokens_mean"] = statistics.mean(prompt_tokens)
        result: dict = {}
        if dtype == dtypes[0] and "masking" in sections:
            progress("masking: tensor trie vs python dict trie")
            result["masking"] = bench_masking(tokenizer, trie, lambda b: prompts[:b], reps)
        if "breakdown" in sections:
            progress("prefill / decode-step breakdown")
            result["breakdown"] = bench_breakdown(model, tokenizer, prompts[0], max(3, reps // 4))
        if "latency" in sections:
            progress("latency of one recommendation")
            result["latency"] = bench_latency(model, tokenizer, trie, prompts,
                                              [("loop", reps), ("generate", slow_reps)])
        if "throughput" in sections:
            progress("throughput at batch 8")
            result["throughput_batch8"] = bench_throughput(model, tokenizer, trie, prompts,
                                                           [("loop", max(2, reps // 5)), ("generate", 1)])
        if dtype == dtypes[0] and "overhead" in sections:
            progress("constrained vs unconstrained")
            result["overhead"] = bench_overhead(model, tokenizer, trie, prompts[0], slow_reps)
        report[dtype] = result
        for method in ("loop", "generate"):
            lat = result.get("latency", {}).get(method, {})
            thr = result.get("throughput_batch8", {}).get(method, {})
            rows.append((dtype, method, lat.get("p50_s", nan), lat.get("p95_s", nan), lat.get("min_s", nan),
                         thr.get("requests_per_s", nan)))
        del model
    report["setup"]["load_avg_after"] = os.getloadavg()
    print_table(report, rows, dtypes[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


def print_table(report: dict, rows: list[tuple], first: str) -> None:
    setup = report["setup"]
    print(f"\nSmolLM2-135M, {NUM_ITEMS} items x {LEVELS} levels x {CODEBOOK} codes, {BEAMS} beams, top {TOP_K}, "
          f"prompt ~{setup['prompt_tokens_mean']:.0f} tokens, {setup['torch_threads']} threads, "
          f"load avg {setup['load_avg_before'][0]:.1f} -> {setup['load_avg_after'][0]:.1f}")
    print(f"{'dtype':6} {'method':9} {'p50 s':>7} {'p95 s':>7} {'min s':>7} {'req/s @8':>9}")
    for dtype, method, p50, p95, best, rps in rows:
        print(f"{dtype:6} {method:9} {p50:7.3f} {p95:7.3f} {best:7.3f} {rps:9.2f}")
    for dtype in [d for d in ("fp32", "bf16") if "breakdown" in report.get(d, {})]:
        b = report[dtype]["breakdown"]
        print(f"{dtype}: prefill of one prompt {b['prefill_s']:.3f} s, one decode step of {BEAMS} beams "
              f"{b['decode_step_20_rows_s']:.3f} s")
    if "masking" in report[first]:
        print_masking(report[first]["masking"])
    if "overhead" in report[first]:
        print_overhead(report[first]["overhead"])


def print_masking(masking: dict) -> None:
    print("\nmasking per beam-search step, ms (median | min over repetitions)")
    names = ("beam_loop_candidates", "tensor_trie", "tensor_trie_inplace", "python_trie")
    print(f"{'rows':>6} {'beam loop (gather)':>19} {'processor':>17} {'processor, in place':>19} "
          f"{'python dict trie':>17}   speedup vs dict trie: loop / processor / in place")
    for entry in masking.values():
        med, low = entry["median"], entry["min"]
        cells = [f"{med[f'ms_per_step_{n}']:7.3f} | {low[f'ms_per_step_{n}']:7.3f}" if f"ms_per_step_{n}" in med
                 else "-" for n in names]
        print(f"{entry['rows']:6d} {cells[0]:>19} {cells[1]:>17} {cells[2]:>19} {cells[3]:>17}   "
              f"{med.get('speedup_beam_loop', float('nan')):5.1f}x / {med['speedup']:5.1f}x / "
              f"{med['speedup_inplace']:5.1f}x")


def print_overhead(ov: dict) -> None:
    print(f"\ngenerate(): unconstrained {ov['generate_unconstrained_s']:.3f} s, constrained "
          f"{ov['generate_constrained_s']:.3f} s ({ov['generate_overhead_pct']:+.1f}%), processor itself "
          f"{ov['processor_s_per_search'] * 1e3:.2f} ms = {ov['processor_share_pct']:.2f}%; with the python trie "
          f"{ov['generate_python_trie_s']:.3f} s, its masking {ov['python_trie_s_per_search'] * 1e3:.2f} ms = "
          f"{ov['python_trie_share_pct']:.2f}%")
    print(f"own loop: {ov['loop_s']:.3f} s per request, trie work {ov['loop_trie_s_per_search'] * 1e3:.2f} ms = "
          f"{ov['loop_trie_share_pct']:.2f}%")


if __name__ == "__main__":
    main()
