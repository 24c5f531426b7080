"""Training data: transforms, image sources (imagefolder, parquet, webdataset, streaming, bundled) and loaders.

Offline and CPU-only: every dataset is written into tmp_path from the real bundled photos or plain colours.
"""

import io
import itertools
import json
import random
import tarfile

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from evotok_hf.bundled_photos import BUNDLED_PHOTOS, DEFAULT_HELD_OUT, bundled_photo_dataset, load_bundled_photos
from evotok_hf.processing import EvoTokImageProcessor
from evotok_hf.image_datasets import (
    DataPosition,
    ImageBatchCollator,
    eval_transform,
    example_generator,
    infinite_batches,
    load_image_dataset,
    make_dataloader,
    random_resized_crop_box,
    set_loader_epoch,
    train_transform,
)

SIZE = 32


@pytest.fixture(scope="module")
def processor():
    return EvoTokImageProcessor(size={"height": SIZE, "width": SIZE})


@pytest.fixture(scope="module")
def photos():
    """One photo per mode the transforms must handle: RGB (451x300), RGBA, L."""
    return load_bundled_photos(["chelsea", "logo", "camera"])


@pytest.fixture(scope="module")
def small_photos(photos):
    """Three small RGB crops of real photos, for writing datasets to disk quickly."""
    chelsea = photos["chelsea"]
    return {
        f"photo{i}": chelsea.crop((60 * i, 40 * i, 60 * i + 48, 40 * i + 40)).resize((48, 40)) for i in range(3)
    }


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _to_minus_one_one(array):
    return torch.from_numpy(np.asarray(array, dtype=np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)


def _colour_dataset(n=10):
    """Image i is the constant colour 10*i, so a batch's first pixel tells which examples it holds."""
    images = [PIL.Image.new("RGB", (12, 10), (10 * i,) * 3) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": list(range(n))}, features=features)


def _ids(batch):
    return ((batch["pixel_values"][:, 0, 0, 0] + 1) / 2 * 255 / 10).round().long().tolist()


def _cache(tmp_path):
    return str(tmp_path / "hf_cache")


# ----------------------------------------------------------------------------------------------------- transforms
def test_eval_transform_is_shortest_side_resize_then_centre_crop(processor, photos):
    transform = eval_transform(processor)
    for photo in photos.values():
        out = transform(photo)
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
        assert -1 <= out.min() and out.max() <= 1
        direct = processor(photo, resize_mode="center_crop", return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(out, direct, rtol=0, atol=0)
    # Independent computation with PIL: 451x300 -> 48x32 (bicubic), then the centre 32 columns (offset 8).
    # A processor whose own default is "squash" still gets the centre crop.
    squashing = EvoTokImageProcessor(size={"height": SIZE, "width": SIZE}, resize_mode="squash")
    expected = photos["chelsea"].resize((48, 32), PIL.Image.Resampling.BICUBIC).crop((8, 0, 8 + SIZE, SIZE))
    torch.testing.assert_close(eval_transform(squashing)(photos["chelsea"]), _to_minus_one_one(expected))


def test_train_transform_output_for_every_image_mode(processor, photos):
    grey16 = PIL.Image.fromarray((np.asarray(photos["camera"], dtype=np.uint16) * 257))
    images = [*photos.values(), photos["chelsea"].convert("P"), grey16]
    assert {image.mode for image in images} == {"RGB", "RGBA", "L", "P", "I;16"}
    transform = train_transform(processor, generator=random.Random(0))
    for image in images:
        out = transform(image)
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
        assert -1 <= out.min() and out.max() <= 1 and out.std() > 0.05


def test_train_transform_whole_image_crop_equals_processor_squash(processor, photos):
    chelsea = photos["chelsea"]
    aspect = chelsea.width / chelsea.height
    transform = train_transform(processor, scale=(1.0, 1.0), ratio=(aspect, aspect), flip_prob=0.0)
    expected = _to_minus_one_one(chelsea.resize((SIZE, SIZE), PIL.Image.Resampling.BICUBIC))
    torch.testing.assert_close(transform(chelsea), expected)


def test_train_transform_is_reproducible_with_a_seeded_generator(processor, photos):
    chelsea = photos["chelsea"]
    first = train_transform(processor, generator=random.Random(3))
    second = train_transform(processor, generator=random.Random(3))
    other = train_transform(processor, generator=random.Random(4))
    outputs = [first(chelsea) for _ in range(3)]
    for out in outputs:
        torch.testing.assert_close(second(chelsea), out, rtol=0, atol=0)
    assert not torch.equal(outputs[0], outputs[1])  # successive draws differ
    assert not torch.equal(other(chelsea), outputs[0])


def test_flip_mirrors_the_same_crop(processor, photos):
    chelsea = photos["chelsea"]
    plain = train_transform(processor, flip_prob=0.0, generator=random.Random(7))
    flipped = train_transform(processor, flip_prob=1.0, generator=random.Random(7))
    for _ in range(3):
        unflipped = plain(chelsea)
        mirrored = flipped(chelsea)
        torch.testing.assert_close(mirrored, torch.flip(unflipped, dims=(-1,)), rtol=0, atol=0)
        assert not torch.allclose(mirrored, unflipped, atol=0.1)
    # Independently of the implementation: the flip is left-right (PIL's mirror of the whole photo).
    aspect = chelsea.width / chelsea.height
    whole = train_transform(processor, scale=(1.0, 1.0), ratio=(aspect, aspect), flip_prob=1.0)
    pil_mirror = chelsea.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    pil_mirror = pil_mirror.resize((SIZE, SIZE), PIL.Image.Resampling.BICUBIC)
    torch.testing.assert_close(whole(chelsea), _to_minus_one_one(pil_mirror), rtol=0, atol=2.5 / 255 * 2)


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = random.Random(0)
    width, height = 400, 300
    boxes = [random_resized_crop_box(width, height, (0.35, 1.0), (3 / 4, 4 / 3), rng) for _ in range(300)]
    assert len(set(boxes)) > 250
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        crop_w, crop_h = right - left, bottom - top
        assert 0.35 - 0.01 <= crop_w * crop_h / (width * height) <= 1.0
        assert 3 / 4 - 0.01 <= crop_w / crop_h <= 4 / 3 + 0.01
    areas = [(r - l) * (b - t) / (width * height) for l, t, r, b in boxes]
    assert min(areas) < 0.45 and max(areas) > 0.8  # the whole range is used


def test_random_resized_crop_box_falls_back_to_a_centre_crop():
    # A square crop of >= 90% of a 1000x10 strip cannot fit: the largest centred square is used instead.
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), (1.0, 1.0), random.Random(0)) == (495, 0, 505, 10)
    assert random_resized_crop_box(10, 1000, (0.9, 1.0), (1.0, 1.0), random.Random(0)) == (0, 495, 10, 505)


@pytest.mark.parametrize(
    "kwargs",
    [{"scale": (0.5, 0.2)}, {"scale": (0.0, 1.0)}, {"ratio": (0.0, 1.0)}, {"ratio": (2.0, 1.0)}, {"flip_prob": 1.5}],
)
def test_train_transform_rejects_bad_arguments(processor, kwargs):
    with pytest.raises(ValueError):
        train_transform(processor, **kwargs)


def test_transforms_reject_non_images(processor):
    with pytest.raises(ValueError, match="PIL image"):
        train_transform(processor)(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="PIL image"):
        eval_transform(processor)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="size"):
        random_resized_crop_box(0, 10)


# -------------------------------------------------------------------------------------------------------- sources
def test_imagefolder_with_captions(tmp_path, small_photos):
    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for name, image in small_photos.items():
            image.save(folder / f"{name}.png")
            metadata.write(json.dumps({"file_name": f"{name}.png", "text": f"caption of {name}"}) + "\n")
    dataset = load_image_dataset(str(folder), cache_dir=_cache(tmp_path))
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 3
    assert set(dataset.column_names) == {"image", "text"}
    for example in dataset:
        name = example["text"].removeprefix("caption of ")
        np.testing.assert_array_equal(_pixels(example["image"]), _pixels(small_photos[name]))  # PNG is lossless


def _write_parquet(path, small_photos, image_name="picture"):
    features = datasets.Features({"caption": datasets.Value("string"), image_name: datasets.Image()})
    data = {"caption": list(small_photos), image_name: list(small_photos.values())}
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))


def test_parquet_file_glob_and_directory(tmp_path, small_photos):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_parquet(shards / "part-0.parquet", small_photos)
    by_file = load_image_dataset(str(shards / "part-0.parquet"), cache_dir=_cache(tmp_path))
    assert by_file.column_names == ["caption", "image"]  # the Image column "picture" was found and renamed
    for example in by_file:
        np.testing.assert_array_equal(_pixels(example["image"]), _pixels(small_photos[example["caption"]]))
    by_glob = load_image_dataset(str(shards / "*.parquet"), split="validation", cache_dir=_cache(tmp_path))
    by_directory = load_image_dataset(str(shards), cache_dir=_cache(tmp_path))
    assert by_glob["caption"] == by_directory["caption"] == list(small_photos)


def test_image_column_from_raw_bytes_or_named_explicitly(tmp_path, small_photos):
    png_bytes = []
    for image in small_photos.values():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png_bytes.append(buffer.getvalue())
    raw = datasets.Dataset.from_dict({"n": [0, 1, 2], "jpg": png_bytes})  # a plain binary column, named "jpg"
    raw.to_parquet(str(tmp_path / "raw.parquet"))
    dataset = load_image_dataset(str(tmp_path / "raw.parquet"), cache_dir=_cache(tmp_path))
    assert isinstance(dataset.features["image"], datasets.Image)
    np.testing.assert_array_equal(_pixels(dataset[1]["image"]), _pixels(small_photos["photo1"]))

    photo_list = list(small_photos.values())
    two = datasets.Features({"image": datasets.Image(), "target": datasets.Image()})
    datasets.Dataset.from_dict({"image": photo_list, "target": photo_list[::-1]}, features=two).to_parquet(
        str(tmp_path / "two.parquet")
    )
    chosen = load_image_dataset(str(tmp_path / "two.parquet"), image_column="target", cache_dir=_cache(tmp_path))
    assert chosen.column_names == ["image"]
    np.testing.assert_array_equal(_pixels(chosen[0]["image"]), _pixels(photo_list[-1]))


def _write_webdataset_shard(path, small_photos):
    with tarfile.open(path, "w") as shard:
        for index, (name, image) in enumerate(small_photos.items()):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            for suffix, payload in (("jpg", buffer.getvalue()), ("txt", name.encode())):
                info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                info.size = len(payload)
                shard.addfile(info, io.BytesIO(payload))


def test_webdataset_shards(tmp_path, small_photos):
    _write_webdataset_shard(tmp_path / "shard-000000.tar", small_photos)
    dataset = load_image_dataset(str(tmp_path / "*.tar"), cache_dir=_cache(tmp_path))
    assert len(dataset) == 3 and "image" in dataset.column_names and "jpg" not in dataset.column_names
    for example in dataset:
        original = _pixels(small_photos[example["txt"]])
        assert np.abs(_pixels(example["image"]) - original).mean() < 4  # JPEG at quality 95
    stream = load_image_dataset([str(tmp_path / "shard-000000.tar")], streaming=True, cache_dir=_cache(tmp_path))
    assert isinstance(stream, datasets.IterableDataset)
    assert next(iter(stream))["image"].size == (48, 40)


def test_streaming_batches_match_map_style(tmp_path, small_photos, processor):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, image in small_photos.items():
        image.save(folder / f"{name}.png")
    stream = load_image_dataset(str(folder), streaming=True, cache_dir=_cache(tmp_path))
    assert isinstance(stream, datasets.IterableDataset)
    mapped = load_image_dataset(str(folder), cache_dir=_cache(tmp_path))
    transform = eval_transform(processor)
    stream_batches = list(make_dataloader(stream, transform, batch_size=2, shuffle=False))
    mapped_batches = list(make_dataloader(mapped, transform, batch_size=2, shuffle=False))
    assert len(stream_batches) == len(mapped_batches) == 1  # 3 images, drop_last
    expected = torch.stack([transform(mapped[i]["image"]) for i in range(2)])
    for batch in (stream_batches[0], mapped_batches[0]):
        assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(batch["pixel_values"], expected, rtol=0, atol=0)


def test_streaming_shuffle_is_seeded_and_changes_per_epoch(processor):
    stream = _colour_dataset(10).to_iterable_dataset()
    transform = eval_transform(processor)

    def epoch_order(seed, epochs=1, shuffle=True):
        loader = make_dataloader(stream, transform, batch_size=5, shuffle=shuffle, seed=seed)
        batches = infinite_batches(loader)
        return [sum((_ids(next(batches)) for _ in range(2)), []) for _ in range(epochs)]

    first, second = epoch_order(seed=0, epochs=2)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # set_epoch reshuffles
    assert epoch_order(seed=0) == [first]
    assert epoch_order(seed=1) != [first]
    assert epoch_order(seed=0, shuffle=False) == [list(range(10))]


def test_hub_ids_go_to_load_dataset(monkeypatch, small_photos):
    calls = []
    features = datasets.Features({"img": datasets.Image()})
    hub_dataset = datasets.Dataset.from_dict({"img": list(small_photos.values())}, features=features)

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        if path == "org/missing":
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return hub_dataset.to_iterable_dataset() if kwargs["streaming"] else hub_dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stream = load_image_dataset("org/photos", split="train[:2]", streaming=True, name="small")
    assert calls == [("org/photos", {"data_files": None, "split": "train[:2]", "streaming": True, "name": "small"})]
    assert isinstance(stream, datasets.IterableDataset) and stream.column_names == ["image"]
    with pytest.raises(ValueError, match="org/missing"):
        load_image_dataset("org/missing")


# ------------------------------------------------------------------------------------------------ bundled photos
@pytest.fixture(scope="module")
def bundled_train():
    return bundled_photo_dataset("train", crops_per_photo=2, crop_size=24, seed=0)


def test_bundled_splits_are_disjoint_by_photo(bundled_train):
    validation = bundled_photo_dataset("validation", crop_size=24)
    train_sources, validation_sources = set(bundled_train["source"]), set(validation["source"])
    assert train_sources == set(BUNDLED_PHOTOS) - set(DEFAULT_HELD_OUT)
    assert validation_sources == set(DEFAULT_HELD_OUT)
    assert len(bundled_train) == 2 * len(train_sources) and len(validation) == 5 * len(DEFAULT_HELD_OUT)
    assert bundled_train.column_names == ["image", "source"]
    assert all(image.size == (24, 24) for image in [*bundled_train["image"], *validation["image"]])
    # The first validation crop of a photo is its centre square: computed here with crop + resize.
    chelsea = load_bundled_photos(["chelsea"])["chelsea"]  # 451x300: centre square starts at x = 75
    expected = chelsea.crop((75, 0, 375, 300)).resize((24, 24), PIL.Image.Resampling.BICUBIC)
    first = validation[list(validation["source"]).index("chelsea")]["image"]
    difference = np.abs(_pixels(first) - _pixels(expected))  # PIL's box resize also reads just outside the box
    assert difference.mean() < 0.5 and difference.max() <= 4  # a 3-pixel shift gives mean 4, max 25


def test_bundled_held_out_photos_never_reach_train(bundled_train):
    held_out = ("astronaut", "camera")
    train = bundled_photo_dataset("train", crops_per_photo=2, crop_size=24, seed=0, held_out=held_out)
    assert not set(held_out) & set(train["source"])
    assert set(bundled_photo_dataset("test", crop_size=24, held_out=held_out)["source"]) == set(held_out)
    # Each photo has its own random stream: its crops do not depend on which other photos are held out.
    rocket = [_pixels(e["image"]) for e in bundled_train if e["source"] == "rocket"]
    rocket_again = [_pixels(e["image"]) for e in train if e["source"] == "rocket"]
    np.testing.assert_array_equal(np.stack(rocket), np.stack(rocket_again))


def test_bundled_is_deterministic_given_the_seed(bundled_train):
    again = bundled_photo_dataset("train", crops_per_photo=2, crop_size=24, seed=0)
    other = bundled_photo_dataset("train", crops_per_photo=2, crop_size=24, seed=1)
    pixels = np.stack([_pixels(image) for image in bundled_train["image"]])
    np.testing.assert_array_equal(pixels, np.stack([_pixels(image) for image in again["image"]]))
    assert not np.array_equal(pixels, np.stack([_pixels(image) for image in other["image"]]))
    assert len({p.tobytes() for p in pixels}) == len(pixels)  # no two crops alike


@pytest.mark.parametrize(
    "kwargs",
    [{"split": "dev"}, {"crops_per_photo": 0}, {"held_out": ("not-a-photo",)}, {"held_out": BUNDLED_PHOTOS}],
)
def test_bundled_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        bundled_photo_dataset(**kwargs)


def test_load_image_dataset_bundled():
    validation = load_image_dataset("bundled", split="validation", crop_size=16)
    assert isinstance(validation, datasets.Dataset) and len(validation) == 15
    stream = load_image_dataset("bundled", split="validation", streaming=True, crop_size=16)
    assert isinstance(stream, datasets.IterableDataset)
    assert next(iter(stream))["image"].size == (16, 16)


# --------------------------------------------------------------------------------------------------------- errors
def test_sources_that_match_nothing_raise_value_error(tmp_path):
    for missing in (tmp_path / "nowhere", tmp_path / "nothing-*.tar", tmp_path / "absent.parquet"):
        with pytest.raises(ValueError, match=str(missing.name).replace("*", r"\*")):
            load_image_dataset(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_image_dataset(str(tmp_path / "empty"), cache_dir=_cache(tmp_path))
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_image_dataset(str(tmp_path / "table.csv"))


def test_dataset_without_image_column_lists_its_columns(tmp_path):
    datasets.Dataset.from_dict({"caption": ["a", "b"], "n": [1, 2]}).to_parquet(str(tmp_path / "text.parquet"))
    with pytest.raises(ValueError, match=r"no image column among \['caption', 'n'\]"):
        load_image_dataset(str(tmp_path / "text.parquet"), cache_dir=_cache(tmp_path))
    with pytest.raises(ValueError, match="'photo' is not among"):
        load_image_dataset(str(tmp_path / "text.parquet"), image_column="photo", cache_dir=_cache(tmp_path))


# -------------------------------------------------------------------------------------------------------- loaders
def test_dataloader_batches_and_order(processor):
    dataset = _colour_dataset(10)
    transform = eval_transform(processor)
    ordered = list(make_dataloader(dataset, transform, batch_size=4, shuffle=False))
    assert [_ids(batch) for batch in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ordered[0]["pixel_values"].shape == (4, 3, SIZE, SIZE) and ordered[0]["pixel_values"].dtype == torch.float32
    kept = list(make_dataloader(dataset, transform, batch_size=4, shuffle=False, drop_last=False))
    assert [len(_ids(batch)) for batch in kept] == [4, 4, 2]

    def order(seed):
        return [i for batch in make_dataloader(dataset, transform, batch_size=5, seed=seed) for i in _ids(batch)]

    assert order(0) == order(0) and sorted(order(0)) == list(range(10))
    assert order(0) != list(range(10)) and order(0) != order(1)


def test_dataloader_workers_give_the_same_batches(processor):
    dataset = _colour_dataset(8)
    transform = eval_transform(processor)
    serial = list(make_dataloader(dataset, transform, batch_size=4, seed=3))
    parallel = list(make_dataloader(dataset, transform, batch_size=4, seed=3, num_workers=2))
    for a, b in zip(serial, parallel, strict=True):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)


def test_infinite_batches_cycles_reshuffled_epochs(processor):
    loader = make_dataloader(_colour_dataset(10), eval_transform(processor), batch_size=5, seed=0)
    batches = infinite_batches(loader)
    epochs = [_ids(next(batches)) + _ids(next(batches)) for _ in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    with pytest.raises(ValueError, match="no batch"):
        next(infinite_batches(torch.utils.data.DataLoader([])))


def test_infinite_batches_resume_from_a_data_position_and_keep_it_up_to_date():
    """The trainer's batches: a checkpoint records the position, a resumed loop continues with exactly the batches
    the uninterrupted one gave, whether the batches already seen are skipped by a function (the trainer passes
    Accelerate's) or drawn and dropped. The order of an epoch must depend on the epoch alone, as with Accelerate's
    seedable sampler (here a DistributedSampler of one process)."""
    ids = list(range(10))
    sampler = torch.utils.data.DistributedSampler(ids, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ids, batch_size=5, sampler=sampler)  # 2 batches an epoch
    uninterrupted = infinite_batches(loader)
    expected = [next(uninterrupted).tolist() for _ in range(6)]
    assert sorted(expected[2] + expected[3]) == ids and expected[:2] != expected[2:4]
    position = DataPosition()
    batches = infinite_batches(loader, position)
    for _ in range(3):
        next(batches)
    assert position == DataPosition(epoch=1, batches_in_epoch=1)

    skipped = []

    def skip_first_batches(dataloader, count):
        skipped.append(count)
        return itertools.islice(dataloader, count, None)

    for skip in (None, skip_first_batches):
        resumed = infinite_batches(loader, DataPosition(epoch=1, batches_in_epoch=1), skip)
        assert [next(resumed).tolist() for _ in range(3)] == expected[3:6]
    assert skipped == [1]
    # a checkpoint taken after the last batch of an epoch goes on with the next epoch
    assert next(infinite_batches(loader, DataPosition(epoch=0, batches_in_epoch=2))).tolist() == expected[2]


def _photo_dataset(photos, n=6):
    """n different 40x32 crops of a real photo, so random crops and flips show in the pixels."""
    chelsea = photos["chelsea"].convert("RGB")
    images = [chelsea.crop((50 * i, 20 * i, 50 * i + 160, 20 * i + 128)).resize((40, 32)) for i in range(n)]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


def _epochs(loader, epochs=2, disturb=False):
    """Each epoch's batches; `disturb` draws from Python's global random between batches, as other code may."""
    out = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        batches = []
        for batch in loader:
            batches.append(batch["pixel_values"])
            if disturb:
                random.random()
        out.append(torch.cat(batches))
    return out


def test_train_augmentations_depend_only_on_seed_epoch_and_example(processor, photos):
    dataset = _photo_dataset(photos)
    transform = train_transform(processor)

    def loader(**kwargs):
        return make_dataloader(dataset, transform, batch_size=2, **{"seed": 5, **kwargs})

    random.seed(0)
    reference = _epochs(loader())
    random.seed(1)  # the global random state plays no part
    for other in (_epochs(loader(), disturb=True), _epochs(loader(num_workers=2))):
        for a, b in zip(reference, other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(reference[0], reference[1])  # a new epoch draws new augmentations...
    unshuffled = _epochs(loader(shuffle=False))
    assert not torch.equal(unshuffled[0], unshuffled[1])  # ...even for the same examples in the same order
    assert not torch.equal(_epochs(loader(seed=6), epochs=1)[0], reference[0])
    # The stream of one example is `example_generator(seed, epoch, index)`, whatever the batch it lands in.
    expected = transform(dataset[3]["image"], generator=example_generator(5, 1, 3))
    assert any(torch.equal(expected, row) for row in reference[1])


def test_streaming_augmentations_ignore_the_global_random_state(processor, photos):
    stream = _photo_dataset(photos).to_iterable_dataset()
    transform = train_transform(processor)
    random.seed(0)
    reference = _epochs(make_dataloader(stream, transform, batch_size=2, seed=5))
    random.seed(1)
    disturbed = _epochs(make_dataloader(stream, transform, batch_size=2, seed=5), disturb=True)
    for a, b in zip(reference, disturbed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(reference[0], reference[1])


def test_make_dataloader_rejects_bad_inputs(processor):
    transform = eval_transform(processor)
    dataset = _colour_dataset(4)
    for batch_size in (0, -1, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            make_dataloader(dataset, transform, batch_size=batch_size)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        make_dataloader(dataset, transform, batch_size=8)
    with pytest.raises(ValueError, match="no 'image' column"):
        make_dataloader(dataset.rename_column("image", "picture"), transform, batch_size=2)
    with pytest.raises(ValueError, match="datasets.Dataset"):
        make_dataloader([PIL.Image.new("RGB", (4, 4))] * 4, transform, batch_size=2)
    with pytest.raises(ValueError, match="same-size"):
        ImageBatchCollator()([{"pixel_values": torch.zeros(3, 4, 4)}, {"pixel_values": torch.zeros(3, 5, 5)}])
