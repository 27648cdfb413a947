"""hyper against Birkhoff's codec and round-to-nearest integers, side by side in one run.

    python -m benchmarks hyper_codec                                # LiteMedSAM, SAM ViT-B, SAM 2.1 Hiera-B+
    python -m benchmarks hyper_codec --model sam_vit_h --time-only  # compression time alone

Per zoo model it reports, for the whole checkpoint (every tensor of the state
dict, against the fp32 safetensors file):

* ``hyper``: ``samfx.optimize(model, ["hyper"])`` then ``samfx.save``;
* ``hyper (Birkhoff's error)``: the same with each tensor's target set to the
  error Birkhoff's codec reaches on it, i.e. the ratio at no worse per-tensor error;
* ``Birkhoff``: samfx's faithful reimplementation of Birkhoff's codec and file
  layout (:mod:`benchmarks.codecs.birkhoff`), with Birkhoff's published ratio beside it;

and per tensor that hyper codes, the relative error ``|W' - W| / |W|`` (and the
mean absolute error, Birkhoff's criterion), including round-to-nearest
per-channel int6/int8 and hyper tuned to the same bits per weight.
Times are wall-clock seconds of the coding itself on this machine, with the
threads given (``OMP_WAIT_POLICY=PASSIVE``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import samfx  # noqa: E402
from benchmarks.codecs import birkhoff, rtn  # noqa: E402
from samfx.codecs.lattice import CODES, encode  # noqa: E402
from samfx.bench import markdown_table, timed, write_results  # noqa: E402

#: Birkhoff's README (ratio vs safetensors, seconds on its GPU); LiteMedSAM: measured-anchors.md (2-core CPU).
PUBLISHED = {"sam_vit_b": (4.31, 15.81), "sam_vit_l": (4.68, 41.67), "sam_vit_h": (4.75, 95.33),
             "sam2.1_hiera_b+": (5.17, 20.83), "lite_medsam": (4.04, 111.0)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _mae(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def _dense_size(model: nn.Module, folder: Path) -> int:
    from safetensors.torch import save_file

    path = folder / "dense.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def _saved_size(model: nn.Module, folder: Path) -> tuple[int, float]:
    _, elapsed = timed(lambda: samfx.save(model, folder))
    return sum(f.stat().st_size for f in folder.iterdir()), elapsed


def _at_bits(weight: torch.Tensor, bits: float) -> torch.Tensor:
    """hyper tuned to ``bits`` per weight in the file (entropy coding plus row
    parameters): the step halves per extra bit, so two encodes land close."""
    target = 0.02
    for _ in range(3):
        code = encode(weight, target)
        stored = 8 * (len(CODES.encode(code.codes, code.meta())) + code.row_params.numel() * 2) / weight.numel()
        target *= 2 ** (stored - bits)
    return encode(weight, target).decode()


def run_model(name: str, threads: int, time_only: bool) -> dict:
    torch.manual_seed(0)
    model = samfx.models.build(name)
    optimized, total = timed(lambda: samfx.optimize(model, ["hyper"], model_name=name))
    report = optimized.samfx_report
    row: dict = {"model": name, "params": report.before.params, "threads": threads,
                 "hyper_pass_s": report.passes[0].time_s, "optimize_s": total,
                 "resident_ratio": report.before.weight_bytes / report.after.weight_bytes,
                 "hyper_summary": report.passes[0].summary}
    if time_only:
        return row
    coded = report.passes[0].details["tensors"]
    originals = dict(model.named_parameters())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dense = _dense_size(model, folder)
        size, save_s = _saved_size(optimized, folder / "hyper")
        row.update(dense_bytes=dense, hyper_bytes=size, hyper_ratio=dense / size, hyper_save_s=save_s)

        # Birkhoff's codec on every parameter, as its compress_params does
        linear_weights = {f"{p}.weight" for p, m in model.named_modules() if isinstance(m, nn.Linear)}
        codes, row["birkhoff_s"] = timed(lambda: {key: birkhoff.encode(value, key in linear_weights)
                                                  for key, value in originals.items()})
        buffers = {k: v for k, v in model.state_dict().items() if k not in originals}
        codes.update({k: birkhoff.BirkhoffCode(v.float() if v.is_floating_point() else v) for k, v in buffers.items()})
        row["birkhoff_bytes"] = birkhoff.file_size(codes, str(folder / "birkhoff.safetensors"))
        row["birkhoff_ratio"] = dense / row["birkhoff_bytes"]
        row["birkhoff_published"] = PUBLISHED.get(name)

        # per coded tensor: every method's error
        tensors = {}
        for path in coded:
            key = f"{path}.weight" if f"{path}.weight" in originals else path
            weight = originals[key].detach().float()
            theirs = codes[key].decode()
            ours = optimized.get_submodule(path).decode()
            tensors[path] = {
                "numel": weight.numel(),
                "hyper": (_rel(ours, weight), _mae(ours, weight)),
                "birkhoff": (_rel(theirs, weight), _mae(theirs, weight), codes[key].bits / 2),
                **{f"rtn{b}": (_rel(q, weight), _mae(q, weight), bpw) for b in (6, 8)
                   for q, bpw in [rtn.quantize(weight, b)]},
                **{f"hyper@{b}": (_rel(q, weight), _mae(q, weight)) for b in (6, 8)
                   for q in [_at_bits(weight, b).reshape(weight.shape)]},
            }
        row["tensors"] = tensors

        # hyper with each tensor's target at Birkhoff's error on it
        overrides = tuple((path, min(0.5, 0.97 * t["birkhoff"][0])) for path, t in tensors.items())
        matched, row["matched_s"] = timed(lambda: samfx.optimize(model, [samfx.HyperConfig(overrides=overrides)],
                                                                 model_name=name))
        size, _ = _saved_size(matched, folder / "matched")
        row.update(matched_bytes=size, matched_ratio=dense / size,
                   matched_resident_ratio=matched.samfx_report.before.weight_bytes / matched.samfx_report.after.weight_bytes)
        worse = []
        for path, t in tensors.items():
            module = matched.get_submodule(path)
            weight = originals[f"{path}.weight" if f"{path}.weight" in originals else path].detach().float()
            # a tensor Birkhoff keeps raw (error 0) stays uncoded here too
            decoded = module.decode() if hasattr(module, "decode") else weight
            t["matched"] = (_rel(decoded, weight), _mae(decoded, weight))
            if t["matched"][0] > t["birkhoff"][0]:
                worse.append(path)
        row["matched_worse_than_birkhoff"] = worse
    return row


def _weighted(tensors: dict, method: str, index: int = 0) -> float:
    """RMS over tensors of one error measure, weighted by size."""
    total = sum(t["numel"] for t in tensors.values())
    return math.sqrt(sum(t[method][index] ** 2 * t["numel"] for t in tensors.values()) / total)


def table(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        parts.append(f"{r['model']}: {r['params'] / 1e6:.1f} M parameters, hyper pass {r['hyper_pass_s']:.1f} s "
                     f"(optimize {r['optimize_s']:.1f} s, {r['threads']} threads), resident weights "
                     f"{r['resident_ratio']:.2f}x smaller; {r['hyper_summary']}")
        if "tensors" not in r:
            continue
        t = r["tensors"]
        published = r.get("birkhoff_published")
        worse = f"tensors worse than Birkhoff: {len(r['matched_worse_than_birkhoff'])}/{len(t)}"
        parts.append(markdown_table([
            {"checkpoint": "hyper (rel_error 0.02)", "ratio": r["hyper_ratio"], "s": r["hyper_pass_s"]},
            {"checkpoint": "hyper (Birkhoff error)", "ratio": r["matched_ratio"], "s": r["matched_s"], "note": worse},
            {"checkpoint": "Birkhoff (reimplemented)", "ratio": r["birkhoff_ratio"], "s": r["birkhoff_s"],
             "note": f"published: {published[0]:.2f}x in {published[1]:.0f} s" if published else None},
        ], [("checkpoint", "checkpoint", "{}"), ("ratio", "ratio", "{:.2f}x"), ("time s", "s", "{:.1f}"),
            ("", "note", "{}")]))
        numel = sum(v["numel"] for v in t.values())
        birkhoff_bits = sum(v["birkhoff"][2] * v["numel"] for v in t.values()) / numel
        methods = [("hyper", "hyper 0.02", None), ("matched", "hyper (Birkhoff error)", None),
                   ("birkhoff", "Birkhoff", birkhoff_bits), ("hyper@6", "hyper at 6 bits", 6),
                   ("rtn6", "RTN int6 per channel", 6.0), ("hyper@8", "hyper at 8 bits", 8),
                   ("rtn8", "RTN int8 per channel", 8.0)]
        parts.append(markdown_table(
            [{"method": label, "rel": _weighted(t, m), "mae": _weighted(t, m, 1), "bits": b} for m, label, b in methods],
            [(f"per-tensor error over {len(t)} tensors", "method", "{}"), ("RMS rel", "rel", "{:.4f}"),
             ("RMS MAE", "mae", "{:.2e}"), ("bits/w", "bits", "{:.2f}")]))
        better = sum(v["hyper"][0] <= v["birkhoff"][0] for v in t.values())
        parts.append(f"hyper 0.02 no worse than Birkhoff on {better}/{len(t)} tensors")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="zoo models (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-only", action="store_true", help="only the compression time")
    parser.add_argument("--out", default="benchmarks/results/hyper_codec.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.model or ["lite_medsam", "sam_vit_b", "sam2.1_hiera_b+"]:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(run_model(name, args.threads, args.time_only))
        print(table(rows[-1:]), flush=True)
    print(f"\nwrote {write_results(args.out, {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
