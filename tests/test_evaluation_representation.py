"""Per-depth representation analysis: depth features, k-means (Fig. 6), cluster grids, probes, the LFW probe set."""

import numpy as np
import PIL.Image
import pytest
import torch

from evotok_hf import EvoTokConfig, EvoTokImageProcessor, EvoTokModel
from evotok_hf.evaluation import representation as rep


def spread_codes_model():
    """The tiny model with its codebooks shrunk to the scale of its encoder latents (std ~0.02), halving per depth as
    in a trained residual quantizer. At the default N(0, 1) init every position picks the same code at every depth,
    which would make every feature identical and these tests vacuous."""
    config = EvoTokConfig.from_preset("evotok-tiny")
    torch.manual_seed(0)
    model = EvoTokModel(config).eval()
    with torch.no_grad():
        model.quantizer.codebook.mul_(0.02 * 0.5 ** torch.arange(config.semantic_depth).view(-1, 1, 1))
    return model


@pytest.fixture(scope="module")
def tiny_model():
    return spread_codes_model()


@pytest.fixture(scope="module")
def lfw():
    return rep.lfw_probe_dataset(32)


@pytest.fixture
def images(tiny_config):
    g = torch.Generator().manual_seed(3)
    size = tiny_config.image_size
    return torch.rand(6, 3, size, size, generator=g) * 2 - 1


def hand_latents(model, codes, k):
    """Cumulative latent at depth k straight from the stacked codebook (depth, size, dim): (N, g, g, dim)."""
    codebook = model.quantizer.codebook.detach().numpy()
    codes = codes.numpy()
    return sum(codebook[d][codes[..., d]] for d in range(k))


# -- depth_features ----------------------------------------------------------------------------------------------
def test_latent_mean_features_match_a_hand_sum_of_codebook_rows(tiny_model, images):
    codes = tiny_model.encode(images).codes
    features = rep.depth_features(tiny_model, images, depths=[1, 2, 4], batch_size=4)
    assert list(features) == [1, 2, 4]
    for k, f in features.items():
        assert f.shape == (6, tiny_model.config.codebook_dim) and f.dtype == np.float32
        np.testing.assert_allclose(f, hand_latents(tiny_model, codes, k).mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_flatten_keeps_row_major_positions(tiny_model, images, tiny_config):
    g, dim = tiny_config.grid_size, tiny_config.codebook_dim
    codes = tiny_model.encode(images).codes
    flat = rep.depth_features(tiny_model, images, depths=[3], pool="flatten")[3]
    assert flat.shape == (6, g * g * dim)
    expected = hand_latents(tiny_model, codes, 3)  # (N, row, col, dim)
    np.testing.assert_allclose(flat.reshape(6, g, g, dim), expected, rtol=1e-5, atol=1e-5)


def test_semantic_features_are_pooled_decoder_outputs(tiny_model, images, tiny_config):
    codes = tiny_model.encode(images).codes
    features = rep.depth_features(tiny_model, images, depths=[2], kind="semantic", batch_size=5)
    assert features[2].shape == (6, tiny_config.teacher_dim)
    expected = tiny_model.get_semantic_features(codes[..., :2]).mean(dim=1).detach().numpy()
    np.testing.assert_allclose(features[2], expected, rtol=1e-4, atol=1e-5)
    flat = rep.depth_features(tiny_model, images, depths=[2], kind="semantic", pool="flatten")[2]
    assert flat.shape == (6, tiny_config.grid_size**2 * tiny_config.teacher_dim)


@pytest.mark.parametrize("bad", [[0], [5], [1, 5], []])
def test_depths_outside_the_model_raise(tiny_model, images, bad):
    with pytest.raises(ValueError, match="depths"):
        rep.depth_features(tiny_model, images, depths=bad)


def test_bad_kind_or_pool_raise(tiny_model, images):
    with pytest.raises(ValueError, match="kind"):
        rep.depth_features(tiny_model, images, depths=[1], kind="pixels")
    with pytest.raises(ValueError, match="pool"):
        rep.depth_features(tiny_model, images, depths=[1], pool="max")


def test_a_training_mode_model_is_not_updated(images):
    model = spread_codes_model().train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    rep.kmeans_by_depth(model, images, num_clusters=3)
    assert model.training
    for name, tensor in model.state_dict().items():  # codebooks and their EMA statistics alike
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)


# -- k-means -----------------------------------------------------------------------------------------------------
def test_position_kmeans_clusters_every_position_and_is_deterministic(tiny_model, images, tiny_config):
    g = tiny_config.grid_size
    first = rep.kmeans_by_depth(tiny_model, images, num_clusters=5, seed=1)
    again = rep.kmeans_by_depth(tiny_model, images, num_clusters=5, seed=1)
    assert list(first) == [1, 4]  # the paper's (1, 4, 8, 16) clipped to semantic_depth 4
    codes = tiny_model.encode(images).codes
    for k, result in first.items():
        assert len(np.unique(result.labels)) == 5
        assert result.depth == k and result.level == "position" and result.grid_size == g
        assert result.labels.shape == (6 * g * g,) and result.centers.shape == (5, tiny_config.codebook_dim)
        np.testing.assert_array_equal(result.labels, again[k].labels)
        np.testing.assert_array_equal(result.centers, again[k].centers)
        # the nearest lists hold exactly each cluster's members, ordered by their true distance to the centre
        vectors = hand_latents(tiny_model, codes, k).reshape(6 * g * g, -1)
        assert sorted(np.concatenate(result.nearest).tolist()) == list(range(6 * g * g))
        for cluster, members in enumerate(result.nearest):
            np.testing.assert_array_equal(np.sort(members), np.flatnonzero(result.labels == cluster))
            distances = np.linalg.norm(vectors[members] - result.centers[cluster], axis=1)
            assert np.all(np.diff(distances) >= -1e-5)
        inertia = sum(((vectors[m] - result.centers[c]) ** 2).sum() for c, m in enumerate(result.nearest))
        assert result.inertia == pytest.approx(inertia, rel=1e-4)


def test_cluster_features_recovers_well_separated_blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 20.0, 20.0]])
    truth = np.repeat(np.arange(3), 40)
    features = centres[truth] + rng.normal(size=(120, 3))
    result = rep.cluster_features(features, num_clusters=3, seed=0)
    # pure clusters: each found cluster is exactly one blob
    for cluster in range(3):
        assert len(np.unique(truth[result.labels == cluster])) == 1
    assert len(np.unique(result.labels)) == 3
    with pytest.raises(ValueError, match="num_clusters"):
        rep.cluster_features(features[:2], num_clusters=3)


def test_kmeans_clips_deep_depths_to_the_model(tiny_model, images):
    assert list(rep.kmeans_by_depth(tiny_model, images, depths=(16, 2, 8), num_clusters=2)) == [2, 4]
    with pytest.raises(ValueError, match="depths"):
        rep.kmeans_by_depth(tiny_model, images, depths=(0, 4))


def test_semantic_position_kmeans_clusters_decoder_outputs(tiny_model, images, tiny_config):
    g = tiny_config.grid_size
    result = rep.kmeans_by_depth(tiny_model, images, depths=[2], num_clusters=3, kind="semantic")[2]
    assert result.labels.shape == (6 * g * g,) and result.centers.shape == (3, tiny_config.teacher_dim)


def test_image_kmeans_separates_two_flat_colours(tiny_model, tiny_config):
    size = tiny_config.image_size
    black = torch.full((4, 3, size, size), -1.0)
    white = torch.full((4, 3, size, size), 1.0)
    pixel_values = torch.cat([black, white])
    features = rep.depth_features(tiny_model, pixel_values, depths=[1])[1]
    assert not np.allclose(features[0], features[-1])  # otherwise the test would mean nothing
    result = rep.kmeans_by_depth(tiny_model, pixel_values, depths=[1], num_clusters=2, level="image")[1]
    assert result.level == "image" and result.grid_size is None and result.labels.shape == (8,)
    assert len(set(result.labels[:4])) == 1 and len(set(result.labels[4:])) == 1
    assert result.labels[0] != result.labels[-1]


# -- cluster grid ------------------------------------------------------------------------------------------------
def expected_size(results, per_cluster, cell):
    width = 2 * rep.MARGIN + rep.LABEL_WIDTH + per_cluster * cell + (per_cluster - 1) * rep.CELL_GAP
    blocks = [rep.TITLE_HEIGHT + r.num_clusters * (cell + rep.CELL_GAP) - rep.CELL_GAP for r in results.values()]
    return width, 2 * rep.MARGIN + sum(blocks) + (len(blocks) - 1) * rep.BLOCK_GAP


def test_position_grid_shows_the_patch_under_each_member(tiny_model, images, tiny_config, tmp_path):
    g, size = tiny_config.grid_size, tiny_config.image_size
    results = rep.kmeans_by_depth(tiny_model, images, num_clusters=4)
    path = rep.save_cluster_grid(results, images, tmp_path / "grid" / "position.png", per_cluster=3)
    canvas = PIL.Image.open(path)
    assert canvas.format == "PNG" and canvas.size == expected_size(results, 3, rep.PATCH_CELL)
    assert canvas.size == rep.cluster_grid_size(results, per_cluster=3)
    # first block, first cluster, first cell: the patch of its most central member, enlarged 8 -> 32 px
    member = int(results[1].nearest[0][0])
    image_index, position = divmod(member, g * g)
    row, col = divmod(position, g)
    patch_px = size // g
    photo = np.asarray(EvoTokImageProcessor().postprocess(images[image_index : image_index + 1])[0])
    patch = photo[row * patch_px : (row + 1) * patch_px, col * patch_px : (col + 1) * patch_px]
    scale = rep.PATCH_CELL // patch_px
    enlarged = patch.repeat(scale, axis=0).repeat(scale, axis=1)
    top, left = rep.MARGIN + rep.TITLE_HEIGHT, rep.MARGIN + rep.LABEL_WIDTH
    shown = np.asarray(canvas.convert("RGB"))[top : top + rep.PATCH_CELL, left : left + rep.PATCH_CELL]
    np.testing.assert_array_equal(shown, enlarged)


def test_image_grid_from_pil_images_and_empty_cells(tiny_model, images, tmp_path):
    pil_images = EvoTokImageProcessor().postprocess(images)
    results = rep.kmeans_by_depth(tiny_model, images, depths=[2, 4], num_clusters=3, level="image")
    path = rep.save_cluster_grid(results, pil_images, tmp_path / "image.png", per_cluster=7)
    canvas = PIL.Image.open(path)
    assert canvas.size == expected_size(results, 7, rep.IMAGE_CELL)
    # 6 images in 3 clusters: no cluster fills 7 cells, so the last cell of every row is empty
    top = rep.MARGIN + rep.TITLE_HEIGHT
    left = rep.MARGIN + rep.LABEL_WIDTH + 6 * (rep.IMAGE_CELL + rep.CELL_GAP)
    last = np.asarray(canvas.convert("RGB"))[top : top + rep.IMAGE_CELL, left : left + rep.IMAGE_CELL]
    assert (last == np.array(rep.EMPTY_CELL, dtype=np.uint8)).all()
    with pytest.raises(ValueError, match="does not match"):
        rep.save_cluster_grid(results, pil_images[:3], tmp_path / "bad.png")


# -- probes ------------------------------------------------------------------------------------------------------
def test_probe_accuracy_is_perfect_on_separable_blobs():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 50)
    features = rng.normal(size=(150, 6)) + 10.0 * np.eye(6)[labels]
    result = rep.probe_accuracy(features, labels, seed=0)
    assert result["linear_accuracy"] == 1.0 and result["knn_accuracy"] == 1.0
    assert result["num_test"] == 45 and result["chance_accuracy"] == pytest.approx(1 / 3)


def test_probe_accuracy_is_near_chance_on_random_labels():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(400, 10))
    labels = rng.permutation(np.repeat([0, 1], 200))
    result = rep.probe_accuracy(features, labels, seed=0)
    assert result["chance_accuracy"] == 0.5
    assert abs(result["linear_accuracy"] - 0.5) < 0.15 and abs(result["knn_accuracy"] - 0.5) < 0.15


def test_probe_by_depth_on_lfw_with_the_tiny_model(tiny_model, lfw):
    pixel_values, labels = lfw
    results = rep.probe_by_depth(tiny_model, pixel_values, labels, depths=[1, 2, 4])
    assert list(results) == [1, 2, 4]
    for scores in results.values():
        assert 0.0 <= scores["linear_accuracy"] <= 1.0 and 0.0 <= scores["knn_accuracy"] <= 1.0
        assert scores["chance_accuracy"] == 0.5 and scores["num_test"] == 60
    assert rep.probe_by_depth(tiny_model, pixel_values, labels, depths=[1, 2, 4]) == results


# -- LFW probe set -----------------------------------------------------------------------------------------------
def test_lfw_probe_dataset(lfw):
    pixel_values, labels = lfw
    assert pixel_values.shape == (200, 3, 32, 32) and pixel_values.dtype == torch.float32
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    assert labels.tolist() == [1] * 100 + [0] * 100
    torch.testing.assert_close(pixel_values[:, 0], pixel_values[:, 2])  # grey, replicated to RGB


def test_lfw_at_native_size_is_the_skimage_data_in_order():
    skimage_data = pytest.importorskip("skimage.data")
    pixel_values, _ = rep.lfw_probe_dataset(25)
    expected = torch.from_numpy(skimage_data.lfw_subset()).float() * 2 - 1
    torch.testing.assert_close(pixel_values[:, 1], expected, rtol=0, atol=1.01 / 255)
