"""Objective scoring on EvoTok Shapes (`evotok_hf.miniature`): a mini-GenEval for generation, exact-match VQA for
understanding, and the NMI of per-depth k-means clusters with colour and shape labels (the paper's Fig. 6, made
quantitative).

The detector (`detect_objects`) knows nothing of any model. It segments by palette: every pixel is explained as a
blend `background + alpha * (colour - background)` of the image's grey background and each palette colour (which is
exactly what anti-aliasing and blur produce at an object's edge); the colour whose blend line passes closest is the
pixel's colour, and the pixel is foreground when that blend is at least half colour (`alpha >= 0.5`) and passes within
`MAX_BLEND_RESIDUAL` of the line. Connected foreground regions of one colour are objects, specks under `MIN_AREA`
pixels are ignored, and the shape comes from the region's geometry: a triangle (apex up) holds a quarter of its area
in the top half of its bounding box where a circle or a square holds half; a square fills its box, a circle pi / 4 of
it. Every threshold is the midpoint between two ideal shapes, nothing is fitted to model output.

`prompt_satisfied` follows GenEval's `evaluate_images.py` (djghosh13/geneval): `include` clauses are ANDed and ask for
at least `count` objects of a shape (counting adds an `exclude` clause at count + 1, so counts are exact); a colour
clause needs `count` of them in that colour; a position clause relates the object to the objects matched by another
clause. GenEval checks colour and position on its detector's most confident objects; this detector has no confidence,
so a clause is met when some choice of detected objects meets it. Relations use the dataset's rule instead of
GenEval's box-size-relative one: box centres at least `MIN_CENTRE_OFFSET` (8) px apart in the relation's direction.
Scores follow GenEval's `summary_scores.py`: the fraction of correct images per category, overall the mean over
categories.

scipy (`ndimage.label`) and scikit-learn are imported lazily; the `eval` extra brings them.
"""

from __future__ import annotations

import json
import logging
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from ..shapes_spec import (
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    QUESTION_TYPES,
    SHAPES,
    SUPERSAMPLE,
    box_centre,
    draw_shape,
    relation_holds,
)
from .representation import deepest_depth, kmeans_by_depth, nmi_by_depth, probe_accuracy

logger = logging.getLogger(__name__)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
_COLOR_NAMES = tuple(COLORS)

# A background pixel is grey: its channels differ by less than this (palette colours differ by 110 or more).
GREY_CHROMA = 24
# Foreground: the pixel is at least half palette colour on its blend line...
MIN_ALPHA = 0.5
# ... and within this distance of the line (palette colours are 70 or more apart, noise of a few levels is far below).
MAX_BLEND_RESIDUAL = 60.0
# Regions smaller than this are specks; the smallest object, a triangle in a 14 px box, covers about 98 px.
MIN_AREA = 40
# Shape from geometry; each threshold is the midpoint between two ideal shapes.
TRIANGLE_MAX_TOP_FRACTION = 0.375  # top half of the box: triangle (apex up) 1/4 of the area, circle / square 1/2
UPSIDE_DOWN_MIN_TOP_FRACTION = 0.625  # mirror of the above: an apex-down shape is none of ours
SQUARE_MIN_FILL = (np.pi / 4 + 1) / 2  # fraction of the bounding box: square 1, circle pi / 4
CIRCLE_MIN_FILL = (0.5 + np.pi / 4) / 2  # circle pi / 4, triangle 1/2: a balanced but ragged region is no shape
MAX_ASPECT = 1.5  # every shape of ours has a square box; a bar or a sliver is none of them

ANSWER_STRIP = string.whitespace + string.punctuation


@dataclass
class Detection:
    """One detected object: its palette colour, its shape (None when the region is none of `SHAPES`), its bounding
    box `[x0, y0, x1, y1]` with exclusive ends on the 64 x 64 canvas, its centre (x, y), its area in pixels, and the
    geometry the shape was read from (fill of the box, fraction of the area in the box's top half)."""

    shape: str | None
    color: str
    bbox: tuple[int, int, int, int]
    centre: tuple[float, float]
    area: int
    fill: float
    top_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


def _to_canvas(image) -> np.ndarray:
    """An image (PIL, or an array (H, W, 3) uint8 / float in [0, 1]) as float64 (64, 64, 3) in [0, 255]; other sizes
    are resized with area averaging, as if drawn on the dataset's canvas."""
    if isinstance(image, PIL.Image.Image):
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.Resampling.BOX)
        return np.asarray(image, dtype=np.float64)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"detect_objects expects an RGB image (H, W, 3), got an array of shape {array.shape}.")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return _to_canvas(PIL.Image.fromarray(array))


def estimate_background(pixels: np.ndarray) -> np.ndarray:
    """The background colour: the per-channel median of the grey pixels (of all pixels if too few are grey). Objects
    cover at most 4 * 20 * 20 of the 64 * 64 pixels, so the median is the background's."""
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    grey = pixels[chroma < GREY_CHROMA]
    if len(grey) < pixels.shape[0] * pixels.shape[1] // 4:
        grey = pixels.reshape(-1, 3)
    return np.median(grey, axis=0)


def palette_segmentation(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the index of the palette colour whose blend line with the background passes closest, and whether
    the pixel is foreground (at least `MIN_ALPHA` of that colour, within `MAX_BLEND_RESIDUAL` of the line)."""
    offset = pixels - background  # (H, W, 3)
    directions = _PALETTE - background  # (K, 3)
    alpha = np.einsum("hwc,kc->hwk", offset, directions) / np.maximum((directions**2).sum(-1), 1e-6)
    alpha = np.clip(alpha, 0.0, 1.0)
    residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * directions, axis=-1)  # (H, W, K)
    label = residual.argmin(-1)
    best_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, label[..., None], -1)[..., 0]
    return label, (best_alpha >= MIN_ALPHA) & (best_residual <= MAX_BLEND_RESIDUAL)


def classify_shape(fill: float, top_fraction: float, width: int, height: int) -> str | None:
    """The shape of a region from its geometry, or None when it is none of `SHAPES` (see the module docstring)."""
    if max(width, height) > MAX_ASPECT * min(width, height) or top_fraction > UPSIDE_DOWN_MIN_TOP_FRACTION:
        return None
    if top_fraction < TRIANGLE_MAX_TOP_FRACTION:
        return "triangle"
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    return None


def _region_detection(ys: np.ndarray, xs: np.ndarray, color: str) -> Detection:
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    width, height = x1 - x0, y1 - y0
    area = len(ys)
    middle = (y0 + y1) / 2
    # a row straddling the middle (odd heights) counts half in each half
    row_centres = ys + 0.5
    top = (row_centres < middle).sum() + 0.5 * (row_centres == middle).sum()
    fill, top_fraction = area / (width * height), float(top / area)
    bbox = (x0, y0, x1, y1)
    return Detection(
        shape=classify_shape(fill, top_fraction, width, height), color=color, bbox=bbox, centre=box_centre(bbox),
        area=area, fill=float(fill), top_fraction=top_fraction,
    )  # fmt: skip


def detect_objects(image) -> list[Detection]:
    """Objects in an EvoTok Shapes image (PIL or array (H, W, 3); resized to 64 x 64 if needed): palette
    segmentation, 4-connected regions per colour of at least `MIN_AREA` pixels, shape from geometry. Sorted by area,
    largest first."""
    from scipy import ndimage

    pixels = _to_canvas(image)
    label, foreground = palette_segmentation(pixels, estimate_background(pixels))
    detections = []
    for index, color in enumerate(_COLOR_NAMES):
        regions, count = ndimage.label(foreground & (label == index))
        if count == 0:
            continue
        for ys, xs in _region_coordinates(regions, count):
            if len(ys) >= MIN_AREA:
                detections.append(_region_detection(ys, xs, color))
    return sorted(detections, key=lambda d: -d.area)


def _region_coordinates(regions: np.ndarray, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    ys, xs = np.nonzero(regions)
    ids = regions[ys, xs]
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(1, count + 2))
    return [(ys[order[a:b]], xs[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def _as_detection(item) -> Detection:
    return item if isinstance(item, Detection) else Detection(**item)


def prompt_satisfied(requirement: Mapping, detections: Iterable[Detection | Mapping]) -> bool:
    """Whether detected objects satisfy a prompt's GenEval requirement (`geneval_prompts(...)[i]["requirement"]`).

    `include` clauses ({"shape", "count", optional "color", optional "position": [relation, clause index]}) must all
    hold: at least `count` objects of the shape (of the colour); with a position, at least `count` of them in the
    relation to an object matched by the referenced (earlier) clause. Any `exclude` clause ({"shape", "count"}) fails
    the image when `count` or more objects of the shape are present. Detections whose shape is None never match.
    """
    detections = [_as_detection(d) for d in detections]
    if not isinstance(requirement, Mapping) or "include" not in requirement:
        raise ValueError(f"requirement must be a dict with an 'include' list, got {requirement!r}.")
    by_shape: dict[str, list[Detection]] = defaultdict(list)
    for detection in detections:
        if detection.shape is not None:
            by_shape[detection.shape].append(detection)
    matched: list[list[Detection] | None] = []
    correct = True
    for clause in requirement["include"]:
        if clause["shape"] not in SHAPES:
            raise ValueError(f"requirement clause names an unknown shape: {clause!r}.")
        candidates = by_shape[clause["shape"]]
        if "color" in clause:
            candidates = [d for d in candidates if d.color == clause["color"]]
        if "position" in clause:
            relation, target = clause["position"]
            if not 0 <= target < len(matched):
                raise ValueError(f"position clause refers to include clause {target}, not an earlier one: {clause!r}.")
            targets = matched[target] or []
            candidates = [d for d in candidates if any(relation_holds(d.bbox, t.bbox, relation) for t in targets)]
        if len(candidates) < clause["count"]:
            correct = False
            matched.append(None)
        else:
            matched.append(candidates)
    for clause in requirement.get("exclude", []):
        if len(by_shape[clause["shape"]]) >= clause["count"]:
            correct = False
    return correct


def _images_for(images_by_prompt, prompts: Sequence[Mapping]) -> list[list]:
    """Images aligned with the prompts, from a sequence parallel to them or a mapping keyed by prompt "index"."""
    if isinstance(images_by_prompt, Mapping):
        missing = [p["index"] for p in prompts if p["index"] not in images_by_prompt]
        if missing:
            raise ValueError(f"images_by_prompt has no images for prompt indices {missing[:10]}.")
        images = [images_by_prompt[p["index"]] for p in prompts]
    else:
        images = list(images_by_prompt)
        if len(images) != len(prompts):
            raise ValueError(f"images_by_prompt has {len(images)} entries for {len(prompts)} prompts.")
    images = [list(group) if isinstance(group, (list, tuple)) else [group] for group in images]
    if any(not group for group in images):
        raise ValueError("every prompt needs at least one image.")
    return images


def _requirement_key(requirement: Mapping) -> str:
    """A requirement up to the order of its clauses ("a circle and a square" asks what "a square and a circle" asks);
    position clauses refer to clauses by index, so their requirements keep their order."""
    clauses = [json.dumps(c, sort_keys=True) for c in requirement["include"]]
    if not any("position" in c for c in requirement["include"]):
        clauses.sort()
    excluded = sorted(json.dumps(c, sort_keys=True) for c in requirement.get("exclude", []))
    return json.dumps([clauses, excluded])


def _control_prompts(prompts: Sequence[Mapping]) -> list[int | None]:
    """For each prompt, the position of the next prompt of its category (cyclically) that asks for something else;
    None when every prompt of its category asks the same."""
    by_category: dict[str, list[int]] = defaultdict(list)
    for position, prompt in enumerate(prompts):
        by_category[prompt["category"]].append(position)
    keys = [_requirement_key(p["requirement"]) for p in prompts]
    control: list[int | None] = [None] * len(prompts)
    for members in by_category.values():
        for rank, position in enumerate(members):
            for step in range(1, len(members)):
                other = members[(rank + step) % len(members)]
                if keys[other] != keys[position]:
                    control[position] = other
                    break
    return control


def _summary(passed: Sequence[Sequence[bool]], prompts: Sequence[Mapping]) -> dict:
    per_category: dict[str, list[bool]] = defaultdict(list)
    for prompt, results in zip(prompts, passed):
        per_category[prompt["category"]].extend(results)
    scores = {c: float(np.mean(per_category[c])) for c in CATEGORIES if per_category.get(c)}
    return {
        "per_category": scores,
        "overall": float(np.mean(list(scores.values()))) if scores else float("nan"),
        "num_images": int(sum(len(r) for r in passed)),
    }


def _object_counts(detections: Sequence[Sequence[Sequence[Detection]]], prompts: Sequence[Mapping]) -> dict:
    """Per category: how many objects its prompts name (the include clauses' counts), how many the detector finds in
    their images, and the share of images where it finds none; a category that draws systematically too few or too
    many objects shows here, whatever the scores' at-least-`count` rule lets pass."""
    named: dict[str, list[int]] = defaultdict(list)
    found: dict[str, list[int]] = defaultdict(list)
    for prompt, group in zip(prompts, detections):
        asked = sum(clause["count"] for clause in prompt["requirement"]["include"])
        for image in group:
            named[prompt["category"]].append(asked)
            found[prompt["category"]].append(len(image))
    return {c: {"named": float(np.mean(named[c])), "detected": float(np.mean(found[c])),
                "empty": float(np.mean([n == 0 for n in found[c]]))} for c in CATEGORIES if found.get(c)}  # fmt: skip


def score_geneval_mini(images_by_prompt, prompts: Sequence[Mapping]) -> dict:
    """Score images against their mini-GenEval prompts (from `evotok_hf.miniature.geneval_prompts`).

    images_by_prompt: the images of each prompt (PIL or arrays), a sequence parallel to `prompts` or a mapping from
    prompt "index". Returns a JSON-ready dict:
      - "per_category" / "overall" / "num_images": GenEval's protocol (fraction of correct images per category, overall
        the mean over the categories present);
      - "heldout": the same over the prompts that name a held-out (colour, shape) pair ({} if none);
      - "control": each image scored against the next prompt of its category that asks for something else (what
        chance gives; a category whose prompts all ask the same is left out);
      - "object_counts": per category, the mean number of objects the prompts name, the mean number detected, and
        the share of images with no object detected;
      - "passed": per prompt, per image, whether it satisfies its prompt; "detections": per prompt, per image, the
        detections as dicts (for reports).
    """
    images = _images_for(images_by_prompt, prompts)
    detections = [[detect_objects(image) for image in group] for group in images]
    passed = [[prompt_satisfied(p["requirement"], d) for d in group] for p, group in zip(prompts, detections)]
    heldout = [i for i, p in enumerate(prompts) if p.get("heldout")]
    control_of = _control_prompts(prompts)
    control_rows = [i for i, other in enumerate(control_of) if other is not None]
    control_passed = [[prompt_satisfied(prompts[control_of[i]]["requirement"], d) for d in detections[i]]
                      for i in control_rows]  # fmt: skip
    result = _summary(passed, prompts)
    result["heldout"] = _summary([passed[i] for i in heldout], [prompts[i] for i in heldout]) if heldout else {}
    result["control"] = _summary(control_passed, [prompts[i] for i in control_rows])
    result["object_counts"] = _object_counts(detections, prompts)
    result["passed"] = passed
    result["detections"] = [[[d.to_dict() for d in image] for image in group] for group in detections]
    return result


def evaluate_geneval_mini(
    pipeline,
    prompts: Sequence[Mapping],
    guidance_scales: Sequence[float] = (1.0, 3.0, 7.5),
    num_images_per_prompt: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    **generation_kwargs,
) -> dict[float, dict]:
    """Generate `num_images_per_prompt` images per prompt through an `EvoTokPipeline` at each guidance scale (every
    other setting is the checkpoint's default unless `generation_kwargs` sets it, e.g. `depth_temperature=0.7`) and
    score them with `score_geneval_mini`.

    Batches of `batch_size` prompts are generated with a generator seeded `seed + index of the batch's first prompt`,
    so a run is reproducible. Returns {guidance_scale: {"scores": score_geneval_mini's dict, "images": the PIL images
    per prompt}}.
    """
    if batch_size < 1 or num_images_per_prompt < 1:
        raise ValueError(
            f"batch_size and num_images_per_prompt must be >= 1, got {batch_size} and {num_images_per_prompt}."
        )
    if not prompts:
        raise ValueError("evaluate_geneval_mini needs at least one prompt.")
    device = pipeline.model.device
    results = {}
    for guidance_scale in guidance_scales:
        images: list[list[PIL.Image.Image]] = []
        for start in range(0, len(prompts), batch_size):
            batch = [p["prompt"] for p in prompts[start : start + batch_size]]
            generator = torch.Generator(device=device.type).manual_seed(seed + start)
            output = pipeline(batch, guidance_scale=float(guidance_scale), num_images_per_prompt=num_images_per_prompt,
                              generator=generator, **generation_kwargs)  # fmt: skip
            for i in range(len(batch)):
                images.append(list(output.images[i * num_images_per_prompt : (i + 1) * num_images_per_prompt]))
        scores = score_geneval_mini(images, prompts)
        logger.info("mini-GenEval at guidance %s: overall %.3f %s", guidance_scale, scores["overall"],
                    scores["per_category"])  # fmt: skip
        results[float(guidance_scale)] = {"scores": scores, "images": images}
    return results


def normalize_answer(text: str) -> str:
    """An answer for exact match: lowercased, surrounding whitespace and trailing punctuation removed."""
    return text.strip().lower().rstrip(ANSWER_STRIP).strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def vqa_accuracy(records: Iterable[Mapping]) -> dict:
    """Exact-match accuracy of records ({"question_type", "answer", "prediction"}, optionally "num_objects"):
    "overall" over all questions, "per_type" per question type (in `QUESTION_TYPES` order, then any other),
    "num_questions", and where every record has "num_objects", "per_type_by_num_objects": {type: {number of objects in
    the scene: {"accuracy", "num_questions"}}}. A colour question on a one-object scene only asks to read a colour; on
    a two-object scene it asks which object has the shape, which the per-type figure alone does not tell apart."""
    records = list(records)
    hits: dict[str, list[bool]] = defaultdict(list)
    by_objects: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        hit = exact_match(record["prediction"], record["answer"])
        hits[record["question_type"]].append(hit)
        if "num_objects" in record:
            by_objects[record["question_type"]][int(record["num_objects"])].append(hit)
    types = [t for t in QUESTION_TYPES if t in hits] + sorted(set(hits) - set(QUESTION_TYPES))
    every = [hit for t in types for hit in hits[t]]
    result = {
        "overall": float(np.mean(every)) if every else float("nan"),
        "per_type": {t: float(np.mean(hits[t])) for t in types},
        "num_questions": len(every),
    }
    if records and all("num_objects" in record for record in records):
        result["per_type_by_num_objects"] = {
            t: {n: {"accuracy": float(np.mean(by_objects[t][n])), "num_questions": len(by_objects[t][n])}
                for n in sorted(by_objects[t])}
            for t in types
        }  # fmt: skip
    return result


def evaluate_vqa(
    model,
    processor,
    dataset_split,
    batch_size: int = 16,
    max_new_tokens: int = 4,
    num_examples: int = 2,
) -> dict:
    """Exact-match VQA accuracy of an EvoTok VLM on a Shapes split (rows with "image" and "questions").

    Each question is one user turn (the image, then the question) through `processor.apply_chat_template`, answered
    by greedy `model.generate` in left-padded batches. Returns `vqa_accuracy`'s dict plus "examples": the first
    `num_examples` questions of each type with {"row", "question", "question_type", "answer", "prediction",
    "correct"} (and "num_objects" where the rows have "objects", which adds "per_type_by_num_objects").
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}.")
    items = [(row_index, row["image"], qa, len(row["objects"]) if "objects" in row else None)
             for row_index, row in enumerate(dataset_split) for qa in row["questions"]]  # fmt: skip
    if not items:
        raise ValueError("evaluate_vqa: the split holds no questions.")
    records = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            conversations = [
                [{"role": "user", "content": [{"type": "image", "image": image},
                                              {"type": "text", "text": qa["question"]}]}]  # fmt: skip
                for _, image, qa, _ in batch
            ]
            inputs = processor.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                processor_kwargs={"padding": True, "padding_side": "left"},
            ).to(model.device)  # fmt: skip
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            predictions = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for (row_index, _, qa, num_objects), prediction in zip(batch, predictions):
                record = {"row": row_index, "question": qa["question"], "question_type": qa["question_type"],
                          "answer": qa["answer"], "prediction": prediction}  # fmt: skip
                if num_objects is not None:
                    record["num_objects"] = num_objects
                records.append(record)
    finally:
        model.train(was_training)
    result = vqa_accuracy(records)
    shown: dict[str, int] = defaultdict(int)
    examples = []
    for record in records:
        if shown[record["question_type"]] < num_examples:
            shown[record["question_type"]] += 1
            examples.append({**record, "correct": exact_match(record["prediction"], record["answer"])})
    result["examples"] = examples
    return result


def position_labels(objects_per_image: Sequence[Sequence[Mapping]], grid_size: int, min_coverage: float = 0.5):
    """Colour and shape labels of each tokenizer grid position of Shapes images, for the per-depth NMI.

    Position (row, col) of image i covers the canvas cell of side 64 / grid_size; it is labelled with the object that
    covers at least `min_coverage` of that cell (drawn exactly, at `SUPERSAMPLE` times the size). Returns
    (colour_labels, shape_labels, mask): arrays of length N * grid_size^2 in `kmeans_by_depth`'s order (image, row,
    column), "" and mask False where no object covers the cell enough.
    """
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}.")
    side = IMAGE_SIZE * SUPERSAMPLE
    edges = np.rint(np.linspace(0, side, grid_size + 1)).astype(int)
    colours, shapes, mask = [], [], []
    for objects in objects_per_image:
        coverage = np.zeros((len(objects), grid_size, grid_size))
        for k, obj in enumerate(objects):
            canvas = PIL.Image.new("L", (side, side), 0)
            draw_shape(PIL.ImageDraw.Draw(canvas), obj["shape"], obj["bbox"], 1, scale=SUPERSAMPLE)
            drawn = np.asarray(canvas, dtype=np.float64)
            sums = np.add.reduceat(np.add.reduceat(drawn, edges[:-1], axis=0), edges[:-1], axis=1)
            coverage[k] = sums / np.outer(np.diff(edges), np.diff(edges))
        best = coverage.argmax(0) if len(objects) else np.zeros((grid_size, grid_size), dtype=int)
        best_coverage = coverage.max(0) if len(objects) else np.zeros((grid_size, grid_size))
        for row in range(grid_size):
            for col in range(grid_size):
                covered = best_coverage[row, col] >= min_coverage
                obj = objects[best[row, col]] if covered else None
                colours.append(obj["color"] if covered else "")
                shapes.append(obj["shape"] if covered else "")
                mask.append(covered)
    return np.array(colours), np.array(shapes), np.array(mask, dtype=bool)


def shapes_nmi_by_depth(
    model,
    pixel_values: torch.Tensor,
    objects_per_image: Sequence[Sequence[Mapping]],
    depths: Sequence[int] | None = None,
    num_clusters: int = 16,
    seed: int = 0,
    kind: str = "latent",
    batch_size: int = 16,
) -> dict[int, dict[str, float]]:
    """The paper's Fig. 6 made quantitative on Shapes: position-level k-means of the cumulative latents at each depth
    (`kmeans_by_depth`, every grid position clustered), then the NMI of the clusters with the colour labels and with
    the shape labels of the positions an object covers (`position_labels`).

    pixel_values (N, 3, S, S) in [-1, 1] are the images `objects_per_image` describe, through the tokenizer's image
    processor. `depths=None` means every depth `kind` has (`deepest_depth`: 1..num_depths for latents,
    1..semantic_depth for semantic features). Returns {depth: {"color": nmi, "shape": nmi,
    "num_positions": labelled positions}}.
    """
    if len(objects_per_image) != len(pixel_values):
        raise ValueError(f"{len(objects_per_image)} object lists for {len(pixel_values)} images.")
    depths = list(range(1, deepest_depth(model, kind)[0] + 1)) if depths is None else list(depths)
    results = kmeans_by_depth(model, pixel_values, depths=depths, num_clusters=num_clusters, seed=seed,
                              level="position", kind=kind, batch_size=batch_size)  # fmt: skip
    colours, shapes, mask = position_labels(objects_per_image, model.config.grid_size)
    if not mask.any():
        raise ValueError("no grid position is covered by an object: nothing to score.")
    by_colour = nmi_by_depth(results, colours, mask=mask)
    by_shape = nmi_by_depth(results, shapes, mask=mask)
    return {k: {"color": by_colour[k], "shape": by_shape[k], "num_positions": int(mask.sum())} for k in results}


@torch.no_grad()
def shapes_feature_probes(
    tokenizer,
    teacher,
    pixel_values: torch.Tensor,
    objects_per_image: Sequence[Sequence[Mapping]],
    depths: Sequence[int] = (4, 16),
    seed: int = 0,
    batch_size: int = 50,
) -> dict[str, dict[str, dict[str, float]]]:
    """What the features an understanding model reads tell about each image token: held-out linear-probe accuracy
    (`probe_accuracy`) of the colour and the shape of the object covering a grid position (`position_labels`), and of
    that position's row and column, from the teacher's features (`teacher.extract`) and from the tokenizer's semantic
    features at each depth in `depths` (`get_semantic_features` of the first k codes).

    These are ceilings of a kind for VQA: a colour or shape question is about what the tokens of one object say, a
    position question about where those tokens are. Returns {"teacher" | "semantic_depth_<k>": {"color" | "shape" |
    "row" | "column": probe_accuracy's dict}}.
    """
    if len(objects_per_image) != len(pixel_values):
        raise ValueError(f"{len(objects_per_image)} object lists for {len(pixel_values)} images.")
    grid = tokenizer.config.grid_size
    colours, shapes, mask = position_labels(objects_per_image, grid)
    if not mask.any():
        raise ValueError("no grid position is covered by an object: nothing to probe.")
    index = np.tile(np.arange(grid * grid), len(pixel_values))
    labels = {"color": colours[mask], "shape": shapes[mask], "row": (index // grid)[mask],
              "column": (index % grid)[mask]}  # fmt: skip
    sources: dict[str, list[torch.Tensor]] = {"teacher": []}
    sources.update({f"semantic_depth_{k}": [] for k in depths})
    for chunk in pixel_values.split(batch_size):
        sources["teacher"].append(teacher.extract(chunk).float())
        codes = tokenizer.encode(chunk.to(tokenizer.dtype)).codes
        for k in depths:
            sources[f"semantic_depth_{k}"].append(tokenizer.get_semantic_features(codes[..., :k]).float())
    results = {}
    for name, parts in sources.items():
        features = torch.cat(parts).flatten(0, 1).numpy()[mask]
        results[name] = {label: probe_accuracy(features, values, seed=seed) for label, values in labels.items()}
    return results


__all__ = [
    "Detection",
    "detect_objects",
    "evaluate_geneval_mini",
    "evaluate_vqa",
    "exact_match",
    "normalize_answer",
    "position_labels",
    "prompt_satisfied",
    "score_geneval_mini",
    "shapes_feature_probes",
    "shapes_nmi_by_depth",
    "vqa_accuracy",
]
