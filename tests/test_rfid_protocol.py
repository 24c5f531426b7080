"""rFID by the paper's protocol: the ADM centre crop, the saved PNGs, the FID formula against closed forms and scipy,
and the FID Inception fed as torch-fidelity, pytorch-fid and clean-fid feed it (locally built networks stand in for
the downloaded Inception; the libraries themselves are faked where their loading is checked)."""

import json
import pathlib
import runpy
import sys
import types
from typing import ClassVar

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from evotok_hf import EvoTokConfig, EvoTokImageProcessor, EvoTokModel
from evotok_hf.bundled_photos import load_bundled_photos
from evotok_hf.evaluation import evaluate_reconstruction
from evotok_hf.evaluation.metrics import FeatureStatistics, fid_from_statistics, frechet_distance
from evotok_hf.evaluation.reconstruction import adm_center_crop
from evotok_hf.frozen_networks import (
    FID_IMPLEMENTATIONS,
    CleanFIDInceptionFeatures,
    InceptionV3Features,
    PytorchFIDInceptionFeatures,
    build_feature_network,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32  # the evotok-tiny tokenizer's input


# --- the Fréchet distance --------------------------------------------------------------------------------------------

def _random_covariance(dim, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_of_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) + 3.0)
    real, fake = FeatureStatistics(), FeatureStatistics()
    real.update(features)
    fake.update(features[:250])
    fake.update(features[250:])
    assert fid_from_statistics(real, fake) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    # Diagonal covariances commute: the distance is |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.2, 3.0, 24), rng.uniform(0.2, 3.0, 24)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # A scaled covariance, sigma2 = c^2 sigma1: tr(sigma1 + c^2 sigma1 - 2 c sigma1) = (1 - c)^2 tr(sigma1).
    sigma = _random_covariance(24, seed=2)
    closed = ((mu1 - mu2) ** 2).sum() + (1 - 1.7) ** 2 * np.trace(sigma)
    assert frechet_distance(mu1, sigma, mu2, 1.7**2 * sigma) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=48), rng.normal(size=48)
    sigma1, sigma2 = _random_covariance(48, seed=4), _random_covariance(48, seed=5)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-9)


# --- the ADM centre crop ---------------------------------------------------------------------------------------------

def _adm_reference(image: PIL.Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's recipe, step by step on arrays: box-halve while the short side is >= 2 size, bicubic to
    a short side of `size`, then slice the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), PIL.Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def _photos():
    """Sizes that take each branch: halved once then cropped sideways, upscaled then cropped vertically, odd sizes
    with a rounded long side, a grey photo (converted to RGB), and exactly square."""
    photos = load_bundled_photos(["astronaut", "chelsea", "coffee", "camera"])
    return [
        photos["astronaut"].resize((150, 100), PIL.Image.BICUBIC),
        photos["chelsea"].resize((40, 90), PIL.Image.BICUBIC),
        photos["coffee"].resize((45, 33), PIL.Image.BICUBIC),
        photos["camera"].resize((70, 66), PIL.Image.BICUBIC),
        photos["astronaut"].resize((SIZE, SIZE), PIL.Image.BICUBIC),
    ]


def test_adm_center_crop_matches_the_guided_diffusion_recipe():
    for image in _photos():
        rgb = image.convert("RGB")
        crop = adm_center_crop(rgb, SIZE)
        assert crop.size == (SIZE, SIZE) and crop.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(crop), _adm_reference(rgb, SIZE))
    with pytest.raises(ValueError, match="positive integer"):
        adm_center_crop(_photos()[0], 0)


# --- FID networks fed as each library feeds them ---------------------------------------------------------------------

class RecordingNetwork(nn.Module):
    """A locally built stand-in for the FID Inception: a fixed random projection of 4x4-pooled inputs (uint8 or float,
    any size) to `num_features`; it keeps every input it saw."""

    num_features = 8

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(3 * 4 * 4, self.num_features, generator=g))
        self.inputs = []

    def forward(self, images):
        self.inputs.append(images.clone())
        return F.adaptive_avg_pool2d(images.float(), 4).flatten(1) @ self.weight


def _implementations():
    return [InceptionV3Features(RecordingNetwork(0)), PytorchFIDInceptionFeatures(RecordingNetwork(1)),
            CleanFIDInceptionFeatures(RecordingNetwork(2))]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    torch.manual_seed(0)
    return EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).eval(), EvoTokImageProcessor(
        size={"height": SIZE, "width": SIZE})


@pytest.fixture(scope="module")
def protocol_run(tiny_tokenizer, tmp_path_factory):
    model, processor = tiny_tokenizer
    folder = tmp_path_factory.mktemp("rfid") / "images"
    networks = _implementations()
    report = evaluate_reconstruction(model, _photos(), processor, metrics=("psnr", "rfid"), batch_size=2,
                                     feature_network=networks, progress=False, center_crop="adm",
                                     save_images=folder)  # fmt: skip
    return report, networks, folder


def _load_folder(folder) -> torch.Tensor:
    """uint8 (N, 3, H, W) from the PNG files of a folder, in name order (as the FID tools read folders)."""
    files = sorted(pathlib.Path(folder).glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(PIL.Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def test_saved_pngs_are_the_adm_crops_and_their_reconstructions(protocol_run, tiny_tokenizer):
    report, _, folder = protocol_run
    model, _ = tiny_tokenizer
    originals = _load_folder(folder / "originals")
    assert sorted(p.name for p in (folder / "originals").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    expected = np.stack([_adm_reference(image.convert("RGB"), SIZE) for image in _photos()])
    np.testing.assert_array_equal(originals.permute(0, 2, 3, 1).numpy(), expected)
    assert report.preprocessing == f"ADM centre crop to {SIZE}x{SIZE}" and report.saved_images == str(folder)
    with torch.no_grad():
        codes = model.encode(originals.float() / 127.5 - 1).codes
    for k in (1, 2):
        saved = _load_folder(folder / "reconstructions" / f"depth_{k}")
        assert saved.shape == (5, 3, SIZE, SIZE)
        with torch.no_grad():
            decoded = ((model.decode(codes[..., :k]).clamp(-1, 1) + 1) * 127.5).round()
        assert (saved.float() - decoded).abs().max() <= 1  # batch composition may move a value across .5


def test_each_network_gets_the_saved_pixels_as_its_library_would(protocol_run):
    _, (fidelity, pytorch_fid, clean_fid), folder = protocol_run
    originals = _load_folder(folder / "originals")
    # torch-fidelity's network takes the uint8 pixels and resizes them itself. Each batch (2, 2, 1 images) calls
    # the networks on the originals, then on the depth-1 and depth-2 reconstructions.
    seen = torch.cat([fidelity.network.inputs[i] for i in (0, 3, 6)])
    assert seen.dtype == torch.uint8
    np.testing.assert_array_equal(seen.numpy(), originals.numpy())
    # pytorch-fid: ToTensor's [0, 1], then torch bilinear to 299 (align_corners=False).
    first = pytorch_fid.network.inputs[0]
    expected = F.interpolate(originals[:2].float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    # clean-fid: each channel a float32 PIL image, bicubic to 299, clipped to 0..255.
    first = clean_fid.network.inputs[0]
    expected = np.stack([
        np.stack([np.asarray(PIL.Image.fromarray(np.asarray(channel, dtype=np.float32))
                             .resize((299, 299), PIL.Image.BICUBIC)) for channel in image]).clip(0, 255)
        for image in originals[:2].numpy()
    ])
    np.testing.assert_array_equal(first.numpy(), expected)
    assert first.dtype == torch.float32 and first.shape == (2, 3, 299, 299)


def test_rfid_equals_the_fid_of_the_saved_folders(protocol_run):
    report, networks, folder = protocol_run
    originals = _load_folder(folder / "originals").float() / 127.5 - 1
    for network in networks:
        label = network.implementation
        for k in (1, 2):
            reconstructions = _load_folder(folder / "reconstructions" / f"depth_{k}").float() / 127.5 - 1
            real, fake = FeatureStatistics(), FeatureStatistics()
            real.update(network(originals))
            fake.update(network(reconstructions))
            assert report.rfid_by_implementation[label][k] == pytest.approx(fid_from_statistics(real, fake),
                                                                            rel=1e-6, abs=1e-9)


def test_the_report_names_each_implementation_and_its_resize(protocol_run, tmp_path):
    report, _, _ = protocol_run
    assert report.fid_implementation == "torch-fidelity"
    assert list(report.rfid_by_implementation) == ["torch-fidelity", "pytorch-fid", "clean-fid"]
    assert report.rfid == report.rfid_by_implementation["torch-fidelity"]
    assert "TensorFlow 1.x" in report.fid_resizes["torch-fidelity"]
    assert "align_corners=False" in report.fid_resizes["pytorch-fid"]
    assert "PIL bicubic" in report.fid_resizes["clean-fid"]
    table = report.to_markdown()
    assert "| depth k | PSNR (dB) | rFID | rFID (pytorch-fid) | rFID (clean-fid) |" in table
    for label in FID_IMPLEMENTATIONS:
        assert f"rFID as {label} computes it; images rounded to uint8" in table
    assert "ADM centre crop to 32x32" in table
    saved = json.loads(pathlib.Path(report.save_json(str(tmp_path / "r.json"))).read_text())
    assert saved["fid_implementation"] == "torch-fidelity" and set(saved["rfid_by_implementation"]) == set(
        FID_IMPLEMENTATIONS)
    with pytest.raises(ValueError, match="given twice"):
        evaluate_reconstruction(EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")), torch.zeros(2, 3, SIZE, SIZE),
                                EvoTokImageProcessor(size={"height": SIZE, "width": SIZE}), metrics=("rfid",),
                                feature_network=[InceptionV3Features(RecordingNetwork()),
                                                 InceptionV3Features(RecordingNetwork())], progress=False)


# --- loading the real networks: lazy, from the libraries, with their resize off where we do it -----------------------

def test_constructors_load_nothing_and_missing_libraries_name_the_extra(monkeypatch):
    for module in ("pytorch_fid", "pytorch_fid.inception", "cleanfid", "cleanfid.inception_torchscript"):
        monkeypatch.setitem(sys.modules, module, None)  # importing them raises ImportError
    for cls in (PytorchFIDInceptionFeatures, CleanFIDInceptionFeatures):
        assert cls(RecordingNetwork()).num_features == 8  # wraps a local network without importing the library
        with pytest.raises(ImportError, match=r'pip install "evotok_hf\[online\]"'):
            cls.from_pretrained()
        with pytest.raises(ValueError, match="from_pretrained"):
            cls("weights.pth")
    with pytest.raises(ImportError, match="pytorch-fid"):
        build_feature_network("pytorch-fid")


def test_from_pretrained_builds_each_librarys_network(monkeypatch, tmp_path):
    import torchmetrics.image.fid

    built = {}

    class FakeNoTrainInceptionV3(RecordingNetwork):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, antialias=True):
            super().__init__()
            built["torch-fidelity"] = (name, features_list, antialias)

    class FakePytorchFIDInception(nn.Module):
        BLOCK_INDEX_BY_DIM: ClassVar[dict[int, int]] = {64: 0, 192: 1, 768: 2, 2048: 3}

        def __init__(self, output_blocks, resize_input=True, normalize_input=True):
            super().__init__()
            built["pytorch-fid"] = (output_blocks, resize_input, normalize_input)

        def forward(self, x):
            return [x.mean(dim=(2, 3), keepdim=True).repeat(1, 2048 // 3 + 1, 1, 1)[:, :2048]]

    class FakeInceptionV3W(nn.Module):
        def __init__(self, path, download=True, resize_inside=False):
            super().__init__()
            built["clean-fid"] = (path, download, resize_inside)

        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", FakeNoTrainInceptionV3)
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception",
                        types.SimpleNamespace(InceptionV3=FakePytorchFIDInception))
    monkeypatch.setitem(sys.modules, "cleanfid", types.ModuleType("cleanfid"))
    monkeypatch.setitem(sys.modules, "cleanfid.inception_torchscript",
                        types.SimpleNamespace(InceptionV3W=FakeInceptionV3W))
    images = torch.rand(2, 3, 20, 24) * 2 - 1
    for name in FID_IMPLEMENTATIONS:
        network = build_feature_network(name)
        assert network.implementation == name
        if name != "torch-fidelity":
            assert network(images).shape == (2, 2048)
    # torch-fidelity's own TF1 bilinear resize, not torchmetrics' antialiased default
    assert built["torch-fidelity"] == ("inception-v3-compat", ["2048"], False)
    assert built["pytorch-fid"] == ([3], False, True)  # the resize is ours, the [0, 1] -> [-1, 1] theirs
    assert built["clean-fid"] == ("/tmp", True, False)
    CleanFIDInceptionFeatures.from_pretrained(tmp_path)
    assert built["clean-fid"] == (str(tmp_path), True, False)


# --- the script ------------------------------------------------------------------------------------------------------

def test_evaluation_script_saves_adm_crops_and_checks_its_fid_options(tmp_path):
    torch.manual_seed(0)
    model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny", teacher_dim=1280))
    model.save_pretrained(tmp_path / "model")
    EvoTokImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(tmp_path / "model")
    main = runpy.run_path(str(ROOT / "scripts" / "evaluate_reconstruction.py"), run_name="not_main")["main"]
    common = ["--model", str(tmp_path / "model"), "--dataset", "bundled", "--no-progress", "--probe", "none",
              "--analysis-images", "4", "--kmeans-depths", "1", "--num-clusters", "2", "--max-images", "3"]
    out = main(common + ["--metrics", "psnr", "--center-crop", "adm", "--save-images", str(tmp_path / "images"),
                         "--output-dir", str(tmp_path / "eval")])
    data = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert data["preprocessing"] == f"ADM centre crop to {SIZE}x{SIZE}" and out["outputs"]["images"]
    assert len(list((tmp_path / "images" / "originals").glob("*.png"))) == 3
    assert {p.name for p in (tmp_path / "images" / "reconstructions").iterdir()} == {"depth_1", "depth_2"}
    with pytest.raises(SystemExit):
        main(common + ["--fid-implementation", "tensorflow", "--output-dir", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="inception only"):
        main(common + ["--feature-network", "efficientnet-lite0", "--fid-implementation", "clean-fid",
                       "--output-dir", str(tmp_path / "bad")])
