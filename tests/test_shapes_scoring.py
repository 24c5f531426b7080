"""Scoring on EvoTok Shapes: the mini-GenEval detector and GenEval's rules, exact-match VQA, per-depth NMI."""

import math
from collections import Counter

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import pytest
import torch
from vlm_helpers import bpe_tokenizer, tiny_generation_vlm, tiny_processor, tiny_vlm_config

from evotok_hf import EvoTokForConditionalGeneration, EvoTokImageProcessor
from evotok_hf.evaluation import label_nmi, nmi_by_depth
from evotok_hf.evaluation.representation import KMeansResult
from evotok_hf.evaluation.shapes_scoring import (
    Detection,
    detect_objects,
    evaluate_geneval_mini,
    evaluate_vqa,
    exact_match,
    normalize_answer,
    position_labels,
    prompt_satisfied,
    score_geneval_mini,
    shapes_feature_probes,
    shapes_nmi_by_depth,
    vqa_accuracy,
)
from evotok_hf.miniature import CATEGORIES, generate_scenes, geneval_prompts, render_scene, scene_for_prompt

PROMPTS = geneval_prompts("test", per_category=50, seed=0)


def ground_truth_renders(prompts, per_prompt, seed):
    rng = np.random.default_rng(seed)
    return [[scene_for_prompt(rng, p)["image"] for _ in range(per_prompt)] for p in prompts]


def blur_and_noise(image, rng, radius=1.0, noise=4.0):
    pixels = np.asarray(image.filter(PIL.ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    return np.clip(np.rint(pixels + rng.normal(0.0, noise, pixels.shape)), 0, 255).astype(np.uint8)


def test_detector_scores_ground_truth_renders_of_every_category_and_the_control_is_far_below():
    scores = score_geneval_mini(ground_truth_renders(PROMPTS, 1, seed=0), PROMPTS)
    assert set(scores["per_category"]) == set(CATEGORIES)
    assert min(scores["per_category"].values()) >= 0.98, scores["per_category"]
    assert scores["heldout"]["overall"] >= 0.98 and scores["num_images"] == 300
    assert scores["control"]["overall"] <= scores["overall"] - 0.5, scores["control"]


def test_object_counts_report_what_the_prompts_name_what_is_drawn_and_empty_canvases():
    """On ground-truth renders every category's images hold exactly the objects its prompts name (counting: 2-4,
    two-object categories: 2); blank canvases in place of half the renders halve the detected count and are the
    empty share."""
    renders = ground_truth_renders(PROMPTS, 1, seed=0)
    counts = score_geneval_mini(renders, PROMPTS)["object_counts"]
    assert set(counts) == set(CATEGORIES)
    for category, row in counts.items():
        expected = {"single_object": 1, "colors": 1, "counting": None}.get(category, 2)
        assert row["detected"] == row["named"] and row["empty"] == 0.0, (category, row)
        if expected is not None:
            assert row["named"] == expected, (category, row)
    assert 2 < counts["counting"]["named"] < 4
    blank = PIL.Image.new("RGB", (64, 64), (220, 220, 220))
    halved = [group if i % 2 else [blank] for i, group in enumerate(renders)]
    by_category = score_geneval_mini(halved, PROMPTS)["object_counts"]
    for category, row in by_category.items():
        members = [i for i, p in enumerate(PROMPTS) if p["category"] == category]
        kept = [i for i in members if i % 2]
        assert row["empty"] == pytest.approx(1 - len(kept) / len(members))
        named = [sum(c["count"] for c in PROMPTS[i]["requirement"]["include"]) for i in kept]
        assert row["detected"] == pytest.approx(sum(named) / len(members))


def test_detector_is_robust_to_mild_blur_and_noise():
    rng = np.random.default_rng(1)
    renders = [[blur_and_noise(image, rng) for image in group] for group in ground_truth_renders(PROMPTS, 1, seed=1)]
    scores = score_geneval_mini(renders, PROMPTS)
    assert min(scores["per_category"].values()) >= 0.98, scores["per_category"]


def test_detections_match_the_drawn_objects():
    objects = [
        {"shape": "square", "color": "orange", "bbox": [3, 4, 17, 18]},
        {"shape": "circle", "color": "yellow", "bbox": [22, 2, 42, 22]},
        {"shape": "triangle", "color": "purple", "bbox": [45, 40, 61, 56]},
        {"shape": "triangle", "color": "purple", "bbox": [5, 40, 20, 55]},
    ]
    image = render_scene(objects, background=230)
    found = detect_objects(image)
    assert len(found) == len(objects)
    for obj in objects:
        match = min(found, key=lambda d: abs(d.centre[0] - (obj["bbox"][0] + obj["bbox"][2]) / 2)
                    + abs(d.centre[1] - (obj["bbox"][1] + obj["bbox"][3]) / 2))  # fmt: skip
        assert (match.shape, match.color) == (obj["shape"], obj["color"])
        assert max(abs(a - b) for a, b in zip(match.bbox, obj["bbox"])) <= 1
    # larger images of the same scene are read on the 64 x 64 canvas
    big = image.resize((128, 128), PIL.Image.Resampling.BILINEAR)
    assert Counter((d.shape, d.color) for d in detect_objects(big)) == Counter((d.shape, d.color) for d in found)


def test_detector_ignores_specks_foreign_colours_and_foreign_shapes():
    image = PIL.Image.new("RGB", (64, 64), (215, 215, 215))
    draw = PIL.ImageDraw.Draw(image)
    draw.rectangle((2, 2, 5, 5), fill=(220, 30, 30))  # a 4 x 4 speck
    draw.rectangle((10, 10, 27, 27), fill=(20, 20, 20))  # black: no palette colour
    draw.polygon([(40, 5), (58, 5), (49, 22)], fill=(30, 70, 220))  # a triangle with its apex down
    draw.rectangle((5, 45, 60, 52), fill=(30, 160, 50))  # a bar
    found = detect_objects(image)
    assert {d.color for d in found} == {"blue", "green"}
    assert all(d.shape is None for d in found)
    assert detect_objects(PIL.Image.new("RGB", (64, 64), (220, 220, 220))) == []


def det(shape, color, x, y, side=16):
    """A detection with its centre at (x, y)."""
    bbox = (x - side / 2, y - side / 2, x + side / 2, y + side / 2)
    return Detection(shape=shape, color=color, bbox=bbox, centre=(x, y), area=side * side, fill=1.0, top_fraction=0.5)


def first(category, test):
    return next(p for p in geneval_prompts("test", per_category=200, seed=0) if p["category"] == category and test(p))


def test_prompt_satisfied_follows_geneval_rules():
    square = first("single_object", lambda p: p["objects"][0]["shape"] == "square")["requirement"]
    assert prompt_satisfied(square, [det("square", "red", 20, 20), det("circle", "blue", 50, 50)])  # extras allowed
    assert not prompt_satisfied(square, [det("circle", "blue", 50, 50)])
    assert not prompt_satisfied(square, [Detection(None, "red", (0, 0, 16, 16), (8, 8), 256, 1.0, 0.5)])

    three = first("counting", lambda p: p["prompt"] == "a photo of three circles")["requirement"]
    circles = [det("circle", c, x, 20) for c, x in [("red", 10), ("blue", 30), ("green", 50)]]
    assert prompt_satisfied(three, circles + [det("square", "red", 30, 50)])
    assert not prompt_satisfied(three, circles[:2])
    assert not prompt_satisfied(three, circles + [det("circle", "red", 30, 50)])  # counts are exact

    red_circle = first("colors", lambda p: p["prompt"] == "a photo of a red circle")["requirement"]
    assert prompt_satisfied(red_circle, [det("circle", "blue", 10, 10), det("circle", "red", 40, 40)])
    assert not prompt_satisfied(red_circle, [det("circle", "orange", 10, 10), det("square", "red", 40, 40)])

    pair = first("two_object", lambda p: {o["shape"] for o in p["objects"]} == {"circle", "triangle"})["requirement"]
    extra = det("square", "red", 10, 40)
    assert prompt_satisfied(pair, [det("triangle", "red", 10, 10), det("circle", "red", 40, 40), extra])
    assert not prompt_satisfied(pair, [det("triangle", "red", 10, 10), det("square", "red", 40, 40)])

    left = first("position", lambda p: p["prompt"] == "a photo of a circle left of a square")["requirement"]
    assert prompt_satisfied(left, [det("circle", "red", 20, 30), det("square", "blue", 28, 50)])  # exactly 8 px
    assert not prompt_satisfied(left, [det("circle", "red", 20.5, 30), det("square", "blue", 28, 50)])  # 7.5 px
    assert not prompt_satisfied(left, [det("circle", "red", 40, 30), det("square", "blue", 20, 30)])
    below = first("position", lambda p: p["prompt"] == "a photo of a triangle below a circle")["requirement"]
    assert prompt_satisfied(below, [det("triangle", "red", 20, 50), det("circle", "blue", 22, 20)])
    assert not prompt_satisfied(below, [det("triangle", "red", 20, 20), det("circle", "blue", 22, 50)])

    attr = first("color_attr", lambda p: p["prompt"] == "a photo of a red square and a blue triangle")["requirement"]
    assert prompt_satisfied(attr, [det("square", "red", 10, 10), det("triangle", "blue", 40, 40)])
    assert not prompt_satisfied(attr, [det("square", "blue", 10, 10), det("triangle", "red", 40, 40)])


def test_score_geneval_mini_scores_heldout_prompts_apart_and_checks_its_input():
    prompts = geneval_prompts("test", per_category=12, seed=0)
    blank = PIL.Image.new("RGB", (64, 64), (220, 220, 220))
    renders = ground_truth_renders(prompts, 2, seed=3)
    # only the held-out prompts get their objects: they score 1, the other prompts 0
    by_index = {p["index"]: (group if p["heldout"] else [blank, blank]) for p, group in zip(prompts, renders)}
    scores = score_geneval_mini(by_index, prompts)
    assert scores["heldout"]["overall"] == 1.0 and set(scores["heldout"]["per_category"]) <= {"colors", "color_attr"}
    assert scores["per_category"]["single_object"] == 0.0
    heldout_share = np.mean([p["heldout"] for p in prompts if p["category"] == "colors"])
    assert scores["per_category"]["colors"] == pytest.approx(heldout_share)
    assert [len(r) for r in scores["passed"]] == [2] * len(prompts)
    with pytest.raises(ValueError, match="entries"):
        score_geneval_mini(renders[:-1], prompts)
    with pytest.raises(ValueError, match="indices"):
        score_geneval_mini({}, prompts)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("red", "red", True), ("Red.", "red", True), ("  YES \n", "yes", True), ("no!", "no", True),
        ("two", "two.", True), ("red circle", "red", False), ("", "red", False), ("re d", "red", False),
        ("yes", "no", False), ("3", "three", False),
    ],  # fmt: skip
)
def test_exact_match_normalises_case_whitespace_and_trailing_punctuation(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_vqa_accuracy_per_question_type():
    records = [
        {"question_type": "color", "answer": "red", "prediction": "Red"},
        {"question_type": "color", "answer": "blue", "prediction": "green"},
        {"question_type": "count", "answer": "two", "prediction": "two."},
        {"question_type": "existence", "answer": "no", "prediction": "yes"},
    ]
    result = vqa_accuracy(records)
    assert result["per_type"] == {"color": 0.5, "count": 1.0, "existence": 0.0}
    assert result["overall"] == 0.5 and result["num_questions"] == 4
    assert "per_type_by_num_objects" not in result
    assert normalize_answer(" Four!? ") == "four"
    # with the scenes' object counts: the same hits, split by how many objects the scene holds
    counted = [{**r, "num_objects": n} for r, n in zip(records, [1, 2, 3, 2])]
    result = vqa_accuracy(counted)
    assert result["per_type"] == {"color": 0.5, "count": 1.0, "existence": 0.0}
    assert result["per_type_by_num_objects"] == {
        "color": {1: {"accuracy": 1.0, "num_questions": 1}, 2: {"accuracy": 0.0, "num_questions": 1}},
        "count": {3: {"accuracy": 1.0, "num_questions": 1}},
        "existence": {2: {"accuracy": 0.0, "num_questions": 1}},
    }


@pytest.fixture(scope="module")
def shapes_rows():
    scenes = generate_scenes(3, "test", seed=0)
    return [{"image": s["image"], "questions": s["questions"][:3], "objects": s["objects"]} for s in scenes]


def test_evaluate_vqa_batches_match_one_question_at_a_time(shapes_rows):
    questions = [q["question"] for row in shapes_rows for q in row["questions"]]
    corpus = ["system user assistant You are a helpful assistant."] + questions
    tokenizer = bpe_tokenizer(corpus)
    torch.manual_seed(0)
    model = EvoTokForConditionalGeneration(tiny_vlm_config(tokenizer)).eval()
    processor = tiny_processor(tokenizer)
    result = evaluate_vqa(model, processor, shapes_rows, batch_size=4, max_new_tokens=3, num_examples=10)
    assert result["num_questions"] == 9 and len(result["examples"]) == 9
    for example in result["examples"]:
        row = shapes_rows[example["row"]]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["question"]}]}]
        inputs = processor.apply_chat_template(messages, images=[row["image"]], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        alone = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert example["prediction"] == alone
        assert example["correct"] == exact_match(alone, example["answer"])
    assert result["overall"] == pytest.approx(np.mean([e["correct"] for e in result["examples"]]))
    # every question is an example here: the breakdown by the scene's object count, recounted from them
    for example in result["examples"]:
        assert example["num_objects"] == len(shapes_rows[example["row"]]["objects"])
    for kind, by_count in result["per_type_by_num_objects"].items():
        for count, entry in by_count.items():
            mine = [e["correct"] for e in result["examples"] if e["question_type"] == kind and e["num_objects"] == count]
            assert entry == {"accuracy": pytest.approx(np.mean(mine)), "num_questions": len(mine)}


def test_evaluate_geneval_mini_generates_through_the_pipeline_reproducibly():
    from evotok_hf.pipelines import EvoTokPipeline

    prompts = geneval_prompts("test", per_category=1, seed=0)
    tokenizer = bpe_tokenizer(["system user assistant You are a helpful assistant."] + [p["prompt"] for p in prompts])
    processor = tiny_processor(tokenizer, wrap_image_tokens=True)
    pipe = EvoTokPipeline(model=tiny_generation_vlm(tokenizer), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    results = evaluate_geneval_mini(pipe, prompts, guidance_scales=(1.0, 3.0), num_images_per_prompt=2, batch_size=4)
    assert set(results) == {1.0, 3.0}
    for result in results.values():
        assert [len(g) for g in result["images"]] == [2] * len(prompts)
        assert result["scores"]["num_images"] == 2 * len(prompts)
        assert set(result["scores"]["per_category"]) == set(CATEGORIES)
    again = evaluate_geneval_mini(pipe, prompts, guidance_scales=(1.0,), num_images_per_prompt=2, batch_size=4)
    assert [np.asarray(i).tobytes() for g in again[1.0]["images"] for i in g] == [
        np.asarray(i).tobytes() for g in results[1.0]["images"] for i in g
    ]


def brute_force_nmi(u, v):
    """NMI with arithmetic normalisation, from the counts."""
    n = len(u)
    joint = Counter(zip(u, v))
    pu, pv = Counter(u), Counter(v)
    mi = sum(c / n * math.log(c * n / (pu[a] * pv[b])) for (a, b), c in joint.items())
    hu = -sum(c / n * math.log(c / n) for c in pu.values())
    hv = -sum(c / n * math.log(c / n) for c in pv.values())
    return mi / ((hu + hv) / 2) if hu + hv > 0 else 1.0


def test_label_nmi_matches_brute_force_and_known_cases():
    rng = np.random.default_rng(0)
    clusters, labels = rng.integers(0, 5, 200), rng.choice(["red", "blue", "green"], 200)
    assert label_nmi(clusters, labels) == pytest.approx(brute_force_nmi(clusters.tolist(), labels.tolist()))
    assert label_nmi([2, 2, 0, 0, 1, 1], ["a", "a", "b", "b", "c", "c"]) == pytest.approx(1.0)
    assert label_nmi([0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(0.0)
    mask = np.array([True, True, True, True, False, False])
    assert label_nmi([0, 0, 1, 1, 0, 1], ["a", "a", "b", "b", "b", "a"], mask=mask) == pytest.approx(1.0)
    result = KMeansResult(labels=np.array([0, 0, 1, 1]), centers=np.zeros((2, 1)), inertia=0.0, nearest=[])
    assert nmi_by_depth({1: result, 4: result}, ["a", "a", "b", "b"]) == {1: pytest.approx(1.0), 4: pytest.approx(1.0)}
    with pytest.raises(ValueError, match="mask"):
        label_nmi([0, 1], ["a", "b"], mask=[False, False])


def test_position_labels_follow_object_coverage():
    objects = [[{"shape": "square", "color": "red", "bbox": [16, 0, 32, 16]},
                {"shape": "circle", "color": "blue", "bbox": [32, 32, 52, 52]}]]  # fmt: skip
    colours, shapes, mask = position_labels(objects, grid_size=4)
    grid = colours.reshape(4, 4)
    assert grid[0, 1] == "red" and shapes.reshape(4, 4)[0, 1] == "square"
    assert grid[2, 2] == "blue" and grid[2, 3] == "" and grid[3, 2] == ""  # the circle covers under half of those
    assert mask.sum() == 2


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # a random tokenizer repeats codes
def test_shapes_nmi_by_depth_on_a_tokenizer(tiny_model):
    scenes = generate_scenes(6, "test", seed=0)
    size = tiny_model.config.image_size
    pixel_values = EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash")(
        [s["image"] for s in scenes], return_tensors="pt"
    ).pixel_values
    result = shapes_nmi_by_depth(tiny_model, pixel_values, [s["objects"] for s in scenes], num_clusters=4)
    assert list(result) == list(range(1, tiny_model.config.semantic_depth + 1))
    for scores in result.values():
        assert 0.0 <= scores["color"] <= 1.0 and 0.0 <= scores["shape"] <= 1.0 and scores["num_positions"] > 0


class GridOracle:
    """A stand-in teacher whose features are the one-hot row and column of each token, and nothing else."""

    def __init__(self, grid_size):
        self.grid_size = grid_size

    def extract(self, pixel_values):
        index = torch.arange(self.grid_size**2)
        rows = torch.nn.functional.one_hot(index // self.grid_size, self.grid_size)
        columns = torch.nn.functional.one_hot(index % self.grid_size, self.grid_size)
        return torch.cat([rows, columns], -1).float().expand(len(pixel_values), -1, -1)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_shapes_feature_probes_label_each_object_position(tiny_model):
    """Features that hold exactly each token's row and column are probed to 1.0 for both (a probe reading labels in
    another order than the features, e.g. rows for columns, would not be), and the probes see every position an
    object covers."""
    scenes = generate_scenes(40, "test", seed=0)
    size, grid = tiny_model.config.image_size, tiny_model.config.grid_size
    pixel_values = EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash")(
        [s["image"] for s in scenes], return_tensors="pt"
    ).pixel_values
    objects = [s["objects"] for s in scenes]
    result = shapes_feature_probes(tiny_model, GridOracle(grid), pixel_values, objects, depths=(1, 4))
    assert list(result) == ["teacher", "semantic_depth_1", "semantic_depth_4"]
    assert result["teacher"]["row"]["linear_accuracy"] == 1.0 and result["teacher"]["column"]["linear_accuracy"] == 1.0
    covered = int(position_labels(objects, grid)[2].sum())
    for by_label in result.values():
        assert set(by_label) == {"color", "shape", "row", "column"}
        for probe in by_label.values():
            assert probe["num_train"] + probe["num_test"] == covered
            assert 0.0 <= probe["linear_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="object lists"):
        shapes_feature_probes(tiny_model, GridOracle(grid), pixel_values[:3], objects)
