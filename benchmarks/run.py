"""samfx benchmarks: original vs optimized, side by side in one run.

    python -m benchmarks run                       # every case, prints a table, writes JSON
    python -m benchmarks run --case lite_medsam/split_qkv --repeats 5
    python -m benchmarks run --token-cluster sam_vit_b --token-cluster sam_vit_h   # tuner, presets, memory

For each case (a zoo model and a pass list) it reports parameters, weight
bytes, encoder MACs, the latency of the original and the optimized model
measured in :func:`samfx.bench.interleaved`'s rotating turns in the same process, their ratio, and
fidelity against the original on package images. Thread settings are fixed
and recorded; absolute times on a shared machine are noise, ratios are not.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

# Busy-waiting OpenMP threads slow 2-core runs several-fold when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import samfx  # noqa: E402
from samfx.bench import interleaved, markdown_table, run_note, timed, write_results  # noqa: E402
from samfx.data import package_images  # noqa: E402
from samfx.distillation import DEFAULT_TRAINING_IMAGES  # noqa: E402
from samfx.passes import PruneConfig  # noqa: E402


@dataclass(frozen=True)
class Case:
    """A zoo model and its passes (names or configs). ``images`` are the fidelity
    photos (none: no fidelity, e.g. for random weights); ``calibration`` the
    package photos handed to data-driven passes; ``distill_minutes`` > 0 runs
    ``samfx.distill`` on the optimized model and measures fidelity again;
    ``latency`` False skips timing (models whose original takes minutes)."""

    model: str
    passes: tuple[Any, ...]
    images: tuple[str, ...] = ("coins", "astronaut", "coffee")
    label: str | None = None
    calibration: tuple[str, ...] = ()
    distill_minutes: float = 0.0
    latency: bool = True

    @property
    def name(self) -> str:
        return f"{self.model}/{self.label or '+'.join(map(str, self.passes))}"


# Later passes add their rows here.
CASES = [
    Case("lite_medsam", ("split_qkv",)),
    Case("sam_vit_b", ("split_qkv",), images=("coins",)),
    Case("sam2.1_hiera_b+", ("split_qkv",), images=("coins",)),
    Case("lite_medsam", ("fuse_attention",)),
    Case("lite_medsam", ("fuse_attention", "bf16")),
    Case("sam_vit_b", ("fuse_attention",), images=("coins",)),
    Case("sam_vit_b", ("fuse_attention", "bf16"), images=("coins",)),
    Case("sam_vit_h", ("fuse_attention",), images=("coins",)),
    # hyper: ratios, errors and Birkhoff's codec side by side are in benchmarks/hyper_codec.py
    Case("lite_medsam", ("hyper",)),
    Case("sam_vit_b", ("hyper",), images=("coins",)),
    Case("sam2.1_hiera_b+", ("hyper",), images=("coins",)),
    # token_cluster tunes itself (mask IoU >= 0.90 vs the original on coins, astronaut, coffee).
    Case("sam_vit_b", ("split_qkv", "token_cluster"), images=("coins",)),
    # SlimSAM's uniform budgets on SAM ViT-B (random weights: sizes and speed only).
    # SlimSAM-50: embed 768 -> 384, head dim 64 -> 32, MLP 3072 -> 1536.
    Case("sam_vit_b", (PruneConfig(mlp=0.5, head_dims=0.5, embed=0.5),), images=(), label="prune-slimsam50"),
    # SlimSAM-77: embed 168, head dim 14, MLP 696.
    Case("sam_vit_b", (PruneConfig(mlp=1 - 696 / 3072, head_dims=1 - 14 / 64, embed=1 - 168 / 768),), images=(),
         label="prune-slimsam77"),
    # Real weights: MLP channels, FLAP fluctuation with bias compensation on the training photos,
    # then CPU self-distillation (fidelity photos are not among the training ones).
    Case("lite_medsam", (PruneConfig(mlp=0.3, importance="fluctuation"),), label="prune-mlp30",
         calibration=DEFAULT_TRAINING_IMAGES, distill_minutes=7.0),
    Case("lite_medsam", (PruneConfig(mlp=0.5, importance="fluctuation"),), label="prune-mlp50",
         calibration=DEFAULT_TRAINING_IMAGES),
    # Pruning time on the largest encoder (magnitude, data-free).
    Case("sam_vit_h", (PruneConfig(mlp=0.5, head_dims=0.5, embed=0.5),), images=(), label="prune-50", latency=False),
    Case("lite_medsam", ("quantize",)),
    Case("sam_vit_b", ("quantize",), images=("coins",)),
]


def _latencies(original: torch.nn.Module, optimized: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Image-encoder latency (one image) and decoder latency (one box prompt)."""
    image = package_images(["coins"])[0].image
    adapter = samfx.adapters.find_adapter(original)
    predictors = [adapter.predictor(m) for m in (original, optimized)]
    box = {"box": np.array([20.0, 20.0, 120.0, 110.0]), "multimask_output": False}
    with torch.inference_mode():
        encoder = [t.median for t in interleaved({i: (lambda p=p: p.set_image(image)) for i, p in enumerate(predictors)},
                                                  repeats).values()]
        decoder = [t.median for t in interleaved({i: (lambda p=p: p.predict(**box)) for i, p in enumerate(predictors)},
                                                  repeats * 5).values()]
    return {"encoder_original_s": encoder[0], "encoder_optimized_s": encoder[1],
            "encoder_speedup": encoder[0] / encoder[1],
            "decoder_original_s": decoder[0], "decoder_optimized_s": decoder[1],
            "decoder_speedup": decoder[0] / decoder[1]}


def run_case(case: Case, repeats: int, fidelity: bool) -> dict:
    torch.manual_seed(0)
    model = samfx.models.build(case.model)
    calibration = [sample.image for sample in package_images(list(case.calibration))] if case.calibration else []
    optimized, total = timed(lambda: samfx.optimize(
        model, list(case.passes), fidelity=case.images if fidelity and case.images else False,
        model_name=case.model, calibration_images=calibration))
    report = optimized.samfx_report
    row = {
        "case": case.name,
        "optimize_s": total,
        "pass_s": {p.name: p.time_s for p in report.passes},
        "params": [report.before.params, report.after.params],
        "weight_bytes": [report.before.weight_bytes, report.after.weight_bytes],
        "encoder_macs": [report.before.macs.get("image_encoder"), report.after.macs.get("image_encoder")],
        **(_latencies(model, optimized, repeats) if case.latency else {}),
    }
    if any(p.name == "prune" for p in report.passes):
        row["encoder_layer_macs"] = [_layer_macs(model), _layer_macs(optimized)]
    # Ground truth only says something about a model with trained weights.
    trained = samfx.models.spec(case.model).pretrained
    if report.fidelity is not None:
        row["fidelity"] = _fidelity_row(report.fidelity, trained)
    if case.distill_minutes > 0:
        distilled = samfx.distill(optimized, model, steps=10_000, max_minutes=case.distill_minutes, progress=False)
        row["distill"] = {"steps": distilled.steps, "time_s": distilled.time_s, "images": distilled.images,
                          "loss": [distilled.losses[0], float(np.mean(distilled.losses[-10:]))]}
        if fidelity and case.images:
            row["distill"]["fidelity"] = _fidelity_row(samfx.fidelity.compare(model, optimized, case.images), trained)
    return row


def _fidelity_row(f: samfx.fidelity.FidelityReport, trained: bool) -> dict:
    return {"images": f.images, "prompts": f.prompts, "mask_iou_mean": f.mask_iou_mean,
            "mask_iou_min": f.mask_iou_min, "box_mask_iou_mean": f.box_mask_iou_mean,
            "embedding_cosine_min": f.embedding_cosine_min, "iou_pred_error_max": f.iou_pred_error_max,
            "gt_miou": [f.gt_miou_original, f.gt_miou_optimized] if trained else [None, None]}


def _layer_macs(model: torch.nn.Module) -> int:
    """Image-encoder MACs of the layers with weights (convolutions and linear
    layers), without the activation-by-activation attention matmuls: the
    convention closest to SlimSAM's tables (samfx.stats counts everything)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    adapter = samfx.adapters.find_adapter(model)
    spec = next(s for s in adapter.components(model) if s.role == "image_encoder")
    encoder = model.get_submodule(spec.path) if spec.path else model
    (name, example), = spec.example_inputs().items()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(**{name: mode.from_tensor(example)})
    counts = counter.get_flop_counts()["Global"]
    return sum(int(flops) // 2 for op, flops in counts.items() if str(op).split(".")[1] in ("convolution", "addmm", "mm"))


def _change(pair: list[float], unit: float, suffix: str = "") -> str:
    return f"{pair[0] / unit:.1f}->{pair[1] / unit:.1f}{suffix}"


def _gt(f: dict | None) -> str | None:
    return f"{100 * f['gt_miou'][0]:.1f}->{100 * f['gt_miou'][1]:.1f}" if f and f["gt_miou"][0] is not None else None


def table(rows: list[dict]) -> str:
    def fidelity(key: str):
        return lambda r: r["fidelity"][key] if r.get("fidelity") else None

    text = markdown_table(rows, [
        ("case", "case", "{}"), ("params", lambda r: r["params"][1] / 1e6, "{:.2f}M"),
        ("MB", lambda r: r["weight_bytes"][1] / 1e6, "{:.1f}"), ("GMACs", lambda r: r["encoder_macs"][1] / 1e9, "{:.1f}"),
        ("enc s", "encoder_optimized_s", "{:.2f}"), ("enc x", "encoder_speedup", "{:.2f}x"),
        ("dec ms", lambda r: r.get("decoder_optimized_s") and 1e3 * r["decoder_optimized_s"], "{:.1f}"),
        ("dec x", "decoder_speedup", "{:.2f}x"), ("mIoU vs orig", fidelity("mask_iou_mean"), "{:.4f}"),
        ("cos min", fidelity("embedding_cosine_min"), "{:.5f}"), ("GT mIoU", lambda r: _gt(r.get("fidelity")), "{}"),
    ])
    pruned = [r for r in rows if "encoder_layer_macs" in r]
    if pruned:
        def distilled(r: dict) -> dict | None:
            return r.get("distill") and r["distill"].get("fidelity")

        text += "\n\n" + markdown_table(pruned, [
            ("pruned encoder", "case", "{}"), ("params", lambda r: _change(r["params"], 1e6, "M"), "{}"),
            ("GMACs (all)", lambda r: _change(r["encoder_macs"], 1e9), "{}"),
            ("GMACs (layers)", lambda r: _change(r["encoder_layer_macs"], 1e9), "{}"),
            ("prune s", lambda r: r["pass_s"]["prune"], "{:.1f}"),
            ("distill steps", lambda r: distilled(r) and r["distill"]["steps"], "{}"),
            ("mIoU vs orig", lambda r: distilled(r) and distilled(r)["mask_iou_mean"], "{:.4f}"),
            ("GT mIoU", lambda r: _gt(distilled(r)), "{}"),
        ])
    return text


# -- token_cluster: the tuner's choice, Expedit-SAM's presets, activation memory ----------------

# ViT-H (location, clusters per window): Expedit-SAM's README table, and its demo's "1.2x" (16, 81)
# and "1.5x" (6, 81) presets. Locations index SAM's 32 ViT-H blocks.
EXPEDIT_PRESETS = ((18, 121), (16, 81), (14, 100), (8, 100), (8, 81), (6, 81))


def token_cluster_suite(name: str, floor: float, images: tuple[str, ...], presets: tuple[tuple[int, int], ...],
                        repeats: int) -> dict:
    """Tune ``token_cluster`` for ``floor`` on ``images``, then measure the chosen
    setting, the presets and split_qkv + the chosen setting against the original.

    Encoder latency: each setting against the original in :func:`samfx.bench.interleaved`'s
    turns (``repeats`` runs each after a warm-up), the speed-up a ratio of medians. Fidelity uses the same
    images and prompts as the tuner (points and boxes).
    """
    from samfx.fidelity import CachedPredictor, compare
    from samfx.stats import activation_peak_bytes

    torch.manual_seed(0)
    model = samfx.models.build(name)
    adapter = samfx.adapters.find_adapter(model)
    reference = CachedPredictor(adapter.predictor(model))
    timer = adapter.predictor(model)
    image = package_images(["coins"])[0].image
    tuning = samfx.TokenClusterConfig(floor=floor, images=images)
    result, tune_s = timed(lambda: samfx.passes.tune_token_cluster(model, tuning))
    print(f"{name}: tuner ({tune_s:.0f} s) for mask IoU >= {floor} on {', '.join(images)}\n{result.table()}",
          file=sys.stderr, flush=True)
    settings: list[tuple[str, list]] = []
    if result.chosen is not None:
        chosen = samfx.TokenClusterConfig(location=result.chosen.location, clusters=result.chosen.clusters)
        settings += [("tuned", [chosen]), ("split_qkv+tuned", ["split_qkv", chosen])]
    settings += [(f"L{location}/{clusters}", [samfx.TokenClusterConfig(location=location, clusters=clusters)])
                 for location, clusters in presets]
    original_peak = activation_peak_bytes(model, adapter)
    original_s = []
    rows = []
    for label, passes in settings:
        print(f"{name}: {label} ...", file=sys.stderr, flush=True)
        optimized = samfx.optimize(model, passes, model_name=name)
        report = optimized.samfx_report
        fidelity = compare(reference, optimized, images, adapter=adapter)
        candidate = adapter.predictor(optimized)
        with torch.inference_mode():
            times = interleaved({"original": lambda: timer.set_image(image),
                                 "optimized": lambda: candidate.set_image(image)}, repeats)
        original_s.append(times["original"].median)
        cluster = next(p for p in report.passes if p.name == "token_cluster")
        rows.append({
            "model": name, "setting": label, "passes": [p.config for p in report.passes],
            "clustered": cluster.summary,
            "encoder_macs": [report.before.macs["image_encoder"], report.after.macs["image_encoder"]],
            "encoder_optimized_s": times["optimized"].median,
            "encoder_speedup": times["original"].median / times["optimized"].median,
            "activation_peak_bytes": [original_peak, activation_peak_bytes(optimized, adapter)],
            "fidelity": {"images": fidelity.images, "prompts": fidelity.prompts,
                         "mask_iou_mean": fidelity.mask_iou_mean, "mask_iou_min": fidelity.mask_iou_min,
                         "embedding_cosine_mean": fidelity.embedding_cosine_mean,
                         "iou_pred_error_max": fidelity.iou_pred_error_max},
        })
        del optimized, candidate
    return {"model": name, "floor": floor, "images": list(images), "tune_s": tune_s, "tuning": result.to_dict(),
            "original_encoder_s": float(np.median(original_s)) if original_s else None, "rows": rows}


def token_cluster_table(suites: list[dict]) -> str:
    rows = [r for suite in suites for r in suite["rows"]]
    return markdown_table(rows, [
        ("model", "model", "{}"), ("setting", "setting", "{}"),
        ("clusters", lambda r: r["clustered"].removeprefix("image_encoder: ")[:43], "{}"),
        ("MACs x", lambda r: r["encoder_macs"][0] / r["encoder_macs"][1], "{:.2f}"),
        ("enc s", "encoder_optimized_s", "{:.2f}"), ("enc x", "encoder_speedup", "{:.2f}x"),
        ("peak MiB", lambda r: "{:.0f}->{:.0f}".format(*(b / 2**20 for b in r["activation_peak_bytes"])), "{}"),
        ("mIoU vs orig", lambda r: r["fidelity"]["mask_iou_mean"], "{:.4f}"),
        ("worst", lambda r: r["fidelity"]["mask_iou_min"], "{:.3f}"),
        ("cos", lambda r: r["fidelity"]["embedding_cosine_mean"], "{:.4f}"),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help="run only these cases (model/passes), repeatable")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--everything", action="store_true", help="segment-everything cases (benchmarks/everything.py)")
    parser.add_argument("--points-per-side", type=int, default=32, help="--everything: side of the dense grid")
    parser.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/latest.json, "
                        "or everything.json with --everything)")
    parser.add_argument("--token-cluster", action="append", metavar="MODEL",
                        help="run the token_cluster suite (tuner, presets, memory) on a zoo model, repeatable")
    parser.add_argument("--floor", type=float, default=0.90, help="token_cluster: mask IoU floor for the tuner")
    parser.add_argument("--tune-images", default="coins,astronaut,coffee",
                        help="token_cluster: package images the tuner and the fidelity use")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.token_cluster:
        return _token_cluster_main(args)
    suite, run, show, note = CASES, lambda c: run_case(c, args.repeats, not args.no_fidelity), table, "latencies"
    warmup = 1
    if args.everything:
        from benchmarks import everything

        suite, show, note, warmup = everything.CASES, everything.table, everything.TIMING_NOTE, 0
        run = lambda c: everything.run_case(c, args.repeats, args.points_per_side)  # noqa: E731
    cases = [c for c in suite if not args.case or c.name in args.case]
    if not cases:
        parser.error(f"no case matches {args.case}; cases: {[c.name for c in suite]}")
    rows = []
    for case in cases:
        print(f"running {case.name} ...", file=sys.stderr, flush=True)
        rows.append(run(case))
    print(show(rows))
    print(f"\n{run_note(args.repeats, warmup, what=note)}")
    out = write_results(args.out or f"benchmarks/results/{'everything' if args.everything else 'latest'}.json",
                        {"repeats": args.repeats, "rows": rows})
    print(f"wrote {out}")
    return 0



def _token_cluster_main(args: argparse.Namespace) -> int:
    images = tuple(i for i in args.tune_images.split(",") if i)
    suites = [token_cluster_suite(name, args.floor, images, EXPEDIT_PRESETS if name.endswith("vit_h") else (),
                                  args.repeats) for name in args.token_cluster]
    print(token_cluster_table(suites))
    print(f"\n{run_note(args.repeats, what='encoder times (each setting against the original)')}; fidelity and "
          "peak activation memory (fake tensors) are against the original")
    out = write_results(args.out or "benchmarks/results/token_cluster.json",
                        {"repeats": args.repeats, "token_cluster": suites})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
