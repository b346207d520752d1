"""The CPU training speed-ups (cpu_training.py) on a real tiny PEFT model: they change how a step is computed, not
what it computes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from lcrec_chat.backbone import load_model, lora_config
from lcrec_chat.config import ModelConfig, TrainConfig
from lcrec_chat.cpu_training import FastDropout, MaskSource, fast_lora_dropout, speed_up_cpu_training

CACHE = str(Path(__file__).resolve().parents[1] / ".cache" / "models")


def tiny_lora(dropout: float = 0.05):
    torch.manual_seed(0)
    model = load_model(ModelConfig(base="tiny-llama", cache_dir=CACHE, device="cpu"), for_training=True)
    return get_peft_model(model, lora_config(TrainConfig(lora_dropout=dropout), []))


def test_every_lora_dropout_is_swapped_and_drops_at_its_rate():
    model = tiny_lora()
    before = sum(isinstance(m, torch.nn.Dropout) for n, m in model.named_modules() if "lora_dropout" in n)
    source = fast_lora_dropout(model, seed=1)
    fast = [m for n, m in model.named_modules() if isinstance(m, FastDropout)]
    assert source is not None and before > 0 and len(fast) == before
    assert not any(isinstance(m, torch.nn.Dropout) for n, m in model.named_modules() if "lora_dropout" in n)
    x = torch.ones(1000, 1000)
    dropped = fast[0](x)
    assert abs(float((dropped == 0).float().mean()) - 0.05) < 0.002       # 1e6 draws: sd of the rate ~2e-4
    assert float(dropped.mean()) == pytest.approx(1.0, abs=0.003)          # kept values scaled by 1 / keep
    assert torch.unique(dropped).tolist() == [0.0, pytest.approx(65536 / (65536 - 3277))]
    model.eval()
    assert torch.equal(fast[0](x), x)                                      # identity outside training


def test_no_dropout_leaves_the_model_alone():
    model = tiny_lora(dropout=0.0)
    assert fast_lora_dropout(model, seed=1) is None
    assert not any(isinstance(m, FastDropout) for m in model.modules())


def test_mask_source_state_restores_the_same_draws():
    source = MaskSource(7)
    source.keep_mask(torch.Size([5, 3]), 0.1)
    state = source.state()
    first = source.keep_mask(torch.Size([40, 30]), 0.1)
    source.set_state(state)
    assert torch.equal(source.keep_mask(torch.Size([40, 30]), 0.1), first)
    assert not torch.equal(MaskSource(8).keep_mask(torch.Size([40, 30]), 0.1), first)


def test_matmul_attention_computes_what_sdpa_does():
    """The same logits and the same LoRA gradients (the speed-up is in the backward) as SDPA, up to rounding."""
    model = tiny_lora(dropout=0.0)
    assert model.config._attn_implementation == "sdpa"                      # what a loaded model starts with
    ids = torch.randint(0, 1000, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                                          # left padding, as decoding batches

    def logits_and_grads():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[0].sum().backward()                                           # through every layer's attention
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    sdpa, sdpa_grads = logits_and_grads()
    speed_up_cpu_training(model, seed=0)
    assert model.config._attn_implementation == "eager"
    eager, eager_grads = logits_and_grads()
    torch.testing.assert_close(eager[0], sdpa[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eager[1, 5:], sdpa[1, 5:], rtol=1e-4, atol=1e-4)
    assert sdpa_grads.keys() == eager_grads.keys() and any(g.abs().sum() > 0 for g in sdpa_grads.values())
    for name in sdpa_grads:
        torch.testing.assert_close(eager_grads[name], sdpa_grads[name], rtol=1e-3, atol=1e-5)


def test_dropout_of_one_drops_everything():
    source = MaskSource(0)
    assert torch.equal(FastDropout(1.0, source).train()(torch.ones(3, 4)), torch.zeros(3, 4))
