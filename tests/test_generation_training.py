"""Text-to-image training: data layouts, labels, pre-tokenised codes, stages, the overfit test, joint checkpoints."""

import json
import os
import runpy
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


def test_joint_checkpoint_from_components_trains_both_heads(tmp_path, text_tokenizer, photos):
    """--task joint assembles a VLM with both heads from a tokenizer folder and an LLM folder; one batch mixing a
    captioning row (image to read) and a text-to-image row (image to write) trains both projectors and the head."""
    torch.manual_seed(0)
    EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).save_pretrained(tmp_path / "tok")
    llm_config = Qwen2Config(vocab_size=len(text_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    Qwen2ForCausalLM(llm_config).save_pretrained(tmp_path / "llm")
    text_tokenizer.save_pretrained(tmp_path / "llm")
    photos[0].save(tmp_path / "cat.png")
    photos[1].save(tmp_path / "coffee.png")
    rows = [
        {"id": "read", "image": "cat.png", "conversations": [{"from": "human", "value": "<image>\ndescribe the image."},
                                                             {"from": "gpt", "value": "a cat."}]},
        {"id": "write", "image": "coffee.png", "conversations": [{"from": "human", "value": CAPTION},
                                                                 {"from": "gpt", "value": "<image>"}]},
    ]  # fmt: skip
    with open(tmp_path / "mixed.json", "w") as f:
        json.dump(rows, f)
    out = train_main()([
        "--tokenizer_name_or_path", str(tmp_path / "tok"), "--llm_name_or_path", str(tmp_path / "llm"),
        "--task", "joint", "--stage", "pretrain", "--depth_head_config", '{"hidden_size": 32, "num_hidden_layers": 1, '
        '"num_attention_heads": 4}', "--dataset", str(tmp_path / "mixed.json"), "--image_folder", str(tmp_path),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
    ])  # fmt: skip
    model = EvoTokForConditionalGeneration.from_pretrained(out)
    config = model.config
    assert config.has_understanding_head and config.has_generation_head and not config.wrap_image_tokens
    assert config.depth_head_config.num_hidden_layers == 1
    batch = EvoTokVLMDataCollator(EvoTokProcessor.from_pretrained(out), image_folder=str(tmp_path))(rows)
    assert batch["pixel_values"].shape[0] == 1 and batch["generation_pixel_values"].shape[0] == 1
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.image_loss) and torch.isfinite(output.text_loss)


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
