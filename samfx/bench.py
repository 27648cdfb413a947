"""One timing harness for ``samfx bench`` and every script in ``benchmarks/``.

On a shared 2-core CPU a single timing is noise. Every comparison here runs its
candidates in turns (A, B, C, B, C, A, ...: the order rotates each round so no
candidate always follows the same one), after a warm-up, and reports medians.
Every result carries the machine it was measured on: the CPU's instruction set
decides whether bf16 is native and whether int8 has VNNI, so a ratio means
nothing without it.

Example::

    >>> from samfx.bench import interleaved, markdown_table
    >>> timings = interleaved({"sum": lambda: sum(range(1000)), "max": lambda: max(range(1000))}, repeats=3)
    >>> sorted(timings), len(timings["sum"].samples)
    (['max', 'sum'], 3)
    >>> print(markdown_table([{"case": "a", "x": 1.234}], [("case", "case", "{}"), ("speed-up", "x", "{:.2f}x")]))
    | case | speed-up |
    |---|---|
    | a | 1.23x |
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["Timing", "cpu_isa", "interleaved", "markdown_table", "write_results"]

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


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one candidate's timed runs."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "samples_s": list(self.samples)}


def interleaved(
    candidates: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, Timing]:
    """Time each candidate ``repeats`` times, in rotating turns, after ``warmup`` untimed runs each.

    Args:
        candidates: name -> a function doing one unit of work (one encoder run,
            one batched decoder call, ...).
        repeats: timed runs per candidate; read the median.
        warmup: untimed runs per candidate first (allocations, JIT, caches).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            candidates[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(samples[name])) for name in names}


Column = tuple[str, "str | Callable[[dict], Any]", str]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table: ``columns`` are ``(header, key or function of the row, format)``.

    Missing values (``None`` or an absent key) print as ``-``.
    """
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = key(row) if callable(key) else row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as JSON with the environment, the CPU's ISA, the command
    and the time; atomically, so an interrupted run never leaves half a file."""
    from .report import environment

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "environment": {**environment(), "isa": cpu_isa()},
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **payload,
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        json.dump(record, out, indent=2, default=str)
    os.replace(temporary, path)
    return path
