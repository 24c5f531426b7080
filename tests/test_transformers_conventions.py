"""transformers conventions that generic clients rely on, checked directly on our classes (transformers' own common
tests run them too, in test_transformers_common.py, when its sdist can be fetched): `return_dict` on the tokenizer,
`set_attn_implementation` reaching every attention module, the tensor-parallel plan of the tied LM head."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokVLMConfig

PAD, IMAGE, BOI, EOI, EOS, VOCAB = 0, 1, 2, 3, 4, 64


def tiny_vlm(**overrides) -> EvoTokForConditionalGeneration:
    """Both heads: the tokenizer's decoders, SigLIP, the LLM and the depth head all hold attention modules."""
    vision = EvoTokConfig.from_preset("evotok-tiny")
    text = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    config = EvoTokVLMConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE, boi_token_id=BOI,
        eoi_token_id=EOI, has_generation_head=True,
        depth_head_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "resid_dropout": 0.0},
        **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return EvoTokForConditionalGeneration(config).eval()


def attention_implementations(model) -> dict[str, str]:
    """`{module path: implementation}` of every attention module that dispatches through transformers' attention
    interface (ours and transformers'; SigLIP's pooling head is a plain `nn.MultiheadAttention`)."""
    return {
        name: module.config._attn_implementation
        for name, module in model.named_modules()
        if type(module).__name__.endswith(("Attention", "AttnBlock")) and hasattr(module, "config")
    }


# ----------------------------------------------------------------------------- return_dict
def test_tokenizer_forward_follows_return_dict(tiny_model, tiny_images):
    with torch.no_grad():
        as_dict = tiny_model(tiny_images)
        by_argument = tiny_model(tiny_images, return_dict=False)
        tiny_model.config.return_dict = False
        by_config = tiny_model(tiny_images)
        overridden = tiny_model(tiny_images, return_dict=True)
    assert type(overridden) is type(as_dict)
    for out in (by_argument, by_config):
        assert isinstance(out, tuple)
        expected = as_dict.to_tuple()
        assert len(out) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_tokenizer_forward_refuses_outputs_it_cannot_give(tiny_model, tiny_images):
    """The tokenizer returns no per-layer hidden states or attention weights: asking for them is an error, not a
    silent no-op."""
    for name in ("output_hidden_states", "output_attentions"):
        with pytest.raises(TypeError, match=name):
            tiny_model(tiny_images, **{name: True})


# ----------------------------------------------------------------------------- attention implementation
def test_set_attn_implementation_reaches_every_attention_module():
    model = tiny_vlm()
    ours = ("EvoTokSemanticAttention", "EvoTokAttnBlock", "EvoTokDepthAttention")
    found = {type(m).__name__ for m in model.modules()}
    assert set(ours) <= found and {"SiglipAttention", "Qwen2Attention"} <= found
    assert set(attention_implementations(model).values()) == {"sdpa"}

    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    depth_input = torch.randn(2, model.config.text_config.hidden_size)
    with torch.no_grad():
        sdpa = (model.vision_tower(pixels), model.depth_head(depth_input, output_attentions=True))

    logger = logging.get_logger("transformers.modeling_utils")
    for implementation in ("eager", "sdpa"):
        with CaptureLogger(logger) as captured:
            model.set_attn_implementation(implementation)
        assert "does not support setting its attention implementation" not in captured.out
        assert set(attention_implementations(model).values()) == {implementation}

        with torch.no_grad():
            tokenizer_out, head_out = model.vision_tower(pixels), model.depth_head(depth_input, output_attentions=True)
        # only the eager kernel returns attention weights: the head really switched kernels
        assert len(head_out.attentions) == (model.config.depth_head_config.num_hidden_layers if implementation ==
                                            "eager" else 0)  # fmt: skip
        torch.testing.assert_close(head_out.logits, sdpa[1].logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(tokenizer_out.codes, sdpa[0].codes)
        torch.testing.assert_close(tokenizer_out.reconstruction, sdpa[0].reconstruction, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tokenizer_out.semantic_features, sdpa[0].semantic_features, rtol=1e-4, atol=1e-5)


def test_loading_with_eager_attention_reaches_every_attention_module(tmp_path):
    tiny_vlm().save_pretrained(tmp_path)
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert set(attention_implementations(loaded).values()) == {"eager"}


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_undeclared_attention_implementations_are_refused(implementation):
    """Only eager and SDPA are declared (and checked against each other): the others are refused up front rather than
    run through kernels nobody has checked with the depth head's cached-prefix mask or the decoders."""
    model = tiny_vlm()
    for part in (model, model.vision_tower, model.depth_head):
        with pytest.raises(ValueError, match="does not support"):
            part.set_attn_implementation(implementation)
    assert set(attention_implementations(model).values()) == {"sdpa"}


# ----------------------------------------------------------------------------- tensor parallelism
def test_tied_lm_head_has_the_tensor_parallel_entry_of_the_llm_head():
    """The LLM's plan shards `embed_tokens` on the vocabulary; the tied head reads that same weight, so the head needs
    the entry the LLM's own causal-LM class gives it."""
    model = tiny_vlm()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.tp_plan["model.language_model.embed_tokens"] == "embedding_rowwise"
    assert model.tp_plan["lm_head"] == Qwen2ForCausalLM._tp_plan["lm_head"]
