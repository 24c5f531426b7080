"""EvoTok image tokenizer: SigLIP encoder -> task layer -> residual quantizer -> pixel decoder / semantic decoder.

Module structure follows the authors' tokenizer one to one (so their checkpoints convert by renaming keys):

    input_scaling       clamp to [-1, 1] (the authors' `scaling_layer`)
    encoder             SiglipVisionModel; hidden_states[encoder_feature_layer] is used, the layers after it, the
                        post-layernorm and the pooling head are kept (checkpoint compatibility) but frozen
    encode_task_layer   Linear(hidden, hidden) -> Tanh -> Linear(hidden, codebook_dim)
    quantizer           EvoTokResidualQuantizer (one EMA codebook per depth)
    post_quant_conv     1x1 conv codebook_dim -> z_channels
    pixel_decoder       LlamaGen/VQGAN conv decoder (the authors' `decoder`)
    semantic_decoder    BEiT-v2 style ViT over the code grid (the authors' `decoder_vqkd`)
    decode_task_layer   Linear -> Tanh -> Linear(teacher_dim)

References: EvoTok (arXiv 2603.12108); BEiT v2 (VQ-KD decoder); LlamaGen / VQGAN (pixel decoder).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_evotok import EvoTokConfig
from .quantizer import EvoTokResidualQuantizer


# ----------------------------------------------------------------------------- outputs
@dataclass
class EvoTokEncoderOutput(ModelOutput):
    """Output of [`EvoTokModel.encode`].

    codes (`torch.LongTensor` of shape `(batch, grid, grid, num_depths)`): residual code trajectory per position
        (`num_depths = max(pixel_depth, semantic_depth)`).
    pixel_latents (`torch.FloatTensor` of shape `(batch, codebook_dim, grid, grid)`): sum of the first `pixel_depth`
        code embeddings (straight-through to the encoder).
    semantic_latents (`torch.FloatTensor` of shape `(batch, codebook_dim, grid, grid)`): sum of the first
        `semantic_depth` code embeddings (straight-through to the encoder).
    commitment_loss (`torch.FloatTensor`): mean over all num_depths depths of ||z - sg(partial_sum_d)||^2.
    codebook_usage (`torch.FloatTensor` of shape `(num_depths,)`): fraction of each codebook used in the batch.
    perplexity (`torch.FloatTensor` of shape `(num_depths,)`): perplexity of each depth's codes in the batch.
    encoder_latents (`torch.FloatTensor` of shape `(batch, codebook_dim, grid, grid)`): the unquantised latents.
    """

    codes: torch.LongTensor | None = None
    pixel_latents: torch.FloatTensor | None = None
    semantic_latents: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    encoder_latents: torch.FloatTensor | None = None


@dataclass
class EvoTokModelOutput(ModelOutput):
    """Output of [`EvoTokModel.forward`] (training and full round trips).

    reconstruction (`torch.FloatTensor` of shape `(batch, 3, height, width)`): pixel decoder output in [-1, 1] scale.
    semantic_features (`torch.FloatTensor` of shape `(batch, grid * grid, teacher_dim)`): decoded semantic features,
        to be matched with a teacher's features.
    codes, commitment_loss, codebook_usage, perplexity, pixel_latents, semantic_latents: as in [`EvoTokEncoderOutput`].
    """

    reconstruction: torch.FloatTensor | None = None
    semantic_features: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    pixel_latents: torch.FloatTensor | None = None
    semantic_latents: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------- small pieces
class EvoTokInputScaling(nn.Module):
    """The authors' input scaling: ((x + 1) * 127.5).clamp(0, 255) / 255, then (v - shift) / scale with 0.5 / 0.5.

    An identity on [-1, 1] that clamps out-of-range values; kept as buffers for checkpoint compatibility."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("scale", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        unit = ((pixel_values + 1.0) * 127.5).clamp(0.0, 255.0) / 255.0
        return (unit - self.shift) / self.scale


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference attention (the `"eager"` implementation) over `(batch, heads, tokens, head_dim)`: returns the
    output as `(batch, tokens, heads, head_dim)`, as every entry of `ALL_ATTENTION_FUNCTIONS` does, and the weights."""
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    # at least fp32 for the softmax (bf16 / fp16 would round the weights), full precision for fp64
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# ----------------------------------------------------------------------------- semantic decoder (BEiT-v2 style)
class EvoTokSemanticAttention(nn.Module):
    """Attention with `num_heads * head_dim` inner width (1020 in the paper: 12 heads of 85 for width 1024), a fused
    bias-free `qkv` projection plus separate query and value biases (the key bias is zero), as in BEiT. The kernel is
    the one `config._attn_implementation` names in transformers' attention interface (eager as the fallback)."""

    def __init__(self, config: EvoTokConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.semantic_decoder_num_heads
        self.head_dim = config.semantic_decoder_head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        inner = self.num_heads * self.head_dim
        hidden = config.semantic_decoder_hidden_size
        self.qkv = nn.Linear(hidden, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(inner, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(hidden_states, self.qkv.weight, bias)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)
        return self.proj(out.reshape(batch, tokens, -1))


class EvoTokSemanticMLP(nn.Module):
    def __init__(self, config: EvoTokConfig):
        super().__init__()
        hidden = config.semantic_decoder_hidden_size
        self.fc1 = nn.Linear(hidden, int(hidden * config.semantic_decoder_mlp_ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(hidden * config.semantic_decoder_mlp_ratio), hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class EvoTokSemanticBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: EvoTokConfig):
        super().__init__()
        hidden = config.semantic_decoder_hidden_size
        self.norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.attn = EvoTokSemanticAttention(config)
        self.norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.mlp = EvoTokSemanticMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class EvoTokPatchEmbed(nn.Module):
    def __init__(self, config: EvoTokConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.codebook_dim, config.semantic_decoder_hidden_size, kernel_size=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2)


class EvoTokSemanticDecoder(nn.Module):
    """ViT over the code grid (patch size 1): cls token + absolute positions, pre-norm blocks, no final norm,
    `fc_norm` on the patch tokens (the cls token is dropped)."""

    def __init__(self, config: EvoTokConfig):
        super().__init__()
        hidden = config.semantic_decoder_hidden_size
        self.patch_embed = EvoTokPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + 1, hidden))
        self.blocks = nn.ModuleList([EvoTokSemanticBlock(config) for _ in range(config.semantic_decoder_layers)])
        self.fc_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(latents)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        hidden_states = torch.cat((cls, tokens), dim=1) + self.pos_embed
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.fc_norm(hidden_states[:, 1:])


# ----------------------------------------------------------------------------- pixel decoder (LlamaGen style)
def _group_norm(config: EvoTokConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=config.decoder_norm_groups, num_channels=channels, eps=1e-6, affine=True)


class EvoTokResnetBlock(GradientCheckpointingLayer):
    def __init__(self, config: EvoTokConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class EvoTokAttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections, through transformers' attention interface like
    the semantic decoder's."""

    def __init__(self, config: EvoTokConfig, channels: int):
        super().__init__()
        self.config = config
        self.scaling = channels**-0.5
        self.is_causal = False
        self.norm = _group_norm(config, channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def heads(t):  # (B, C, H, W) -> (B, 1, HW, C)
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention_interface(self, heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), None,
                                     scaling=self.scaling)  # fmt: skip
        # (B, HW, 1, C) -> (B, C, H, W)
        out = out.reshape(batch, height * width, channels).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class EvoTokUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EvoTokDecoderLevel(nn.Module):
    """One resolution of the pixel decoder: resnet blocks (each optionally followed by attention), then upsampling."""

    def __init__(self, config: EvoTokConfig, in_channels: int, out_channels: int, attention: bool, upsample: bool):
        super().__init__()
        blocks = config.decoder_res_blocks_per_level
        self.res = nn.ModuleList(
            [EvoTokResnetBlock(config, in_channels if i == 0 else out_channels, out_channels) for i in range(blocks)]
        )
        self.attn = nn.ModuleList([EvoTokAttnBlock(config, out_channels) for _ in range(blocks)] if attention else [])
        self.upsample = EvoTokUpsample(out_channels) if upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if self.attn:
                h = self.attn[i](h)
        return h if self.upsample is None else self.upsample(h)


class EvoTokPixelDecoder(nn.Module):
    """conv_in -> mid (res, attn, res) -> levels from the lowest resolution up -> GroupNorm, SiLU, conv_out."""

    def __init__(self, config: EvoTokConfig):
        super().__init__()
        channels = [config.decoder_base_channels * m for m in reversed(config.decoder_channel_multipliers)]
        self.conv_in = nn.Conv2d(config.decoder_z_channels, channels[0], kernel_size=3, padding=1)
        self.mid = nn.ModuleList(
            [
                EvoTokResnetBlock(config, channels[0], channels[0]),
                EvoTokAttnBlock(config, channels[0]),
                EvoTokResnetBlock(config, channels[0], channels[0]),
            ]
        )
        self.conv_blocks = nn.ModuleList(
            [
                EvoTokDecoderLevel(
                    config,
                    in_channels=channels[max(i - 1, 0)],
                    out_channels=channels[i],
                    attention=i == 0 and config.decoder_attention_at_lowest_resolution,
                    upsample=i < len(channels) - 1,
                )
                for i in range(len(channels))
            ]
        )
        self.norm_out = _group_norm(config, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 3, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last conv (adaptive GAN weights use its gradient norm)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Latents arrive as a channels-last view of (batch, grid, grid, dim) codes, and convolutions keep their input's
        # memory format: the whole decoder would run channels-last, where a CPU GroupNorm backward in bf16 / fp16 is
        # ~30x slower than on contiguous NCHW (benchmarks/README.md). One copy of the small latent grid avoids it
        # there; in fp32 both layouts run at the same speed and the layout is left alone (so are fp32 results).
        if z.device.type == "cpu" and z.dtype in (torch.bfloat16, torch.float16):
            z = z.contiguous()
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- the model
def initialize_native_submodels(model: PreTrainedModel) -> None:
    """Initialise the transformers-native models nested in `model` (SigLIP, the LLM) on their own path, before
    `model`'s. transformers counts classes defined outside its package as custom code and hands that flag down to
    every nested model; with it, `initialize_weights` skips any module that owns no tensors itself, and SigLIP sets
    the weights of its attention and MLP layers from those parent modules (xavier, tiny biases). Loading a checkpoint
    with missing SigLIP keys then gave them a different initialisation than `__init__`, where SigLIP initialises itself
    as a native model. Run first, each native model marks its modules initialised, so the custom pass skips them."""
    for module in model.modules():  # outer models before the models nested in them
        if module is not model and isinstance(module, PreTrainedModel) and not module.is_custom_code():
            module.initialize_weights()


class EvoTokPreTrainedModel(PreTrainedModel):
    config_class = EvoTokConfig
    config: EvoTokConfig
    base_model_prefix = "evotok"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "SiglipVisionEmbeddings",
        "SiglipEncoderLayer",
        "SiglipMultiheadAttentionPoolingHead",
        "EvoTokResidualQuantizer",
        "EvoTokSemanticBlock",
        "EvoTokResnetBlock",
        "EvoTokAttnBlock",
    ]
    # Every attention module (SigLIP's, the semantic decoder's, the pixel decoder's) runs the kernel its config names
    # through transformers' attention interface. Eager and SDPA are the ones declared and checked against each other.
    # Not declared: flash attention (the pixel decoder's single head is as wide as its channels, 512 in the paper, past
    # the flash kernels' 256), flex attention (no test here runs it), `_supports_attention_backend` (encode / decode
    # take no attention kwargs to pass down) and `_can_compile_fullgraph` (the input checks read values: NaN / inf
    # pixels and out-of-range codes break the graph).
    _supports_sdpa = True
    # The codebooks and their EMA statistics stay fp32 whatever dtype the model is loaded in: rounding them would change
    # the codes. The strict list is the one transformers applies to bf16 and fp16 loads alike (the plain
    # `_keep_in_fp32_modules` acts on fp16 loads only). Tensors are named, not the whole module: every tensor matching
    # an entry is cast to fp32, which would turn the int64 `ema_step` counter into a float. Models holding this one
    # (the VLM) inherit the entries through `post_init`.
    _keep_in_fp32_modules_strict = ["quantizer.codebook", "quantizer.embed_ema", "quantizer.cluster_size_ema"]

    def initialize_weights(self):
        initialize_native_submodels(self)
        super().initialize_weights()

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, EvoTokResidualQuantizer):
            init.normal_(module.codebook, mean=0.0, std=1.0)
            init.copy_(module.embed_ema, module.codebook)
            init.zeros_(module.cluster_size_ema)
            init.zeros_(module.ema_step)
        elif isinstance(module, EvoTokInputScaling):
            init.constant_(module.shift, 0.5)
            init.constant_(module.scale, 0.5)
        elif isinstance(module, EvoTokSemanticDecoder):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
        elif isinstance(module, EvoTokSemanticAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # PyTorch's default conv init (as the authors' decoder uses).
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class EvoTokModel(EvoTokPreTrainedModel):
    """The EvoTok image tokenizer. See the module docstring for the structure and `encode` / `decode` for the API."""

    def __init__(self, config: EvoTokConfig):
        super().__init__(config)
        hidden = config.encoder_config.hidden_size
        semantic_hidden = config.semantic_decoder_hidden_size
        self.input_scaling = EvoTokInputScaling()
        # Built in the dtype of the rest of the model, not in `encoder_config.dtype`: transformers sets the load dtype
        # only one config level down, so that nested field can still hold the dtype of an earlier save (a VLM folder
        # assembled from an fp32 tokenizer kept SigLIP fp32 in a bf16 load).
        self.encoder = AutoModel.from_config(config.encoder_config, dtype=torch.get_default_dtype())
        self.encode_task_layer = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, config.codebook_dim))
        self.quantizer = EvoTokResidualQuantizer.from_config(config)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.decoder_z_channels, kernel_size=1)
        self.pixel_decoder = EvoTokPixelDecoder(config)
        self.semantic_decoder = EvoTokSemanticDecoder(config)
        self.decode_task_layer = nn.Sequential(
            nn.Linear(semantic_hidden, semantic_hidden), nn.Tanh(), nn.Linear(semantic_hidden, config.teacher_dim)
        )
        self.post_init()
        self.freeze_untrained_parameters()

    # -- construction helpers ------------------------------------------------------------------------------------
    def freeze_untrained_parameters(self) -> None:
        """Set requires_grad=False on the encoder parts that cannot influence `hidden_states[encoder_feature_layer]`
        (the later layers, the post-layernorm and the pooling head, kept for checkpoint compatibility); the codebooks
        are buffers and need no freezing. Called at construction and after `from_pretrained`, whose loading re-creates
        parameters with requires_grad=True."""
        used = self.config.num_encoder_layers_used
        for layer in self.encoder.encoder.layers[used:]:
            layer.requires_grad_(False)
        self.encoder.post_layernorm.requires_grad_(False)
        if getattr(self.encoder, "head", None) is not None:
            self.encoder.head.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_untrained_parameters()
        return loaded

    @classmethod
    def from_encoder_pretrained(
        cls, encoder_name_or_path: str, config: EvoTokConfig | None = None, **config_overrides
    ) -> "EvoTokModel":
        """A fresh EvoTok whose encoder weights come from a pretrained SigLIP / SigLIP2 vision checkpoint
        (e.g. "google/siglip2-large-patch16-256", or a local folder). The encoder config is read from the checkpoint;
        other fields come from `config` (default: the paper's) updated with `config_overrides`.

        Accepts a `SiglipVisionModel` folder or a full `SiglipModel` folder (its vision tower is taken)."""
        from transformers import AutoConfig, SiglipVisionConfig, SiglipVisionModel

        loaded = AutoConfig.from_pretrained(encoder_name_or_path)
        encoder_config = getattr(loaded, "vision_config", loaded)
        if not isinstance(encoder_config, SiglipVisionConfig):
            raise ValueError(
                f"{encoder_name_or_path!r} is a {type(encoder_config).__name__}; EvoTok's encoder needs a SigLIP-"
                "architecture vision checkpoint (fixed-resolution SigLIP/SigLIP2, not the NaFlex Siglip2VisionModel)."
            )
        base = config.to_dict() if config is not None else {}
        base.pop("encoder_config", None)
        base.update(config_overrides)
        model = cls(EvoTokConfig(encoder_config=encoder_config.to_dict(), **base))
        encoder = SiglipVisionModel.from_pretrained(encoder_name_or_path, dtype=torch.float32)
        model.encoder.load_state_dict(encoder.state_dict())
        return model

    # -- validation ----------------------------------------------------------------------------------------------
    @staticmethod
    def _check_batch_and_values(tensor: torch.Tensor, name: str) -> None:
        """An empty batch has nothing to encode or decode, and a NaN / inf entry would silently poison the whole
        image (the nearest-code search turns NaN latents into all-zero codes, the clamp of the input scaling turns
        inf into a valid-looking 1): both are input errors."""
        if tensor.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(tensor.shape)}): pass at least one item.")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor[~finite]
            num_nan, num_inf = int(bad.isnan().sum()), int(bad.isinf().sum())
            raise ValueError(
                f"{name} contains NaN or infinite values ({num_nan} NaN and {num_inf} inf among {tensor.numel()} "
                "entries); only finite values can be encoded or decoded."
            )

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise ValueError("pixel_values must be a floating-point torch.Tensor of shape (batch, 3, H, W).")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values must have shape (batch, 3, {size}, {size}) (use EvoTokImageProcessor), "
                f"got {tuple(pixel_values.shape)}."
            )
        self._check_batch_and_values(pixel_values, "pixel_values")

    def _check_latents(self, latents: torch.Tensor) -> None:
        grid, dim = self.config.grid_size, self.config.codebook_dim
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise ValueError("latents must be a floating-point torch.Tensor of shape (batch, codebook_dim, grid, grid).")
        if latents.ndim != 4 or tuple(latents.shape[1:]) != (dim, grid, grid):
            raise ValueError(f"latents must have shape (batch, {dim}, {grid}, {grid}), got {tuple(latents.shape)}.")
        self._check_batch_and_values(latents, "latents")

    def _codes_to_latents(self, codes: torch.Tensor, limit: str = "num_depths") -> torch.Tensor:
        """Sum of the first k code embeddings, (batch, codebook_dim, grid, grid), for codes (batch, grid, grid, k) with
        k at most the config's `limit` ("pixel_depth", "semantic_depth" or "num_depths": all codebooks)."""
        self.quantizer.validate_codes(codes, max_depth=getattr(self.config, limit), limit=limit)
        grid = self.config.grid_size
        if codes.ndim != 4 or tuple(codes.shape[1:3]) != (grid, grid):
            raise ValueError(f"codes must have shape (batch, {grid}, {grid}, k), got {tuple(codes.shape)}.")
        if codes.shape[0] == 0:
            raise ValueError(f"codes is an empty batch (shape {tuple(codes.shape)}): pass at least one item.")
        return self.quantizer.embed_codes(codes).permute(0, 3, 1, 2)

    # -- public API ----------------------------------------------------------------------------------------------
    def get_encoder_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """hidden_states[encoder_feature_layer] of the SigLIP encoder, (batch, grid*grid, hidden); the later layers
        are not run."""
        hidden_states = self.encoder.embeddings(self.input_scaling(pixel_values).to(self.encoder.dtype))
        for layer in self.encoder.encoder.layers[: self.config.num_encoder_layers_used]:
            hidden_states = layer(hidden_states, None)
        return hidden_states

    def encode(self, pixel_values: torch.Tensor) -> EvoTokEncoderOutput:
        """Images in [-1, 1], (batch, 3, image_size, image_size) -> residual codes and quantised latents."""
        self._check_pixel_values(pixel_values)
        features = self.encode_task_layer(self.get_encoder_features(pixel_values))
        grid = self.config.grid_size
        latents = features.view(features.shape[0], grid, grid, self.config.codebook_dim)
        quantized = self.quantizer(latents)

        def to_channels_first(t):
            return t.permute(0, 3, 1, 2)

        return EvoTokEncoderOutput(
            codes=quantized.codes,
            pixel_latents=to_channels_first(quantized.pixel_latents),
            semantic_latents=to_channels_first(quantized.semantic_latents),
            commitment_loss=quantized.commitment_loss,
            codebook_usage=quantized.codebook_usage,
            perplexity=quantized.perplexity,
            encoder_latents=to_channels_first(latents),
        )

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Float pixel latents (batch, codebook_dim, grid, grid) -> images (batch, 3, H, W), nominally in [-1, 1]."""
        self._check_latents(latents)
        return self.pixel_decoder(self.post_quant_conv(latents.to(self.post_quant_conv.weight.dtype)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (batch, grid, grid, k) with 1 <= k <= pixel_depth -> images (batch, 3, H, W).

        k < pixel_depth decodes a coarser image from the first k depths (the decoder was trained on the k =
        pixel_depth sum, so fewer depths give blurrier results: useful for per-depth analysis). Where `pixel_depth <
        semantic_depth`, slice `encode(...).codes` to its first `pixel_depth` depths: more raise ValueError."""
        return self.decode_latents(self._codes_to_latents(codes, "pixel_depth"))

    def decode_semantic_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Float semantic latents (batch, codebook_dim, grid, grid) -> teacher-space features (batch, grid*grid, D)."""
        self._check_latents(latents)
        hidden_states = self.semantic_decoder(latents.to(self.semantic_decoder.pos_embed.dtype))
        return self.decode_task_layer(hidden_states)

    def get_semantic_features(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (batch, grid, grid, k) with 1 <= k <= semantic_depth -> semantic features (batch, grid*grid,
        teacher_dim): the sum of the first k code embeddings through the semantic decoder (k = semantic_depth is
        what the VLM reads; smaller k is the per-depth analysis of the paper). Where `pixel_depth > semantic_depth`,
        slice `encode(...).codes` to its first `semantic_depth` depths: more raise ValueError."""
        return self.decode_semantic_latents(self._codes_to_latents(codes, "semantic_depth"))

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor) -> EvoTokModelOutput:
        """Encode, quantise (EMA-updating the codebooks in training mode) and decode both branches. A plain tuple with
        `return_dict=False` (argument or config), as in transformers. There are no per-layer hidden states or attention
        weights to return (encoder, quantiser and two decoders have no common layer sequence); the encoder's come from
        `self.encoder(..., output_hidden_states=True)`."""
        encoded = self.encode(pixel_values)
        return EvoTokModelOutput(
            reconstruction=self.decode_latents(encoded.pixel_latents),
            semantic_features=self.decode_semantic_latents(encoded.semantic_latents),
            codes=encoded.codes,
            commitment_loss=encoded.commitment_loss,
            codebook_usage=encoded.codebook_usage,
            perplexity=encoded.perplexity,
            pixel_latents=encoded.pixel_latents,
            semantic_latents=encoded.semantic_latents,
        )


__all__ = ["EvoTokPreTrainedModel", "EvoTokModel", "EvoTokEncoderOutput", "EvoTokModelOutput"]
