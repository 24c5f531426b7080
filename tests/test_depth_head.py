"""EvoTokDepthTransformer (the residual-depth head): cached vs teacher-forced, an independent float64
re-implementation of the authors' recompute-everything algorithm, eager vs SDPA, causality, save/load, validation,
checkpointing, the paper preset's size and the official-checkpoint key mapping."""

import math

import pytest
import torch

from evotok_hf.modeling.configuration_evotok_depth_head import EvoTokDepthHeadConfig
from evotok_hf.modeling.depth_head import EvoTokDepthTransformer, official_depth_head_key

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, code_dim=8, codebook_size=64, llm_hidden_size=24,
    pixel_depth=4,
)  # fmt: skip
BATCH = 3


def tiny_config(**overrides):
    return EvoTokDepthHeadConfig(**{**TINY, **overrides})


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = EvoTokDepthTransformer(tiny_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial biases / norms so the tests see every parameter
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or ".norm." in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def make_inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, TINY["llm_hidden_size"], generator=g, dtype=dtype)
    code_embeddings = torch.randn(BATCH, TINY["pixel_depth"] - 1, TINY["code_dim"], generator=g, dtype=dtype)
    return hidden, code_embeddings.cumsum(dim=1)


def cached_logits(model, hidden, sums, chunks=None):
    """Logits of every depth through the cache; `chunks` = how many sums each call after the first adds."""
    out = model(hidden, use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    start = 0
    for size in chunks or [1] * sums.shape[1]:
        out = model(None, sums[:, start : start + size], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        cache, start = out.past_key_values, start + size
    return torch.cat(logits, dim=1)


# ----------------------------------------------------------------------------- equivalences
def test_teacher_forced_equals_cached_generation():
    model = make_model()
    hidden, sums = make_inputs()
    with torch.no_grad():
        full = model(hidden, sums)
        assert full.logits.shape == (BATCH, 4, 64)
        assert full.past_key_values is None
        torch.testing.assert_close(cached_logits(model, hidden, sums), full.logits, rtol=1e-5, atol=1e-5)
        # several depths per call: the causal mask must be offset by the cached length
        torch.testing.assert_close(cached_logits(model, hidden, sums, chunks=[1, 2]), full.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached_logits(model, hidden, sums, chunks=[3]), full.logits, rtol=1e-5, atol=1e-5)
        # a shorter teacher-forced prefix gives the first depths
        torch.testing.assert_close(model(hidden, sums[:, :1]).logits, full.logits[:, :2], rtol=1e-5, atol=1e-5)
    out = model(hidden, use_cache=True)
    assert out.past_key_values.get_seq_length() == 1


def reference_official_logits(model, hidden, sums, trace=None):
    """The authors' algorithm in float64 with plain matmuls: for each depth d, rebuild the sequence
    [in_mlp_2(h), in_mlp_1(s_0), ..., in_mlp_1(s_{d-1})] + pos_emb_d, run all blocks from scratch with a manual causal
    softmax attention, and score its last position with classifier d. With a `trace` dict, the full sequence's run
    (the last depth's) leaves there its per-block sequences ("hidden_states": the input of the first block, then each
    block's output) and attention weights ("attentions")."""
    cfg = model.config
    p = {name: t.detach().double() for name, t in model.named_parameters()}
    heads, width = cfg.num_attention_heads, cfg.hidden_size
    head_dim = width // heads

    def linear(x, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + cfg.layer_norm_eps) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))

    def attention(x, prefix, weights_out):
        n, t, _ = x.shape
        split = lambda y: y.view(n, t, heads, head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = (split(linear(x, f"{prefix}.{name}")) for name in ("q_proj", "k_proj", "v_proj"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        weights_out.append(weights)
        return linear((weights @ v).transpose(1, 2).reshape(n, t, width), f"{prefix}.o_proj")

    hidden, sums = hidden.double(), sums.double()
    all_logits = []
    for depth in range(cfg.pixel_depth):
        steps = [linear(hidden, "hidden_proj")] + [linear(sums[:, j], "code_proj") for j in range(depth)]
        x = torch.stack(steps, dim=1) + p["depth_embeddings"][:, : depth + 1]
        states, weights = [x], []
        for i in range(cfg.num_hidden_layers):
            x = x + attention(layer_norm(x, f"layers.{i}.input_layernorm"), f"layers.{i}.attn", weights)
            mlp_in = layer_norm(x, f"layers.{i}.post_attention_layernorm")
            x = x + linear(gelu(linear(mlp_in, f"layers.{i}.mlp.fc1")), f"layers.{i}.mlp.fc2")
            states.append(x)
        last = layer_norm(x[:, -1], f"classifiers.{depth}.norm")
        all_logits.append(linear(last, f"classifiers.{depth}.proj"))
    if trace is not None:
        trace.update(hidden_states=states, attentions=weights)
    return torch.stack(all_logits, dim=1)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_matches_float64_reimplementation_of_official_algorithm(implementation):
    model = make_model()
    model.config._attn_implementation = implementation
    model.double()
    hidden, sums = make_inputs(torch.float64)
    expected = reference_official_logits(model, hidden, sums)
    with torch.no_grad():
        torch.testing.assert_close(model(hidden, sums).logits, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cached_logits(model, hidden, sums), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hidden_states_and_attentions_outputs_match_float64_reimplementation(implementation):
    """`output_hidden_states` / `output_attentions` (arguments or config), as transformers models give them: the depth
    sequence entering the first block and leaving each block, and each block's causal attention weights (only the
    eager kernel computes weights; SDPA returns none, as in transformers)."""
    model = make_model()
    model.config._attn_implementation = implementation
    model.double()
    hidden, sums = make_inputs(torch.float64)
    trace = {}
    reference_official_logits(model, hidden, sums, trace=trace)
    with torch.no_grad():
        by_argument = model(hidden, sums, output_hidden_states=True, output_attentions=True)
        # (transformers refuses `config.output_attentions` with SDPA)
        model.config.output_hidden_states, model.config.output_attentions = True, implementation == "eager"
        by_config = model(hidden, sums)
        model.config.output_hidden_states = model.config.output_attentions = False
        plain = model(hidden, sums)
    assert plain.hidden_states is None and plain.attentions is None
    for out in (by_argument, by_config):
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        for got, want in zip(out.hidden_states, trace["hidden_states"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        if implementation == "eager":
            assert len(out.attentions) == model.config.num_hidden_layers
            for got, want in zip(out.attentions, trace["attentions"]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if implementation == "sdpa":
        assert by_argument.attentions == () and by_config.attentions is None


def test_forward_follows_return_dict():
    """`return_dict=False`, as an argument or in the config, gives the output's tuple (transformers' convention)."""
    model = make_model()
    hidden, sums = make_inputs()
    with torch.no_grad():
        as_dict = model(hidden, sums, use_cache=True, output_hidden_states=True)
        as_tuple = model(hidden, sums, use_cache=True, output_hidden_states=True, return_dict=False)
        model.config.return_dict = False
        from_config = model(hidden, sums, use_cache=True, output_hidden_states=True)
    for out in (as_tuple, from_config):
        assert isinstance(out, tuple) and len(out) == 3  # logits, past_key_values, hidden_states
        assert torch.equal(out[0], as_dict.logits)
        assert out[1].get_seq_length() == model.config.pixel_depth
        assert all(torch.equal(a, b) for a, b in zip(out[2], as_dict.hidden_states))


def test_eager_equals_sdpa():
    sdpa = make_model()
    eager_config = tiny_config()
    eager_config._attn_implementation = "eager"
    eager = EvoTokDepthTransformer(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    hidden, sums = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(eager(hidden, sums).logits, sdpa(hidden, sums).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            cached_logits(eager, hidden, sums, chunks=[2, 1]), sdpa(hidden, sums).logits, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("changed", [0, 1, 2])
def test_causality(changed):
    """sums[:, d] is the cumulative sum through depth d (the input of depth d + 1): it cannot affect depths <= d."""
    model = make_model()
    hidden, sums = make_inputs()
    edited = sums.clone()
    edited[:, changed] += 1.0
    with torch.no_grad():
        before, after = model(hidden, sums).logits, model(hidden, edited).logits
    torch.testing.assert_close(after[:, : changed + 1], before[:, : changed + 1], rtol=0, atol=1e-6)
    assert (after[:, changed + 1 :] - before[:, changed + 1 :]).abs().amax() > 1e-3


def test_batched_equals_single():
    model = make_model()
    hidden, sums = make_inputs()
    with torch.no_grad():
        batched = model(hidden, sums).logits
        for i in range(BATCH):
            single = model(hidden[i : i + 1], sums[i : i + 1]).logits
            torch.testing.assert_close(single, batched[i : i + 1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- persistence and training
def test_save_pretrained_round_trip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded = EvoTokDepthTransformer.from_pretrained(tmp_path).eval()
    ignored = ("_name_or_path", "transformers_version")
    saved = {k: v for k, v in model.config.to_dict().items() if k not in ignored}
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in ignored} == saved
    assert loaded.config.model_type == "evotok_depth_head"
    hidden, sums = make_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(hidden, sums).logits, model(hidden, sums).logits)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "dropouts", [dict(resid_dropout=0.5, attention_dropout=0.0), dict(resid_dropout=0.0, attention_dropout=0.5)]
)
def test_dropout_only_in_training(implementation, dropouts):
    model = make_model(**dropouts)
    model.config._attn_implementation = implementation
    hidden, sums = make_inputs()
    with torch.no_grad():
        assert torch.equal(model(hidden, sums).logits, model(hidden, sums).logits)
        model.train()
        assert not torch.equal(model(hidden, sums).logits, model(hidden, sums).logits)


def test_gradient_checkpointing_gives_same_gradients():
    model = make_model().train()  # resid_dropout 0.1: the recompute must replay the same dropout masks
    hidden, sums = make_inputs()
    targets = torch.randint(0, 64, (BATCH, 4), generator=torch.Generator().manual_seed(2))

    def grads():
        model.zero_grad()
        torch.manual_seed(5)
        logits = model(hidden, sums).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert all(layer.gradient_checkpointing for layer in model.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() == {n for n, _ in model.named_parameters()}
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
    # in training, checkpointed layers cannot fill a cache: asking for one is ignored, passing one is an error
    assert model(hidden, use_cache=True).past_key_values is None
    cache = model.eval()(hidden, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="activation checkpointing"):
        model.train()(None, sums[:, :1], past_key_values=cache)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"intermediate_size": 2.5}, "intermediate_size"),
        ({"code_dim": True}, "code_dim"),
        ({"codebook_size": 0}, "codebook_size"),
        ({"pixel_depth": 0}, "pixel_depth"),
        ({"llm_hidden_size": None}, "llm_hidden_size"),
        ({"resid_dropout": 1.0}, "resid_dropout"),
        ({"attention_dropout": -0.1}, "attention_dropout"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"initializer_range": -1}, "initializer_range"),
        ({"hidden_act": "no-such-act"}, "hidden_act"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**overrides)


def test_config_defaults_are_the_paper_head():
    config = EvoTokDepthHeadConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2560, 6, 40)
    assert (config.intermediate_size, config.llm_hidden_size, config.codebook_size) == (4 * 2560, 3584, 32768)
    assert (config.code_dim, config.pixel_depth, config.layer_norm_eps, config.resid_dropout) == (32, 4, 1e-5, 0.1)
    assert tiny_config(intermediate_size=48).intermediate_size == 48


def test_input_validation():
    model = make_model()
    hidden, sums = make_inputs()
    cache = model(hidden, use_cache=True).past_key_values
    cases = [
        (dict(hidden_states=None, code_embedding_sums=sums), "required on the first step"),
        (dict(hidden_states=hidden[:, :5]), r"hidden_states must have shape \(batch, 24\)"),
        (dict(hidden_states=hidden[:, None]), r"hidden_states must have shape"),
        (dict(hidden_states=hidden.long()), "floating-point"),
        (dict(hidden_states=hidden, code_embedding_sums=sums[..., :3]), r"code_embedding_sums must have shape"),
        (dict(hidden_states=hidden, code_embedding_sums=sums[:, 0]), r"code_embedding_sums must have shape"),
        (dict(hidden_states=hidden, code_embedding_sums=sums[:2]), "Batch sizes disagree"),
        (dict(hidden_states=hidden, code_embedding_sums=torch.cat([sums, sums[:, :1]], 1)), "Too many depth steps"),
        (dict(hidden_states=hidden, past_key_values=cache), "must be None after the first step"),
        (dict(code_embedding_sums=torch.cat([sums, sums[:, :1]], 1), past_key_values=cache), "Too many depth steps"),
        (dict(code_embedding_sums=sums[:2, :1], past_key_values=cache), "Batch sizes disagree"),
        (dict(code_embedding_sums=sums[:, :0], past_key_values=cache), "Nothing to compute"),
        (dict(code_embedding_sums=sums[:, :1], past_key_values=cache, depth_offset=2), "depth_offset"),
        (dict(hidden_states=hidden, depth_offset=1), "depth_offset"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**kwargs)
    assert cache.get_seq_length() == 1  # failed calls leave the cache alone
    out = model(code_embedding_sums=sums[:, :1], past_key_values=cache, depth_offset=1)
    assert out.logits.shape == (BATCH, 1, 64)


# ----------------------------------------------------------------------------- structure
def test_paper_preset_builds_on_meta_with_expected_parameter_count():
    config = EvoTokDepthHeadConfig()
    with torch.device("meta"):
        model = EvoTokDepthTransformer(config)
    E, L, I, H, C, K, D = 2560, 6, 4 * 2560, 3584, 32, 32768, 4
    per_layer = 2 * 2 * E + 4 * (E * E + E) + (E * I + I) + (I * E + E)
    expected = (H * E + E) + (C * E + E) + D * E + L * per_layer + D * (2 * E + E * K + K)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(model.classifiers) == D and len(model.layers) == L
    assert model.depth_embeddings.shape == (1, D, E)
    assert model.classifiers[0].proj.weight.shape == (K, E)
    assert model.layers[0].mlp.fc1.weight.shape == (I, E)


def test_one_classifier_per_pixel_depth():
    for depth in (1, 2, 5):
        model = EvoTokDepthTransformer(tiny_config(pixel_depth=depth))
        assert len(model.classifiers) == depth
        assert model.depth_embeddings.shape == (1, depth, 32)


def official_state_dict(config, num_official_classifiers=16):
    """An official-shaped `RQTransformer` state dict, built from the structure in the reference."""
    E, I = config.hidden_size, 4 * config.hidden_size
    shapes = {
        "in_mlp_1.weight": (E, config.code_dim), "in_mlp_1.bias": (E,),
        "in_mlp_2.weight": (E, config.llm_hidden_size), "in_mlp_2.bias": (E,),
        "pos_emb_d": (1, config.pixel_depth, E),
    }  # fmt: skip
    for i in range(config.num_hidden_layers):
        block = f"head_transformer.blocks.{i}"
        for name in ("ln1", "ln2"):
            shapes.update({f"{block}.{name}.weight": (E,), f"{block}.{name}.bias": (E,)})
        for name in ("query", "key", "value", "proj"):
            shapes.update({f"{block}.attn.{name}.weight": (E, E), f"{block}.attn.{name}.bias": (E,)})
        shapes.update({f"{block}.mlp.0.weight": (I, E), f"{block}.mlp.0.bias": (I,)})
        shapes.update({f"{block}.mlp.2.weight": (E, I), f"{block}.mlp.2.bias": (E,)})
    for d in range(num_official_classifiers):
        shapes.update({f"classifiers.{d}.0.weight": (E,), f"classifiers.{d}.0.bias": (E,)})
        shapes.update({f"classifiers.{d}.1.weight": (config.codebook_size, E)})
        shapes.update({f"classifiers.{d}.1.bias": (config.codebook_size,)})
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def test_official_key_mapping_covers_every_parameter_once():
    model = make_model()
    official = official_state_dict(model.config)
    mapped = {name: official_depth_head_key(name, pixel_depth=4) for name in official}
    dropped = sorted(name for name, ours in mapped.items() if ours is None)
    unused = [f"classifiers.{d}.{i}.{p}" for d in range(4, 16) for i in (0, 1) for p in ("weight", "bias")]
    assert dropped == sorted(unused)
    targets = [ours for ours in mapped.values() if ours is not None]
    assert len(targets) == len(set(targets))
    assert set(targets) == set(model.state_dict())
    assert mapped["in_mlp_1.weight"] == "code_proj.weight"
    assert mapped["in_mlp_2.bias"] == "hidden_proj.bias"
    assert mapped["pos_emb_d"] == "depth_embeddings"
    assert mapped["head_transformer.blocks.1.attn.query.weight"] == "layers.1.attn.q_proj.weight"
    assert mapped["head_transformer.blocks.0.mlp.2.bias"] == "layers.0.mlp.fc2.bias"
    assert mapped["classifiers.3.0.weight"] == "classifiers.3.norm.weight"
    assert mapped["classifiers.3.1.weight"] == "classifiers.3.proj.weight"
    # shapes agree: the converted dict loads strictly and reproduces the official weights
    converted = {mapped[name]: tensor for name, tensor in official.items() if mapped[name] is not None}
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.layers[1].attn.k_proj.weight, official["head_transformer.blocks.1.attn.key.weight"])
    for bad in ("head_transformer.blocks.0.mlp.3.weight", "classifier_mlp.linear.weight", "model.in_mlp_1.weight"):
        with pytest.raises(ValueError, match="not a parameter of the official depth head"):
            official_depth_head_key(bad)
