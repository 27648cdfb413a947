"""fuse_attention and reduced precision on one device: fidelity on LiteMedSAM's
real weights and image-encoder latency, side by side in one run.

    python benchmarks/precision.py --device cuda
    python benchmarks/precision.py --device cpu --models sam_vit_b --variants fp32,fuse_attention

For each model and variant (a pass list) it reports the image encoder's median
latency on ``--device`` (one image; SAM ViT-B at 1024 px, LiteMedSAM at 256 px)
and its speedup over the float32 original, and against the original on
``coins``: the embedding cosine, the mask IoU over every prompt (LiteMedSAM's
point prompts give near-empty masks, where a pixel flips the IoU), over box
prompts only, and the box-prompt mIoU against the ground truth (24 coins).
SAM ViT-B has random weights: only its cosine and latency mean something.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import samfx  # noqa: E402
from samfx.passes import BF16Config, FuseAttentionConfig, PassContext, get_pass  # noqa: E402

VARIANTS = {
    "fp32": (),
    "fuse_attention": (FuseAttentionConfig(),),
    "fuse_attention+bf16": (FuseAttentionConfig(), BF16Config()),
    "fuse_attention+fp16": (FuseAttentionConfig(), BF16Config(dtype="float16")),
}


def optimized(model: torch.nn.Module, configs: tuple) -> torch.nn.Module:
    """The passes applied to a private copy (``samfx.optimize`` without its statistics)."""
    captured = samfx.capture(model)
    for config in configs:
        get_pass(config.name).run(captured, config, PassContext())
        captured.recompile()
    return captured.model


def encoder_latency(model: torch.nn.Module, device: str, repeats: int) -> float:
    encoder = model.image_encoder
    x = torch.randn(1, 3, encoder.img_size, encoder.img_size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            sync()
            start = time.perf_counter()
            encoder(x)
            sync()
            if i >= 2:  # warm-up: allocator, autotuning
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def fidelity(original: torch.nn.Module, candidate: torch.nn.Module, trained: bool) -> dict:
    if not trained:  # random weights: masks mean nothing, one image's embedding is enough
        report = samfx.fidelity.compare(original, candidate, ["coins"], max_prompts_per_image=1)
        return {"cosine": report.embedding_cosine_min}
    report = samfx.fidelity.compare(original, candidate, ["coins"])
    return {"cosine": report.embedding_cosine_min, "iou_all": report.mask_iou_mean,
            "iou_box": report.box_mask_iou_mean, "iou_box_min": report.box_mask_iou_min,
            "gt_miou": [report.gt_miou_original, report.gt_miou_optimized]}


def run(models: list[str], variants: list[str], device: str, repeats: int) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        original = samfx.models.build(name).eval()  # stays on the CPU: passes run there
        trained = samfx.models.spec(name).pretrained
        reference = copy.deepcopy(original).to(device)
        base = None
        for variant in variants:
            print(f"  {name} {variant}", file=sys.stderr, flush=True)
            configs = VARIANTS[variant]
            model = optimized(original, configs).to(device) if configs else reference
            latency = encoder_latency(model, device, repeats)
            base = base or latency
            row = {"model": name, "variant": variant, "encoder_ms": 1e3 * latency, "speedup": base / latency}
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                encoder_latency(model, device, 1)
                row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            row.update(fidelity(reference, model, trained))
            rows.append(row)
            del model
    return rows


def table(rows: list[dict]) -> str:
    columns = ["model", "variant", "encoder_ms", "speedup", "peak_mb", "cosine", "iou_all", "iou_box", "iou_box_min",
               "gt_miou"]

    def cell(column, value):
        if isinstance(value, list):
            return "->".join(f"{100 * v:.1f}" for v in value)
        if isinstance(value, float):
            return f"{value:.5f}" if column in ("cosine", "iou_all", "iou_box", "iou_box_min") else f"{value:.2f}"
        return "-" if value is None else str(value)

    cells = [[cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="lite_medsam,sam_vit_b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.models.split(","), args.variants.split(","), args.device, args.repeats)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    print(table(rows))
    print(f"\n{env['device']}, torch {env['torch']}, {env['threads']} CPU threads; encoder latency: median of "
          f"{args.repeats} after 2 warm-up runs")
    out = Path(args.out or f"benchmarks/results/precision_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
