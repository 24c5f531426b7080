"""Text-to-image generation for the EvoTok VLM: the position loop over the LLM and the depth loop in the depth head.

For each of the grid*grid image positions (row-major):

    LLM hidden state h  --depth head-->  logits of depth 0 -> code c_0
    h, e(c_0)           --depth head-->  logits of depth 1 -> code c_1      (e: the tokenizer's code embeddings,
    h, e(c_0), e(c_0)+e(c_1) ...      -> codes up to depth pixel_depth-1   summed cumulatively)
    generation projector(e(c_0) + ... + e(c_{D-1}))  -> the next LLM input -> the next h

Classifier-free guidance batches the conditional rows first and the unconditional rows (the negative prompt; by
default a user turn holding a single space, as the authors') after them; at every depth
`logits = uncond + guidance_scale * (cond - uncond)` and both halves continue with the chosen codes. The LLM keeps its
key/value cache across positions and the depth head its own across depths (`use_cache=False` recomputes both from
scratch at every step, as the authors' depth head does). Sampling settings may differ per depth and go through
transformers' logits warpers.

Settings not given come from `generation_config.image_generation` (a dict saved in generation_config.json) when
present, else from `IMAGE_GENERATION_DEFAULTS`: the paper's guidance scale 7.5 and the authors' top-k 900 / top-p 0.96 /
temperature 1.0 sampling. `resolve_image_generation_settings` picks and checks them, the one place every entry point
(generate, the pipeline, the Space) goes through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

IMAGE_GENERATION_DEFAULTS = {
    "guidance_scale": 7.5,
    "do_sample": True,
    "depth_temperature": 1.0,
    "depth_top_k": 900,
    "depth_top_p": 0.96,
}
_PER_DEPTH_SETTINGS = ("depth_temperature", "depth_top_k", "depth_top_p")
_SAVED_SETTINGS = "generation_config.image_generation"


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _per_depth(name: str, value, depth: int, source: str) -> list:
    """A scalar or a sequence of `depth` values -> a list of `depth` values."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != depth:
            raise ValueError(
                f"{name} must be one value or a list of pixel_depth={depth} values, got {list(value)}{source}."
            )
        return list(value)
    return [value] * depth


# what each per-depth setting must be, as its error message says it
_DEPTH_RULES = {
    "depth_temperature": "must be a finite number > 0",
    "depth_top_k": "must be an int >= 0",
    "depth_top_p": "must be in (0, 1]",
}


def _valid_depth_value(name: str, value, do_sample: bool) -> bool:
    """Whether one depth's temperature / top-k / top-p (None: that warper is off) is valid."""
    if value is None:
        return True
    if name == "depth_top_k":
        return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_)) and value >= 0
    if not _is_number(value):
        return False
    if name == "depth_temperature":
        # without sampling the temperature is unused, so 0 (a common way to ask for greedy decoding) is fine there
        return value > 0 or (value == 0 and not do_sample)
    return 0 < value <= 1


def resolve_image_generation_settings(
    generation_config,
    pixel_depth: int,
    guidance_scale=None,
    do_sample=None,
    depth_temperature=None,
    depth_top_k=None,
    depth_top_p=None,
) -> dict:
    """The settings one image generation runs with, checked here and nowhere else for every entry point (`generate`,
    `EvoTokPipeline`, the Space): a value given (not None), else the one saved in `generation_config.image_generation`,
    else `IMAGE_GENERATION_DEFAULTS`.

    Returns a dict with `guidance_scale` (a finite float; a saved None means 1.0, no guidance), `do_sample` (bool) and
    `depth_temperature` / `depth_top_k` / `depth_top_p` as lists of `pixel_depth` values, None where that warper is
    off. Raises a ValueError naming the setting, the depth and whether the value was saved in the generation config.
    """
    saved = getattr(generation_config, "image_generation", None)
    if saved is None:
        saved = {}
    if not isinstance(saved, dict):
        raise ValueError(f"{_SAVED_SETTINGS} must be a dict of settings, got {saved!r}.")
    unknown = sorted(set(saved) - set(IMAGE_GENERATION_DEFAULTS))
    if unknown:
        raise ValueError(f"{_SAVED_SETTINGS} has unknown settings {unknown}; known: {list(IMAGE_GENERATION_DEFAULTS)}.")
    given = {"guidance_scale": guidance_scale, "do_sample": do_sample, "depth_temperature": depth_temperature,
             "depth_top_k": depth_top_k, "depth_top_p": depth_top_p}  # fmt: skip
    values, sources = {}, {}
    for name, default in IMAGE_GENERATION_DEFAULTS.items():
        if given[name] is not None:
            values[name], sources[name] = given[name], ""
        elif name in saved:
            values[name], sources[name] = saved[name], f" (from {_SAVED_SETTINGS})"
        else:
            values[name], sources[name] = default, ""

    settings = {}
    scale = 1.0 if values["guidance_scale"] is None else values["guidance_scale"]
    if not _is_number(scale):
        raise ValueError(f"guidance_scale must be a finite number, got {scale!r}{sources['guidance_scale']}.")
    settings["guidance_scale"] = float(scale)
    if not isinstance(values["do_sample"], (bool, np.bool_)):
        raise ValueError(f"do_sample must be True or False, got {values['do_sample']!r}{sources['do_sample']}.")
    settings["do_sample"] = bool(values["do_sample"])
    for name in _PER_DEPTH_SETTINGS:
        checked = []
        for depth, value in enumerate(_per_depth(name, values[name], pixel_depth, sources[name])):
            if not _valid_depth_value(name, value, settings["do_sample"]):
                zero_temperature = name == "depth_temperature" and _is_number(value) and value == 0
                hint = " (0 only with do_sample=False)" if zero_temperature else ""
                raise ValueError(f"{name} {_DEPTH_RULES[name]}, got {value!r} at depth {depth}{sources[name]}{hint}.")
            checked.append(None if value is None else int(value) if name == "depth_top_k" else float(value))
        settings[name] = checked
    return settings


def _depth_warpers(settings: dict, vocab_size: int) -> list[LogitsProcessorList]:
    """One `LogitsProcessorList` per depth from checked settings (temperature, then top-k, then top-p, as transformers
    orders them); a temperature of 1, a top-k of 0 and a top-p of 1 add no warper, and greedy decoding uses none."""
    per_depth = list(zip(settings["depth_temperature"], settings["depth_top_k"], settings["depth_top_p"]))
    if not settings["do_sample"]:  # the argmax at every depth
        return [LogitsProcessorList() for _ in per_depth]
    warpers = []
    for t, k, p in per_depth:
        processors = LogitsProcessorList()
        if t is not None and t != 1.0:
            processors.append(TemperatureLogitsWarper(t))
        if k:
            processors.append(TopKLogitsWarper(min(k, vocab_size)))
        if p is not None and p < 1.0:
            processors.append(TopPLogitsWarper(p))
        warpers.append(processors)
    return warpers


def build_depth_warpers(temperature, top_k, top_p, depth: int, vocab_size: int) -> list[LogitsProcessorList]:
    """One `LogitsProcessorList` per depth for sampling; each setting is a scalar or a list of `depth` values, checked
    as `resolve_image_generation_settings` checks them; None, a top-k of 0 and a top-p of 1.0 switch a warper off."""
    settings = resolve_image_generation_settings(
        None, depth, do_sample=True, depth_temperature=1.0 if temperature is None else temperature,
        depth_top_k=0 if top_k is None else top_k, depth_top_p=1.0 if top_p is None else top_p,
    )  # fmt: skip
    return _depth_warpers(settings, vocab_size)


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
    guidance_scale: float | None = None,
    do_sample: bool | None = None,
    depth_temperature=None,
    depth_top_k=None,
    depth_top_p=None,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    streamer=None,
    generation_config=None,
    **unexpected,
) -> torch.LongTensor:
    """Generate images' pixel codes from text prompts (`EvoTokForConditionalGeneration.generate(...,
    generation_mode="image")` calls this).

    Args:
        input_ids / attention_mask (`(batch, length)`): left-padded prompts ending with the image start token
            (`EvoTokProcessor(text=prompts, generation_mode="image")`).
        negative_input_ids / negative_attention_mask (`(batch or 1, length)`, *optional*): the unconditional half of
            classifier-free guidance (the processor returns the default one, a user turn holding " ").
        guidance_scale (`float`, *optional*): CFG scale, any finite number; 1.0 runs the conditional rows only.
        do_sample (`bool`, *optional*): sample (with the warpers below) or take the argmax at every depth.
        depth_temperature / depth_top_k / depth_top_p: a scalar for every depth or a list of `pixel_depth` values;
            temperature > 0 (0 is accepted, and unused, with do_sample=False), top-k an int >= 0 (0: off), top-p in
            (0, 1] (1: off); None inside a list switches that depth's warper off.
            Each setting left None takes the saved default (see `resolve_image_generation_settings`).
        num_return_sequences (`int`): images per prompt.
        generator (`torch.Generator`, *optional*): the randomness of sampling, for reproducible images.
        use_cache (`bool`): key/value caches in the LLM (across positions) and in the depth head (across depths).
        streamer (*optional*): an object with `put(codes)` (called per position with that position's codes,
            `(batch * num_return_sequences, pixel_depth)`) and `end()`, e.g. a progress bar.
        generation_config (`GenerationConfig`, *optional*): read for its `image_generation` settings (else the
            model's).

    Returns:
        `torch.LongTensor` of shape `(batch * num_return_sequences, grid, grid, pixel_depth)`: decode with
        `model.decode_image_tokens`.
    """
    config = model.config
    if not config.has_generation_head:
        raise ValueError("This checkpoint has no generation head (has_generation_head=False).")
    if unexpected:
        raise ValueError(f"Unknown arguments for generation_mode='image': {sorted(unexpected)}.")
    if input_ids is None:
        raise ValueError("generation_mode='image' needs `input_ids` (EvoTokProcessor(text=..., generation_mode='image')).")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive int, got {num_return_sequences!r}.")
    vision = config.vision_config
    pixel_depth, grid = vision.pixel_depth, vision.grid_size
    settings = resolve_image_generation_settings(
        generation_config if generation_config is not None else model.generation_config, pixel_depth,
        guidance_scale=guidance_scale, do_sample=do_sample, depth_temperature=depth_temperature,
        depth_top_k=depth_top_k, depth_top_p=depth_top_p,
    )  # fmt: skip
    guidance_scale, do_sample = settings["guidance_scale"], settings["do_sample"]
    warpers = _depth_warpers(settings, vision.codebook_size)
    guided = guidance_scale != 1.0

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

    hidden, llm_cache = run_llm(embeddings, mask, positions, None)
    codes = torch.zeros(rows, grid * grid, pixel_depth, dtype=torch.long, device=ids.device)
    for position in range(grid * grid):
        codes[:, position] = _sample_depths(head, quantizer, hidden, warpers, guided, guidance_scale, do_sample,
                                            generator, use_cache, rows)  # fmt: skip
        if streamer is not None:
            streamer.put(codes[:, position].cpu())
        if position == grid * grid - 1:
            break
        next_codes = codes[:, position]
        next_embedding = model.model.get_generation_embeddings(torch.cat([next_codes] * (2 if guided else 1)))
        next_embedding = next_embedding[:, None].to(embeddings.dtype)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        next_position = positions[:, -1:] + 1
        positions = torch.cat([positions, next_position], dim=1)
        if use_cache:
            hidden, llm_cache = run_llm(next_embedding, mask, next_position, llm_cache)
        else:
            embeddings = torch.cat([embeddings, next_embedding], dim=1)
            hidden, _ = run_llm(embeddings, mask, positions, None)
    if streamer is not None:
        streamer.end()
    return codes.view(rows, grid, grid, pixel_depth)


def _sample_depths(head, quantizer, hidden, warpers, guided, guidance_scale, do_sample, generator, use_cache, rows):
    """The codes of one position, depth by depth: `(rows, pixel_depth)`."""
    depth = len(warpers)
    hidden = hidden.to(head.dtype)
    chosen = torch.zeros(rows, depth, dtype=torch.long, device=hidden.device)
    # return_dict=True: the depth head's config may say return_dict=False (transformers' tuple convention).
    out = head(hidden_states=hidden, use_cache=use_cache, return_dict=True)
    sums = []
    for d in range(depth):
        logits = out.logits[:, -1].float()
        if guided:
            cond, uncond = logits[:rows], logits[rows:]
            logits = uncond + guidance_scale * (cond - uncond)
        if do_sample:
            scores = warpers[d](chosen[:, :d], logits)
            probs = torch.softmax(scores, dim=-1)
            chosen[:, d] = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            chosen[:, d] = logits.argmax(dim=-1)
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
    "IMAGE_GENERATION_DEFAULTS",
    "build_depth_warpers",
    "generate_image_codes",
    "resolve_image_generation_settings",
]
