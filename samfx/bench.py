"""One timing harness for ``samfx bench`` and every script in ``benchmarks/``.

On a shared 2-core CPU a single timing is noise. Every comparison here runs its
candidates in turns (A, B, C, B, C, A, ...: the order rotates each round so no
candidate always follows the same one), after a warm-up, and reports medians.
Every result carries the machine it was measured on: the CPU's instruction set
decides whether bf16 is native and whether int8 has VNNI, so a ratio means
nothing without it.

:func:`deployment_bench` (``samfx bench``) times an original and an optimized
model on each runtime (torch eager, ``torch.compile`` with the samfx backend,
onnxruntime, OpenVINO) with this harness, beside their size on disk and in
memory and their fidelity.

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

import contextlib
import dataclasses
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

from .machine import cpu_isa

__all__ = ["RUNTIMES", "Timing", "available_runtimes", "cpu_isa", "deploy_table", "deployment_bench", "interleaved",
           "markdown_table", "run_note", "timed", "write_results"]

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


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` run once: its result and its wall-clock seconds.

    For one-off stages (optimizing, exporting, a first call that compiles), never
    for comparisons: those go through :func:`interleaved`.

    >>> result, seconds = timed(lambda: sum(range(10)))
    >>> result, seconds >= 0
    (45, True)
    """
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_note(repeats: int, warmup: int = 1, what: str = "timings") -> str:
    """The line printed under a benchmark's table: the machine (CPU and ISA), torch
    and its threads, and how ``what`` were taken (:func:`interleaved`'s settings).

    >>> "medians of 3 interleaved runs after 1 warm-up" in run_note(3)
    True
    """
    from .report import environment

    env, isa = environment(), cpu_isa()
    return (f"{isa['summary']} ({isa['cpu'] or 'unknown CPU'}, {env['cpu_count']} CPUs), torch {env['torch']}, "
            f"{env['torch_threads']} threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; {what}: medians of {repeats} "
            f"interleaved runs after {warmup} warm-up")


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


#: Runtimes :func:`deployment_bench` knows, in table order.
RUNTIMES = ("eager", "compile", "onnxruntime", "openvino")
_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}


def available_runtimes() -> list[str]:
    """The runtimes of :data:`RUNTIMES` installed here."""
    import importlib.util

    return [r for r in RUNTIMES if r not in _FORMAT or importlib.util.find_spec(r) is not None]


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux), to measure what loading a runtime costs."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _checkpoint_bytes(model: Any, directory: Path) -> int:
    """Size on disk of the model for torch: ``samfx.save``'s checkpoint for an optimized
    model, its weights as safetensors otherwise."""
    if hasattr(model, "samfx_report"):
        from .serialization import save

        save(model, directory)
        return _directory_bytes(directory)
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    return _directory_bytes(directory)


def _exported_predictor(predictor: Any) -> Any:
    """An exported model in its runtime, as a :class:`samfx.adapters.Predictor` (for :mod:`samfx.fidelity`)."""
    import torch

    from .adapters import Predictor

    class Exported(Predictor):
        def set_image(self, image):
            predictor.set_image(image)

        @property
        def image_embedding(self):
            return torch.from_numpy(predictor.image_embedding)

        def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
            masks, scores, _ = predictor.predict(point_coords=point_coords, point_labels=point_labels, box=box,
                                                 multimask_output=multimask_output)
            return masks, scores

    return Exported()


def deployment_bench(
    original: Any,
    optimized: Any,
    *,
    runtimes: Sequence[str] | None = None,
    image: str = "coins",
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = 2,
    work_dir: str | os.PathLike | None = None,
    fidelity_images: Sequence[str] = ("coins",),
) -> dict[str, Any]:
    """Time an original and an optimized model on each runtime, interleaved in one process.

    Per model and runtime: the image encoder on one image, and the decoder on all
    the image's box prompts in one batched call (the SAM-convention decoder with
    its full-size masks, single-mask output as for boxes, as exported), each timed by :func:`interleaved` against
    every other candidate after ``warmup`` runs; the size on disk (``samfx.save``'s
    checkpoint for torch, the export for the runtimes), in memory (weights for
    torch, the process's resident growth when the runtime loads the export), and
    the box-prompt mask IoU against the original in PyTorch (:func:`samfx.fidelity.compare`).

    Args:
        original, optimized: models of one family (``optimized`` from :func:`samfx.optimize`
            or :func:`samfx.load`).
        runtimes: subset of :data:`RUNTIMES` (default: those installed).
        image: package image whose boxes are the prompt batch.
        repeats, warmup: :func:`interleaved`'s.
        threads: threads of every runtime (``None``: each runtime's choice).
        work_dir: where checkpoints and exports go (default: a temporary directory).
        fidelity_images: package images of the fidelity check.

    Returns:
        ``{"rows": [...], "threads", "image", "boxes", "isa"}``; :func:`deploy_table` prints the rows.
    """
    import tempfile

    import numpy as np
    import torch

    from .adapters import find_adapter
    from .data import package_images
    from .emit import runtime as exported_runtime
    from .emit.export import eval_mode, export
    from .emit.onnx import FullSizeDecoder
    from .fidelity import compare
    from .stats import weight_bytes

    runtimes = list(runtimes or available_runtimes())
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise ValueError(f"unknown runtimes {unknown}; known: {', '.join(RUNTIMES)}")
    if threads:
        torch.set_num_threads(threads)
    sample = package_images([image])[0]
    boxes = np.array([p.coords for p in sample.prompts if p.kind == "box"])
    # Box prompts, single-mask output (SAM's answer to a box; LiteMedSAM's only prompt).
    fidelity_samples = [dataclasses.replace(s, prompts=[p for p in s.prompts if p.kind == "box"])
                        for s in package_images(list(fidelity_images))]
    adapter = find_adapter(original)
    scratch = tempfile.TemporaryDirectory() if work_dir is None else None
    root = Path(scratch.name if scratch else work_dir)
    encoders: dict[str, Callable[[], object]] = {}
    decoders: dict[str, Callable[[], object]] = {}
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if scratch is not None:
            stack.callback(scratch.cleanup)
        stack.enter_context(eval_mode(original, optimized))
        for label, model in (("original", original), ("optimized", optimized)):
            deployment = adapter.deployment(model, multimask_output=False)
            if deployment.prepare is not None:
                deployment.prepare()
            manifest = {"preprocessing": deployment.preprocessing.to_dict(),
                        "mask_input_size": deployment.mask_input_size}
            pixels = exported_runtime.prepare_image(sample.image, manifest["preprocessing"])
            feeds = exported_runtime.prompt_inputs(manifest, sample.image.shape[:2], box=boxes)
            with torch.no_grad():
                embeddings = [t for t in deployment.encoder(torch.from_numpy(pixels))]
            ordered = [*embeddings, *(torch.from_numpy(feeds[n]) for n in ("point_coords", "point_labels",
                                                                            "mask_input", "has_mask_input",
                                                                            "orig_im_size"))]
            decoder = FullSizeDecoder(deployment)
            torch_disk = _checkpoint_bytes(model, root / f"{label}-torch")
            torch_fidelity = 1.0 if model is original else \
                compare(original, model, fidelity_samples, adapter=adapter).box_mask_iou_mean
            for name in runtimes:
                key = f"{label} / {name}"
                row: dict[str, Any] = {"case": key, "model": label, "runtime": name}
                if name in ("eager", "compile"):
                    encoder = deployment.encoder if name == "eager" else \
                        torch.compile(deployment.encoder, backend="samfx")
                    encoders[key] = lambda encoder=encoder: _no_grad(encoder, torch.from_numpy(pixels))
                    if name == "compile":
                        encoders[key]()  # compiles: never inside a timed run, whatever the warm-up
                    decoders[key] = lambda decoder=decoder: _no_grad(decoder, *ordered)
                    row.update(disk_bytes=torch_disk, memory_bytes=weight_bytes(model), box_mask_iou=torch_fidelity,
                               precision=str(next(model.parameters()).dtype).replace("torch.", ""))
                else:
                    directory = root / f"{label}-{_FORMAT[name]}"
                    result = export(model, directory, format=_FORMAT[name], adapter=adapter, multimask_output=False)
                    before = _resident_bytes()
                    predictor = exported_runtime.load(directory, threads=threads)
                    after = _resident_bytes()
                    graphs = predictor.graphs
                    inputs = {**dict(zip(predictor.manifest["embeddings"], [e.float().numpy() for e in embeddings])),
                              **feeds}
                    encoders[key] = lambda graphs=graphs: graphs.encode(pixels)
                    decoders[key] = lambda graphs=graphs, inputs=inputs: graphs.decode(inputs)
                    fidelity = compare(original, _exported_predictor(predictor), fidelity_samples, adapter=adapter)
                    row.update(disk_bytes=sum(result.sizes.values()),
                               memory_bytes=None if before is None else after - before,
                               box_mask_iou=fidelity.box_mask_iou_mean, precision=predictor.precision,
                               int8_layers=sum(part["int8_layers"] for part in result.manifest.get("int8", {}).values())
                               if result.manifest.get("int8") else 0)
                rows.append(row)
        encoder_times = interleaved(encoders, repeats=repeats, warmup=warmup)
        decoder_times = interleaved(decoders, repeats=repeats, warmup=warmup)
    base = rows[0]["case"]
    for row in rows:
        row["encoder"] = encoder_times[row["case"]].to_dict()
        row["decoder"] = decoder_times[row["case"]].to_dict()
        row["encoder_s"], row["decoder_s"] = encoder_times[row["case"]].median, decoder_times[row["case"]].median
        row["image_s"] = row["encoder_s"] + row["decoder_s"]
        row["speedup"] = (encoder_times[base].median + decoder_times[base].median) / row["image_s"]
        row["encoder_speedup"] = encoder_times[base].median / row["encoder_s"]
    return {"rows": rows, "threads": threads or "runtime default", "image": image, "boxes": len(boxes),
            "baseline": base, "repeats": repeats, "warmup": warmup, "isa": cpu_isa()}


def _no_grad(module: Callable[..., Any], *args: Any) -> Any:
    import torch

    with torch.no_grad():
        return module(*args)


def deploy_table(result: Mapping[str, Any]) -> str:
    """:func:`deployment_bench`'s rows as Markdown, speed first."""
    mb = "{:.1f}"
    columns: list[Column] = [
        ("case", "case", "{}"),
        ("x (image)", "speedup", "{:.2f}x"),
        ("x (encoder)", "encoder_speedup", "{:.2f}x"),
        ("encoder ms", lambda r: 1e3 * r["encoder_s"], "{:.1f}"),
        (f"decoder ms ({result['boxes']} boxes)", lambda r: 1e3 * r["decoder_s"], "{:.1f}"),
        ("disk MB", lambda r: r["disk_bytes"] / 1e6, mb),
        ("memory MB", lambda r: None if r["memory_bytes"] is None else r["memory_bytes"] / 1e6, mb),
        ("box IoU vs original", "box_mask_iou", "{:.4f}"),
        ("precision", "precision", "{}"),
    ]
    isa = result["isa"]
    return (markdown_table(result["rows"], columns)
            + f"\n\n{isa['summary']} ({isa['cpu'] or 'unknown CPU'}), {result['threads']} threads, medians of "
              f"{result['repeats']} interleaved runs after {result['warmup']} warm-up; x: against {result['baseline']}")
