"""Weights missing from a checkpoint are initialised exactly as `__init__` initialises them: the tokenizer (whose
SigLIP encoder is a transformers-native model inside a custom one), the VLM (SigLIP and the LLM inside) with and
without the generation head, and the depth head.

`__init__` and a load draw their random numbers in different orders (construction first, or only the missing
tensors), so the comparison reseeds before every module's initialisation, as transformers' own
`test_can_init_all_missing_weights` does: each tensor then depends only on the rule that initialises it."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from vlm_helpers import bpe_tokenizer, tiny_vlm_config

from evotok_hf import (
    EvoTokConfig,
    EvoTokDepthHeadConfig,
    EvoTokDepthTransformer,
    EvoTokForConditionalGeneration,
    EvoTokModel,
)


@pytest.fixture
def per_module_seed(monkeypatch):
    """Reseed before each module's initialisation (every path, `__init__` or loading, goes through
    `PreTrainedModel._initialize_weights` once per module)."""
    initialize = PreTrainedModel._initialize_weights

    def seeded(self, module, *args, **kwargs):
        torch.manual_seed(0)
        return initialize(self, module, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)


def tokenizer_model():
    return EvoTokModel(EvoTokConfig.from_preset("evotok-tiny"))


def vlm(generation: bool):
    tokenizer = bpe_tokenizer(["a red bicycle on a green hill", "a cat on a mat"], vocab_size=300)
    overrides = {"has_generation_head": True, "wrap_image_tokens": True} if generation else {}
    return EvoTokForConditionalGeneration(tiny_vlm_config(tokenizer, **overrides))


def depth_head():
    return EvoTokDepthTransformer(EvoTokDepthHeadConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        llm_hidden_size=48, code_dim=8, codebook_size=64,
                                                        pixel_depth=2))  # fmt: skip


# Whole modules are dropped (a module initialises its tensors together, e.g. SigLIP's attention sets q/k/v/out):
# SigLIP layers and pooling head, the custom decoders and the quantizer's EMA state, LLM layers, depth-head blocks.
ENCODER = ("encoder.encoder.layers.0.", "encoder.encoder.layers.2.", "encoder.head.", "encoder.embeddings.")
OWN = ("semantic_decoder.blocks.1.", "semantic_decoder.cls_token", "pixel_decoder.mid.", "encode_task_layer.",
       "quantizer.embed_ema", "quantizer.cluster_size_ema")  # fmt: skip
CASES = {
    "tokenizer": (tokenizer_model, ENCODER + OWN),
    "vlm": (lambda: vlm(False), tuple(f"model.vision_tower.{p}" for p in ENCODER + OWN)
            + ("model.language_model.layers.1.", "model.language_model.norm.", "model.multi_modal_projector.")),
    "vlm_generation": (lambda: vlm(True), tuple(f"model.vision_tower.{p}" for p in ENCODER)
                       + ("model.language_model.layers.0.", "model.generation_projector.", "depth_head.layers.1.",
                          "depth_head.classifiers.0.", "depth_head.depth_embeddings")),
    "depth_head": (depth_head, ("layers.0.", "classifiers.1.", "hidden_proj.", "depth_embeddings")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_missing_weights_get_what_init_gives(case, per_module_seed, tmp_path):
    build, dropped_prefixes = CASES[case]
    model = build()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = {key for key in state if key.startswith(dropped_prefixes)}
    assert {p for p in dropped_prefixes if not any(k.startswith(p) for k in dropped)} == set()
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    torch.manual_seed(123)  # what was drawn before the load must not matter either
    loaded = type(model).from_pretrained(tmp_path)
    expected = model.state_dict()
    different = sorted(k for k, v in loaded.state_dict().items() if not torch.equal(v, expected[k]))
    assert different == [], f"initialised unlike __init__: {different}"
