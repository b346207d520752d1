"""Two speed-ups of a LoRA training step on a CPU that change how it is computed, not what it computes.

A torch.profiler reading of two dense-window steps (SmolLM2-135M, LoRA rank 32 on the seven projections, bf16
autocast, 2 cores of the Intel AMX machine) put about a quarter of the time in drawing LoRA dropout's masks (torch's
CPU `bernoulli_` draws every element from mt19937: ~8 ms for one [8, 144, 576] input, 210 of them a forward) and a
sixth in the backward of SDPA's CPU flash attention (~37 ms a layer for 8 windows of 144 tokens).

- :func:`fast_lora_dropout`: LoRA dropout's masks come from NumPy's PCG64, several times faster per element. The same
  distribution (keep probability rounded to 1/65536: 0.05 -> 0.0500031), other draws than torch's generator; the
  generator's state goes into the training checkpoint, so a resumed one-process run draws what an unbroken one
  would (under torchrun each rank starts afresh from its own seed on a resume, as torch's generator did).
- :data:`TRAINING_ATTENTION`: attention as plain matmuls and a softmax (transformers' "eager"), the same function
  as SDPA up to rounding, faster to differentiate at these lengths.

`bench/train_step_speed.py` measures them. A bf16 copy of the frozen weights, measured once with an earlier form of
that bench, gained nothing (7.65 s a step against 7.63 s, the same losses: autocast's casts of them are not where the
time goes) and is not here. Only the CPU path uses these speed-ups; on a GPU the step is left as it is.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)
TRAINING_ATTENTION = "eager"   # on a CPU; bench/train_step_speed.py: -11% a step against "sdpa"


class MaskSource:
    """One PCG64 generator for every dropout mask of a model, seeded from the run's seed; its state is saved and
    restored with the training checkpoint."""

    def __init__(self, seed: int):
        self.generator = np.random.Generator(np.random.PCG64(seed))

    def keep_mask(self, shape: torch.Size, p: float) -> torch.Tensor:
        """float32 mask: 0 where dropped, 1 / keep elsewhere (keep = 1 - p rounded to 1/65536)."""
        threshold = round(p * 65536)
        if threshold >= 65536:   # p = 1 (or within 1/131072 of it): everything dropped, as nn.Dropout(1) does
            return torch.zeros(shape)
        draws = self.generator.integers(0, 65536, size=int(np.prod(shape)), dtype=np.uint16)
        scale = np.float32(65536 / (65536 - threshold))
        mask = np.where(draws >= threshold, scale, np.float32(0))
        return torch.from_numpy(mask).view(shape)

    def state(self) -> dict:
        return self.generator.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.generator.bit_generator.state = state


class FastDropout(torch.nn.Module):
    """nn.Dropout with masks from a :class:`MaskSource` (identity in eval mode and at p = 0)."""

    def __init__(self, p: float, source: MaskSource):
        super().__init__()
        self.p, self.source = p, source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * self.source.keep_mask(x.shape, self.p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, masks from NumPy's PCG64"


def fast_lora_dropout(model: torch.nn.Module, seed: int) -> MaskSource | None:
    """Swap every LoRA dropout of a PEFT model (nn.Dropout inside a `lora_dropout` ModuleDict) for a FastDropout
    drawing from one new MaskSource; returns it (None when the model has no LoRA dropout above 0)."""
    source = MaskSource(seed)
    swapped = 0
    for name, module in model.named_modules():
        if not name.endswith("lora_dropout") or not isinstance(module, torch.nn.ModuleDict):
            continue
        for key, dropout in list(module.items()):
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                module[key] = FastDropout(dropout.p, source)
                swapped += 1
    return source if swapped else None


def speed_up_cpu_training(model: torch.nn.Module, seed: int) -> MaskSource | None:
    """Both speed-ups on a PEFT model about to be tuned on a CPU; returns the dropout's MaskSource (or None)."""
    model.set_attn_implementation(TRAINING_ATTENTION)
    source = fast_lora_dropout(model, seed)
    log.info("CPU training: %s attention, LoRA dropout masks from %s", TRAINING_ATTENTION,
             "NumPy's PCG64" if source else "nowhere (no dropout)")
    return source
