"""Main job (until the training issue lands): tokenize real bundled photos with a freshly initialised EvoTok.

Writes `<output_dir>/reconstructions.png` (rows: input, then the decoded image from the first k pixel depths for
k = 1..pixel_depth) and `<output_dir>/demo.json` (code shapes, per-depth codebook usage and perplexity, timings),
and prints a short table. The weights are random, so the reconstructions are not meaningful images yet; the point
is the full data path on real photos: processor -> encode -> codes -> decode / semantic features -> postprocess.

    python scripts/demo.py --preset evotok-small --output-dir outputs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import time

import PIL.Image
import torch

from evotok_hf import EvoTokConfig, EvoTokImageProcessor, EvoTokModel
from evotok_hf.data import load_bundled_photos


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="evotok-small", help="EvoTokConfig preset (evotok-small runs on CPU)")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--photos", nargs="*", default=None, help="bundled photo names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def image_grid(rows: list[list[PIL.Image.Image]], pad: int = 2) -> PIL.Image.Image:
    width, height = rows[0][0].size
    grid = PIL.Image.new("RGB", (len(rows[0]) * (width + pad) + pad, len(rows) * (height + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (pad + c * (width + pad), pad + r * (height + pad)))
    return grid


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    config = EvoTokConfig.from_preset(args.preset)
    model = EvoTokModel(config).to(args.device).eval()
    size = config.image_size
    processor = EvoTokImageProcessor(size={"height": size, "width": size})

    photos = load_bundled_photos(args.photos)
    timings = {}
    t0 = time.perf_counter()
    pixel_values = processor(list(photos.values()), return_tensors="pt").pixel_values.to(args.device)
    timings["preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoded = model.encode(pixel_values)
    timings["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_depth = [model.decode(encoded.codes[..., :k]) for k in range(1, config.pixel_depth + 1)]
    timings["decode_all_pixel_depths_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    semantic = model.get_semantic_features(encoded.codes)
    timings["semantic_features_s"] = time.perf_counter() - t0

    rows = [processor.postprocess(pixel_values)] + [processor.postprocess(images) for images in per_depth]
    grid_path = os.path.join(args.output_dir, "reconstructions.png")
    image_grid(rows).save(grid_path)

    report = {
        "preset": args.preset,
        "weights": "random initialisation (no trained checkpoint yet)",
        "photos": list(photos),
        "pixel_values_shape": list(pixel_values.shape),
        "codes_shape": list(encoded.codes.shape),
        "codes_dtype": str(encoded.codes.dtype),
        "reconstruction_shape": list(per_depth[-1].shape),
        "semantic_features_shape": list(semantic.shape),
        "codebook_size": config.codebook_size,
        "per_depth_codebook_usage": [round(float(u), 6) for u in encoded.codebook_usage],
        "per_depth_perplexity": [round(float(p), 3) for p in encoded.perplexity],
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "outputs": {"grid": grid_path},
    }
    json_path = os.path.join(args.output_dir, "demo.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)

    print(f"EvoTok demo ({args.preset}, {report['num_parameters'] / 1e6:.2f}M params, random weights) on "
          f"{len(photos)} bundled photos")
    print(f"  pixel_values {tuple(pixel_values.shape)} -> codes {tuple(encoded.codes.shape)} int64 -> "
          f"images {tuple(per_depth[-1].shape)}, semantic features {tuple(semantic.shape)}")
    print(f"  {'depth':>5s} {'usage':>8s} {'perplexity':>11s}")
    for d, (u, p) in enumerate(zip(encoded.codebook_usage, encoded.perplexity), start=1):
        marker = "  <- pixel latent" if d == config.pixel_depth else ("  <- semantic latent" if d == config.semantic_depth else "")
        print(f"  {d:5d} {float(u):8.4f} {float(p):11.2f}{marker}")
    print("  timings: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in timings.items()))
    print(f"  wrote {grid_path} and {json_path}")
    return report


if __name__ == "__main__":
    main()
