"""EvoTok's residual-depth head: predicts the `pixel_depth` codes of one image position from the LLM hidden state.

At an image position with LLM hidden state h and chosen code embeddings e_0, e_1, ... (one per residual depth), the
head runs a short causal transformer over the depth sequence

    x_0 = hidden_proj(h)                     + depth_embeddings[0]
    x_d = code_proj(e_0 + ... + e_{d-1})     + depth_embeddings[d]        d = 1 .. pixel_depth - 1

and classifier d reads output d to score the code of depth d. Training feeds the ground-truth cumulative sums at
once (teacher forcing); generation feeds one sampled depth at a time and keeps the keys / values in a cache, which
gives the same logits as the authors' loop that recomputes the whole depth sequence at every depth.

Module structure follows the authors' `RQTransformer` (VILA-U / UniTok lineage) one to one, so their checkpoints
convert with the renaming table `official_depth_head_key` below:

    hidden_proj         Linear(llm_hidden_size, E)             (their `in_mlp_2`)
    code_proj           Linear(code_dim, E)                    (their `in_mlp_1`)
    depth_embeddings    (1, pixel_depth, E)                    (their `pos_emb_d`)
    layers.{i}          pre-norm GPT blocks, no final norm     (their `head_transformer.blocks.{i}`)
    classifiers.{d}     LayerNorm(E) -> Linear(E, codebook_size), one per predicted depth (their `classifiers.{d}`;
                        they build 16 and train 4; only the used ones exist here)

The head is independent of the tokenizer: callers pass cumulative sums of code embeddings (e.g. from
`EvoTokResidualQuantizer.embed_codes`).

References: EvoTok (arXiv 2603.12108); RQ-Transformer (Lee et al., CVPR 2022); VILA-U (Wu et al., 2024).
"""

# No `from __future__ import annotations`: transformers' tooling (its common tests, auto_docstring) reads the
# forward's `**kwargs: Unpack[TransformersKwargs]` annotation at run time to see which outputs it accepts.
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.output_capturing import capture_outputs

from .configuration_evotok_depth_head import EvoTokDepthHeadConfig
from .modeling_evotok import eager_attention_forward

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------- official checkpoint key mapping
# Inside each official block (`head_transformer.blocks.{i}.<name>`) -> inside ours (`layers.{i}.<name>`).
OFFICIAL_BLOCK_KEY_RENAMES = {
    "ln1": "input_layernorm",
    "attn.query": "attn.q_proj",
    "attn.key": "attn.k_proj",
    "attn.value": "attn.v_proj",
    "attn.proj": "attn.o_proj",
    "ln2": "post_attention_layernorm",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
# Top-level official modules -> ours (classifier `{d}.0` is the LayerNorm, `{d}.1` the Linear).
OFFICIAL_KEY_RENAMES = {
    "in_mlp_1": "code_proj",
    "in_mlp_2": "hidden_proj",
    "pos_emb_d": "depth_embeddings",
    "head_transformer.blocks": "layers",
    "classifiers.{d}.0": "classifiers.{d}.norm",
    "classifiers.{d}.1": "classifiers.{d}.proj",
}

_PARAM = r"\.(weight|bias)"
_OFFICIAL_BLOCK = re.compile(
    r"head_transformer\.blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in OFFICIAL_BLOCK_KEY_RENAMES) + ")" + _PARAM
)
_OFFICIAL_INPUT = re.compile(r"(in_mlp_1|in_mlp_2)" + _PARAM)
_OFFICIAL_CLASSIFIER = re.compile(r"classifiers\.(\d+)\.([01])" + _PARAM)


def official_depth_head_key(name: str, pixel_depth: int = 4) -> str | None:
    """Name of an official `RQTransformer` state-dict entry (relative to the head, i.e. with any
    `...rqtransformer.` prefix stripped) -> the name of the same tensor in [`EvoTokDepthTransformer`], or None for
    the authors' classifiers of depths >= `pixel_depth`, which are never trained or used. Shapes are unchanged
    (`pos_emb_d` is (1, pixel_depth, E) on both sides). Raises ValueError for a name that is not part of the head."""
    if name == "pos_emb_d":
        return "depth_embeddings"
    if match := _OFFICIAL_INPUT.fullmatch(name):
        return f"{OFFICIAL_KEY_RENAMES[match[1]]}.{match[2]}"
    if match := _OFFICIAL_BLOCK.fullmatch(name):
        return f"layers.{match[1]}.{OFFICIAL_BLOCK_KEY_RENAMES[match[2]]}.{match[3]}"
    if match := _OFFICIAL_CLASSIFIER.fullmatch(name):
        depth = int(match[1])
        if depth >= pixel_depth:
            return None
        return f"classifiers.{depth}.{'norm' if match[2] == '0' else 'proj'}.{match[3]}"
    raise ValueError(f"{name!r} is not a parameter of the official depth head (RQTransformer).")


# ----------------------------------------------------------------------------- input checks
def _check_float_tensor(name: str, value, leading: tuple[str, ...], width_name: str, width: int) -> None:
    """Raise ValueError unless `value` is a floating-point tensor of shape `(*leading, width)`."""
    dims = ", ".join(leading)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor of shape ({dims}, {width_name}).")
    if value.ndim != len(leading) + 1 or value.shape[-1] != width:
        raise ValueError(f"{name} must have shape ({dims}, {width}), got {tuple(value.shape)}.")


# ----------------------------------------------------------------------------- outputs
@dataclass
class EvoTokDepthHeadOutput(ModelOutput):
    """Output of [`EvoTokDepthTransformer.forward`].

    logits (`torch.FloatTensor` of shape `(batch, steps, codebook_size)`): scores of the codes of the depths this call
        computed (depth_offset .. depth_offset + steps - 1), each from that depth's classifier.
    past_key_values (`Cache`, *optional*): the keys / values of every depth seen so far, when a cache is in use; pass
        it back with the next cumulative code sum to get the next depth.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the depth sequence
        `(batch, steps, hidden_size)` entering the first block and leaving each block (num_hidden_layers + 1).
    attentions (`tuple(torch.FloatTensor)`, *optional*): with `output_attentions=True` (eager attention), each block's
        attention weights `(batch, num_attention_heads, steps, cached + steps)`.
    """

    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------- blocks
class EvoTokDepthAttention(nn.Module):
    """Causal self-attention over the depth axis with biased q/k/v/o projections and an optional KV cache; the kernel
    is the one `config._attn_implementation` names in transformers' attention interface (eager as the fallback)."""

    def __init__(self, config: EvoTokDepthHeadConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, steps, hidden = hidden_states.shape

        def heads(t):  # (B, T, E) -> (B, heads, T, head_dim)
            return t.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(hidden_states))
        k = heads(self.k_proj(hidden_states))
        v = heads(self.v_proj(hidden_states))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self, q, k, v, attention_mask, scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0, **kwargs,
        )  # fmt: skip
        return self.o_proj(out.reshape(batch, steps, hidden)), weights


class EvoTokDepthMLP(nn.Module):
    def __init__(self, config: EvoTokDepthHeadConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class EvoTokDepthLayer(GradientCheckpointingLayer):
    """Pre-norm GPT block: x + drop(attn(ln(x))), then x + drop(mlp(ln(x)))."""

    def __init__(self, config: EvoTokDepthHeadConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EvoTokDepthAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EvoTokDepthMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_out, _ = self.attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask, past_key_values=past_key_values,
            **kwargs,
        )  # fmt: skip
        hidden_states = hidden_states + self.resid_dropout(attn_out)
        return hidden_states + self.resid_dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class EvoTokDepthClassifier(nn.Module):
    """LayerNorm -> Linear(E, codebook_size): the code scores of one depth."""

    def __init__(self, config: EvoTokDepthHeadConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.codebook_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden_states))


# ----------------------------------------------------------------------------- the model
class EvoTokDepthTransformer(PreTrainedModel):
    """The residual-depth head. See the module docstring for the structure and `forward` for the calling modes."""

    config_class = EvoTokDepthHeadConfig
    config: EvoTokDepthHeadConfig
    base_model_prefix = "depth_head"
    main_input_name = "hidden_states"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EvoTokDepthLayer", "EvoTokDepthClassifier"]
    _skip_keys_device_placement = ["past_key_values"]
    # Eager and SDPA are the kernels checked here, against each other and against a float64 reference. Flash and flex
    # attention are not declared: no machine that runs the tests can run those kernels.
    _supports_sdpa = True
    # The mask comes from transformers' mask interface and the forward's attention kwargs reach every attention call,
    # so a kernel registered with `AttentionInterface` (a serving backend's) runs as the built-in ones do.
    _supports_attention_backend = True
    # Teacher forcing and each cached step compile with `fullgraph=True` (no data-dependent branch).
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": EvoTokDepthLayer, "attentions": EvoTokDepthAttention}

    def __init__(self, config: EvoTokDepthHeadConfig):
        super().__init__(config)
        self.hidden_proj = nn.Linear(config.llm_hidden_size, config.hidden_size)
        self.code_proj = nn.Linear(config.code_dim, config.hidden_size)
        self.depth_embeddings = nn.Parameter(torch.zeros(1, config.pixel_depth, config.hidden_size))
        self.layers = nn.ModuleList([EvoTokDepthLayer(config, i) for i in range(config.num_hidden_layers)])
        self.classifiers = nn.ModuleList([EvoTokDepthClassifier(config) for _ in range(config.pixel_depth)])
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, EvoTokDepthTransformer):
            init.normal_(module.depth_embeddings, mean=0.0, std=std)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    # -- validation ----------------------------------------------------------------------------------------------
    def _check_inputs(
        self,
        hidden_states: torch.Tensor | None,
        code_embedding_sums: torch.Tensor | None,
        past_key_values: Cache | None,
        depth_offset: int | None,
    ) -> int:
        """Validate one call and return the index of the first depth it computes."""
        config = self.config
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        if depth_offset is None:
            depth_offset = cached
        elif isinstance(depth_offset, bool) or not isinstance(depth_offset, int) or depth_offset != cached:
            raise ValueError(
                f"depth_offset ({depth_offset!r}) must equal the number of depths already in past_key_values "
                f"({cached})."
            )
        batch_sizes = []
        if depth_offset == 0:
            if hidden_states is None:
                raise ValueError(
                    "hidden_states is required on the first step: the LLM hidden state is the depth-0 input."
                )
        elif hidden_states is not None:
            raise ValueError(
                f"hidden_states must be None after the first step ({depth_offset} depths are already cached); pass "
                "only the new cumulative code sums."
            )
        if hidden_states is not None:
            _check_float_tensor("hidden_states", hidden_states, ("batch",), "llm_hidden_size", config.llm_hidden_size)
            batch_sizes.append(hidden_states.shape[0])
        steps = 0 if hidden_states is None else 1
        if code_embedding_sums is not None:
            _check_float_tensor("code_embedding_sums", code_embedding_sums, ("batch", "steps"), "code_dim",
                                config.code_dim)
            batch_sizes.append(code_embedding_sums.shape[0])
            steps += code_embedding_sums.shape[1]
        if steps == 0:
            raise ValueError("Nothing to compute: pass at least one cumulative code sum after the first step.")
        if past_key_values is not None and cached > 0:
            batch_sizes.append(past_key_values.layers[0].keys.shape[0])
        if len(set(batch_sizes)) > 1:
            raise ValueError(
                f"Batch sizes disagree (hidden_states, code_embedding_sums, past_key_values): {batch_sizes}."
            )
        if depth_offset + steps > config.pixel_depth:
            raise ValueError(
                f"Too many depth steps: {depth_offset} cached + {steps} new > pixel_depth ({config.pixel_depth}). "
                f"The full teacher-forced sequence takes pixel_depth - 1 = {config.pixel_depth - 1} code sums."
            )
        return depth_offset

    # -- forward -------------------------------------------------------------------------------------------------
    @capture_outputs
    def forward(
        self,
        hidden_states: torch.Tensor | None = None,
        code_embedding_sums: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        depth_offset: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> EvoTokDepthHeadOutput:
        """Code logits for the next depths of a batch of image positions.

        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch, llm_hidden_size)`, *optional*): the LLM hidden state
                of each position: the depth-0 input. Required on the first step, None afterwards.
            code_embedding_sums (`torch.FloatTensor` of shape `(batch, steps, code_dim)`, *optional*): cumulative sums
                of the chosen code embeddings, e_0, e_0 + e_1, ...: the input of depths 1, 2, ...
            past_key_values (`Cache`, *optional*): keys / values of the depths computed so far; updated in place.
            use_cache (`bool`, defaults to False): start a `DynamicCache` when none is given and return it.
            depth_offset (`int`, *optional*): index of the first depth this call computes; by default the cache length
                (0 without a cache). When given it must equal the cache length (a guard for callers that count).
            output_hidden_states / output_attentions / return_dict: as everywhere in transformers (the per-block
                depth sequences and attention weights; a plain tuple with `return_dict=False`).

        Calling modes:
            - teacher forcing (training): `hidden_states` and the `pixel_depth - 1` ground-truth sums of depths
              0 .. pixel_depth - 2 -> logits `(batch, pixel_depth, codebook_size)`; logits[:, d] scores depth d.
            - cached generation: `hidden_states` with `use_cache=True` -> logits of depth 0 `(batch, 1, K)` and a
              cache; then `hidden_states=None`, the one new sum `(batch, 1, code_dim)` and the cache -> logits of the
              next depth, with that depth's embedding and classifier.
        """
        depth_offset = self._check_inputs(hidden_states, code_embedding_sums, past_key_values, depth_offset)
        if self.training and self.is_activation_checkpointing and (use_cache or past_key_values is not None):
            if past_key_values is not None:
                raise ValueError("past_key_values cannot be used with activation checkpointing in training mode.")
            logger.warning_once("use_cache=True is incompatible with activation checkpointing in training; ignored.")
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()

        dtype = self.code_proj.weight.dtype
        inputs = []
        if hidden_states is not None:
            inputs.append(self.hidden_proj(hidden_states.to(dtype)).unsqueeze(1))
        if code_embedding_sums is not None:
            inputs.append(self.code_proj(code_embedding_sums.to(dtype)))
        sequence = torch.cat(inputs, dim=1)
        steps = sequence.shape[1]
        sequence = sequence + self.depth_embeddings[:, depth_offset : depth_offset + steps]

        # Through transformers' mask interface, in the form the configured kernel takes: an additive mask for eager,
        # None where SDPA's own causal flag suffices, none at all for a backend that applies causality itself. New
        # depth i sees the cached depths and new depths 0 .. i.
        mask = create_causal_mask(self.config, sequence, attention_mask=None, past_key_values=past_key_values)
        for layer in self.layers:
            sequence = layer(sequence, attention_mask=mask, past_key_values=past_key_values, **kwargs)

        logits = torch.stack([self.classifiers[depth_offset + i](sequence[:, i]) for i in range(steps)], dim=1)
        return EvoTokDepthHeadOutput(logits=logits, past_key_values=past_key_values)


__all__ = [
    "EvoTokDepthTransformer",
    "EvoTokDepthHeadOutput",
    "OFFICIAL_BLOCK_KEY_RENAMES",
    "OFFICIAL_KEY_RENAMES",
    "official_depth_head_key",
]
