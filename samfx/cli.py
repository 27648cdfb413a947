"""The ``samfx`` command line.

    samfx models                                    list the model zoo
    samfx passes                                    list the passes
    samfx optimize --model lite_medsam --passes fuse_attention,hyper --out runs/demo
    samfx optimize --checkpoint sam_vit_b.pth --passes split_qkv --out runs/b
    samfx export --model lite_medsam --format openvino --passes fuse_attention --out runs/ov
    samfx run photo.jpg --model-dir runs/ov --box 30,40,200,220 --box 5,5,90,80 --out masks.png
    samfx bench --model lite_medsam --passes quantize --runtimes eager,openvino
    samfx everything photo.jpg --model sam_vit_b --checkpoint sam_vit_b.pth --out masks.json --png masks.png
    samfx compare runs/demo --out runs/demo/pictures       # original vs optimized masks, as PNGs
    samfx compare --bench benchmarks/results/latest.json --out plots   # speed against fidelity
    samfx optimize --model lite_medsam --passes "split_qkv,prune:mlp=0.3:importance=fluctuation" \
        --images scans/ --out runs/p          # your images: part calibrates, the rest is held out
    samfx eval runs/p --images scans/ --annotations scans/coco.json --out runs/p/eval.json
    samfx tune --model lite_medsam --objective latency --runtime openvino --min-box-iou 0.98 --budget 20m
    samfx optimize --recipe samfx-tune/recipe.json --out runs/best     # replay the tuned recipe

A user error (a bad option, file or value) ends in one line ``samfx: error: ...``
and exit code 2, never a traceback; output paths are checked before any work.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


class UsageError(Exception):
    """A user error the command line reports in one line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, samfx's prefix, for every subcommand
        raise UsageError(message)


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--threads must be a whole number >= 0 (0: torch's choice), got {text!r}")
    return value


def _min_box_iou(text: str) -> float | None:
    """``--min-box-iou``: a mask IoU in (0, 1], or ``none`` for no floor."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--min-box-iou is a mask IoU in (0, 1], or none for no floor; got {text!r}")
    return value


def _check_out_file(path: str | None) -> None:
    """An output file's directory must exist and be writable; the path must not be a directory."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{path} is a directory; give a file name")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: {parent} does not exist or is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: {parent} is not writable")


def _check_out_dir(path: str, overwrite: bool = True) -> None:
    from .serialization import check_output_dir

    check_output_dir(path, overwrite=overwrite)


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
        flags = ["exact" if info.exact else "lossy, data-driven" if info.data_driven else "lossy"]
        if info.requires:
            flags.append("requires " + ", ".join(info.requires))
        print(f"{info.name:<18}{'; '.join(flags):<32}{info.doc}")
        for option in passes.pass_options(info.name):
            print(f"{'':<18}{option}")
    print('\noptions: --passes "split_qkv,prune:mlp=0.3:importance=fluctuation"; tuple items joined by +')
    return 0


def _comma_list(text: str) -> list[str]:
    """The items of a comma-separated option (``--images``: package names, files, directories, globs)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _optimize_images(args: argparse.Namespace, passes: list) -> tuple[list, list, dict | None, str | None]:
    """Fidelity samples, calibration arrays, the record of which images did what,
    and a line telling the user about a split."""
    from .data import (DEFAULT_IMAGES, ImageSplit, expand_images, image_sample, load_images, separate_images,
                       split_images)
    from .passes import get_pass

    evaluation = [] if args.no_fidelity else _comma_list(args.images)
    calibration = _comma_list(args.calibration) if args.calibration else []
    data_driven = any(get_pass(config.name).data_driven for config in passes)
    message = None
    if calibration and evaluation:
        split = separate_images(calibration, evaluation, allow_overlap=args.allow_overlap)
    elif calibration:
        split = ImageSplit(*load_images(calibration, "calibration"), [], [])
    elif data_driven and evaluation and tuple(evaluation) != DEFAULT_IMAGES:
        split = split_images(evaluation, held_out=args.held_out, seed=args.split_seed)
        message = (f"split the {len(split.calibration) + len(split.evaluation)} images (seed {args.split_seed}): "
                   f"{len(split.calibration)} calibrate the passes, {len(split.evaluation)} are held out for fidelity")
    elif evaluation:
        samples = [image_sample(item) for item in expand_images(evaluation, "fidelity")]
        return samples, [], {"calibration": [], "evaluation": [s.name for s in samples], "split_seed": None,
                             "overlap": []}, None
    else:
        return [], [], None, None
    # By name where there is one: a package photo keeps its ground truth, a file its path.
    samples = [image_sample(image if name.startswith("sha256:") else name)
               for image, name in zip(split.evaluation, split.evaluation_names)]
    return samples, split.calibration, split.record(), message


def _held_out(samples: list, calibration: list) -> list:
    """The fidelity samples that are not calibration images: the floor's held-out
    images (none: the pipeline's default photos)."""
    from .data import image_digest

    calibrated = {image_digest(image) for image in calibration}
    return [s for s in samples if image_digest(s.image) not in calibrated]


def _passes_or_preset(args: argparse.Namespace, default: str) -> list:
    """The pass list of ``--passes`` (``default`` when not given) or of ``--preset``,
    whose calibration photos become the calibration set unless ``--calibration``
    names others."""
    from .passes import parse_passes
    from .presets import get_preset

    if getattr(args, "recipe", None):
        if args.passes or args.preset:
            raise UsageError("give --recipe, --passes or --preset, not two of them")
        return list(args.recipe_configs)
    if args.preset is None:
        return parse_passes(args.passes or default)
    if args.passes:
        raise UsageError("give --passes or --preset, not both")
    preset = get_preset(args.preset)
    args.calibration = getattr(args, "calibration", None) or ",".join(preset.calibration_images)
    return list(preset.passes)


def _read_tune_recipe(args: argparse.Namespace) -> None:
    """``--recipe FILE`` (from ``samfx tune``): its passes, and unless given otherwise,
    its model and calibration images."""
    if not getattr(args, "recipe", None):
        return
    from .passes import get_pass
    from .tune import read_recipe, recipe_calibration

    recipe = read_recipe(args.recipe)
    args.recipe_configs = recipe["configs"]
    args.model = args.model or recipe.get("model")
    args.small = args.small or bool(recipe.get("small"))
    if not args.calibration and any(get_pass(config.name).data_driven for config in recipe["configs"]):
        args.calibration = ",".join(recipe_calibration(recipe, args.recipe)) or None
    args.recipe_runtime = recipe.get("runtime")


def _floor(args: argparse.Namespace) -> float | None:
    """The fidelity floor of lossy passes: ``--min-box-iou``, or none for a ``--recipe``
    replay (the tuner measured that recipe on held-out images, and replays what it measured)."""
    return None if getattr(args, "recipe", None) else args.min_box_iou


def _optimize(args: argparse.Namespace) -> int:
    import torch

    from . import models, optimize, save

    _check_out_dir(args.out, overwrite=args.overwrite)
    _read_tune_recipe(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model and not args.checkpoint:
        raise SystemExit("samfx optimize: give --model NAME, --checkpoint PATH, or both")
    name = args.model
    if args.checkpoint and not name:
        name = models.identify(models.load_checkpoint(args.checkpoint))
        print(f"checkpoint fits the zoo architecture {name}")
    passes = _passes_or_preset(args, default="split_qkv")
    images, calibration, record, message = _optimize_images(args, passes)
    if message:
        print(message)
    model = models.build(name, small=args.small, checkpoint=args.checkpoint)
    optimized = optimize(model, passes, fidelity=images or False, calibration_images=calibration,
                         progress=not args.quiet, model_name=name, min_box_iou=_floor(args),
                         held_out_images=_held_out(images, calibration))
    out = Path(args.out)
    optimized.samfx_report.images = record
    save(optimized, out, overwrite=args.overwrite)
    report = optimized.samfx_report
    print(report.table())
    print(f"\nwrote {out / 'model.safetensors'}, {out / 'samfx.json'} and {out / 'report.json'}")
    if args.pictures:
        from .pictures import compare_pictures

        shown = images or _comma_list(args.images)
        paths = compare_pictures(model, optimized, out / "pictures", shown, fidelity=report.fidelity)
        print(f"wrote {len(paths)} pictures to {out / 'pictures'}")
    return 0


def _read_image(source: str):
    """An RGB uint8 array from a file, or a package image by name."""
    import numpy as np

    from .data import available_images, package_images

    if source in available_images() and not Path(source).exists():
        return package_images([source])[0].image
    path = Path(source)
    if not path.is_file():
        raise SystemExit(f"samfx: error: {source} is neither an image file nor a package image "
                         f"({', '.join(available_images())})")
    from skimage import io

    try:
        image = io.imread(path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"samfx: error: cannot read {path} as an image: {err}") from err
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise SystemExit(f"samfx: error: {path} is not an RGB image (shape {image.shape})")
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-12))).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3])


def _everything(args: argparse.Namespace) -> int:
    import torch

    from . import load, models
    from .segment_everything import EverythingConfig, MaskGenerator

    _check_out_file(args.out)
    _check_out_file(args.png)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.model) == bool(args.saved):
        raise SystemExit("samfx everything: give --model NAME (optionally with --checkpoint) or --saved DIR")
    model = load(args.saved) if args.saved else models.build(args.model, small=args.small, checkpoint=args.checkpoint)
    image = _read_image(args.image)
    try:
        config = EverythingConfig(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                                  pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_thresh,
                                  high_score_thresh=args.high_score_thresh, box_nms_thresh=args.nms_thresh,
                                  crop_n_layers=args.crop_layers)
    except ValueError as err:
        raise SystemExit(f"samfx everything: {err}") from err
    result = MaskGenerator(model, config).generate(image, args.strategy)
    print(result.summary())
    for ann in result.annotations()[:10]:
        x, y, w, h = ann["bbox"]
        print(f"  area {ann['area']:>8}  box {x:>6.0f} {y:>6.0f} {w:>6.0f} {h:>6.0f}  "
              f"predicted IoU {ann['predicted_iou']:.3f}  stability {ann['stability_score']:.3f}")
    if len(result) > 10:
        print(f"  ... {len(result) - 10} more")
    if args.out:
        print(f"wrote {result.save(args.out)}")
    if args.png:
        from .pictures import draw_everything

        print(f"wrote {draw_everything(image, result, args.png)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from .fidelity import FidelityReport

    if not args.run_dir and not args.bench:
        raise SystemExit("samfx compare: give a saved run directory, --bench FILE, or both")
    _check_out_dir(args.out)
    out = Path(args.out)
    if args.bench:
        from .pictures import speed_fidelity_plot

        rows = []
        for bench in args.bench:
            try:
                rows += json.loads(Path(bench).read_text())["rows"]
            except (OSError, ValueError, KeyError) as err:
                raise SystemExit(f"samfx compare: {bench} is not a benchmark result file: {err}") from err
        try:
            print(f"wrote {speed_fidelity_plot(rows, out / 'speed_fidelity.png')}")
        except ValueError as err:
            raise SystemExit(f"samfx compare: {err}") from err
    if args.run_dir:
        from . import load, models
        from .pictures import compare_pictures
        from .serialization import read_recipe

        base = read_recipe(args.run_dir).get("base")
        if not base:
            raise SystemExit(f"samfx compare: {args.run_dir} was optimized from a model outside the zoo; "
                             "draw its pictures from Python with samfx.pictures.compare_pictures")
        if not args.checkpoint and not models.spec(base["name"]).pretrained:
            raise SystemExit(f"samfx compare: {args.run_dir} was optimized from {base['name']} with random weights, "
                             "which cannot be rebuilt; give the --checkpoint it was optimized from, or draw the "
                             "pictures while optimizing (samfx optimize --pictures)")
        original = models.build(base["name"], small=base["small"], checkpoint=args.checkpoint)
        optimized = load(args.run_dir, base=original)  # load optimizes a copy: the original stays as it is
        fidelity = None
        report_file = Path(args.run_dir) / "report.json"
        if report_file.is_file():
            saved = json.loads(report_file.read_text()).get("fidelity")
            fidelity = FidelityReport(**saved) if saved else None
        from .data import expand_images, image_sample

        names = _comma_list(args.images) if args.images else (fidelity.images if fidelity else None)
        samples = [image_sample(item) for item in expand_images(names or ["coins"], "pictures")]
        paths = compare_pictures(original, optimized, out, samples, fidelity=fidelity, everything=args.everything)
        for path in paths:
            print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from . import models, optimize
    from .data import load_images
    from .emit.export import export

    _check_out_dir(args.out)
    _read_tune_recipe(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    passes = _passes_or_preset(args, default="")
    if not args.model:
        raise UsageError("give --model NAME (or a --recipe that names it)")
    calibration = load_images(_comma_list(args.calibration), "calibration")[0] if args.calibration else []
    model = models.build(args.model, small=args.small, checkpoint=args.checkpoint)
    if passes:
        model = optimize(model, passes, calibration_images=calibration, progress=not args.quiet,
                         model_name=args.model, min_box_iou=_floor(args))
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    recipe_format = {"onnxruntime": "onnx"}.get(getattr(args, "recipe_runtime", None) or "", "openvino")
    format = args.format or ("onnx" if args.command == "export-onnx" else recipe_format)
    try:
        result = export(model, args.out, format=format, multimask_output=not args.single_mask, opset=args.opset,
                        external_data=external, verbose=True)
    except (OSError, ValueError) as err:
        return _user_error(str(err))
    files = ", ".join(sorted(result.manifest["files"]))
    print(f"\nwrote {args.out}: {files} and samfx_export.json")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from . import models
    from .emit import runtime
    from .evaluation import evaluate, saved_model_and_original

    _check_out_file(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)

    def build(spec: str):
        if (Path(spec) / runtime.MANIFEST).is_file():  # an export, evaluated in its runtime
            return runtime.load(spec, threads=args.threads or None)
        if Path(spec).is_dir():  # a saved run; as the model, evaluate rebuilds its original
            return spec
        return models.build(spec, small=args.small, checkpoint=args.checkpoint)

    against = build(args.against) if args.against else None
    if isinstance(against, str):
        against = saved_model_and_original(against, args.checkpoint)[0]
    images = _comma_list(args.images) if args.images else None
    report = evaluate(build(args.model), images, annotations=args.annotations, against=against,
                      prompts=_comma_list(args.prompts), checkpoint=args.checkpoint, max_images=args.max_images,
                      progress=not args.quiet)
    print(report.table())
    if args.out:
        print(f"\nwrote {report.save(args.out)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .emit import runtime

    if args.threads is not None and args.threads < 0:
        raise UsageError(f"--threads must be a whole number >= 0, got {args.threads}")
    _check_out_file(args.out)
    try:
        print(runtime.segment(args))
    except (OSError, ValueError, RuntimeError) as err:
        return _user_error(str(err))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import load, models, optimize
    from .bench import RUNTIMES, deploy_table, deployment_bench, write_results
    from .passes import parse_passes

    if bool(args.passes) == bool(args.saved):
        raise UsageError("give the optimization: --passes P1,P2 or --saved DIR (from samfx optimize)")
    runtimes = [r for r in args.runtimes.split(",") if r] if args.runtimes else None
    unknown = sorted(set(runtimes or []) - set(RUNTIMES))
    if unknown:
        raise UsageError(f"unknown runtimes {unknown}; known: {', '.join(RUNTIMES)}")
    _check_out_file(args.out)
    original = models.build(args.model, small=args.small, checkpoint=args.checkpoint)
    if args.saved:
        optimized = load(args.saved, base=original)
    else:
        optimized = optimize(original, parse_passes(args.passes), progress=not args.quiet,
                             model_name=args.model, min_box_iou=args.min_box_iou)
    try:
        result = deployment_bench(original, optimized, runtimes=runtimes, image=args.image, repeats=args.repeats,
                                  warmup=args.warmup, threads=args.threads or None)
    except (OSError, ValueError) as err:
        return _user_error(str(err))
    print(deploy_table(result))
    if args.out:
        print(f"wrote {write_results(args.out, result)}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from . import models
    from .tune import Floor, parse_budget, tune

    # Bad options fail before any work.
    budget = parse_budget(args.budget)
    if args.min_box_iou is not None and args.max_gt_miou_loss is not None:
        raise UsageError("give one floor: --min-box-iou or --max-gt-miou-loss")
    if args.max_gt_miou_loss is not None and not args.annotations:
        raise UsageError("--max-gt-miou-loss needs --annotations (ground truth); without them use --min-box-iou")
    floor = args.min_box_iou if args.min_box_iou is not None or args.max_gt_miou_loss is not None else 0.97
    Floor(floor, args.max_gt_miou_loss)
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    _check_out_dir(args.out)
    model = models.build(args.model, small=args.small, checkpoint=args.checkpoint)
    images = _comma_list(args.images) if args.images else None
    calibration = _comma_list(args.calibration) if args.calibration else None
    result = tune(model, objective=args.objective, runtime=args.runtime, min_box_iou=floor,
                  max_gt_miou_loss=args.max_gt_miou_loss, images=images, calibration=calibration,
                  annotations=args.annotations, held_out=args.held_out, split_seed=args.split_seed, budget=budget,
                  threads=args.threads or None, repeats=args.repeats, model_name=args.model, small=args.small,
                  progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(result.table())
    recipe = result.save_recipe(out / "recipe.json")
    if result.best.passes:
        print(f"\nbest: {result.best.passes}")
    else:
        print("\nbest: the original model (" + ("the budget ended before another candidate was measured; give more"
                                              if len(result.candidates) == 1 else "no other recipe kept the floor") + ")")
    print(f"wrote {recipe}, {result.save(out / 'tune.json')}", end="")
    try:
        print(f" and {result.plot(out / 'front.png')}")
    except ImportError as err:
        print(f"\nno plot: {err}")
    print(f"replay: samfx optimize --recipe {recipe} --out runs/tuned   (or samfx export --recipe {recipe} ...)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="samfx", description="Optimize Segment Anything models with graph passes.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the model zoo").set_defaults(run=_models)
    sub.add_parser("passes", help="list the passes").set_defaults(run=_passes)
    opt = sub.add_parser("optimize", help="optimize a model and write it with its report")
    opt.add_argument("--model", help="zoo name (see `samfx models`)")
    opt.add_argument("--checkpoint", help="official weights (.pth/.pt/.safetensors), loaded with weights_only")
    opt.add_argument("--small", action="store_true", help="the reduced test configuration of the architecture")
    opt.add_argument("--preset", help="a named recipe instead of --passes (see samfx.presets), e.g. lite_medsam_cpu")
    opt.add_argument("--recipe", help="a recipe file written by `samfx tune` (its passes, model and calibration "
                                      "images) instead of --passes")
    opt.add_argument("--passes", default=None,
                     help='comma-separated passes with options, e.g. "split_qkv,prune:mlp=0.3" (see `samfx passes`; '
                          'default: split_qkv)')
    opt.add_argument("--out", required=True, help="output directory (an earlier samfx save there is replaced)")
    opt.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a samfx save")
    opt.add_argument("--images", default="coins,astronaut,coffee",
                     help="images for the fidelity check: package names, files, directories or globs, comma-separated;"
                          " with a data-driven pass and no --calibration, your images are split into calibration and"
                          " held-out fidelity parts")
    opt.add_argument("--calibration", help="calibration images for data-driven passes (may not overlap --images)")
    opt.add_argument("--allow-overlap", action="store_true",
                     help="evaluate on calibration images anyway (warned and recorded in the report)")
    opt.add_argument("--held-out", type=float, default=0.5, help="fraction of split images held out (default 0.5)")
    opt.add_argument("--split-seed", type=int, default=0, help="seed of the calibration/held-out split")
    opt.add_argument("--no-fidelity", action="store_true", help="skip the fidelity check")
    opt.add_argument("--min-box-iou", type=_min_box_iou, default=0.97, metavar="X",
                     help="fidelity floor for lossy passes: box-prompt mask IoU vs the original on the held-out "
                          "--images; a pass below it backs off or is refused (default 0.97; none: no floor)")
    opt.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    opt.add_argument("--quiet", action="store_true", help="no progress bars")
    opt.add_argument("--pictures", action="store_true",
                     help="also write PNGs of the original's and the optimized model's masks to OUT/pictures")
    opt.set_defaults(run=_optimize)
    exp = sub.add_parser("export", aliases=["export-onnx"],
                         help="export the encoder + decoder (SAM convention) for OpenVINO or onnxruntime, checked "
                              "against PyTorch, with a manifest of checksums (export-onnx: --format onnx)")
    exp.add_argument("--model", help="zoo name (see `samfx models`)")
    exp.add_argument("--format", choices=("openvino", "onnx"), default=None,
                     help="openvino (IR, default) or onnx (default for the export-onnx alias)")
    exp.add_argument("--checkpoint", help="official weights (.pth/.pt/.safetensors), loaded with weights_only")
    exp.add_argument("--small", action="store_true", help="the reduced test configuration of the architecture")
    exp.add_argument("--passes", default="", help="passes with options to run first (default: none)")
    exp.add_argument("--preset", help="a named recipe to run first instead of --passes, e.g. lite_medsam_cpu")
    exp.add_argument("--recipe", help="a recipe file written by `samfx tune` to run first (its passes, model, "
                                      "calibration images and runtime's format)")
    exp.add_argument("--calibration", help="calibration images for data-driven passes (names, files, folders, globs)")
    exp.add_argument("--min-box-iou", type=_min_box_iou, default=0.97, metavar="X",
                     help="fidelity floor for lossy passes (see samfx optimize; none: no floor)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--single-mask", action="store_true", help="decoder returns the single-mask output")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or newer, default 18)")
    exp.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                     help="ONNX weights in a separate file (auto: above the 2 GB protobuf limit)")
    exp.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    exp.add_argument("--quiet", action="store_true", help="no progress bars")
    exp.set_defaults(run=_export)
    from .emit import runtime

    run = sub.add_parser("run", aliases=["run-onnx"],
                         help="segment an image with an export of either format (no torch needed)")
    runtime.add_arguments(run)
    run.set_defaults(run=_run)

    bench = sub.add_parser("bench", help="time the original and an optimized model on each runtime "
                                          "(torch eager, torch.compile, onnxruntime, OpenVINO) with sizes and fidelity")
    bench.add_argument("--model", required=True, help="zoo name (see `samfx models`)")
    bench.add_argument("--checkpoint", help="official weights (.pth/.pt/.safetensors), loaded with weights_only")
    bench.add_argument("--small", action="store_true", help="the reduced test configuration of the architecture")
    bench.add_argument("--passes", default="", help="comma-separated passes giving the optimized model")
    bench.add_argument("--saved", help="or: a directory written by `samfx optimize` from --model")
    bench.add_argument("--min-box-iou", type=_min_box_iou, default=0.97, metavar="X",
                       help="fidelity floor for lossy --passes (see samfx optimize; none: no floor)")
    bench.add_argument("--runtimes", default="", help="comma-separated subset of eager,compile,onnxruntime,openvino "
                                                      "(default: all installed)")
    bench.add_argument("--image", default="coins", help="package image: one encoder run, all its boxes in one call")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per candidate (medians)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs per candidate first")
    bench.add_argument("--threads", type=_threads, default=2, help="threads of every runtime (0: each runtime's choice)")
    bench.add_argument("--out", help="write the results as JSON (with the environment and the CPU's ISA)")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(run=_bench)

    every = sub.add_parser("everything", help="segment everything in an image (TinySAM's hierarchical strategy)")
    every.add_argument("image", help="an image file, or a package image name (coins, astronaut, ...)")
    every.add_argument("--model", help="zoo name (see `samfx models`)")
    every.add_argument("--checkpoint", help="official weights for --model")
    every.add_argument("--small", action="store_true", help="the reduced test configuration of --model")
    every.add_argument("--saved", help="a directory written by `samfx optimize` (instead of --model)")
    every.add_argument("--strategy", choices=("hierarchical", "grid"), default="hierarchical")
    every.add_argument("--points-per-side", type=int, default=32)
    every.add_argument("--points-per-batch", type=int, default=64)
    every.add_argument("--pred-iou-thresh", type=float, default=0.88)
    every.add_argument("--stability-thresh", type=float, default=0.95)
    every.add_argument("--high-score-thresh", type=float, default=8.5, help="hierarchical: logit of covered pixels")
    every.add_argument("--nms-thresh", type=float, default=0.7)
    every.add_argument("--crop-layers", type=int, default=0)
    every.add_argument("--out", help="write the masks as COCO-style JSON (compressed RLE)")
    every.add_argument("--png", help="write a picture of the masks")
    every.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    every.set_defaults(run=_everything)

    comp = sub.add_parser("compare", help="pictures: original vs optimized masks, speed against fidelity")
    comp.add_argument("run_dir", nargs="?", metavar="RUN", help="a directory written by `samfx optimize`")
    comp.add_argument("--checkpoint", help="the weights the run was optimized from (random-init zoo models)")
    comp.add_argument("--images", help="images to draw: package names, files, directories or globs "
                                       "(default: the report's)")
    comp.add_argument("--everything", action="store_true", help="add both models' segment-everything masks")
    comp.add_argument("--bench", action="append", help="benchmark JSON to plot speed against fidelity (repeatable)")
    comp.add_argument("--out", required=True, help="output directory for the PNGs")
    comp.set_defaults(run=_compare)

    tn = sub.add_parser("tune", help="search pass lists and options for the fastest (or smallest) recipe that "
                                     "keeps a fidelity floor on held-out images, within a time budget")
    tn.add_argument("--model", required=True, help="zoo name (see `samfx models`)")
    tn.add_argument("--checkpoint", help="official weights (.pth/.pt/.safetensors), loaded with weights_only")
    tn.add_argument("--small", action="store_true", help="the reduced test configuration of the architecture")
    tn.add_argument("--objective", choices=("latency", "size"), default="latency",
                    help="latency (encoder + all boxes of an image on --runtime) or size on disk")
    tn.add_argument("--runtime", choices=("torch", "onnxruntime", "openvino"), default="openvino",
                    help="where candidates are timed (default openvino)")
    tn.add_argument("--min-box-iou", type=float, default=None,
                    help="floor: box-prompt mask IoU vs the original on the held-out images (default 0.97)")
    tn.add_argument("--max-gt-miou-loss", type=float, default=None,
                    help="floor instead, with --annotations: ground-truth mIoU lost, as a fraction (0.01: a point)")
    tn.add_argument("--images", help="images (names, files, folders, globs), split into calibration and held-out "
                                     "parts; with --annotations, their folder (default: package photos)")
    tn.add_argument("--calibration", help="calibration images given apart (then --images are all held out)")
    tn.add_argument("--annotations", help="COCO instance JSON, SA-1B JSON or MedSAM npz for ground truth")
    tn.add_argument("--held-out", type=float, default=0.5, help="fraction of split images held out (default 0.5)")
    tn.add_argument("--split-seed", type=int, default=0, help="seed of the calibration/held-out split")
    tn.add_argument("--budget", default="20m", help="wall-clock budget: 90s, 20m, 1h30m (default 20m)")
    tn.add_argument("--repeats", type=int, default=3, help="timed runs per candidate, interleaved with the original")
    tn.add_argument("--threads", type=_threads, default=0, help="threads of torch and the runtime "
                                                                "(default: torch's choice)")
    tn.add_argument("--out", default="samfx-tune", help="directory for recipe.json, tune.json and front.png "
                                                        "(default samfx-tune)")
    tn.add_argument("--quiet", action="store_true", help="no progress lines")
    tn.set_defaults(run=_tune)

    ev = sub.add_parser("eval", help="mIoU vs ground truth and mask IoU vs the original, on your annotated images")
    ev.add_argument("model", metavar="MODEL_OR_DIR", help="zoo name, a directory written by `samfx optimize`, or "
                                                          "one written by `samfx export` (run in its runtime)")
    ev.add_argument("--images", help="package names, files, directories or globs; with --annotations, the folder "
                                     "of the annotated image files (default: next to the annotations)")
    ev.add_argument("--annotations", help="COCO instance JSON, SA-1B JSON (file, folder or glob) or a MedSAM npz")
    ev.add_argument("--against", help="the original to compare with: zoo name, saved or exported directory "
                                      "(default for a saved directory: its original, rebuilt)")
    ev.add_argument("--checkpoint", help="weights for a zoo model (or the original of a saved directory)")
    ev.add_argument("--small", action="store_true", help="the reduced test configuration of a zoo model")
    ev.add_argument("--prompts", default="box,point", help="prompt kinds per object (default: box,point)")
    ev.add_argument("--max-images", type=int, help="evaluate the first N images only")
    ev.add_argument("--out", help="write the report (per object and in total) as JSON")
    ev.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors print one line ``samfx: error: ...`` and return 2."""
    # Two busy-waiting OpenMP pools on two shared cores slow each other several-fold.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        return _user_error(str(exit_.code))
    except KeyboardInterrupt:
        print("samfx: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into messages
        if _is_user_error(err):
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
                message = f"{err.filename}: {message}"
            return _user_error(message)
        if os.environ.get("SAMFX_DEBUG"):
            raise
        print(f"samfx: internal error: {type(err).__name__}: {_one_line(str(err))} "
              "(please report it; SAMFX_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _is_user_error(err: Exception) -> bool:
    from .adapters import PromptError
    from .annotations import AnnotationError
    from .capture import CaptureError
    from .data import ImageError
    from .evaluation import EvalError
    from .models import CheckpointError
    from .passes import PassError
    from .tune import TuneError

    if isinstance(err, (UsageError, CheckpointError, PassError, CaptureError, PromptError, ImageError, AnnotationError,
                        EvalError, TuneError, KeyError, OSError, ImportError)):
        return True
    # onnxruntime's NoSuchFile, InvalidProtobuf, InvalidArgument, Fail: a bad --model-dir.
    return type(err).__module__.startswith("onnxruntime")


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "(no message)"


def _user_error(message: str) -> int:
    message = re.sub(r"^(samfx(?: [a-z-]+)?|run-onnx)(?:: error)?: ", "", message.strip())
    print(f"samfx: error: {_one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
