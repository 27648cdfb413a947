"""Segment everything: TinySAM's hierarchical strategy against SAM's 32 x 32 grid.

    python -m benchmarks run --everything                    # every case, prints a table, writes JSON
    python -m benchmarks run --everything --case lite_medsam/coins --repeats 3

For each case (a zoo model and a package image) the image is embedded once and
both strategies segment it from that embedding, in :func:`samfx.bench.interleaved`'s
rotating turns, with SAM's and TinySAM's default thresholds. Reported: masks found,
clicks run and skipped, the segmenting time of each strategy (everything after
the embedding: prompt encoder and decoder calls, filters, NMS, RLE) and their
ratio, the end-to-end ratio with the embedding counted once per run, and how the
hierarchical strategy's masks match the grid's (one-to-one at IoU >= 0.5: mean
IoU of the matched pairs, recall of the grid's masks).

What matching means depends on the weights. With trained weights it says
whether skipping covered clicks loses objects the grid finds. With random
weights (every zoo model but LiteMedSAM) the masks are not objects: it only
says whether the hierarchical strategy reproduces the grid's output of the same
model. Note also that LiteMedSAM was trained with box prompts only, so its
single-click masks are empty and nothing passes SAM's filters.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass

import torch

import samfx
from samfx.bench import interleaved, markdown_table
from samfx.data import package_images
from samfx.segment_everything import EverythingConfig, MaskGenerator, match_masks


@dataclass(frozen=True)
class Case:
    model: str
    image: str

    @property
    def name(self) -> str:
        return f"{self.model}/{self.image}"


CASES = [Case("lite_medsam", "coins"), Case("sam_vit_b", "coins")]
TIMING_NOTE = ("segmenting times (after one shared embedding; end-to-end adds that embedding to each run of a "
               "strategy)")


def run_case(case: Case, repeats: int, points_per_side: int) -> dict:
    torch.manual_seed(0)
    model = samfx.models.build(case.model)
    image = package_images([case.image])[0].image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LiteMedSAM's box-only warning: the table says it
        generator = MaskGenerator(model, EverythingConfig(points_per_side=points_per_side))
    runs: dict[str, list] = {"grid": [], "hierarchical": []}
    # The generator times its own stages (the embedding apart); the harness supplies the turns.
    interleaved({strategy: (lambda s=strategy: runs[s].append(generator.generate(image, s))) for strategy in runs},
                repeats, warmup=0)
    embed_s = runs["grid"][0].timings["embed_s"]
    row: dict = {"case": f"{case.name}/everything", "model": case.model, "image": case.image,
                 "weights": "real" if samfx.models.spec(case.model).pretrained else "random",
                 "points_per_side": points_per_side, "embed_s": embed_s}
    for strategy, results in runs.items():
        last = results[-1]
        row[strategy] = {"masks": len(last), "clicks": last.prompts, "skipped": last.prompts_skipped,
                         "segment_s": statistics.median(r.timings["segment_s"] for r in results),
                         "decoder_s": statistics.median(r.timings["decoder_s"] for r in results)}
    grid_s, fast_s = row["grid"]["segment_s"], row["hierarchical"]["segment_s"]
    row["speedup"] = grid_s / fast_s
    row["end_to_end_speedup"] = (embed_s + grid_s) / (embed_s + fast_s)
    match = match_masks(runs["grid"][-1], runs["hierarchical"][-1])
    row["fidelity"] = {"mask_iou_mean": match.mean_iou, "recall": match.recall, "precision": match.precision,
                       "matched": match.matched, "iou_threshold": match.iou_threshold}
    return row


def table(rows: list[dict]) -> str:
    def miou(r: dict) -> float | None:
        value = r["fidelity"]["mask_iou_mean"]
        return None if math.isnan(value) else value

    return markdown_table(rows, [
        ("case", lambda r: f"{r['model']}/{r['image']}", "{}"), ("weights", "weights", "{}"),
        ("masks g/h", lambda r: f"{r['grid']['masks']}/{r['hierarchical']['masks']}", "{}"),
        ("clicks g/h (skipped)", lambda r: f"{r['grid']['clicks']}/{r['hierarchical']['clicks']} "
                                          f"({r['hierarchical']['skipped']})", "{}"),
        ("embed s", "embed_s", "{:.2f}"), ("grid s", lambda r: r["grid"]["segment_s"], "{:.2f}"),
        ("hier s", lambda r: r["hierarchical"]["segment_s"], "{:.2f}"), ("speed-up", "speedup", "{:.2f}x"),
        ("end-to-end", "end_to_end_speedup", "{:.2f}x"), ("match mIoU", miou, "{:.3f}"),
        ("recall", lambda r: r["fidelity"]["recall"], "{:.2f}"),
    ])
