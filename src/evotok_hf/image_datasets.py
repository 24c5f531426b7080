"""Image datasets for training and evaluating the EvoTok tokenizer: augmentations, image sources and DataLoaders.

Shared by `training` (the loop's data) and `evaluation` (the evaluation preprocessing), and by the scripts, hence
outside both packages. Read top to bottom:
1. transforms: `train_transform` (random-resized crop + horizontal flip, then the processor squashes the crop to its
   square size) and `eval_transform` (the processor's shortest side + centre crop). Both return one (3, S, S)
   float32 tensor in [-1, 1]; every preprocessing constant comes from `EvoTokImageProcessor`.
2. sources: `load_image_dataset` turns a Hub id, a folder of images, parquet files, webdataset shards or "bundled"
   (`bundled_photos.bundled_photo_dataset`, real photos cut into crops, offline) into a `datasets` dataset whose
   image column is called "image".
3. loaders: `make_dataloader` (map-style or streaming) yields {"pixel_values": (B, 3, S, S)}; `infinite_batches`
   cycles epochs for step-based loops (resuming from a `DataPosition`), telling the loader each epoch with
   `set_loader_epoch`.

Augmentation randomness is a function of (seed, epoch, example), never of Python's global `random`: the loaders give
each example its own `random.Random`, so a batch's crops do not depend on which batches were drawn before it, on
DataLoader workers, on look-ahead prefetching, or on anything else in the process that draws random numbers. A run
resumed from a checkpoint therefore sees exactly the batches the uninterrupted run saw.

The crop follows torchvision's `RandomResizedCrop` sampling (uniform area fraction, log-uniform aspect, 10 tries,
then a centre crop), written here on PIL because torchvision cannot be installed beside the CPU torch build.
`datasets` is imported lazily (it comes with the `train` extra).
"""

from __future__ import annotations

import glob
import inspect
import itertools
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch

from .bundled_photos import bundled_photo_dataset
from .processing.image_processing_evotok import EvoTokImageProcessor

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Column names that hold images in common datasets when the feature type does not say so (webdataset keys, raw
# bytes in parquet). A `datasets.Image` feature is preferred over these.
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BUILDER_BY_EXTENSION = {
    ".parquet": "parquet",
    ".tar": "webdataset",
    **dict.fromkeys(IMAGE_FILE_EXTENSIONS, "imagefolder"),
}

CROP_ATTEMPTS = 10


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("image datasets need the `datasets` package: pip install 'evotok_hf[train]'") from err
    return datasets


# ----------------------------------------------------------------------------------------------------- transforms
def _check_crop_range(scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1 (area fractions), got {scale}.")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high (width / height), got {ratio}.")


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """A random crop box (left, top, right, bottom) for an image of `width` x `height`, sampled as torchvision's
    RandomResizedCrop does so augmentation strength matches published recipes: area fraction uniform in `scale`,
    aspect (width / height) log-uniform in `ratio`, up to 10 tries; if none fits, the largest centred crop whose
    aspect lies in `ratio`. `generator=None` draws from the module-level `random`."""
    if width < 1 or height < 1:
        raise ValueError(f"random_resized_crop_box: image size must be positive, got {width}x{height}.")
    _check_crop_range(scale, ratio)
    draw = random if generator is None else generator
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * draw.uniform(*scale)
        aspect = math.exp(draw.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = draw.randint(0, width - crop_width)
            top = draw.randint(0, height - crop_height)
            return left, top, left + crop_width, top + crop_height
    if width / height < ratio[0]:  # too tall for any allowed aspect: keep the width
        crop_width, crop_height = width, max(1, round(width / ratio[0]))
    elif width / height > ratio[1]:  # too wide: keep the height
        crop_width, crop_height = max(1, round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def _pixel_values(processor: EvoTokImageProcessor, image: PIL.Image.Image, resize_mode: str) -> torch.Tensor:
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}; load data with load_image_dataset.")
    return processor(image, resize_mode=resize_mode, return_tensors="pt").pixel_values[0]


# Transforms are small classes rather than closures so they pickle into DataLoader workers under any start method.
@dataclass(frozen=True)
class _TrainTransform:
    processor: EvoTokImageProcessor
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_prob: float
    generator: random.Random | None

    def __call__(self, image: PIL.Image.Image, generator: random.Random | None = None) -> torch.Tensor:
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"expected a PIL image, got {type(image).__name__}; load data with load_image_dataset.")
        if generator is None:
            generator = self.generator
        box = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, generator)
        # Always draw the flip so the crop sequence for a given seed does not depend on flip_prob.
        flip = (random if generator is None else generator).random() < self.flip_prob
        # PIL crops every mode (L, RGBA, P, I;16...), so RGB conversion is left to the processor.
        pixel_values = _pixel_values(self.processor, image.crop(box), "squash")
        # Mirroring the output is exact and cheaper than mirroring the larger source crop.
        return torch.flip(pixel_values, dims=(-1,)) if flip else pixel_values


@dataclass(frozen=True)
class _EvalTransform:
    processor: EvoTokImageProcessor

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        return _pixel_values(self.processor, image, "center_crop")


def train_transform(
    processor: EvoTokImageProcessor,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
    generator: random.Random | None = None,
) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Training augmentation: a random-resized crop (see `random_resized_crop_box`), a horizontal flip with
    probability `flip_prob`, then the processor squashes the crop to its size (the crop already chose the aspect,
    as in torchvision). Returns `transform(image, generator=None)` -> (3, S, S) float32 in [-1, 1].

    The randomness comes from the `generator` of each call if given (`make_dataloader` passes every example its own,
    derived from (seed, epoch, example)), else from the `generator` given here, else from the module-level
    `random`."""
    _check_crop_range(scale, ratio)
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"train_transform: flip_prob must be in [0, 1], got {flip_prob}.")
    return _TrainTransform(processor, tuple(scale), tuple(ratio), float(flip_prob), generator)


def eval_transform(processor: EvoTokImageProcessor) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Evaluation preprocessing: shortest side to the processor's size, then centre crop (the ImageNet convention
    tokenizer papers report rFID/PSNR with), whatever the processor's own `resize_mode` default is.
    Returns image -> (3, S, S) float32 in [-1, 1]."""
    return _EvalTransform(processor)


# -------------------------------------------------------------------------------------------------------- sources
def load_image_dataset(
    source: str | Sequence[str],
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """One image dataset from wherever the images live, with its image column named "image" (other columns, e.g.
    captions, are kept), so the rest of training never cares about the source format.

    `source` is one of:
      - "bundled": `bundled_photo_dataset(split, **load_kwargs)` (real photos, offline);
      - a local directory: `datasets` infers the builder from its files (imagefolder for images, with
        `metadata.jsonl` columns; parquet; webdataset for .tar shards) and its splits from file/folder names;
      - a file, a glob or a list of them, by extension: .parquet (parquet), .tar (webdataset; images under keys
        such as "jpg"/"png"), image files (imagefolder). The files become split `split`;
      - anything else is a Hub dataset id, loaded with `datasets.load_dataset(source, split=..., streaming=...)`.
    `load_kwargs` go to `datasets.load_dataset` (e.g. `name=`, `cache_dir=`, `revision=`).

    The image column is `image_column` if given, else a column named "image" holding `datasets.Image`, else the
    first `datasets.Image` column, else the first column named one of `IMAGE_COLUMN_NAMES`. A column that is not
    yet a decoding `Image` feature (raw bytes, paths) is cast to one. Raises ValueError when the source matches
    nothing or no image column is found."""
    if source == "bundled":
        dataset = bundled_photo_dataset(split, **load_kwargs)
        return dataset.to_iterable_dataset() if streaming else dataset
    datasets = _import_datasets()
    dataset = _load_source(datasets, source, split, streaming, load_kwargs)
    return _with_image_column(datasets, dataset, image_column)


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def _looks_like_path(source: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else that is path-shaped is treated as a (missing) local path,
    so a typo gives a clear error instead of a Hub lookup."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or _is_glob(source)
        or os.path.splitext(source)[1].lower() in BUILDER_BY_EXTENSION
    )


def _expand_files(source: str | Sequence[str]) -> list[str]:
    patterns = [source] if isinstance(source, str) else list(source)
    if not patterns:
        raise ValueError("load_image_dataset: got an empty list of sources.")
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matched = sorted(glob.glob(pattern, recursive=True)) if _is_glob(pattern) else [pattern]
        matched = [os.path.abspath(path) for path in matched if os.path.isfile(path)]
        if not matched:
            raise ValueError(f"load_image_dataset: source {pattern!r} matches no file (and is not a directory).")
        files.extend(matched)
    return files


def _builder_for(files: list[str]) -> str:
    builders = {BUILDER_BY_EXTENSION.get(os.path.splitext(path)[1].lower()) for path in files}
    if None in builders:
        unknown = sorted({path for path in files if os.path.splitext(path)[1].lower() not in BUILDER_BY_EXTENSION})
        raise ValueError(
            f"load_image_dataset: unsupported file type(s) {unknown[:5]}; expected {sorted(BUILDER_BY_EXTENSION)}."
        )
    if len(builders) > 1:
        raise ValueError(f"load_image_dataset: the files mix formats ({sorted(builders)}); load them separately.")
    return builders.pop()


def _load_source(datasets, source, split: str, streaming: bool, load_kwargs: dict):
    """`datasets.load_dataset` on a directory, a Hub id, or a builder name + the files `source` names."""
    if isinstance(source, str) and os.path.isdir(os.path.expanduser(source)):
        path, data_files = os.path.abspath(os.path.expanduser(source)), None
    elif isinstance(source, str) and not _looks_like_path(source) and not os.path.exists(source):
        path, data_files = source, None
    else:
        files = _expand_files(source)
        # Name the files' split after the one asked for ("validation[:100]" -> "validation"), so any split works.
        path, data_files = _builder_for(files), {split.split("[")[0]: files}
    try:
        return datasets.load_dataset(path, data_files=data_files, split=split, streaming=streaming, **load_kwargs)
    except FileNotFoundError as err:  # also datasets' DatasetNotFoundError and EmptyDatasetError
        raise ValueError(f"load_image_dataset: found no image data for source {source!r} ({err}).") from err


def _find_image_column(datasets, features: dict | None, columns: list[str]) -> str | None:
    image_features = [name for name, feature in (features or {}).items() if isinstance(feature, datasets.Image)]
    if "image" in image_features:
        return "image"
    if image_features:
        return image_features[0]
    return next((name for name in columns if name.lower() in IMAGE_COLUMN_NAMES), None)


def _with_image_column(datasets, dataset, image_column: str | None):
    features = dataset.features
    columns = list(features) if features is not None else list(dataset.column_names or [])
    if image_column is None:
        image_column = _find_image_column(datasets, features, columns)
        if image_column is None:
            raise ValueError(
                f"load_image_dataset: no image column among {columns}; pass image_column= to name it."
            )
        logger.info("Using column %r as the image column.", image_column)
    elif columns and image_column not in columns:
        raise ValueError(f"load_image_dataset: image_column {image_column!r} is not among the columns {columns}.")
    if image_column != "image":
        if "image" in columns:
            logger.warning("Dropping the existing 'image' column in favour of %r.", image_column)
            dataset = dataset.remove_columns("image")
        dataset = dataset.rename_column(image_column, "image")
    feature = features.get(image_column) if features is not None else None
    if feature is not None and not (isinstance(feature, datasets.Image) and feature.decode):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


# -------------------------------------------------------------------------------------------------------- loaders
class ImageBatchCollator:
    """Stacks examples {"pixel_values": (3, S, S)} into {"pixel_values": (B, 3, S, S) float32}. A class, like
    transformers' data collators, so it pickles into DataLoader workers; it checks sizes so a transform that does
    not resize to one size fails with a clear message rather than deep inside `torch.stack`."""

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("ImageBatchCollator: got an empty batch.")
        tensors = [torch.as_tensor(example["pixel_values"], dtype=torch.float32) for example in examples]
        shapes = sorted({tuple(tensor.shape) for tensor in tensors})
        if len(shapes) != 1 or len(shapes[0]) != 3:
            raise ValueError(f"ImageBatchCollator: expected same-size (3, H, W) images, got shapes {shapes}.")
        return {"pixel_values": torch.stack(tensors)}


def example_generator(seed: int, epoch: int, *example: int) -> random.Random:
    """The augmentation random stream of one example in one epoch: a `random.Random` seeded from the string
    "seed:epoch:example..." (string seeds are hashed with SHA-512, so the stream is the same in every process and
    Python version 3.2+, whatever PYTHONHASHSEED is)."""
    return random.Random(":".join(str(int(part)) for part in (seed, epoch, *example)))


def _takes_generator(transform: Callable) -> bool:
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):  # callables without an introspectable signature
        return False


class _PerExampleTransform:
    """Applies a transform to one image; a transform that takes a `generator` keyword (as `train_transform` does)
    gets the example's own `example_generator(seed, epoch, ...)`. `set_epoch` is called by `set_loader_epoch`."""

    def __init__(self, transform: Callable[[PIL.Image.Image], torch.Tensor], seed: int):
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._takes_generator = _takes_generator(transform)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _apply(self, image: PIL.Image.Image, *example: int) -> dict[str, torch.Tensor]:
        if self._takes_generator:
            return {"pixel_values": self.transform(image, generator=example_generator(self.seed, self.epoch, *example))}
        return {"pixel_values": self.transform(image)}


class _TransformedImages(_PerExampleTransform, torch.utils.data.Dataset):
    """Map-style view that decodes and transforms one example per index, inside the DataLoader worker; the
    augmentation stream is keyed on the example's index in the dataset."""

    def __init__(self, dataset: datasets.Dataset, transform: Callable[[PIL.Image.Image], torch.Tensor], seed: int):
        super().__init__(transform, seed)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self._apply(self.dataset[int(index)]["image"], index)


class _TransformedStream(_PerExampleTransform, torch.utils.data.IterableDataset):
    """Streaming view that transforms examples as they arrive; the augmentation stream is keyed on the DataLoader
    worker and the example's position in that worker's stream (a stream has no indices). `set_epoch` also reshuffles
    the underlying `datasets.IterableDataset`."""

    def __init__(self, dataset: datasets.IterableDataset, transform: Callable[[PIL.Image.Image], torch.Tensor],
                 seed: int):  # fmt: skip
        super().__init__(transform, seed)
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Iterated inside the worker, so `datasets` still gives each worker its own shards.
        worker = torch.utils.data.get_worker_info()
        worker_id = 0 if worker is None else worker.id
        for position, example in enumerate(self.dataset):
            yield self._apply(example["image"], worker_id, position)


def make_dataloader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    transform: Callable[[PIL.Image.Image], torch.Tensor],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    shuffle_buffer_size: int = 1000,
) -> torch.utils.data.DataLoader:
    """A DataLoader of {"pixel_values": (batch_size, 3, S, S) float32} from a dataset with an "image" column (as
    `load_image_dataset` returns), decoding and transforming images in the workers.

    Map-style: the order comes from a `torch.Generator` seeded with `seed`, so every process given the same seed
    sees the same permutation and Accelerate's `prepare` can shard it; the generator also seeds the workers.
    Streaming (`IterableDataset`): `dataset.shuffle(seed, buffer_size=shuffle_buffer_size)` when `shuffle`, the
    transform applied lazily; `datasets` splits shards across workers.
    A transform that takes a `generator` keyword (`train_transform`) is given each example's own
    `example_generator(seed, epoch, index)` (streaming: `(seed, epoch, worker, position)`), so augmentations are
    the same whatever the batching, the workers or the point a run was resumed from; call `set_loader_epoch` (as
    `infinite_batches` does) for a new epoch's draws.
    Only the "image" column is read, so other columns (captions, extra images) are never decoded."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_dataloader: batch_size must be an integer >= 1, got {batch_size!r}.")
    if num_workers < 0:
        raise ValueError(f"make_dataloader: num_workers must be >= 0, got {num_workers}.")
    if not callable(transform):
        raise ValueError(f"make_dataloader: transform must be callable, got {type(transform).__name__}.")
    datasets = _import_datasets()
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise ValueError(
            f"make_dataloader: expected a datasets.Dataset or IterableDataset, got {type(dataset).__name__}."
        )
    columns = dataset.column_names
    if columns is not None and "image" not in columns:
        raise ValueError(f"make_dataloader: the dataset has no 'image' column (columns: {columns}); "
                         "load it with load_image_dataset, which names the image column.")
    collate = ImageBatchCollator()
    if columns is not None:
        dataset = dataset.select_columns(["image"])

    if isinstance(dataset, datasets.IterableDataset):
        if shuffle:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        # A generator of its own also for streams: without one, every new iterator (each epoch, each resume) draws
        # its worker seed from the global torch RNG, which a resumed run would then be one draw off.
        return torch.utils.data.DataLoader(
            _TransformedStream(dataset, transform, seed), batch_size=batch_size, num_workers=num_workers,
            drop_last=drop_last, collate_fn=collate, generator=torch.Generator().manual_seed(seed),
        )

    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"make_dataloader: {len(dataset)} examples is fewer than batch_size={batch_size} with drop_last=True, "
            "so no batch would ever be produced."
        )
    return torch.utils.data.DataLoader(
        _TransformedImages(dataset, transform, seed),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate,
    )


def set_loader_epoch(dataloader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Tell a loader which epoch starts: its sampler's shuffle (DistributedSampler, Accelerate's seedable sampler),
    a streaming dataset's shuffle and the per-example augmentation streams of `make_dataloader` all depend on it.
    Every owner that has `set_epoch` is told: Accelerate's prepared loaders forward the epoch to their sampler but,
    when that has one, not to their dataset."""
    for owner in (dataloader, getattr(dataloader, "sampler", None), getattr(dataloader, "dataset", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)


@dataclass
class DataPosition:
    """Where a loop counted in steps stands in its data: the epoch, and the batches of it consumed so far. Batches,
    not steps, are counted, so gradient accumulation, batches dropped for a non-finite loss and streaming datasets (no
    length) all resume where they were. A checkpoint records it; `infinite_batches` resumes from it."""

    epoch: int = 0
    batches_in_epoch: int = 0


def infinite_batches(
    dataloader: torch.utils.data.DataLoader,
    position: DataPosition | None = None,
    skip_first_batches: Callable[[Any, int], Any] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches forever, epoch after epoch, for loops counted in steps, from `position` on (default: the start), which
    it keeps up to date for the caller's checkpoints. Each epoch first calls `set_loader_epoch`, so shuffled orders and
    augmentations change between epochs (and match across processes).

    Resuming inside an epoch leaves out the batches it already gave: `skip_first_batches(dataloader, n)` returns a
    loader without them (Accelerate's `Accelerator.skip_first_batches` skips without decoding), else they are drawn
    and dropped. The augmentations of an example depend only on (seed, epoch, example) (see `make_dataloader`), so
    the batches after a resume are those an uninterrupted loop saw. Raises ValueError if an epoch yields no batch
    and skipped none (the checkpoint was taken at its end), instead of spinning forever."""
    position = DataPosition() if position is None else position
    while True:
        set_loader_epoch(dataloader, position.epoch)
        skip = position.batches_in_epoch
        if not skip:
            loader = dataloader
        elif skip_first_batches is not None:
            loader = skip_first_batches(dataloader, skip)
        else:
            loader = itertools.islice(dataloader, skip, None)
        yielded = False
        for batch in loader:
            yielded = True
            position.batches_in_epoch += 1
            yield batch
        if not yielded and not skip:
            raise ValueError(
                f"infinite_batches: epoch {position.epoch} yielded no batch (dataset smaller than one batch?)."
            )
        position.epoch += 1
        position.batches_in_epoch = 0


__all__ = [
    "DataPosition",
    "ImageBatchCollator",
    "eval_transform",
    "example_generator",
    "infinite_batches",
    "load_image_dataset",
    "make_dataloader",
    "random_resized_crop_box",
    "set_loader_epoch",
    "train_transform",
]
