"""Scoring of the miniature's checkpoints (the `scores` stage of `miniature.pipeline`): the detector on ground-truth
renders, per-depth reconstruction and semantic cosine on held-out scenes, per-depth NMI, VQA and mini-GenEval, all
through `evotok_hf.evaluation` and the checkpoints' public loaders. Images the report shows are saved as PNG files
beside `scores.json`."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

# How much of each scored set the report shows.
REPORT_RECONSTRUCTIONS = 6
REPORT_PROMPTS_PER_CATEGORY = 3


def _save_images(images, folder: str, prefix: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    names = []
    for index, image in enumerate(images):
        name = f"{prefix}_{index:03d}.png"
        image.save(os.path.join(folder, name))
        names.append(name)
    return names


def detector_on_renders(prompts, seed: int = 0) -> dict:
    """mini-GenEval's detector on one ground-truth render per prompt (what a perfect generator would draw): the
    detector must score at least 0.98 in every category before any model is judged by it."""
    from ..evaluation.shapes_scoring import score_geneval_mini
    from .shapes import scene_for_prompt

    rng = np.random.default_rng([seed, 7])
    renders = [[scene_for_prompt(rng, prompt)["image"]] for prompt in prompts]
    result = score_geneval_mini(renders, prompts)
    return {key: result[key] for key in ("per_category", "overall", "num_images")}


@torch.no_grad()
def detector_on_reconstructions(tokenizer, image_processor, prompts, seed: int = 0, batch_size: int = 100) -> dict:
    """The same ground-truth renders as `detector_on_renders`, encoded and decoded from their first k pixel depths,
    scored by the detector: what a generator that predicted every code perfectly would reach with this tokenizer (the
    ceiling of mini-GenEval), by k."""
    from ..evaluation.shapes_scoring import score_geneval_mini
    from ..image_datasets import eval_transform
    from .shapes import scene_for_prompt

    rng = np.random.default_rng([seed, 7])
    transform = eval_transform(image_processor)
    pixel_values = torch.stack([transform(scene_for_prompt(rng, prompt)["image"]) for prompt in prompts])
    codes = torch.cat([tokenizer.encode(chunk).codes for chunk in pixel_values.split(batch_size)])
    result = {}
    for depth in range(1, tokenizer.config.pixel_depth + 1):
        images = [image for chunk in codes.split(batch_size) for image in
                  image_processor.postprocess(tokenizer.decode(chunk[..., :depth]), return_tensors="PIL.Image.Image")]  # fmt: skip
        scored = score_geneval_mini([[image] for image in images], prompts)
        result[depth] = {key: scored[key] for key in ("per_category", "overall")}
    return result


@torch.no_grad()
def per_depth_scores(tokenizer, image_processor, teacher, images, folder: str, feature_network=None,
                     reference_images=None) -> dict:  # fmt: skip
    """PSNR / SSIM by pixel depth 1..D_pix (with the mean-colour baseline PSNR) and semantic cosine to the teacher by
    depth 1..D_sem, on held-out scenes; reconstructions of the first few by depth, saved for the report.

    With a `feature_network` (e.g. `SiglipFeatures` of the mini-SigLIP) also an rFID-style Fréchet distance in its
    feature space between the scenes and their reconstructions, by pixel depth, and, with `reference_images` (other
    real scenes, as many), the same distance between two sets of real scenes: what sampling alone gives."""
    from ..evaluation import evaluate_reconstruction, mean_colour_baseline, psnr
    from ..evaluation.metrics import feature_statistics, fid_from_statistics
    from ..image_datasets import eval_transform

    metrics = ("psnr", "ssim", "semantic", "usage") + (("rfid",) if feature_network is not None else ())
    report = evaluate_reconstruction(tokenizer, images, image_processor, metrics=metrics, teacher=teacher,
                                     feature_network=feature_network, progress=False, dataset_name="EvoTok Shapes",
                                     split="test")  # fmt: skip
    transform = eval_transform(image_processor)
    pixel_values = torch.stack([transform(image) for image in images])
    baseline = float(psnr(mean_colour_baseline(pixel_values), pixel_values).mean())
    extra = {}
    if feature_network is not None:
        extra["rfid"] = {int(k): float(v) for k, v in report.rfid.items()}
        extra["rfid_features"] = report.feature_network
        if reference_images is not None:
            reference = torch.stack([transform(image) for image in reference_images])
            extra["rfid_real_vs_real"] = fid_from_statistics(feature_statistics(pixel_values, feature_network),
                                                             feature_statistics(reference, feature_network))  # fmt: skip
    shown = pixel_values[:REPORT_RECONSTRUCTIONS]
    codes = tokenizer.encode(shown).codes
    rows = [{"depth": 0, "images": _save_images(image_processor.postprocess(shown, return_tensors="PIL.Image.Image"),
                                                folder, "input")}]  # fmt: skip
    for depth in range(1, tokenizer.config.pixel_depth + 1):
        decoded = tokenizer.decode(codes[..., :depth])
        pil = image_processor.postprocess(decoded, return_tensors="PIL.Image.Image")
        rows.append({"depth": depth, "images": _save_images(pil, folder, f"recon_depth{depth}")})
    return {
        "num_images": report.num_images,
        "psnr": {int(k): float(v) for k, v in report.psnr.items()},
        "ssim": {int(k): float(v) for k, v in report.ssim.items()},
        "semantic_cosine": {int(k): float(v) for k, v in report.semantic_cosine.items()},
        "codebook_usage": [float(u) for u in report.codebook_usage],
        "psnr_mean_colour_baseline": baseline,
        **extra,
        "reconstructions": rows,
    }


def nmi_scores(tokenizer, image_processor, split, num_images: int) -> dict:
    from ..evaluation.shapes_scoring import shapes_nmi_by_depth
    from ..image_datasets import eval_transform

    rows = split.select(range(min(num_images, len(split))))
    transform = eval_transform(image_processor)
    pixel_values = torch.stack([transform(image) for image in rows["image"]])
    result = shapes_nmi_by_depth(tokenizer, pixel_values, rows["objects"], num_clusters=16)
    return {int(depth): values for depth, values in result.items()}


def geneval_scores(pipeline, prompts, config, folder: str) -> dict:
    """mini-GenEval at every guidance scale of `config`; per scale the scores (without the per-image details), and for
    the checkpoint's default scale a few prompts per category with their images and pass / fail marks."""
    from ..evaluation.shapes_scoring import evaluate_geneval_mini

    results = evaluate_geneval_mini(pipeline, prompts, guidance_scales=config.geneval_guidance_scales,
                                    num_images_per_prompt=config.geneval_images_per_prompt,
                                    batch_size=config.geneval_batch_size, seed=config.seed)  # fmt: skip
    default_scale = float(config.image_generation_defaults["guidance_scale"])
    out = {"default_guidance_scale": default_scale, "by_guidance_scale": {}, "grid": []}
    for scale, result in results.items():
        scores = {k: v for k, v in result["scores"].items() if k not in ("passed", "detections")}
        out["by_guidance_scale"][str(scale)] = scores
        if scale != default_scale:
            continue
        shown: dict[str, int] = {}
        for index, prompt in enumerate(prompts):
            if shown.get(prompt["category"], 0) >= REPORT_PROMPTS_PER_CATEGORY:
                continue
            shown[prompt["category"]] = shown.get(prompt["category"], 0) + 1
            names = _save_images(result["images"][index], folder, f"generated_{index:03d}")
            out["grid"].append({"prompt": prompt["prompt"], "category": prompt["category"],
                                "heldout": bool(prompt.get("heldout")), "images": names,
                                "passed": [bool(p) for p in result["scores"]["passed"][index]]})  # fmt: skip
    if str(default_scale) not in out["by_guidance_scale"]:
        raise ValueError(f"the default guidance scale {default_scale} is not among {config.geneval_guidance_scales}")
    out["default"] = out["by_guidance_scale"][str(default_scale)]
    return out


def score_miniature(cache, config, dataset, folder: str, progress: bool = True) -> dict:
    """Every score of the miniature run, as a JSON-ready dict."""
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from ..evaluation.shapes_scoring import evaluate_vqa
    from ..pipelines import EvoTokPipeline
    from ..frozen_networks import SiglipFeatures, SiglipTeacher
    from .shapes import geneval_prompts

    start = time.perf_counter()
    images_folder = os.path.join(folder, "images")
    test = dataset["test"]
    prompts = geneval_prompts("test", per_category=config.geneval_per_category, seed=config.seed)
    scores = {"detector_ground_truth": detector_on_renders(prompts, seed=config.seed)}

    tokenizer = AutoModel.from_pretrained(cache.path("tokenizer")).eval()
    image_processor = AutoImageProcessor.from_pretrained(cache.path("tokenizer"))
    teacher = SiglipTeacher.from_pretrained(cache.path("siglip"), grid_size=tokenizer.config.grid_size)
    held_out = list(test.select(range(min(config.depth_eval_images, len(test))))["image"])
    features = SiglipFeatures.from_pretrained(cache.path("siglip"))
    validation = dataset["validation"]
    reference = list(validation.select(range(min(len(held_out), len(validation))))["image"])
    scores["per_depth"] = per_depth_scores(tokenizer, image_processor, teacher, held_out, images_folder,
                                           feature_network=features, reference_images=reference)  # fmt: skip
    scores["nmi_by_depth"] = nmi_scores(tokenizer, image_processor, test, config.nmi_images)
    scores["detector_reconstructions"] = detector_on_reconstructions(tokenizer, image_processor, prompts, config.seed)
    timings = {"tokenizer": time.perf_counter() - start}

    vlm_folder = cache.path("vlm")
    model = AutoModelForImageTextToText.from_pretrained(vlm_folder).eval()
    processor = AutoProcessor.from_pretrained(vlm_folder)
    step = time.perf_counter()
    vqa_split = test.select(range(min(config.vqa_num_scenes, len(test))))
    scores["vqa"] = evaluate_vqa(model, processor, vqa_split, batch_size=config.vqa_batch_size, num_examples=2)
    timings["vqa"] = time.perf_counter() - step
    step = time.perf_counter()
    pipeline = EvoTokPipeline.from_pretrained(vlm_folder, model=model, processor=processor)
    pipeline.set_progress_bar_config(disable=not progress)
    scores["geneval"] = geneval_scores(pipeline, prompts, config, images_folder)
    timings["geneval"] = time.perf_counter() - step
    for example in scores["vqa"]["examples"]:
        example["image"] = _save_images([vqa_split[example["row"]]["image"]], images_folder,
                                        f"vqa_{example['row']:03d}")[0]  # fmt: skip
    scores["timings"] = timings
    scores["seconds"] = time.perf_counter() - start
    return scores


__all__ = ["detector_on_reconstructions", "detector_on_renders", "geneval_scores", "nmi_scores", "per_depth_scores", "score_miniature"]
