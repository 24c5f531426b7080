"""Residual quantizer benchmark: EvoTok's quantizer vs a straightforward port of the official algorithm.

Paper sizes by default: 16 depths x 32,768 codes x 32 dims, on 1,024 vectors. In one process it times
(a) `EvoTokResidualQuantizer` (eval mode, no EMA update),
(b) a straightforward per-depth implementation of the official algorithm: the full (N x K) distance matrix
    ||r||^2 + ||c||^2 - 2 r.c by `addmm`, `argmin`, and the official code's extra `mean(sum(distances**2))` per depth,
(c) `vector_quantize_pytorch.ResidualVQ` with the same codebooks, when it is installed,
and checks that all give identical codes (counting any differences and, for each, which code is truly nearer in
float64). Prints ms, codes/s, the ratio to (b) and peak extra memory.

    python benchmarks/quantizer.py [--device cuda] [--vectors 1024] [--repeats 5] [--chunk-sizes 64,256,1024]
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import torch

from evotok_hf.modeling.quantizer import EvoTokResidualQuantizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vectors", type=int, default=1024)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--codebook-size", type=int, default=32768)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-sizes", default="auto", help="comma-separated search block sizes for (a); auto = the default")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none", help="run (a) under autocast too")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


@torch.no_grad()
def official_reference(codebooks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(b): the authors' per-depth algorithm, written plainly (full distance matrix at every depth)."""
    residual = x.clone()
    codes = []
    for codebook in codebooks:
        codebook_t = codebook.t()
        distances = torch.addmm(
            residual.pow(2).sum(dim=1, keepdim=True) + codebook_t.pow(2).sum(dim=0, keepdim=True),
            residual,
            codebook_t,
            alpha=-2.0,
        )
        idx = distances.argmin(dim=-1)
        torch.mean(torch.sum(distances**2, dim=-1))  # the official code computes this "d_norm" at every depth
        residual = residual - codebook[idx]
        codes.append(idx)
    return torch.stack(codes, dim=-1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, min(times), sorted(times)[len(times) // 2]


def _peak(fn, device):
    """Peak extra memory (bytes) of one call: CUDA allocator peak, or tracemalloc on CPU (torch CPU allocations
    are not traced by tracemalloc, so on CPU we report the analytic size of the largest distance block)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    tracemalloc.start()
    fn()
    tracemalloc.stop()
    return None


def _mismatch_report(codebooks, x, codes_a, codes_b):
    """Compare two code tensors; for the first differing depth of each vector say which choice is nearer (float64)."""
    diff = (codes_a != codes_b).any(dim=-1)
    n = int(diff.sum())
    if n == 0:
        return {"vectors_differing": 0}
    first_depth = (codes_a != codes_b).float().argmax(dim=-1)
    a_nearer = b_nearer = ties = 0
    cb64 = codebooks.double()
    for v in torch.nonzero(diff).flatten().tolist():
        d = int(first_depth[v])
        residual = x[v].double() - sum(cb64[i, codes_a[v, i]] for i in range(d)) if d else x[v].double()
        da = (residual - cb64[d, codes_a[v, d]]).pow(2).sum()
        db = (residual - cb64[d, codes_b[v, d]]).pow(2).sum()
        if da < db:
            a_nearer += 1
        elif db < da:
            b_nearer += 1
        else:
            ties += 1
    return {"vectors_differing": n, "first_nearer": a_nearer, "second_nearer": b_nearer, "exact_ties": ties}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    quantizer = EvoTokResidualQuantizer(args.codebook_size, args.dim, min(4, args.depth), args.depth).to(device).eval()
    x = torch.randn(args.vectors, args.dim, device=device)
    codebooks = quantizer.codebook.detach()
    total_codes = args.vectors * args.depth
    results = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "vectors": args.vectors, "depth": args.depth, "codebook_size": args.codebook_size, "dim": args.dim}

    ref_codes, ref_best, ref_median = _time(lambda: official_reference(codebooks, x), device, args.repeats)
    rows = [("(b) official algorithm, full addmm + argmin + d_norm", ref_best, ref_median, args.vectors * args.codebook_size * 4)]
    results["b_official_ms"] = ref_best * 1e3

    for chunk in [None if c == "auto" else int(c) for c in args.chunk_sizes.split(",")]:
        quantizer.search_chunk_size = chunk
        rows_per_block = quantizer._search_rows(device)
        chunk = f"auto({rows_per_block})" if chunk is None else chunk

        def run_ours():
            with torch.no_grad():
                return quantizer(x).codes

        codes, best, median = _time(run_ours, device, args.repeats)
        label = f"(a) EvoTokResidualQuantizer, search_chunk_size={chunk}"
        rows.append((label, best, median, min(rows_per_block, args.vectors) * args.codebook_size * 4))
        results[f"a_chunk{chunk}_ms"] = best * 1e3
        results[f"a_chunk{chunk}_vs_b"] = _mismatch_report(codebooks, x, codes, ref_codes)
        if args.autocast == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                ac_codes = run_ours()
            results[f"a_chunk{chunk}_bf16_autocast_identical"] = bool(torch.equal(ac_codes, codes))

    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        ResidualVQ = None
    if ResidualVQ is not None:
        rvq = ResidualVQ(dim=args.dim, num_quantizers=args.depth, codebook_size=args.codebook_size, kmeans_init=False)
        with torch.no_grad():
            for layer, codebook in zip(rvq.layers, codebooks):
                layer._codebook.embed.copy_(codebook.unsqueeze(0))
        rvq = rvq.to(device).eval()

        def run_lucidrains():
            with torch.no_grad():
                return rvq(x.unsqueeze(0))[1][0]

        codes_c, best_c, median_c = _time(run_lucidrains, device, args.repeats)
        rows.append(("(c) vector_quantize_pytorch.ResidualVQ", best_c, median_c, None))
        results["c_vector_quantize_pytorch_ms"] = best_c * 1e3
        results["c_vs_b"] = _mismatch_report(codebooks, x, codes_c, ref_codes)

    if device.type == "cuda":
        first = args.chunk_sizes.split(",")[0]
        quantizer.search_chunk_size = None if first == "auto" else int(first)
        results["a_peak_bytes"] = _peak(lambda: quantizer(x), device)
        results["b_peak_bytes"] = _peak(lambda: official_reference(codebooks, x), device)

    print(f"\nresidual quantization: {args.vectors} vectors x {args.depth} depths x {args.codebook_size} codes x "
          f"{args.dim} dims on {device} ({torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"{'implementation':58s} {'best ms':>9s} {'median ms':>10s} {'Mcodes/s':>9s} {'speed-up vs (b)':>15s} "
          f"{'largest distance block':>22s}")
    for label, best, median, block in rows:
        block_s = f"{block / 2**20:.1f} MiB" if block else "-"
        print(f"{label:58s} {best * 1e3:9.1f} {median * 1e3:10.1f} {total_codes / best / 1e6:9.3f} "
              f"{ref_best / best:15.2f} {block_s:>22s}")
    for key, value in results.items():
        if key.endswith("_vs_b") or "identical" in key or "peak" in key:
            print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
