"""The EvoTok tokenizer objective: L = L_pix + L_sem + L_vq.

- L_pix: L2 (or L1) reconstruction + perceptual distance (LPIPS-VGG in the paper) + a PatchGAN adversarial term
  that switches on at `disc_start` (20k steps in the paper), optionally scaled by the VQGAN adaptive weight.
- L_sem: cosine distance between the decoded semantic features and a frozen teacher's features, plus the same
  cosine on `semantic_fold` equal chunks of the channel dimension (the authors' "fold" loss, 4 chunks).
- L_vq: the commitment loss returned by the model (the codebooks themselves learn by EMA inside the quantizer).

`EvoTokLoss` holds no discriminator and no teacher: the training loop runs those and passes their outputs in,
so it decides when a discriminator forward is needed (none before `disc_start`) and how each module is wrapped
for distributed training. Every term is also returned separately, detached, for logging.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..frozen_networks import build_perceptual_loss

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pixel terms
def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean squared ("l2", the paper's) or mean absolute ("l1") error, computed in fp32."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ")
    if kind == "l2":
        return F.mse_loss(reconstruction.float(), target.float())
    if kind == "l1":
        return F.l1_loss(reconstruction.float(), target.float())
    raise ValueError(f"unknown reconstruction loss kind {kind!r}; expected 'l2' or 'l1'")


# ----------------------------------------------------------------------------- adversarial terms
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z))))."""
    loss_real = F.relu(1.0 - logits_real.float()).mean()
    loss_fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Standard GAN discriminator loss: 0.5 * (BCE(D(x), 1) + BCE(D(G(z)), 0)) on logits.

    The authors' version calls `binary_cross_entropy_with_logits(ones_like(logits), logits)`, i.e. with input and
    target swapped: it treats the constant 1 (or 0) as the logit and the discriminator's logits as the target,
    which is not a classification loss. Here the logits are the input and the labels the target, which equals
    their "vanilla" loss, 0.5 * (mean softplus(-D(x)) + mean softplus(D(G(z))))."""
    logits_real, logits_fake = logits_real.float(), logits_fake.float()
    loss_real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    loss_fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss: -mean D(G(z))."""
    return -logits_fake.float().mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: BCE(D(G(z)), 1) = mean softplus(-D(G(z))) (arguments in the correct order,
    unlike the authors' code; see `non_saturating_d_loss`)."""
    logits_fake = logits_fake.float()
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


# "vanilla" is the authors' name for the softplus form, which equals the (corrected) non-saturating loss.
DISCRIMINATOR_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "non-saturating": non_saturating_d_loss,
    "vanilla": non_saturating_d_loss,
}
GENERATOR_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_g_loss,
    "non-saturating": non_saturating_g_loss,
}


def adaptive_gan_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021): ||d nll / d w|| / (||d g / d w|| + eps) at the decoder's last
    layer w, clamped to [0, max_weight] and detached.

    It rescales the adversarial gradient to the size of the reconstruction gradient where both enter the decoder.
    The graph is retained so the caller can still backpropagate the total loss. A loss that does not reach
    `last_layer` contributes a zero gradient (e.g. a reconstruction weight of 0)."""
    if not (nll_loss.requires_grad and g_loss.requires_grad):
        raise ValueError("adaptive_gan_weight needs losses with a graph: call it with autograd enabled")
    if not last_layer.requires_grad:
        raise ValueError("adaptive_gan_weight: last_layer does not require grad (is the decoder frozen?)")

    def grad_norm(loss: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
        if grad is None:
            return torch.zeros((), device=last_layer.device)
        return torch.linalg.vector_norm(grad.float())

    weight = grad_norm(nll_loss) / (grad_norm(g_loss) + eps)
    return weight.clamp(0.0, max_weight).detach()


def gan_weight_at(step: int, disc_start: int, weight: float) -> float:
    """The adversarial weight schedule: 0 before `disc_start`, `weight` from `disc_start` on (the authors' hard
    switch; the discriminator is trained from the same step)."""
    return float(weight) if step >= disc_start else 0.0


# ----------------------------------------------------------------------------- semantic term
def semantic_cosine_loss(prediction: torch.Tensor, target: torch.Tensor, fold: int = 1) -> torch.Tensor:
    """mean(1 - cos(prediction, target)) over positions (B, N, D), in fp32.

    With `fold` > 1 the channel dimension is split into `fold` equal chunks and the cosine is taken per chunk, so
    every part of the feature must match in direction, not only the whole vector (the authors' "fold" loss)."""
    if prediction.ndim != 3 or prediction.shape != target.shape:
        raise ValueError(f"prediction and target must both be (B, N, D), got {tuple(prediction.shape)} and "
                         f"{tuple(target.shape)}")
    if fold < 1:
        raise ValueError(f"fold must be >= 1, got {fold}")
    batch, positions, dim = prediction.shape
    if dim % fold:
        raise ValueError(f"feature dim {dim} is not divisible by fold={fold}")
    prediction = prediction.float().reshape(batch, positions, fold, dim // fold)
    target = target.float().reshape(batch, positions, fold, dim // fold)
    cosine = (F.normalize(prediction, dim=-1, eps=1e-8) * F.normalize(target, dim=-1, eps=1e-8)).sum(-1)
    return (1.0 - cosine).mean()


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass
class EvoTokLossConfig:
    """Weights and choices of the tokenizer objective; the defaults are the paper's run.

    semantic_fold: number of channel chunks of the fold cosine term; 0 or 1 disables that term.
    disc_adaptive_weight: scale the adversarial term by VQGAN's adaptive weight (off in the paper's run)."""

    reconstruction_loss: str = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 20000
    disc_adaptive_weight: bool = False
    disc_loss: str = "hinge"
    gen_loss: str = "hinge"
    semantic_weight: float = 1.0
    semantic_fold: int = 4
    commitment_weight: float = 1.0

    def __post_init__(self):
        if self.reconstruction_loss not in ("l2", "l1"):
            raise ValueError(f"reconstruction_loss must be 'l2' or 'l1', got {self.reconstruction_loss!r}")
        if self.disc_loss not in DISCRIMINATOR_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISCRIMINATOR_LOSSES)}, got {self.disc_loss!r}")
        if self.gen_loss not in GENERATOR_LOSSES:
            raise ValueError(f"gen_loss must be one of {sorted(GENERATOR_LOSSES)}, got {self.gen_loss!r}")
        for name in ("reconstruction_weight", "perceptual_weight", "disc_weight", "semantic_weight",
                     "commitment_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("disc_start", "semantic_fold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.disc_adaptive_weight, bool):
            raise ValueError(f"disc_adaptive_weight must be a bool, got {self.disc_adaptive_weight!r}")


# ----------------------------------------------------------------------------- the objective
def _scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A detached fp32 0-dim tensor for the logged terms (one type for every entry of the dict)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value), device=device)


def _output_field(model_output: Any, name: str) -> torch.Tensor | None:
    if isinstance(model_output, Mapping):
        return model_output.get(name)
    return getattr(model_output, name, None)


class EvoTokLoss(nn.Module):
    """Generator and discriminator objectives of the EvoTok tokenizer.

    Holds only the (optional, frozen) perceptual network; the discriminator and the teacher are run by the
    caller, which passes their outputs in."""

    def __init__(self, config: EvoTokLossConfig, perceptual: nn.Module | None = None):
        super().__init__()
        if not isinstance(config, EvoTokLossConfig):
            raise ValueError(f"config must be an EvoTokLossConfig, got {type(config).__name__}")
        self.config = config
        self.perceptual = build_perceptual_loss(perceptual)
        self.d_loss_fn = DISCRIMINATOR_LOSSES[config.disc_loss]
        self.g_loss_fn = GENERATOR_LOSSES[config.gen_loss]
        if config.perceptual_weight > 0 and self.perceptual is None:
            logger.warning("perceptual_weight=%s but no perceptual network was given: the perceptual term is 0",
                           config.perceptual_weight)

    def train(self, mode: bool = True) -> EvoTokLoss:
        """The perceptual network stays in eval mode (LPIPS has dropout) whatever the caller sets."""
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def generator_loss(
        self,
        model_output: Any,
        pixel_values: torch.Tensor,
        teacher_features: torch.Tensor | None,
        logits_fake: torch.Tensor | None,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator (tokenizer) loss and its terms.

        model_output: an `EvoTokModelOutput` (or mapping) with `reconstruction` (B,3,H,W) in [-1,1],
            `semantic_features` (B, N, D) and `commitment_loss`.
        pixel_values: the input images (B,3,H,W) in [-1,1].
        teacher_features: the frozen teacher's (B, N, D) features of `pixel_values`; may be None only when
            `semantic_weight` is 0.
        logits_fake: the discriminator's logits on `model_output.reconstruction` (not detached); may be None while
            the adversarial weight is 0 (before `disc_start`), so no discriminator forward is needed then.
        last_layer: the pixel decoder's last weight (`model.pixel_decoder.last_layer`), needed only with
            `disc_adaptive_weight` once the adversarial term is active.

        Returns (total, terms). `terms` holds detached fp32 scalars: the unweighted terms "reconstruction",
        "perceptual", "generator_adversarial", "commitment", "semantic_cosine", "semantic_fold", the multipliers
        "adaptive_weight" (1 when not adaptive; 0 while the adversarial term is inactive and not measured) and
        "gan_weight", and "total" =
        rec_w*rec + perc_w*perc + adaptive_weight*gan_weight*adv + commit_w*commit + sem_w*(cos + fold).
        """
        cfg = self.config
        reconstruction = _output_field(model_output, "reconstruction")
        commitment = _output_field(model_output, "commitment_loss")
        if reconstruction is None or commitment is None:
            raise ValueError("model_output must provide `reconstruction` and `commitment_loss`")
        device = reconstruction.device
        zero = torch.zeros((), device=device)

        rec = reconstruction_loss(reconstruction, pixel_values, cfg.reconstruction_loss)

        perc = zero
        if cfg.perceptual_weight > 0 and self.perceptual is not None:
            perc = self.perceptual(reconstruction.contiguous(), pixel_values.contiguous()).float().mean()

        sem_cos, sem_fold = zero, zero
        if teacher_features is not None:
            semantic = _output_field(model_output, "semantic_features")
            if semantic is None:
                raise ValueError("teacher_features were given but model_output has no `semantic_features`")
            if semantic.shape != teacher_features.shape:
                raise ValueError(f"semantic_features {tuple(semantic.shape)} and teacher_features "
                                 f"{tuple(teacher_features.shape)} differ (does config.teacher_dim match the "
                                 f"teacher's feature_dim and config.grid_size its grid?)")
            target = teacher_features.detach()  # the teacher is a fixed target
            sem_cos = semantic_cosine_loss(semantic, target)
            if cfg.semantic_fold > 1:
                sem_fold = semantic_cosine_loss(semantic, target, fold=cfg.semantic_fold)
        elif cfg.semantic_weight > 0:
            raise ValueError("teacher_features is None but semantic_weight > 0")

        gan_weight = gan_weight_at(step, cfg.disc_start, cfg.disc_weight)
        g_adv = zero
        adaptive: float | torch.Tensor = 0.0 if cfg.disc_adaptive_weight else 1.0
        if logits_fake is not None:
            g_adv = self.g_loss_fn(logits_fake)
        elif gan_weight > 0:
            raise ValueError(f"logits_fake is required from step disc_start={cfg.disc_start} on (step {step})")

        total = (cfg.reconstruction_weight * rec + cfg.perceptual_weight * perc
                 + cfg.commitment_weight * commitment.float()
                 + cfg.semantic_weight * (sem_cos + sem_fold))
        if gan_weight > 0:
            if cfg.disc_adaptive_weight:
                if last_layer is None:
                    raise ValueError("disc_adaptive_weight=True needs last_layer (model.pixel_decoder.last_layer)")
                nll = cfg.reconstruction_weight * rec + cfg.perceptual_weight * perc
                adaptive = adaptive_gan_weight(nll, g_adv, last_layer)
            total = total + adaptive * gan_weight * g_adv

        terms = {
            "reconstruction": rec,
            "perceptual": perc,
            "generator_adversarial": g_adv,
            "adaptive_weight": adaptive,
            "gan_weight": gan_weight,
            "commitment": commitment,
            "semantic_cosine": sem_cos,
            "semantic_fold": sem_fold,
            "total": total,
        }
        return total, {name: _scalar(value, device) for name, value in terms.items()}

    def discriminator_loss(
        self, logits_real: torch.Tensor, logits_fake: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """gan_weight_at(step) * d_loss(logits_real, logits_fake), with the images' logits computed on detached
        reconstructions by the caller. Terms: "discriminator" (the weighted loss) and the mean logits
        "logits_real" / "logits_fake" (their gap shows how well D separates the two)."""
        gan_weight = gan_weight_at(step, self.config.disc_start, self.config.disc_weight)
        loss = gan_weight * self.d_loss_fn(logits_real, logits_fake)
        terms = {
            "discriminator": loss.detach().float(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }
        return loss, terms


def check_finite(terms: Mapping[str, float | torch.Tensor], step: int) -> None:
    """Raise FloatingPointError naming the first non-finite term, so a diverging run stops with the culprit
    instead of writing NaN weights."""
    for name, value in terms.items():
        tensor = torch.as_tensor(value).detach()
        if not bool(torch.isfinite(tensor).all()):
            shown = tensor.item() if tensor.numel() == 1 else tensor.tolist()
            raise FloatingPointError(f"non-finite loss at step {step}: {name}={shown}")


__all__ = [
    "EvoTokLoss",
    "EvoTokLossConfig",
    "adaptive_gan_weight",
    "check_finite",
    "gan_weight_at",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "reconstruction_loss",
    "semantic_cosine_loss",
]
