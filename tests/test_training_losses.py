"""Tokenizer training objective: losses, adaptive GAN weight, schedule, PatchGAN, semantic teachers.

Every loss is compared with an independent float64 numpy computation or an explicit loop, never with the code
under test; the EfficientNet-Lite0 teacher is checked with its real ImageNet weights on real photos.
"""

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from evotok_hf import EvoTokConfig, EvoTokModel
from evotok_hf.frozen_networks import (
    EfficientNetLite0Teacher,
    SemanticTeacher,
    SiglipTeacher,
    build_perceptual_loss,
    build_teacher,
)
from evotok_hf.training.discriminator import PatchGANDiscriminator, PatchGANDiscriminatorConfig
from evotok_hf.training.losses import (
    EvoTokLoss,
    EvoTokLossConfig,
    adaptive_gan_weight,
    check_finite,
    gan_weight_at,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    reconstruction_loss,
    semantic_cosine_loss,
)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _np(t):
    return t.detach().double().numpy()


def _softplus(x):
    return np.logaddexp(0.0, x)


# ----------------------------------------------------------------------------- elementary losses
def test_reconstruction_losses_match_numpy():
    a, b = _randn(2, 3, 8, 8, seed=1), _randn(2, 3, 8, 8, seed=2)
    np.testing.assert_allclose(reconstruction_loss(a, b, "l2").item(), np.mean((_np(a) - _np(b)) ** 2), rtol=1e-6)
    np.testing.assert_allclose(reconstruction_loss(a, b, "l1").item(), np.mean(np.abs(_np(a) - _np(b))), rtol=1e-6)
    assert reconstruction_loss(a, b).item() == pytest.approx(np.mean((_np(a) - _np(b)) ** 2), rel=1e-6)
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        reconstruction_loss(a, b, "huber")
    with pytest.raises(ValueError, match="differ"):
        reconstruction_loss(a, b[:1])


def test_adversarial_losses_match_numpy():
    real, fake = _randn(4, 1, 6, 6, seed=3, scale=2.0), _randn(4, 1, 6, 6, seed=4, scale=2.0)
    r, f = _np(real), _np(fake)
    hinge_d = 0.5 * (np.mean(np.maximum(0.0, 1.0 - r)) + np.mean(np.maximum(0.0, 1.0 + f)))
    # BCE with logits: real labelled 1 -> -log(sigmoid(r)) = softplus(-r); fake labelled 0 -> softplus(f)
    ns_d = 0.5 * (np.mean(_softplus(-r)) + np.mean(_softplus(f)))
    np.testing.assert_allclose(hinge_d_loss(real, fake).item(), hinge_d, rtol=1e-6)
    np.testing.assert_allclose(non_saturating_d_loss(real, fake).item(), ns_d, rtol=1e-6)
    np.testing.assert_allclose(hinge_g_loss(fake).item(), -np.mean(f), rtol=1e-6)
    np.testing.assert_allclose(non_saturating_g_loss(fake).item(), np.mean(_softplus(-f)), rtol=1e-6)
    # a discriminator that is confidently right has a small NS loss; the authors' swapped-argument version
    # would not behave like a classification loss here
    confident = torch.full((2, 1, 3, 3), 10.0)
    assert non_saturating_d_loss(confident, -confident).item() < 1e-4


def _cosine_loss_loop(prediction, target, fold):
    p, t = _np(prediction), _np(target)
    batch, positions, dim = p.shape
    chunk = dim // fold
    values = []
    for b in range(batch):
        for n in range(positions):
            for k in range(fold):
                u, v = p[b, n, k * chunk:(k + 1) * chunk], t[b, n, k * chunk:(k + 1) * chunk]
                values.append(1.0 - float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v))))
    return float(np.mean(values))


@pytest.mark.parametrize("fold", [1, 2, 4])
def test_semantic_cosine_loss_matches_a_loop(fold):
    prediction, target = _randn(2, 5, 12, seed=5), _randn(2, 5, 12, seed=6)
    expected = _cosine_loss_loop(prediction, target, fold)
    np.testing.assert_allclose(semantic_cosine_loss(prediction, target, fold=fold).item(), expected, rtol=1e-5)
    # computed in fp32 even for bf16 inputs
    assert semantic_cosine_loss(prediction.bfloat16(), target.bfloat16(), fold=fold).dtype == torch.float32


def test_semantic_cosine_loss_validates():
    with pytest.raises(ValueError, match="not divisible"):
        semantic_cosine_loss(_randn(1, 2, 10), _randn(1, 2, 10), fold=4)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        semantic_cosine_loss(_randn(1, 2, 8), _randn(1, 3, 8))
    assert semantic_cosine_loss(torch.ones(1, 2, 8), torch.ones(1, 2, 8), fold=4).item() == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- adaptive weight and schedule
def _tiny_generator(seed=0):
    torch.manual_seed(seed)
    body, last = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
    return body, last


def _two_losses(body, last, x, target):
    out = last(torch.tanh(body(x)))
    nll = ((out - target) ** 2).mean()
    g = -(out * torch.linspace(-1, 1, out.shape[-1])).mean() ** 2 - 0.1 * out.mean()
    return nll, g


def test_adaptive_gan_weight_matches_separate_gradients():
    body, last = _tiny_generator()
    x, target = _randn(2, 3, 6, 6, seed=7), _randn(2, 3, 6, 6, seed=8)
    # reference: each gradient from its own forward pass
    nll_ref, _ = _two_losses(body, last, x, target)
    (grad_nll,) = torch.autograd.grad(nll_ref, last.weight)
    _, g_ref = _two_losses(body, last, x, target)
    (grad_g,) = torch.autograd.grad(g_ref, last.weight)
    expected = np.linalg.norm(_np(grad_nll)) / (np.linalg.norm(_np(grad_g)) + 1e-4)

    nll, g = _two_losses(body, last, x, target)
    weight = adaptive_gan_weight(nll, g, last.weight)
    np.testing.assert_allclose(weight.item(), expected, rtol=1e-5)
    assert not weight.requires_grad
    (nll + weight * g).backward()  # the graph was retained for the caller
    assert last.weight.grad is not None

    nll, g = _two_losses(body, last, x, target)
    assert adaptive_gan_weight(nll, g, last.weight, max_weight=expected / 2).item() == pytest.approx(expected / 2)
    # a generator loss with no gradient at the last layer: ||grad nll|| / eps, clamped to max_weight
    nll, g = _two_losses(body, last, x, target)
    assert adaptive_gan_weight(nll, 0.0 * g, last.weight, max_weight=7.0).item() == pytest.approx(7.0)
    with pytest.raises(ValueError, match="autograd"):
        with torch.no_grad():
            nll, g = _two_losses(body, last, x, target)
        adaptive_gan_weight(nll, g, last.weight)


def test_gan_weight_schedule():
    assert gan_weight_at(0, 100, 0.5) == 0.0
    assert gan_weight_at(99, 100, 0.5) == 0.0
    assert gan_weight_at(100, 100, 0.5) == 0.5
    assert gan_weight_at(10_000, 100, 0.5) == 0.5
    assert gan_weight_at(0, 0, 0.25) == 0.25


# ----------------------------------------------------------------------------- EvoTokLoss
class MeanAbsPerImage(nn.Module):
    """A stand-in perceptual network: per-image mean absolute difference; counts its calls."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.dropout = nn.Dropout(0.5)
        self.calls = 0

    def forward(self, reconstruction, target):
        self.calls += 1
        return self.scale * (reconstruction - target).abs().mean(dim=(1, 2, 3))


def _fake_output(seed=0, batch=2, size=16, grid=4, dim=8):
    reconstruction = _randn(batch, 3, size, size, seed=seed).tanh().requires_grad_()
    semantic = _randn(batch, grid * grid, dim, seed=seed + 1).requires_grad_()
    commitment = (_randn(4, seed=seed + 2) ** 2).mean().requires_grad_()
    return SimpleNamespace(reconstruction=reconstruction, semantic_features=semantic, commitment_loss=commitment)


def _weighted_sum(cfg, t):
    return (cfg.reconstruction_weight * t["reconstruction"] + cfg.perceptual_weight * t["perceptual"]
            + t["adaptive_weight"] * t["gan_weight"] * t["generator_adversarial"]
            + cfg.commitment_weight * t["commitment"]
            + cfg.semantic_weight * (t["semantic_cosine"] + t["semantic_fold"]))


EXPECTED_TERMS = {"reconstruction", "perceptual", "generator_adversarial", "adaptive_weight", "gan_weight",
                  "commitment", "semantic_cosine", "semantic_fold", "total"}


def test_generator_loss_is_the_weighted_sum_of_its_terms():
    cfg = EvoTokLossConfig(reconstruction_weight=1.5, perceptual_weight=0.7, disc_weight=0.3, disc_start=10,
                           semantic_weight=0.9, semantic_fold=2, commitment_weight=0.4, gen_loss="non-saturating")
    perceptual = MeanAbsPerImage()
    loss_fn = EvoTokLoss(cfg, perceptual=perceptual)
    out = _fake_output()
    pixels = _randn(2, 3, 16, 16, seed=9).clamp(-1, 1)
    teacher = _randn(2, 16, 8, seed=10)
    logits_fake = _randn(2, 1, 2, 2, seed=11)
    total, terms = loss_fn.generator_loss(out, pixels, teacher, logits_fake, step=10)
    assert set(terms) == EXPECTED_TERMS
    assert all(not v.requires_grad and v.ndim == 0 for v in terms.values())
    torch.testing.assert_close(total.detach(), _weighted_sum(cfg, terms))
    # each term against an independent computation
    r, x = _np(out.reconstruction), _np(pixels)
    assert terms["reconstruction"].item() == pytest.approx(np.mean((r - x) ** 2), rel=1e-5)
    assert terms["perceptual"].item() == pytest.approx(2.0 * np.mean(np.abs(r - x)), rel=1e-5)
    assert perceptual.calls == 1
    assert terms["generator_adversarial"].item() == pytest.approx(np.mean(_softplus(-_np(logits_fake))), rel=1e-5)
    assert terms["gan_weight"].item() == pytest.approx(0.3) and terms["adaptive_weight"].item() == 1.0
    assert terms["semantic_cosine"].item() == pytest.approx(_cosine_loss_loop(out.semantic_features, teacher, 1),
                                                            rel=1e-5)
    assert terms["semantic_fold"].item() == pytest.approx(_cosine_loss_loop(out.semantic_features, teacher, 2),
                                                          rel=1e-5)
    total.backward()
    assert out.reconstruction.grad is not None and out.semantic_features.grad is not None
    assert perceptual.scale.grad is None and not perceptual.training  # frozen, eval


def test_generator_loss_before_disc_start_needs_no_discriminator():
    cfg = EvoTokLossConfig(disc_start=100, perceptual_weight=0.0, semantic_fold=0)
    loss_fn = EvoTokLoss(cfg)
    out = _fake_output()
    pixels, teacher = _randn(2, 3, 16, 16, seed=12), _randn(2, 16, 8, seed=13)
    total, terms = loss_fn.generator_loss(out, pixels, teacher, None, step=99)
    assert terms["gan_weight"].item() == 0.0 and terms["generator_adversarial"].item() == 0.0
    assert terms["semantic_fold"].item() == 0.0 and terms["perceptual"].item() == 0.0
    torch.testing.assert_close(total.detach(), _weighted_sum(cfg, terms))
    with pytest.raises(ValueError, match="logits_fake is required"):
        loss_fn.generator_loss(out, pixels, teacher, None, step=100)
    # without a semantic weight the teacher may be absent
    no_sem = EvoTokLoss(EvoTokLossConfig(semantic_weight=0.0, perceptual_weight=0.0))
    _, terms = no_sem.generator_loss(out, pixels, None, None, step=0)
    assert terms["semantic_cosine"].item() == 0.0
    with pytest.raises(ValueError, match="teacher_features is None"):
        loss_fn.generator_loss(out, pixels, None, None, step=0)
    with pytest.raises(ValueError, match="teacher_dim"):
        loss_fn.generator_loss(out, pixels, _randn(2, 16, 6), None, step=0)


def test_perceptual_weight_zero_skips_the_network():
    perceptual = MeanAbsPerImage()
    loss_fn = EvoTokLoss(EvoTokLossConfig(perceptual_weight=0.0), perceptual=perceptual)
    _, terms = loss_fn.generator_loss(_fake_output(), _randn(2, 3, 16, 16), _randn(2, 16, 8), None, step=0)
    assert perceptual.calls == 0 and terms["perceptual"].item() == 0.0
    loss_fn.train()
    assert loss_fn.training and not perceptual.training


def test_generator_loss_adaptive_weight_on_a_real_tiny_model():
    torch.manual_seed(0)
    config = EvoTokConfig.from_preset("evotok-tiny")
    model = EvoTokModel(config).train()
    disc = PatchGANDiscriminator(PatchGANDiscriminatorConfig(base_channels=8, num_layers=2, norm="group"))
    cfg = EvoTokLossConfig(disc_start=0, disc_adaptive_weight=True, perceptual_weight=0.5)
    loss_fn = EvoTokLoss(cfg, perceptual=MeanAbsPerImage())
    pixels = _randn(2, 3, config.image_size, config.image_size, seed=14).clamp(-1, 1)
    teacher = _randn(2, config.grid_size**2, config.teacher_dim, seed=15)
    output = model(pixels)
    last_layer = model.pixel_decoder.last_layer
    total, terms = loss_fn.generator_loss(output, pixels, teacher, disc(output.reconstruction), step=0,
                                          last_layer=last_layer)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(output, pixels, teacher, disc(output.reconstruction), step=0)
    # reference: the two gradients at the decoder's last conv, taken one by one
    nll = cfg.reconstruction_weight * reconstruction_loss(output.reconstruction, pixels) + \
        cfg.perceptual_weight * loss_fn.perceptual(output.reconstruction, pixels).mean()
    (grad_nll,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (grad_g,) = torch.autograd.grad(hinge_g_loss(disc(output.reconstruction)), last_layer, retain_graph=True)
    expected = np.linalg.norm(_np(grad_nll)) / (np.linalg.norm(_np(grad_g)) + 1e-4)
    assert terms["adaptive_weight"].item() == pytest.approx(min(expected, 1e4), rel=1e-4)
    torch.testing.assert_close(total.detach(), _weighted_sum(cfg, terms))
    total.backward()
    assert model.pixel_decoder.last_layer.grad is not None


def test_discriminator_loss_schedule_and_terms():
    loss_fn = EvoTokLoss(EvoTokLossConfig(disc_start=5, disc_weight=0.5, disc_loss="hinge", perceptual_weight=0))
    real, fake = _randn(2, 1, 3, 3, seed=16), _randn(2, 1, 3, 3, seed=17)
    loss, terms = loss_fn.discriminator_loss(real, fake, step=4)
    assert loss.item() == 0.0 and set(terms) == {"discriminator", "logits_real", "logits_fake"}
    loss, terms = loss_fn.discriminator_loss(real, fake, step=5)
    r, f = _np(real), _np(fake)
    expected = 0.5 * 0.5 * (np.mean(np.maximum(0, 1 - r)) + np.mean(np.maximum(0, 1 + f)))
    assert loss.item() == pytest.approx(expected, rel=1e-6) and terms["discriminator"].item() == loss.item()
    assert terms["logits_real"].item() == pytest.approx(np.mean(r), rel=1e-6)
    assert terms["logits_fake"].item() == pytest.approx(np.mean(f), rel=1e-6)


@pytest.mark.parametrize(
    "field, value",
    [("reconstruction_loss", "l3"), ("perceptual_weight", -1.0), ("disc_weight", float("nan")),
     ("disc_start", -1), ("disc_loss", "wasserstein"), ("gen_loss", "vanilla"), ("semantic_fold", 1.5),
     ("commitment_weight", "1"), ("disc_adaptive_weight", 1)],
)
def test_loss_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EvoTokLossConfig(**{field: value})


def test_check_finite_names_term_and_step():
    check_finite({"a": torch.tensor(1.0), "b": 2.0}, step=3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7: perceptual=nan"):
        check_finite({"reconstruction": torch.tensor(0.5), "perceptual": torch.tensor(float("nan")),
                      "total": torch.tensor(float("inf"))}, step=7)
    with pytest.raises(FloatingPointError, match="total=inf"):
        check_finite({"total": float("inf")}, step=0)


def test_build_perceptual_loss(monkeypatch):
    assert build_perceptual_loss(None) is None and build_perceptual_loss("none") is None
    module = MeanAbsPerImage().train()
    built = build_perceptual_loss(module)
    assert built is module and not built.training and not any(p.requires_grad for p in built.parameters())
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` fail as if it were not installed
    with pytest.raises(ImportError, match=r"evotok_hf\[online\]"):
        build_perceptual_loss("lpips-vgg")
    with pytest.raises(ValueError, match="unknown perceptual"):
        build_perceptual_loss("lpips-alex")


# ----------------------------------------------------------------------------- PatchGAN
def _patchgan_parameter_count(in_ch, base, layers, norm_params_per_channel=2):
    widths = [base * min(2**k, 8) for k in range(layers + 1)]
    count = in_ch * base * 16 + base  # first conv, with bias, no norm
    for k in range(1, layers + 1):
        count += widths[k - 1] * widths[k] * 16 + norm_params_per_channel * widths[k]  # no bias, norm
    return count + widths[layers] * 16 + 1  # last conv to one channel, with bias


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("size, out", [(32, 2), (64, 6)])
def test_patchgan_shapes_and_parameter_count(norm, size, out):
    disc = PatchGANDiscriminator(PatchGANDiscriminatorConfig(in_channels=3, base_channels=8, num_layers=3, norm=norm))
    logits = disc(_randn(2, 3, size, size))
    assert logits.shape == (2, 1, out, out)
    assert sum(p.numel() for p in disc.parameters()) == _patchgan_parameter_count(3, 8, 3)
    norms = [m for m in disc.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert len(norms) == 3 and all(isinstance(m, nn.BatchNorm2d if norm == "batch" else nn.GroupNorm) for m in norms)


def test_patchgan_default_matches_the_taming_layout():
    disc = PatchGANDiscriminator(PatchGANDiscriminatorConfig())
    # 2,765,633 parameters, as the authors' NLayerDiscriminator(ndf=64, n_layers=3) (counted once from their code)
    assert sum(p.numel() for p in disc.parameters()) == _patchgan_parameter_count(3, 64, 3) == 2_765_633
    # the authors' state-dict names, so official discriminator weights load as they are
    expected = {"main.0.weight", "main.0.bias", "main.11.weight", "main.11.bias"}
    for i in (2, 5, 8):
        expected.add(f"main.{i}.weight")
    for i in (3, 6, 9):
        expected |= {f"main.{i}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(disc.state_dict()) == expected
    assert disc(_randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    conv_weights = torch.cat([disc.main[i].weight.flatten() for i in (2, 5, 8)])
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.05) and abs(conv_weights.mean().item()) < 1e-3
    bn_weights = torch.cat([disc.main[i].weight for i in (3, 6, 9)])
    assert bn_weights.mean().item() == pytest.approx(1.0, abs=0.01)


def test_patchgan_validates():
    with pytest.raises(ValueError, match="norm"):
        PatchGANDiscriminatorConfig(norm="instance")
    with pytest.raises(ValueError, match="base_channels"):
        PatchGANDiscriminatorConfig(base_channels=0)
    small = PatchGANDiscriminator(PatchGANDiscriminatorConfig(base_channels=4))
    with pytest.raises(ValueError, match="at least 24x24"):
        small(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        small(torch.zeros(1, 1, 32, 32))
    # group norm trains with a single image
    group = PatchGANDiscriminator(PatchGANDiscriminatorConfig(base_channels=4, norm="group"))
    group.train()(torch.zeros(1, 3, 24, 24)).sum().backward()


def test_patchgan_saves_and_loads_as_a_pretrained_model(tmp_path):
    disc = PatchGANDiscriminator(PatchGANDiscriminatorConfig(base_channels=8, num_layers=2, norm="batch"))
    disc.train()(_randn(2, 3, 32, 32))  # moves the BatchNorm running statistics away from their initial values
    disc.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = PatchGANDiscriminator.from_pretrained(tmp_path)
    assert (loaded.config.base_channels, loaded.config.num_layers, loaded.config.norm) == (8, 2, "batch")
    assert disc.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in disc.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = _randn(1, 3, 32, 32, seed=3)
    torch.testing.assert_close(loaded.eval()(x), disc.eval()(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- SigLIP teacher
@pytest.fixture(scope="module")
def tiny_siglip_path(tmp_path_factory):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("siglip")
    SiglipVisionModel(config).save_pretrained(path)
    return path


def _reference_siglip(path):
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(path).eval()


def test_siglip_teacher_is_the_second_to_last_hidden_state(tiny_siglip_path):
    teacher = SiglipTeacher.from_pretrained(tiny_siglip_path, grid_size=4)
    reference = _reference_siglip(tiny_siglip_path)
    x = _randn(2, 3, 32, 32, seed=20).clamp(-1, 1)
    features = teacher(x)
    assert teacher.feature_dim == 16 and features.shape == (2, 16, 16) and not features.requires_grad
    with torch.no_grad():
        expected = reference(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(features, expected)
    # out-of-range inputs are clamped, as the authors' scaling layer does
    torch.testing.assert_close(teacher(x * 3), teacher((x * 3).clamp(-1, 1)))


def test_siglip_teacher_resamples_grid_and_input(tiny_siglip_path):
    reference = _reference_siglip(tiny_siglip_path)
    x = _randn(2, 3, 48, 48, seed=21).clamp(-1, 1)
    with torch.no_grad():
        resized = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        hidden = reference(pixel_values=resized, output_hidden_states=True).hidden_states[-2]
    grid = hidden.reshape(2, 4, 4, 16).permute(0, 3, 1, 2)  # row-major patches -> (B, D, 4, 4)
    for size in (4, 6, 2):
        teacher = SiglipTeacher(reference, grid_size=size)
        expected = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        expected = expected.permute(0, 2, 3, 1).reshape(2, size * size, 16)
        torch.testing.assert_close(teacher(x), expected)
    layer1 = SiglipTeacher(reference, grid_size=4, feature_layer=1)
    with torch.no_grad():
        torch.testing.assert_close(layer1(x), reference(pixel_values=resized,
                                                        output_hidden_states=True).hidden_states[1])
    with pytest.raises(ValueError, match="feature_layer"):
        SiglipTeacher(reference, grid_size=4, feature_layer=4)


def test_siglip_teacher_loads_a_full_siglip_checkpoint_quietly_and_refuses_other_ones(tmp_path, capfd):
    """A full SiglipModel folder (vision + text tower) is a teacher: its text tower is dropped without transformers'
    load-report table; a folder whose vision weights do not fit raises, naming the keys."""
    from transformers import SiglipConfig, SiglipModel
    from transformers.utils import logging as hf_logging

    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    text = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 8}  # fmt: skip
    torch.manual_seed(0)
    full = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    full.save_pretrained(tmp_path / "full")
    capfd.readouterr()
    verbosity = hf_logging.get_verbosity()
    teacher = SiglipTeacher.from_pretrained(tmp_path / "full", grid_size=4)
    assert hf_logging.get_verbosity() == verbosity  # the caller's verbosity is restored
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "text_model" not in out + err
    x = _randn(1, 3, 32, 32, seed=3).clamp(-1, 1)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(teacher(x), expected)
    # a checkpoint whose vision tower has fewer layers than its config says is not a teacher
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "full" / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, tmp_path / "full" / "model.safetensors")
    with pytest.raises(ValueError, match="not a SigLIP vision checkpoint: missing"):
        SiglipTeacher.from_pretrained(tmp_path / "full", grid_size=4)


def test_siglip_teacher_builds_from_a_config_without_loading_anything(tiny_siglip_path, monkeypatch):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    def no_loading(*args, **kwargs):
        raise AssertionError("a constructor must not load weights")

    monkeypatch.setattr(SiglipVisionModel, "from_pretrained", no_loading)
    config = SiglipVisionConfig.from_pretrained(tiny_siglip_path)
    teacher = SiglipTeacher(config, grid_size=2)
    assert teacher.feature_dim == 16 and teacher(_randn(1, 3, 32, 32).clamp(-1, 1)).shape == (1, 4, 16)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="SiglipVisionConfig"):
        SiglipTeacher({"hidden_size": 16}, grid_size=2)


def test_siglip_teacher_is_frozen_and_stays_eval(tiny_siglip_path):
    teacher = build_teacher(str(tiny_siglip_path), grid_size=4)
    assert isinstance(teacher, SiglipTeacher) and isinstance(teacher, SemanticTeacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = _randn(1, 3, 32, 32).requires_grad_()
    assert not teacher(x).requires_grad


def test_build_teacher_accepts_modules_and_rejects_nonsense():
    class Custom(nn.Module):
        feature_dim = 5

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 5)

    custom = Custom().train()
    assert build_teacher(custom, grid_size=4) is custom
    assert not custom.training and not custom.proj.weight.requires_grad
    with pytest.raises(ValueError, match="feature_dim"):
        build_teacher(nn.Linear(2, 2), grid_size=4)
    with pytest.raises(ValueError, match="teacher spec"):
        build_teacher("", grid_size=4)
    with pytest.raises(ValueError, match="grid_size"):
        SiglipTeacher(custom, grid_size=0)


# ----------------------------------------------------------------------------- EfficientNet-Lite0 teacher
@pytest.fixture(scope="module")
def effnet_teacher():
    return build_teacher("efficientnet-lite0", grid_size=4)


def _photo(name, size=224):
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None] / 127.5 - 1.0


def test_efficientnet_teacher_real_weights_classify_real_photos(effnet_teacher):
    assert isinstance(effnet_teacher, EfficientNetLite0Teacher)
    images = torch.cat([_photo("chelsea"), _photo("coffee")])
    with torch.no_grad():
        probabilities = effnet_teacher.network(effnet_teacher.preprocess(images)).softmax(-1)
    top = probabilities.argmax(-1).tolist()
    assert top == [285, 967]  # Egyptian cat, espresso
    assert probabilities[0, 285] > 0.6 and probabilities[1, 967] > 0.8


def test_efficientnet_teacher_normalisation_matches_its_batchnorm_statistics(effnet_teacher):
    """The stem BatchNorm's running statistics record the input scaling used in training: our preprocessing must
    reproduce them, and the ImageNet mean/std (the package README's) must not."""
    names = ["chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry"]
    images = torch.cat([_photo(n) for n in names])
    bn = effnet_teacher.network._bn0
    live = bn.running_var > 1e-6

    def log_var_ratio(inputs):
        with torch.no_grad():
            stem = effnet_teacher.network._conv_stem(inputs)
        return (stem.var(dim=(0, 2, 3)) / bn.running_var).log()[live].abs().median().item()

    ours = log_var_ratio(effnet_teacher.preprocess(images))
    unit = (images + 1) / 2
    imagenet = (unit - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert ours < 0.8 < log_var_ratio(imagenet)


def test_efficientnet_teacher_features(effnet_teacher):
    x = _randn(2, 3, 64, 64, seed=22).clamp(-1, 1)
    features = effnet_teacher(x)
    assert effnet_teacher.feature_dim == 1280 and features.shape == (2, 16, 1280)
    with torch.no_grad():
        maps = effnet_teacher.network.extract_features(
            effnet_teacher.preprocess(F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)))
    assert maps.shape == (2, 1280, 7, 7)
    expected = F.interpolate(maps, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(features, expected)
    assert not any(p.requires_grad for p in effnet_teacher.parameters())
    effnet_teacher.train()
    assert not effnet_teacher.network.training
