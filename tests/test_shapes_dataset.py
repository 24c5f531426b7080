"""EvoTok Shapes follows its spec (issue 13): palette, sizes, gaps, exactly the named objects, relations by the 8 px
rule, answerable questions with correct answers, held-out pairs, disjoint and deterministic splits.

Every check recomputes what it needs from the objects list and the pixels with its own arithmetic and regular
expressions, not with the generator's helpers."""

import re
from collections import Counter

import numpy as np
import pytest

from evotok_hf.miniature import (
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    QUESTION_TYPES,
    SHAPES,
    geneval_prompts,
    load_shapes_dataset,
    render_scene,
    sample_scene,
    scene_for_prompt,
)

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
SHAPE = "(circle|square|triangle)"
COLOR = "(red|green|blue|yellow|purple|orange)"
RELATION = "(left of|right of|above|below)"
CAPTIONS = {
    "single_object": re.compile(f"^a photo of a {SHAPE}$"),
    "colors": re.compile(f"^a photo of a {COLOR} {SHAPE}$"),
    "two_object": re.compile(f"^a photo of a {SHAPE} and a {SHAPE}$"),
    "counting": re.compile(f"^a photo of (two|three|four) {SHAPE}s$"),
    "position": re.compile(f"^a photo of a {SHAPE} {RELATION} a {SHAPE}$"),
    "color_attr": re.compile(f"^a photo of a {COLOR} {SHAPE} and a {COLOR} {SHAPE}$"),
}


@pytest.fixture(scope="module")
def dataset():
    return load_shapes_dataset(num_train=180, num_validation=36, num_test=180, seed=0)


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(123)
    return [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(240)]


def centre(bbox):
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def holds(a, b, relation):
    (ax, ay), (bx, by) = centre(a["bbox"]), centre(b["bbox"])
    return {"left of": bx - ax >= 8, "right of": ax - bx >= 8, "above": by - ay >= 8, "below": ay - by >= 8}[relation]


def named_objects(category, caption):
    """(shape, colour or None) multiset the caption names, parsed independently of the generator."""
    match = CAPTIONS[category].match(caption)
    assert match, f"{caption!r} does not follow the {category} template"
    g = match.groups()
    if category == "single_object":
        return [(g[0], None)]
    if category == "colors":
        return [(g[1], g[0])]
    if category == "two_object":
        assert g[0] != g[1]
        return [(g[0], None), (g[1], None)]
    if category == "counting":
        return [(g[1], None)] * NUMBERS[g[0]]
    if category == "position":
        assert g[0] != g[2]
        return [(g[0], None), (g[2], None)]
    assert g[1] != g[3] and g[0] != g[2]
    return [(g[1], g[0]), (g[3], g[2])]


def test_palette_is_exact_at_object_centres_and_background_is_uniform_grey(scenes):
    assert COLORS == PALETTE
    for scene in scenes:
        pixels = np.asarray(scene["image"])
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            # the box centre is inside every shape (a triangle is half its base wide at mid-height)
            assert tuple(pixels[cy, cx]) == PALETTE[obj["color"]], (scene["caption"], obj)
        outside = np.ones((64, 64), dtype=bool)
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            outside[y0:y1, x0:x1] = False
        background = pixels[outside]
        grey = background[0, 0]
        # nothing is drawn outside the named objects' boxes: one exact grey everywhere else
        assert (background == grey).all() and 205 <= grey <= 235


def test_shapes_fill_their_box_like_their_shape(scenes):
    for scene in scenes:
        pixels = np.asarray(scene["image"]).astype(int)
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            patch = pixels[y0:y1, x0:x1]
            fill = (np.abs(patch - np.array(PALETTE[obj["color"]])).sum(-1) < 30).mean()
            expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[obj["shape"]]
            assert abs(fill - expected) < 0.12, (obj, fill)
            if obj["shape"] == "triangle":  # apex up: far more colour in the bottom half than in the top half
                colour = np.abs(patch - np.array(PALETTE[obj["color"]])).sum(-1) < 30
                half = (y1 - y0) // 2
                assert colour[half:].sum() > 2 * colour[:half].sum()


def test_boxes_are_squares_of_side_14_to_20_inside_the_canvas_and_3_px_apart(scenes):
    for scene in scenes:
        boxes = [obj["bbox"] for obj in scene["objects"]]
        assert 1 <= len(boxes) <= 4
        for x0, y0, x1, y1 in boxes:
            assert x1 - x0 == y1 - y0 and 14 <= x1 - x0 <= 20
            assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= 3, (a, b)


def test_scene_holds_exactly_the_objects_its_caption_names(scenes):
    for scene in scenes:
        named = named_objects(scene["category"], scene["caption"])
        drawn = [(obj["shape"], obj["color"]) for obj in scene["objects"]]
        assert sorted(s for s, _ in named) == sorted(s for s, _ in drawn)
        for shape, colour in named:
            if colour is not None:
                assert (shape, colour) in drawn
        if scene["category"] == "color_attr":
            assert drawn[0][1] != drawn[1][1]


def test_position_captions_hold_by_the_8_px_rule(scenes):
    position = [s for s in scenes if s["category"] == "position"]
    assert position
    for scene in position:
        shape_a, relation, shape_b = CAPTIONS["position"].match(scene["caption"]).groups()
        a, b = scene["objects"]
        assert (a["shape"], b["shape"]) == (shape_a, shape_b)
        assert holds(a, b, relation), (scene["caption"], a["bbox"], b["bbox"])


def answer_independently(question, objects):
    """The answer to a question recomputed from the objects list; asserts the question is answerable."""
    shapes = Counter(o["shape"] for o in objects)
    colours = Counter(o["color"] for o in objects)
    if match := re.fullmatch(f"What color is the {SHAPE}\\?", question):
        assert shapes[match[1]] == 1
        return next(o["color"] for o in objects if o["shape"] == match[1]), "color"
    if match := re.fullmatch(f"What shape is the {COLOR} object\\?", question):
        assert colours[match[1]] == 1
        return next(o["shape"] for o in objects if o["color"] == match[1]), "shape"
    if match := re.fullmatch(f"How many {SHAPE}s are there\\?", question):
        assert 1 <= shapes[match[1]] <= 4
        return ["one", "two", "three", "four"][shapes[match[1]] - 1], "count"
    if match := re.fullmatch(f"Is the {SHAPE} {RELATION} the {SHAPE}\\?", question):
        assert len(objects) == 2 and shapes[match[1]] == 1 and shapes[match[3]] == 1
        a = next(o for o in objects if o["shape"] == match[1])
        b = next(o for o in objects if o["shape"] == match[3])
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[match[2]]
        # decided either way by the 8 px rule: never asked in the ambiguous band
        assert holds(a, b, match[2]) != holds(a, b, opposite)
        return ("yes" if holds(a, b, match[2]) else "no"), "position"
    if match := re.fullmatch(f"Is there a {COLOR} {SHAPE}\\?", question):
        present = any(o["color"] == match[1] and o["shape"] == match[2] for o in objects)
        return ("yes" if present else "no"), "existence"
    raise AssertionError(f"question {question!r} follows no template")


def test_every_question_is_answerable_and_its_answer_is_correct(scenes):
    kinds = Counter()
    yes_no = Counter()
    for scene in scenes:
        assert scene["questions"]
        for qa in scene["questions"]:
            answer, kind = answer_independently(qa["question"], scene["objects"])
            assert (qa["answer"], qa["question_type"]) == (answer, kind), (qa, scene["objects"])
            kinds[kind] += 1
            if kind in ("position", "existence"):
                yes_no[qa["answer"]] += 1
    assert set(kinds) == set(QUESTION_TYPES)
    assert yes_no["yes"] == yes_no["no"]


def test_dataset_columns_and_balanced_categories(dataset):
    assert set(dataset) == {"train", "validation", "test"}
    for split in dataset.values():
        assert split.column_names == ["image", "caption", "category", "objects", "questions"]
        counts = Counter(split["category"])
        assert set(counts) == set(CATEGORIES) and max(counts.values()) - min(counts.values()) <= 1
    row = dataset["train"][0]
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert set(row["objects"][0]) == {"shape", "color", "bbox"}
    assert set(row["questions"][0]) == {"question", "answer", "question_type"}


def test_heldout_pairs_never_appear_in_train_and_do_in_test(dataset):
    heldout = {tuple(pair) for pair in HELDOUT_PAIRS}
    assert len(heldout) == 3 and {c for c, _ in heldout} <= set(PALETTE) and {s for _, s in heldout} <= set(SHAPES)
    for split in ("train", "validation"):
        for row in dataset[split]:
            assert not any((o["color"], o["shape"]) in heldout for o in row["objects"])
            for colour, shape in heldout:
                assert f"{colour} {shape}" not in row["caption"]
                assert not any(f"{colour} {shape}" in qa["question"] for qa in row["questions"])
    in_test = sum(any((o["color"], o["shape"]) in heldout for o in row["objects"]) for row in dataset["test"])
    assert in_test > 0


def test_splits_are_disjoint_and_deterministic_by_seed(dataset):
    keys = {split: {row["image"].tobytes() for row in dataset[split]} for split in dataset}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    again = load_shapes_dataset(num_train=180, num_validation=36, num_test=180, seed=0)
    for split in dataset:
        assert again[split]["caption"] == dataset[split]["caption"]
        assert again[split]["objects"] == dataset[split]["objects"]
        assert again[split]["questions"] == dataset[split]["questions"]
        assert [r["image"].tobytes() for r in again[split]] == [r["image"].tobytes() for r in dataset[split]]
    other = load_shapes_dataset(num_train=180, num_validation=36, num_test=180, seed=1)
    assert other["train"]["objects"] != dataset["train"]["objects"]


def test_geneval_prompts_cover_categories_and_flag_heldout_pairs():
    prompts = geneval_prompts("test", per_category=50, seed=0)
    assert [p["index"] for p in prompts] == list(range(300))
    assert Counter(p["category"] for p in prompts) == {c: 50 for c in CATEGORIES}
    heldout = {tuple(pair) for pair in HELDOUT_PAIRS}
    for p in prompts:
        named = named_objects(p["category"], p["prompt"])
        assert p["heldout"] == any((c, s) in heldout for s, c in named)
    flagged = [p for p in prompts if p["heldout"]]
    assert flagged and {p["category"] for p in flagged} == {"colors", "color_attr"}
    # few distinct prompts per category: each appears once before any appears twice
    single = Counter(p["prompt"] for p in prompts if p["category"] == "single_object")
    assert sorted(single.values()) == [16, 17, 17]
    assert geneval_prompts("test", per_category=50, seed=0) == prompts
    assert not any(p["heldout"] for p in geneval_prompts("train", per_category=50, seed=0))


def test_scene_for_prompt_satisfies_the_prompt():
    rng = np.random.default_rng(0)
    for prompt in geneval_prompts("test", per_category=10, seed=0):
        scene = scene_for_prompt(rng, prompt)
        assert scene["caption"] == prompt["prompt"] and scene["category"] == prompt["category"]
        named = named_objects(prompt["category"], prompt["prompt"])
        assert sorted(s for s, _ in named) == sorted(o["shape"] for o in scene["objects"])
        if prompt["relation"]:
            assert holds(*scene["objects"], prompt["relation"])


def test_render_scene_draws_the_given_boxes():
    image = render_scene([{"shape": "square", "color": "blue", "bbox": [10, 20, 24, 34]}], background=210)
    pixels = np.asarray(image)
    assert (pixels[20:34, 10:24] == PALETTE["blue"]).all()
    pixels = pixels.copy()
    pixels[20:34, 10:24] = 210
    assert (pixels == 210).all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sample_scene(np.random.default_rng(0), "portrait"), "category"),
        (lambda: sample_scene(np.random.default_rng(0), "colors", exclude_pairs=[("pink", "circle")]), "pairs"),
        (lambda: geneval_prompts("dev"), "split"),
        (lambda: render_scene([{"shape": "star", "color": "red", "bbox": [0, 0, 14, 14]}], 210), "shape"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
