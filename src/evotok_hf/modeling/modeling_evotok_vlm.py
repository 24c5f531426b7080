"""EvoTok multimodal LLM, understanding side (LLaVA recipe over EvoTok's semantic features).

    pixel_values --EvoTokModel.encode--> codes (batch, grid, grid, semantic_depth)
    codes --EvoTokModel.get_semantic_features--> (batch, grid*grid, teacher_dim)   all depths summed, then decoded
    --EvoTokMultiModalProjector--> (batch, grid*grid, text hidden)                 Linear -> GELU -> Linear
    --masked_scatter at image_token_id positions--> LLM input embeddings --> LLM --> lm_head

The image tokenizer is frozen and always runs in eval mode (in training mode its quantizer would EMA-update the
codebooks). `EvoTokVLMModel` (tokenizer + projector + LLM) returns hidden states; `EvoTokForConditionalGeneration` adds
the LM head, as transformers' LLaVA does. Image generation (the residual-depth head) is not part of this module yet.

References: EvoTok (arXiv 2603.12108); LLaVA (Liu et al., 2023) for the projector and placeholder merging.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .configuration_evotok_vlm import EvoTokVLMConfig
from .modeling_evotok import EvoTokModel


@dataclass
class EvoTokCausalLMOutputWithPast(ModelOutput):
    """Output of [`EvoTokForConditionalGeneration.forward`].

    loss (`torch.FloatTensor`, *optional*): next-token cross-entropy (labels shifted inside, -100 ignored), when
        `labels` are given.
    logits (`torch.FloatTensor` of shape `(batch, sequence_length, vocab_size)`): LM head scores (only the last
        `logits_to_keep` positions when that is set).
    past_key_values (`Cache`, *optional*): the language model's key/value cache.
    hidden_states / attentions (`tuple(torch.FloatTensor)`, *optional*): from the language model, when asked for.
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, grid*grid, hidden_size)`, *optional*): the
        projected image features that were merged into the input embeddings.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class EvoTokVLMModelOutputWithPast(ModelOutput):
    """Output of [`EvoTokVLMModel.forward`].

    last_hidden_state (`torch.FloatTensor` of shape `(batch, sequence_length, hidden_size)`): the language model's
        last hidden states.
    past_key_values (`Cache`, *optional*): the language model's key/value cache.
    hidden_states / attentions (`tuple(torch.FloatTensor)`, *optional*): from the language model, when asked for.
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, grid*grid, hidden_size)`, *optional*): the
        projected image features that were merged into the input embeddings.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class EvoTokMultiModalProjector(nn.Module):
    """Semantic features (teacher_dim) -> LLM width: Linear -> activation -> Linear (the LLaVA-1.5 MLP projector)."""

    def __init__(self, config: EvoTokVLMConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.teacher_dim, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, semantic_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(semantic_features)))


class EvoTokVLMPreTrainedModel(PreTrainedModel):
    config_class = EvoTokVLMConfig
    config: EvoTokVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The sub-models' own lists (SigLIP / EvoTok blocks, the LLM's decoder layers) are merged in by `post_init`.
    _no_split_modules = ["EvoTokMultiModalProjector"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # Matched as a pattern against parameter names: the tokenizer's codebooks stay fp32 under bf16 / fp16 loading.
    _keep_in_fp32_modules = ["vision_tower.quantizer"]
    _keep_in_fp32_modules_strict = ["vision_tower.quantizer"]


class EvoTokVLMModel(EvoTokVLMPreTrainedModel):
    """The frozen EvoTok tokenizer, the projector and the language model (no LM head): merges the image features into
    the prompt and returns the language model's hidden states (the backbone trainers such as TRL's fused LM head
    call)."""

    def __init__(self, config: EvoTokVLMConfig):
        super().__init__(config)
        if config.has_generation_head or not config.has_understanding_head:
            raise NotImplementedError(
                "EvoTokForConditionalGeneration currently builds the understanding head only "
                "(has_understanding_head=True, has_generation_head=False)."
            )
        self.vision_tower = EvoTokModel(config.vision_config)
        self.multi_modal_projector = EvoTokMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self.freeze_vision_tower()

    def freeze_vision_tower(self) -> None:
        """The tokenizer is never trained here: no gradients, and eval mode so its quantizer leaves the codebooks'
        EMA statistics alone. Re-applied after `from_pretrained`, whose loading re-creates trainable parameters."""
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, image_codes: torch.LongTensor | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] `(num_images, 3, size, size)` or their codes `(num_images, grid, grid, semantic_depth)`
        (exactly one of the two) -> projected features `(num_images, grid*grid, hidden_size)`, one row per image
        placeholder token."""
        if (pixel_values is None) == (image_codes is None):
            raise ValueError("get_image_features: pass exactly one of `pixel_values` and `image_codes`.")
        depth = self.config.vision_config.semantic_depth
        with torch.no_grad():
            if image_codes is None:
                image_codes = self.vision_tower.encode(pixel_values).codes
            elif image_codes.ndim != 4 or image_codes.shape[-1] != depth:
                raise ValueError(
                    f"image_codes must have shape (num_images, grid, grid, {depth}) (all semantic depths), "
                    f"got {tuple(image_codes.shape)}."
                )
            semantic_features = self.vision_tower.get_semantic_features(image_codes)
        return self.multi_modal_projector(semantic_features.to(self.multi_modal_projector.linear_1.weight.dtype))

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Boolean `(batch, sequence_length)` mask of the image placeholder positions (read off `inputs_embeds` by
        comparing with the placeholder's embedding when no `input_ids` are given)."""
        image_token_id = self.config.image_token_id
        if image_token_id is None:
            raise ValueError("EvoTokVLMConfig.image_token_id is not set, so images cannot be placed in the prompt.")
        if input_ids is not None:
            return input_ids == image_token_id
        placeholder = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == placeholder).all(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_codes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> EvoTokVLMModelOutputWithPast:
        """See [`EvoTokForConditionalGeneration.forward`]; returns the language model's hidden states."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if pixel_values is not None and image_codes is not None:
            raise ValueError("Pass at most one of `pixel_values` and `image_codes`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None or image_codes is not None:
            image_features = self.get_image_features(pixel_values=pixel_values, image_codes=image_codes)
            placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            num_tokens, num_rows = int(placeholder_mask.sum()), image_features.shape[0] * image_features.shape[1]
            if num_tokens != num_rows:
                raise ValueError(
                    f"The prompt holds {num_tokens} image tokens but the {image_features.shape[0]} image(s) give "
                    f"{num_rows} feature rows ({image_features.shape[1]} per image); use EvoTokProcessor to expand "
                    "each image placeholder."
                )
            inputs_embeds = inputs_embeds.masked_scatter(
                placeholder_mask.unsqueeze(-1).to(inputs_embeds.device),
                image_features.to(inputs_embeds.device, inputs_embeds.dtype),
            )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return EvoTokVLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class EvoTokForConditionalGeneration(EvoTokVLMPreTrainedModel, GenerationMixin):
    """EvoTok tokenizer + projector + causal LM (`model`, an [`EvoTokVLMModel`]) + LM head: image-conditioned text
    generation (understanding)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: EvoTokVLMConfig):
        super().__init__(config)
        self.model = EvoTokVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self.freeze_vision_tower()

    # -- parts (the transformers VLM convention: reachable from the top-level model) ------------------------------
    @property
    def vision_tower(self) -> EvoTokModel:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> EvoTokMultiModalProjector:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def freeze_vision_tower(self) -> None:
        self.model.freeze_vision_tower()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_vision_tower()
        return loaded

    @classmethod
    def from_components(
        cls,
        tokenizer_path_or_model,
        llm_name_or_path,
        text_tokenizer=None,
        image_token: str = "<image>",
        boi_token: str = "<boi>",
        eoi_token: str = "<eoi>",
        wrap_image_tokens: bool = False,
        dtype: torch.dtype = torch.float32,
        **llm_kwargs,
    ):
        """Assemble a VLM from an EvoTok checkpoint (folder / Hub id / `EvoTokModel`) and a pretrained causal LM
        (folder / Hub id / model), with a fresh projector. The image special tokens are added to the text tokenizer
        when missing and the LLM's embeddings resized (new rows from the old rows' statistics); they are also put in
        `generation_config.suppress_tokens`, so in text decoding the new rows can never win over real text.

        Returns `(model, text_tokenizer)`: the tokenizer now holds the special tokens (build an `EvoTokProcessor`
        from it)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        vision = (
            tokenizer_path_or_model
            if isinstance(tokenizer_path_or_model, EvoTokModel)
            else EvoTokModel.from_pretrained(tokenizer_path_or_model)
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
        )
        model = cls(config).to(dtype)
        model.vision_tower.load_state_dict(vision.state_dict())
        model.language_model.load_state_dict(llm.base_model.state_dict())
        model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
        model.generation_config = copy.deepcopy(llm.generation_config)
        suppressed = set(model.generation_config.suppress_tokens or []) | set(ids)
        model.generation_config.suppress_tokens = sorted(suppressed)
        model.freeze_vision_tower()
        return model, text_tokenizer

    # -- embeddings ----------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    # -- images ------------------------------------------------------------------------------------------------
    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, image_codes: torch.LongTensor | None = None
    ) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values, image_codes=image_codes)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_codes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> EvoTokCausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, size, size)`, *optional*): images in [-1, 1]
            (from [`EvoTokImageProcessor`]), in the order of their placeholders in the batch (row-major).
        image_codes (`torch.LongTensor` of shape `(num_images, grid, grid, semantic_depth)`, *optional*): precomputed
            tokenizer codes, instead of `pixel_values`.
        labels (`torch.LongTensor` of shape `(batch, sequence_length)`, *optional*): next-token targets aligned with
            `input_ids` (shifted inside); -100 positions are ignored.
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `logits_to_keep` positions (0: all)
            or for the given indices.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_codes=image_codes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return EvoTokCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """Images are merged into the prompt once: `pixel_values` / `image_codes` go to the model only while the
        cache is empty (the prefill step), or on every step when generating without a cache."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, is_first_iteration=is_first_iteration, **kwargs
        )
        cache_is_empty = past_key_values is None or past_key_values.get_seq_length() == 0
        if not (is_first_iteration or cache_is_empty):
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_codes", None)
        return model_inputs


__all__ = [
    "EvoTokCausalLMOutputWithPast",
    "EvoTokVLMModel",
    "EvoTokVLMModelOutputWithPast",
    "EvoTokMultiModalProjector",
    "EvoTokVLMPreTrainedModel",
    "EvoTokForConditionalGeneration",
]
