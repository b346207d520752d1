"""Base model provisioning, 4-bit loading and its CPU gradient trap, index tokens and their adapter.

Everything runs on ``tiny-llama`` (the real SmolLM2 tokenizer + a 2-layer random Llama), cached in the
project's model cache so only the very first run pays ~10 s to read the tokenizer out of the GGUF.
"""
from __future__ import annotations

import dataclasses

import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lcrec_chat.backbone import (BackboneError, Int8HeadExactRows, add_index_tokens, build_once, describe,
                                 dynamic_linear, guard_4bit_cpu, load_finetuned, load_in_memory, load_model,
                                 load_tokenizer, lora_config, merge_adapter, resolve_model_path, save_adapter,
                                 widen_lora)
from lcrec_chat.config import ModelConfig, TrainConfig

CACHE = str(Path(__file__).resolve().parents[1] / ".cache" / "models")
CODES = ["<a_12>", "<a_3>", "<b_3>", "<b_40>", "<c_7>"]


def tiny(dtype: str = "fp32") -> ModelConfig:
    return ModelConfig(base="tiny-llama", dtype=dtype, cache_dir=CACHE, device="cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny())


def cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# ------------------------------------------------------------------ provisioning

def test_tiny_llama_is_a_cached_hf_folder_with_the_real_tokenizer(tokenizer):
    folder = Path(resolve_model_path("tiny-llama", CACHE))
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert resolve_model_path("tiny-llama", CACHE) == str(folder)  # built once, then reused
    assert not list(Path(CACHE).glob(".tiny-llama*.tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(folder)  # a plain HF folder
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat  # SmolLM2's ChatML template came along


def test_build_once_leaves_nothing_when_interrupted(tmp_path):
    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")  # half written ...
        raise KeyboardInterrupt                 # ... then interrupted

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "model", crash)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    calls = []
    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    assert (build_once(tmp_path / "model", build) / "config.json").is_file()
    build_once(tmp_path / "model", build)
    assert len(calls) == 1


def test_model_specs_that_are_not_models_fail_clearly(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        resolve_model_path("./no/such/folder", CACHE)
    with pytest.raises(BackboneError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "x.gguf"), CACHE)
    with pytest.raises(BackboneError, match="config.json"):
        resolve_model_path(str(tmp_path), CACHE)
    assert resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct", CACHE) == "Qwen/Qwen2.5-1.5B-Instruct"
    with pytest.raises(BackboneError, match="model.dtype"):
        load_model(ModelConfig(base="tiny-llama", dtype="fp8", cache_dir=CACHE, device="cpu"))
    with pytest.raises(BackboneError, match="model.device"):
        load_model(ModelConfig(base="tiny-llama", cache_dir=CACHE, device="tpu"))


def test_loads_in_fp32_bf16_and_nf4():
    stats = {dtype: describe(load_model(tiny(dtype))) for dtype in ("fp32", "bf16", "nf4")}
    assert stats["fp32"]["dtypes"] == {"float32": stats["fp32"]["params"]}
    assert stats["bf16"]["dtypes"] == {"bfloat16": stats["fp32"]["params"]}
    assert stats["bf16"]["weight_bytes"] == stats["fp32"]["weight_bytes"] // 2
    nf4 = stats["nf4"]
    assert nf4["linear4bit"] == 2 * 7 and nf4["params"] == stats["fp32"]["params"]
    assert nf4["dtypes"]["nf4"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # q,o + k,v + mlp
    assert nf4["weight_bytes"] < stats["fp32"]["weight_bytes"]


# ------------------------------------------------------------------ the bitsandbytes CPU gradient trap

def layer0_grads(tokenizer, guard: bool = True, generate: bool = True, random_b: bool = False) -> dict:
    """Optionally generate() with a 4-bit LoRA model, then one training forward/backward: layer-0 gradients."""
    model = load_model(tiny("nf4"), for_training=True)
    if not guard:  # undo what load_model did
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(TrainConfig(lora_dropout=0.0), []))
    if random_b:  # LoRA starts with B = 0, which zeroes A's gradient; make both visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    batch = tokenizer(["Toy Story, Heat and Casino"], return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unguarded run warns "an autograd kernel was not registered"
        if generate:
            model.eval()
            model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if "layers.0." in n and p.requires_grad and p.grad is not None}


def test_guarded_4bit_model_keeps_exact_layer0_gradients_after_generate(tokenizer):
    grads = layer0_grads(tokenizer, random_b=True)
    for proj in ("q_proj", "v_proj", "gate_proj"):  # reached only through 4-bit o_proj / down_proj
        for part in ("lora_A", "lora_B"):
            (grad,) = [g for n, g in grads.items() if f"{proj}.{part}" in n]
            assert grad.abs().sum() > 0, f"no gradient reached layer 0 {proj}.{part}"
    reference = layer0_grads(tokenizer, generate=False, random_b=True)  # a model that never generated
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name])


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the trap needs a CPU with avx512_bf16")
def test_unguarded_4bit_model_loses_layer0_gradients_and_guard_repairs_it(tokenizer):
    guarded, unguarded = layer0_grads(tokenizer), layer0_grads(tokenizer, guard=False)
    for proj in ("q_proj", "v_proj"):
        (name,) = [n for n in guarded if f"{proj}.lora_B" in n]
        assert guarded[name].abs().sum() > 0
        assert unguarded[name].abs().sum() == 0  # the trap, reproduced: nothing reaches layer 0

    # guard_4bit_cpu also converts weights that were already repacked back to the trainable layout
    model = load_model(tiny("nf4"))
    batch = tokenizer(["Heat"], return_tensors="pt")
    with torch.no_grad():
        reference = model(**batch).logits
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(**batch)  # repacks every 4-bit weight
    assert guard_4bit_cpu(model) == 14
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits.sum().backward()
    assert embeds.grad.abs().sum() > 0
    # the repacking rounded the block scales to bf16, so the repaired weights are close, not identical
    scale = reference.abs().max().item()
    torch.testing.assert_close(logits.detach(), reference, rtol=0, atol=0.02 * scale)


# ------------------------------------------------------------------ index tokens

def test_index_tokens_stay_single_tokens_and_decode_as_text():
    model = load_model(tiny())
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama", CACHE))
    ids = add_index_tokens(model, tok, CODES)
    assert ids == list(range(49152, 49152 + len(CODES)))
    assert tok.encode("<a_12><b_3>", add_special_tokens=False) == [ids[0], ids[2]]
    text = "Try <a_3><b_40><c_7> next."
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == text
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the resize
    assert add_index_tokens(model, tok, CODES[:2] + ["<d_1>"]) == ids[:2] + [ids[-1] + 1]  # idempotent
    with pytest.raises(ValueError, match="whitespace"):
        add_index_tokens(model, tok, ["<a 1>"])


def test_title_mean_init_is_the_mean_of_the_titles_embeddings():
    model = load_model(tiny())
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama", CACHE))
    old = model.get_input_embeddings().weight.detach().clone()
    titles = {"<a_12>": ["Toy Story", "Heat (1995)"], "<b_3>": ["Casino"]}
    ids = add_index_tokens(model, tok, CODES, init="title_mean", init_texts=titles)
    weight = model.get_input_embeddings().weight.detach()

    def mean_of(text: str) -> torch.Tensor:
        return old[tok.encode(text, add_special_tokens=False)].mean(0)

    torch.testing.assert_close(weight[ids[0]], (mean_of("Toy Story") + mean_of("Heat (1995)")) / 2)
    torch.testing.assert_close(weight[ids[2]], mean_of("Casino"))
    fallback = weight[[ids[1], ids[3], ids[4]]]  # no titles: near the mean row, but distinct
    assert torch.allclose(fallback.mean(0), old.mean(0), atol=3 * old.std(0).max().item())
    assert torch.linalg.matrix_rank(fallback - fallback.mean(0)) == 2
    torch.testing.assert_close(weight[:49152], old)
    torch.testing.assert_close(model.get_output_embeddings().weight[ids[2]].detach(), mean_of("Casino"))


def train_one_step(model, tokenizer, ids: list[int]):
    peft_model = get_peft_model(model, lora_config(TrainConfig(lora_dropout=0.0), ids, model=model))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["liked <a_12><b_3><c_7>, then <a_3><b_40><c_7>"], return_tensors="pt")
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    peft_model.eval()
    return peft_model, batch


def test_new_token_rows_train_in_the_adapter_and_reload_with_plain_peft(tmp_path):
    model = load_model(tiny(), for_training=True)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama", CACHE))
    ids = add_index_tokens(model, tok, CODES, init_texts={"<a_12>": ["Toy Story"]})
    before = model.get_input_embeddings().weight.detach().clone()
    peft_model, batch = train_one_step(model, tok, ids)
    with torch.no_grad():
        trained = peft_model(**batch).logits

    save_adapter(peft_model, tok, tmp_path / "fp32", lora_dtype=None)
    save_adapter(peft_model, tok, tmp_path / "adapter")   # the default: LoRA factors stored in bf16
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 200_000  # LoRA + 5 rows, not the 12.6 MB embedding matrix
    stored, full = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), \
        load_file(tmp_path / "fp32" / "adapter_model.safetensors")
    lora = [k for k in stored if ".lora_A." in k or ".lora_B." in k]
    assert lora and {stored[k].dtype for k in lora} == {torch.bfloat16} and {full[k].dtype for k in lora} == {torch.float32}
    rows = [k for k in stored if k.endswith("trainable_tokens_delta")]
    assert rows and all(stored[k].dtype == torch.float32 and torch.equal(stored[k], full[k]) for k in rows)
    assert all(torch.equal(stored[k], full[k].bfloat16()) for k in lora)   # rounded, nothing else
    lora_bytes = sum(full[k].numel() * 4 for k in lora)
    assert size <= (tmp_path / "fp32" / "adapter_model.safetensors").stat().st_size - lora_bytes // 2 + 4096
    with torch.no_grad():   # the model the file holds: the trained one with its factors rounded to bf16
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(param.bfloat16().float())
        logits = peft_model(**batch).logits
    assert not torch.equal(logits, trained)   # the rounding is real ...
    torch.testing.assert_close(logits, trained, rtol=0, atol=1e-3 * trained.abs().max().item())   # ... and small
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-llama", CACHE))
    base.resize_token_embeddings(len(tok))  # plain transformers/peft, random new rows
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=0)
    model2, tok2 = load_finetuned(tiny(), tmp_path / "adapter")
    assert tok2.convert_tokens_to_ids(CODES) == ids
    with torch.no_grad():
        torch.testing.assert_close(model2(**batch).logits, logits, rtol=0, atol=0)
    folded, _ = load_finetuned(tiny(), tmp_path / "adapter", merge=True)   # what inference serves
    assert not isinstance(folded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(folded(**batch).logits, logits)
    # the served path merges without PEFT: the same weights, bit for bit
    plain = load_in_memory(resolve_model_path("tiny-llama", CACHE))
    plain.resize_token_embeddings(len(tok), mean_resizing=False)
    plain_state, peft_state = merge_adapter(plain, tmp_path / "adapter").state_dict(), folded.state_dict()
    assert set(plain_state) == set(peft_state)
    assert all(torch.equal(plain_state[k], peft_state[k]) for k in peft_state)

    int8, _ = load_finetuned(dataclasses.replace(tiny(), dtype="int8"), tmp_path / "adapter")  # what a CPU serves
    assert [n for n, m in int8.named_modules() if type(m) is torch.nn.Linear] == \
        [f"model.layers.{i}.mlp.down_proj" for i in range(2)]   # fp32: its input has outlier channels
    quantized = {name: m._packed_params.dtype for name, m in int8.named_modules()
                 if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}
    assert len(quantized) == 2 * 6 + 1 and set(quantized.values()) == {torch.qint8}   # the rest, and the head
    # ... whose rows of the index tokens the adapter added stay fp32: the codes' logits are exact in the hidden state
    head = int8.get_output_embeddings() if hasattr(int8, "get_output_embeddings") else int8.lm_head
    assert ids == list(range(len(tok) - len(CODES), len(tok)))   # the added rows are the last ones
    assert isinstance(head, Int8HeadExactRows) and head.exact.shape[0] == len(CODES)
    torch.testing.assert_close(head.exact, folded.get_output_embeddings().weight[ids].float(), rtol=0, atol=0)
    hidden = torch.randn(3, head.in_features)
    with torch.no_grad():
        out = head(hidden)
    assert out.shape == (3, len(tok))
    torch.testing.assert_close(out[:, ids], hidden @ head.exact.T, rtol=0, atol=0)
    full = hidden @ folded.get_output_embeddings().weight.T
    assert 0 < (out[:, :ids[0]] - full[:, :ids[0]]).abs().max() < 0.05 * full.abs().max()   # the rest: int8
    with torch.no_grad():
        approx = int8(**batch).logits
    # int8 rounding moves the logits a little, never the ranking of clearly separated tokens
    assert (approx - logits).abs().max() < 0.05 * logits.abs().max()
    shared = set(approx[0, -1].topk(5).indices.tolist()) & set(logits[0, -1].topk(5).indices.tolist())
    assert len(shared) >= 3   # the random tiny model's logits are close together; order inside the top 5 may swap
    with pytest.raises(BackboneError, match="int8 is for CPU inference"):
        load_finetuned(dataclasses.replace(tiny(), dtype="int8"), tmp_path / "adapter", for_training=True)

    merged = peft_model.merge_and_unload()
    after_in, after_out = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert not torch.isclose(after_in[ids], before[ids]).all(dim=1).any(), "a new row did not train"
    torch.testing.assert_close(after_in[:49152], before[:49152], rtol=0, atol=0)
    torch.testing.assert_close(after_out, after_in)  # the tied head learned the same rows ...
    with torch.no_grad():  # ... and the adapter's forward already used them in the head
        torch.testing.assert_close(merged(**batch).logits, logits)


def test_a_continued_adapter_widens_to_the_configured_rank_with_the_same_function(tmp_path):
    model = load_model(tiny(), for_training=True)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama", CACHE))
    ids = add_index_tokens(model, tok, CODES)
    narrow = get_peft_model(model, lora_config(TrainConfig(lora_r=2, lora_alpha=8, lora_dropout=0.0), ids, model))
    with torch.no_grad():   # a trained adapter: B is not zero
        for name, p in narrow.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    save_adapter(narrow, tok, tmp_path / "narrow")
    batch = tok(["liked <a_12><b_3><c_7>, then <a_3><b_40><c_7>"], return_tensors="pt")

    loaded, _ = load_finetuned(tiny(), tmp_path / "narrow", for_training=True)
    with torch.no_grad():
        before = loaded(**batch).logits
    narrow_params = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    wide_cfg = TrainConfig(lora_r=6, lora_alpha=12, lora_dropout=0.0)
    wide = widen_lora(loaded, wide_cfg)
    with torch.no_grad():
        torch.testing.assert_close(wide(**batch).logits, before)   # B's new columns are zero, the old ones rescaled
    trainable = {n: p for n, p in wide.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) > narrow_params
    q_down = next(p for n, p in trainable.items() if "layers.0.self_attn.q_proj.lora_A" in n)
    assert q_down.shape[0] == 6 and q_down[2:].abs().sum() > 0   # the added rows are initialised, not zero
    wide(**batch, labels=batch["input_ids"]).loss.backward()
    assert q_down.grad is not None and q_down.grad.abs().sum() > 0

    save_adapter(wide, tok, tmp_path / "wide")   # saved at the new rank; the served merge reads it
    plain = load_in_memory(resolve_model_path("tiny-llama", CACHE))
    plain.resize_token_embeddings(len(tok), mean_resizing=False)
    merged = merge_adapter(plain, tmp_path / "wide").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, before)

    same, _ = load_finetuned(tiny(), tmp_path / "narrow", for_training=True)
    assert widen_lora(same, TrainConfig(lora_r=2, lora_alpha=8)) is same   # the saved rank: nothing to do
    with pytest.raises(BackboneError, match="can only be widened"):
        widen_lora(same, TrainConfig(lora_r=1, lora_alpha=8))
    with pytest.raises(BackboneError, match="lora_targets"):
        widen_lora(same, TrainConfig(lora_r=4, lora_alpha=8, lora_targets=["q_proj"]))


def test_dynamic_linear_matches_torch_quantize_dynamic():
    from torch.ao.quantization import per_channel_dynamic_qconfig
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    reference = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {"0": per_channel_dynamic_qconfig},
                                                       dtype=torch.qint8)[0]
    ours = dynamic_linear(linear)
    assert (ours.in_features, ours.out_features) == (48, 40)
    x = torch.randn(7, 48) * 3
    assert torch.equal(ours(x), reference(x))
    assert not torch.equal(ours(x), linear(x))   # it is quantized


def test_untied_head_gets_its_new_rows_trained_too():
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama", CACHE))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = add_index_tokens(model, tok, CODES)
    assert lora_config(TrainConfig(), ids, model=model).trainable_token_indices == \
        {"embed_tokens": ids, "lm_head": ids}
    head_before = model.lm_head.weight.detach().clone()
    peft_model, _ = train_one_step(model, tok, ids)
    head_after = peft_model.merge_and_unload().lm_head.weight
    assert not torch.isclose(head_after[ids], head_before[ids]).all(dim=1).any()
    torch.testing.assert_close(head_after[:49152], head_before[:49152], rtol=0, atol=0)


def test_smoothing_keeps_the_fp32_function_and_brings_int8_closer_to_it(tmp_path):
    """SmoothQuant's per-channel factors (smoothing.py): the fp32 logits stay the same, the int8 ones move less
    when a norm has outlier channels, and the stored scales are applied only to the adapter they were measured on."""
    import copy

    from lcrec_chat.backbone import quantize_int8
    from lcrec_chat.smoothing import (SMOOTHING_FILE, apply_smoothing, load_smoothing, record_input_maxima,
                                      save_smoothing, smoothing_scales)
    model = load_in_memory(resolve_model_path("tiny-llama", CACHE))
    with torch.no_grad():   # outlier channels, as trained Llamas have after their norms
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= 40
            layer.post_attention_layernorm.weight[5] *= 40
    ids = torch.tensor([[1, 520, 3312, 90, 17, 4096, 77, 2048, 5, 610, 11, 300]])
    with torch.no_grad(), record_input_maxima(model) as maxima:
        reference = model(input_ids=ids).logits
    assert sorted(maxima) == sorted(f"model.layers.{i}.{n}" for i in range(2)
                                    for n in ("input_layernorm", "post_attention_layernorm"))
    scales = smoothing_scales(model, maxima)
    smoothed = copy.deepcopy(model)
    apply_smoothing(smoothed, scales)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-4)
        plain_error = (quantize_int8(copy.deepcopy(model))(input_ids=ids).logits - reference).abs().mean()
        smoothed_error = (quantize_int8(smoothed)(input_ids=ids).logits - reference).abs().mean()
    assert smoothed_error < 0.7 * plain_error

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights one")
    save_smoothing(adapter, scales)
    loaded = load_smoothing(adapter)
    assert loaded is not None and all(torch.equal(loaded[k], scales[k]) for k in scales)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights two")   # retrained: the scales are stale
    assert load_smoothing(adapter) is None
    (adapter / SMOOTHING_FILE).write_bytes(b"not a torch file")
    assert load_smoothing(adapter) is None                                # unreadable: ignored, never fatal
    with pytest.raises(ValueError, match="lacks"):
        apply_smoothing(model, {"model.layers.9.input_layernorm": scales["model.layers.0.input_layernorm"]})
