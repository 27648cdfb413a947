"""The CPU this process runs on, as it matters for SAM inference.

Whether bfloat16 is native (or emulated, slower than float32) and whether
int8 GEMMs have VNNI dot products decide which precision a runtime should use
and how a benchmark's ratios read, so exporters and benchmarks both ask here.

Example::

    >>> from samfx.machine import cpu_isa
    >>> isa = cpu_isa()
    >>> isinstance(isa["native_bf16"], bool) and bool(isa["summary"])
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ISA_FLAGS", "cpu_isa"]

#: /proc/cpuinfo flags that decide how fast bf16 and int8 run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_isa() -> dict[str, Any]:
    """The CPU's model and the instruction-set extensions that matter for SAM inference.

    ``summary`` reads like ``"AVX-512 VNNI + BF16"`` or ``"AVX2"``; ``native_bf16``
    says whether bfloat16 arithmetic is native (else emulated and slower than
    float32), ``int8_vnni`` whether int8 GEMMs have VNNI dot products.
    """
    import torch

    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name" and not model:
                model = value.strip()
    except OSError:  # not Linux: torch's capability below still says which kernels run
        pass
    present = [flag for flag in ISA_FLAGS if flag in flags]
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    if "avx512f" in flags:
        summary = "AVX-512" + (" VNNI" if "avx512_vnni" in flags else "") + (" + BF16" if bf16 else "")
    else:
        summary = ("AVX2" if "avx2" in flags else "no AVX2") + (" + AVX-VNNI" if "avx_vnni" in flags else "")
    if "amx_tile" in flags:
        summary += " + AMX"
    return {
        "cpu": model,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": present,
        "native_bf16": bf16,
        "int8_vnni": vnni,
        "summary": summary,
    }
