"""Image processor for EvoTok (PIL/NumPy backend, no torchvision).

Any PIL mode becomes RGB (transparency composited on white, 16-bit and float greys rescaled rather than clipped);
arrays and tensors are read on the same value scales (floats within [0, 1] as [0, 1] images, 16-bit as 16-bit);
paths, URLs and base64 strings are opened here, so a file gets the same conversion as the PIL image; the image is
resized to the tokenizer's square input either by shortest side + centre crop (default: the ImageNet
evaluation convention) or by squashing to the square (what the official VLM does), and values are mapped to [-1, 1]
(mean = std = 0.5, the SigLIP convention). `postprocess` maps model outputs back to PIL / NumPy / torch images.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.request

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.dynamic_module_utils import custom_object_save
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

RESIZE_MODES = ("center_crop", "squash")


class EvoTokImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    resize_mode (`str`, *optional*, defaults to `self.resize_mode`):
        "center_crop": resize the shortest side to the target size, then crop the centre (tokenizer evaluation);
        "squash": resize both sides to the target size, ignoring the aspect ratio (the official VLM).
    """

    resize_mode: str


def _white_level(array: np.ndarray, sixteen_bit: bool = False) -> float:
    """The value of white in an image's pixel values: 1.0 for floats that all lie within [0, 1] (the float image
    convention), 65535 for 16-bit data or integers above 255, 255 otherwise."""
    peak = float(array.max()) if array.size else 0.0
    if np.issubdtype(array.dtype, np.floating):
        return 1.0 if peak <= 1.0 else 255.0
    return 65535.0 if sixteen_bit or peak > 255 else 255.0


def _to_uint8(array: np.ndarray, white: float) -> np.ndarray:
    return np.clip(np.rint(array.astype(np.float64) / white * 255.0), 0, 255).astype(np.uint8)


def _high_bit_depth_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """I;16 / I / F greys -> 8-bit RGB by rescaling the value range (PIL's own convert clips them to 255)."""
    array = np.asarray(image)
    grey = _to_uint8(array, _white_level(array, sixteen_bit=image.mode.startswith("I;16")))
    return PIL.Image.fromarray(grey).convert("RGB")


def _array_to_8bit(image: np.ndarray) -> np.ndarray:
    """A numeric array image on any value scale -> uint8 on the 0..255 scale that `rescale_factor` 1/255 expects, with
    the white level of `_white_level` (a float array in [0, 1] would otherwise be divided by 255 a second time and turn
    black). Raises ValueError on NaN / inf."""
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError("EvoTokImageProcessor: the image holds NaN or infinite values.")
    return _to_uint8(image, _white_level(image, sixteen_bit=image.dtype == np.uint16))


def _short(source: str, limit: int = 80) -> str:
    return repr(source if len(source) <= limit else source[:limit] + "...")


def open_image(source: str) -> PIL.Image.Image:
    """A local path, an http(s) URL or base64 image data (optionally as a `data:image/...` URI) -> the PIL image,
    turned upright by its EXIF orientation, in its own mode (`to_rgb` converts it, so alpha and 16-bit data get the
    same conversion as a PIL input). Raises ValueError naming what is wrong (missing file, bad base64, unreadable
    data)."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source) as response:
            data = io.BytesIO(response.read())
    elif os.path.isfile(source):
        data = source
    elif os.path.isdir(source):
        raise ValueError(f"EvoTokImageProcessor: image path {_short(source)} is a directory, not an image file.")
    else:
        # Neither a URL nor a file: base64 data, or else a path that does not exist (the likelier mistake, so a string
        # that is not base64 image data is reported as a missing file).
        is_data_uri = source.startswith("data:image/")
        payload = source.split(",", 1)[1] if is_data_uri else source
        try:
            image = PIL.Image.open(io.BytesIO(base64.b64decode("".join(payload.split()), validate=True)))
        except (binascii.Error, ValueError, OSError) as err:
            if is_data_uri:
                raise ValueError(f"EvoTokImageProcessor: could not decode the base64 image data ({err}).") from err
            raise ValueError(
                f"EvoTokImageProcessor: image file {_short(source)} does not exist (nor is the string an http(s) URL "
                "or base64 image data)."
            ) from err
        return PIL.ImageOps.exif_transpose(image)
    try:
        return PIL.ImageOps.exif_transpose(PIL.Image.open(data))
    except (OSError, SyntaxError) as err:
        raise ValueError(f"EvoTokImageProcessor: could not open image {_short(source)} ({err}).") from err


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image -> RGB: alpha (RGBA, LA, PA, P with transparency) over white, CMYK/YCbCr/L/1 converted, 16-bit
    and float greys rescaled. Raises ValueError on empty or unreadable (truncated, corrupt) images."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"EvoTokImageProcessor: got an empty image of size {image.size}.")
    try:
        image.load()
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            return _high_bit_depth_to_rgb(image)
        return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True)) if image.mode != "RGB" else image
    except (OSError, SyntaxError) as err:  # PIL reports truncated / corrupt data as OSError (SyntaxError for some)
        raise ValueError(f"EvoTokImageProcessor: could not read image data ({err}); the file is corrupt or truncated.") from err


def save_remote_code(processor, save_directory) -> list:
    """Copy into `save_directory` the module of `processor` and the siblings it imports, when it was loaded from a
    remote-code folder (`evotok_hf.hub.remote_code`) by the package's own classes: it keeps that folder's `auto_map`,
    and transformers copies code on save only for classes loaded as remote code (`_auto_class` set, left to it), so
    without this copy a re-saved folder would name code it does not hold.

    A processor's `auto_map` names its own class only (AutoProcessor, AutoImageProcessor), so transformers'
    `custom_object_save` copies exactly the files it needs; a config's also names the model's module, which
    `modeling/configuration_evotok.save_auto_map_code` copies (the two folders may not import each other)."""
    if not getattr(processor, "auto_map", None) or processor._auto_class is not None:
        return []
    os.makedirs(save_directory, exist_ok=True)
    return custom_object_save(processor, save_directory)


class EvoTokImageProcessor(PilBackend):
    r"""Constructs an EvoTok image processor: RGB, resize (centre crop or squash) to `size`, scale to [-1, 1].

    Args:
        size (`dict`, defaults to `{"height": 256, "width": 256}`): the tokenizer's input size.
        resize_mode (`str`, defaults to `"center_crop"`): `"center_crop"` or `"squash"` (see
            [`EvoTokImageProcessorKwargs`]).
        resample (`PILImageResampling`, defaults to BICUBIC), image_mean / image_std (0.5): as in SigLIP.
    """

    valid_kwargs = EvoTokImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 256, "width": 256}
    default_to_square = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    resize_mode = "center_crop"

    def __init__(self, **kwargs: Unpack[EvoTokImageProcessorKwargs]):
        super().__init__(**kwargs)
        self._check_resize_mode(self.resize_mode)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # Before the config (and any upload): a folder loaded from remote code stays loadable as remote code.
        save_remote_code(self, save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @staticmethod
    def _check_resize_mode(mode) -> None:
        if mode not in RESIZE_MODES:
            raise ValueError(f"EvoTokImageProcessor: resize_mode must be one of {RESIZE_MODES}, got {mode!r}.")

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        if images is None or (isinstance(images, (list, tuple)) and len(images) == 0):
            raise ValueError("EvoTokImageProcessor: no images were given.")
        try:
            return super()._prepare_images_structure(images, expected_ndims=expected_ndims)
        except (OSError, SyntaxError) as err:
            raise ValueError(f"EvoTokImageProcessor: could not open image ({err}).") from err

    def fetch_images(self, image_url_or_urls):
        """Paths, URLs and base64 strings are opened by `open_image` (transformers' loader converts to RGB by dropping
        alpha and reports a missing file as bad base64); images and nested lists pass as in the parent."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return open_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def process_image(
        self, image, do_convert_rgb: bool | None = None, input_data_format=None, do_rescale: bool | None = None,
        **kwargs,
    ) -> np.ndarray:
        if isinstance(image, PIL.Image.Image):
            image = to_rgb(image) if do_convert_rgb is not False else image
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            if isinstance(image, torch.Tensor):  # NumPy has no bfloat16: floats go over as float32
                image = (image.float() if image.is_floating_point() else image).numpy(force=True)
            if image.size == 0:
                raise ValueError(f"EvoTokImageProcessor: got an empty array of shape {tuple(image.shape)}.")
            # `do_rescale` divides by 255: bring every value scale to 0..255 first, as PIL inputs are. Without it the
            # caller's values are taken as they are (transformers' convention for images already in [0, 1]).
            if do_rescale:
                image = _array_to_8bit(image)
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, do_rescale=do_rescale, **kwargs
        )

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        return_tensors=None,
        resize_mode: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        resize_mode = resize_mode or self.resize_mode
        self._check_resize_mode(resize_mode)
        processed = []
        for image in images:
            if image.shape[0] != 3:
                raise ValueError(f"EvoTokImageProcessor: expected 3 channels after RGB conversion, got {image.shape[0]}.")
            if do_resize:
                if resize_mode == "center_crop":
                    shortest = min(size.height, size.width)
                    image = self.resize(image, SizeDict(shortest_edge=shortest), resample=resample)
                    image = self.center_crop(image, size)
                else:
                    image = self.resize(image, SizeDict(height=size.height, width=size.width), resample=resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image.astype(np.float32))
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def postprocess(self, pixel_values, return_tensors: str = "PIL.Image.Image"):
        """Model-space images (batch, 3, H, W) or (3, H, W), normalised with this processor's mean/std (so [-1, 1])
        -> `"PIL.Image.Image"` (list of RGB images), `"np"` (float32 (batch, H, W, 3) in [0, 1]) or `"pt"` (float32
        (batch, 3, H, W) in [0, 1])."""
        if return_tensors not in ("PIL.Image.Image", "pil", "np", "pt"):
            raise ValueError(f"postprocess: return_tensors must be 'PIL.Image.Image', 'np' or 'pt', got {return_tensors!r}.")
        images = torch.as_tensor(pixel_values).detach().float().cpu()
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"postprocess: expected (batch, 3, H, W) pixel values, got shape {tuple(images.shape)}.")
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        images = (images * std + mean).clamp(0.0, 1.0)
        if return_tensors == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()
        if return_tensors == "np":
            return array
        return [PIL.Image.fromarray(np.rint(a * 255.0).astype(np.uint8)) for a in array]


__all__ = ["EvoTokImageProcessor", "EvoTokImageProcessorKwargs", "open_image", "to_rgb"]
