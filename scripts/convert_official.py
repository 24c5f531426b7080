"""Convert the authors' EvoTok checkpoints (VisionXLab/EvoTok) to Hugging Face folders.

    # the tokenizer: a training checkpoint (.pt) -> an EvoTokModel folder (its `ema` weights when present)
    python scripts/convert_official.py tokenizer --tokenizer-checkpoint last.pt --output-dir converted/evotok
    # keep the codebooks' EMA statistics, to fine-tune the converted tokenizer
    python scripts/convert_official.py tokenizer --tokenizer-checkpoint last.pt --output-dir converted/evotok-train \\
        --keep-training-state
    # the understanding MLLM: the LLaVA output folder + the converted tokenizer -> an EvoTokForConditionalGeneration
    python scripts/convert_official.py understanding --understanding-dir work_dir/EvoTok-..._sft_llava665k \\
        --tokenizer converted/evotok --output-dir converted/evotok-qwen2.5-7b

An existing non-empty output folder is refused unless --overwrite; it is replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from evotok_hf.hub.convert_official import convert_tokenizer_checkpoint, convert_understanding_checkpoint


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

    understanding = modes.add_parser("understanding", help="official understanding MLLM (LLaVA folder) -> VLM folder")
    understanding.add_argument("--understanding-dir", required=True, help="the authors' LLaVA output folder")
    understanding.add_argument("--tokenizer", required=True, help="converted EvoTok tokenizer (folder or Hub id)")
    understanding.add_argument("--output-dir", required=True)
    understanding.add_argument("--text-tokenizer", default=None,
                               help="text tokenizer folder or Hub id (default: the understanding folder's own)")
    understanding.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                               help="weights dtype of the output (default: that of the LLM weights)")
    understanding.add_argument("--overwrite", action="store_true")
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
    else:
        convert_understanding_checkpoint(
            args.understanding_dir,
            args.tokenizer,
            args.output_dir,
            text_tokenizer=args.text_tokenizer,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            overwrite=args.overwrite,
        )
    return args.output_dir


if __name__ == "__main__":
    main()
