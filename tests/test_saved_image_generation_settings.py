"""Image-generation settings saved with a model are the ones a reloaded folder generates with. generation_config.json
holds them as transformers' Janus and CSM do: `guidance_scale` beside the text settings, the depth head's sampling as
`depth_decoder_*` (loaded into `model.depth_head.generation_config`). Set in memory and saved, or edited in the file by
hand as a user would, they drive `from_pretrained` + `generate`, the Auto class and `EvoTokPipeline` (plain VLM folder
and pipeline folder). Folders saved by earlier releases, whose settings sit in an `image_generation` dict, load with
those settings and are saved back in today's form."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, GenerationConfig
from vlm_helpers import T2I_PROMPTS, generate_codes, tiny_generation_vlm

from evotok_hf import EvoTokForConditionalGeneration
from evotok_hf.modeling.generation import IMAGE_GENERATION_DEFAULTS, LEGACY_SETTING_NAMES
from evotok_hf.pipelines import EvoTokPipeline

# Different from IMAGE_GENERATION_DEFAULTS in every setting (greedy, so runs compare exactly), as generation_config.json
# names them
EDITED = {"guidance_scale": 3.0, "depth_decoder_do_sample": False, "depth_decoder_temperature": 0.5,
          "depth_decoder_top_k": [4, 0], "depth_decoder_top_p": 0.8}  # fmt: skip
# The same in the `image_generation` dict of earlier releases
EDITED_LEGACY = {"guidance_scale": 3.0, "do_sample": False, "depth_temperature": 0.5, "depth_top_k": [4, 0],
                 "depth_top_p": 0.8}  # fmt: skip
# What a checkpoint saved by the miniature demo (scripts/demo_miniature.py) holds
MINIATURE_LEGACY = {"guidance_scale": 7.5, "do_sample": True, "depth_temperature": 1.0, "depth_top_p": 0.96}


@pytest.fixture()
def model(t2i_tokenizer):
    """A model of its own for each test (conftest's `t2i_vlm` is shared by a module): the tests change its settings."""
    return tiny_generation_vlm(t2i_tokenizer)


def set_in_memory(model, settings: dict) -> None:
    """Today's form in memory: the guidance scale in the model's generation config, the rest in the depth head's."""
    model.generation_config.guidance_scale = settings["guidance_scale"]
    for name, value in settings.items():
        if name.startswith("depth_decoder_"):
            setattr(model.depth_head.generation_config, name.removeprefix("depth_decoder_"), value)


def settings_of(model) -> dict:
    """A loaded model's image-generation settings, by the names of generation_config.json (None: not set)."""
    depth = model.depth_head.generation_config
    names = ("do_sample", "temperature", "top_k", "top_p")
    return {"guidance_scale": model.generation_config.guidance_scale,
            **{f"depth_decoder_{name}": getattr(depth, name) for name in names}}


def edit_generation_config(path, **settings):
    """What a user does: open generation_config.json, change (or add) settings, save it."""
    data = json.loads(path.read_text())
    data.update(settings)
    path.write_text(json.dumps(data, indent=2))


def test_settings_set_in_memory_survive_save_and_reload(model, tmp_path):
    set_in_memory(model, EDITED)
    model.save_pretrained(tmp_path / "first")
    saved = json.loads((tmp_path / "first" / "generation_config.json").read_text())
    assert {name: saved[name] for name in EDITED} == EDITED and "image_generation" not in saved
    assert not hasattr(model.generation_config, "depth_decoder_top_k")  # saving left the model's config as it was
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "first")
    assert settings_of(loaded) == EDITED
    assert not hasattr(loaded.generation_config, "depth_decoder_top_k")  # moved to the depth head's config, as CSM
    loaded.save_pretrained(tmp_path / "second")  # and again, from the reloaded model
    again = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "second")
    assert settings_of(again) == EDITED
    # the text-generation fields are kept as they were
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert loaded.generation_config.pad_token_id == model.generation_config.pad_token_id
    # readers that know nothing of the depth head (transformers' own GenerationConfig) keep the settings too, also
    # from the file of a new model (whose generation config was built from its model config)
    assert GenerationConfig.from_pretrained(tmp_path / "first").depth_decoder_top_k == [4, 0]


@pytest.mark.parametrize("saved_before", [False, True], ids=["added-by-hand", "edited-by-hand"])
def test_hand_edited_settings_drive_a_reloaded_folder(model, t2i_processor, tmp_path, saved_before):
    if saved_before:  # a folder that already holds settings (as a converted one does), edited afterwards
        set_in_memory(model, IMAGE_GENERATION_DEFAULTS)
    model.save_pretrained(tmp_path)
    t2i_processor.save_pretrained(tmp_path)
    edit_generation_config(tmp_path / "generation_config.json", **EDITED)

    expected = generate_codes(model, t2i_processor, **EDITED)
    assert not torch.equal(expected, generate_codes(model, t2i_processor, do_sample=False))  # the edit matters
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(generate_codes(loaded, t2i_processor), expected)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert torch.equal(generate_codes(auto, t2i_processor), expected)

    pipe = EvoTokPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    reference = EvoTokPipeline(model=model, processor=t2i_processor)
    reference.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipe(T2I_PROMPTS, output_type="pt").images,
                               reference(T2I_PROMPTS, output_type="pt", **EDITED).images, rtol=0, atol=0)  # fmt: skip


def test_hand_edited_settings_drive_a_reloaded_pipeline_folder(model, t2i_processor, tmp_path):
    pipe = EvoTokPipeline(model=model, processor=t2i_processor)
    pipe.save_pretrained(tmp_path)
    edit_generation_config(tmp_path / "model" / "generation_config.json", **EDITED)
    loaded = EvoTokPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(T2I_PROMPTS, output_type="pt").images,
                               pipe(T2I_PROMPTS, output_type="pt", **EDITED).images, rtol=0, atol=0)  # fmt: skip


def save_like_an_earlier_release(model, folder, image_generation: dict) -> None:
    """A folder as earlier releases left it: the model saved, then (as scripts/demo_miniature.py does) its
    generation_config.json read with transformers' GenerationConfig, given an `image_generation` dict and saved."""
    model.save_pretrained(folder)
    generation_config = GenerationConfig.from_pretrained(folder)
    generation_config.image_generation = dict(image_generation)
    generation_config.save_pretrained(folder)


def test_a_miniature_checkpoint_of_an_earlier_release_loads_with_its_settings(model, t2i_processor, tmp_path):
    save_like_an_earlier_release(model, tmp_path, MINIATURE_LEGACY)
    assert json.loads((tmp_path / "generation_config.json").read_text())["image_generation"] == MINIATURE_LEGACY
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)
    assert settings_of(loaded) == {"guidance_scale": 7.5, "depth_decoder_do_sample": True,
                                   "depth_decoder_temperature": 1.0, "depth_decoder_top_k": None,
                                   "depth_decoder_top_p": 0.96}  # fmt: skip
    assert not hasattr(loaded.generation_config, "image_generation")
    # the settings it generates with: the saved ones (top-k not saved: the default), as the old names give them
    explicit = dict(MINIATURE_LEGACY, depth_top_k=IMAGE_GENERATION_DEFAULTS["depth_decoder_top_k"])
    expected = generate_codes(model, t2i_processor, generator=torch.Generator().manual_seed(4), **explicit)
    assert torch.equal(generate_codes(loaded, t2i_processor, generator=torch.Generator().manual_seed(4)), expected)
    # saved again, in today's form
    loaded.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "generation_config.json").read_text())
    assert "image_generation" not in saved
    assert {k: saved.get(k) for k in ("guidance_scale", "depth_decoder_do_sample", "depth_decoder_top_p")} == {
        "guidance_scale": 7.5, "depth_decoder_do_sample": True, "depth_decoder_top_p": 0.96}  # fmt: skip
    again = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "resaved")
    assert torch.equal(generate_codes(again, t2i_processor, generator=torch.Generator().manual_seed(4)), expected)


def test_every_setting_of_an_earlier_release_is_read(model, t2i_processor, tmp_path):
    save_like_an_earlier_release(model, tmp_path, EDITED_LEGACY)
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)
    assert settings_of(loaded) == EDITED
    assert torch.equal(generate_codes(loaded, t2i_processor), generate_codes(model, t2i_processor, **EDITED_LEGACY))
    # a dict set in memory, as code written for earlier releases does, is honoured without saving
    model.generation_config.image_generation = dict(EDITED_LEGACY)
    assert torch.equal(generate_codes(model, t2i_processor), generate_codes(loaded, t2i_processor))
    # a None in the old dict meant "off": no guidance, no top-k
    model.generation_config.image_generation = {"guidance_scale": None, "do_sample": True, "depth_top_k": None}
    unguided = generate_codes(model, t2i_processor, generator=torch.Generator().manual_seed(1))
    del model.generation_config.image_generation
    assert torch.equal(unguided, generate_codes(model, t2i_processor, guidance_scale=1.0, depth_decoder_top_k=0,
                                                generator=torch.Generator().manual_seed(1)))  # fmt: skip
    assert set(EDITED_LEGACY) == {"guidance_scale", *LEGACY_SETTING_NAMES}  # every old name is covered here


def test_a_malformed_dict_of_an_earlier_release_loads_and_is_named_when_generating(model, t2i_processor, tmp_path):
    save_like_an_earlier_release(model, tmp_path, {"guidance": 3.0})
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)  # text generation is unaffected
    with pytest.raises(ValueError, match=r"generation_config.image_generation has unknown settings \['guidance'\]"):
        generate_codes(loaded, t2i_processor)


def test_a_folder_without_generation_config_loads_with_the_defaults(model, t2i_processor, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)
    assert set(settings_of(loaded).values()) == {None}
    expected = generate_codes(model, t2i_processor, do_sample=False)
    assert torch.equal(generate_codes(loaded, t2i_processor, do_sample=False), expected)


@pytest.mark.parametrize("given", [GenerationConfig(guidance_scale=2.0, depth_decoder_top_k=5),
                                   GenerationConfig(image_generation={"guidance_scale": 2.0, "depth_top_k": 5})],
                         ids=["today", "earlier-release"])  # fmt: skip
def test_a_generation_config_given_to_from_pretrained_wins(model, tmp_path, given):
    set_in_memory(model, EDITED)
    model.save_pretrained(tmp_path)
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path, generation_config=given)
    assert settings_of(loaded) == {"guidance_scale": 2.0, "depth_decoder_do_sample": None,
                                   "depth_decoder_temperature": None, "depth_decoder_top_k": 5,
                                   "depth_decoder_top_p": None}  # fmt: skip
