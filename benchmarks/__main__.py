"""``python -m benchmarks SUITE [options]``: run one benchmark suite.

Every suite times with :mod:`samfx.bench` (rotating interleaved turns after a
warm-up, medians; the CPU's ISA in every result). ``python -m benchmarks`` lists
the suites; ``python -m benchmarks SUITE --help`` gives a suite's options.
"""

from __future__ import annotations

import importlib
import sys

#: Suite name -> module under benchmarks/ (each has ``main(argv) -> int``).
SUITES = {
    "run": "passes on zoo models: time, size, MACs, latency, fidelity",
    "emit": "the torch.compile backend and the ONNX pair",
    "attention": "rel-pos attention kernels (CPU cores, memory; GPU with --device cuda)",
    "precision": "fuse_attention and reduced precision on one device",
    "quantize": "quantize against fp32 and onnxruntime's quantize_dynamic",
    "hyper_codec": "hyper against Birkhoff's codec and round-to-nearest integers",
    "hyper_gpu": "hyper's Triton kernels on a GPU",
    "everything": "segment-everything mask generation (run --everything)",
    "deploy": "hand-made CPU deploy paths (onnxruntime, OpenVINO, NNCF) against samfx's, encoder and 24 boxes",
    "zoo_smoke": "every full-size zoo model builds and runs once",
    "eval_folder": "samfx eval on a generated COCO folder",
    "video": "SAM 2.1's video path per frame, original against optimized (and the ONNX loop)",
    "tune": "samfx tune on LiteMedSAM (latency on OpenVINO, box IoU >= 0.98, 20 minutes) against the preset",
}
#: Suites that are options of another suite's script.
ALIASES = {"everything": ("run", ["--everything"])}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, SUITES))
        print("usage: python -m benchmarks SUITE [options]\n\nsuites:")
        print("\n".join(f"  {name:<{width}}  {what}" for name, what in SUITES.items()))
        return 0 if argv else 2
    suite, rest = argv[0], argv[1:]
    if suite not in SUITES:
        print(f"benchmarks: error: unknown suite {suite!r}; suites: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    target, options = ALIASES.get(suite, (suite, []))
    rest = options + rest
    module = importlib.import_module(f"benchmarks.{target}")
    sys.argv = [f"python -m benchmarks {suite}", *rest]
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
