"""Convert the authors' EvoTok checkpoints (VisionXLab/EvoTok) to Hugging Face folders.

    # the tokenizer: a training checkpoint (.pt) -> an EvoTokModel folder (its `ema` weights when present)
    python scripts/convert_official.py tokenizer --tokenizer-checkpoint last.pt --output-dir converted/evotok
    # keep the codebooks' EMA statistics, to fine-tune the converted tokenizer
    python scripts/convert_official.py tokenizer --tokenizer-checkpoint last.pt --output-dir converted/evotok-train \\
        --keep-training-state
    # the understanding MLLM: the LLaVA output folder + the converted tokenizer -> an EvoTokForConditionalGeneration
    python scripts/convert_official.py understanding --understanding-dir work_dir/EvoTok-..._sft_llava665k \\
        --tokenizer converted/evotok --output-dir converted/evotok-qwen2.5-7b
    # the generation MLLM (LLaVA folder with the depth head `rqtransformer`) -> a generation-only VLM folder whose
    # text tokenizer holds <boi> / <eoi> at the authors' image start / end ids
    python scripts/convert_official.py generation --generation-dir work_dir/EvoTok-..._gen_sft \\
        --tokenizer converted/evotok --output-dir converted/evotok-qwen2.5-7b-gen

An existing non-empty output folder is refused unless --overwrite; it is replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from evotok_hf.command_line import run_from_shell
from evotok_hf.hub.convert_official import (
    convert_generation_checkpoint,
    convert_tokenizer_checkpoint,
    convert_understanding_checkpoint,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    tokenizer = modes.add_parser("tokenizer", help="official tokenizer checkpoint (.pt) -> EvoTokModel folder")
    tokenizer.add_argument("--tokenizer-checkpoint", required=True, help="the authors' training checkpoint (.pt)")
    tokenizer.add_argument("--output-dir", required=True)
    tokenizer.add_argument("--keep-training-state", action="store_true",
                           help="keep the codebooks' EMA statistics (sizes, sums, warm-up step) for fine-tuning")
    tokenizer.add_argument("--base-config", default="evotok-siglip2-l16-256",
                           help="preset for what the checkpoint cannot tell (norm groups, eps, unknown head counts)")
    tokenizer.add_argument("--config-overrides", type=json.loads, default=None,
                           help='JSON object of EvoTokConfig fields, e.g. \'{"semantic_decoder_num_heads": 12}\'')
    tokenizer.add_argument("--overwrite", action="store_true")

    for head in ("understanding", "generation"):
        mllm = modes.add_parser(head, help=f"official {head} MLLM (LLaVA folder) -> VLM folder")
        mllm.add_argument(f"--{head}-dir", required=True, help=f"the authors' LLaVA output folder ({head} model)")
        mllm.add_argument("--tokenizer", required=True, help="converted EvoTok tokenizer (folder or Hub id)")
        mllm.add_argument("--output-dir", required=True)
        mllm.add_argument("--text-tokenizer", default=None,
                          help=f"text tokenizer folder or Hub id (default: the {head} folder's own)")
        mllm.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                          help="weights dtype of the output (default: that of the LLM weights)")
        mllm.add_argument("--overwrite", action="store_true")
        if head == "generation":
            mllm.add_argument(
                "--depth-head-config", type=json.loads, default=None,
                help='JSON object of EvoTokDepthHeadConfig fields for what the weights cannot tell, e.g. '
                     '\'{"num_attention_heads": 40}\' (needed only for a depth-head width other than the authors\' '
                     '2560)',
            )  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> str:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    if args.mode == "tokenizer":
        convert_tokenizer_checkpoint(
            args.tokenizer_checkpoint,
            args.output_dir,
            keep_training_state=args.keep_training_state,
            overwrite=args.overwrite,
            base_config=args.base_config,
            config_overrides=args.config_overrides,
        )
    elif args.mode == "understanding":
        convert_understanding_checkpoint(
            args.understanding_dir,
            args.tokenizer,
            args.output_dir,
            text_tokenizer=args.text_tokenizer,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            overwrite=args.overwrite,
        )
    else:
        convert_generation_checkpoint(
            args.generation_dir,
            args.tokenizer,
            args.output_dir,
            text_tokenizer=args.text_tokenizer,
            depth_head_config=args.depth_head_config,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            overwrite=args.overwrite,
        )
    return args.output_dir


if __name__ == "__main__":
    run_from_shell(main, __file__)
