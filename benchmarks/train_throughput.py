"""Tokenizer training throughput on this machine: steps/s of the `cpu-small` preset (what `make demo` trains),
measured side by side in one process for fp32 and bf16 autocast, with and without the GAN step.

    python benchmarks/train_throughput.py [--steps 40] [--warmup 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from evotok_hf.training.trainer import TokenizerTrainer, training_arguments_from_preset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--model-preset", default=None, help="override the preset's model (e.g. evotok-tiny for a smoke run)")
    return p.parse_args(argv)


def measure(preset: str, steps: int, warmup: int, model_preset: str | None, **overrides) -> dict:
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide state; each variant (fp32 / bf16) needs a fresh one.
    AcceleratorState._reset_state(reset_partial_state=True)
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"model_preset": model_preset} if model_preset else {}
        args = training_arguments_from_preset(preset, output_dir=tmp, max_train_steps=warmup, checkpointing_steps=0,
                                              eval_data=None, log_steps=10**9, **extra, **overrides)
        trainer = TokenizerTrainer(args)
        trainer.train()  # warm-up steps (allocator, thread pool, first-call overheads)
        trainer.args.max_train_steps = warmup + steps
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        images = steps * args.train_batch_size
    return {"steps_per_s": steps / seconds, "images_per_s": images / seconds, "seconds": seconds,
            "batch_size": args.train_batch_size}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    variants = {
        "fp32": {},
        "bf16 autocast": {"mixed_precision": "bf16"},
        "fp32 + GAN step": {"disc_weight": 0.1, "disc_start": 0},
    }
    results = {name: measure(args.preset, args.steps, args.warmup, args.model_preset, **kw)
               for name, kw in variants.items()}
    base = results["fp32"]["steps_per_s"]
    print(f"\n{args.preset} training throughput, {args.steps} timed steps after {args.warmup} warm-up steps "
          f"({torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"{'variant':20s} {'steps/s':>8s} {'images/s':>9s} {'vs fp32':>8s}")
    for name, r in results.items():
        print(f"{name:20s} {r['steps_per_s']:8.2f} {r['images_per_s']:9.1f} {r['steps_per_s'] / base:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
