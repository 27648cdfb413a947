"""The quantize pass against fp32 and onnxruntime's ``quantize_dynamic``, side by side.

    python -m benchmarks quantize --model lite_medsam
    python -m benchmarks quantize --model sam_vit_b --images coins --repeats 2

For one zoo model it builds five image encoders and times them interleaved in
one process (one image, the predictor's input size):

* ``torch fp32``: the original, eager;
* ``torch int8``: after ``samfx.optimize(model, [QuantizeConfig(...)])``, eager,
  on oneDNN int8 kernels;
* ``ort fp32``: the original exported to ONNX, onnxruntime CPU;
* ``ort quantize_dynamic``: that file through
  ``onnxruntime.quantization.quantize_dynamic`` (QUInt8 weights, the SAM
  community's default);
* ``ort samfx int8``: the quantized model exported as QDQ with the same
  calibrated grids (:mod:`samfx.emit.quantized_onnx`).

Fidelity of each against the original goes through the family's predictor on
package images (the onnxruntime encoders are plugged in front of the original's
prompt encoder and decoder): box-prompt mask IoU, mean mask IoU over all
prompts, embedding cosine and, on ``coins``, ground-truth mIoU. Only the
encoder is swapped for the onnxruntime rows; ``torch int8`` also has its
decoder quantized. Thread settings are fixed and recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import samfx  # noqa: E402
from benchmarks.deploy import RuntimeEncoder, ort_run, with_encoder  # noqa: E402
from samfx.bench import interleaved, markdown_table, run_note, timed, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--images", nargs="+", default=["coins", "astronaut", "coffee"])
    parser.add_argument("--attention-matmuls", action="store_true", help="quantize attention products too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from samfx.emit.quantized_onnx import export

    torch.manual_seed(0)
    model = samfx.models.build(args.model)
    config = samfx.QuantizeConfig(attention_matmuls=args.attention_matmuls)
    quantized, optimize_s = timed(lambda: samfx.optimize(model, [config], model_name=args.model))
    size = int(model.image_encoder.img_size)
    x = torch.randn(1, 3, size, size)
    tmp = Path(tempfile.mkdtemp(prefix="samfx-quantize-"))
    fp32_path = export(model.image_encoder, (x,), tmp / "fp32.onnx")
    dynamic_path = tmp / "dynamic.onnx"
    quantize_dynamic(str(fp32_path), str(dynamic_path), weight_type=QuantType.QUInt8)
    int8_path = export(quantized.image_encoder, (x,), tmp / "int8.onnx")
    encoders = {
        "torch fp32": model.image_encoder,
        "torch int8 (samfx)": quantized.image_encoder,
        "ort fp32": RuntimeEncoder(ort_run(fp32_path, args.threads), size),
        "ort quantize_dynamic": RuntimeEncoder(ort_run(dynamic_path, args.threads), size),
        "ort int8 (samfx QDQ)": RuntimeEncoder(ort_run(int8_path, args.threads), size),
    }
    with torch.inference_mode():
        times = [t.median for t in interleaved({n: (lambda e=e: e(x)) for n, e in encoders.items()}, args.repeats).values()]
    models = {"torch fp32": model, "torch int8 (samfx)": quantized}
    for name in ("ort fp32", "ort quantize_dynamic", "ort int8 (samfx QDQ)"):
        models[name] = with_encoder(model, encoders[name])
    rows = []
    for (name, encoder_s), variant in zip(zip(encoders, times), models.values()):
        fidelity = samfx.fidelity.compare(model, variant, images=args.images)
        rows.append({"encoder": name, "encoder_s": encoder_s, "speedup_vs_torch_fp32": times[0] / encoder_s,
                     "speedup_vs_ort_fp32": times[2] / encoder_s, "file_mb": None,
                     **{k: getattr(fidelity, k) for k in ("box_mask_iou_mean", "mask_iou_mean", "mask_iou_min",
                                                          "embedding_cosine_mean", "gt_miou_original",
                                                          "gt_miou_optimized")}})
    for row, path in zip(rows[2:], (fp32_path, dynamic_path, int8_path)):
        row["file_mb"] = Path(path).stat().st_size / 1e6
    print(f"{args.model}, quantize {config.to_dict()}\n")
    print(markdown_table(rows, [
        ("encoder", "encoder", "{}"), ("enc s", "encoder_s", "{:.3f}"), ("x torch", "speedup_vs_torch_fp32", "{:.2f}x"),
        ("x ort", "speedup_vs_ort_fp32", "{:.2f}x"), ("box IoU", lambda r: r["box_mask_iou_mean"] or 1.0, "{:.4f}"),
        ("mIoU", "mask_iou_mean", "{:.4f}"), ("cosine", "embedding_cosine_mean", "{:.5f}"),
        ("GT mIoU", lambda r: r["gt_miou_optimized"] and 100 * r["gt_miou_optimized"], "{:.1f}"),
        ("MB", "file_mb", "{:.1f}"),
    ]))
    print(f"\n{run_note(args.repeats)}; onnxruntime {ort.__version__}, {args.threads} intra-op threads; "
          f"images {args.images}; optimize took {optimize_s:.0f} s")
    out = write_results(args.out or f"benchmarks/results/quantize-{args.model}.json",
                        {"model": args.model, "config": config.to_dict(), "onnxruntime": ort.__version__,
                         "ort_intra_op_threads": args.threads, "repeats": args.repeats, "images": args.images,
                         "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
