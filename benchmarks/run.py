"""samfx benchmarks: original vs optimized, side by side in one run.

    python benchmarks/run.py                       # every case, prints a table, writes JSON
    python benchmarks/run.py --case lite_medsam/split_qkv --repeats 5

For each case (a zoo model and a pass list) it reports parameters, weight
bytes, encoder MACs, the latency of the original and the optimized model
measured interleaved (A, B, A, B, ...) in the same process, their ratio, and
fidelity against the original on package images. Thread settings are fixed
and recorded; absolute times on a shared machine are noise, ratios are not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Busy-waiting OpenMP threads slow 2-core runs several-fold when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import samfx  # noqa: E402
from samfx.data import package_images  # noqa: E402
from samfx.report import environment  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str
    passes: tuple[str, ...]
    images: tuple[str, ...] = ("coins", "astronaut", "coffee")

    @property
    def name(self) -> str:
        return f"{self.model}/{'+'.join(self.passes)}"


# Later passes add their rows here.
CASES = [
    Case("lite_medsam", ("split_qkv",)),
    Case("sam_vit_b", ("split_qkv",), images=("coins",)),
    Case("sam2.1_hiera_b+", ("split_qkv",), images=("coins",)),
    Case("lite_medsam", ("quantize",)),
    Case("sam_vit_b", ("quantize",), images=("coins",)),
]


def _interleaved(fns: list, repeats: int) -> list[float]:
    """Median seconds of each function, run in turns so drifts hit all alike."""
    for fn in fns:  # warm-up
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _latencies(original: torch.nn.Module, optimized: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Image-encoder latency (one image) and decoder latency (one box prompt)."""
    image = package_images(["coins"])[0].image
    adapter = samfx.adapters.find_adapter(original)
    predictors = [adapter.predictor(m) for m in (original, optimized)]
    box = {"box": np.array([20.0, 20.0, 120.0, 110.0]), "multimask_output": False}
    with torch.inference_mode():
        encoder = _interleaved([lambda p=p: p.set_image(image) for p in predictors], repeats)
        decoder = _interleaved([lambda p=p: p.predict(**box) for p in predictors], repeats * 5)
    return {"encoder_original_s": encoder[0], "encoder_optimized_s": encoder[1],
            "encoder_speedup": encoder[0] / encoder[1],
            "decoder_original_s": decoder[0], "decoder_optimized_s": decoder[1],
            "decoder_speedup": decoder[0] / decoder[1]}


def run_case(case: Case, repeats: int, fidelity: bool) -> dict:
    torch.manual_seed(0)
    model = samfx.models.build(case.model)
    start = time.perf_counter()
    optimized = samfx.optimize(model, list(case.passes), fidelity=case.images if fidelity else False,
                               model_name=case.model)
    total = time.perf_counter() - start
    report = optimized.samfx_report
    row = {
        "case": case.name,
        "optimize_s": total,
        "pass_s": {p.name: p.time_s for p in report.passes},
        "params": [report.before.params, report.after.params],
        "weight_bytes": [report.before.weight_bytes, report.after.weight_bytes],
        "encoder_macs": [report.before.macs.get("image_encoder"), report.after.macs.get("image_encoder")],
        **_latencies(model, optimized, repeats),
    }
    if report.fidelity is not None:
        f = report.fidelity
        # Ground truth only says something about a model with trained weights.
        trained = samfx.models.spec(case.model).pretrained
        row["fidelity"] = {"images": f.images, "prompts": f.prompts, "mask_iou_mean": f.mask_iou_mean,
                           "mask_iou_min": f.mask_iou_min, "embedding_cosine_min": f.embedding_cosine_min,
                           "iou_pred_error_max": f.iou_pred_error_max,
                           "gt_miou": [f.gt_miou_original, f.gt_miou_optimized] if trained else [None, None]}
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'case':<30}{'params':>10}{'MB':>9}{'GMACs':>8}{'enc s':>8}{'enc x':>7}{'dec ms':>8}{'dec x':>7}"
            f"{'mIoU vs orig':>14}{'cos min':>10}{'GT mIoU':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        f = r.get("fidelity")
        gt = f and f["gt_miou"][0] is not None
        lines.append(
            f"{r['case']:<30}{r['params'][1] / 1e6:>9.2f}M{r['weight_bytes'][1] / 1e6:>9.1f}"
            f"{r['encoder_macs'][1] / 1e9:>8.1f}{r['encoder_optimized_s']:>8.2f}{r['encoder_speedup']:>6.2f}x"
            f"{1e3 * r['decoder_optimized_s']:>8.1f}{r['decoder_speedup']:>6.2f}x"
            + (f"{f['mask_iou_mean']:>14.4f}{f['embedding_cosine_min']:>10.5f}" if f else f"{'-':>14}{'-':>10}")
            + (f"{100 * f['gt_miou'][0]:>7.1f}->{100 * f['gt_miou'][1]:<5.1f}" if gt else f"{'-':>14}")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help="run only these cases (model/passes), repeatable")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/latest.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if not args.case or c.name in args.case]
    if not cases:
        parser.error(f"no case matches {args.case}; cases: {[c.name for c in CASES]}")
    rows = []
    for case in cases:
        print(f"running {case.name} ...", file=sys.stderr, flush=True)
        rows.append(run_case(case, args.repeats, not args.no_fidelity))
    print(table(rows))
    env = environment()
    print(f"\ntorch {env['torch']}, {env['torch_threads']} threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, "
          f"{env['cpu_count']} CPUs; latencies are medians of {args.repeats} interleaved runs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
