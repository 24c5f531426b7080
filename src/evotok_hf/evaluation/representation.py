"""What the cumulative latents encode at each depth: k-means clusters (the paper's Fig. 6) and linear / k-NN probes.

A residual quantizer gives every grid position a trajectory of `num_depths` codes; the sum of the first k code
embeddings is the *cumulative latent* at depth k (any k up to `num_depths`; the semantic decoder reads k up to
`semantic_depth`). EvoTok (arXiv 2603.12108, Fig. 6) clusters these latents at depths 1, 4, 8 and 16 and finds that
shallow depths group by colour and texture and deep depths by semantics. This module reproduces that view at two
levels:

- "position": one vector per grid position (N * grid * grid vectors of `codebook_dim`), the token-level view of the
  figure; a cluster is shown as the image patches under its most central positions.
- "image": one vector per image (the position vectors mean-pooled), shown as whole-image thumbnails.

The probes measure the same thing with labels: how linearly separable (logistic regression) and how locally
consistent (k-NN) a labelling is in the features of each depth. `lfw_probe_dataset` gives a real, offline labelled
set (faces vs. non-faces from scikit-image).

scikit-learn / scikit-image are imported lazily (the `eval` extra brings them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

PAPER_DEPTHS = (1, 4, 8, 16)
KINDS = ("latent", "semantic")
POOLS = ("mean", "flatten")
LEVELS = ("position", "image")

KMEANS_N_INIT = 10
PROBE_MAX_ITER = 2000

# save_cluster_grid layout, in pixels
PATCH_CELL = 32  # a grid position's patch, upscaled to be visible
IMAGE_CELL = 64  # a whole-image thumbnail
CELL_GAP = 2
LABEL_WIDTH = 56  # left column: cluster index and size
TITLE_HEIGHT = 20  # strip above each depth's block
BLOCK_GAP = 10
MARGIN = 6
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (224, 224, 224)
TEXT = (0, 0, 0)


def _require_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        raise ImportError("representation analysis needs scikit-learn: pip install 'evotok_hf[eval]'") from err


@contextlib.contextmanager
def _inference(model):
    """No gradients and eval mode (a training-mode encode would EMA-update the codebooks); the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def deepest_depth(model, kind: str = "latent") -> tuple[int, str]:
    """The deepest depth at which `kind` features exist, with the config field it comes from: cumulative latents at
    every depth of the trajectory (`num_depths`), semantic features up to `semantic_depth` (the semantic decoder
    reads no longer sums)."""
    _check_choice("kind", kind, KINDS)
    name = "num_depths" if kind == "latent" else "semantic_depth"
    return getattr(model.config, name), name


def _check_depths(model, depths: Sequence[int] | None, kind: str) -> list[int]:
    max_depth, name = deepest_depth(model, kind)
    if depths is None:
        return list(range(1, max_depth + 1))
    depths = [int(k) for k in depths]
    bad = [k for k in depths if not 1 <= k <= max_depth]
    if not depths or bad:
        raise ValueError(f"depths must be non-empty integers in 1..{max_depth} ({name}), got {depths}.")
    return depths


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def _encode(model, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = model.device
    return torch.cat([model.encode(chunk.to(device)).codes for chunk in pixel_values.split(batch_size)])


def _position_features(
    model, codes: torch.Tensor, depths: list[int], kind: str, batch_size: int
) -> dict[int, np.ndarray]:
    """Depth -> per-position features (N, grid * grid, F) as float32 numpy, from codes (N, grid, grid, D)."""
    chunks: dict[int, list[torch.Tensor]] = {k: [] for k in depths}
    deepest = max(depths)
    for batch in codes.split(batch_size):
        if kind == "latent":
            # one gather for all depths: the running sums (B, grid, grid, deepest, dim)
            cumulative = model.quantizer.embed_codes(batch[..., :deepest], return_cumulative=True)
            for k in depths:
                chunks[k].append(cumulative[..., k - 1, :].flatten(1, 2))
        else:
            for k in depths:
                chunks[k].append(model.get_semantic_features(batch[..., :k]))
    return {k: torch.cat(parts).float().cpu().numpy() for k, parts in chunks.items()}


def _pool(per_position: np.ndarray, pool: str) -> np.ndarray:
    if pool == "mean":
        return per_position.mean(axis=1)
    return per_position.reshape(per_position.shape[0], -1)


def depth_features(
    model,
    pixel_values: torch.Tensor,
    depths: Sequence[int] | None = None,
    kind: str = "latent",
    pool: str = "mean",
    batch_size: int = 16,
) -> dict[int, np.ndarray]:
    """Image-level features at each depth k: depth -> float32 array (N, F).

    kind "latent": the cumulative latent at depth k (sum of the first k code embeddings, `codebook_dim` per position),
    mean-pooled over positions (pool "mean", F = codebook_dim) or flattened in row-major position order (pool
    "flatten", F = grid * grid * codebook_dim).
    kind "semantic": `model.get_semantic_features(codes[..., :k])`, pooled the same way (F = teacher_dim for "mean").

    The images (N, 3, S, S) in [-1, 1] are encoded once; every depth reuses the codes. `depths=None` means all of
    1..num_depths for "latent", 1..semantic_depth for "semantic". Raises ValueError for depths outside that range.
    """
    _check_choice("kind", kind, KINDS)
    _check_choice("pool", pool, POOLS)
    depths = _check_depths(model, depths, kind)
    with _inference(model):
        codes = _encode(model, pixel_values, batch_size)
        per_position = _position_features(model, codes, sorted(set(depths)), kind, batch_size)
    return {k: _pool(per_position[k], pool) for k in depths}


@dataclass
class KMeansResult:
    """k-means clustering of one depth's features.

    labels (`np.ndarray` of shape `(num_vectors,)`): cluster of each vector. For level "position" vector
        i is position (i % grid^2) // grid, i % grid (row, column) of image i // grid^2.
    centers (`np.ndarray` of shape `(num_clusters, F)`): the cluster centres.
    inertia (`float`): sum of squared distances of the vectors to their centre.
    nearest (`list[np.ndarray]`): for each cluster, the indices of all its members, nearest the centre first (ties
        broken by index); empty for an empty cluster.
    depth / level / grid_size: what was clustered (grid_size is set for level "position" only).
    """

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    nearest: list[np.ndarray]
    depth: int | None = None
    level: str | None = None
    grid_size: int | None = None

    @property
    def num_clusters(self) -> int:
        return len(self.centers)


def cluster_features(features: np.ndarray, num_clusters: int = 8, seed: int = 0) -> KMeansResult:
    """sklearn k-means (`KMEANS_N_INIT` restarts, `random_state=seed`) on features (num_vectors, F), with each
    cluster's members sorted by their Euclidean distance to its centre."""
    _require_sklearn()
    from sklearn.cluster import KMeans

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must have shape (num_vectors, F), got {features.shape}.")
    if not 1 <= num_clusters <= len(features):
        raise ValueError(f"num_clusters must be in 1..{len(features)} (the number of vectors), got {num_clusters}.")
    kmeans = KMeans(n_clusters=num_clusters, n_init=KMEANS_N_INIT, random_state=seed).fit(features)
    labels = kmeans.labels_.astype(np.int64)
    centers = kmeans.cluster_centers_
    distances = np.linalg.norm(features - centers[labels], axis=1)
    nearest = []
    for cluster in range(num_clusters):
        members = np.flatnonzero(labels == cluster)
        nearest.append(members[np.argsort(distances[members], kind="stable")])
    return KMeansResult(labels=labels, centers=centers, inertia=float(kmeans.inertia_), nearest=nearest)


def kmeans_by_depth(
    model,
    pixel_values: torch.Tensor,
    depths: Sequence[int] = PAPER_DEPTHS,
    num_clusters: int = 8,
    seed: int = 0,
    level: str = "position",
    kind: str = "latent",
    batch_size: int = 16,
) -> dict[int, KMeansResult]:
    """k-means of the cumulative latents at each depth (the paper's Fig. 6): depth -> `KMeansResult`.

    Depths beyond the deepest one of `kind` (`deepest_depth`: num_depths for latents, semantic_depth for semantic
    features) are clipped to it and duplicates dropped, so the default, the paper's (1, 4, 8, 16), gives (1, 4) on a
    4-depth model; depths below 1 raise ValueError. Results are in increasing depth.

    level "position" clusters the N * grid * grid per-position vectors; level "image" clusters
    `depth_features(..., pool="mean")`, one vector per image. kind "semantic" clusters the semantic-decoder features
    instead of the latents. The images (N, 3, S, S) in [-1, 1] are encoded once.
    """
    _check_choice("level", level, LEVELS)
    _check_choice("kind", kind, KINDS)
    deepest = deepest_depth(model, kind)[0]
    depths = _check_depths(model, sorted({min(int(k), deepest) for k in depths}), kind)
    with _inference(model):
        codes = _encode(model, pixel_values, batch_size)
        per_position = _position_features(model, codes, depths, kind, batch_size)
    results = {}
    for k in depths:
        if level == "position":
            features = per_position[k].reshape(-1, per_position[k].shape[-1])
            grid_size = model.config.grid_size
        else:
            features = _pool(per_position[k], "mean")
            grid_size = None
        result = cluster_features(features, num_clusters=num_clusters, seed=seed)
        result.depth, result.level, result.grid_size = k, level, grid_size
        results[k] = result
    return results


def label_nmi(cluster_labels, labels, mask=None) -> float:
    """Normalised mutual information (sklearn's `normalized_mutual_info_score`, arithmetic normalisation) between a
    clustering and a labelling of the same vectors, over the vectors `mask` selects (all by default): 1 when the
    clusters are exactly the label classes (up to renaming), 0 when independent of them."""
    _require_sklearn()
    from sklearn.metrics import normalized_mutual_info_score

    cluster_labels, labels = np.asarray(cluster_labels), np.asarray(labels)
    if cluster_labels.ndim != 1 or labels.shape != cluster_labels.shape:
        raise ValueError(f"cluster_labels and labels must be 1-D of one length, got {cluster_labels.shape} and "
                         f"{labels.shape}.")  # fmt: skip
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask must have the labels' shape {labels.shape}, got {mask.shape}.")
        cluster_labels, labels = cluster_labels[mask], labels[mask]
    if len(labels) == 0:
        raise ValueError("label_nmi needs at least one vector (the mask selects none).")
    return float(normalized_mutual_info_score(labels, cluster_labels))


def nmi_by_depth(result_by_depth: dict[int, KMeansResult], labels, mask=None) -> dict[int, float]:
    """`label_nmi` of each depth's k-means clusters (`kmeans_by_depth`) with one labelling of the clustered vectors
    (for level "position", N * grid^2 labels in the results' order): depth -> NMI."""
    return {k: label_nmi(result.labels, labels, mask=mask) for k, result in result_by_depth.items()}


def _to_pil_list(images) -> list[PIL.Image.Image]:
    if isinstance(images, torch.Tensor):
        from ..processing import EvoTokImageProcessor

        return EvoTokImageProcessor().postprocess(images)
    return [image.convert("RGB") for image in images]


def _cell(image: PIL.Image.Image, box: tuple[float, float, float, float], size: int) -> PIL.Image.Image:
    # nearest-neighbour when enlarging shows the patch's actual pixels; Lanczos when shrinking avoids aliasing
    enlarging = (box[2] - box[0]) <= size
    resample = PIL.Image.Resampling.NEAREST if enlarging else PIL.Image.Resampling.LANCZOS
    return image.resize((size, size), resample=resample, box=box)


def cluster_grid_size(result_by_depth: dict[int, KMeansResult], per_cluster: int = 6) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_cluster_grid` writes for these results."""
    cell = _cell_size(result_by_depth)
    width = 2 * MARGIN + LABEL_WIDTH + per_cluster * cell + (per_cluster - 1) * CELL_GAP
    blocks = [TITLE_HEIGHT + r.num_clusters * cell + (r.num_clusters - 1) * CELL_GAP for r in result_by_depth.values()]
    height = 2 * MARGIN + sum(blocks) + (len(blocks) - 1) * BLOCK_GAP
    return width, height


def _cell_size(result_by_depth: dict[int, KMeansResult]) -> int:
    levels = {r.level for r in result_by_depth.values()}
    if not result_by_depth or len(levels) != 1 or not levels <= set(LEVELS):
        raise ValueError(
            f"result_by_depth must be non-empty results of one level from kmeans_by_depth, got levels {levels}."
        )
    return PATCH_CELL if levels == {"position"} else IMAGE_CELL


def save_cluster_grid(
    result_by_depth: dict[int, KMeansResult],
    images,
    path: str | Path,
    per_cluster: int = 6,
    grid_size: int | None = None,
) -> Path:
    """One PNG of the clusters: a titled block per depth, one row per cluster showing its `per_cluster` members
    nearest the centre (left column: cluster index and size; empty cells when a cluster is smaller).

    images: the clustered images, a list of PIL images or a (N, 3, H, W) tensor in [-1, 1]. For level "position" a
    member is shown as the image patch under its grid position (H / grid_size pixels, enlarged to `PATCH_CELL`);
    `grid_size` defaults to the one recorded in the results. For level "image" a member is its whole image (a
    `IMAGE_CELL` thumbnail). The size is `cluster_grid_size(result_by_depth, per_cluster)`. Returns the path.
    """
    if per_cluster < 1:
        raise ValueError(f"per_cluster must be >= 1, got {per_cluster}.")
    cell = _cell_size(result_by_depth)
    pil_images = _to_pil_list(images)
    canvas = PIL.Image.new("RGB", cluster_grid_size(result_by_depth, per_cluster), BACKGROUND)
    draw = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default()
    top = MARGIN
    for depth, result in result_by_depth.items():
        grid = grid_size or result.grid_size
        if result.level == "position" and not grid:
            raise ValueError("save_cluster_grid: level 'position' needs a grid_size (none recorded in the results).")
        positions = grid * grid if result.level == "position" else 1
        if len(result.labels) != len(pil_images) * positions:
            raise ValueError(
                f"save_cluster_grid: depth {depth} clustered {len(result.labels)} vectors, which does not match "
                f"{len(pil_images)} images x {positions} positions."
            )
        title = f"depth {depth}: {result.level}-level k-means, {result.num_clusters} clusters"
        draw.text((MARGIN, top + 3), title, fill=TEXT, font=font)
        top += TITLE_HEIGHT
        for cluster, members in enumerate(result.nearest):
            draw.text((MARGIN, top + 2), f"#{cluster}", fill=TEXT, font=font)
            draw.text((MARGIN, top + 16), f"n={len(members)}", fill=TEXT, font=font)
            for slot in range(per_cluster):
                left = MARGIN + LABEL_WIDTH + slot * (cell + CELL_GAP)
                if slot >= len(members):
                    draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=EMPTY_CELL)
                    continue
                image_index, position = divmod(int(members[slot]), positions)
                image = pil_images[image_index]
                if result.level == "position":
                    row, col = divmod(position, grid)
                    step_x, step_y = image.width / grid, image.height / grid
                    box = (col * step_x, row * step_y, (col + 1) * step_x, (row + 1) * step_y)
                else:
                    box = (0, 0, image.width, image.height)
                canvas.paste(_cell(image, box, cell), (left, top))
            top += cell + CELL_GAP
        top += BLOCK_GAP - CELL_GAP
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def probe_accuracy(
    features: np.ndarray, labels, test_fraction: float = 0.3, seed: int = 0, knn_k: int = 5
) -> dict[str, float]:
    """Held-out accuracy of a linear probe and of k-NN on features (N, F) with integer or string labels (N,).

    The split is stratified (`train_test_split(..., stratify=labels, random_state=seed)`). The linear probe is a
    logistic regression (`max_iter=PROBE_MAX_ITER`) on features standardised with the training split's statistics; the
    k-NN classifier (`min(knn_k, num_train)` neighbours, Euclidean) uses the raw features, the geometry the quantizer
    and k-means see. "chance_accuracy" is the test accuracy of always predicting the training split's majority class.
    Returns linear_accuracy, knn_accuracy, chance_accuracy, num_train, num_test.
    """
    _require_sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"features must be (N, F) and labels (N,), got {features.shape} and {labels.shape}.")
    if len(np.unique(labels)) < 2:
        raise ValueError("probe_accuracy needs at least two classes.")
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER)).fit(x_train, y_train)
    knn = KNeighborsClassifier(n_neighbors=min(knn_k, len(x_train))).fit(x_train, y_train)
    classes, counts = np.unique(y_train, return_counts=True)
    majority = classes[np.argmax(counts)]
    return {
        "linear_accuracy": float(linear.score(x_test, y_test)),
        "knn_accuracy": float(knn.score(x_test, y_test)),
        "chance_accuracy": float(np.mean(y_test == majority)),
        "num_train": len(y_train),
        "num_test": len(y_test),
    }


def probe_by_depth(
    model,
    pixel_values: torch.Tensor,
    labels,
    depths: Sequence[int] | None = None,
    kind: str = "latent",
    test_fraction: float = 0.3,
    seed: int = 0,
    knn_k: int = 5,
    pool: str = "mean",
    batch_size: int = 16,
) -> dict[int, dict[str, float]]:
    """`probe_accuracy` of `depth_features(model, pixel_values, depths, kind, pool)` at each depth: depth -> dict.

    Every depth uses the same train/test split (it depends only on the labels and `seed`), so the depths compare on
    the same images. Deterministic given `seed`.
    """
    features = depth_features(model, pixel_values, depths, kind=kind, pool=pool, batch_size=batch_size)
    return {
        k: probe_accuracy(f, labels, test_fraction=test_fraction, seed=seed, knn_k=knn_k) for k, f in features.items()
    }


def lfw_probe_dataset(image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """scikit-image's `lfw_subset` as a labelled probe set: 200 grey 25x25 crops (the first 100 faces, label 1; the
    last 100 background patches of the same photos, label 0), squashed to `image_size` by `EvoTokImageProcessor`.
    Returns pixel_values (200, 3, image_size, image_size) float32 in [-1, 1] and labels (200,) int64."""
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("lfw_probe_dataset needs scikit-image: pip install 'evotok_hf[eval]'") from err
    from ..processing import EvoTokImageProcessor

    faces = np.asarray(skimage.data.lfw_subset())
    # documented as uint8, shipped as float64 in [0, 1]: accept both
    grey = faces if faces.dtype == np.uint8 else np.rint(np.clip(faces, 0.0, 1.0) * 255.0).astype(np.uint8)
    images = [PIL.Image.fromarray(face) for face in grey]
    processor = EvoTokImageProcessor(size={"height": image_size, "width": image_size}, resize_mode="squash")
    pixel_values = processor(images, return_tensors="pt").pixel_values
    num_faces = len(images) // 2
    labels = np.concatenate([np.ones(num_faces, dtype=np.int64), np.zeros(len(images) - num_faces, dtype=np.int64)])
    return pixel_values, labels


__all__ = [
    "KMeansResult",
    "cluster_features",
    "cluster_grid_size",
    "deepest_depth",
    "depth_features",
    "kmeans_by_depth",
    "label_nmi",
    "lfw_probe_dataset",
    "nmi_by_depth",
    "probe_accuracy",
    "probe_by_depth",
    "save_cluster_grid",
]
