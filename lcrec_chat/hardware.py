"""What the processor does natively, so precision follows the machine instead of a preset's guess.

On CPUs without avx512_bf16 or AMX, bf16 matmuls are emulated and run at about a fifth of fp32's speed
(measured on this project's machines); with either, bf16 is faster than fp32. On CUDA, bf16 is native from
Ampere on. "auto" in the config resolves through :func:`resolve_dtype`.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _first_cpu() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(_first_cpu().get("flags", "").split())


def cpu_model() -> str:
    return _first_cpu().get("model name") or platform.processor() or platform.machine()


def native_bf16(device: str = "cpu") -> bool:
    """True where bf16 matmuls run in hardware: avx512_bf16 or AMX on a CPU, bf16 support on a GPU."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, device: str = "cpu") -> str:
    """"auto" -> "bf16" where it is native, else "fp32"; any other value is returned as it is."""
    if requested != "auto":
        return requested
    picked = "bf16" if native_bf16(device) else "fp32"
    log.info("precision auto -> %s (%s)", picked, describe(device))
    return picked


def describe(device: str = "cpu") -> str:
    """One line naming the processor and its bf16 support, for logs and benchmark tables."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (bf16 {'native' if native_bf16(device) else 'emulated'})"
    flags = cpu_flags()
    kind = "avx512_bf16" if "avx512_bf16" in flags else "AMX" if "amx_bf16" in flags else \
        "AVX-512 without bf16" if "avx512f" in flags else "AVX2 without AVX-512" if "avx2" in flags else "no AVX2"
    return f"{cpu_model()}, {kind}, {torch.get_num_threads()} threads"


def machine_record() -> dict:
    """The facts a benchmark's JSON should carry about where it ran."""
    return {"cpu": cpu_model(), "native_bf16": native_bf16(), "avx512": "avx512f" in cpu_flags(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "summary": describe()}


def serving_dtype(requested: str = "auto", device: str = "auto") -> str:
    """The backbone precision to serve LC-Rec in.

    "auto": 4-bit NF4 on a CUDA GPU with bitsandbytes (its real 4-bit kernels); on a CPU, int8 (int8 weights and
    dynamic int8 activations through PyTorch's x86 kernels, backbone.quantize_int8: on the 2-core CPUs of this
    project a chat reply took 0.66 s at the median against 1.00 s in fp32, and the server 1.0 instead of 1.3 GB),
    or bf16/fp32 by hardware.resolve_dtype on a
    PyTorch build without those kernels. bitsandbytes' NF4 on these CPUs served slower (p50 1.68 s vs 0.93 s),
    heavier (RSS 1.58 vs 1.34 GB) and worse than fp32, and PyTorch's 4-bit CPU matmul (int4 weights, bf16
    activations) runs at 0.6-1.2x fp32's speed: model card, "Serving precision".
    "nf4": 4-bit wherever bitsandbytes is installed, else as "auto". fp32/bf16/int8 are kept as they are."""
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if requested == "nf4":
        return "nf4" if has_bnb else serving_dtype("auto", device)
    if requested != "auto":
        return requested
    if cuda:
        return "nf4" if has_bnb else ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    return "int8" if has_int8_kernels() else resolve_dtype("auto", "cpu")


def has_int8_kernels() -> bool:
    """Whether this PyTorch build has the x86 integer kernels (fbgemm) that int8 serving runs on."""
    return bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines))
