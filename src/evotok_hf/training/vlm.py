"""Fine-tuning the EvoTok VLM (understanding and generation): conversation data, assistant-only labels, stages, LoRA.

The recipe is LLaVA's, as in the paper: stage 1 ("pretrain") trains only the new parts (the understanding projector;
for generation the generation projector and the depth head) on image-caption pairs (LLaVA-Pretrain-558k), stage 2
("sft") also trains the language model (fully, or through LoRA adapters). The EvoTok image tokenizer is frozen in
both. An image placeholder in an assistant turn is an image the model writes (text-to-image); the others are images
it reads.

Three dataset layouts are read, row by row, inside the collator (so images are opened lazily and a 558k-row JSON needs
no preprocessing pass):

- LLaVA JSON: `{"image": "rel/path.jpg" | [paths], "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}` with images under `image_folder`;
- Hugging Face / TRL messages: `{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
  "text": "..."}]}, {"role": "assistant", "content": "..."}], "images": [PIL.Image, ...]}`;
- text-to-image: `{"text": "a red bicycle", "image": PIL.Image | path}`.

A row may instead carry pre-tokenised codes (`pretokenize_images`, a `datasets.map` over the tokenizer):
`image_codes` (one `(grid, grid, semantic_depth)` array per image to read) and `generation_codes` (one
`(grid, grid, pixel_depth)` array per image to write); the model then skips the image tokenizer's encoder.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..modeling import EvoTokForConditionalGeneration
from ..processing.processing_evotok import UNCONDITIONAL_PROMPT

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


def _open_image(path: str, image_folder: str | None, row):
    import PIL.Image

    full = path if image_folder is None else os.path.join(image_folder, path)
    if not os.path.isfile(full):
        raise FileNotFoundError(
            f"Dataset row {row!r}: image {full!r} does not exist (set --image_folder to the folder the image paths "
            "are relative to)."
        )
    with PIL.Image.open(full) as image:
        return image.convert("RGB")


def example_to_conversation(example: dict, image_folder: str | None = None, image_token: str = "<image>",
                            open_images: bool = True):
    """One dataset row -> `(messages, images)`, the images (PIL, or None for pre-tokenised rows) in placeholder
    order. Layouts: LLaVA `conversations` (+ `image` paths under `image_folder`), HF `messages` (+ `images`), and
    text-to-image `text` + `image` (a user turn holding the text, an assistant turn holding the image to write).
    With `open_images=False` only the messages are meant: images given as paths stay paths."""
    row = example.get("id", "?")
    pretokenised = example.get("image_codes") is not None or example.get("generation_codes") is not None
    if example.get("conversations") is not None:
        messages = llava_to_messages(example["conversations"], image_token)
        paths = [] if pretokenised else _image_paths(example.get("image"))
        images = [_open_image(path, image_folder, row) if open_images else path for path in paths]
    elif example.get("messages") is not None:
        messages = example["messages"]
        images = list(example.get("images") or [])
    elif example.get("text") is not None and ("image" in example or "generation_codes" in example):
        messages = [{"role": "user", "content": example["text"]},
                    {"role": "assistant", "content": [{"type": "image"}]}]  # fmt: skip
        image = example.get("image")
        if isinstance(image, str) and not pretokenised and open_images:
            image = _open_image(image, image_folder, row)
        images = [] if pretokenised else [image]
    else:
        raise ValueError(
            "Dataset row has neither `conversations` (LLaVA JSON), `messages` (HF chat format) nor `text` + `image` "
            f"(text-to-image); keys: {sorted(example)}."
        )
    return messages, images


# ----------------------------------------------------------------------------------------------- collator
@dataclass
class EvoTokVLMDataCollator:
    """Rows -> a padded batch `input_ids`, `attention_mask`, `labels`, plus the images: `pixel_values` / `image_codes`
    for images to read, `generation_pixel_values` / `generation_codes` for images to write.

    The conversation is rendered with the processor's chat template and tokenized once. An image placeholder in an
    assistant turn is an image the model writes (text-to-image): it is expanded wrapped in the image start / end tokens
    and its codes become depth-head targets; any other placeholder is an image to read (expanded as the processor
    does). Labels keep only the tokens of assistant turns (their text, the image start / end tokens and the template's
    end-of-turn marker, so the model learns to open and close images and to stop); image tokens, system and user
    tokens are `-100`. The assistant spans are found in characters by rendering growing prefixes of the conversation
    (`messages[:i]` with the generation prompt, then `messages[:i + 1]`), which needs a template whose renderings of a
    prefix are prefixes of the whole rendering (ChatML and every common chat template are), and mapped to tokens with
    the tokenizer's offsets.

    Args:
        processor ([`EvoTokProcessor`]): image processor + text tokenizer (a fast one) + chat template.
        max_length (`int`, *optional*): truncate longer sequences; a sequence whose truncation would cut an image's
            tokens raises (raise `max_length` or filter such rows).
        image_folder (`str`, *optional*): where LLaVA image paths are relative to.
        train_on_system_and_user (`bool`): label every text token, not only the assistant's (off in the paper's
            recipe).
        unconditional_probability (`float`): how often a text-to-image row (one user turn, then an assistant turn that
            is one image to write) has its prompt replaced by the unconditional prompt, so that classifier-free
            guidance contrasts the prompt with a model trained without one (LlamaGen and Janus drop 10%). 0 keeps
            every prompt.
        seed (`int`): seeds the choice of the rows that lose their prompt.
    """

    processor: object
    max_length: int | None = 2048
    image_folder: str | None = None
    train_on_system_and_user: bool = False
    unconditional_probability: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.unconditional_probability <= 1.0:
            raise ValueError(f"unconditional_probability must be in [0, 1], got {self.unconditional_probability}.")
        self._rng = random.Random(self.seed)

    def _maybe_unconditional(self, messages: list[dict]) -> list[dict]:
        """A text-to-image conversation with its prompt replaced by the unconditional one, with probability
        `unconditional_probability`; any other conversation unchanged."""
        if self.unconditional_probability == 0.0 or not _is_text_to_image(messages):
            return messages
        if self._rng.random() >= self.unconditional_probability:
            return messages
        return [{"role": "user", "content": UNCONDITIONAL_PROMPT}, messages[1]]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]], list[bool]]:
        """The expanded text, the character spans `[start, end)` of the assistant turns in it, and for each image
        placeholder (in order) whether it is an image to write."""
        full = self._render(messages, add_generation_prompt=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], add_generation_prompt=True)
            through = self._render(messages[: index + 1], add_generation_prompt=False)
            if not (full.startswith(through) and through.startswith(prompt)):
                raise ValueError(
                    "The chat template does not render a conversation's prefixes as prefixes of the whole "
                    "rendering, so assistant turns cannot be located for the labels; use a prefix-consistent "
                    "template (e.g. ChatML)."
                )
            spans.append((len(prompt), len(through)))

        token = self.processor.image_token
        pieces = full.split(token)
        writes, expanded, shifts = [], [pieces[0]], []  # shifts: (position in `full`, growth in characters)
        position = len(pieces[0])
        for piece in pieces[1:]:
            write = any(start <= position < end for start, end in spans)
            sequence = self.processor.image_token_sequence(wrap=True if write else None)
            writes.append(write)
            shifts.append((position, len(sequence) - len(token)))
            expanded.extend([sequence, piece])
            position += len(token) + len(piece)

        def moved(offset: int) -> int:
            return offset + sum(growth for at, growth in shifts if at < offset)

        return "".join(expanded), [(moved(start), moved(end)) for start, end in spans], writes

    def encode_example(self, example: dict) -> dict:
        tokenizer, row = self.processor.tokenizer, example.get("id", "?")
        messages, images = example_to_conversation(example, self.image_folder, self.processor.image_token)
        messages = self._maybe_unconditional(messages)
        text, spans, writes = self.render(messages)
        num_write = sum(writes)
        num_read = len(writes) - num_write
        read_codes, write_codes = _codes(example.get("image_codes")), _codes(example.get("generation_codes"))
        if read_codes is not None or write_codes is not None:
            read_images, write_images = [], []
            if (read_codes is None and num_read) or (write_codes is None and num_write):
                raise ValueError(f"Dataset row {row!r}: pre-tokenised rows need codes for every image.")
        else:
            if len(images) != len(writes):
                raise ValueError(
                    f"Dataset row {row!r}: the conversation has {len(writes)} image placeholder(s) but "
                    f"{len(images)} image(s)."
                )
            read_images = [image for image, write in zip(images, writes) if not write]
            write_images = [image for image, write in zip(images, writes) if write]
        for name, codes, wanted in (("image_codes", read_codes, num_read), ("generation_codes", write_codes, num_write)):
            if codes is not None and len(codes) != wanted:
                raise ValueError(f"Dataset row {row!r}: {len(codes)} `{name}` for {wanted} image placeholder(s).")
        if not spans:
            raise ValueError(f"Dataset row {row!r} has no assistant turn to learn from.")

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
                    f"Dataset row {row!r}: {input_ids.numel()} tokens; truncating to max_length={self.max_length} "
                    "would cut its image tokens. Raise max_length or filter long rows."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return {
            "input_ids": input_ids, "labels": labels, "read_images": read_images, "write_images": write_images,
            "read_codes": read_codes, "write_codes": write_codes,
        }  # fmt: skip

    def token_lengths(self, examples) -> list[int]:
        """How many tokens `encode_example` gives each row (capped at `max_length`), without opening images or
        drawing the unconditional-prompt coin (whose draws stay those of training): what length-grouped sampling
        (`train_sampling_strategy="group_by_length"` / `"batch_rebalance"`) sorts by. A dropped prompt is a few tokens
        shorter; the lengths are those of the rows as written."""
        image_token = self.processor.image_token
        texts = [self.render(example_to_conversation(example, self.image_folder, image_token, open_images=False)[0])[0]
                 for example in examples]  # fmt: skip
        lengths = [len(ids) for ids in self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return lengths if self.max_length is None else [min(n, self.max_length) for n in lengths]

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
        image_processor = self.processor.image_processor
        for kind, codes_key, pixels_key in (("read", "image_codes", "pixel_values"),
                                            ("write", "generation_codes", "generation_pixel_values")):  # fmt: skip
            with_codes = [e[f"{kind}_codes"] is not None for e in encoded]
            if any(with_codes) and not all(with_codes):
                raise ValueError(f"A batch mixes rows with `{codes_key}` and rows with images; pre-tokenise all or none.")
            if all(with_codes):
                codes = [c for e in encoded for c in e[f"{kind}_codes"]]
                if codes:
                    batch[codes_key] = torch.stack(codes)
            else:
                images = [image for e in encoded for image in e[f"{kind}_images"]]
                if images:
                    batch[pixels_key] = image_processor(images, return_tensors="pt")["pixel_values"]
        return batch


def _is_text_to_image(messages: list[dict]) -> bool:
    """One user turn, then one assistant turn that is exactly one image (to write)."""
    if len(messages) != 2 or [m["role"] for m in messages] != ["user", "assistant"]:
        return False
    content = messages[1]["content"]
    return isinstance(content, list) and len(content) == 1 and content[0].get("type") == "image"


def _codes(value) -> list[torch.Tensor] | None:
    return None if value is None else [torch.as_tensor(c, dtype=torch.long) for c in value]


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


def new_module_names(model: EvoTokForConditionalGeneration) -> list[str]:
    """The parts a fresh VLM adds on top of the pretrained LLM and tokenizer (trained from stage 1 on)."""
    names = []
    if model.config.has_understanding_head:
        names.append("multi_modal_projector")
    if model.config.has_generation_head:
        names += ["generation_projector", "depth_head"]
    if model.config.image_position_embeddings:
        names.append("image_position_embedding")
    return names


def prepare_model_for_stage(model: EvoTokForConditionalGeneration, stage: str, lora: VLMLoraArguments | None = None):
    """Set which weights train: `pretrain` -> the new parts only (projectors, depth head); `sft` -> those + the
    language model (+ LM head), or with `lora.use_lora` those (fully) + LoRA adapters on the language model's linear
    layers. The image tokenizer is frozen in every stage. Returns the model to train (a `PeftModel` with LoRA)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
    model.requires_grad_(False)
    new_modules = new_module_names(model)
    for name in new_modules:
        getattr(model, name).requires_grad_(True)
    use_lora = lora is not None and lora.use_lora
    if stage == "pretrain" and use_lora:
        raise ValueError("LoRA applies to stage 2 (sft); stage 1 (pretrain) trains the projectors / depth head only.")
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
        modules_to_save=new_modules,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    wrapped = [name for name, _ in peft_model.named_modules() if name.endswith(".lora_A")]
    if not wrapped:
        raise ValueError(f"LoRA matched no layer of the language model for {lora.lora_target_modules}.")
    if any(".vision_tower." in name or ".depth_head." in name for name in wrapped):
        raise AssertionError("LoRA adapters belong in the language model only.")
    return peft_model


def pretokenize_images(dataset, tokenizer_model, image_processor, kind: str = "generation", image_column: str = "image",
                       batch_size: int = 16):  # fmt: skip
    """`datasets.map` step that replaces each row's image (column `image_column`: a PIL image or a list of them) by
    its codes, so training skips the tokenizer's encoder: `kind="generation"` writes `generation_codes` (the first
    `pixel_depth` depths; the text-to-image layout), `kind="understanding"` writes `image_codes` (the first
    `semantic_depth` depths, the ones the semantic latent sums)."""
    if kind not in ("generation", "understanding"):
        raise ValueError(f"kind must be 'generation' or 'understanding', got {kind!r}.")
    if image_column not in dataset.column_names:
        raise ValueError(f"the dataset has no column {image_column!r}; columns: {dataset.column_names}.")
    depth = tokenizer_model.config.pixel_depth if kind == "generation" else tokenizer_model.config.semantic_depth
    output_column = "generation_codes" if kind == "generation" else "image_codes"
    tokenizer_model = tokenizer_model.eval()

    def encode(batch):
        per_row = [value if isinstance(value, list) else [value] for value in batch[image_column]]
        flat = [image for images in per_row for image in images]
        pixel_values = image_processor(flat, return_tensors="pt")["pixel_values"].to(tokenizer_model.device)
        with torch.no_grad():
            codes = tokenizer_model.encode(pixel_values.to(tokenizer_model.dtype)).codes[..., :depth].cpu()
        out, start = [], 0
        for images in per_row:
            out.append(codes[start : start + len(images)].tolist())
            start += len(images)
        return {output_column: out}

    return dataset.map(encode, batched=True, batch_size=batch_size, remove_columns=[image_column])


def trainable_parameter_summary(model: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


# ----------------------------------------------------------------------------------------------- checkpoints
TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete `transformers.Trainer` checkpoint, or None when it is complete.

    The Trainer writes `trainer_state.json` last, after the weights, optimizer, scheduler, scaler and RNG states, so
    a save finished when that file is readable and records the step the folder is named after. The weights are checked
    too (every safetensors file, and every shard an index lists, must hold the bytes its header promises), which also
    catches a checkpoint damaged or cut short after the save."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    state_file = folder / TRAINER_STATE_NAME
    if not state_file.is_file():
        return f"incomplete: no {TRAINER_STATE_NAME} (the Trainer writes it last, so the save did not finish)"
    try:
        with open(state_file) as f:
            global_step = json.load(f)["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"incomplete: {TRAINER_STATE_NAME} is unreadable ({err})"
    named = CHECKPOINT_NAME.fullmatch(folder.name)
    if named and int(named.group(1)) != global_step:
        return f"incomplete: {TRAINER_STATE_NAME} records step {global_step}, not {named.group(1)}"
    weight_files = set(folder.glob("*.safetensors"))
    for index_file in folder.glob("*.safetensors.index.json"):
        try:
            with open(index_file) as f:
                weight_files.update(folder / shard for shard in json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"incomplete: {index_file.name} is unreadable ({err})"
    for weight_file in sorted(weight_files):
        if not weight_file.is_file():
            return f"incomplete: the weights file {weight_file.name} is missing"
        try:
            with safe_open(str(weight_file), framework="pt"):
                pass
        except (OSError, SafetensorError) as err:
            return f"incomplete: the weights file {weight_file.name} is damaged ({err})"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-<step>` folder under `output_dir` with the highest step among the complete ones (see
    `checkpoint_problem`), or None when there is none (or no `output_dir`). Newer incomplete ones, left by a run
    killed while saving, are skipped with a warning naming what is wrong. This is what `--resume_from_checkpoint
    latest` resumes; the Trainer's own `resume_from_checkpoint=True` takes the highest-numbered folder, complete or
    not."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        ((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_NAME.fullmatch(name))),
        reverse=True,
    )
    for _, name in steps:
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("Skipping checkpoint %s: %s.", folder, problem)
    return None


__all__ = [
    "EvoTokVLMDataCollator",
    "checkpoint_problem",
    "latest_complete_checkpoint",
    "new_module_names",
    "pretokenize_images",
    "IGNORE_INDEX",
    "LLM_LINEAR_LAYERS",
    "VLMLoraArguments",
    "example_to_conversation",
    "llava_to_messages",
    "lora_target_regex",
    "prepare_model_for_stage",
    "trainable_parameter_summary",
]
