"""EvoTok's VLM (`EvoTokForConditionalGeneration` + `EvoTokProcessor`) behind lmms-eval's model API.

lmms-eval gives a model lists of requests (`Instance`s) and reads one result back per request:

- `generate_until`: the answer to a prompt under the task's generation kwargs: `until` (stop strings: generation
  stops there and the answer is cut before the first one), `max_new_tokens`, `temperature` / `do_sample`, `top_p`,
  `num_beams` (other keys, such as LLaVA's `image_aspect_ratio`, do not apply to EvoTok and are ignored). Prompts that
  share their kwargs run in left-padded batches of `batch_size`, which give the answers each prompt gets alone. Each
  answer carries its token counts (prompt tokens, image tokens included, and generated tokens), which lmms-eval
  writes into the samples file.
- `loglikelihood`: multiple-choice scoring. The continuation is scored after the chat prompt (the user turn, then the
  assistant's turn opened) in right-padded batches.

lmms-eval builds requests in two shapes, hence two classes: `EvoTokChat` (what `--model evotok` runs) reads the
task's chat messages (roles, several images in a turn); `EvoTokSimple` (`--model evotok --force_simple`) reads a text
context and the doc's images, and is the only kind of model lmms-eval gives multiple-choice tasks to.
"""

import json
import os

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from lmms_eval.utils import simple_parse_args_string
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, StoppingCriteriaList, StopStringCriteria
from transformers.image_utils import load_image

import evotok_hf  # noqa: F401  (registers EvoTok's Auto classes)

# When a task sets no `max_new_tokens`: enough for the short answers of VQA and multiple-choice benchmarks, which
# set their own limit when they expect more.
DEFAULT_MAX_NEW_TOKENS = 128


def generation_settings(gen_kwargs: dict) -> tuple[dict, tuple[str, ...]]:
    """lmms-eval's generation kwargs -> (`generate` kwargs, stop strings).

    Sampling follows lmms-eval's tasks, which ask for it through a positive `temperature` (with `do_sample: true`, or
    alone); a temperature of 0 is greedy decoding whatever `do_sample` says, and `do_sample: true` without a
    temperature samples at 1. `top_p` applies to sampling only. What the task does not set comes from the model's
    generation config."""
    until = gen_kwargs.get("until") or ()
    stop_strings = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
    temperature = gen_kwargs.get("temperature")
    do_sample = gen_kwargs.get("do_sample")
    if do_sample is None:
        do_sample = temperature is not None and float(temperature) > 0
    if temperature is not None and float(temperature) <= 0:
        do_sample = False
    settings = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "num_beams": int(gen_kwargs.get("num_beams") or 1),
        "do_sample": bool(do_sample),
    }
    if do_sample:
        settings["temperature"] = float(1.0 if temperature is None else temperature)
        if gen_kwargs.get("top_p") is not None:
            settings["top_p"] = float(gen_kwargs["top_p"])
    return settings, stop_strings


def cut_at_stop_strings(text: str, stop_strings: tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest of `stop_strings`: generation stops once the text holds one, but the
    tokens that completed it (and whatever followed within those tokens) are part of the output."""
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text


def _flatten(visuals) -> list:
    """`doc_to_visual`'s result (None, one item, a list, or a list of lists) as a flat list."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [item for visual in visuals for item in _flatten(visual)]


class EvoTokChat(lmms):
    """`lmms-eval --model evotok`: EvoTok's VLM on lmms-eval's chat tasks.

    Model args (`--model_args key=value,...`):
        pretrained: a folder or Hub id holding the VLM and its processor (`save_pretrained` of both).
        dtype: `"auto"` (what the checkpoint says, the default), `"bfloat16"`, `"float16"` or `"float32"`; the
            tokenizer's codebooks stay fp32 in any case.
        device: where the model runs; by default `cuda:<LOCAL_RANK>` when CUDA is available (one GPU per process
            under `accelerate launch`, which splits the requests across processes), else `cpu`.
        device_map: e.g. `"auto"` to spread a large model over the visible GPUs (replaces `device`).
        batch_size: prompts per forward pass (default 1).
        attn_implementation: e.g. `"sdpa"` (the default), `"eager"`, `"flash_attention_2"`.
        trust_remote_code: load a folder exported as remote code without the package's classes.

    Model args win over the CLI's `--batch_size` / `--device`: the CLI always passes its own batch size (1 by
    default), so `batch_size=8` in the model args is what runs.
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        dtype: str = "auto",
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"EvoTok's lmms-eval model needs a positive integer batch_size, got {batch_size!r}.")
        self.batch_size = int(batch_size)
        if dtype != "auto" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}.")
        load_kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype),
                       "trust_remote_code": trust_remote_code}  # fmt: skip
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs).eval()
        if device_map is None:
            if device is None:
                local_rank = int(os.environ.get("LOCAL_RANK", 0))
                device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
            self.model.to(device)
        # inputs go where the model reads them first; with a device map the later parts move activations themselves
        self.device = self.model.get_input_embeddings().weight.device
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                f"The tokenizer of {pretrained!r} has no pad token, which batched prompts need: set one (for instance "
                "`tokenizer.pad_token = tokenizer.eos_token`) and save the processor again."
            )
        # One StoppingCriteria per distinct `until`: building one indexes the whole vocabulary.
        self._stop_criteria: dict[tuple[str, ...], StoppingCriteriaList] = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "EvoTokChat":
        """The model from `--model_args`, the CLI's `--batch_size` / `--device` filling in what they leave out (the
        inherited method passes both and fails on a `batch_size` given in the model args)."""
        kwargs = {key: value for key, value in (additional_config or {}).items() if value is not None}
        kwargs.update(simple_parse_args_string(arg_string))
        return cls(**kwargs)

    # -- requests -> conversations ---------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _conversation_from_messages(raw_messages: list[dict]) -> list[dict]:
        """A task's `doc_to_messages` output -> transformers chat messages whose content parts are images or text."""
        conversation = ChatMessages(messages=raw_messages).to_hf_messages()
        for message in conversation:
            for part in message["content"]:
                if part["type"] not in ("image", "text"):
                    raise ValueError(f"EvoTok reads images and text; this task gives a {part['type']!r} part.")
        return conversation

    def _conversation_from_context(self, context: str, visuals) -> list[dict]:
        """A simple task's text context and `doc_to_visual` output -> one user turn: the images, then the text. The
        context's own image placeholders are dropped, as lmms-eval's simple models do: the images come first."""
        content = [{"type": "image", "image": visual} for visual in _flatten(visuals)]
        content.append({"type": "text", "text": context.replace(self.processor.image_token, "")})
        return [{"role": "user", "content": content}]

    def _prompt_and_images(self, conversation: list[dict]) -> tuple[str, list]:
        """The chat-template prompt (assistant turn opened) and its images in prompt order."""
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        images = [
            load_image(part["image"]).convert("RGB")
            for message in conversation
            for part in message["content"]
            if part["type"] == "image"
        ]
        return prompt, images

    # -- generation --------------------------------------------------------------------------------------------------
    def _stopping_criteria(self, stop_strings: tuple[str, ...]) -> StoppingCriteriaList | None:
        if not stop_strings:
            return None
        if stop_strings not in self._stop_criteria:
            self._stop_criteria[stop_strings] = StoppingCriteriaList(
                [StopStringCriteria(self.tokenizer, list(stop_strings))]
            )
        return self._stop_criteria[stop_strings]

    def _answer_length(self, new_tokens: torch.Tensor) -> int:
        """How many tokens the model wrote for one row of a batch: up to and including the first end-of-sequence
        token, else up to the padding `generate` puts after a row that a stop string finished early."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        ends = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype, device=new_tokens.device))
        if ends.any():
            return int(ends.nonzero()[0, 0]) + 1
        length = len(new_tokens)
        while length and new_tokens[length - 1] == self.tokenizer.pad_token_id:
            length -= 1
        return length

    @torch.inference_mode()
    def _generate(self, conversations: list[list[dict]], gen_kwargs: dict) -> list[GenerationResult]:
        settings, stop_strings = generation_settings(gen_kwargs)
        prompts, images = zip(*(self._prompt_and_images(conversation) for conversation in conversations))
        inputs = self.processor(images=[image for row in images for image in row] or None, text=list(prompts),
                                padding=True, padding_side="left", return_tensors="pt").to(self.device)  # fmt: skip
        output = self.model.generate(**inputs, **settings, stopping_criteria=self._stopping_criteria(stop_strings),
                                     pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        results = []
        for new_tokens, prompt_mask in zip(output[:, inputs["input_ids"].shape[1] :], inputs["attention_mask"]):
            length = self._answer_length(new_tokens)
            text = self.tokenizer.decode(new_tokens[:length], skip_special_tokens=True)
            counts = TokenCounts(input_tokens=int(prompt_mask.sum()), output_tokens=length)
            results.append(GenerationResult(text=cut_at_stop_strings(text, stop_strings), token_counts=counts))
        return results

    def _generate_all(self, conversations: list, all_gen_kwargs: list[dict]) -> list[GenerationResult]:
        """Answers in request order; requests with the same generation kwargs share batches."""
        groups: dict[str, list[int]] = {}
        for index, gen_kwargs in enumerate(all_gen_kwargs):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
        results: list = [None] * len(conversations)
        progress = tqdm(total=len(conversations), disable=self.rank != 0, desc="EvoTok answering")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                answers = self._generate([conversations[i] for i in batch], all_gen_kwargs[batch[0]])
                for index, answer in zip(batch, answers):
                    results[index] = answer
                progress.update(len(batch))
        progress.close()
        return results

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Chat requests: `(context, doc_to_messages, gen_kwargs, doc_id, task, split)`."""
        conversations, all_gen_kwargs = [], []
        for _, doc_to_messages, gen_kwargs, doc_id, task, split in (request.args for request in requests):
            conversations.append(self._conversation_from_messages(doc_to_messages(self._doc(task, split, doc_id))))
            all_gen_kwargs.append(gen_kwargs)
        return self._generate_all(conversations, all_gen_kwargs)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("EvoTok's lmms-eval model does not run multi-round tasks.")

    # -- multiple choice -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _score(self, conversations: list[list[dict]], continuations: list[str]) -> list[GenerationResult]:
        rows, prompt_lengths, continuation_ids, pixel_values = [], [], [], []
        for conversation, continuation in zip(conversations, continuations):
            prompt, images = self._prompt_and_images(conversation)
            encoded = self.processor(images=images or None, text=prompt, return_tensors="pt")
            ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"loglikelihood: the continuation {continuation!r} holds no token to score.")
            rows.append(torch.cat([encoded["input_ids"][0], torch.tensor(ids)]))
            prompt_lengths.append(encoded["input_ids"].shape[1])
            continuation_ids.append(torch.tensor(ids))
            if images:
                pixel_values.append(encoded["pixel_values"])
        # right padding: each row's tokens keep the positions they have alone, and causal attention keeps the padding
        # after them out of their scores
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)
        attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(row) for row in rows], batch_first=True)
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if pixel_values:
            inputs["pixel_values"] = torch.cat(pixel_values).to(self.device)
        # logits only from the first position that predicts a continuation token on
        first = min(prompt_lengths) - 1
        logits = self.model(**inputs, logits_to_keep=input_ids.shape[1] - first).logits
        results = []
        for row_logits, start, ids in zip(logits, prompt_lengths, continuation_ids):
            ids = ids.to(row_logits.device)  # the LM head's device, under a device map maybe not the first one
            scores = row_logits[start - 1 - first : start - 1 - first + len(ids)].float().log_softmax(-1)
            token_logprobs = scores.gather(-1, ids[:, None])[:, 0]
            pair = (float(-token_logprobs.mean()), bool((scores.argmax(-1) == ids).all()))
            results.append(GenerationResult(text=pair, token_counts=TokenCounts(input_tokens=start + len(ids))))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """`(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)` -> `(loss, is_greedy)` per
        request: the continuation's mean negative log-likelihood per token, and whether greedy decoding writes it.

        A loss, not the log-probability that lmms-eval's `loglikelihood` docstring names: its multiple-choice scoring
        picks the choice with the smallest value (its own models return the loss), so this ranks the choices as
        lmms-eval expects. The unconditional requests of `acc_mutual_info`, `(context, continuation)`, have no doc and
        are scored without images.

        Each pair comes as the `text` of a `GenerationResult` (with the number of tokens read): lmms-eval 0.7.3's
        evaluator turns any other non-string result into its `str()` (`unwrap_generation_output`), which its
        multiple-choice scoring then cannot unpack, while a GenerationResult's `text` reaches the task untouched."""
        conversations, continuations = [], []
        for context, continuation, *rest in (request.args for request in requests):
            visuals = None
            if rest:
                doc_to_visual, doc_id, task, split = rest
                doc = self._doc(task, split, doc_id)
                if callable(continuation):
                    continuation = continuation(doc)
                visuals = doc_to_visual(doc)
            conversations.append(self._conversation_from_context(context, visuals))
            continuations.append(continuation)
        results = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=self.rank != 0, desc="EvoTok scoring"):
            end = start + self.batch_size
            results.extend(self._score(conversations[start:end], continuations[start:end]))
        return results


class EvoTokSimple(EvoTokChat):
    """`lmms-eval --model evotok --force_simple`: the same model on lmms-eval's simple tasks (a text context and the
    doc's images), the only kind of model its multiple-choice (loglikelihood) tasks run on."""

    is_simple = True

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Simple requests: `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`."""
        conversations, all_gen_kwargs = [], []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            visuals = doc_to_visual(self._doc(task, split, doc_id))
            conversations.append(self._conversation_from_context(context, visuals))
            all_gen_kwargs.append(gen_kwargs)
        return self._generate_all(conversations, all_gen_kwargs)


__all__ = ["EvoTokChat", "EvoTokSimple", "cut_at_stop_strings", "generation_settings"]
