"""evaluate_reconstruction and the evaluation script, against independent computations."""

import json
import pathlib
import runpy

import numpy as np
import pytest
import torch
from scipy import linalg

from evotok_hf import EvoTokConfig, EvoTokImageProcessor, EvoTokModel
from evotok_hf.evaluation import evaluate_reconstruction

ROOT = pathlib.Path(__file__).resolve().parents[1]


class PixelFeatures(torch.nn.Module):
    """An injected rFID feature network: a fixed random projection of 8x8-pooled pixels (no download)."""

    num_features = 6
    name = "test-pixel-projection"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(3 * 8 * 8, self.num_features, generator=g))

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1) @ self.weight


class GridTeacher(torch.nn.Module):
    """A deterministic stand-in teacher: mean colour of each grid cell, repeated to `feature_dim`."""

    feature_dim = 24
    name = "grid-colour"

    def forward(self, images):
        cells = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(2).transpose(1, 2)  # (B,16,3)
        return cells.repeat(1, 1, 8)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).eval()
    processor = EvoTokImageProcessor(size={"height": 32, "width": 32})
    g = torch.Generator().manual_seed(3)
    images = torch.rand(20, 3, 32, 32, generator=g) * 2 - 1
    return model, processor, images


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_report_matches_independent_computations(setup, tmp_path):
    model, processor, images = setup
    report = evaluate_reconstruction(
        model, images, processor, metrics=("psnr", "ssim", "rfid", "semantic", "usage"), batch_size=7,
        feature_network=PixelFeatures(), teacher=GridTeacher(), progress=False, dataset_name="random-noise",
        split="test",
    )
    assert report.num_images == 20 and report.pixel_depths == [1, 2] and report.semantic_depths == [1, 2, 3, 4]
    assert report.feature_network == "test-pixel-projection"
    with torch.no_grad():
        codes = model.encode(images).codes
        features = PixelFeatures()
        for k in (1, 2):
            recon = model.decode(codes[..., :k]).clamp(-1, 1).double().numpy()
            a, b = (recon + 1) / 2, (images.double().numpy() + 1) / 2
            mse = ((a - b) ** 2).reshape(20, -1).mean(1)
            assert report.psnr[k] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), abs=1e-4)
            fid = numpy_fid(features(images).double().numpy(), features(torch.from_numpy(recon).float()).double().numpy())
            assert report.rfid[k] == pytest.approx(fid, rel=1e-3)
        target = GridTeacher()(images)
        for k in range(1, 5):
            pred = model.get_semantic_features(codes[..., :k])
            cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean()
            assert report.semantic_cosine[k] == pytest.approx(float(cos), abs=1e-5)
    for d in range(4):
        counts = np.bincount(codes[..., d].flatten().numpy(), minlength=64).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        assert report.codebook_usage[d] == pytest.approx((counts > 0).mean())
        assert report.perplexity[d] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)
    # outputs: JSON round trip, markdown table, plot
    data = json.loads(pathlib.Path(report.save_json(str(tmp_path / "r.json"))).read_text())
    assert data["psnr"]["1"] == pytest.approx(report.psnr[1])
    assert data["dataset"] == "random-noise" and data["split"] == "test"  # what a model card cites
    table = report.to_markdown()
    assert "| depth k | PSNR (dB) | SSIM | rFID |" in table and "test-pixel-projection" in table
    assert "20 images of random-noise (test split)" in table
    assert pathlib.Path(report.plot(str(tmp_path / "p.png"))).stat().st_size > 10_000


def test_ssim_matches_skimage_through_the_report(setup):
    from skimage.metrics import structural_similarity

    model, processor, images = setup
    report = evaluate_reconstruction(model, images, processor, metrics=("ssim",), progress=False)
    with torch.no_grad():
        recon = model.decode(model.encode(images).codes[..., :2]).clamp(-1, 1)
    # the usual SSIM: images on the [0, 1] scale
    expected = np.mean([
        structural_similarity((r + 1) / 2, (t + 1) / 2, channel_axis=0, data_range=1.0, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
        for r, t in zip(recon.double().numpy(), images.double().numpy())
    ])
    assert report.ssim[2] == pytest.approx(expected, abs=1e-4)


def test_streams_a_datasets_dataset_with_max_images(setup):
    from evotok_hf.bundled_photos import bundled_photo_dataset

    model, processor, _ = setup
    dataset = bundled_photo_dataset("validation")
    report = evaluate_reconstruction(model, dataset.to_iterable_dataset(), processor, metrics=("psnr", "usage"),
                                     batch_size=4, max_images=10, progress=False)
    assert report.num_images == 10 and set(report.psnr) == {1, 2}


def test_bad_arguments(setup):
    model, processor, images = setup
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate_reconstruction(model, images, processor, metrics=("psnr", "fidelity"), progress=False)
    with pytest.raises(ValueError, match=r"pixel depths must lie in 1..2"):
        evaluate_reconstruction(model, images, processor, depths=[3], metrics=("psnr",), progress=False)
    with pytest.raises(ValueError, match="needs a teacher"):
        evaluate_reconstruction(model, images, processor, metrics=("semantic",), progress=False)
    with pytest.raises(ValueError, match="no image"):
        evaluate_reconstruction(model, images[:0], processor, metrics=("psnr",), progress=False)
    with pytest.raises(ValueError, match="dataset_name must be a non-empty string"):
        evaluate_reconstruction(model, images, processor, metrics=("psnr",), progress=False, dataset_name="")


def test_evaluation_script_offline_on_bundled_photos(tmp_path):
    torch.manual_seed(0)
    model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny", teacher_dim=1280))
    model.save_pretrained(tmp_path / "model")
    EvoTokImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    main = runpy.run_path(str(ROOT / "scripts" / "evaluate_reconstruction.py"), run_name="not_main")["main"]
    out = main(["--model", str(tmp_path / "model"), "--dataset", "bundled", "--feature-network", "efficientnet-lite0",
                "--teacher", "efficientnet-lite0", "--output-dir", str(tmp_path / "eval"), "--no-progress",
                "--num-clusters", "3"])
    for key in ("report", "plot", "table", "kmeans_grid", "probe"):
        assert pathlib.Path(out["outputs"][key]).exists(), key
    data = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert data["num_images"] == 15 and "efficientnet-lite0" in data["feature_network"]
    assert data["dataset"] == "bundled" and data["split"] == "validation"
    probe = json.loads((tmp_path / "eval" / "probe.json").read_text())["by_depth"]
    assert set(probe) == {"1", "2", "4"}
