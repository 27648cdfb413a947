"""``samfx eval`` on a COCO folder of LiteMedSAM-sized images: the issue's target
is 200 images of 256 px in under 5 minutes on 2 cores.

    flock /tmp/samfx-bench.lock python -m benchmarks eval_folder                # 200 images, 2 threads
    python -m benchmarks eval_folder --against      # and against the original, as for a saved run
    python -m benchmarks eval_folder --export openvino   # samfx.export's files, as `samfx eval EXPORT_DIR`
    python -m benchmarks eval_folder --images 20 --folder /tmp/samfx-eval --out benchmarks/results/eval.json

On a shared machine the wall time says little: the run also reports its CPU
time, which divided by the threads approximates a quiet machine's wall time.

The folder is generated: each image is a 256 px crop of a package photo with
2 to 5 shapes painted on it (rotated rectangles and triangles annotated as COCO
polygons, discs as compressed RLE), so the ground truth is exact. The timed run
is ``samfx eval lite_medsam --annotations coco.json``: the model embeds every
image once, and every object's box and click go through the decoder, batched
per image. With ``--against`` the original is run too, as ``samfx eval DIR``
does for a saved run (twice the work). Model building is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Busy-waiting OpenMP threads slow 2-core runs several-fold when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import samfx  # noqa: E402
from samfx.annotations import polygon_mask  # noqa: E402
from samfx.bench import cpu_isa, timed, write_results  # noqa: E402
from samfx.data import package_images  # noqa: E402
from samfx.masks import rle_encode, rle_to_string  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def _polygon(rng: np.random.Generator, size: int) -> list[float]:
    """A rotated rectangle or a triangle inside the image."""
    cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
    radius = rng.uniform(0.06 * size, 0.18 * size)
    corners = 4 if rng.random() < 0.5 else 3
    angles = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, corners, endpoint=False)
    stretch = rng.uniform(0.6, 1.0)
    return np.stack([cx + radius * np.cos(angles), cy + stretch * radius * np.sin(angles)], 1).ravel().tolist()


def make_coco_folder(folder: Path, count: int, size: int = 256, seed: int = 0) -> Path:
    """Write ``count`` images and their ``coco.json`` into ``folder``; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [package_images([name])[0].image for name in PHOTOS]
    yy, xx = np.mgrid[:size, :size]
    images, annotations = [], []
    for index in range(count):
        photo = photos[index % len(photos)]
        y0 = int(rng.integers(0, photo.shape[0] - size + 1))
        x0 = int(rng.integers(0, photo.shape[1] - size + 1))
        image = photo[y0:y0 + size, x0:x0 + size].copy()
        for _ in range(int(rng.integers(2, 6))):
            colour = rng.integers(0, 256, 3)
            if rng.random() < 0.6:
                polygon = _polygon(rng, size)
                mask = polygon_mask(polygon, size, size)
                segmentation: object = [polygon]
            else:
                cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(0.05 * size, 0.15 * size) ** 2
                segmentation = {"size": [size, size], "counts": rle_to_string(rle_encode(mask[None])[0])}
            if not mask.any():
                continue
            # Later shapes cover earlier ones: earlier annotations lose the covered part.
            for earlier in annotations:
                if earlier["image_id"] == index:
                    earlier["_mask"] &= ~mask
            image[mask] = np.clip(colour + rng.normal(0, 12, (int(mask.sum()), 3)), 0, 255).astype(np.uint8)
            annotations.append({"id": len(annotations), "image_id": index, "iscrowd": 0,
                                "segmentation": segmentation, "_mask": mask.copy()})
        name = f"image_{index:04d}.png"
        Image.fromarray(image).save(folder / name)
        images.append({"id": index, "file_name": name, "height": size, "width": size})
    # A shape partly covered by a later one is annotated by the RLE of what stays visible; a hidden one is dropped.
    kept = []
    for annotation in annotations:
        mask = annotation.pop("_mask")
        polygon = annotation["segmentation"][0] if isinstance(annotation["segmentation"], list) else None
        if polygon is None or not (mask == polygon_mask(polygon, size, size)).all():
            annotation["segmentation"] = {"size": [size, size], "counts": rle_to_string(rle_encode(mask[None])[0])}
        if mask.any():
            kept.append(annotation)
    path = folder / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": kept}))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--folder", default="/tmp/samfx-eval-folder", help="where to write the generated folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", action="store_true", help="also run the original and compare with it")
    parser.add_argument("--export", choices=("onnx", "openvino"),
                        help="evaluate samfx.export's files in their runtime instead (single-mask decoder, "
                             "LiteMedSAM's box convention; the export is timed apart and counted in the total)")
    parser.add_argument("--out", help="write the timing as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    coco, generate_s = timed(lambda: make_coco_folder(Path(args.folder), args.images))
    (model, original), build_s = timed(lambda: (samfx.models.build("lite_medsam"),
                                                samfx.models.build("lite_medsam") if args.against else None))
    cpu = time.process_time()
    export_s = 0.0
    if args.export:
        out = Path(args.folder) / f"export-{args.export}"
        _, export_s = timed(lambda: samfx.export(model, out, format=args.export, multimask_output=False))
        model = samfx.runtime.load(out, threads=args.threads)
    report = samfx.evaluate(model, annotations=coco, against=original, progress=True)
    cpu_s = time.process_time() - cpu
    per_image = [row["seconds"] for row in report.per_image]
    print(report.table())
    summary = {"images": len(report.images), "objects": report.objects, "threads": args.threads,
               "against_original": args.against,
               "generate_s": generate_s, "build_s": build_s, "export": args.export, "export_s": export_s,
               "eval_s": report.time_s, "total_s": export_s + report.time_s, "eval_cpu_s": cpu_s,
               "per_image_median_s": float(np.median(per_image)), "gt_miou": report.gt_miou,
               "isa": cpu_isa()["summary"]}
    exported = f"{args.export} export {export_s:.1f} s + " if args.export else ""
    print(f"\n{summary['images']} images, {summary['objects']} objects: {exported}eval {report.time_s:.1f} s "
          f"(median {summary['per_image_median_s']:.3f} s per image; {cpu_s:.1f} s of CPU time, a quiet machine's "
          f"wall time is about that over the threads), models built in {build_s:.1f} s, "
          f"{args.threads} threads, {summary['isa']}")
    if args.out:
        print(f"wrote {write_results(args.out, {'eval_folder': summary})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
