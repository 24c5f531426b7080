"""PatchGAN discriminator for the adversarial part of the EvoTok pixel loss.

The authors use the Pix2Pix / taming-transformers "NLayer" PatchGAN (Isola et al. 2017; Esser et al. 2021): a
stack of 4x4 convolutions that classifies overlapping image patches as real or reconstructed, giving a map of
logits rather than one score per image. This is a re-implementation of that structure. The layers sit in one
`nn.Sequential` named `main`, in the same order as the authors' module, so with `norm="batch"` an official
discriminator state dict loads into it unchanged.

It is a transformers `PreTrainedModel` with its own config, as the tokenizer is, so the trainer's checkpoints hold it
as a `save_pretrained` folder (config.json + model.safetensors) that `PatchGANDiscriminator.from_pretrained` loads,
like diffusers' VQGAN example does with its discriminator.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

_NORMS = ("batch", "group")


class PatchGANDiscriminatorConfig(PreTrainedConfig):
    r"""Configuration of [`PatchGANDiscriminator`]. The defaults are the authors' (and taming's) discriminator.

    Args:
        in_channels (`int`, defaults to 3): channels of the images classified.
        base_channels (`int`, defaults to 64): width of the first convolution; each further level doubles it, up to 8x.
        num_layers (`int`, defaults to 3): stride-2 convolutions (the first one included); 3 gives a 70x70 receptive
            field per logit.
        norm (`str`, defaults to `"batch"`): `"batch"` (BatchNorm, as the authors) or `"group"` (GroupNorm, which does
            not depend on the per-device batch size).
        initializer_range (`float`, defaults to 0.02): std of the normal init of the conv weights and of the norm
            scales around 1 (DCGAN's, as Pix2Pix and taming).
    """

    model_type = "evotok_patchgan_discriminator"

    in_channels: int = 3
    base_channels: int = 64
    num_layers: int = 3
    norm: str = "batch"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("in_channels", "base_channels", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PatchGANDiscriminatorConfig: `{name}` must be an integer >= 1, got {value!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"PatchGANDiscriminatorConfig: `norm` must be one of {_NORMS}, got {self.norm!r}")


def _norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm as the authors, or GroupNorm, which does not depend on the per-device batch size (tiny batches,
    no SyncBatchNorm under DDP). Up to 32 groups, always a divisor of the channel count."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchGANDiscriminator(PreTrainedModel):
    """NLayer PatchGAN: images (B, in_channels, H, W) -> patch logits (B, 1, h, w).

    Layout (`num_layers` = 3, `base_channels` = 64 is the authors' and taming's setting):
      conv 4x4 stride 2 (in -> 64, bias), LeakyReLU(0.2)
      (num_layers - 1) x [conv 4x4 stride 2 (no bias), norm, LeakyReLU(0.2)], channels doubling up to 8 x base
      conv 4x4 stride 1 (no bias), norm, LeakyReLU(0.2)
      conv 4x4 stride 1 (-> 1, bias)
    Convolutions preceding a norm carry no bias (the norm's shift makes it redundant). For a 256x256 input the
    logit map is 30x30; each logit sees a 70x70 receptive field.
    """

    config_class = PatchGANDiscriminatorConfig
    config: PatchGANDiscriminatorConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: PatchGANDiscriminatorConfig):
        super().__init__(config)
        base_channels, num_layers = config.base_channels, config.num_layers

        def width(level: int) -> int:
            return base_channels * min(2**level, 8)

        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for level in range(1, num_layers + 1):
            stride = 2 if level < num_layers else 1  # the last normalised conv keeps the resolution
            layers += [
                nn.Conv2d(width(level - 1), width(level), kernel_size=4, stride=stride, padding=1, bias=False),
                _norm_layer(config.norm, width(level)),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(width(num_layers), 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """DCGAN-style init used by Pix2Pix and taming: conv weights N(0, 0.02), norm scales N(1, 0.02).

        Conv biases start at 0 (as Pix2Pix; taming leaves PyTorch's default uniform bias, a difference of at most
        ~0.01 in the initial logits)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Conv2d):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            init.normal_(module.weight, 1.0, std)
            init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        in_channels, num_layers = self.config.in_channels, self.config.num_layers
        if pixel_values.ndim != 4 or pixel_values.shape[1] != in_channels:
            raise ValueError(f"expected images of shape (B, {in_channels}, H, W), got {tuple(pixel_values.shape)}")
        # num_layers halvings, then two stride-1 4x4 convs that each drop one row and column: the halved map must
        # be at least 3 wide for the logit map to be non-empty.
        min_size = 3 * 2**num_layers
        if min(pixel_values.shape[-2:]) < min_size:
            raise ValueError(f"images must be at least {min_size}x{min_size} for num_layers={num_layers}, "
                             f"got {tuple(pixel_values.shape[-2:])}")
        return self.main(pixel_values)


__all__ = ["PatchGANDiscriminator", "PatchGANDiscriminatorConfig"]
