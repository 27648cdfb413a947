"""``samfx.export``: a checked encoder/decoder pair for onnxruntime or OpenVINO, with one manifest.

Writes, in ``out_dir``:

* the encoder and the prompt decoder in the SAM convention
  (:mod:`samfx.emit.onnx`): ``encoder.onnx`` + ``decoder.onnx``, or for
  OpenVINO ``encoder.xml/.bin`` + ``decoder.xml/.bin``, read from the
  checked ONNX graphs (:mod:`samfx.emit.openvino`) and saved with their
  float32 weights as they are (``compress_to_fp16=False``);
* ``samfx_runtime.py``, the torch-free runtime (:mod:`samfx.emit.runtime`);
* ``samfx_export.json``, the manifest: every file with its SHA-256 and size
  (the runtime refuses a file that differs), the format, the family, the
  passes applied (with the passes they required), the graphs' inputs and
  outputs, the preprocessing, the inference precision hint, what runs in int8,
  and the checks.

Every export is checked: the written files run in their runtime against eager
PyTorch on a package image, for several prompts (point counts, a box, a mask
input, all the image's boxes in one batched call) and image sizes.

bfloat16: no weights are exported in bfloat16 (ONNX has no bfloat16 ``Conv``;
OpenVINO picks its compute precision at compile time). A model after the
``bf16`` pass exports its (bfloat16-rounded) weights in float32 with the
precision hint ``bf16``; OpenVINO then computes in bfloat16 where the CPU has
it natively, in float32 elsewhere; onnxruntime computes in float32.

Example (not run as a doctest: an export with its checks takes a minute;
``tests/emit/test_export.py`` exports the same small model once per session)::

    >>> import samfx, tempfile
    >>> model = samfx.models.build("sam_vit_b", small=True)
    >>> export = samfx.export(model, tempfile.mkdtemp(), format="openvino")  # doctest: +SKIP
    >>> sorted(export.manifest["files"])                # doctest: +SKIP
    ['decoder.bin', 'decoder.xml', 'encoder.bin', 'encoder.xml', 'samfx_runtime.py']
    >>> export.worst_mask_iou >= 0.999                 # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..adapters import Adapter, find_adapter
from ..adapters.deploy import Deployment
from ..data import package_images
from ..fidelity import mask_iou
from . import onnx as onnx_graphs
from . import runtime

__all__ = ["Export", "OnnxExport", "eval_mode", "export", "export_onnx"]


@dataclass
class Export:
    """What :func:`export` wrote and how the exported graphs compare with eager PyTorch.

    Attributes:
        directory: the export directory.
        format: ``"onnx"`` or ``"openvino"``.
        encoder, decoder: the graph files (``.onnx`` or ``.xml``).
        manifest: the content of ``samfx_export.json``.
        checks: ``encoder``: max and relative difference of the embeddings;
            ``decoder``: per case (prompt, image size), the mask IoU between
            the runtime's and eager masks and the largest differences.
        sizes: bytes of each graph (``encoder``, ``decoder``, ``decoder_no_mask``:
            external data and ``.bin`` included).
        export_s: seconds spent exporting, check_s: checking.
    """

    directory: Path
    format: str
    encoder: Path
    decoder: Path
    manifest: dict[str, Any]
    checks: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    export_s: float = 0.0
    check_s: float = 0.0

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest

    @property
    def worst_mask_iou(self) -> float:
        return min(case["mask_iou"] for case in self.checks["decoder"])

    def summary(self) -> str:
        enc = self.checks["encoder"]
        runtime_name = runtime.FORMATS[self.format]
        lines = [f"{self.format}: encoder {self.sizes['encoder'] / 1e6:.2f} MB, decoder "
                 f"{self.sizes['decoder'] / 1e6:.2f} MB + {self.sizes['decoder_no_mask'] / 1e6:.2f} MB without "
                 f"mask input (exported in {self.export_s:.0f} s), "
                 f"precision hints {self.manifest['precision']['parts']}, checked in {self.checks['precisions']}",
                 f"encoder: {runtime_name} vs eager max |diff| {enc['max_abs_diff']:.2e} "
                 f"(relative {enc['relative_diff']:.2e})"]
        for case in self.checks["decoder"]:
            lines.append(f"{case['graph']:<15} {case['prompt']:<22} image {case['image_hw'][0]}x{case['image_hw'][1]}: "
                         f"mask IoU {case['mask_iou']:.4f}, max |diff| masks {case['masks_max_abs_diff']:.2e}, "
                         f"iou_predictions {case['iou_max_abs_diff']:.2e}")
        for part, int8 in self.manifest.get("int8", {}).items():
            lines.append(f"{part}: {int8['int8_layers']} of {int8['layers']} layers run in int8 ({runtime_name})")
        lines += [f"note: {note}" for note in self.manifest["notes"]]
        return "\n".join(lines)


#: The name :func:`samfx.export_onnx` has always returned.
OnnxExport = Export


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the export, the user's flags restored afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _reduced_dtype(model: nn.Module) -> torch.dtype | None:
    """bfloat16 or float16 when the model's parameters are (the bf16 pass)."""
    # Parameters only: hyper's lattice codes keep bfloat16 row parameters in buffers, cast in the graph.
    dtypes = {p.dtype for p in model.parameters()} & {torch.bfloat16, torch.float16}
    return next(iter(dtypes), None)


def _float32_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its bfloat16/float16 tensors in float32 (same values)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and tensor.dtype in (torch.bfloat16, torch.float16):
                    wide = tensor.detach().float()
                    store[name] = nn.Parameter(wide, tensor.requires_grad) if store is module._parameters else wide
    return model


def _hyper_planes(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose hyper-coded tensors hold :func:`~samfx.codecs.lattice.to_planes`'s
    integer planes (which OpenVINO keeps compressed and decodes in one multiply-add)
    instead of packed codes (whose integer decode is thousands of small ops in
    OpenVINO's XML: 9 MB for LiteMedSAM, more than the planes add); and how many
    tensors were converted."""
    from ..codecs.lattice import to_planes
    from ..modules.hyper import HyperCoded

    if not any(isinstance(m, HyperCoded) for m in model.modules()):
        return model, 0
    model = copy.deepcopy(model)
    converted = 0
    for module in model.modules():
        if isinstance(module, HyperCoded):
            planes = to_planes(module.code())
            if planes is not None:
                module.codes, module.row_params = planes
                converted += 1
    return model, converted


def export(
    model: nn.Module,
    out_dir: str | Path,
    format: str = "onnx",
    *,
    multimask_output: bool = True,
    opset: int = 18,
    external_data: bool | None = None,
    adapter: Adapter | None = None,
    check_image: str = "coins",
    verbose: bool = False,
) -> Export:
    """Export a SAM-family model (plain or from :func:`samfx.optimize`) for onnxruntime or OpenVINO.

    Args:
        model: a model of a supported family; it is not modified.
        out_dir: directory to write (created if needed).
        format: ``"onnx"`` (onnxruntime) or ``"openvino"`` (OpenVINO IR).
        multimask_output: the decoder returns the three candidate masks (True,
            the predictors' default) or the single-mask output.
        opset: ONNX opset, at least 17.
        external_data: ONNX weights in a separate ``.data`` file; ``None``: only
            above the 2 GB protobuf limit.
        adapter: force a family adapter.
        check_image: package image the exported graphs are checked on.
        verbose: print the check summary.

    Raises:
        ValueError: an unknown format, a bad opset, or a model that has no prompt
            decoder (a bare encoder).
    """
    if format not in runtime.FORMATS:
        raise ValueError(f"format must be one of {sorted(runtime.FORMATS)}, got {format!r}")
    if opset < 17:
        raise ValueError(f"samfx exports with opset 17 or newer (LayerNormalization, Resize with sizes), not {opset}")
    adapter = adapter or find_adapter(model)
    reduced = _reduced_dtype(model)
    source = _float32_copy(model) if reduced is not None else model
    planes = 0
    if format == "openvino":
        source, planes = _hyper_planes(source)
    out = Path(out_dir)
    with eval_mode(model, source), torch.no_grad():
        deployment = adapter.deployment(source, multimask_output=multimask_output)  # raises for a bare encoder
        # The eager reference is the model itself, whatever copy the graphs are traced from.
        eager = adapter.deployment(model, multimask_output=multimask_output) if source is not model else deployment
        for prepared in {id(deployment): deployment, id(eager): eager}.values():
            if prepared.prepare is not None:
                prepared.prepare()
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            graphs_dir = out if format == "onnx" else Path(scratch)
            size = deployment.preprocessing.size
            blank = tuple(eager.encoder(torch.zeros(1, 3, size, size)))  # the traced copy may not run eagerly
            # OpenVINO may compute in bfloat16, which rounds float sizes: orig_im_size is an integer there.
            onnx_graphs.write_pair(deployment, graphs_dir, opset, external_data, embeddings=blank,
                                   size_dtype=torch.int64 if format == "openvino" else torch.float32)
            signature = {part: onnx_graphs.graph_signature(graphs_dir / f"{part}.onnx")
                         for part in onnx_graphs.GRAPHS}
            if format == "onnx":
                import onnx

                for part in onnx_graphs.GRAPHS:
                    onnx.checker.check_model(str(out / f"{part}.onnx"), full_check=True)
                parts = {part: [out / f"{part}.onnx", *onnx_graphs.external_files(out / f"{part}.onnx")]
                         for part in onnx_graphs.GRAPHS}
            else:
                from . import openvino as openvino_graphs

                parts = {part: openvino_graphs.convert(graphs_dir / f"{part}.onnx", out / f"{part}.xml")
                         for part in onnx_graphs.GRAPHS}
        export_s = time.perf_counter() - start
        shutil.copyfile(runtime.__file__, out / "samfx_runtime.py")
        manifest = _manifest(model, adapter, eager, format, multimask_output, opset, reduced, signature, parts)
        if planes:
            manifest["notes"].append(f"{planes} hyper-coded tensors stored as int8 (int16 where needed) planes with a "
                                     "per-row scale and zero point, which OpenVINO keeps compressed and "
                                     "decompresses when it compiles")
        manifest["files"] = {path.name: {"sha256": runtime.file_digest(path), "bytes": path.stat().st_size}
                             for path in [*(p for files in parts.values() for p in files), out / "samfx_runtime.py"]}
        _write(out, manifest)
        result = Export(out, format, parts["encoder"][0], parts["decoder"][0], manifest, export_s=export_s,
                        sizes={part: sum(p.stat().st_size for p in files) for part, files in parts.items()})
        start = time.perf_counter()
        predictor = runtime.load(out)  # the files as written, verified against the manifest
        result.checks = _check(eager, onnx_graphs.FullSizeDecoder(eager), predictor, check_image)
        result.checks["precision"] = predictor.precision
        result.checks["precisions"] = predictor.precisions
        if format == "openvino":
            from . import openvino as openvino_graphs

            manifest["int8"] = openvino_graphs.int8_layers(predictor.graphs.compiled, predictor.graphs.parts)
        elif any(p["pass"] == "quantize" for p in manifest["passes"]):
            manifest["int8"] = {part: _onnxruntime_int8(files[0]) for part, files in parts.items()}
        result.check_s = time.perf_counter() - start
    manifest["checks"] = result.checks
    manifest["sizes"] = result.sizes
    _write(out, manifest)
    if verbose:
        print(result.summary())
    return result



def export_onnx(model: nn.Module, out_dir: str | Path, **options: Any) -> Export:
    """``export(model, out_dir, format="onnx", **options)``: the name this export has always had."""
    return export(model, out_dir, format="onnx", **options)


def _write(out: Path, manifest: dict[str, Any]) -> None:
    (out / runtime.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def _onnxruntime_int8(path: Path) -> dict[str, Any]:
    """Which of onnxruntime's kernels for ``path`` are integer ones (after its fusions)."""
    from .quantized_onnx import fused_ops

    ops = fused_ops(path)
    integer = {op: n for op, n in ops.items() if "Integer" in op or op.startswith("QLinear") or op == "QAttention"}
    return {"int8_layers": sum(integer.values()), "layers": sum(ops.values()), "types": integer}


def _manifest(model: nn.Module, adapter: Adapter, deployment: Deployment, format: str, multimask_output: bool,
              opset: int, reduced: torch.dtype | None, signature: dict[str, Any],
              parts: dict[str, list[Path]]) -> dict[str, Any]:
    from .._version import __version__
    from ..machine import cpu_isa
    from ..passes import get_pass

    report = getattr(model, "samfx_report", None)
    passes = [p.config for p in report.passes] if report is not None else []
    notes = []
    hint = "f32"
    if reduced is not None:
        hint = "bf16"
        notes.append(f"the model's {str(reduced).replace('torch.', '')} weights are exported in float32 "
                     "(same values); the runtime computes in bfloat16 only where the CPU has it natively"
                     + (" (OpenVINO's INFERENCE_PRECISION_HINT)" if format == "openvino"
                        else "; onnxruntime's CPU provider computes in float32"))
    isa = cpu_isa()
    trained = type(adapter.predictor(model))
    return {
        "schema": runtime.SCHEMA,
        "format": format,
        "runtime": runtime.FORMATS[format],
        "samfx": __version__,
        "family": adapter.name,
        "model": getattr(model, "samfx_zoo", {}).get("name") if report is None else report.model,
        "passes": passes,
        "required_passes": {p["pass"]: list(get_pass(p["pass"]).requires) for p in passes},
        "encoder": parts["encoder"][0].name,
        "decoder": parts["decoder"][0].name,
        "decoder_no_mask": parts["decoder_no_mask"][0].name,
        "embeddings": list(deployment.embedding_names),
        "decoder_inputs": list(deployment.embedding_names) + list(onnx_graphs.DECODER_INPUTS),
        "decoder_no_mask_inputs": list(deployment.embedding_names) + list(onnx_graphs.NO_MASK_DECODER_INPUTS),
        "decoder_outputs": list(onnx_graphs.DECODER_OUTPUTS),
        "graphs": signature,
        "preprocessing": deployment.preprocessing.to_dict(),
        "mask_input_size": deployment.mask_input_size,
        "multimask_output": multimask_output,
        # What samfx.evaluate leads with when it runs this export (LiteMedSAM: boxes only).
        "prompts": {"trained": list(trained.trained_prompts), "untrained_note": trained.untrained_prompts_note},
        "opset": opset,
        "precision": {"hint": hint, "exported_weights": "float32",
                      # Each graph's hint: bf16 where that part's weights are reduced (bf16 roles).
                      "parts": {part: "bf16" if _reduced_dtype(module) is not None else "f32"
                                for part, module in (("encoder", deployment.encoder), ("decoder", deployment.decoder))},
                      "export_cpu": {"summary": isa["summary"], "native_bf16": isa["native_bf16"]}},
        "notes": notes,
    }


def _check(deployment: Deployment, decoder: onnx_graphs.FullSizeDecoder, predictor: runtime.Predictor,
           image_name: str) -> dict[str, Any]:
    """The exported graphs in their runtime against eager on a package image.

    The decoder runs on the eager embeddings, so that its own difference is
    measured: prompts of the package image, moved to three image sizes, the last
    one feeding back the low-res mask of the previous one, as interactive tools
    do; and all the image's boxes in one batched call.
    """
    sample = package_images([image_name])[0]
    manifest = predictor.manifest
    pixels = runtime.prepare_image(sample.image, manifest["preprocessing"])
    eager = [t.float().numpy() for t in deployment.encoder(torch.from_numpy(pixels))]
    exported = predictor.graphs.encode(pixels)
    scale = max(float(np.abs(e).max()) for e in eager) or 1.0
    encoder_diff = max(float(np.abs(a - b).max()) for a, b in zip(exported, eager))
    checks: dict[str, Any] = {"encoder": {"max_abs_diff": encoder_diff, "relative_diff": encoder_diff / scale},
                              "decoder": []}
    boxes = np.array([p.coords for p in sample.prompts if p.kind == "box"])
    clicks = np.array([p.coords for p in sample.prompts if p.kind == "point"][:3])
    cases = [
        ("1 point", {"point_coords": clicks[:1], "point_labels": [1]}),
        ("3 points", {"point_coords": clicks, "point_labels": [1, 0, 1]}),
        ("box", {"box": boxes[0]}),
        ("box + point + mask", {"box": boxes[0], "point_coords": clicks[:1], "point_labels": [1]}),
    ]
    height, width = sample.image.shape[:2]
    sizes = [(height, width), (width + 37, height // 2 + 1), (3 * height, 2 * width + 5)]
    runs = list(zip(cases + cases[:2], sizes * 2)) + [(("%d boxes" % len(boxes), {"box": boxes}), sizes[0])]
    low_res = None
    for (label, prompt), image_hw in runs:
        factor = np.array([image_hw[1] / width, image_hw[0] / height])
        moved = {k: np.asarray(v, np.float64).reshape(-1, 2) * factor if k == "point_coords" else v
                 for k, v in prompt.items()}
        if "box" in moved:
            moved["box"] = (np.asarray(moved["box"], np.float64).reshape(-1, 2, 2) * factor).reshape(
                np.shape(moved["box"]))
        if label.endswith("mask"):
            moved["mask_input"] = low_res[0, :1]
        feeds = runtime.prompt_inputs(manifest, image_hw, **moved)
        inputs = dict(zip(deployment.embedding_names, eager)) | feeds
        ordered = [torch.from_numpy(inputs[n]) for n in manifest["decoder_inputs"]]
        masks, iou, low_res = (t.float().numpy() for t in decoder(*ordered))
        # Prompts without a mask run through both decoder graphs: users of the SAM convention
        # call decoder.onnx, samfx's runtime the one without mask inputs.
        graphs = ["decoder"] + (["decoder_no_mask"] if "mask_input" not in moved else [])
        for graph in graphs:
            ex_masks, ex_iou, ex_low_res = predictor.graphs.decode(inputs, graph)
            checks["decoder"].append({
                "prompt": label,
                "graph": graph,
                "prompts": int(feeds["point_coords"].shape[0]),
                "points": int(feeds["point_coords"].shape[1]),
                "image_hw": list(image_hw),
                "mask_iou": min(mask_iou(a > 0, b > 0) for a, b in zip(ex_masks.reshape(-1, *image_hw),
                                                                       masks.reshape(-1, *image_hw))),
                "masks_max_abs_diff": float(np.abs(ex_masks - masks).max()),
                "low_res_max_abs_diff": float(np.abs(ex_low_res - low_res).max()),
                "iou_max_abs_diff": float(np.abs(ex_iou - iou).max()),
            })
    return checks
