"""Train the EvoTok tokenizer with Accelerate.

Every field of `evotok_hf.training.TokenizerTrainingArguments` is a flag (`--max_train_steps 1000`,
`--use_ema`, `--model_overrides '{"codebook_size": 512}'`); `--preset paper|cpu-small` sets their defaults first.

    # CPU, about 3 minutes: the small preset on the bundled photos with the EfficientNet-Lite0 teacher
    python scripts/train_tokenizer.py --preset cpu-small --output_dir outputs/tok
    # resume after an interruption
    python scripts/train_tokenizer.py --preset cpu-small --output_dir outputs/tok --resume_from_checkpoint latest
    # the paper's run, 8 GPUs (global batch 256 = 8 x 32)
    accelerate launch --multi_gpu --num_processes 8 scripts/train_tokenizer.py --preset paper \\
        --train_data <hub-id-or-shards> --output_dir outputs/evotok-paper
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import typing

from evotok_hf.training.trainer import (
    TRAINING_PRESETS,
    TokenizerTrainer,
    TokenizerTrainingArguments,
    training_arguments_from_preset,
)


def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(TokenizerTrainingArguments)
    kind = hints[f.name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def parse_args(argv=None) -> TokenizerTrainingArguments:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(TRAINING_PRESETS), default=None,
                        help="start from a named set of defaults (flags given explicitly override it)")
    for f in dataclasses.fields(TokenizerTrainingArguments):
        kind = _field_type(f)
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        elif kind is dict:
            parser.add_argument(f"--{f.name}", type=json.loads, default=None, help="JSON object")
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None)
    namespace = parser.parse_args(argv)
    given = {k: v for k, v in vars(namespace).items() if v is not None and k != "preset"}
    if namespace.preset:
        return training_arguments_from_preset(namespace.preset, **given)
    return TokenizerTrainingArguments(**given)


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    trainer = TokenizerTrainer(args)
    summary = trainer.train()
    summary["final_model"] = trainer.export(os.path.join(args.output_dir, "final"))
    if trainer.accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    trainer.end()
    return summary


if __name__ == "__main__":
    main()
