"""The settings of a tokenizer training run: `TokenizerTrainingArguments` (every field a flag of
`scripts/train_tokenizer.py`) and the named presets that fill them (the paper's run, the CPU demo, the miniature)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .losses import EvoTokLossConfig


@dataclass
class TokenizerTrainingArguments(EvoTokLossConfig):
    """Everything a tokenizer training run needs; `scripts/train_tokenizer.py` maps its flags onto these fields.
    The loss weights and kinds are the inherited `EvoTokLossConfig` fields (reconstruction_loss, disc_weight,
    disc_start, semantic_fold, ...)."""

    output_dir: str = "outputs/evotok-tokenizer"
    # model
    model_preset: str = "evotok-small"
    model_overrides: dict = field(default_factory=dict)
    init_from: str | None = None  # an EvoTok folder to continue from (fine-tuning)
    encoder_pretrained: str | None = None  # a SigLIP / SigLIP2 vision checkpoint for the encoder
    # attention of the encoder, the pixel decoder's and the semantic decoder's (eager, sdpa, ...; the model's default
    # when None). On a CPU, eager trains the miniature's tokenizer ~1.17x faster than sdpa (benchmarks/README.md)
    attn_implementation: str | None = None
    teacher: str = "efficientnet-lite0"  # or a SigLIP path / Hub id (google/siglip2-large-patch16-256 in the paper)
    teacher_image_size: int | None = None  # EfficientNet-Lite0 input size (default 224)
    # data
    train_data: str = "bundled"
    eval_data: str | None = "bundled"
    image_column: str | None = None
    streaming: bool = False
    crops_per_photo: int = 32
    crop_size: int = 160
    num_workers: int = 0
    # optimisation
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    learning_rate: float = 1e-4
    disc_learning_rate: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    use_ema: bool = False
    ema_decay: float = 0.999
    # loss networks (the weights are the inherited EvoTokLossConfig fields)
    perceptual: str | None = "lpips-vgg"
    disc_norm: str = "group"
    disc_channels: int = 64
    disc_layers: int = 3
    on_nonfinite: str = "raise"  # or "skip": drop the step (on every rank) instead of stopping
    max_consecutive_skips: int = 10  # with on_nonfinite="skip": give up after this many non-finite steps in a row
    # bookkeeping
    seed: int = 0
    log_steps: int = 10
    eval_steps: int = 0  # 0: evaluate only at the end
    eval_max_images: int = 64
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    report_to: str | None = None  # "tensorboard", "wandb", ... (Accelerate trackers)

    def __post_init__(self):
        super().__post_init__()
        for name in ("perceptual", "eval_data", "resume_from_checkpoint", "report_to", "init_from",
                     "encoder_pretrained", "attn_implementation"):
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() in ("none", ""):
                setattr(self, name, None)  # "none" on the command line means: no such thing
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {self.on_nonfinite!r}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")

    def loss_config(self) -> EvoTokLossConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(EvoTokLossConfig)}
        if self.perceptual is None:
            values["perceptual_weight"] = 0.0
        return EvoTokLossConfig(**values)


# The losses of the presets that train offline: no perceptual network is available offline (LPIPS needs torchvision),
# so its weight is 0, and the GAN is off (it costs PSNR early in training and time on a CPU; the tests exercise it).
_OFFLINE_LOSSES = {
    "perceptual": None,
    "perceptual_weight": 0.0,
    "disc_weight": 0.0,
    "disc_start": 0,
    "disc_norm": "group",
    "disc_channels": 32,
}

TRAINING_PRESETS: dict[str, dict] = {
    # The authors' run (EVOTOK_REFERENCE.md): SigLIP2-L/16-256 encoder and teacher, 32768 x 32, depths 4/16, EMA
    # warm-up 2000, global batch 256, constant lr 1e-4, Adam(0.9, 0.95) without weight decay (their script parses a
    # weight-decay flag but never uses it), grad clip 1.0, GAN weight 0.5 from step 20k, bf16, 500k steps on
    # CC12M + ImageNet-1K. Pass --train_data / per-device batch to match your hardware (256 = devices x batch x accum).
    "paper": {
        "model_preset": "evotok-siglip2-l16-256",
        "encoder_pretrained": "google/siglip2-large-patch16-256",
        "teacher": "google/siglip2-large-patch16-256",
        "train_batch_size": 32,
        "max_train_steps": 500_000,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "mixed_precision": "bf16",
        "perceptual": "lpips-vgg",
        "perceptual_weight": 1.0,
        "disc_weight": 0.5,
        "disc_start": 20_000,
        "disc_norm": "batch",
        "semantic_fold": 4,
        "checkpointing_steps": 10_000,
        "eval_steps": 10_000,
        "streaming": True,
    },
    # Two CPU cores, about 3 minutes: the small preset (one resnet block per decoder level, for speed) on the bundled
    # photos with the EfficientNet-Lite0 teacher at 128 px, without perceptual loss or GAN.
    "cpu-small": {
        "model_preset": "evotok-small",
        "model_overrides": {"codebook_size": 512, "ema_warmup_steps": 0, "decoder_res_blocks_per_level": 1},
        "teacher": "efficientnet-lite0",
        "teacher_image_size": 128,
        "train_data": "bundled",
        "eval_data": "bundled",
        "train_batch_size": 8,
        "max_train_steps": 750,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 30,
        **_OFFLINE_LOSSES,
        "checkpointing_steps": 250,
        "log_steps": 50,
    },
    # EvoTok in miniature (evotok_hf.miniature): pixel depth 4, semantic depth 16, the paper's losses (L2 + commitment +
    # cosine and 4-fold cosine to the teacher; no perceptual loss or GAN) on EvoTok Shapes
    # (--train_data: a folder of train / validation parquet files), teacher and encoder = the mini-SigLIP folder.
    "shapes": {
        "model_preset": "evotok-shapes",
        "model_overrides": {"ema_warmup_steps": 0},
        "encoder_pretrained": "outputs/demo/siglip",
        "teacher": "outputs/demo/siglip",
        "train_data": "outputs/demo/data/shapes_parquet",
        "eval_data": "outputs/demo/data/shapes_parquet",
        "train_batch_size": 16,
        "max_train_steps": 1200,
        "learning_rate": 1e-3,
        "mixed_precision": "bf16",
        "attn_implementation": "eager",
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 50,
        **_OFFLINE_LOSSES,
        "semantic_fold": 4,
        "checkpointing_steps": 0,
        "log_steps": 50,
    },
}


def training_arguments_from_preset(name: str, **overrides) -> TokenizerTrainingArguments:
    if name not in TRAINING_PRESETS:
        raise ValueError(f"Unknown training preset {name!r}; available: {sorted(TRAINING_PRESETS)}")
    values = {**TRAINING_PRESETS[name], **overrides}
    return TokenizerTrainingArguments(**values)


__all__ = ["TRAINING_PRESETS", "TokenizerTrainingArguments", "training_arguments_from_preset"]
