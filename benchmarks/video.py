"""SAM 2.1's video path: per-frame latency of the original against optimized models.

    python -m benchmarks video                                    # Hiera-T at 1024 px, 8 frames
    python -m benchmarks video --small --frames 6 --repeats 2     # the test configuration, seconds
    python -m benchmarks video --passes split_qkv+fuse_attention --passes bf16 --onnx

Each candidate tracks one click through a synthetic clip
(:func:`samfx.data.synthetic_clip`) with the upstream API
(``init_state``, ``add_new_points_or_box``, ``propagate_in_video``): per
frame the image encoder, the memory attention (RoPE over up to 7 memories and
the object pointers), the decoder and the memory encoder. ``ms/frame`` is the
median clip time (:func:`samfx.bench.interleaved`) over the frames;
``speedup`` is against the original. ``--onnx`` adds the exported graphs run
by the torch-free loop (:mod:`samfx.emit.video_runtime`). ``min IoU`` is the
worst per-frame mask IoU against the original; with random weights (no
checkpoint is available offline) the object-score head marks tracked frames
empty, so it is raised by 10 for this benchmark as in the unit tests, and the
figures say that the path follows the original, not how well it segments.
Writes ``benchmarks/results/video.json``.
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
from samfx.adapters.sam2_video import track  # noqa: E402
from samfx.bench import interleaved, markdown_table, write_results  # noqa: E402
from samfx.data import synthetic_clip  # noqa: E402
from samfx.fidelity import mask_iou  # noqa: E402

MEMORY_ROLES = ("image_encoder", "mask_decoder", "memory_attention", "memory_encoder")
DEFAULT_PASSES = ["split_qkv+fuse_attention", "bf16"]


def _passes(spec: str) -> list:
    # bf16 casts the memory components too (its default is the image model's encoder and decoder).
    return [samfx.passes.BF16Config(roles=MEMORY_ROLES) if name == "bf16" else name for name in spec.split("+")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sam2.1_hiera_t_video",
                        choices=[n for n in samfx.models.list_models() if n.endswith("_video")])
    parser.add_argument("--small", action="store_true", help="the small test configuration")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--passes", action="append", help="passes joined by '+' (repeatable); "
                        f"default: {' '.join(DEFAULT_PASSES)}")
    parser.add_argument("--onnx", action="store_true", help="also the exported graphs in the torch-free loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "video.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = samfx.models.build(args.model, small=args.small)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += 10
    scratch = tempfile.TemporaryDirectory()
    clip = synthetic_clip(Path(scratch.name) / "frames", frames=args.frames)
    prompt = ([clip.click], [1])
    models = {"original": model}
    for spec in args.passes or DEFAULT_PASSES:
        models[spec] = samfx.optimize(model, _passes(spec))
    candidates = {name: (lambda m=m: track(m, clip.directory, *prompt)) for name, m in models.items()}
    if args.onnx:
        from samfx.emit import video_runtime
        from samfx.emit.video import export_video

        best = list(models)[1] if len(models) > 1 else "original"
        export = export_video(models[best], Path(scratch.name) / "onnx")
        tracker = video_runtime.load(export.directory, threads=args.threads)
        candidates[f"onnxruntime ({best})"] = lambda: [torch.from_numpy(t) for t in tracker.track(clip.directory,
                                                                                                    *prompt)]
    reference = track(model, clip.directory, *prompt)
    rows = []
    timings = interleaved(candidates, repeats=args.repeats)
    base = timings["original"].median
    for name, timing in timings.items():
        tracked = candidates[name]()
        ious = [mask_iou((a > 0).numpy(), (b > 0).numpy()) for a, b in zip(tracked, reference)]
        rows.append({"candidate": name, "ms_per_frame": 1e3 * timing.median / args.frames,
                     "speedup": base / timing.median, "min_iou": min(ious), "per_frame_iou": ious})
    columns = [("candidate", "candidate", "{}"), ("ms/frame", "ms_per_frame", "{:.1f}"),
               ("speedup", "speedup", "{:.2f}x"), ("min IoU", "min_iou", "{:.4f}")]
    print(f"{args.model}{' (small)' if args.small else ''}, {args.frames} frames, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(markdown_table(rows, columns))
    path = write_results(args.out, {"model": args.model, "small": args.small, "frames": args.frames,
                                    "threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {path}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
