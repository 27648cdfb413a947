"""Build every full-size zoo model and run it once, end to end.

    python benchmarks/zoo_smoke.py                                # every zoo model (ViT-H needs ~8 GB)
    python benchmarks/zoo_smoke.py --model lite_medsam --model mobile_sam

Unit tests build the ``small=True`` configurations; this catches what only the
full sizes break (a hard-coded token grid, a wrong input size). Each model is
built, then its family's predictor embeds the ``coins`` photo and answers one
box prompt; a failure is recorded with its message and the run goes on to the
next model. Prints a table and writes ``benchmarks/results/zoo_smoke.json``;
exits with 1 if any model failed.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import samfx  # noqa: E402
from samfx.bench import markdown_table, timed, write_results  # noqa: E402


def smoke(name: str, image: np.ndarray) -> dict:
    """Build ``name`` at full size, embed ``image`` and predict one box; the timings and sizes."""
    row: dict = {"model": name}
    try:
        model, row["build_s"] = timed(lambda: samfx.models.build(name))
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        predictor = samfx.adapters.find_adapter(model).predictor(model)
        h, w = image.shape[:2]

        def forward() -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                predictor.set_image(image)
                return predictor.predict(box=np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4]))

        (masks, scores), row["forward_s"] = timed(forward)
        row["embedding"] = list(predictor.image_embedding.shape)
        row["masks"] = list(masks.shape)
        finite = bool(np.isfinite(scores).all() and torch.isfinite(predictor.image_embedding).all())
        row["status"] = "ok" if finite else "non-finite outputs"
    except Exception as err:  # noqa: BLE001 - record the failure, go on to the next model
        row["status"] = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    finally:
        gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=list(samfx.models.list_models()),
                        help="a zoo model (repeatable; default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo_smoke.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = samfx.data.package_images(["coins"])[0].image
    rows = []
    for name in args.model or list(samfx.models.list_models()):
        rows.append(smoke(name, image))
        print(f"{name}: {rows[-1]['status']}", flush=True)
    print(markdown_table(rows, [("model", "model", "{}"), ("params M", "params_m", "{:.2f}"),
                                ("build s", "build_s", "{:.1f}"), ("embed + box s", "forward_s", "{:.2f}"),
                                ("embedding", "embedding", "{}"), ("status", "status", "{}")]))
    print(f"wrote {write_results(args.out, {'rows': rows})}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
