"""The ``samfx`` command line.

    samfx models                                    list the model zoo
    samfx passes                                    list the passes
    samfx optimize --model lite_medsam --passes split_qkv --out runs/demo
    samfx optimize --checkpoint sam_vit_b.pth --passes split_qkv --out runs/b
    samfx export-onnx --model lite_medsam --passes split_qkv --out runs/onnx
    samfx run-onnx photo.jpg --model-dir runs/onnx --point 120,80 --out mask.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _models(_: argparse.Namespace) -> int:
    from . import models

    print(f"{'name':<18}{'family':<13}{'weights':<11}{'package':<38}description")
    for name, entry in models.list_models().items():
        weights = "real" if entry.pretrained else "random"
        print(f"{name:<18}{entry.family:<13}{weights:<11}{entry.package:<38}{entry.description}")
    return 0


def _passes(_: argparse.Namespace) -> int:
    from . import passes

    for info in passes.list_passes():
        flags = ["exact" if info.exact else "lossy"]
        if info.requires:
            flags.append("requires " + ", ".join(info.requires))
        print(f"{info.name:<16}{'; '.join(flags):<28}{info.doc}")
    return 0


def _optimize(args: argparse.Namespace) -> int:
    import torch

    from . import models, optimize, save
    from .data import available_images

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model and not args.checkpoint:
        raise SystemExit("samfx optimize: give --model NAME, --checkpoint PATH, or both")
    name = args.model
    if args.checkpoint and not name:
        name = models.identify(models.load_checkpoint(args.checkpoint))
        print(f"checkpoint fits the zoo architecture {name}")
    images = [] if args.no_fidelity else [i for i in args.images.split(",") if i]
    unknown = sorted(set(images) - set(available_images()))
    if unknown:
        raise SystemExit(f"samfx optimize: unknown images {unknown}; available: {', '.join(available_images())}")
    model = models.build(name, small=args.small, checkpoint=args.checkpoint)
    passes = [p for p in args.passes.split(",") if p]
    optimized = optimize(model, passes, fidelity=images or False, progress=not args.quiet, model_name=name)
    out = Path(args.out)
    save(optimized, out)
    report = optimized.samfx_report
    report.save(out / "report.json")
    print(report.table())
    print(f"\nwrote {out / 'model.safetensors'}, {out / 'samfx.json'} and {out / 'report.json'}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    import torch

    from . import models, optimize
    from .emit.onnx import export_onnx

    if args.threads:
        torch.set_num_threads(args.threads)
    model = models.build(args.model, small=args.small, checkpoint=args.checkpoint)
    passes = [p for p in args.passes.split(",") if p]
    if passes:
        model = optimize(model, passes, progress=not args.quiet, model_name=args.model)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    export_onnx(model, args.out, multimask_output=not args.single_mask, opset=args.opset, external_data=external,
                verbose=True)
    print(f"\nwrote {args.out}/encoder.onnx, decoder.onnx, samfx_onnx.json and samfx_runtime.py")
    return 0


def _run_onnx(args: argparse.Namespace) -> int:
    from .emit import runtime

    return runtime.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samfx", description="Optimize Segment Anything models with graph passes.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the model zoo").set_defaults(run=_models)
    sub.add_parser("passes", help="list the passes").set_defaults(run=_passes)
    opt = sub.add_parser("optimize", help="optimize a model and write it with its report")
    opt.add_argument("--model", help="zoo name (see `samfx models`)")
    opt.add_argument("--checkpoint", help="official weights (.pth/.pt/.safetensors), loaded with weights_only")
    opt.add_argument("--small", action="store_true", help="the reduced test configuration of the architecture")
    opt.add_argument("--passes", default="split_qkv", help="comma-separated passes (default: split_qkv)")
    opt.add_argument("--out", required=True, help="output directory")
    opt.add_argument("--images", default="coins,astronaut,coffee", help="package images for the fidelity check")
    opt.add_argument("--no-fidelity", action="store_true", help="skip the fidelity check")
    opt.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    opt.add_argument("--quiet", action="store_true", help="no progress bars")
    opt.set_defaults(run=_optimize)
    exp = sub.add_parser("export-onnx",
                         help="export encoder.onnx + decoder.onnx (SAM convention), checked in onnxruntime")
    exp.add_argument("--model", required=True, help="zoo name (see `samfx models`)")
    exp.add_argument("--checkpoint", help="official weights (.pth/.pt/.safetensors), loaded with weights_only")
    exp.add_argument("--small", action="store_true", help="the reduced test configuration of the architecture")
    exp.add_argument("--passes", default="", help="comma-separated passes to run first (default: none)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--single-mask", action="store_true", help="decoder returns the single-mask output")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or newer, default 18)")
    exp.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                     help="weights in a separate file (auto: above the 2 GB protobuf limit)")
    exp.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    exp.add_argument("--quiet", action="store_true", help="no progress bars")
    exp.set_defaults(run=_export_onnx)
    from .emit import runtime

    run = sub.add_parser("run-onnx", help="segment an image with an exported pair (onnxruntime and numpy only)")
    runtime.add_arguments(run)
    run.set_defaults(run=_run_onnx)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Two busy-waiting OpenMP pools on two shared cores slow each other several-fold.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from .models import CheckpointError
    from .passes import PassError

    try:
        return args.run(args)
    except (CheckpointError, PassError, KeyError) as err:
        print(f"samfx: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
