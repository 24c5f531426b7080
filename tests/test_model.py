"""EvoTokModel: API, save/load, dtype, gradients, equivalences."""

import copy

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, SiglipVisionConfig, SiglipVisionModel

from evotok_hf import EvoTokConfig, EvoTokImageProcessor, EvoTokModel


def test_encode_decode_shapes(tiny_model, tiny_images, tiny_config):
    enc = tiny_model.encode(tiny_images)
    g, D = tiny_config.grid_size, tiny_config.semantic_depth
    assert enc.codes.shape == (3, g, g, D) and enc.codes.dtype == torch.int64
    assert enc.pixel_latents.shape == (3, tiny_config.codebook_dim, g, g)
    images = tiny_model.decode(enc.codes[..., : tiny_config.pixel_depth])
    assert images.shape == tiny_images.shape
    torch.testing.assert_close(images, tiny_model.decode_latents(enc.pixel_latents))
    sem = tiny_model.get_semantic_features(enc.codes)
    assert sem.shape == (3, g * g, tiny_config.teacher_dim)
    torch.testing.assert_close(sem, tiny_model.decode_semantic_latents(enc.semantic_latents))
    # fewer depths decode too, from the sum of the first k embeddings
    coarse = tiny_model.decode(enc.codes[..., :1])
    expected = tiny_model.decode_latents(tiny_model.quantizer.embed_codes(enc.codes[..., :1]).permute(0, 3, 1, 2))
    torch.testing.assert_close(coarse, expected)
    for k in range(1, D + 1):
        assert tiny_model.get_semantic_features(enc.codes[..., :k]).shape == sem.shape


@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_encoder_features_are_the_chosen_hidden_state(layer, tiny_images):
    torch.manual_seed(0)
    model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny", encoder_feature_layer=layer)).eval()
    scaled = model.input_scaling(tiny_images)
    full = model.encoder(scaled, output_hidden_states=True).hidden_states[layer]
    torch.testing.assert_close(model.get_encoder_features(tiny_images), full)


def test_input_scaling_is_a_clamp(tiny_model):
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    torch.testing.assert_close(tiny_model.input_scaling(x), x.clamp(-1, 1), rtol=0, atol=1e-6)


def test_forward_gradients_reach_encoder_from_both_paths(tiny_config, tiny_images):
    torch.manual_seed(0)
    model = EvoTokModel(tiny_config).train()
    first_layer = model.encoder.encoder.layers[0].mlp.fc1.weight
    for name, loss_fn in [
        ("pixel", lambda out: out.reconstruction.square().mean()),
        ("semantic", lambda out: out.semantic_features.square().mean()),
    ]:
        model.zero_grad()
        loss_fn(model(tiny_images)).backward()
        assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0, name
        assert model.encode_task_layer[2].weight.grad.abs().sum() > 0, name
    # frozen parts: the unused last layer, post-layernorm and head; the codebooks are buffers (EMA-updated), never
    # parameters an optimizer could see
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "quantizer.codebook" in dict(model.named_buffers())
    assert not any(n.startswith("quantizer.") for n, _ in model.named_parameters())
    assert any(n.startswith("encoder.encoder.layers.2.") for n in frozen)
    assert any(n.startswith("encoder.head.") for n in frozen) and any("post_layernorm" in n for n in frozen)
    assert not any(n.startswith("encoder.encoder.layers.1.") for n in frozen)


def test_save_load_round_trip_with_auto_classes(tmp_path, tiny_model, tiny_images):
    processor = EvoTokImageProcessor(size={"height": 32, "width": 32})
    tiny_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, EvoTokModel) and isinstance(loaded_processor, EvoTokImageProcessor)
    a, b = tiny_model(tiny_images), loaded(tiny_images)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(a.semantic_features, b.semantic_features, rtol=0, atol=0)
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == [
        n for n, p in tiny_model.named_parameters() if not p.requires_grad
    ]
    # EMA statistics are saved so training resumes exactly
    for name in ("quantizer.cluster_size_ema", "quantizer.embed_ema", "quantizer.ema_step"):
        assert torch.equal(loaded.state_dict()[name], tiny_model.state_dict()[name])


def test_bf16_load_keeps_codebooks_fp32(tmp_path, tiny_model, tiny_images):
    tiny_model.save_pretrained(tmp_path)
    model = EvoTokModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.quantizer.codebook.dtype == torch.float32
    assert model.quantizer.embed_ema.dtype == torch.float32
    assert model.post_quant_conv.weight.dtype == torch.bfloat16
    assert torch.equal(model.quantizer.codebook, tiny_model.quantizer.codebook)
    enc = model.encode(tiny_images.bfloat16())
    assert enc.codes.dtype == torch.int64
    assert model.decode(enc.codes[..., :2]).dtype == torch.bfloat16
    # the quantiser sees bf16 latents but searches in fp32: its codes are the fp32 nearest neighbours of them
    latents = model.encode_task_layer(model.get_encoder_features(tiny_images.bfloat16())).float()
    assert torch.equal(enc.codes.reshape(-1, 4), model.quantizer(latents.reshape(-1, 8)).codes)


def test_missing_keys_are_initialised_like_init(tmp_path, tiny_config):
    """Loading with missing keys must initialise them (custom-code trap of transformers v5)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = EvoTokModel(tiny_config)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for key in ["quantizer.embed_ema", "quantizer.cluster_size_ema", "semantic_decoder.cls_token",
                "encoder.embeddings.position_embedding.weight"]:
        state.pop(key)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = EvoTokModel.from_pretrained(tmp_path)
    # EMA sums restart from the (loaded) codebook with zero counts, as a fresh quantizer does
    assert torch.equal(loaded.quantizer.embed_ema, loaded.quantizer.codebook)
    assert torch.equal(loaded.quantizer.cluster_size_ema, torch.zeros_like(loaded.quantizer.cluster_size_ema))
    cls = loaded.semantic_decoder.cls_token
    assert cls.abs().sum() > 0 and cls.std() < 0.05  # trunc-normal(0.02), not zeros / garbage
    pos = loaded.encoder.embeddings.position_embedding.weight
    assert 0.5 * 32**-0.5 < pos.std() < 1.5 * 32**-0.5  # SigLIP's own init: normal(1/sqrt(width))


def test_batch_equals_single(tiny_model, tiny_images):
    batch = tiny_model(tiny_images)
    for i in range(tiny_images.shape[0]):
        single = tiny_model(tiny_images[i : i + 1])
        assert torch.equal(single.codes, batch.codes[i : i + 1])
        torch.testing.assert_close(single.reconstruction, batch.reconstruction[i : i + 1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(single.semantic_features, batch.semantic_features[i : i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["forward", "decode", "bf16 load"])
def test_pixel_decoder_runs_on_contiguous_activations_in_bf16(tiny_model, tiny_images, path):
    """Latents reach the decoder as a channels-last view of (batch, grid, grid, dim), and convolutions keep their
    input's layout; on a CPU the GroupNorm backward in bf16 is then the slow kernel (benchmarks/README.md). In bf16
    (autocast, as training runs, or a bf16 model) every norm of the decoder must see contiguous NCHW activations,
    whichever way the latents come in."""
    model = copy.deepcopy(tiny_model).to(torch.bfloat16) if path == "bf16 load" else tiny_model
    layouts = []
    norms = [m for m in model.pixel_decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    hooks = [m.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous())) for m in norms]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=path != "bf16 load"):
            if path == "forward":
                model(tiny_images)
            else:
                codes = model.encode(tiny_images).codes[..., : model.config.pixel_depth]
                model.decode(codes)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(layouts) == len(norms) > 0
    assert all(layouts), f"{layouts.count(False)} of {len(norms)} decoder norms got a non-contiguous input"


def test_eager_equals_sdpa(tiny_config, tiny_images):
    torch.manual_seed(0)
    sdpa = EvoTokModel(tiny_config).eval()
    eager_config = EvoTokConfig.from_preset("evotok-tiny")
    eager_config._attn_implementation = "eager"
    eager = EvoTokModel(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    a, b = sdpa(tiny_images), eager(tiny_images)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.semantic_features, b.semantic_features, rtol=1e-4, atol=1e-5)


def test_semantic_attention_matches_explicit_formula(tiny_model):
    """Independent check of the 3-heads-of-10 (inner 30 != width 32) attention with q/v biases and zero k bias."""
    attn = tiny_model.semantic_decoder.blocks[0].attn
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    W = attn.qkv.weight.double()
    q = x @ W[:30].T + attn.q_bias.double()
    k = x @ W[30:60].T
    v = x @ W[60:].T + attn.v_bias.double()
    heads = lambda t: t.view(2, 5, 3, 10).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 10**0.5, dim=-1)
    ctx = (weights @ heads(v)).transpose(1, 2).reshape(2, 5, 30)
    expected = ctx @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(attn(x.float()).double(), expected, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(tiny_config, tiny_images):
    torch.manual_seed(0)
    model = EvoTokModel(tiny_config).train()
    model.quantizer.eval()  # no EMA update, so both passes see the same codebooks

    def grads():
        model.zero_grad()
        out = model(tiny_images)
        (out.reconstruction.square().mean() + out.semantic_features.square().mean() + out.commitment_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert model.encoder.encoder.layers[0].gradient_checkpointing
    assert model.semantic_decoder.blocks[0].gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_from_encoder_pretrained_loads_encoder_exactly(tmp_path, tiny_images):
    torch.manual_seed(3)
    siglip = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8)
    )
    siglip.save_pretrained(tmp_path / "siglip")
    model = EvoTokModel.from_encoder_pretrained(
        str(tmp_path / "siglip"), config=EvoTokConfig.from_preset("evotok-tiny"), codebook_size=32
    )
    assert model.config.codebook_size == 32
    reference = siglip.state_dict()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert not model.encoder.head.probe.requires_grad
    model.eval()
    scaled = model.input_scaling(tiny_images)
    torch.testing.assert_close(
        model.get_encoder_features(tiny_images), siglip(scaled, output_hidden_states=True).hidden_states[-2]
    )


def test_from_encoder_pretrained_rejects_other_architectures(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="SigLIP-architecture"):
        EvoTokModel.from_encoder_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.encode(torch.zeros(1, 3, 64, 64)), r"\(batch, 3, 32, 32\)"),
        (lambda m: m.encode(torch.zeros(1, 1, 32, 32)), r"\(batch, 3, 32, 32\)"),
        (lambda m: m.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), "floating-point"),
        (lambda m: m.decode(torch.zeros(1, 4, 4, 3, dtype=torch.long)), "1 <= k <= 2"),
        (lambda m: m.decode(torch.zeros(1, 4, 4, 2, dtype=torch.int32)), "int64"),
        (lambda m: m.decode(torch.full((1, 4, 4, 2), 64, dtype=torch.long)), r"\[0, 64\)"),
        (lambda m: m.decode(torch.zeros(1, 5, 4, 2, dtype=torch.long)), r"\(batch, 4, 4, k\)"),
        (lambda m: m.get_semantic_features(torch.zeros(1, 4, 4, 5, dtype=torch.long)), "1 <= k <= 4"),
        (lambda m: m.decode_latents(torch.zeros(1, 7, 4, 4)), r"\(batch, 8, 4, 4\)"),
        (lambda m: m.decode_semantic_latents(torch.zeros(1, 8, 4)), r"\(batch, 8, 4, 4\)"),
        (lambda m: m.decode_latents(torch.zeros(1, 8, 4, 4, dtype=torch.long)), "floating-point"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_model, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_model)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_one_non_finite_pixel_or_latent_raises_naming_it(tiny_model, tiny_images, value):
    """One bad entry used to give all-zero codes (NaN) or a silently clamped pixel (inf)."""
    pixels = tiny_images.clone()
    pixels[1, 2, 5, 7] = value
    kind = "1 NaN and 0 inf" if value != value else "0 NaN and 1 inf"
    with pytest.raises(ValueError, match=rf"pixel_values contains NaN or infinite values \({kind} among 9216"):
        tiny_model.encode(pixels)
    with pytest.raises(ValueError, match="pixel_values contains NaN or infinite values"):
        tiny_model(pixels)
    latents = tiny_model.encode(tiny_images).pixel_latents.clone()
    latents[0, 3, 1, 2] = value
    for decode in (tiny_model.decode_latents, tiny_model.decode_semantic_latents):
        with pytest.raises(ValueError, match=rf"latents contains NaN or infinite values \({kind} among 384"):
            decode(latents)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m: m.encode(torch.zeros(0, 3, 32, 32)), "pixel_values"),
        (lambda m: m.decode_latents(torch.zeros(0, 8, 4, 4)), "latents"),
        (lambda m: m.decode_semantic_latents(torch.zeros(0, 8, 4, 4)), "latents"),
        (lambda m: m.decode(torch.zeros(0, 4, 4, 2, dtype=torch.long)), "codes"),
        (lambda m: m.get_semantic_features(torch.zeros(0, 4, 4, 4, dtype=torch.long)), "codes"),
    ],
)
def test_empty_batch_raises_naming_it(tiny_model, call, name):
    with pytest.raises(ValueError, match=rf"{name} is an empty batch"):
        call(tiny_model)
