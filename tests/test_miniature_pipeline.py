"""EvoTok in miniature (`evotok_hf.miniature.pipeline`, `scripts/demo_miniature.py`): every stage trains a few steps
through the real code paths (the mini-SigLIP's sigmoid loss, `scripts/train_tokenizer.py --preset shapes`, the BPE
tokenizer and the Qwen2 built from its config, `scripts/train_vlm.py --task joint` in two stages), the checkpoints load
through the public loaders, the report carries every score, and a second run reuses every stage."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, SiglipModel

from evotok_hf import EvoTokModel
from evotok_hf.miniature import load_shapes_dataset
from evotok_hf.miniature.pipeline import (
    STAGES,
    StageCache,
    miniature_config,
    single_task_batches,
    vlm_training_rows,
)
from evotok_hf.miniature.report import FLOORS
from evotok_hf.miniature.siglip import _batch, patch_labels, shape_twins, train_mini_siglip, zero_shot_accuracy
from evotok_hf.miniature.text import build_qwen2, describe_scene, shapes_text_corpus, train_bpe_tokenizer
from evotok_hf.modeling.configuration_evotok import EVOTOK_PRESETS
from evotok_hf.frozen_networks import SiglipFeatures, SiglipTeacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "scripts", "demo_miniature.py")


@pytest.fixture(scope="module")
def shapes():
    return load_shapes_dataset(num_train=24, num_validation=6, num_test=12, seed=3)


@pytest.fixture(scope="module")
def text_tokenizer(shapes):
    return train_bpe_tokenizer(shapes_text_corpus(shapes["train"]))


def _run_demo(output_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, DEMO, "--preset", "tiny", "--output-dir", str(output_dir), "--no-progress", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole miniature at tiny sizes through scripts/demo_miniature.py (a few steps of every stage)."""
    output_dir = tmp_path_factory.mktemp("miniature")
    result = _run_demo(output_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


# ------------------------------------------------------------------------------------------------ text and LLM
def test_bpe_tokenizer_round_trips_the_dataset_text_and_holds_the_chat_and_image_tokens(shapes, text_tokenizer):
    for text in shapes_text_corpus(shapes["test"]):
        assert text_tokenizer.decode(text_tokenizer.encode(text, add_special_tokens=False)) == text
    for token in ("<|im_start|>", "<|im_end|>", "<image>", "<boi>", "<eoi>", "<pad>"):
        assert len(text_tokenizer.encode(token, add_special_tokens=False)) == 1
    # every answer word is one token, so a one-token answer is one decoding step
    for answer in ("red", "triangle", "three", "yes"):
        assert len(text_tokenizer.tokenize(" " + answer)) == 1 or len(text_tokenizer.tokenize(answer)) == 1
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles are there?"}]},
                {"role": "assistant", "content": "two"}]  # fmt: skip
    rendered = text_tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>user\n<image>\nHow many circles are there?<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\ntwo<|im_end|>\n")


def test_describe_scene_names_every_object_with_its_colour_left_to_right():
    objects = [{"shape": "square", "color": "blue", "bbox": [40, 0, 56, 16]},
               {"shape": "circle", "color": "red", "bbox": [2, 30, 18, 46]},
               {"shape": "triangle", "color": "green", "bbox": [20, 10, 36, 26]}]  # fmt: skip
    assert describe_scene(objects) == "a photo of a red circle, a green triangle and a blue square"
    assert describe_scene(objects[:1]) == "a photo of a blue square"
    with pytest.raises(ValueError):
        describe_scene([])


def test_qwen2_built_from_config_learns_the_dataset_text(shapes, text_tokenizer):
    """A few optimizer steps of the from-scratch LLM on the dataset's questions lower its loss (it trains)."""
    model = build_qwen2(text_tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)  # fmt: skip
    assert model.config.vocab_size == len(text_tokenizer) and model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == text_tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = [q["question"] + " " + q["answer"] for row in shapes["train"] for q in row["questions"]][:32]
    batch = text_tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------------------------------------------ mini-SigLIP
def test_siglip_batches_hold_each_text_once():
    import numpy as np

    captions = ["a photo of a circle"] * 10 + [f"a photo of {i}" for i in range(10)]
    indices, texts = _batch(np.random.default_rng(0), captions, captions, batch_size=16)
    assert len(texts) == len(set(texts)) == len(indices)
    assert [captions[i] for i in indices] == texts


def test_shape_twins_share_the_colours_and_differ_in_shape():
    scenes = load_shapes_dataset(num_train=300, num_validation=1, num_test=1, seed=5)["train"]["objects"]
    twins = shape_twins(scenes)

    def colours(i):
        return sorted(obj["color"] for obj in scenes[i])

    def shapes_of(i):
        return sorted(obj["shape"] for obj in scenes[i])

    for index in range(len(scenes)):  # brute force over every pair
        expected = [j for j in range(len(scenes)) if colours(j) == colours(index) and shapes_of(j) != shapes_of(index)]
        assert twins[index] == expected


def test_siglip_batches_with_twins_pair_scenes_only_shape_tells_apart():
    import numpy as np

    scenes = load_shapes_dataset(num_train=300, num_validation=1, num_test=1, seed=5)["train"]
    descriptions = [describe_scene(objects) for objects in scenes["objects"]]
    indices, texts = _batch(np.random.default_rng(0), list(scenes["caption"]), descriptions, 32,
                            shape_twins(scenes["objects"]))  # fmt: skip
    assert len(indices) == len(set(indices)) == len(set(texts)) == 32  # no image and no text twice
    pairs = list(zip(indices[:16:2], indices[1:16:2]))
    for a, b in pairs:  # the first half: twin pairs with their descriptions
        objects_a, objects_b = scenes[a]["objects"], scenes[b]["objects"]
        assert sorted(o["color"] for o in objects_a) == sorted(o["color"] for o in objects_b)
        assert sorted(o["shape"] for o in objects_a) != sorted(o["shape"] for o in objects_b)
    assert texts[:16] == [descriptions[i] for i in indices[:16]]


def test_mini_siglip_trains_and_serves_as_teacher_and_encoder(shapes, text_tokenizer, tmp_path):
    encoder_config = EVOTOK_PRESETS["evotok-shapes"]["encoder_config"]
    model, summary = train_mini_siglip(shapes["train"], text_tokenizer, encoder_config, max_steps=3, batch_size=8,
                                       progress=False)  # fmt: skip
    assert isinstance(model, SiglipModel) and summary["steps"] == 3
    assert torch.isfinite(torch.tensor([summary["first_loss"], summary["final_loss"]])).all()
    accuracy = zero_shot_accuracy(model, text_tokenizer, shapes["test"])
    assert accuracy["num_images"] == 4  # the single_object and colors scenes of 12 test scenes
    assert 0 <= accuracy["pair_accuracy"] <= min(accuracy["color_accuracy"], accuracy["shape_accuracy"]) <= 1

    model.save_pretrained(tmp_path)
    text_tokenizer.save_pretrained(tmp_path)
    # the teacher: the vision tower's hidden_states[-2], one feature per tokenizer grid position
    teacher = SiglipTeacher.from_pretrained(tmp_path, grid_size=8)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(teacher(pixels), expected)
    # the rFID-style features: the tower's pooled image embedding (SigLIP's attention-pooling head)
    features = SiglipFeatures.from_pretrained(tmp_path)
    assert features.num_features == 128
    torch.testing.assert_close(features(pixels), model.vision_model(pixel_values=pixels).pooler_output)
    # the encoder of EvoTok starts from the same weights
    tokenizer = EvoTokModel.from_encoder_pretrained(str(tmp_path), config=None,
                                                    **{k: v for k, v in EVOTOK_PRESETS["evotok-shapes"].items()
                                                       if k != "encoder_config"})  # fmt: skip
    for name, value in model.vision_model.state_dict().items():
        torch.testing.assert_close(tokenizer.encoder.state_dict()[name], value)


def test_patch_labels_name_the_object_that_covers_each_patch():
    # drawn by hand on the 8 x 8 grid of 8-pixel patches: a red square filling patches (1, 1)-(2, 2) exactly, a blue
    # circle inscribed in patches (5, 5)-(6, 6) (each quarter disc covers pi / 4 = 79% of its patch) and a green
    # triangle in patches (1, 5)-(2, 6), whose top patches it covers only 1/8 each (apex up) and its bottom ones 5/8
    scenes = [[{"shape": "square", "color": "red", "bbox": [8, 8, 24, 24]},
               {"shape": "circle", "color": "blue", "bbox": [40, 40, 56, 56]},
               {"shape": "triangle", "color": "green", "bbox": [40, 8, 56, 24]}],
              []]  # fmt: skip
    labels = patch_labels(scenes, 8)
    assert labels.shape == (2, 64) and labels.dtype == torch.long
    expected = torch.zeros(2, 8, 8, dtype=torch.long)
    # 1 + shape index (circle, square, triangle) * 6 colours + colour index (red, green, blue, ...)
    expected[0, 1:3, 1:3] = 1 + 1 * 6 + 0
    expected[0, 5:7, 5:7] = 1 + 0 * 6 + 2
    expected[0, 2, 5:7] = 1 + 2 * 6 + 1
    assert torch.equal(labels, expected.flatten(1))


def test_mini_siglip_grounding_head_trains_on_the_teachers_target_layer(shapes, text_tokenizer):
    encoder_config = EVOTOK_PRESETS["evotok-shapes"]["encoder_config"]
    plain, plain_summary = train_mini_siglip(shapes["train"], text_tokenizer, encoder_config, max_steps=2,
                                             batch_size=8, progress=False)  # fmt: skip
    model, summary = train_mini_siglip(shapes["train"], text_tokenizer, encoder_config, max_steps=2, batch_size=8,
                                       grounding_weight=1.0, progress=False)  # fmt: skip
    assert "first_grounding_loss" not in plain_summary
    assert 0 < summary["first_grounding_loss"] < float("inf") and 0 < summary["final_grounding_loss"] < float("inf")
    assert summary["grounding_weight"] == 1.0
    # the same first batch and initialisation: the sigmoid loss starts equal, the weights then part
    assert summary["first_loss"] == pytest.approx(plain_summary["first_loss"], rel=1e-5)
    assert isinstance(model, SiglipModel) and set(model.state_dict()) == set(plain.state_dict())
    # the head reads hidden_states[-2], the output of the last layer but one: its gradient moves that layer
    below = "vision_model.encoder.layers.{}.mlp.fc2.weight".format(encoder_config["num_hidden_layers"] - 2)
    assert not torch.equal(model.state_dict()[below], plain.state_dict()[below])


# ------------------------------------------------------------------------------------------------ data and caching
def test_vlm_training_rows_read_in_user_turns_and_write_in_assistant_turns(shapes, tmp_path):
    rows = vlm_training_rows(shapes["train"], str(tmp_path), seed=0)
    vqa = [r for r in rows if r["id"].startswith("vqa-")]
    t2i = [r for r in rows if r["id"].startswith("t2i-")]
    assert len(t2i) == len(vqa) == len(shapes["train"])
    for row in vqa:
        turns = row["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert os.path.isfile(tmp_path / row["image"])
    for row in t2i:
        index = int(row["id"].split("-")[1])
        assert row["conversations"] == [{"from": "human", "value": shapes["train"][index]["caption"]},
                                        {"from": "gpt", "value": "<image>"}]  # fmt: skip


def test_vlm_training_rows_open_with_a_description_naming_every_object(shapes, tmp_path):
    plain = vlm_training_rows(shapes["train"], str(tmp_path), seed=2, max_questions_per_row=3)
    rows = vlm_training_rows(shapes["train"], str(tmp_path), seed=2, max_questions_per_row=3, describe=True)
    assert [r["id"] for r in rows] == [r["id"] for r in plain]
    for row, before in zip(rows, plain):
        turns = row["conversations"]
        if not row["id"].startswith("vqa-"):
            assert turns == before["conversations"]
            continue
        objects = shapes["train"][int(row["id"].split("-")[1])]["objects"]
        # left to right by box centre, each object with its colour (written out here, not by describe_scene)
        ordered = sorted(objects, key=lambda o: o["bbox"][0] + o["bbox"][2])
        named = [f"a {o['color']} {o['shape']}" for o in ordered]
        assert turns[0] == {"from": "human", "value": "<image>\nDescribe the image."}
        assert turns[1]["from"] == "gpt" and turns[1]["value"].startswith("a photo of ")
        assert [n for n in named if n in turns[1]["value"]] == named
        assert turns[1]["value"].count(" a ") == len(named)  # no other object named
        # then the same questions as without the description, the image still read once
        assert turns[2]["value"] == before["conversations"][0]["value"].removeprefix("<image>\n")
        assert turns[3:] == before["conversations"][1:]


def test_vlm_training_rows_split_questions_evenly_and_repeat_captions(shapes, tmp_path):
    """Every question of every scene lands in exactly one VQA row of at most `max_questions_per_row` questions, the
    rows of a scene as even as possible; each caption -> image row appears `caption_repeats` times."""
    rows = vlm_training_rows(shapes["train"], str(tmp_path), seed=1, max_questions_per_row=2, caption_repeats=3)
    # the same rows without writing the images again (the vlm stage reads the data stage's)
    again = vlm_training_rows(shapes["train"], str(tmp_path / "none"), seed=1, max_questions_per_row=2,
                              caption_repeats=3, write_images=False)  # fmt: skip
    assert again == rows and os.listdir(tmp_path / "none") == []
    for index, example in enumerate(shapes["train"]):
        mine = [r for r in rows if r["id"] == f"vqa-{index}" or r["id"].startswith(f"vqa-{index}-")]
        asked = [(t["value"].removeprefix("<image>\n"), a["value"]) for r in mine
                 for t, a in zip(r["conversations"][::2], r["conversations"][1::2])]  # fmt: skip
        expected = [(qa["question"], qa["answer"]) for qa in example["questions"]]
        assert sorted(asked) == sorted(expected)
        sizes = [len(r["conversations"]) // 2 for r in mine]
        assert len(mine) == -(-len(expected) // 2) and max(sizes) <= 2 and max(sizes) - min(sizes) <= 1
        for r in mine:  # the image is read once, in the first user turn
            assert r["conversations"][0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in r["conversations"]) == 1
        captions = [r for r in rows if r["id"].startswith(f"t2i-{index}-")]
        assert len(captions) == 3 and all(r["conversations"][0]["value"] == example["caption"] for r in captions)
    with pytest.raises(ValueError, match="max_questions_per_row"):
        vlm_training_rows(shapes["train"], str(tmp_path), max_questions_per_row=0)


def test_single_task_batches_interleave_whole_batches_of_one_task(shapes, tmp_path):
    """The stream the vlm stage trains on in order: every batch holds rows of one task; each pass uses every full
    batch of each task once, from its own list of rows, in a shuffled order of batches (both tasks spread over the
    pass, not in long runs as grouping by length would put them)."""
    passes = []

    def rows_of_pass(index):
        passes.append(index)
        rows = vlm_training_rows(shapes["train"], str(tmp_path), seed=index, caption_repeats=2, write_images=False)
        return rows

    size = 3
    one_pass = len(shapes["train"]) // size * size + 2 * len(shapes["train"]) // size * size
    stream = single_task_batches(map(rows_of_pass, range(100)), size, 2 * one_pass + 1, seed=0)
    assert passes == [0, 1, 2] and len(stream) == 3 * one_pass  # whole passes, until num_rows are there
    batches = [stream[i : i + size] for i in range(0, len(stream), size)]
    tasks = [{row["id"].split("-")[0] for row in batch} for batch in batches]
    assert all(len(task) == 1 for task in tasks)
    for index in range(3):
        mine = stream[index * one_pass : (index + 1) * one_pass]
        assert len({row["id"] for row in mine}) == one_pass  # no row twice within a pass
        expected = vlm_training_rows(shapes["train"], str(tmp_path), seed=index, caption_repeats=2,
                                     write_images=False)  # fmt: skip
        assert all(row in expected for row in mine)  # the pass's own rows (its own question order)
    first_pass = [task.pop() for task in tasks[: one_pass // size]]
    half = len(first_pass) // 2
    assert {"vqa", "t2i"} <= set(first_pass[:half]) and {"vqa", "t2i"} <= set(first_pass[half:])
    again = single_task_batches(map(rows_of_pass, range(100)), size, 2 * one_pass + 1, seed=0)
    assert again == stream  # deterministic for a seed
    with pytest.raises(ValueError, match="no task has a full batch"):
        single_task_batches([stream[:2]], size, 10)
    with pytest.raises(ValueError, match="ran out"):
        single_task_batches([stream], size, 10 * len(stream))


def test_stage_cache_keys_change_from_the_changed_stage_on(tmp_path):
    base = StageCache(str(tmp_path), miniature_config("tiny"))
    changed = StageCache(str(tmp_path), miniature_config("tiny", tokenizer_steps=3))
    same = [s for s in STAGES if base.keys[s] == changed.keys[s]]
    assert same == ["data", "text", "siglip"]


def test_unknown_miniature_settings_are_refused():
    with pytest.raises(ValueError, match="unknown MiniatureConfig fields"):
        miniature_config("tiny", vlm_steps=3)
    with pytest.raises(ValueError, match="unknown miniature preset"):
        miniature_config("huge")


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_run_writes_loadable_checkpoints_and_a_complete_report(tiny_run):
    from evotok_hf.pipelines import EvoTokPipeline

    with open(tiny_run / "report.json") as f:
        report = json.load(f)
    assert set(report["floors"]) == set(FLOORS)
    scores = report["scores"]
    assert set(scores["per_depth"]["psnr"]) == {"1", "2", "3", "4"}
    assert set(scores["per_depth"]["semantic_cosine"]) == {str(k) for k in range(1, 17)}
    assert "psnr_mean_colour_baseline" in scores["per_depth"]
    # rFID-style distance in the mini-SigLIP's feature space, by pixel depth, and between two sets of real scenes
    assert set(scores["per_depth"]["rfid"]) == {"1", "2", "3", "4"}
    assert all(v >= 0 for v in scores["per_depth"]["rfid"].values()) and scores["per_depth"]["rfid_real_vs_real"] >= 0
    assert set(scores["nmi_by_depth"]["16"]) >= {"color", "shape"}
    assert set(scores["vqa"]["per_type"]) and 0 <= scores["vqa"]["overall"] <= 1
    # the same questions by the number of objects in their scene
    by_objects = scores["vqa"]["per_type_by_num_objects"]
    assert set(by_objects) == set(scores["vqa"]["per_type"])
    assert sum(e["num_questions"] for per in by_objects.values() for e in per.values()) == scores["vqa"]["num_questions"]
    assert all(set(per) <= {"1", "2", "3", "4"} for per in by_objects.values())
    geneval = scores["geneval"]
    assert set(geneval["by_guidance_scale"]) == {"1.0", "7.5"}
    assert {"overall", "per_category", "control", "heldout", "object_counts"} <= set(geneval["default"])
    assert set(geneval["default"]["object_counts"]) == set(geneval["default"]["per_category"])
    assert set(scores["detector_ground_truth"]["per_category"]) == set(geneval["default"]["per_category"])
    # the detector on the renders' reconstructions from the first k pixel depths: the ceiling of generation
    assert set(scores["detector_reconstructions"]) == {"1", "2", "3", "4"}
    for ceiling in scores["detector_reconstructions"].values():
        assert set(ceiling["per_category"]) == set(geneval["default"]["per_category"]) and 0 <= ceiling["overall"] <= 1
    assert {"color_accuracy", "shape_accuracy"} <= set(report["stages"]["siglip"]["zero_shot_test"])
    assert set(report["timings_seconds"]) == {*STAGES, "total"}
    assert set(report["build_seconds"]) == set(STAGES)
    # each stage trained through its real script
    assert report["stages"]["tokenizer"]["global_step"] == 2
    assert report["stages"]["vlm"]["stage1"]["stage"] == "pretrain"
    assert report["stages"]["vlm"]["stage2"]["stage"] == "sft"

    html = (tiny_run / "report.html").read_text()
    assert "data:image/png;base64," in html and "<svg" in html and "not comparable" in html
    assert "src=\"http" not in html  # self-contained
    assert "Objects detected per image" in html
    assert "By the number of objects in the scene" in html

    # one folder with both heads, through the public loaders
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_run / "vlm")
    assert vlm.config.has_understanding_head and vlm.config.has_generation_head
    # trained with 2-D image position embeddings (zero at assembly: any change is training's)
    assert vlm.config.image_position_embeddings and vlm.image_position_embedding.row.abs().sum() > 0
    assert vlm.generation_config.guidance_scale == 7.5 and vlm.depth_head.generation_config.top_p == 1.0
    processor = AutoProcessor.from_pretrained(tiny_run / "vlm")
    pipe = EvoTokPipeline.from_pretrained(tiny_run / "vlm")
    image = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert processor.num_image_tokens == 64
    assert isinstance(SiglipModel.from_pretrained(tiny_run / "siglip"), SiglipModel)
    assert EvoTokModel.from_pretrained(tiny_run / "tokenizer").config.semantic_depth == 16


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_feature_probe_script_reads_a_finished_run(tiny_run, tmp_path):
    script = os.path.join(os.path.dirname(DEMO), "probe_miniature_features.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, script, "--output-dir", str(tiny_run), "--num-scenes", "12"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    with open(tiny_run / "feature_probes.json") as f:
        probes = json.load(f)["probes"]
    assert set(probes) == {"teacher", "semantic_depth_4", "semantic_depth_16"}
    assert "semantic_depth_16" in run.stdout and "shape" in run.stdout
    bad = subprocess.run([sys.executable, script, "--output-dir", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 1 and "is not a finished miniature run" in bad.stderr and "Traceback" not in bad.stderr


def test_second_run_reuses_every_stage(tiny_run):
    start = time.perf_counter()
    result = _run_demo(tiny_run)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tiny_run / "report.json") as f:
        report = json.load(f)
    assert report["stages_rebuilt"] == []
    assert time.perf_counter() - start < 60


# ------------------------------------------------------------------------------------------------ the main job
@pytest.mark.slow
def test_demo_reaches_the_floors(tmp_path):
    """The whole demo at its real budgets, on a quiet 2-core machine about 15 minutes: every acceptance floor."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, DEMO, "--output-dir", str(tmp_path), "--no-progress"], env=env,
                            capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert report["scores"]["detector_ground_truth"]["overall"] >= 0.98
    missed = {name: item for name, item in report["floors"].items() if not item["met"]}
    assert not missed, missed
