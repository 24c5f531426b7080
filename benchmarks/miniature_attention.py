"""Training-step time of the miniature's three trained stages on a CPU, by attention implementation and precision:
the mini-SigLIP teacher (a `SiglipModel` of the `evotok-shapes` encoder's shape, batch 64), the tokenizer
(`evotok-shapes` with the `shapes` preset's losses, batch 16, bf16 autocast; also by the pixel decoder's memory
layout) and the joint VLM (a Qwen2 of 192 x 3 with a 128 x 2 depth head, batch 32: 16 VQA rows and 16 caption ->
image rows), each variant timed round-robin in one process on the same random weights and the same batches.

    python benchmarks/miniature_attention.py [--rounds 3] [--steps 5] [--json out.json]

Why: SDPA's CPU kernel has a per-call cost that dominates at these sizes (the depth head attends over 5 positions in
16 x 64 sequences at once), so eager attention trains these models faster; bf16 autocast halves the matmuls on a
CPU with bf16 instructions; the CPU GroupNorm backward in bf16 is slow on channels-last activations. The miniature
(`make demo`) uses eager + bf16 for all three stages.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds (a timed block of each variant per round)")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    p.add_argument("--scenes", type=int, default=64, help="EvoTok Shapes scenes to build the batches from")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _text_tokenizer(dataset):
    from evotok_hf.miniature.text import shapes_text_corpus, train_bpe_tokenizer

    return train_bpe_tokenizer(shapes_text_corpus(dataset), vocab_size=512)


def _train_step(model, optimizer, inputs: dict, bf16: bool) -> float:
    """One optimiser step on `inputs`; returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def siglip_variants(dataset, tokenizer):
    """(name, step function, model) per variant of the mini-SigLIP step; every variant starts from the same weights."""
    from transformers import SiglipModel

    from evotok_hf.miniature.siglip import encode_texts, images_to_tensor, mini_siglip_config, to_pixel_values
    from evotok_hf.modeling.configuration_evotok import EVOTOK_PRESETS

    torch.manual_seed(0)
    config = mini_siglip_config(tokenizer, EVOTOK_PRESETS["evotok-shapes"]["encoder_config"])
    reference = SiglipModel(config)
    batch = min(64, len(dataset))
    input_ids = encode_texts(tokenizer, list(dataset["caption"][:batch]))
    pixel_values = to_pixel_values(images_to_tensor(dataset["image"][:batch]))
    variants = []
    for attention in ("sdpa", "eager"):
        for bf16 in (False, True):
            # each variant its own config: `set_attn_implementation` writes to the config the modules read
            model = SiglipModel(copy.deepcopy(config))
            model.load_state_dict(reference.state_dict())
            model.set_attn_implementation(attention)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "return_loss": True}
            step = functools.partial(_train_step, model, optimizer, inputs, bf16)
            variants.append((f"mini-SigLIP {attention} {'bf16' if bf16 else 'fp32'}", step, model))
    return variants


def vlm_variants(dataset, tokenizer, folder: str):
    """(name, step function, model) per variant of the joint VLM step (stage 2: everything but the tokenizer
    trains)."""
    from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokModel
    from evotok_hf.miniature.pipeline import IMAGE_PLACEHOLDER
    from evotok_hf.miniature.text import build_qwen2
    from evotok_hf.training.vlm import EvoTokVLMDataCollator

    torch.manual_seed(0)
    EvoTokModel(EvoTokConfig.from_preset("evotok-shapes")).save_pretrained(f"{folder}/tokenizer")
    build_qwen2(tokenizer, hidden_size=192, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(f"{folder}/llm")  # fmt: skip
    tokenizer.save_pretrained(f"{folder}/llm")
    depth_head = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "resid_dropout": 0.0}
    reference, processor = EvoTokForConditionalGeneration.from_components(
        f"{folder}/tokenizer", f"{folder}/llm", has_understanding_head=True, has_generation_head=True,
        depth_head_config=depth_head, return_processor=True)  # fmt: skip
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    rows = []
    os.makedirs(f"{folder}/images")
    for index, example in enumerate(dataset.select(range(min(32, len(dataset))))):
        example["image"].save(f"{folder}/images/{index}.png")
        if index % 2:
            qa = example["questions"][0]
            conversation = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{qa['question']}"},
                            {"from": "gpt", "value": qa["answer"]}]  # fmt: skip
        else:
            conversation = [{"from": "human", "value": example["caption"]}, {"from": "gpt", "value": IMAGE_PLACEHOLDER}]
        rows.append({"id": str(index), "image": f"{index}.png", "conversations": conversation})
    batch = EvoTokVLMDataCollator(processor, max_length=1024, image_folder=f"{folder}/images")(rows)
    variants = []
    for attention in ("sdpa", "eager"):
        # cloned: from_pretrained adopts the tensors of a state dict as they are, and the variants must not share them
        state = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
        model = EvoTokForConditionalGeneration.from_pretrained(None, config=copy.deepcopy(reference.config),
                                                               state_dict=state)  # fmt: skip
        model.set_attn_implementation(attention)
        model.train()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not name.startswith("model.vision_tower."))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        step = functools.partial(_train_step, model, optimizer, batch, True)
        variants.append((f"joint VLM {attention} bf16", step, model))
    return variants


def tokenizer_variants(dataset, tokenizer):
    """(name, step function, model) per variant of the tokenizer step of `scripts/train_tokenizer.py --preset shapes`
    (`evotok-shapes` with the mini-SigLIP's shape as encoder and teacher, batch 16, bf16 autocast, the preset's
    losses). "channels-last decoder" feeds the pixel decoder its latents as the channels-last view they were before
    the decoder made them contiguous: every decoder activation then stays channels-last, where the CPU GroupNorm
    backward in bf16 is the slow kernel."""
    from evotok_hf import EvoTokConfig, EvoTokModel
    from evotok_hf.frozen_networks import SiglipTeacher
    from evotok_hf.miniature.siglip import images_to_tensor, mini_siglip_config, to_pixel_values
    from evotok_hf.modeling.configuration_evotok import EVOTOK_PRESETS
    from evotok_hf.training.arguments import training_arguments_from_preset
    from evotok_hf.training.losses import EvoTokLoss

    torch.manual_seed(0)
    config = EvoTokConfig.from_preset("evotok-shapes")
    siglip_config = mini_siglip_config(tokenizer, EVOTOK_PRESETS["evotok-shapes"]["encoder_config"])
    teacher = SiglipTeacher(siglip_config.vision_config, config.grid_size)
    pixel_values = to_pixel_values(images_to_tensor(dataset["image"][:16]))
    with torch.no_grad():
        target = teacher(pixel_values)
    loss_fn = EvoTokLoss(training_arguments_from_preset("shapes").loss_config())
    reference = EvoTokModel(config)

    def step(model, optimizer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(pixel_values)
            loss, _ = loss_fn.generator_loss(output, pixel_values, target, None, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    variants = []
    for attention in ("sdpa", "eager"):
        for channels_last in (True, False):
            if attention == "eager" and channels_last:
                continue
            model = EvoTokModel(copy.deepcopy(config))
            model.load_state_dict(reference.state_dict())
            model.set_attn_implementation(attention)
            model.train()
            if channels_last:
                model.pixel_decoder.conv_in.register_forward_pre_hook(
                    lambda module, args: (args[0].contiguous(memory_format=torch.channels_last),))
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            layout = "channels-last decoder" if channels_last else "contiguous decoder"
            variants.append((f"tokenizer {attention} bf16, {layout}", functools.partial(step, model, optimizer), model))
    return variants


def attention_in_use(model) -> list[str]:
    """The attention implementations the model's attention modules will read (from every config they hold)."""
    return sorted({module.config._attn_implementation for module in model.modules()
                   if getattr(module, "config", None) is not None})  # fmt: skip


def time_round_robin(variants, rounds: int, steps: int) -> dict:
    """Best and median seconds per step of each variant, the attention its modules use, and the loss of its first
    step (the variants start from the same weights on the same batch, so these agree up to the precision's rounding:
    a check that they compute the same thing)."""
    first_loss = {}
    for name, step, _ in variants:  # warm-up: first-call overheads, allocator, thread pool
        first_loss[name] = step()
        step()
    seconds = {name: [] for name, _, _ in variants}
    for _ in range(rounds):
        for name, step, _ in variants:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[name].append((time.perf_counter() - start) / steps)
    return {name: {"best_s": min(seconds[name]), "median_s": statistics.median(seconds[name]),
                   "first_loss": first_loss[name], "attention": attention_in_use(model)}
            for name, _, model in variants}  # fmt: skip


def main(argv=None) -> dict:
    from evotok_hf.miniature.shapes import load_shapes_dataset

    args = parse_args(argv)
    dataset = load_shapes_dataset(args.scenes, 2, 2, seed=0)["train"]
    tokenizer = _text_tokenizer(dataset)
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    results["siglip"] = time_round_robin(siglip_variants(dataset, tokenizer), args.rounds, args.steps)
    results["tokenizer"] = time_round_robin(tokenizer_variants(dataset, tokenizer), args.rounds, args.steps)
    with tempfile.TemporaryDirectory() as folder:
        results["vlm"] = time_round_robin(vlm_variants(dataset, tokenizer, folder), args.rounds, args.steps)
    for group in ("siglip", "tokenizer", "vlm"):
        first = next(iter(results[group].values()))["best_s"]
        print(f"| {group} variant | best s/step | median s/step | speed-up vs first |")
        print("|---|---:|---:|---:|")
        for name, value in results[group].items():
            print(f"| {name} | {value['best_s']:.3f} | {value['median_s']:.3f} | {first / value['best_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
