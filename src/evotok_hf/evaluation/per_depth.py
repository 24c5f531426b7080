"""Per-depth views of a tokenizer: how good the image is from the first k pixel depths, and how close the semantic
features from the first k depths are to a teacher's (the paper's Fig. 5b analysis, in its simplest form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import psnr


def mean_colour_baseline(images: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its mean colour: the reference a tokenizer must clearly beat."""
    return images.float().mean(dim=(2, 3), keepdim=True).expand_as(images)


@torch.no_grad()
def per_depth_psnr(model, pixel_values: torch.Tensor, codes: torch.Tensor | None = None, batch_size: int = 16) -> list[float]:
    """Mean PSNR of `model.decode(codes[..., :k])` for k = 1..pixel_depth."""
    if codes is None:
        codes = torch.cat([model.encode(chunk).codes for chunk in pixel_values.split(batch_size)])
    results = []
    for k in range(1, model.config.pixel_depth + 1):
        recon = torch.cat([model.decode(c[..., :k]) for c in codes.split(batch_size)])
        results.append(float(psnr(recon, pixel_values).mean()))
    return results


@torch.no_grad()
def per_depth_semantic_cosine(model, codes: torch.Tensor, teacher_features: torch.Tensor, batch_size: int = 16) -> list[float]:
    """Mean cosine similarity between `model.get_semantic_features(codes[..., :k])` and the teacher's per-position
    features, for k = 1..semantic_depth."""
    results = []
    for k in range(1, model.config.semantic_depth + 1):
        feats = torch.cat([model.get_semantic_features(c[..., :k]) for c in codes.split(batch_size)])
        results.append(float(F.cosine_similarity(feats.float(), teacher_features.float(), dim=-1).mean()))
    return results
