"""Tiny text tokenizers and VLMs shared by the VLM test modules (imported by name: pytest puts tests/ on sys.path)."""

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokImageProcessor, EvoTokProcessor, EvoTokVLMConfig
from evotok_hf.processing.processing_evotok import DEFAULT_CHAT_TEMPLATE

CHATML_SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<boi>", "<eoi>"]
# The text of the text-to-image tests (the `t2i_*` fixtures of conftest.py): a tokenizer trained on T2I_CORPUS knows
# every word of T2I_PROMPTS.
T2I_CORPUS = ["system user assistant You are a helpful assistant.", "a red bicycle on a green hill", "a cat, a dog."]
T2I_PROMPTS = ["a red bicycle on a green hill", "a cat"]


def bpe_tokenizer(corpus: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the fly (decoding reproduces text exactly) with the ChatML and image
    special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(corpus * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=CHATML_SPECIAL_TOKENS[1:])  # fmt: skip


def tiny_vlm_config(tokenizer, **overrides) -> EvoTokVLMConfig:
    """The "evotok-tiny" tokenizer + a 2-layer, 32-wide Qwen2 (+ a 2-layer, 32-wide depth head when generating)."""
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    kwargs = dict(
        vision_config=EvoTokConfig.from_preset("evotok-tiny").to_dict(), text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), boi_token_id=tokenizer.convert_tokens_to_ids("<boi>"),
        eoi_token_id=tokenizer.convert_tokens_to_ids("<eoi>"),
        depth_head_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "resid_dropout": 0.0},
    )  # fmt: skip
    kwargs.update(overrides)
    return EvoTokVLMConfig(**kwargs)


def tiny_generation_vlm(tokenizer, seed: int = 0, sharpen: float = 20.0, **overrides):
    """A generation-only tiny VLM (images wrapped in start / end tokens, as the authors' generation model). A random
    depth head gives nearly flat logits; `sharpen` scales its classifiers so argmax / sampling differences show."""
    overrides = {"has_generation_head": True, "has_understanding_head": False, "wrap_image_tokens": True, **overrides}
    torch.manual_seed(seed)
    model = EvoTokForConditionalGeneration(tiny_vlm_config(tokenizer, **overrides)).eval()
    with torch.no_grad():
        for classifier in model.depth_head.classifiers:
            classifier.proj.weight.mul_(sharpen)
    return model


def tiny_processor(tokenizer, wrap_image_tokens: bool = False, resize_mode: str = "squash") -> EvoTokProcessor:
    vision = EvoTokConfig.from_preset("evotok-tiny")
    return EvoTokProcessor(
        image_processor=EvoTokImageProcessor(size={"height": vision.image_size, "width": vision.image_size},
                                             resize_mode=resize_mode),
        tokenizer=tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE, num_image_tokens=vision.grid_size**2,
        boi_token="<boi>", eoi_token="<eoi>", wrap_image_tokens=wrap_image_tokens,
    )  # fmt: skip


def word_level_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the words of `corpus` (others become <unk>), with the image special
    tokens and no chat tokens."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special_tokens = ["<pad>", "<unk>", "<image>", "<boi>", "<eoi>", "<eos>"]
    backend.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=special_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        additional_special_tokens=["<image>", "<boi>", "<eoi>"],
    )  # fmt: skip


def understanding_vlm_config(tokenizer, vision_config: EvoTokConfig, **overrides) -> EvoTokVLMConfig:
    """An understanding-only VLM: `vision_config` + a 2-layer, 32-wide Qwen2. A wide initialisation makes the random
    LM's greedy continuations varied, so generation tests compare something."""
    text_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    kwargs = dict(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        boi_token_id=tokenizer.convert_tokens_to_ids("<boi>"),
        eoi_token_id=tokenizer.convert_tokens_to_ids("<eoi>"),
    )
    kwargs.update(overrides)
    return EvoTokVLMConfig(**kwargs)


def generate_codes(model, processor, prompts=T2I_PROMPTS, negative_prompt=None, **settings):
    """`generate(generation_mode="image")` on text prompts, as a user calls it; returns what `generate` returns (the
    codes, or an output holding them when `return_dict_in_generate=True`)."""
    inputs = processor(text=prompts, generation_mode="image", negative_prompt=negative_prompt, return_tensors="pt")
    return model.generate(**inputs, generation_mode="image", **settings)


# The start of a subprocess script that runs as a user without evotok_hf would: the package cannot be imported.
BLOCK_EVOTOK_HF = r"""
import importlib.abc, importlib.util, os, sys

# evotok_hf is installed (editable) in this environment: take its path entry away and refuse any later import.
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "evotok_hf"))]
assert importlib.util.find_spec("evotok_hf") is None

class BlockEvoTok(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "evotok_hf":
            raise ImportError("evotok_hf is blocked in this process")

sys.meta_path.insert(0, BlockEvoTok())
"""


def fresh_user_env(home) -> dict[str, str]:
    """The environment of such a subprocess: nothing of this one's but PATH; its home, Hugging Face cache and
    remote-code modules under `home`, offline, one thread."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "HF_HOME": str(home / "hf_home"),
        "HF_MODULES_CACHE": str(home / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": "1",
    }
