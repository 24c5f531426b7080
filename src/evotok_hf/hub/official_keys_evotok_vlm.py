"""The authors' LLaVA-style MLLM checkpoint keys -> `EvoTokForConditionalGeneration` keys (timm's
`checkpoint_filter_fn` habit: the mapping is a visible, testable function of the model's own names).

The authors' folder (`LlavaQwenForCausalLM`) holds the Qwen2 weights under `model.*` and `lm_head`, the projector
`model.mm_projector.{0,2}`, usually a copy of the tokenizer under `model.vision_tower.vision_tower.*` and, in a
generation model, the depth head (`RQTransformer`) under `model.vision_tower.rqtransformer.*`. Our names are those of
`modeling/modeling_evotok_vlm.py`; the depth head's own renaming sits beside it, in
`modeling/depth_head.official_depth_head_key`. `place_parts` moves the renamed keys to where the parts sit in a
concrete model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..modeling.depth_head import official_depth_head_key
from .state_dict_conversion import UNMATCHED, KeyRules, count_indices, rename_key

logger = logging.getLogger(__name__)

# Shared by every LLaVA checkpoint: the Qwen2 model and LM head; the tokenizer copy the authors' trainer saves along
# is dropped (the converted tokenizer is the source of truth; the converter compares it with the copy).
TOKENIZER_COPY_PREFIX = "model.vision_tower.vision_tower."
LLAVA_SHARED_KEY_RULES: KeyRules = [
    (r"^model\.vision_tower\.vision_tower\.", None),
    (r"^model\.(embed_tokens|layers|norm)\.", r"language_model.\1."),
    (r"^lm_head\.", "lm_head."),
]
# The projector of the understanding model reads the semantic features.
UNDERSTANDING_KEY_RULES: KeyRules = [
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
]
# The projector of the generation model reads the sum of the pixel-code embeddings.
GENERATION_KEY_RULES: KeyRules = [
    (r"^model\.mm_projector\.0\.", "generation_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "generation_projector.linear_2."),
]

# The authors' `VQTower` builds its depth head as `self.rqtransformer`, so the trainer saves it under this prefix.
OFFICIAL_DEPTH_HEAD_PREFIX = "model.vision_tower.rqtransformer."
# The authors never save the depth head's config: `VQTower.load_model` hard-codes RQTransformerConfig(embed_dim=2560,
# head={"block": {"n_head": 40}, "n_layer": 6}) and the LLaVA config.json only records `mm_with_depth_transformer`.
# Width and depth follow from the weights; the head count does not, so it comes from (in this order) the caller, an
# RQTransformerConfig dict inside config.json (model_type below) when one is there, or the authors' fixed value.
OFFICIAL_DEPTH_HEAD_HEADS_BY_WIDTH = {2560: 40}
RQTRANSFORMER_MODEL_TYPE = "rqtransformer_model"


def map_official_llava_state_dict(
    weights: Mapping[str, torch.Tensor],
    key_rules: KeyRules,
    depth_head_prefix: str | None,
    problems: list[str],
    model_name: str = "model",
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rename a LLaVA folder's tensors by `key_rules` (the head's, tried first) and `LLAVA_SHARED_KEY_RULES`.

    Returns `(converted, sources, tokenizer_copy, depth_head_state)`: our keys (part-relative, e.g.
    `language_model.layers.0...`; see `place_parts`) with the official key each came from, the tokenizer copy the
    authors' trainer saved (keys relative to it) and, with a `depth_head_prefix`, the depth head's tensors (keys
    relative to it, for `map_official_depth_head`). Keys no rule matches are appended to `problems`, naming
    `model_name`."""
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    tokenizer_copy: dict[str, torch.Tensor] = {}
    depth_head_state: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key.startswith(TOKENIZER_COPY_PREFIX):
            tokenizer_copy[key[len(TOKENIZER_COPY_PREFIX):]] = tensor
        if depth_head_prefix is not None and key.startswith(depth_head_prefix):
            depth_head_state[key[len(depth_head_prefix):]] = tensor
            continue
        new = rename_key(key, key_rules + LLAVA_SHARED_KEY_RULES)
        if new is UNMATCHED:
            problems.append(f"official key {key!r} has no counterpart in the {model_name}")
        elif new is not None:
            converted[new] = tensor
            sources[new] = key
    return converted, sources, tokenizer_copy, depth_head_state


# ----------------------------------------------------------------------------- the depth head
def map_official_depth_head(
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
    when they cannot be told). The classifiers of depths >= `pixel_depth` (the authors build one per quantizer depth
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
    layers = count_indices(head, r"^head_transformer\.blocks\.(\d+)\.")
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


# ----------------------------------------------------------------------------- placing the parts
# The parts of our VLM that the key rules name; where they sit in its state dict is read off the model itself.
VLM_PARTS = ("vision_tower", "multi_modal_projector", "generation_projector", "language_model", "depth_head")


def place_parts(skeleton, converted: dict, sources: dict) -> tuple[dict, dict]:
    """Rename `part.rest` keys to the parts' full paths in `skeleton` (e.g. `model.language_model.rest` when the parts
    sit in a base model); `lm_head` stays at the top. Parts the skeleton lacks (a head it does not carry) stay as
    they are, so the state-dict check reports them."""
    names = {id(module): name for name, module in skeleton.named_modules()}
    prefixes = {f"{part}.": names[id(getattr(skeleton, part))] + "." for part in VLM_PARTS if hasattr(skeleton, part)}

    def place(key: str) -> str:
        part, _, rest = key.partition(".")
        return prefixes.get(f"{part}.", f"{part}.") + rest

    return {place(k): v for k, v in converted.items()}, {place(k): v for k, v in sources.items()}


__all__ = [
    "GENERATION_KEY_RULES",
    "LLAVA_SHARED_KEY_RULES",
    "OFFICIAL_DEPTH_HEAD_PREFIX",
    "TOKENIZER_COPY_PREFIX",
    "UNDERSTANDING_KEY_RULES",
    "infer_depth_head_config",
    "map_official_depth_head",
    "map_official_llava_state_dict",
    "place_parts",
]
