"""Assembling an EvoTok VLM from pretrained components: `EvoTokForConditionalGeneration.from_components`.

An EvoTok tokenizer and a causal LM become one VLM with fresh projector(s) (and a fresh depth head): the image special
tokens go into the text tokenizer, the LLM's embeddings grow to match, a config is written from both parts, and the
VLM is built on the meta device and given the parts' tensors the way `from_pretrained` loads a checkpoint. It is a
concern of its own (loading, tokenizer surgery, checking the fit), so it sits beside the model rather than in it.

transformers reports every parameter a load leaves missing, which for an assembly is every parameter of the new parts,
every time: the new parts are left out of that report, and one line says what was initialised.
"""

import copy
from contextvars import ContextVar

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from .configuration_evotok_vlm import EvoTokVLMConfig
from .modeling_evotok import EvoTokModel

logger = logging.get_logger(__name__)

# The parts an assembly adds: missing from the components by design, and initialised by the load.
NEW_PARTS = (
    "model.multi_modal_projector",
    "model.generation_projector",
    "model.image_position_embedding",
    "depth_head",
)
# True while `from_components` loads the components' tensors (this call only, whatever other loads run meanwhile).
_assembling: ContextVar[bool] = ContextVar("evotok_vlm_assembling", default=False)


def leave_new_parts_out_of_load_report(loading_info) -> None:
    """In an assembly, drop the new parts' keys from the missing keys of transformers' load report (the VLM's
    `_adjust_missing_and_unexpected_keys` calls this). Any other missing or unexpected key stays in the report, and
    `from_components` raises on it."""
    if _assembling.get():
        prefixes = tuple(f"{part}." for part in NEW_PARTS)
        loading_info.missing_keys = {key for key in loading_info.missing_keys if not key.startswith(prefixes)}


def assemble_from_components(
    cls,
    tokenizer_path_or_model,
    llm_name_or_path,
    text_tokenizer=None,
    image_token: str = "<image>",
    boi_token: str = "<boi>",
    eoi_token: str = "<eoi>",
    wrap_image_tokens: bool = False,
    dtype: torch.dtype = torch.float32,
    has_understanding_head: bool = True,
    has_generation_head: bool = False,
    depth_head_config: dict | None = None,
    image_position_embeddings: bool = False,
    return_processor: bool = False,
    **llm_kwargs,
):
    """Assemble a VLM from an EvoTok checkpoint (folder / Hub id / `EvoTokModel`) and a pretrained causal LM
    (folder / Hub id / model), with fresh projector(s) (and a fresh depth head with `has_generation_head`; size it
    with `depth_head_config`; and fresh image position embeddings with `image_position_embeddings`). The image
    special tokens are added to the text tokenizer when missing and the LLM's embeddings resized (new rows from the old rows' statistics); they are also put in
    `generation_config.suppress_tokens`, so in text decoding the new rows can never win over real text.

    The components are loaded in `dtype` (the codebooks fp32) and the VLM is assembled the way `from_pretrained`
    loads a checkpoint: built on the meta device, then given the components' tensors (cast to `dtype` only where
    they are in another one; the codebooks stay fp32 and bit-identical), and only the new parts are initialised.
    No randomly initialised copy of the LLM is ever made, so the peak memory is about that of the components
    (figures in benchmarks/README.md). Components passed as models lend their tensors: the VLM shares those
    already in `dtype`. The new parts are logged in one line (at INFO level); a key of the components that does not
    fit the VLM raises ValueError.

    Returns `(model, text_tokenizer)`, the model in eval mode as from `from_pretrained`; the tokenizer now holds
    the special tokens. With `return_processor=True`, `(model, processor)`: the processor `AutoProcessor` maps the
    VLM's config to, from its `for_config` (for `EvoTokProcessor`: the LLM's chat template adapted to images)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vision = (
        tokenizer_path_or_model
        if isinstance(tokenizer_path_or_model, EvoTokModel)
        else EvoTokModel.from_pretrained(tokenizer_path_or_model, dtype=dtype)
    )
    if isinstance(llm_name_or_path, PreTrainedModel):
        llm = llm_name_or_path
    else:
        llm = AutoModelForCausalLM.from_pretrained(llm_name_or_path, dtype=dtype, **llm_kwargs)
    if text_tokenizer is None:
        if not isinstance(llm_name_or_path, str):
            raise ValueError("from_components: pass `text_tokenizer` when the LLM is given as a model")
        text_tokenizer = AutoTokenizer.from_pretrained(llm_name_or_path)
    special = [image_token, boi_token, eoi_token]
    missing = [t for t in special if t not in text_tokenizer.get_vocab()]
    if missing:
        text_tokenizer.add_tokens(missing, special_tokens=True)
    if len(text_tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(text_tokenizer), mean_resizing=True)
    ids = [text_tokenizer.convert_tokens_to_ids(t) for t in special]
    config = EvoTokVLMConfig(
        vision_config=vision.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=ids[0],
        boi_token_id=ids[1],
        eoi_token_id=ids[2],
        wrap_image_tokens=wrap_image_tokens,
        has_understanding_head=has_understanding_head,
        has_generation_head=has_generation_head,
        depth_head_config=depth_head_config,
        image_position_embeddings=image_position_embeddings,
    )
    state = {f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()}
    state.update({f"model.language_model.{k}": v for k, v in llm.base_model.state_dict().items()})
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = llm.get_output_embeddings().weight
    assembling = _assembling.set(True)
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    finally:
        _assembling.reset(assembling)
    # Anything missing but the new parts, or left over, means the components do not fit (a mismatched shape already
    # raises inside).
    problems = [f"{key} was not in the components" for key in info["missing_keys"]]
    problems += [f"{key} does not fit the VLM" for key in info["unexpected_keys"]]
    if problems:
        raise ValueError("from_components: the components do not assemble into the VLM: " + "; ".join(problems))
    modules = dict(model.named_modules())
    new_parts = {part: sum(p.numel() for p in modules[part].parameters()) for part in NEW_PARTS if part in modules}
    logger.info(
        "from_components: initialised %s new parameters (%s); every other one comes from the components.",
        f"{sum(new_parts.values()):,}", ", ".join(f"{part} {count:,}" for part, count in new_parts.items()),
    )
    model.generation_config = copy.deepcopy(llm.generation_config)
    suppressed = set(model.generation_config.suppress_tokens or []) | set(ids)
    model.generation_config.suppress_tokens = sorted(suppressed)
    if not return_processor:
        return model, text_tokenizer
    # found through the Auto registry: `modeling/` never imports `processing/` (its remote-code export stands alone)
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    if type(model.config) not in PROCESSOR_MAPPING:
        raise ValueError("from_components: no processor is registered for EvoTokVLMConfig (import evotok_hf).")
    return model, PROCESSOR_MAPPING[type(model.config)].for_config(model.config, text_tokenizer)


__all__ = ["NEW_PARTS", "assemble_from_components", "leave_new_parts_out_of_load_report"]
