"""EvoTok in miniature: the whole paper trained end to end offline on two CPU cores, then scored.

A mini-SigLIP teacher, the EvoTok tokenizer (scripts/train_tokenizer.py --preset shapes), a small Qwen2 trained from
scratch, and one VLM with both heads (scripts/train_vlm.py --task joint, two stages), on EvoTok Shapes; scored by
mini-GenEval, exact-match VQA and per-depth reconstruction / semantic cosine / NMI. Writes `<output_dir>/`: siglip/,
tokenizer/, vlm/ (loadable folders), report.json and report.html. Each stage is cached: a second run only rewrites the
report; `--retrain` trains everything again.

    python scripts/demo_miniature.py --output-dir outputs/demo
    python scripts/demo_miniature.py --output-dir outputs/demo --retrain
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from evotok_hf.miniature.pipeline import MINIATURE_PRESETS, miniature_config, run_miniature

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--preset", choices=sorted(MINIATURE_PRESETS), default="demo",
                        help="stage sizes and budgets (tiny: a few steps of each stage, for tests)")
    parser.add_argument("--retrain", action="store_true", help="ignore cached stages and train everything again")
    parser.add_argument("--num-threads", type=int, default=None, help="torch / OpenMP threads (default: the preset's)")
    parser.add_argument("--overrides", type=json.loads, default={},
                        help='JSON object of MiniatureConfig fields, e.g. \'{"vlm_stage2_steps": 800}\'')
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    overrides = dict(args.overrides)
    if args.num_threads is not None:
        overrides["num_threads"] = args.num_threads
    config = miniature_config(args.preset, **overrides)
    report = run_miniature(args.output_dir, config, scripts_dir=SCRIPTS_DIR, retrain=args.retrain,
                           progress=not args.no_progress)  # fmt: skip
    print(f"\nEvoTok in miniature: {os.path.join(args.output_dir, 'report.html')}")
    for name, item in report["floors"].items():
        print(f"  {name:34s} {item['value']:8.3f}  (floor {item['floor']}) {'met' if item['met'] else 'NOT met'}")
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in report["timings_seconds"].items())
    print(f"  time: {timings}")
    return report


if __name__ == "__main__":
    main()
