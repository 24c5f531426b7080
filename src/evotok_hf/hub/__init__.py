"""Hub-facing tools: conversion of the authors' checkpoints, model-card rendering, remote-code export."""

# Direct imports are cheap: `import evotok_hf` has already loaded the model classes these modules use; the rest is
# torch, huggingface_hub and the standard library.
from .convert_official import (
    CheckpointConversionError,
    convert_generation_checkpoint,
    convert_tokenizer_checkpoint,
    convert_understanding_checkpoint,
    load_official_checkpoint,
)
from .model_card import render_tokenizer_card, render_vlm_card
from .remote_code import export_remote_code

__all__ = [
    "CheckpointConversionError",
    "convert_generation_checkpoint",
    "convert_tokenizer_checkpoint",
    "convert_understanding_checkpoint",
    "export_remote_code",
    "load_official_checkpoint",
    "render_tokenizer_card",
    "render_vlm_card",
]
