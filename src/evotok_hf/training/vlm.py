"""Fine-tuning the EvoTok VLM (understanding side): conversation data, assistant-only labels, stage set-up, LoRA.

The recipe is LLaVA's, as in the paper: stage 1 ("pretrain") trains only the projector on image-caption pairs
(LLaVA-Pretrain-558k), stage 2 ("sft") trains the projector and the language model (fully, or through LoRA adapters)
on instruction data. The EvoTok image tokenizer is frozen in both.

Two dataset layouts are read, row by row, inside the collator (so images are opened lazily and a 558k-row JSON needs
no preprocessing pass):

- LLaVA JSON: `{"image": "rel/path.jpg" | [paths], "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}` with images under `image_folder`;
- Hugging Face / TRL messages: `{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
  "text": "..."}]}, {"role": "assistant", "content": "..."}], "images": [PIL.Image, ...]}`.

A row may carry `image_codes` (a list of `(grid, grid, semantic_depth)` code arrays, from a `datasets.map` over the
tokenizer) instead of images; the model then skips the image tokenizer's encoder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..modeling import EvoTokForConditionalGeneration

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LLM_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES = ("pretrain", "sft")


# ----------------------------------------------------------------------------------------------- conversations
def _content_parts(text: str, image_token: str) -> list[dict]:
    """A LLaVA turn's text -> content parts, with one image part per `<image>` (the newline after it dropped: the chat
    template puts the image on its own line)."""
    parts = []
    pieces = text.split(image_token)
    for index, piece in enumerate(pieces):
        if index > 0:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def llava_to_messages(conversations: list[dict], image_token: str = "<image>") -> list[dict]:
    """LLaVA `conversations` (`from` / `value`) -> chat `messages` with image content parts."""
    messages = []
    for turn in conversations:
        speaker = turn.get("from")
        if speaker not in LLAVA_ROLES:
            raise ValueError(
                f"LLaVA conversation turn has unknown speaker {speaker!r}; expected one of {sorted(LLAVA_ROLES)}."
            )
        messages.append({"role": LLAVA_ROLES[speaker], "content": _content_parts(turn["value"], image_token)})
    return messages


def _image_paths(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def example_to_conversation(example: dict, image_folder: str | None = None, image_token: str = "<image>"):
    """One dataset row (either layout) -> `(messages, images, image_codes)`; `images` are PIL images (opened from
    `image_folder` for LLaVA rows), `image_codes` a list of code tensors or None."""
    import PIL.Image

    if "conversations" in example and example["conversations"] is not None:
        messages = llava_to_messages(example["conversations"], image_token)
        images = []
        for path in _image_paths(example.get("image")):
            full = path if image_folder is None else os.path.join(image_folder, path)
            if not os.path.isfile(full):
                raise FileNotFoundError(
                    f"LLaVA row {example.get('id', '?')!r}: image {full!r} does not exist "
                    "(set --image_folder to the folder the image paths are relative to)."
                )
            with PIL.Image.open(full) as image:
                images.append(image.convert("RGB"))
    elif "messages" in example and example["messages"] is not None:
        messages = example["messages"]
        images = list(example.get("images") or [])
    else:
        raise ValueError(
            f"Dataset row has neither `conversations` (LLaVA JSON) nor `messages` (HF chat format); keys: "
            f"{sorted(example)}."
        )
    codes = example.get("image_codes")
    if codes is not None:
        codes = [torch.as_tensor(c, dtype=torch.long) for c in codes]
        images = []
    return messages, images, codes


def _count_image_parts(messages: list[dict]) -> int:
    count = 0
    for message in messages:
        if not isinstance(message["content"], str):
            count += sum(1 for part in message["content"] if part.get("type") == "image")
    return count


# ----------------------------------------------------------------------------------------------- collator
@dataclass
class EvoTokVLMDataCollator:
    """Rows -> a padded batch `input_ids`, `attention_mask`, `labels`, and `pixel_values` or `image_codes`.

    The conversation is rendered with the processor's chat template, each image placeholder expanded to the image
    tokens, and tokenized once. Labels keep only the tokens of assistant turns (their text and the template's
    end-of-turn marker, so the model learns to stop); system, user and image tokens are `-100`. The assistant spans are
    found in characters by rendering growing prefixes of the conversation (`messages[:i]` with the generation prompt,
    then `messages[:i + 1]`), which needs a template whose renderings of a prefix are prefixes of the whole rendering
    (ChatML and every common chat template are), and mapped to tokens with the tokenizer's offsets.

    Args:
        processor ([`EvoTokProcessor`]): image processor + text tokenizer (a fast one) + chat template.
        max_length (`int`, *optional*): truncate longer sequences; a sequence whose truncation would cut an image's
            tokens raises (raise `max_length` or filter such rows).
        image_folder (`str`, *optional*): where LLaVA image paths are relative to.
        train_on_system_and_user (`bool`): label every token, not only the assistant's (off in the paper's recipe).
    """

    processor: object
    max_length: int | None = 2048
    image_folder: str | None = None
    train_on_system_and_user: bool = False

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _expand(self, text: str) -> str:
        return self.processor.image_token_sequence().join(text.split(self.processor.image_token))

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The expanded full text and the character spans `[start, end)` of the assistant turns in it."""
        full = self._expand(self._render(messages, add_generation_prompt=False))
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._expand(self._render(messages[:index], add_generation_prompt=True))
            through = self._expand(self._render(messages[: index + 1], add_generation_prompt=False))
            if not (full.startswith(through) and through.startswith(prompt)):
                raise ValueError(
                    "The chat template does not render a conversation's prefixes as prefixes of the whole "
                    "rendering, so assistant turns cannot be located for the labels; use a prefix-consistent "
                    "template (e.g. ChatML)."
                )
            spans.append((len(prompt), len(through)))
        return full, spans

    def encode_example(self, example: dict) -> dict:
        tokenizer = self.processor.tokenizer
        messages, images, codes = example_to_conversation(example, self.image_folder, self.processor.image_token)
        num_images = len(codes) if codes is not None else len(images)
        if _count_image_parts(messages) != num_images:
            raise ValueError(
                f"Dataset row {example.get('id', '?')!r}: the conversation has {_count_image_parts(messages)} image "
                f"placeholder(s) but {num_images} image(s)."
            )
        text, spans = self.assistant_spans(messages)
        if not spans:
            raise ValueError(f"Dataset row {example.get('id', '?')!r} has no assistant turn to learn from.")
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
        starts = torch.tensor([start for start, _ in encoding["offset_mapping"]], dtype=torch.long)
        in_assistant = torch.zeros_like(input_ids, dtype=torch.bool)
        for start, end in spans:
            in_assistant |= (starts >= start) & (starts < end)
        labels = input_ids.clone()
        if not self.train_on_system_and_user:
            labels[~in_assistant] = IGNORE_INDEX
        labels[input_ids == self.processor.image_token_id] = IGNORE_INDEX

        if self.max_length is not None and input_ids.numel() > self.max_length:
            image_positions = (input_ids == self.processor.image_token_id).nonzero()
            if image_positions.numel() and int(image_positions.max()) >= self.max_length:
                raise ValueError(
                    f"Dataset row {example.get('id', '?')!r}: {input_ids.numel()} tokens; truncating to max_length="
                    f"{self.max_length} would cut its image tokens. Raise max_length or filter long rows."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": input_ids, "labels": labels, "images": images, "image_codes": codes}

    def __call__(self, examples: list[dict]) -> dict:
        encoded = [self.encode_example(example) for example in examples]
        pad_id = self.processor.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The text tokenizer has no pad token; set `tokenizer.pad_token` before training.")
        length = max(e["input_ids"].numel() for e in encoded)
        input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, e in enumerate(encoded):  # right padding for training
            n = e["input_ids"].numel()
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = e["input_ids"], e["labels"], 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

        with_codes = [e["image_codes"] is not None for e in encoded]
        if any(with_codes) and not all(with_codes):
            raise ValueError("A batch mixes rows with `image_codes` and rows with images; pre-tokenise all or none.")
        if all(with_codes):
            codes = [c for e in encoded for c in e["image_codes"]]
            if codes:
                batch["image_codes"] = torch.stack(codes)
        else:
            images = [image for e in encoded for image in e["images"]]
            if images:
                batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return batch


# ----------------------------------------------------------------------------------------------- stages
@dataclass
class VLMLoraArguments:
    """LoRA on the language model's linear layers (stage 2)."""

    use_lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLM_LINEAR_LAYERS))


def lora_target_regex(layer_names) -> str:
    """A PEFT `target_modules` regex (full match on module paths) that selects the given linear layers inside the
    language model only. Suffixes alone (`"q_proj"`) would also match attention layers of a SigLIP encoder."""
    names = "|".join(sorted(set(layer_names)))
    return rf"(.*\.)?language_model\..*\.({names})"


def prepare_model_for_stage(model: EvoTokForConditionalGeneration, stage: str, lora: VLMLoraArguments | None = None):
    """Set which weights train: `pretrain` -> the projector only; `sft` -> projector + language model (+ LM head), or
    with `lora.use_lora` the projector (fully) + LoRA adapters on the language model's linear layers. The image
    tokenizer is frozen in every stage. Returns the model to train (a `PeftModel` with LoRA)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    use_lora = lora is not None and lora.use_lora
    if stage == "pretrain" and use_lora:
        raise ValueError("LoRA applies to stage 2 (sft); stage 1 (pretrain) trains the projector only.")
    if stage == "sft" and not use_lora:
        model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    model.freeze_vision_tower()
    if not use_lora:
        return model

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora_target_regex(lora.lora_target_modules),
        modules_to_save=["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    wrapped = [name for name, _ in peft_model.named_modules() if name.endswith(".lora_A")]
    if not wrapped:
        raise ValueError(f"LoRA matched no layer of the language model for {lora.lora_target_modules}.")
    if any(".vision_tower." in name for name in wrapped):
        raise AssertionError("LoRA adapters must never be placed in the image tokenizer.")
    return peft_model


def trainable_parameter_summary(model: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


__all__ = [
    "EvoTokVLMDataCollator",
    "IGNORE_INDEX",
    "LLM_LINEAR_LAYERS",
    "VLMLoraArguments",
    "example_to_conversation",
    "llava_to_messages",
    "lora_target_regex",
    "prepare_model_for_stage",
    "trainable_parameter_summary",
]
