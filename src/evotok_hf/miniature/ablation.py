"""The paper's depth ablation (Table 4) and evolution analysis (Fig. 5b, Fig. 6) in miniature.

Three depth allocations (D_pix, D_sem) of the tokenizer, trained with identical budgets and seeds on EvoTok Shapes, each
followed by the joint VLM and scored by the miniature's scorers (`run_miniature`, one folder per seed and allocation):
(4, 4) "entangled", (16, 4) "semantic-to-pixel" and (4, 16) "pixel-to-semantic", the paper's. The allocations of a
seed share its data, BPE tokenizer and mini-SigLIP teacher (the first allocation builds them, the others link to
them); each seed draws its own data and teacher, so the spread over seeds covers the whole pipeline.

`run_ablation` trains and scores (every stage cached: a killed run resumes at the stage it was in),
`summarize_ablation` gathers the runs into one JSON-ready table, `write_ablation_results` writes the plots and
`README.md`. `scripts/reproduce_ablation.py` (`make reproduce`) is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

from .pipeline import MiniatureConfig, miniature_config, run_miniature

logger = logging.getLogger(__name__)

# name -> (pixel_depth, semantic_depth); the paper's configuration first, so that it builds each seed's shared stages
# exactly as `make demo` does.
ALLOCATIONS: dict[str, tuple[int, int]] = {
    "pixel-to-semantic": (4, 16),
    "entangled": (4, 4),
    "semantic-to-pixel": (16, 4),
}
# The paper's Table 4 (EvoTok paper; SigLIP2-L tokenizer on ImageNet, Qwen2.5-7B, real benchmarks): quoted beside the
# miniature's rows for orientation, never compared number for number.
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "entangled": {"rFID": 0.66, "PSNR": 22.96, "SSIM": 0.76, "SEED": 62.7, "GQA": 58.0, "MME": 1668.9, "GenEval": 0.64},
    "semantic-to-pixel": {"rFID": 0.44, "PSNR": 24.39, "SSIM": 0.79, "SEED": 64.6, "GQA": 60.9, "MME": 1731.6,
                          "GenEval": 0.60},
    "pixel-to-semantic": {"rFID": 0.55, "PSNR": 23.60, "SSIM": 0.77, "SEED": 67.1, "GQA": 61.3, "MME": 1793.5,
                          "GenEval": 0.67},
}  # fmt: skip
# Stages every allocation of a seed shares (their settings do not depend on the depths).
SHARED_STAGES = ("data", "text", "siglip")
# The paper's claims about Table 4, as comparisons of one measure between two allocations: (claim, measure, better,
# worse, higher_is_better).
CLAIMS = (
    ("semantic-to-pixel reconstructs better than pixel-to-semantic (PSNR)", "psnr", "semantic-to-pixel",
     "pixel-to-semantic", True),
    ("semantic-to-pixel reconstructs better than pixel-to-semantic (rFID-style distance)", "rfid", "semantic-to-pixel",
     "pixel-to-semantic", False),
    ("pixel-to-semantic understands better than semantic-to-pixel (VQA)", "vqa", "pixel-to-semantic",
     "semantic-to-pixel", True),
    ("pixel-to-semantic understands better than entangled (VQA)", "vqa", "pixel-to-semantic", "entangled", True),
    ("pixel-to-semantic generates better than semantic-to-pixel (mini-GenEval)", "geneval", "pixel-to-semantic",
     "semantic-to-pixel", True),
    ("pixel-to-semantic generates better than entangled (mini-GenEval)", "geneval", "pixel-to-semantic", "entangled",
     True),
    ("entangled generates better than semantic-to-pixel (mini-GenEval; paper 0.64 vs 0.60)", "geneval", "entangled",
     "semantic-to-pixel", True),
)  # fmt: skip


def allocation_config(name: str, seed: int, preset: str = "demo", **overrides) -> MiniatureConfig:
    """The miniature configuration of one allocation: the preset (and `overrides`) with the tokenizer's
    `pixel_depth` / `semantic_depth` set, kept beside any other `model_overrides` the overrides give."""
    if name not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {name!r}; available: {list(ALLOCATIONS)}")
    pixel, semantic = ALLOCATIONS[name]
    config = miniature_config(preset, **{**overrides, "seed": seed})
    tokenizer_overrides = dict(config.tokenizer_overrides)
    tokenizer_overrides["model_overrides"] = {**tokenizer_overrides.get("model_overrides", {}), "pixel_depth": pixel,
                                              "semantic_depth": semantic}  # fmt: skip
    return dataclasses.replace(config, tokenizer_overrides=tokenizer_overrides)


def run_folder(output_dir: str, seed: int, name: str) -> str:
    return os.path.join(output_dir, f"seed{seed}", name)


def link_shared_stages(source: str, target: str) -> None:
    """Point `target`'s shared stage folders at `source`'s (relative symbolic links). A stage `target` already holds
    is left as it is."""
    os.makedirs(target, exist_ok=True)
    for stage in SHARED_STAGES:
        link = os.path.join(target, stage)
        if os.path.lexists(link):
            continue
        os.symlink(os.path.relpath(os.path.join(source, stage), target), link)


def run_ablation(
    output_dir: str,
    scripts_dir: str,
    seeds=(0, 1),
    preset: str = "demo",
    allocations=tuple(ALLOCATIONS),
    overrides: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train and score every allocation for every seed (`run_miniature` per folder, each stage cached). Returns
    {"runs": {seed: {allocation: report}}, "seconds": wall time of this call}."""
    unknown = [name for name in allocations if name not in ALLOCATIONS]
    if unknown or not allocations:
        raise ValueError(f"allocations must be a non-empty subset of {list(ALLOCATIONS)}, got {list(allocations)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {list(seeds)}")
    start = time.perf_counter()
    runs: dict[int, dict[str, dict]] = {}
    total, index = len(seeds) * len(allocations), 0
    for seed in seeds:
        first = None
        for name in allocations:
            index += 1
            pixel, semantic = ALLOCATIONS[name]
            folder = run_folder(output_dir, seed, name)
            logger.info("[%d/%d] seed %d, %s (pixel_depth %d, semantic_depth %d): %s", index, total, seed, name, pixel,
                        semantic, folder)  # fmt: skip
            if first is not None:
                link_shared_stages(first, folder)
            config = allocation_config(name, seed, preset, **(overrides or {}))
            runs.setdefault(seed, {})[name] = run_miniature(folder, config, scripts_dir=scripts_dir, progress=progress)
            first = first or folder
    return {"runs": runs, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------------ summary
def _measures(report: dict) -> dict[str, float]:
    """The Table 4 measures of one run: reconstruction at the full pixel depth, VQA, mini-GenEval at the default
    guidance scale, and the semantic cosine at the full semantic depth."""
    scores = report["scores"]
    per_depth, vqa, geneval = scores["per_depth"], scores["vqa"], scores["geneval"]["default"]
    pixel_depth, semantic_depth = max(per_depth["psnr"]), max(per_depth["semantic_cosine"])
    measures = {
        "psnr": per_depth["psnr"][pixel_depth],
        "ssim": per_depth["ssim"][pixel_depth],
        "rfid": per_depth["rfid"][pixel_depth],
        "rfid_real_vs_real": per_depth["rfid_real_vs_real"],
        "semantic_cosine": per_depth["semantic_cosine"][semantic_depth],
        "vqa": vqa["overall"],
        "geneval": geneval["overall"],
        "geneval_control": geneval["control"]["overall"],
        "geneval_heldout": geneval["heldout"].get("overall", float("nan")) if geneval["heldout"] else float("nan"),
        # read back from scores.json: keyed by the depth as a string
        "detector_reconstructions": scores["detector_reconstructions"][str(pixel_depth)]["overall"],
    }
    measures.update({f"vqa_{kind}": value for kind, value in vqa["per_type"].items()})
    measures.update({f"geneval_{category}": value for category, value in geneval["per_category"].items()})
    return {key: float(value) for key, value in measures.items()}


def _curves(report: dict) -> dict[str, dict[int, float]]:
    scores = report["scores"]
    per_depth = scores["per_depth"]
    curves = {"psnr": per_depth["psnr"], "ssim": per_depth["ssim"], "rfid": per_depth["rfid"],
              "semantic_cosine": per_depth["semantic_cosine"],
              "nmi_color": {k: v["color"] for k, v in scores["nmi_by_depth"].items()},
              "nmi_shape": {k: v["shape"] for k, v in scores["nmi_by_depth"].items()}}  # fmt: skip
    return {name: {int(k): float(v) for k, v in curve.items()} for name, curve in curves.items()}


def _spread(values: list[float]) -> dict:
    finite = [v for v in values if not math.isnan(v)]
    mean = sum(finite) / len(finite) if finite else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else float("nan")
    return {"mean": mean, "std": std, "min": min(finite, default=float("nan")), "max": max(finite, default=float("nan"))}


def _verdict(values: dict[str, dict], better: str, worse: str, higher_is_better: bool,
             spread: float = 0.0) -> dict:  # fmt: skip
    """A claim "`better` beats `worse`" over paired seeds (the same data and teacher per seed): it holds when it does
    in every seed by a mean margin above `spread` (the larger standard deviation over seeds of the two allocations,
    i.e. how far one allocation moves between seeds), is reversed when the opposite holds likewise, and is unresolved
    otherwise."""
    seeds = sorted(set(values[better]) & set(values[worse]))
    sign = 1.0 if higher_is_better else -1.0
    differences = [sign * (values[better][s] - values[worse][s]) for s in seeds]
    mean = sum(differences) / len(differences) if differences else float("nan")
    if differences and all(d > 0 for d in differences) and mean > spread:
        verdict = "holds"
    elif differences and all(d < 0 for d in differences) and -mean > spread:
        verdict = "reversed"
    else:
        verdict = "unresolved"
    return {"verdict": verdict, "differences_by_seed": dict(zip(seeds, differences)), "mean_difference": mean,
            "spread": spread}  # fmt: skip


def summarize_ablation(runs: dict, seconds: float | None = None) -> dict:
    """One JSON-ready summary of `run_ablation`'s runs: per allocation the measures by seed with their mean, standard
    deviation and range, the per-depth curves by seed, the training time, and a verdict per claim of the paper."""
    seeds = sorted(runs)
    allocations = [name for name in ALLOCATIONS if all(name in runs[seed] for seed in seeds)]
    table, curves, times = {}, {}, {}
    for name in allocations:
        by_seed = {seed: _measures(runs[seed][name]) for seed in seeds}
        keys = sorted(set().union(*(m.keys() for m in by_seed.values())))
        table[name] = {key: {"by_seed": {seed: by_seed[seed].get(key, float("nan")) for seed in seeds},
                             **_spread([by_seed[seed].get(key, float("nan")) for seed in seeds])} for key in keys}  # fmt: skip
        curves[name] = {seed: _curves(runs[seed][name]) for seed in seeds}
        times[name] = {seed: sum(v for k, v in runs[seed][name]["build_seconds"].items() if not math.isnan(v)
                                 and (k not in SHARED_STAGES or name == allocations[0])) for seed in seeds}  # fmt: skip
    claims = []
    for text, measure, better, worse, higher in CLAIMS:
        if better in table and worse in table:
            values = {name: table[name][measure]["by_seed"] for name in (better, worse)}
            # one seed has no spread (NaN) to weigh against
            spread = max((v for v in (table[name][measure]["std"] for name in (better, worse)) if not math.isnan(v)),
                         default=0.0)  # fmt: skip
            claims.append({"claim": text, "measure": measure, "better": better, "worse": worse,
                           **_verdict(values, better, worse, higher, spread)})  # fmt: skip
    first = runs[seeds[0]][allocations[0]]
    return {
        "seeds": seeds,
        "allocations": {name: {"pixel_depth": ALLOCATIONS[name][0], "semantic_depth": ALLOCATIONS[name][1]}
                        for name in allocations},  # fmt: skip
        "table": table,
        "curves": curves,
        "claims": claims,
        "paper_table4": {name: PAPER_TABLE4[name] for name in allocations},
        "build_seconds": times,
        "total_build_seconds": sum(sum(t.values()) for t in times.values()),
        "wall_seconds_last_call": seconds,
        "config": {name: first["config"] if name == allocations[0] else runs[seeds[0]][name]["config"]
                   for name in allocations},  # fmt: skip
    }


# ------------------------------------------------------------------------------------------------------ results
def _fmt(spread: dict, digits: int) -> str:
    if math.isnan(spread["mean"]):
        return "n/a"
    if math.isnan(spread["std"]):
        return f"{spread['mean']:.{digits}f}"
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def _seed_values(spread: dict, digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in spread["by_seed"].values())


def _plot_curves(summary: dict, keys: tuple[str, str], path: str, title: str, set_axes, sharey: bool = False) -> str:
    """Two panels of per-depth curves (`keys`), one line per allocation: the mean over seeds with bars from the
    lowest to the highest seed, depth on a log2 axis. `set_axes(axes)` labels the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=sharey)
    for name, by_seed in summary["curves"].items():
        label = f"{name} {tuple(summary['allocations'][name].values())}"
        for ax, key in zip(axes, keys):
            depths = sorted(next(iter(by_seed.values()))[key])
            values = [[curves[key][d] for curves in by_seed.values()] for d in depths]
            means = [sum(v) / len(v) for v in values]
            yerr = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
            ax.errorbar(depths, means, yerr=yerr, marker="o", capsize=3, label=label)
    set_axes(axes)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_evolution(summary: dict, path: str) -> str:
    """The Fig. 5b analogue: PSNR by pixel depth and semantic cosine by semantic depth, one line per allocation (mean
    over seeds, bars from the lowest to the highest seed)."""
    lowest = min(v for by_seed in summary["curves"].values() for c in by_seed.values()
                 for v in c["semantic_cosine"].values())  # fmt: skip

    def set_axes(axes):
        axes[0].set(xlabel="pixel depth k (first k codes decoded to pixels)", ylabel="PSNR (dB)",
                    title="Reconstruction along depth (held-out scenes)")  # fmt: skip
        axes[1].set(xlabel="semantic depth k (first k codes decoded to features)", ylabel="cosine to the mini-SigLIP",
                    title="Semantic alignment along depth", ylim=(min(0.0, lowest - 0.05), 1.0))  # fmt: skip

    title = f"EvoTok in miniature: Fig. 5b analogue (mean of seeds {summary['seeds']}, bars: seed range)"
    return _plot_curves(summary, ("psnr", "semantic_cosine"), path, title, set_axes)


def plot_nmi(summary: dict, path: str) -> str:
    """The Fig. 6 analogue made quantitative: NMI of per-position k-means clusters of the cumulative latent with the
    colour and with the shape labels, by depth, one line per allocation (mean over seeds, bars: seed range)."""

    def set_axes(axes):
        for ax, what in zip(axes, ("colour", "shape")):
            ax.set(xlabel="depth k (sum of the first k code embeddings)", ylim=(0.0, 1.0),
                   title=f"NMI of the clusters with {what} labels")  # fmt: skip
        axes[0].set_ylabel("NMI")

    title = "EvoTok in miniature: Fig. 6 analogue, per-position k-means (16 clusters) of the latent by depth"
    return _plot_curves(summary, ("nmi_color", "nmi_shape"), path, title, set_axes, sharey=True)


def save_cluster_grids(output_dir: str, seed: int, allocations, results_dir: str, num_images: int = 100,
                       num_clusters: int = 8) -> dict[str, str]:  # fmt: skip
    """The Fig. 6 image grid per allocation: per-position k-means of the latent at depths 1, 4, 8, 16 (as deep as
    the allocation goes) on held-out scenes, each cluster shown by the patches nearest its centre."""
    import datasets
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from ..evaluation.representation import kmeans_by_depth, save_cluster_grid
    from ..image_datasets import eval_transform

    paths = {}
    for name in allocations:
        folder = run_folder(output_dir, seed, name)
        test = datasets.load_from_disk(os.path.join(folder, "data", "shapes_dataset"))["test"]
        images = list(test.select(range(min(num_images, len(test))))["image"])
        tokenizer = AutoModel.from_pretrained(os.path.join(folder, "tokenizer")).eval()
        transform = eval_transform(AutoImageProcessor.from_pretrained(os.path.join(folder, "tokenizer")))
        pixel_values = torch.stack([transform(image) for image in images])
        results = kmeans_by_depth(tokenizer, pixel_values, num_clusters=num_clusters, seed=seed)
        paths[name] = str(save_cluster_grid(results, images, os.path.join(results_dir, f"fig6_clusters_{name}.png")))
    return paths


# What each table column shows: (key, header, digits).
TABLE_COLUMNS = (("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3), ("rfid", "rFID-SigLIP", 2), ("vqa", "VQA", 3),
                 ("geneval", "mini-GenEval", 3), ("semantic_cosine", "cosine (D_sem)", 3))  # fmt: skip


def readme_text(summary: dict, command: str, grids: dict[str, str]) -> str:
    """`reproduction/README.md`: the miniature Table 4 beside the paper's, the per-category tables, the figures and a
    verdict per claim."""
    table, seeds = summary["table"], summary["seeds"]
    names = list(summary["allocations"])
    config = summary["config"][names[0]]
    scale = config["image_generation_defaults"]["guidance_scale"]
    depth = {name: f"({a['pixel_depth']}, {a['semantic_depth']})" for name, a in summary["allocations"].items()}
    lines = ["# EvoTok's depth ablation (Table 4, Fig. 5b, Fig. 6) in miniature", "",
             "Written by `scripts/reproduce_ablation.py` from the runs it trained; every miniature number below is "
             "measured. The paper's rows are the paper's own (SigLIP2-L tokenizer on ImageNet, Qwen2.5-7B, real "
             "benchmarks), quoted for orientation: a different scale, data and benchmark.", "",
             "## What ran", "",
             f"Three depth allocations (D_pix, D_sem) x {len(seeds)} seeds ({', '.join(map(str, seeds))}), each the "
             "whole miniature pipeline of `make demo` with only the tokenizer's depths changed: identical budgets, "
             "data and teacher per seed (a seed draws its own EvoTok Shapes splits and trains its own mini-SigLIP, "
             "which the three allocations share). Each VLM is trained jointly (VQA + caption -> image) and scored by "
             "the same scorers: PSNR / SSIM / an rFID-style Fréchet distance in the mini-SigLIP's pooled image "
             f"embedding on {config['depth_eval_images']} held-out scenes (reconstructed from all D_pix depths), "
             f"exact-match VQA on {config['vqa_num_scenes']} held-out scenes, mini-GenEval "
             f"({config['geneval_per_category']} test prompts x {config['geneval_images_per_prompt']} images per "
             f"category) at the checkpoint's default guidance scale, {scale:g}.", "",
             f"Command: `{command}`", "",
             f"Training and scoring time (sum of every stage's build time, {config['num_threads']} threads): "
             f"{summary['total_build_seconds'] / 60:.0f} min.", "",
             "## Table 4 in miniature (mean ± standard deviation over seeds; per-seed values below)", "",
             "| allocation | (D_pix, D_sem) | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |",
             "|---|---|" + "---|" * len(TABLE_COLUMNS)]  # fmt: skip
    for name in names:
        lines.append(f"| {name} | {depth[name]} | "
                     + " | ".join(_fmt(table[name][key], d) for key, _, d in TABLE_COLUMNS) + " |")  # fmt: skip
    real = _fmt(table[names[0]]["rfid_real_vs_real"], 2)
    lines += ["", f"rFID-SigLIP between two different sets of real scenes (the validation and the test scenes, as "
              f"many): {real}. That is what sampling alone gives two unpaired sets of this size in 128 dimensions; a "
              "reconstruction is paired with its original, so its distance is far below it and is compared only with "
              "the other allocations'.", "",
              "Per seed (" + " / ".join(f"seed {s}" for s in seeds) + "):", "",
              "| allocation | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |",
              "|---|" + "---|" * len(TABLE_COLUMNS)]  # fmt: skip
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_seed_values(table[name][key], d) for key, _, d in TABLE_COLUMNS)
                     + " |")  # fmt: skip
    paper_keys = ("rFID", "PSNR", "SSIM", "SEED", "GQA", "MME", "GenEval")
    lines += ["", "The paper's Table 4 (its numbers, not measured here):", "",
              "| allocation | (D_pix, D_sem) | " + " | ".join(paper_keys) + " |", "|---|---|" + "---|" * len(paper_keys)]
    for name in names:
        lines.append(f"| {name} | {depth[name]} | " + " | ".join(f"{PAPER_TABLE4[name][k]:g}" for k in paper_keys) + " |")
    categories = [k[len("geneval_"):] for k in table[names[0]] if k.startswith("geneval_")
                  and k not in ("geneval_control", "geneval_heldout")]  # fmt: skip
    lines += ["", f"### mini-GenEval per category (guidance {scale:g}), the control and the held-out colour-shape pairs", "",
              "| allocation | " + " | ".join(categories) + " | control | held-out pairs | ceiling (detector on "
              "reconstructed renders) |", "|---|" + "---|" * (len(categories) + 3)]  # fmt: skip
    for name in names:
        cells = [_fmt(table[name][f"geneval_{c}"], 3) for c in categories]
        cells += [_fmt(table[name][k], 3) for k in ("geneval_control", "geneval_heldout", "detector_reconstructions")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    kinds = [k[len("vqa_"):] for k in table[names[0]] if k.startswith("vqa_")]
    lines += ["", "### VQA per question type", "", "| allocation | " + " | ".join(kinds) + " |",
              "|---|" + "---|" * len(kinds)]  # fmt: skip
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(table[name][f"vqa_{k}"], 3) for k in kinds) + " |")
    lines += ["", "## Fig. 5b analogue: reconstruction and semantics along depth", "", "![Fig. 5b analogue](fig5b.png)",
              "", "## Fig. 6 analogue: what the clusters of the latent follow, by depth", "",
              f"NMI of per-position k-means clusters (16 clusters, {config['nmi_images']} held-out scenes) of the "
              "cumulative latent at "
              "depth k with the colour and with the shape of the object under each position:", "",
              "![Fig. 6 analogue](fig6_nmi.png)", ""]  # fmt: skip
    # depths every allocation has, then each allocation's deepest (the sum of all its codes)
    common = sorted(set.intersection(*(set(next(iter(summary["curves"][n].values()))["nmi_color"]) for n in names)))
    shown = [d for d in (1, 2, 4) if d in common]
    headers = [f"{what} @{d}" for what in ("colour", "shape") for d in (*shown, "deepest")]
    lines += ["| allocation | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for name in names:
        cells = []
        for key in ("nmi_color", "nmi_shape"):
            curves = list(summary["curves"][name].values())
            deepest = max(curves[0][key])
            for column, d in enumerate((*shown, deepest)):
                values = [c[key][d] for c in curves]
                cells.append(f"{sum(values) / len(values):.3f}" + (f" (@{d})" if column == len(shown) else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if grids:
        lines += ["", f"The clusters themselves (seed {seeds[0]}; 8 clusters per depth, each row the patches nearest "
                  "one cluster's centre):", ""]  # fmt: skip
        lines += [f"- {name}: [fig6_clusters_{name}.png]({os.path.basename(path)})" for name, path in grids.items()]
    lines += ["", "## Which of the paper's claims hold at this scale", "",
              "A claim holds when it does in every seed (each seed's allocations share data and teacher, so they "
              "are compared seed by seed) and its mean margin is larger than the seed-to-seed standard deviation of "
              "either allocation; it is reversed when the opposite holds likewise, and unresolved otherwise. "
              "Differences are signed so that a positive one favours the claim.", "",
              "| claim | verdict | difference by seed | mean | seed spread |", "|---|---|---|---|---|"]  # fmt: skip
    for claim in summary["claims"]:
        differences = " / ".join(f"{v:+.3f}" for v in claim["differences_by_seed"].values())
        lines.append(f"| {claim['claim']} | {claim['verdict']} | {differences} | {claim['mean_difference']:+.3f} | "
                     f"{claim['spread']:.3f} |")  # fmt: skip
    lines += ["", verdict_paragraph(summary), ""]
    return "\n".join(lines)


def verdict_paragraph(summary: dict) -> str:
    """A plain paragraph from the claim verdicts (no judgement beyond them)."""
    groups: dict[str, list[str]] = {"holds": [], "reversed": [], "unresolved": []}
    for claim in summary["claims"]:
        groups[claim["verdict"]].append(claim["claim"])
    parts = [f"Over {len(summary['seeds'])} seeds at this scale:"]
    for verdict, text in (("holds", "These claims hold"), ("reversed", "These come out the other way"),
                          ("unresolved", "These are not resolved (the seeds disagree, or the margin is within "
                                         "the seed spread)")):  # fmt: skip
        if groups[verdict]:
            parts.append(f"{text}: " + "; ".join(groups[verdict]) + ".")
    if not groups["holds"] and not groups["reversed"]:
        parts.append("None of the paper's claims is resolved at this scale with these seeds.")
    return " ".join(parts)


def write_ablation_results(summary: dict, results_dir: str, command: str, grids: dict[str, str] | None = None) -> str:
    """`ablation.json`, `fig5b.png`, `fig6_nmi.png` and `README.md` under `results_dir`; returns the README's path."""
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "ablation.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_evolution(summary, os.path.join(results_dir, "fig5b.png"))
    plot_nmi(summary, os.path.join(results_dir, "fig6_nmi.png"))
    path = os.path.join(results_dir, "README.md")
    with open(path, "w") as f:
        f.write(readme_text(summary, command, grids or {}))
    return path


__all__ = ["ALLOCATIONS", "CLAIMS", "PAPER_TABLE4", "allocation_config", "link_shared_stages", "plot_evolution",
           "plot_nmi", "readme_text", "run_ablation", "save_cluster_grids", "summarize_ablation", "verdict_paragraph",
           "write_ablation_results"]  # fmt: skip
