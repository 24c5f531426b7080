"""The text side of EvoTok in miniature: a byte-level BPE tokenizer trained on the EvoTok Shapes text and a small
Qwen2 built from its config.

The same tokenizer serves the mini-SigLIP's text tower and the language model, as the paper's teacher and LLM each
come with their own tokenizer trained on their own corpus. It carries the ChatML special tokens and the image
tokens (`<image>`, `<boi>`, `<eoi>`), so `EvoTokForConditionalGeneration.from_components` finds them in place, and
the ChatML template with image parts (`DEFAULT_CHAT_TEMPLATE`: an image part renders as the `<image>` placeholder
that `EvoTokProcessor` expands).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..processing.processing_evotok import DEFAULT_CHAT_TEMPLATE
from .shapes import COLORS, NUMBER_WORDS, RELATIONS, SHAPES

PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", "<|im_end|>", "<image>", "<boi>", "<eoi>")
# The words the chat template itself writes: they must be in the BPE vocabulary as whole tokens too.
TEMPLATE_TEXT = ("system", "user", "assistant", "You are a helpful assistant.")


def describe_scene(objects: Iterable[dict]) -> str:
    """A caption naming every object with its colour, left to right: "a photo of a red circle and a blue square"
    (three or more: "a, b and c"). The mini-SigLIP learns from these beside the GenEval captions, so that colour is
    bound to shape in every image, not only in the `colors` / `color_attr` categories."""
    ordered = sorted(objects, key=lambda obj: (obj["bbox"][0] + obj["bbox"][2], obj["bbox"][1] + obj["bbox"][3]))
    names = [f"a {obj['color']} {obj['shape']}" for obj in ordered]
    if not names:
        raise ValueError("describe_scene needs at least one object")
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"a photo of {listed}"


def shapes_text_corpus(dataset) -> list[str]:
    """Every string the miniature's models read or write: captions, scene descriptions, questions, answers, the
    chat template's fixed words, and every colour / shape / number / relation word (so a word the split happens to
    lack, such as a held-out pair, still gets a token)."""
    texts = list(TEMPLATE_TEXT)
    vocabulary = [*SHAPES, *(f"{shape}s" for shape in SHAPES), *COLORS, *NUMBER_WORDS, *RELATIONS, "yes", "no"]
    texts.append(" ".join(vocabulary))
    for row in dataset:
        texts.append(row["caption"])
        texts.append(describe_scene(row["objects"]))
        for question in row["questions"]:
            texts.append(question["question"])
            texts.append(question["answer"])
    return texts


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (`tokenizers`) trained on `texts`, as a `PreTrainedTokenizerFast` with the ChatML and
    image special tokens, `<pad>` padding, `<|im_end|>` as end of sequence and the ChatML chat template with image
    parts. Byte-level, so any text round-trips exactly through encode / decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [text for text in texts if isinstance(text, str) and text]
    if not texts:
        raise ValueError("train_bpe_tokenizer needs at least one non-empty text")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must hold the 256 byte tokens and the special tokens, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token="<|im_end|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )  # fmt: skip
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def build_qwen2(tokenizer, hidden_size: int = 256, num_hidden_layers: int = 4, num_attention_heads: int = 4,
                num_key_value_heads: int = 2, intermediate_size: int | None = None, max_position_embeddings: int = 512,
                seed: int = 0):  # fmt: skip
    """A fresh `Qwen2ForCausalLM` from its config, sized to the tokenizer (tied embeddings, as the small Qwen2.5
    models), with the tokenizer's pad / end-of-turn ids and a generation config that stops at `<|im_end|>`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


__all__ = ["SPECIAL_TOKENS", "build_qwen2", "describe_scene", "shapes_text_corpus", "train_bpe_tokenizer"]
