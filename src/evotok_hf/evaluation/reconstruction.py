"""Reconstruction evaluation per residual depth (the paper's Table 1 and Fig. 5b, for any EvoTok checkpoint).

One streaming pass over a dataset: every batch is encoded once; for each requested pixel depth k the image decoded
from the first k depths is scored (PSNR, SSIM, rFID features, optional LPIPS); for each requested semantic depth
the semantic features from the first k depths are compared with a teacher's (cosine); code histograms give each
depth's codebook usage and perplexity over the whole dataset. rFID is only comparable with published numbers when
the feature network is Inception (`feature_network="inception"`, online); every report names its network.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..frozen_networks import build_feature_network, build_perceptual_loss, build_teacher
from ..image_datasets import eval_transform
from .metrics import FeatureStatistics, fid_from_statistics, psnr, ssim

logger = logging.getLogger(__name__)

ALL_METRICS = ("psnr", "ssim", "rfid", "lpips", "semantic", "usage")


@dataclasses.dataclass
class ReconstructionReport:
    """Per-depth results. Dicts are keyed by depth k (the first k residual depths). `dataset` / `split` name the data
    measured on (a Hub id, a folder, "bundled"...; None when not given), so a model card can cite them."""

    num_images: int
    pixel_depths: list[int]
    semantic_depths: list[int]
    psnr: dict[int, float] = dataclasses.field(default_factory=dict)
    ssim: dict[int, float] = dataclasses.field(default_factory=dict)
    rfid: dict[int, float] = dataclasses.field(default_factory=dict)
    lpips: dict[int, float] = dataclasses.field(default_factory=dict)
    semantic_cosine: dict[int, float] = dataclasses.field(default_factory=dict)
    codebook_usage: list[float] = dataclasses.field(default_factory=list)
    perplexity: list[float] = dataclasses.field(default_factory=list)
    feature_network: str | None = None
    teacher: str | None = None
    dataset: str | None = None
    split: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_json(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=_json_number)
        return path

    def to_markdown(self) -> str:
        """Two tables: pixel depths (PSNR / SSIM / rFID / LPIPS) and all depths (semantic cosine, usage, perplexity)."""
        source = (f" of {self.dataset}" + (f" ({self.split} split)" if self.split else "")) if self.dataset else ""
        lines = [f"Reconstruction by pixel depth ({self.num_images} images{source}"
                 + (f"; rFID features: {self.feature_network}" if self.rfid else "") + ")", ""]
        columns = [(name, getattr(self, name)) for name in ("psnr", "ssim", "rfid", "lpips") if getattr(self, name)]
        header = {"psnr": "PSNR (dB)", "ssim": "SSIM", "rfid": "rFID", "lpips": "LPIPS"}
        lines.append("| depth k | " + " | ".join(header[n] for n, _ in columns) + " |")
        lines.append("|---:|" + "---:|" * len(columns))
        for k in self.pixel_depths:
            lines.append(f"| {k} | " + " | ".join(_fmt(values.get(k)) for _, values in columns) + " |")
        if self.semantic_cosine or self.codebook_usage:
            lines += ["", "By residual depth" + (f" (semantic cosine to {self.teacher})" if self.teacher else ""), ""]
            lines.append("| depth k | semantic cosine | codebook usage | perplexity |")
            lines.append("|---:|---:|---:|---:|")
            depths = sorted(set(self.semantic_depths) | set(range(1, len(self.codebook_usage) + 1)))
            for k in depths:
                usage = self.codebook_usage[k - 1] if k <= len(self.codebook_usage) else None
                perplexity = self.perplexity[k - 1] if k <= len(self.perplexity) else None
                lines.append(f"| {k} | {_fmt(self.semantic_cosine.get(k))} | {_fmt(usage)} | {_fmt(perplexity, 1)} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> str:
        """metric vs depth: PSNR / SSIM, rFID (and LPIPS), semantic cosine (and codebook usage)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        ax = axes[0]
        ks = self.pixel_depths
        if self.psnr:
            ax.plot(ks, [self.psnr[k] for k in ks], marker="o", label="PSNR (dB)")
        ax.set(xlabel="pixel depth k", ylabel="PSNR (dB)", title="Reconstruction")
        if self.ssim:
            twin = ax.twinx()
            twin.plot(ks, [self.ssim[k] for k in ks], marker="s", color="tab:orange", label="SSIM")
            twin.set_ylabel("SSIM")
        ax.set_xticks(ks)
        ax = axes[1]
        if self.rfid:
            ax.plot(ks, [self.rfid[k] for k in ks], marker="o", color="tab:red", label="rFID")
        if self.lpips:
            ax.plot(ks, [self.lpips[k] for k in ks], marker="^", color="tab:purple", label="LPIPS")
        ax.set(xlabel="pixel depth k", title=f"rFID ({self.feature_network})" if self.rfid else "rFID (not computed)")
        ax.set_xticks(ks)
        if self.rfid or self.lpips:
            ax.legend()
        ax = axes[2]
        if self.semantic_cosine:
            sk = self.semantic_depths
            ax.plot(sk, [self.semantic_cosine[k] for k in sk], marker="o", color="tab:green", label="semantic cosine")
        if self.codebook_usage:
            ax.plot(range(1, len(self.codebook_usage) + 1), self.codebook_usage, marker=".", color="tab:gray",
                    label="codebook usage")
        ax.set(xlabel="depth k", title="Semantic features" + (f" vs {self.teacher}" if self.teacher else ""))
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _json_number(value):
    return float(value)


def _batches(dataset, processor, batch_size: int, max_images: int | None, image_column: str) -> Iterable[torch.Tensor]:
    """[-1, 1] image batches from a `datasets` dataset (map-style or streaming), a list of PIL images or a tensor;
    resize + centre crop through the processor (the ImageNet evaluation convention)."""
    if isinstance(dataset, torch.Tensor):
        images = dataset[:max_images] if max_images else dataset
        yield from (batch for batch in images.split(batch_size) if len(batch))
        return
    transform = eval_transform(processor)
    batch, seen = [], 0
    for example in dataset:
        if max_images is not None and seen >= max_images:
            break
        image = example[image_column] if isinstance(example, dict) else example
        batch.append(transform(image))
        seen += 1
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def _depth_list(depths: Sequence[int] | None, limit: int, what: str) -> list[int]:
    depths = list(range(1, limit + 1)) if depths is None else sorted(set(int(k) for k in depths))
    bad = [k for k in depths if not 1 <= k <= limit]
    if bad:
        raise ValueError(f"{what} depths must lie in 1..{limit}, got {bad}")
    return depths


@torch.no_grad()
def evaluate_reconstruction(
    model,
    dataset,
    processor,
    depths: Sequence[int] | None = None,
    semantic_depths: Sequence[int] | None = None,
    metrics: Sequence[str] = ("psnr", "ssim", "rfid", "semantic", "usage"),
    batch_size: int = 16,
    feature_network="inception",
    teacher=None,
    lpips=None,
    max_images: int | None = None,
    image_column: str = "image",
    progress: bool = True,
    dataset_name: str | None = None,
    split: str | None = None,
) -> ReconstructionReport:
    """Evaluate `model` (an `EvoTokModel`) per residual depth on `dataset`.

    Args:
        dataset: a `datasets.Dataset` / `IterableDataset` (e.g. ImageNet val by Hub id with `streaming=True`), a list
            of PIL images, or a (N, 3, S, S) tensor in [-1, 1].
        processor: the model's `EvoTokImageProcessor` (resize + centre crop to its size).
        depths: pixel depths to score (default 1..pixel_depth); semantic_depths: default 1..semantic_depth.
        metrics: any of "psnr", "ssim", "rfid", "lpips", "semantic", "usage".
        feature_network: rFID features: "inception" (the standard FID Inception; online, torchmetrics +
            torch-fidelity), "efficientnet-lite0" (offline stand-in) or a module with `num_features`.
        teacher: for "semantic": a module mapping [-1, 1] images to (B, grid*grid, teacher_dim) features (see
            `evotok_hf.frozen_networks.build_teacher`), or a spec string for `build_teacher`.
        lpips: for "lpips": a module (reconstruction, target) -> distance, or "lpips-vgg" (online extra).
        dataset_name / split: what the data is called (a Hub id such as "ILSVRC/imagenet-1k", a folder, "bundled")
            and its split; recorded in the report, where model cards read them.
    """
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    for name, value in (("dataset_name", dataset_name), ("split", split)):
        if value is not None and not (isinstance(value, str) and value):
            raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
    config = model.config
    pixel_depths = _depth_list(depths, config.pixel_depth, "pixel")
    sem_depths = _depth_list(semantic_depths, config.semantic_depth, "semantic") if "semantic" in metrics else []
    device = next(model.parameters()).device
    model.eval()

    features = build_feature_network(feature_network).to(device) if "rfid" in metrics else None
    if "semantic" in metrics:
        if teacher is None:
            raise ValueError("the 'semantic' metric needs a teacher (e.g. build_teacher('efficientnet-lite0', grid))")
        if isinstance(teacher, str):
            teacher_name, teacher = teacher, build_teacher(teacher, grid_size=config.grid_size)
        else:
            teacher_name = getattr(teacher, "name", type(teacher).__name__)
        teacher = teacher.to(device).eval()
    else:
        teacher_name = None
    if "lpips" in metrics:
        if lpips is None:
            raise ValueError("the 'lpips' metric needs an LPIPS module (or 'lpips-vgg' with the online extra)")
        if isinstance(lpips, str):
            lpips = build_perceptual_loss(lpips)
        lpips = lpips.to(device).eval()

    sums = {name: {k: 0.0 for k in pixel_depths} for name in ("psnr", "ssim", "lpips")}
    cosine_sums = {k: 0.0 for k in sem_depths}
    real_stats = FeatureStatistics() if features is not None else None
    fake_stats = {k: FeatureStatistics() for k in pixel_depths} if features is not None else {}
    histograms = torch.zeros(config.semantic_depth, config.codebook_size, dtype=torch.float64)
    count = 0
    start = time.perf_counter()
    iterator = _batches(dataset, processor, batch_size, max_images, image_column)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="evaluate", unit="batch")
    for pixel_values in iterator:
        pixel_values = pixel_values.to(device)
        codes = model.encode(pixel_values.to(model.dtype)).codes
        count += pixel_values.shape[0]
        if "usage" in metrics:
            for d in range(config.semantic_depth):
                histograms[d] += torch.bincount(codes[..., d].flatten(), minlength=config.codebook_size).double().cpu()
        if real_stats is not None:
            real_stats.update(features(pixel_values.float()))
        for k in pixel_depths:
            recon = model.decode(codes[..., :k]).float().clamp(-1, 1)
            if "psnr" in metrics:
                sums["psnr"][k] += float(psnr(recon, pixel_values).sum())
            if "ssim" in metrics:
                sums["ssim"][k] += float(ssim(recon, pixel_values).sum())
            if "lpips" in metrics:
                sums["lpips"][k] += float(lpips(recon, pixel_values).float().flatten().mean()) * pixel_values.shape[0]
            if features is not None:
                fake_stats[k].update(features(recon))
        if sem_depths:
            target = teacher(pixel_values.float()).float()
            for k in sem_depths:
                pred = model.get_semantic_features(codes[..., :k]).float()
                cosine_sums[k] += float(F.cosine_similarity(pred, target, dim=-1).mean(dim=1).sum())
    if count == 0:
        raise ValueError("the dataset yielded no image")

    report = ReconstructionReport(num_images=count, pixel_depths=pixel_depths, semantic_depths=sem_depths,
                                  teacher=teacher_name, dataset=dataset_name, split=split,
                                  seconds=time.perf_counter() - start)
    for name in ("psnr", "ssim", "lpips"):
        if name in metrics:
            setattr(report, name, {k: v / count for k, v in sums[name].items()})
    if features is not None:
        report.feature_network = getattr(features, "name", type(features).__name__)
        report.rfid = {k: fid_from_statistics(real_stats, fake_stats[k]) for k in pixel_depths}
    if sem_depths:
        report.semantic_cosine = {k: v / count for k, v in cosine_sums.items()}
    if "usage" in metrics:
        probs = histograms / histograms.sum(dim=1, keepdim=True)
        report.codebook_usage = [float(u) for u in (histograms > 0).double().mean(dim=1)]
        entropy = -(probs * probs.clamp(min=1e-300).log()).sum(dim=1)
        report.perplexity = [float(p) for p in entropy.exp()]
    return report


__all__ = ["ALL_METRICS", "ReconstructionReport", "evaluate_reconstruction"]
