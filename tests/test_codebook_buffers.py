"""The codebooks are persistent buffers (as vector-quantize-pytorch keeps EMA codebooks), not frozen parameters.

What that buys: no optimizer, FSDP / ZeRO parameter sharding or `requires_grad` bookkeeping sees them, whatever
loading re-creates; what must not change: the state-dict keys (so folders saved while the codebook was an
`nn.Parameter`, and official conversions, still load), fp32 under half-precision loads, and the EMA training."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel

from evotok_hf import EvoTokConfig, EvoTokModel, EvoTokResidualQuantizer

QUANTIZER_STATE = {"codebook", "cluster_size_ema", "embed_ema", "ema_step"}


@pytest.fixture(scope="module")
def tiny_config():
    return EvoTokConfig.from_preset("evotok-tiny")


def save_with_parameter_codebook(model: EvoTokModel, folder) -> None:
    """Save `model` as the code before this change did: the codebook an `nn.Parameter` (requires_grad=False)."""
    quantizer = model.quantizer
    codebook = quantizer._buffers.pop("codebook")
    quantizer.codebook = nn.Parameter(codebook, requires_grad=False)
    try:
        model.save_pretrained(folder)
    finally:
        del quantizer._parameters["codebook"]
        quantizer.register_buffer("codebook", codebook)


def assert_codebooks_are_buffers(model: nn.Module) -> None:
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name in (n for n in model.state_dict() if n.rsplit(".", 1)[-1] in QUANTIZER_STATE):
        assert name not in parameters and name in buffers, name
    codebooks = [m.codebook for m in model.modules() if isinstance(m, EvoTokResidualQuantizer)]
    assert codebooks and not any(p is c for p in model.parameters() for c in codebooks)


def test_quantizer_holds_no_parameters_and_keeps_its_state_keys():
    quantizer = EvoTokResidualQuantizer(codebook_size=16, codebook_dim=4, pixel_depth=2, semantic_depth=3)
    assert list(quantizer.parameters()) == []
    assert set(quantizer.state_dict()) == QUANTIZER_STATE
    assert {name for name, _ in quantizer.named_buffers()} == QUANTIZER_STATE
    assert quantizer.codebook.dtype == quantizer.embed_ema.dtype == torch.float32
    assert torch.equal(quantizer.embed_ema, quantizer.codebook) and quantizer.embed_ema is not quantizer.codebook


def test_codebooks_are_buffers_when_built_and_after_loading(tmp_path, tiny_config):
    """`from_pretrained` re-creates every loaded parameter with requires_grad=True; a buffer stays a buffer, so no
    re-freezing is needed for the codebooks."""
    torch.manual_seed(0)
    model = EvoTokModel(tiny_config)
    assert_codebooks_are_buffers(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert_codebooks_are_buffers(loaded)
    assert torch.equal(loaded.quantizer.codebook, model.quantizer.codebook)


def test_an_optimizer_over_all_parameters_never_moves_the_codebooks(tiny_config):
    """A training step with an optimizer over `model.parameters()` (weight decay included) leaves the codebooks to
    the EMA: in eval mode (no EMA update) they are unchanged while the other weights move."""
    torch.manual_seed(0)
    model = EvoTokModel(tiny_config).eval()
    before = model.quantizer.codebook.clone()
    weight_before = model.post_quant_conv.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    output = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    (output.reconstruction.square().mean() + output.semantic_features.square().mean()).backward()
    optimizer.step()
    assert not any(p is model.quantizer.codebook for group in optimizer.param_groups for p in group["params"])
    assert torch.equal(model.quantizer.codebook, before)
    assert not torch.equal(model.post_quant_conv.weight, weight_before)


def test_training_mode_still_updates_the_codebooks_by_ema(tiny_config):
    torch.manual_seed(0)
    model = EvoTokModel(tiny_config).train()
    before = model.quantizer.codebook.clone()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert not torch.equal(model.quantizer.codebook, before)
    assert int(model.quantizer.ema_step) == 1


def test_folder_saved_with_parameter_codebooks_loads_with_the_same_keys(tmp_path, tiny_config):
    """A folder written while the codebook was a frozen `nn.Parameter` holds exactly the keys (and dtypes) a folder
    written now holds, and loads without missing or unexpected keys, codebooks bit-identical, in fp32 and bf16."""
    torch.manual_seed(0)
    model = EvoTokModel(tiny_config).eval()
    save_with_parameter_codebook(model, tmp_path / "old")
    model.save_pretrained(tmp_path / "new")
    old, new = load_file(tmp_path / "old" / "model.safetensors"), load_file(tmp_path / "new" / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in old.items()} == {k: (v.dtype, v.shape) for k, v in new.items()}
    for name in QUANTIZER_STATE:
        assert torch.equal(old[f"quantizer.{name}"], new[f"quantizer.{name}"])
    assert json.loads((tmp_path / "old" / "config.json").read_text()) == json.loads(
        (tmp_path / "new" / "config.json").read_text()
    )
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for dtype in (torch.float32, torch.bfloat16):
        loaded, info = EvoTokModel.from_pretrained(tmp_path / "old", dtype=dtype, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert_codebooks_are_buffers(loaded)
        assert loaded.quantizer.codebook.dtype == torch.float32
        assert torch.equal(loaded.quantizer.codebook, model.quantizer.codebook)
        if dtype == torch.float32:
            with torch.no_grad():
                assert torch.equal(loaded.eval().encode(pixels).codes, model.encode(pixels).codes)


def test_vlm_codebooks_are_buffers_and_stay_fp32_in_a_bf16_load(tmp_path):
    from transformers import AutoConfig, Qwen2Config

    from evotok_hf import EvoTokForConditionalGeneration

    text = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2)  # fmt: skip
    config = AutoConfig.for_model("evotok_vlm", vision_config=EvoTokConfig.from_preset("evotok-tiny").to_dict(),
                                  text_config=text.to_dict(), image_token_id=5)  # fmt: skip
    torch.manual_seed(0)
    vlm = EvoTokForConditionalGeneration(config)
    assert_codebooks_are_buffers(vlm)
    vlm.save_pretrained(tmp_path)
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert_codebooks_are_buffers(loaded)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.vision_tower.quantizer.codebook.dtype == torch.float32
    assert torch.equal(loaded.vision_tower.quantizer.codebook, vlm.vision_tower.quantizer.codebook)
    assert "model.vision_tower.quantizer.codebook" in load_file(tmp_path / "model.safetensors")
