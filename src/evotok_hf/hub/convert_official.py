"""Conversion of the authors' EvoTok checkpoints (VisionXLab/EvoTok research code) to this package's folders.

Tokenizer: the training checkpoint `.pt` (`torch.save` of {model, ema, optimizer, discriminator, optimizer_disc,
steps, args}) becomes an `EvoTokModel` folder (config + safetensors + image-processor config). Keys are renamed by
`TOKENIZER_KEY_RULES`; the per-depth codebooks `quantize.codebooks.{d}.weight` (K + 1 rows, the last one padding)
are stacked into `quantizer.codebook` (depth, K, dim) without the padding row.

Understanding MLLM: the authors' LLaVA-style folder (`LlavaQwenForCausalLM`: Qwen2 weights under `model.*` and
`lm_head`, the projector `model.mm_projector.{0,2}`, usually a copy of the tokenizer under
`model.vision_tower.vision_tower.*`) plus a converted tokenizer becomes one `EvoTokForConditionalGeneration` folder.

Generation MLLM: the same layout (trained with `MM_MODE=generation`), where `model.mm_projector.{0,2}` reads the 32-d
sums of the pixel-code embeddings and the depth head (`RQTransformer`) sits under `model.vision_tower.rqtransformer.*`
(the authors' `VQTower.rqtransformer`); it becomes a generation-only `EvoTokForConditionalGeneration` whose image
start / end tokens are real `<boi>` / `<eoi>` tokens of the saved text tokenizer.

Every problem found (official keys without a counterpart, our keys left missing, shape mismatches) is reported in
one `CheckpointConversionError`; nothing is loaded half-way. Outputs are written to a temporary sibling folder and
renamed into place at the end, so a failure never leaves a half-written folder or clobbers an existing one.
Checkpoints are only ever read with `torch.load(weights_only=True)` (plus `argparse.Namespace` for `args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..modeling.configuration_evotok import EvoTokConfig
from ..modeling.configuration_evotok_vlm import EvoTokVLMConfig
from ..modeling.depth_head import official_depth_head_key
from ..modeling.modeling_evotok import EvoTokModel
from ..modeling.modeling_evotok_vlm import EvoTokForConditionalGeneration
from ..processing.image_processing_evotok import EvoTokImageProcessor
from .staging import check_output_dir, staged_output_dir

logger = logging.getLogger(__name__)

# An ordered rule table: the first pattern that matches a key decides; `None` drops the key.
KeyRules = list[tuple[str, "str | None"]]

# Official tokenizer key -> our `EvoTokModel` key. The quantizer rules produce per-depth names ("...codebook.3")
# that `map_official_tokenizer_state_dict` stacks over depths.
TOKENIZER_KEY_RULES: KeyRules = [
    # SiglipVisionModel as saved by transformers 4.51 has a `vision_model.` level that transformers 5 no longer has.
    (r"^encoder_vqkd\.(?:vision_model\.)?", "encoder."),
    (r"^decoder_vqkd\.", "semantic_decoder."),  # BEiT-v2 ViT; q_bias / v_bias / qkv.weight keep their layout
    (r"^decoder\.", "pixel_decoder."),
    (r"^scaling_layer\.", "input_scaling."),
    (r"^(encode_task_layer|decode_task_layer|post_quant_conv)\.", r"\1."),
    (r"^quantize\.codebooks\.(\d+)\.weight$", r"quantizer.codebook.\1"),
    (r"^quantize\.codebooks\.(\d+)\.cluster_size_ema$", r"quantizer.cluster_size_ema.\1"),
    (r"^quantize\.codebooks\.(\d+)\.embed_ema$", r"quantizer.embed_ema.\1"),
    (r"^quantize\.codebooks\.(\d+)\.step$", r"quantizer.ema_step.\1"),  # only saved when EMA warm-up > 0
    (r"^quantize\.codebook_used$", None),  # rolling log of the last training batches' codes: training-only
]

# Encoder attention heads leave no trace in the weight shapes. The authors' encoders are SigLIP / SigLIP2 towers,
# whose head count follows from the width (B 768 / 12, L 1024 / 16, So400m 1152 / 16, g 1536 / 16).
SIGLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16, 1536: 16}
# The authors' semantic decoder always has 12 heads of head_dim = width // 12 (1020 = 12 x 85 at width 1024).
OFFICIAL_SEMANTIC_HEADS = 12
# `args.teacher` values of the official training script that our model supports. "siglip_384" (SigLIP2-So400m/14)
# needs a 14x upsampling the pixel decoder cannot do: the authors resize its 432 px output to 384 bicubically.
SUPPORTED_TEACHERS = ("siglip_256",)
# The converters run from Python and from scripts/convert_official.py: their messages name both spellings.
OUTPUT_DIR_FLAGS = {"flag": "output_dir (--output-dir)", "overwrite_flag": "overwrite=True (--overwrite)"}


class CheckpointConversionError(ValueError):
    """A checkpoint does not convert; `problems` lists every issue found (all of them, not only the first)."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n{lines}")


# ----------------------------------------------------------------------------- shared helpers
_UNMATCHED = object()


def rename_key(key: str, rules: KeyRules):
    """The new name of `key` under the first matching rule, None when that rule drops it, or `_UNMATCHED`."""
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key, count=1)
    return _UNMATCHED


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    sources: Mapping[str, str],
    problems: list[str],
) -> None:
    """Append to `problems` every key of `state_dict` the model lacks, every expected key left missing and every
    shape mismatch; `sources` names the official key each of ours came from (for the messages)."""
    for key, tensor in state_dict.items():
        source = sources.get(key, key)
        if key not in expected:
            problems.append(f"official key {source!r} maps to {key!r}, which the model does not have")
        elif _shape(tensor) != tuple(expected[key]):
            problems.append(
                f"shape mismatch for {key!r} (from {source!r}): checkpoint {_shape(tensor)}, "
                f"model {tuple(expected[key])}"
            )
    for key in expected:
        if key not in state_dict:
            problems.append(f"model key {key!r} is missing from the checkpoint")


def _expected_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = model_class(config)
    return {k: _shape(v) for k, v in model.state_dict().items()}


def _raise_on_loading_info(what: str, info: dict) -> None:
    problems = [f"model key {k!r} was not loaded" for k in sorted(info.get("missing_keys", ()))]
    problems += [f"unexpected key {k!r}" for k in sorted(info.get("unexpected_keys", ()))]
    problems += [f"shape mismatch: {m}" for m in sorted(map(str, info.get("mismatched_keys", ())))]
    problems += [str(m) for m in info.get("error_msgs", ())]
    if problems:
        raise CheckpointConversionError(what, problems)


def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False):
    """A staging folder beside `output_dir` that replaces it once complete (see `hub.staging.staged_output_dir`)."""
    check_output_dir(output_dir, overwrite=overwrite, **OUTPUT_DIR_FLAGS)
    return staged_output_dir(output_dir)


# ----------------------------------------------------------------------------- tokenizer: loading
def load_official_checkpoint(path: str | os.PathLike) -> dict:
    """Read an official tokenizer checkpoint with a weights-only load (tensors, containers, numbers, strings, and
    `argparse.Namespace` for its `args`); anything else in the file is refused, never unpickled."""
    path = str(path)

    def load(mmap: bool):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            checkpoint = load(mmap=True)  # the optimizer states need not be read into memory
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            checkpoint = load(mmap=False)  # a legacy (non-zip) file
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ValueError(
            f"{path}: refused to load: the file holds objects other than tensors, plain containers and "
            f"argparse.Namespace, and it is only ever read weights-only ({reason}). If you trust the file, allow-list "
            "the class with torch.serialization.add_safe_globals([...]) and call again."
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{path}: expected a dict checkpoint (with 'ema' or 'model'), got {type(checkpoint).__name__}."
        )
    if "ema" not in checkpoint and "model" not in checkpoint:
        raise ValueError(
            f"{path}: the checkpoint has neither an 'ema' nor a 'model' state dict "
            f"(keys: {sorted(map(str, checkpoint))})."
        )
    return checkpoint


def select_official_state_dict(checkpoint: Mapping) -> tuple[str, dict[str, torch.Tensor]]:
    """The weights to convert: `ema` when present (what the authors evaluate and use in the MLLM), else `model`."""
    name = "ema" if checkpoint.get("ema") is not None else "model"
    state_dict = checkpoint.get(name)
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"the checkpoint's {name!r} entry is not a state dict of tensors.")
    return name, dict(state_dict)


# ----------------------------------------------------------------------------- tokenizer: keys
def _stack_depths(
    name: str, per_depth: dict[int, torch.Tensor], problems: list[str], sources: dict[str, str]
) -> torch.Tensor | None:
    depths = sorted(per_depth)
    if depths != list(range(len(depths))):
        problems.append(f"official quantizer entries for {name!r} cover depths {depths}, not 0..{len(depths) - 1}")
        return None
    shapes = {_shape(t) for t in per_depth.values()}
    if len(shapes) != 1:
        problems.append(
            f"official quantizer entries for {name!r} have different shapes across depths: {sorted(shapes)}"
        )
        return None
    sources[f"quantizer.{name}"] = f"quantize.codebooks.{{0..{len(depths) - 1}}}"
    return torch.stack([per_depth[d] for d in depths])


def map_official_tokenizer_state_dict(
    state_dict: Mapping[str, torch.Tensor], keep_training_state: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename an official tokenizer state dict to `EvoTokModel` keys.

    Returns `(converted, sources, problems)`: `sources` maps each of our keys to the official key(s) it came from;
    `problems` lists official keys no rule matches and malformed quantizer entries. The codebooks lose their padding
    row. With `keep_training_state` the EMA statistics (`cluster_size_ema`, `embed_ema`, and the warm-up counter
    `step`, equal at every depth) become our `cluster_size_ema` / `embed_ema` / `ema_step`, so training resumes
    where the authors stopped; otherwise they are dropped and ours hold a fresh model's EMA state for the converted
    codebook (zero sizes, sums equal to the codebook, step 0). Fine-tune from a conversion with
    `keep_training_state=True`: from the fresh state nearly every code would count as dead on the first training step.
    """
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    per_depth: dict[str, dict[int, torch.Tensor]] = {}
    problems: list[str] = []
    for key, tensor in state_dict.items():
        new = rename_key(key, TOKENIZER_KEY_RULES)
        if new is _UNMATCHED:
            problems.append(f"official key {key!r} has no counterpart in EvoTokModel")
        elif new is not None and new.startswith("quantizer."):
            _, name, depth = new.split(".")
            per_depth.setdefault(name, {})[int(depth)] = tensor
        elif new is not None:
            converted[new] = tensor
            sources[new] = key

    codebooks = per_depth.pop("codebook", None)
    if not codebooks:
        problems.append("the checkpoint has no 'quantize.codebooks.{d}.weight' entries")
        return converted, sources, problems
    bad = {d: _shape(t) for d, t in codebooks.items() if t.ndim != 2 or t.shape[0] < 2}
    if bad:
        problems.append(f"official codebooks must be (codebook_size + 1, dim) matrices, got {bad}")
        return converted, sources, problems
    # Row K of each official codebook is the nn.Embedding padding row: never selected, so never a code.
    codebook = _stack_depths("codebook", {d: t[:-1] for d, t in codebooks.items()}, problems, sources)
    if codebook is None:
        return converted, sources, problems
    converted["quantizer.codebook"] = codebook

    if keep_training_state:
        for name in ("cluster_size_ema", "embed_ema"):
            if name in per_depth:
                stacked = _stack_depths(name, per_depth.pop(name), problems, sources)
                if stacked is not None:
                    converted[f"quantizer.{name}"] = stacked
        steps = per_depth.pop("ema_step", None)
        if steps is None:
            # Without EMA warm-up the authors keep no counter; ours only gates the warm-up.
            converted["quantizer.ema_step"] = torch.zeros((), dtype=torch.long, device=codebook.device)
        else:
            values = {int(t) for t in steps.values()}
            if len(values) != 1 or set(steps) != set(codebooks):
                counters = {d: int(t) for d, t in steps.items()}
                problems.append(f"official EMA step counters differ across depths: {counters}")
            else:
                converted["quantizer.ema_step"] = torch.tensor(values.pop(), dtype=torch.long)
                sources["quantizer.ema_step"] = f"quantize.codebooks.{{0..{len(steps) - 1}}}.step"
    else:
        converted["quantizer.cluster_size_ema"] = torch.zeros(codebook.shape[:2], device=codebook.device)
        converted["quantizer.embed_ema"] = codebook.clone()
        converted["quantizer.ema_step"] = torch.zeros((), dtype=torch.long, device=codebook.device)
    return converted, sources, problems


# ----------------------------------------------------------------------------- tokenizer: config
def _count(keys, pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def infer_tokenizer_config(
    state_dict: Mapping[str, torch.Tensor],
    args: argparse.Namespace | None = None,
    base_config: str | EvoTokConfig = "evotok-siglip2-l16-256",
    **overrides,
) -> EvoTokConfig:
    """The `EvoTokConfig` of an official tokenizer state dict (official key names).

    Sizes come from the tensor shapes (encoder width / layers / MLP / patch / image size, codebook size / dim /
    depth, pixel-decoder channels and levels, semantic-decoder width / blocks / MLP, teacher width) and are cross-
    checked with the official `args` when given. What shapes cannot tell comes from `args` when present
    (`vqgan_depth` -> pixel_depth, `vq_warmup` -> ema_warmup_steps, `restart_unused_codes`), else from
    `base_config` (a preset name or config): the encoder's attention heads come from the SigLIP width table
    (`SIGLIP_HEADS_BY_WIDTH`), else the base config; the semantic decoder's heads are the authors' fixed 12 when
    the attention width fits, else the base config's; GroupNorm groups, activations and epsilons are the base's.
    Keyword `overrides` win over everything (`encoder_config` overrides are merged)."""
    base = base_config if isinstance(base_config, EvoTokConfig) else EvoTokConfig.from_preset(base_config)
    keys = list(state_dict)
    enc = "encoder_vqkd.vision_model."
    if not any(k.startswith(enc) for k in keys):
        enc = "encoder_vqkd."  # saved by transformers 5
    needed = [
        f"{enc}embeddings.patch_embedding.weight", f"{enc}embeddings.position_embedding.weight",
        f"{enc}encoder.layers.0.mlp.fc1.weight", "quantize.codebooks.0.weight", "post_quant_conv.weight",
        "decoder_vqkd.cls_token", "decoder_vqkd.blocks.0.attn.q_bias", "decoder_vqkd.blocks.0.mlp.fc1.weight",
        "decoder_vqkd.pos_embed", "decode_task_layer.2.weight", "decoder.conv_blocks.0.res.0.conv1.weight",
    ]  # fmt: skip
    absent = [k for k in needed if k not in state_dict]
    if absent:
        raise CheckpointConversionError("cannot infer the tokenizer config", [f"key {k!r} is missing" for k in absent])

    def shape(key: str) -> tuple[int, ...]:
        return _shape(state_dict[key])

    problems: list[str] = []
    hidden, channels, patch, _ = shape(f"{enc}embeddings.patch_embedding.weight")
    positions = shape(f"{enc}embeddings.position_embedding.weight")[0]
    grid = math.isqrt(positions)
    if grid * grid != positions:
        problems.append(f"the encoder has {positions} position embeddings, not a square grid")
    encoder = {
        "hidden_size": hidden,
        "num_channels": channels,
        "patch_size": patch,
        "image_size": grid * patch,
        "intermediate_size": shape(f"{enc}encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": _count(keys, rf"^{re.escape(enc)}encoder\.layers\.(\d+)\."),
        "vision_use_head": f"{enc}head.probe" in state_dict,
    }
    encoder_overrides = dict(overrides.pop("encoder_config", None) or {})
    if "num_attention_heads" not in encoder_overrides:
        base_heads = base.encoder_config.num_attention_heads
        if hidden in SIGLIP_HEADS_BY_WIDTH:
            encoder["num_attention_heads"] = SIGLIP_HEADS_BY_WIDTH[hidden]
        elif hidden % base_heads == 0:
            encoder["num_attention_heads"] = base_heads
            logger.warning(
                "Encoder width %d is not a known SigLIP width: using %d heads from the base config.", hidden, base_heads
            )
        else:
            problems.append(
                f"cannot tell the encoder's attention heads for width {hidden} (not a known SigLIP width, base "
                f"config has {base_heads}): pass encoder_config={{'num_attention_heads': ...}}"
            )
    encoder.update(encoder_overrides)

    codebook_rows, codebook_dim = shape("quantize.codebooks.0.weight")
    semantic_depth = _count(keys, r"^quantize\.codebooks\.(\d+)\.weight$")
    levels = _count(keys, r"^decoder\.conv_blocks\.(\d+)\.")
    level_channels = [shape(f"decoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in range(levels)]
    # Levels run from the lowest resolution up with base * multipliers reversed; the authors' multipliers start at 1.
    base_channels = level_channels[-1]
    multipliers = [c // base_channels for c in reversed(level_channels)]
    if any(c % base_channels for c in level_channels):
        problems.append(f"pixel-decoder level widths {level_channels} are not multiples of the last level's")
    semantic_hidden = shape("decoder_vqkd.cls_token")[-1]
    inner = shape("decoder_vqkd.blocks.0.attn.q_bias")[0]
    semantic_positions = shape("decoder_vqkd.pos_embed")[1] - 1
    if semantic_positions != positions:
        problems.append(f"the semantic decoder has {semantic_positions} positions, the encoder {positions}")
    fields = {
        "codebook_size": codebook_rows - 1,
        "codebook_dim": codebook_dim,
        "semantic_depth": semantic_depth,
        "pixel_depth": min(base.pixel_depth, semantic_depth),
        "ema_warmup_steps": base.ema_warmup_steps if "quantize.codebooks.0.step" in state_dict else 0,
        "decoder_z_channels": shape("post_quant_conv.weight")[0],
        "decoder_base_channels": base_channels,
        "decoder_channel_multipliers": multipliers,
        "decoder_res_blocks_per_level": _count(keys, r"^decoder\.conv_blocks\.0\.res\.(\d+)\."),
        "decoder_attention_at_lowest_resolution": "decoder.conv_blocks.0.attn.0.norm.weight" in state_dict,
        "semantic_decoder_layers": _count(keys, r"^decoder_vqkd\.blocks\.(\d+)\."),
        "semantic_decoder_hidden_size": semantic_hidden,
        "semantic_decoder_mlp_ratio": shape("decoder_vqkd.blocks.0.mlp.fc1.weight")[0] / semantic_hidden,
        "teacher_dim": shape("decode_task_layer.2.weight")[0],
    }
    if "semantic_decoder_num_heads" not in overrides:
        heads = None
        if OFFICIAL_SEMANTIC_HEADS * (semantic_hidden // OFFICIAL_SEMANTIC_HEADS) == inner:
            heads = OFFICIAL_SEMANTIC_HEADS
        elif base.semantic_decoder_num_heads * base.semantic_decoder_head_dim == inner:
            heads = base.semantic_decoder_num_heads
        if heads is None:
            problems.append(
                f"cannot tell the semantic decoder's heads for attention width {inner} (neither the official 12 x "
                f"{semantic_hidden} // 12 nor the base config's heads fit): pass semantic_decoder_num_heads=..."
            )
        else:
            fields["semantic_decoder_num_heads"] = heads
    heads = overrides.get("semantic_decoder_num_heads", fields.get("semantic_decoder_num_heads"))
    if heads:
        fields["semantic_decoder_head_dim"] = inner // heads
        if inner % heads:
            problems.append(f"semantic attention width {inner} is not divisible by {heads} heads")

    if args is not None:
        _apply_official_args(args, fields, encoder, problems)
    if problems:
        raise CheckpointConversionError("cannot infer the tokenizer config", problems)

    config = base.to_dict()
    config["encoder_config"] = {**config["encoder_config"], **encoder}
    config.update(fields)
    config.update(overrides)
    try:
        return EvoTokConfig.from_dict(config)
    except ValueError as err:
        raise ValueError(f"the official checkpoint's sizes do not make a valid EvoTokConfig: {err}") from err


def _apply_official_args(args: argparse.Namespace, fields: dict, encoder: dict, problems: list[str]) -> None:
    """Fill what shapes cannot tell from the official training arguments, and cross-check the rest."""
    teacher = getattr(args, "teacher", None)
    if teacher is not None and teacher not in SUPPORTED_TEACHERS:
        problems.append(f"args.teacher={teacher!r} is not supported (supported: {list(SUPPORTED_TEACHERS)})")
    checks = [
        ("codebook_size", fields["codebook_size"]),
        ("codebook_embed_dim", fields["codebook_dim"]),
        ("image_size", encoder["image_size"]),
    ]
    for name, from_shapes in checks:
        value = getattr(args, name, None)
        if value is not None and value != from_shapes:
            problems.append(f"args.{name}={value} but the weights say {from_shapes}")
    depths = [getattr(args, name, None) for name in ("vqgan_depth", "vqkd_depth")]
    if None not in depths and max(depths) != fields["semantic_depth"]:
        problems.append(
            f"args.vqgan_depth / vqkd_depth = {depths} but the checkpoint has {fields['semantic_depth']} codebooks"
        )
    if getattr(args, "vqgan_depth", None) is not None:
        fields["pixel_depth"] = args.vqgan_depth
    if getattr(args, "vq_warmup", None) is not None:
        fields["ema_warmup_steps"] = args.vq_warmup
    if getattr(args, "restart_unused_codes", None) is not None:
        fields["restart_unused_codes"] = bool(args.restart_unused_codes)


# ----------------------------------------------------------------------------- tokenizer: conversion
def _tokenizer_image_processor(config: EvoTokConfig) -> EvoTokImageProcessor:
    size = config.image_size
    return EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="center_crop")


def convert_tokenizer_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    keep_training_state: bool = False,
    overwrite: bool = False,
    base_config: str | EvoTokConfig = "evotok-siglip2-l16-256",
    config_overrides: dict | None = None,
) -> EvoTokModel:
    """Convert an official tokenizer checkpoint `.pt` to an `EvoTokModel` folder and return the model.

    The folder holds `config.json`, `model.safetensors` and an `EvoTokImageProcessor` config (shortest side + centre
    crop, the tokenizer-evaluation convention). `keep_training_state` keeps the codebooks' EMA statistics (see
    `map_official_tokenizer_state_dict`); `base_config` / `config_overrides` supply what the checkpoint cannot tell
    (see `infer_tokenizer_config`). Raises `CheckpointConversionError` listing every unmapped, missing or
    mis-shaped key; an existing non-empty `output_dir` is refused unless `overwrite`, and is replaced only after the
    new folder is complete."""
    check_output_dir(output_dir, overwrite=overwrite, **OUTPUT_DIR_FLAGS)
    checkpoint = load_official_checkpoint(checkpoint_path)
    source, state_dict = select_official_state_dict(checkpoint)
    logger.info("Converting the %r weights of %s.", source, checkpoint_path)
    config = infer_tokenizer_config(state_dict, checkpoint.get("args"), base_config, **(config_overrides or {}))
    converted, sources, problems = map_official_tokenizer_state_dict(state_dict, keep_training_state)
    check_state_dict(converted, _expected_shapes(EvoTokModel, config), sources, problems)
    what = f"official tokenizer checkpoint {str(checkpoint_path)!r} ({source!r} weights)"
    if problems:
        raise CheckpointConversionError(what, problems)
    model, info = EvoTokModel.from_pretrained(None, config=config, state_dict=converted, output_loading_info=True)
    _raise_on_loading_info(what, info)
    model.eval()
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        _tokenizer_image_processor(config).save_pretrained(tmp)
    logger.info("Saved the converted tokenizer to %s.", output_dir)
    return model


# ----------------------------------------------------------------------------- MLLM (LLaVA folders)
@dataclasses.dataclass(frozen=True)
class LlavaHead:
    """How one of the authors' MLLM checkpoints converts: key rules tried before the shared LLM rules, our config
    fields, a check of the LLaVA config.json that appends problems, where the depth head's weights sit (None: the
    checkpoint has none), and the image-generation defaults saved in `generation_config.image_generation`."""

    key_rules: KeyRules
    config_fields: dict
    check_config: Callable[[dict, EvoTokConfig, list], None]
    depth_head_prefix: str | None = None
    image_generation: dict | None = None


# Shared by every LLaVA checkpoint: the Qwen2 model and LM head; the tokenizer copy the authors' trainer saves along
# is dropped (the converted tokenizer is the source of truth; it is compared with the copy, see below).
LLAVA_SHARED_KEY_RULES: KeyRules = [
    (r"^model\.vision_tower\.vision_tower\.", None),
    (r"^model\.(embed_tokens|layers|norm)\.", r"language_model.\1."),
    (r"^lm_head\.", "lm_head."),
]
_TOKENIZER_COPY_PREFIX = "model.vision_tower.vision_tower."
_QUANTIZER_EMA_BUFFERS = ("quantizer.cluster_size_ema", "quantizer.embed_ema", "quantizer.ema_step")


def _check_projector_type(llava_config: dict, problems: list) -> None:
    if llava_config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        problems.append(f"mm_projector_type {llava_config['mm_projector_type']!r}: only 'mlp2x_gelu' is supported")


def _check_understanding_config(llava_config: dict, tokenizer_config: EvoTokConfig, problems: list) -> None:
    _check_projector_type(llava_config, problems)
    if llava_config.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end=True: the official understanding model does not wrap images")
    if llava_config.get("mm_with_depth_transformer"):
        problems.append("mm_with_depth_transformer=True: this is a generation checkpoint, not an understanding one")
    width = llava_config.get("mm_hidden_size")
    if width is not None and width != tokenizer_config.teacher_dim:
        problems.append(
            f"mm_hidden_size={width} but the tokenizer's semantic features have {tokenizer_config.teacher_dim}"
        )
    if llava_config.get("image_aspect_ratio", "square") != "square":
        logger.warning(
            "image_aspect_ratio=%r: the processor squashes images to the square input (the official understanding "
            "setting is 'square').", llava_config["image_aspect_ratio"],
        )


def _check_generation_config(llava_config: dict, tokenizer_config: EvoTokConfig, problems: list) -> None:
    _check_projector_type(llava_config, problems)
    if not llava_config.get("mm_with_depth_transformer"):
        problems.append("mm_with_depth_transformer is not True: this is not a generation checkpoint (no depth head)")
    if not llava_config.get("mm_use_im_start_end"):
        problems.append(
            "mm_use_im_start_end is not True: the official generation model writes images between image start / end "
            "tokens"
        )
    # in generation mode the authors' vision tower reports the code width as its hidden size
    width = llava_config.get("mm_hidden_size")
    if width is not None and width != tokenizer_config.codebook_dim:
        problems.append(
            f"mm_hidden_size={width} but the generation projector reads the tokenizer's {tokenizer_config.codebook_dim}"
            "-d code-embedding sums"
        )


# The authors' `VQTower` builds its depth head as `self.rqtransformer`, so the trainer saves it under this prefix.
OFFICIAL_DEPTH_HEAD_PREFIX = "model.vision_tower.rqtransformer."
# The authors never save the depth head's config: `VQTower.load_model` hard-codes RQTransformerConfig(embed_dim=2560,
# head={"block": {"n_head": 40}, "n_layer": 6}) and the LLaVA config.json only records `mm_with_depth_transformer`.
# Width and depth follow from the weights; the head count does not, so it comes from (in this order) the caller, an
# RQTransformerConfig dict inside config.json (model_type below) when one is there, or the authors' fixed value.
OFFICIAL_DEPTH_HEAD_HEADS_BY_WIDTH = {2560: 40}
RQTRANSFORMER_MODEL_TYPE = "rqtransformer_model"
# The authors' image start / end tokens (llava.constants); their code finds them by id (see `official_boi_eoi_ids`).
OFFICIAL_IMAGE_START_END_TOKENS = ("<im_start>", "<im_end>")

# One entry per MLLM head.
LLAVA_HEADS: dict[str, LlavaHead] = {
    "understanding": LlavaHead(
        key_rules=[
            (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
            (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
        ],
        config_fields={"has_understanding_head": True, "has_generation_head": False, "wrap_image_tokens": False},
        check_config=_check_understanding_config,
    ),
    "generation": LlavaHead(
        key_rules=[  # here the projector reads the sum of the pixel-code embeddings
            (r"^model\.mm_projector\.0\.", "generation_projector.linear_1."),
            (r"^model\.mm_projector\.2\.", "generation_projector.linear_2."),
        ],
        config_fields={"has_understanding_head": False, "has_generation_head": True, "wrap_image_tokens": True},
        check_config=_check_generation_config,
        depth_head_prefix=OFFICIAL_DEPTH_HEAD_PREFIX,
        # The authors' sampling (top-k 900, top-p 0.96, temperature 1, hard-coded in their depth head) with the
        # paper's guidance scale 7.5; their code defaults to 3.0 (`generate_image_content(cfg=3.0)`).
        image_generation={
            "guidance_scale": 7.5,
            "do_sample": True,
            "depth_temperature": 1.0,
            "depth_top_k": 900,
            "depth_top_p": 0.96,
        },
    ),
}

_LLAVA_CONFIG_SKIP = {"architectures", "_name_or_path", "transformers_version", "model_type", "dtype", "torch_dtype",
                      "id2label", "label2id"}  # fmt: skip


def text_config_from_llava(llava_config: dict):
    """The Qwen2 config of a `llava_qwen` config.json: its Qwen2 fields, without the LLaVA ones (`mm_*`, ...)."""
    from transformers import Qwen2Config

    # `rope_scaling` is left out: the authors' LlavaQwenForCausalLM sets it to None whatever the file says.
    known = (set(Qwen2Config().to_dict()) | {"rope_theta"}) - _LLAVA_CONFIG_SKIP
    return Qwen2Config(**{k: v for k, v in llava_config.items() if k in known})


def read_llava_weights(llava_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a LLaVA folder: `model.safetensors`, sharded safetensors with an index, or (older trainers)
    `pytorch_model.bin` / its shards, the latter read weights-only."""
    from safetensors.torch import load_file

    folder = Path(llava_dir)
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / single_name).is_file():
            files = [single_name]
        else:
            continue
        weights: dict[str, torch.Tensor] = {}
        for name in files:
            if name.endswith(".safetensors"):
                weights.update(load_file(folder / name))
            else:
                weights.update(torch.load(folder / name, map_location="cpu", weights_only=True))
        return weights
    raise ValueError(f"{str(folder)!r} holds no model.safetensors, pytorch_model.bin or their sharded index.")


def _has_text_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def _compare_tokenizer_copy(
    copy: dict[str, torch.Tensor], tokenizer_state: Mapping[str, torch.Tensor], where: str
) -> None:
    """Warn when the tokenizer weights inside the LLaVA folder differ from the tokenizer given for the conversion."""
    converted, _, _ = map_official_tokenizer_state_dict(copy, keep_training_state=False)
    # EMA buffers are training state (filled in by the mapping here), not weights the MLLM was trained with
    compared = [k for k in converted if k in tokenizer_state and k not in _QUANTIZER_EMA_BUFFERS]
    differing = [
        k for k in compared
        if _shape(converted[k]) != _shape(tokenizer_state[k])
        or not torch.equal(tokenizer_state[k].to(converted[k].dtype), converted[k])
    ]  # fmt: skip
    if differing:
        logger.warning(
            "%d of %d tensors of the tokenizer copy in %s differ from the given tokenizer (e.g. %s): is it the "
            "tokenizer (its 'ema' weights) this MLLM was trained with?",
            len(differing), len(compared), where, differing[:3],
        )


# ----------------------------------------------------------------------------- MLLM: depth head and image tokens
def _rqtransformer_config(llava_config: dict) -> dict | None:
    """An RQTransformerConfig dict (as `RQTransformer.config.to_dict()` writes it) stored in the LLaVA config.json."""
    dicts = (value for value in llava_config.values() if isinstance(value, dict))
    return next((d for d in dicts if d.get("model_type") == RQTRANSFORMER_MODEL_TYPE), None)


def infer_depth_head_config(
    head_state_dict: Mapping[str, torch.Tensor], llava_config: dict, overrides: dict | None, problems: list[str]
) -> dict | None:
    """`EvoTokDepthHeadConfig` fields of an official depth head (keys relative to it: `in_mlp_1.weight`, ...), or None
    (with the reasons appended to `problems`) when they cannot be told.

    The width comes from `in_mlp_1` / `in_mlp_2` / `pos_emb_d`, the blocks from `head_transformer.blocks.{i}`, the MLP
    width from the first block; the attention heads from `overrides`, else an RQTransformerConfig in `llava_config`,
    else the authors' hard-coded count for their width (`OFFICIAL_DEPTH_HEAD_HEADS_BY_WIDTH`). A stored config is
    cross-checked with the weights. `overrides` (EvoTokDepthHeadConfig fields) win over everything; the sizes tied to
    the tokenizer and the LLM are not fields to set here (the VLM config derives them)."""
    overrides = dict(overrides or {})
    head = head_state_dict
    fields: dict = {}
    if "in_mlp_1.weight" in head or "in_mlp_2.weight" in head:
        fields["hidden_size"] = head.get("in_mlp_1.weight", head.get("in_mlp_2.weight")).shape[0]
    elif "pos_emb_d" in head:
        fields["hidden_size"] = head["pos_emb_d"].shape[-1]
    layers = _count(head, r"^head_transformer\.blocks\.(\d+)\.")
    if layers:
        fields["num_hidden_layers"] = layers
    if "head_transformer.blocks.0.mlp.0.weight" in head:
        fields["intermediate_size"] = head["head_transformer.blocks.0.mlp.0.weight"].shape[0]

    stored = _rqtransformer_config(llava_config)
    stored_heads = None
    if stored is not None:
        stack = stored.get("head") or {}
        stored_heads = (stack.get("block") or {}).get("n_head")
        for field, name, value in (("hidden_size", "embed_dim", stored.get("embed_dim")),
                                   ("num_hidden_layers", "n_layer", stack.get("n_layer"))):  # fmt: skip
            if value is not None and field in fields and value != fields[field]:
                problems.append(f"the stored RQTransformer config says {name}={value}, the weights {fields[field]}")
    if "num_attention_heads" not in overrides:
        hidden = fields.get("hidden_size")
        heads = stored_heads if stored_heads is not None else OFFICIAL_DEPTH_HEAD_HEADS_BY_WIDTH.get(hidden)
        if heads is None:
            problems.append(
                f"cannot tell the depth head's attention heads: the checkpoint stores no RQTransformer config and its "
                f"width {hidden} is not the authors' {sorted(OFFICIAL_DEPTH_HEAD_HEADS_BY_WIDTH)}; give the head "
                "count: --depth-head-config '{\"num_attention_heads\": N}' on the command line, "
                "depth_head_config={'num_attention_heads': N} in Python"
            )
        else:
            fields["num_attention_heads"] = heads
    fields.update(overrides)
    for name, what in (("hidden_size", "'in_mlp_1.weight' / 'in_mlp_2.weight' / 'pos_emb_d'"),
                       ("num_hidden_layers", "'head_transformer.blocks.{i}.*'")):  # fmt: skip
        if name not in fields:
            problems.append(f"cannot tell the depth head's {name}: the checkpoint has no {what}")
    if "num_attention_heads" not in fields or "hidden_size" not in fields:
        return None
    if fields["hidden_size"] % fields["num_attention_heads"]:
        problems.append(
            f"the depth head's width {fields['hidden_size']} is not divisible by {fields['num_attention_heads']} heads"
        )
        return None
    return fields


def official_boi_eoi_ids(llava_config: dict, vocab_rows: int) -> tuple[int, int]:
    """The ids of the authors' image start / end tokens. Their code finds them by position from the end of the
    embeddings (llava_qwen.py): the trainer appends `<im_start>`, `<im_end>` last (and, with `mm_use_vi_start_end`,
    the video start / end after them), so they are rows -2 / -1, or -4 / -3."""
    first = vocab_rows - (4 if llava_config.get("mm_use_vi_start_end") else 2)
    return first, first + 1


def rename_added_tokens(tokenizer, renames: Mapping[int, str]):
    """A copy of a fast tokenizer in which the added tokens at the ids of `renames` carry the new strings (same ids,
    same flags). Done on the saved files: the tokenizers library can add tokens but not rename them."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError("renaming tokens needs a fast tokenizer (one saved with a tokenizer.json)")
        state = json.loads(path.read_text(encoding="utf-8"))
        old_to_new = {}
        for entry in state.get("added_tokens", []):
            if entry["id"] in renames:
                old_to_new[entry["content"]] = renames[entry["id"]]
                entry["content"] = renames[entry["id"]]
        if len(old_to_new) != len(renames):
            raise ValueError(f"the ids {sorted(renames)} are not all added tokens of the text tokenizer")
        path.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")

        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            for key, entry in (config.get("added_tokens_decoder") or {}).items():
                if int(key) in renames:
                    entry["content"] = renames[int(key)]

            def renamed(token):
                if isinstance(token, dict) and token.get("content") in old_to_new:
                    return {**token, "content": old_to_new[token["content"]]}
                return old_to_new.get(token, token) if isinstance(token, str) else token

            for name in ("additional_special_tokens", "extra_special_tokens"):
                value = config.get(name)
                if isinstance(value, list):
                    config[name] = [renamed(t) for t in value]
                elif isinstance(value, dict):
                    config[name] = {k: renamed(t) for k, t in value.items()}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)


def _install_boi_eoi(text_tokenizer, ids: tuple[int, int], vocab_rows: int, tokens: tuple[str, str], problems: list):
    """The text tokenizer with `tokens` (ours, e.g. `<boi>` / `<eoi>`) at the official image start / end `ids`: the
    authors' `<im_start>` / `<im_end>` there are renamed; a tokenizer that stops right before `ids` (one saved
    before the trainer added them) gets them appended. Anything else is a tokenizer that does not match."""
    present = [text_tokenizer.convert_ids_to_tokens(i) if i < len(text_tokenizer) else None for i in ids]
    if present == list(tokens):
        return text_tokenizer
    vocab = text_tokenizer.get_vocab()
    elsewhere = [t for t, i in zip(tokens, ids) if t in vocab and vocab[t] != i]
    if elsewhere:
        problems.append(
            f"the text tokenizer already has {elsewhere} at other ids than the official image start / end {list(ids)}"
        )
        return text_tokenizer
    if present == list(OFFICIAL_IMAGE_START_END_TOKENS):
        logger.info("Renaming the authors' image tokens %s (ids %s) to %s.", present, list(ids), list(tokens))
        try:
            return rename_added_tokens(text_tokenizer, dict(zip(ids, tokens)))
        except ValueError as err:
            problems.append(f"cannot rename the text tokenizer's {present} to {list(tokens)}: {err}")
            return text_tokenizer
    if len(text_tokenizer) == ids[0] and ids[1] == vocab_rows - 1:
        text_tokenizer.add_tokens(list(tokens), special_tokens=True)
        return text_tokenizer
    problems.append(
        f"the text tokenizer ({len(text_tokenizer)} tokens) does not match the checkpoint's image start / end rows "
        f"{list(ids)} (of {vocab_rows}): it has {present} there, not the authors' "
        f"{list(OFFICIAL_IMAGE_START_END_TOKENS)}; give the tokenizer saved with the checkpoint"
    )
    return text_tokenizer


# The parts of our VLM that the key rules name; where they sit in its state dict is read off the model itself.
_VLM_PARTS = ("vision_tower", "multi_modal_projector", "generation_projector", "language_model", "depth_head")


def _place_parts(skeleton, converted: dict, sources: dict) -> tuple[dict, dict]:
    """Rename `part.rest` keys to the parts' full paths in `skeleton` (e.g. `model.language_model.rest` when the parts
    sit in a base model); `lm_head` stays at the top. Parts the skeleton lacks (a head it does not carry) stay as
    they are, so the state-dict check reports them."""
    names = {id(module): name for name, module in skeleton.named_modules()}
    prefixes = {f"{part}.": names[id(getattr(skeleton, part))] + "." for part in _VLM_PARTS if hasattr(skeleton, part)}

    def place(key: str) -> str:
        part, _, rest = key.partition(".")
        return prefixes.get(f"{part}.", f"{part}.") + rest

    return {place(k): v for k, v in converted.items()}, {place(k): v for k, v in sources.items()}


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append `rows` rows equal to the mean of the existing ones (new token rows; see `convert_llava_checkpoint`)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows, -1)])


def convert_llava_checkpoint(
    llava_dir: str | os.PathLike,
    tokenizer,
    output_dir: str | os.PathLike,
    head: str = "understanding",
    text_tokenizer=None,
    image_token: str = "<image>",
    boi_token: str = "<boi>",
    eoi_token: str = "<eoi>",
    depth_head_config: dict | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> EvoTokForConditionalGeneration:
    """Convert one of the authors' LLaVA-style MLLM folders to an `EvoTokForConditionalGeneration` folder.

    `tokenizer` is a converted EvoTok tokenizer (folder, Hub id or `EvoTokModel`), whose weights replace the copy in
    the LLaVA folder. `head` selects the key rules and config fields in `LLAVA_HEADS`. `text_tokenizer` (a folder or
    tokenizer; default: `llava_dir` when it holds tokenizer files) is saved with an `EvoTokProcessor`.

    The authors' code puts images at `IMAGE_TOKEN_INDEX = -200`, an id outside the vocabulary (their `<image>` token
    exists only while tokenizing). Ours needs a real token: `image_token` is added to the text tokenizer when absent
    (as the authors do while tokenizing), and when its id has no embedding row the embeddings and LM head grow by
    rows equal to the mean of the existing ones. The row's value never matters as input (image features replace
    it); the id goes into `generation_config.suppress_tokens`, so it is never generated. Without a text tokenizer the
    image token takes the first id past the embeddings.

    A head with a depth head (generation) also maps the authors' `RQTransformer` (its unused classifiers are dropped;
    `depth_head_config` overrides the inferred sizes, see `infer_depth_head_config`) and wraps images in image start /
    end tokens: their trained `<im_start>` / `<im_end>` rows (found by id, see `official_boi_eoi_ids`) become
    `boi_token` / `eoi_token` of the text tokenizer, both also suppressed in text generation, and
    `generation_config.image_generation` gets the head's sampling defaults.
    `dtype` defaults to the LLM weights' dtype; the tokenizer's codebooks stay fp32."""
    from transformers import AutoTokenizer, GenerationConfig

    if head not in LLAVA_HEADS:
        raise ValueError(f"Unknown MLLM head {head!r}; convertible: {sorted(LLAVA_HEADS)}.")
    spec = LLAVA_HEADS[head]
    if depth_head_config and spec.depth_head_prefix is None:
        raise ValueError(f"depth_head_config was given, but the {head} checkpoint has no depth head.")
    folder = Path(llava_dir)
    check_output_dir(output_dir, overwrite=overwrite, **OUTPUT_DIR_FLAGS)
    llava_config = json.loads((folder / "config.json").read_text())
    vision = tokenizer if isinstance(tokenizer, EvoTokModel) else EvoTokModel.from_pretrained(tokenizer)
    what = f"official {head} checkpoint {str(folder)!r}"

    problems: list[str] = []
    if llava_config.get("model_type") not in ("llava_qwen", "qwen2"):
        problems.append(
            f"model_type {llava_config.get('model_type')!r}: only Qwen2-based LLaVA ('llava_qwen') is supported"
        )
    spec.check_config(llava_config, vision.config, problems)
    text_config = text_config_from_llava(llava_config)

    weights = read_llava_weights(folder)
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    tokenizer_copy: dict[str, torch.Tensor] = {}
    depth_head_state: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key.startswith(_TOKENIZER_COPY_PREFIX):
            tokenizer_copy[key[len(_TOKENIZER_COPY_PREFIX):]] = tensor
        if spec.depth_head_prefix is not None and key.startswith(spec.depth_head_prefix):
            depth_head_state[key[len(spec.depth_head_prefix):]] = tensor
            continue
        new = rename_key(key, spec.key_rules + LLAVA_SHARED_KEY_RULES)
        if new is _UNMATCHED:
            problems.append(f"official key {key!r} has no counterpart in the {head} model")
        elif new is not None:
            converted[new] = tensor
            sources[new] = key
    del weights

    depth_head_fields = None
    if spec.depth_head_prefix is not None:
        depth_head_fields = _map_depth_head(
            depth_head_state, spec.depth_head_prefix, llava_config, depth_head_config, vision.config.pixel_depth,
            converted, sources, problems,
        )  # fmt: skip
        if depth_head_fields is None:  # without its sizes no model can be built to check the rest against
            raise CheckpointConversionError(what, problems)

    if text_tokenizer is None and _has_text_tokenizer(folder):
        text_tokenizer = folder
    if text_tokenizer is not None and not hasattr(text_tokenizer, "convert_tokens_to_ids"):
        text_tokenizer = AutoTokenizer.from_pretrained(text_tokenizer)
    embed_key = "language_model.embed_tokens.weight"
    rows = converted[embed_key].shape[0] if embed_key in converted else text_config.vocab_size
    wrapped = spec.config_fields.get("wrap_image_tokens", False)
    boi_eoi_ids = official_boi_eoi_ids(llava_config, rows) if wrapped else (None, None)
    if wrapped and text_tokenizer is not None:
        text_tokenizer = _install_boi_eoi(text_tokenizer, boi_eoi_ids, rows, (boi_token, eoi_token), problems)
    elif wrapped:
        logger.warning(
            "%s holds no text tokenizer: the image start / end tokens are ids %s; give the tokenizer you use the "
            "tokens %r / %r at those ids.", folder, list(boi_eoi_ids), boi_token, eoi_token,
        )
    if text_tokenizer is not None:
        if image_token not in text_tokenizer.get_vocab():
            text_tokenizer.add_tokens([image_token], special_tokens=True)
        image_token_id = text_tokenizer.convert_tokens_to_ids(image_token)
        vocab_rows = max(rows, len(text_tokenizer))
    else:
        image_token_id = rows
        vocab_rows = rows + 1
        logger.warning(
            "%s holds no text tokenizer: the image token gets id %d (a new embedding row); give the tokenizer you use "
            "the token %r at that id.", folder, image_token_id, image_token,
        )
    if embed_key in converted and vocab_rows > rows:
        logger.info(
            "Adding %d embedding row(s) for the image token %r (id %d).", vocab_rows - rows, image_token, image_token_id
        )
        for key in (embed_key, "lm_head.weight"):
            if key in converted:
                converted[key] = _grow_rows(converted[key], vocab_rows - rows)
    text_config.vocab_size = vocab_rows
    # A tokenizer read from a folder records its float32 in its configs, which would keep the VLM's encoder (and so the
    # dtype the VLM is saved with) at float32 whatever `dtype` says; the weights' dtype is `dtype`'s to decide.
    vision_config = vision.config.to_dict()
    for sub_config in (vision_config, vision_config.get("encoder_config") or {}):
        sub_config.pop("dtype", None)

    try:
        config = EvoTokVLMConfig(
            vision_config=vision_config,
            text_config=text_config.to_dict(),
            image_token_id=image_token_id,
            boi_token_id=boi_eoi_ids[0],
            eoi_token_id=boi_eoi_ids[1],
            depth_head_config=depth_head_fields,
            **spec.config_fields,
        )
    except ValueError as err:  # e.g. image token ids that clash: nothing left to check the weights against
        raise CheckpointConversionError(what, [*problems, str(err)]) from err
    if config.tie_word_embeddings and "lm_head.weight" in converted:
        lm_head = converted.pop("lm_head.weight")
        if embed_key in converted and not torch.equal(lm_head, converted[embed_key]):
            problems.append("tie_word_embeddings=True but 'lm_head.weight' differs from 'model.embed_tokens.weight'")
    if dtype is None and embed_key in converted:
        dtype = converted[embed_key].dtype
    tokenizer_state = vision.state_dict()
    for key, tensor in tokenizer_state.items():
        converted[f"vision_tower.{key}"] = tensor
    with torch.device("meta"):
        skeleton = EvoTokForConditionalGeneration(config)
    expected = {k: _shape(v) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    converted, sources = _place_parts(skeleton, converted, sources)
    check_state_dict(converted, expected, sources, problems)
    if problems:
        raise CheckpointConversionError(what, problems)
    if tokenizer_copy:
        _compare_tokenizer_copy(tokenizer_copy, tokenizer_state, str(folder))

    model, info = EvoTokForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=converted, dtype=dtype, output_loading_info=True
    )
    _raise_on_loading_info(what, info)
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    special_ids = {i for i in (image_token_id, *boi_eoi_ids) if i is not None}
    model.generation_config.suppress_tokens = sorted(set(model.generation_config.suppress_tokens or []) | special_ids)
    if text_tokenizer is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = text_tokenizer.pad_token_id
    if spec.image_generation is not None:
        model.generation_config.image_generation = dict(spec.image_generation)
        # A config marked as built from the model config (a new model's, or an authors' file saved from one) keeps the
        # mark in the saved file, and readers of a marked file drop every key GenerationConfig does not declare.
        model.generation_config._from_model_config = False

    processor = None
    if text_tokenizer is not None:
        from ..processing.processing_evotok import DEFAULT_CHAT_TEMPLATE, EvoTokProcessor

        size = vision.config.image_size
        # The authors' chat format: ChatML with "You are a helpful assistant." and `<image>\n` before the text.
        processor = EvoTokProcessor(
            image_processor=EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash"),
            tokenizer=text_tokenizer,
            chat_template=DEFAULT_CHAT_TEMPLATE,
            image_token=image_token,
            num_image_tokens=config.num_image_tokens,
            boi_token=boi_token if wrapped else None,
            eoi_token=eoi_token if wrapped else None,
            wrap_image_tokens=wrapped,
        )
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
    logger.info("Saved the converted %s model to %s.", head, output_dir)
    return model


def _map_depth_head(
    head_state: dict[str, torch.Tensor],
    prefix: str,
    llava_config: dict,
    overrides: dict | None,
    pixel_depth: int,
    converted: dict,
    sources: dict,
    problems: list[str],
) -> dict | None:
    """Add the official depth head's tensors to `converted` under `depth_head.*` and return its config fields (None
    when they cannot be told). The classifiers of depths >= `pixel_depth` (the authors build one per semantic depth
    and train the first `pixel_depth`) are dropped and reported in the log."""
    if not head_state:
        problems.append(f"the checkpoint holds no depth head ('{prefix}*')")
        return None
    dropped = []
    for name, tensor in head_state.items():
        try:
            new = official_depth_head_key(name, pixel_depth)
        except ValueError:
            problems.append(f"official key {prefix + name!r} has no counterpart in the depth head")
            continue
        if new is None:
            dropped.append(name)
        else:
            converted[f"depth_head.{new}"] = tensor
            sources[f"depth_head.{new}"] = prefix + name
    if dropped:
        depths = sorted({int(n.split(".")[1]) for n in dropped})
        logger.info(
            "Dropped the official depth head's classifiers for depths %s (%d tensors): built by the authors' code but "
            "never trained or used (only depths 0..%d are predicted).", depths, len(dropped), pixel_depth - 1,
        )
    return infer_depth_head_config(head_state, llava_config, overrides, problems)


def convert_understanding_checkpoint(
    llava_dir: str | os.PathLike,
    tokenizer,
    output_dir: str | os.PathLike,
    text_tokenizer=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> EvoTokForConditionalGeneration:
    """Convert the authors' understanding MLLM (LLaVA folder: Qwen2 + `mm_projector` over the 1024-d semantic
    features, no image start/end tokens) and a converted tokenizer to one `EvoTokForConditionalGeneration` folder.
    See `convert_llava_checkpoint`."""
    return convert_llava_checkpoint(
        llava_dir, tokenizer, output_dir, head="understanding", text_tokenizer=text_tokenizer, dtype=dtype,
        overwrite=overwrite,
    )  # fmt: skip


def convert_generation_checkpoint(
    llava_dir: str | os.PathLike,
    tokenizer,
    output_dir: str | os.PathLike,
    text_tokenizer=None,
    depth_head_config: dict | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> EvoTokForConditionalGeneration:
    """Convert the authors' generation MLLM (LLaVA folder trained with `MM_MODE=generation`: Qwen2 + `mm_projector`
    over the 32-d pixel-code sums + the depth head `model.vision_tower.rqtransformer.*`, images between `<im_start>` /
    `<im_end>`) and a converted tokenizer to one generation-only `EvoTokForConditionalGeneration` folder, whose text
    tokenizer holds `<boi>` / `<eoi>` at the authors' ids. `depth_head_config` gives what the weights cannot tell
    (the attention heads, for a width other than the authors' 2560). See `convert_llava_checkpoint`."""
    return convert_llava_checkpoint(
        llava_dir, tokenizer, output_dir, head="generation", text_tokenizer=text_tokenizer,
        depth_head_config=depth_head_config, dtype=dtype, overwrite=overwrite,
    )  # fmt: skip


__all__ = [
    "CheckpointConversionError",
    "LLAVA_HEADS",
    "LLAVA_SHARED_KEY_RULES",
    "LlavaHead",
    "OFFICIAL_DEPTH_HEAD_PREFIX",
    "TOKENIZER_KEY_RULES",
    "atomic_output_dir",
    "check_state_dict",
    "convert_generation_checkpoint",
    "convert_llava_checkpoint",
    "convert_tokenizer_checkpoint",
    "convert_understanding_checkpoint",
    "infer_depth_head_config",
    "infer_tokenizer_config",
    "load_official_checkpoint",
    "map_official_tokenizer_state_dict",
    "official_boi_eoi_ids",
    "read_llava_weights",
    "rename_added_tokens",
    "rename_key",
    "select_official_state_dict",
    "text_config_from_llava",
]
