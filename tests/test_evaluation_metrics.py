"""Reconstruction metrics against independent float64 references: skimage for SSIM, numpy for PSNR, scipy's sqrtm
(the pytorch-fid recipe) for the Fréchet distance; feature networks with real weights or injected stand-ins; the
local `evaluate` modules, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402
from torch import nn  # noqa: E402

from evotok_hf.bundled_photos import load_bundled_photos  # noqa: E402
from evotok_hf.evaluation import metrics  # noqa: E402
from evotok_hf.evaluation.metrics import (  # noqa: E402
    FeatureStatistics,
    feature_statistics,
    fid_from_statistics,
    frechet_distance,
    metric_path,
    psnr,
    ssim,
    uint8_images_to_pixel_values,
)
from evotok_hf.frozen_networks import (  # noqa: E402
    EfficientNetLite0Features,
    InceptionV3Features,
    build_feature_network,
)

EGYPTIAN_CAT = 285  # ImageNet class index


def _random_images(shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _photo_crops(names=("astronaut", "chelsea", "coffee"), size=(96, 128)):
    photos = load_bundled_photos(list(names)).values()
    arrays = [np.asarray(photo.convert("RGB"))[: size[0], : size[1]] for photo in photos]
    return uint8_images_to_pixel_values(arrays)


def _skimage_ssim(reconstruction, target):
    """Reference: skimage on the [0, 1] scale, channels last, float64."""
    to_unit = lambda x: ((x.double().numpy() + 1) / 2).transpose(1, 2, 0)  # noqa: E731
    return np.array([
        structural_similarity(to_unit(r), to_unit(t), channel_axis=-1, data_range=1.0, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
        for r, t in zip(reconstruction, target)
    ])


# --- SSIM ---------------------------------------------------------------------------------------------------------

def test_ssim_matches_skimage_on_random_images():
    target = _random_images((3, 3, 37, 45), seed=0)
    reconstruction = (target + 0.3 * _random_images((3, 3, 37, 45), seed=1)).clamp(-1, 1)
    ours = ssim(reconstruction, target)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours.numpy(), _skimage_ssim(reconstruction, target), atol=1e-4)
    # The same images on the 0..255 scale: SSIM is unchanged when data_range scales with the values.
    scaled = structural_similarity(((reconstruction[0] + 1) * 127.5).double().numpy(),
                                   ((target[0] + 1) * 127.5).double().numpy(), channel_axis=0, data_range=255,
                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert abs(float(ours[0]) - scaled) < 1e-4


def test_ssim_matches_skimage_on_real_photos():
    target = _photo_crops()
    # A blurry reconstruction (4x down and up) and a noisy one: SSIM well inside (0, 1).
    blurry = F.interpolate(F.avg_pool2d(target, 4), size=target.shape[-2:], mode="bilinear", align_corners=False)
    noisy = (target + 0.1 * _random_images(target.shape, seed=2)).clamp(-1, 1)
    for reconstruction in (blurry, noisy):
        ours = ssim(reconstruction, target)
        reference = _skimage_ssim(reconstruction, target)
        assert 0.2 < reference.min() and reference.max() < 0.98
        np.testing.assert_allclose(ours.numpy(), reference, atol=1e-4)
    np.testing.assert_allclose(ssim(target, target).numpy(), 1.0, atol=1e-6)


def test_ssim_matches_torchmetrics_where_the_window_fits():
    """torchmetrics' SSIM (Gaussian 11x11, sigma 1.5) is the other implementation users compare with, and the one
    training logged before it used this one. Its map agrees with ours wherever the window fits; it also averages the
    border positions, computed on reflected pixels, which ours (like skimage) leaves out."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    target = _photo_crops()
    reconstruction = F.interpolate(F.avg_pool2d(target, 2), size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)  # fmt: skip
    _, their_map = structural_similarity_index_measure(
        (reconstruction.double() + 1) / 2, (target.double() + 1) / 2, data_range=1.0, return_full_image=True
    )
    radius = metrics.SSIM_RADIUS
    inside = their_map[..., radius:-radius, radius:-radius].flatten(1).mean(dim=1)
    np.testing.assert_allclose(ssim(reconstruction, target).numpy(), inside.numpy(), atol=1e-9)


def test_ssim_is_measured_on_the_unit_scale_not_on_raw_pixel_values():
    # Mid-grey images whose local means straddle 0 in [-1, 1]: SSIM of the raw values would be far from the usual
    # SSIM (its luminance term is not shift-invariant); ours is the usual one.
    target = 0.05 * _random_images((1, 3, 32, 32), seed=3)
    reconstruction = -target
    raw = structural_similarity(reconstruction[0].double().numpy(), target[0].double().numpy(), channel_axis=0,
                                data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    usual = _skimage_ssim(reconstruction, target)[0]
    assert abs(raw - usual) > 0.05
    assert abs(float(ssim(reconstruction, target)[0]) - usual) < 1e-4


def test_ssim_rejects_mismatched_and_too_small_images():
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 10, 16), torch.zeros(1, 3, 10, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))


# --- PSNR ---------------------------------------------------------------------------------------------------------

def test_psnr_matches_numpy_float64_and_is_infinite_for_a_perfect_reconstruction():
    target = _photo_crops()
    reconstruction = target + 0.2 * _random_images(target.shape, seed=4)  # partly outside [-1, 1]: clipped
    to_unit = lambda x: (np.clip(x.double().numpy(), -1, 1) + 1) / 2  # noqa: E731
    mse = ((to_unit(reconstruction) - to_unit(target)) ** 2).reshape(len(target), -1).mean(axis=1)
    np.testing.assert_allclose(psnr(reconstruction, target).numpy(), 10 * np.log10(1 / mse), atol=1e-4)
    perfect = psnr(target, target.clone())
    assert torch.isinf(perfect).all() and (perfect > 0).all()
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(target, target[:, :, :-1])


# --- Fréchet distance ---------------------------------------------------------------------------------------------

def _reference_frechet_distance(features1, features2, eps=1e-6):
    """pytorch-fid's recipe, in numpy/scipy float64."""
    mu1, mu2 = features1.mean(axis=0), features2.mean(axis=0)
    sigma1, sigma2 = np.cov(features1, rowvar=False), np.cov(features2, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def _correlated_features(num_samples, dim, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_samples, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim) + shift


def _statistics(features, batch_sizes):
    statistics = FeatureStatistics()
    for chunk in np.split(features, np.cumsum(batch_sizes)[:-1]):
        statistics.update(torch.from_numpy(chunk).float())
    return statistics


def test_feature_statistics_stream_the_mean_and_unbiased_covariance():
    features = _correlated_features(50, 12, seed=0, shift=3.0).astype(np.float32)
    statistics = _statistics(features, [7, 20, 23])  # uneven batches
    assert statistics.num_samples == 50 and statistics.num_features == 12
    assert statistics.mean().dtype == torch.float64
    np.testing.assert_allclose(statistics.mean().numpy(), features.astype(np.float64).mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(statistics.covariance().numpy(), np.cov(features.astype(np.float64), rowvar=False),
                               rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="features per sample"):
        statistics.update(torch.zeros(2, 5))
    lonely = FeatureStatistics()
    lonely.update(torch.zeros(1, 12))
    with pytest.raises(RuntimeError, match="at least 2 samples"):
        lonely.covariance()


@pytest.mark.parametrize("num_samples,dim", [(400, 24), (12, 40)], ids=["more-samples-than-dims", "rank-deficient"])
def test_frechet_distance_matches_scipy_reference(num_samples, dim):
    real = _correlated_features(num_samples, dim, seed=1).astype(np.float32)
    fake = (1.3 * _correlated_features(num_samples, dim, seed=2, shift=0.5)).astype(np.float32)
    reference = _reference_frechet_distance(real.astype(np.float64), fake.astype(np.float64))
    ours = fid_from_statistics(_statistics(real, [num_samples]), _statistics(fake, [num_samples // 2,
                                                                                   num_samples - num_samples // 2]))
    assert isinstance(ours, float)
    assert reference > 1.0
    assert abs(ours - reference) <= 1e-3 * reference
    # Symmetric in its two distributions, and accepts numpy statistics directly.
    mu1, mu2 = real.mean(0).astype(np.float64), fake.mean(0).astype(np.float64)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    swapped = frechet_distance(mu2, sigma2, mu1, sigma1)
    assert abs(frechet_distance(mu1, sigma1, mu2, sigma2) - swapped) < 1e-6 * reference


def test_frechet_distance_of_identical_features_is_zero():
    features = _correlated_features(300, 32, seed=3, shift=2.0).astype(np.float32)
    statistics = _statistics(features, [300])
    trace_scale = float(statistics.covariance().trace())
    assert abs(fid_from_statistics(statistics, _statistics(features, [100, 200]))) < 1e-6 * trace_scale
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid_from_statistics(statistics, _statistics(features[:, :8], [300]))
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# --- feature networks ---------------------------------------------------------------------------------------------

class TinyFeatures(nn.Module):
    """A fixed random conv net: a stand-in feature network for fast tests."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, self.num_features, 5, stride=2)

    def forward(self, pixel_values):
        return torch.tanh(self.conv(pixel_values)).mean(dim=(2, 3))


def test_efficientnet_lite0_features_are_the_classifier_input_of_the_real_network():
    network = EfficientNetLite0Features()
    photos = [p.resize((224, 224), PIL.Image.BICUBIC) for p in load_bundled_photos(["chelsea", "coffee"]).values()]
    features = network(uint8_images_to_pixel_values(photos))
    assert features.shape == (2, 1280) and features.dtype == torch.float32
    assert network.num_features == 1280 and "NOT Inception" in network.name
    # The pooled features are what the package's own forward feeds its ImageNet head: chelsea is an Egyptian cat.
    pixel_values = uint8_images_to_pixel_values(photos)
    with torch.no_grad():
        logits = network.teacher.network._fc(features)
        reference_logits = network.teacher.network(network.teacher.preprocess(pixel_values))
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)
    assert int(logits[0].argmax()) == EGYPTIAN_CAT
    network.train()
    assert not network.training and not any(p.requires_grad for p in network.parameters())


class FakeNoTrainInceptionV3(nn.Module):
    """Same constructor and call interface as torchmetrics' NoTrainInceptionV3; records its input."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, antialias=True):
        super().__init__()
        self.constructed_with = (name, features_list, feature_extractor_weights_path)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        assert x.dtype == torch.uint8, "NoTrainInceptionV3 asserts uint8 input"
        self.last_input = x
        return x.float().mean(dim=(1, 2, 3))[:, None].expand(-1, 2048) * self.scale


def test_inception_features_convert_to_uint8_and_return_pool3_features(monkeypatch):
    import torchmetrics.image.fid

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", FakeNoTrainInceptionV3)
    network = build_feature_network("inception")
    assert isinstance(network, InceptionV3Features) and network.num_features == 2048
    assert network.name == "inception-v3-fid (pool3, 2048)"
    assert network.network.constructed_with == ("inception-v3-compat", ["2048"], None)
    pixel_values = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 1.2]).view(1, 1, 1, 6).expand(2, 3, 4, 6).contiguous()
    features = network(pixel_values)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    seen = network.network.last_input
    assert seen.shape == (2, 3, 4, 6)
    assert seen[0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255]
    assert not any(p.requires_grad for p in network.parameters())


def test_inception_features_name_the_online_extra_when_unavailable(monkeypatch):
    import torchmetrics.image.fid

    class Missing:
        def __init__(self, *args, **kwargs):
            raise ModuleNotFoundError("NoTrainInceptionV3 module requires that `Torch-fidelity` is installed.")

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", Missing)
    with pytest.raises(ImportError, match=r'pip install "evotok_hf\[online\]"'):
        InceptionV3Features.from_pretrained()


def test_inception_features_load_only_in_from_pretrained(monkeypatch, tmp_path):
    """The constructor wraps a built network and loads nothing; `from_pretrained` builds the FID Inception, with the
    weights file it is given."""
    import torchmetrics.image.fid

    def no_loading(*args, **kwargs):
        raise AssertionError("the constructor must not build (and so download) the Inception network")

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", no_loading)
    wrapped = InceptionV3Features(FakeNoTrainInceptionV3("inception-v3-compat", ["2048"]))
    assert wrapped(torch.zeros(1, 3, 8, 8)).shape == (1, 2048)
    with pytest.raises(ValueError, match="from_pretrained"):
        InceptionV3Features("weights.pth")
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", FakeNoTrainInceptionV3)
    loaded = InceptionV3Features.from_pretrained(tmp_path / "weights.pth")
    assert loaded.network.constructed_with == ("inception-v3-compat", ["2048"], tmp_path / "weights.pth")


def test_build_feature_network_wraps_modules_and_rejects_unknown_specs():
    wrapped = build_feature_network(TinyFeatures())
    assert wrapped.name == "TinyFeatures" and wrapped.num_features == 6
    assert build_feature_network(TinyFeatures(), name="tiny").name == "tiny"
    assert build_feature_network(wrapped) is wrapped
    assert wrapped(_random_images((2, 3, 16, 16), seed=5)).shape == (2, 6)
    assert not wrapped.training and not any(p.requires_grad for p in wrapped.parameters())
    with pytest.raises(ValueError, match="num_features"):
        build_feature_network(nn.Identity())
    with pytest.raises(ValueError, match="feature network spec"):
        build_feature_network("clip")


# --- evaluate modules ---------------------------------------------------------------------------------------------

def _uint8_pairs():
    """Two sizes, arrays and PIL images mixed: real crops and degraded copies."""
    photos = [np.asarray(p.convert("RGB")) for p in load_bundled_photos(["astronaut", "chelsea", "coffee"]).values()]
    references = [photos[0][:48, :64], photos[1][:48, :64], photos[2][:40, :40], photos[0][100:140, 100:140]]
    rng = np.random.default_rng(0)
    predictions = [np.clip(r.astype(np.int16) + rng.integers(-25, 26, r.shape), 0, 255).astype(np.uint8)
                   for r in references]
    predictions[3] = references[3].copy()
    return [PIL.Image.fromarray(p) for p in predictions[:2]] + predictions[2:], references


def _direct(function, predictions, references, sizes=((0, 2), (2, 4))):
    values = [function(uint8_images_to_pixel_values(predictions[a:b]), uint8_images_to_pixel_values(references[a:b]))
              for a, b in sizes]
    return torch.cat(values)


def test_evaluate_psnr_and_ssim_modules_load_offline_and_equal_the_direct_functions():
    import evaluate

    predictions, references = _uint8_pairs()
    psnr_metric = evaluate.load(metric_path("evotok_psnr"))
    ssim_metric = evaluate.load(metric_path("evotok_ssim"))
    result = psnr_metric.compute(predictions=predictions[:3], references=references[:3])
    assert result["psnr"] == pytest.approx(float(_direct(psnr, predictions, references, ((0, 2), (2, 3))).mean()),
                                           abs=1e-9)
    assert psnr_metric.compute(predictions=predictions, references=references)["psnr"] == float("inf")
    expected_ssim = float(_direct(ssim, predictions, references).mean())
    result = ssim_metric.compute(predictions=predictions, references=references, batch_size=1)
    assert result["ssim"] == pytest.approx(expected_ssim, abs=1e-9)
    assert 0.3 < result["ssim"] < 1.0
    # Float images are refused rather than silently truncated to 0/1.
    with pytest.raises((TypeError, ValueError)):
        psnr_metric.compute(predictions=[np.random.rand(16, 16, 3)], references=[np.random.rand(16, 16, 3)])


def test_evaluate_fid_module_equals_the_direct_computation():
    import evaluate

    predictions, references = _uint8_pairs()
    network = build_feature_network(TinyFeatures(), name="tiny")
    fid_metric = evaluate.load(metric_path("evotok_fid"))
    result = fid_metric.compute(predictions=predictions, references=references, feature_network=network,
                                batch_size=3)
    fake = feature_statistics(iter([uint8_images_to_pixel_values(predictions[:2]),
                                    uint8_images_to_pixel_values(predictions[2:])]), network)
    real = feature_statistics(iter([uint8_images_to_pixel_values(references[:2]),
                                    uint8_images_to_pixel_values(references[2:])]), network)
    assert result["feature_network"] == "tiny"
    assert result["fid"] == pytest.approx(fid_from_statistics(real, fake), rel=1e-9)
    assert result["fid"] > 0


def test_metric_path_points_at_module_folders():
    for name in ("evotok_psnr", "evotok_ssim", "evotok_fid"):
        assert os.path.isfile(os.path.join(metric_path(name), f"{name}.py"))
    with pytest.raises(ValueError, match="available"):
        metric_path("evotok_lpips")
    assert os.path.isdir(metrics.EVALUATE_METRICS_DIR)
