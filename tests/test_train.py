"""Tuning on a tiny real model: loss falls, gradients reach what must learn, the adapter reloads exactly."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcrec_chat import backbone, run_folder, stages
from lcrec_chat.config import load_config
from lcrec_chat.indexing import index_token_strings
from lcrec_chat.tasks import TASKS
from lcrec_chat.train import SupervisedLoss, collate, encode


def _entries(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_tiny_run_trains_with_falling_loss_and_saves_everything(tiny_run):
    run = tiny_run.run_path
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "train_summary.json",
                 "loss_curves.png", "checkpoint/state.pt"):
        assert (run / name).exists(), name
    entries = [e for e in _entries(run) if "loss" in e]
    assert len(entries) == tiny_run.train.max_steps
    valid = [e["valid"] for e in _entries(run) if "valid" in e]
    assert set(valid[0]) == {t for t, n in tiny_run.train.task_budget.items() if n > 0}
    first, last = valid[0], valid[-1]
    assert sum(last.values()) < sum(first.values())     # validation loss falls over the run
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == tiny_run.train.max_steps and summary["tokens_per_s"] > 0


def test_loss_is_on_the_response_only(tiny_run):
    builder, codes = run_folder.task_builder(tiny_run.run_path, tiny_run)
    tokenizer = backbone.load_tokenizer(tiny_run.model)
    backbone.add_index_tokens(backbone.load_model(tiny_run.model), tokenizer,
                              index_token_strings(codes))
    sample = builder.seqrec([0, 1, 2], 3, __import__("random").Random(0))
    (enc,) = encode(tokenizer, [sample], 256)
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tokenizer.decode(supervised) == sample.response + "<|im_end|>"
    assert enc.input_ids[:len(enc.input_ids) - len(supervised)] == \
        tokenizer(tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are a recommender that answers with item indices."},
             {"role": "user", "content": sample.prompt}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"]


def test_gradients_reach_new_token_rows_and_first_layer(tiny_run):
    from peft import get_peft_model
    builder, codes = run_folder.task_builder(tiny_run.run_path, tiny_run)
    tokenizer = backbone.load_tokenizer(tiny_run.model)
    model = backbone.load_model(tiny_run.model, for_training=True)
    tokens = index_token_strings(codes)
    ids = backbone.add_index_tokens(model, tokenizer, tokens)
    model = get_peft_model(model, backbone.lora_config(tiny_run.train, ids, model))
    sample = builder.seqrec([0, 1, 2], 3, __import__("random").Random(0))
    data = encode(tokenizer, [sample], 256)
    device = next(model.parameters()).device
    loss, n = SupervisedLoss(model)(**collate(data, [0], tokenizer.pad_token_id or 0, device))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    delta = [g for name, g in grads.items() if "trainable_tokens_delta" in name]
    assert delta and all(g is not None and g.abs().sum() > 0 for g in delta)
    layer0 = [g for name, g in grads.items() if "layers.0." in name and "lora_" in name]
    assert layer0 and all(g is not None for g in layer0) and sum(g.abs().sum() for g in layer0) > 0
    assert n == len(tokenizer(sample.response + "<|im_end|>", add_special_tokens=False)["input_ids"])


def test_interrupted_training_resumes_exactly(tiny_run, tmp_path):
    """A run stopped by the clock and started again ends with the same weights as an uninterrupted run."""
    import shutil
    results = {}
    for name, attempts in (("straight", [[]]), ("interrupted", [["train.max_minutes=1e-9"], []])):
        run = tmp_path / name
        shutil.copytree(tiny_run.run_path, run, ignore=shutil.ignore_patterns("checkpoint", "adapter",
                                                                                "train_log.jsonl"))
        for extra in attempts:
            summary = stages.train(load_config("configs/tiny.yaml", [f"run_dir={run}", *extra]), force=False)
        assert summary["complete"]
        results[name] = (torch.load(run / "checkpoint" / "state.pt", weights_only=False),
                          [e["loss"] for e in _entries(run) if "loss" in e])
        steps = [e["step"] for e in _entries(run) if "loss" in e]
        assert steps == list(range(1, tiny_run.train.max_steps + 1)), steps   # nothing repeated or lost
    (straight, straight_losses), (resumed, resumed_losses) = results["straight"], results["interrupted"]
    # Same data order, schedule and optimizer state after the restart: the same losses step by step. (Bit-exact
    # weights are not asserted: Adam turns float noise in near-zero gradients into lr-sized steps.)
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-3)
    # the LoRA dropout masks' generator (cpu_training.py) went on from where it stopped, not from its seed
    assert straight["dropout_masks"] is not None and resumed["dropout_masks"] == straight["dropout_masks"]
    assert resumed["optimizer"]["state"].keys() == straight["optimizer"]["state"].keys()
    for key in straight["trainable"]:
        torch.testing.assert_close(resumed["trainable"][key], straight["trainable"][key], rtol=1e-4, atol=1e-4)


def test_two_process_gloo_run(tiny_run, tmp_path):
    """The multi-GPU code path (torchrun + DDP), proven on CPU with the gloo backend."""
    import shutil
    run = tmp_path / "ddp"
    shutil.copytree(tiny_run.run_path, run, ignore=shutil.ignore_patterns("checkpoint", "adapter",
                                                                            "train_log.jsonl"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "lcrec_chat", "train", "--config", "configs/tiny.yaml",
                          "--set", f"run_dir={run}", "--set", "train.max_steps=3", "--force"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert set(TASKS) >= set(json.loads((run / "train_summary.json").read_text())["task_samples"])


def test_export_copies_a_servable_run_without_the_checkpoint(tiny_run, tmp_path):
    from lcrec_chat.cli import main
    from lcrec_chat.recommender import Recommender
    target = tmp_path / "shipped"
    target.mkdir()
    (target / "README.md").write_text("model card")
    (target / "methods.json").write_text("{}")                          # an older model's rows: not in this run
    assert not (Path(tiny_run.run_dir) / "methods.json").exists()
    assert main(["export", "--config", "configs/tiny.yaml", "--set", f"run_dir={tiny_run.run_dir}",
                 "--to", str(target)]) == 0
    assert (target / "README.md").read_text() == "model card"          # the card is kept
    assert not (target / "methods.json").exists()                       # no file of another model stays beside it
    assert not (target / "checkpoint").exists() and (target / "adapter" / "adapter_config.json").exists()
    shipped = load_config(target / "config.yaml")
    assert shipped.run_dir == str(target) and shipped.train == tiny_run.train
    rec = Recommender.from_run(shipped, target)
    recs = rec.recommend(history=[0, 1, 2], k=3)
    assert len({r.idx for r in recs}) == 3 and all(r.item["title"] for r in recs)
    assert main(["export", "--config", "configs/tiny.yaml", "--set", f"run_dir={tmp_path / 'none'}",
                 "--to", str(target)]) == 1                            # nothing trained there: a clear error


def test_a_second_phase_adds_collaborative_tokens_to_a_tuned_adapter(tiny_run, tmp_path):
    """train.init_adapter + train.collab_tokens=sasrec: the baselines stage runs first (SASRec), the run's own
    adapter is kept as adapter.init and continued, the mapper trains (gradients reach it) and is saved beside the
    adapter, and the Recommender then puts one collaborative token after each history item of a dense prompt."""
    import shutil

    from lcrec_chat.collab_prompt import CollabDensePrompts
    from lcrec_chat.methods.collab_tokens import embed_with_collab
    from lcrec_chat.recommender import Recommender, Request
    run = tmp_path / "collab"
    shutil.copytree(tiny_run.run_path, run, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl"))
    cfg = load_config("configs/tiny.yaml", [f"run_dir={run}", "train.collab_tokens=sasrec",
                                            f"train.init_adapter={run / 'adapter'}", "train.max_steps=3",
                                            "train.task_budget={seqrec_dense: 12, item2index: 4}"])
    summary = stages.train(cfg)
    assert summary["complete"] and (run / "sasrec.pt").exists()
    assert (run / "adapter" / "collab_mapper.pt").exists() and (run / "adapter.init" / "adapter_config.json").exists()
    assert not (run / "adapter.init" / "collab_mapper.pt").exists()
    assert stages.train(cfg)["steps"] == summary["steps"]            # up to date: no second continuation
    assert not any("distill" in e for e in _entries(run))

    # a third phase in another folder continues this adapter's mapper and learns from SASRec (distill_weight)
    third = tmp_path / "distilled"
    shutil.copytree(run, third, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl", "adapter*"))
    mapper_before = torch.load(run / "adapter" / "collab_mapper.pt", weights_only=True)["state"]
    cfg3 = load_config("configs/tiny.yaml", [f"run_dir={third}", "train.collab_tokens=sasrec",
                                             f"train.init_adapter={run / 'adapter'}", "train.max_steps=2",
                                             "train.distill_weight=1.0", "train.mapper_lr=0",
                                             "train.collab_on_codes=true", "train.on_codes_lr=0",
                                             "train.collab_head=true", "train.collab_head_width=16",
                                             "train.distill_teachers={sasrec: 0.7, gru4rec: 0.3}",
                                             "train.teacher_paths=0.3", "train.window_dropout=0.2",
                                             "train.teacher_prefix_states=true",
                                             "train.task_budget={seqrec_dense: 12, item2index: 4}"])
    summary3 = stages.train(cfg3)
    assert summary3["complete"] and summary3["teacher_path_items"] > 0   # some windows held the teacher's draws
    assert summary3["window_dropped_items"] > 0                          # and some lost items (window_dropout)
    from lcrec_chat.baselines import SequentialRecommender
    from lcrec_chat.distill import SequentialTeacher
    after_each = SequentialTeacher.from_run(third, {"sasrec": 1.0}).probabilities([[0, 1, 2], [4]])
    assert [p.shape[0] for p in after_each] == [3, 1]
    sasrec = SequentialRecommender.load(third / "sasrec.pt")
    assert torch.allclose(after_each[0][-1], torch.softmax(sasrec.score([[0, 1, 2]])[0], -1), atol=1e-5)
    assert torch.allclose(after_each[0].sum(1), torch.ones(3))   # a distribution after every item
    teacher = SequentialTeacher.from_run(third, {"sasrec": 1.0})
    given = teacher.probabilities([[0, 1, 2], [4]], {"sasrec": teacher.sources["sasrec"].states_after_each([[0, 1, 2], [4]])})
    assert all(torch.allclose(a, b) for a, b in zip(given, after_each))   # states passed in = states computed
    # train.teacher_prefix_states: each item scored from its prefix as a history of its own, the prompt's (the
    # window's) states not used; the last item's state is the same either way
    own = SequentialTeacher.from_run(third, {"sasrec": 1.0}, own_prefix=True).probabilities([[0, 1, 2], [4]], {
        "sasrec": teacher.sources["sasrec"].states_after_each([[0, 1, 2], [4]])})
    for k in range(3):
        assert torch.allclose(own[0][k], torch.softmax(sasrec.score([[0, 1, 2][:k + 1]])[0], -1), atol=1e-5)
    assert torch.allclose(own[0][-1], after_each[0][-1], atol=1e-5) and not torch.allclose(own[0][0], after_each[0][0])
    with pytest.raises(ValueError, match="longer than"):
        teacher.probabilities([list(range(sasrec.max_len + 1))])
    with pytest.raises(FileNotFoundError, match="bert4rec"):
        SequentialTeacher.from_run(third, {"bert4rec": 1.0})
    distilled = [e["distill"] for e in _entries(third) if "distill" in e]
    assert distilled and all(0 < d < 20 for d in distilled)
    mapper_after = torch.load(third / "adapter" / "collab_mapper.pt", weights_only=True)["state"]
    assert all(torch.equal(mapper_before[k], mapper_after[k]) for k in mapper_before)   # lr 0: the same mapper
    # collab_on_codes added the additions on the code tokens to the continued mapper, starting at zero
    saved = torch.load(third / "adapter" / "collab_mapper.pt", weights_only=True)
    depth = len(json.loads((third / "codes.json").read_text())["codes"][0])
    assert saved["code_levels"] == depth and not saved["state"]["on_codes_weight"].any()
    assert saved["logit_levels"] == depth and saved["state"]["on_logits_weight"].any()   # collab_head: it learned
    assert saved["prefix_width"] == 16 and saved["state"]["on_logits_prefix_out"].any()  # and its prefix MLP
    rec3 = Recommender.from_run(cfg3, third)
    assert (rec3.collab.mapper.code_levels, rec3.collab.mapper.logit_levels) == (depth, depth)
    heads = rec3._collab_vectors([Request(history=[0, 1, 2], style="dense"), Request(query="a comedy")])
    assert heads.logit_vectors[0].shape == (depth, rec3.collab.mapper.token_dim) and not len(heads.logit_vectors[1])
    assert heads.prefix_head.present.tolist() == [1.0, 0.0]   # the request without a history gets no head
    assert torch.equal(heads.prefix_head.states[0], rec3.collab.states([[0, 1, 2]])[0][-1])
    assert [len(r) for r in rec3.recommend_batch([Request(history=[0, 1, 2], style="dense")], k=3)] == [3]
    tokenizer3 = backbone.load_tokenizer(cfg3.model)
    with pytest.raises(ValueError, match="collab_on_codes"):   # continuing it without them would drop them
        CollabDensePrompts.for_run(tokenizer3, run_folder.task_builder(third, cfg3)[0], third, third / "adapter", 0)
    with pytest.raises(ValueError, match="collab_head"):   # nor without the head it learned
        CollabDensePrompts.for_run(tokenizer3, run_folder.task_builder(third, cfg3)[0], third, third / "adapter",
                                   depth, 0)
    with pytest.raises(ValueError, match="collab_head_width"):
        CollabDensePrompts.for_run(tokenizer3, run_folder.task_builder(third, cfg3)[0], third, third / "adapter",
                                   depth, depth, 0)
    with pytest.raises(ValueError, match="collab_head: true"):
        stages.train(load_config("configs/tiny.yaml", [f"run_dir={third}", "train.collab_tokens=sasrec",
                                                       "train.collab_head_width=8", "train.max_steps=1"]))
    for lever in ("train.distill_weight=1.0", "train.collab_on_codes=true", "train.collab_head=true"):
        with pytest.raises(ValueError, match="collab_tokens"):
            stages.train(load_config("configs/tiny.yaml", [f"run_dir={third}", lever, "train.max_steps=1"]))

    rec = Recommender.from_run(cfg, run)
    assert isinstance(rec.collab, CollabDensePrompts)
    assert rec.prompt(Request(history=[0, 1, 2], style="dense")).count("<gh_stars>") == 3
    assert "<gh_stars>" not in rec.prompt(Request(history=[0, 1, 2], query="a comedy"))   # request form: none
    both = rec.recommend_batch([Request(history=[0, 1, 2], style="dense"), Request(query="a comedy")], k=3)
    assert [len(r) for r in both] == [3, 3]

    model, tokenizer = backbone.load_finetuned(cfg.model, run / "adapter", for_training=True)
    builder, _ = run_folder.task_builder(run, cfg)
    depth = len(json.loads((run / "codes.json").read_text())["codes"][0])
    collab = CollabDensePrompts.for_run(tokenizer, builder, run, run / "adapter", code_levels=depth)
    collab.mapper.train()
    window = builder.seqrec_dense([0, 1, 2, 3], 4, None)
    data = encode(tokenizer, [window], 128, collab)
    assert data[0].vector_items == (0, 1, 2, 3) and data[0].input_ids.count(collab.placeholder) == 4
    batch = collate(data, [0], tokenizer.pad_token_id, next(model.parameters()).device)
    # the additions start at zero: the continued model starts where it was
    causal_lm = model.get_base_model()
    states = collab.states(batch["vector_items"])
    plain = embed_with_collab(causal_lm, batch["input_ids"], collab.placeholder, collab.mapper(torch.cat(states)))
    assert torch.equal(collab.embed(causal_lm, batch["input_ids"], states), plain)
    loss, _ = SupervisedLoss(model, collab)(**batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in collab.mapper.parameters())   # on_codes too
    with torch.no_grad():
        collab.mapper.on_codes_weight.normal_()
    moved = collab.embed(causal_lm, batch["input_ids"], states) - plain
    changed = moved.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [pos for pos, *_ in data[0].distill]   # exactly the code tokens after each placeholder

    # collab_head: zero at the start (the same loss), then it moves the logits where codes follow a state
    headed = CollabDensePrompts.for_run(tokenizer, builder, run, run / "adapter", code_levels=depth,
                                        logit_levels=depth)
    model.eval()   # no LoRA dropout: the two losses are compared exactly
    headless = CollabDensePrompts.for_run(tokenizer, builder, run, run / "adapter", code_levels=depth)
    with torch.no_grad():
        start = SupervisedLoss(model, headed)(**batch)[0]
        assert start == SupervisedLoss(model, headless)(**batch)[0]
        headed.mapper.on_logits_weight.normal_()
        assert SupervisedLoss(model, headed)(**batch)[0] != start
    SupervisedLoss(model, headed)(**batch)[0].backward()
    assert headed.mapper.on_logits_weight.grad.abs().sum() > 0
    # its prefix MLP (collab_head_width) too: zero at the start, then it moves the loss and learns
    prefixed = CollabDensePrompts.for_run(tokenizer, builder, run, run / "adapter", code_levels=depth,
                                          logit_levels=depth, prefix_width=8)
    with torch.no_grad():
        assert SupervisedLoss(model, prefixed)(**batch)[0] == start
    SupervisedLoss(model, prefixed)(**batch)[0].backward()
    assert prefixed.mapper.on_logits_prefix_out.grad.abs().sum() > 0
    with torch.no_grad():
        prefixed.mapper.on_logits_prefix_out.normal_()
        assert SupervisedLoss(model, prefixed)(**batch)[0] != start

    # the teacher's points are the code tokens that follow each placeholder, level by level
    points = data[0].distill
    assert [(k, level, item) for _, k, level, item in points] == [
        (k, level, item) for k, item in enumerate([1, 2, 3, 4]) for level in range(len(collab.code_ids(item)))]
    for pos, k, level, item in points:
        assert data[0].input_ids[pos] == collab.code_ids(item)[level]
        assert data[0].input_ids[pos - 1 - level] == collab.placeholder
    heldout = builder.heldout([[0, 1, 2]], [3], "seqrec_dense", 0)[0]
    held = encode(tokenizer, [heldout], 128, collab)[0]
    assert [(k, item) for _, k, _, item in held.distill] == [(2, 3)] * len(collab.code_ids(3))


def test_phases_train_the_same_model_as_a_chain_of_continued_runs(tiny_run, tmp_path):
    """train.phases: one run of two phases gives the same adapter and mapper, to the bit, as a first run and a
    second one continuing it through train.init_adapter (how the shipped model's phases were first made); the
    earlier phase is kept as adapter.phase0 with its log; a finished phased run is up to date."""
    import shutil
    from safetensors.torch import load_file
    first = ["train.collab_tokens=sasrec", "train.max_steps=2", "train.task_budget={seqrec_dense: 8, item2index: 4}"]
    later = {"seed": 43, "max_steps": 2, "distill_weight": 1.0, "collab_on_codes": True,
             "task_budget": {"seqrec_dense": 8, "itemsearch": 4}}
    later_flags = [f"train.{k}={json.dumps(v)}" for k, v in later.items()]
    base = tmp_path / "base"            # the baselines stage (SASRec for the tokens) once, for all three folders
    shutil.copytree(tiny_run.run_path, base, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl", "adapter*"))
    stages.baselines(load_config("configs/tiny.yaml", [f"run_dir={base}"]))
    folders = {}
    for name in ("phased", "chain1", "chain2"):
        folders[name] = tmp_path / name
        shutil.copytree(base, folders[name])
    phased = load_config("configs/tiny.yaml", [f"run_dir={folders['phased']}", *first,
                                               f"train.phases={json.dumps([later])}"])
    summary = stages.train(phased)
    assert summary["complete"] and summary["steps"] == 2
    stages.train(load_config("configs/tiny.yaml", [f"run_dir={folders['chain1']}", *first]))
    stages.train(load_config("configs/tiny.yaml", [f"run_dir={folders['chain2']}", *first, *later_flags,
                                                   f"train.init_adapter={folders['chain1'] / 'adapter'}"]))

    def weights(adapter):
        return (load_file(adapter / "adapter_model.safetensors"),
                torch.load(adapter / "collab_mapper.pt", weights_only=True)["state"])
    for mine, theirs in ((folders["phased"] / "adapter.phase0", folders["chain1"] / "adapter"),
                         (folders["phased"] / "adapter", folders["chain2"] / "adapter")):
        for a, b in zip(weights(mine), weights(theirs)):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mine
    kept = folders["phased"] / "adapter.phase0"
    assert [e["step"] for e in _entries(kept) if "loss" in e] == [1, 2]
    assert any("distill" in e for e in _entries(folders["phased"]))        # the last phase's own log
    assert not any("distill" in e for e in _entries(kept))
    saved = load_config(folders["phased"] / "config.yaml")                  # the run's config keeps its phases
    assert saved.train.phases == [later]
    mtime = (folders["phased"] / "adapter" / "adapter_model.safetensors").stat().st_mtime
    assert stages.train(phased)["steps"] == 2                               # up to date: nothing retrained
    assert (folders["phased"] / "adapter" / "adapter_model.safetensors").stat().st_mtime == mtime
    # copied to another folder (an arm branched from a run's phases), it is still up to date: a later phase's print
    # stands for the phase before by that phase's print, not by its folder's path
    moved = tmp_path / "moved"
    shutil.copytree(folders["phased"], moved)
    record = json.loads((moved / "stages.json").read_text())
    stages.train(load_config("configs/tiny.yaml", [f"run_dir={moved}", *first, f"train.phases={json.dumps([later])}"]))
    assert json.loads((moved / "stages.json").read_text()) == record
    assert (moved / "adapter" / "adapter_model.safetensors").stat().st_mtime == mtime


def test_a_phase_can_refit_its_head_before_the_next_phase_continues_it(tiny_run, tmp_path):
    """train.head_refit_after: the earlier phase's adapter (adapter.phase0) gets its head refitted, with its report
    inside it, and the next phase continues the refitted head: the phased run trains the same weights, to the bit,
    as a refitted first run continued through train.init_adapter; a changed refit retrains the later phase; the
    last phase cannot ask for it."""
    import shutil
    from safetensors.torch import load_file
    first = ["train.collab_tokens=sasrec", "train.max_steps=2", "train.distill_weight=1.0", "train.collab_head=true",
             "train.collab_head_width=16", "train.task_budget={seqrec_dense: 8, item2index: 4}",
             "train.head_refit_epochs=2", "train.head_refit_lr=0.01"]
    later = {"seed": 43, "max_steps": 2, "task_budget": {"seqrec_dense": 8, "itemsearch": 4}}
    base = tmp_path / "base"
    shutil.copytree(tiny_run.run_path, base, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl", "adapter*"))
    stages.baselines(load_config("configs/tiny.yaml", [f"run_dir={base}"]))
    folders = {name: tmp_path / name for name in ("phased", "chain1", "chain2")}
    for folder in folders.values():
        shutil.copytree(base, folder)
    phases = [{**later, "head_refit_after": False}]
    phased = load_config("configs/tiny.yaml", [f"run_dir={folders['phased']}", *first, "train.head_refit_after=true",
                                               f"train.phases={json.dumps(phases)}"])
    summary = stages.train(phased)
    kept = folders["phased"] / "adapter.phase0"
    report = json.loads((kept / "head_refit.json").read_text())
    assert report["train_points"] > 0 and len(report["fits"]) == 1
    start = torch.load(kept / stages.REFIT_START, weights_only=True)["state"]
    refitted = torch.load(kept / "collab_mapper.pt", weights_only=True)["state"]
    changed = {k for k in start if not torch.equal(start[k], refitted[k])}
    assert changed and all(k.startswith("on_logits_") for k in changed), changed
    assert summary["head_refit"]["fits"] != report["fits"]          # the last phase's own refit, of its own head

    stages.train(load_config("configs/tiny.yaml", [f"run_dir={folders['chain1']}", *first]))   # refits adapter/
    stages.train(load_config("configs/tiny.yaml", [f"run_dir={folders['chain2']}", *first,
                                                   *[f"train.{k}={json.dumps(v)}" for k, v in later.items()],
                                                   f"train.init_adapter={folders['chain1'] / 'adapter'}"]))

    def weights(adapter):
        return (load_file(adapter / "adapter_model.safetensors"),
                torch.load(adapter / "collab_mapper.pt", weights_only=True)["state"])
    for a, b in zip(weights(folders["phased"] / "adapter"), weights(folders["chain2"] / "adapter")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    adapter = folders["phased"] / "adapter" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime
    stages.train(phased)                                     # up to date: nothing retrained
    assert adapter.stat().st_mtime == mtime
    changed_refit = load_config("configs/tiny.yaml", [f"run_dir={folders['phased']}", *first,
                                                      "train.head_refit_after=true", "train.head_refit_lr=0.001",
                                                      f"train.phases={json.dumps(phases)}"])
    stages.train(changed_refit)                              # phase 0's head changed: phase 1 trains again
    assert adapter.stat().st_mtime != mtime
    with pytest.raises(ValueError, match="head_refit_after"):
        stages.train(load_config("configs/tiny.yaml", [f"run_dir={folders['phased']}", *first,
                                                       "train.phases=[{seed: 43, head_refit_after: true}]"]))


def test_the_prompt_can_read_the_heads_extra_states(tiny_run, tmp_path):
    """train.prompt_reads_head_sources: a phase continuing an adapter whose refitted head reads GRU4Rec's state
    puts that state into the prompt's tokens too. It starts as the adapter it continues (the new weights are zero,
    so the prompt's vectors are those of the mapper it came from, to the bit), they train, the saved mapper says
    so, and the served model's prompt follows GRU4Rec's state; continuing it without them, or asking for them with
    no head sources, is a clear error."""
    import shutil

    from lcrec_chat.collab_prompt import CollabDensePrompts
    from lcrec_chat.recommender import Recommender
    run = tmp_path / "prompt"
    shutil.copytree(tiny_run.run_path, run, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl"))
    stages.baselines(load_config("configs/tiny.yaml", [f"run_dir={run}"]))
    first = [f"run_dir={run}", "train.collab_tokens=sasrec", f"train.init_adapter={run / 'adapter'}",
             "train.max_steps=2", "train.distill_weight=1.0", "train.collab_head=true", "train.collab_head_width=16",
             "train.collab_on_codes=true", "train.task_budget={seqrec_dense: 8, item2index: 4}",
             "train.head_refit_epochs=1", "train.head_refit_lr=0.01", "train.head_refit_sources=[gru4rec]"]
    stages.train(load_config("configs/tiny.yaml", first))
    start = run / "adapter.start"
    shutil.copytree(run / "adapter", start)
    rec = Recommender.from_run(load_config("configs/tiny.yaml", [f"run_dir={run}"]), run, adapter_dir=start)
    history = [[0, 1, 2, 3]]
    before = rec.collab.inputs(history)
    reading = CollabDensePrompts.for_run(rec.tokenizer, rec.builder, run, start, prompt_extra=True)
    assert reading.mapper.prompt_reads_extra and reading.mapper.head_extra_dim == reading.head_sources["gru4rec"].dim
    after = reading.inputs(history)
    for a, b in zip(before[:3], after[:3]):                  # the prompt's vectors, the code additions, the head
        assert all(torch.equal(x, y) for x, y in zip(a, b))

    second = [f"run_dir={tmp_path / 'second'}", "train.collab_tokens=sasrec", f"train.init_adapter={start}",
              "train.max_steps=2", "train.seed=44", "train.distill_weight=1.0", "train.collab_head=true",
              "train.collab_head_width=16", "train.collab_on_codes=true",
              "train.task_budget={seqrec_dense: 8, item2index: 4}", "train.head_refit_sources=[gru4rec]",
              "train.prompt_reads_head_sources=true"]
    fresh_copy = shutil.ignore_patterns("adapter*", "checkpoint", "train_log.jsonl")
    shutil.copytree(run, tmp_path / "second", ignore=fresh_copy)
    cfg = load_config("configs/tiny.yaml", second)
    stages.train(cfg)
    saved = torch.load(tmp_path / "second" / "adapter" / "collab_mapper.pt", weights_only=True)
    assert saved["prompt_extra"] is True and saved["head_sources"] == ["gru4rec"]
    assert saved["state"]["prompt_extra_in"].abs().sum() > 0          # zero at the start, trained
    served = Recommender.from_run(cfg, tmp_path / "second")
    assert served.collab.mapper.prompt_reads_extra
    vectors = served.collab.inputs(history)[0][0]
    with torch.no_grad():                                # another GRU4Rec state, another prompt
        served.collab.head_sources["gru4rec"].model.net.item_emb.weight.mul_(-1.0)
    assert not torch.allclose(vectors, served.collab.inputs(history)[0][0])

    third, fresh = tmp_path / "third", tmp_path / "fresh"
    for folder in (third, fresh):
        shutil.copytree(run, folder, ignore=fresh_copy)
    continued = tmp_path / "second" / "adapter"
    without = [f"run_dir={third}", "train.collab_tokens=sasrec", f"train.init_adapter={continued}",
               *(f for f in second[3:] if not f.startswith("train.prompt_reads"))]
    with pytest.raises(ValueError, match="prompt_reads_head_sources"):   # would drop what the prompt learned
        stages.train(load_config("configs/tiny.yaml", without))
    with pytest.raises(ValueError, match="prompt_reads_head_sources"):   # a fresh mapper has no head sources
        stages.train(load_config("configs/tiny.yaml", [f"run_dir={fresh}", "train.collab_tokens=sasrec",
                                                       "train.prompt_reads_head_sources=true", "train.max_steps=1"]))


def test_a_soup_phase_trains_one_member_per_seed_and_keeps_their_average(tiny_run, tmp_path):
    """train.soup_seeds: each member is, to the bit, the run the phase trains with that seed alone; the phase's
    adapter is their average (every LoRA delta and the mapper exactly the members' mean), which the head refit then
    starts from; a finished soup is up to date; a changed seed list trains only the new member; one seed is refused."""
    import shutil
    from safetensors.torch import load_file
    first = ["train.collab_tokens=sasrec", "train.max_steps=2", "train.collab_head=true", "train.collab_head_width=16",
             "train.task_budget={seqrec_dense: 8, item2index: 4}"]
    base = tmp_path / "base"
    shutil.copytree(tiny_run.run_path, base, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl", "adapter*"))
    stages.baselines(load_config("configs/tiny.yaml", [f"run_dir={base}"]))
    soup_dir, plain_dir = tmp_path / "soup", tmp_path / "plain"
    shutil.copytree(base, soup_dir)
    shutil.copytree(base, plain_dir)

    def soup_config(seeds):
        return load_config("configs/tiny.yaml", [f"run_dir={soup_dir}", *first, f"train.soup_seeds={seeds}",
                                                 "train.head_refit_epochs=1"])
    summary = stages.train(soup_config([43, 44]))
    assert summary["soup_seeds"] == [43, 44] and summary["head_refit"]["train_points"] > 0
    stages.train(load_config("configs/tiny.yaml", [f"run_dir={plain_dir}", *first, "train.seed=43"]))

    def weights(adapter):
        return (load_file(adapter / "adapter_model.safetensors"),
                torch.load(adapter / "collab_mapper.pt", weights_only=True)["state"])
    for a, b in zip(weights(soup_dir / "adapter.train.seed43"), weights(plain_dir / "adapter")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def deltas(adapter):   # every LoRA update as the dense matrix it adds, and every other trained tensor
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        state = load_file(adapter / "adapter_model.safetensors")
        out = {k: state[k].float() for k in state if "lora_" not in k}
        for k in state:
            if "lora_A" in k:
                b = state[k.replace("lora_A", "lora_B")].float()
                out[k] = b @ state[k].float() * cfg["lora_alpha"] / cfg["r"]
        return out, cfg["r"]
    (d43, r), (d44, _) = deltas(soup_dir / "adapter.train.seed43"), deltas(soup_dir / "adapter.train.seed44")
    soup, soup_r = deltas(soup_dir / "adapter")
    assert soup_r == 2 * r and soup.keys() == d43.keys()
    for k in soup:
        assert not torch.equal(d43[k], d44[k]), k          # the members differ ...
        torch.testing.assert_close(soup[k], (d43[k] + d44[k]) / 2, rtol=0, atol=1e-6)   # ... and the soup is their mean
    maps = [torch.load(soup_dir / f"adapter.train.seed{s}" / "collab_mapper.pt", weights_only=True)["state"]
            for s in (43, 44)]
    start = torch.load(soup_dir / "adapter" / stages.REFIT_START, weights_only=True)["state"]   # the refit's start
    for k in start:
        expected = (maps[0][k].float() + maps[1][k].float()) / 2 if start[k].is_floating_point() else maps[0][k]
        torch.testing.assert_close(start[k].float(), expected.float(), rtol=0, atol=1e-6)

    adapter = soup_dir / "adapter" / "adapter_model.safetensors"
    member43 = soup_dir / "adapter.train.seed43" / "adapter_model.safetensors"
    mtimes = adapter.stat().st_mtime, member43.stat().st_mtime
    stages.train(soup_config([43, 44]))                       # up to date: nothing retrained
    assert (adapter.stat().st_mtime, member43.stat().st_mtime) == mtimes
    assert stages.train(soup_config([43, 45]))["soup_seeds"] == [43, 45]   # only the new member trains
    assert member43.stat().st_mtime == mtimes[1] and adapter.stat().st_mtime != mtimes[0]
    assert (soup_dir / "adapter.train.seed45" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="soup_seeds"):
        stages.train(soup_config([43]))


def test_code_teacher_sums_the_teachers_item_probabilities_onto_each_levels_codes():
    """Level 0: mass per first code; level l: only items sharing the true item's first l codes, renormalised;
    the product of the conditionals along an item's code is the teacher's probability of that item."""
    from lcrec_chat.distill import CodeTeacher
    tokens = torch.tensor([[10, 20], [10, 21], [11, 22], [11, 20]])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    teacher = CodeTeacher(tokens)

    def nonzero(ids, target):
        return {t: p for t, p in zip(ids[0].tolist(), target[0].tolist()) if p > 0}
    assert nonzero(*teacher.targets(probs, torch.tensor([0]), torch.tensor([0]))) == pytest.approx({10: 0.3, 11: 0.7})
    # item 3's token 20 sits under another prefix
    assert nonzero(*teacher.targets(probs, torch.tensor([1]), torch.tensor([0]))) == pytest.approx(
        {20: 0.1 / 0.3, 21: 0.2 / 0.3})
    for item, prob in enumerate(probs[0].tolist()):
        chain = 1.0
        for level in range(2):
            chain *= nonzero(*teacher.targets(probs, torch.tensor([level]), torch.tensor([item])))[int(tokens[item, level])]
        assert chain == pytest.approx(prob)
    # a student that puts exactly the targets on the code tokens has the lowest loss (the targets' entropy)
    logits = torch.full((1, 30), -1e4)
    logits[0, 10], logits[0, 11] = math.log(0.3), math.log(0.7)
    best = teacher.loss(logits, probs, torch.tensor([0]), torch.tensor([2]))
    assert float(best) == pytest.approx(-(0.3 * math.log(0.3) + 0.7 * math.log(0.7)), rel=1e-4)
    assert float(teacher.loss(torch.zeros(1, 30), probs, torch.tensor([0]), torch.tensor([2]))) > float(best)
    with pytest.raises(ValueError, match="coded items"):
        teacher.targets(torch.ones(1, 5) / 5, torch.tensor([0]), torch.tensor([0]))


def test_teacher_paths_replace_written_items_with_the_teachers_draws(tiny_run, tmp_path):
    """distill.teacher_paths: in dense windows, items after the first are replaced at about the given share by
    draws from the teacher's distribution after the original items before them; the window never holds an item
    twice, the rewritten sample writes the new window's codes, other tasks are untouched, the same seed gives the
    same samples, and the draws follow the teacher (mass of its top items as often as the distribution says)."""
    import shutil

    from lcrec_chat.distill import SequentialTeacher, teacher_paths
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_path, run, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl", "adapter*"))
    cfg = load_config("configs/tiny.yaml", [f"run_dir={run}"])
    stages.baselines(cfg)
    teacher = SequentialTeacher.from_run(run, {"sasrec": 0.7, "gru4rec": 0.3})
    builder = run_folder.task_builder(run, cfg)[0]
    samples = builder.build(run_folder.load_split(run).train_sequences(), {"seqrec_dense": 40, "item2index": 6}, 0)

    def rewrite(window):
        return builder.seqrec_dense(window[:-1], window[-1], None)
    mixed, replaced = teacher_paths(samples, teacher, 0.4, seed=3, builder=builder)
    written = sum(len(s.items) - 1 for s in samples if s.task == "seqrec_dense")
    changed = 0
    for before, after in zip(samples, mixed):
        if before.task != "seqrec_dense":
            assert after is before
            continue
        assert len(after.items) == len(before.items) and after.items[0] == before.items[0]
        assert len(set(after.items)) == len(after.items)
        assert after == rewrite(list(after.items)) and after.target == after.items[-1]
        changed += sum(a != b for a, b in zip(after.items, before.items))
    assert changed == replaced and 0.25 * written < replaced < 0.55 * written
    assert teacher_paths(samples, teacher, 0.4, seed=3, builder=builder) == (mixed, replaced)
    assert teacher_paths(samples, teacher, 0.0, seed=3, builder=builder) == (list(samples), 0)
    with pytest.raises(ValueError, match="teacher_paths"):
        teacher_paths(samples, teacher, 1.0, seed=3, builder=builder)

    # one window drawn many times: the draws at its second position land on the teacher's top items as often as
    # the teacher's renormalised distribution (window items excluded) puts mass there
    window = next(s for s in samples if s.task == "seqrec_dense" and len(s.items) > 3)
    probs = teacher.probabilities([window.items[:-1]])[0][0].clone()
    probs[list(window.items)] = 0
    probs /= probs.sum()
    top = set(probs.topk(50).indices.tolist())
    draws, _ = teacher_paths([window] * 3000, teacher, 0.999, seed=5, builder=builder)
    share_in_top = sum(d.items[1] in top for d in draws) / len(draws)
    assert share_in_top == pytest.approx(float(probs[list(top)].sum()), abs=0.04)


def test_training_windows_write_every_item_after_the_first_once():
    from lcrec_chat.head_refit import training_windows
    sequences = [list(range(100, 147)), [1, 2, 3], [9], list(range(200, 221))]
    windows = training_windows(sequences, 21)
    assert all(2 <= len(w) <= 21 for w in windows)
    written = [item for w in windows for item in w[1:]]   # a window's first item has no state before it
    # each sequence's items after its first, once (the last window aligned to the end may repeat a few)
    assert set(written) == {i for s in sequences for i in s[1:]}
    assert len(written) - len(set(written)) < 21
    assert [1, 2, 3] in windows and not any(9 in w for w in windows)


def test_head_refit_fits_the_head_alone_from_the_phases_head(tiny_run, tmp_path):
    """train.head_refit_epochs: after the phases, only the collaborative head's weights change (the LoRA and the
    rest of the mapper stay), its training loss falls, the phases' head is kept and every refit starts from it
    (a changed setting and back gives the same head, to the bit), a finished refit is up to date, and the
    refitted model decodes."""
    import dataclasses
    import shutil

    from safetensors.torch import load_file

    from lcrec_chat.recommender import Recommender, Request
    run = tmp_path / "refit"
    shutil.copytree(tiny_run.run_path, run, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl"))
    flags = [f"run_dir={run}", "train.collab_tokens=sasrec", f"train.init_adapter={run / 'adapter'}",
             "train.max_steps=2", "train.distill_weight=1.0", "train.collab_head=true",
             "train.collab_head_width=16", "train.task_budget={seqrec_dense: 12, item2index: 4}",
             "train.head_refit_epochs=4", "train.head_refit_seeds=2", "train.head_refit_lr=0.01"]
    cfg = load_config("configs/tiny.yaml", flags)
    summary = stages.train(cfg)
    report = summary["head_refit"]
    assert report["train_points"] > 0 and report["valid_points"] > 0 and [len(f) for f in report["fits"]] == [4, 4]
    # the student beside its teacher on the training windows too (the model card's memorisation check)
    assert len(report["train_after"]["nll_per_level"]) == 3 and report["train_teacher_nll_per_item"] > 0
    for fit in report["fits"]:
        losses = [row["train_loss"] for row in fit]
        assert losses[-1] < losses[0], losses
    assert report["fits"][0] != report["fits"][1]            # two batch orders, from the same start, averaged
    adapter = run / "adapter"
    before = torch.load(adapter / stages.REFIT_START, weights_only=True)["state"]
    after = torch.load(adapter / "collab_mapper.pt", weights_only=True)["state"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("on_logits_") for k in changed), changed
    lora = load_file(adapter / "adapter_model.safetensors")
    assert json.loads((run / "head_refit.json").read_text())["fits"] == report["fits"]

    again = stages.train(cfg)                         # up to date: neither the phases nor the refit run again
    assert again["head_refit"] == report
    other = stages.train(load_config("configs/tiny.yaml", flags[:-1] + ["train.head_refit_lr=0.001"]))
    assert other["head_refit"]["fits"] != report["fits"]       # a changed setting refits, without retraining
    assert all(torch.equal(lora[k], v) for k, v in load_file(adapter / "adapter_model.safetensors").items())
    stages.train(cfg)                                 # back: from the phases' head, the same refit
    final = torch.load(adapter / "collab_mapper.pt", weights_only=True)["state"]
    assert all(torch.equal(after[k], final[k]) for k in after)

    rec = Recommender.from_run(cfg, run)
    assert [len(r) for r in rec.recommend_batch([Request(history=[0, 1, 2], style="dense")], k=3)] == [3]
    shipped = stages.export(cfg, tmp_path / "shipped")   # the refitted head ships; the phases' copy does not
    assert "head_refit.json" in shipped["copied"] and not (tmp_path / "shipped" / "adapter" / stages.REFIT_START).exists()
    assert (tmp_path / "shipped" / "adapter" / "collab_mapper.pt").read_bytes() == (adapter / "collab_mapper.pt").read_bytes()
    with pytest.raises(ValueError, match="collab_head"):
        stages.head_refit(cfg, dataclasses.replace(cfg.train, collab_head=False), force=True)

    # train.head_refit_sources: the head also reads GRU4Rec's state after the same items; only the refit reruns
    with_gru = load_config("configs/tiny.yaml", flags + ["train.head_refit_sources=[gru4rec]",
                                                          "train.head_refit_teachers={sasrec: 1, gru4rec: 1}"])
    refitted = stages.train(with_gru)["head_refit"]
    assert refitted["head_sources"] == ["gru4rec"] and refitted["teacher"] == {"sasrec": 0.5, "gru4rec": 0.5}
    assert report["teacher"] == {"sasrec": 1.0}                # the phases' distill_teachers when none is given
    assert all(torch.equal(lora[k], v) for k, v in load_file(adapter / "adapter_model.safetensors").items())
    saved = torch.load(adapter / "collab_mapper.pt", weights_only=True)
    assert saved["head_sources"] == ["gru4rec"]
    for name in ("on_logits_extra_weight", "on_logits_prefix_extra_in"):    # zero at the start, fitted
        assert saved["state"][name].abs().sum() > 0, name
    rec = Recommender.from_run(with_gru, run)
    history = [[0, 1, 2]]
    _, _, heads, last = rec.collab.inputs(history)
    gru = rec.collab.head_sources["gru4rec"]
    assert last.shape[1] == rec.collab.source.dim + gru.dim
    with torch.no_grad():                             # decoding reads GRU4Rec's state: another state, another head
        gru.model.net.item_emb.weight.mul_(-1.0)
    _, _, other_heads, _ = rec.collab.inputs(history)
    assert not torch.allclose(heads[0], other_heads[0])
    assert [len(r) for r in rec.recommend_batch([Request(history=[0, 1, 2], style="dense")], k=3)] == [3]
    shipped = stages.export(with_gru, tmp_path / "shipped_gru")   # the model it reads ships with the head
    assert "gru4rec.pt" in shipped["copied"]
    served = Recommender.from_run(load_config(tmp_path / "shipped_gru" / "config.yaml"), tmp_path / "shipped_gru")
    assert list(served.collab.head_sources) == ["gru4rec"]
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        stages.head_refit(cfg, dataclasses.replace(cfg.train, head_refit_sources=["nope"]), force=True)


def test_hold_out_last_keeps_each_users_last_items_out_of_the_llms_training(tiny_run, tmp_path, monkeypatch):
    """train.hold_out_last 2: the phases and the head refit learn from the held-back split (fewer training windows
    and points than the same run without it, none of them writing a held-out item), the refit also reports the
    select stage, whose held-out points are the users' last training items, and the setting is part of the training
    fingerprint (changing it retrains) while a run without it keeps its fingerprint."""
    import shutil

    from lcrec_chat import head_refit
    from lcrec_chat.run_folder import load_split
    from lcrec_chat.tasks import TaskBuilder
    # record the sequences the phases' task builder and the refit's windows are actually built from (the real
    # functions still run)
    learnt_from: dict[str, list[list[int]]] = {}
    build, windows_of = TaskBuilder.build, head_refit.training_windows

    def recording_build(self, sequences, *args, **kwargs):
        learnt_from["tasks"] = [list(s) for s in sequences]
        return build(self, sequences, *args, **kwargs)

    def recording_windows(sequences, size):
        learnt_from["refit"] = [list(s) for s in sequences]
        return windows_of(sequences, size)

    monkeypatch.setattr(TaskBuilder, "build", recording_build)
    monkeypatch.setattr(head_refit, "training_windows", recording_windows)
    run = tmp_path / "held"
    shutil.copytree(tiny_run.run_path, run, ignore=shutil.ignore_patterns("checkpoint", "train_log.jsonl"))
    flags = [f"run_dir={run}", "train.collab_tokens=sasrec", "train.max_steps=2", "train.distill_weight=1.0",
             "train.collab_head=true", "train.collab_head_width=16",
             "train.task_budget={seqrec_dense: 12, item2index: 4}", "train.head_refit_epochs=1"]
    plain = stages.train(load_config("configs/tiny.yaml", flags))["head_refit"]
    plain_fp = json.loads((run / "stages.json").read_text())["train"]
    cfg = load_config("configs/tiny.yaml", flags + ["train.hold_out_last=2"])
    held = stages.train(cfg)["head_refit"]
    assert json.loads((run / "stages.json").read_text())["train"] != plain_fp     # retrained

    split = load_split(run)
    assert held["windows"] == len(windows_of(learnt_from["refit"], cfg.data.max_history + 1))
    assert 0 < held["train_points"] < plain["train_points"]
    # what both learnt from: each user's training items but the last two, in order (one user per sequence, as
    # Split.train_sequences orders them); no held-out item anywhere in that user's sequence
    users = [u for u in split.users if len(u.train) > 2]
    assert users and all(u.train[-2:] for u in users)     # there are held-out items to keep out
    for part in ("tasks", "refit"):
        sequences = learnt_from[part][:len(users)]
        assert sequences == [u.train[:-2] for u in users], part
        assert not any(set(u.train[-2:]) & set(s) for u, s in zip(users, sequences)), part
    assert held["select_after"]["nll_per_item"] > 0 and held["select_teacher_nll_per_item"] > 0
    assert held["select_before"]["nll_per_item"] > 0 and "select_after" not in plain
    assert held["valid_points"] == plain["valid_points"]      # valid is reported on the whole split as before
    # the evaluate stage scores such a model on select too, in metrics.json and in the report
    metrics = stages.evaluate(load_config("configs/tiny.yaml", flags + ["train.hold_out_last=2", "eval.max_users=4",
                                                                         "eval.itemsearch=false"]))
    rows = {k: list(v) for k, v in metrics["methods"].items() if k.startswith("LC-Rec (")}
    row = metrics["methods"]["LC-Rec (dense prompt, text+collaborative codes, SASRec tokens)"]
    assert list(row) == ["select", "valid", "test"] and row["select"]["users"] == 4, rows
    assert "| select | 4 |" in (run / "report.md").read_text()
    assert stages.train(load_config("configs/tiny.yaml", flags))["head_refit"]["train_points"] == plain["train_points"]


def test_a_resumed_log_keeps_the_steps_before_its_checkpoint_and_drops_a_cut_off_line(tmp_path):
    from lcrec_chat.plots import plot_training
    from lcrec_chat.train import trim_history
    log_path = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 5.0 - s / 10}) for s in range(1, 6)]
    lines.insert(4, json.dumps({"step": 4, "valid": {"seqrec_dense": 2.5}}))
    log_path.write_text("\n".join(lines) + '\n{"step": 6, "lo')           # killed while writing step 6
    plot_training(log_path, tmp_path / "curves.png")                     # the plot does without the cut-off line
    assert (tmp_path / "curves.png").stat().st_size > 0
    trim_history(log_path, 3)                                           # resumed from the checkpoint at step 3
    assert [json.loads(line)["step"] for line in log_path.read_text().splitlines()] == [1, 2, 3]
    trim_history(log_path, 3)
    assert len(log_path.read_text().splitlines()) == 3                  # nothing more to drop: unchanged
    trim_history(log_path, 0)                                           # a fresh start: nothing of the old run
    assert log_path.read_text() == ""
