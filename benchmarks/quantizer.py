"""Residual quantizer benchmark: EvoTok's quantizer vs a straightforward port of the official algorithm.

Paper sizes by default: 16 depths x 32,768 codes x 32 dims, on 1,024 vectors. In one process it times
(a) `EvoTokResidualQuantizer` (eval mode, no EMA update),
(b) a straightforward per-depth implementation of the official algorithm: the full (N x K) distance matrix
    ||r||^2 + ||c||^2 - 2 r.c by `addmm`, `argmin`, and the official code's extra `mean(sum(distances**2))` per depth,
(c) `vector_quantize_pytorch.ResidualVQ` with the same codebooks, when it is installed,
and checks that all give identical codes (counting any differences and, for each, which code is truly nearer in
float64). Prints ms, codes/s, the ratio to (b), the largest distance block each holds and (CUDA, or CPU with
--memory) the measured peak extra memory.

(a) runs once per `--workers` setting: its CPU search hands blocks of rows to a pool of single-threaded workers
(`search_workers`, by default `torch.get_num_threads()`); `--workers 1` is one multi-threaded GEMM per block, the search
before the pool. `--background-load N` runs everything beside N busy processes, each a 2-thread torch matmul loop
(what a training job with data workers looks like), started before the timing and stopped after it.

    python benchmarks/quantizer.py [--device cuda] [--vectors 1024] [--repeats 5] [--chunk-sizes auto,256,1024]
                                   [--workers auto,1] [--background-load 2] [--autocast bf16] [--memory]
                                   [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time

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
    p.add_argument("--workers", default="auto",
                   help="comma-separated search_workers for (a) on CPU; auto = torch.get_num_threads()")
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="time beside N busy processes, each a 2-thread torch matmul loop")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none", help="run (a) under autocast too")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--memory", action="store_true",
                   help="on CPU, measure each implementation's peak RSS increase in a fresh process")
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


def _time_round_robin(candidates, device, repeats):
    """Time every candidate `repeats` times, interleaved (one call of each per round), after one warm-up call each,
    so drifting machine load affects all alike. Returns {name: (last output, best s, median s)}."""
    outputs = {name: fn() for name, fn in candidates.items()}
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync(device)
            t0 = time.perf_counter()
            outputs[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (outputs[name], min(ts), sorted(ts)[len(ts) // 2]) for name, ts in times.items()}


def _busy_matmul_loop(stop):
    """A background process: 2-thread 512 x 512 matmuls until told to stop."""
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a @ a


class BackgroundLoad:
    """`count` busy processes (spawned: a forked child of a process whose OpenMP pool is running can hang), running
    while the `with` block runs."""

    def __init__(self, count: int):
        self.count = count

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.processes = [ctx.Process(target=_busy_matmul_loop, args=(self.stop,), daemon=True) for _ in range(self.count)]
        for process in self.processes:
            process.start()
        if self.processes:
            time.sleep(2.0)  # let them start their loops before the timing does
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        return False


def _cuda_peak(fn):
    """Peak extra CUDA memory (bytes) of one call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _rss_child(which, vectors, depth, size, dim, queue):
    """In a fresh process: build the inputs, then report how far one call raises the peak RSS above the setup's."""
    torch.manual_seed(0)
    quantizer = EvoTokResidualQuantizer(size, dim, min(4, depth), depth).eval()
    x = torch.randn(vectors, dim)
    codebooks = quantizer.codebook.detach()
    with torch.no_grad():
        quantizer(x[:1])  # warm the allocator and the thread pool at negligible size
        official_reference(codebooks, x[:1])
    before = _peak_rss_bytes()
    with torch.no_grad():
        quantizer(x) if which == "a" else official_reference(codebooks, x)
    queue.put(_peak_rss_bytes() - before)


def _peak_rss_bytes() -> int:
    """This process's peak resident set size. VmHWM belongs to the process image (ru_maxrss would carry the parent's
    high-water mark across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_peak(which, args):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(which, args.vectors, args.depth, args.codebook_size, args.dim, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


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

    def ours(chunk, workers):
        def run():
            quantizer.search_chunk_size, quantizer.search_workers = chunk, workers
            with torch.no_grad():
                return quantizer(x).codes

        return run

    candidates = {"b": lambda: official_reference(codebooks, x)}
    blocks = {"b": args.vectors * args.codebook_size * 4}
    labels = {"b": "(b) official algorithm, full addmm + argmin + d_norm"}
    worker_settings = [None if w == "auto" else int(w) for w in args.workers.split(",")]
    for chunk in [None if c == "auto" else int(c) for c in args.chunk_sizes.split(",")]:
        for workers in worker_settings:
            quantizer.search_chunk_size, quantizer.search_workers = chunk, workers
            rows_per_block = quantizer._search_rows(device)
            name = f"a_chunk{f'auto({rows_per_block})' if chunk is None else chunk}"
            if workers is not None:
                name += f"_workers{workers}"
            candidates[name] = ours(chunk, workers)
            blocks[name] = min(rows_per_block, args.vectors) * args.codebook_size * 4
            labels[name] = (f"(a) EvoTokResidualQuantizer, search_chunk_size={name[len('a_chunk'):].split('_')[0]}"
                            f", search_workers={quantizer._search_workers(device)}")  # fmt: skip
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

        candidates["c"] = run_lucidrains
        blocks["c"] = None
        labels["c"] = "(c) vector_quantize_pytorch.ResidualVQ"

    results["background_load_processes"] = args.background_load
    with BackgroundLoad(args.background_load):
        timed = _time_round_robin(candidates, device, args.repeats)
    ref_codes, ref_best, _ = timed["b"]
    rows = []
    for name, (codes, best, median) in timed.items():
        rows.append((labels[name], best, median, blocks[name]))
        results[f"{name}_ms"] = best * 1e3
        results[f"{name}_median_ms"] = median * 1e3
        if name != "b":
            results[f"{name}_vs_b"] = _mismatch_report(codebooks, x, codes, ref_codes)
        if name.startswith("a_") and args.autocast == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                results[f"{name}_bf16_autocast_identical"] = bool(torch.equal(candidates[name](), codes))

    quantizer.search_chunk_size = quantizer.search_workers = None
    if device.type == "cuda":
        with torch.no_grad():
            results["a_peak_bytes"] = _cuda_peak(lambda: quantizer(x))
        results["b_peak_bytes"] = _cuda_peak(lambda: official_reference(codebooks, x))
    elif args.memory:
        results["a_peak_rss_increase_bytes"] = _cpu_peak("a", args)
        results["b_peak_rss_increase_bytes"] = _cpu_peak("b", args)

    print(f"\nresidual quantization: {args.vectors} vectors x {args.depth} depths x {args.codebook_size} codes x "
          f"{args.dim} dims on {device} ({torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.background_load} busy background processes)")
    print(f"{'implementation':78s} {'best ms':>9s} {'median ms':>10s} {'kcodes/s':>9s} {'speed-up vs (b)':>15s} "
          f"{'largest distance block':>22s}")
    for label, best, median, block in rows:
        block_s = f"{block / 2**20:.1f} MiB" if block else "-"
        print(f"{label:78s} {best * 1e3:9.1f} {median * 1e3:10.1f} {total_codes / best / 1e3:9.1f} "
              f"{ref_best / best:15.2f} {block_s:>22s}")
    for key, value in results.items():
        if key.endswith("_vs_b") or "identical" in key:
            print(f"{key}: {value}")
        elif "peak" in key:
            print(f"{key}: {value / 2**20:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
