"""Any `dtype=` load of any saved folder runs, with the codebooks (and their EMA statistics) fp32 and unrounded.

The folders are the ones users write: a tokenizer (`EvoTokModel.save_pretrained`) and VLMs assembled with
`from_components` from a saved tokenizer and a saved LLM, with and without the image-generation head. Such an assembled
folder stores `dtype` in every nested config, including `vision_config.encoder_config`, which transformers does not
overwrite in a `dtype=` load (it sets one config level only)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.core_model_loading import build_glob_alternation
from vlm_helpers import bpe_tokenizer

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokModel

CORPUS = ["a red bicycle on a green hill", "user describe the image please", "assistant a cat on a mat"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
QUANTIZER_TENSORS = ("quantizer.codebook", "quantizer.embed_ema", "quantizer.cluster_size_ema")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(root, the saved tokenizer model): root holds a tokenizer folder and two VLM folders assembled from saved parts."""
    root = tmp_path_factory.mktemp("dtype_loading")
    torch.manual_seed(0)
    tokenizer_model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).eval()
    tokenizer_model.save_pretrained(root / "tokenizer")
    text_tokenizer = bpe_tokenizer(CORPUS, vocab_size=300)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(text_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=text_tokenizer.pad_token_id, eos_token_id=text_tokenizer.eos_token_id,
    ))  # fmt: skip
    llm.save_pretrained(root / "llm")
    text_tokenizer.save_pretrained(root / "llm")
    for name, generation in (("vlm", False), ("vlm_generation", True)):
        vlm, processor = EvoTokForConditionalGeneration.from_components(
            str(root / "tokenizer"), str(root / "llm"), has_generation_head=generation,
            depth_head_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
            return_processor=True,
        )  # fmt: skip
        vlm.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root, tokenizer_model


def float_tensors(model: torch.nn.Module):
    yield from ((n, t) for n, t in model.named_parameters() if t.is_floating_point())
    yield from ((n, t) for n, t in model.named_buffers() if t.is_floating_point())


def assert_dtypes(model: PreTrainedModel, dtype: torch.dtype, reference: EvoTokModel, prefix: str = ""):
    """Everything in `dtype` except the quantizer's tensors, which are fp32 and bit-identical to the saved ones."""
    for name, tensor in float_tensors(model):
        if name.endswith(QUANTIZER_TENSORS):
            assert tensor.dtype == torch.float32, name
            assert torch.equal(tensor, reference.state_dict()[name.removeprefix(prefix)]), name
        elif "rotary_emb" not in name:  # RoPE frequencies are fp32 buffers by the LLM's own design
            assert tensor.dtype == dtype, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tokenizer_folder_loads_and_runs_in_any_dtype(folders, dtype):
    root, reference = folders
    model = AutoModel.from_pretrained(root / "tokenizer", dtype=dtype).eval()
    assert_dtypes(model, dtype, reference)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        encoded = model.encode(pixels.to(dtype))
        images = model.decode(encoded.codes[..., : model.config.pixel_depth])
        features = model.get_semantic_features(encoded.codes)
    assert images.dtype == dtype and torch.isfinite(images.float()).all()
    assert features.dtype == dtype and torch.isfinite(features.float()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["vlm", "vlm_generation"])
def test_assembled_vlm_folder_loads_and_runs_in_any_dtype(folders, name, dtype):
    root, reference = folders
    model = AutoModelForImageTextToText.from_pretrained(root / name, dtype=dtype).eval()
    assert_dtypes(model, dtype, reference, prefix="model.vision_tower.")
    config = model.config
    prompt = torch.tensor([[5, 6] + [config.image_token_id] * config.num_image_tokens + [7]])
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        logits = model(input_ids=prompt, pixel_values=pixels.to(dtype)).logits
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
    if config.has_generation_head:
        with torch.no_grad():
            codes = model.generate(input_ids=torch.tensor([[5, 6, config.boi_token_id]]), generation_mode="image",
                                   do_sample=False, guidance_scale=1.0)  # fmt: skip
            images = model.decode_image_tokens(codes)
        assert images.dtype == dtype and torch.isfinite(images.float()).all()


def test_half_precision_assembly_keeps_codebooks_exact_and_its_folder_loads_in_fp32(folders, tmp_path):
    """`from_components(dtype=torch.bfloat16)` must not round the codebooks, and its folder (which then stores bf16 in
    the nested configs) loads and runs in fp32."""
    root, reference = folders
    vlm, _ = EvoTokForConditionalGeneration.from_components(
        str(root / "tokenizer"), str(root / "llm"), dtype=torch.bfloat16
    )
    assert_dtypes(vlm, torch.bfloat16, reference, prefix="model.vision_tower.")
    vlm.save_pretrained(tmp_path)
    loaded = EvoTokForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_dtypes(loaded, torch.float32, reference, prefix="model.vision_tower.")
    # built directly from the saved config, every part follows the default dtype, not the dtype stored in it
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.text_config.dtype == config.vision_config.encoder_config.dtype == torch.bfloat16
    built = EvoTokForConditionalGeneration(config).eval()
    assert {t.dtype for _, t in float_tensors(built)} == {torch.float32}
    prompt = torch.tensor([[5] + [config.image_token_id] * config.num_image_tokens])
    with torch.no_grad():
        for model in (loaded, built):
            assert torch.isfinite(model(input_ids=prompt, pixel_values=torch.zeros(1, 3, 32, 32)).logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_codebooks_stay_fp32_when_missing_from_the_checkpoint_or_built_from_config(tmp_path, dtype):
    torch.manual_seed(0)
    config = EvoTokConfig.from_preset("evotok-tiny")
    EvoTokModel(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for name in QUANTIZER_TENSORS:
        state.pop(name)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = EvoTokModel.from_pretrained(tmp_path, dtype=dtype)
    built = AutoModel.from_config(config, dtype=dtype)
    for model in (loaded, built):
        assert model.post_quant_conv.weight.dtype == dtype
        for name in QUANTIZER_TENSORS:
            assert model.get_parameter_or_buffer(name).dtype == torch.float32, name


def tiny_vlm_on_meta() -> EvoTokForConditionalGeneration:
    text = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2)  # fmt: skip
    vision = EvoTokConfig.from_preset("evotok-tiny").to_dict()
    with torch.device("meta"):
        return EvoTokForConditionalGeneration(AutoConfig.for_model("evotok_vlm", vision_config=vision,
                                                                   text_config=text.to_dict()))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_strict_fp32_list_keeps_exactly_the_quantizer_floats_in_bf16_and_fp16_loads(dtype):
    """The quantizer's float tensors are declared once, in `_keep_in_fp32_modules_strict`, which transformers' load plan
    applies to bf16 and fp16 alike (the plain `_keep_in_fp32_modules` acts on fp16 only: redundant there, blind to
    bf16). The VLM gets the entries from its tokenizer. The plan names the tensors: it casts whatever it matches to
    fp32, so the int64 step counter must not match."""
    assert not EvoTokModel._keep_in_fp32_modules and not EvoTokForConditionalGeneration._keep_in_fp32_modules
    with torch.device("meta"):
        tokenizer = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny"))
    for model, prefix in ((tokenizer, ""), (tiny_vlm_on_meta(), "model.vision_tower.")):
        plan = model._get_dtype_plan(dtype)
        assert set(plan.values()) == {torch.float32}
        matcher, _, _ = build_glob_alternation(list(plan))  # how the loader matches the plan's entries to tensors
        kept = {name for name in model.state_dict() if matcher.search(name)}
        assert kept == {prefix + name for name in QUANTIZER_TENSORS}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_load_keeps_the_ema_step_an_integer(tmp_path, dtype):
    torch.manual_seed(0)
    EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).save_pretrained(tmp_path)
    loaded = EvoTokModel.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.quantizer.ema_step.dtype == torch.int64
    assert loaded.quantizer.codebook.dtype == torch.float32


def test_encoder_checkpoint_saved_in_bf16_gives_a_model_in_one_dtype(tmp_path):
    """`from_encoder_pretrained` copies the SigLIP checkpoint's config, `dtype` included: the encoder must still be
    built in the dtype of the rest of the model."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=2, image_size=32, patch_size=8))  # fmt: skip
    siglip.to(torch.bfloat16).save_pretrained(tmp_path)
    model = EvoTokModel.from_encoder_pretrained(str(tmp_path), config=EvoTokConfig.from_preset("evotok-tiny")).eval()
    assert {t.dtype for _, t in float_tensors(model)} == {torch.float32}
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, 32, 32)).codes.shape == (1, 4, 4, 4)
