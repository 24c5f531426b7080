"""Real photos that ship inside registry packages (scikit-image, scikit-learn), and the small dataset cut from them,
so training, evaluation and their tests run fully offline.

`load_bundled_photos` gives the photos themselves; `bundled_photo_dataset` cuts them into small train crops and a
held-out validation set (it is what `image_datasets.load_image_dataset("bundled")` loads).
scikit-image and scikit-learn are imported lazily (the `demo` / `eval` / `dev` extras bring them), `datasets` too
(the `train` extra)."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import PIL.Image

if TYPE_CHECKING:
    import datasets

SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "colorwheel", "logo", "camera", "brick", "coins", "moon",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
BUNDLED_PHOTOS = SKIMAGE_PHOTOS + SKLEARN_PHOTOS
DEFAULT_HELD_OUT = ("chelsea", "coffee", "china.jpg")
BUNDLED_SPLITS = ("train", "validation", "test")


def load_bundled_photos(names: list[str] | None = None) -> dict[str, PIL.Image.Image]:
    """Name -> PIL image for the bundled photos (all by default), in their native modes (RGB, RGBA for `logo`,
    L for the grey ones): the image processor converts them."""
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("the bundled photos need scikit-image: pip install 'evotok_hf[demo]'") from err
    wanted = list(BUNDLED_PHOTOS) if names is None else list(names)
    unknown = [n for n in wanted if n not in BUNDLED_PHOTOS]
    if unknown:
        raise ValueError(f"unknown bundled photo(s) {unknown}; available: {BUNDLED_PHOTOS}")
    photos = {}
    sklearn_images = None
    for name in wanted:
        if name in SKLEARN_PHOTOS:
            if sklearn_images is None:
                from sklearn.datasets import load_sample_images

                bunch = load_sample_images()
                sklearn_images = {f.rsplit("/", 1)[-1]: img for f, img in zip(bunch.filenames, bunch.images)}
            photos[name] = PIL.Image.fromarray(sklearn_images[name])
        else:
            photos[name] = PIL.Image.fromarray(getattr(skimage.data, name)())
    return photos


def _square_crop(photo: PIL.Image.Image, left: int, top: int, side: int, crop_size: int) -> PIL.Image.Image:
    # PIL's resize with a box crops and resamples in one pass, antialiased when it shrinks.
    return photo.resize((crop_size, crop_size), PIL.Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def _train_crops(photo: PIL.Image.Image, count: int, crop_size: int, rng: random.Random) -> list[PIL.Image.Image]:
    short = min(photo.size)
    smallest = min(crop_size, short)
    crops = []
    for _ in range(count):
        side = round(math.exp(rng.uniform(math.log(smallest), math.log(short))))
        left = rng.randint(0, photo.width - side)
        top = rng.randint(0, photo.height - side)
        crops.append(_square_crop(photo, left, top, side, crop_size))
    return crops


def _held_out_crops(photo: PIL.Image.Image, crop_size: int) -> list[PIL.Image.Image]:
    short = min(photo.size)
    half = short // 2
    left, top = (photo.width - short) // 2, (photo.height - short) // 2
    crops = [_square_crop(photo, left, top, short, crop_size)]
    for dx, dy in ((0, 0), (half, 0), (0, half), (half, half)):  # the four quarters of the centre square
        crops.append(_square_crop(photo, left + dx, top + dy, half, crop_size))
    return crops


def bundled_photo_dataset(
    split: str = "train",
    crops_per_photo: int = 8,
    crop_size: int = 128,
    seed: int = 0,
    held_out: tuple[str, ...] = DEFAULT_HELD_OUT,
) -> datasets.Dataset:
    """A small real-image dataset that needs no network: square crops of the photos scikit-image and scikit-learn
    ship (`BUNDLED_PHOTOS`, kept in their native modes: RGB, RGBA `logo`, grey `camera`...; the processor converts
    them). Columns: "image" (`crop_size` x `crop_size`) and "source" (the photo's name).

    - "train": for every photo not in `held_out`, `crops_per_photo` square crops at uniform positions whose side is
      drawn log-uniformly between min(crop_size, short side) and the short side, so close-ups and whole-photo
      views are equally common; each is resized to `crop_size` (small, same-size examples keep building fast).
      Each photo draws from its own `random.Random(f"{seed}:{name}")`, so its crops do not depend on which
      other photos are held out.
    - "validation" / "test" (the same images: there are too few photos for two held-out sets): for each
      `held_out` photo, its centre square and the four quarters of that square, resized to `crop_size`;
      independent of `seed`.
    Held-out photos never enter "train", so validation measures generalisation to unseen photos."""
    if split not in BUNDLED_SPLITS:
        raise ValueError(f"bundled_photo_dataset: split must be one of {BUNDLED_SPLITS}, got {split!r}.")
    if crops_per_photo < 1 or crop_size < 1:
        raise ValueError(
            f"bundled_photo_dataset: crops_per_photo and crop_size must be >= 1, got {crops_per_photo}, {crop_size}."
        )
    unknown = [name for name in held_out if name not in BUNDLED_PHOTOS]
    if unknown:
        raise ValueError(f"bundled_photo_dataset: unknown held-out photo(s) {unknown}; available: {BUNDLED_PHOTOS}.")
    if split == "train":
        names = [name for name in BUNDLED_PHOTOS if name not in held_out]
    else:
        names = [name for name in BUNDLED_PHOTOS if name in held_out]
    if not names:
        raise ValueError(f"bundled_photo_dataset: split {split!r} would be empty with held_out={held_out}.")
    try:
        import datasets
    except ImportError as err:
        raise ImportError("the bundled photo dataset needs `datasets`: pip install 'evotok_hf[train]'") from err
    images, sources = [], []
    for name, photo in load_bundled_photos(names).items():
        if split == "train":
            crops = _train_crops(photo, crops_per_photo, crop_size, random.Random(f"{seed}:{name}"))
        else:
            crops = _held_out_crops(photo, crop_size)
        images.extend(crops)
        sources.extend([name] * len(crops))
    features = datasets.Features({"image": datasets.Image(), "source": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "source": sources}, features=features)


__all__ = ["BUNDLED_PHOTOS", "DEFAULT_HELD_OUT", "bundled_photo_dataset", "load_bundled_photos"]
