"""EvoTok Shapes: a deterministic, seeded synthetic domain where understanding and generation score objectively.

Each image is a 64 x 64 RGB canvas with a uniform grey background (all channels equal, value in [205, 235]) and 1-4
filled shapes (circle, square, triangle with its apex up) in six exact palette colours. Every object's bounding box is
a square of side 14-20 px inside the canvas, and boxes of different objects are at least 3 px apart on some axis
(so also in Euclidean distance). Captions follow GenEval's six categories (Ghosh et al., 2023, "GenEval: An
Object-Focused Framework for Evaluating Text-to-Image Alignment") and the scene holds exactly the objects the caption
names. Relations are decided by box centres: "a left of b" means centre x of a is at least `MIN_CENTRE_OFFSET` (8) px
smaller than b's, "a above b" means its centre y is at least 8 px smaller.

Bounding boxes are `[x0, y0, x1, y1]` in pixel edges with exclusive ends: the box covers pixel columns x0..x1-1, its
side is x1 - x0 and its centre is ((x0 + x1) / 2, (y0 + y1) / 2).

Held-out compositions: the (colour, shape) pairs in `HELDOUT_PAIRS` never appear in the train (or validation) split,
neither named in a caption nor drawn at all, so a generator trained on them is scored on these pairs separately
(`geneval_prompts` marks the prompts that name one) as GenEval intends for compositional generalisation.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ..shapes_spec import (
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    SUPERSAMPLE,
    draw_shape,
    relation_holds,
)

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = ("train", "validation", "test")

# Three of the 18 (colour, shape) pairs, chosen so that every colour but one and every shape keeps appearing in
# training with the other shapes (each held-out shape still appears in 5 colours, each held-out colour with 2 shapes),
# and the three pairs use three different shapes and three different colours: a model has seen "red", "blue",
# "yellow", "triangle", "circle" and "square" many times, only never these combinations.
HELDOUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))

BACKGROUND_RANGE = (205, 235)  # inclusive
BOX_SIDE_RANGE = (14, 20)  # inclusive
MIN_GAP = 3
# Placement is rejection sampling; 4 boxes of side <= 20 always fit a 64 x 64 canvas with 3 px gaps, so a restart
# after this many failed tries per object only guards against an unlucky early placement.
MAX_PLACEMENT_TRIES = 100

_SPLIT_IDS = {split: index for index, split in enumerate(SPLITS)}
_PROMPT_STREAM = 1000  # keeps geneval_prompts' random stream apart from the scenes' streams of the same seed


def _check_pairs(pairs: Iterable[Sequence[str]]) -> frozenset[tuple[str, str]]:
    pairs = frozenset((str(color), str(shape)) for color, shape in pairs)
    bad = [pair for pair in pairs if pair[0] not in COLORS or pair[1] not in SHAPES]
    if bad:
        raise ValueError(f"exclude_pairs must be (colour, shape) pairs from {tuple(COLORS)} x {SHAPES}, got {bad}.")
    return pairs


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}.")


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def _opposite(relation: str) -> str:
    return {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]


def _box_gap(a: Sequence[int], b: Sequence[int]) -> int:
    """Separation of two boxes along the axis where they are farthest apart (negative when they overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def render_scene(objects: Sequence[dict], background: int, size: int = IMAGE_SIZE) -> PIL.Image.Image:
    """Draw objects ({"shape", "color", "bbox"}) on a uniform grey background: an RGB image of `size` x `size`.

    Shapes fill their box as `draw_shape` says. Edges are anti-aliased by drawing at `SUPERSAMPLE` times the size and
    averaging down.
    """
    if not 0 <= int(background) <= 255:
        raise ValueError(f"background must be a grey value in 0..255, got {background}.")
    canvas = PIL.Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), (int(background),) * 3)
    draw = PIL.ImageDraw.Draw(canvas)
    for obj in objects:
        if obj["color"] not in COLORS:
            raise ValueError(f"objects need a colour in {tuple(COLORS)}, got {obj}.")
        draw_shape(draw, obj["shape"], obj["bbox"], COLORS[obj["color"]], scale=SUPERSAMPLE)
    return canvas.resize((size, size), PIL.Image.Resampling.BOX)


def _caption(category: str, objects: Sequence[dict], relation: str | None) -> str:
    if category == "single_object":
        return f"a photo of a {objects[0]['shape']}"
    if category == "colors":
        return f"a photo of a {objects[0]['color']} {objects[0]['shape']}"
    if category == "two_object":
        return f"a photo of a {objects[0]['shape']} and a {objects[1]['shape']}"
    if category == "counting":
        return f"a photo of {NUMBER_WORDS[len(objects)]} {objects[0]['shape']}s"
    if category == "position":
        return f"a photo of a {objects[0]['shape']} {relation} a {objects[1]['shape']}"
    a, b = objects
    return f"a photo of a {a['color']} {a['shape']} and a {b['color']} {b['shape']}"


def _requirement(category: str, objects: Sequence[dict], relation: str | None) -> dict:
    """GenEval's evaluation metadata for a prompt (`include` clauses ANDed, `exclude` clauses ORed), with "shape"
    for GenEval's "class": an include clause asks for at least `count` objects of the shape (of the colour, if
    given; `position` [relation, i] relates it to the objects matched by include clause i); an exclude clause fails
    the image when it holds `count` or more objects of the shape."""
    if category == "counting":
        shape, count = objects[0]["shape"], len(objects)
        return {"include": [{"shape": shape, "count": count}], "exclude": [{"shape": shape, "count": count + 1}]}
    if category == "position":
        a, b = objects
        # GenEval's order: the reference object first, then the object placed relative to it (clause 0)
        include = [{"shape": b["shape"], "count": 1}, {"shape": a["shape"], "count": 1, "position": [relation, 0]}]
        return {"include": include, "exclude": []}
    include = []
    for obj in objects:
        clause = {"shape": obj["shape"], "count": 1}
        if obj.get("color") is not None:
            clause["color"] = obj["color"]
        include.append(clause)
    return {"include": include, "exclude": []}


def _make_prompt(category: str, objects: list[dict], relation: str | None = None) -> dict:
    """A prompt: its text, category, the named objects (caption order; "color" None where the caption names none),
    the relation of objects[0] to objects[1] (position only), the GenEval requirement and the held-out flag."""
    heldout = any((obj["color"], obj["shape"]) in HELDOUT_PAIRS for obj in objects)
    return {
        "prompt": _caption(category, objects, relation),
        "category": category,
        "objects": objects,
        "relation": relation,
        "requirement": _requirement(category, objects, relation),
        "heldout": heldout,
    }


@functools.lru_cache(maxsize=None)
def _all_prompts(category: str, exclude: frozenset) -> list[dict]:
    """Every distinct prompt of a category whose named (colour, shape) pairs avoid `exclude`, in a fixed order.
    Cached: callers copy what they hand out."""
    colour_names = list(COLORS)
    if category == "single_object":
        return [_make_prompt(category, [{"shape": s, "color": None}]) for s in SHAPES]
    if category == "colors":
        return [
            _make_prompt(category, [{"shape": s, "color": c}])
            for c in colour_names
            for s in SHAPES
            if (c, s) not in exclude
        ]
    ordered_shape_pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if category == "two_object":
        return [
            _make_prompt(category, [{"shape": a, "color": None}, {"shape": b, "color": None}])
            for a, b in ordered_shape_pairs
        ]
    if category == "counting":
        return [
            _make_prompt(category, [{"shape": s, "color": None} for _ in range(n)]) for s in SHAPES for n in (2, 3, 4)
        ]
    if category == "position":
        return [
            _make_prompt(category, [{"shape": a, "color": None}, {"shape": b, "color": None}], relation)
            for a, b in ordered_shape_pairs
            for relation in RELATIONS
        ]
    return [
        _make_prompt(category, [{"shape": a, "color": ca}, {"shape": b, "color": cb}])
        for a, b in ordered_shape_pairs
        for ca in colour_names
        for cb in colour_names
        if ca != cb and (ca, a) not in exclude and (cb, b) not in exclude
    ]


def _place_boxes(rng: np.random.Generator, count: int, size: int) -> list[list[int]] | None:
    """`count` square boxes of random side in `BOX_SIDE_RANGE`, inside the canvas, pairwise >= `MIN_GAP` apart."""
    boxes: list[list[int]] = []
    low, high = BOX_SIDE_RANGE
    for _ in range(count):
        for _ in range(MAX_PLACEMENT_TRIES):
            side = int(rng.integers(low, high + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = [x0, y0, x0 + side, y0 + side]
            if all(_box_gap(box, other) >= MIN_GAP for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def scene_for_prompt(
    rng: np.random.Generator, prompt: dict, *, exclude_pairs: Iterable[Sequence[str]] = (), size: int = IMAGE_SIZE
) -> dict:
    """A random scene that satisfies a prompt from `geneval_prompts` (or `sample_scene`'s): exactly its objects, the
    unnamed colours drawn at random among the pairs not in `exclude_pairs`, placed so that its relation holds.
    Returns the same dict as `sample_scene`."""
    exclude = _check_pairs(exclude_pairs)
    objects = []
    for named in prompt["objects"]:
        color = named["color"]
        if color is None:
            allowed = [c for c in COLORS if (c, named["shape"]) not in exclude]
            color = allowed[int(rng.integers(len(allowed)))]
        elif (color, named["shape"]) in exclude:
            raise ValueError(f"prompt {prompt['prompt']!r} names the excluded pair {(color, named['shape'])}.")
        objects.append({"shape": named["shape"], "color": color})
    relation = prompt["relation"]
    while True:
        boxes = _place_boxes(rng, len(objects), size)
        if boxes is not None and (relation is None or relation_holds(boxes[0], boxes[1], relation)):
            break
    for obj, box in zip(objects, boxes):
        obj["bbox"] = box
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    return {
        "image": render_scene(objects, background, size=size),
        "caption": prompt["prompt"],
        "category": prompt["category"],
        "objects": objects,
        "questions": scene_questions(rng, objects, exclude_pairs=exclude),
    }


def _yes_no_pair(rng: np.random.Generator, yes: tuple[str, str], no: tuple[str, str]) -> list[tuple[str, str]]:
    return [yes, no] if rng.random() < 0.5 else [no, yes]


def scene_questions(
    rng: np.random.Generator, objects: Sequence[dict], *, exclude_pairs: Iterable[Sequence[str]] = ()
) -> list[dict]:
    """The questions a scene answers unambiguously, as {"question", "answer", "question_type"}:

    - color: "What color is the {shape}?" for each shape with exactly one object;
    - shape: "What shape is the {color} object?" for each colour with exactly one object;
    - count: "How many {shape}s are there?" for each shape present (one to four);
    - position: with exactly two objects of different shapes, one "yes" and one "no" question "Is the {a} {relation}
      the {b}?" on an axis where their centres differ by at least `MIN_CENTRE_OFFSET` px, so that both the relation
      and its opposite are decided by the rule (two boxes >= 3 px apart always have such an axis);
    - existence: one "yes" question "Is there a {color} {shape}?" about an object present and one "no" question about
      a pair absent from the scene and not in `exclude_pairs` (a split that never shows a pair never asks about it).

    Yes/no questions come in yes + no pairs, so their answers are exactly balanced.
    """
    exclude = _check_pairs(exclude_pairs)
    shape_counts = Counter(obj["shape"] for obj in objects)
    colour_counts = Counter(obj["color"] for obj in objects)
    questions: list[tuple[str, str, str]] = []
    for obj in objects:
        if shape_counts[obj["shape"]] == 1:
            questions.append((f"What color is the {obj['shape']}?", obj["color"], "color"))
    for obj in objects:
        if colour_counts[obj["color"]] == 1:
            questions.append((f"What shape is the {obj['color']} object?", obj["shape"], "shape"))
    for shape in SHAPES:
        if shape_counts[shape]:
            questions.append((f"How many {shape}s are there?", NUMBER_WORDS[shape_counts[shape]], "count"))
    if len(objects) == 2 and objects[0]["shape"] != objects[1]["shape"]:
        decided = [r for r in RELATIONS if relation_holds(objects[0]["bbox"], objects[1]["bbox"], r)]
        true_relation = decided[int(rng.integers(len(decided)))]
        # ask about a vs b or, equivalently, b vs a with the opposite relation
        subject, other = (0, 1) if rng.random() < 0.5 else (1, 0)
        if subject == 1:
            true_relation = _opposite(true_relation)
        a, b = objects[subject]["shape"], objects[other]["shape"]
        yes = (f"Is the {a} {true_relation} the {b}?", "yes")
        no = (f"Is the {a} {_opposite(true_relation)} the {b}?", "no")
        questions.extend((q, ans, "position") for q, ans in _yes_no_pair(rng, yes, no))
    present = sorted({(obj["color"], obj["shape"]) for obj in objects})
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c, s) not in exclude]
    if present and absent:
        yes_color, yes_shape = present[int(rng.integers(len(present)))]
        no_color, no_shape = absent[int(rng.integers(len(absent)))]
        yes = (f"Is there a {yes_color} {yes_shape}?", "yes")
        no = (f"Is there a {no_color} {no_shape}?", "no")
        questions.extend((q, ans, "existence") for q, ans in _yes_no_pair(rng, yes, no))
    return [{"question": q, "answer": ans, "question_type": kind} for q, ans, kind in questions]


def sample_prompt(rng: np.random.Generator, category: str, *, exclude_pairs: Iterable[Sequence[str]] = ()) -> dict:
    """A uniformly random prompt of `category` among those that name no pair of `exclude_pairs`."""
    _check_category(category)
    candidates = _all_prompts(category, _check_pairs(exclude_pairs))
    return copy.deepcopy(candidates[int(rng.integers(len(candidates)))])


def sample_scene(
    rng: np.random.Generator, category: str, *, exclude_pairs: Iterable[Sequence[str]] = (), size: int = IMAGE_SIZE
) -> dict:
    """One random scene of a GenEval category: {"image" (PIL RGB), "caption", "category", "objects" (caption order,
    each {"shape", "color", "bbox"}), "questions" (see `scene_questions`)}. No object of the scene is a pair of
    `exclude_pairs`."""
    prompt = sample_prompt(rng, category, exclude_pairs=exclude_pairs)
    return scene_for_prompt(rng, prompt, exclude_pairs=exclude_pairs, size=size)


def split_exclude_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """The pairs a split never shows: `HELDOUT_PAIRS` for train and validation (validation measures the training
    distribution), none for test."""
    _check_split(split)
    return () if split == "test" else HELDOUT_PAIRS


def _scene_key(scene: dict) -> tuple:
    """Identity of a scene, independent of its random stream: what it draws (the background is inside the image)."""
    return scene["image"].tobytes(), scene["caption"]


def generate_scenes(num_scenes: int, split: str, seed: int = 0, avoid: set | None = None) -> list[dict]:
    """`num_scenes` scenes of a split, categories in turn (so balanced to within one), from the random stream
    (seed, split): the three splits of a seed never share a stream. Scenes whose key is in `avoid` are redrawn (and
    the keys of the new scenes are added to it), which keeps splits disjoint even by chance."""
    _check_split(split)
    if num_scenes < 0:
        raise ValueError(f"num_scenes must be >= 0, got {num_scenes}.")
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split]])
    exclude = split_exclude_pairs(split)
    avoid = set() if avoid is None else avoid
    scenes = []
    for index in range(num_scenes):
        while True:
            scene = sample_scene(rng, CATEGORIES[index % len(CATEGORIES)], exclude_pairs=exclude)
            key = _scene_key(scene)
            if key not in avoid:
                break
        avoid.add(key)
        scenes.append(scene)
    return scenes


def shapes_features():
    """The `datasets.Features` of the EvoTok Shapes splits."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "category": datasets.Value("string"),
            # a Python list of a dict is a list of structs in every datasets version (Sequence of a dict is not)
            "objects": [
                {
                    "shape": datasets.Value("string"),
                    "color": datasets.Value("string"),
                    "bbox": datasets.Sequence(datasets.Value("int32"), length=4),
                }
            ],
            "questions": [
                {
                    "question": datasets.Value("string"),
                    "answer": datasets.Value("string"),
                    "question_type": datasets.Value("string"),
                }
            ],
        }
    )


def load_shapes_dataset(num_train: int = 3000, num_validation: int = 300, num_test: int = 600, seed: int = 0):
    """EvoTok Shapes as a `datasets.DatasetDict` with splits train / validation / test and columns image (PIL),
    caption, category, objects, questions. Deterministic given the arguments.

    Each split draws from its own random stream of `seed`; train and validation never show a pair of
    `HELDOUT_PAIRS` (not in a caption, not drawn at all), test does; no scene is in two splits. Categories take turns,
    so each split is balanced to within one scene per category.
    """
    import datasets

    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    seen: set = set()
    splits = {}
    for split, count in counts.items():
        scenes = generate_scenes(count, split, seed=seed, avoid=seen)
        columns = {name: [scene[name] for scene in scenes] for name in ("image", "caption", "category", "objects",
                                                                         "questions")}
        splits[split] = datasets.Dataset.from_dict(columns, features=shapes_features(), split=split)
    return datasets.DatasetDict(splits)


def geneval_prompts(split: str = "test", per_category: int = 50, seed: int = 0) -> list[dict]:
    """The mini-GenEval prompt list: `per_category` prompts for each category in `CATEGORIES` order.

    Each prompt is a dict: "prompt" (the caption), "category", "objects" (the named objects in caption order, each
    {"shape", "color"} with colour None where the caption names none), "relation" (position: objects[0] relation
    objects[1]; else None), "requirement" (GenEval's evaluation metadata, see `evotok_hf.evaluation.shapes_scoring`),
    "heldout" (whether it names a pair of `HELDOUT_PAIRS`) and "index" (its position in the list).

    A category has few distinct prompts (3 for single_object, 180 for color_attr), so each category cycles through
    its distinct prompts in a shuffled order: every distinct prompt appears once before any appears twice. The test
    split draws from all pairs; train and validation skip the held-out pairs, like their scenes.
    """
    _check_split(split)
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}.")
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], _PROMPT_STREAM])
    exclude = _check_pairs(split_exclude_pairs(split))
    prompts = []
    for category in CATEGORIES:
        distinct = _all_prompts(category, exclude)
        order: list[int] = []
        while len(order) < per_category:
            order.extend(int(i) for i in rng.permutation(len(distinct)))
        for i in order[:per_category]:
            prompts.append({**copy.deepcopy(distinct[i]), "index": len(prompts)})
    return prompts
