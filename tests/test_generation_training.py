"""Text-to-image training: data layouts, labels, pre-tokenised codes, stages, the overfit test, joint checkpoints."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM
from vlm_helpers import bpe_tokenizer, tiny_generation_vlm, tiny_processor

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokModel, EvoTokProcessor
from evotok_hf.bundled_photos import load_bundled_photos
from evotok_hf.training.vlm import IGNORE_INDEX, EvoTokVLMDataCollator, pretokenize_images

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a cat sitting on a chair"
CORPUS = ["system user assistant You are a helpful assistant.", CAPTION, "describe the image. a cat."]


def train_main():
    return runpy.run_path(str(ROOT / "scripts" / "train_vlm.py"), run_name="not_main")["main"]


@pytest.fixture(scope="module")
def text_tokenizer():
    return bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return tiny_processor(text_tokenizer, wrap_image_tokens=True, resize_mode="center_crop")


@pytest.fixture(scope="module")
def photos():
    return [p.convert("RGB") for p in load_bundled_photos(["chelsea", "coffee"]).values()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text_tokenizer, processor):
    folder = tmp_path_factory.mktemp("generation_vlm")
    tiny_generation_vlm(text_tokenizer, sharpen=1.0).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_text_to_image_rows_are_wrapped_targets_with_labelled_start_and_end(processor, text_tokenizer, photos, tmp_path):
    grid = EvoTokConfig.from_preset("evotok-tiny").grid_size
    collator = EvoTokVLMDataCollator(processor, image_folder=str(tmp_path))
    photos[0].save(tmp_path / "cat.png")
    t2i = collator([{"text": CAPTION, "image": photos[0]}])
    llava = collator([{"image": "cat.png", "conversations": [{"from": "human", "value": CAPTION},
                                                              {"from": "gpt", "value": "<image>"}]}])  # fmt: skip
    for key in ("input_ids", "labels", "generation_pixel_values"):
        assert torch.equal(t2i[key], llava[key]), key
    assert "pixel_values" not in t2i and t2i["generation_pixel_values"].shape[0] == 1
    ids, labels = t2i["input_ids"][0], t2i["labels"][0]
    image = (ids == processor.image_token_id).nonzero().flatten()
    assert image.numel() == grid**2 and torch.equal(image, torch.arange(image[0], image[0] + grid**2))
    assert ids[image[0] - 1] == text_tokenizer.convert_tokens_to_ids("<boi>")
    assert ids[image[-1] + 1] == text_tokenizer.convert_tokens_to_ids("<eoi>")
    # labelled: the assistant turn's start / end tokens and end of turn, never the image tokens or the user turn
    assert text_tokenizer.decode(ids[labels != IGNORE_INDEX]) == "<boi><eoi>\n<|im_end|>\n"


def test_pretokenised_codes_match_on_the_fly_tokenisation(processor, text_tokenizer, photos):
    model = tiny_generation_vlm(text_tokenizer)
    tokenizer_model = model.vision_tower
    raw = datasets.Dataset.from_dict({"text": [CAPTION, "a cat"], "image": photos},
                                     features=datasets.Features({"text": datasets.Value("string"),
                                                                 "image": datasets.Image()}))  # fmt: skip
    coded = pretokenize_images(raw, tokenizer_model, processor.image_processor, kind="generation")
    assert coded.column_names == ["text", "generation_codes"]
    collator = EvoTokVLMDataCollator(processor)
    from_pixels, from_codes = collator(list(raw)), collator(list(coded))
    pixel_depth = model.config.vision_config.pixel_depth
    expected = tokenizer_model.encode(from_pixels["generation_pixel_values"]).codes[..., :pixel_depth]
    assert torch.equal(from_codes["generation_codes"], expected)
    with torch.no_grad():
        torch.testing.assert_close(model(**from_codes).loss, model(**from_pixels).loss)
    with pytest.raises(ValueError, match="no column"):
        pretokenize_images(raw, tokenizer_model, processor.image_processor, image_column="picture")


def test_overfit_one_pair_then_greedy_generation_reproduces_its_codes(model_dir, tmp_path):
    """A few dozen steps of train_vlm.py --task generation on one caption / code-grid pair (random codes, so every
    position differs): greedy generation from the caption then writes exactly those codes."""
    vision = EvoTokConfig.from_preset("evotok-tiny")
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, vision.codebook_size, (vision.grid_size, vision.grid_size, vision.pixel_depth), generator=g)
    datasets.Dataset.from_dict({"text": [CAPTION], "generation_codes": [[target.tolist()]]}).save_to_disk(
        str(tmp_path / "data")
    )
    out = train_main()([
        "--model_name_or_path", str(model_dir), "--task", "generation", "--dataset", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "100", "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "1", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no", "--seed", "0",
    ])  # fmt: skip
    model = EvoTokForConditionalGeneration.from_pretrained(out).eval()
    processor = EvoTokProcessor.from_pretrained(out)
    inputs = processor(text=[CAPTION], generation_mode="image", return_tensors="pt")
    codes = model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=1.0)
    assert torch.equal(codes[0], target)
    untrained = EvoTokForConditionalGeneration.from_pretrained(model_dir).eval()
    before = untrained.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=1.0)
    assert (before[0] == target).float().mean() < 0.5  # it was learned, not there from the start
    with open(os.path.join(out, "train_results.json")) as f:
        assert json.load(f)["task"] == "generation"


def test_generation_stage1_trains_only_the_generation_parts(model_dir, tmp_path, photos):
    datasets.Dataset.from_dict({"text": [CAPTION] * 2, "image": photos},
                               features=datasets.Features({"text": datasets.Value("string"),
                                                           "image": datasets.Image()})).save_to_disk(
        str(tmp_path / "data"))  # fmt: skip
    out = train_main()([
        "--model_name_or_path", str(model_dir), "--task", "generation", "--stage", "pretrain",
        "--dataset", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--learning_rate", "1e-2", "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no",
    ])  # fmt: skip
    before, after = load_file(model_dir / "model.safetensors"), load_file(Path(out) / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prefixes = ("model.generation_projector.", "depth_head.")
    assert changed and all(k.startswith(prefixes) for k in changed)
    assert any(k.startswith("depth_head.") for k in changed) and any(k.startswith(prefixes[0]) for k in changed)


def test_trl_trainer_refuses_a_generation_head(model_dir, tmp_path):
    datasets.Dataset.from_dict({"text": [CAPTION], "generation_codes": [[[[[0, 0]] * 4] * 4]]}).save_to_disk(
        str(tmp_path / "data"))  # fmt: skip
    with pytest.raises(ValueError, match="image loss"):
        train_main()(["--model_name_or_path", str(model_dir), "--task", "generation", "--trainer", "trl",
                      "--dataset", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--use_cpu"])  # fmt: skip
    with pytest.raises(ValueError, match="lacks"):
        train_main()(["--model_name_or_path", str(model_dir), "--task", "joint", "--dataset",
                      str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--use_cpu"])  # fmt: skip


def _joint_components(folder, text_tokenizer, photos, copies: int = 1) -> list[dict]:
    """A tiny tokenizer folder (`tok`), a tiny Qwen2 folder (`llm`), two photos and `mixed.json`: a captioning row
    (an image to read) and a text-to-image row (an image to write), `copies` times in that order."""
    torch.manual_seed(0)
    EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).save_pretrained(folder / "tok")
    llm_config = Qwen2Config(vocab_size=len(text_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    Qwen2ForCausalLM(llm_config).save_pretrained(folder / "llm")
    text_tokenizer.save_pretrained(folder / "llm")
    photos[0].save(folder / "cat.png")
    photos[1].save(folder / "coffee.png")
    rows = [
        {"id": "read", "image": "cat.png", "conversations": [{"from": "human", "value": "<image>\ndescribe the image."},
                                                             {"from": "gpt", "value": "a cat."}]},
        {"id": "write", "image": "coffee.png", "conversations": [{"from": "human", "value": CAPTION},
                                                                 {"from": "gpt", "value": "<image>"}]},
    ]  # fmt: skip
    with open(folder / "mixed.json", "w") as f:
        json.dump(rows * copies, f)
    return rows


def _joint_argv(folder, output: str) -> list[str]:
    return [
        "--tokenizer_name_or_path", str(folder / "tok"), "--llm_name_or_path", str(folder / "llm"),
        "--task", "joint", "--stage", "pretrain", "--depth_head_config", '{"hidden_size": 32, "num_hidden_layers": 1, '
        '"num_attention_heads": 4, "resid_dropout": 0.0}', "--dataset", str(folder / "mixed.json"), "--image_folder",
        str(folder), "--output_dir", str(folder / output), "--use_cpu", "--report_to", "none", "--save_strategy", "no",
        "--seed", "0",
    ]  # fmt: skip


def test_joint_checkpoint_from_components_trains_both_heads(tmp_path, text_tokenizer, photos):
    """--task joint assembles a VLM with both heads from a tokenizer folder and an LLM folder; one batch mixing a
    captioning row (image to read) and a text-to-image row (image to write) trains both projectors and the head."""
    rows = _joint_components(tmp_path, text_tokenizer, photos)
    out = train_main()([*_joint_argv(tmp_path, "out"), "--max_steps", "1", "--per_device_train_batch_size", "2",
                        "--learning_rate", "1e-2"])  # fmt: skip
    model = EvoTokForConditionalGeneration.from_pretrained(out)
    config = model.config
    assert config.has_understanding_head and config.has_generation_head and not config.wrap_image_tokens
    assert config.depth_head_config.num_hidden_layers == 1
    batch = EvoTokVLMDataCollator(EvoTokProcessor.from_pretrained(out), image_folder=str(tmp_path))(rows)
    assert batch["pixel_values"].shape[0] == 1 and batch["generation_pixel_values"].shape[0] == 1
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.image_loss) and torch.isfinite(output.text_loss)


def test_image_loss_weight_scales_the_image_loss_in_the_training_loss_and_is_saved(tmp_path, text_tokenizer, photos):
    """--image_loss_weight w: the model trains on text_loss + w * image_loss and saves w in its config; 1.0 is the
    plain sum; a weight that is not a finite positive number, or one for a model without a generation head, is
    refused."""
    rows = _joint_components(tmp_path, text_tokenizer, photos)
    out = train_main()([*_joint_argv(tmp_path, "out"), "--max_steps", "1", "--per_device_train_batch_size", "2",
                        "--learning_rate", "1e-3", "--image_loss_weight", "2.5"])  # fmt: skip
    model = EvoTokForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.image_loss_weight == 2.5
    batch = EvoTokVLMDataCollator(EvoTokProcessor.from_pretrained(out), image_folder=str(tmp_path))(rows)
    with torch.no_grad():
        weighted = model(**batch)
        model.config.image_loss_weight = 1.0
        plain = model(**batch)
    assert torch.equal(weighted.text_loss, plain.text_loss) and torch.equal(weighted.image_loss, plain.image_loss)
    torch.testing.assert_close(plain.loss, plain.text_loss + plain.image_loss)
    torch.testing.assert_close(weighted.loss, plain.text_loss + 2.5 * plain.image_loss)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="image_loss_weight"):
            type(model.config)(**{**model.config.to_dict(), "image_loss_weight": bad})
    with pytest.raises(ValueError, match="image_loss_weight"):
        train_main()([*_joint_argv(tmp_path, "bad"), "--max_steps", "1", "--image_loss_weight", "0"])
    understanding = [arg if arg != "joint" else "understanding" for arg in _joint_argv(tmp_path, "understanding")]
    with pytest.raises(ValueError, match="no generation head"):
        train_main()([*understanding, "--max_steps", "1", "--image_loss_weight", "2"])


def test_gradient_accumulation_weighs_the_image_loss_as_one_larger_batch(tmp_path, text_tokenizer, photos):
    """One SGD step over two accumulated micro-batches, each the same (read, write) pair, moves every weight exactly as
    one step over that pair. The Trainer, handed `num_items_in_batch`, neither averages a model's loss over
    accumulation steps nor over processes; the image loss is a per-micro-batch mean, so a joint model that took the
    count would step its depth head twice as far here (and num_processes times as far under DDP)."""
    _joint_components(tmp_path, text_tokenizer, photos, copies=2)
    common = [*_joint_argv(tmp_path, "unused"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--optim",
              "sgd", "--lr_scheduler_type", "constant", "--train_sampling_strategy",
              "sequential"]  # fmt: skip
    weights = {}
    for name, accumulation, learning_rate in (("start", 1, 0.0), ("one", 1, 0.5), ("two", 2, 0.5)):
        folder = train_main()([*common, "--output_dir", str(tmp_path / name), "--gradient_accumulation_steps",
                               str(accumulation), "--learning_rate", str(learning_rate)])  # fmt: skip
        weights[name] = load_file(os.path.join(folder, "model.safetensors"))
    moved = set()
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["two"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        if not torch.equal(value, weights["start"][key]):
            moved.add(key.split(".")[0] if not key.startswith("model.") else key.split(".")[1])
    # both losses trained something: the depth head (image loss) and the understanding projector (text loss)
    assert {"depth_head", "multi_modal_projector", "generation_projector"} <= moved, moved


def test_two_process_step_weighs_the_image_loss_as_one_process(tmp_path, text_tokenizer, photos):
    """A real two-process (torchrun, gloo) step of scripts/train_vlm.py where each rank gets the same (read, write)
    pair moves every weight exactly as one process's step over that pair: with `num_items_in_batch` the Trainer would
    multiply the loss by the number of processes, which only a loss normalised by the whole step's count undoes (the
    text loss), so the depth head would step twice as far."""
    _joint_components(tmp_path, text_tokenizer, photos, copies=2)
    common = [*_joint_argv(tmp_path, "unused"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--optim",
              "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--train_sampling_strategy",
              "sequential"]  # fmt: skip
    one = train_main()([*common, "--output_dir", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "scripts" / "train_vlm.py"), *common, "--output_dir", str(tmp_path / "two"), "--ddp_backend",
         "gloo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    single, ranks = (load_file(os.path.join(folder, "model.safetensors")) for folder in (one, tmp_path / "two"))
    for key, value in single.items():
        torch.testing.assert_close(ranks[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_token_lengths_are_the_encoded_lengths_and_leave_the_unconditional_draws_alone(tmp_path, text_tokenizer, photos,
                                                                                      processor):
    """What length-grouped sampling sorts by: for every row layout, the number of tokens the collator gives the row
    (capped at max_length), computed without opening images and without drawing from the collator's generator (the
    rows dropped to the unconditional prompt are those a collator that never measured drops)."""
    photos[0].save(tmp_path / "cat.png")
    rows = [
        {"id": "read", "image": "cat.png", "conversations": [
            {"from": "human", "value": "<image>\ndescribe the image."}, {"from": "gpt", "value": "a cat."},
            {"from": "human", "value": "describe the image."}, {"from": "gpt", "value": "a cat sitting on a chair"}]},
        {"id": "write", "image": "cat.png", "conversations": [{"from": "human", "value": CAPTION},
                                                              {"from": "gpt", "value": "<image>"}]},
        {"text": CAPTION, "image": "cat.png"},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
                      {"role": "assistant", "content": "a cat"}], "images": [photos[0]]},
    ]  # fmt: skip
    exact = EvoTokVLMDataCollator(processor, image_folder=str(tmp_path))
    expected = [exact.encode_example(row)["input_ids"].numel() for row in rows]
    assert exact.token_lengths(rows) == expected and len(set(expected)) == 3
    capped = EvoTokVLMDataCollator(processor, image_folder=str(tmp_path), max_length=min(expected) + 1)
    assert capped.token_lengths(rows) == [min(n, min(expected) + 1) for n in expected]
    # unconditional drops: the same draws whether or not the lengths were measured first
    measured, fresh = (EvoTokVLMDataCollator(processor, image_folder=str(tmp_path), unconditional_probability=0.5,
                                             seed=3) for _ in range(2))  # fmt: skip
    measured.token_lengths(rows * 5)
    drawn = [[collator.encode_example(rows[1])["input_ids"].numel() for _ in range(12)]
             for collator in (measured, fresh)]  # fmt: skip
    assert drawn[0] == drawn[1] and len(set(drawn[0])) == 2


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_grouped_sampling_trains_on_conversation_rows(tmp_path, text_tokenizer, photos, strategy):
    """The Trainer's length-grouped samplers need each row's token count, which raw conversation rows do not carry
    (the Trainer would look for `input_ids` and stop): the script measures the rows with the collator first."""
    _joint_components(tmp_path, text_tokenizer, photos, copies=4)
    out = train_main()([*_joint_argv(tmp_path, "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
                        "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--train_sampling_strategy",
                        strategy])  # fmt: skip
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "train_results.json")) as f:
        assert json.load(f)["train_loss"] > 0


def test_unconditional_rows_train_the_prompt_guidance_runs_as_its_unconditional_half(processor, photos):
    """Classifier-free guidance contrasts the prompt with the unconditional prompt; a model never trained on the
    latter extrapolates from an untrained branch. With unconditional_probability=1 every text-to-image row becomes the
    exact prefix inference feeds the unconditional half (the processor's negative_input_ids, up to the image start);
    a VQA row is never changed; with 0 nothing is."""
    vqa = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
                        {"role": "assistant", "content": "a cat"}], "images": [photos[0]]}  # fmt: skip
    t2i = {"text": CAPTION, "image": photos[0]}
    always = EvoTokVLMDataCollator(processor, unconditional_probability=1.0)
    never = EvoTokVLMDataCollator(processor, unconditional_probability=0.0)
    negative = processor(text=CAPTION, generation_mode="image", return_tensors="pt")["negative_input_ids"][0]
    dropped = always([t2i])["input_ids"][0]
    assert torch.equal(dropped[: negative.numel()], negative)
    kept = never([t2i])["input_ids"][0]
    assert not torch.equal(kept[: negative.numel()], negative)
    assert torch.equal(always([vqa])["input_ids"], never([vqa])["input_ids"])


def test_unconditional_probability_drops_about_that_share_of_rows_reproducibly(processor, photos):
    rows = [{"text": CAPTION, "image": photos[0]}] * 400
    negative = processor(text=CAPTION, generation_mode="image", return_tensors="pt")["negative_input_ids"][0]

    def dropped(seed):
        collator = EvoTokVLMDataCollator(processor, unconditional_probability=0.25, seed=seed)
        ids = [collator([row])["input_ids"][0] for row in rows]
        return [torch.equal(i[: negative.numel()], negative) for i in ids]

    first = dropped(0)
    assert 0.18 < sum(first) / len(first) < 0.32  # binomial(400, 0.25): 5 standard deviations either side
    assert dropped(0) == first and dropped(1) != first
    with pytest.raises(ValueError, match="unconditional_probability"):
        EvoTokVLMDataCollator(processor, unconditional_probability=1.5)
