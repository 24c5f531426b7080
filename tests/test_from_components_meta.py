"""`from_components` assembles on the meta device and returns a ready processor, built in one place.

The VLM skeleton holds no weights until the components' tensors are loaded into it: no random copy of the LLM or of
the tokenizer is made (so the peak memory is about the components', see benchmarks/assembly_memory.py), only the new
parts are initialised, the components' weights arrive unchanged (codebooks fp32 and bit-identical in a bf16
assembly), and the processor comes from `EvoTokProcessor.for_config`."""

import runpy
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers import initialization as hf_init

from evotok_hf import (
    EvoTokConfig,
    EvoTokForConditionalGeneration,
    EvoTokImageProcessor,
    EvoTokModel,
    EvoTokProcessor,
)
from evotok_hf.processing.processing_evotok import DEFAULT_CHAT_TEMPLATE

NEW_PARTS = ("model.multi_modal_projector.", "model.generation_projector.", "depth_head.")
DEPTH_HEAD = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["a red bicycle on a green hill", "describe the image please", "a cat on a mat"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """A saved tiny tokenizer, and a saved untied Qwen2 whose text tokenizer lacks the image tokens (so they are
    added and the embeddings resized)."""
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).save_pretrained(root / "tokenizer")
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    text_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                             eos_token="<eos>")  # fmt: skip
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(text_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )).save_pretrained(root / "llm")  # fmt: skip
    text_tokenizer.save_pretrained(root / "llm")
    return root


def record_initialisations(monkeypatch) -> list[torch.Tensor]:
    """Every real (non-meta) tensor that transformers' init functions write from now on (they skip loaded ones)."""
    written = []
    for name in dir(hf_init):
        function = getattr(hf_init, name)
        if not (name.endswith("_") and not name.startswith("_") and callable(function)):
            continue

        def spy(tensor, *args, _function=function, **kwargs):
            if not getattr(tensor, "_is_hf_initialized", False) and tensor.device.type != "meta":
                written.append(tensor)
            return _function(tensor, *args, **kwargs)

        monkeypatch.setattr(hf_init, name, spy)
    return written


def test_assembly_builds_on_meta_and_initialises_only_the_new_parts(parts, monkeypatch):
    built_on = []
    original_init = EvoTokForConditionalGeneration.__init__

    def init_spy(self, config):
        original_init(self, config)
        built_on.append({t.device.type for t in self.state_dict().values()})

    monkeypatch.setattr(EvoTokForConditionalGeneration, "__init__", init_spy)
    # loaded first, so their own initialisation is not recorded
    vision = EvoTokModel.from_pretrained(parts / "tokenizer")
    llm = AutoModelForCausalLM.from_pretrained(parts / "llm")
    written = record_initialisations(monkeypatch)
    model, _ = EvoTokForConditionalGeneration.from_components(
        vision, llm, text_tokenizer=PreTrainedTokenizerFast.from_pretrained(parts / "llm"), has_generation_head=True,
        depth_head_config=DEPTH_HEAD,
    )  # fmt: skip
    assert built_on == [{"meta"}]
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    initialised = {names[id(t)] for t in written if id(t) in names}
    assert initialised and all(name.startswith(NEW_PARTS) for name in initialised), sorted(initialised)
    assert {n for n in names.values() if n.startswith(NEW_PARTS)} == initialised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_assembled_weights_are_the_components_weights(parts, dtype):
    reference_vision = EvoTokModel.from_pretrained(parts / "tokenizer")
    reference_llm = AutoModelForCausalLM.from_pretrained(parts / "llm")
    model, text_tokenizer = EvoTokForConditionalGeneration.from_components(
        str(parts / "tokenizer"), str(parts / "llm"), dtype=dtype
    )
    old_rows = reference_llm.get_input_embeddings().weight.shape[0]
    assert len(text_tokenizer) == old_rows + 3 and model.config.text_config.vocab_size == old_rows + 3
    for name, value in reference_vision.state_dict().items():
        got = model.vision_tower.state_dict()[name]
        if name.startswith("quantizer."):  # fp32 and bit-identical in any dtype
            assert got.dtype == value.dtype and torch.equal(got, value), name
        else:
            assert got.dtype == dtype and torch.equal(got, value.to(dtype)), name
    language_model = model.language_model.state_dict()
    for name, value in reference_llm.base_model.state_dict().items():
        expected = value.to(dtype)
        got = language_model[name]
        if name == "embed_tokens.weight":  # the three new rows come from the old rows' statistics
            got = got[:old_rows]
        assert got.dtype == dtype and torch.equal(got, expected), name
    assert torch.equal(model.lm_head.weight[:old_rows], reference_llm.lm_head.weight.to(dtype))
    assert not model.vision_tower.training and not any(p.requires_grad for p in model.vision_tower.parameters())


def test_components_given_as_models_lend_their_tensors(parts):
    """The VLM shares the components' tensors instead of copying them: assembling never holds two copies."""
    vision = EvoTokModel.from_pretrained(parts / "tokenizer")
    llm = AutoModelForCausalLM.from_pretrained(parts / "llm")
    text_tokenizer = PreTrainedTokenizerFast.from_pretrained(parts / "llm")
    text_tokenizer.add_tokens(["<image>", "<boi>", "<eoi>"], special_tokens=True)
    llm.resize_token_embeddings(len(text_tokenizer))
    model, _ = EvoTokForConditionalGeneration.from_components(vision, llm, text_tokenizer=text_tokenizer)
    pairs = [
        (model.language_model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight),
        (model.lm_head.weight, llm.lm_head.weight),
        (model.vision_tower.quantizer.codebook, vision.quantizer.codebook),
        (model.vision_tower.encoder.embeddings.patch_embedding.weight,
         vision.encoder.embeddings.patch_embedding.weight),
    ]  # fmt: skip
    for ours, theirs in pairs:
        assert ours.data_ptr() == theirs.data_ptr()


def test_return_processor_gives_the_processor_for_config(parts):
    model, processor = EvoTokForConditionalGeneration.from_components(
        str(parts / "tokenizer"), str(parts / "llm"), has_generation_head=True, wrap_image_tokens=True,
        depth_head_config=DEPTH_HEAD, return_processor=True,
    )  # fmt: skip
    config = model.config
    assert isinstance(processor, EvoTokProcessor)
    assert processor.to_dict() == EvoTokProcessor.for_config(config, processor.tokenizer).to_dict()
    assert (processor.image_token_id, processor.boi_token_id, processor.eoi_token_id) == (
        config.image_token_id, config.boi_token_id, config.eoi_token_id)  # fmt: skip
    assert processor.num_image_tokens == config.num_image_tokens and processor.wrap_image_tokens
    size = config.vision_config.image_size
    assert processor.image_processor.size == {"height": size, "width": size}
    assert processor.image_processor.resize_mode == "squash"
    inputs = processor(text="a red bicycle", generation_mode="image", return_tensors="pt")
    assert int(inputs["input_ids"][0, -1]) == config.boi_token_id


def test_for_config_reads_every_fact_from_the_config(parts):
    from vlm_helpers import bpe_tokenizer, tiny_vlm_config

    tokenizer = bpe_tokenizer(CORPUS)
    unwrapped = tiny_vlm_config(tokenizer, boi_token_id=None, eoi_token_id=None)
    processor = EvoTokProcessor.for_config(unwrapped, tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE)
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE
    assert processor.image_token == "<image>" and processor.boi_token is None and processor.eoi_token is None
    assert not processor.wrap_image_tokens and processor.num_image_tokens == unwrapped.num_image_tokens
    given = EvoTokImageProcessor(size={"height": 32, "width": 32}, resize_mode="center_crop")
    assert EvoTokProcessor.for_config(unwrapped, tokenizer, image_processor=given).image_processor is given
    with pytest.raises(ValueError, match="image_token_id"):
        EvoTokProcessor.for_config(tiny_vlm_config(tokenizer, image_token_id=None), tokenizer)


def test_train_vlm_builds_its_processor_with_for_config(parts, tmp_path, monkeypatch):
    train_vlm = runpy.run_path(str(ROOT / "scripts" / "train_vlm.py"), run_name="not_main")
    calls = []
    original = EvoTokProcessor.for_config.__func__

    def spy(cls, config, tokenizer, **kwargs):
        calls.append(config)
        return original(cls, config, tokenizer, **kwargs)

    monkeypatch.setattr(EvoTokProcessor, "for_config", classmethod(spy))
    script_args, _ = train_vlm["parse_args"]([
        "--tokenizer_name_or_path", str(parts / "tokenizer"), "--llm_name_or_path", str(parts / "llm"),
        "--dataset", "unused.json", "--output_dir", str(tmp_path), "--task", "joint", "--use_cpu",
        "--depth_head_config", '{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}',
    ])  # fmt: skip
    model, processor = train_vlm["load_model_and_processor"](script_args)
    assert len(calls) == 1 and calls[0] is model.config and isinstance(processor, EvoTokProcessor)
    assert processor.tokenizer.pad_token is not None


def test_train_vlm_seeds_the_parts_an_assembly_adds(parts, tmp_path):
    """The same command gives the same starting weights: the new projectors and depth head are drawn from the run's
    seed, whatever the global random state was before."""
    train_vlm = runpy.run_path(str(ROOT / "scripts" / "train_vlm.py"), run_name="not_main")
    script_args, _ = train_vlm["parse_args"]([
        "--tokenizer_name_or_path", str(parts / "tokenizer"), "--llm_name_or_path", str(parts / "llm"),
        "--dataset", "unused.json", "--output_dir", str(tmp_path), "--task", "joint", "--use_cpu",
        "--depth_head_config", '{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}',
    ])  # fmt: skip

    def new_parts(seed):
        torch.rand(1000)  # move the global random state between the runs
        model, _ = train_vlm["load_model_and_processor"](script_args, seed=seed)
        return {name: tensor.clone() for name, tensor in model.state_dict().items()
                if name.startswith(("model.multi_modal_projector.", "model.generation_projector.", "depth_head."))}  # fmt: skip

    first, again, other = new_parts(3), new_parts(3), new_parts(4)
    assert first and set(first) == set(again) == set(other)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.slow
def test_assembly_memory_benchmark_runs_each_variant_in_its_own_process():
    main = runpy.run_path(str(ROOT / "benchmarks" / "assembly_memory.py"), run_name="not_main")["main"]
    result = main(["--llm", "tiny", "--tokenizer-preset", "evotok-tiny", "--dtype", "bfloat16"])
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"components", "materialised", "meta"}
    for row in rows.values():
        assert row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0 and row["codebook_dtype"] == "torch.float32"
