"""Attention with SAM's decomposed relative positions: upstream eager vs SDPA with
the bias as a mask vs samfx's blockwise op, on SAM's shapes.

    python -m benchmarks attention                      # CPU: cores of ViT-B/H, peak memory of a global block
    python -m benchmarks attention --device cuda        # GPU: the Triton kernel vs SDPA, bf16 and fp16

A core is ``softmax(scale * q @ k^T + rel_h + rel_w) @ v`` for one image:
global blocks attend over 64 x 64 = 4096 tokens, windowed blocks over 25
windows of 14 x 14 (the 64 x 64 map padded to 70 x 70). Variants are timed
interleaved in one process (median of ``--repeats``); ``speedup`` is against
upstream's eager code. ``err`` is ``|out - ref| / |ref|`` against a float64
reference on the CPU (float32 on the GPU). On the CPU it also runs a one-block
global-attention ViT encoder at 1024 px (original, and fused both ways) and
reports the peak memory its forward allocates, from the allocator's records.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import samfx.kernels.rel_pos as kernel_module  # noqa: E402
from samfx.kernels import rel_pos_attention, rel_pos_attention_reference  # noqa: E402
from samfx.bench import interleaved, markdown_table, run_note, write_results  # noqa: E402
from samfx.kernels.rel_pos import rel_pos_sdpa  # noqa: E402

MODELS = {"vit_b": (12, 64), "vit_h": (16, 80)}
LAYOUTS = {"global": (1, 64), "window": (25, 14)}


def upstream_eager(q, k, v, rel_h, rel_w, scale):
    """``segment_anything``'s Attention core, as written upstream."""
    g, n, _ = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = (attn.view(g, kh, kw, kh, kw) + rel_h.view(g, kh, kw, kh)[..., None]
            + rel_w.view(g, kh, kw, kw)[..., None, :]).view(g, n, n)
    return attn.softmax(dim=-1) @ v


def inputs(model: str, layout: str, batch: int, dtype: torch.dtype, device: str) -> tuple:
    heads, head_dim = MODELS[model]
    windows, side = LAYOUTS[layout]
    g, n = batch * windows * heads, side * side
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(g, n, head_dim, generator=gen) for _ in range(3))
    rel_h, rel_w = (torch.randn(g, n, side, generator=gen) for _ in range(2))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, rel_h, rel_w)) + (head_dim ** -0.5,)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.to(ref.dtype)
    return float((out - ref).norm() / ref.norm())


def cpu_cores(repeats: int, chunk_bytes: list[int]) -> list[dict]:
    rows = []
    for model in MODELS:
        for layout in LAYOUTS:
            args = inputs(model, layout, 1, torch.float32, "cpu")
            ref = rel_pos_attention_reference(*(a.double() if torch.is_tensor(a) else a for a in args))

            def blockwise(budget: int):
                def run():
                    kernel_module.CHUNK_BYTES = budget
                    return rel_pos_attention(*args)
                return run

            fns = {"eager": lambda: upstream_eager(*args), "sdpa_mask": lambda: rel_pos_sdpa(*args)}
            for budget in chunk_bytes:
                fns[f"blockwise_{budget >> 20}MiB"] = blockwise(budget)
            errors = {name: _rel_err(fn(), ref) for name, fn in fns.items()}
            times = {name: t.median for name, t in interleaved(fns, repeats).items()}
            for name in fns:
                rows.append({"model": model, "layout": layout, "variant": name, "dtype": "float32",
                             "ms": 1e3 * times[name], "speedup": times["eager"] / times[name], "err": errors[name]})
            print(f"  {model} {layout} done", file=sys.stderr, flush=True)
    return rows


def peak_forward_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of tensors the forward allocates beyond what exists before it,
    from the CPU allocator's events (the profiler's memory records, in time order)."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                        profile_memory=True) as prof:
        module(x)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def cpu_memory() -> list[dict]:
    """Peak memory of a one-block global-attention ViT encoder at 1024 px (the
    block dominates: patch embedding and neck add about 20 MB)."""
    import samfx
    from segment_anything.modeling import ImageEncoderViT

    rows = []
    x = torch.randn(1, 3, 1024, 1024)
    for model, (heads, dim) in (("vit_b", (12, 768)), ("vit_h", (16, 1280))):
        torch.manual_seed(0)
        encoder = ImageEncoderViT(depth=1, embed_dim=dim, num_heads=heads, global_attn_indexes=(0,),
                                  use_rel_pos=True, window_size=14, out_chans=256).eval()
        for name, param in encoder.named_parameters():
            if "rel_pos" in name:
                param.data.normal_(0, 0.1)
        variants = {"original": encoder}
        for mode in ("mask", "blockwise"):
            variants[mode] = samfx.optimize(encoder, [samfx.FuseAttentionConfig(rel_pos=mode)])
        with torch.inference_mode():
            ref = encoder(x)
        for variant, module in variants.items():
            with torch.inference_mode():
                err = _rel_err(module(x), ref)
            peak = peak_forward_bytes(module, x)
            rows.append({"model": model, "variant": variant, "peak_mb": peak / 2**20, "err": err})
        original = rows[-3]["peak_mb"]
        for r in rows[-3:]:
            r["reduction"] = original / r["peak_mb"]
    return rows


def gpu_cores(repeats: int, batches: list[int]) -> list[dict]:
    """Each variant on each shape; a failure is recorded in the row, not fatal."""
    import triton

    from samfx.kernels import rel_pos_triton

    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for model in MODELS:
            for layout in LAYOUTS:
                for batch in batches:
                    args = inputs(model, layout, batch, dtype, "cuda")
                    ref = rel_pos_attention_reference(*(a.float() if torch.is_tensor(a) else a for a in args))
                    q, k, v = args[:3]
                    scale = args[-1]
                    fns = {
                        "eager": lambda: upstream_eager(*args),
                        "sdpa_mask": lambda: rel_pos_sdpa(*args),
                        "triton_blockwise": lambda: rel_pos_triton.rel_pos_attention(*args),
                        "samfx_op": lambda: rel_pos_attention(*args),
                        "sdpa_no_bias": lambda: torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None],
                                                                                    scale=scale)[0],
                    }
                    group = []
                    for name, fn in fns.items():
                        row = {"model": model, "layout": layout, "batch": batch, "variant": name,
                               "dtype": str(dtype).replace("torch.", "")}
                        try:
                            fn()  # warm-up, autotuning
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                            out = fn()
                            torch.cuda.synchronize()
                            row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                            row["err"] = _rel_err(out, ref) if name != "sdpa_no_bias" else None
                            del out
                            row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=repeats, return_mode="median")
                        except Exception as err:  # noqa: BLE001  (recorded, the table goes on)
                            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                            torch.cuda.empty_cache()
                        group.append(row)
                        print(f"  {row}", file=sys.stderr, flush=True)
                    eager = next((r.get("ms") for r in group if r["variant"] == "eager"), None)
                    for r in group:
                        if eager and r.get("ms"):
                            r["speedup"] = eager / r["ms"]
                    rows += group
                    del args, ref
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
        return value

    return markdown_table(rows, [(c, lambda r, c=c: cell(r.get(c)), "{}") for c in columns])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5, help="CPU: timed runs; GPU: milliseconds of do_bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-mib", default="16", help="CPU: comma-separated chunk budgets of the blockwise op")
    parser.add_argument("--batches", default="1,8", help="GPU: images per call")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"device": args.device, "repeats": args.repeats}
    if args.device == "cpu":
        budgets = [int(float(m) * 2**20) for m in args.chunk_mib.split(",")]
        result["cores"] = cpu_cores(args.repeats, budgets)
        print(table(result["cores"], ["model", "layout", "variant", "dtype", "ms", "speedup", "err"]))
        if not args.no_memory:
            result["memory"] = cpu_memory()
            print()
            print(table(result["memory"], ["model", "variant", "peak_mb", "reduction", "err"]))
        print(f"\n{run_note(args.repeats)}")
    else:
        import triton

        gpu = {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "cuda": torch.version.cuda}
        result["gpu"] = gpu
        result["cores"] = gpu_cores(args.repeats, [int(b) for b in args.batches.split(",")])
        print(table(result["cores"], ["model", "layout", "batch", "dtype", "variant", "ms", "speedup", "peak_mb",
                                      "err", "error"]))
        print(f"\n{gpu['gpu']}, torch {torch.__version__}, triton {gpu['triton']}, CUDA {gpu['cuda']}; "
              f"median of triton.testing.do_bench over {args.repeats} ms")
    print(f"wrote {write_results(args.out or f'benchmarks/results/attention_{args.device}.json', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
