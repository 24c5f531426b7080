"""bf16 encode and the codes it keeps: code agreement with the fp32 encode, per residual depth, and the speed of each
precision mode, side by side in one process.

Modes (all against the fp32 encode of the same weights and images):
- `bf16-load`: the tokenizer loaded with `dtype=torch.bfloat16` (`from_pretrained`; the codebooks stay fp32 and the
  residual search runs in fp32, as always);
- `bf16-load+fp32-task-layer`: the same, with the encoder's task layer (hidden -> code width) back in fp32;
- `bf16-load+fp32-last-K`: the same, with the last K encoder layers used and the task layer in fp32;
- `bf16-autocast`: the fp32 model under `torch.autocast(bfloat16)`.

Agreement is reported per depth (the share of positions whose code at that depth equals fp32's) and as a prefix (the
share whose codes at all depths up to that one equal fp32's). Every depth's search is a nearest-neighbour decision,
so a code flips when bf16 moves the residual by more than the decision's margin; `margins` shows how many fp32
decisions are that close (the gap between the nearest and second-nearest code, relative to the squared residual).

    python benchmarks/encode_precision.py [--tokenizer outputs/demo/tokenizer] [--images 200] [--repeats 5]
        [--paper-size-timing] [--device cuda] [--json benchmarks/encode_precision_cpu.json]

`--tokenizer` is a trained tokenizer folder (the miniature's: `make demo` writes `outputs/demo/tokenizer`); its
images are EvoTok Shapes test scenes at the tokenizer's image size. `--paper-size-timing` also times the modes on the
paper-size preset (random weights, one 256 x 256 image; agreement on random weights says little and is not reported),
and decoding its codes to pixels (the 4 pixel depths) and to semantic features (all 16), in fp32 and from a bf16 load.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch

from evotok_hf import EvoTokConfig, EvoTokImageProcessor, EvoTokModel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None,
                   help="a trained EvoTok tokenizer folder (without one, only --paper-size-timing runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=200, help="EvoTok Shapes test scenes to encode")
    p.add_argument("--last-layers", default="1,2", help="comma list of K for the bf16-load+fp32-last-K modes")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (best and median reported)")
    p.add_argument("--paper-size-timing", action="store_true", help="also time the modes at the paper's sizes")
    p.add_argument("--paper-preset", default="evotok-siglip2-l16-256",
                   help="the preset --paper-size-timing builds (a small one checks the script quickly)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def bf16_copy(model: EvoTokModel, fp32_last_layers: int | None = None) -> EvoTokModel:
    """`model` in bf16 as a bf16 load makes it (codebooks fp32); with `fp32_last_layers` set, that many of the last
    encoder layers used, and the task layer, stay fp32."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    low.quantizer.float()
    if fp32_last_layers is not None:
        low.encode_task_layer.float()
        used = low.config.num_encoder_layers_used
        for layer in low.encoder.encoder.layers[used - fp32_last_layers : used]:
            layer.float()
    return low


def mixed_precision_encode(model: EvoTokModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Codes of `model`'s encode where its encoder layers may differ in dtype: each layer gets its input in its own
    dtype (the public `encode` casts once, at the embeddings)."""
    hidden = model.encoder.embeddings(model.input_scaling(pixel_values).to(model.encoder.embeddings.patch_embedding.weight.dtype))
    for layer in model.encoder.encoder.layers[: model.config.num_encoder_layers_used]:
        hidden = layer(hidden.to(layer.layer_norm1.weight.dtype), None)
    task = model.encode_task_layer
    features = task(hidden.to(task[0].weight.dtype))
    grid = model.config.grid_size
    return model.quantizer(features.view(features.shape[0], grid, grid, model.config.codebook_dim)).codes


def build_modes(model: EvoTokModel, bf16_loaded: EvoTokModel, last_layers: list[int]) -> dict:
    device_type = model.device.type
    modes = {"fp32": lambda x: model.encode(x).codes, "bf16-load": lambda x: bf16_loaded.encode(x).codes}
    task_fp32 = bf16_copy(model, fp32_last_layers=0)
    modes["bf16-load+fp32-task-layer"] = lambda x: mixed_precision_encode(task_fp32, x)
    for k in last_layers:
        mixed = bf16_copy(model, fp32_last_layers=k)
        modes[f"bf16-load+fp32-last-{k}"] = lambda x, mixed=mixed: mixed_precision_encode(mixed, x)

    def autocast(x):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model.encode(x).codes

    modes["bf16-autocast"] = autocast
    return modes


def agreement(codes: torch.Tensor, reference: torch.Tensor) -> dict:
    same = codes == reference
    return {
        "per_depth": same.float().mean(dim=(0, 1, 2)).tolist(),
        "prefix": same.cumprod(dim=-1).float().mean(dim=(0, 1, 2)).tolist(),
    }


@torch.no_grad()
def decision_margins(model: EvoTokModel, pixel_values: torch.Tensor, thresholds=(1e-3, 1e-2)) -> dict:
    """For the fp32 encode: per depth, the share of decisions whose gap between the nearest and the second-nearest
    code is below each threshold, relative to the squared residual norm (bf16 rounds to 2^-8 = 0.4% relative)."""
    features = model.encode_task_layer(model.get_encoder_features(pixel_values)).float()
    residual = features.reshape(-1, model.config.codebook_dim)
    shares = {str(t): [] for t in thresholds}
    for depth in range(model.config.num_depths):
        codebook = model.quantizer.codebook[depth].float()
        distances = torch.cdist(residual.double(), codebook.double()).pow(2)
        two = distances.topk(2, dim=1, largest=False).values
        relative_gap = (two[:, 1] - two[:, 0]) / residual.double().pow(2).sum(dim=1).clamp_min(1e-12)
        for t in thresholds:
            shares[str(t)].append(float((relative_gap < t).double().mean()))
        residual = residual - codebook[distances.argmin(dim=1)]
    return shares


def time_round_robin(modes: dict, inputs: torch.Tensor, repeats: int) -> dict:
    """Best and median seconds per call, one call of each mode per round after a warm-up call each."""

    def sync():
        if inputs.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        outputs = {name: fn(inputs) for name, fn in modes.items()}
        times = {name: [] for name in modes}
        for _ in range(repeats):
            for name, fn in modes.items():
                sync()
                start = time.perf_counter()
                outputs[name] = fn(inputs)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: {"best_s": min(t), "median_s": statistics.median(t)} for name, t in times.items()}, outputs


def shapes_pixel_values(tokenizer: str, count: int) -> torch.Tensor:
    from evotok_hf.miniature.shapes import load_shapes_dataset

    processor = EvoTokImageProcessor.from_pretrained(tokenizer)
    test = load_shapes_dataset(num_train=0, num_validation=0, num_test=count, seed=0)["test"]
    return processor(list(test["image"]), return_tensors="pt")["pixel_values"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tokenizer is None and not args.paper_size_timing:
        raise SystemExit("pass --tokenizer (a trained tokenizer folder), --paper-size-timing, or both")
    last_layers = [int(k) for k in args.last_layers.split(",") if k]
    device = torch.device(args.device)
    torch.manual_seed(0)
    result = {"device": str(device), "threads": torch.get_num_threads(), "modes": {}}
    if args.tokenizer is not None:
        model = EvoTokModel.from_pretrained(args.tokenizer, dtype=torch.float32).to(device).eval()
        bf16_loaded = EvoTokModel.from_pretrained(args.tokenizer, dtype=torch.bfloat16).to(device).eval()
        pixel_values = shapes_pixel_values(args.tokenizer, args.images).to(device)
        timings, outputs = time_round_robin(build_modes(model, bf16_loaded, last_layers), pixel_values, args.repeats)
        result.update(tokenizer=args.tokenizer, images=args.images, pixel_depth=model.config.pixel_depth)
        for name, timing in timings.items():
            result["modes"][name] = {**timing, "speedup_vs_fp32": timings["fp32"]["best_s"] / timing["best_s"],
                                     "agreement": agreement(outputs[name], outputs["fp32"])}  # fmt: skip
        result["fp32_decision_margins"] = decision_margins(model, pixel_values)
    if args.paper_size_timing:
        result["paper_size_timing"] = paper_size_timing(args, device, last_layers)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def paper_size_timing(args, device: torch.device, last_layers: list[int]) -> dict:
    """Encode modes, and decoding the pixel codes to an image and all codes to semantic features in fp32 and bf16, at
    the paper's sizes (random weights, one image)."""
    paper = EvoTokModel(EvoTokConfig.from_preset(args.paper_preset)).to(device).eval()
    low = bf16_copy(paper)
    image = torch.rand(1, 3, paper.config.image_size, paper.config.image_size, device=device) * 2 - 1
    timings, outputs = time_round_robin(build_modes(paper, low, last_layers), image, args.repeats)
    codes = outputs["fp32"]
    decoders = {
        "decode fp32": lambda c: paper.decode(c[..., : paper.config.pixel_depth]),
        "decode bf16-load": lambda c: low.decode(c[..., : paper.config.pixel_depth]),
        "semantic features fp32": paper.get_semantic_features,
        "semantic features bf16-load": low.get_semantic_features,
    }
    decode_timings, _ = time_round_robin(decoders, codes, args.repeats)
    timings.update(decode_timings)
    for name, t in timings.items():
        reference = "decode fp32" if name.startswith("decode") else "semantic features fp32" if name.startswith("semantic") else "fp32"
        t["speedup_vs_fp32"] = timings[reference]["best_s"] / t["best_s"]
    return timings


def print_table(result: dict) -> None:
    for name, t in result.get("paper_size_timing", {}).items():
        print(f"paper size, 1 image, {result['device']}: {name:32s} best {t['best_s']:.3f} s  x fp32 {t['speedup_vs_fp32']:.2f}")
    if not result["modes"]:
        return
    pixel_depth = result["pixel_depth"]
    some = sorted({pixel_depth, *(d for d in (8, 16) if d <= len(result["modes"]["fp32"]["agreement"]["per_depth"]))})
    print(f"{result['images']} EvoTok Shapes scenes, {result['threads']} threads; agreement with fp32 codes")
    print(f"{'mode':32s} {'best s':>8s} {'x fp32':>7s}  per depth 1..{pixel_depth} (the pixel depths) | prefix at "
          + ", ".join(map(str, some)))  # fmt: skip
    for name, mode in result["modes"].items():
        per, prefix = mode["agreement"]["per_depth"], mode["agreement"]["prefix"]
        pixel = " ".join(f"{v:.3f}" for v in per[:pixel_depth])
        prefixes = ", ".join(f"{prefix[d - 1]:.3f}" for d in some)
        print(f"{name:32s} {mode['best_s']:8.4f} {mode['speedup_vs_fp32']:7.2f}  {pixel} | {prefixes}")
    for threshold, shares in result["fp32_decision_margins"].items():
        print(f"fp32 decisions with relative margin < {threshold}: " + " ".join(f"{s:.3f}" for s in shares))


if __name__ == "__main__":
    main()
