"""Conversion of the authors' LLaVA-style MLLM folders (VisionXLab/EvoTok research code) to one
`EvoTokForConditionalGeneration` folder with its `EvoTokProcessor`.

Understanding MLLM: the authors' LLaVA folder (`LlavaQwenForCausalLM`: Qwen2 weights under `model.*` and `lm_head`,
the projector `model.mm_projector.{0,2}`, usually a copy of the tokenizer under `model.vision_tower.vision_tower.*`)
plus a converted tokenizer (see `convert_tokenizer`) becomes one `EvoTokForConditionalGeneration` folder.

Generation MLLM: the same layout (trained with `MM_MODE=generation`), where `model.mm_projector.{0,2}` reads the 32-d
sums of the pixel-code embeddings and the depth head (`RQTransformer`) sits under `model.vision_tower.rqtransformer.*`
(the authors' `VQTower.rqtransformer`); it becomes a generation-only `EvoTokForConditionalGeneration` whose image
start / end tokens are real `<boi>` / `<eoi>` tokens of the saved text tokenizer (see `added_tokens`).

The keys are mapped by `official_keys_evotok_vlm`; every problem is reported in one `CheckpointConversionError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..modeling.configuration_evotok import EvoTokConfig
from ..modeling.configuration_evotok_vlm import EvoTokVLMConfig
from ..modeling.generation import IMAGE_GENERATION_DEFAULTS, split_depth_decoder_config
from ..modeling.modeling_evotok import EvoTokModel
from ..modeling.modeling_evotok_vlm import EvoTokForConditionalGeneration
from ..processing.processing_evotok import DEFAULT_CHAT_TEMPLATE, EvoTokProcessor
from .added_tokens import install_boi_eoi, official_boi_eoi_ids
from .official_keys_evotok import QUANTIZER_EMA_BUFFERS, map_official_tokenizer_state_dict
from .official_keys_evotok_vlm import (
    GENERATION_KEY_RULES,
    OFFICIAL_DEPTH_HEAD_PREFIX,
    UNDERSTANDING_KEY_RULES,
    map_official_depth_head,
    map_official_llava_state_dict,
    place_parts,
)
from .state_dict_conversion import (
    CheckpointConversionError,
    KeyRules,
    atomic_output_dir,
    check_conversion_output_dir,
    check_state_dict,
    load_converted,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the heads
@dataclasses.dataclass(frozen=True)
class LlavaHead:
    """How one of the authors' MLLM checkpoints converts: key rules tried before the shared LLM rules, our config
    fields, a check of the LLaVA config.json that appends problems, where the depth head's weights sit (None: the
    checkpoint has none), and the image-generation settings its generation config saves (the names of
    generation_config.json: `guidance_scale`, `depth_decoder_*`)."""

    key_rules: KeyRules
    config_fields: dict
    check_config: Callable[[dict, EvoTokConfig, list], None]
    depth_head_prefix: str | None = None
    image_generation: dict | None = None


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


# One entry per MLLM head.
LLAVA_HEADS: dict[str, LlavaHead] = {
    "understanding": LlavaHead(
        key_rules=UNDERSTANDING_KEY_RULES,
        config_fields={"has_understanding_head": True, "has_generation_head": False, "wrap_image_tokens": False},
        check_config=_check_understanding_config,
    ),
    "generation": LlavaHead(
        key_rules=GENERATION_KEY_RULES,
        config_fields={"has_understanding_head": False, "has_generation_head": True, "wrap_image_tokens": True},
        check_config=_check_generation_config,
        depth_head_prefix=OFFICIAL_DEPTH_HEAD_PREFIX,
        # the authors' sampling with the paper's guidance scale (see IMAGE_GENERATION_DEFAULTS), saved so that the
        # folder states them
        image_generation=IMAGE_GENERATION_DEFAULTS,
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
    compared = [k for k in converted if k in tokenizer_state and k not in QUANTIZER_EMA_BUFFERS]
    differing = [
        k for k in compared
        if converted[k].shape != tokenizer_state[k].shape
        or not torch.equal(tokenizer_state[k].to(converted[k].dtype), converted[k])
    ]  # fmt: skip
    if differing:
        logger.warning(
            "%d of %d tensors of the tokenizer copy in %s differ from the given tokenizer (e.g. %s): is it the "
            "tokenizer (its 'ema' weights) this MLLM was trained with?",
            len(differing), len(compared), where, differing[:3],
        )


# ----------------------------------------------------------------------------- conversion
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
    `boi_token` / `eoi_token` of the text tokenizer, both also suppressed in text generation, and the generation
    configs get the head's image-generation settings (`guidance_scale`; the depth head's sampling, saved as
    `depth_decoder_*`).
    `dtype` defaults to the LLM weights' dtype; the tokenizer's codebooks stay fp32."""
    from transformers import AutoTokenizer, GenerationConfig

    if head not in LLAVA_HEADS:
        raise ValueError(f"Unknown MLLM head {head!r}; convertible: {sorted(LLAVA_HEADS)}.")
    spec = LLAVA_HEADS[head]
    if depth_head_config and spec.depth_head_prefix is None:
        raise ValueError(f"depth_head_config was given, but the {head} checkpoint has no depth head.")
    folder = Path(llava_dir)
    check_conversion_output_dir(output_dir, overwrite)
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

    converted, sources, tokenizer_copy, depth_head_state = map_official_llava_state_dict(
        read_llava_weights(folder), spec.key_rules, spec.depth_head_prefix, problems, model_name=f"{head} model"
    )

    depth_head_fields = None
    if spec.depth_head_prefix is not None:
        depth_head_fields = map_official_depth_head(
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
        text_tokenizer = install_boi_eoi(text_tokenizer, boi_eoi_ids, rows, (boi_token, eoi_token), problems)
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
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    converted, sources = place_parts(skeleton, converted, sources)
    check_state_dict(converted, expected, sources, problems)
    if problems:
        raise CheckpointConversionError(what, problems)
    if tokenizer_copy:
        _compare_tokenizer_copy(tokenizer_copy, tokenizer_state, str(folder))

    model = load_converted(EvoTokForConditionalGeneration, config, converted, what, dtype=dtype)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    special_ids = {i for i in (image_token_id, *boi_eoi_ids) if i is not None}
    model.generation_config.suppress_tokens = sorted(set(model.generation_config.suppress_tokens or []) | special_ids)
    if text_tokenizer is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = text_tokenizer.pad_token_id
    if spec.image_generation is not None:
        for name, value in spec.image_generation.items():
            setattr(model.generation_config, name, value)
        model.generation_config, model.depth_head.generation_config = split_depth_decoder_config(
            model.generation_config
        )
        # A config marked as built from the model config (a new model's, or an authors' file saved from one) keeps the
        # mark in the saved file, and readers of a marked file drop every key GenerationConfig does not declare.
        model.generation_config._from_model_config = False

    processor = None
    if text_tokenizer is not None:
        # The authors' chat format: ChatML with "You are a helpful assistant." and `<image>\n` before the text.
        processor = EvoTokProcessor.for_config(config, text_tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
    logger.info("Saved the converted %s model to %s.", head, output_dir)
    return model


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
    "LLAVA_HEADS",
    "LlavaHead",
    "convert_generation_checkpoint",
    "convert_llava_checkpoint",
    "convert_understanding_checkpoint",
    "read_llava_weights",
    "text_config_from_llava",
]
