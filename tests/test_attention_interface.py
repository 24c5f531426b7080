"""Attention through transformers' attention interface: every attention module of the tokenizer, the LLM and the depth
head runs the kernel its config names (`attn_implementation=` at loading, `set_attn_implementation` later, a string
for all parts or a dict keyed by sub-config), eager and SDPA agree in float64, and the capability flags the classes
declare hold (`_supports_attention_backend`: a kernel registered by a serving backend gets the attention kwargs and no
mask it did not ask for; `_can_compile_fullgraph`: a compiled forward has no graph break)."""

import copy

import pytest
import torch
from transformers import Qwen2Config
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from evotok_hf import (
    EvoTokConfig,
    EvoTokDepthHeadConfig,
    EvoTokDepthTransformer,
    EvoTokForConditionalGeneration,
    EvoTokModel,
    EvoTokVLMConfig,
)

PAD, IMAGE, BOI, EOI, EOS, VOCAB = 0, 1, 2, 3, 4, 64
TOKENIZER_ATTENTION = {"SiglipAttention", "EvoTokSemanticAttention", "EvoTokAttnBlock"}
LLM_ATTENTION = {"Qwen2Attention"}
DEPTH_HEAD_ATTENTION = {"EvoTokDepthAttention"}


def tiny_vlm() -> EvoTokForConditionalGeneration:
    """Both heads, so all five kinds of attention module are there (SigLIP's, the two decoders', the LLM's, the
    depth head's)."""
    text = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS, max_position_embeddings=64,
    )  # fmt: skip
    config = EvoTokVLMConfig(
        vision_config=EvoTokConfig.from_preset("evotok-tiny", encoder_config={"num_hidden_layers": 2}).to_dict(),
        text_config=text.to_dict(), image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI,
        has_generation_head=True,
        depth_head_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "resid_dropout": 0.0},
    )  # fmt: skip
    torch.manual_seed(0)
    return EvoTokForConditionalGeneration(config).eval()


def reading_inputs(model: EvoTokForConditionalGeneration, batch: int = 2) -> dict:
    """`text, <image> x grid*grid, text` per row, with its image."""
    generator = torch.Generator().manual_seed(1)
    image_tokens = torch.full((batch, model.config.num_image_tokens), IMAGE)
    text = torch.randint(5, VOCAB, (batch, 4), generator=generator)
    input_ids = torch.cat([text[:, :2], image_tokens, text[:, 2:]], dim=1)
    size = model.config.vision_config.image_size
    pixel_values = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    return {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": torch.ones_like(input_ids)}


def depth_head_inputs(head: EvoTokDepthTransformer, batch: int = 3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    config = head.config
    hidden = torch.randn(batch, config.llm_hidden_size, generator=generator, dtype=dtype)
    sums = torch.randn(batch, config.pixel_depth - 1, config.code_dim, generator=generator, dtype=dtype).cumsum(1)
    return hidden, sums


def run_every_part(model: EvoTokForConditionalGeneration) -> dict[str, torch.Tensor]:
    """One call through each attention module: the tokenizer's round trip, the VLM reading an image, the depth head
    teacher-forced and stepping through a cache."""
    inputs = reading_inputs(model)
    hidden, sums = depth_head_inputs(model.depth_head)
    with torch.no_grad():
        tokenizer = model.vision_tower(inputs["pixel_values"])
        cache = DynamicCache()
        first = model.depth_head(hidden, past_key_values=cache, use_cache=True).logits
        second = model.depth_head(None, sums[:, :1], past_key_values=cache, use_cache=True).logits
        return {
            "reconstruction": tokenizer.reconstruction,
            "semantic_features": tokenizer.semantic_features,
            "vlm_logits": model(**inputs).logits,
            "depth_head_logits": model.depth_head(hidden, sums).logits,
            "depth_head_cached_logits": torch.cat([first, second], dim=1),
        }


@pytest.fixture
def recorded_kernel_calls(monkeypatch):
    """A kernel registered under a name of its own, as a serving backend registers one: it records which attention
    modules call it, with which mask and kwargs, and computes what SDPA computes. Returns `(name, calls)`."""
    name, calls = "evotok_test_recording", []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append({"module": type(module).__name__, "mask": attention_mask, "kwargs": set(kwargs)})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    # `ALL_ATTENTION_FUNCTIONS` is the registry every modeling file reads; the entry is removed again after the test
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, name, recording_attention)
    return name, calls


# ----------------------------------------------------------------------------- reaching every attention module
def test_set_attn_implementation_runs_the_named_kernel_in_every_attention_module(recorded_kernel_calls):
    name, calls = recorded_kernel_calls
    model = tiny_vlm()
    with_sdpa = run_every_part(model)
    assert not calls

    model.set_attn_implementation(name)
    with_recording = run_every_part(model)
    assert {call["module"] for call in calls} == TOKENIZER_ATTENTION | LLM_ATTENTION | DEPTH_HEAD_ATTENTION
    # the same outputs, although the LLM and the depth head give this kernel no mask: it applies causality itself
    for key, value in with_sdpa.items():
        torch.testing.assert_close(with_recording[key], value, rtol=1e-5, atol=1e-6)

    calls.clear()
    model.set_attn_implementation("sdpa")
    run_every_part(model)
    assert not calls


def test_a_dict_sets_the_kernel_of_one_part(recorded_kernel_calls, tmp_path):
    """The way to ask for flash attention in the LLM alone (`{"text_config": "flash_attention_2"}`), with a kernel
    this CPU can run: at loading and later, only the named parts switch."""
    name, calls = recorded_kernel_calls
    model = tiny_vlm()
    model.set_attn_implementation({"text_config": name})
    run_every_part(model)
    assert {call["module"] for call in calls} == LLM_ATTENTION
    assert model.vision_tower.config._attn_implementation == "sdpa"

    model.save_pretrained(tmp_path)
    for parts, expected in (
        ({"text_config": name}, LLM_ATTENTION),
        ({"depth_head_config": name, "vision_config": name}, DEPTH_HEAD_ATTENTION | TOKENIZER_ATTENTION),
        ({"vision_config": {"encoder_config": name}}, {"SiglipAttention"}),
    ):
        calls.clear()
        run_every_part(EvoTokForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=parts).eval())
        assert {call["module"] for call in calls} == expected, parts


def test_a_backend_kernel_gets_the_attention_kwargs_and_no_mask(recorded_kernel_calls):
    """What `_supports_attention_backend` promises: a kernel transformers has no mask function for gets `mask=None`
    (it applies causality itself, from `module.is_causal`) and the kwargs of the top-level forward."""
    name, calls = recorded_kernel_calls
    model = tiny_vlm()
    assert EvoTokForConditionalGeneration.is_backend_compatible() and EvoTokDepthTransformer.is_backend_compatible()
    model.set_attn_implementation({"text_config": name, "depth_head_config": name})
    hidden, sums = depth_head_inputs(model.depth_head)
    with torch.no_grad():
        model(**reading_inputs(model), backend_metadata="llm")
        model.depth_head(hidden, sums, backend_metadata="depth head")
    assert {call["module"] for call in calls} == LLM_ATTENTION | DEPTH_HEAD_ATTENTION
    assert all(call["mask"] is None and "backend_metadata" in call["kwargs"] for call in calls)


# ----------------------------------------------------------------------------- eager and SDPA agree
def test_tokenizer_eager_matches_sdpa_in_float64():
    """Encode (SigLIP), decode (the pixel decoder's attention) and the semantic features (the semantic decoder's), each
    with both kernels in float64: equal codes, and the decoders' outputs the same to float64 rounding."""
    torch.manual_seed(0)
    sdpa = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).eval().double()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert {m.config._attn_implementation for m in (eager, eager.encoder)} == {"eager"}
    size = sdpa.config.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        encoded = {model: model.encode(pixels) for model in (sdpa, eager)}
        assert torch.equal(encoded[sdpa].codes, encoded[eager].codes)
        # SigLIP's own eager kernel takes its softmax in float32, so the encoder agrees to float32 rounding only
        latents = encoded[eager].encoder_latents, encoded[sdpa].encoder_latents
        torch.testing.assert_close(*latents, rtol=1e-6, atol=1e-8)
        codes = encoded[sdpa].codes
        pixel_codes = codes[..., : sdpa.config.pixel_depth]
        torch.testing.assert_close(eager.decode(pixel_codes), sdpa.decode(pixel_codes), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            eager.get_semantic_features(codes), sdpa.get_semantic_features(codes), rtol=1e-10, atol=1e-12
        )


def test_depth_head_eager_matches_sdpa_in_float64():
    """Teacher forcing, and a cache filled depth by depth and then in a chunk of two (the one call whose mask is
    neither full nor plain causal)."""
    config = EvoTokDepthHeadConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, code_dim=8,
                                   codebook_size=64, llm_hidden_size=24, pixel_depth=4, resid_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    sdpa = EvoTokDepthTransformer(config).eval().double()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    hidden, sums = depth_head_inputs(sdpa, dtype=torch.float64)

    def logits(model, chunks):
        cache, start = DynamicCache(), 0
        out = [model(hidden, past_key_values=cache, use_cache=True).logits]
        for size in chunks:
            out.append(model(None, sums[:, start : start + size], past_key_values=cache, use_cache=True).logits)
            start += size
        return torch.cat(out, dim=1)

    with torch.no_grad():
        reference = sdpa(hidden, sums).logits
        torch.testing.assert_close(eager(hidden, sums).logits, reference, rtol=1e-10, atol=1e-12)
        for chunks in ([1, 1, 1], [1, 2]):
            for model in (sdpa, eager):
                torch.testing.assert_close(logits(model, chunks), reference, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- compiling
# The `eager` backend only traces: a graph break still fails `fullgraph=True`, without code generation's minutes.
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_depth_head_compiles_with_fullgraph(implementation):
    assert EvoTokDepthTransformer._can_compile_fullgraph
    head = tiny_vlm().depth_head
    head.set_attn_implementation(implementation)
    hidden, sums = depth_head_inputs(head)
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, sums).logits, head(hidden, sums).logits)
        cache, plain_cache = DynamicCache(), DynamicCache()
        for step in (dict(hidden_states=hidden), dict(hidden_states=None, code_embedding_sums=sums[:, :1])):
            got = compiled(**step, past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(got, head(**step, past_key_values=plain_cache, use_cache=True).logits)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_vlm_decoding_step_compiles_with_fullgraph(cache_kind):
    """The step `generate` compiles (one new token over a filled cache), after a prefill that read the image."""
    assert EvoTokForConditionalGeneration._can_compile_fullgraph
    model = tiny_vlm()
    inputs = reading_inputs(model)
    length = inputs["input_ids"].shape[1]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    results = []
    for forward in (model, compiled):
        if cache_kind == "static":
            cache = StaticCache(config=model.config, max_cache_len=length + 4)
        else:
            cache = DynamicCache(config=model.config)
        with torch.no_grad():
            prefill = model(**inputs, past_key_values=cache, use_cache=True)
            step = forward(
                input_ids=prefill.logits[:, -1:].argmax(-1), attention_mask=torch.ones(2, length + 1, dtype=torch.long),
                position_ids=torch.full((2, 1), length), past_key_values=cache, use_cache=True,
            )  # fmt: skip
        results.append(step.logits)
    torch.testing.assert_close(results[1], results[0])


def test_vlm_generates_the_same_text_with_a_static_cache():
    model = tiny_vlm()
    inputs = reading_inputs(model)
    with torch.no_grad():
        dynamic = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        static = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert dynamic.shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(static, dynamic)
