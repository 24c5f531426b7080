"""Evaluate an EvoTok tokenizer per residual depth: rFID / PSNR / SSIM (/ LPIPS) by pixel depth, semantic cosine to
a teacher, codebook usage and perplexity by depth, k-means clusters of the cumulative latents (the paper's Fig. 6)
and linear-probe / k-NN accuracy by depth.

Writes to --output-dir: report.json (which also records --dataset and --split, for the model card of
scripts/push_to_hub.py --eval-json), report.md (tables), per_depth.png (metric vs depth), kmeans_depths.png,
probe.json; prints the tables.

ImageNet-1K validation at 256, the paper's rFID protocol: ADM centre crop, reconstructions and originals saved as
PNG, FID of the 2048-d pool3 Inception fed as torch-fidelity and pytorch-fid feed it, clean-fid's beside them (each
needs the online extra, and the dataset Hub access to the gated repository):

    python scripts/evaluate_reconstruction.py --model <evotok folder or Hub id> \\
        --dataset ILSVRC/imagenet-1k --split validation --streaming --center-crop adm \\
        --feature-network inception --fid-implementation torch-fidelity,pytorch-fid,clean-fid \\
        --save-images outputs/eval-imagenet/images \\
        --teacher google/siglip2-large-patch16-256 --output-dir outputs/eval-imagenet

Offline, on the embedded photos (what the tests run):

    python scripts/evaluate_reconstruction.py --model outputs/demo-photos/model --dataset bundled \\
        --feature-network efficientnet-lite0 --teacher efficientnet-lite0 --output-dir outputs/eval
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoImageProcessor, AutoModel

import evotok_hf  # noqa: F401  (registers the Auto classes)
from evotok_hf.bundled_photos import bundled_photo_dataset
from evotok_hf.evaluation.reconstruction import ALL_METRICS, CENTER_CROPS, evaluate_reconstruction
from evotok_hf.evaluation.representation import kmeans_by_depth, lfw_probe_dataset, probe_by_depth, save_cluster_grid
from evotok_hf.frozen_networks import DEFAULT_SIGLIP_TEACHER, FID_IMPLEMENTATIONS, build_teacher
from evotok_hf.image_datasets import eval_transform, load_image_dataset


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _fid_implementations(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FID_IMPLEMENTATIONS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected a comma list of distinct names from {list(FID_IMPLEMENTATIONS)}, "
                                         f"got {text!r}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="EvoTok folder or Hub id (with its preprocessor config)")
    p.add_argument("--dataset", default="bundled", help="Hub id, image folder, parquet, .tar shards, or 'bundled'")
    p.add_argument("--split", default="validation")
    p.add_argument("--streaming", action="store_true")
    p.add_argument("--image-column", default=None)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--metrics", default="psnr,ssim,rfid,semantic,usage", help=f"comma list of {ALL_METRICS}")
    p.add_argument("--feature-network", default="inception",
                   help="rFID features: inception (online, the standard), efficientnet-lite0 (offline stand-in)")
    p.add_argument("--fid-implementation", type=_fid_implementations, default=None,
                   help="with --feature-network inception: whose feeding of the FID Inception to follow, a comma list "
                        f"of {', '.join(FID_IMPLEMENTATIONS)}; the first gives the report's rFID, the others stand "
                        "beside it (default: torch-fidelity)")
    p.add_argument("--center-crop", choices=CENTER_CROPS, default="processor",
                   help="processor: the image processor's shortest side + centre crop; adm: the ADM / guided-diffusion "
                        "centre crop (the paper's rFID protocol)")
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="write the originals and each pixel depth's reconstructions as PNG under DIR (originals/, "
                        "reconstructions/depth_K/), to score with pytorch-fid, torch-fidelity or clean-fid")
    p.add_argument("--teacher", default="auto",
                   help="semantic teacher: efficientnet-lite0, a SigLIP path / Hub id, or auto (by teacher_dim)")
    p.add_argument("--teacher-image-size", type=int, default=None,
                   help="EfficientNet-Lite0 teacher input size (use the size the model was trained with; demo: 128)")
    p.add_argument("--lpips", default="lpips-vgg", help="LPIPS network when 'lpips' is in --metrics (online extra)")
    p.add_argument("--pixel-depths", type=_ints, default=None)
    p.add_argument("--semantic-depths", type=_ints, default=None)
    p.add_argument("--kmeans-depths", type=_ints, default=[1, 4, 8, 16])
    p.add_argument("--num-clusters", type=int, default=8)
    p.add_argument("--analysis-images", type=int, default=64, help="images used for the k-means grid")
    p.add_argument("--probe", choices=["lfw", "none"], default="lfw", help="labelled set for the probes")
    p.add_argument("--output-dir", default="outputs/eval")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    config = model.config
    if args.dataset == "bundled":
        dataset = bundled_photo_dataset(args.split)
    else:
        dataset = load_image_dataset(args.dataset, split=args.split, streaming=args.streaming,
                                     image_column=args.image_column)
    teacher = args.teacher
    if teacher == "auto":
        teacher = "efficientnet-lite0" if config.teacher_dim == 1280 else DEFAULT_SIGLIP_TEACHER
    metrics = [m for m in args.metrics.split(",") if m]
    if args.feature_network == "inception":
        feature_network = args.fid_implementation or ["torch-fidelity"]
    elif args.fid_implementation:
        raise SystemExit("--fid-implementation applies to --feature-network inception only")
    else:
        feature_network = args.feature_network
    if "semantic" in metrics and teacher == "efficientnet-lite0":
        teacher = build_teacher(teacher, grid_size=config.grid_size, image_size=args.teacher_image_size)
        teacher.name = f"efficientnet-lite0 @ {teacher.image_size} px (offline stand-in for SigLIP2)"

    report = evaluate_reconstruction(
        model, dataset, processor, depths=args.pixel_depths, semantic_depths=args.semantic_depths, metrics=metrics,
        batch_size=args.batch_size, feature_network=feature_network, teacher=teacher,
        lpips=args.lpips if "lpips" in metrics else None, max_images=args.max_images, progress=not args.no_progress,
        dataset_name=args.dataset, split=args.split, center_crop=args.center_crop, save_images=args.save_images,
    )
    outputs = {
        "report": report.save_json(os.path.join(args.output_dir, "report.json")),
        "plot": report.plot(os.path.join(args.output_dir, "per_depth.png")),
    }
    if args.save_images:
        outputs["images"] = args.save_images
    table = report.to_markdown()
    outputs["table"] = os.path.join(args.output_dir, "report.md")
    with open(outputs["table"], "w") as f:
        f.write(table)

    # Representation analysis on the first images of the same dataset.
    transform = eval_transform(processor)
    images = []
    for example in dataset:
        if len(images) >= args.analysis_images:
            break
        images.append(transform(example[args.image_column or "image"]))
    pixel_values = torch.stack(images).to(args.device)
    kmeans_depths = [k for k in args.kmeans_depths if k <= config.num_depths] or [config.num_depths]
    clusters = kmeans_by_depth(model, pixel_values, depths=kmeans_depths, num_clusters=args.num_clusters)
    outputs["kmeans_grid"] = str(save_cluster_grid(clusters, pixel_values.cpu(), os.path.join(args.output_dir,
                                                                                                "kmeans_depths.png")))
    probe = None
    if args.probe == "lfw":
        probe_images, labels = lfw_probe_dataset(config.image_size)
        probe_depths = sorted({1, config.pixel_depth, config.num_depths // 2 or 1, config.num_depths})
        probe = probe_by_depth(model, probe_images.to(args.device), labels, depths=probe_depths)
        outputs["probe"] = os.path.join(args.output_dir, "probe.json")
        with open(outputs["probe"], "w") as f:
            json.dump({"dataset": "skimage lfw_subset: faces vs non-faces", "by_depth": probe}, f, indent=2,
                      default=float)

    print(table)
    if probe:
        print("Linear probe / k-NN accuracy by depth (lfw faces vs non-faces):")
        for k, values in probe.items():
            print(f"  depth {k:2d}: " + ", ".join(f"{name} {float(v):.3f}" for name, v in values.items()
                                                  if name.endswith("accuracy")))
    print("wrote " + ", ".join(outputs.values()))
    return {"report": report, "probe": probe, "outputs": outputs}


if __name__ == "__main__":
    main()
