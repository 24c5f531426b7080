"""Configuration of the EvoTok image tokenizer.

EvoTok (arXiv 2603.12108) encodes an image with a SigLIP vision tower, maps the second-to-last hidden state to a
low-dimensional code space and quantises every position with a cascade of residual codebooks.  The first
`pixel_depth` code embeddings sum to the pixel latent (decoded to an image by a conv decoder); the first
`semantic_depth` sum to the semantic latent (decoded by a small ViT to a teacher's feature space). The two depths are
independent (the paper's Table 4 compares (4, 4), (16, 4) and its own (4, 16)); there is one codebook per depth up to
the larger of them, `num_depths`.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from transformers import PreTrainedConfig, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.dynamic_module_utils import get_relative_import_files

# The encoder of the paper: google/siglip2-large-patch16-256, a fixed-resolution SigLIP2 checkpoint that uses the
# SigLIP architecture (transformers' `SiglipVisionModel`).
_SIGLIP2_LARGE_PATCH16_256 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 256,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": True,
}

EVOTOK_PRESETS: dict[str, dict] = {
    # The paper's tokenizer: SigLIP2-L/16-256, 16 codebooks of 32,768 x 32, depths 4 (pixel) / 16 (semantic).
    "evotok-siglip2-l16-256": {
        "encoder_config": _SIGLIP2_LARGE_PATCH16_256,
        "codebook_size": 32768,
        "codebook_dim": 32,
        "pixel_depth": 4,
        "semantic_depth": 16,
        "ema_warmup_steps": 2000,
        "decoder_base_channels": 128,
        "decoder_channel_multipliers": [1, 1, 2, 2, 4],
        "decoder_z_channels": 256,
        "semantic_decoder_layers": 3,
        "semantic_decoder_hidden_size": 1024,
        "semantic_decoder_num_heads": 12,
        "semantic_decoder_head_dim": 85,
        "teacher_dim": 1024,
    },
    # A CPU-sized model with the same structure (64x64 images, 8x8 grid): demos and small training runs.
    "evotok-small": {
        "encoder_config": {
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "image_size": 64,
            "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        "codebook_size": 1024,
        "codebook_dim": 16,
        "pixel_depth": 4,
        "semantic_depth": 16,
        "decoder_base_channels": 32,
        "decoder_channel_multipliers": [1, 1, 2, 2],
        "decoder_z_channels": 64,
        "decoder_res_blocks_per_level": 2,
        "decoder_norm_groups": 16,
        "semantic_decoder_layers": 2,
        "semantic_decoder_hidden_size": 192,
        "semantic_decoder_num_heads": 5,
        "semantic_decoder_head_dim": 38,
        "teacher_dim": 192,
    },
    # EvoTok in miniature (EvoTok Shapes, 64x64, 8x8 grid): the encoder has the shape of the mini-SigLIP that
    # initialises it and is its teacher (evotok_hf.miniature.siglip). Sixteen entries per depth: a large codebook lets
    # depth 1 alone draw a 64x64 scene of flat colours (+1.3 dB from depth 1 to 4 with 512 entries), so the depths add
    # little; four entries make each depth a refinement (+5.6 dB) but 4^4 combinations per 8x8 patch blur the shapes
    # (the detector recognises 38% of reconstructed ground-truth scenes); sixteen keep both (+3.7 dB, 67%; README).
    "evotok-shapes": {
        "encoder_config": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        "codebook_size": 16,
        "codebook_dim": 16,
        "pixel_depth": 4,
        "semantic_depth": 16,
        "decoder_base_channels": 32,
        "decoder_channel_multipliers": [1, 1, 2, 2],
        "decoder_z_channels": 64,
        "decoder_res_blocks_per_level": 1,
        "decoder_norm_groups": 16,
        "semantic_decoder_layers": 2,
        "semantic_decoder_hidden_size": 128,
        "semantic_decoder_num_heads": 4,
        "semantic_decoder_head_dim": 32,
        "teacher_dim": 128,
    },
    # Unit tests only: every structural feature (odd head width, frozen encoder tail, several levels) at ~0.2M params.
    "evotok-tiny": {
        "encoder_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        "codebook_size": 64,
        "codebook_dim": 8,
        "pixel_depth": 2,
        "semantic_depth": 4,
        "decoder_base_channels": 16,
        "decoder_channel_multipliers": [1, 1, 2, 2],
        "decoder_z_channels": 32,
        "decoder_res_blocks_per_level": 2,
        "decoder_norm_groups": 8,
        "semantic_decoder_layers": 2,
        "semantic_decoder_hidden_size": 32,
        "semantic_decoder_num_heads": 3,
        "semantic_decoder_head_dim": 10,
        "teacher_dim": 24,
    },
}


def save_auto_map_code(obj, save_directory) -> list[Path]:
    """Copy into `save_directory` the files of this folder that `obj.auto_map` names, with the siblings they import.

    A folder exported with remote code (`evotok_hf.hub.remote_code`) carries an `auto_map`, which the loaded config
    keeps. With the package imported its own classes load such a folder, and transformers copies code on save only for
    classes loaded as remote code (`register_for_auto_class`); without this copy a re-saved folder would name code it
    does not hold. Classes loaded as remote code (`_auto_class` set) are left to transformers. Entries pointing to
    another repository ("repo--module.Class") need no local file. A config's `auto_map` also names the model's module,
    which transformers' `custom_object_save` (enough for the processors: `processing/image_processing_evotok.py`)
    would not copy, hence this copy of every module named.
    """
    auto_map = getattr(obj, "auto_map", None)
    if not auto_map or obj._auto_class is not None:
        return []
    folder = Path(__file__).resolve().parent
    modules = set()
    for refs in auto_map.values():
        for ref in refs if isinstance(refs, (list, tuple)) else [refs]:
            if ref and "--" not in ref:
                modules.add(ref.rsplit(".", 1)[0])
    files = set()
    for module in sorted(modules):
        path = folder / f"{module}.py"
        if not path.is_file():
            raise ValueError(
                f"{type(obj).__name__}.auto_map names the module {module!r}, which is not a file of {folder}; "
                f"remove that entry or point it to the repository that holds the code (\"repo--{module}.Class\")."
            )
        files.update([path, *map(Path, get_relative_import_files(path))])
    os.makedirs(save_directory, exist_ok=True)
    copied = []
    for path in sorted(files):
        copied.append(Path(shutil.copyfile(path, Path(save_directory) / path.name)))
    return copied


class RemoteCodeConfig(PreTrainedConfig):
    """The base of EvoTok's configs: saved after loading a remote-code folder with the package's classes, a config
    saves that folder's code again (`save_auto_map_code`), so the new folder stays loadable as remote code."""

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # Before the config is written (and uploaded): the code its `auto_map` names is in the folder by then.
        save_auto_map_code(self, save_directory)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


def _positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"EvoTokConfig: `{name}` must be a positive number, got {value!r}.")


class EvoTokConfig(RemoteCodeConfig):
    r"""Configuration of [`EvoTokModel`].

    Args:
        encoder_config (`dict` or `SiglipVisionConfig`): the SigLIP vision tower (fixed-resolution SigLIP/SigLIP2).
        encoder_feature_layer (`int`, defaults to -2): which entry of the encoder's `hidden_states` feeds the
            quantiser (-2: the second-to-last, as in the paper; later layers are kept but frozen).
        codebook_size (`int`, defaults to 32768): entries per codebook (one codebook per depth).
        codebook_dim (`int`, defaults to 32): width of the code space.
        pixel_depth (`int`, defaults to 4): how many residual depths sum to the pixel latent.
        semantic_depth (`int`, defaults to 16): how many residual depths sum to the semantic latent. Either may be the
            larger: the quantizer has `num_depths = max(pixel_depth, semantic_depth)` codebooks.
        ema_decay (`float`, defaults to 0.99): decay of the codebooks' exponential moving averages.
        ema_epsilon (`float`, defaults to 1e-5): Laplace smoothing of the EMA cluster sizes.
        restart_unused_codes (`bool`, defaults to True): replace entries whose EMA count drops below 1 by random
            vectors of the current batch.
        ema_warmup_steps (`int`, defaults to 0): training forwards during which only the usage statistics (and dead-code
            restarts) update; 0 means EMA updates from the first step (2000 in the paper).
        search_chunk_size (`int`, *optional*): vectors per block of the nearest-neighbour search, which never holds
            more than `search_chunk_size x codebook_size` distances at once; by default sized from the device (8 MiB of
            distances on CPU, where staying in cache is what makes the search fast; 256 MiB on accelerators).
        decoder_z_channels / decoder_base_channels / decoder_channel_multipliers / decoder_res_blocks_per_level /
        decoder_attention_at_lowest_resolution / decoder_norm_groups: the LlamaGen-style pixel decoder (post-quant 1x1
            conv to `z_channels`, then levels from the lowest resolution up, nearest x2 upsampling between levels).
        semantic_decoder_layers / semantic_decoder_hidden_size / semantic_decoder_num_heads / semantic_decoder_head_dim /
        semantic_decoder_mlp_ratio: the BEiT-v2-style semantic decoder (3 / 1024 / 12 / 85 / 4.0 in the paper; the
            attention's inner width is `num_heads * head_dim`, 1020 there, and may differ from the hidden size).
        teacher_dim (`int`, defaults to 1024): width of the teacher features the semantic decoder predicts.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon of the semantic decoder.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal init of linear layers.
    """

    model_type = "evotok"
    # Defaults describe the paper's tokenizer (the preset "evotok-siglip2-l16-256" adds its EMA warm-up).
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=_SIGLIP2_LARGE_PATCH16_256)
    }

    encoder_config: dict | PreTrainedConfig | None = None
    encoder_feature_layer: int = -2
    codebook_size: int = 32768
    codebook_dim: int = 32
    pixel_depth: int = 4
    semantic_depth: int = 16
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    restart_unused_codes: bool = True
    ema_warmup_steps: int = 0
    search_chunk_size: int | None = None
    decoder_z_channels: int = 256
    decoder_base_channels: int = 128
    decoder_channel_multipliers: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_res_blocks_per_level: int = 3
    decoder_attention_at_lowest_resolution: bool = True
    decoder_norm_groups: int = 32
    semantic_decoder_layers: int = 3
    semantic_decoder_hidden_size: int = 1024
    semantic_decoder_num_heads: int = 12
    semantic_decoder_head_dim: int = 85
    semantic_decoder_mlp_ratio: float = 4.0
    teacher_dim: int = 1024
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.decoder_channel_multipliers = list(self.decoder_channel_multipliers)
        self._validate_evotok()

    def _validate_evotok(self) -> None:
        for name in (
            "codebook_size", "codebook_dim", "pixel_depth", "semantic_depth",
            "decoder_z_channels", "decoder_base_channels", "decoder_res_blocks_per_level", "decoder_norm_groups",
            "semantic_decoder_layers", "semantic_decoder_hidden_size", "semantic_decoder_num_heads",
            "semantic_decoder_head_dim", "semantic_decoder_mlp_ratio", "teacher_dim",
        ):  # fmt: skip
            _positive(name, getattr(self, name))
        if self.search_chunk_size is not None:
            _positive("search_chunk_size", self.search_chunk_size)
        for name in ("pixel_depth", "semantic_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"EvoTokConfig: `{name}` must be a positive integer, got {value!r}.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"EvoTokConfig: `ema_decay` must lie in (0, 1), got {self.ema_decay}.")
        if self.ema_warmup_steps < 0:
            raise ValueError(f"EvoTokConfig: `ema_warmup_steps` must be >= 0, got {self.ema_warmup_steps}.")
        enc = self.encoder_config
        if enc.image_size % enc.patch_size != 0:
            raise ValueError(
                f"EvoTokConfig: the encoder's image_size ({enc.image_size}) must be divisible by its patch_size "
                f"({enc.patch_size})."
            )
        num_layers = enc.num_hidden_layers
        if self.encoder_feature_layer == 0 or not -num_layers <= self.encoder_feature_layer <= num_layers:
            raise ValueError(
                f"EvoTokConfig: `encoder_feature_layer` ({self.encoder_feature_layer}) must index the encoder's "
                f"hidden_states after at least one layer (1..{num_layers} or -{num_layers}..-1)."
            )
        mults = self.decoder_channel_multipliers
        if not mults or any((not isinstance(m, int)) or m <= 0 for m in mults):
            raise ValueError(f"EvoTokConfig: `decoder_channel_multipliers` must be positive ints, got {mults}.")
        upsampling = 2 ** (len(mults) - 1)
        if upsampling != enc.patch_size:
            raise ValueError(
                f"EvoTokConfig: the pixel decoder upsamples by 2**(len(decoder_channel_multipliers)-1) = {upsampling}, "
                f"which must equal the encoder patch_size ({enc.patch_size}) so reconstructions match the input size."
            )
        for channels in [self.decoder_base_channels * m for m in mults]:
            if channels % self.decoder_norm_groups != 0:
                raise ValueError(
                    f"EvoTokConfig: decoder width {channels} is not divisible by decoder_norm_groups "
                    f"({self.decoder_norm_groups})."
                )

    # Derived sizes: one place for each fact.
    @property
    def grid_size(self) -> int:
        """Positions per side of the code grid (16 for the paper's 256 / 16)."""
        return self.encoder_config.image_size // self.encoder_config.patch_size

    @property
    def image_size(self) -> int:
        return self.encoder_config.image_size

    @property
    def num_depths(self) -> int:
        """Residual depths the quantizer runs, one codebook each: the longer of the pixel and semantic prefixes."""
        return max(self.pixel_depth, self.semantic_depth)

    @property
    def num_encoder_layers_used(self) -> int:
        """Encoder layers that run to produce `hidden_states[encoder_feature_layer]`."""
        n = self.encoder_config.num_hidden_layers
        return self.encoder_feature_layer if self.encoder_feature_layer > 0 else n + 1 + self.encoder_feature_layer

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EvoTokConfig":
        """Build a named configuration: "evotok-siglip2-l16-256" (the paper), "evotok-small" (CPU), "evotok-tiny"
        (tests). Keyword overrides replace top-level fields; `encoder_config` overrides are merged."""
        if name not in EVOTOK_PRESETS:
            raise ValueError(f"Unknown EvoTok preset {name!r}; available: {sorted(EVOTOK_PRESETS)}.")
        kwargs = copy.deepcopy(EVOTOK_PRESETS[name])
        encoder_overrides = overrides.pop("encoder_config", None) or {}
        if isinstance(encoder_overrides, PreTrainedConfig):
            kwargs["encoder_config"] = encoder_overrides
        else:
            kwargs["encoder_config"].update(encoder_overrides)
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["EvoTokConfig", "EVOTOK_PRESETS"]
