"""Issue 16's tuner target: ``samfx tune`` on LiteMedSAM, against the preset, in one run.

    python -m benchmarks tune                       # the target: latency on OpenVINO, box IoU >= 0.98, 20 minutes
    python -m benchmarks tune --budget 4m           # a short check

The search is ``samfx tune --model lite_medsam --objective latency --runtime
openvino --min-box-iou 0.98 --budget 20m`` (package photos: the presets'
calibration photos calibrate, coins, astronaut and coffee are held out). Then
the best recipe and the ``lite_medsam_cpu`` preset are each timed against the
original with :func:`samfx.bench.deployment_bench` on the same runtime (the
encoder and all the boxes of coins in one batched call, interleaved, medians),
with their box-prompt mask IoU against the original on the held-out photos.
The target: the tuned recipe at least as fast as the preset (the fastest
hand-picked recipe of the deploy benchmark), at the floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import samfx  # noqa: E402
from samfx.bench import deployment_bench, markdown_table, write_results  # noqa: E402
from samfx.presets import get_preset  # noqa: E402
from samfx.tune import OBJECTIVES  # noqa: E402

_BENCH_RUNTIME = {"torch": "eager", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--preset", default="lite_medsam_cpu", help="the hand-picked recipe to beat")
    parser.add_argument("--objective", default="latency", choices=OBJECTIVES)
    parser.add_argument("--runtime", default="openvino", choices=tuple(_BENCH_RUNTIME))
    parser.add_argument("--min-box-iou", type=float, default=0.98)
    parser.add_argument("--budget", default="20m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the final comparison")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/tune-MODEL.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = samfx.models.build(args.model).eval()
    result = samfx.tune(model, objective=args.objective, runtime=args.runtime, min_box_iou=args.min_box_iou,
                        budget=args.budget, threads=args.threads, model_name=args.model)
    print(f"\n{result.table()}\n\nbest: {result.best.passes or '(the original)'}", flush=True)
    out_dir = Path(args.out).parent if args.out else Path("benchmarks/results")
    recipe = result.save_recipe(out_dir / f"tune-{args.model}-recipe.json")
    result.plot(out_dir / f"tune-{args.model}-front.png")

    # Side by side after the search: the preset and the tuned recipe, each against the original.
    preset = get_preset(args.preset).optimize(model)
    contenders = {f"preset {args.preset}": preset, f"tuned: {result.best.passes or '(original)'}":
                  result.best_model if result.best_model is not None else model}
    rows = []
    for label, optimized in contenders.items():
        bench = deployment_bench(model, optimized, runtimes=[_BENCH_RUNTIME[args.runtime]], repeats=args.repeats,
                                 threads=args.threads, fidelity_images=tuple(result.images["evaluation"]))
        row = next(r for r in bench["rows"] if r["model"] == "optimized")
        rows.append({**row, "case": label})
    rows[1]["vs_preset"] = rows[0]["image_s"] / rows[1]["image_s"]
    rows[0]["vs_preset"] = 1.0
    table = markdown_table(rows, [("recipe", "case", "{}"), ("x original", "speedup", "{:.2f}x"),
                                  ("x preset", "vs_preset", "{:.2f}x"),
                                  ("encoder + boxes ms", lambda r: 1e3 * r["image_s"], "{:.1f}"),
                                  ("box IoU vs original (held out)", "box_mask_iou", "{:.4f}"),
                                  ("MB", lambda r: r["disk_bytes"] / 1e6, "{:.1f}")])
    reached = rows[1]["vs_preset"] >= 1.0 and rows[1]["box_mask_iou"] >= args.min_box_iou
    print(f"\n{table}\n\n{args.threads} threads, medians of {args.repeats} interleaved runs, "
          f"{result.recipe['isa']['summary']}; target (tuned at least as fast as the preset, at the floor): "
          f"{'reached' if reached else 'not reached'}")
    path = write_results(args.out or out_dir / f"tune-{args.model}.json",
                         {"model": args.model, "recipe": result.recipe, "front_table": result.table(),
                          "candidates": [c.to_dict() for c in result.candidates], "comparison": rows,
                          "table": table, "target_reached": reached, "seconds": time.perf_counter() - start})
    print(f"\nwrote {path} and {recipe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
