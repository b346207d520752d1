"""The pipeline stages: each reads the artifacts of the stage before it from the run folder and writes its own.

prepare  -> config.yaml, split.json, stats.json, catalog.sqlite
index    -> item_emb.npy, rqvae.pt, codes.json, index_report.json, code_usage.png (+ codes in the catalogue)
train    -> adapter/, checkpoint/, train_log.jsonl, train_summary.json, loss_curves.png
baselines -> baselines.json, sasrec.pt, gru4rec.pt
methods  -> methods.json, cllm4rec/, collm/ (the LLM methods beside LC-Rec)
evaluate -> metrics.json, report.md

A stage whose inputs and config section did not change is skipped (recorded in stages.json); --force reruns it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .catalog import Catalog
from .config import Config, TrainConfig, train_phases
from .data import load_dataset
from .data.split import Split, leave_one_out
from .locks import process_alive, write_atomic
from .run_folder import load_items, load_prior, load_split, read_json, require, task_builder

log = logging.getLogger(__name__)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_stamp(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""


class StageRecord:
    """stages.json: the fingerprint each stage ran with, so unchanged stages can be skipped."""

    def __init__(self, run: Path):
        self.path = run / "stages.json"
        self.data = read_json(self.path) if self.path.exists() else {}

    def fresh(self, stage: str, fingerprint: str) -> bool:
        return self.data.get(stage) == fingerprint

    def done(self, stage: str, fingerprint: str) -> None:
        self.data[stage] = fingerprint
        # in one step: a run stopped while writing (the session's clock, a kill) must not lose every stage's record
        write_atomic(self.path, json.dumps(self.data, indent=1))


def prepare(cfg: Config, force: bool = False) -> dict:
    run = cfg.run_path
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run / "config.yaml")
    record = StageRecord(run)
    # data.drop_last is out of DataConfig's repr and enters only when set: earlier runs keep their print
    fp = _fingerprint(cfg.data, *([{"drop_last": cfg.data.drop_last}] if cfg.data.drop_last else []))
    if not force and record.fresh("prepare", fp) and (run / "catalog.sqlite").exists():
        log.info("prepare: up to date (use --force to rerun)")
        return read_json(run / "stats.json")
    started = time.time()
    dataset = load_dataset(cfg.data)
    split = leave_one_out(dataset, cfg.data.max_history, cfg.data.drop_last)
    split.save(run / "split.json")
    Catalog.build(run / "catalog.sqlite", dataset, split.item_popularity(len(dataset.items)))
    stats = {**dataset.stats(), **split.stats(), "seconds": round(time.time() - started, 1)}
    write_atomic(run / "stats.json", json.dumps(stats, indent=1))
    # codes and everything downstream depend on the catalogue: force them to rerun
    for later in ("index", "train", "evaluate"):
        record.data.pop(later, None)
    record.done("prepare", fp)
    return stats


def index(cfg: Config, force: bool = False) -> dict:
    from .indexing import run_index
    run = cfg.run_path
    cfg.save(run / "config.yaml")
    items = load_items(run)
    record = StageRecord(run)
    from_sasrec = cfg.index.collab_weight > 0 and cfg.index.collab_source == "sasrec"
    if from_sasrec:
        # SASRec's item embeddings join the indexed vectors. The baselines stage trains it and its text-kNN row
        # reads the text vectors, so those are embedded (and cached) first.
        from .embed import embed_items
        embed_items(items, cfg.index, cache_dir=run)
        baselines(cfg)
    fp = _fingerprint(cfg.index, _file_stamp(run / "split.json"),
                      _file_stamp(run / "sasrec.pt") if from_sasrec else "")
    if not force and record.fresh("index", fp) and (run / "codes.json").exists():
        log.info("index: up to date (use --force to rerun)")
        return read_json(run / "index_report.json")
    train_sequences = load_split(run).train_sequences() if cfg.index.collab_weight > 0 else None
    collab_vectors = None
    if from_sasrec:
        from .indexing.collab import sequential_item_vectors
        collab_vectors = sequential_item_vectors(run / "sasrec.pt", train_sequences, len(items))
    report = run_index(cfg, items, force=force, train_sequences=train_sequences, collab_vectors=collab_vectors)
    codes = read_json(run / "codes.json")["codes"]
    Catalog(run / "catalog.sqlite").set_codes(codes)
    record.done("index", fp)
    return report


def validation_samples(builder, split: Split, cfg: Config) -> list:
    """`eval_samples` held-out samples per task, answers drawn from the valid targets only."""
    import random
    rng = random.Random(cfg.train.seed)
    users = [u for u in split.users if u.valid >= 0]
    users = rng.sample(users, min(cfg.train.eval_samples, len(users)))
    histories = [split.history(u, "valid") for u in users]
    targets = [split.target(u, "valid") for u in users]
    samples = []
    for task, budget in cfg.train.task_budget.items():
        if budget > 0:
            samples += builder.heldout(histories, targets, task, cfg.train.seed)
    return samples


def train(cfg: Config, force: bool = False) -> dict:
    """adapter/ (+ collab_mapper.pt), train_log.jsonl, train_summary.json: the LoRA tuning on the alignment tasks.

    With `train.phases`, phase i (i < last) ends as adapter.phase{i}/ (its log and summary inside) and phase i+1
    starts from it; the last phase writes adapter/. Each phase is its own stage record, so a stopped run resumes
    in the phase it stopped in, and a changed phase reruns from there on (the next one's start changed with it).
    A phase with `head_refit_after` has its head refitted (adapter.phase{i}/head_refit.json) before the next starts."""
    run = cfg.run_path
    phases = train_phases(cfg)
    for i, phase in enumerate(phases):
        if phase.head_refit_after and (i == len(phases) - 1 or not phase.head_refit_epochs):
            raise ValueError(f"train: phase {i + 1} of {len(phases)} sets head_refit_after, which needs "
                             "head_refit_epochs > 0 and a later phase in train.phases (the last phase's head is "
                             "refitted by head_refit_epochs alone)")
        if phase.soup_seeds and (len(phase.soup_seeds) < 2 or len(set(phase.soup_seeds)) < len(phase.soup_seeds)):
            raise ValueError(f"train: phase {i + 1} of {len(phases)} has soup_seeds {phase.soup_seeds}: a soup needs "
                             "two or more different seeds (empty = one run with train.seed)")
    if os.environ.get("RANK", "0") == "0":
        cfg.save(run / "config.yaml")
    if len(phases) == 1:
        summary = _train_phase_or_soup(cfg, "train", force)
    else:
        summary = _train_phases(cfg, phases, force)
    if summary["complete"] and phases[-1].head_refit_epochs and os.environ.get("RANK", "0") == "0":
        summary["head_refit"] = head_refit(cfg, phases[-1], force)
    return summary


# the head refit runs after the phases on their adapter: its settings are its own stage's, not the phases'
REFIT_KEYS = ("head_refit_epochs", "head_refit_lr", "head_refit_seeds", "head_refit_sources", "head_refit_teachers",
              "head_refit_after", "head_refit_distill_weight")
# settings added later enter a fingerprint only when set, so stages recorded before they existed stay up to date
ADDED_REFIT_KEYS = ("head_refit_sources", "head_refit_teachers", "head_refit_after", "head_refit_distill_weight")
ADDED_TRAIN_KEYS = ("prompt_reads_head_sources", "hold_out_last", "window_dropout", "teacher_prefix_states")
REFIT_START = "collab_mapper.phases.pt"   # the head the phases trained, which every refit starts from


def head_refit(cfg: Config, tc: TrainConfig, force: bool = False, phase: int | None = None) -> dict:
    """adapter/collab_mapper.pt refitted (head_refit.py), the phases' own kept beside it; head_refit.json. With
    `phase` i (train.head_refit_after), the adapter kept as adapter.phase{i}, its report inside it."""
    import shutil

    from .collab_prompt import MAPPER_FILE, CollabDensePrompts
    from .distill import SequentialTeacher
    from .backbone import resolve_device
    from .hardware import resolve_dtype
    from .head_refit import HeadRefit, training_windows
    from .recommender import Recommender
    from .train import encode
    run = cfg.run_path
    suffix = "" if phase is None else f".phase{phase}"
    record, adapter, stage = StageRecord(run), run / f"adapter{suffix}", f"head_refit{suffix}"
    out = (run if phase is None else adapter) / "head_refit.json"
    keys = {k: getattr(tc, k) for k in REFIT_KEYS if k not in ADDED_REFIT_KEYS or getattr(tc, k)}
    fp = _fingerprint(record.data.get(f"train{suffix}", ""), keys, tc.distill_weight, tc.distill_teachers)
    if not force and record.fresh(stage, fp) and out.exists():
        log.info("%s: up to date (use --force to rerun)", stage)
        return read_json(out)
    if not tc.collab_head:
        raise ValueError("train.head_refit_epochs refits the collaborative head: it needs train.collab_head: true")
    if (adapter / REFIT_START).exists():
        shutil.copy(adapter / REFIT_START, adapter / MAPPER_FILE)
    else:
        shutil.copy(adapter / MAPPER_FILE, adapter / REFIT_START)
    record.data.pop(stage, None)
    started = time.time()
    # the features in the precision decoding runs in, so the head fits what it will be added to
    dtype = resolve_dtype(cfg.eval.dtype or cfg.model.dtype, resolve_device(cfg.model.device))
    rec = Recommender.from_run(cfg, run, dtype=dtype, adapter_dir=adapter)
    if tc.head_refit_sources:   # the phases' head with the extra states' weights added (zero at the start)
        rec.collab = CollabDensePrompts.for_run(rec.tokenizer, rec.builder, run, adapter,
                                                head_sources=tc.head_refit_sources)
    teacher = SequentialTeacher.from_run(run, tc.head_refit_teachers or tc.distill_teachers,
                                         loaded={"sasrec": rec.collab.source, **rec.collab.head_sources},
                                         own_prefix=tc.teacher_prefix_states)
    refit = HeadRefit(rec.model, rec.collab, teacher, tc.head_refit_distill_weight or tc.distill_weight)
    split = load_split(run)
    builder = rec.builder
    # the windows the LLM was tuned on, each training position once
    windows = training_windows(split.held_back(tc.hold_out_last).train_sequences(), cfg.data.max_history + 1)

    def held_out(stage: str):
        users = [u for u in split.users if u.valid >= 0 and (stage != "select" or len(u.train) >= 2)]
        samples = builder.heldout([split.history(u, stage) for u in users], [split.target(u, stage) for u in users],
                                  "seqrec_dense", tc.seed)
        return refit.features(encode(rec.tokenizer, samples, tc.max_length, rec.collab), cfg.eval.batch_size,
                              f"head refit: {stage} users")

    # encoded as training encodes them (train.encode), so the head sees the prompts it was trained on
    train_f = refit.features(encode(rec.tokenizer, [builder.seqrec_dense(w[:-1], w[-1], None) for w in windows],
                                    tc.max_length, rec.collab), cfg.eval.batch_size, "head refit: training windows")
    valid_f = held_out("valid")
    # with the last two training items held out of the LLM's windows, the select stage is the test-like held-out set
    select_f = held_out("select") if tc.hold_out_last >= 2 else None
    before = refit.held_out(valid_f)
    select_before = refit.held_out(select_f) if select_f is not None else None
    fits = refit.fit_averaged(train_f, valid_f, tc.head_refit_epochs, tc.head_refit_lr, tc.head_refit_seeds,
                              first_seed=tc.seed)
    rec.collab.save_mapper(adapter)
    report = {"windows": len(windows), "train_points": len(train_f), "valid_points": len(valid_f), "dtype": dtype,
              "valid_before": before, "valid_after": refit.held_out(valid_f),
              "valid_teacher_nll_per_item": refit.teacher_nll(valid_f)["nll_per_item"],
              # the same on the training windows the model was tuned on: a student far below its teacher there and
              # not on valid has learnt the windows rather than the teacher
              "train_after": refit.held_out(train_f),
              "train_teacher_nll_per_item": refit.teacher_nll(train_f)["nll_per_item"],
              **({"select_before": select_before, "select_after": refit.held_out(select_f),
                  "select_teacher_nll_per_item": refit.teacher_nll(select_f)["nll_per_item"]}
                 if select_f is not None else {}),
              "distill_weight": refit.distill_weight,
              "teacher": teacher.weights,
              "head_sources": list(rec.collab.head_sources), "fits": fits,
              "seconds": round(time.time() - started, 1)}
    write_atomic(out, json.dumps(report, indent=1))
    record.done(stage, fp)
    return report


def _train_phases(cfg: Config, phases: list[TrainConfig], force: bool) -> dict:
    run = cfg.run_path
    summary: dict = {}
    for i, phase in enumerate(phases):
        last = i == len(phases) - 1
        if i:
            phase.init_adapter = str(run / f"adapter.phase{i - 1}")
        log.info("train: phase %d of %d", i + 1, len(phases))
        # the phase before's fingerprint (and its refit's) is part of this one's: a changed earlier phase retrains
        # the later ones
        done = StageRecord(run).data
        after = done.get(f"train.phase{i - 1}", "") + done.get(f"head_refit.phase{i - 1}", "") if i else None
        summary = _train_phase_or_soup(dataclasses.replace(cfg, train=phase), "train" if last else f"train.phase{i}",
                                       force, keep_as=None if last else run / f"adapter.phase{i}", after=after)
        if not summary["complete"]:
            break
        if phase.head_refit_after and os.environ.get("RANK", "0") == "0":
            summary["head_refit"] = head_refit(cfg, phase, force, phase=i)
        if not last:
            _barrier()           # torchrun: the other ranks start the next phase once rank 0 has kept this one
    return summary


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _train_phase_or_soup(cfg: Config, stage: str, force: bool, keep_as: Path | None = None,
                         after: str | None = None) -> dict:
    """One phase (_train_phase), or with train.soup_seeds one member per seed, each its own stage record and kept as
    adapter.<stage>.seed<s>/ (a stopped soup resumes in the member it stopped in), averaged into the phase's adapter
    (soup.py). The soup's fingerprint is its members', so later phases and the refit follow a changed member."""
    if not cfg.train.soup_seeds:
        return _train_phase(cfg, stage, force, keep_as, after)
    import shutil

    from .soup import average_adapters
    run, seeds = cfg.run_path, cfg.train.soup_seeds
    members: dict[int, dict] = {}
    for seed in seeds:
        log.info("%s: soup member with seed %d (%d of %d)", stage, seed, len(members) + 1, len(seeds))
        member_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, soup_seeds=[]))
        summary = _train_phase(member_cfg, f"{stage}.seed{seed}", force, keep_as=run / f"adapter.{stage}.seed{seed}",
                               after=after)
        if not summary["complete"]:
            return summary
        members[seed] = summary
        _barrier()     # torchrun: rank 0 has kept this member before any rank trains the next
    if os.environ.get("RANK", "0") != "0":   # rank 0 makes the soup; the others wait for it
        _barrier()
        return summary
    record = StageRecord(run)
    fp = _fingerprint(*(record.data[f"{stage}.seed{seed}"] for seed in seeds))
    target, record_dir = keep_as or run / "adapter", keep_as or run
    if not force and record.fresh(stage, fp) and target.exists():
        log.info("%s: soup up to date (use --force to rerun)", stage)
        _barrier()
        return read_json(record_dir / "train_summary.json")
    record.data.pop(stage, None)
    average_adapters([run / f"adapter.{stage}.seed{seed}" for seed in seeds], target)
    first = run / f"adapter.{stage}.seed{seeds[0]}"
    for name in ("train_log.jsonl", "loss_curves.png"):   # the curves shown are the first member's
        if (first / name).exists():
            shutil.copy2(first / name, record_dir / name)
    summary = {"complete": True, "soup_seeds": seeds, "curves_of_seed": seeds[0],
               "steps": sum(m["steps"] for m in members.values()), "members": members}
    write_atomic(record_dir / "train_summary.json", json.dumps(summary, indent=1))
    record.done(stage, fp)
    _barrier()
    return summary


def phase_fingerprint(cfg: Config, after: str | None = None) -> str:
    """What one training run (or phase) depends on: the model, its train settings, the codes and SASRec it reads and,
    for a later phase, `after`, the fingerprints of the phase before and its refit.

    Left out: max_minutes (a run stopped by the clock resumes when started again with more time), the phases list
    (always empty here: train() runs them one by one, so runs from before phases keep their prints), a soup's seeds
    (each member is trained with its own seed and none) and the refit's keys (their own stage). A later phase's
    init_adapter is left out too: it is the phase before's folder, which `after` already stands for, and its path
    would make a run copied elsewhere (an arm branched from another run's phases) retrain every later phase."""
    run = cfg.run_path
    skipped = ("max_minutes", "phases", "soup_seeds") + REFIT_KEYS + (("init_adapter",) if after is not None else ())
    train_cfg = {k: v for k, v in cfg.train.__dict__.items() if k not in skipped and (k not in ADDED_TRAIN_KEYS or v)}
    collab_on = cfg.train.collab_tokens != "none"
    return _fingerprint(cfg.model, train_cfg, _file_stamp(run / "codes.json"),
                        _file_stamp(run / "sasrec.pt") if collab_on else "", *([after] if after is not None else []))


def _train_phase(cfg: Config, stage: str, force: bool, keep_as: Path | None = None,
                 after: str | None = None) -> dict:
    """One training run from cfg.train into the run's adapter/; with keep_as, the finished adapter is moved there
    with its log and summary (an earlier phase of a phased run)."""
    import torch

    from . import backbone
    from .indexing import index_token_strings
    from .indexing.tokens import index_token
    from .plots import plot_training
    from .train import train as run_training
    run = cfg.run_path
    record = StageRecord(run)
    collab_on = cfg.train.collab_tokens != "none"
    if collab_on:   # SASRec's states enter the prompt: the baselines stage (which trains it) comes first
        baselines(cfg)
    fp = phase_fingerprint(cfg, after)
    if not force and record.fresh(stage, fp) and (keep_as or run / "adapter").exists():
        log.info("%s: up to date (use --force to rerun)", stage)
        return read_json((keep_as or run) / "train_summary.json")
    if force or record.data.get(f"{stage}_started") != fp:   # a changed config must not resume an old checkpoint
        for stale in ("checkpoint/state.pt", "train_log.jsonl"):
            (run / stale).unlink(missing_ok=True)
    record.data.pop(stage, None)          # until this run completes, the stage is not done
    record.done(f"{stage}_started", fp)
    split = load_split(run)
    learnt = split.held_back(cfg.train.hold_out_last)   # what the LLM is tuned on
    builder, codes = task_builder(run, cfg, learnt)
    samples = builder.build(learnt.train_sequences(), cfg.train.task_budget, cfg.train.seed)
    samples, dropped = builder.drop_window_items(samples, cfg.train.window_dropout, cfg.train.seed)
    if dropped:
        log.info("train: window dropout took %d items out of the dense windows", dropped)
    valid = validation_samples(builder, split, cfg)
    log.info("train: %d samples, %d validation samples", len(samples), len(valid))

    init = _initial_adapter(run, Path(cfg.train.init_adapter)) if cfg.train.init_adapter else None
    if init is not None:
        model, tokenizer = backbone.load_finetuned(cfg.model, init, for_training=True)
        torch.manual_seed(cfg.train.seed)    # the added ranks' init, when train.lora_r widens the adapter
        model = backbone.widen_lora(model, cfg.train)
        missing = [t for t in index_token_strings(codes) if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"train.init_adapter {cfg.train.init_adapter} lacks index tokens of this run's codes "
                             f"({missing[:3]}...): it was trained on other codes")
    else:
        tokenizer = backbone.load_tokenizer(cfg.model)
        model = backbone.load_model(cfg.model, for_training=True)
        init_texts: dict[str, list[str]] = {}
        for idx, code in enumerate(codes):
            for level, c in enumerate(code):
                init_texts.setdefault(index_token(level, c), []).append(builder.describer.display(idx))
        new_ids = backbone.add_index_tokens(model, tokenizer, index_token_strings(codes),
                                            init=cfg.train.new_token_init, init_texts=init_texts)
        from peft import get_peft_model
        torch.manual_seed(cfg.train.seed)    # LoRA's random init: the same config gives the same run
        model = get_peft_model(model, backbone.lora_config(cfg.train, new_ids, model))
    collab = None
    if collab_on:
        from .collab_prompt import MAPPER_FILE, CollabDensePrompts, code_token_ids
        from .methods.collab_tokens import CollabMapper, SASRecSource, token_embedding_norm
        code_levels = len(codes[0]) if cfg.train.collab_on_codes else 0
        logit_levels = len(codes[0]) if cfg.train.collab_head else 0
        prefix_width = cfg.train.collab_head_width if cfg.train.collab_head else 0
        if init is not None and (init / MAPPER_FILE).is_file():   # an adapter tuned with the tokens: continue its mapper
            collab = CollabDensePrompts.for_run(tokenizer, builder, run, init, code_levels, logit_levels, prefix_width,
                                                prompt_extra=cfg.train.prompt_reads_head_sources)
            collab.mapper.train()
        elif cfg.train.prompt_reads_head_sources:
            raise ValueError("train.prompt_reads_head_sources continues a mapper whose refitted head reads other "
                             "models' states (train.head_refit_sources): it needs train.init_adapter with one")
        else:
            source = SASRecSource.load(run / "sasrec.pt")
            torch.manual_seed(cfg.train.seed)
            mapper = CollabMapper(source.dim, model.get_input_embeddings().weight.shape[1],
                                  token_embedding_norm(model), code_levels=code_levels, logit_levels=logit_levels,
                                  prefix_tokens=code_token_ids(tokenizer, builder) if prefix_width else (),
                                  prefix_width=prefix_width)
            collab = CollabDensePrompts(tokenizer, builder, source, mapper)
    summary = run_training(cfg, samples, valid, tokenizer, model, run, collab)
    (run / "adapter" / REFIT_START).unlink(missing_ok=True)   # a new head: a refit of the old one is stale
    if os.environ.get("RANK", "0") != "0":   # torchrun: rank 0 writes the run folder
        return summary
    summary["task_samples"] = {t: sum(s.task == t for s in samples) for t in cfg.train.task_budget}
    if cfg.train.window_dropout:
        summary["window_dropped_items"] = dropped   # TaskBuilder.drop_window_items
    write_atomic(run / "train_summary.json", json.dumps(summary, indent=1))
    plot_training(run / "train_log.jsonl", run / "loss_curves.png")
    if summary["complete"]:
        if keep_as is not None:
            import shutil
            shutil.rmtree(keep_as, ignore_errors=True)
            shutil.move(str(run / "adapter"), keep_as)
            for name in ("train_log.jsonl", "train_summary.json", "loss_curves.png"):
                if (run / name).exists():
                    shutil.move(str(run / name), keep_as / name)
        record.done(stage, fp)
    else:
        log.warning("train: stopped at step %d of %d (max_minutes); run it again to resume",
                    summary["steps"], summary["total_steps"])
    return summary


def _initial_adapter(run: Path, init: Path) -> Path:
    """The adapter a second training phase starts from. When that is the run's own adapter/ (which this phase
    overwrites), a copy is kept as adapter.init/ and used from then on, so a rerun starts from the same point."""
    import shutil
    kept = run / "adapter.init"
    own = init.resolve() == (run / "adapter").resolve()
    if own and (kept / "adapter_config.json").is_file():   # also once a soup's first member has moved adapter/ away
        return kept
    if not (init / "adapter_config.json").is_file():
        raise FileNotFoundError(f"train.init_adapter: {init} is not an adapter folder (no adapter_config.json)")
    if not own:
        return init
    shutil.copytree(init, kept)
    for name in ("train_log.jsonl", "train_summary.json"):   # the first phase's record stays beside it
        if (run / name).exists():
            shutil.copy2(run / name, kept / name)
    return kept


PROMPT_NAMES = {"dense": "dense prompt", "chat": "request prompt", "seqrec": "LC-Rec seqrec instruction"}
BASELINE_NAMES = {"pop": "Popularity", "sasrec": "SASRec", "gru4rec": "GRU4Rec", "text_knn": "Text-embedding kNN"}


def baselines(cfg: Config, force: bool = False) -> dict:
    """baselines.json (+ sasrec.pt, gru4rec.pt): the classic methods on the run's split, seeds and all.

    Its own stage so that it can run beside the LLM's evaluation (two processes with one thread each use two
    cores better than one process with two); `evaluate` reuses a fresh result and waits for a running one."""
    import numpy as np

    from .baselines import run_baselines, saved_model_files
    run = cfg.run_path
    split_path = require(run, "split.json", "prepare")
    keys = ("cutoffs", "max_users", "baseline_epochs", "baseline_patience", "baseline_seeds", "baseline_stride")
    fp = _fingerprint({k: getattr(cfg.eval, k) for k in keys}, _file_stamp(split_path),
                      _file_stamp(run / "item_emb.npy"))
    out = run / "baselines.json"
    # every seed's model is kept (the head's extra states and teacher ensembles read them): a run whose stage
    # finished before they were kept fits them again
    missing = [name for name in saved_model_files(cfg.eval.baseline_seeds) if not (run / name).exists()]
    if not force and not missing and out.exists() and read_json(out).get("fingerprint") == fp:
        log.info("baselines: up to date (use --force to rerun)")
        return read_json(out)
    marker = run / "baselines.running"
    marker.write_text(str(os.getpid()))
    try:
        started = time.time()
        item_emb = np.load(run / "item_emb.npy") if (run / "item_emb.npy").exists() else None
        num_items = len(Catalog(require(run, "catalog.sqlite", "prepare")))
        results = run_baselines(load_split(run), num_items, item_emb, cfg.eval, save_dir=run)
        result = {"fingerprint": fp, "methods": results, "seconds": round(time.time() - started, 1)}
        write_atomic(out, json.dumps(result, indent=1))
    finally:
        marker.unlink(missing_ok=True)
    return result


# method settings that only decide what is scored, never what is trained
SCORING_KEYS = ("negatives", "rerank_depth", "valid_users", "test_users", "text_only_users")


def method_fingerprints(cfg: Config, name: str) -> tuple[str, str]:
    """(row, trained model) fingerprints of one LLM method: the row depends on everything; the trained model not
    on the scoring scope (SCORING_KEYS), which can change without retraining (methods/run.py)."""
    run = cfg.run_path
    inputs = [getattr(cfg.methods, name), cfg.model, cfg.eval.cutoffs, cfg.eval.max_users,
              _file_stamp(require(run, "split.json", "prepare"))]
    if name == "collm" and cfg.methods.collm.collab == "sasrec":
        inputs.append(_file_stamp(require(run, "sasrec.pt", "baselines")))
    method_cfg = dataclasses.asdict(getattr(cfg.methods, name))
    train_fp = _fingerprint({k: v for k, v in method_cfg.items() if k not in SCORING_KEYS}, *inputs[1:])
    return _fingerprint(*inputs), train_fp


def methods(cfg: Config, force: bool = False) -> dict:
    """methods.json (+ cllm4rec/, collm/): the LLM methods of ``cfg.methods.run`` trained on the run's split and
    scored on its protocol (methods/run.py). Each method's row is cached under the fingerprint of its inputs,
    so a stopped stage resumes with the next method and an unchanged method is never retrained."""
    from .methods.run import RUNNERS
    run = cfg.run_path
    require(run, "split.json", "prepare")
    out = run / "methods.json"
    cached = read_json(out) if out.exists() and not force else {}
    rows: dict[str, dict] = {}
    for name in cfg.methods.run:
        fp, train_fp = method_fingerprints(cfg, name)
        if cached.get(name, {}).get("fingerprint") == fp:
            log.info("methods: %s up to date (use --force to retrain)", name)
            rows[name] = cached[name]
            continue
        log.info("methods: training and scoring %s", name)
        rows[name] = {**RUNNERS[name](cfg, run, load_split(run), load_items(run), train_fp), "fingerprint": fp}
        # re-read before writing: another process may have finished another method meanwhile
        written = read_json(out) if out.exists() else {}
        write_atomic(out, json.dumps({**written, name: rows[name]}, indent=1))
    return rows


def _wait_for_baselines(run: Path) -> None:
    """If another process is running the baselines stage on this run, wait for it instead of redoing it."""
    marker = run / "baselines.running"
    while marker.exists():
        try:
            if not process_alive(int(marker.read_text())):
                return
        except ValueError:   # a marker being written or half-read
            return
        log.info("evaluate: waiting for the baselines stage running in process %s", marker.read_text())
        time.sleep(30)


class RowCache:
    """eval_rows.json: each evaluated row under the fingerprint of what produced it, so an evaluation stopped
    part-way (a session's clock, a crash) resumes at the first row it had not finished."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        try:
            saved = read_json(path) if path.exists() else {}
        except ValueError as e:   # a cache: set the damaged file aside and compute its rows again
            log.warning("%s; kept as %s.bad, its rows are computed again", e, path.name)
            path.replace(path.with_name(path.name + ".bad"))
            saved = {}
        self.rows = saved.get("rows", {}) if saved.get("fingerprint") == fingerprint else {}

    def get(self, key: str, compute):
        """The row under `key`, computed and saved where it is missing or is a ranked row (it has NDCG) cached
        before rows kept each user's target rank (metrics.ranked_row), which paired readings need."""
        cached = self.rows.get(key)
        if cached is None or ("ndcg@10" in cached and "target_ranks" not in cached):
            self.rows[key] = compute()
            # in one step: an evaluation stopped mid-write must keep every row it had finished
            write_atomic(self.path, json.dumps({"fingerprint": self.fingerprint, "rows": self.rows}, indent=1))
        return self.rows[key]


def lcrec_row_cache(cfg: Config, dtype: str) -> RowCache:
    """The evaluate stage's cache of rows for this run's adapter evaluated in `dtype` under `cfg.eval`: a row that
    bench/lever_rows.py computed under the same protocol is one the stage does not compute again."""
    run = cfg.run_path
    return RowCache(run / "eval_rows.json",
                    _fingerprint(cfg.eval, dtype, _file_stamp(run / "adapter" / "adapter_model.safetensors"),
                                 *_mapper_stamp(run / "adapter")))


def _mapper_stamp(adapter: Path) -> list[str]:
    """The collaborative mapper's stamp where it was changed after the LoRA (a head refit): part of the model, but
    left out otherwise, so rows cached before refits existed stay valid (the mapper trained with the LoRA then)."""
    return [_file_stamp(adapter / "collab_mapper.pt")] if (adapter / REFIT_START).exists() else []


def evaluate(cfg: Config, force: bool = False) -> dict:
    """metrics.json and report.md: every method on valid and test under one protocol (metrics.py); LC-Rec trained
    with train.hold_out_last >= 2 also on the select stage (split.py).

    LC-Rec per prompt style, itemsearch beside its two baselines and the template spread; then the classic
    baselines (the `baselines` stage, reused when fresh); then the hybrid (SASRec's prior), its weight chosen on
    valid. Every finished row is cached (RowCache), so a stopped evaluation resumes."""
    import numpy as np

    from .evaluate import (calibrate_int8_smoothing, choose_prior_weight, evaluate_itemsearch, evaluate_sequential,
                           itemsearch_baselines, template_spread)
    from .backbone import resolve_device
    from .hardware import describe, resolve_dtype
    from .recommender import Recommender
    from .report import write_report
    run = cfg.run_path
    record = StageRecord(run)
    require(run, "adapter", "train")
    dtype = resolve_dtype(cfg.eval.dtype or cfg.model.dtype, resolve_device(cfg.model.device))
    cache = lcrec_row_cache(cfg, dtype)
    fp = cache.fingerprint
    # the stage is stale when any row source changed; LC-Rec's cached rows only when LC-Rec's inputs did
    # the served rows are re-measured when the int8 recipe or the forward that serves it changes
    from .backbone import INT8_RECIPE, SERVED_FORWARD

    def stage_fp() -> str:
        return _fingerprint(fp, *(_file_stamp(run / name) for name in ("baselines.json", "methods.json")
                                  if (run / name).exists()), cfg.methods.run, cfg.chat.prior_weight, INT8_RECIPE,
                          SERVED_FORWARD)
    if not force and record.fresh("evaluate", stage_fp()) and (run / "metrics.json").exists():
        log.info("evaluate: up to date (use --force to rerun)")
        return read_json(run / "metrics.json")
    started = time.time()
    if force:
        cache.rows = {}
    split = load_split(run)
    ks = cfg.eval.cutoffs
    emb_path = run / "item_emb.npy"
    item_emb = np.load(emb_path) if emb_path.exists() else None
    rec = Recommender.from_run(cfg, run, dtype=dtype)
    codes = ("text codes" if cfg.index.collab_weight <= 0 else
             "text+SASRec codes" if cfg.index.collab_source == "sasrec" else "text+collaborative codes")
    if rec.collab is not None:
        codes += ", SASRec tokens"   # one collaborative token after each history item (train.collab_tokens)
    table: dict[str, dict] = {}
    metrics: dict = {"methods": table, "precision": dtype, "machine": describe(), "num_beams": cfg.eval.num_beams}
    # a model trained without each user's last two training items is also scored on the stage arms are chosen on
    llm_stages = ("select", "valid", "test") if cfg.train.hold_out_last >= 2 else ("valid", "test")
    for style in cfg.eval.styles:
        table[f"LC-Rec ({PROMPT_NAMES.get(style, style)}, {codes})"] = {
            stage: cache.get(f"{style} {stage}", lambda: evaluate_sequential(rec, split, stage, style, 0,
                                                                              cfg.eval.max_users, ks))
            for stage in llm_stages}
    if cfg.eval.itemsearch:
        # test only: nothing is chosen on valid for itemsearch, and a pass costs as much as a recommendation pass
        search = {"LC-Rec": {"test": cache.get("itemsearch test", lambda: evaluate_itemsearch(
            rec, split, "test", cfg.eval.max_users, ks=ks))}}
        if item_emb is not None:
            from .embed import load_encoder
            encoder = load_encoder(cfg.index.embed_model)
            for name, result in itemsearch_baselines(split, rec.catalog, encoder, item_emb, "test", cfg.eval.max_users,
                                                     ks=ks, describer=rec.builder.describer).items():
                search[name] = {"test": result}
        metrics["itemsearch"] = search
    if cfg.eval.template_users:
        metrics["template_spread"] = cache.get("templates", lambda: template_spread(rec, split, cfg.eval.template_users))
    _wait_for_baselines(run)
    classic = baselines(cfg, force=False)
    if cfg.eval.hybrid_weights and (run / "sasrec.pt").exists():
        rec.prior_model = load_prior(run)
        style = cfg.eval.styles[0]
        users = cfg.eval.hybrid_users if not cfg.eval.max_users else min(cfg.eval.hybrid_users, cfg.eval.max_users)
        choice = cache.get("hybrid weight", lambda: choose_prior_weight(rec, split, style, cfg.eval.hybrid_weights,
                                                                        users))
        choice["valid_ndcg@10_per_weight"] = {float(w): v for w, v in choice["valid_ndcg@10_per_weight"].items()}
        metrics["hybrid"] = choice
        # valid: the users the weight was chosen on (a full valid pass would only re-measure the choice)
        table[f"Hybrid: LC-Rec ({PROMPT_NAMES.get(style, style)}) + SASRec prior, w={choice['weight']:g}"] = {
            "valid": choice["valid_at_weight"],
            "test": cache.get("hybrid test", lambda: evaluate_sequential(
                rec, split, "test", style, 0, cfg.eval.max_users, ks, choice["weight"]))}
    for key, result in classic["methods"].items():
        table[BASELINE_NAMES.get(key, key)] = result
    _add_llm_methods(cfg, metrics)
    served = _served_dtype()
    if served != dtype:
        # the precision the app serves (hardware.serving_dtype), on test: pure LC-Rec and the app's hybrid weight
        served_recipe = INT8_RECIPE if served == "int8" else served   # a changed recipe is measured again
        forward = f"{SERVED_FORWARD}, batch 1 " if served == "int8" else ""
        @functools.cache
        def served_rec() -> Recommender:   # loaded (and quantised) only when a served row is not cached
            if served == "int8":   # the scales the app applies when it loads this adapter in int8
                calibrate_int8_smoothing(rec, split, run / "adapter")
            loaded = Recommender.from_run(cfg, run, dtype=served)
            loaded.prior_model = rec.prior_model
            # one request per forward pass, as the app decodes: int8 layers scale their input by one maximum per
            # call, so in a batch every prompt's scale depends on the others (and, with transformers' model, on the
            # padding rows: one unpadded prompt's logits moved by up to 12.9 when batched with a padded one)
            loaded.batch_size = 1
            return loaded
        style = cfg.eval.styles[0]
        table[f"LC-Rec ({PROMPT_NAMES.get(style, style)}), served {served_recipe}"] = {"test": cache.get(
            f"served {served_recipe} {forward}{style} test", lambda: evaluate_sequential(served_rec(), split, "test", style, 0,
                                                                         cfg.eval.max_users, ks))}
        if cfg.chat.prior_weight > 0 and rec.prior_model is not None:
            table[f"Hybrid: LC-Rec ({PROMPT_NAMES.get(style, style)}) + SASRec prior, w={cfg.chat.prior_weight:g}, "
                  f"served {served_recipe}"] = {"test": cache.get(
                      f"served {served_recipe} {forward}hybrid {cfg.chat.prior_weight:g} test", lambda: evaluate_sequential(
                          served_rec(), split, "test", style, 0, cfg.eval.max_users, ks, cfg.chat.prior_weight))}
        metrics["served_precision"] = served_recipe
    index_report = run / "index_report.json"
    if index_report.exists():
        metrics["indexing"] = read_json(index_report)
    lcrec_seconds = sum(row.get("seconds", 0) for row in cache.rows.values() if isinstance(row, dict))
    metrics["seconds"] = {"lcrec": round(lcrec_seconds, 1), "baselines": classic["seconds"],
                          "this_call": round(time.time() - started, 1)}
    write_atomic(run / "metrics.json", json.dumps(metrics, indent=1))
    write_report(metrics, run / "report.md", cfg)
    record.done("evaluate", stage_fp())   # after this call's baselines stage may have written baselines.json
    return metrics


METHOD_NAMES = {"cllm4rec": "CLLM4Rec (user/item tokens, item head)",
                "collm": "CoLLM-{collab}: re-ranks SASRec's top {depth}"}


def _add_llm_methods(cfg: Config, metrics: dict) -> None:
    """Rows of the `methods` stage (methods.json), when it ran: CLLM4Rec and CoLLM beside LC-Rec."""
    path = cfg.run_path / "methods.json"
    if not path.exists():
        return
    for name, entry in read_json(path).items():
        if name not in cfg.methods.run:
            continue
        label = METHOD_NAMES[name].format(collab=entry.get("collab", ""), depth=cfg.methods.collm.rerank_depth)
        metrics["methods"][label] = {"valid": entry["valid"], "test": entry["test"]}
        metrics.setdefault("train_seconds", {})[label] = entry["train_seconds"]
        if "auc" in entry:
            metrics["collm_auc"] = entry["auc"]
        if "paper_metrics_test" in entry:
            metrics["cllm4rec_paper_metrics_test"] = entry["paper_metrics_test"]


def _served_dtype() -> str:
    from .hardware import serving_dtype
    return serving_dtype("auto")


# what a run folder needs to be served and inspected; never the checkpoint or the base model
EXPORTED = ("config.yaml", "catalog.sqlite", "split.json", "stats.json", "codes.json", "rqvae.pt", "item_emb.npy",
            "item_emb.json", "index_report.json", "code_usage.png", "train_log.jsonl", "train_summary.json",
            "loss_curves.png", "metrics.json", "report.md", "adapter", "sasrec.pt", "baselines.json", "methods.json",
            "cllm4rec", "collm", "head_refit.json")


def _head_source_files(adapter: Path) -> list[str]:
    """The run's model files whose states the collaborative head reads besides sasrec.pt (train.head_refit_sources)."""
    import torch

    from .collab_prompt import MAPPER_FILE
    path = adapter / MAPPER_FILE
    if not path.is_file():
        return []
    return [f"{name}.pt" for name in torch.load(path, map_location="cpu", weights_only=True).get("head_sources", [])]


def export(cfg: Config, target: str | Path, force: bool = False) -> dict:
    """Copy the small, servable artifacts of ``cfg.run_dir`` into ``target`` (e.g. models/ml-100k), with a
    config.yaml whose run_dir points at the target. A model card (README.md) already in ``target`` is kept."""
    import shutil
    run, target = cfg.run_path, Path(target)
    require(run, "adapter", "train")
    require(run, "codes.json", "index")
    if target.resolve() == run.resolve():
        raise ValueError("export target is the run folder itself")
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (*EXPORTED, *_head_source_files(run / "adapter")):
        src, dst = run / name, target / name
        if not src.exists():   # an older run's copy would describe another model than the one exported
            if dst.exists():
                log.info("export: removing %s, which %s does not have", dst, run)
                if dst.is_dir():
                    shutil.rmtree(dst)
                else:
                    dst.unlink()
            continue
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            # scoring locks, and the head the phases trained before a refit (it only serves to refit again)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock", "*.claim", REFIT_START))
        else:
            shutil.copy2(src, dst)
        copied.append(name)
    exported = dataclasses.replace(cfg, run_dir=str(target))
    exported.save(target / "config.yaml")
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    log.info("exported %d artifacts of %s to %s (%.1f MB)", len(copied), run, target, size / 1e6)
    return {"target": str(target), "copied": copied, "megabytes": round(size / 1e6, 1)}
