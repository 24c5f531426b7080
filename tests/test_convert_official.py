"""Conversion of the authors' checkpoints, on synthetic ones built here with the official names and layout.

The official side is written independently of the converter: `OURS_TO_OFFICIAL` and `official_state_dict` below
encode the authors' format (tests/data/official_tokenizer_state_dict.tsv, EVOTOK_REFERENCE.md), and every converted
tensor is compared with the official tensor it must come from."""

import argparse
import json
import logging
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokModel
from evotok_hf.hub.convert_official import (
    CheckpointConversionError,
    check_state_dict,
    convert_generation_checkpoint,
    convert_tokenizer_checkpoint,
    convert_understanding_checkpoint,
    infer_tokenizer_config,
    load_official_checkpoint,
    map_official_tokenizer_state_dict,
)
from evotok_hf.processing.processing_evotok import DEFAULT_CHAT_TEMPLATE

ROOT = pathlib.Path(__file__).resolve().parents[1]
# AutoTokenizer reads the LLaVA config.json beside the tokenizer, whose `rope_scaling` field transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")

# Our module prefix -> the authors' (their SigLIP saved by transformers 4.51, hence `vision_model.`).
OURS_TO_OFFICIAL = {
    "encoder.": "encoder_vqkd.vision_model.",
    "semantic_decoder.": "decoder_vqkd.",
    "pixel_decoder.": "decoder.",
    "input_scaling.": "scaling_layer.",
}
WARMUP_STEP = 1234
TINY_ARGS = dict(vq_model="EvoTok", teacher="siglip_256", codebook_size=64, codebook_embed_dim=8, vqgan_depth=2,
                 vqkd_depth=4, vq_warmup=100, restart_unused_codes=True, image_size=32, ema=True, lr=1e-4)  # fmt: skip


def official_name(ours: str) -> str:
    for prefix, theirs in OURS_TO_OFFICIAL.items():
        if ours.startswith(prefix):
            return theirs + ours[len(prefix):]
    return ours  # encode_task_layer / decode_task_layer / post_quant_conv keep their names


def official_state_dict(config: EvoTokConfig, seed: int) -> dict:
    """Random tensors under the authors' names and layout for a tokenizer of `config`: per-depth codebooks of K + 1
    rows with their EMA buffers and warm-up counter, the usage log, the input-scaling buffers at 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in EvoTokModel(config).state_dict().items()}
    state = {
        official_name(k): torch.randn(s, generator=g) * 0.2 for k, s in shapes.items() if not k.startswith("quantizer.")
    }
    state["scaling_layer.shift"] = torch.full((1, 3, 1, 1), 0.5)
    state["scaling_layer.scale"] = torch.full((1, 3, 1, 1), 0.5)
    size, dim = config.codebook_size, config.codebook_dim
    for d in range(config.num_depths):
        state[f"quantize.codebooks.{d}.weight"] = torch.randn(size + 1, dim, generator=g)
        state[f"quantize.codebooks.{d}.cluster_size_ema"] = torch.rand(size, generator=g) * 10
        state[f"quantize.codebooks.{d}.embed_ema"] = torch.randn(size, dim, generator=g)
        state[f"quantize.codebooks.{d}.step"] = torch.tensor(WARMUP_STEP)
    state["quantize.codebook_used"] = torch.randint(0, size, (128, config.num_depths), generator=g).float()
    return state


def official_checkpoint(ema: dict | None, model: dict, **extra) -> dict:
    adam = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]}  # fmt: skip
    checkpoint = {"model": model, "optimizer": adam, "discriminator": {"conv.weight": torch.zeros(2, 2)},
                  "optimizer_disc": adam, "steps": 500_000, "args": argparse.Namespace(**TINY_ARGS)}  # fmt: skip
    if ema is not None:
        checkpoint["ema"] = ema
    checkpoint.update(extra)
    return checkpoint


@pytest.fixture(scope="module")
def tiny_config():
    return EvoTokConfig.from_preset("evotok-tiny")


@pytest.fixture(scope="module")
def official(tiny_config, tmp_path_factory):
    """(path, checkpoint): `ema` and `model` hold different values, so the test can tell which one was converted."""
    checkpoint = official_checkpoint(ema=official_state_dict(tiny_config, 2), model=official_state_dict(tiny_config, 1))
    path = tmp_path_factory.mktemp("official") / "last.pt"
    torch.save(checkpoint, path)
    return path, checkpoint


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "evotok"
    model = convert_tokenizer_checkpoint(official[0], output, base_config="evotok-tiny")
    return model, output


# ----------------------------------------------------------------------------- tokenizer
def test_every_tensor_comes_from_the_ema_weights(official, converted, tiny_config):
    checkpoint = official[1]
    ema, other = checkpoint["ema"], checkpoint["model"]
    model, output = converted
    loaded = EvoTokModel.from_pretrained(output)
    state = loaded.state_dict()
    compared = set()
    for key, value in state.items():
        if not key.startswith("quantizer."):
            assert torch.equal(value, ema[official_name(key)]), key
            compared.add(official_name(key))
    depth, size = tiny_config.semantic_depth, tiny_config.codebook_size
    assert state["quantizer.codebook"].shape == (depth, size, tiny_config.codebook_dim)
    for d in range(depth):  # the padding row K is gone
        assert torch.equal(state["quantizer.codebook"][d], ema[f"quantize.codebooks.{d}.weight"][:size])
        compared.add(f"quantize.codebooks.{d}.weight")
    # everything else is EMA training state or the usage log, dropped by default: a fresh model's EMA state instead
    dropped = {k for k in ema if k not in compared}
    assert dropped == {"quantize.codebook_used"} | {
        f"quantize.codebooks.{d}.{n}" for d in range(depth) for n in ("cluster_size_ema", "embed_ema", "step")
    }
    assert torch.equal(state["quantizer.cluster_size_ema"], torch.zeros(depth, size))
    assert torch.equal(state["quantizer.embed_ema"], state["quantizer.codebook"])
    assert int(state["quantizer.ema_step"]) == 0
    assert not torch.equal(state["encode_task_layer.0.weight"], other["encode_task_layer.0.weight"])  # `ema` won
    for key, value in model.state_dict().items():  # the returned model is what was saved
        assert torch.equal(value, state[key]), key

    # the config: the tiny preset's sizes, with the official args' warm-up
    expected = EvoTokConfig.from_preset("evotok-tiny", ema_warmup_steps=TINY_ARGS["vq_warmup"]).to_dict()
    got = model.config.to_dict()
    for d in (expected, got, expected["encoder_config"], got["encoder_config"]):
        for field in ("_name_or_path", "transformers_version", "architectures", "dtype"):
            d.pop(field, None)
    assert got == expected

    processor = AutoImageProcessor.from_pretrained(output)
    assert processor.resize_mode == "center_crop" and processor.size["height"] == tiny_config.image_size
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        encoded = loaded.encode(images)
        assert encoded.codes.shape == (2, 4, 4, 4)
        assert torch.equal(encoded.codes, model.encode(images).codes)
        assert loaded.decode(encoded.codes[..., :2]).shape == (2, 3, 32, 32)
        assert loaded.get_semantic_features(encoded.codes).shape == (2, 16, tiny_config.teacher_dim)


def test_keep_training_state_restores_the_ema_statistics(official, tmp_path):
    ema = official[1]["ema"]
    model = convert_tokenizer_checkpoint(
        official[0], tmp_path / "out", keep_training_state=True, base_config="evotok-tiny"
    )
    state = EvoTokModel.from_pretrained(tmp_path / "out").state_dict()
    for d in range(4):
        assert torch.equal(state["quantizer.cluster_size_ema"][d], ema[f"quantize.codebooks.{d}.cluster_size_ema"])
        assert torch.equal(state["quantizer.embed_ema"][d], ema[f"quantize.codebooks.{d}.embed_ema"])
    assert int(state["quantizer.ema_step"]) == WARMUP_STEP and state["quantizer.ema_step"].dtype == torch.long
    assert model.config.ema_warmup_steps == TINY_ARGS["vq_warmup"]


def test_model_weights_are_used_without_ema(tiny_config, tmp_path):
    model_weights = official_state_dict(tiny_config, 3)
    torch.save(official_checkpoint(ema=None, model=model_weights), tmp_path / "last.pt")
    model = convert_tokenizer_checkpoint(tmp_path / "last.pt", tmp_path / "out", base_config="evotok-tiny")
    assert torch.equal(model.encode_task_layer[0].weight, model_weights["encode_task_layer.0.weight"])


# ----------------------------------------------------------------------------- safe loading
def test_checkpoints_are_only_loaded_weights_only(official, monkeypatch):
    real_load, calls = torch.load, []

    def guarded_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "a full unpickle was attempted"
        calls.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    checkpoint = load_official_checkpoint(official[0])
    assert calls and isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["args"].codebook_size == 64


UNPICKLED = []


def _record_unpickle(value):
    UNPICKLED.append(value)
    return value


class Payload:
    """Pickles as a call of `_record_unpickle`: a full unpickle would run it."""

    def __reduce__(self):
        return (_record_unpickle, ("code ran",))


def test_objects_beyond_the_allow_list_are_refused(tiny_config, tmp_path):
    checkpoint = official_checkpoint(ema=None, model={"x": torch.zeros(1)}, args=argparse.Namespace(hook=Payload()))
    torch.save(checkpoint, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to load"):
        load_official_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to load"):
        convert_tokenizer_checkpoint(tmp_path / "evil.pt", tmp_path / "out")
    assert UNPICKLED == [] and not (tmp_path / "out").exists()


def test_files_that_are_not_official_checkpoints(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_official_checkpoint(tmp_path / "tensor.pt")
    torch.save({"steps": 3, "optimizer": {}}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="neither an 'ema' nor a 'model'"):
        load_official_checkpoint(tmp_path / "nothing.pt")


# ----------------------------------------------------------------------------- failures and the output folder
def test_malformed_checkpoint_lists_every_problem_and_leaves_the_output_alone(official, tmp_path):
    bad = dict(official[1]["ema"])
    del bad["decoder.conv_out.bias"]  # missing
    bad["some_new_module.weight"] = torch.zeros(3)  # unknown
    bad["decoder_vqkd.head.weight"] = torch.zeros(3)  # a known prefix, but no such module here
    bad["encode_task_layer.2.bias"] = torch.zeros(9)  # wrong shape (codebook_dim 8)
    torch.save(official_checkpoint(ema=bad, model=official[1]["model"]), tmp_path / "bad.pt")
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")

    with pytest.raises(ValueError, match="not an empty folder"):  # refused before any work
        convert_tokenizer_checkpoint(tmp_path / "bad.pt", output, base_config="evotok-tiny")
    with pytest.raises(CheckpointConversionError) as info:
        convert_tokenizer_checkpoint(tmp_path / "bad.pt", output, base_config="evotok-tiny", overwrite=True)
    message = str(info.value)
    assert len(info.value.problems) == 4, message
    for fragment in ("'pixel_decoder.conv_out.bias' is missing", "'some_new_module.weight' has no counterpart",
                     "'semantic_decoder.head.weight', which the model does not have",
                     "shape mismatch for 'encode_task_layer.2.bias'"):  # fmt: skip
        assert fragment in message
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and (output / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "out"]  # no temporary folder left behind

    convert_tokenizer_checkpoint(official[0], output, base_config="evotok-tiny", overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "out"]


# ----------------------------------------------------------------------------- paper sizes, on meta tensors
def paper_official_state_dict(strip_vision_model: bool = False) -> dict:
    path = ROOT / "tests" / "data" / "official_tokenizer_state_dict.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    state = {}
    for key, shape, _ in rows:
        if strip_vision_model:
            key = key.replace("encoder_vqkd.vision_model.", "encoder_vqkd.")
        state[key] = torch.empty(tuple(int(s) for s in shape.split("x")), device="meta")
    return state


@pytest.mark.parametrize("strip_vision_model", [False, True])
def test_paper_checkpoint_layout_infers_the_paper_config_and_maps_every_key(strip_vision_model):
    state = paper_official_state_dict(strip_vision_model)
    paper = EvoTokConfig.from_preset("evotok-siglip2-l16-256")
    official_args = argparse.Namespace(**{**TINY_ARGS, "codebook_size": 32768, "codebook_embed_dim": 32,
                                          "vqgan_depth": 4, "vqkd_depth": 16, "vq_warmup": 2000,
                                          "image_size": 256})  # fmt: skip
    # the state dict alone: no `step` buffers in this listing, so no EMA warm-up; the rest is the paper's
    no_warmup = EvoTokConfig.from_preset("evotok-siglip2-l16-256", ema_warmup_steps=0)
    assert infer_tokenizer_config(state).to_dict() == no_warmup.to_dict()
    assert infer_tokenizer_config(state, official_args).to_dict() == paper.to_dict()

    converted, sources, problems = map_official_tokenizer_state_dict(state)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in EvoTokModel(paper).state_dict().items()}
    check_state_dict(converted, expected, sources, problems)
    assert problems == [] and set(converted) == set(expected)
    assert converted["quantizer.codebook"].shape == (16, 32768, 32)


def test_config_inference_reports_what_it_cannot_tell(tiny_config):
    state = official_state_dict(tiny_config, 0)
    # with the paper preset as base, the tiny semantic attention (3 heads x 10) fits neither 12 heads nor the base
    with pytest.raises(CheckpointConversionError, match="semantic_decoder_num_heads"):
        infer_tokenizer_config(state)
    config = infer_tokenizer_config(state, semantic_decoder_num_heads=3, decoder_norm_groups=8,
                                    encoder_config={"num_attention_heads": 2})  # fmt: skip
    assert (config.semantic_decoder_num_heads, config.semantic_decoder_head_dim) == (3, 10)
    assert config.encoder_config.num_attention_heads == 2
    wrong = argparse.Namespace(**{**TINY_ARGS, "teacher": "siglip_384", "codebook_size": 128})
    with pytest.raises(CheckpointConversionError) as info:
        infer_tokenizer_config(state, wrong, base_config="evotok-tiny")
    assert len(info.value.problems) == 2
    assert "siglip_384" in str(info.value) and "args.codebook_size=128" in str(info.value)


# ----------------------------------------------------------------------------- understanding MLLM
CORPUS = ["user describe the image please", "assistant a cat on a red mat", "what colour is the sky", "blue green"]
SPECIAL = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def llava_qwen_config(vocab_size: int, eos: int, pad: int) -> dict:
    """A config.json as the authors' LLaVA trainer writes it (transformers 4.51 Qwen2 fields + LLaVA fields)."""
    return {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "torch_dtype": "float32",
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 512,
        "initializer_range": 0.5, "rms_norm_eps": 1e-6, "use_cache": True, "tie_word_embeddings": False,
        "rope_theta": 10000.0, "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 2, "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": eos,
        "mm_hidden_size": 24, "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "/work_dir/evotok/last.pt",
        "mm_vision_vq_type": "EVOTOK", "mm_vision_vq_model_type": "siglip_256", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_with_depth_transformer": False, "image_aspect_ratio": "square",
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_mm_proj": True,
        "tune_mm_mlp_adapter": False, "mm_projector_lr": None, "pad_token_id": pad,
    }  # fmt: skip


def qwen2_fields(llava_config: dict) -> dict:
    skip = {"architectures", "model_type", "torch_dtype"}
    return {k: v for k, v in llava_config.items() if not k.startswith(("mm_", "tokenizer_", "tune_")) and k not in
            skip | {"image_aspect_ratio", "use_mm_proj"}}  # fmt: skip


def save_shards(weights: dict, folder: pathlib.Path) -> None:
    names = sorted(weights)
    files = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(names)}
    for file in set(files.values()):
        save_file({k: weights[k].contiguous() for k in names if files[k] == file}, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))


@pytest.fixture(scope="module")
def llava(official, tmp_path_factory):
    """The authors' understanding output folder at tiny size: Qwen2 under `model.*` + `lm_head`, the projector
    `model.mm_projector.{0,2}`, the tokenizer copy under `model.vision_tower.vision_tower.*`, two shards with an
    index, the text tokenizer with the `[PAD]` the trainer adds (no `<image>`: it exists only while tokenizing)."""
    folder = tmp_path_factory.mktemp("llava") / "EvoTok-llava-qwen2.5_sft"
    folder.mkdir()
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    text_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>")
    text_tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    text_tokenizer.save_pretrained(folder)
    config = llava_qwen_config(len(text_tokenizer), text_tokenizer.eos_token_id, text_tokenizer.pad_token_id)
    (folder / "config.json").write_text(json.dumps(config))
    GenerationConfig(eos_token_id=text_tokenizer.eos_token_id, pad_token_id=text_tokenizer.pad_token_id,
                     max_new_tokens=5).save_pretrained(folder)  # fmt: skip

    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(**qwen2_fields(config))).eval()
    g = torch.Generator().manual_seed(5)
    weights = {k: v.clone() for k, v in llm.state_dict().items()}
    weights.update({
        "model.mm_projector.0.weight": torch.randn(32, 24, generator=g),
        "model.mm_projector.0.bias": torch.randn(32, generator=g),
        "model.mm_projector.2.weight": torch.randn(32, 32, generator=g),
        "model.mm_projector.2.bias": torch.randn(32, generator=g),
    })  # fmt: skip
    weights.update({f"model.vision_tower.vision_tower.{k}": v for k, v in official[1]["ema"].items()})
    save_shards(weights, folder)
    return folder, llm, weights, len(text_tokenizer)


def pil_image():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def test_understanding_checkpoint_converts_to_one_vlm_folder(llava, converted, tmp_path, caplog):
    folder, llm, weights, vocab = llava
    output = tmp_path / "vlm"
    with caplog.at_level(logging.WARNING):
        convert_understanding_checkpoint(folder, converted[1], output)
    assert "differ" not in caplog.text  # the tokenizer copy in the folder is the converted tokenizer

    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    assert isinstance(model, EvoTokForConditionalGeneration)
    config = model.config
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert config.image_token_id == image_id == vocab == processor.image_token_id  # a new id past the vocabulary
    assert (config.wrap_image_tokens, config.has_understanding_head, config.has_generation_head) == (False, True, False)
    assert config.text_config.model_type == "qwen2" and config.text_config.vocab_size == vocab + 1
    assert config.text_config.rope_parameters["rope_theta"] == 10000.0 and not config.tie_word_embeddings
    assert processor.image_processor.resize_mode == "squash" and processor.chat_template == DEFAULT_CHAT_TEMPLATE
    assert processor.num_image_tokens == 16
    assert image_id in model.generation_config.suppress_tokens and model.generation_config.max_new_tokens == 5

    # parts are compared through the model's own accessors, whatever module nesting the state dict has
    language_model = model.language_model.state_dict()
    for key, value in llm.state_dict().items():
        ours = model.lm_head.weight if key == "lm_head.weight" else language_model[key[len("model."):]]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):  # one appended row: the mean of the others
            assert torch.equal(ours[:vocab], value) and torch.allclose(ours[vocab], value.mean(0)), key
        else:
            assert torch.equal(ours, value), key
    projector = model.multi_modal_projector.state_dict()
    for i, ours in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            assert torch.equal(projector[f"{ours}.{p}"], weights[f"model.mm_projector.{i}.{p}"])
    vision_tower = model.vision_tower.state_dict()
    for key, value in EvoTokModel.from_pretrained(converted[1]).state_dict().items():
        assert torch.equal(vision_tower[key], value), key
    assert vision_tower["quantizer.codebook"].dtype == torch.float32

    # text-only greedy decoding is the bare LLM's; an image prompt runs end to end
    prompt = processor.tokenizer(["what colour is the sky"], return_tensors="pt")
    settings = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = llm.generate(**prompt, **settings, pad_token_id=processor.tokenizer.pad_token_id)
        assert torch.equal(model.generate(**prompt, **settings), expected)
        inputs = processor(images=[pil_image()], text="<image> describe the image", return_tensors="pt")
        assert (inputs.input_ids == image_id).sum() == 16
        out = model.generate(**inputs, **settings)
    assert out.shape[1] == inputs.input_ids.shape[1] + 6 and not (out[:, inputs.input_ids.shape[1]:] == image_id).any()


def test_understanding_without_text_tokenizer_and_with_other_tokenizer_weights(llava, tiny_config, tmp_path, caplog):
    folder, _, _, vocab = llava
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    torch.manual_seed(3)
    other = EvoTokModel(tiny_config)
    with caplog.at_level(logging.WARNING):
        model = convert_understanding_checkpoint(bare, other, tmp_path / "vlm", dtype=torch.bfloat16)
    assert "differ from the given tokenizer" in caplog.text and "no text tokenizer" in caplog.text
    assert model.config.image_token_id == vocab and model.config.text_config.vocab_size == vocab + 1
    assert not (tmp_path / "vlm" / "processor_config.json").exists()
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "vlm")
    assert loaded.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.vision_tower.quantizer.codebook.dtype == torch.float32


def test_malformed_understanding_checkpoint_lists_every_problem(llava, converted, tmp_path):
    folder, _, weights, _ = llava
    bad_folder = tmp_path / "bad"
    bad_folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(folder / name, bad_folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (bad_folder / "config.json").write_text(json.dumps(config))
    bad = dict(weights)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.image_newline"] = torch.zeros(32)
    bad["model.vision_tower.rqtransformer.in_mlp_1.weight"] = torch.zeros(4, 8)
    bad["model.mm_projector.2.bias"] = torch.zeros(33)
    save_file({k: v.contiguous() for k, v in bad.items()}, bad_folder / "model.safetensors")
    with pytest.raises(CheckpointConversionError) as info:
        convert_understanding_checkpoint(bad_folder, converted[1], tmp_path / "vlm")
    message = str(info.value)
    assert len(info.value.problems) == 5, message
    for fragment in ("mm_projector_type 'linear'", "'model.image_newline' has no counterpart",
                     "'model.vision_tower.rqtransformer.in_mlp_1.weight' has no counterpart",
                     "language_model.layers.1.mlp.up_proj.weight' is missing",
                     "multi_modal_projector.linear_2.bias' (from 'model.mm_projector.2.bias')"):  # fmt: skip
        assert fragment in message
    assert not (tmp_path / "vlm").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_semantic_to_pixel_checkpoint_converts_with_all_its_codebooks(tmp_path):
    """The paper's (vqgan_depth, vqkd_depth) = (16, 4) ablation: 16 codebooks, all summed by the pixel latent and the
    first 4 by the semantic one. The number of codebooks is the deeper depth; without `args` it stays the semantic
    depth, as for the paper's (4, 16)."""
    config = EvoTokConfig.from_preset("evotok-tiny", pixel_depth=16, semantic_depth=4)
    ema = official_state_dict(config, 3)
    args = argparse.Namespace(**{**TINY_ARGS, "vqgan_depth": 16, "vqkd_depth": 4})
    inferred = infer_tokenizer_config(ema, args, base_config="evotok-tiny")
    assert (inferred.pixel_depth, inferred.semantic_depth, inferred.num_depths) == (16, 4, 16)
    plain = infer_tokenizer_config(ema, base_config="evotok-tiny")
    assert (plain.pixel_depth, plain.semantic_depth) == (2, 16)
    for depths in ((8, 4), (4, 8), (16, 32)):
        wrong = argparse.Namespace(**{**TINY_ARGS, "vqgan_depth": depths[0], "vqkd_depth": depths[1]})
        with pytest.raises(CheckpointConversionError, match="16 codebooks"):
            infer_tokenizer_config(ema, wrong, base_config="evotok-tiny")

    path = tmp_path / "last.pt"
    torch.save(official_checkpoint(ema=ema, model=official_state_dict(config, 4), args=args), path)
    convert_tokenizer_checkpoint(path, tmp_path / "evotok", base_config="evotok-tiny")
    loaded = EvoTokModel.from_pretrained(tmp_path / "evotok").eval()
    assert (loaded.config.pixel_depth, loaded.config.semantic_depth) == (16, 4)
    expected = torch.stack([ema[f"quantize.codebooks.{d}.weight"][:-1] for d in range(16)])
    assert torch.equal(loaded.quantizer.codebook, expected)
    codes = loaded.encode(torch.zeros(1, 3, 32, 32)).codes
    assert codes.shape[-1] == 16 and loaded.decode(codes).shape == (1, 3, 32, 32)


# ----------------------------------------------------------------------------- generation MLLM
# The paper's residual depths at tiny size: 16 semantic codebooks, of which the first 4 are the pixel ones; the
# authors' depth head builds one classifier per semantic depth (16) and trains the first 4.
GEN_TOKENIZER = dict(semantic_depth=16, pixel_depth=4)
HEAD_WIDTH, HEAD_LAYERS, HEAD_HEADS = 16, 2, 4
RQ = "model.vision_tower.rqtransformer."
# The authors' RQTransformer block names -> ours (written from their module structure, EVOTOK_REFERENCE.md).
DEPTH_HEAD_BLOCK = {"ln1": "input_layernorm", "attn.query": "attn.q_proj", "attn.key": "attn.k_proj",
                    "attn.value": "attn.v_proj", "attn.proj": "attn.o_proj", "ln2": "post_attention_layernorm",
                    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}  # fmt: skip


def ours_depth_head_name(official: str, pixel_depth: int) -> str | None:
    """Our `depth_head.*` name of an official depth-head tensor (relative to the head); None for the classifiers the
    authors never train."""
    if official == "pos_emb_d":
        return "depth_embeddings"
    if m := re.fullmatch(r"in_mlp_([12])\.(weight|bias)", official):
        return f"{'code_proj' if m[1] == '1' else 'hidden_proj'}.{m[2]}"
    if m := re.fullmatch(r"head_transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)", official):
        return f"layers.{m[1]}.{DEPTH_HEAD_BLOCK[m[2]]}.{m[3]}"
    m = re.fullmatch(r"classifiers\.(\d+)\.([01])\.(weight|bias)", official)
    if int(m[1]) >= pixel_depth:
        return None
    return f"classifiers.{m[1]}.{'norm' if m[2] == '0' else 'proj'}.{m[3]}"


def official_depth_head(config: EvoTokConfig, llm_hidden: int, seed: int) -> dict:
    """The authors' RQTransformer state dict (relative names): input MLPs, depth embeddings, GPT blocks with
    query / key / value / proj, and one [LayerNorm, Linear] classifier per semantic depth."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    e, codes = HEAD_WIDTH, config.codebook_size
    head = {"in_mlp_1.weight": rand(e, config.codebook_dim), "in_mlp_1.bias": rand(e), "in_mlp_2.weight":
            rand(e, llm_hidden), "in_mlp_2.bias": rand(e), "pos_emb_d": rand(1, config.pixel_depth, e)}  # fmt: skip
    for i in range(HEAD_LAYERS):
        block = f"head_transformer.blocks.{i}."
        for norm in ("ln1", "ln2"):
            head.update({f"{block}{norm}.weight": 1 + rand(e), f"{block}{norm}.bias": rand(e)})
        for linear in ("query", "key", "value", "proj"):
            head.update({f"{block}attn.{linear}.weight": rand(e, e), f"{block}attn.{linear}.bias": rand(e)})
        head.update({f"{block}mlp.0.weight": rand(4 * e, e), f"{block}mlp.0.bias": rand(4 * e),
                     f"{block}mlp.2.weight": rand(e, 4 * e), f"{block}mlp.2.bias": rand(e)})  # fmt: skip
    for d in range(config.semantic_depth):
        head.update({f"classifiers.{d}.0.weight": 1 + rand(e), f"classifiers.{d}.0.bias": rand(e),
                     f"classifiers.{d}.1.weight": rand(codes, e), f"classifiers.{d}.1.bias": rand(codes)})  # fmt: skip
    return head


def chat_tokenizer(image_tokens: bool = True) -> PreTrainedTokenizerFast:
    """The text tokenizer as the authors' generation trainer saves it: `[PAD]` added, then `<im_start>` / `<im_end>`
    (`mm_use_im_start_end`); `image_tokens=False` stops before those two."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if image_tokens:
        tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def gen_tokenizer(tiny_config, tmp_path_factory):
    """(converted tokenizer folder, official tokenizer state dict) with 16 semantic / 4 pixel depths."""
    config = EvoTokConfig.from_preset("evotok-tiny", **GEN_TOKENIZER)
    ema = official_state_dict(config, 7)
    args = argparse.Namespace(**{**TINY_ARGS, "vqgan_depth": 4, "vqkd_depth": 16})
    folder = tmp_path_factory.mktemp("gen_tokenizer")
    torch.save(official_checkpoint(ema=ema, model=official_state_dict(config, 8), args=args), folder / "last.pt")
    convert_tokenizer_checkpoint(folder / "last.pt", folder / "evotok", base_config="evotok-tiny")
    return folder / "evotok", ema


@pytest.fixture(scope="module")
def gen_llava(gen_tokenizer, tmp_path_factory):
    """The authors' generation output folder at tiny size (MM_MODE=generation): Qwen2 + `model.mm_projector.{0,2}`
    over the 8-d code sums + the depth head under `model.vision_tower.rqtransformer.*` + the tokenizer copy; their
    config.json (no depth-head config in it: the authors hard-code it) and text tokenizer."""
    folder = tmp_path_factory.mktemp("gen_llava") / "EvoTok-llava-qwen2.5_gen_sft"
    folder.mkdir()
    text_tokenizer = chat_tokenizer()
    text_tokenizer.save_pretrained(folder)
    rows = len(text_tokenizer)
    config = llava_qwen_config(rows, text_tokenizer.eos_token_id, text_tokenizer.pad_token_id)
    config.update(mm_hidden_size=8, mm_use_im_start_end=True, mm_with_depth_transformer=True,
                  image_aspect_ratio="pad", tune_mm_depth_transformer=False)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    GenerationConfig(eos_token_id=text_tokenizer.eos_token_id, pad_token_id=text_tokenizer.pad_token_id,
                     top_k=20, top_p=0.8, temperature=0.7, do_sample=True).save_pretrained(folder)  # fmt: skip

    torch.manual_seed(1)
    llm = Qwen2ForCausalLM(Qwen2Config(**qwen2_fields(config))).eval()
    g = torch.Generator().manual_seed(9)
    weights = {k: v.clone() for k, v in llm.state_dict().items()}
    weights.update({
        "model.mm_projector.0.weight": torch.randn(32, 8, generator=g),
        "model.mm_projector.0.bias": torch.randn(32, generator=g),
        "model.mm_projector.2.weight": torch.randn(32, 32, generator=g),
        "model.mm_projector.2.bias": torch.randn(32, generator=g),
    })  # fmt: skip
    head = official_depth_head(EvoTokConfig.from_preset("evotok-tiny", **GEN_TOKENIZER), 32, seed=11)
    weights.update({RQ + k: v for k, v in head.items()})
    weights.update({f"model.vision_tower.vision_tower.{k}": v for k, v in gen_tokenizer[1].items()})
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    return folder, llm, weights, head, rows


def test_generation_checkpoint_converts_to_a_generation_vlm(gen_llava, gen_tokenizer, tmp_path, caplog):
    folder, llm, weights, head, rows = gen_llava
    output = tmp_path / "vlm"
    with caplog.at_level(logging.INFO, logger="evotok_hf.hub"):
        convert_generation_checkpoint(folder, gen_tokenizer[0], output,
                                      depth_head_config={"num_attention_heads": HEAD_HEADS})  # fmt: skip
    assert "differ" not in caplog.text  # the tokenizer copy in the folder is the converted tokenizer
    # the unused classifiers are reported as dropped, not as problems
    assert "classifiers for depths [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] (48 tensors)" in caplog.text

    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    config = model.config
    assert isinstance(model, EvoTokForConditionalGeneration)
    assert (config.has_understanding_head, config.has_generation_head, config.wrap_image_tokens) == (False, True, True)
    # the authors' image start / end rows (the last two) are now real <boi> / <eoi> tokens; <image> is a new row
    vocab = processor.tokenizer.get_vocab()
    assert "<im_start>" not in vocab and "<im_end>" not in vocab
    assert (config.boi_token_id, config.eoi_token_id, config.image_token_id) == (rows - 2, rows - 1, rows)
    assert (vocab["<boi>"], vocab["<eoi>"], vocab["<image>"]) == (rows - 2, rows - 1, rows)
    assert (processor.boi_token_id, processor.eoi_token_id, processor.image_token_id) == (rows - 2, rows - 1, rows)
    assert processor.wrap_image_tokens and processor.chat_template == DEFAULT_CHAT_TEMPLATE
    assert config.text_config.vocab_size == rows + 1
    head_config = config.depth_head_config
    assert (head_config.hidden_size, head_config.num_hidden_layers, head_config.num_attention_heads,
            head_config.intermediate_size) == (HEAD_WIDTH, HEAD_LAYERS, HEAD_HEADS, 4 * HEAD_WIDTH)  # fmt: skip
    assert (head_config.code_dim, head_config.codebook_size, head_config.pixel_depth, head_config.llm_hidden_size) == (
        8, 64, 4, 32)  # fmt: skip
    # the authors' image-generation settings: the paper's guidance scale, their depth head's sampling (in the depth
    # head's generation config, as CSM's depth decoder); the text settings stay those of their folder (Qwen's)
    generation_config, depth_generation_config = model.generation_config, model.depth_head.generation_config
    assert generation_config.guidance_scale == 7.5 and not hasattr(generation_config, "image_generation")
    assert (depth_generation_config.do_sample, depth_generation_config.temperature, depth_generation_config.top_k,
            depth_generation_config.top_p) == (True, 1.0, 900, 0.96)  # fmt: skip
    assert {rows - 2, rows - 1, rows} <= set(generation_config.suppress_tokens) and generation_config.top_k == 20

    # every tensor equals its source
    language_model = model.language_model.state_dict()
    for key, value in llm.state_dict().items():
        ours = model.lm_head.weight if key == "lm_head.weight" else language_model[key[len("model."):]]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):  # trained <im_start> / <im_end> rows kept
            assert torch.equal(ours[:rows], value) and torch.allclose(ours[rows], value.mean(0)), key
        else:
            assert torch.equal(ours, value), key
    projector = model.generation_projector.state_dict()
    for i, ours in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            assert torch.equal(projector[f"{ours}.{p}"], weights[f"model.mm_projector.{i}.{p}"])
    assert not hasattr(model.model, "multi_modal_projector")
    depth_head = model.depth_head.state_dict()
    expected = {ours_depth_head_name(k, 4): v for k, v in head.items() if ours_depth_head_name(k, 4) is not None}
    assert set(depth_head) == set(expected)  # the 12 unused classifiers are gone
    assert len(model.depth_head.classifiers) == 4 and len(expected) == len(head) - 12 * 4
    for key, value in expected.items():
        assert torch.equal(depth_head[key], value), key
    vision_tower = model.vision_tower.state_dict()
    for key, value in EvoTokModel.from_pretrained(gen_tokenizer[0]).state_dict().items():
        assert torch.equal(vision_tower[key], value), key

    # text-to-image runs end to end: greedy without guidance, and the saved defaults (CFG 7.5, sampling)
    inputs = processor(text=["a cat on a red mat"], generation_mode="image", return_tensors="pt")
    assert inputs.input_ids[0, -1] == rows - 2
    codes = model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=1.0)
    assert codes.shape == (1, 4, 4, 4) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 64
    sampled = model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 4, 4, 4)
    assert model.decode_image_tokens(codes).shape == (1, 3, 32, 32)


def test_malformed_generation_checkpoint_lists_every_problem(gen_llava, gen_tokenizer, tmp_path):
    folder, _, weights, _, _ = gen_llava
    bad_folder = tmp_path / "bad"
    shutil.copytree(folder, bad_folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = json.loads((folder / "config.json").read_text())
    config["mm_hidden_size"] = 24
    (bad_folder / "config.json").write_text(json.dumps(config))
    bad = dict(weights)
    del bad[RQ + "head_transformer.blocks.1.attn.key.weight"]
    bad[RQ + "classifiers.2.1.weight"] = torch.zeros(65, HEAD_WIDTH)
    bad[RQ + "ln_f.weight"] = torch.ones(HEAD_WIDTH)
    save_file({k: v.contiguous() for k, v in bad.items()}, bad_folder / "model.safetensors")
    heads = {"num_attention_heads": HEAD_HEADS}
    with pytest.raises(CheckpointConversionError) as info:
        convert_generation_checkpoint(bad_folder, gen_tokenizer[0], tmp_path / "vlm", depth_head_config=heads)
    message = str(info.value)
    assert len(info.value.problems) == 4, message
    for fragment in ("mm_hidden_size=24 but the generation projector reads the tokenizer's 8-d",
                     f"'{RQ}ln_f.weight' has no counterpart in the depth head",
                     "depth_head.layers.1.attn.k_proj.weight' is missing",
                     "shape mismatch for 'depth_head.classifiers.2.proj.weight' (from "
                     f"'{RQ}classifiers.2.1.weight'): checkpoint (65, "):  # fmt: skip
        assert fragment in message

    # heads leave no trace in the weights, and the authors store no depth-head config
    with pytest.raises(CheckpointConversionError, match="cannot tell the depth head's attention heads"):
        convert_generation_checkpoint(folder, gen_tokenizer[0], tmp_path / "vlm")
    # a text tokenizer whose last ids are not the authors' image start / end tokens
    other = chat_tokenizer(image_tokens=False)
    other.add_tokens(["<im_end>"], special_tokens=True)
    with pytest.raises(CheckpointConversionError, match=r"does not match the checkpoint's image start / end rows"):
        convert_generation_checkpoint(folder, gen_tokenizer[0], tmp_path / "vlm", text_tokenizer=other,
                                      depth_head_config=heads)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


# ----------------------------------------------------------------------------- script
def test_script_converts_a_tokenizer_checkpoint(official, tmp_path):
    namespace = runpy.run_path(str(ROOT / "scripts" / "convert_official.py"), run_name="not_main")
    args = namespace["parse_args"](
        ["understanding", "--understanding-dir", "a", "--tokenizer", "b", "--output-dir", "c"]
    )
    assert (args.mode, args.understanding_dir, args.tokenizer, args.dtype) == ("understanding", "a", "b", None)
    args = namespace["parse_args"](["generation", "--generation-dir", "a", "--tokenizer", "b", "--output-dir", "c",
                                    "--depth-head-config", '{"num_attention_heads": 40}'])  # fmt: skip
    assert (args.mode, args.generation_dir, args.depth_head_config) == ("generation", "a", {"num_attention_heads": 40})
    output = namespace["main"](["tokenizer", "--tokenizer-checkpoint", str(official[0]),
                                "--output-dir", str(tmp_path / "tok"), "--base-config", "evotok-tiny",
                                "--keep-training-state"])  # fmt: skip
    loaded = EvoTokModel.from_pretrained(output)
    assert int(loaded.quantizer.ema_step) == WARMUP_STEP
    assert torch.equal(loaded.post_quant_conv.weight, official[1]["ema"]["post_quant_conv.weight"])


def run_script_as_main(argv, monkeypatch):
    """scripts/convert_official.py run as `python scripts/convert_official.py ARGV` runs it (its __main__ block); the
    SystemExit it ends with, or None."""
    monkeypatch.setattr(sys, "argv", ["convert_official.py", *argv])
    try:
        runpy.run_path(str(ROOT / "scripts" / "convert_official.py"), run_name="__main__")
    except SystemExit as exit:
        return exit
    return None


def test_script_refuses_a_non_empty_output_folder_in_one_line(official, tmp_path):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_official.py"), "tokenizer", "--tokenizer-checkpoint",
         str(official[0]), "--output-dir", str(output), "--base-config", "evotok-tiny"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"convert_official.py: error: output_dir (--output-dir) {str(output)!r} exists and is not an empty folder; "
        "nothing is overwritten (pass overwrite=True (--overwrite) to replace it)."
    ]
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_script_names_its_own_flag_for_an_unknown_depth_head_width(gen_llava, gen_tokenizer, tmp_path, monkeypatch):
    exit = run_script_as_main(["generation", "--generation-dir", str(gen_llava[0]), "--tokenizer",
                               str(gen_tokenizer[0]), "--output-dir", str(tmp_path / "vlm")], monkeypatch)  # fmt: skip
    assert exit is not None and isinstance(exit.code, str), exit  # a message, not a traceback
    assert "cannot tell the depth head's attention heads" in exit.code
    assert """--depth-head-config '{"num_attention_heads": N}' on the command line""" in exit.code
    flag = json.loads(re.search(r"--depth-head-config '(.*?)'", exit.code).group(1).replace("N", str(HEAD_HEADS)))
    assert run_script_as_main(["generation", "--generation-dir", str(gen_llava[0]), "--tokenizer",
                               str(gen_tokenizer[0]), "--output-dir", str(tmp_path / "vlm"), "--depth-head-config",
                               json.dumps(flag)], monkeypatch) is None  # the suggested flag, as given, converts
    config = EvoTokForConditionalGeneration.from_pretrained(tmp_path / "vlm").config
    assert config.depth_head_config.num_attention_heads == HEAD_HEADS


def test_script_converts_a_generation_checkpoint_with_a_stored_depth_head_config(gen_llava, gen_tokenizer, tmp_path):
    """An RQTransformerConfig stored in config.json gives the heads; a text tokenizer saved before the trainer added
    the image start / end tokens gets <boi> / <eoi> appended at the authors' ids."""
    folder, _, _, _, rows = gen_llava
    variant = tmp_path / "gen"
    shutil.copytree(folder, variant, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    config = json.loads((folder / "config.json").read_text())
    config["rqtransformer_config"] = {
        "model_type": "rqtransformer_model", "code_depths": [4, 16], "input_embed_dim_1": 8, "input_embed_dim_2": 32,
        "embed_dim": HEAD_WIDTH, "vocab_size": 64, "head": {"block": {"n_head": HEAD_HEADS}, "n_layer": HEAD_LAYERS},
    }  # fmt: skip
    (variant / "config.json").write_text(json.dumps(config))
    chat_tokenizer(image_tokens=False).save_pretrained(tmp_path / "text")
    namespace = runpy.run_path(str(ROOT / "scripts" / "convert_official.py"), run_name="not_main")
    output = namespace["main"](["generation", "--generation-dir", str(variant), "--tokenizer", str(gen_tokenizer[0]),
                                "--text-tokenizer", str(tmp_path / "text"), "--output-dir", str(tmp_path / "vlm"),
                                "--dtype", "bfloat16"])  # fmt: skip
    model = EvoTokForConditionalGeneration.from_pretrained(output)
    vocab = AutoProcessor.from_pretrained(output).tokenizer.get_vocab()
    assert model.config.depth_head_config.num_attention_heads == HEAD_HEADS
    assert (vocab["<boi>"], vocab["<eoi>"], vocab["<image>"]) == (rows - 2, rows - 1, rows)
    assert model.depth_head.layers[0].attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("official_generation_config", ["trainer-saved", "absent"])
def test_converted_generation_settings_are_read_back_and_editable(gen_llava, gen_tokenizer, tmp_path,
                                                                   official_generation_config):  # fmt: skip
    """The image-generation defaults the converter writes are the ones a reloaded folder generates with, and a
    user's edit of generation_config.json takes effect, whether the authors' folder has a generation_config.json
    as their trainer saves it (marked `_from_model_config`) or none."""
    folder = tmp_path / "official"
    shutil.copytree(gen_llava[0], folder)
    official_file = folder / "generation_config.json"
    if official_generation_config == "absent":
        official_file.unlink()
    else:
        official_file.write_text(json.dumps({**json.loads(official_file.read_text()), "_from_model_config": True}))
    output = tmp_path / "vlm"
    convert_generation_checkpoint(folder, gen_tokenizer[0], output,
                                  depth_head_config={"num_attention_heads": HEAD_HEADS})  # fmt: skip
    saved = json.loads((output / "generation_config.json").read_text())
    authors = {"guidance_scale": 7.5, "depth_decoder_do_sample": True, "depth_decoder_temperature": 1.0,
               "depth_decoder_top_k": 900, "depth_decoder_top_p": 0.96}  # fmt: skip
    assert {name: saved.get(name) for name in authors} == authors and not saved.get("_from_model_config")

    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    assert model.generation_config.guidance_scale == 7.5 and model.depth_head.generation_config.top_k == 900
    inputs = processor(text=["a cat on a red mat"], generation_mode="image", return_tensors="pt")
    edited = {"guidance_scale": 2.0, "depth_decoder_do_sample": False}
    expected = model.generate(**inputs, generation_mode="image", **edited)
    assert not torch.equal(expected, model.generate(**inputs, generation_mode="image", do_sample=False))

    saved.update(edited)  # as a user edits the file
    (output / "generation_config.json").write_text(json.dumps(saved, indent=2))
    reloaded = AutoModelForImageTextToText.from_pretrained(output).eval()
    assert torch.equal(reloaded.generate(**inputs, generation_mode="image"), expected)
