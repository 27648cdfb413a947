"""The fused hyper kernel against "decode, then cuBLAS", on SAM's encoder Linear shapes.

    python -m benchmarks hyper_gpu --prepare codes.pt              # encode the weights (CPU, numba)
    python -m benchmarks hyper_gpu --codes codes.pt --out r.json   # on a CUDA device

For each shape (out x in) and activation type it times, with CUDA events
(``triton.testing.do_bench``, median):

* ``fused``: ``samfx::hyper_linear``'s Triton kernel, decoding code tiles in
  registers, best of a few tile configurations (the chosen one is recorded);
* ``decode+cuBLAS``: samfx's Triton decode kernel writes the dense weight in the
  activation type, then ``torch.nn.functional.linear`` (cuBLAS);
* ``cuBLAS``: the dense weight alone, for reference (what the codes save memory against).

It checks every fused result against the float64 reference first and refuses
to time a kernel that is wrong. ``--smoke`` runs tiny shapes (with
``TRITON_INTERPRET=1`` this checks the script on a CPU).
"""

from __future__ import annotations

import argparse
import sys

import torch

from samfx.bench import markdown_table, timed, write_results

SHAPES = {
    "vit_b.qkv": (2304, 768), "vit_b.proj": (768, 768), "vit_b.lin1": (3072, 768), "vit_b.lin2": (768, 3072),
    "vit_h.qkv": (3840, 1280), "vit_h.proj": (1280, 1280), "vit_h.lin1": (5120, 1280), "vit_h.lin2": (1280, 5120),
}
SMOKE = {"smoke.a": (40, 77), "smoke.b": (64, 130)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_P": 32, "GROUP_N": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_P": 32, "GROUP_N": 8, "num_warps": 8, "num_stages": 3},
]
SMOKE_CONFIGS = [{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_P": 16, "GROUP_N": 1, "num_warps": 1, "num_stages": 1}]


def prepare(path: str, shapes: dict[str, tuple[int, int]]) -> None:
    from samfx.codecs.lattice import encode

    torch.manual_seed(0)
    codes = {}
    for name, (rows, cols) in shapes.items():
        # nn.Linear's default initialisation, the zoo's random-weight models
        weight = (torch.rand(rows, cols) * 2 - 1) / cols ** 0.5
        code = encode(weight, 0.02)
        codes[name] = {"codes": code.codes, "row_params": code.row_params, **code.meta()}
    torch.save(codes, path)
    print(f"wrote {len(codes)} codes to {path}")


def run(path: str, tokens: int, out: str | None, smoke: bool) -> None:
    import triton
    from triton.testing import do_bench

    from samfx.codecs.lattice import decode_rows, pack_codes, unpack_codes
    from samfx.kernels import hyper_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    codes = torch.load(path)
    configs = SMOKE_CONFIGS if smoke else CONFIGS
    gpu = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET)",
           "triton": triton.__version__, "tokens": tokens, "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    print(gpu, flush=True)
    rows_out = []
    failures: list[str] = []

    def timer(fn) -> float:
        if device == "cuda":  # CUDA events: samfx.bench.interleaved's wall clock would time the launches
            return do_bench(fn, warmup=10, rep=40, return_mode="median")
        return timed(fn)[1] * 1e3  # the interpreter's smoke run: one call, nothing to compare
    layouts = []
    for name, entry in codes.items():
        theta = unpack_codes(entry["codes"], (entry["cols"] + 1) // 2, entry["bits"])
        layouts += [(name, "packed", entry), (name, "uint16", {**entry, "codes": pack_codes(theta, entry["bits"], "uint16")})]
    for name, layout, entry in layouts:
        key = f"{name}/{layout}"
        args = (entry["codes"].to(device), entry["row_params"].to(device), entry["cols"], entry["bits"], entry["nx"],
                entry["i0"], entry["j0"])
        reference = decode_rows(*args).double()
        for dtype_name, dtype in DTYPES.items():
            x = torch.randn(tokens, entry["cols"], device=device, dtype=dtype)
            bias = torch.randn(entry["shape"][0], device=device)
            expected = torch.nn.functional.linear(x.double(), reference, bias.double())
            tolerance = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 2e-2}[dtype_name]
            best = None
            for config in configs:
                try:
                    result = hyper_triton.linear(x, *args[:2], bias, *args[2:], config=config)
                except triton.runtime.errors.OutOfResources as err:
                    failures.append(f"{key} {dtype_name} {config}: {err}")
                    continue
                error = float((result.double() - expected).norm() / expected.norm())
                if not error < tolerance:  # never time a wrong kernel
                    failures.append(f"{key} {dtype_name} {config}: relative error {error:.2e} > {tolerance}")
                    continue
                ms = timer(lambda c=config: hyper_triton.linear(x, *args[:2], bias, *args[2:], config=c))
                if best is None or ms < best[0]:
                    best = (ms, config, error)
            if best is None:
                continue
            dense = hyper_triton.decode(*args, dtype=dtype)
            decode_ms = timer(lambda: hyper_triton.decode(*args, dtype=dtype))
            two_step_ms = timer(lambda: torch.nn.functional.linear(x, hyper_triton.decode(*args, dtype=dtype),
                                                                   bias.to(dtype)))
            cublas_ms = timer(lambda: torch.nn.functional.linear(x, dense, bias.to(dtype)))
            flops = 2 * tokens * entry["cols"] * entry["shape"][0]
            row = {"shape": name, "layout": layout, "bits": entry["bits"], "dtype": dtype_name,
                   "out": entry["shape"][0], "in": entry["cols"], "fused_ms": best[0], "fused_config": best[1],
                   "fused_rel_error": best[2], "decode_ms": decode_ms, "decode_cublas_ms": two_step_ms,
                   "cublas_ms": cublas_ms, "speedup_vs_decode_cublas": two_step_ms / best[0],
                   "fused_tflops": flops / best[0] / 1e9, "cublas_tflops": flops / cublas_ms / 1e9}
            rows_out.append(row)
            print(f"{name:11s} {layout:6s} {dtype_name:4s} b={entry['bits']:2d} fused {best[0]:8.4f} ms  "
                  f"decode {decode_ms:7.4f} + cuBLAS = {two_step_ms:8.4f} ms  (dense cuBLAS {cublas_ms:8.4f})  "
                  f"x{two_step_ms / best[0]:5.2f}  err {best[2]:.1e}", flush=True)
    print("\n" + markdown_table(rows_out, [
        ("shape", "shape", "{}"), ("layout", "layout", "{}"), ("dtype", "dtype", "{}"), ("fused ms", "fused_ms", "{:.4f}"),
        ("decode+cuBLAS ms", "decode_cublas_ms", "{:.4f}"), ("speedup", "speedup_vs_decode_cublas", "{:.2f}"),
        ("cuBLAS-dense ms", "cublas_ms", "{:.4f}")]))
    print("\n".join(["failures:"] + failures) if failures else "no failures")
    if out:
        print(f"wrote {write_results(out, {'gpu': gpu, 'rows': rows_out, 'failures': failures})}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", help="encode the shapes' weights into this file (CPU)")
    parser.add_argument("--codes", help="time the codes in this file")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and one tile configuration")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    shapes = SMOKE if args.smoke else SHAPES
    if args.prepare:
        prepare(args.prepare, shapes)
    if args.codes:
        run(args.codes, args.tokens, args.out, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
