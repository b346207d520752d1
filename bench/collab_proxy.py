"""Proxy run for issue 12's lever "CoLLM's idea inside LC-Rec": collaborative tokens in LC-Rec's dense prompt.

Both arms continue the run's tuned adapter on the same dense next-item windows (each window of up to
max_history + 1 items supervises every item's code) for the same wall-clock budget, with the same learning-rate
schedule (cosine over the budget's time), then are evaluated on valid NDCG@10 over every user by trie-constrained
beam search (20 beams, the user's whole past excluded: metrics.stage_inputs):

* ``plain``:  "<code 1>, <code 2>, ..."                      (the shipped dense form)
* ``collab``: "<code 1>, [c1]<code 2>, [c2]..."  where [ci] is SASRec's state after item i (the vector it
  scores the next item with), mapped into the token-embedding space by CollabMapper and trained with the LoRA.

Run the arms side by side on one core each so they share one machine's conditions:

    OMP_NUM_THREADS=1 python bench/collab_proxy.py --arm plain  --minutes 40 --out /path/outside/tree &
    OMP_NUM_THREADS=1 python bench/collab_proxy.py --arm collab --minutes 40 --out /path/outside/tree &

A stopped arm resumes from its checkpoint (elapsed time included); a finished one goes straight to evaluation.
Writes <out>/<arm>/result_<stage>.json, adds it to bench/results/collab_proxy.json and prints one table row.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat import backbone, run_folder  # noqa: E402
from lcrec_chat.collab_prompt import CollabDensePrompts  # noqa: E402
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.decoding import SharedPrefix, generate_items  # noqa: E402
from lcrec_chat.hardware import machine_record  # noqa: E402
from lcrec_chat.methods.collab_tokens import CollabMapper, SASRecSource, token_embedding_norm  # noqa: E402
from lcrec_chat.metrics import list_metrics, rank_metrics, stage_inputs  # noqa: E402
from lcrec_chat.train import IGNORE  # noqa: E402
from lcrec_chat.trie import CodeTrie  # noqa: E402

log = logging.getLogger("collab_proxy")
RESULTS = Path(__file__).resolve().parent / "results" / "collab_proxy.json"


def dense_windows(sequences, max_history: int, seed: int) -> list[list[int]]:
    """Windows of up to max_history + 1 items ending every max_history/2 items (tasks.TaskBuilder.build's rule),
    shuffled: each training position is a target about twice."""
    stride = max(1, max_history // 2)
    windows = [list(seq[max(0, t - max_history):t + 1]) for seq in sequences for t in range(len(seq) - 1, 0, -stride)]
    random.Random(seed).shuffle(windows)
    return windows


def batch_tensors(encoded, pad_id: int):
    width = -(-max(len(ids) for ids, _, _ in encoded) // 16) * 16
    ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), IGNORE)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (i, lab, _) in enumerate(encoded):
        ids[row, :len(i)], labels[row, :len(i)], mask[row, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, mask


def loss_of(model, prompts: CollabDensePrompts, windows, pad_id: int) -> torch.Tensor:
    encoded = [(*prompts.training_ids(w), None) for w in windows]
    ids, labels, mask = batch_tensors(encoded, pad_id)
    causal_lm = model.get_base_model()
    histories = [w[:-1] for w in windows]   # the items whose states fill the placeholders
    states = prompts.states(histories) if prompts.mapper is not None else []
    embeds = prompts.embed(causal_lm, ids, states)
    hidden = causal_lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def train_arm(args, cfg, out: Path, prompts: CollabDensePrompts, model, tokenizer, windows) -> dict:
    state_path = out / "state.pt"
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and "token" not in n], "lr": args.lr},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and "token" in n],
               "lr": args.embedding_lr}]
    if prompts.mapper is not None:
        groups.append({"params": list(prompts.mapper.parameters()), "lr": args.mapper_lr})
        params += list(prompts.mapper.parameters())
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in optimizer.param_groups]
    step, elapsed, losses = 0, 0.0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        if prompts.mapper is not None:
            prompts.mapper.load_state_dict(state["mapper"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        log.info("resumed at step %d, %.1f min", step, elapsed / 60)

    def save():
        tmp = out / "state.pt.tmp"
        torch.save({"trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                    "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed, "losses": losses,
                    "mapper": prompts.mapper.state_dict() if prompts.mapper is not None else None}, tmp)
        tmp.replace(state_path)

    budget = args.minutes * 60
    model.train()
    last_save, started = time.time(), time.time() - elapsed
    bar = tqdm(desc=f"train {args.arm}", total=round(budget), initial=round(elapsed), unit="s")
    while elapsed < budget:
        start = step * args.batch_size % len(windows)
        batch = windows[start:start + args.batch_size]
        progress = elapsed / budget
        scale = min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * scale
        loss = loss_of(model, prompts, batch, tokenizer.pad_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(round(loss.item(), 4))
        now = time.time()
        bar.update(round(now - started - elapsed))
        elapsed = now - started
        bar.set_postfix(step=step, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if now - last_save > 300:
            save()
            last_save = now
    bar.close()
    save()
    return {"steps": step, "minutes": round(elapsed / 60, 1), "windows_seen": step * args.batch_size,
            "loss_first20": round(sum(losses[:20]) / max(1, len(losses[:20])), 4),
            "loss_last20": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4)}


@torch.no_grad()
def evaluate_arm(args, cfg, run: Path, out: Path, prompts: CollabDensePrompts, codes, split) -> dict:
    model, tokenizer = backbone.load_finetuned(cfg.model, out / "adapter", merge=True)
    trie = CodeTrie.from_tokenizer(codes, tokenizer)
    histories, exclude, targets = stage_inputs(split, args.stage, args.users)
    allowed = []
    for e in exclude:
        mask = torch.ones(len(codes), dtype=torch.bool)
        mask[e] = False
        allowed.append(mask)
    texts = [prompts.inference_text(h) for h in histories]
    collab = prompts.inference_vectors(histories) if prompts.mapper is not None else None
    started = time.time()
    ranked = generate_items(model, tokenizer, trie, texts, num_beams=20, k=10, allowed=allowed, batch_size=8,
                            shared_prefix=SharedPrefix(), collab=collab)
    items = [[i for i, _ in r] for r in ranked]
    return {**rank_metrics(items, targets), **list_metrics(items, split, len(codes)),
            "eval_seconds": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=["plain", "collab"], required=True)
    parser.add_argument("--config", default="configs/ml-100k.yaml")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/ml-100k"), help="run with adapter and sasrec.pt")
    parser.add_argument("--out", type=Path, required=True, help="where checkpoints and results go")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--embedding-lr", type=float, default=5e-4)
    parser.add_argument("--mapper-lr", type=float, default=1e-3)
    parser.add_argument("--stage", default="valid")
    parser.add_argument("--users", type=int, default=0, help="0 = every user")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(args.seed)

    cfg = load_config(args.config, [f"run_dir={args.run_dir}", "model.dtype=fp32"])
    run, out = args.run_dir, args.out / args.arm
    out.mkdir(parents=True, exist_ok=True)
    split = run_folder.load_split(run)
    builder, codes = run_folder.task_builder(run, cfg, split)
    source = SASRecSource.load(run / "sasrec.pt")

    if not (out / "adapter" / "adapter_config.json").exists() or (out / "state.pt").exists() and \
            not (out / "trained.json").exists():
        model, tokenizer = backbone.load_finetuned(cfg.model, run / "adapter", for_training=True)
        mapper = CollabMapper(source.dim, model.get_input_embeddings().weight.shape[1],
                              token_embedding_norm(model)) if args.arm == "collab" else None
        prompts = CollabDensePrompts(tokenizer, builder, source, mapper)
        windows = dense_windows(split.train_sequences(), cfg.data.max_history, args.seed)
        trained = train_arm(args, cfg, out, prompts, model, tokenizer, windows)
        backbone.save_adapter(model, tokenizer, out / "adapter")
        if mapper is not None:
            torch.save(mapper.state_dict(), out / "mapper.pt")
        (out / "trained.json").write_text(json.dumps(trained, indent=1))
        del model
    trained = json.loads((out / "trained.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(out / "adapter"))
    mapper = None
    if args.arm == "collab":
        state = torch.load(out / "mapper.pt")
        mapper = CollabMapper(source.dim, state["net.3.weight"].shape[0], float(state["token_norm"]))
        mapper.load_state_dict(state)
    prompts = CollabDensePrompts(tokenizer, builder, source, mapper)
    metrics = evaluate_arm(args, cfg, run, out, prompts, codes, split)
    result = {"arm": args.arm, **trained, "stage": args.stage, **metrics, "machine": machine_record()}
    (out / f"result_{args.stage}.json").write_text(json.dumps(result, indent=1))
    table = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    table[f"{args.arm} {args.stage}"] = result
    RESULTS.write_text(json.dumps(table, indent=1))
    print(f"| {args.arm} | {trained['minutes']} min, {trained['steps']} steps | {metrics['ndcg@10']:.4f} | "
          f"{metrics['hr@10']:.4f} | {metrics['coverage@10']:.3f} |")


if __name__ == "__main__":
    main()
