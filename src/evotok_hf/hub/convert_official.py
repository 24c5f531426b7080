"""Conversion of the authors' EvoTok checkpoints (VisionXLab/EvoTok research code) to this package's folders: the
entry point that `scripts/convert_official.py` and user code import. The work is split by what it converts:

    convert_tokenizer         the tokenizer's training checkpoint `.pt` -> an `EvoTokModel` folder
    convert_llava             the understanding / generation MLLM (LLaVA folders) -> an `EvoTokForConditionalGeneration`
                              folder with its processor
    official_keys_evotok      the tokenizer's key map (official key -> `EvoTokModel` key)
    official_keys_evotok_vlm  the MLLM's key map (official key -> `EvoTokForConditionalGeneration` key); the depth
                              head's own renaming sits beside the model in `modeling/depth_head.py`
    added_tokens              the text tokenizer's image start / end tokens (tokenizer.json editing)
    state_dict_conversion     what they share: rule-based renaming, state-dict checks, one error listing every
                              problem, atomic output folders
"""

from .added_tokens import official_boi_eoi_ids, rename_added_tokens
from .convert_llava import (
    LLAVA_HEADS,
    LlavaHead,
    convert_generation_checkpoint,
    convert_llava_checkpoint,
    convert_understanding_checkpoint,
    read_llava_weights,
    text_config_from_llava,
)
from .convert_tokenizer import (
    convert_tokenizer_checkpoint,
    infer_tokenizer_config,
    load_official_checkpoint,
    select_official_state_dict,
)
from .official_keys_evotok import TOKENIZER_KEY_RULES, map_official_tokenizer_state_dict
from .official_keys_evotok_vlm import LLAVA_SHARED_KEY_RULES, OFFICIAL_DEPTH_HEAD_PREFIX, infer_depth_head_config
from .state_dict_conversion import CheckpointConversionError, atomic_output_dir, check_state_dict, rename_key

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
