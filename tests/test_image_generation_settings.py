"""Image-generation settings (guidance scale, sampling on/off, per-depth temperature / top-k / top-p): every entry
point (`generate(generation_mode="image")`, `EvoTokPipeline`) accepts and refuses the same values with the same
message, whether a value is passed (by today's name or an earlier release's) or saved in the model's generation
configs (today's form, or the `image_generation` dict of earlier releases)."""

import copy
import math
import re

import pytest
import torch
from vlm_helpers import T2I_PROMPTS, generate_codes

from evotok_hf.modeling.generation import LEGACY_SETTING_NAMES

# (settings, what the message must say): each value is outside what the setting means (pixel_depth is 2 here)
INVALID = [
    ({"depth_top_p": 1.5}, "depth_top_p must be in (0, 1], got 1.5 at depth 0"),
    ({"depth_top_p": math.nan}, "depth_top_p must be in (0, 1], got nan at depth 0"),
    ({"depth_top_p": 0.0}, "depth_top_p must be in (0, 1], got 0.0 at depth 0"),
    ({"depth_top_p": [0.9, -0.1]}, "depth_top_p must be in (0, 1], got -0.1 at depth 1"),
    ({"depth_top_p": "0.9"}, "depth_top_p must be in (0, 1], got '0.9' at depth 0"),
    ({"depth_temperature": math.nan}, "depth_temperature must be a finite number > 0, got nan at depth 0"),
    ({"depth_temperature": [1.0, math.inf]}, "depth_temperature must be a finite number > 0, got inf at depth 1"),
    ({"depth_temperature": -1.0}, "depth_temperature must be a finite number > 0, got -1.0 at depth 0"),
    ({"depth_temperature": 0.0}, "depth_temperature must be a finite number > 0, got 0.0 at depth 0"),
    ({"depth_top_k": -1}, "depth_top_k must be an int >= 0, got -1 at depth 0"),
    ({"depth_top_k": 2.5}, "depth_top_k must be an int >= 0, got 2.5 at depth 0"),
    ({"depth_top_k": True}, "depth_top_k must be an int >= 0, got True at depth 0"),
    ({"depth_top_k": [1, 2, 3]}, "depth_top_k must be one value or a list of pixel_depth=2 values, got [1, 2, 3]"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number, got nan"),
    ({"guidance_scale": -math.inf}, "guidance_scale must be a finite number, got -inf"),
    ({"guidance_scale": "high"}, "guidance_scale must be a finite number, got 'high'"),
    ({"guidance_scale": True}, "guidance_scale must be a finite number, got True"),
    ({"do_sample": "yes"}, "do_sample must be True or False, got 'yes'"),
]


@pytest.mark.parametrize("settings, message", INVALID, ids=[str(s) for s, _ in INVALID])
def test_invalid_settings_are_refused_alike_by_generate_and_pipeline(t2i_vlm, t2i_processor, t2i_pipe, settings,
                                                                     message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_codes(t2i_vlm, t2i_processor, **settings)
    with pytest.raises(ValueError, match=re.escape(message)):
        t2i_pipe(T2I_PROMPTS, output_type="pt", **settings)


def save_in_memory(model, settings: dict, legacy: bool) -> None:
    """Today's form: the guidance scale in the model's generation config, the depth head's sampling in its own (as
    from_pretrained places them); or the dict earlier releases saved."""
    if legacy:
        model.generation_config.image_generation = dict(settings)
        return
    for name, value in settings.items():
        if name == "guidance_scale":
            model.generation_config.guidance_scale = value
        else:
            depth_setting = LEGACY_SETTING_NAMES[name].removeprefix("depth_decoder_")
            setattr(model.depth_head.generation_config, depth_setting, value)


@pytest.mark.parametrize("legacy", [False, True], ids=["saved", "saved-by-an-earlier-release"])
@pytest.mark.parametrize("settings, message", INVALID, ids=[str(s) for s, _ in INVALID])
def test_invalid_saved_settings_are_refused_and_named_as_saved(t2i_vlm, t2i_processor, t2i_pipe, settings, message,
                                                               legacy):
    saved = copy.deepcopy(t2i_vlm.generation_config), copy.deepcopy(t2i_vlm.depth_head.generation_config)
    try:
        save_in_memory(t2i_vlm, settings, legacy)
        name = next(iter(settings))
        new_name = LEGACY_SETTING_NAMES.get(name, name)  # a saved value is named as generation_config.json names it
        expected = re.escape(f"{new_name}{message[len(name):]} (from the model's generation config)")
        with pytest.raises(ValueError, match=expected):
            generate_codes(t2i_vlm, t2i_processor)
        with pytest.raises(ValueError, match=expected):
            t2i_pipe(T2I_PROMPTS, output_type="pt")
        # a valid argument replaces the saved value
        valid = {"depth_top_p": 0.9, "depth_temperature": 1.0, "depth_top_k": 5, "guidance_scale": 2.0,
                 "do_sample": False}  # fmt: skip
        assert generate_codes(t2i_vlm, t2i_processor, **{"do_sample": False, name: valid[name]}).shape[0] == 2
    finally:
        t2i_vlm.generation_config, t2i_vlm.depth_head.generation_config = saved


def test_unknown_saved_setting_is_refused(t2i_vlm, t2i_processor):
    saved = copy.deepcopy(t2i_vlm.generation_config)
    try:
        t2i_vlm.generation_config.image_generation = {"guidance": 3.0}
        with pytest.raises(ValueError, match=r"generation_config.image_generation has unknown settings \['guidance'\]"):
            generate_codes(t2i_vlm, t2i_processor)
        t2i_vlm.generation_config.image_generation = 3.0
        with pytest.raises(ValueError, match="generation_config.image_generation must be a dict"):
            generate_codes(t2i_vlm, t2i_processor)
    finally:
        t2i_vlm.generation_config = saved


def test_greedy_ignores_a_zero_temperature(t2i_vlm, t2i_processor, t2i_pipe):
    """Without sampling the temperature does not matter, so 0 (the common way to say "greedy") is accepted."""
    greedy = generate_codes(t2i_vlm, t2i_processor, do_sample=False, guidance_scale=3.0)
    for temperature in (0, [0.0, 0.5]):
        codes = generate_codes(t2i_vlm, t2i_processor, do_sample=False, guidance_scale=3.0,
                               depth_temperature=temperature)  # fmt: skip
        assert torch.equal(codes, greedy)
    images = t2i_pipe(T2I_PROMPTS, output_type="pt", do_sample=False, guidance_scale=3.0, depth_temperature=0).images
    greedy_images = t2i_pipe(T2I_PROMPTS, output_type="pt", do_sample=False, guidance_scale=3.0).images
    torch.testing.assert_close(images, greedy_images, rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape("depth_temperature must be a finite number > 0, got 0 at depth 0")):
        generate_codes(t2i_vlm, t2i_processor, do_sample=True, depth_temperature=0)


def test_valid_edge_values_are_accepted(t2i_vlm, t2i_processor):
    """The boundaries of each range: top-p 1 and None (off), top-k 0 and None (off), numpy scalars, guidance <= 1."""
    import numpy as np

    reference = generate_codes(t2i_vlm, t2i_processor, do_sample=True, guidance_scale=2.0, depth_top_k=0,
                               depth_top_p=1.0, generator=torch.Generator().manual_seed(3))  # fmt: skip
    same = generate_codes(t2i_vlm, t2i_processor, do_sample=np.bool_(True), guidance_scale=np.float32(2.0),
                          depth_top_k=[None, np.int64(0)], depth_top_p=(None, 1),
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(reference, same)
    for scale in (0.0, 0.5, 1):
        assert generate_codes(t2i_vlm, t2i_processor, do_sample=False, guidance_scale=scale).shape[0] == 2
