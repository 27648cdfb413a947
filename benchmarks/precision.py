"""fuse_attention and reduced precision on one device: fidelity on LiteMedSAM's
real weights and image-encoder latency, side by side in one run.

    python -m benchmarks precision --device cuda
    python -m benchmarks precision --device cpu --models sam_vit_b --variants fp32,fuse_attention

For each model and variant (a pass list) it reports the image encoder's median
latency on ``--device`` (one image; SAM ViT-B at 1024 px, LiteMedSAM at 256 px;
a model's variants timed in :func:`samfx.bench.interleaved`'s turns) and its speedup over the float32 original, and against the original on
``coins``: the embedding cosine, the mask IoU over every prompt (LiteMedSAM's
point prompts give near-empty masks, where a pixel flips the IoU), over box
prompts only, and the box-prompt mIoU against the ground truth (24 coins).
SAM ViT-B has random weights: only its cosine and latency mean something.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import samfx  # noqa: E402
from samfx.bench import interleaved, markdown_table, run_note, write_results  # noqa: E402
from samfx.passes import BF16Config, FuseAttentionConfig  # noqa: E402
from samfx.pipeline import resolve_passes, run_passes  # noqa: E402

VARIANTS = {
    "fp32": (),
    "fuse_attention": (FuseAttentionConfig(),),
    "fuse_attention+bf16": (FuseAttentionConfig(), BF16Config()),
    "fuse_attention+fp16": (FuseAttentionConfig(), BF16Config(dtype="float16")),
}


def optimized(model: torch.nn.Module, configs: tuple) -> torch.nn.Module:
    """The passes applied to a private copy (``samfx.optimize`` without its statistics)."""
    captured = samfx.capture(model)
    run_passes(captured, resolve_passes(configs)[0])
    return captured.model


def encoder_runs(models: dict[str, torch.nn.Module], device: str) -> dict[str, Callable[[], None]]:
    """Per variant, one image through its encoder (synchronised on a GPU), for :func:`interleaved`."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(encoder: torch.nn.Module, x: torch.Tensor) -> None:
        with torch.inference_mode():
            encoder(x)
        sync()

    runs = {}
    for name, model in models.items():
        x = torch.randn(1, 3, model.image_encoder.img_size, model.image_encoder.img_size, device=device)
        runs[name] = lambda encoder=model.image_encoder, x=x: run(encoder, x)
    return runs


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
        candidates = {}
        for variant in variants:
            print(f"  {name} {variant}", file=sys.stderr, flush=True)
            configs = VARIANTS[variant]
            candidates[variant] = optimized(original, configs).to(device) if configs else reference
        # Every variant in turns against the others, after two warm-up runs each (allocator, autotuning).
        runs = encoder_runs(candidates, device)
        times = interleaved(runs, repeats, warmup=2)
        base = times[variants[0]].median
        for variant, model in candidates.items():
            latency = times[variant].median
            row = {"model": name, "variant": variant, "encoder_ms": 1e3 * latency, "speedup": base / latency}
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                runs[variant]()
                row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            row.update(fidelity(reference, model, trained))
            rows.append(row)
        del candidates, runs
    return rows


def table(rows: list[dict]) -> str:
    gt = lambda r: "->".join(f"{100 * v:.1f}" for v in r["gt_miou"]) if r.get("gt_miou") else None  # noqa: E731
    return markdown_table(rows, [("model", "model", "{}"), ("variant", "variant", "{}"), ("encoder ms", "encoder_ms", "{:.2f}"),
                                 ("speed-up", "speedup", "{:.2f}"), ("peak MB", "peak_mb", "{:.0f}"),
                                 ("cosine", "cosine", "{:.5f}"), ("IoU all", "iou_all", "{:.5f}"),
                                 ("IoU box", "iou_box", "{:.5f}"), ("IoU box min", "iou_box_min", "{:.5f}"),
                                 ("GT mIoU", gt, "{}")])


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
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(table(rows))
    print(f"\n{device}; {run_note(args.repeats, warmup=2, what='encoder latency')}")
    out = write_results(args.out or f"benchmarks/results/precision_{args.device}.json", {"device": device, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
