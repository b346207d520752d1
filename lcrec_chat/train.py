"""LoRA / QLoRA alignment tuning: a plain training loop, readable in one sitting.

Why not `transformers.Trainer`: we compute the LM head only at supervised positions (the head is a fifth of
SmolLM2's FLOPs and most prompt positions carry no label), batch samples of similar length together so
little compute goes to padding, and checkpoint/resume the adapter + optimizer ourselves.

Multi-GPU (or multi-process CPU): `torchrun --nproc_per_node N -m lcrec_chat train --config ...`; each rank
takes every N-th batch and DistributedDataParallel averages the gradients (NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .backbone import save_adapter
from .collab_prompt import CollabDensePrompts
from .config import Config
from .cpu_training import speed_up_cpu_training
from .distill import CodeTeacher, SequentialTeacher, point_tensors, teacher_paths
from .hardware import describe, native_bf16
from .locks import write_atomic
from .tasks import Sample, render

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class Encoded:
    task: str
    input_ids: list[int]
    labels: list[int]
    vector_items: tuple[int, ...] = ()   # collaborative tokens: the items whose states fill the placeholders
    distill: tuple[tuple[int, int, int, int], ...] = ()   # code tokens a teacher targets (distill.py)


def encode(tokenizer, samples: list[Sample], max_length: int, collab: CollabDensePrompts | None = None
           ) -> list[Encoded]:
    """Token ids with labels only on the response; over-long contexts are cut from the left. With `collab`, dense
    samples carry collaborative tokens (collab_prompt.py); a window too long for max_length loses its oldest
    items (cutting tokens would separate placeholders from their items)."""
    out = []
    for s in samples:
        if collab is not None and s.task == "seqrec_dense" and s.items:
            items = list(s.items)
            target = s.target if s.prefix else -1
            while True:
                ids, labels, vector_items = collab.sample_ids(items, target)
                if len(ids) <= max_length or len(items) <= 2:
                    break
                items = items[1:]
            points = collab.distill_points(ids, items, target) if len(ids) <= max_length else ()
            out.append(Encoded(s.task, ids[-max_length:], labels[-max_length:], vector_items, points))
            continue
        context, answer = render(tokenizer, s)
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        ans = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ans = ans[:max_length // 2]
        ctx = ctx[-(max_length - len(ans)):]
        out.append(Encoded(s.task, ctx + ans, [IGNORE] * len(ctx) + ans))
    return out


def length_grouped_batches(data: list[Encoded], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar length (little padding), in random order."""
    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    # sort within chunks of 50 batches so batches are homogeneous but the epoch stays shuffled
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(data[i].input_ids))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(data: list[Encoded], idxs: list[int], pad_id: int, device, multiple: int = 16) -> dict[str, torch.Tensor]:
    # widths rounded up to a multiple of 16: few distinct shapes keep the CPU allocator from fragmenting
    width = -(-max(len(data[i].input_ids) for i in idxs) // multiple) * multiple
    ids = torch.full((len(idxs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idxs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(idxs), width), dtype=torch.long)
    for row, i in enumerate(idxs):   # right padding: training needs no generation
        n = len(data[i].input_ids)
        ids[row, :n] = torch.tensor(data[i].input_ids)
        labels[row, :n] = torch.tensor(data[i].labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
    if any(data[i].vector_items for i in idxs):
        batch["vector_items"] = [data[i].vector_items for i in idxs]
    if any(data[i].distill for i in idxs):
        batch["distill"] = point_tensors([data[i].distill for i in idxs], [len(data[i].vector_items) for i in idxs])
    return batch


class SupervisedLoss(torch.nn.Module):
    """Causal-LM loss that runs the output head only where a label exists. With `collab`, placeholder positions
    get the mapped collaborative vectors of each row's `vector_items` (the mapper is a submodule: it trains and
    is checkpointed with the LoRA). With `teacher`, training (not validation, whose loss stays comparable across
    runs) adds `distill_weight` x the distillation loss at the code tokens after each state (distill.py)."""

    def __init__(self, model, collab: CollabDensePrompts | None = None,
                 teacher: tuple[SequentialTeacher, CodeTeacher] | None = None, distill_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.collab = collab
        self.mapper = collab.mapper if collab is not None else None
        self.teacher, self.distill_weight = teacher, distill_weight
        self.last_distill: float | None = None   # the last training batch's distillation loss, for the log

    def forward(self, input_ids, attention_mask, labels, vector_items=None, distill=None):
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.last_distill = None
        states = None
        if self.collab is not None and vector_items is not None:
            states = self.collab.states(vector_items)
            inputs = self.collab.head_states(vector_items, states)   # the prompt's and the head's
            embeds = self.collab.embed(causal_lm, input_ids, inputs)
            hidden = causal_lm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        else:
            hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.mapper is not None and self.mapper.logit_levels and distill is not None and states is not None:
            # train.collab_head: the state's vector for each level, on the hidden state that writes that code
            head_in = torch.cat(inputs)[distill["vector"]]
            heads = self.collab.head_vectors(head_in, distill["level"], distill["item"])
            at = (distill["row"].to(hidden.device), distill["position"].to(hidden.device) - 1)
            hidden = hidden.index_put(at, heads.to(hidden.dtype), accumulate=True)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = causal_lm.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
        if self.teacher is not None and self.training and distill is not None and states is not None:
            sequential, codes = self.teacher
            # the prompt's states are the teacher's SASRec's (both the run's sasrec.pt): not computed twice
            probs = torch.cat(sequential.probabilities(vector_items, {"sasrec": states}))[distill["vector"]]
            # the logits that predict the token at `position` come from the position before it
            rows, positions = distill["row"].to(hidden.device), distill["position"].to(hidden.device)
            distill_loss = codes.loss(causal_lm.lm_head(hidden[rows, positions - 1]), probs, distill["level"],
                                      distill["item"])
            self.last_distill = float(distill_loss.detach())
            loss = loss + self.distill_weight * distill_loss
        return loss, int(keep.sum())


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def validation_loss(loss_model, data: dict[str, list[Encoded]], pad_id: int, device, batch_size: int) -> dict:
    loss_model.eval()
    result = {}
    for task, items in data.items():
        total, count = 0.0, 0
        for start in range(0, len(items), batch_size):
            idxs = list(range(start, min(start + batch_size, len(items))))
            loss, n = loss_model(**collate(items, idxs, pad_id, device))
            total, count = total + float(loss) * n, count + n
        result[task] = total / max(1, count)
    loss_model.train()
    return result


def use_autocast(setting: str, device: str) -> bool:
    """train.autocast -> whether to run bf16 autocast: "auto" only where bf16 is native (hardware.py)."""
    if setting not in ("auto", "bf16", "off"):
        raise ValueError(f"train.autocast must be auto, bf16 or off, not {setting!r}")
    on = setting == "bf16" or (setting == "auto" and native_bf16(device))
    log.info("bf16 autocast %s (train.autocast=%s; %s)", "on" if on else "off", setting, describe(device))
    return on


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def trim_history(path: Path, step: int) -> None:
    """Keep the training log's entries up to `step` (the checkpoint resumed from; 0: none, a fresh start), so steps
    run again after a stop are not logged twice; a line cut off by a kill mid-write is dropped, not left to break
    later readers."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if step > 0 and isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        log.info("training log: %d entries past step %d or unreadable dropped", dropped, step)
        write_atomic(path, "".join(line + "\n" for line in kept))


def train(cfg: Config, train_samples: list[Sample], valid_samples: list[Sample], tokenizer, model,
          out_dir: Path, collab: CollabDensePrompts | None = None) -> dict:
    """Tune `model` (already PEFT-wrapped) on the samples; writes checkpoints, adapter and curves into out_dir.
    With `collab` the dense samples carry collaborative tokens and its mapper trains too (saved beside the
    adapter as collab_mapper.pt)."""
    tc = cfg.train
    rank, world = _distributed()
    device = next(model.parameters()).device
    torch.manual_seed(tc.seed + rank)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    teacher = None
    if tc.distill_weight > 0:
        if collab is None:
            raise ValueError("train.distill_weight > 0 needs train.collab_tokens: sasrec (the teacher's states sit "
                             "in the prompt, and the teacher is that SASRec)")
        teacher = (SequentialTeacher.from_run(out_dir, tc.distill_teachers, loaded={"sasrec": collab.source},
                                              own_prefix=tc.teacher_prefix_states),
                   CodeTeacher.from_prompts(collab, collab.source.num_items))
    replaced = 0
    if tc.teacher_paths:
        if teacher is None:
            raise ValueError("train.teacher_paths needs train.distill_weight > 0: the draws come from the "
                             "distillation teacher (train.distill_teachers)")
        train_samples, replaced = teacher_paths(train_samples, teacher[0], tc.teacher_paths, tc.seed, collab.builder)
    data = encode(tokenizer, train_samples, tc.max_length, collab)
    valid: dict[str, list[Encoded]] = {}
    for e in encode(tokenizer, valid_samples, tc.max_length, collab):
        valid.setdefault(e.task, []).append(e)
    batches = length_grouped_batches(data, tc.batch_size, tc.seed)
    steps_per_epoch = max(1, len(batches) // (tc.grad_accum * world))
    total = tc.max_steps or max(1, int(steps_per_epoch * tc.epochs))
    warmup = int(total * tc.warmup_ratio)

    autocast = use_autocast(tc.autocast, device.type)
    # on a CPU, NumPy's dropout masks and matmul attention: ~1.4x faster a step (cpu_training.py)
    masks = speed_up_cpu_training(model, tc.seed + rank) if device.type == "cpu" else None
    if tc.collab_on_codes and collab is None:
        raise ValueError("train.collab_on_codes needs train.collab_tokens: sasrec (it adds the prompt's states to "
                         "the code tokens after them)")
    if tc.collab_head_width and not tc.collab_head:
        raise ValueError("train.collab_head_width is the width of the collaborative head's prefix MLP: it needs "
                         "train.collab_head: true")
    if tc.collab_head and collab is None:
        raise ValueError("train.collab_head needs train.collab_tokens: sasrec (it maps the prompt's states onto the "
                         "code logits after them)")
    core = SupervisedLoss(model, collab, teacher, tc.distill_weight)
    if core.mapper is not None:
        core.mapper.to(device)   # trains beside the LoRA; its inputs (the sequential models' states) follow it
    mapper_params = list(core.mapper.parameters()) if core.mapper is not None else []
    loss_model = torch.nn.parallel.DistributedDataParallel(core) if world > 1 else core
    embed_params = [p for n, p in model.named_parameters() if p.requires_grad and "token" in n]
    other_params = [p for n, p in model.named_parameters() if p.requires_grad and "token" not in n]
    named = list(core.mapper.named_parameters()) if core.mapper is not None else []
    on_codes = [p for n, p in named if n.startswith("on_codes_")]
    on_logits = [p for n, p in named if n.startswith("on_logits_")]
    mapper_own = [p for n, p in named if not n.startswith(("on_codes_", "on_logits_"))]
    optimizer = torch.optim.AdamW([{"params": other_params, "lr": tc.lr},
                                   {"params": embed_params, "lr": tc.embedding_lr}]
                                  + ([{"params": mapper_own, "lr": tc.mapper_lr}] if mapper_own else [])
                                  + ([{"params": on_codes, "lr": tc.on_codes_lr}] if on_codes else [])
                                  + ([{"params": on_logits, "lr": tc.collab_head_lr}] if on_logits else []),
                                  weight_decay=tc.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    ckpt = out_dir / "checkpoint"
    history_path = out_dir / "train_log.jsonl"
    step = 0
    if (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        if mapper_params:
            core.mapper.load_state_dict(state["mapper"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        if masks is not None and world == 1:   # rank 0's state alone is saved: other ranks start their own afresh
            if state.get("dropout_masks") is not None:
                masks.set_state(state["dropout_masks"])
            else:
                log.info("the checkpoint predates NumPy's dropout masks: they start afresh from the seed")
        if state.get("cuda_rng") is not None and torch.cuda.is_available():   # LoRA dropout draws on the GPU
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log.info("resumed from step %d", step)
    if rank == 0:   # what was logged past the checkpoint (or by a start that never reached one) is run again
        trim_history(history_path, step)

    def save_checkpoint():
        if rank != 0:
            return
        ckpt.mkdir(parents=True, exist_ok=True)
        tmp = ckpt / "state.pt.tmp"
        torch.save({"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                    "mapper": core.mapper.state_dict() if mapper_params else None,
                    "step": step, "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                    "dropout_masks": masks.state() if masks is not None else None,
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp)
        tmp.replace(ckpt / "state.pt")

    def record(entry: dict):
        if rank == 0:
            with history_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    loss_model.train()
    started = time.time()
    tokens_seen = supervised_seen = 0
    bar = tqdm(total=total, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    while step < total:
        distilled = []
        for accum in range(tc.grad_accum):
            b = batches[(step * tc.grad_accum * world + accum * world + rank) % len(batches)]
            batch = collate(data, b, pad_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, n_sup = loss_model(**batch)
            (loss / tc.grad_accum).backward()
            tokens_seen += int(batch["attention_mask"].sum())
            if core.last_distill is not None:
                distilled.append(core.last_distill)
            supervised_seen += n_sup
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad] + mapper_params, 1.0)
        scale = cosine_lr(step, total, warmup)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * scale
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.time() - started
        bar.update(1)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
        entry = {"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                 "tokens_per_s": tokens_seen / elapsed, "supervised_per_s": supervised_seen / elapsed}
        if distilled:
            entry["distill"] = sum(distilled) / len(distilled)   # the step's batches that had distillation points
        if step % tc.eval_every == 0 or step == total:
            entry["valid"] = validation_loss(loss_model, valid, pad_id, device, tc.batch_size)
            log.info("step %d valid loss %s", step, {k: round(v, 3) for k, v in entry["valid"].items()})
        record(entry)
        if step % tc.save_every == 0:
            save_checkpoint()
        if tc.max_minutes and elapsed > tc.max_minutes * 60:
            log.info("stopping at step %d: max_minutes=%s reached", step, tc.max_minutes)
            if "valid" not in entry:
                entry["valid"] = validation_loss(loss_model, valid, pad_id, device, tc.batch_size)
                record({"step": step, "valid": entry["valid"]})
            break
    bar.close()
    save_checkpoint()
    if rank == 0:
        save_adapter(model, tokenizer, out_dir / "adapter")
        if mapper_params:
            collab.save_mapper(out_dir / "adapter")
    summary = {"steps": step, "total_steps": total, "complete": step >= total, "train_samples": len(data), "world_size": world,
               "tokens_per_s": tokens_seen / max(1e-9, time.time() - started),
               "supervised_tokens_per_s": supervised_seen / max(1e-9, time.time() - started)}
    if tc.teacher_paths:
        summary["teacher_path_items"] = replaced   # written items the teacher's draws replaced (distill.teacher_paths)
    if world > 1:
        dist.barrier()
    return summary
