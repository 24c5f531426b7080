"""Text-to-image generation for the EvoTok VLM: the position loop over the LLM and the depth loop in the depth head.

For each of the grid*grid image positions (row-major):

    LLM hidden state h  --depth head-->  logits of depth 0 -> code c_0
    h, e(c_0)           --depth head-->  logits of depth 1 -> code c_1      (e: the tokenizer's code embeddings,
    h, e(c_0), e(c_0)+e(c_1) ...      -> codes up to depth pixel_depth-1   summed cumulatively)
    generation projector(e(c_0) + ... + e(c_{D-1}))  -> the next LLM input -> the next h

Classifier-free guidance batches the conditional rows first and the unconditional rows (the negative prompt; by
default a user turn holding a single space, as the authors') after them; at every depth
`logits = uncond + guidance_scale * (cond - uncond)` and both halves continue with the chosen codes. The guided logits
then go through the caller's `logits_processor` and the depth's sampling warpers (transformers' temperature, top-k,
top-p, in that order). The LLM keeps its key/value cache across positions and the depth head its own across depths
(`use_cache=False` recomputes both from scratch at every step, as the authors' depth head does).
`cache_implementation="static"` gives the LLM a `StaticCache` sized for the prompt and every image position, so each
position step has the same shapes, and compiles that step with `torch.compile(fullgraph=True)` once per model, batch
and prompt length (`disable_compile=True` keeps the static cache and skips the compilation), as transformers'
`generate` does with a static cache; the codes are those of the dynamic cache.

Settings live in `GenerationConfig`s, as in transformers' Janus (image mode) and CSM (a depth decoder):

- the model's `generation_config` holds what concerns the whole image: `guidance_scale`, `num_return_sequences`,
  `use_cache`, `cache_implementation` ("dynamic" or "static"), `disable_compile` and the output flags
  (`return_dict_in_generate`, `output_scores`, `output_logits`);
- the depth head's `generation_config` (`model.depth_head.generation_config`) holds how each depth is sampled:
  `do_sample`, `temperature`, `top_k`, `top_p`, each one value or a list of `pixel_depth` values. `generate` takes
  them as `depth_decoder_do_sample=`, `depth_decoder_temperature=`, ... and generation_config.json stores them under
  those names.

Earlier releases named the depth settings `do_sample`, `depth_temperature`, `depth_top_k`, `depth_top_p` and saved
them, with `guidance_scale`, in a `generation_config.image_generation` dict; both spellings are still read
(`LEGACY_SETTING_NAMES`). A setting nothing sets takes `IMAGE_GENERATION_DEFAULTS`. `resolve_image_generation_config`
picks and checks every setting, the one place each entry point (generate, `EvoTokPipeline`, the Space) goes through.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from transformers import GenerationConfig
from transformers.cache_utils import StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

# What a checkpoint that saves no setting generates with, in the form generation_config.json stores it: the paper's
# guidance scale 7.5 (the authors' code defaults to 3.0, `generate_image_content(cfg=3.0)`) and the authors' sampling,
# top-k 900 / top-p 0.96 / temperature 1.0, hard-coded in their depth head.
IMAGE_GENERATION_DEFAULTS = {
    "guidance_scale": 7.5,
    "depth_decoder_do_sample": True,
    "depth_decoder_temperature": 1.0,
    "depth_decoder_top_k": 900,
    "depth_decoder_top_p": 0.96,
}
# The prefix that routes a setting to the depth head's GenerationConfig (CSM's convention).
DEPTH_DECODER_PREFIX = "depth_decoder_"
DEPTH_DECODER_SETTINGS = ("do_sample", "temperature", "top_k", "top_p")
# The settings of the model's own GenerationConfig that image mode reads, with the value used when none is set.
IMAGE_SETTINGS = {
    "guidance_scale": IMAGE_GENERATION_DEFAULTS["guidance_scale"],
    "num_return_sequences": 1,
    "use_cache": True,
    "cache_implementation": "dynamic",
    "disable_compile": False,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
}
# The LLM's cache across image positions: transformers' DynamicCache, or a StaticCache with a compiled position step.
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
# Names of earlier releases (keyword arguments, and keys of the saved `image_generation` dict) -> today's.
LEGACY_SETTING_NAMES = {
    "do_sample": "depth_decoder_do_sample",
    "depth_temperature": "depth_decoder_temperature",
    "depth_top_k": "depth_decoder_top_k",
    "depth_top_p": "depth_decoder_top_p",
}
LEGACY_SAVED_SETTINGS = "image_generation"
# In the saved `image_generation` dict a None meant "off" (a None guidance scale: no guidance).
_LEGACY_SAVED_NONE = {"guidance_scale": 1.0, "depth_temperature": 1.0, "depth_top_k": 0, "depth_top_p": 1.0}
_DEPTH_NAMES = tuple(DEPTH_DECODER_PREFIX + name for name in DEPTH_DECODER_SETTINGS)
_PER_DEPTH_SETTINGS = ("temperature", "top_k", "top_p")  # each one value, or one per pixel depth
_DEFAULTS = {**IMAGE_SETTINGS, **IMAGE_GENERATION_DEFAULTS}
# keyword argument -> the setting it sets
_ARGUMENT_NAMES = {**{name: name for name in _DEFAULTS}, **LEGACY_SETTING_NAMES}


@dataclass
class EvoTokImageGenerateOutput(GenerateDecoderOnlyOutput):
    """Output of `EvoTokForConditionalGeneration.generate(..., generation_mode="image", return_dict_in_generate=True)`.

    sequences (`torch.LongTensor` of shape `(batch * num_return_sequences, grid, grid, pixel_depth)`): the codes.
    scores (`tuple(torch.FloatTensor)`, *optional*, with `output_scores=True`): one entry per image position
        (row-major), each `(batch * num_return_sequences, pixel_depth, codebook_size)`: the scores each depth's code
        was sampled from (or the argmax taken of), i.e. the guided logits after `logits_processor` and the warpers.
    logits (`tuple(torch.FloatTensor)`, *optional*, with `output_logits=True`): the same per position, before
        `logits_processor` and the warpers (the guided logits, `uncond + guidance_scale * (cond - uncond)`).
    """


# ----------------------------------------------------------------------------- settings
def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _per_depth(value, depth: int) -> list:
    """A scalar or a sequence of `depth` values -> a list of `depth` values (the length is checked before)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value] * depth


# what each per-depth setting must be, as its error message says it
_DEPTH_RULES = {
    "temperature": "must be a finite number > 0",
    "top_k": "must be an int >= 0",
    "top_p": "must be in (0, 1]",
}


def _valid_depth_value(name: str, value, do_sample: bool) -> bool:
    """Whether one depth's temperature / top-k / top-p (None: that warper is off) is valid."""
    if value is None:
        return True
    if name == "top_k":
        return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_)) and value >= 0
    if not _is_number(value):
        return False
    if name == "temperature":
        # without sampling the temperature is unused, so 0 (a common way to ask for greedy decoding) is fine there
        return value > 0 or (value == 0 and not do_sample)
    return 0 < value <= 1


def _check_depth_setting(name: str, value, pixel_depth: int, do_sample: bool, shown: str, source: str):
    """One depth setting (a scalar or a list of `pixel_depth` values) checked, its numbers made plain Python ones."""
    is_list = isinstance(value, Sequence) and not isinstance(value, str)
    if is_list and len(value) != pixel_depth:
        raise ValueError(
            f"{shown} must be one value or a list of pixel_depth={pixel_depth} values, got {list(value)}{source}."
        )
    checked = []
    for depth, item in enumerate(_per_depth(value, pixel_depth)):
        if not _valid_depth_value(name, item, do_sample):
            zero_temperature = name == "temperature" and _is_number(item) and item == 0
            hint = " (0 only with do_sample=False)" if zero_temperature else ""
            raise ValueError(f"{shown} {_DEPTH_RULES[name]}, got {item!r} at depth {depth}{source}{hint}.")
        checked.append(None if item is None else int(item) if name == "top_k" else float(item))
    return checked if is_list else checked[0]


def _settings_of(generation_config: GenerationConfig | None, depth_generation_config=None) -> dict:
    """What a GenerationConfig (and the depth head's) sets for image generation, by today's names; unset (None)
    settings left out. Within one config the more specific statement wins: the depth head's own fields, then
    `depth_decoder_*` attributes of `generation_config` (the saved form), then its `image_generation` dict (what code
    written for earlier releases sets)."""
    settings = {}
    if depth_generation_config is not None:
        for name in DEPTH_DECODER_SETTINGS:
            settings[DEPTH_DECODER_PREFIX + name] = getattr(depth_generation_config, name, None)
    if generation_config is not None:
        for name in (*IMAGE_SETTINGS, *_DEPTH_NAMES):
            if getattr(generation_config, name, None) is not None:
                settings[name] = getattr(generation_config, name)
        legacy = getattr(generation_config, LEGACY_SAVED_SETTINGS, None)
        if legacy is not None:
            where = f"generation_config.{LEGACY_SAVED_SETTINGS}"
            if not isinstance(legacy, dict):
                raise ValueError(f"{where} must be a dict of settings, got {legacy!r}.")
            known = ["guidance_scale", *LEGACY_SETTING_NAMES]
            unknown = sorted(set(legacy) - set(known))
            if unknown:
                raise ValueError(f"{where} has unknown settings {unknown}; known: {known}.")
            for key, value in legacy.items():
                settings[LEGACY_SETTING_NAMES.get(key, key)] = _LEGACY_SAVED_NONE.get(key) if value is None else value
    return {name: value for name, value in settings.items() if value is not None}


def _keep_modification_state(original: GenerationConfig, derived: GenerationConfig) -> None:
    """`GenerationConfig.save_pretrained` validates strictly only a config changed since it was loaded (it compares a
    hash taken then); moving the depth head's settings in or out of a config is no such change."""
    if getattr(original, "_original_object_hash", None) == hash(original):
        derived._original_object_hash = hash(derived)


def split_depth_decoder_config(generation_config: GenerationConfig) -> tuple[GenerationConfig, GenerationConfig]:
    """A generation config as generation_config.json stores it (the depth head's settings as `depth_decoder_*`
    attributes, or in the `image_generation` dict of earlier releases) -> (a copy without them, the depth head's
    GenerationConfig holding them). What `from_pretrained` does, as CSM's."""
    settings = _settings_of(generation_config)
    main = copy.deepcopy(generation_config)
    for name in (*_DEPTH_NAMES, LEGACY_SAVED_SETTINGS):
        if name in vars(main):
            delattr(main, name)
    main.guidance_scale = settings.get("guidance_scale")
    _keep_modification_state(generation_config, main)
    depth = GenerationConfig()
    for name in DEPTH_DECODER_SETTINGS:
        setattr(depth, name, settings.get(DEPTH_DECODER_PREFIX + name))
    return main, depth


def merge_depth_decoder_config(
    generation_config: GenerationConfig, depth_generation_config: GenerationConfig | None
) -> GenerationConfig:
    """The inverse of `split_depth_decoder_config`: a copy of `generation_config` with the depth head's settings as
    `depth_decoder_*` attributes (those `generation_config` states itself win, as in `generate`), the form
    `save_pretrained` writes."""
    settings = _settings_of(generation_config, depth_generation_config)
    main, _ = split_depth_decoder_config(generation_config)
    for name in _DEPTH_NAMES:
        if name in settings:
            setattr(main, name, settings[name])
            # a file marked as built from a model config is read without the keys GenerationConfig does not declare
            main._from_model_config = False
    _keep_modification_state(generation_config, main)
    return main


def resolve_image_generation_config(
    model, generation_config: GenerationConfig | None = None, **kwargs
) -> tuple[GenerationConfig, GenerationConfig, dict]:
    """The settings one image generation of `model` runs with, checked here and nowhere else for every entry point
    (`generate`, `EvoTokPipeline`, the Space).

    Each setting is the first one set (not None) among: the keyword arguments (today's names, e.g.
    `depth_decoder_top_k=`, or those of earlier releases, `depth_top_k=` / `do_sample=`); `generation_config`; the
    model's `generation_config` and its depth head's; `IMAGE_GENERATION_DEFAULTS`. Within a list a None switches that
    depth's warper off; so do a top-k of 0, a top-p of 1 and a temperature of 1.

    Returns `(generation_config, depth_generation_config, unused_kwargs)`: a GenerationConfig with `guidance_scale` (a
    finite float; 1.0 runs the conditional rows only), `num_return_sequences`, `use_cache` and the output flags; the
    depth head's with `do_sample` (bool) and `temperature` / `top_k` / `top_p` (one value, or one per pixel depth, as
    set); and the keyword arguments that name no setting. Raises a ValueError naming the setting, the depth and where
    the value came from."""
    pixel_depth = model.config.vision_config.pixel_depth
    given, shown, unused = {}, {}, {}
    for name, value in kwargs.items():
        setting = _ARGUMENT_NAMES.get(name)
        if setting is None:
            unused[name] = value
        elif value is not None:  # None: not given
            if setting in given:
                raise ValueError(f"`{shown[setting]}` and `{name}` set the same setting ({setting}): pass one.")
            given[setting], shown[setting] = value, name
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise ValueError(f"generation_config must be a transformers GenerationConfig, got {type(generation_config)}.")
    depth_head = getattr(model, "depth_head", None)
    layers = [
        (given, ""),
        (_settings_of(generation_config), " (from the generation_config argument)"),
        (_settings_of(model.generation_config, getattr(depth_head, "generation_config", None)),
         " (from the model's generation config)"),
        (_DEFAULTS, ""),
    ]  # fmt: skip
    values, sources = {}, {}
    for setting in _DEFAULTS:
        values[setting], sources[setting] = next((layer[setting], source) for layer, source in layers
                                                 if setting in layer)  # fmt: skip
        shown.setdefault(setting, setting)

    def fail(setting: str, rule: str):
        raise ValueError(f"{shown[setting]} {rule}, got {values[setting]!r}{sources[setting]}.")

    resolved = GenerationConfig()
    if not _is_number(values["guidance_scale"]):
        fail("guidance_scale", "must be a finite number")
    resolved.guidance_scale = float(values["guidance_scale"])
    count = values["num_return_sequences"]
    if not isinstance(count, Integral) or isinstance(count, (bool, np.bool_)) or count < 1:
        fail("num_return_sequences", "must be a positive int")
    resolved.num_return_sequences = int(count)
    for name in ("use_cache", "disable_compile", "return_dict_in_generate", "output_scores", "output_logits"):
        if not isinstance(values[name], (bool, np.bool_)):
            fail(name, "must be True or False")
        setattr(resolved, name, bool(values[name]))
    if values["cache_implementation"] not in CACHE_IMPLEMENTATIONS:
        fail("cache_implementation", f"must be one of {CACHE_IMPLEMENTATIONS}")
    if values["cache_implementation"] == "static" and not resolved.use_cache:
        fail("cache_implementation", "needs use_cache=True (a static cache is a cache)")
    resolved.cache_implementation = values["cache_implementation"]

    depth = GenerationConfig()
    do_sample = values["depth_decoder_do_sample"]
    if not isinstance(do_sample, (bool, np.bool_)):
        fail("depth_decoder_do_sample", "must be True or False")
    depth.do_sample = bool(do_sample)
    for name in _PER_DEPTH_SETTINGS:
        setting = DEPTH_DECODER_PREFIX + name
        setattr(depth, name, _check_depth_setting(name, values[setting], pixel_depth, depth.do_sample, shown[setting],
                                                  sources[setting]))  # fmt: skip
    return resolved, depth, unused


def _depth_processors(
    depth_generation_config: GenerationConfig, pixel_depth: int, vocab_size: int, logits_processor=None
) -> list[LogitsProcessorList]:
    """One `LogitsProcessorList` per depth from checked settings: the caller's processors, then (when sampling) the
    warpers, temperature, top-k and top-p, as transformers orders them. A temperature of 1, a top-k of 0 and a top-p
    of 1 add no warper."""
    per_depth = [_per_depth(getattr(depth_generation_config, name), pixel_depth) for name in _PER_DEPTH_SETTINGS]
    lists = []
    for temperature, top_k, top_p in zip(*per_depth):
        processors = LogitsProcessorList(logits_processor or [])
        if depth_generation_config.do_sample:
            if temperature is not None and temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_k:
                processors.append(TopKLogitsWarper(min(top_k, vocab_size)))
            if top_p is not None and top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        lists.append(processors)
    return lists


def build_depth_warpers(temperature, top_k, top_p, depth: int, vocab_size: int) -> list[LogitsProcessorList]:
    """One `LogitsProcessorList` per depth for sampling; each setting is a scalar or a list of `depth` values, checked
    as `resolve_image_generation_config` checks them; None, a top-k of 0 and a top-p of 1.0 switch a warper off."""
    settings = GenerationConfig()
    settings.do_sample = True
    for name, value, off in (("temperature", temperature, 1.0), ("top_k", top_k, 0), ("top_p", top_p, 1.0)):
        setattr(settings, name, _check_depth_setting(name, off if value is None else value, depth, True, name, ""))
    return _depth_processors(settings, depth, vocab_size)


# ----------------------------------------------------------------------------- generation
def _check_left_padded(name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, boi_token_id: int) -> None:
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{name}: input_ids and attention_mask must both be (batch, length).")
    mask = attention_mask.bool()
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError(f"{name}: prompts must be left-padded (padding_side='left') for image generation.")
    if not mask[:, -1].all() or (input_ids[:, -1] != boi_token_id).any():
        raise ValueError(
            f"{name}: every prompt must end with the image start token (id {boi_token_id}); build prompts with "
            "EvoTokProcessor(text=..., generation_mode='image')."
        )


def _left_pad_together(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(ids.shape[1] for ids, _ in parts)
    all_ids, all_masks = [], []
    for ids, mask in parts:
        pad = length - ids.shape[1]
        all_ids.append(torch.nn.functional.pad(ids, (pad, 0), value=0))
        all_masks.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
    return torch.cat(all_ids), torch.cat(all_masks)


@torch.no_grad()
def generate_image_codes(
    model,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    negative_input_ids: torch.LongTensor | None = None,
    negative_attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.LongTensor | EvoTokImageGenerateOutput:
    """Generate images' pixel codes from text prompts (`EvoTokForConditionalGeneration.generate(...,
    generation_mode="image")` calls this).

    Args:
        input_ids / attention_mask (`(batch, length)`): left-padded prompts ending with the image start token
            (`EvoTokProcessor(text=prompts, generation_mode="image")`).
        negative_input_ids / negative_attention_mask (`(batch or 1, length)`, *optional*): the unconditional half of
            classifier-free guidance (the processor returns the default one, a user turn holding " ").
        generation_config (`GenerationConfig`, *optional*): settings that replace the model's where set, including
            the depth head's as `depth_decoder_*` attributes (see `resolve_image_generation_config`).
        logits_processor (`LogitsProcessorList`, *optional*): applied at every depth to the guided logits of the
            conditional rows, before the sampling warpers (and in greedy decoding too). Its `input_ids` are the codes
            generated so far, `(batch * num_return_sequences, position * pixel_depth + depth)`: those of the earlier
            positions (row-major, depth by depth), then this position's earlier depths.
        streamer (*optional*): an object with `put(codes)` (called per position with that position's codes,
            `(batch * num_return_sequences, pixel_depth)`) and `end()`, e.g. transformers' streamers or a progress
            bar.
        generator (`torch.Generator`, *optional*): the randomness of sampling, for reproducible images.
        kwargs: settings, by the names of `GenerationConfig` (`guidance_scale`, `num_return_sequences`, `use_cache`,
            `cache_implementation`, `disable_compile`, `return_dict_in_generate`, `output_scores`,
            `output_logits`) and of the depth head's with the
            `depth_decoder_` prefix (`depth_decoder_do_sample`, `depth_decoder_temperature`, `depth_decoder_top_k`,
            `depth_decoder_top_p`: one value, or a list of `pixel_depth` values); `do_sample`, `depth_temperature`,
            `depth_top_k` and `depth_top_p` as earlier releases named the depth head's.

    Returns:
        `torch.LongTensor` of shape `(batch * num_return_sequences, grid, grid, pixel_depth)` (decode with
        `model.decode_image_tokens`), or with `return_dict_in_generate=True` an [`EvoTokImageGenerateOutput`]
        holding them as `sequences`, with the per-position `scores` / `logits` when asked for.
    """
    config = model.config
    if not config.has_generation_head:
        raise ValueError("This checkpoint has no generation head (has_generation_head=False).")
    generation_config, depth_config, unexpected = resolve_image_generation_config(model, generation_config, **kwargs)
    if unexpected:
        raise ValueError(
            f"Unknown arguments for generation_mode='image': {sorted(unexpected)}; its settings are "
            f"{sorted(_ARGUMENT_NAMES)}."
        )
    if input_ids is None:
        raise ValueError(
            "generation_mode='image' needs `input_ids` (EvoTokProcessor(text=..., generation_mode='image'))."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vision = config.vision_config
    pixel_depth, grid = vision.pixel_depth, vision.grid_size
    guidance_scale, use_cache = generation_config.guidance_scale, generation_config.use_cache
    num_return_sequences = generation_config.num_return_sequences
    processors = _depth_processors(depth_config, pixel_depth, vision.codebook_size, logits_processor)
    guided = guidance_scale != 1.0
    record = generation_config.return_dict_in_generate
    scores = [] if record and generation_config.output_scores else None
    logits = [] if record and generation_config.output_logits else None

    _check_left_padded("input_ids", input_ids, attention_mask, config.boi_token_id)
    batch = input_ids.shape[0]
    parts = [(input_ids.repeat_interleave(num_return_sequences, 0),
              attention_mask.repeat_interleave(num_return_sequences, 0))]  # fmt: skip
    if guided:
        if negative_input_ids is None:
            raise ValueError(
                "Classifier-free guidance needs the unconditional prompt: pass `negative_input_ids` (EvoTokProcessor "
                "returns the default one with generation_mode='image'), or guidance_scale=1.0."
            )
        if negative_attention_mask is None:
            negative_attention_mask = torch.ones_like(negative_input_ids)
        _check_left_padded("negative_input_ids", negative_input_ids, negative_attention_mask, config.boi_token_id)
        if negative_input_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"negative prompts: {negative_input_ids.shape[0]} rows for {batch} prompts (give 1 or one per prompt)."
            )
        expand = batch * num_return_sequences // negative_input_ids.shape[0]
        parts.append((negative_input_ids.repeat_interleave(expand, 0),
                      negative_attention_mask.repeat_interleave(expand, 0)))  # fmt: skip
    rows = batch * num_return_sequences
    ids, mask = _left_pad_together([(i.to(model.device), m.to(model.device)) for i, m in parts])

    language_model, head = model.model.language_model, model.depth_head
    quantizer = model.vision_tower.quantizer
    embeddings = model.get_input_embeddings()(ids)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)

    def run_llm(inputs_embeds, attention, position_ids, cache):
        # return_dict=True: a checkpoint's text_config may say return_dict=False (transformers' tuple convention).
        out = language_model(inputs_embeds=inputs_embeds, attention_mask=attention, position_ids=position_ids,
                             past_key_values=cache, use_cache=use_cache, return_dict=True)  # fmt: skip
        return out.last_hidden_state[:, -1], (out.past_key_values if use_cache else None)

    codes = torch.zeros(rows, grid * grid, pixel_depth, dtype=torch.long, device=ids.device)
    feed = _StreamerFeed(streamer) if streamer is not None else None

    def eager_depths(position, position_hidden):
        """Writes one position's codes through `_sample_depths`; returns its stacked scores and logits (or Nones)."""
        position_scores = [] if scores is not None else None
        position_logits = [] if logits is not None else None
        codes[:, position] = _sample_depths(
            head, quantizer, position_hidden, processors, guided, guidance_scale, depth_config.do_sample, generator,
            use_cache, rows, previous_codes=codes[:, :position].flatten(1), scores=position_scores,
            logits=position_logits,
        )  # fmt: skip
        return [None if x is None else torch.stack(x, dim=1) for x in (position_scores, position_logits)]

    def deliver(position, recorded):
        """Keeps a position's scores / logits when they are asked for and hands its codes to the streamer."""
        if scores is not None:
            scores.append(recorded[0])
        if logits is not None:
            logits.append(recorded[1])
        if feed is not None:
            feed.put(codes[:, position])

    if generation_config.cache_implementation == "static":
        # One mask of the final length, its image columns switched on position by position: every step then has the
        # same shapes (the columns not yet written are masked, as the causal mask masks them too).
        prompt_length = ids.shape[1]
        final_length = prompt_length + grid * grid - 1  # the last position's codes are never fed back
        llm_cache = StaticCache(config=language_model.config, max_cache_len=final_length)
        full_mask = mask.new_zeros(mask.shape[0], final_length)
        full_mask[:, :prompt_length] = mask
        hidden = _llm_step(language_model, embeddings, full_mask, positions, llm_cache,
                           torch.arange(prompt_length, device=ids.device))  # fmt: skip
        positions = positions[:, -1:]
        if logits_processor:
            # a caller's processor sees the codes so far, of a new length at every depth: the depth loop stays eager
            step = _llm_step if generation_config.disable_compile else _compiled_llm_step()
        else:
            step = _static_position_step if generation_config.disable_compile else _compiled_position_step()
        noise = None
        if depth_config.do_sample and not logits_processor:  # the eager depth loop draws through torch.multinomial
            noise = torch.empty(pixel_depth, rows, vision.codebook_size, device=ids.device)
        for position in range(grid * grid):
            last = position == grid * grid - 1
            if not last:
                full_mask[:, prompt_length + position] = 1
            next_position = positions + 1
            cache_position = torch.full((1,), prompt_length + position, dtype=torch.long, device=ids.device)
            if logits_processor:
                recorded = eager_depths(position, hidden)
                if not last:
                    next_embedding = model.model.get_generation_embeddings(
                        torch.cat([codes[:, position]] * (2 if guided else 1)), positions=position, check_codes=False
                    )[:, None].to(embeddings.dtype)  # fmt: skip
                    hidden = step(language_model, next_embedding, full_mask, next_position, llm_cache, cache_position)
            else:
                if noise is not None:  # what torch.multinomial draws, depth by depth, from the same generator
                    for depth_noise in noise:
                        depth_noise.exponential_(1.0, generator=generator)
                grid_position = torch.full((), position, dtype=torch.long, device=ids.device)
                codes[:, position], *recorded, next_hidden = step(
                    model, hidden, noise, processors, guidance_scale, rows, scores is not None or logits is not None,
                    None if last else full_mask, next_position, llm_cache, cache_position, grid_position,
                )  # fmt: skip
                hidden = hidden if last else next_hidden
            deliver(position, recorded)
            positions = next_position
    else:
        hidden, llm_cache = run_llm(embeddings, mask, positions, None)
        for position in range(grid * grid):
            deliver(position, eager_depths(position, hidden))
            if position == grid * grid - 1:
                break
            next_embedding = model.model.get_generation_embeddings(
                torch.cat([codes[:, position]] * (2 if guided else 1)), positions=position
            )[:, None].to(embeddings.dtype)  # fmt: skip
            next_position = positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = torch.cat([positions, next_position], dim=1)
            if use_cache:
                hidden, llm_cache = run_llm(next_embedding, mask, next_position, llm_cache)
            else:
                embeddings = torch.cat([embeddings, next_embedding], dim=1)
                hidden, _ = run_llm(embeddings, mask, positions, None)
    if feed is not None:
        feed.end()
    codes = codes.view(rows, grid, grid, pixel_depth)
    if not record:
        return codes
    return EvoTokImageGenerateOutput(
        sequences=codes,
        scores=None if scores is None else tuple(scores),
        logits=None if logits is None else tuple(logits),
    )


def _llm_step(language_model, inputs_embeds, attention_mask, position_ids, cache, cache_position) -> torch.Tensor:
    """The LLM's last hidden state over `inputs_embeds`, written into a `StaticCache` at `cache_position`."""
    out = language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, cache_position=cache_position, return_dict=True)
    return out.last_hidden_state[:, -1]


# At most this many rows (images x 2 with guidance) take `_FewRowLinear` in a compiled step on a CPU. Measured on this
# project's 2-core machine (2 threads, fp32): alone, each paper-ratio generation weight is read 1.3-6.8x faster than
# by `F.linear` at 1 to 8 rows and 1.15-1.9x at 16 (`benchmarks/few_row_linear.py`), but within the compiled depth loop
# at 16 rows (8 images per call) the loop took 56 ms against 36 ms with `F.linear` (`benchmarks/generation.py`;
# benchmarks/README.md).
FEW_ROW_LINEAR_MAX_ROWS = 8


class _FewRowLinear(torch.overrides.TorchFunctionMode):
    """Inside a compiled step on a CPU: `F.linear` over at most `FEW_ROW_LINEAR_MAX_ROWS` rows of float32 becomes one
    multiply-and-sum over the weight per row, which inductor fuses into a single pass that reads each weight row once
    and keeps one accumulator per input row.

    At one or a few images per call every matmul of a position step is bound by reading its weights, and a few-row
    fp32 GEMM reads them at a fraction of the memory bandwidth (the 32,768 x 320 classifier at 8 GB/s at 2 rows here,
    against 64 GB/s for reading it alone; `benchmarks/few_row_linear.py`). The sums run in another order than the GEMM's, so results agree to rounding, not bit for bit
    (closer to float64 in the measurements). bf16 weights keep `F.linear`: its bf16 kernel is the faster one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            inputs, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = inputs.reshape(-1, inputs.shape[-1])
            if (inputs.device.type == "cpu" and weight.dtype == inputs.dtype == torch.float32 and weight.ndim == 2
                    and rows.shape[0] <= FEW_ROW_LINEAR_MAX_ROWS):  # fmt: skip
                out = torch.stack([(weight * row).sum(-1) for row in rows])
                if bias is not None:
                    out = out + bias
                return out.reshape(*inputs.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def _few_row_llm_step(*args):
    """`_llm_step` with `_FewRowLinear` active, for `torch.compile` to trace (the mode becomes part of the graph)."""
    with _FewRowLinear():
        return _llm_step(*args)


def _few_row_position_step(*args):
    """`_static_position_step` with `_FewRowLinear` active, for `torch.compile` to trace. A function of its own:
    dynamo keeps the graphs of each code object together, under one recompilation limit."""
    with _FewRowLinear():
        return _static_position_step(*args)


@functools.cache
def _compiled_llm_step():
    """`_llm_step` under `torch.compile(fullgraph=True, dynamic=False)` with `_FewRowLinear`, built on first use
    (compilation happens at the first call for each model, batch and prompt length; later calls with the same shapes
    reuse it)."""
    return torch.compile(_few_row_llm_step, fullgraph=True, dynamic=False)


def _position_codes(model, hidden, noise, processors, guidance_scale, rows, record):
    """`_sample_depths` with fixed shapes and no host synchronisation, for the static path (which compiles it): the
    depth head's cache is the one it starts itself, the processors are the built-in warpers (they see no codes), the
    codes index the codebooks unchecked, and sampling takes the argmax of probs / noise over exponential noise drawn
    beforehand, which is how `torch.multinomial` draws one sample (the same draws from the same generator give the
    same codes). Returns the codes `(rows, pixel_depth)` and, with `record`, the scores and the guided logits
    `(rows, pixel_depth, codebook_size)`."""
    head, codebook = model.depth_head, model.vision_tower.quantizer.codebook
    guided = hidden.shape[0] != rows
    no_codes = torch.zeros(rows, 0, dtype=torch.long, device=hidden.device)
    chosen, scores, logits, running = [], [], [], None
    out = head(hidden_states=hidden.to(head.dtype), use_cache=True, return_dict=True)
    for d, depth_processors in enumerate(processors):
        guided_logits = out.logits[:, -1].float()
        if guided:
            cond, uncond = guided_logits[:rows], guided_logits[rows:]
            guided_logits = uncond + guidance_scale * (cond - uncond)
        depth_scores = depth_processors(no_codes, guided_logits)
        if noise is None:
            chosen.append(depth_scores.argmax(dim=-1))
        else:
            chosen.append((torch.softmax(depth_scores, dim=-1) / noise[d]).argmax(dim=-1))
        if record:
            scores.append(depth_scores)
            logits.append(guided_logits)
        if d == len(processors) - 1:
            break
        code = codebook[d].index_select(0, chosen[-1]).float()
        running = code if running is None else running + code  # e(c_0) + ... + e(c_d)
        sums = running.to(head.dtype)
        if guided:
            sums = torch.cat([sums, sums])
        out = head(code_embedding_sums=sums[:, None], past_key_values=out.past_key_values, use_cache=True,
                   return_dict=True)  # fmt: skip
    codes = torch.stack(chosen, dim=1)
    if not record:
        return codes, None, None
    return codes, torch.stack(scores, dim=1), torch.stack(logits, dim=1)


def _static_position_step(model, hidden, noise, processors, guidance_scale, rows, record, attention_mask,
                          position_ids, cache, cache_position, grid_position):  # fmt: skip
    """One image position of the static path: its codes (`_position_codes`), then, unless `attention_mask` is None
    (the last position), the LLM step over their embedding. Returns codes, scores, logits and the next hidden state
    (None after the last position)."""
    codes, scores, logits = _position_codes(model, hidden, noise, processors, guidance_scale, rows, record)
    if attention_mask is None:
        return codes, scores, logits, None
    embedding = model.model.get_generation_embeddings(codes, positions=grid_position, check_codes=False)
    if hidden.shape[0] != rows:
        embedding = torch.cat([embedding, embedding])
    language_model = model.model.language_model
    embedding = embedding[:, None].to(language_model.get_input_embeddings().weight.dtype)
    return codes, scores, logits, _llm_step(language_model, embedding, attention_mask, position_ids, cache,
                                            cache_position)  # fmt: skip


# Graphs of the position step one process may keep: two (the last position has no LLM step) per combination of
# settings, model, batch and prompt length it generates with, each compiled on first use; torch's default of 8 would
# stop a notebook after its fourth temperature.
POSITION_STEP_GRAPHS = 64


@functools.cache
def _compiled_position_step():
    """`_static_position_step` under `torch.compile(fullgraph=True, dynamic=False)` with `_FewRowLinear`: one graph
    for the depth loop, the code embedding and the LLM step, for each setting it is called with (up to
    `POSITION_STEP_GRAPHS`)."""
    compiled = torch.compile(_few_row_position_step, fullgraph=True, dynamic=False)

    def step(*args):
        limit = max(torch._dynamo.config.recompile_limit, POSITION_STEP_GRAPHS)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(*args)

    return step


class _StreamerFeed:
    """Hands a streamer each position's codes without a host synchronisation per position where the device allows
    it: on CUDA the codes are copied to pinned host memory asynchronously and reach the streamer one position later,
    once that copy has completed (the device is by then busy with the next position); elsewhere at once."""

    def __init__(self, streamer):
        self.streamer = streamer
        self.pending = None

    def put(self, codes: torch.Tensor) -> None:
        if codes.device.type != "cuda":
            self.streamer.put(codes.cpu())
            return
        host = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
        host.copy_(codes, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._flush()
        self.pending = (host, event)

    def _flush(self) -> None:
        if self.pending is not None:
            host, event = self.pending
            event.synchronize()
            self.streamer.put(host)
            self.pending = None

    def end(self) -> None:
        self._flush()
        self.streamer.end()


def _sample_depths(head, quantizer, hidden, processors, guided, guidance_scale, do_sample, generator, use_cache, rows,
                   previous_codes=None, scores=None, logits=None):  # fmt: skip
    """The codes of one position, depth by depth: `(rows, pixel_depth)`. `processors[d]` turns depth d's guided logits
    into the scores its code is sampled from (or the argmax taken of), seeing `previous_codes` (`(rows, n)`, the codes
    of earlier positions) followed by this position's earlier depths as `input_ids`. Each depth's scores / guided
    logits are appended to `scores` / `logits` when those lists are given."""
    depth = len(processors)
    hidden = hidden.to(head.dtype)
    chosen = torch.zeros(rows, depth, dtype=torch.long, device=hidden.device)
    if previous_codes is None:
        previous_codes = chosen[:, :0]
    # return_dict=True: the depth head's config may say return_dict=False (transformers' tuple convention).
    out = head(hidden_states=hidden, use_cache=use_cache, return_dict=True)
    sums = []
    for d in range(depth):
        guided_logits = out.logits[:, -1].float()
        if guided:
            cond, uncond = guided_logits[:rows], guided_logits[rows:]
            guided_logits = uncond + guidance_scale * (cond - uncond)
        depth_scores = processors[d](torch.cat([previous_codes, chosen[:, :d]], dim=1), guided_logits)
        if do_sample:
            probs = torch.softmax(depth_scores, dim=-1)
            chosen[:, d] = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            chosen[:, d] = depth_scores.argmax(dim=-1)
        if scores is not None:
            scores.append(depth_scores)
        if logits is not None:
            logits.append(guided_logits)
        if d == depth - 1:
            break
        running = quantizer.embed_codes(chosen[:, : d + 1]).to(head.dtype)  # e(c_0) + ... + e(c_d)
        if guided:
            running = torch.cat([running, running])
        if use_cache:
            out = head(code_embedding_sums=running[:, None], past_key_values=out.past_key_values, use_cache=True,
                       return_dict=True)  # fmt: skip
        else:
            sums.append(running)
            out = head(hidden_states=hidden, code_embedding_sums=torch.stack(sums, dim=1), return_dict=True)
    return chosen


__all__ = [
    "CACHE_IMPLEMENTATIONS",
    "DEPTH_DECODER_PREFIX",
    "DEPTH_DECODER_SETTINGS",
    "EvoTokImageGenerateOutput",
    "IMAGE_GENERATION_DEFAULTS",
    "LEGACY_SETTING_NAMES",
    "build_depth_warpers",
    "generate_image_codes",
    "merge_depth_decoder_config",
    "resolve_image_generation_config",
    "split_depth_decoder_config",
]
