"""A small Llama for CPU serving: the whole forward pass readable in one sitting, without importing transformers'
modelling code (6 s of the app's start-up on a 2-core CPU, and its per-layer Python on every decode step).

Only what serving needs: a llama-type folder (config.json + safetensors, plain RoPE, no attention/MLP biases),
inference, a key/value cache written in place. The module names are those of transformers' LlamaForCausalLM
(`model.layers.3.self_attn.q_proj`, `lm_head`, ...), so the same weight files load, `backbone.merge_adapter`
folds an adapter into it and `backbone.quantize_int8` swaps its linear layers for int8 ones unchanged. The call
signature is the subset of transformers' that `decoding.py` uses; tests/test_llama.py checks the logits and the
generated items against transformers' model.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedModel(ValueError):
    """A model folder this small implementation does not cover (the caller falls back to transformers)."""


@dataclass
class LlamaSettings:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict) -> "LlamaSettings":
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if config.get("model_type") != "llama" or rope.get("rope_type", "default") != "default" \
                or config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"not a plain Llama: model_type={config.get('model_type')}, rope={rope}")
        heads = config["num_attention_heads"]
        return cls(config["vocab_size"], config["hidden_size"], config["intermediate_size"],
                   config["num_hidden_layers"], heads, config.get("num_key_value_heads", heads),
                   config.get("head_dim") or config["hidden_size"] // heads, config["rms_norm_eps"],
                   float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                   config.get("tie_word_embeddings", False))


class KVLayer:
    """One layer's keys and values, [batch, kv_heads, max_length, head_dim], written in place (`preallocated`)
    or grown by concatenation; `length` positions are filled."""

    def __init__(self, max_length: int | None = None):
        self.max_length, self.length = max_length, 0
        self.keys = self.values = None
        self.batch_size = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = keys.shape[2]
        if self.max_length is None:
            self.keys = keys if self.keys is None else torch.cat([self.keys, keys], 2)
            self.values = values if self.values is None else torch.cat([self.values, values], 2)
        else:
            if self.keys is None:
                shape = (keys.shape[0], keys.shape[1], self.max_length, keys.shape[3])
                self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)
            self.keys[:, :, self.length:self.length + n] = keys
            self.values[:, :, self.length:self.length + n] = values
        self.length += n
        self.batch_size = self.keys.shape[0]
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]


class KVCache:
    def __init__(self, num_layers: int, max_length: int | None = None):
        self.layers = [KVLayer(max_length) for _ in range(num_layers)]

    def get_seq_length(self) -> int:
        return self.layers[0].length

    def reorder_cache(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            layer.batch_size = layer.keys.shape[0]


@dataclass
class Output:
    logits: torch.Tensor
    past_key_values: KVCache


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, s.num_attention_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_attention_heads * s.head_dim, s.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVLayer):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(self, x, cos, sin, mask, cache: KVLayer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class SlimLlama(nn.Module):
    """Llama inference. `forward` takes what decoding.py passes transformers' model and returns `Output`."""

    def __init__(self, settings: LlamaSettings):
        super().__init__()
        self.settings = settings
        self.model = Decoder(settings)
        self.lm_head = nn.Linear(settings.hidden_size, settings.vocab_size, bias=False)
        if settings.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = 1.0 / settings.rope_theta ** (torch.arange(0, settings.head_dim, 2).float() / settings.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:   # transformers' name for the head, which callers use
        return self.lm_head

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.model.embed_tokens = module

    def resize_token_embeddings(self, rows: int, **_: object) -> None:
        """Grow the vocabulary to `rows` (new rows zero: an adapter's trained rows replace them)."""
        old = self.model.embed_tokens.weight
        grown = nn.Embedding(rows, old.shape[1])
        with torch.no_grad():
            grown.weight.zero_()
            grown.weight[:old.shape[0]] = old
        self.model.embed_tokens = grown
        self.lm_head = nn.Linear(old.shape[1], rows, bias=False)
        self.lm_head.weight = grown.weight if self.settings.tie_word_embeddings else self.lm_head.weight
        self.settings.vocab_size = rows

    def new_cache(self, max_length: int | None = None) -> KVCache:
        return KVCache(self.settings.num_hidden_layers, max_length)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool = True, logits_to_keep: int = 0,
                **_: object) -> Output:
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x.shape[:2]
        if attention_mask is not None:
            # padding rows enter as zeros and stay zero through every layer (RMSNorm, bias-free projections and
            # attention to themselves keep a zero row zero), so they never move the one activation scale per call
            # of int8 layers; in fp32 they were already invisible to real rows
            x = x * attention_mask[:, -n:, None].to(x.dtype)
        cache = past_key_values if past_key_values is not None else self.new_cache()
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=x.device).expand(b, n)
        freqs = position_ids[:, :, None].float() * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]               # [b, 1, n, head_dim]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        # query i (absolute position past + i) sees the real keys up to itself, and always itself, so a left-pad
        # row never attends to nothing (NaN); its output is never read
        key_pos = torch.arange(past + n, device=x.device)
        query_pos = torch.arange(past, past + n, device=x.device)[:, None]
        mask = key_pos <= query_pos
        if attention_mask is not None:
            mask = (mask & attention_mask[:, None, None, :past + n].bool()) | (key_pos == query_pos)
        else:
            mask = mask[None, None]
        for layer, kv in zip(self.model.layers, cache.layers):
            x = layer(x, cos, sin, mask, kv)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return Output(self.lm_head(x), cache)


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Modules built inside allocate their tensors without initialising them (torch.nn.init's fills do nothing)."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)


def load_llama(folder: str | Path) -> SlimLlama:
    """The fp32 model of a llama folder, read into ordinary memory (no file mapping stays behind: see
    backbone.load_in_memory). Raises UnsupportedModel for other architectures."""
    import safetensors.torch
    folder = Path(folder)
    settings = LlamaSettings.from_config(json.loads((folder / "config.json").read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{folder}: no .safetensors weights")
    with _skip_init():   # the weights are read next; not the meta device, whose first use imports for ~2 s
        model = SlimLlama(settings)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(safetensors.torch.load(file.read_bytes()))
    if settings.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (settings.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModel(f"{folder}: weights do not fit a plain Llama (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    if settings.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = 1.0 / settings.rope_theta ** (torch.arange(0, settings.head_dim, 2).float() / settings.head_dim)
    return model.eval()
