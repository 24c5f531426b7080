"""EvoTok multimodal LLM, understanding side (LLaVA recipe over EvoTok's semantic features).

    pixel_values --EvoTokModel.encode--> codes (batch, grid, grid, num_depths)
    codes[..., :semantic_depth] --EvoTokModel.get_semantic_features--> (batch, grid*grid, teacher_dim)  summed, decoded
    --EvoTokMultiModalProjector--> (batch, grid*grid, text hidden)                 Linear -> GELU -> Linear
    --masked_scatter at image_token_id positions--> LLM input embeddings --> LLM --> lm_head

The image tokenizer is frozen and always runs in eval mode (in training mode its quantizer would EMA-update the
codebooks). `EvoTokVLMModel` (tokenizer + projectors + LLM) returns hidden states; `EvoTokForConditionalGeneration` adds
the LM head, as transformers' LLaVA does, and the residual-depth head for image generation:

    prompt ... <boi> --LLM--> h_0 --depth head--> codes of position 0 (pixel_depth of them, depth by depth)
    sum of their embeddings --generation projector--> next LLM input --LLM--> h_1 --> ...   (grid*grid positions)
    codes --EvoTokModel.decode--> image

The generation loop is in generation.py; assembling a VLM from a pretrained tokenizer and LLM (`from_components`), in
assembly.py.

References: EvoTok (arXiv 2603.12108); LLaVA (Liu et al., 2023) for the projector and placeholder merging.
"""

# No `from __future__ import annotations`: transformers' tooling (its common tests, auto_docstring) reads the
# forward's `**kwargs: Unpack[TransformersKwargs]` annotation at run time to see which outputs it accepts.
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .assembly import assemble_from_components, leave_new_parts_out_of_load_report
from .configuration_evotok_vlm import EvoTokVLMConfig
from .depth_head import EvoTokDepthTransformer
from .generation import generate_image_codes, merge_depth_decoder_config, split_depth_decoder_config
from .modeling_evotok import EvoTokModel, initialize_native_submodels


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
    text_loss / image_loss (`torch.FloatTensor`, *optional*): the two terms of `loss` when generation targets are
        given: next-token cross-entropy on text, and the depth head's cross-entropy over the target images' codes
        (mean over positions x pixel depths); `loss = text_loss + image_loss`, as the authors'.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None


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
    """Linear -> activation -> Linear (the LLaVA-1.5 MLP projector), from image features to the LLM width: semantic
    features (`teacher_dim`) for understanding, code-embedding sums (`codebook_dim`) for generation."""

    def __init__(self, in_features: int, config: EvoTokVLMConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_features, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class EvoTokImagePositionEmbedding(nn.Module):
    """A learned 2-D position embedding of the image tokens (`EvoTokVLMConfig.image_position_embeddings`): a row table
    plus a column table over the tokenizer's code grid, added to each image token's LLM input. Zero at
    initialisation, so a model gains it without its outputs changing."""

    def __init__(self, config: EvoTokVLMConfig):
        super().__init__()
        self.grid_size = config.vision_config.grid_size
        hidden = config.text_config.hidden_size
        self.row = nn.Parameter(torch.zeros(self.grid_size, hidden))
        self.column = nn.Parameter(torch.zeros(self.grid_size, hidden))

    def forward(self, positions: torch.LongTensor) -> torch.Tensor:
        """Flat grid positions (row-major, any shape) -> embeddings `(*positions.shape, hidden_size)`."""
        return self.row[positions // self.grid_size] + self.column[positions % self.grid_size]


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
    # `attn_implementation=` and `set_attn_implementation` reach every part: a string sets all of them, a dict keyed by
    # sub-config sets each part, e.g. `{"text_config": "flash_attention_2"}` for the LLM alone. Flash and flex are not
    # declared for the whole model, as the tokenizer and the depth head do not declare them.
    _supports_sdpa = True
    # As LLaVA: the attention kwargs of `forward` reach the LLM's attention, whose masks come from the mask interface,
    # `logits_to_keep` takes tensors and the LLM's tensor-parallel plan is merged in.
    _supports_attention_backend = True
    # A decoding step compiles with `fullgraph=True`, with a dynamic or a static cache.
    _can_compile_fullgraph = True
    # The tokenizer's codebooks stay fp32 under bf16 / fp16 loading through `EvoTokModel._keep_in_fp32_modules_strict`,
    # which `post_init` merges into this model's list.

    def initialize_weights(self):
        initialize_native_submodels(self)
        super().initialize_weights()

    def _init_weights(self, module):
        if isinstance(module, EvoTokImagePositionEmbedding):
            init.zeros_(module.row)
            init.zeros_(module.column)
        else:
            super()._init_weights(module)


class EvoTokVLMModel(EvoTokVLMPreTrainedModel):
    """The frozen EvoTok tokenizer, the projector and the language model (no LM head): merges the image features into
    the prompt and returns the language model's hidden states (the backbone trainers such as TRL's fused LM head
    call)."""

    def __init__(self, config: EvoTokVLMConfig):
        super().__init__(config)
        self.vision_tower = EvoTokModel(config.vision_config)
        if config.has_understanding_head:
            self.multi_modal_projector = EvoTokMultiModalProjector(config.vision_config.teacher_dim, config)
        if config.has_generation_head:
            self.generation_projector = EvoTokMultiModalProjector(config.vision_config.codebook_dim, config)
        if config.image_position_embeddings:
            self.image_position_embedding = EvoTokImagePositionEmbedding(config)
        # in the dtype of the rest of the model, not in a `text_config.dtype` left by an earlier save
        self.language_model = AutoModel.from_config(config.text_config, dtype=torch.get_default_dtype())
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
        (exactly one of the two; the first `semantic_depth` depths, the semantic latent's, of `encode(...).codes`) ->
        projected features `(num_images, grid*grid, hidden_size)`, one row per image placeholder token."""
        if (pixel_values is None) == (image_codes is None):
            raise ValueError("get_image_features: pass exactly one of `pixel_values` and `image_codes`.")
        if not self.config.has_understanding_head:
            raise ValueError(
                "This checkpoint has no understanding head (has_understanding_head=False): images cannot be read."
            )
        depth = self.config.vision_config.semantic_depth
        with torch.no_grad():
            if image_codes is None:
                image_codes = self.vision_tower.encode(pixel_values).codes[..., :depth]
            elif image_codes.ndim != 4 or image_codes.shape[-1] != depth:
                raise ValueError(
                    f"image_codes must have shape (num_images, grid, grid, {depth}) (the semantic_depth={depth} depths "
                    f"the semantic latent sums: `encode(...).codes[..., :{depth}]`), got {tuple(image_codes.shape)}."
                )
            semantic_features = self.vision_tower.get_semantic_features(image_codes)
        features = self.multi_modal_projector(semantic_features.to(self.multi_modal_projector.linear_1.weight.dtype))
        return self._add_image_positions(features, None)

    def _add_image_positions(self, embeddings: torch.Tensor, positions: torch.LongTensor | int | None) -> torch.Tensor:
        """With `image_position_embeddings`, add the 2-D position embedding of each row's grid position (`positions`,
        broadcast against `embeddings.shape[:-1]`; None means the rows are whole images, `(..., grid*grid, hidden)`)."""
        if not self.config.image_position_embeddings:
            return embeddings
        if positions is None:
            num_tokens = self.config.num_image_tokens
            if embeddings.ndim < 3 or embeddings.shape[-2] != num_tokens:
                raise ValueError(
                    f"image position embeddings: rows of shape {tuple(embeddings.shape[:-1])} are not whole images of "
                    f"{num_tokens} positions; pass each row's grid position."
                )
            positions = torch.arange(num_tokens, device=embeddings.device)
        positions = torch.as_tensor(positions, device=embeddings.device)
        return embeddings + self.image_position_embedding(positions).to(embeddings.dtype)

    def get_generation_embeddings(
        self,
        generation_codes: torch.LongTensor,
        positions: torch.LongTensor | int | None = None,
        check_codes: bool = True,
    ) -> torch.Tensor:
        """Pixel codes `(..., pixel_depth)` -> LLM input embeddings `(..., hidden_size)`: the generation projector
        applied to the sum of the codes' embeddings (the input that follows a generated image position). With
        `image_position_embeddings`, `positions` are the codes' grid positions (broadcast against
        `generation_codes.shape[:-1]`); leave it None for whole images, `(..., grid*grid, pixel_depth)`.
        `check_codes=False` skips the range check of the codes, which reads them on the host (a decoding step
        passes codes it chose itself)."""
        if not self.config.has_generation_head:
            raise ValueError("This checkpoint has no generation head (has_generation_head=False).")
        depth = self.config.vision_config.pixel_depth
        if generation_codes.shape[-1] != depth:
            raise ValueError(
                f"generation codes must end with the {depth} pixel depths, got shape {tuple(generation_codes.shape)}."
            )
        quantizer = self.vision_tower.quantizer
        with torch.no_grad():
            sums = (quantizer.embed_codes if check_codes else quantizer.lookup_codes)(generation_codes)
        embeddings = self.generation_projector(sums.to(self.generation_projector.linear_1.weight.dtype))
        return self._add_image_positions(embeddings, positions)

    def split_image_positions(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(understanding_mask, generation_mask)` over the image-token positions: a run of image tokens that directly
        follows the image start token is an image to generate (or, in training, a teacher-forced target); the other
        runs are images to read. Only meaningful when understanding images are not wrapped (`wrap_image_tokens`)."""
        is_image = input_ids == self.config.image_token_id
        previous = torch.nn.functional.pad(input_ids[:, :-1], (1, 0), value=-1)
        run_start = is_image & (previous != self.config.image_token_id)
        starts_generation = run_start & (previous == self.config.boi_token_id)
        # each image position looks up the start of its own run (the latest run start at or before it)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        own_start = torch.where(run_start, positions, torch.zeros_like(positions)).cummax(-1).values
        is_generation = is_image & starts_generation.gather(1, own_start)
        return is_image & ~is_generation, is_generation

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

    @staticmethod
    def _merge(inputs_embeds: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, what: str) -> torch.Tensor:
        num_tokens, num_rows = int(mask.sum()), rows.shape[0] * rows.shape[1]
        if num_tokens != num_rows:
            raise ValueError(
                f"The prompt holds {num_tokens} image tokens for the {what} but the {rows.shape[0]} image(s) give "
                f"{num_rows} rows ({rows.shape[1]} per image); use EvoTokProcessor to expand each image placeholder."
            )
        return inputs_embeds.masked_scatter(
            mask.unsqueeze(-1).to(inputs_embeds.device), rows.to(inputs_embeds.device, inputs_embeds.dtype)
        )

    @can_return_tuple
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
        generation_codes: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> EvoTokVLMModelOutputWithPast:
        """See [`EvoTokForConditionalGeneration.forward`]; returns the language model's hidden states."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if pixel_values is not None and image_codes is not None:
            raise ValueError("Pass at most one of `pixel_values` and `image_codes`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        reading = pixel_values is not None or image_codes is not None
        placeholder_mask = understanding_mask = generation_mask = None
        if reading or generation_codes is not None:
            placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            understanding_mask = generation_mask = placeholder_mask
        if reading and generation_codes is not None:
            if input_ids is None or self.config.wrap_image_tokens:
                raise ValueError(
                    "Images to read and images to generate in one call need `input_ids` and unwrapped understanding "
                    "images (wrap_image_tokens=False) to tell their positions apart; pass them in separate batches."
                )
            understanding_mask, generation_mask = self.split_image_positions(input_ids)

        image_features = None
        if reading:
            image_features = self.get_image_features(pixel_values=pixel_values, image_codes=image_codes)
            inputs_embeds = self._merge(inputs_embeds, understanding_mask, image_features, "image(s) to read")
        if generation_codes is not None:
            if generation_codes.ndim != 4:
                raise ValueError(
                    "generation_codes must have shape (num_images, grid, grid, pixel_depth), got "
                    f"{tuple(generation_codes.shape)}."
                )
            embeddings = self.get_generation_embeddings(generation_codes.flatten(1, 2))
            inputs_embeds = self._merge(inputs_embeds, generation_mask, embeddings, "image(s) to generate")

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            # a dict whatever the caller asked for: a tuple is made once, at the outermost call
            return_dict=True,
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
    """EvoTok tokenizer + projectors + causal LM (`model`, an [`EvoTokVLMModel`]) + LM head, and with
    `has_generation_head` the residual-depth head (`depth_head`): image-conditioned text generation (understanding)
    and text-to-image generation (`generate(..., generation_mode="image")`)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # The LLM's own plan (merged in by `post_init`) shards `embed_tokens` on the vocabulary; the tied head reads that
    # same weight, so it needs the entry transformers' causal LMs give their head.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: EvoTokVLMConfig):
        super().__init__(config)
        self.model = EvoTokVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.has_generation_head:
            self.depth_head = EvoTokDepthTransformer(config.depth_head_config)
            # How each depth is sampled (CSM's depth-decoder config): see `generate`.
            self.depth_head.generation_config = GenerationConfig()
        # Given `num_items_in_batch`, the Trainer takes the loss to be this micro-batch's sum over the count of the
        # whole step (all accumulation steps and processes), so it neither averages over gradient accumulation nor
        # divides by the number of processes. The image loss is a mean over this micro-batch's codes, whose count over
        # the step nobody passes: it would weigh gradient_accumulation_steps x num_processes times too much. A model
        # that writes images therefore declines the count, and the Trainer averages both losses over micro-batches.
        self.accepts_loss_kwargs = not config.has_generation_head
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
    def generation_projector(self) -> EvoTokMultiModalProjector:
        return self.model.generation_projector

    @property
    def image_position_embedding(self) -> EvoTokImagePositionEmbedding:
        return self.model.image_position_embedding

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

    # Assembly from a pretrained tokenizer and LLM, its own concern (loading, tokenizer surgery, checking the fit):
    # see assembly.py.
    from_components = classmethod(assemble_from_components)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """transformers' hook that takes the keys a model expects to miss out of the load report; in an assembly
        (`from_components`), the new parts' keys too."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        leave_new_parts_out_of_load_report(loading_info)

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
    @can_return_tuple
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
        generation_codes: torch.LongTensor | None = None,
        generation_pixel_values: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> EvoTokCausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, size, size)`, *optional*): images in [-1, 1]
            (from [`EvoTokImageProcessor`]), in the order of their placeholders in the batch (row-major).
        image_codes (`torch.LongTensor` of shape `(num_images, grid, grid, semantic_depth)`, *optional*): precomputed
            tokenizer codes (the first `semantic_depth` depths), instead of `pixel_values`.
        labels (`torch.LongTensor` of shape `(batch, sequence_length)`, *optional*): next-token targets aligned with
            `input_ids` (shifted inside); -100 positions are ignored.
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `logits_to_keep` positions (0: all)
            or for the given indices.
        generation_codes (`torch.LongTensor` of shape `(num_images, grid, grid, pixel_depth)`, *optional*): pixel codes
            of the images written after image start tokens (teacher forcing): their positions take the generation
            projector's embeddings, and with `labels` the depth head's cross-entropy over these codes is added to the
            loss (the hidden state before each image position predicts that position's codes).
        generation_pixel_values (`torch.FloatTensor` of shape `(num_images, 3, size, size)`, *optional*): the same
            images as pixels in [-1, 1], tokenised on the fly by the frozen tokenizer (instead of `generation_codes`).
        """
        if generation_pixel_values is not None:
            if generation_codes is not None:
                raise ValueError("Pass at most one of `generation_codes` and `generation_pixel_values`.")
            with torch.no_grad():
                codes = self.vision_tower.encode(generation_pixel_values).codes
            generation_codes = codes[..., : self.config.vision_config.pixel_depth]
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_codes=image_codes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            generation_codes=generation_codes,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = text_loss = image_loss = None
        if labels is not None:
            loss = text_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            if generation_codes is not None:
                image_loss = self.image_generation_loss(input_ids, pixel_values, image_codes, hidden_states,
                                                        generation_codes)  # fmt: skip
                loss = text_loss + self.config.image_loss_weight * image_loss

        return EvoTokCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            text_loss=text_loss if image_loss is not None else None,
            image_loss=image_loss,
        )

    def image_generation_loss(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        image_codes: torch.LongTensor | None,
        hidden_states: torch.Tensor,
        generation_codes: torch.LongTensor,
    ) -> torch.Tensor:
        """Depth-head cross-entropy of the target images' codes, teacher-forced over positions and depths: the LLM
        hidden state before each generated position starts its depth sequence, followed by the cumulative sums of the
        true codes' embeddings."""
        if input_ids is None:
            raise ValueError("The image-generation loss needs `input_ids` to find the image positions.")
        if pixel_values is not None or image_codes is not None:
            generation_mask = self.model.split_image_positions(input_ids)[1]
        else:
            generation_mask = input_ids == self.config.image_token_id
        batch_index, position = generation_mask.nonzero(as_tuple=True)
        if (position == 0).any():
            raise ValueError("An image to generate cannot start a sequence: it must follow the image start token.")
        conditions = hidden_states[batch_index, position - 1]
        targets = generation_codes.flatten(0, 2)  # (num_images * grid * grid, pixel_depth), row-major = prompt order
        head = self.depth_head
        sums = None  # a single pixel depth has no code sums to feed
        if targets.shape[-1] > 1:
            with torch.no_grad():
                sums = self.vision_tower.quantizer.embed_codes(targets[:, :-1], return_cumulative=True).to(head.dtype)
        logits = head(hidden_states=conditions.to(head.dtype), code_embedding_sums=sums, return_dict=True).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    # -- image generation ----------------------------------------------------------------------------------------
    def decode_image_tokens(self, codes: torch.LongTensor) -> torch.Tensor:
        """Generated codes `(batch, grid, grid, pixel_depth)` -> images `(batch, 3, size, size)` in [-1, 1] (through the
        tokenizer's pixel decoder; `EvoTokProcessor.postprocess` makes PIL images)."""
        return self.vision_tower.decode(codes)

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             trust_remote_code=None, **kwargs):  # fmt: skip
        """transformers' loading of generation_config.json, then, as CSM's `from_pretrained`, the depth head's settings
        (saved as `depth_decoder_*`, or in the `image_generation` dict of earlier releases) moved to
        `depth_head.generation_config`.

        A new model's generation config is built from its model config and marked `_from_model_config`, and
        save_pretrained writes the mark into generation_config.json. Loading a file with the mark keeps only the
        fields GenerationConfig declares, so `depth_decoder_*` (and any other key added to the file) would be
        dropped: such a file is read again without the mark."""
        super().adjust_generation_fn(generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                                     trust_remote_code=trust_remote_code, **kwargs)  # fmt: skip
        if generation_config is None and pretrained_model_name_or_path is not None:
            if self.generation_config._from_model_config:
                try:
                    self.generation_config = GenerationConfig.from_pretrained(
                        pretrained_model_name_or_path, _from_auto=from_auto_class, _from_pipeline=from_pipeline,
                        _from_model_config=False, **kwargs,
                    )  # fmt: skip
                except OSError:  # no generation_config.json: the config built from config.json holds no saved settings
                    pass
        try:
            self.generation_config, depth_generation_config = split_depth_decoder_config(self.generation_config)
        except ValueError:  # a malformed `image_generation` dict stays as saved: image generation names the problem
            return
        if self.config.has_generation_head:
            self.depth_head.generation_config = depth_generation_config

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, with the depth head's generation settings written into
        generation_config.json as `depth_decoder_*` (CSM's layout), where `from_pretrained` finds them again."""
        own = self.generation_config
        depth_generation_config = self.depth_head.generation_config if self.config.has_generation_head else None
        self.generation_config = merge_depth_decoder_config(own, depth_generation_config)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.generation_config = own

    def generate(self, *args, generation_mode: str = "text", **kwargs):
        """`generation_mode="text"` (default): transformers' `generate` (understanding; any GenerationConfig setting).
        `generation_mode="image"`: text-to-image, as in transformers' Janus, returning codes `(batch *
        num_return_sequences, grid, grid, pixel_depth)`. Its settings come from `generation_config` (guidance scale,
        images per prompt, caches, outputs) and, for how each depth is sampled, from `depth_head.generation_config`,
        which `depth_decoder_*` arguments override (as CSM's depth decoder); `logits_processor=`, `streamer=`,
        `generator=` and `return_dict_in_generate=True` work too. See
        [`~evotok_hf.modeling.generation.generate_image_codes`]."""
        if generation_mode == "image":
            return generate_image_codes(self, *args, **kwargs)
        if generation_mode != "text":
            raise ValueError(f"generation_mode must be 'text' or 'image', got {generation_mode!r}.")
        # The guidance scale a generation config holds is the image mode's (as in Janus): text decoding runs without
        # classifier-free guidance unless the call asks for it.
        configs = (kwargs.get("generation_config"), self.generation_config)
        if "guidance_scale" not in kwargs and any(getattr(c, "guidance_scale", None) is not None for c in configs):
            kwargs["guidance_scale"] = None
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """Images are merged into the prompt once: `pixel_values` / `image_codes` go to the model only while the
        cache is empty (the prefill step), or on every step when generating without a cache. The named parameters
        are the parent's: `generate` reads this signature to know what it may pass (e.g. `inputs_embeds`)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        cache_is_empty = past_key_values is None or past_key_values.get_seq_length() == 0
        if not (is_first_iteration or cache_is_empty):
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_codes", None)
        return model_inputs


__all__ = [
    "EvoTokImagePositionEmbedding",
    "EvoTokCausalLMOutputWithPast",
    "EvoTokVLMModel",
    "EvoTokVLMModelOutputWithPast",
    "EvoTokMultiModalProjector",
    "EvoTokVLMPreTrainedModel",
    "EvoTokForConditionalGeneration",
]
