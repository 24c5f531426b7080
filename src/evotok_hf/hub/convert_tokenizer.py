"""Conversion of the authors' EvoTok tokenizer checkpoints (VisionXLab/EvoTok research code) to `EvoTokModel` folders.

The training checkpoint `.pt` (`torch.save` of {model, ema, optimizer, discriminator, optimizer_disc, steps, args})
becomes an `EvoTokModel` folder (config + safetensors + image-processor config): the keys are mapped by
`official_keys_evotok.map_official_tokenizer_state_dict`, the config is read off the tensor shapes and the official
`args` (`infer_tokenizer_config`). Checkpoints are only ever read with `torch.load(weights_only=True)` (plus
`argparse.Namespace` for `args`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping

import torch

from ..modeling.configuration_evotok import EvoTokConfig
from ..modeling.modeling_evotok import EvoTokModel
from ..processing.image_processing_evotok import EvoTokImageProcessor
from .official_keys_evotok import map_official_tokenizer_state_dict
from .state_dict_conversion import (
    CheckpointConversionError,
    atomic_output_dir,
    check_conversion_output_dir,
    check_state_dict,
    count_indices,
    expected_shapes,
    load_converted,
)

logger = logging.getLogger(__name__)

# Encoder attention heads leave no trace in the weight shapes. The authors' encoders are SigLIP / SigLIP2 towers,
# whose head count follows from the width (B 768 / 12, L 1024 / 16, So400m 1152 / 16, g 1536 / 16).
SIGLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16, 1536: 16}
# The authors' semantic decoder always has 12 heads of head_dim = width // 12 (1020 = 12 x 85 at width 1024).
OFFICIAL_SEMANTIC_HEADS = 12
# `args.teacher` values of the official training script that our model supports. "siglip_384" (SigLIP2-So400m/14)
# needs a 14x upsampling the pixel decoder cannot do: the authors resize its 432 px output to 384 bicubically.
SUPPORTED_TEACHERS = ("siglip_256",)


# ----------------------------------------------------------------------------- loading
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


# ----------------------------------------------------------------------------- config
def infer_tokenizer_config(
    state_dict: Mapping[str, torch.Tensor],
    args: argparse.Namespace | None = None,
    base_config: str | EvoTokConfig = "evotok-siglip2-l16-256",
    **overrides,
) -> EvoTokConfig:
    """The `EvoTokConfig` of an official tokenizer state dict (official key names).

    Sizes come from the tensor shapes (encoder width / layers / MLP / patch / image size, codebook size / dim /
    number of codebooks, pixel-decoder channels and levels, semantic-decoder width / blocks / MLP, teacher width) and
    are cross-checked with the official `args` when given. The number of codebooks is the deeper of the two depths
    (`num_depths`). What shapes cannot tell comes from `args` when present (`vqgan_depth` -> pixel_depth,
    `vqkd_depth` -> semantic_depth, `vq_warmup` -> ema_warmup_steps, `restart_unused_codes`), else from
    `base_config` (a preset name or config; without `args` the semantic depth is the number of codebooks and the
    pixel depth the base config's, at most that): the encoder's attention heads come from the SigLIP width table
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
        return tuple(state_dict[key].shape)

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
        "num_hidden_layers": count_indices(keys, rf"^{re.escape(enc)}encoder\.layers\.(\d+)\."),
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
    num_codebooks = count_indices(keys, r"^quantize\.codebooks\.(\d+)\.weight$")
    levels = count_indices(keys, r"^decoder\.conv_blocks\.(\d+)\.")
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
        "semantic_depth": num_codebooks,
        "pixel_depth": min(base.pixel_depth, num_codebooks),
        "ema_warmup_steps": base.ema_warmup_steps if "quantize.codebooks.0.step" in state_dict else 0,
        "decoder_z_channels": shape("post_quant_conv.weight")[0],
        "decoder_base_channels": base_channels,
        "decoder_channel_multipliers": multipliers,
        "decoder_res_blocks_per_level": count_indices(keys, r"^decoder\.conv_blocks\.0\.res\.(\d+)\."),
        "decoder_attention_at_lowest_resolution": "decoder.conv_blocks.0.attn.0.norm.weight" in state_dict,
        "semantic_decoder_layers": count_indices(keys, r"^decoder_vqkd\.blocks\.(\d+)\."),
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
        _apply_official_args(args, fields, encoder, num_codebooks, problems)
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


def _apply_official_args(
    args: argparse.Namespace, fields: dict, encoder: dict, num_codebooks: int, problems: list[str]
) -> None:
    """Fill what shapes cannot tell from the official training arguments, and cross-check the rest. The authors'
    `vqgan_depth` is our pixel depth and `vqkd_depth` our semantic depth; the deeper one is the number of codebooks."""
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
    if getattr(args, "vqgan_depth", None) is not None:
        fields["pixel_depth"] = args.vqgan_depth
    if getattr(args, "vqkd_depth", None) is not None:
        fields["semantic_depth"] = args.vqkd_depth
    depths = [fields["pixel_depth"], fields["semantic_depth"]]
    if max(depths) != num_codebooks:
        problems.append(
            f"args.vqgan_depth / vqkd_depth give (pixel, semantic) depths {depths} but the checkpoint has "
            f"{num_codebooks} codebooks (the deeper of the two)"
        )
    if getattr(args, "vq_warmup", None) is not None:
        fields["ema_warmup_steps"] = args.vq_warmup
    if getattr(args, "restart_unused_codes", None) is not None:
        fields["restart_unused_codes"] = bool(args.restart_unused_codes)


# ----------------------------------------------------------------------------- conversion
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
    check_conversion_output_dir(output_dir, overwrite)
    checkpoint = load_official_checkpoint(checkpoint_path)
    source, state_dict = select_official_state_dict(checkpoint)
    logger.info("Converting the %r weights of %s.", source, checkpoint_path)
    config = infer_tokenizer_config(state_dict, checkpoint.get("args"), base_config, **(config_overrides or {}))
    converted, sources, problems = map_official_tokenizer_state_dict(state_dict, keep_training_state)
    check_state_dict(converted, expected_shapes(EvoTokModel, config), sources, problems)
    what = f"official tokenizer checkpoint {str(checkpoint_path)!r} ({source!r} weights)"
    if problems:
        raise CheckpointConversionError(what, problems)
    model = load_converted(EvoTokModel, config, converted, what)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        _tokenizer_image_processor(config).save_pretrained(tmp)
    logger.info("Saved the converted tokenizer to %s.", output_dir)
    return model


__all__ = [
    "convert_tokenizer_checkpoint",
    "infer_tokenizer_config",
    "load_official_checkpoint",
    "select_official_state_dict",
]
