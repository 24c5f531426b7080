"""Peak host memory (RSS) of assembling an EvoTok VLM from a saved tokenizer and a saved LLM.

Each variant runs in a fresh Python process, which reports its own peak resident set size (VmHWM of
/proc/self/status, or getrusage's ru_maxrss elsewhere) after the assembly, and the resident size it had before it
(torch and transformers imported), so the figures are not mixed with one another or with the preparation:

- `components`: only load the tokenizer and the LLM in `--dtype` (the floor: what any assembly holds);
- `materialised`: the assembly before issue 15 (a port of the old `from_components`): the tokenizer loaded in fp32,
  the VLM built with random weights in `--dtype` (`_from_config`), then the components copied into it;
- `meta`: `EvoTokForConditionalGeneration.from_components(..., return_processor=True)`: the VLM built on the meta
  device and given the components' tensors.

The parts are prepared first (in their own process) from configs with random weights and saved: the tokenizer
preset in fp32 (as training saves it) and a Qwen2 LLM in bf16 (as Hub LLM checkpoints are), with a small text
tokenizer (the image tokens it lacks are added, as for a real LLM).

    python benchmarks/assembly_memory.py [--llm qwen2.5-0.5b] [--tokenizer-preset evotok-siglip2-l16-256] \\
        [--dtype bfloat16 float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# Qwen2.5 shapes (the paper's LLM is the 7B one); "tiny" is for the tests' smoke run.
LLM_SHAPES = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=400, tie_word_embeddings=True),
}  # fmt: skip
VARIANTS = ("components", "materialised", "meta")
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default="qwen2.5-0.5b", choices=sorted(LLM_SHAPES))
    p.add_argument("--tokenizer-preset", default="evotok-siglip2-l16-256")
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=DTYPES)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--workdir", default=None, help="where the parts are saved (default: a temporary folder)")
    p.add_argument("--json", default=None)
    # what a child process runs (internal)
    p.add_argument("--child", choices=["prepare", *VARIANTS], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- memory
def resident_bytes(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak) of this process; ru_maxrss (the peak) where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------------------------- children
def prepare(workdir: str, llm: str, tokenizer_preset: str) -> dict:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from evotok_hf import EvoTokConfig, EvoTokModel

    torch.manual_seed(0)
    tokenizer = EvoTokModel(EvoTokConfig.from_preset(tokenizer_preset))
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    sizes = {"tokenizer_parameters": sum(p.numel() for p in tokenizer.parameters()),
             "tokenizer_buffers": sum(b.numel() for b in tokenizer.buffers())}  # fmt: skip
    del tokenizer
    words = [f"w{i}" for i in range(256)]
    text_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<eos>", *words])},
                                                    unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>",
    )  # fmt: skip
    text_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**LLM_SHAPES[llm]))
    # random weights drawn in bf16, never in fp32 (a random fp32 7B would not fit where the benchmark runs);
    # `to_empty` gives every tensor its own storage, so the tied head is tied again
    model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(os.path.join(workdir, "llm"))
    text_tokenizer.save_pretrained(os.path.join(workdir, "llm"))
    sizes["llm_parameters"] = sum(p.numel() for p in model.parameters())
    return sizes


def assemble_materialised(tokenizer_dir: str, llm_dir: str, dtype):
    """The assembly as `from_components` did it before issue 15: build the VLM with random weights, then copy."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evotok_hf import EvoTokForConditionalGeneration, EvoTokModel, EvoTokVLMConfig

    vision = EvoTokModel.from_pretrained(tokenizer_dir)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
    text_tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    special = ["<image>", "<boi>", "<eoi>"]
    text_tokenizer.add_tokens([t for t in special if t not in text_tokenizer.get_vocab()], special_tokens=True)
    if len(text_tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(text_tokenizer), mean_resizing=True)
    ids = [text_tokenizer.convert_tokens_to_ids(t) for t in special]
    config = EvoTokVLMConfig(vision_config=vision.config.to_dict(), text_config=llm.config.to_dict(),
                             image_token_id=ids[0], boi_token_id=ids[1], eoi_token_id=ids[2])  # fmt: skip
    model = EvoTokForConditionalGeneration._from_config(config, dtype=dtype)
    model.vision_tower.load_state_dict(vision.state_dict())
    model.language_model.load_state_dict(llm.base_model.state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    model.generation_config = copy.deepcopy(llm.generation_config)
    return model


def measure(variant: str, workdir: str, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from evotok_hf import EvoTokForConditionalGeneration, EvoTokModel

    dtype = getattr(torch, dtype_name)
    tokenizer_dir, llm_dir = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "llm")
    before = resident_bytes("VmRSS")
    start = time.perf_counter()
    if variant == "components":
        parts = (EvoTokModel.from_pretrained(tokenizer_dir, dtype=dtype),
                 AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype))  # fmt: skip
        codebook = parts[0].quantizer.codebook
    elif variant == "materialised":
        codebook = assemble_materialised(tokenizer_dir, llm_dir, dtype).vision_tower.quantizer.codebook
    else:
        model, _ = EvoTokForConditionalGeneration.from_components(tokenizer_dir, llm_dir, dtype=dtype,
                                                                  return_processor=True)  # fmt: skip
        codebook = model.vision_tower.quantizer.codebook
    seconds = time.perf_counter() - start
    return {"variant": variant, "dtype": dtype_name, "seconds": seconds, "rss_before_bytes": before,
            "peak_rss_bytes": resident_bytes("VmHWM"), "codebook_dtype": str(codebook.dtype)}  # fmt: skip


def run_child(args: argparse.Namespace, child: str, workdir: str, dtype: str | None = None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", child, "--workdir", workdir, "--llm", args.llm,
               "--tokenizer-preset", args.tokenizer_preset]  # fmt: skip
    if dtype is not None:
        command += ["--dtype", dtype]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{child} ({dtype}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child == "prepare":
        print(json.dumps(prepare(args.workdir, args.llm, args.tokenizer_preset)))
        return {}
    if args.child is not None:
        print(json.dumps(measure(args.child, args.workdir, args.dtype[0])))
        return {}

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        sizes = run_child(args, "prepare", workdir)
        rows = [run_child(args, variant, workdir, dtype) for dtype in args.dtype for variant in args.variants]

    gib = 2**30
    print(f"\nAssembling {args.tokenizer_preset} ({sizes['tokenizer_parameters'] / 1e6:.1f}M parameters, "
          f"{sizes['tokenizer_buffers'] / 1e6:.1f}M buffer values) + {args.llm} ({sizes['llm_parameters'] / 1e6:.1f}M "
          "parameters), each variant in a fresh process\n")  # fmt: skip
    print("| dtype | variant | peak RSS GiB | increase GiB | seconds | codebooks |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        increase = (row["peak_rss_bytes"] - row["rss_before_bytes"]) / gib
        print(f"| {row['dtype']} | {row['variant']} | {row['peak_rss_bytes'] / gib:.2f} | {increase:.2f} | "
              f"{row['seconds']:.1f} | {row['codebook_dtype'].removeprefix('torch.')} |")  # fmt: skip
    result = {"llm": args.llm, "tokenizer_preset": args.tokenizer_preset, **sizes, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
