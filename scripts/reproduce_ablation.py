"""The paper's depth ablation (Table 4) and evolution analysis (Fig. 5b, Fig. 6) reproduced in miniature.

Trains the three depth allocations (D_pix, D_sem) = (4, 16) pixel-to-semantic (the paper's), (4, 4) entangled and
(16, 4) semantic-to-pixel on EvoTok Shapes with identical budgets (those of `make demo`) for each seed: the tokenizer,
then the joint VLM, each scored by the miniature's scorers. Writes the runs under --output-dir (one `run_miniature`
folder per seed and allocation; each stage is cached, so a killed run resumes at the stage it was in) and the results
under --results-dir: README.md (the miniature Table 4 beside the paper's, per-category tables, the verdict per claim),
ablation.json, fig5b.png, fig6_nmi.png and the cluster grids.

    python scripts/reproduce_ablation.py                        # 2 seeds x 3 allocations, about 80 min on 2 cores
    python scripts/reproduce_ablation.py --preset tiny --output-dir /tmp/ablation --results-dir /tmp/ablation/results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time

from evotok_hf.miniature.ablation import ALLOCATIONS, run_ablation, save_cluster_grids, summarize_ablation, \
    write_ablation_results
from evotok_hf.miniature.pipeline import MINIATURE_PRESETS

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/reproduce", help="the runs (checkpoints; not committed)")
    parser.add_argument("--results-dir", default="reproduction", help="README.md, ablation.json and the figures")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--allocations", nargs="+", choices=list(ALLOCATIONS), default=list(ALLOCATIONS))
    parser.add_argument("--preset", choices=sorted(MINIATURE_PRESETS), default="demo",
                        help="stage sizes and budgets, the same for every allocation (tiny: for tests)")
    parser.add_argument("--overrides", type=json.loads, default={},
                        help="JSON object of MiniatureConfig fields applied to every allocation")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    start = time.perf_counter()
    result = run_ablation(args.output_dir, SCRIPTS_DIR, seeds=args.seeds, preset=args.preset,
                          allocations=args.allocations, overrides=args.overrides, progress=not args.no_progress)
    summary = summarize_ablation(result["runs"], seconds=result["seconds"])
    grids = save_cluster_grids(args.output_dir, args.seeds[0], summary["allocations"], args.results_dir)
    command = "python scripts/reproduce_ablation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    readme = write_ablation_results(summary, args.results_dir, command.strip(), grids)
    print(f"\nEvoTok depth ablation in miniature: {readme}")
    for claim in summary["claims"]:
        print(f"  {claim['verdict']:10s} {claim['claim']}")
    print(f"  stage build time {summary['total_build_seconds'] / 60:.1f} min; "
          f"this call {(time.perf_counter() - start) / 60:.1f} min")
    return summary


if __name__ == "__main__":
    main()
