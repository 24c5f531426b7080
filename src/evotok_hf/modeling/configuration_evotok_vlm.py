"""Configuration of the EvoTok multimodal LLM (understanding and image generation).

Understanding follows the LLaVA recipe: the EvoTok tokenizer turns an image into residual codes, the sum of the first
`semantic_depth` code embeddings goes through the semantic decoder to teacher-space features, a two-layer GELU MLP
projects them to the LLM width, and those rows replace the image placeholder tokens in the LLM input. The official
understanding checkpoint uses Qwen2.5-7B-Instruct and does not wrap images in start/end tokens.

Generation: at each image position the LLM hidden state feeds the residual-depth head (`depth_head_config`), which
predicts the `pixel_depth` codes; the projected sum of their embeddings (a second two-layer GELU MLP, from the
tokenizer's `codebook_dim`) is the next LLM input. Generated images sit between the image start / end tokens.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec

from .configuration_evotok import EvoTokConfig, RemoteCodeConfig
from .configuration_evotok_depth_head import EvoTokDepthHeadConfig


class EvoTokVLMConfig(RemoteCodeConfig):
    r"""Configuration of [`EvoTokForConditionalGeneration`].

    Args:
        vision_config (`dict` or `EvoTokConfig`): the image tokenizer (defaults to the paper's tokenizer).
        text_config (`dict` or `PreTrainedConfig`): the language model (any decoder-only config; Qwen2 by default).
        image_token_id (`int`, *optional*): id of the placeholder token whose embeddings are replaced by image
            features; one placeholder per code-grid position (`num_image_tokens` per image).
        boi_token_id / eoi_token_id (`int`, *optional*): ids of the image start / end tokens.
        wrap_image_tokens (`bool`, defaults to `False`): whether prompts surround each image's placeholders with the
            start / end tokens (the official understanding model does not; its generation model does).
        projector_hidden_act (`str`, defaults to `"gelu"`): activation between the projector's two linear layers.
        has_understanding_head (`bool`, defaults to `True`): the checkpoint carries the semantic-feature projector.
        has_generation_head (`bool`, defaults to `False`): the checkpoint carries the image-generation depth head and
            the generation projector (code-embedding sums -> LLM width).
        depth_head_config (`dict` or `EvoTokDepthHeadConfig`, *optional*): the residual-depth head (defaults to the
            authors' 6 blocks of width 2560). Its `code_dim`, `codebook_size`, `pixel_depth` and `llm_hidden_size`
            are not free: they are set from `vision_config` and `text_config`.
        image_position_embeddings (`bool`, defaults to `False`): add a learned 2-D position embedding (a row table plus
            a column table over the code grid) to every image token's LLM input, read or generated. The paper's model
            has none: its 7B LLM reads SigLIP2 features that carry their positions. A small LLM trained from scratch on
            features that do not (the miniature's: linear probes find an object token's row and column in 22% / 21%
            of cases, against 18% / 17% by chance; scripts/probe_miniature_features.py) cannot tell where an image
            token sits, since rotary positions shape attention scores but not the values read.
        image_loss_weight (`float`, defaults to 1.0): the weight of the depth head's image loss in the training loss,
            `text_loss + image_loss_weight * image_loss` (the authors' generation model trains on the image loss alone;
            1.0 is their plain sum when a batch also holds text). A checkpoint trained on both tasks at once weighs
            how much of its capacity goes to each.
        tie_word_embeddings (`bool`, *optional*): tie the LM head to the input embeddings; by default the text
            config's value.
    """

    model_type = "evotok_vlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=EvoTokConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "depth_head_config": SubConfigSpec(config_class=EvoTokDepthHeadConfig),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    wrap_image_tokens: bool = False
    projector_hidden_act: str = "gelu"
    has_understanding_head: bool = True
    has_generation_head: bool = False
    depth_head_config: dict | PreTrainedConfig | None = None
    image_position_embeddings: bool = False
    image_loss_weight: float = 1.0
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        # One place for each fact: the head's input / output sizes follow the tokenizer and the LLM.
        head, vision = self.depth_head_config, self.vision_config
        head.code_dim, head.codebook_size = vision.codebook_dim, vision.codebook_size
        head.pixel_depth, head.llm_hidden_size = vision.pixel_depth, self.text_config.hidden_size
        self._validate_evotok_vlm()

    def _validate_evotok_vlm(self) -> None:
        vocab_size = self.text_config.vocab_size
        for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
                raise ValueError(
                    f"EvoTokVLMConfig: `{name}` must be an int in [0, text_config.vocab_size={vocab_size}), "
                    f"got {value!r}."
                )
        set_ids = [i for i in (self.image_token_id, self.boi_token_id, self.eoi_token_id) if i is not None]
        if len(set(set_ids)) != len(set_ids):
            raise ValueError(
                "EvoTokVLMConfig: `image_token_id`, `boi_token_id` and `eoi_token_id` must be distinct, got "
                f"{self.image_token_id}, {self.boi_token_id}, {self.eoi_token_id}."
            )
        if self.wrap_image_tokens and (self.boi_token_id is None or self.eoi_token_id is None):
            raise ValueError("EvoTokVLMConfig: `wrap_image_tokens=True` needs both `boi_token_id` and `eoi_token_id`.")
        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(
                f"EvoTokVLMConfig: `projector_hidden_act` {self.projector_hidden_act!r} is not a known activation."
            )
        weight = self.image_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"EvoTokVLMConfig: `image_loss_weight` must be a finite number > 0, got {weight!r}.")
        if not (self.has_understanding_head or self.has_generation_head):
            raise ValueError(
                "EvoTokVLMConfig: at least one of `has_understanding_head` and `has_generation_head` must be True."
            )
        if self.has_generation_head and None in (self.image_token_id, self.boi_token_id, self.eoi_token_id):
            raise ValueError(
                "EvoTokVLMConfig: `has_generation_head=True` needs `image_token_id`, `boi_token_id` and `eoi_token_id` "
                "(generated images are written between the image start and end tokens)."
            )

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image: one per position of the tokenizer's code grid."""
        return self.vision_config.grid_size**2


__all__ = ["EvoTokVLMConfig"]
