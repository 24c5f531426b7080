"""Processor for the EvoTok multimodal LLM: EvoTokImageProcessor + the LLM's tokenizer + its chat template.

Each `<image>` placeholder in the text becomes `num_image_tokens` image tokens (one per position of the tokenizer's
code grid, 256 for the paper's 16 x 16 grid), optionally wrapped in image start / end tokens; the model replaces
those tokens' embeddings with the projected semantic features of the matching image. Images are squashed to the
tokenizer's square input by default, as the official understanding model does.
"""

import json

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from .image_processing_evotok import EvoTokImageProcessor, EvoTokImageProcessorKwargs, save_remote_code


# ChatML (the Qwen2.5 format of the paper's LLM, as in the authors' LLaVA `qwen` conversation), with each image
# content part rendered as the `<image>` placeholder that the processor then expands. Used when the tokenizer and
# the caller give no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Put before an LLM's own chat template, which renders `content` as a string (SmolLM2's and Qwen2.5's concatenate it),
# so that a message given as content parts reaches it as one string: each image part becomes the image placeholder
# followed by a newline (the LLaVA layout, as in the default template above), text parts their text. Messages whose
# content is a string pass unchanged, so text-only chats render exactly as with the LLM's own template. The first
# line marks an adapted template, so adapting is idempotent. The preamble ends with a newline that Jinja's
# `trim_blocks` removes, so the LLM template starts a line and its leading whitespace is handled as on its own.
_IMAGE_PARTS_MARK = "{#- evotok_hf: image content parts become the image placeholder, then the LLM's template runs #}"
_IMAGE_PARTS_PREAMBLE = (
    _IMAGE_PARTS_MARK
    + "{%- set evotok = namespace(messages=[], text='') %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is not defined or message['content'] is none or message['content'] is string %}"
    "{%- set evotok.messages = evotok.messages + [message] %}"
    "{%- else %}"
    "{%- set evotok.text = '' %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{%- set evotok.text = evotok.text ~ IMAGE_PLACEHOLDER %}"
    "{%- elif part['type'] == 'text' %}{%- set evotok.text = evotok.text ~ part['text'] %}"
    "{%- else %}{{- raise_exception('EvoTokProcessor: a content part must be an image or text, got ' ~ part['type']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set evotok.messages = evotok.messages + [dict(message, content=evotok.text)] %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- set messages = evotok.messages %}\n"
)


def image_aware_chat_template(chat_template: str | dict, image_token: str = "<image>") -> str | dict:
    """An LLM's text-only chat template (or a dict of named ones) adapted to messages with image content parts: each
    image part is rendered as `image_token` + newline in its message's text, then the LLM's own template runs, so the
    prompt keeps the LLM's format. Templates that already place images (the default one, adapted ones) are returned
    unchanged."""
    if isinstance(chat_template, dict):
        return {name: image_aware_chat_template(template, image_token) for name, template in chat_template.items()}
    if chat_template == DEFAULT_CHAT_TEMPLATE or chat_template.startswith(_IMAGE_PARTS_MARK):
        return chat_template
    # a JSON string is a valid Jinja string literal (escapes included)
    return _IMAGE_PARTS_PREAMBLE.replace("IMAGE_PLACEHOLDER", json.dumps(image_token + "\n")) + chat_template


# No `from __future__ import annotations` here: ProcessorMixin reads this TypedDict's annotations at run time.
# The authors' unconditional prompt of classifier-free guidance: a user turn holding a single space. Training drops a
# text-to-image row's prompt to it now and then (`EvoTokVLMDataCollator(unconditional_probability=)`) so the
# unconditional half of guidance is a model that was trained.
UNCONDITIONAL_PROMPT = " "

class EvoTokProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: EvoTokImageProcessorKwargs
    _defaults = {"text_kwargs": {"padding": False}}


def _flatten_images(images) -> list:
    """A single image, a list of images, or one list per sample -> a flat list in prompt order."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


class EvoTokProcessor(ProcessorMixin):
    r"""Constructs an EvoTok VLM processor.

    Args:
        image_processor ([`EvoTokImageProcessor`], *optional*): defaults to one that squashes images to 256 x 256.
        tokenizer ([`PreTrainedTokenizerBase`]): the LLM's tokenizer; `image_token` (and `boi_token` / `eoi_token`
            when set) must each be a single token of its vocabulary.
        chat_template (`str`, *optional*): Jinja chat template that renders image content parts as `image_token`.
            By default the tokenizer's own template adapted by [`image_aware_chat_template`] (image parts become
            `image_token` + newline before it runs), or ChatML (`DEFAULT_CHAT_TEMPLATE`) when the tokenizer has none.
        image_token (`str`, defaults to `"<image>"`): the placeholder in prompts, also the repeated image token.
        num_image_tokens (`int`, defaults to 256): image tokens per image (grid * grid of the image tokenizer).
        boi_token / eoi_token (`str`, *optional*): image start / end tokens.
        wrap_image_tokens (`bool`, defaults to `False`): surround each image's tokens with `boi_token` / `eoi_token`.

    The processor sets `tokenizer.padding_side = "left"`: its batches are generation prompts. Pass
    `padding_side="right"` in a call (or set it on `processor.tokenizer`) for right padding.
    """

    valid_processor_kwargs = EvoTokProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_image_tokens: int = 256,
        boi_token: str | None = None,
        eoi_token: str | None = None,
        wrap_image_tokens: bool = False,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("EvoTokProcessor needs a `tokenizer`.")
        if image_processor is None:
            image_processor = EvoTokImageProcessor(resize_mode="squash")
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens <= 0:
            raise ValueError(f"EvoTokProcessor: `num_image_tokens` must be a positive int, got {num_image_tokens!r}.")
        if wrap_image_tokens and (boi_token is None or eoi_token is None):
            raise ValueError("EvoTokProcessor: `wrap_image_tokens=True` needs both `boi_token` and `eoi_token`.")
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.boi_token = boi_token
        self.eoi_token = eoi_token
        self.wrap_image_tokens = wrap_image_tokens
        self.image_token_id = self._single_token_id(tokenizer, "image_token", image_token)
        self.boi_token_id = self._single_token_id(tokenizer, "boi_token", boi_token)
        self.eoi_token_id = self._single_token_id(tokenizer, "eoi_token", eoi_token)
        if chat_template is None:
            # The LLM's own template keeps the prompt format it was tuned on (turn markers, system prompt); adapted,
            # it also takes image parts. ChatML when the tokenizer has none.
            own = getattr(tokenizer, "chat_template", None)
            chat_template = image_aware_chat_template(own, image_token) if own else DEFAULT_CHAT_TEMPLATE
        # Batches from this processor feed `generate`, which continues every row from its last position: padding must
        # go on the left. LLM tokenizers usually pad on the right (for training; the training collator pads on its
        # own), and pipelines and evaluation harnesses batch with the tokenizer's side, so the tokenizer is set here
        # (and saved so).
        tokenizer.padding_side = "left"
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def for_config(cls, config, tokenizer, chat_template: str | None = None, image_processor=None) -> "EvoTokProcessor":
        """The processor that matches an `EvoTokVLMConfig`: the one place that turns the model's facts into processor
        arguments, for every new VLM (`from_components`, the official-checkpoint converter, training scripts).

        The image special tokens are the tokenizer's tokens at the config's ids, the number of image tokens per image
        is the tokenizer's code grid, and images are squashed to the tokenizer's square input (what the official VLM
        does) unless an `image_processor` is given. `chat_template` as in the constructor: by default the tokenizer's
        own template adapted to image parts. The config is read, not imported (no import from `modeling/`)."""
        if config.image_token_id is None:
            raise ValueError("EvoTokProcessor.for_config: the config has no `image_token_id`.")

        def token(token_id: int | None) -> str | None:
            return None if token_id is None else tokenizer.convert_ids_to_tokens(token_id)

        if image_processor is None:
            size = config.vision_config.image_size
            image_processor = EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash")
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template,
            image_token=token(config.image_token_id),
            num_image_tokens=config.num_image_tokens,
            boi_token=token(config.boi_token_id),
            eoi_token=token(config.eoi_token_id),
            wrap_image_tokens=config.wrap_image_tokens,
        )

    @classmethod
    def from_args_and_dict(cls, args, processor_dict: dict, **kwargs):
        result = super().from_args_and_dict(args, processor_dict, **kwargs)
        # ProcessorMixin drops `auto_map` on load (it keeps it only for classes loaded as remote code, through
        # `register_for_auto_class`); kept, a processor loaded from a remote-code folder saves one again.
        if processor_dict.get("auto_map"):
            processor = result[0] if isinstance(result, tuple) else result
            processor.auto_map = dict(processor_dict["auto_map"])
        return result

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # Before the files (and any upload): a folder loaded from remote code stays loadable as remote code.
        save_remote_code(self, save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @staticmethod
    def _single_token_id(tokenizer, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"EvoTokProcessor: `{name}` {token!r} must be one token of the tokenizer's vocabulary (add it as a "
                f"special token), but it encodes to {ids}."
            )
        return ids[0]

    def image_token_sequence(self, wrap: bool | None = None) -> str:
        """The text that replaces one image placeholder; `wrap=True` surrounds it with the image start / end tokens
        (always the case for an image the model writes), by default as `wrap_image_tokens` says."""
        wrap = self.wrap_image_tokens if wrap is None else wrap
        if wrap and (self.boi_token is None or self.eoi_token is None):
            raise ValueError("EvoTokProcessor: wrapping image tokens needs `boi_token` and `eoi_token`.")
        tokens = self.image_token * self.num_image_tokens
        return f"{self.boi_token}{tokens}{self.eoi_token}" if wrap else tokens

    def image_generation_prompt(self, prompt: str) -> str:
        """A text-to-image prompt as the model expects it: a user turn holding `prompt` through the chat template, the
        assistant's turn opened, then the image start token (the model writes the image after it)."""
        if self.boi_token is None:
            raise ValueError("EvoTokProcessor: image generation needs `boi_token` (the image start token).")
        messages = [{"role": "user", "content": prompt}]
        return self.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + self.boi_token

    def _image_generation_inputs(self, text, negative_prompt, return_tensors) -> BatchFeature:
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("EvoTokProcessor: generation_mode='image' needs `text` as a string or a list of strings.")
        if negative_prompt is None:
            negative_prompt = UNCONDITIONAL_PROMPT
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"EvoTokProcessor: {len(negatives)} negative prompts for {len(prompts)} prompts.")

        def encode(texts):
            return self.tokenizer([self.image_generation_prompt(t) for t in texts], padding=True, padding_side="left",
                                  add_special_tokens=False)  # fmt: skip

        positive, negative = encode(prompts), encode(negatives)
        data = {
            "input_ids": positive["input_ids"],
            "attention_mask": positive["attention_mask"],
            "negative_input_ids": negative["input_ids"],
            "negative_attention_mask": negative["attention_mask"],
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images=None, text=None, **kwargs: Unpack[EvoTokProcessorKwargs]) -> BatchFeature:
        """Expand image placeholders, tokenize the text and preprocess the images.

        Args:
            images: a PIL image / array / tensor, a list of them, or one list per sample, in placeholder order.
            text (`str` or `list[str]`): prompts holding one `image_token` per image.
            generation_mode (`str`, defaults to `"text"`): `"image"` turns each text into a text-to-image prompt
                (chat template + image start token, left-padded) and adds the unconditional prompts for
                classifier-free guidance as `negative_input_ids` / `negative_attention_mask`.
            negative_prompt (`str` or `list[str]`, *optional*): with `generation_mode="image"`, the unconditional
                prompt(s); by default a single space, as the authors'.

        Returns:
            [`BatchFeature`] with `input_ids` and `attention_mask` (when `text` is given) and `pixel_values` (when
            `images` are given); in image mode `input_ids`, `attention_mask`, `negative_input_ids`,
            `negative_attention_mask`.
        """
        generation_mode = kwargs.pop("generation_mode", "text")
        negative_prompt = kwargs.pop("negative_prompt", None)
        if generation_mode == "image":
            if images is not None:
                raise ValueError("EvoTokProcessor: generation_mode='image' takes text prompts only.")
            return self._image_generation_inputs(text, negative_prompt, kwargs.get("return_tensors"))
        if generation_mode != "text":
            raise ValueError(f"EvoTokProcessor: generation_mode must be 'text' or 'image', got {generation_mode!r}.")
        if images is None and text is None:
            raise ValueError("EvoTokProcessor: pass `images`, `text` or both.")
        output_kwargs = self._merge_kwargs(
            EvoTokProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        flat_images = _flatten_images(images)

        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("EvoTokProcessor: `text` must be a string or a list of strings.")
            num_placeholders = sum(t.count(self.image_token) for t in texts)
            if num_placeholders != len(flat_images):
                raise ValueError(
                    f"EvoTokProcessor: the text holds {num_placeholders} {self.image_token!r} placeholder(s) but "
                    f"{len(flat_images)} image(s) were given; there must be one placeholder per image."
                )
            expansion = self.image_token_sequence()
            texts = [expansion.join(t.split(self.image_token)) for t in texts]
            data.update(self.tokenizer(texts, **output_kwargs["text_kwargs"]))
        if flat_images:
            data.update(self.image_processor(flat_images, **output_kwargs["images_kwargs"]))
        return_tensors = output_kwargs["text_kwargs"].get("return_tensors") or output_kwargs["images_kwargs"].get(
            "return_tensors"
        )
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["EvoTokProcessor", "image_aware_chat_template"]
