"""Image generation through GenerationConfig (issue 15, item 1), as transformers' Janus (image mode: guidance scale,
images per prompt, outputs) and CSM (the depth head's own GenerationConfig, reached by `depth_decoder_*` arguments):
the names of earlier releases give the same codes, settings take precedence in a fixed order, `logits_processor=`
reaches the depth head's logits, and `return_dict_in_generate=True` returns per-position scores that a teacher-forced
recomputation reproduces."""

import copy

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper
from vlm_helpers import T2I_PROMPTS, generate_codes

from evotok_hf.modeling.generation import LEGACY_SETTING_NAMES, EvoTokImageGenerateOutput

# the depth head's sampling under the names of earlier releases (pixel_depth is 2 here)
OLD_NAMES = {"do_sample": True, "depth_temperature": [1.3, 0.8], "depth_top_k": [6, 0], "depth_top_p": 0.9}
NEW_NAMES = {LEGACY_SETTING_NAMES[name]: value for name, value in OLD_NAMES.items()}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- where settings come from
def test_old_names_new_names_and_configs_give_identical_codes(t2i_vlm, t2i_processor):
    reference = generate_codes(t2i_vlm, t2i_processor, guidance_scale=2.0, generator=seeded(3), **OLD_NAMES)
    renamed = generate_codes(t2i_vlm, t2i_processor, guidance_scale=2.0, generator=seeded(3), **NEW_NAMES)
    assert torch.equal(reference, renamed)
    given = GenerationConfig(guidance_scale=2.0, **NEW_NAMES)
    assert torch.equal(reference, generate_codes(t2i_vlm, t2i_processor, generation_config=given, generator=seeded(3)))
    configured = copy.deepcopy(t2i_vlm)
    configured.generation_config.guidance_scale = 2.0
    configured.depth_head.generation_config = GenerationConfig(do_sample=True, temperature=[1.3, 0.8], top_k=[6, 0],
                                                               top_p=0.9)  # fmt: skip
    assert torch.equal(reference, generate_codes(configured, t2i_processor, generator=seeded(3)))
    # the settings matter: another top-k or guidance scale changes the codes
    other_top_k = dict(NEW_NAMES, depth_decoder_top_k=[1, 1])
    other = generate_codes(t2i_vlm, t2i_processor, guidance_scale=2.0, generator=seeded(3), **other_top_k)
    assert not torch.equal(reference, other)
    other_scale = generate_codes(t2i_vlm, t2i_processor, guidance_scale=4.0, generator=seeded(3), **NEW_NAMES)
    assert not torch.equal(reference, other_scale)


def test_arguments_then_generation_config_then_the_models_then_defaults(t2i_vlm, t2i_processor):
    """A top-k of 1 at every depth samples what greedy decoding picks, so each layer's top-k shows in the codes."""
    greedy = generate_codes(t2i_vlm, t2i_processor, guidance_scale=2.0, depth_decoder_do_sample=False)
    sampled = generate_codes(t2i_vlm, t2i_processor, guidance_scale=2.0, generator=seeded(1))  # defaults: top-k 900
    assert not torch.equal(greedy, sampled)
    configured = copy.deepcopy(t2i_vlm)
    configured.depth_head.generation_config.top_k = 1
    assert torch.equal(greedy, generate_codes(configured, t2i_processor, guidance_scale=2.0, generator=seeded(1)))
    wider = GenerationConfig(depth_decoder_top_k=0)  # the argument's config replaces the model's
    assert torch.equal(sampled, generate_codes(configured, t2i_processor, guidance_scale=2.0, generation_config=wider,
                                               generator=seeded(1)))  # fmt: skip
    assert torch.equal(greedy, generate_codes(configured, t2i_processor, guidance_scale=2.0, generation_config=wider,
                                              depth_decoder_top_k=1, generator=seeded(1)))  # fmt: skip
    # the image-level settings too: images per prompt from the model's generation config
    configured.generation_config.num_return_sequences = 2
    assert generate_codes(configured, t2i_processor, depth_decoder_do_sample=False).shape[0] == 4


def test_same_setting_twice_and_unknown_settings_are_refused(t2i_vlm, t2i_processor):
    with pytest.raises(ValueError, match=r"`do_sample` and `depth_decoder_do_sample` set the same setting"):
        generate_codes(t2i_vlm, t2i_processor, do_sample=True, depth_decoder_do_sample=False)
    with pytest.raises(ValueError, match=r"`depth_top_k` and `depth_decoder_top_k` set the same setting"):
        generate_codes(t2i_vlm, t2i_processor, depth_top_k=3, depth_decoder_top_k=4)
    # plain sampling names would be ambiguous (every code is the depth head's): the depth_decoder_ ones are asked for
    for name in ("temperature", "depth_decoder_min_p", "output_attentions"):
        with pytest.raises(ValueError, match=rf"Unknown arguments for generation_mode='image': \['{name}'\]"):
            generate_codes(t2i_vlm, t2i_processor, **{name: 0.5})
    with pytest.raises(ValueError, match="depth_decoder_top_p must be in \\(0, 1\\], got 2.0 at depth 1 \\(from the "
                                         "generation_config argument\\)"):  # fmt: skip
        generate_codes(t2i_vlm, t2i_processor, generation_config=GenerationConfig(depth_decoder_top_p=[0.5, 2.0]))
    with pytest.raises(ValueError, match="num_return_sequences must be a positive int, got 0"):
        generate_codes(t2i_vlm, t2i_processor, num_return_sequences=0)


# ----------------------------------------------------------------------------- logits processors
class ForceCode(LogitsProcessor):
    def __init__(self, code):
        self.code = code

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.code] = 0.0
        return forced


class Record(LogitsProcessor):
    """Keeps the `input_ids` and scores it is called with, and adds a fixed bias to the scores."""

    def __init__(self, bias):
        self.bias, self.calls = bias, []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores + self.bias


def test_logits_processor_decides_the_codes(t2i_vlm, t2i_processor):
    for do_sample in (False, True):
        plain = generate_codes(t2i_vlm, t2i_processor, depth_decoder_do_sample=do_sample, generator=seeded(0))
        forced = generate_codes(t2i_vlm, t2i_processor, depth_decoder_do_sample=do_sample, generator=seeded(0),
                                logits_processor=LogitsProcessorList([ForceCode(5)]))  # fmt: skip
        assert (forced == 5).all() and not (plain == 5).all()


def test_logits_processor_sees_the_codes_so_far_and_the_guided_logits(t2i_vlm, t2i_processor):
    """Its `input_ids` are the codes generated so far (position-major, depth by depth); its scores are the guided
    logits, uncond + s * (cond - uncond), recomputed here from each half's own prompt for the first code; the codes
    are the argmax of what it returns."""
    vision = t2i_vlm.config.vision_config
    bias = torch.randn(vision.codebook_size, generator=seeded(7)) * 5
    recorder = Record(bias)
    scale = 3.0
    codes = generate_codes(t2i_vlm, t2i_processor, guidance_scale=scale, depth_decoder_do_sample=False,
                           logits_processor=[recorder])  # fmt: skip
    flat = codes.flatten(1)  # (rows, positions * pixel_depth), position-major
    assert len(recorder.calls) == flat.shape[1]
    for step, (input_ids, scores) in enumerate(recorder.calls):
        assert torch.equal(input_ids, flat[:, :step])
        assert torch.equal((scores + bias).argmax(-1), flat[:, step])
    inputs = t2i_processor(text=T2I_PROMPTS[:1], generation_mode="image", return_tensors="pt")
    with torch.no_grad():
        last_hidden = [t2i_vlm.language_model(input_ids=inputs[key]).last_hidden_state[:, -1]
                       for key in ("input_ids", "negative_input_ids")]  # fmt: skip
        halves = [t2i_vlm.depth_head(hidden_states=hidden).logits[0, 0] for hidden in last_hidden]
    torch.testing.assert_close(recorder.calls[0][1][0], halves[1] + scale * (halves[0] - halves[1]), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    unbiased = generate_codes(t2i_vlm, t2i_processor, guidance_scale=scale, depth_decoder_do_sample=False)
    assert not torch.equal(unbiased, codes)  # the bias changed the codes


# ----------------------------------------------------------------------------- return_dict_in_generate
def teacher_forced_guided_logits(model, processor, prompt, codes, scale):
    """The guided logits of every position and depth, `(positions, pixel_depth, codebook_size)`, recomputed the way
    training sees them: each half's prompt followed by the generated codes' embeddings in one LLM pass (no cache),
    then the depth head teacher-forced on the codes' cumulative embedding sums (no depth cache)."""
    inputs = processor(text=[prompt], generation_mode="image", return_tensors="pt")
    image_token = model.config.image_token_id
    positions = codes.shape[1] * codes.shape[2]
    targets = codes.flatten(1, 2)[0]  # (positions, pixel_depth)
    with torch.no_grad():
        sums = model.vision_tower.quantizer.embed_codes(targets[:, :-1], return_cumulative=True)
        halves = []
        for key in ("input_ids", "negative_input_ids"):
            prompt_ids = inputs[key]
            ids = torch.cat([prompt_ids, torch.full((1, positions), image_token)], dim=1)
            hidden = model.model(input_ids=ids, generation_codes=codes[:1]).last_hidden_state[0]
            start = prompt_ids.shape[1] - 1  # the image start token's state predicts position 0
            conditions = hidden[start : start + positions]
            halves.append(model.depth_head(hidden_states=conditions, code_embedding_sums=sums).logits)
    return halves[1] + scale * (halves[0] - halves[1])


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_return_dict_scores_match_a_teacher_forced_recomputation(t2i_vlm, t2i_processor, do_sample):
    scale, temperature, top_k = 3.0, 0.5, 4
    settings = dict(guidance_scale=scale, depth_decoder_do_sample=do_sample, depth_decoder_temperature=temperature,
                    depth_decoder_top_k=top_k, depth_decoder_top_p=1.0)  # fmt: skip
    out = generate_codes(t2i_vlm, t2i_processor, prompts=T2I_PROMPTS[:1], return_dict_in_generate=True,
                         output_scores=True, output_logits=True, generator=seeded(2), **settings)  # fmt: skip
    vision = t2i_vlm.config.vision_config
    assert isinstance(out, EvoTokImageGenerateOutput)
    assert out.sequences.shape == (1, vision.grid_size, vision.grid_size, vision.pixel_depth)
    assert len(out.scores) == len(out.logits) == vision.grid_size**2
    assert out.scores[0].shape == (1, vision.pixel_depth, vision.codebook_size)
    logits = torch.cat(out.logits)  # (positions, pixel_depth, codebook_size)
    expected = teacher_forced_guided_logits(t2i_vlm, t2i_processor, T2I_PROMPTS[0], out.sequences, scale)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    scores = torch.cat(out.scores)
    if do_sample:  # the warpers, as transformers orders them: temperature, then top-k
        warped = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(temperature)(None, expected))
        assert torch.equal(torch.isinf(scores), torch.isinf(warped))
        torch.testing.assert_close(scores[~torch.isinf(scores)], warped[~torch.isinf(warped)], rtol=1e-4, atol=1e-4)
        chosen = scores.gather(-1, out.sequences.flatten(1, 2)[0][..., None])
        assert torch.isfinite(chosen).all()  # every code was among its depth's top-k
    else:  # greedy decoding applies no warper: the scores are the guided logits and the codes their argmax
        assert torch.equal(scores, logits)
        assert torch.equal(scores.argmax(-1), out.sequences.flatten(1, 2)[0])
    codes = generate_codes(t2i_vlm, t2i_processor, prompts=T2I_PROMPTS[:1], generator=seeded(2), **settings)
    assert torch.equal(codes, out.sequences)


def test_output_flags(t2i_vlm, t2i_processor):
    codes = generate_codes(t2i_vlm, t2i_processor, depth_decoder_do_sample=False, output_scores=True)
    assert isinstance(codes, torch.Tensor)  # scores only with return_dict_in_generate, as in transformers
    out = generate_codes(t2i_vlm, t2i_processor, depth_decoder_do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, codes) and out.scores is None and out.logits is None
    configured = copy.deepcopy(t2i_vlm)
    configured.generation_config.return_dict_in_generate = True
    configured.generation_config.output_scores = True
    out = generate_codes(configured, t2i_processor, depth_decoder_do_sample=False)
    assert torch.equal(out.sequences, codes) and len(out.scores) == t2i_vlm.config.vision_config.grid_size**2


# ----------------------------------------------------------------------------- text mode
def test_text_generation_ignores_the_image_guidance_scale(t2i_vlm, t2i_tokenizer):
    """The guidance scale a generation config holds is the image mode's: text decoding stays unguided."""
    ids = t2i_tokenizer(["a red bicycle"], return_tensors="pt").input_ids
    plain = t2i_vlm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    configured = copy.deepcopy(t2i_vlm)
    configured.generation_config.guidance_scale = 7.5
    assert torch.equal(configured.generate(input_ids=ids, max_new_tokens=6, do_sample=False), plain)
    assert torch.equal(configured.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                           generation_config=GenerationConfig(guidance_scale=7.5)), plain)  # fmt: skip
