"""The photo demo (`make demo-photos`): train a small EvoTok on real bundled photos (2 CPU cores, about 3 minutes),
reload it with `AutoModel.from_pretrained`, and analyse it per residual depth on held-out photos that never entered
training.

Writes to `--output-dir` (default outputs/demo-photos; `make demo-photos`):
    model/                     the trained tokenizer (save_pretrained + preprocessor config); reused unless --retrain.
                               It is written to a staging folder that replaces model/ only once complete, so an
                               interrupted run never leaves a half-written model/ behind (the next run trains again).
    reconstructions.png        rows: held-out input, then the image decoded from the first k = 1..4 pixel depths
    per_depth.png              PSNR vs pixel depth (with the mean-colour baseline) and semantic cosine vs depth 1..16
    demo.json                  those numbers, code shapes, codebook usage, timings
and prints a short table.

    python scripts/demo.py [--output-dir outputs/demo-photos] [--retrain] [--max-train-steps 600] [--num-threads 2]

Reproducibility: training results depend on the number of intra-op CPU threads (a different split of each reduction
rounds differently, and the nearest-code search amplifies the difference), so the demo sets it (`--num-threads`,
default 2) instead of taking the machine's or OMP_NUM_THREADS. With the same seed, thread count, torch version
(constraints.txt) and CPU instruction set, two runs give the same figures bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import PIL.Image
import torch
from transformers import AutoImageProcessor, AutoModel

import evotok_hf  # noqa: F401  (registers the Auto classes)
from evotok_hf.bundled_photos import bundled_photo_dataset
from evotok_hf.evaluation import evaluate_reconstruction, mean_colour_baseline, psnr
from evotok_hf.frozen_networks import build_teacher
from evotok_hf.hub.staging import staged_output_dir
from evotok_hf.image_datasets import eval_transform
from evotok_hf.training.trainer import TRAINING_PRESETS, TokenizerTrainer, training_arguments_from_preset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo-photos")
    parser.add_argument("--retrain", action="store_true", help="train again even if a trained model is cached")
    parser.add_argument("--preset", default="cpu-small", help="training preset (see TRAINING_PRESETS)")
    parser.add_argument("--max-train-steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--model-preset", default=None, help="EvoTokConfig preset (default: the training preset's)")
    parser.add_argument("--model-overrides", type=json.loads, default=None, help="JSON EvoTokConfig overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=2,
                        help="intra-op CPU threads (torch.set_num_threads); the figures depend on it")
    args = parser.parse_args(argv)
    if args.num_threads < 1:
        parser.error(f"--num-threads must be >= 1, got {args.num_threads}")
    return args


# What `TokenizerTrainer.export` writes; a model/ folder without all of them (left by an interrupted run of an older
# version, which exported in place) is not a trained model.
EXPORTED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def is_exported_model(model_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(model_dir, name)) for name in EXPORTED_FILES)


def image_grid(rows: list[list[PIL.Image.Image]], pad: int = 2) -> PIL.Image.Image:
    width, height = rows[0][0].size
    grid = PIL.Image.new("RGB", (len(rows[0]) * (width + pad) + pad, len(rows) * (height + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (pad + c * (width + pad), pad + r * (height + pad)))
    return grid


def train(args, model_dir: str) -> dict:
    overrides = {"output_dir": os.path.join(args.output_dir, "run"), "seed": args.seed}
    if args.max_train_steps:
        overrides["max_train_steps"] = args.max_train_steps
    if args.model_preset:
        overrides["model_preset"] = args.model_preset
    if args.model_overrides:
        overrides["model_overrides"] = args.model_overrides
    training_args = training_arguments_from_preset(args.preset, **overrides)
    trainer = TokenizerTrainer(training_args)
    summary = trainer.train()
    with staged_output_dir(model_dir) as staging:
        trainer.export(str(staging))
    trainer.end()
    return {k: v for k, v in summary.items() if k != "history"} | {"final_loss": summary["history"][-1]}


def plot(path: str, psnr_by_depth, baseline_psnr, cosine_by_depth, pixel_depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(range(1, len(psnr_by_depth) + 1), psnr_by_depth, marker="o", label="EvoTok (first k depths)")
    left.axhline(baseline_psnr, color="grey", linestyle="--", label="mean-colour baseline")
    left.set(xlabel="pixel depth k", ylabel="PSNR (dB)", title="Reconstruction vs pixel depth (held-out)")
    left.set_xticks(range(1, len(psnr_by_depth) + 1))
    left.legend()
    right.plot(range(1, len(cosine_by_depth) + 1), cosine_by_depth, marker="o", color="tab:green")
    if pixel_depth <= len(cosine_by_depth):  # a pixel depth beyond the semantic one is off this axis
        right.axvline(pixel_depth, color="tab:orange", linestyle=":", label="pixel depth")
    right.set(xlabel="depth k", ylabel="cosine to teacher", title="Semantic features vs depth (held-out)")
    if right.get_legend_handles_labels()[0]:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.num_threads)
    try:
        return run(args)
    finally:  # leave a calling process (a test, a notebook) as it was
        torch.set_num_threads(threads)


@torch.no_grad()
def run(args) -> dict:
    os.makedirs(args.output_dir, exist_ok=True)
    model_dir = os.path.join(args.output_dir, "model")
    training = None
    if os.path.exists(model_dir) and not is_exported_model(model_dir) and not args.retrain:
        print(f"{model_dir} is incomplete (missing one of {', '.join(EXPORTED_FILES)}): training again")
    if args.retrain or not is_exported_model(model_dir):
        with torch.enable_grad():
            t0 = time.perf_counter()
            training = train(args, model_dir)
            training["wall_seconds"] = time.perf_counter() - t0

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    config = model.config
    held_out = bundled_photo_dataset("validation", seed=args.seed)
    transform = eval_transform(processor)
    pixel_values = torch.stack([transform(example["image"]) for example in held_out])
    teacher = build_teacher("efficientnet-lite0", grid_size=config.grid_size,
                            image_size=TRAINING_PRESETS[args.preset].get("teacher_image_size"))

    t0 = time.perf_counter()
    encoded = model.encode(pixel_values)
    encode_s = time.perf_counter() - t0
    # one batch of all the held-out images, as encoded above
    evaluation = evaluate_reconstruction(model, pixel_values, processor, metrics=("psnr", "semantic"), teacher=teacher,
                                         batch_size=len(pixel_values), progress=False)  # fmt: skip
    psnr_by_depth = [evaluation.psnr[k] for k in evaluation.pixel_depths]
    cosine_by_depth = [evaluation.semantic_cosine[k] for k in evaluation.semantic_depths]
    baseline = float(psnr(mean_colour_baseline(pixel_values), pixel_values).mean())

    rows = [processor.postprocess(pixel_values)]
    rows += [processor.postprocess(model.decode(encoded.codes[..., :k])) for k in range(1, config.pixel_depth + 1)]
    grid_path = os.path.join(args.output_dir, "reconstructions.png")
    image_grid(rows).save(grid_path)
    plot_path = os.path.join(args.output_dir, "per_depth.png")
    plot(plot_path, psnr_by_depth, baseline, cosine_by_depth, config.pixel_depth)

    report = {
        "model": model_dir,
        "trained_this_run": training is not None,
        "training": training,
        "held_out_photos": sorted(set(held_out["source"])),
        "held_out_images": int(pixel_values.shape[0]),
        "codes_shape": list(encoded.codes.shape),
        "psnr_by_pixel_depth": psnr_by_depth,
        "mean_colour_baseline_psnr": baseline,
        "semantic_cosine_by_depth": cosine_by_depth,
        "teacher": "efficientnet-lite0 (real ImageNet weights, offline stand-in for SigLIP2)",
        "codebook_usage_by_depth": [float(u) for u in encoded.codebook_usage],
        "encode_seconds": encode_s,
        "num_threads": torch.get_num_threads(),
        "outputs": {"grid": grid_path, "plot": plot_path},
    }
    with open(os.path.join(args.output_dir, "demo.json"), "w") as f:
        json.dump(report, f, indent=2)

    print(f"\nEvoTok demo: {'trained' if training else 'cached'} model at {model_dir}"
          + (f" ({training['global_step']} steps, {training['wall_seconds']:.0f} s, "
             f"{training['steps_per_s']:.2f} steps/s)" if training else ""))
    print(f"held-out photos {report['held_out_photos']} ({report['held_out_images']} images), codes "
          f"{tuple(encoded.codes.shape)}")
    print(f"  mean-colour baseline PSNR {baseline:6.2f} dB")
    for k, value in enumerate(psnr_by_depth, start=1):
        print(f"  pixel depth {k:2d}: PSNR {value:6.2f} dB")
    shown = {1, min(config.pixel_depth, config.semantic_depth), config.semantic_depth // 2 or 1, config.semantic_depth}
    for k in sorted(shown):
        print(f"  depth {k:2d}: semantic cosine to teacher {cosine_by_depth[k - 1]:.4f}")
    print(f"  wrote {grid_path}, {plot_path}, {os.path.join(args.output_dir, 'demo.json')}")
    return report


if __name__ == "__main__":
    main()
