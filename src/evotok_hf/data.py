"""Real photos that ship inside registry packages (scikit-image, scikit-learn): usable fully offline.

scikit-image and scikit-learn are imported lazily (the `demo` / `eval` / `dev` extras bring them)."""

from __future__ import annotations

import PIL.Image

SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "colorwheel", "logo", "camera", "brick", "coins", "moon",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def load_bundled_photos(names: list[str] | None = None) -> dict[str, PIL.Image.Image]:
    """Name -> PIL image for the bundled photos (all by default), in their native modes (RGB, RGBA for `logo`,
    L for the grey ones): the image processor converts them."""
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("the bundled photos need scikit-image: pip install 'evotok_hf[demo]'") from err
    wanted = list(SKIMAGE_PHOTOS + SKLEARN_PHOTOS) if names is None else list(names)
    unknown = [n for n in wanted if n not in SKIMAGE_PHOTOS + SKLEARN_PHOTOS]
    if unknown:
        raise ValueError(f"unknown bundled photo(s) {unknown}; available: {SKIMAGE_PHOTOS + SKLEARN_PHOTOS}")
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
