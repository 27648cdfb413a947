"""Issue 18's deploy table in one process: the hand-made CPU paths and samfx's, side by side.

    python benchmarks/deploy.py                         # LiteMedSAM: encoder alone, and end to end
    python benchmarks/deploy.py --rows anchors          # the hand-made paths only
    python benchmarks/deploy.py --model sam_vit_b       # ViT-B encoder only, random weights (about 20 GB)

Hand-made paths are what a user writes without samfx: torch eager; onnxruntime
fp32 and ``quantize_dynamic``; OpenVINO with the f32 precision hint and with
its default hint (bf16 where the CPU has it); OpenVINO + ``nncf.quantize``
(TRANSFORMER preset). samfx's rows are what a samfx user ships:
``samfx.export`` files run by ``samfx.runtime.load`` (``quantize``, the composed
recipes that cut MACs before int8, the presets), plus ``quantize`` in torch.

LiteMedSAM (real weights) is measured twice on ``coins``: the image encoder
alone, and end to end, one image with all its 24 box prompts: the encoder,
then the model's own decoder given every box in one batched call, masks at
the image's size. Each path runs its decoder in its own runtime (NNCF and
samfx quantize the decoder too). Fidelity: box-prompt mask IoU against the
original (torch eager), embedding cosine, and mIoU against coins' ground
truth. NNCF and samfx calibrate on the same photos, the distillation set
(:data:`samfx.distillation.DEFAULT_TRAINING_IMAGES`), never on coins.

Timing is :func:`samfx.bench.interleaved` (medians, rotating turns, after a
warm-up); ratios are against torch eager and against the fastest hand-made
path of the same run; the CPU's ISA is in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import samfx  # noqa: E402
from samfx.bench import cpu_isa, interleaved, markdown_table, write_results  # noqa: E402
from samfx.data import load_images, package_images  # noqa: E402
from samfx.distillation import DEFAULT_TRAINING_IMAGES  # noqa: E402
from samfx.emit.quantized_onnx import export  # noqa: E402
from samfx.emit.runtime import decoder_part  # noqa: E402
from samfx.fidelity import CachedPredictor, compare, mask_iou  # noqa: E402
from samfx.presets import PRESETS  # noqa: E402

Run = Callable[..., np.ndarray]


@dataclass
class DeployPath:
    """One deploy path: how it runs the encoder (and the batched decoder), and what it weighs."""

    name: str
    source: str  # "hand-made" or "samfx"
    model: nn.Module  # the torch model it was made from
    encode: Run
    decode: Run | None = None
    files: list[Path] = field(default_factory=list)


class BoxDecoder(nn.Module):
    """The model's prompt encoder and mask decoder on N boxes in one call, masks at the image's size.

    Benchmark glue until ``samfx.runtime.load`` takes batched boxes: boxes
    ``(N, 4)`` in the encoder-input frame, output ``(N, H, W)`` booleans.
    """

    def __init__(self, model: nn.Module, image_hw: tuple[int, int]) -> None:
        super().__init__()
        self.prompt_encoder, self.mask_decoder, self.image_hw = model.prompt_encoder, model.mask_decoder, image_hw
        self.train(False)

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, _ = self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
        return F.interpolate(low_res, self.image_hw, mode="bilinear", align_corners=False)[:, 0] > 0


class RuntimeEncoder(nn.Module):
    """A runtime's encoder in front of the original's prompt encoder and decoder (encoder-only fidelity)."""

    def __init__(self, run: Run, img_size: int) -> None:
        super().__init__()
        self.run, self.img_size = run, img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(self.run(x.detach().numpy())))


def with_encoder(model: nn.Module, encoder: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` whose image encoder is ``encoder`` (``model`` is untouched)."""
    variant = copy.copy(model)
    variant._modules = dict(model._modules)
    variant._modules["image_encoder"] = encoder
    return variant


def encoder_inputs(model: nn.Module, images: list[np.ndarray]) -> list[np.ndarray]:
    """Each image as the family's predictor feeds it to the encoder."""
    inputs: list[np.ndarray] = []
    handle = model.image_encoder.register_forward_pre_hook(lambda m, args: inputs.append(args[0].numpy().copy()))
    predictor = samfx.adapters.find_adapter(model).predictor(model)
    try:
        with torch.no_grad():
            for image in images:
                predictor.set_image(image)
    finally:
        handle.remove()
    return inputs


def torch_run(module: nn.Module) -> Run:
    def run(*arrays: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(a) for a in arrays)).numpy()
    return run


def ort_run(path: Path, threads: int) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    # No arena: a dozen sessions each keeping its peak (24 boxes of decoder activations) exhaust 24 GB.
    options.enable_cpu_mem_arena = False
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return lambda *arrays: s.run(None, dict(zip(names, arrays)))[0]


def ov_run(model, threads: int, hint: str | None = None) -> Run:
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    return lambda *arrays: request.infer(list(arrays))[0]


def nncf_int8(path: Path, samples: list, out: Path) -> Path:
    """``nncf.quantize`` as its documentation shows it (TRANSFORMER preset), saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    model = nncf.quantize(ov.Core().read_model(str(path)), nncf.Dataset(samples), subset_size=len(samples),
                          model_type=nncf.ModelType.TRANSFORMER)
    ov.save_model(model, str(out))
    return out


def file_bytes(files: list[Path]) -> int | None:
    extra = [f.with_suffix(".bin") for f in files if f.suffix == ".xml"] + [Path(f"{f}.data") for f in files]
    return sum(f.stat().st_size for f in files + extra if f.exists()) or None


class Exporter:
    """Exports a model's encoder (and batched box decoder) once, as fp32 or QDQ ONNX."""

    def __init__(self, x: np.ndarray, boxes: np.ndarray | None, image_hw: tuple[int, int], tmp: Path) -> None:
        self.x, self.boxes, self.image_hw, self.tmp = torch.from_numpy(x), boxes, image_hw, tmp

    def __call__(self, model: nn.Module, name: str) -> tuple[Path, Path | None]:
        """The hand-made files: ``torch.onnx`` of the encoder and of :class:`BoxDecoder`."""
        start = time.perf_counter()
        encoder = export(model.image_encoder, (self.x,), self.tmp / f"{name}-encoder.onnx")
        decoder = None
        if self.boxes is not None:
            with torch.no_grad():
                embedding = model.image_encoder(self.x)
            count = torch.export.Dim("boxes", min=1, max=1024)
            decoder = export(BoxDecoder(model, self.image_hw), (embedding, torch.from_numpy(self.boxes)),
                             self.tmp / f"{name}-decoder.onnx", dynamic_shapes=({}, {0: count}),
                             input_names=["image_embeddings", "boxes"], output_names=["masks"])
        print(f"  exported {name} in {time.perf_counter() - start:.0f} s", flush=True)
        return encoder, decoder


def onnx_paths(name: str, source: str, model: nn.Module, files: tuple[Path, Path | None], threads: int,
               runtimes: tuple[str, ...]) -> list[DeployPath]:
    encoder, decoder = files
    kept = [f for f in files if f is not None]
    rows = []
    if "ort" in runtimes:
        rows.append(DeployPath(f"{name}, onnxruntime", source, model, ort_run(encoder, threads),
                          decoder and ort_run(decoder, threads), kept))
    if "openvino" in runtimes:
        rows.append(DeployPath(f"{name}, OpenVINO", source, model, ov_run(str(encoder), threads),
                          decoder and ov_run(str(decoder), threads), kept))
    return rows


def samfx_paths(name: str, model: nn.Module, formats: tuple[str, ...], image_hw: tuple[int, int],
                frame: np.ndarray, threads: int, tmp: Path, bf16_hint: bool = False) -> list[DeployPath]:
    """``samfx.export`` of ``model`` in each format, run as a user runs it: ``samfx.runtime.load``,
    the image's boxes in one call of the decoder the runtime picks for prompts without a mask.
    ``bf16_hint``: also an OpenVINO row with ``precision="bf16"`` (what OpenVINO's default
    hint gives NNCF's model on a CPU with native bfloat16), where the CPU has it."""
    rows = []
    loads = [(fmt, None) for fmt in formats]
    if bf16_hint and "openvino" in formats:
        loads.append(("openvino", "bf16"))
    for fmt, precision in loads:
        start = time.perf_counter()
        out = tmp / f"{name.replace(' ', '_')}-{fmt}"
        if not (out / samfx.runtime.MANIFEST).exists():
            samfx.export(model, out, format=fmt, multimask_output=False)
        predictor = samfx.runtime.load(out, threads=threads, precision=precision)
        if precision is not None and set(predictor.precisions.values()) != {precision}:
            continue  # not native on this CPU: the same row as the manifest's hints
        print(f"  exported {name} ({fmt}) in {time.perf_counter() - start:.0f} s, "
              f"precisions {predictor.precisions}", flush=True)
        manifest, graphs = predictor.manifest, predictor.graphs
        (embedding_name,) = manifest["embeddings"]
        part = decoder_part(manifest, has_mask=False)

        def encode(x: np.ndarray, graphs=graphs) -> np.ndarray:
            return graphs.encode(x)[0]

        def decode(embedding: np.ndarray, boxes: np.ndarray, graphs=graphs, manifest=manifest,
                   part=part, embedding_name=embedding_name) -> np.ndarray:
            feeds = {embedding_name: embedding,
                     **samfx.runtime.prompt_inputs(manifest, image_hw, box=boxes / frame)}
            return graphs.decode(feeds, part)[0][:, 0] > 0

        files = [out / f for f in manifest["files"] if f.endswith((".onnx", ".xml"))]  # file_bytes adds .bin/.data
        label = {"onnx": "onnxruntime", "openvino": "OpenVINO"}[fmt] + (f", {precision} hint" if precision else "")
        rows.append(DeployPath(f"{name}, {label}", "samfx", model, encode, decode, files))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite_medsam", choices=("lite_medsam", "sam_vit_b"))
    parser.add_argument("--rows", default="all", choices=("all", "anchors", "samfx"),
                        help="the hand-made paths, samfx's, or both (torch eager is always there)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image", default="coins")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="keep only the paths whose name contains one of these (torch eager always stays); "
                             "every path is resident while timing, so a 24 GB machine needs a subset")
    parser.add_argument("--lock", default=None,
                        help="a file to hold an exclusive flock on while timing (exports and calibration run outside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    isa = cpu_isa()
    print(f"CPU: {isa['cpu']} ({isa['summary']}, torch capability {isa['torch_capability']})", flush=True)

    import onnxruntime.quantization as ortq

    end_to_end = args.model == "lite_medsam"
    model = samfx.models.build(args.model).eval()
    sample = package_images([args.image])[0]
    calibration, _ = load_images(list(DEFAULT_TRAINING_IMAGES), "calibration")
    calibration_inputs = encoder_inputs(model, calibration)
    x = encoder_inputs(model, [sample.image])[0]
    h, w = sample.image.shape[:2]
    size = int(model.image_encoder.img_size)
    boxes_px = [p for p in sample.prompts if p.kind == "box"]
    frame = np.array([size / w, size / h] * 2, np.float32)
    boxes = np.array([p.coords for p in boxes_px], np.float32) * frame if end_to_end else None
    tmp = Path(tempfile.mkdtemp(prefix="samfx-deploy-"))
    exporter = Exporter(x, boxes, (h, w), tmp)

    paths: list[DeployPath] = [DeployPath("torch eager fp32", "hand-made", model, torch_run(model.image_encoder),
                                end_to_end and torch_run(BoxDecoder(model, (h, w))) or None)]
    if args.rows in ("all", "anchors"):
        fp32 = exporter(model, "fp32")
        dynamic = tuple(None if f is None else tmp / f"dynamic-{f.name}" for f in fp32)
        for source, target in zip(fp32, dynamic):
            if source is not None:
                ortq.quantize_dynamic(str(source), str(target), weight_type=ortq.QuantType.QUInt8)
        paths += onnx_paths("fp32", "hand-made", model, fp32, args.threads, ("ort",))
        paths += onnx_paths("quantize_dynamic", "hand-made", model, dynamic, args.threads, ("ort",))
        for hint in ("f32", None):
            paths.append(DeployPath(f"OpenVINO, {'f32' if hint else 'default'} hint", "hand-made", model,
                               ov_run(str(fp32[0]), args.threads, hint),
                               end_to_end and ov_run(str(fp32[1]), args.threads, hint) or None,
                               [f for f in fp32 if f is not None]))
        start = time.perf_counter()
        nncf_files = [nncf_int8(fp32[0], calibration_inputs, tmp / "nncf-encoder.xml")]
        if end_to_end:
            # The decoder is calibrated on the calibration photos' embeddings with their objects' boxes.
            samples = []
            for image, inputs in zip(package_images(list(DEFAULT_TRAINING_IMAGES)), calibration_inputs):
                image_boxes = [p.coords for p in image.prompts if p.kind == "box"]
                if image_boxes:
                    with torch.no_grad():
                        embedding = model.image_encoder(torch.from_numpy(inputs)).numpy()
                    ih, iw = image.image.shape[:2]
                    scale = np.array([size / iw, size / ih] * 2, np.float32)
                    samples.append((embedding, np.array(image_boxes, np.float32) * scale))
            nncf_files.append(nncf_int8(fp32[1], samples, tmp / "nncf-decoder.xml"))
        print(f"  nncf.quantize in {time.perf_counter() - start:.0f} s", flush=True)
        paths.append(DeployPath("OpenVINO + NNCF int8", "hand-made", model, ov_run(str(nncf_files[0]), args.threads),
                           end_to_end and ov_run(str(nncf_files[-1]), args.threads) or None, nncf_files))

    if args.rows in ("all", "samfx"):
        recipes = {"samfx quantize": [samfx.QuantizeConfig()]}
        if end_to_end:
            recipes["samfx prune (MLP 30%) + quantize"] = [samfx.PruneConfig(mlp=0.3, importance="fluctuation"),
                                                          samfx.QuantizeConfig()]
            for preset in PRESETS.values():
                if preset.name.startswith(args.model):
                    recipes[f"samfx preset {preset.name}"] = list(preset.passes)
        for name, passes in recipes.items():
            rows_of_recipe = [f"{name}, {runtime}" for runtime in ("torch int8", "onnxruntime", "OpenVINO")]
            if args.only and not any(text in row for text in args.only for row in rows_of_recipe):
                continue
            start = time.perf_counter()
            # The rows are measured here, on coins, so the pipeline's own floor (on the same photos) is off.
            optimized = samfx.optimize(model, passes, calibration_images=calibration, min_box_iou=None)
            print(f"  {name}: optimized in {time.perf_counter() - start:.0f} s", flush=True)
            if name == "samfx quantize":
                paths.append(DeployPath(f"{name}, torch int8", "samfx", optimized, torch_run(optimized.image_encoder),
                                   end_to_end and torch_run(BoxDecoder(optimized, (h, w))) or None))
            # onnxruntime once, for samfx's int8 there; the recipes are about the fastest runtime.
            formats = ("onnx", "openvino") if name == "samfx quantize" else ("openvino",)
            paths += samfx_paths(name, optimized, formats, (h, w), frame, args.threads, tmp,
                                 bf16_hint=name == "samfx quantize")

    if args.only:
        paths = paths[:1] + [p for p in paths[1:] if any(text in p.name for text in args.only)]
    rows = measure(paths, model, sample, x, boxes, args)
    fastest = {k: min(r[k] for r in rows if r["source"] == "hand-made" and r.get(k)) for k in ("encoder_s", "e2e_s")
               if any(r.get(k) for r in rows)}
    for row in rows:
        for key, ratio in (("encoder_s", "encoder"), ("e2e_s", "e2e")):
            if row.get(key):
                row[f"{ratio}_x_torch"] = rows[0][key] / row[key]
                row[f"{ratio}_x_fastest"] = fastest[key] / row[key]
    columns = [("path", "name", "{}"), ("", "source", "{}"),
               ("encoder s", "encoder_s", "{:.3f}"), ("x torch", "encoder_x_torch", "{:.2f}"),
               ("x fastest hand-made", "encoder_x_fastest", "{:.2f}")]
    if end_to_end:
        columns += [(f"encoder + {len(boxes)} boxes s", "e2e_s", "{:.3f}"), ("x torch", "e2e_x_torch", "{:.2f}"),
                    ("x fastest hand-made", "e2e_x_fastest", "{:.2f}"),
                    ("box IoU vs original (e2e)", "e2e_box_iou", "{:.4f}"), ("GT mIoU (e2e)", "e2e_gt_miou", "{:.1f}")]
    columns += [("box IoU vs original (encoder)", "box_iou", "{:.4f}"), ("embedding cosine", "cosine", "{:.5f}"),
                ("GT mIoU (encoder)", "gt_miou", "{:.1f}"), ("MB on disk", "mb", "{:.1f}")]
    table = markdown_table(rows, columns)
    print(f"\n{args.model} on {args.image}, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"medians of {args.repeats} interleaved runs; {isa['summary']}\n\n{table}")
    out = write_results(args.out or f"benchmarks/results/deploy-{args.model}.json",
                        {"model": args.model, "image": args.image, "repeats": args.repeats, "threads": args.threads,
                         "calibration_images": list(DEFAULT_TRAINING_IMAGES), "rows": rows, "table": table})
    print(f"\nwrote {out}")
    return 0


@contextlib.contextmanager
def timing_lock(path: str | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (other benchmarks on a shared machine wait), or nothing."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        print(f"  waiting for {path} ...", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure(paths: list[DeployPath], model: nn.Module, sample, x: np.ndarray, boxes: np.ndarray | None,
            args: argparse.Namespace) -> list[dict]:
    """Interleaved timings (encoder alone; encoder + batched decoder) and fidelity of every path."""
    with timing_lock(args.lock):
        timings = interleaved({p.name: (lambda p=p: p.encode(x)) for p in paths}, repeats=args.repeats)
        e2e = {}
        if boxes is not None:
            e2e = interleaved({p.name: (lambda p=p: p.decode(p.encode(x), boxes)) for p in paths},
                              repeats=args.repeats)
    reference = CachedPredictor(samfx.adapters.find_adapter(model).predictor(model))
    reference_embedding = paths[0].encode(x)
    reference_masks = paths[0].decode(reference_embedding, boxes) if boxes is not None else None
    rows = []
    for p in paths:
        row = {"name": p.name, "source": p.source, "encoder_s": timings[p.name].median,
               "encoder_timing": timings[p.name].to_dict(), "mb": (file_bytes(p.files) or 0) / 1e6 or None}
        embedding = p.encode(x)
        row["cosine"] = float(F.cosine_similarity(torch.from_numpy(np.asarray(embedding, np.float64)).flatten(),
                                                  torch.from_numpy(reference_embedding.astype(np.float64)).flatten(),
                                                  dim=0))
        if boxes is not None:
            row["e2e_s"], row["e2e_timing"] = e2e[p.name].median, e2e[p.name].to_dict()
            masks = p.decode(embedding, boxes)
            row["e2e_box_iou"] = float(np.mean([mask_iou(a, b) for a, b in zip(reference_masks, masks)]))
            truth = [sample.objects[q.object_index] for q in sample.prompts if q.kind == "box"]
            row["e2e_gt_miou"] = 100 * float(np.mean([mask_iou(m, t) for m, t in zip(masks, truth)]))
            report = compare(reference, with_encoder(model, RuntimeEncoder(p.encode, int(model.image_encoder.img_size))),
                             images=[sample])
            row["box_iou"] = report.box_mask_iou_mean
            row["gt_miou"] = None if report.gt_miou_optimized is None else 100 * report.gt_miou_optimized
        rows.append(row)
        print(f"  {p.name}: encoder {row['encoder_s']:.3f} s, cosine {row['cosine']:.5f}"
              + (f", e2e {row['e2e_s']:.3f} s, box IoU {row['e2e_box_iou']:.4f}" if boxes is not None else ""),
              flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
