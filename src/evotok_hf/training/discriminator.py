"""PatchGAN discriminator for the adversarial part of the EvoTok pixel loss.

The authors use the Pix2Pix / taming-transformers "NLayer" PatchGAN (Isola et al. 2017; Esser et al. 2021): a
stack of 4x4 convolutions that classifies overlapping image patches as real or reconstructed, giving a map of
logits rather than one score per image. This is a re-implementation of that structure. The layers sit in one
`nn.Sequential` named `main`, in the same order as the authors' module, so with `norm="batch"` an official
discriminator state dict loads into it unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NORMS = ("batch", "group")


def _norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm as the authors, or GroupNorm, which does not depend on the per-device batch size (tiny batches,
    no SyncBatchNorm under DDP). Up to 32 groups, always a divisor of the channel count."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchGANDiscriminator(nn.Module):
    """NLayer PatchGAN: images (B, in_channels, H, W) -> patch logits (B, 1, h, w).

    Layout (`num_layers` = 3, `base_channels` = 64 is the authors' and taming's setting):
      conv 4x4 stride 2 (in -> 64, bias), LeakyReLU(0.2)
      (num_layers - 1) x [conv 4x4 stride 2 (no bias), norm, LeakyReLU(0.2)], channels doubling up to 8 x base
      conv 4x4 stride 1 (no bias), norm, LeakyReLU(0.2)
      conv 4x4 stride 1 (-> 1, bias)
    Convolutions preceding a norm carry no bias (the norm's shift makes it redundant). For a 256x256 input the
    logit map is 30x30; each logit sees a 70x70 receptive field.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if in_channels < 1 or base_channels < 1:
            raise ValueError(f"in_channels and base_channels must be >= 1, got {in_channels} and {base_channels}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.num_layers = num_layers
        self.norm = norm

        def width(level: int) -> int:
            return base_channels * min(2**level, 8)

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for level in range(1, num_layers + 1):
            stride = 2 if level < num_layers else 1  # the last normalised conv keeps the resolution
            layers += [
                nn.Conv2d(width(level - 1), width(level), kernel_size=4, stride=stride, padding=1, bias=False),
                _norm_layer(norm, width(level)),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(width(num_layers), 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """DCGAN-style init used by Pix2Pix and taming: conv weights N(0, 0.02), norm scales N(1, 0.02).

        Conv biases start at 0 (as Pix2Pix; taming leaves PyTorch's default uniform bias, a difference of at most
        ~0.01 in the initial logits)."""
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        # num_layers halvings, then two stride-1 4x4 convs that each drop one row and column: the halved map must
        # be at least 3 wide for the logit map to be non-empty.
        min_size = 3 * 2**self.num_layers
        if min(images.shape[-2:]) < min_size:
            raise ValueError(f"images must be at least {min_size}x{min_size} for num_layers={self.num_layers}, "
                             f"got {tuple(images.shape[-2:])}")
        return self.main(images)


__all__ = ["PatchGANDiscriminator"]
