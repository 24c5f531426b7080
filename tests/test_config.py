import pytest
import torch

from evotok_hf import EVOTOK_PRESETS, EvoTokConfig, EvoTokModel


def test_presets_and_round_trip(tmp_path):
    for name in EVOTOK_PRESETS:
        config = EvoTokConfig.from_preset(name)
        config.save_pretrained(tmp_path / name)
        again = EvoTokConfig.from_pretrained(tmp_path / name)
        assert again.to_dict() == config.to_dict()
    paper = EvoTokConfig.from_preset("evotok-siglip2-l16-256")
    assert (paper.codebook_size, paper.codebook_dim, paper.pixel_depth, paper.semantic_depth) == (32768, 32, 4, 16)
    assert paper.ema_warmup_steps == 2000 and paper.grid_size == 16 and paper.num_encoder_layers_used == 23
    assert EvoTokConfig().encoder_config.hidden_size == 1024  # the defaults are the paper's sizes


@pytest.mark.parametrize("layer, used", [(-1, 3), (-2, 2), (-3, 1), (1, 1), (3, 3)])
def test_feature_layer_to_layers_run(layer, used):
    # hidden_states has num_layers + 1 entries (embeddings first): index k > 0 is the output of layer k
    assert EvoTokConfig.from_preset("evotok-tiny", encoder_feature_layer=layer).num_encoder_layers_used == used


def test_overrides_merge_encoder_config():
    config = EvoTokConfig.from_preset("evotok-tiny", codebook_size=32, encoder_config={"num_hidden_layers": 4})
    assert config.codebook_size == 32 and config.encoder_config.num_hidden_layers == 4
    assert config.encoder_config.hidden_size == 32


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_parameter_counts_on_meta():
    with torch.device("meta"):
        model = EvoTokModel(EvoTokConfig.from_preset("evotok-siglip2-l16-256"))
    encoder = count(model.encoder)
    pixel = count(model.pixel_decoder) + count(model.post_quant_conv)
    semantic = count(model.semantic_decoder) + count(model.decode_task_layer)
    # EVOTOK_REFERENCE.md: encoder 316.0M, pixel decoder 42.5M, semantic decoder 40.1M (from the authors' state dict).
    assert round(encoder / 1e6, 1) == 316.0
    assert round(pixel / 1e6, 1) == 42.5
    assert round(semantic / 1e6, 1) == 40.1
    assert tuple(model.quantizer.codebook.shape) == (16, 32768, 32)
    assert tuple(model.semantic_decoder.blocks[0].attn.qkv.weight.shape) == (3060, 1024)


def official_shapes():
    import pathlib

    # Key / shape / dtype list read off the authors' tokenizer at paper sizes (see EVOTOK_REFERENCE.md).
    path = pathlib.Path(__file__).parent / "data" / "official_tokenizer_state_dict.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key: tuple(int(s) for s in shape.split("x")) for key, shape, _ in rows}


def test_module_structure_matches_the_official_state_dict():
    """Every official tensor has a counterpart of the same shape (under a renamed prefix), and vice versa."""
    shapes = official_shapes()
    with torch.device("meta"):
        model = EvoTokModel(EvoTokConfig.from_preset("evotok-siglip2-l16-256"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renames = [
        ("encoder_vqkd.vision_model.", "encoder."),
        ("decoder_vqkd.", "semantic_decoder."),
        ("decoder.", "pixel_decoder."),
        ("scaling_layer.", "input_scaling."),
    ]
    matched = set()
    for key, shape in shapes.items():
        if key.startswith("quantize."):
            continue  # stacked per depth here; the padding row and usage buffer are dropped (conversion issue)
        new = key
        for old, rep in renames:
            if new.startswith(old):
                new = rep + new[len(old):]
                break
        assert new in ours, f"official {key} has no counterpart {new}"
        assert ours[new] == shape, (key, ours[new], shape)
        matched.add(new)
    unmatched = {k for k in ours if k not in matched and not k.startswith("quantizer.")}
    assert not unmatched
    assert shapes["quantize.codebooks.0.weight"] == (32769, 32) and ours["quantizer.codebook"] == (16, 32768, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pixel_depth": 0}, "pixel_depth"),
        ({"semantic_depth": -2}, "semantic_depth"),
        ({"pixel_depth": 2.5}, "pixel_depth"),
        ({"codebook_size": 0}, "codebook_size"),
        ({"codebook_dim": -1}, "codebook_dim"),
        ({"teacher_dim": 0}, "teacher_dim"),
        ({"semantic_decoder_head_dim": 0}, "semantic_decoder_head_dim"),
        ({"search_chunk_size": 0}, "search_chunk_size"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_warmup_steps": -1}, "ema_warmup_steps"),
        ({"encoder_config": {"image_size": 36}}, "divisible by its patch_size"),
        ({"encoder_config": {"patch_size": 4, "image_size": 32}}, "must equal the encoder patch_size"),
        ({"encoder_feature_layer": 7}, "encoder_feature_layer"),
        ({"encoder_feature_layer": -4}, "encoder_feature_layer"),
        ({"encoder_feature_layer": 0}, "encoder_feature_layer"),
        ({"decoder_channel_multipliers": [1, 0, 2, 2]}, "decoder_channel_multipliers"),
        ({"decoder_norm_groups": 7}, "not divisible by decoder_norm_groups"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvoTokConfig.from_preset("evotok-tiny", **kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown EvoTok preset"):
        EvoTokConfig.from_preset("nope")
