"""Any depth allocation: `pixel_depth` and `semantic_depth` are independent, as in the paper's Table 4 ((4, 4)
entangled, (16, 4) semantic-to-pixel, (4, 16) pixel-to-semantic). The quantizer runs `num_depths` = the larger of the
two, one codebook each; the pixel latent is the sum of the first `pixel_depth` code embeddings, the semantic latent
that of the first `semantic_depth`. Checked against float64 references written here, through the tokenizer, its
training loop, save / load and remote code, and the VLM whose depth head writes `pixel_depth` codes per position."""

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from vlm_helpers import BLOCK_EVOTOK_HF, T2I_CORPUS, T2I_PROMPTS, bpe_tokenizer, fresh_user_env, generate_codes

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokImageProcessor, EvoTokModel
from evotok_hf.hub.remote_code import export_remote_code
from evotok_hf.modeling.quantizer import EvoTokResidualQuantizer

# (pixel_depth, semantic_depth) of the paper's Table 4
ALLOCATIONS = [(16, 4), (4, 4), (4, 16)]
DEPTH_HEAD = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "resid_dropout": 0.0}


def tiny_config(pixel_depth: int, semantic_depth: int, **overrides) -> EvoTokConfig:
    return EvoTokConfig.from_preset("evotok-tiny", pixel_depth=pixel_depth, semantic_depth=semantic_depth, **overrides)


def tiny_model(pixel_depth: int, semantic_depth: int) -> EvoTokModel:
    torch.manual_seed(0)
    return EvoTokModel(tiny_config(pixel_depth, semantic_depth)).eval()


def images(config: EvoTokConfig, n: int = 2, seed: int = 1) -> torch.Tensor:
    size = config.image_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_search(codebook: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual search in float64 over a full distance tensor (first index on ties): codes (N, depths) and the
    partial sums after each depth (N, depths, dim)."""
    codebook, residual = codebook.double(), x.double().clone()
    total = torch.zeros_like(residual)
    codes, partial_sums = [], []
    for depth in range(codebook.shape[0]):
        idx = ((residual[:, None, :] - codebook[depth][None]) ** 2).sum(-1).argmin(dim=1)
        residual = residual - codebook[depth][idx]
        total = total + codebook[depth][idx]
        codes.append(idx)
        partial_sums.append(total)
    return torch.stack(codes, dim=-1), torch.stack(partial_sums, dim=1)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("pixel, semantic", ALLOCATIONS)
def test_config_accepts_every_allocation_and_counts_its_depths(pixel, semantic, tmp_path):
    config = tiny_config(pixel, semantic)
    assert (config.pixel_depth, config.semantic_depth, config.num_depths) == (pixel, semantic, max(pixel, semantic))
    assert "num_depths" not in config.to_dict()  # derived, not stored
    with pytest.raises(AttributeError):
        config.num_depths = 3
    config.save_pretrained(tmp_path)
    assert EvoTokConfig.from_pretrained(tmp_path).num_depths == max(pixel, semantic)


@pytest.mark.parametrize("field", ["pixel_depth", "semantic_depth"])
@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_non_positive_or_fractional_depths_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        EvoTokConfig.from_preset("evotok-tiny", **{field: value})
    depths = {"pixel_depth": 2, "semantic_depth": 2, field: value}
    with pytest.raises(ValueError, match=field):
        EvoTokResidualQuantizer(8, 4, depths["pixel_depth"], depths["semantic_depth"])


# ----------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("pixel, semantic", ALLOCATIONS)
def test_quantizer_runs_num_depths_and_takes_each_latent_at_its_own_depth(pixel, semantic):
    torch.manual_seed(0)
    quantizer = EvoTokResidualQuantizer(48, 6, pixel, semantic, search_chunk_size=17).eval()
    depths = max(pixel, semantic)
    assert quantizer.num_depths == depths and quantizer.codebook.shape == (depths, 48, 6)
    assert quantizer.cluster_size_ema.shape == (depths, 48) and quantizer.embed_ema.shape == (depths, 48, 6)
    x = torch.randn(3, 20, 6, generator=torch.Generator().manual_seed(2))
    out = quantizer(x)
    codes, partial_sums = reference_search(quantizer.codebook, x.reshape(-1, 6))
    assert out.codes.shape == (3, 20, depths) and out.codes.dtype == torch.int64
    assert torch.equal(out.codes.reshape(-1, depths), codes)
    # fp32 running sums against float64 ones
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.pixel_latents.reshape(-1, 6).double(), partial_sums[:, pixel - 1], **close)
    torch.testing.assert_close(out.semantic_latents.reshape(-1, 6).double(), partial_sums[:, semantic - 1], **close)
    # the commitment loss covers every depth the cascade ran, not only those up to the semantic latent
    flat = x.reshape(-1, 6).double()
    commitment = torch.stack([F.mse_loss(flat, partial_sums[:, d]) for d in range(depths)]).mean()
    torch.testing.assert_close(out.commitment_loss.double(), commitment, **close)
    assert out.codebook_usage.shape == (depths,) and out.perplexity.shape == (depths,)
    for depth in range(depths):
        histogram = torch.bincount(codes[:, depth], minlength=48).double()
        assert out.codebook_usage[depth] == pytest.approx(float((histogram > 0).double().mean()))
        probs = histogram / histogram.sum()
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        assert out.perplexity[depth] == pytest.approx(float(entropy.exp()), rel=1e-5)


@pytest.mark.parametrize("pixel, semantic", ALLOCATIONS)
def test_straight_through_gradient_reaches_the_input_from_both_latents(pixel, semantic):
    torch.manual_seed(0)
    quantizer = EvoTokResidualQuantizer(32, 4, pixel, semantic).eval()
    for name in ("pixel_latents", "semantic_latents"):
        x = torch.randn(10, 4, requires_grad=True)
        weights = torch.randn(10, 4)
        (getattr(quantizer(x), name) * weights).sum().backward()
        torch.testing.assert_close(x.grad, weights, rtol=0, atol=0, msg=name)


def test_training_updates_the_ema_of_every_codebook_beyond_the_semantic_depth():
    """(16, 4): codebooks 5..16 feed no latent but the pixel one, and each follows the EMA of its own depth's codes."""
    torch.manual_seed(0)
    quantizer = EvoTokResidualQuantizer(32, 4, 16, 4, ema_decay=0.9, restart_unused_codes=False).train()
    before = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(3))
    codes = quantizer(x).codes
    assert codes.shape == (200, 16) and int(quantizer.ema_step) == 1
    for depth in range(16):
        counts = torch.bincount(codes[:, depth], minlength=32).float()
        torch.testing.assert_close(quantizer.cluster_size_ema[depth], 0.1 * counts, msg=f"depth {depth}")
        assert not torch.equal(quantizer.codebook[depth], before["codebook"][depth]), depth
        assert not torch.equal(quantizer.embed_ema[depth], before["embed_ema"][depth]), depth


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("pixel, semantic", ALLOCATIONS)
def test_model_decodes_pixel_depth_codes_and_reads_semantic_depth_codes(pixel, semantic):
    model = tiny_model(pixel, semantic)
    config = model.config
    pixel_values = images(config)
    g, depths = config.grid_size, config.num_depths
    with torch.no_grad():
        encoded = model.encode(pixel_values)
        assert encoded.codes.shape == (2, g, g, depths)
        assert encoded.codebook_usage.shape == (depths,) and encoded.perplexity.shape == (depths,)
        decoded = model.decode(encoded.codes[..., :pixel])
        torch.testing.assert_close(decoded, model.decode_latents(encoded.pixel_latents))
        for k in range(1, pixel + 1):
            assert model.decode(encoded.codes[..., :k]).shape == pixel_values.shape
        semantic_features = model.get_semantic_features(encoded.codes[..., :semantic])
        torch.testing.assert_close(semantic_features, model.decode_semantic_latents(encoded.semantic_latents))
        for k in range(1, semantic + 1):
            assert model.get_semantic_features(encoded.codes[..., :k]).shape == (2, g * g, config.teacher_dim)
        output = model(pixel_values)
        assert output.codes.shape == (2, g, g, depths)
    if pixel < depths:
        with pytest.raises(ValueError, match=rf"1 <= k <= {pixel} depths \(pixel_depth\)"):
            model.decode(encoded.codes[..., : pixel + 1])
    if semantic < depths:
        with pytest.raises(ValueError, match=rf"1 <= k <= {semantic} depths \(semantic_depth\)"):
            model.get_semantic_features(encoded.codes[..., : semantic + 1])


def test_semantic_to_pixel_model_decodes_its_full_codes():
    """(16, 4): `decode(encode(...).codes)` needs no slicing (all 16 depths are pixel depths); the semantic features
    read the first 4, and 5 is refused with a message naming semantic_depth."""
    model = tiny_model(16, 4)
    pixel_values = images(model.config)
    with torch.no_grad():
        encoded = model.encode(pixel_values)
        assert encoded.codes.shape[-1] == 16
        torch.testing.assert_close(model.decode(encoded.codes), model.decode_latents(encoded.pixel_latents))
        model.get_semantic_features(encoded.codes[..., :4])
    with pytest.raises(ValueError, match="semantic_depth"):
        model.get_semantic_features(encoded.codes[..., :5])


def test_a_few_training_steps_of_a_semantic_to_pixel_tokenizer_change_its_weights(tmp_path):
    from evotok_hf.training.trainer import TokenizerTrainer, training_arguments_from_preset

    args = training_arguments_from_preset(
        "cpu-small", model_preset="evotok-tiny", output_dir=str(tmp_path / "run"), max_train_steps=2,
        model_overrides={"codebook_size": 64, "ema_warmup_steps": 0, "pixel_depth": 16, "semantic_depth": 4},
        train_batch_size=4, crops_per_photo=2, crop_size=64, learning_rate=1e-3, lr_warmup_steps=1, log_steps=1,
        eval_max_images=4,
    )  # fmt: skip
    trainer = TokenizerTrainer(args)
    model = trainer._unwrap(trainer.model)
    assert model.config.num_depths == 16 and model.quantizer.codebook.shape[0] == 16
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    summary = trainer.train()
    assert summary["global_step"] == 2
    logged = summary["history"][-1]
    assert all(torch.isfinite(torch.tensor(logged[term])) for term in ("total", "commitment", "semantic_cosine"))
    after = model.state_dict()
    for name in ("encode_task_layer.2.weight", "pixel_decoder.conv_out.weight", "decode_task_layer.2.weight"):
        assert not torch.equal(after[name], before[name]), name
    changed = [not torch.equal(after["quantizer.codebook"][d], before["quantizer.codebook"][d]) for d in range(16)]
    assert all(changed), changed  # the EMA moved every codebook, the 12 beyond the semantic depth included


def tokenizer_outputs(tokenizer, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a (16, 4) tokenizer computes: all 16 codes, the image they decode to and the semantic features of 4."""
    with torch.no_grad():
        codes = tokenizer.encode(pixel_values).codes
        return {"codes": codes, "decoded": tokenizer.decode(codes),
                "semantic": tokenizer.get_semantic_features(codes[..., :4])}  # fmt: skip


def test_save_load_round_trip_of_a_semantic_to_pixel_tokenizer(tmp_path):
    model = tiny_model(16, 4)
    pixel_values = images(model.config)
    model.save_pretrained(tmp_path)
    loaded = EvoTokModel.from_pretrained(tmp_path).eval()
    assert (loaded.config.pixel_depth, loaded.config.semantic_depth, loaded.config.num_depths) == (16, 4, 16)
    assert loaded.quantizer.codebook.shape == (16, 64, 8) and loaded.quantizer.embed_ema.shape == (16, 64, 8)
    expected, reloaded = tokenizer_outputs(model, pixel_values), tokenizer_outputs(loaded, pixel_values)
    assert torch.equal(reloaded["codes"], expected["codes"])
    for key in ("decoded", "semantic"):
        torch.testing.assert_close(reloaded[key], expected[key], rtol=0, atol=0, msg=key)


def test_per_depth_evaluation_covers_every_codebook_and_each_latent_its_own_depths():
    """(16, 4): reconstructions at pixel depths 1..16, usage of all 16 codebooks, semantic features at depths 1..4;
    cumulative latents exist at every depth, semantic features only up to the semantic depth."""
    from evotok_hf.evaluation import evaluate_reconstruction
    from evotok_hf.evaluation.representation import depth_features

    model = tiny_model(16, 4)
    pixel_values = images(model.config, n=3)
    processor = EvoTokImageProcessor(size={"height": model.config.image_size, "width": model.config.image_size})
    report = evaluate_reconstruction(model, pixel_values, processor, metrics=("psnr", "usage"), progress=False)
    assert report.pixel_depths == list(range(1, 17)) and len(report.psnr) == 16
    assert len(report.codebook_usage) == 16 and len(report.perplexity) == 16
    assert list(depth_features(model, pixel_values, kind="latent")) == list(range(1, 17))
    assert list(depth_features(model, pixel_values, kind="semantic")) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="semantic_depth"):
        depth_features(model, pixel_values, depths=[5], kind="semantic")


# ----------------------------------------------------------------------------- VLM
def save_components(root, pixel_depth: int, semantic_depth: int, llm_layers: int) -> None:
    """A tiny tokenizer of the given allocation under `root/tokenizer` and a tiny Qwen2 with its BPE tokenizer under
    `root/llm`: what `EvoTokForConditionalGeneration.from_components` assembles."""
    tiny_model(pixel_depth, semantic_depth).save_pretrained(root / "tokenizer")
    text_tokenizer = bpe_tokenizer(T2I_CORPUS, vocab_size=300)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(text_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=llm_layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )).save_pretrained(root / "llm")  # fmt: skip
    text_tokenizer.save_pretrained(root / "llm")


@pytest.fixture(scope="module")
def vlm_16x4(tmp_path_factory):
    """A VLM with both heads assembled by `from_components` from a saved (16, 4) tokenizer and a saved tiny Qwen2."""
    root = tmp_path_factory.mktemp("components_16x4")
    save_components(root, 16, 4, llm_layers=2)
    torch.manual_seed(0)
    model, processor = EvoTokForConditionalGeneration.from_components(
        str(root / "tokenizer"), str(root / "llm"), has_understanding_head=True, has_generation_head=True,
        depth_head_config=DEPTH_HEAD, return_processor=True,
    )  # fmt: skip
    with torch.no_grad():  # a random depth head gives nearly flat logits: sharpen them so greedy codes vary
        for classifier in model.depth_head.classifiers:
            classifier.proj.weight.mul_(20.0)
    return model.eval(), processor


def test_vlm_depth_head_writes_pixel_depth_codes_from_the_tokenizer_config(vlm_16x4):
    model, _ = vlm_16x4
    vision, head = model.config.vision_config, model.config.depth_head_config
    assert (vision.pixel_depth, vision.semantic_depth, vision.num_depths) == (16, 4, 16)
    assert head.pixel_depth == 16 and len(model.depth_head.classifiers) == 16
    assert model.depth_head.depth_embeddings.shape[1] == 16


def test_vlm_training_loss_covers_all_sixteen_generated_depths(vlm_16x4):
    model, processor = vlm_16x4
    vision = model.config.vision_config
    grid, depths, size = vision.grid_size, vision.pixel_depth, vision.codebook_size
    writes = "<boi>" + "<image>" * grid**2 + "<eoi>"
    texts = [f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{writes}<|im_end|>\n"
             for prompt in T2I_PROMPTS]
    batch = processor.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    codes = torch.randint(0, size, (2, grid, grid, depths), generator=torch.Generator().manual_seed(4))
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, generation_codes=codes, labels=labels)
        assert torch.isfinite(out.loss) and torch.isfinite(out.image_loss)
        torch.testing.assert_close(out.loss, out.text_loss + out.image_loss)
        # the depth head, teacher-forced on the true codes, scores all 16 depths of every image position
        hidden = model.model(**batch, generation_codes=codes).last_hidden_state
        rows, positions = (batch["input_ids"] == model.config.image_token_id).nonzero(as_tuple=True)
        targets = codes.flatten(0, 2)
        chosen = model.vision_tower.quantizer.codebook[torch.arange(depths), targets]  # (positions, 16, dim)
        logits = model.depth_head(hidden_states=hidden[rows, positions - 1],
                                  code_embedding_sums=chosen.cumsum(1)[:, :-1]).logits  # fmt: skip
    assert logits.shape == (2 * grid**2, 16, size)
    torch.testing.assert_close(out.image_loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_vlm_generates_sixteen_depths_and_reads_four(vlm_16x4, tmp_path):
    model, processor = vlm_16x4
    vision = model.config.vision_config
    grid = vision.grid_size
    with torch.no_grad():
        codes = generate_codes(model, processor, do_sample=False)
        assert codes.shape == (2, grid, grid, 16)
        assert model.decode_image_tokens(codes).shape == (2, 3, vision.image_size, vision.image_size)
        pixel_values = images(vision)
        features = model.get_image_features(pixel_values=pixel_values)
        codes_read = model.vision_tower.encode(pixel_values).codes[..., :4]
        torch.testing.assert_close(model.get_image_features(image_codes=codes_read), features, rtol=0, atol=0)
        semantic = model.vision_tower.get_semantic_features(codes_read)
        projected = model.model.multi_modal_projector(semantic)
        torch.testing.assert_close(features, projected, rtol=0, atol=0)
        photos = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8))
                  for i in range(2)]  # fmt: skip
        inputs = processor(images=photos, text=["<image> a cat", "a red bicycle <image>"], padding=True,
                           return_tensors="pt")  # fmt: skip
        logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="semantic_depth"):
        model.get_image_features(image_codes=model.vision_tower.encode(pixel_values).codes)

    model.save_pretrained(tmp_path / "vlm_16x4")
    processor.save_pretrained(tmp_path / "vlm_16x4")
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "vlm_16x4").eval()
    assert loaded.config.vision_config.num_depths == 16 and loaded.config.depth_head_config.pixel_depth == 16
    assert torch.equal(generate_codes(loaded, processor, do_sample=False), codes)


def test_a_single_pixel_depth_trains_and_generates(tmp_path):
    """pixel_depth = 1: the depth head scores one code per position from the LLM state alone (no code sums to
    feed), in the training loss as in generation."""
    save_components(tmp_path, 1, 4, llm_layers=1)
    model, processor = EvoTokForConditionalGeneration.from_components(
        str(tmp_path / "tokenizer"), str(tmp_path / "llm"), has_generation_head=True, has_understanding_head=False,
        depth_head_config=DEPTH_HEAD, wrap_image_tokens=True, return_processor=True,
    )  # fmt: skip
    model.eval()
    grid, size = model.config.vision_config.grid_size, model.config.vision_config.codebook_size
    text = f"<|im_start|>user\n{T2I_PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n<boi>{'<image>' * grid**2}<eoi>"
    batch = processor.tokenizer([text], return_tensors="pt", add_special_tokens=False)
    codes = torch.randint(0, size, (1, grid, grid, 1), generator=torch.Generator().manual_seed(2))
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    with torch.no_grad():
        out = model(**batch, generation_codes=codes, labels=labels)
        hidden = model.model(**batch, generation_codes=codes).last_hidden_state[0]
        rows = (batch["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        logits = model.depth_head(hidden_states=hidden[rows - 1]).logits  # (positions, 1, size)
    torch.testing.assert_close(out.image_loss, F.cross_entropy(logits[:, 0], codes.flatten()))
    generated = generate_codes(model, processor, do_sample=False)
    assert generated.shape == (2, grid, grid, 1)
    assert model.decode_image_tokens(generated).shape[1] == 3


# ----------------------------------------------------------------------------- remote code
REMOTE_PROCESS = BLOCK_EVOTOK_HF + r"""
import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

tok_dir, vlm_dir, inputs_path, out_path = sys.argv[1:5]
given = torch.load(inputs_path)
tokenizer = AutoModel.from_pretrained(tok_dir, trust_remote_code=True).eval()
vlm = AutoModelForImageTextToText.from_pretrained(vlm_dir, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(vlm_dir, trust_remote_code=True)
inputs = processor(text=given["prompts"], generation_mode="image", return_tensors="pt")
with torch.no_grad():
    codes = tokenizer.encode(given["pixel_values"]).codes
    out = {"codes": codes, "decoded": tokenizer.decode(codes),
           "semantic": tokenizer.get_semantic_features(codes[..., :4]),
           "image_codes": vlm.generate(**inputs, generation_mode="image", do_sample=False)}
out["modules"] = [type(obj).__module__ for obj in (tokenizer, vlm, processor)]
out["num_depths"] = [tokenizer.config.num_depths, vlm.config.vision_config.num_depths]
torch.save(out, out_path)
"""


def test_remote_code_export_of_semantic_to_pixel_models_loads_without_evotok_hf(vlm_16x4, tmp_path):
    """The exported flat files carry the allocation: a (16, 4) tokenizer and VLM load with `trust_remote_code=True` in
    a process where evotok_hf cannot be imported and compute what the package computes."""
    model, processor = vlm_16x4
    tokenizer = tiny_model(16, 4)
    size = tokenizer.config.image_size
    tokenizer.save_pretrained(tmp_path / "tok")
    image_processor = EvoTokImageProcessor(size={"height": size, "width": size})
    image_processor.save_pretrained(tmp_path / "tok")
    export_remote_code(tokenizer, image_processor, tmp_path / "tok")
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    export_remote_code(model, processor, tmp_path / "vlm")
    pixel_values = images(tokenizer.config)
    torch.save({"pixel_values": pixel_values, "prompts": T2I_PROMPTS}, tmp_path / "inputs.pt")

    proc = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_PROCESS, str(tmp_path / "tok"), str(tmp_path / "vlm"),
         str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        env=fresh_user_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = torch.load(tmp_path / "outputs.pt")
    assert all(module.startswith("transformers_modules.") for module in remote.pop("modules"))
    assert remote.pop("num_depths") == [16, 16]
    expected = tokenizer_outputs(tokenizer, pixel_values)
    expected["image_codes"] = generate_codes(model, processor, do_sample=False)
    assert remote["image_codes"].shape[-1] == 16
    for key, value in expected.items():
        if value.is_floating_point():  # same math; the thread count may differ between the processes
            torch.testing.assert_close(remote[key], value, rtol=1e-5, atol=1e-5, msg=key)
        else:
            assert torch.equal(remote[key], value), key
