"""Image generation: the depth head inside the VLM, the generation loss, and generate(generation_mode="image")."""

import json

import pytest
import torch
import torch.nn.functional as F
from vlm_helpers import T2I_PROMPTS, generate_codes, tiny_generation_vlm, tiny_processor, tiny_vlm_config

from evotok_hf import EvoTokForConditionalGeneration


def make_config(tokenizer, **overrides):
    return tiny_vlm_config(tokenizer, **{"has_generation_head": True, "has_understanding_head": False,
                                         "wrap_image_tokens": True, **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def processor(t2i_tokenizer):
    return tiny_processor(t2i_tokenizer, wrap_image_tokens=True, resize_mode="center_crop")


# ----------------------------------------------------------------------------- structure and config
def test_generation_head_structure(t2i_vlm, t2i_tokenizer):
    config = t2i_vlm.config
    head = config.depth_head_config
    vision = config.vision_config
    assert (head.code_dim, head.codebook_size, head.pixel_depth, head.llm_hidden_size) == (
        vision.codebook_dim, vision.codebook_size, vision.pixel_depth, config.text_config.hidden_size
    )  # fmt: skip
    assert len(t2i_vlm.depth_head.classifiers) == vision.pixel_depth  # no dead classifier heads
    assert t2i_vlm.generation_projector.linear_1.in_features == vision.codebook_dim
    assert not hasattr(t2i_vlm.model, "multi_modal_projector")  # generation-only checkpoint
    with pytest.raises(ValueError, match="boi_token_id"):
        make_config(t2i_tokenizer, boi_token_id=None, wrap_image_tokens=False)
    with pytest.raises(ValueError, match="no understanding head"):
        t2i_vlm.get_image_features(pixel_values=torch.zeros(1, 3, vision.image_size, vision.image_size))


def test_processor_image_mode(processor, t2i_tokenizer):
    inputs = processor(text=T2I_PROMPTS, generation_mode="image", return_tensors="pt")
    boi = t2i_tokenizer.convert_tokens_to_ids("<boi>")
    assert (inputs["input_ids"][:, -1] == boi).all() and (inputs["negative_input_ids"][:, -1] == boi).all()
    assert inputs["attention_mask"][0].all() and not inputs["attention_mask"][1].all()  # left padding
    text = t2i_tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    f"{T2I_PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n<boi>")  # fmt: skip
    negative = t2i_tokenizer.decode(inputs["negative_input_ids"][0][inputs["negative_attention_mask"][0].bool()])
    assert "<|im_start|>user\n <|im_end|>" in negative  # the authors' unconditional prompt: a single space
    with pytest.raises(ValueError, match="generation_mode"):
        processor(text="x", generation_mode="video")


# ----------------------------------------------------------------------------- training loss
def image_batch(processor, prompts):
    """Chat texts whose assistant turn is an image to generate (wrapped in the image start / end tokens)."""
    texts = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": [{"type": "image"}]}]  # fmt: skip
        text = processor.apply_chat_template(messages, tokenize=False)
        texts.append(text.replace(processor.image_token, processor.image_token_sequence(wrap=True)))
    return dict(processor.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False))


def test_loss_is_text_plus_depth_head_cross_entropy(t2i_vlm, processor, t2i_tokenizer):
    vision = t2i_vlm.config.vision_config
    batch = image_batch(processor, T2I_PROMPTS)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, vision.codebook_size, (2, vision.grid_size, vision.grid_size, vision.pixel_depth), generator=g)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == t2i_vlm.config.image_token_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = t2i_vlm(**batch, generation_codes=codes, labels=labels)
        torch.testing.assert_close(out.loss, out.text_loss + out.image_loss)
        # manual image loss: for every image position p, the hidden state at p - 1 starts a fresh, uncached depth
        # sequence over the true codes, one position at a time
        hidden = t2i_vlm.model(**batch, generation_codes=codes).last_hidden_state
        terms = []
        for row in range(2):
            positions = (batch["input_ids"][row] == t2i_vlm.config.image_token_id).nonzero().flatten().tolist()
            assert batch["input_ids"][row, positions[0] - 1] == t2i_vlm.config.boi_token_id
            for index, p in enumerate(positions):
                target = codes[row].reshape(-1, vision.pixel_depth)[index]
                embeddings = t2i_vlm.vision_tower.quantizer.codebook[torch.arange(vision.pixel_depth), target]
                sums = embeddings.cumsum(0)[None, :-1]
                logits = t2i_vlm.depth_head(hidden_states=hidden[row, p - 1][None], code_embedding_sums=sums).logits[0]
                terms.append(F.cross_entropy(logits.double(), target, reduction="none"))
        torch.testing.assert_close(out.image_loss.double(), torch.cat(terms).mean(), rtol=1e-5, atol=1e-6)
        # manual text loss: shifted cross-entropy where labels are set
        shifted = labels[:, 1:]
        keep = shifted != -100
        text = F.cross_entropy(out.logits[:, :-1][keep].double(), shifted[keep])
        torch.testing.assert_close(out.text_loss.double(), text, rtol=1e-5, atol=1e-6)
        # the image positions take the generation projector's embeddings of the code sums
        summed = t2i_vlm.vision_tower.quantizer.embed_codes(codes.flatten(1, 2))
        expected = t2i_vlm.generation_projector(summed)
        embeds = t2i_vlm.get_input_embeddings()(batch["input_ids"])
        merged = t2i_vlm.model._merge(embeds, batch["input_ids"] == t2i_vlm.config.image_token_id, expected, "x")
        reference = t2i_vlm.model.language_model(inputs_embeds=merged, attention_mask=batch["attention_mask"])
        torch.testing.assert_close(hidden, reference.last_hidden_state)


# ----------------------------------------------------------------------------- generate(generation_mode="image")
def test_greedy_with_and_without_caches_is_identical(t2i_vlm, processor):
    cached = generate_codes(t2i_vlm, processor, do_sample=False, guidance_scale=3.0)
    uncached = generate_codes(t2i_vlm, processor, do_sample=False, guidance_scale=3.0, use_cache=False)
    vision = t2i_vlm.config.vision_config
    assert cached.shape == (2, vision.grid_size, vision.grid_size, vision.pixel_depth)
    assert cached.dtype == torch.long and torch.equal(cached, uncached)
    assert cached.unique().numel() > 4  # not a degenerate constant output


@pytest.mark.parametrize("disable_compile", [True, False], ids=["static", "static-compiled"])
def test_static_cache_gives_the_dynamic_cache_codes(t2i_vlm, processor, disable_compile, monkeypatch):
    """`cache_implementation="static"`: a StaticCache and a (compiled) position step of fixed shapes, the depth loop,
    the code embedding and the LLM step in one; greedy codes, and sampled codes from the same seed (through the
    warpers), are those of the dynamic cache, batch and CFG included, and a second call (the compiled step reused)
    gives them again."""
    from transformers.cache_utils import StaticCache

    from evotok_hf.modeling import generation

    caches = []

    class RecordedStaticCache(StaticCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(generation, "StaticCache", RecordedStaticCache)
    if disable_compile:  # the static cache without compilation must not compile anything
        for name in ("_compiled_llm_step", "_compiled_position_step"):
            monkeypatch.setattr(generation, name, lambda: pytest.fail("compiled with disable_compile"))
    kwargs = {"guidance_scale": 3.0, "cache_implementation": "static", "disable_compile": disable_compile}
    dynamic = generate_codes(t2i_vlm, processor, do_sample=False, guidance_scale=3.0)
    assert not caches
    assert torch.equal(generate_codes(t2i_vlm, processor, do_sample=False, **kwargs), dynamic)
    assert torch.equal(generate_codes(t2i_vlm, processor, do_sample=False, **kwargs), dynamic)
    assert len(caches) == 2  # the static path ran, with a cache of its own each time
    if not disable_compile:
        assert generation._compiled_position_step.cache_info().currsize == 1
    seeded = {"do_sample": True, "generator": torch.Generator().manual_seed(3)}
    sampled = generate_codes(t2i_vlm, processor, **seeded, guidance_scale=3.0)
    seeded["generator"] = torch.Generator().manual_seed(3)
    assert torch.equal(generate_codes(t2i_vlm, processor, **seeded, **kwargs), sampled)
    assert sampled.unique().numel() > 4  # sampling, not a constant

    # through the warpers, with the per-position scores / guided logits and a streamer
    outputs, streamers = [], []
    for settings in ({"guidance_scale": 3.0}, kwargs):
        streamers.append(Streamer())
        outputs.append(generate_codes(
            t2i_vlm, processor, do_sample=True, generator=torch.Generator().manual_seed(5), depth_decoder_top_k=8,
            depth_decoder_temperature=0.8, depth_decoder_top_p=0.9, return_dict_in_generate=True, output_scores=True,
            output_logits=True, streamer=streamers[-1], **settings,
        ))  # fmt: skip
    plain, fixed = outputs
    assert torch.equal(plain.sequences, fixed.sequences)
    for name in ("scores", "logits"):
        torch.testing.assert_close(torch.stack(getattr(fixed, name)), torch.stack(getattr(plain, name)), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    assert streamers[1].ended and len(streamers[1].puts) == len(streamers[0].puts)
    assert torch.equal(torch.stack(streamers[1].puts, 1).view_as(fixed.sequences), fixed.sequences)


class Streamer:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, codes):
        self.puts.append(codes)

    def end(self):
        self.ended = True


def test_static_cache_runs_a_logits_processor_on_the_codes_so_far(t2i_vlm, processor):
    """A caller's logits processor sees the codes generated so far, of a new length at every depth: the static path
    keeps an eager depth loop for it (the compiled LLM step still runs) and gives the dynamic cache's codes."""

    class Shift:  # depends on the codes so far
        def __call__(self, input_ids, scores):
            return scores + 3.0 * F.one_hot(input_ids.sum(1) % scores.shape[1], scores.shape[1])

    codes = [generate_codes(t2i_vlm, processor, do_sample=True, generator=torch.Generator().manual_seed(5),
                            guidance_scale=3.0, logits_processor=[Shift()], **settings)
             for settings in ({}, {"cache_implementation": "static"})]  # fmt: skip
    assert torch.equal(codes[0], codes[1])
    plain = generate_codes(t2i_vlm, processor, do_sample=True, generator=torch.Generator().manual_seed(5),
                           guidance_scale=3.0, cache_implementation="static")  # fmt: skip
    assert not torch.equal(plain, codes[1])  # the processor changed the codes


def test_static_cache_setting_is_checked(t2i_vlm, processor):
    inputs = processor(text=T2I_PROMPTS, generation_mode="image", return_tensors="pt")
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        t2i_vlm.generate(**inputs, generation_mode="image", cache_implementation="offloaded")
    with pytest.raises(ValueError, match="needs use_cache=True"):
        t2i_vlm.generate(**inputs, generation_mode="image", cache_implementation="static", use_cache=False)
    with pytest.raises(ValueError, match="disable_compile must be True or False"):
        t2i_vlm.generate(**inputs, generation_mode="image", cache_implementation="static", disable_compile="yes")


def test_guidance_scale_one_equals_unguided(t2i_vlm, processor):
    one = generate_codes(t2i_vlm, processor, do_sample=False, guidance_scale=1.0)
    inputs = processor(text=T2I_PROMPTS, generation_mode="image", return_tensors="pt")
    inputs.pop("negative_input_ids"), inputs.pop("negative_attention_mask")
    unguided = t2i_vlm.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=1.0)
    assert torch.equal(one, unguided)
    guided = generate_codes(t2i_vlm, processor, do_sample=False, guidance_scale=5.0)
    assert not torch.equal(one, guided)  # guidance changes the picture


def test_cfg_logits_combine_conditional_and_unconditional(t2i_vlm, processor):
    """The first code equals the argmax of uncond + s * (cond - uncond), each half computed on its own prompt."""
    scale = 4.0
    codes = generate_codes(t2i_vlm, processor, prompts=T2I_PROMPTS[:1], do_sample=False, guidance_scale=scale)
    inputs = processor(text=T2I_PROMPTS[:1], generation_mode="image", return_tensors="pt")
    with torch.no_grad():
        lm = t2i_vlm.model.language_model
        cond = lm(input_ids=inputs["input_ids"]).last_hidden_state[:, -1]
        uncond = lm(input_ids=inputs["negative_input_ids"]).last_hidden_state[:, -1]
        cond_logits = t2i_vlm.depth_head(hidden_states=cond).logits[:, 0]
        uncond_logits = t2i_vlm.depth_head(hidden_states=uncond).logits[:, 0]
    expected = (uncond_logits + scale * (cond_logits - uncond_logits)).argmax(-1)
    assert codes[0, 0, 0, 0] == expected[0]
    # a different negative prompt changes the result
    other = generate_codes(t2i_vlm, processor, prompts=T2I_PROMPTS[:1], negative_prompt="a dog", do_sample=False,
                           guidance_scale=scale)  # fmt: skip
    assert not torch.equal(codes, other)


def test_top_k_one_per_depth_equals_greedy(t2i_vlm, processor):
    greedy = generate_codes(t2i_vlm, processor, do_sample=False, guidance_scale=2.0)
    topk1 = generate_codes(t2i_vlm, processor, do_sample=True, depth_top_k=[1, 1], depth_top_p=None,
                           guidance_scale=2.0, generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(greedy, topk1)
    with pytest.raises(ValueError, match="pixel_depth=2"):
        generate_codes(t2i_vlm, processor, do_sample=True, depth_top_k=[1, 1, 1])


def test_seeds_reproduce_and_differ(t2i_vlm, processor):
    def sample(seed):
        return generate_codes(t2i_vlm, processor, do_sample=True, guidance_scale=2.0, depth_top_k=0, depth_top_p=1.0,
                              depth_temperature=[1.5, 1.0], generator=torch.Generator().manual_seed(seed))  # fmt: skip

    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_batched_prompts_equal_one_by_one(t2i_vlm, processor):
    batched = generate_codes(t2i_vlm, processor, do_sample=False, guidance_scale=3.0)
    for row, prompt in enumerate(T2I_PROMPTS):
        single = generate_codes(t2i_vlm, processor, prompts=[prompt], do_sample=False, guidance_scale=3.0)
        assert torch.equal(batched[row], single[0])


def test_num_return_sequences_and_streamer(t2i_vlm, processor):
    recorder = Streamer()
    codes = generate_codes(t2i_vlm, processor, do_sample=True, num_return_sequences=3, streamer=recorder,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    vision = t2i_vlm.config.vision_config
    assert codes.shape == (6, vision.grid_size, vision.grid_size, vision.pixel_depth)
    assert len(recorder.puts) == vision.grid_size**2 and recorder.ended
    assert torch.equal(torch.stack(recorder.puts, 1).view_as(codes), codes)
    greedy = generate_codes(t2i_vlm, processor, do_sample=False, num_return_sequences=2)
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[2], greedy[3])


def test_decode_image_tokens_and_postprocess(t2i_vlm, processor):
    codes = generate_codes(t2i_vlm, processor, do_sample=False)
    pixels = t2i_vlm.decode_image_tokens(codes)
    size = t2i_vlm.config.vision_config.image_size
    assert pixels.shape == (2, 3, size, size)
    latents = t2i_vlm.vision_tower.quantizer.embed_codes(codes).permute(0, 3, 1, 2)  # the sum of the pixel depths
    torch.testing.assert_close(pixels, t2i_vlm.vision_tower.decode_latents(latents))
    images = processor.image_processor.postprocess(pixels, return_tensors="PIL.Image.Image")
    assert len(images) == 2 and images[0].size == (size, size)


def test_image_mode_errors(t2i_vlm, processor, t2i_tokenizer):
    inputs = processor(text=T2I_PROMPTS, generation_mode="image", return_tensors="pt")
    with pytest.raises(ValueError, match="left-padded"):
        t2i_vlm.generate(input_ids=inputs["input_ids"].flip(1), attention_mask=inputs["attention_mask"].flip(1),
                         generation_mode="image", guidance_scale=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="negative_input_ids"):
        t2i_vlm.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         generation_mode="image", guidance_scale=2.0)  # fmt: skip
    with pytest.raises(ValueError, match="Unknown arguments"):
        t2i_vlm.generate(**inputs, generation_mode="image", top_q=3)
    with pytest.raises(ValueError, match="image start token"):
        ids = t2i_tokenizer(["a cat"], return_tensors="pt")["input_ids"]
        t2i_vlm.generate(input_ids=ids, generation_mode="image", guidance_scale=1.0)


def test_save_load_round_trip_keeps_generation(t2i_vlm, processor, tmp_path):
    t2i_vlm.save_pretrained(tmp_path)
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.has_generation_head and loaded.config.depth_head_config.hidden_size == 32
    expected = generate_codes(t2i_vlm, processor, do_sample=False)
    assert torch.equal(generate_codes(loaded, processor, do_sample=False), expected)


def test_generation_pixel_values_are_tokenised_on_the_fly(t2i_vlm, processor):
    vision = t2i_vlm.config.vision_config
    batch = image_batch(processor, T2I_PROMPTS)
    pixels = torch.rand(2, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == t2i_vlm.config.image_token_id, -100)
    with torch.no_grad():
        codes = t2i_vlm.vision_tower.encode(pixels).codes[..., : vision.pixel_depth]
        from_pixels = t2i_vlm(**batch, generation_pixel_values=pixels, labels=labels)
        from_codes = t2i_vlm(**batch, generation_codes=codes, labels=labels)
    torch.testing.assert_close(from_pixels.loss, from_codes.loss)
    torch.testing.assert_close(from_pixels.image_loss, from_codes.image_loss)


def test_joint_model_reads_and_writes_images_in_one_sequence(t2i_tokenizer):
    """A model with both heads: an unwrapped image to read in the user turn, a wrapped image to write in the
    assistant turn; each set of positions gets its own embeddings."""
    model = tiny_generation_vlm(t2i_tokenizer, has_understanding_head=True, wrap_image_tokens=False)
    vision = model.config.vision_config
    read_tokens = "<image>" * vision.grid_size**2
    write_tokens = "<boi>" + "<image>" * vision.grid_size**2 + "<eoi>"
    text = f"<|im_start|>user\n{read_tokens}\na cat<|im_end|>\n<|im_start|>assistant\n{write_tokens}<|im_end|>\n"
    input_ids = t2i_tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
    reading, writing = model.model.split_image_positions(input_ids)
    boi = (input_ids[0] == model.config.boi_token_id).nonzero().item()
    eoi = (input_ids[0] == model.config.eoi_token_id).nonzero().item()
    expected_writing = torch.zeros_like(writing)
    expected_writing[0, boi + 1 : eoi] = True
    assert torch.equal(writing, expected_writing)
    assert torch.equal(reading, (input_ids == model.config.image_token_id) & ~expected_writing)

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, vision.image_size, vision.image_size, generator=g) * 2 - 1
    codes = torch.randint(0, vision.codebook_size, (1, vision.grid_size, vision.grid_size, vision.pixel_depth),
                          generator=g)  # fmt: skip
    labels = input_ids.masked_fill(input_ids == model.config.image_token_id, -100)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixels, generation_codes=codes, labels=labels)
        embeds = model.get_input_embeddings()(input_ids)
        embeds[reading] = model.get_image_features(pixel_values=pixels)[0]
        embeds[writing] = model.model.get_generation_embeddings(codes.flatten(1, 2))[0]
        reference = model.lm_head(model.language_model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(out.logits, reference)
    assert torch.isfinite(out.image_loss) and torch.isfinite(out.text_loss)


def test_bf16_device_map_load_generates_with_fp32_codebooks(t2i_vlm, processor, tmp_path):
    """A bf16 load (device_map="auto") keeps the codebooks fp32, casts the code sums to the head's dtype, and generates
    valid codes; its depth-0 logits match the fp32 model's to bf16 precision (the codes themselves may differ: bf16
    rounding flips near-ties of this random model, and a flip changes every later position)."""
    from transformers import AutoModelForImageTextToText

    t2i_vlm.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto").eval()
    assert loaded.vision_tower.quantizer.codebook.dtype == torch.float32
    assert loaded.depth_head.dtype == torch.bfloat16 and loaded.generation_projector.linear_1.weight.dtype == torch.bfloat16
    codes = generate_codes(loaded, processor, do_sample=False, guidance_scale=3.0)
    reference = generate_codes(t2i_vlm, processor, do_sample=False, guidance_scale=3.0)
    vision = t2i_vlm.config.vision_config
    assert codes.shape == reference.shape and 0 <= int(codes.min()) and int(codes.max()) < vision.codebook_size
    inputs = processor(text=T2I_PROMPTS, generation_mode="image", return_tensors="pt")
    with torch.no_grad():
        logits = [m.depth_head(hidden_states=m.language_model(input_ids=inputs["input_ids"],
                                                              attention_mask=inputs["attention_mask"]
                                                              ).last_hidden_state[:, -1].to(m.dtype)).logits.float()
                  for m in (loaded, t2i_vlm)]  # fmt: skip
    error = (logits[0] - logits[1]).abs().max() / logits[1].std()
    assert error < 0.1, f"bf16 logits differ from fp32 by {error:.3f} standard deviations"


def test_image_generation_ignores_sub_configs_return_dict_false(t2i_vlm, processor, tmp_path):
    """A checkpoint whose text_config and depth_head_config say return_dict=False (transformers' tuple convention)
    generates the same codes: generation asks its sub-models for output objects."""
    t2i_vlm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["return_dict"] = False
    config["depth_head_config"]["return_dict"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.model.language_model.config.return_dict is False and loaded.depth_head.config.return_dict is False
    for kwargs in ({"do_sample": False, "guidance_scale": 3.0}, {"do_sample": False, "use_cache": False}):
        expected = generate_codes(t2i_vlm, processor, **kwargs)
        assert torch.equal(generate_codes(loaded, processor, **kwargs), expected), kwargs
    sampled = [generate_codes(m, processor, do_sample=True, generator=torch.Generator().manual_seed(3))
               for m in (loaded, t2i_vlm)]  # fmt: skip
    assert torch.equal(*sampled)


@pytest.mark.parametrize("rows", [1, 2, 8, 9])
def test_few_row_linear_matches_the_float64_product_and_keeps_linear_beyond_its_rows(rows):
    """`_FewRowLinear`, the compiled static step's F.linear over a few float32 rows on a CPU (one multiply-and-sum
    over the weight per row): the same product as float64 to rounding, in eager mode and compiled, with a bias and
    leading dimensions; over more rows than `FEW_ROW_LINEAR_MAX_ROWS`, and for bf16, F.linear itself."""
    import torch.nn.functional as F

    from evotok_hf.modeling.generation import FEW_ROW_LINEAR_MAX_ROWS, _FewRowLinear

    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(300, 40, generator=generator), torch.randn(300, generator=generator)
    inputs = torch.randn(rows, 1, 40, generator=generator)
    reference = F.linear(inputs.double(), weight.double(), bias.double())
    with _FewRowLinear():
        eager = F.linear(inputs, weight, bias)
    def step(inputs, weight, bias):
        with _FewRowLinear():
            return F.linear(inputs, weight, bias)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)(inputs, weight, bias)
    for out in (eager, compiled):
        assert out.shape == (rows, 1, 300) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    if rows > FEW_ROW_LINEAR_MAX_ROWS:
        assert torch.equal(eager, F.linear(inputs, weight, bias))
    with _FewRowLinear():
        half = F.linear(inputs.bfloat16(), weight.bfloat16())
    assert torch.equal(half, F.linear(inputs.bfloat16(), weight.bfloat16()))
