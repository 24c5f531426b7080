"""Image-generation settings saved with a model (`generation_config.image_generation` in generation_config.json) are
the ones a reloaded folder generates with: set in memory and saved, or edited in the file by hand as a user would,
through `from_pretrained` + `generate`, the Auto class, and `EvoTokPipeline` (plain VLM folder and pipeline folder)."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, GenerationConfig
from vlm_helpers import bpe_tokenizer, tiny_generation_vlm, tiny_processor

from evotok_hf import EvoTokForConditionalGeneration
from evotok_hf.pipelines import EvoTokPipeline

CORPUS = ["system user assistant You are a helpful assistant.", "a red bicycle on a green hill", "a cat, a dog."]
PROMPTS = ["a red bicycle on a green hill", "a cat"]
# Different from IMAGE_GENERATION_DEFAULTS in every setting (greedy, so runs compare exactly)
EDITED = {"guidance_scale": 3.0, "do_sample": False, "depth_temperature": 0.5, "depth_top_k": [4, 0],
          "depth_top_p": 0.8}  # fmt: skip


@pytest.fixture(scope="module")
def text_tokenizer():
    return bpe_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    return tiny_processor(text_tokenizer, wrap_image_tokens=True)


@pytest.fixture()
def model(text_tokenizer):
    return tiny_generation_vlm(text_tokenizer)


def generate(model, processor, **settings):
    inputs = processor(text=PROMPTS, generation_mode="image", return_tensors="pt")
    return model.generate(**inputs, generation_mode="image", **settings)


def edit_generation_config(path, **image_generation):
    """What a user does: open generation_config.json, change (or add) `image_generation`, save it."""
    data = json.loads(path.read_text())
    data["image_generation"] = {**data.get("image_generation", {}), **image_generation}
    path.write_text(json.dumps(data, indent=2))


def test_settings_set_in_memory_survive_save_and_reload(model, processor, tmp_path):
    model.generation_config.image_generation = dict(EDITED)
    model.save_pretrained(tmp_path / "first")
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "first")
    assert loaded.generation_config.image_generation == EDITED
    loaded.save_pretrained(tmp_path / "second")  # and again, from the reloaded model
    again = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "second")
    assert again.generation_config.image_generation == EDITED
    # the text-generation fields are kept as they were
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert loaded.generation_config.pad_token_id == model.generation_config.pad_token_id


@pytest.mark.parametrize("saved_before", [False, True], ids=["added-by-hand", "edited-by-hand"])
def test_hand_edited_settings_drive_a_reloaded_folder(model, processor, tmp_path, saved_before):
    if saved_before:  # a folder that already holds settings (as a converted one does), edited afterwards
        model.generation_config.image_generation = {"guidance_scale": 7.5, "do_sample": True}
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    edit_generation_config(tmp_path / "generation_config.json", **EDITED)

    expected = generate(model, processor, **EDITED)
    assert not torch.equal(expected, generate(model, processor, do_sample=False))  # the edit matters
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(generate(loaded, processor), expected)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert torch.equal(generate(auto, processor), expected)

    pipe = EvoTokPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    reference = EvoTokPipeline(model=model, processor=processor)
    reference.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipe(PROMPTS, output_type="pt").images,
                               reference(PROMPTS, output_type="pt", **EDITED).images, rtol=0, atol=0)  # fmt: skip


def test_hand_edited_settings_drive_a_reloaded_pipeline_folder(model, processor, tmp_path):
    pipe = EvoTokPipeline(model=model, processor=processor)
    pipe.save_pretrained(tmp_path)
    edit_generation_config(tmp_path / "model" / "generation_config.json", **EDITED)
    loaded = EvoTokPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(PROMPTS, output_type="pt").images,
                               pipe(PROMPTS, output_type="pt", **EDITED).images, rtol=0, atol=0)  # fmt: skip


def test_a_folder_without_generation_config_loads_with_the_defaults(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)
    assert getattr(loaded.generation_config, "image_generation", None) is None
    assert torch.equal(generate(loaded, processor, do_sample=False), generate(model, processor, do_sample=False))


def test_a_generation_config_given_to_from_pretrained_wins(model, tmp_path):
    model.generation_config.image_generation = dict(EDITED)
    model.save_pretrained(tmp_path)
    given = GenerationConfig(image_generation={"guidance_scale": 2.0})
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path, generation_config=given)
    assert loaded.generation_config.image_generation == {"guidance_scale": 2.0}
