"""F.linear against the compiled static step's few-row linear (`_FewRowLinear`) on the weight shapes of image
generation at the paper's ratio, by number of rows (images per call x 2 with classifier-free guidance).

At one image per call every matmul of a generation step multiplies 2 rows by a weight that does not fit in the cache,
so its speed is how fast it reads the weight. Both are timed side by side in one process, each compiled with
`torch.compile(fullgraph=True, dynamic=False)` alone (as inside the compiled position step), the best of `--repeats`
rounds of `--calls` calls; also a plain `weight.sum(-1)` compiled the same way, which reads the weight once and does
nothing else (the read speed of this machine). Each result is checked against the float64 product.

    python benchmarks/few_row_linear.py [--threads 2] [--rows 1,2,4,8,16] [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from evotok_hf.modeling import generation
from evotok_hf.modeling.generation import _FewRowLinear

# (name, out_features, in_features) of the weights one image position reads at the paper's ratio (benchmarks/
# generation.py "paper-ratio": the LLM 28 x 448 with a 2,368-wide MLP, the depth head 6 x 320, 32,768-way classifiers)
SHAPES = (
    ("depth-head classifier", 32768, 320),
    ("LLM MLP gate / up", 2368, 448),
    ("LLM MLP down", 448, 2368),
    ("LLM attention q / o", 448, 448),
    ("depth-head MLP up", 1280, 320),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def _best_seconds(fn, repeats: int, calls: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def plain_linear(inputs, weight):
    return F.linear(inputs, weight)


def few_row_linear(inputs, weight):
    with _FewRowLinear():
        return F.linear(inputs, weight)


def weight_read(weight):
    return weight.sum(-1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 256
    dtype = getattr(torch, args.dtype)
    rows_list = [int(r) for r in args.rows.split(",")]
    compiled = {name: torch.compile(fn, fullgraph=True, dynamic=False)
                for name, fn in (("linear", plain_linear), ("few-row", few_row_linear), ("read", weight_read))}  # fmt: skip
    results = {"threads": args.threads, "dtype": args.dtype, "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(),
               "shipped_max_rows": generation.FEW_ROW_LINEAR_MAX_ROWS, "shapes": []}  # fmt: skip
    # every row count takes the few-row form here, beyond the shipped limit too: this is what sets the limit
    shipped, generation.FEW_ROW_LINEAR_MAX_ROWS = generation.FEW_ROW_LINEAR_MAX_ROWS, max(rows_list)
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    generator = torch.Generator().manual_seed(0)
    try:
        measure_shapes(shapes, rows_list, dtype, compiled, generator, args, results)
    finally:
        generation.FEW_ROW_LINEAR_MAX_ROWS = shipped
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def measure_shapes(shapes, rows_list, dtype, compiled, generator, args, results) -> None:
    for name, out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
        megabytes = weight.numel() * weight.element_size() / 1e6
        read = _best_seconds(lambda: compiled["read"](weight), args.repeats, args.calls)
        entry = {"name": name, "shape": [out_features, in_features], "megabytes": megabytes,
                 "read_gb_per_s": megabytes / 1e3 / read, "rows": {}}  # fmt: skip
        for rows in rows_list:
            inputs = torch.randn(rows, 1, in_features, generator=generator).to(dtype)
            reference = F.linear(inputs.double(), weight.double())
            timings = {}
            for variant in ("linear", "few-row"):
                out = compiled[variant](inputs, weight)
                error = float((out.double() - reference).abs().max() / reference.abs().max())
                seconds = _best_seconds(lambda: compiled[variant](inputs, weight), args.repeats, args.calls)
                timings[variant] = {"microseconds": seconds * 1e6, "gb_per_s": megabytes / 1e3 / seconds,
                                    "max_relative_error": error}  # fmt: skip
            timings["speedup"] = timings["linear"]["microseconds"] / timings["few-row"]["microseconds"]
            entry["rows"][rows] = timings
        results["shapes"].append(entry)
        cells = "  ".join(f"{r} rows {t['linear']['gb_per_s']:5.1f} / {t['few-row']['gb_per_s']:5.1f} GB/s "
                          f"({t['speedup']:.2f}x)" for r, t in entry["rows"].items())  # fmt: skip
        print(f"{name:22s} {out_features:6d} x {in_features:5d} ({megabytes:5.1f} MB, read {entry['read_gb_per_s']:5.1f}"
              f" GB/s): linear / few-row  {cells}")  # fmt: skip


if __name__ == "__main__":
    main()
