"""samfx emitter benchmarks: the torch.compile backend and the ONNX pair, side by side in one run.

    python -m benchmarks emit                          # both parts, prints tables, writes JSON
    python -m benchmarks emit --part compile --repeats 3
    python -m benchmarks emit --part onnx --case lite_medsam/split_qkv

compile: the SAM ViT-B image encoder (1024 x 1024, random weights) in eager
PyTorch, under ``torch.compile(backend="inductor")`` and under
``torch.compile(backend="samfx")``, timed interleaved in one process; the
compile time is the first call minus a steady call.

onnx: for each case (a zoo model and a pass list), the model is optimized and
exported with ``samfx.export_onnx``; the torch predictor of the family and the
torch-free runtime (``samfx.emit.runtime.OnnxPredictor``) run interleaved on the
``coins`` image (encoder: one image; decoder: one box prompt), and their masks
are compared on package images with every prompt (box and click per object):
mask IoU of onnxruntime's masks against torch's, and, for LiteMedSAM's real
weights, box-prompt mIoU against the coins' ground truth. File sizes include
external data.

Thread settings are fixed and recorded; absolute times on a shared machine are
noise, ratios are not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass

# Busy-waiting OpenMP threads slow 2-core runs several-fold when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import samfx  # noqa: E402
from samfx.bench import interleaved, markdown_table, run_note, timed, write_results  # noqa: E402
from samfx.data import package_images  # noqa: E402
from samfx.emit.compile import samfx_backend  # noqa: E402
from samfx.emit.runtime import OnnxPredictor  # noqa: E402
from samfx.fidelity import mask_iou  # noqa: E402


@dataclass(frozen=True)
class OnnxCase:
    model: str
    passes: tuple[str, ...]
    images: tuple[str, ...] = ("coins", "astronaut", "coffee")

    @property
    def name(self) -> str:
        return f"{self.model}/{'+'.join(self.passes) or 'plain'}"


# Later passes add their rows here.
ONNX_CASES = [
    OnnxCase("lite_medsam", ()),
    OnnxCase("lite_medsam", ("split_qkv",)),
    OnnxCase("lite_medsam", ("fuse_attention",)),
    OnnxCase("lite_medsam", ("hyper",)),
    OnnxCase("lite_medsam", ("token_cluster",)),
    OnnxCase("sam_vit_b", ("split_qkv",), images=("coins",)),
    OnnxCase("sam_vit_b", ("fuse_attention",), images=("coins",)),
]


def _medians(fns: dict, repeats: int) -> dict[str, float]:
    return {name: timing.median for name, timing in interleaved(fns, repeats).items()}


def bench_compile(repeats: int, scope: str = "encoder") -> dict:
    torch.manual_seed(0)
    encoder = samfx.models.build("sam_vit_b").image_encoder.eval()
    x = torch.randn(1, 3, 1024, 1024)
    label = "sam_vit_b image encoder, 1024 x 1024"
    if scope == "block":  # one global-attention block (4096 tokens): a quick run on a busy machine
        index = next(i for i, b in enumerate(encoder.blocks) if not b.window_size)
        encoder, x = encoder.blocks[index], torch.randn(1, 64, 64, encoder.patch_embed.proj.out_channels)
        label = f"sam_vit_b image encoder block {index} (global attention, 64 x 64 tokens)"
    variants = {
        "eager": encoder,
        "inductor": torch.compile(encoder, backend="inductor"),
        # The same as backend="samfx" once samfx is installed (entry point); the callable also works from a checkout.
        "samfx": torch.compile(encoder, backend=samfx_backend),
    }
    rows: dict[str, dict] = {}
    with torch.no_grad():
        reference = encoder(x)
        for name, fn in variants.items():
            print(f"compile: first call of {name} ...", file=sys.stderr, flush=True)
            _, first = timed(lambda fn=fn: fn(x))
            error = float((fn(x) - reference).abs().max())
            rows[name] = {"first_call_s": first, "max_abs_diff_vs_eager": error}
        latency = _medians({k: (lambda fn=fn: fn(x)) for k, fn in variants.items()}, repeats)
    for name, row in rows.items():
        row["latency_s"] = latency[name]
        row["compile_s"] = row["first_call_s"] - latency[name] if name != "eager" else 0.0
        row["speedup_vs_eager"] = latency["eager"] / latency[name]
    rows["samfx"]["speedup_vs_inductor"] = latency["inductor"] / latency["samfx"]
    return {"model": label, "variants": rows}


def compile_table(result: dict) -> str:
    rows = [{"backend": name, **r} for name, r in result["variants"].items()]
    table = markdown_table(rows, [("backend", "backend", "{}"), ("latency s", "latency_s", "{:.2f}"),
                                  ("x eager", "speedup_vs_eager", "{:.2f}x"), ("compile s", "compile_s", "{:.1f}"),
                                  ("max abs diff", "max_abs_diff_vs_eager", "{:.1e}")])
    return (f"{result['model']}\n\n{table}\n\n"
            f"samfx vs inductor: {result['variants']['samfx']['speedup_vs_inductor']:.2f}x")


def bench_onnx_case(case: OnnxCase, repeats: int, threads: int) -> dict:
    torch.manual_seed(0)
    model = samfx.models.build(case.model).eval()
    optimized = samfx.optimize(model, list(case.passes), model_name=case.model) if case.passes else model
    adapter = samfx.adapters.find_adapter(model)
    with tempfile.TemporaryDirectory() as out:
        export = samfx.export_onnx(optimized, out)
        runtime = OnnxPredictor(out, threads=threads)
        predictor = adapter.predictor(optimized)
        coins = package_images(["coins"])[0]
        box = np.array(next(p.coords for p in coins.prompts if p.kind == "box"))
        with torch.inference_mode():
            encoder = _medians({"torch": lambda: predictor.set_image(coins.image),
                                    "onnx": lambda: runtime.set_image(coins.image)}, repeats)
            decoder = _medians({"torch": lambda: predictor.predict(box=box, multimask_output=True),
                                    "onnx": lambda: runtime.predict(box=box)}, repeats * 5)
            fidelity = _fidelity(predictor, runtime, case, adapter)
    return {
        "case": case.name,
        "export_s": export.export_s,
        "sizes_bytes": export.sizes,
        "export_check_worst_mask_iou": export.worst_mask_iou,
        "encoder_torch_s": encoder["torch"], "encoder_onnx_s": encoder["onnx"],
        "decoder_torch_s": decoder["torch"], "decoder_onnx_s": decoder["onnx"],
        **fidelity,
    }


def _fidelity(predictor, runtime: OnnxPredictor, case: OnnxCase, adapter) -> dict:
    ious, truth_torch, truth_onnx = [], [], []
    for sample in package_images(case.images):
        predictor.set_image(sample.image)
        runtime.set_image(sample.image)
        for prompt in sample.prompts:
            kwargs = prompt.as_kwargs()
            kwargs.pop("multimask_output")
            masks, _ = predictor.predict(**kwargs, multimask_output=True)
            onnx_masks, _, _ = runtime.predict(**{k: v for k, v in kwargs.items() if v is not None})
            ious += [mask_iou(a, b) for a, b in zip(masks, onnx_masks)]
            if sample.has_ground_truth and prompt.kind == "box":
                truth = sample.objects[prompt.object_index]
                truth_torch.append(max(mask_iou(m, truth) for m in masks[:1]))
                truth_onnx.append(max(mask_iou(m, truth) for m in onnx_masks[:1]))
    trained = samfx.models.spec(case.model).pretrained
    return {"images": list(case.images), "masks_compared": len(ious), "mask_iou_mean": float(np.mean(ious)),
            "mask_iou_min": float(np.min(ious)),
            "gt_miou_torch": float(np.mean(truth_torch)) if trained and truth_torch else None,
            "gt_miou_onnx": float(np.mean(truth_onnx)) if trained and truth_onnx else None}


def onnx_table(rows: list[dict]) -> str:
    def gt(r: dict) -> str | None:
        return None if r["gt_miou_torch"] is None else f"{100 * r['gt_miou_torch']:.1f}/{100 * r['gt_miou_onnx']:.1f}"

    return markdown_table(rows, [
        ("case", "case", "{}"),
        ("enc MB", lambda r: r["sizes_bytes"]["encoder"] / 1e6, "{:.1f}"),
        ("dec MB", lambda r: r["sizes_bytes"]["decoder"] / 1e6, "{:.1f}"),
        ("enc torch s", "encoder_torch_s", "{:.3f}"), ("enc ort s", "encoder_onnx_s", "{:.3f}"),
        ("x", lambda r: r["encoder_torch_s"] / r["encoder_onnx_s"], "{:.2f}x"),
        ("dec torch ms", lambda r: 1e3 * r["decoder_torch_s"], "{:.1f}"),
        ("dec ort ms", lambda r: 1e3 * r["decoder_onnx_s"], "{:.1f}"),
        ("x", lambda r: r["decoder_torch_s"] / r["decoder_onnx_s"], "{:.2f}x"),
        ("IoU mean", "mask_iou_mean", "{:.4f}"), ("IoU min", "mask_iou_min", "{:.4f}"),
        ("GT mIoU torch/ort", gt, "{}"),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("compile", "onnx", "all"), default="all")
    parser.add_argument("--compile-scope", choices=("encoder", "block"), default="encoder",
                        help="compile part: the whole encoder, or one global-attention block")
    parser.add_argument("--case", action="append", help="ONNX cases to run (model/passes), repeatable")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--out", default="benchmarks/results/emit.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"repeats": args.repeats}
    if args.part in ("compile", "all"):
        result["compile"] = bench_compile(args.repeats, args.compile_scope)
        print(compile_table(result["compile"]))
    if args.part in ("onnx", "all"):
        cases = [c for c in ONNX_CASES if not args.case or c.name in args.case]
        if not cases:
            parser.error(f"no case matches {args.case}; cases: {[c.name for c in ONNX_CASES]}")
        rows = []
        for case in cases:
            print(f"onnx: {case.name} ...", file=sys.stderr, flush=True)
            rows.append(bench_onnx_case(case, args.repeats, args.threads))
        result["onnx"] = rows
        print(onnx_table(rows))
    print(f"\n{run_note(args.repeats)} (decoder: {5 * args.repeats}); onnxruntime {args.threads} intra-op threads")
    print(f"wrote {write_results(args.out, {**result, 'onnxruntime_threads': args.threads})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
