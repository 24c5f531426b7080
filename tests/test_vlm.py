"""EvoTok VLM (understanding side): config, model and processor on a tiny Qwen2 + the "evotok-tiny" tokenizer."""

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config
from vlm_helpers import understanding_vlm_config, word_level_tokenizer

from evotok_hf.modeling.configuration_evotok import EvoTokConfig
from evotok_hf.modeling.configuration_evotok_vlm import EvoTokVLMConfig
from evotok_hf.modeling.modeling_evotok_vlm import EvoTokForConditionalGeneration
from evotok_hf.processing.image_processing_evotok import EvoTokImageProcessor
from evotok_hf.processing.processing_evotok import EvoTokProcessor

CORPUS = ["user describe the image please", "assistant a cat on a red mat", "what colour is the sky", "blue green"]


@pytest.fixture(scope="module")
def text_tokenizer():
    return word_level_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def vision_config():
    return EvoTokConfig.from_preset("evotok-tiny")


@pytest.fixture(scope="module")
def vlm(text_tokenizer, vision_config):
    torch.manual_seed(0)
    return EvoTokForConditionalGeneration(understanding_vlm_config(text_tokenizer, vision_config)).eval()


@pytest.fixture(scope="module")
def processor(text_tokenizer, vision_config):
    size = vision_config.image_size
    return EvoTokProcessor(
        image_processor=EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash"),
        tokenizer=text_tokenizer,
        num_image_tokens=vision_config.grid_size**2,
        boi_token="<boi>",
        eoi_token="<eoi>",
    )


def pil_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


def greedy(model, inputs, image_token_id, **kwargs):
    # A random LM may pick the placeholder token; forbidding it keeps no-cache decoding (which re-merges the images
    # over the whole sequence) well defined.
    return model.generate(
        **inputs, max_new_tokens=6, do_sample=False, suppress_tokens=[image_token_id], pad_token_id=0, **kwargs
    )


# ----------------------------------------------------------------------------- config
def test_config_defaults_and_round_trip(text_tokenizer, vision_config, tmp_path):
    config = EvoTokVLMConfig()
    assert isinstance(config.vision_config, EvoTokConfig) and config.text_config.model_type == "qwen2"
    assert (config.wrap_image_tokens, config.projector_hidden_act) == (False, "gelu")
    assert (config.has_understanding_head, config.has_generation_head) == (True, False)
    assert config.num_image_tokens == 256

    config = understanding_vlm_config(text_tokenizer, vision_config)
    assert config.tie_word_embeddings is True  # follows the text config
    assert config.num_image_tokens == vision_config.grid_size**2
    config.save_pretrained(tmp_path)
    loaded = EvoTokVLMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"image_token_id": 10_000}, "image_token_id"),
        ({"boi_token_id": -1}, "boi_token_id"),
        ({"boi_token_id": None, "wrap_image_tokens": True}, "wrap_image_tokens"),
        ({"projector_hidden_act": "no-such-act"}, "projector_hidden_act"),
        ({"has_understanding_head": False}, "has_understanding_head"),
        ({"eoi_token_id": 2}, "eoi_token_id"),  # same id as the image token
    ],
)
def test_config_validation(text_tokenizer, vision_config, overrides, field):
    with pytest.raises(ValueError, match=field):
        understanding_vlm_config(text_tokenizer, vision_config, **overrides)


# ----------------------------------------------------------------------------- model
def test_structure_frozen_tokenizer_and_tied_head(vlm):
    assert vlm.lm_head.weight is vlm.get_input_embeddings().weight
    assert not any(p.requires_grad for p in vlm.vision_tower.parameters())
    assert all(p.requires_grad for p in vlm.multi_modal_projector.parameters())
    vlm.train()
    try:
        assert vlm.language_model.training and not vlm.vision_tower.training
    finally:
        vlm.eval()
    assert "EvoTokMultiModalProjector" in vlm._no_split_modules and "Qwen2DecoderLayer" in vlm._no_split_modules


def test_image_features_land_at_image_token_positions(vlm, processor):
    inputs = processor(images=pil_images(2), text=["user <image> describe", "<image> what colour"], padding=True,
                       return_tensors="pt")  # fmt: skip
    captured = {}

    def capture(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"]

    handle = vlm.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = vlm(**inputs)
            features = vlm.get_image_features(pixel_values=inputs.pixel_values)
    finally:
        handle.remove()
    grid_tokens = vlm.config.num_image_tokens
    assert features.shape == (2, grid_tokens, vlm.config.text_config.hidden_size)
    mask = inputs.input_ids == vlm.config.image_token_id
    assert mask.sum(1).tolist() == [grid_tokens, grid_tokens]
    embeds = captured["inputs_embeds"]
    torch.testing.assert_close(embeds[mask], features.reshape(-1, features.shape[-1]), rtol=0, atol=0)
    torch.testing.assert_close(embeds[~mask], vlm.get_input_embeddings()(inputs.input_ids)[~mask], rtol=0, atol=0)
    torch.testing.assert_close(out.image_hidden_states, features)


def test_image_token_count_mismatch_raises(vlm, processor):
    inputs = processor(images=pil_images(1), text="user <image> describe", return_tensors="pt")
    input_ids = inputs.input_ids.clone()
    input_ids[0, input_ids[0].tolist().index(vlm.config.image_token_id)] = 7  # one placeholder fewer
    with pytest.raises(ValueError, match="image tokens"):
        vlm(input_ids=input_ids, pixel_values=inputs.pixel_values)
    with pytest.raises(ValueError, match="image tokens"):  # two images for one placeholder run
        vlm(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values.repeat(2, 1, 1, 1))


def test_loss_is_shifted_cross_entropy_with_ignore_index(vlm, processor):
    inputs = processor(images=pil_images(1), text="user <image> describe the image please", return_tensors="pt")
    labels = inputs.input_ids.clone()
    labels[labels == vlm.config.image_token_id] = -100
    labels[0, :2] = -100
    out = vlm(**inputs, labels=labels)
    vocab = vlm.config.text_config.vocab_size
    expected = F.cross_entropy(out.logits[0, :-1].float().reshape(-1, vocab), labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert vlm.multi_modal_projector.linear_1.weight.grad is not None
    assert all(p.grad is None for p in vlm.vision_tower.parameters())
    vlm.zero_grad(set_to_none=True)


def test_greedy_generate_with_and_without_cache_agree(vlm, processor):
    inputs = processor(images=pil_images(1), text="user <image> describe", return_tensors="pt")
    image_token_id = vlm.config.image_token_id
    cached = greedy(vlm, inputs, image_token_id, use_cache=True)
    uncached = greedy(vlm, inputs, image_token_id, use_cache=False)
    assert cached.shape[1] == inputs.input_ids.shape[1] + 6
    assert torch.equal(cached, uncached)


def test_prepare_inputs_passes_images_only_while_cache_is_empty(vlm, processor):
    inputs = processor(images=pil_images(1), text="user <image>", return_tensors="pt")
    with torch.no_grad():
        out = vlm(**inputs, use_cache=True)
    step = vlm.prepare_inputs_for_generation(
        inputs.input_ids, past_key_values=out.past_key_values, pixel_values=inputs.pixel_values, use_cache=True
    )
    assert "pixel_values" not in step
    first = vlm.prepare_inputs_for_generation(
        inputs.input_ids, past_key_values=None, image_codes=torch.zeros(1), is_first_iteration=True
    )
    assert "image_codes" in first


@pytest.mark.parametrize("with_image", [True, False])
def test_generate_from_inputs_embeds_equals_generate_from_input_ids(vlm, processor, with_image):
    """`generate(inputs_embeds=...)` (what clients that build their own embeddings call) continues the prompt exactly as
    `generate(input_ids=...)`; the image placeholders are found in the embeddings themselves."""
    if with_image:
        inputs = processor(images=pil_images(1), text="user <image> describe", return_tensors="pt")
    else:
        inputs = processor(text="what colour is the sky", return_tensors="pt")
    image_token_id = vlm.config.image_token_id
    from_ids = greedy(vlm, inputs, image_token_id)
    embedded = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        embedded["inputs_embeds"] = vlm.get_input_embeddings()(inputs.input_ids)
    from_embeds = greedy(vlm, embedded, image_token_id)
    assert torch.equal(from_embeds, from_ids[:, inputs.input_ids.shape[1] :])


def test_forward_follows_return_dict(vlm, processor, text_tokenizer, vision_config):
    """`return_dict=False`, as an argument or in the config, gives the output's tuple (transformers' convention),
    for the full model and for the backbone."""
    inputs = processor(images=pil_images(1), text="user <image> describe", return_tensors="pt")
    labels = inputs.input_ids.masked_fill(inputs.input_ids == vlm.config.image_token_id, -100)

    def same(as_tuple, as_dict):
        assert isinstance(as_tuple, tuple)
        expected = as_dict.to_tuple()
        assert len(as_tuple) == len(expected)
        for got, want in zip(as_tuple, expected):
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want)
            elif isinstance(want, tuple):  # hidden states
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))

    with torch.no_grad():
        for model, kwargs in ((vlm, {"labels": labels}), (vlm.model, {})):
            as_dict = model(**inputs, **kwargs)
            same(model(**inputs, **kwargs, return_dict=False), as_dict)
            same(model(**inputs, **kwargs, output_hidden_states=True, return_dict=False),
                 model(**inputs, **kwargs, output_hidden_states=True))  # fmt: skip

    torch.manual_seed(0)
    config = understanding_vlm_config(text_tokenizer, vision_config, return_dict=False)
    model = EvoTokForConditionalGeneration(config).eval()
    with torch.no_grad():
        same(model(**inputs, labels=labels), model(**inputs, labels=labels, return_dict=True))
        same(model.model(**inputs), model.model(**inputs, return_dict=True))


def test_batched_left_padded_generation_matches_one_by_one(vlm, processor):
    texts = ["user <image> describe the image please", "<image> what"]
    images = pil_images(2, seed=3)
    image_token_id = vlm.config.image_token_id
    batch = processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    assert (batch.attention_mask[1] == 0).any()  # the second prompt really is padded
    batched = greedy(vlm, batch, image_token_id)[:, batch.input_ids.shape[1]:]
    with torch.no_grad():
        batched_last_logits = vlm(**batch).logits[:, -1]
    for i, (text, image) in enumerate(zip(texts, images)):
        single = processor(images=[image], text=text, return_tensors="pt")
        alone = greedy(vlm, single, image_token_id)[:, single.input_ids.shape[1]:]
        # A row that hits EOS early is padded in the batch; the single run just stops.
        assert torch.equal(batched[i, : alone.shape[1]], alone[0]), i
        assert (batched[i, alone.shape[1] :] == 0).all(), i
        with torch.no_grad():
            torch.testing.assert_close(batched_last_logits[i], vlm(**single).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_image_codes_path_equals_pixel_values_path(vlm, processor):
    inputs = processor(images=pil_images(2), text=["<image> describe", "user <image>"], padding=True,
                       return_tensors="pt")  # fmt: skip
    codes = vlm.vision_tower.encode(inputs.pixel_values).codes
    with torch.no_grad():
        from_pixels = vlm(**inputs).logits
        from_codes = vlm(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, image_codes=codes).logits
    torch.testing.assert_close(from_codes, from_pixels, rtol=0, atol=0)
    with pytest.raises(ValueError, match="image_codes"):
        vlm.get_image_features(image_codes=codes[..., :2])
    with pytest.raises(ValueError, match="at most one"):
        vlm(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, image_codes=codes)


def test_save_and_load_round_trip(vlm, processor, tmp_path):
    inputs = processor(images=pil_images(1), text="user <image> describe", return_tensors="pt")
    vlm.save_pretrained(tmp_path)
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path)
    assert not loaded.training and not loaded.vision_tower.training
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, vlm(**inputs).logits, rtol=0, atol=0)
    for name, tensor in vlm.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_bf16_load_keeps_codebooks_fp32(vlm, tmp_path):
    vlm.save_pretrained(tmp_path)
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.vision_tower.quantizer.codebook.dtype == torch.float32
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.vision_tower.quantizer.codebook, vlm.vision_tower.quantizer.codebook)


# ----------------------------------------------------------------------------- processor
def test_processor_expands_placeholders(processor, vision_config):
    grid_tokens = vision_config.grid_size**2
    out = processor(images=pil_images(2), text=["<image> a <image> b"], return_tensors="pt")
    image_id = processor.image_token_id
    assert (out.input_ids == image_id).sum().item() == 2 * grid_tokens
    assert out.input_ids.shape[1] == 2 * grid_tokens + 2
    assert out.pixel_values.shape == (2, 3, vision_config.image_size, vision_config.image_size)
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert processor.image_processor.resize_mode == "squash"


def test_processor_wraps_image_tokens_when_asked(processor):
    wrapped = EvoTokProcessor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer,
        num_image_tokens=processor.num_image_tokens, boi_token="<boi>", eoi_token="<eoi>", wrap_image_tokens=True,
    )  # fmt: skip
    ids = wrapped(images=pil_images(1), text="a <image> b").input_ids[0]
    n = processor.num_image_tokens
    assert ids[1] == wrapped.boi_token_id and ids[2 + n] == wrapped.eoi_token_id
    assert ids[2 : 2 + n] == [wrapped.image_token_id] * n


def test_processor_errors(processor):
    with pytest.raises(ValueError, match="placeholder"):
        processor(images=pil_images(2), text="only one <image>")
    with pytest.raises(ValueError, match="placeholder"):
        processor(text="<image> with no image")
    with pytest.raises(ValueError, match="wrap_image_tokens"):
        EvoTokProcessor(tokenizer=processor.tokenizer, wrap_image_tokens=True)
    with pytest.raises(ValueError, match="image_token"):
        EvoTokProcessor(tokenizer=processor.tokenizer, image_token="<nope>")


def test_processor_default_image_processor_squashes(processor):
    default = EvoTokProcessor(tokenizer=processor.tokenizer)
    assert default.image_processor.resize_mode == "squash" and default.num_image_tokens == 256


def test_auto_classes_round_trip(vlm, processor, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import evotok_hf  # noqa: F401  (registers the Auto classes)

    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, EvoTokForConditionalGeneration) and isinstance(loaded_processor, EvoTokProcessor)
    assert loaded_processor.image_processor.resize_mode == "squash"
    inputs = loaded_processor(images=pil_images(1), text=["<image> describe the image"], return_tensors="pt")
    reference = processor(images=pil_images(1), text=["<image> describe the image"], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, vlm(**reference).logits, rtol=0, atol=0)
    from transformers import AutoModelForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), EvoTokForConditionalGeneration)


def test_eager_equals_sdpa(text_tokenizer, vision_config, processor, vlm):
    eager_config = understanding_vlm_config(text_tokenizer, vision_config)
    eager_config._attn_implementation = "eager"
    eager = EvoTokForConditionalGeneration(eager_config).eval()
    eager.load_state_dict(vlm.state_dict())
    assert eager.config.text_config._attn_implementation == "eager"
    inputs = processor(images=pil_images(2), text=["user <image> describe", "<image> what colour"], padding=True,
                       return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).logits, vlm(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_same_gradients(text_tokenizer, vision_config, processor):
    torch.manual_seed(0)
    model = EvoTokForConditionalGeneration(understanding_vlm_config(text_tokenizer, vision_config)).train()
    inputs = processor(images=pil_images(1), text="user <image> describe the image please", return_tensors="pt")
    labels = inputs.input_ids.masked_fill(inputs.input_ids == model.config.image_token_id, -100)

    def grads():
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.language_model.modules())
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(k.startswith("model.multi_modal_projector") for k in plain)
    assert not any(k.startswith("vision_tower") for k in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_from_components_keeps_the_llm_text_behaviour(vision_config, tmp_path):
    """A pretrained LLM whose tokenizer lacks the image tokens: they are added, embeddings resized, weights copied,
    and text-only greedy decoding equals the bare LLM's (the new rows cannot win)."""
    from transformers import Qwen2ForCausalLM

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    llm_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                            eos_token="<eos>")
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(llm_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.5,
        pad_token_id=llm_tokenizer.pad_token_id, eos_token_id=llm_tokenizer.eos_token_id,
    )).eval()  # fmt: skip
    llm.save_pretrained(tmp_path / "llm")
    llm_tokenizer.save_pretrained(tmp_path / "llm")
    torch.manual_seed(1)
    from evotok_hf import EvoTokModel

    EvoTokModel(vision_config).save_pretrained(tmp_path / "tok")

    model, tokenizer = EvoTokForConditionalGeneration.from_components(str(tmp_path / "tok"), str(tmp_path / "llm"))
    model.eval()
    old_vocab = len(llm_tokenizer)
    assert len(tokenizer) == old_vocab + 3 and model.config.text_config.vocab_size == old_vocab + 3
    new_ids = [model.config.image_token_id, model.config.boi_token_id, model.config.eoi_token_id]
    assert sorted(new_ids) == list(range(old_vocab, old_vocab + 3))
    assert torch.equal(model.get_input_embeddings().weight[:old_vocab], llm.get_input_embeddings().weight)
    for name, value in EvoTokModel.from_pretrained(tmp_path / "tok").state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[name], value), name
    prompt = tokenizer(["what colour is the sky", "describe the image"], return_tensors="pt", padding=True,
                       padding_side="left")  # fmt: skip
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = llm.generate(**prompt, **settings)
    with torch.no_grad():
        got = model.generate(**prompt, **settings)
        # without suppression one of the new rows would be a candidate; with it they never appear
        assert not torch.isin(got[:, prompt.input_ids.shape[1]:], torch.tensor(new_ids)).any()
    assert torch.equal(got, expected)
    # an image prompt runs end to end
    processor = EvoTokProcessor(
        image_processor=EvoTokImageProcessor(size={"height": 32, "width": 32}, resize_mode="squash"),
        tokenizer=tokenizer, num_image_tokens=vision_config.grid_size**2,
    )
    inputs = processor(images=pil_images(1), text="<image> describe the image", return_tensors="pt")
    out = model.generate(**inputs, **settings)
    assert out.shape[1] > inputs.input_ids.shape[1]


def test_apply_chat_template_with_images_and_generate(vlm, processor, tmp_path):
    from evotok_hf.processing.processing_evotok import DEFAULT_CHAT_TEMPLATE

    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE  # the test tokenizer has none
    messages = [{"role": "user", "content": [{"type": "image", "image": pil_images(1)[0]},
                                             {"type": "text", "text": "describe the image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<image>") == 1 and text.endswith("<|im_start|>assistant\n")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    assert int((inputs["input_ids"] == vlm.config.image_token_id).sum()) == vlm.config.num_image_tokens
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    direct = processor(images=[messages[0]["content"][0]["image"]], text=text, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], direct["input_ids"])
    assert torch.equal(inputs["pixel_values"], direct["pixel_values"])
    out = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    processor.save_pretrained(tmp_path)
    assert EvoTokProcessor.from_pretrained(tmp_path).chat_template == DEFAULT_CHAT_TEMPLATE


def test_image_text_to_text_pipeline(vlm, processor, tmp_path):
    from transformers import pipeline

    import evotok_hf  # noqa: F401  (registers the Auto classes)

    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    messages = [{"role": "user", "content": [{"type": "image", "image": pil_images(1)[0]},
                                             {"type": "text", "text": "describe the image"}]}]
    result = pipe(text=messages, max_new_tokens=4, do_sample=False, return_full_text=False)
    assert isinstance(result[0]["generated_text"], str)


def test_device_map_auto_bf16_load_keeps_layers_whole_and_codebooks_fp32(vlm, processor, tmp_path):
    from transformers import AutoModelForImageTextToText

    import evotok_hf  # noqa: F401

    vlm.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto")
    assert model.vision_tower.quantizer.codebook.dtype == torch.float32
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.vision_tower.quantizer.codebook, vlm.vision_tower.quantizer.codebook)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    inputs = processor(images=pil_images(1), text="<image> describe the image", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
