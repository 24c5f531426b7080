"""What the features of EvoTok in miniature tell about each image token: linear probes on held-out test scenes.

    python scripts/probe_miniature_features.py --output-dir outputs/demo [--num-scenes 300]

For every grid position an object covers (`position_labels`), a logistic-regression probe (`probe_accuracy`: a
stratified 70 / 30 split of the positions, standardised features) predicts the object's colour and shape and the
position's row and column, from the mini-SigLIP teacher's `hidden_states[-2]` and from the tokenizer's semantic
features at depths 4 and 16 (what the VLM reads). A VQA colour or shape question asks what one object's tokens say,
a position question where they are; a probe near chance means that the LLM has to find it elsewhere.

Prints a table and writes `<output-dir>/feature_probes.json`. About 20 s on two quiet CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch

from evotok_hf.command_line import run_from_shell


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="a miniature run's folder (make demo)")
    parser.add_argument("--num-scenes", type=int, default=300, help="test scenes whose object positions are probed")
    parser.add_argument("--depths", default="4,16", help="semantic depths whose features are probed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import datasets
    from sklearn.exceptions import ConvergenceWarning
    from transformers import AutoImageProcessor, AutoModel

    from evotok_hf.evaluation.shapes_scoring import shapes_feature_probes
    from evotok_hf.frozen_networks import SiglipTeacher
    from evotok_hf.image_datasets import eval_transform

    args = parse_args(argv)
    folders = {name: os.path.join(args.output_dir, *parts) for name, parts in
               {"dataset": ("data", "shapes_dataset"), "tokenizer": ("tokenizer",), "siglip": ("siglip",)}.items()}  # fmt: skip
    missing = [path for path in folders.values() if not os.path.isdir(path)]
    if missing:
        raise ValueError(f"{args.output_dir} is not a finished miniature run (no {', '.join(missing)}); run make demo.")
    if args.num_scenes < 10:
        raise ValueError(f"--num-scenes must be at least 10, got {args.num_scenes}")
    depths = [int(d) for d in args.depths.split(",")]
    # a probe on features that separate the classes runs to its iteration limit; its accuracy is still what it is
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    tokenizer = AutoModel.from_pretrained(folders["tokenizer"]).eval()
    image_processor = AutoImageProcessor.from_pretrained(folders["tokenizer"])
    teacher = SiglipTeacher.from_pretrained(folders["siglip"], grid_size=tokenizer.config.grid_size)
    test = datasets.load_from_disk(folders["dataset"])["test"]
    rows = test.select(range(min(args.num_scenes, len(test))))
    transform = eval_transform(image_processor)
    pixel_values = torch.stack([transform(image) for image in rows["image"]])
    results = shapes_feature_probes(tokenizer, teacher, pixel_values, rows["objects"], depths=depths)
    labels = ("color", "shape", "row", "column")
    print("linear-probe accuracy on held-out object positions (chance = majority class)")
    print(f"{'features':<20}" + "".join(f"{label:>16}" for label in labels))
    for source, by_label in results.items():
        cells = "".join(f"{by_label[l]['linear_accuracy']:>8.3f} ({by_label[l]['chance_accuracy']:.2f})" for l in labels)
        print(f"{source:<20}{cells}")
    path = os.path.join(args.output_dir, "feature_probes.json")
    with open(path, "w") as f:
        json.dump({"num_scenes": len(rows), "probes": results}, f, indent=2)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    run_from_shell(main, __file__)
