"""Typed configuration: these dataclasses are the documentation of every setting.

Precedence, lowest to highest:
  1. the defaults written below,
  2. the YAML preset given with ``--config`` (only the keys it names),
  3. ``--set section.key=value`` flags on the command line.
An unknown section or key at any level is an error that names it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .locks import write_atomic


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses below."""


@dataclass
class DataConfig:
    source: Literal["ml-100k", "ml-1m", "lcrec", "amazon"] = "ml-100k"
    path: str = ""                 # folder (lcrec, amazon) or file prefix; empty = the packaged copy (MovieLens)
    name: str = ""                 # dataset name inside `path` (lcrec: NAME.inter.json; amazon: category)
    max_history: int = 20          # items of history shown to every model
    min_interactions: int = 5      # k-core filter for raw Amazon data
    max_users: int = 0             # keep only the first N users (0 = all); for tests and quick runs
    # > 0: each user's last N interactions are dropped before the leave-one-out split, so the whole pipeline
    # (baselines, codes, the LLM, the evaluation) runs on a selection split whose valid and test come before the
    # real ones: recipes are compared on its test, which asks what the real test asks, without looking at the real
    # valid or test. Out of repr, so runs made before it existed keep their prepare fingerprint (stages.prepare)
    drop_last: int = field(default=0, repr=False)


@dataclass
class IndexConfig:
    embed_model: str = "all-minilm-l6-v2"   # packaged model, or any sentence-transformers name / folder
    embed_fields: list[Literal["title", "genres", "description", "brand"]] = field(
        default_factory=lambda: ["title", "genres"])
    embed_separately: bool = False          # LC-Rec: embed each field alone and average the vectors
    embed_batch_size: int = 128
    # share of collaborative signal in the vectors the RQ-VAE indexes (indexing/collab.py): 0 = text only,
    # as LC-Rec; 1 = a truncated SVD of the training user-item matrix weighted equally with the text
    collab_weight: float = 0.0
    collab_dim: int = 64
    # where the collaborative vectors come from: "svd" (above), or "sasrec": the item embedding table of the
    # run's SASRec (sasrec.pt, the baselines stage; the vectors it scores next items with), so that a code
    # prefix groups items SASRec scores alike and the state SASRec puts in the prompt (train.collab_tokens)
    # maps onto the codes nearly linearly
    collab_source: Literal["svd", "sasrec"] = "svd"
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256, 128])  # encoder MLP; decoder mirrors it
    code_dim: int = 32
    # One size per level; their product must reach the item count (checked up front). 3 x 64 for
    # ML-100K (1.7k items): a 4th level only lowered greedy collisions (2.0% -> 1.1%, which the exact
    # step removes anyway) and costs a decoding step. ML-1M (3.9k) keeps 4 x 64 in its preset: with
    # 3 levels 4.9% of items had to leave their nearest code, with 4 only 0.15%. LC-Rec: 4 x 256.
    codebook_sizes: list[int] = field(default_factory=lambda: [64, 64, 64])
    dropout: float = 0.0
    batch_norm: bool = False
    beta: float = 0.25                      # commitment weight
    kmeans_init: bool = True                # k-means of each level's codebook on all items' residuals
    kmeans_iters: int = 50
    sinkhorn_epsilon: float = 0.003         # Sinkhorn on the last level during training; 0 = off
    sinkhorn_iters: int = 50
    # LC-Rec's post-hoc Sinkhorn rounds on items sharing a code, before our exact step. 0 by default:
    # on ML-100K the rounds moved 16 more items off their nearest code than the exact step alone
    # (50 vs 34) for a worse reconstruction; the LC-Rec comparison in the report runs them regardless.
    reassign_rounds: int = 0
    lr: float = 3e-3                        # AdamW peak; linear warm-up then cosine to 10% at max_epochs
    weight_decay: float = 1e-4
    batch_size: int = 256                   # ~7 steps per epoch on ML-100K (1024 gave 2 and learnt slowly)
    warmup_epochs: int = 10
    # Stopping rule: every `eval_every` epochs the whole catalogue is encoded and recon MSE and collision
    # rate are measured; training stops when neither improved (recon by >= 1% of its best) for
    # `patience` evaluations in a row, or at `max_epochs`. The weights kept are those of the best
    # evaluation by (collision rate, then recon MSE).
    max_epochs: int = 400
    eval_every: int = 25
    patience: int = 4
    grad_clip: float = 1.0
    seed: int = 42


@dataclass
class ModelConfig:
    base: str = "smollm2-135m"     # packaged default, or any HF model id / local folder
    # auto (bf16 where the processor runs it natively: avx512_bf16/AMX or a bf16 GPU; fp32 elsewhere, where
    # bf16 is emulated and 5-300x slower) | fp32 | bf16 | nf4 (bitsandbytes 4-bit; QLoRA when training)
    # int8: int8 weights and dynamic int8 activations in every linear layer (PyTorch's x86 kernels; CPU inference only)
    dtype: Literal["auto", "fp32", "bf16", "int8", "nf4"] = "fp32"
    cache_dir: str = ".cache/models"
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class TrainConfig:
    # a continued adapter (init_adapter, phases) is widened to a larger lora_r / other alpha with the same function
    # at the start (backbone.widen_lora); a smaller rank or other targets are refused
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    new_token_init: Literal["title_mean", "random"] = "title_mean"   # new index-token rows: mean of the titles' embeddings, or random
    # samples per task (seqrec_dense: windows of max_history+1 items, each supervising every item in it)
    task_budget: dict[str, int] = field(default_factory=lambda: {
        "seqrec_dense": 4000, "seqrec": 1000, "item2index": 1000, "index2item": 600, "fusionseqrec": 600,
        "itemsearch": 1000, "preferenceobtain": 300, "chat": 800})
    max_length: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    embedding_lr: float = 1e-3
    epochs: float = 1.0
    max_steps: int = 0             # 0 = derived from epochs
    max_minutes: float = 0.0       # stop (and save) after this wall time; 0 = no limit
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    eval_every: int = 200
    eval_samples: int = 64         # valid-loss samples per task
    save_every: int = 200
    # bf16 autocast of the forward/backward over fp32 weights: auto (only where bf16 is native, see
    # hardware.py; 1.7x fp32's tokens/s on an avx512_bf16 CPU) | bf16 (always) | off
    autocast: Literal["auto", "bf16", "off"] = "off"
    seed: int = 42
    # CoLLM's idea inside LC-Rec (collab_prompt.py): "sasrec" puts the run's SASRec state after each history item
    # into the dense prompt as one token (a trained MLP maps it into the token-embedding space; the baselines
    # stage, which trains SASRec, then runs before this one); "none" = LC-Rec's dense prompt as published
    collab_tokens: Literal["none", "sasrec"] = "none"
    mapper_lr: float = 1e-3
    # with collab_tokens: each code token after a state also gets a learned map of that state added to its input
    # embedding (collab_prompt.py), so the later code levels see it directly instead of through attention
    collab_on_codes: bool = False
    # its own learning rate: Adam moves every weight by about lr per step whatever the gradient's size, and this map
    # is not normalised (at mapper_lr, 1e-3, the additions reached norm 2-2.7 in 70 steps, a token embedding's is
    # ~3.2, and the training loss of a tuned model rose from 3.7 to 4.2 on the same batches)
    on_codes_lr: float = 5e-5
    # with collab_tokens: the state also adds a learned vector per code level to the last hidden state where that
    # level's code is written after it, i.e. a direct map of the state onto the code logits through the tied head
    # (collab_prompt.py, CollabMapper.logit_vectors); zero at the start, so a continued adapter starts where it was
    collab_head: bool = False
    collab_head_lr: float = 1e-3
    # > 0 (with collab_head): the head also has an MLP of this width per level that reads the state and the codes
    # already written, so the state can rank a level's codes differently under each prefix (CollabMapper)
    collab_head_width: int = 0
    # > 0 (needs collab_tokens: sasrec): the run's sequential models teach the code tokens written after each
    # collaborative state, their next-item distribution summed onto each level's codes (distill.py), added to
    # the loss with this weight; distill_teachers = the mixture's weights by model ("sasrec", "gru4rec")
    distill_weight: float = 0.0
    distill_teachers: dict[str, float] = field(default_factory=lambda: {"sasrec": 1.0})
    # sequence-level distillation (needs distill_weight > 0): this share of the items written in dense windows
    # (after each window's first) is replaced by the teacher's own draw, so the student also learns the teacher's
    # code conditionals along paths the users did not take (distill.teacher_paths). On ML-100K, 0.3 over a full
    # 630-step phase lost 3.6% valid NDCG@10 against the same phase without it, while 0.3 with distill_weight 3 in
    # the hold-out control's fifth phase gained on select, valid and test (+3.0% / +1.5% / +5.8%, one seed), and in the
    # eighth release's short seventh phase it moved nothing measurable (valid / test +0.0010 / +0.0015 NDCG@10 against
    # the same recipe rebuilt on one machine, 95% paired intervals ~±0.005; model card); the shipped recipe leaves it 0
    # until a selection reading neither stage flatters confirms it
    teacher_paths: float = 0.0
    # the teacher scores each window item from the state of its prefix on its own (SASRecSource.states_after_each
    # own_prefix), not from its place in one pass over the window, which SASRec (trained on the last places of
    # left-padded windows) reads with position embeddings it never predicted from: on ML-100K's training windows
    # its next-item NDCG@10 from places 0-14 is 0.109 that way against 0.091 (places 15-19 alike). The prompt's
    # states stay the window's (the model's input is unchanged); the phases' and the refit's teacher both change.
    teacher_prefix_states: bool = False
    # each item of every dense window removed with this probability when the phase's samples are built
    # (TaskBuilder.drop_window_items), so the phases do not pass over the very same windows again and again: the
    # LLM learns the users' windows (its loss on them falls far under its teacher's) while test's history ends with
    # an item it never read. It learns nothing from the sequential models, yet a less memorising LLM leans more on
    # the head that reads them, which select flatters a little: data.drop_last's split is the reading nothing flatters.
    # On ML-100K, 0.2 in the hold-out control's fifth phase gave select / valid / test +2.2% / +0.9% / +6.1% (one
    # seed, model card); the shipped recipe leaves it 0
    window_dropout: float = 0.0
    # > 0 (needs collab_head): after the last phase, the collaborative head alone is fitted for this many epochs on
    # the frozen model's features (head_refit.py: one pass of the model over the training windows, then epochs over
    # the cached hidden states), from head_refit_lr (cosine to 0), with the same loss and distill_weight, once per
    # seed of head_refit_seeds (batch orders) from the phases' head; the head kept is their mean
    head_refit_epochs: int = 0
    head_refit_lr: float = 1e-3
    head_refit_seeds: int = 1
    # the run's sequential models (baselines stage: "gru4rec") whose states the refitted head reads beside SASRec's
    # (the prompt's); the distillation teacher mixes GRU4Rec in, and SASRec's state alone cannot say what it adds
    head_refit_sources: list[str] = field(default_factory=list)
    # the refit's own teacher mixture, by model file as distill_teachers ("sasrec_s43": the baselines stage's seed-43
    # SASRec); empty = distill_teachers. Every seed's models mixed are a stronger teacher than the phases' pair, and
    # only the refit reruns when it changes
    head_refit_teachers: dict[str, float] = field(default_factory=dict)
    # the weight of the teacher's term in the refit's loss; 0 = distill_weight. On the training windows the tuned
    # LLM's features predict the codes better than the teacher does (it has read them), so a head fitted there leans
    # on them; a larger teacher term leans it back (model card: weights 1 / 3 / 10)
    head_refit_distill_weight: float = 0.0
    # in a phase of train.phases other than the last: the collaborative head is refitted (the head_refit_* settings)
    # on this phase's adapter before the next phase continues it, so the next phase's LoRA learns beside the
    # refitted head (on ML-100K a 300-step phase after the refit, with its own refit: valid NDCG@10 +5%)
    head_refit_after: bool = False
    # with collab_head and an init adapter whose refitted head reads other models' states (head_refit_sources): the
    # prompt's collaborative tokens read those states too, each mapped with SASRec's by the mapper (a linear map of
    # them added to its first layer, zero at the start), so the LLM reads what its teacher, their mixture, reads
    prompt_reads_head_sources: bool = False
    # a model soup (soup.py): the phase trained once per seed listed (each replacing `seed`, all from the phase's
    # start), each member kept as adapter.<stage>.seed<s>/, and their average is the phase's adapter. Empty = one
    # run with `seed`. On ML-100K two and three seeds of the last phase averaged stayed at the seeds' mean level on
    # valid (model card), so the recipe trains one
    soup_seeds: list[int] = field(default_factory=list)
    # > 0: every LLM training task and the head refit leave out each user's last N training items (Split.held_back;
    # the baselines and the collaborative models still train on them). With 2, the `select` stage (predict the last
    # training item from those before it) asks what test asks, a history that ends with an item the LLM never read
    # and a target it never wrote, so arms are chosen on it rather than on valid, whose history it has memorised
    hold_out_last: int = 0
    # continue from an adapter instead of a fresh LoRA (a run folder's adapter/, same base and index tokens):
    # a second phase on top of a finished run, e.g. adding collaborative tokens to a tuned model
    init_adapter: str = ""
    # later phases of the same run, in order: each continues the adapter (and collaborative mapper) the phase
    # before it ended with, under this section with the entry's keys replaced (not phases or init_adapter);
    # e.g. [{seed: 43, max_steps: 120, distill_weight: 1.0}]. See train_phases and configs/ml-100k-collab.yaml
    phases: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalConfig:
    num_beams: int = 20
    # precision of the evaluated model; "" = model.dtype; auto = bf16 where native, else fp32. bf16 decodes
    # ~1.5x faster than fp32 on CPUs with avx512_bf16/AMX and on GPUs (rankings checked against fp32 in the model
    # card), but several times slower on CPUs without them
    dtype: Literal["", "auto", "fp32", "bf16", "int8", "nf4"] = ""
    cutoffs: list[int] = field(default_factory=lambda: [1, 5, 10])   # K of HR@K / NDCG@K
    batch_size: int = 8
    max_users: int = 0             # 0 = every user
    styles: list[Literal["dense", "chat", "seqrec"]] = field(default_factory=lambda: ["dense", "chat"])  # history prompts to evaluate
    itemsearch: bool = True        # also evaluate held-out intention queries
    template_users: int = 50       # users for the per-template spread of LC-Rec seqrec prompts (0 = skip)
    # Hybrid decoding (decoding.generate_items): each beam step adds w * the log of SASRec's next-item
    # probability mass under the code prefix; w is picked from these on the first `hybrid_users` valid users
    # (test never looked at) and reported as its own row beside pure LC-Rec. Empty list = no hybrid row.
    hybrid_weights: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    hybrid_users: int = 300
    # SASRec and GRU4Rec (RecBole's settings): at most `baseline_epochs`, early stopping after
    # `baseline_patience` epochs without a better valid NDCG@10; one fit per seed, the row is the mean
    baseline_epochs: int = 200
    baseline_patience: int = 10
    baseline_seeds: list[int] = field(default_factory=lambda: [42, 43, 44])
    # targets per training window (baselines.training_windows): 1 = RecBole's every-prefix augmentation;
    # larger trains that many targets per forward pass, that many times cheaper
    baseline_stride: int = 1


@dataclass
class ChatConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    max_message_chars: int = 2000
    max_history_items: int = 20
    max_k: int = 10
    default_k: int = 5
    num_beams: int = 20            # beams per recommendation (>= max_k)
    # prompt for a history without a wish: dense (the history as the answer's start; test NDCG@10 0.057 on
    # ML-100K) or chat (the request prompt; 0.048), models/ml-100k/README.md. A wish always uses the request prompt.
    history_prompt: Literal["dense", "chat"] = "dense"
    # > 0: hybrid decoding in the app, weighting each code step by the run's SASRec (sasrec.pt, written by the
    # baselines stage) as evaluated in the model card's hybrid row; 0 = pure LC-Rec
    prior_weight: float = 0.0
    # the recommender the app starts with (serve --method; the page can switch to any other the run folder has):
    # lcrec | sasrec | cllm4rec | collm (CoLLM re-ranking LC-Rec's candidates)
    method: Literal["lcrec", "sasrec", "cllm4rec", "collm"] = "lcrec"
    queue_size: int = 16
    concurrency: int = 2


@dataclass
class CLLM4RecConfig:
    """CLLM4Rec (Zhu et al., WWW 2024) on the run's backbone: one new token per user and per item; pretraining on
    collaborative documents (a user's token, a few hard words, then the tokens of the items they interacted with)
    and content documents (an item's token, then its text), with the mutual regularisation that pulls each
    user/item's collaborative and content token rows together; then fine-tuning with an item head (softmax over
    all items) that scores the whole catalogue in one forward pass."""
    lora_r: int = 8
    lora_alpha: int = 32
    lr: float = 1.0e-3               # LoRA weights
    token_lr: float = 1.0e-3         # the new user/item token rows (1e-2 diverged on SmolLM2 in a 15-step probe)
    batch_size: int = 16
    window: int = 20                 # items per collaborative document and per fine-tuning history
    pretrain_minutes: float = 10.0   # wall-time budget of the pretraining stage (both document kinds)
    finetune_minutes: float = 12.0   # wall-time budget of the recommendation fine-tuning stage
    reg_weight: float = 1.0          # weight of the mutual regularisation (squared distance of the two rows)
    seed: int = 42


@dataclass
class CoLLMConfig:
    """CoLLM (Zhang et al., 2023): a collaborative model's user and item embeddings, mapped by a small MLP into the
    LLM's token-embedding space at placeholder positions beside the titles; the LLM answers "will this user
    like X?" with Yes/No and the Yes probability is the score. Two stages as in the paper: LoRA on the text-only
    prompt, then the mapping with the LoRA frozen."""
    # sasrec = the baselines stage's sasrec.pt; mf = a matrix factorisation (BPR) fitted here
    collab: Literal["sasrec", "mf"] = "sasrec"
    history: int = 10                # history titles in the prompt (the paper's TALLRec-style prompt uses 10)
    lora_r: int = 8
    lora_alpha: int = 32
    lr: float = 1.0e-3               # stage 1 (LoRA) and stage 2 (mapping)
    batch_size: int = 8
    text_minutes: float = 12.0       # stage 1 wall-time budget
    mapping_minutes: float = 10.0    # stage 2 wall-time budget
    negatives: int = 9               # unseen items sampled per held-out target for AUC / per-user AUC (training: 1)
    rerank_depth: int = 20           # candidates of the base ranker that CoLLM re-ranks for top-K
    # scoring scope (0 = every user, up to eval.max_users): each user costs ~30 candidate passes of the LLM (~5 s
    # on one core: 0.16 s a pass), so a quick look can score the first N users; these never change the trained
    # model. The text-only AUC row (the stage-1 model alone, a reference point) scores the first
    # `text_only_users` test users.
    valid_users: int = 0
    test_users: int = 0
    text_only_users: int = 100
    seed: int = 42


@dataclass
class MethodsConfig:
    """The LLM recommenders trained beside LC-Rec by the `methods` stage (each into run_dir/<name>/)."""
    run: list[Literal["cllm4rec", "collm"]] = field(default_factory=lambda: ["cllm4rec", "collm"])
    cllm4rec: CLLM4RecConfig = field(default_factory=CLLM4RecConfig)
    collm: CoLLMConfig = field(default_factory=CoLLMConfig)


@dataclass
class Config:
    run_dir: str = "runs/ml-100k"
    data: DataConfig = field(default_factory=DataConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one value against a dataclass field's type annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(annotation)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, inner = typing.get_args(annotation)
        return {str(k): _coerce(v, inner, f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, str):   # YAML 1.1 reads "5e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):   # YAML's .inf / .nan
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        if annotation is int and float(value) != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return annotation(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _apply(obj: Any, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{where}{key}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}{key}' is a section; expected a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}{key}"))


def _into_mapping(cfg: Config, keys: list[str], value: Any) -> tuple[list[str], Any]:
    """`--set train.task_budget.chat=0`: a path that goes on inside a mapping field sets that entry, the field's
    other entries kept -> (the field's path, the whole mapping). Any other path is returned as it is."""
    obj: Any = cfg
    for i, k in enumerate(keys[:-1]):
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, k):
            break
        obj = getattr(obj, k)
        if isinstance(obj, dict):
            for inner in reversed(keys[i + 2:]):
                value = {inner: value}
            return keys[:i + 1], {**obj, keys[i + 1]: value}
    return keys, value


def train_phases(cfg: Config) -> list[TrainConfig]:
    """The train section of each phase of the run in order: `cfg.train` itself first (without `phases`), then one
    per `train.phases` entry. A run without phases gives [cfg.train]. Raises ConfigError on a bad entry."""
    first = dataclasses.replace(cfg.train, phases=[])
    out = [first]
    for i, entry in enumerate(cfg.train.phases):
        where = f"train.phases[{i}]."
        if not isinstance(entry, dict):
            raise ConfigError(f"{where[:-1]}: expected a mapping of train keys, got {entry!r}")
        for key in ("phases", "init_adapter"):
            if key in entry:
                raise ConfigError(f"'{where}{key}' cannot be set: a phase continues the adapter of the phase "
                                  "before it")
        phase = dataclasses.replace(first, init_adapter="")   # _apply sets whole values: `first` is never mutated
        _apply(phase, entry, where)
        out.append(phase)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({e.problem or e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            _apply(cfg, values, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    for text in overrides or []:
        keys, value = _into_mapping(cfg, *parse_override(text))
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "")
    train_phases(cfg)        # a bad phase entry fails here, before any stage runs
    return cfg
