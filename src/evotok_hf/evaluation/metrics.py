"""Reconstruction metrics for images in [-1, 1]: PSNR, SSIM and rFID (Fréchet distance of feature statistics).

References:
- SSIM: Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural
  similarity", IEEE TIP 2004 (11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population covariance).
  The numbers agree with `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)` on the same images mapped to [0, 1].
- FID: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
  NeurIPS 2017; the standard feature network is the FID Inception-v3's 2048-d pool3 output.

rFID here is the Fréchet distance between the feature statistics of the originals and of their reconstructions. The
feature networks themselves (`InceptionV3Features`, the offline stand-in `EfficientNetLite0Features`) live in
`evotok_hf.frozen_networks`, beside the teachers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn

EVALUATE_METRICS_DIR = Path(__file__).resolve().parent / "evaluate_metrics"

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scipy.ndimage's truncation at 3.5 sigma, i.e. an 11x11 window
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _float64_on(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the metrics accumulate in double precision.
    return torch.float32 if device.type == "mps" else torch.float64


def _check_image_pair(reconstruction: torch.Tensor, target: torch.Tensor) -> None:
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction and target shapes differ: {tuple(reconstruction.shape)} vs "
                         f"{tuple(target.shape)}")
    if reconstruction.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(reconstruction.shape)}")


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,), of (B, C, H, W) images in [-1, 1], measured on the [0, 1] scale (peak 1).

    Values outside [-1, 1] are clipped first, as they would be when the image is saved. A perfect reconstruction
    gives `inf` (no floor on the MSE)."""
    _check_image_pair(reconstruction, target)
    dtype = _float64_on(reconstruction.device)
    a = (reconstruction.to(dtype).clamp(-1, 1) + 1) / 2
    b = (target.to(dtype).clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return -10 * torch.log10(mse)


def mean_colour_baseline(images: torch.Tensor) -> torch.Tensor:
    """Each (B, C, H, W) image replaced by its mean colour: the PSNR reference a tokenizer must clearly beat."""
    return images.float().mean(dim=(2, 3), keepdim=True).expand_as(images)


def _valid_gaussian_filter_matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size - 2 * radius) banded matrix: column j holds the normalised Gaussian window centred on j + radius,
    so `signal @ matrix` filters along the last axis at the positions where the whole window fits."""
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=dtype, device=device)
    window = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    window = window / window.sum()
    num_outputs = size - 2 * SSIM_RADIUS
    columns = torch.arange(num_outputs, device=device).expand(len(window), -1)
    rows = columns + torch.arange(len(window), device=device)[:, None]
    matrix = torch.zeros(size, num_outputs, dtype=dtype, device=device)
    matrix[rows, columns] = window[:, None].expand(-1, num_outputs)
    return matrix


def _gaussian_blur_valid(maps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (..., H, W) maps, keeping only positions whose window fits. Done as two banded
    matmuls: float64 depthwise convolution is an order of magnitude slower on CPU."""
    along_height = _valid_gaussian_filter_matrix(maps.shape[-2], maps.dtype, maps.device)
    along_width = _valid_gaussian_filter_matrix(maps.shape[-1], maps.dtype, maps.device)
    return along_height.T @ (maps @ along_width)


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0, *,
         minimum: float = -1.0) -> torch.Tensor:
    """Per-image SSIM, shape (B,), of (B, C, H, W) images whose values lie in [minimum, minimum + data_range]
    (default: our [-1, 1] pixel values).

    SSIM's luminance term is not shift-invariant, so the images are first shifted to [0, data_range]: the result is
    the usual SSIM of the images on the [0, 1] (or 0..255) scale, not of the raw [-1, 1] values (on which mid-grey
    regions with means of opposite sign would score near -1). Values outside the range are clipped, as in `psnr`.
    Mean over the positions where the 11x11 window fits and over channels, computed in float64."""
    _check_image_pair(reconstruction, target)
    window_size = 2 * SSIM_RADIUS + 1
    if min(reconstruction.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got "
                         f"{tuple(reconstruction.shape[-2:])}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    dtype = _float64_on(reconstruction.device)
    x = reconstruction.to(dtype).clamp(minimum, minimum + data_range) - minimum
    y = target.to(dtype).clamp(minimum, minimum + data_range) - minimum
    blurred = _gaussian_blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1))
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = blurred.chunk(5, dim=1)
    var_x = mean_xx - mu_x**2
    var_y = mean_yy - mu_y**2
    cov_xy = mean_xy - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def _as_float64(array: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(array).detach().to(device="cpu", dtype=torch.float64)


def _trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices, as tr((s1^(1/2) sigma2 s1^(1/2))^(1/2)).

    The product sigma1 sigma2 is not symmetric, so its matrix square root (scipy's sqrtm, as in pytorch-fid) can
    pick up imaginary parts and fail on near-singular covariances (fewer samples than dimensions). The similar
    matrix s1^(1/2) sigma2 s1^(1/2) is symmetric PSD: its eigenvalues are real, and clipping round-off negatives to
    zero replaces pytorch-fid's eps offset."""
    eigenvalues, eigenvectors = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    return torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(mu1: torch.Tensor | np.ndarray, sigma1: torch.Tensor | np.ndarray,
                     mu2: torch.Tensor | np.ndarray, sigma2: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) between two Gaussians,
    in float64 on the CPU."""
    mu1, sigma1, mu2, sigma2 = (_as_float64(a) for a in (mu1, sigma1, mu2, sigma2))
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != mu2.shape or mu1.ndim != 1 or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"expected means of shape (D,) and covariances of shape (D, D), got {tuple(mu1.shape)}, "
                         f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}")
    difference = mu1 - mu2
    distance = difference @ difference + sigma1.trace() + sigma2.trace() - 2 * _trace_sqrt_product(sigma1, sigma2)
    # The distance is non-negative; identical statistics can come out at -1e-12 from round-off.
    return max(float(distance), 0.0)


class FeatureStatistics:
    """Streaming mean and covariance of feature vectors: float64 running sum and sum of outer products.

    `update` takes (N, D) features from any number of batches; `covariance` is the unbiased (N - 1) estimate that
    FID implementations use. The sums stay on the device of the first batch."""

    def __init__(self) -> None:
        self.feature_sum: torch.Tensor | None = None
        self.outer_product_sum: torch.Tensor | None = None
        self.num_samples = 0

    @property
    def num_features(self) -> int | None:
        return None if self.feature_sum is None else self.feature_sum.shape[0]

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"expected features of shape (N, D), got {tuple(features.shape)}")
        if self.feature_sum is None:
            dtype = _float64_on(features.device)
            self.feature_sum = torch.zeros(features.shape[1], dtype=dtype, device=features.device)
            self.outer_product_sum = torch.zeros(features.shape[1], features.shape[1], dtype=dtype,
                                                 device=features.device)
        elif features.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features per sample, got {features.shape[1]}")
        features = features.to(self.feature_sum)
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or inf")
        self.feature_sum += features.sum(dim=0)
        self.outer_product_sum += features.T @ features
        self.num_samples += features.shape[0]

    def mean(self) -> torch.Tensor:
        if self.num_samples < 1:
            raise RuntimeError("no features have been added")
        return self.feature_sum / self.num_samples

    def covariance(self) -> torch.Tensor:
        if self.num_samples < 2:
            raise RuntimeError(f"a covariance needs at least 2 samples, got {self.num_samples}")
        mean = self.mean()
        return (self.outer_product_sum - self.num_samples * torch.outer(mean, mean)) / (self.num_samples - 1)


def fid_from_statistics(real: FeatureStatistics, fake: FeatureStatistics) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of features (rFID: originals vs reconstructions)."""
    if real.num_features != fake.num_features:
        raise ValueError(f"feature sizes differ: {real.num_features} (real) vs {fake.num_features} (fake)")
    return frechet_distance(real.mean(), real.covariance(), fake.mean(), fake.covariance())


@torch.no_grad()
def feature_statistics(images: torch.Tensor | Iterable[torch.Tensor], network: nn.Module,
                       batch_size: int = 32) -> FeatureStatistics:
    """Feature statistics of [-1, 1] images: one (N, 3, H, W) tensor (run in batches of `batch_size`) or an
    iterable of (B, 3, H, W) batches."""
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    statistics = FeatureStatistics()
    device = next(network.parameters(), torch.empty(0)).device
    for batch in batches:
        statistics.update(network(batch.to(device)))
    return statistics


def _as_uint8_rgb(image: np.ndarray | PIL.Image.Image) -> np.ndarray:
    array = np.asarray(image.convert("RGB")) if isinstance(image, PIL.Image.Image) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 images or PIL images, got shape {array.shape} and dtype "
                         f"{array.dtype}")
    return array


def _to_pixel_values(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def uint8_images_to_pixel_values(images: Iterable[np.ndarray | PIL.Image.Image]) -> torch.Tensor:
    """Images of one size, as (H, W, 3) uint8 arrays (0..255) or PIL images (converted to RGB) -> (N, 3, H, W)
    float32 pixel values in [-1, 1]."""
    arrays = [_as_uint8_rgb(image) for image in images]
    if not arrays:
        raise ValueError("no images given")
    if len({array.shape for array in arrays}) > 1:
        raise ValueError(f"images differ in size: {sorted({array.shape for array in arrays})}")
    return _to_pixel_values(arrays)


def image_pair_batches(predictions: Iterable[np.ndarray | PIL.Image.Image],
                       references: Iterable[np.ndarray | PIL.Image.Image],
                       batch_size: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(predictions, references) pixel-value batches in [-1, 1] from paired uint8 / PIL images: runs of consecutive
    pairs of the same sizes, at most `batch_size` long, so that sets of mixed sizes need no resizing."""
    run: list[tuple[np.ndarray, np.ndarray]] = []
    for prediction, reference in zip(predictions, references, strict=True):
        pair = (_as_uint8_rgb(prediction), _as_uint8_rgb(reference))
        if run and (len(run) == batch_size or (pair[0].shape, pair[1].shape) != (run[0][0].shape, run[0][1].shape)):
            yield _to_pixel_values([p for p, _ in run]), _to_pixel_values([r for _, r in run])
            run = []
        run.append(pair)
    if run:
        yield _to_pixel_values([p for p, _ in run]), _to_pixel_values([r for _, r in run])


def image_pair_metric_info(description: str, citation: str, inputs_description: str):
    """The `evaluate.MetricInfo` of the local image-pair metric modules (predictions / references as images)."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
    )


def metric_path(name: str) -> str:
    """Folder of a local `evaluate` metric module, for `evaluate.load(metric_path("evotok_psnr"))`: "evotok_psnr",
    "evotok_ssim" or "evotok_fid". Works offline; the modules import `evotok_hf`, so the package must be installed."""
    available = sorted(p.name for p in EVALUATE_METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
    if name not in available:
        raise ValueError(f"unknown metric {name!r}; available: {available}")
    return str(EVALUATE_METRICS_DIR / name)


__all__ = [
    "FeatureStatistics",
    "feature_statistics",
    "fid_from_statistics",
    "frechet_distance",
    "image_pair_batches",
    "mean_colour_baseline",
    "metric_path",
    "psnr",
    "ssim",
    "uint8_images_to_pixel_values",
]
