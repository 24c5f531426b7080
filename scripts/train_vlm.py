"""Train the EvoTok VLM in the LLaVA recipe with TRL's SFTTrainer (or the plain transformers Trainer): understanding,
text-to-image generation, or both.

Stage 1 (`--stage pretrain`) trains the new parts only (projectors; for generation also the depth head); stage 2
(`--stage sft`) also trains the language model, fully or with LoRA (`--use_lora`, adapters on the LLM's linear layers
only). The EvoTok tokenizer is frozen throughout. `--task` says which heads a VLM assembled from a tokenizer and an LLM
gets (understanding, generation, joint); a loaded VLM must carry the heads its data needs. Images in assistant turns
(or the `image` of a `text` + `image` row) are images to generate. Every `trl.SFTConfig` / `transformers.TrainingArguments` flag works (`--learning_rate`,
`--activation_checkpointing`, `--save_steps`, `--bf16`, `--report_to`, ...); `--max_length` truncates sequences.

    # stage 1: a fresh projector between an EvoTok tokenizer and an LLM, on LLaVA-Pretrain-558k
    accelerate launch --multi_gpu --num_processes 8 scripts/train_vlm.py --stage pretrain \\
        --tokenizer_name_or_path <evotok-tokenizer> --llm_name_or_path Qwen/Qwen2.5-7B-Instruct --dtype bfloat16 \\
        --dataset LLaVA-Pretrain/blip_laion_cc_sbu_558k.json --image_folder LLaVA-Pretrain/images \\
        --learning_rate 1e-3 --num_train_epochs 1 --per_device_train_batch_size 32 --max_length 2048 --bf16 \\
        --output_dir outputs/evotok-vlm-stage1
    # stage 2: SFT of the whole LLM from the stage-1 folder (add --use_lora for adapters instead)
    accelerate launch --multi_gpu --num_processes 8 scripts/train_vlm.py --stage sft \\
        --model_name_or_path outputs/evotok-vlm-stage1 --dtype bfloat16 --dataset <sft.json> --image_folder <dir> \\
        --learning_rate 2e-5 --num_train_epochs 1 --activation_checkpointing --bf16 --output_dir outputs/evotok-vlm
    # text-to-image: stage 1 trains the generation projector and the depth head; rows {"text": ..., "image": ...}
    accelerate launch --multi_gpu --num_processes 8 scripts/train_vlm.py --task generation --stage pretrain \
        --tokenizer_name_or_path <evotok-tokenizer> --llm_name_or_path Qwen/Qwen2.5-7B-Instruct --dtype bfloat16 \
        --dataset <t2i hub id | folder> --learning_rate 1e-3 --bf16 --output_dir outputs/evotok-gen-stage1
    # resume an interrupted run from its newest complete checkpoint (starts fresh when there is none)
    python scripts/train_vlm.py ... --resume_from_checkpoint latest
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from evotok_hf.training.vlm import (
    LLM_LINEAR_LAYERS,
    EvoTokVLMDataCollator,
    VLMLoraArguments,
    checkpoint_problem,
    latest_complete_checkpoint,
    prepare_model_for_stage,
    trainable_parameter_summary,
)

logger = logging.getLogger("train_vlm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# task -> (has_understanding_head, has_generation_head)
TASK_HEADS = {"understanding": (True, False), "generation": (False, True), "joint": (True, True)}
# Trainer samplers that batch rows of similar token counts (less padding: VQA turns of a whole scene are twice as long
# as a caption -> image row); "batch_rebalance" keeps each optimizer step a random sample of rows and sorts only its
# micro-batches (per-device batch x gradient accumulation), so every step still mixes the tasks
LENGTH_GROUPED_SAMPLING = ("group_by_length", "batch_rebalance")


@dataclass
class VLMScriptArguments(VLMLoraArguments):
    stage: str = field(default="sft", metadata={"help": "pretrain (new parts only) or sft", "choices": ["pretrain", "sft"]})
    task: str = field(
        default="understanding",
        metadata={"choices": list(TASK_HEADS), "help": "heads of a VLM assembled from --tokenizer/--llm"},
    )
    depth_head_config: str | None = field(
        default=None, metadata={"help": "JSON overrides of the depth head of an assembled VLM (e.g. its width)"}
    )
    image_position_embeddings: bool = field(
        default=False,
        metadata={"help": "give an assembled VLM learned 2-D position embeddings of the image tokens (for an LLM "
                  "trained from scratch on features that do not carry their grid positions)"},
    )
    image_loss_weight: float | None = field(
        default=None,
        metadata={"help": "weight of the image loss in text_loss + weight * image_loss (saved in the config; unset: "
                  "the loaded model's, 1.0 for an assembled one)"},
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "an EvoTok VLM folder or Hub id"})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "EvoTok tokenizer folder / Hub id, with --llm_name_or_path (new projector)"}
    )
    llm_name_or_path: str | None = field(default=None, metadata={"help": "a pretrained causal LM folder / Hub id"})
    llm_gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --llm_name_or_path"})
    dtype: str = field(default="float32", metadata={"choices": list(DTYPES)})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "attention for every part (eager, sdpa, ...; transformers' default when unset). On a CPU, "
                  "eager trains small models faster than sdpa (benchmarks/README.md)"},
    )
    dataset: str = field(default=None, metadata={"help": "LLaVA .json/.jsonl, a save_to_disk folder, or a Hub id"})
    dataset_split: str = "train"
    image_folder: str | None = field(default=None, metadata={"help": "root of the LLaVA image paths"})
    trainer: str = field(
        default="auto",
        metadata={"choices": ["auto", "trl", "hf"], "help": "TRL SFTTrainer, Trainer, or auto (TRL unless the model "
                  "has a generation head)"},
    )
    unconditional_probability: float = field(
        default=0.0,
        metadata={"help": "how often a text-to-image row's prompt is replaced by the unconditional one, so that "
                  "classifier-free guidance has a trained unconditional model (LlamaGen / Janus: 0.1)"},
    )
    merge_lora: bool = field(default=True, metadata={"help": "also save the LoRA-merged full model"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLM_LINEAR_LAYERS))


def parse_args(argv=None):
    from transformers import HfArgumentParser
    from trl import SFTConfig

    parser = HfArgumentParser((VLMScriptArguments, SFTConfig), description=__doc__)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if script_args.dataset is None:
        parser.error("--dataset is required")
    if (script_args.model_name_or_path is None) == (script_args.llm_name_or_path is None):
        parser.error("give either --model_name_or_path, or --tokenizer_name_or_path with --llm_name_or_path")
    if script_args.llm_name_or_path is not None and script_args.tokenizer_name_or_path is None:
        parser.error("--llm_name_or_path needs --tokenizer_name_or_path")
    # Rows hold raw conversations and images; the collator builds the tensors, so nothing must be dropped or
    # pre-tokenised by the trainer.
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {"skip_prepare_dataset": True}
    if training_args.activation_checkpointing and training_args.activation_checkpointing_kwargs is None:
        # non-reentrant checkpointing works with frozen embeddings (stage 1, LoRA) without input-grad hooks
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}
    return script_args, training_args


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`latest` -> the newest complete checkpoint under `output_dir` (None, to start fresh, when there is none: the
    same as scripts/train_tokenizer.py); a folder -> itself, once checked to be a complete checkpoint."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            logger.info("No complete checkpoint under %s: starting from scratch.", output_dir)
        return checkpoint
    problem = checkpoint_problem(resume_from_checkpoint)
    if problem is not None:
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r}: {problem}.")
    return resume_from_checkpoint


def load_model_and_processor(args: VLMScriptArguments, seed: int | None = None):
    """The model (loaded, or assembled from a tokenizer and an LLM) and its processor. `seed` seeds the initialisation
    of the parts an assembly adds (projectors, depth head): the Trainer seeds only once the model exists, so without it
    two runs of the same command would start stage 1 from different weights."""
    from transformers import set_seed

    from evotok_hf import EvoTokForConditionalGeneration, EvoTokProcessor

    if seed is not None:
        set_seed(seed)

    dtype = DTYPES[args.dtype]
    understanding, generation = TASK_HEADS[args.task]
    if args.model_name_or_path is not None:
        model = EvoTokForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=dtype)
        processor = EvoTokProcessor.from_pretrained(args.model_name_or_path)
        missing = [name for name, wanted, present in (
            ("understanding", understanding, model.config.has_understanding_head),
            ("generation", generation, model.config.has_generation_head)) if wanted and not present]  # fmt: skip
        if missing:
            raise ValueError(f"--task {args.task} needs the {missing} head(s), which {args.model_name_or_path} lacks.")
        return model, processor
    llm_kwargs = {"gguf_file": args.llm_gguf_file} if args.llm_gguf_file else {}
    text_tokenizer = None
    if args.llm_gguf_file:
        from transformers import AutoTokenizer

        text_tokenizer = AutoTokenizer.from_pretrained(args.llm_name_or_path, gguf_file=args.llm_gguf_file)
    # the processor comes from `EvoTokProcessor.for_config`: with no chat_template given it adapts the LLM's own
    # template to image parts (ChatML when it has none), so the model is trained on the prompt format it answers in
    model, processor = EvoTokForConditionalGeneration.from_components(
        args.tokenizer_name_or_path, args.llm_name_or_path, text_tokenizer=text_tokenizer, dtype=dtype,
        has_understanding_head=understanding, has_generation_head=generation,
        # the authors' generation model wraps images in start / end tokens; their understanding model does not
        wrap_image_tokens=generation and not understanding,
        depth_head_config=json.loads(args.depth_head_config) if args.depth_head_config else None,
        image_position_embeddings=args.image_position_embeddings, return_processor=True, **llm_kwargs,
    )  # fmt: skip
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model, processor


def load_conversation_dataset(path: str, split: str = "train"):
    """A LLaVA .json / .jsonl file, a `save_to_disk` folder, or a Hub dataset id -> `datasets.Dataset`."""
    import datasets

    if path.endswith((".json", ".jsonl")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file {path!r} does not exist")
        return datasets.load_dataset("json", data_files=path, split="train")
    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        loaded = datasets.load_from_disk(path)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(path, split=split)


def save_final(trainer, model, processor, script_args: VLMScriptArguments, output_dir: str) -> None:
    """The last weights as a folder `AutoModelForImageTextToText` loads; with LoRA, the adapter goes to
    `output_dir/adapter` and (with merge_lora) the merged model to `output_dir`."""
    if script_args.use_lora:
        adapter_dir = os.path.join(output_dir, "adapter")
        model.save_pretrained(adapter_dir)
        if script_args.merge_lora and trainer.is_world_process_zero():
            merged = model.merge_and_unload()
            merged.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)


def main(argv=None) -> str:
    script_args, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)

    model, processor = load_model_and_processor(script_args, seed=training_args.seed)
    if script_args.image_loss_weight is not None:
        if not model.config.has_generation_head:
            raise ValueError("--image_loss_weight: this model has no generation head, so no image loss.")
        model.config.image_loss_weight = script_args.image_loss_weight
        model.config._validate_evotok_vlm()  # the config's own rule for the weight
    if script_args.attn_implementation is not None:
        model.set_attn_implementation(script_args.attn_implementation)  # every part: tokenizer, LLM, depth head
    model = prepare_model_for_stage(model, script_args.stage, script_args)
    summary = trainable_parameter_summary(model)
    logger.info("task %s, stage %s, trainable parameters: %s", script_args.task, script_args.stage, summary)

    train_dataset = load_conversation_dataset(script_args.dataset, script_args.dataset_split)
    collator = EvoTokVLMDataCollator(
        processor, max_length=training_args.max_length, image_folder=script_args.image_folder,
        unconditional_probability=script_args.unconditional_probability, seed=training_args.seed,
    )
    if (training_args.train_sampling_strategy in LENGTH_GROUPED_SAMPLING
            and training_args.length_column_name not in train_dataset.column_names):  # fmt: skip
        # the Trainer's length-grouped samplers read token counts from this column (rows here are raw conversations)
        lengths = collator.token_lengths(train_dataset)
        train_dataset = train_dataset.add_column(training_args.length_column_name, lengths)
        logger.info("token lengths of %d rows: %d to %d", len(lengths), min(lengths), max(lengths))
    trainer_kind = script_args.trainer
    has_generation_head = model.config.has_generation_head  # a PeftModel forwards `config` to the VLM
    if trainer_kind == "auto":
        # TRL's SFTTrainer computes the loss itself from the LM head (its fused head), so the depth head's image loss
        # would never be trained: models that generate images train with the plain Trainer and the model's own loss.
        trainer_kind = "hf" if has_generation_head else "trl"
    elif trainer_kind == "trl" and has_generation_head:
        raise ValueError(
            "--trainer trl cannot train a generation head: TRL's SFTTrainer computes the loss from the LM head only, "
            "so the depth head's image loss would be dropped. Use --trainer hf (or auto)."
        )
    if trainer_kind == "trl":
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
            processing_class=processor,
        )  # fmt: skip
    else:
        from transformers import Trainer

        trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_final(trainer, trainer.model, processor, script_args, training_args.output_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "train_results.json"), "w") as f:
            json.dump({"task": script_args.task, "stage": script_args.stage, **result.metrics}, f, indent=2)
    return training_args.output_dir


if __name__ == "__main__":
    main(sys.argv[1:])
