"""Reconstruction evaluation per residual depth (the paper's Table 1 and Fig. 5b, for any EvoTok checkpoint).

One streaming pass over a dataset: every batch is encoded once; for each requested pixel depth k the image decoded
from the first k depths is scored (PSNR, SSIM, rFID features, optional LPIPS); for each requested semantic depth
the semantic features from the first k depths are compared with a teacher's (cosine); code histograms give each
depth's codebook usage and perplexity over the whole dataset. rFID is only comparable with published numbers when
the feature network is the FID Inception (`feature_network="inception"`, online); every report names its network,
and for the Inception the FID implementation whose resize it follows (torch-fidelity, pytorch-fid or clean-fid).

The paper's rFID protocol (ImageNet-1K val at 256): each image centre-cropped as ADM / guided-diffusion crops its
reference batches (`center_crop="adm"`, `adm_center_crop`), reconstructions and originals written as PNG
(`save_images=`), FID of the 2048-d pool3 Inception features. The saved PNG files hold exactly the pixels that were
measured, so the official tools run on the two folders give the same features.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..frozen_networks import build_feature_network, build_perceptual_loss, build_teacher, quantize_to_uint8
from ..image_datasets import eval_transform
from ..processing.image_processing_evotok import to_rgb
from .metrics import FeatureStatistics, fid_from_statistics, psnr, ssim

logger = logging.getLogger(__name__)

ALL_METRICS = ("psnr", "ssim", "rfid", "lpips", "semantic", "usage")
# How dataset images become the tokenizer's square input: "processor", its own shortest side + centre crop;
# "adm", the crop of ADM's reference batches (`adm_center_crop`), the paper's rFID protocol.
CENTER_CROPS = ("processor", "adm")


@dataclasses.dataclass
class ReconstructionReport:
    """Per-depth results. Dicts are keyed by depth k (the first k residual depths). `dataset` / `split` name the data
    measured on (a Hub id, a folder, "bundled"...; None when not given), so a model card can cite them.

    `rfid` is measured with `feature_network`; for the FID Inception, `fid_implementation` names the library whose
    feeding of the network it follows. `rfid_by_implementation` holds every feature network's rFID (the first one's
    too), keyed by its implementation (or its name), and `fid_resizes` how each implementation brought the images to
    its network's input. `preprocessing` says how dataset images were cropped; `saved_images` is the folder of PNGs."""

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
    fid_implementation: str | None = None
    fid_resizes: dict[str, str] = dataclasses.field(default_factory=dict)
    rfid_by_implementation: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    dataset: str | None = None
    split: str | None = None
    preprocessing: str | None = None
    saved_images: str | None = None
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
                 + (f"; {self.preprocessing}" if self.preprocessing else "")
                 + (f"; rFID features: {self.feature_network}" if self.rfid else "") + ")"]
        lines += [f"rFID as {label} computes it; images {resize}" for label, resize in self.fid_resizes.items()]
        lines.append("")
        columns = [(name, getattr(self, name)) for name in ("psnr", "ssim", "rfid", "lpips") if getattr(self, name)]
        header = {"psnr": "PSNR (dB)", "ssim": "SSIM", "rfid": "rFID", "lpips": "LPIPS"}
        # the first feature network's rFID is the "rFID" column; the others stand beside it
        beside = list(self.rfid_by_implementation.items())[1:]
        if beside:
            at = [name for name, _ in columns].index("rfid") + 1
            columns[at:at] = beside
            header.update({label: f"rFID ({label})" for label, _ in beside})
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


def adm_center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """The centre crop of ADM's ImageNet reference batches (Dhariwal & Nichol 2021, guided-diffusion's
    `center_crop_arr`), which tokenizer papers' rFID follows: halve the image with a box filter while its shorter side
    is at least twice `size` (cleaner than one large bicubic step), resize bicubically so the shorter side is `size`
    (the longer one rounded), then crop the centre `size` x `size` (offsets rounded down). RGB in, RGB out."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=PIL.Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=PIL.Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class _AdmTransform:
    """image -> (3, S, S) float32 in [-1, 1]: `adm_center_crop` to the processor's square size, then the processor's
    scaling only (the crop already has its size)."""

    def __init__(self, processor):
        self.processor = processor
        self.size = int(processor.size["height"])
        if int(processor.size["width"]) != self.size:
            raise ValueError(f"the ADM centre crop is square; the processor's size is {dict(processor.size)}")

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"expected a PIL image, got {type(image).__name__}")
        crop = adm_center_crop(to_rgb(image), self.size)
        return self.processor(crop, do_resize=False, return_tensors="pt").pixel_values[0]


def _batches(dataset, processor, batch_size: int, max_images: int | None, image_column: str,
             center_crop: str = "processor") -> Iterable[torch.Tensor]:  # fmt: skip
    """[-1, 1] image batches from a `datasets` dataset (map-style or streaming), a list of PIL images or a tensor
    (used as given); images are brought to the processor's size by its shortest side + centre crop
    (`center_crop="processor"`, the ImageNet evaluation convention) or by `adm_center_crop` ("adm")."""
    if isinstance(dataset, torch.Tensor):
        images = dataset[:max_images] if max_images else dataset
        yield from (batch for batch in images.split(batch_size) if len(batch))
        return
    transform = eval_transform(processor) if center_crop == "processor" else _AdmTransform(processor)
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


def _feature_networks(specs, device: torch.device) -> dict:
    """The rFID feature networks of one spec or a list of specs, keyed by their FID implementation (or name)."""
    specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    if not specs:
        raise ValueError("feature_network: give at least one feature network for 'rfid'")
    networks = {}
    for spec in specs:
        network = build_feature_network(spec).to(device)
        label = getattr(network, "implementation", None) or network.name
        if label in networks:
            raise ValueError(f"feature_network: {label!r} is given twice")
        networks[label] = network
    return networks


def _preprocessing(dataset, processor, center_crop: str) -> str:
    """How the images were brought to the tokenizer's input, in words, for the report."""
    if isinstance(dataset, torch.Tensor):
        return "pixel values given as a tensor"
    size = f"{processor.size['height']}x{processor.size['width']}"
    if center_crop == "adm":
        return f"ADM centre crop to {size}"
    return f"shortest side + centre crop to {size} (the image processor's)"


class _ImageSaver:
    """Writes [-1, 1] image batches as 8-bit PNGs: `root/originals/NNNNNN.png` and
    `root/reconstructions/depth_K/NNNNNN.png`, numbered by position in the dataset."""

    def __init__(self, root: str | os.PathLike, pixel_depths: Sequence[int]):
        self.root = Path(root)
        self.folders = {"originals": self.root / "originals"}
        self.folders.update({k: self.root / "reconstructions" / f"depth_{k}" for k in pixel_depths})
        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)

    def save(self, which, first_index: int, pixel_values: torch.Tensor) -> None:
        pixels = quantize_to_uint8(pixel_values).permute(0, 2, 3, 1).cpu().numpy()
        for offset, array in enumerate(pixels):
            path = self.folders[which] / f"{first_index + offset:06d}.png"
            PIL.Image.fromarray(np.ascontiguousarray(array)).save(path)


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
    center_crop: str = "processor",
    save_images: str | os.PathLike | None = None,
) -> ReconstructionReport:
    """Evaluate `model` (an `EvoTokModel`) per residual depth on `dataset`.

    Args:
        dataset: a `datasets.Dataset` / `IterableDataset` (e.g. ImageNet val by Hub id with `streaming=True`), a list
            of PIL images, or a (N, 3, S, S) tensor in [-1, 1].
        processor: the model's `EvoTokImageProcessor` (resize + centre crop to its size, and scaling).
        depths: pixel depths to score (default 1..pixel_depth); semantic_depths: default 1..semantic_depth.
        metrics: any of "psnr", "ssim", "rfid", "lpips", "semantic", "usage".
        feature_network: rFID features: "inception" or "torch-fidelity" (the standard FID Inception as
            torch-fidelity feeds it; online, torchmetrics + torch-fidelity), "pytorch-fid" or "clean-fid" (the same
            network fed as those libraries feed it; online), "efficientnet-lite0" (offline stand-in) or a module with
            `num_features`; or a list of them, all measured in the same pass (the first gives `rfid`).
        teacher: for "semantic": a module mapping [-1, 1] images to (B, grid*grid, teacher_dim) features (see
            `evotok_hf.frozen_networks.build_teacher`), or a spec string for `build_teacher`.
        lpips: for "lpips": a module (reconstruction, target) -> distance, or "lpips-vgg" (online extra).
        dataset_name / split: what the data is called (a Hub id such as "ILSVRC/imagenet-1k", a folder, "bundled")
            and its split; recorded in the report, where model cards read them.
        center_crop: "processor" (the processor's shortest side + centre crop) or "adm" (`adm_center_crop` to the
            processor's size: the paper's rFID protocol). Tensor datasets are used as given.
        save_images: a folder to write `originals/NNNNNN.png` and `reconstructions/depth_K/NNNNNN.png` to (one
            folder per pixel depth scored): the 8-bit pixels the FID Inception networks measure, so pytorch-fid,
            torch-fidelity or clean-fid run on these folders see the same images.
    """
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    for name, value in (("dataset_name", dataset_name), ("split", split)):
        if value is not None and not (isinstance(value, str) and value):
            raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
    if center_crop not in CENTER_CROPS:
        raise ValueError(f"center_crop must be one of {CENTER_CROPS}, got {center_crop!r}")
    config = model.config
    pixel_depths = _depth_list(depths, config.pixel_depth, "pixel")
    sem_depths = _depth_list(semantic_depths, config.semantic_depth, "semantic") if "semantic" in metrics else []
    device = next(model.parameters()).device
    model.eval()

    feature_networks = _feature_networks(feature_network, device) if "rfid" in metrics else {}
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
    real_stats = {label: FeatureStatistics() for label in feature_networks}
    fake_stats = {label: {k: FeatureStatistics() for k in pixel_depths} for label in feature_networks}
    histograms = torch.zeros(config.num_depths, config.codebook_size, dtype=torch.float64)
    saver = _ImageSaver(save_images, pixel_depths) if save_images is not None else None
    count = 0
    start = time.perf_counter()
    iterator = _batches(dataset, processor, batch_size, max_images, image_column, center_crop)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="evaluate", unit="batch")
    for pixel_values in iterator:
        pixel_values = pixel_values.to(device)
        codes = model.encode(pixel_values.to(model.dtype)).codes
        first_index = count
        count += pixel_values.shape[0]
        if saver is not None:
            saver.save("originals", first_index, pixel_values)
        if "usage" in metrics:
            for d in range(config.num_depths):
                histograms[d] += torch.bincount(codes[..., d].flatten(), minlength=config.codebook_size).double().cpu()
        for label, network in feature_networks.items():
            real_stats[label].update(network(pixel_values.float()))
        for k in pixel_depths:
            recon = model.decode(codes[..., :k]).float().clamp(-1, 1)
            if saver is not None:
                saver.save(k, first_index, recon)
            if "psnr" in metrics:
                sums["psnr"][k] += float(psnr(recon, pixel_values).sum())
            if "ssim" in metrics:
                sums["ssim"][k] += float(ssim(recon, pixel_values).sum())
            if "lpips" in metrics:
                sums["lpips"][k] += float(lpips(recon, pixel_values).float().flatten().mean()) * pixel_values.shape[0]
            for label, network in feature_networks.items():
                fake_stats[label][k].update(network(recon))
        if sem_depths:
            target = teacher(pixel_values.float()).float()
            for k in sem_depths:
                pred = model.get_semantic_features(codes[..., :k]).float()
                cosine_sums[k] += float(F.cosine_similarity(pred, target, dim=-1).mean(dim=1).sum())
    if count == 0:
        raise ValueError("the dataset yielded no image")

    report = ReconstructionReport(num_images=count, pixel_depths=pixel_depths, semantic_depths=sem_depths,
                                  teacher=teacher_name, dataset=dataset_name, split=split,
                                  preprocessing=_preprocessing(dataset, processor, center_crop),
                                  saved_images=None if saver is None else str(saver.root),
                                  seconds=time.perf_counter() - start)
    for name in ("psnr", "ssim", "lpips"):
        if name in metrics:
            setattr(report, name, {k: v / count for k, v in sums[name].items()})
    for label, network in feature_networks.items():
        report.rfid_by_implementation[label] = {k: fid_from_statistics(real_stats[label], fake_stats[label][k])
                                                for k in pixel_depths}  # fmt: skip
        if getattr(network, "resize", None):
            report.fid_resizes[label] = network.resize
    if feature_networks:
        first_label, first = next(iter(feature_networks.items()))
        report.feature_network = first.name
        report.fid_implementation = getattr(first, "implementation", None)
        report.rfid = report.rfid_by_implementation[first_label]
    if sem_depths:
        report.semantic_cosine = {k: v / count for k, v in cosine_sums.items()}
    if "usage" in metrics:
        probs = histograms / histograms.sum(dim=1, keepdim=True)
        report.codebook_usage = [float(u) for u in (histograms > 0).double().mean(dim=1)]
        entropy = -(probs * probs.clamp(min=1e-300).log()).sum(dim=1)
        report.perplexity = [float(p) for p in entropy.exp()]
    return report


__all__ = ["ALL_METRICS", "CENTER_CROPS", "ReconstructionReport", "adm_center_crop", "evaluate_reconstruction"]
