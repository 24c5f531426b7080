"""Text-to-image generation benchmark: our `generate(generation_mode="image")` vs a straightforward implementation of
the authors' sampling algorithm, on identical random weights, side by side in one process.

    (a) `EvoTokForConditionalGeneration.generate(**inputs, generation_mode="image")`: the LLM keeps its key/value
        cache across image positions, the depth head its own across depths, sampling through transformers' warpers;
    (b) the authors' algorithm written plainly here: one cached LLM step per position; at every depth d the depth
        sequence [hidden_proj(h), code_proj(cumulative code sums of depths < d)] recomputed from scratch through the
        head's layers (no cache) and the classifier of depth d on its last step only; CFG by doubling the batch
        (conditional rows first), logits = uncond + s * (cond - uncond); top-k on the logits then top-p on the
        probabilities; next LLM input = generation projector(sum of the chosen codes' embeddings);
    (c) (a) with `cache_implementation="static"`: a StaticCache for the LLM and one compiled graph per image
        position (`torch.compile(fullgraph=True)`) holding the depth loop with its warpers and sampling, the code
        embedding and the LLM step, with no host synchronisation inside.

Both run the same modules (the same LLM, the same `EvoTokDepthTransformer` layers and classifiers). For each size it
times greedy decoding (checking that (a) and (b) choose identical codes) and sampling (top-k 900 / top-p 0.96, the
same seed), round-robin (a, b, a, b, ...), and reports seconds per image and where they go: the LLM, the depth head's
layers, its classifiers, the rest of the depth loop (CFG, sampling, code embeddings) and the rest.

Sizes: "tiny" (a few hundred thousand parameters); "paper-ratio": Qwen2.5-7B (28 x 3584) and the authors' depth head
(6 x 2560) scaled down together by 1/8 in width to 28 x 448 and 6 x 320 (head_dim 64 on both sides, 7:1 query to
key/value heads as Qwen2.5-7B's 28:4), the layer counts kept, with the paper's 4 pixel depths, 32,768 x 32 codebooks
and 16 x 16 grid (`--grid` changes it); "paper-ratio-k4096": the same with the codebook scaled by 1/8 too, so that
every matmul's share of the work is the paper's (see `multiply_adds_per_position`).

    python benchmarks/generation.py [--sizes tiny,paper-ratio] [--grid 16] [--repeats 3] [--threads 2]
                                    [--batch 1] [--curve-batches 1,4,16,64] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config

from evotok_hf import (
    EvoTokConfig,
    EvoTokForConditionalGeneration,
    EvoTokImageProcessor,
    EvoTokProcessor,
    EvoTokVLMConfig,
)
from evotok_hf.modeling import generation as generation_module
from evotok_hf.processing.processing_evotok import DEFAULT_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<boi>", "<eoi>"]
CORPUS = ["system user assistant You are a helpful assistant.", "a red bicycle on a green hill", "a cat, a dog."]
PROMPT = "a red bicycle on a green hill"
PATCH = 8  # the evotok-tiny encoder's patch size: image_size = PATCH * grid

# The paper's sizes: Qwen2.5-7B-Instruct and the authors' depth head (the EvoTokDepthHeadConfig defaults).
PAPER_LLM = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4}  # fmt: skip
PAPER_HEAD = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 6, "num_attention_heads": 40}
PAPER_CODEBOOK_SIZE, PAPER_PIXEL_DEPTH = 32768, 4

SIZES = {
    "tiny": {
        "llm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2},  # fmt: skip
        "head": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        "vision": {"codebook_size": 512, "codebook_dim": 8, "pixel_depth": 4, "semantic_depth": 4},
        "grid": 4,
    },
    "paper-ratio": {
        "llm": {"hidden_size": 448, "intermediate_size": 2368, "num_hidden_layers": 28, "num_attention_heads": 7,
                "num_key_value_heads": 1},  # fmt: skip
        "head": {"hidden_size": 320, "num_hidden_layers": 6, "num_attention_heads": 5},
        "vision": {"codebook_size": 32768, "codebook_dim": 32, "pixel_depth": 4, "semantic_depth": 16},
        "grid": 16,
    },
}
SIZES["paper-ratio-k4096"] = {
    **SIZES["paper-ratio"], "vision": {**SIZES["paper-ratio"]["vision"], "codebook_size": 4096}
}  # fmt: skip



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,paper-ratio", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (a, b) per decoding mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed greedy rounds (a, b) first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="images per call (the prompt repeated)")
    p.add_argument("--head-batches", default="1,8,32",
                   help="images per call for the depth-head-only comparison (one position, greedy); '' to skip")
    p.add_argument("--head-repeats", type=int, default=5)
    p.add_argument("--curve-batches", default="",
                   help="images per call for the end-to-end images/s curve (greedy, e.g. 1,4,16,64); '' to skip")
    p.add_argument("--curve-repeats", type=int, default=1, help="timed rounds (a, b) per point of the curve")
    p.add_argument("--grid", type=int, default=None, help="grid of the paper-ratio sizes (default 16, the paper's)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the models' dtype (the codebooks stay fp32, as a bf16 load keeps them)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model, processor, inputs
def build_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])  # fmt: skip


def build_model(size: str, tokenizer, seed: int, grid: int | None = None) -> EvoTokForConditionalGeneration:
    spec = SIZES[size]
    grid = spec["grid"] if grid is None or size == "tiny" else grid
    vision = EvoTokConfig.from_preset("evotok-tiny", **spec["vision"], encoder_config={"image_size": PATCH * grid})
    text = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, **spec["llm"])  # fmt: skip
    token_id = tokenizer.convert_tokens_to_ids
    config = EvoTokVLMConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=token_id("<image>"),
        boi_token_id=token_id("<boi>"), eoi_token_id=token_id("<eoi>"), has_generation_head=True,
        has_understanding_head=False, wrap_image_tokens=True,
        depth_head_config={**spec["head"], "resid_dropout": 0.0},
    )  # fmt: skip
    torch.manual_seed(seed)
    return EvoTokForConditionalGeneration(config).eval()


def build_processor(tokenizer, vision) -> EvoTokProcessor:
    return EvoTokProcessor(
        image_processor=EvoTokImageProcessor(size={"height": vision.image_size, "width": vision.image_size}),
        tokenizer=tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE, num_image_tokens=vision.grid_size**2,
        boi_token="<boi>", eoi_token="<eoi>", wrap_image_tokens=True,
    )  # fmt: skip


def parameter_counts(model) -> dict:
    def count(module):
        return sum(p.numel() for p in module.parameters())

    head = model.depth_head
    return {"llm": count(model.model.language_model), "depth_head": count(head),
            "depth_head_classifiers": count(head.classifiers),
            "generation_projector": count(model.generation_projector),
            "codebooks": model.vision_tower.quantizer.codebook.numel(), "total": count(model)}  # fmt: skip


# ----------------------------------------------------------------------------- (b): the authors' algorithm
def _left_pad(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(ids.shape[1] for ids, _ in rows)
    pad = [(length - ids.shape[1], 0) for ids, _ in rows]
    ids = torch.cat([torch.nn.functional.pad(ids, p, value=0) for (ids, _), p in zip(rows, pad)])
    mask = torch.cat([torch.nn.functional.pad(mask, p, value=0) for (_, mask), p in zip(rows, pad)])
    return ids, mask


def sample_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float, generator) -> torch.Tensor:
    """The authors' sampling: keep the top-k logits, softmax, then zero the tail of the probabilities once the mass
    before a code already reaches top_p (the code that crosses top_p stays), renormalise, draw."""
    logits = logits.float()
    kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
    probs = torch.softmax(logits.masked_fill(logits < kth_best, float("-inf")), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class OfficialAlgorithm:
    """(b), written plainly. The depth head's layers and classifiers are the model's own modules; only the order of
    work is the authors'. `depth_logits` and `depth_loop` are separate methods so the benchmark can time them."""

    def __init__(self, model, guidance_scale: float, top_k: int, top_p: float):
        self.model, self.head = model, model.depth_head
        self.guidance_scale, self.top_k, self.top_p = guidance_scale, top_k, top_p
        self.depth = model.config.vision_config.pixel_depth
        self.codebook = model.vision_tower.quantizer.codebook[: self.depth]

    def depth_logits(self, start: torch.Tensor, cumulative: list[torch.Tensor]) -> torch.Tensor:
        """Logits of depth d = len(cumulative): the whole sequence [start, code_proj(sums of depths < d)] through the
        head's layers without a cache, then classifier d on the last step only."""
        head, d = self.head, len(cumulative)
        inputs = [start] + ([head.code_proj(torch.stack(cumulative, dim=1))] if cumulative else [])
        sequence = torch.cat(inputs, dim=1) + head.depth_embeddings[:, : d + 1]
        for layer in head.layers:
            sequence = layer(sequence)
        return head.classifiers[d](sequence[:, -1])

    def depth_loop(self, hidden: torch.Tensor, do_sample: bool, generator) -> torch.Tensor:
        """One position's codes `(rows, pixel_depth)` from the LLM states `(2 * rows, llm_hidden)`, conditional rows
        first; both halves continue with the chosen codes."""
        rows = hidden.shape[0] // 2
        start = self.head.hidden_proj(hidden.to(self.head.dtype))[:, None]
        chosen = torch.zeros(rows, self.depth, dtype=torch.long, device=hidden.device)
        cumulative = []  # e(c_0), e(c_0) + e(c_1), ... for both halves
        for d in range(self.depth):
            logits = self.depth_logits(start, cumulative).float()
            logits = logits[rows:] + self.guidance_scale * (logits[:rows] - logits[rows:])
            if do_sample:
                chosen[:, d] = sample_top_k_top_p(logits, self.top_k, self.top_p, generator)
            else:
                chosen[:, d] = logits.argmax(dim=-1)
            embedding = self.codebook[d][chosen[:, d]].to(self.head.dtype).repeat(2, 1)
            cumulative.append(embedding if d == 0 else cumulative[-1] + embedding)
        return chosen

    @torch.no_grad()
    def generate(self, inputs: dict, do_sample: bool, generator=None) -> torch.LongTensor:
        """Codes `(rows, grid, grid, pixel_depth)`, one cached LLM step per image position."""
        model, depth = self.model, self.depth
        grid = model.config.vision_config.grid_size
        language_model, projector = model.model.language_model, model.generation_projector
        device = model.device
        rows = inputs["input_ids"].shape[0]
        negative = [inputs[k].to(device).expand(rows, -1) for k in ("negative_input_ids", "negative_attention_mask")]
        ids, mask = _left_pad([(inputs["input_ids"].to(device), inputs["attention_mask"].to(device)), tuple(negative)])
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = language_model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                             position_ids=positions, use_cache=True)  # fmt: skip
        codes = []
        for position in range(grid * grid):
            chosen = self.depth_loop(out.last_hidden_state[:, -1], do_sample, generator)
            codes.append(chosen)
            if position == grid * grid - 1:
                break
            code_sum = self.codebook[torch.arange(depth, device=device), chosen].sum(dim=1).repeat(2, 1)
            next_input = projector(code_sum.to(projector.linear_1.weight.dtype))
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = language_model(inputs_embeds=next_input[:, None], attention_mask=mask, position_ids=positions,
                                 past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
        return torch.stack(codes, dim=1).view(-1, grid, grid, depth)


# ----------------------------------------------------------------------------- timing
class Stopwatch:
    """Accumulates the time spent inside wrapped callables, per label (nested labels each count their own)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, label, fn):
        def run(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            self._sync()
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
            return result

        return run

    @contextlib.contextmanager
    def wrapping(self, targets):
        """Replace `owner.name` by a timed version for each (owner, name, label), restoring them on exit."""
        saved = []
        for owner, name, label in targets:
            own = name in vars(owner)
            saved.append((owner, name, own, vars(owner).get(name)))
            setattr(owner, name, self.timed(label, getattr(owner, name)))
        try:
            yield
        finally:
            for owner, name, own, value in reversed(saved):
                if own:
                    setattr(owner, name, value)
                else:
                    delattr(owner, name)


def breakdown(seconds: dict[str, float], total: float) -> dict[str, float]:
    """Per-image seconds by part: the LLM, the depth head's layers and classifiers, the rest of the depth loop (CFG,
    sampling, code embeddings), the compiled position step of (c) (all of those in one graph), and everything else
    (projector, bookkeeping)."""
    head, classifiers, loop, llm, step = (seconds.get(k, 0.0) for k in ("head", "classifiers", "depth_loop", "llm",
                                                                        "position_step"))  # fmt: skip
    return {"llm": llm, "depth_head_layers": head - classifiers, "depth_head_classifiers": classifiers,
            "depth_loop_sampling_and_rest": loop - head, "compiled_position_step": step,
            "other": total - loop - llm - step}  # fmt: skip


def multiply_adds_per_position(llm: dict, head: dict, codebook_size: int, depth: int, rows: int) -> dict:
    """Weight multiply-adds per image position (the attention over cached keys, and all elementwise work, left out):
    the LLM step, and the depth head with a cache (one new step per depth) or without (d + 1 steps at depth d), with
    one classifier call per depth in both. `rows` counts the CFG-doubled batch."""
    h, kv = llm["hidden_size"], llm["hidden_size"] // llm["num_attention_heads"] * llm["num_key_value_heads"]
    llm_step = llm["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * llm["intermediate_size"])
    e = head["hidden_size"]
    head_step = head["num_hidden_layers"] * (4 * e * e + 2 * e * head.get("intermediate_size", 4 * e))
    classifier = e * codebook_size
    cached = depth * head_step + depth * classifier
    uncached = depth * (depth + 1) // 2 * head_step + depth * classifier
    return {"llm": rows * llm_step, "head_cached": rows * cached, "head_uncached": rows * uncached,
            "head_ratio": uncached / cached,
            "end_to_end_ratio": (llm_step + uncached) / (llm_step + cached)}  # fmt: skip


def _summary(runs: list[dict]) -> dict:
    totals = [r["seconds"] for r in runs]
    heads = [r["parts"]["depth_head_layers"] + r["parts"]["depth_head_classifiers"] for r in runs]
    best = min(range(len(runs)), key=lambda i: totals[i])
    return {"best_s": min(totals), "median_s": statistics.median(totals), "depth_head_best_s": min(heads),
            "depth_head_median_s": statistics.median(heads), "runs_s": totals, "parts_of_best": runs[best]["parts"]}


def benchmark_size(size: str, args, device: torch.device) -> dict:
    tokenizer = build_tokenizer()
    model = build_model(size, tokenizer, args.seed, args.grid).to(device=device, dtype=getattr(torch, args.dtype))
    model.vision_tower.quantizer.float()  # as `_keep_in_fp32_modules_strict` keeps them in a bf16 load
    vision = model.config.vision_config
    processor = build_processor(tokenizer, vision)
    inputs = processor(text=[PROMPT] * args.batch, generation_mode="image", return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    head = model.depth_head
    images = args.batch
    stopwatch = Stopwatch(device)
    targets = [(model.model.language_model, "forward", "llm"), (head, "forward", "head"),
               (generation_module, "_sample_depths", "depth_loop")]  # fmt: skip
    targets += [(classifier, "forward", "classifiers") for classifier in head.classifiers]
    official = OfficialAlgorithm(model, args.guidance_scale, args.top_k, args.top_p)
    targets_b = [t for t in targets if t[2] in ("llm", "classifiers")]
    targets_b += [(official, "depth_logits", "head"), (head.hidden_proj, "forward", "head"),
                  (official, "depth_loop", "depth_loop")]

    def run_a(do_sample):
        generator = torch.Generator(device).manual_seed(args.seed)
        return model.generate(**inputs, generation_mode="image", guidance_scale=args.guidance_scale,
                              do_sample=do_sample, depth_top_k=args.top_k, depth_top_p=args.top_p,
                              generator=generator)  # fmt: skip

    def run_b(do_sample):
        generator = torch.Generator(device).manual_seed(args.seed)
        return official.generate(inputs, do_sample, generator)

    # (c): (a) with a StaticCache and the compiled position step (the depth loop, the code embedding and the LLM
    # step in one graph): each call of it is timed as a whole, as "position_step"; no module inside it is wrapped (a
    # wrapper would change what the graph traced), so the prompt's pass counts as "other".
    compiled_step = generation_module._compiled_position_step()

    def run_c(do_sample):
        generator = torch.Generator(device).manual_seed(args.seed)
        getter = generation_module._compiled_position_step
        generation_module._compiled_position_step = lambda: stopwatch.timed("position_step", compiled_step)
        try:
            return model.generate(**inputs, generation_mode="image", guidance_scale=args.guidance_scale,
                                  do_sample=do_sample, depth_top_k=args.top_k, depth_top_p=args.top_p,
                                  generator=generator, cache_implementation="static")  # fmt: skip
        finally:
            generation_module._compiled_position_step = getter

    def timed_call(fn, do_sample, wrap):
        stopwatch.seconds = {}
        with stopwatch.wrapping(wrap):
            stopwatch._sync()
            t0 = time.perf_counter()
            codes = fn(do_sample)
            stopwatch._sync()
            seconds = time.perf_counter() - t0
        parts = {k: v / images for k, v in breakdown(stopwatch.seconds, seconds).items()}
        return codes, {"seconds": seconds / images, "parts": parts}

    candidates = {"a": (run_a, targets), "b": (run_b, targets_b), "c": (run_c, [])}
    for do_sample in (False, True):  # compiles the position steps for this batch and prompt (not timed)
        run_c(do_sample)
    for _ in range(args.warmup):
        for fn, wrap in candidates.values():
            timed_call(fn, False, wrap)
    result = {"parameters": parameter_counts(model), "grid": vision.grid_size, "pixel_depth": vision.pixel_depth,
              "codebook_size": vision.codebook_size, "images_per_call": images,
              "llm": {k: getattr(model.config.text_config, k) for k in PAPER_LLM},
              "depth_head": {k: getattr(head.config, k) for k in PAPER_HEAD}}  # fmt: skip
    result["multiply_adds_per_position"] = multiply_adds_per_position(
        result["llm"], result["depth_head"], vision.codebook_size, vision.pixel_depth, 2 * images)
    for mode, do_sample in (("greedy", False), ("sampled", True)):
        runs = {name: [] for name in candidates}
        codes = {}
        for _ in range(args.repeats):
            for name, (fn, wrap) in candidates.items():
                codes[name], run = timed_call(fn, do_sample, wrap)
                runs[name].append(run)
        entry = {name: _summary(r) for name, r in runs.items()}
        entry["speedup_end_to_end_best"] = entry["b"]["best_s"] / entry["a"]["best_s"]
        entry["speedup_end_to_end_median"] = entry["b"]["median_s"] / entry["a"]["median_s"]
        entry["speedup_depth_head_best"] = entry["b"]["depth_head_best_s"] / entry["a"]["depth_head_best_s"]
        entry["speedup_depth_head_median"] = entry["b"]["depth_head_median_s"] / entry["a"]["depth_head_median_s"]
        entry["speedup_static_end_to_end_best"] = entry["b"]["best_s"] / entry["c"]["best_s"]
        entry["speedup_static_end_to_end_median"] = entry["b"]["median_s"] / entry["c"]["median_s"]
        entry["speedup_static_vs_dynamic_best"] = entry["a"]["best_s"] / entry["c"]["best_s"]
        same = (codes["a"] == codes["b"]).all(dim=-1).flatten(1)  # (rows, positions): all depths equal
        entry["codes_identical"] = bool(same.all())
        entry["positions_identical_before_first_difference"] = int(same.cumprod(dim=1).sum(dim=1).min())
        entry["static_codes_identical"] = bool(torch.equal(codes["a"], codes["c"]))
        result[mode] = entry
    result["depth_head_by_batch"] = {
        str(b): depth_head_by_batch(model, official, b, args) for b in _ints(args.head_batches)
    }
    result["images_per_second_by_batch"] = {
        str(b): images_per_second(model, processor, official, b, args, device) for b in _ints(args.curve_batches)
    }
    return result


@torch.no_grad()
def images_per_second(model, processor, official, images: int, args, device: torch.device) -> dict:
    """End to end, greedy, `images` prompts per call (CFG: twice the rows): (a) and (b) round-robin after one
    untimed call each; images per second of the best and the median call, and whether the codes agree."""
    inputs = processor(text=[PROMPT] * images, generation_mode="image", return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    candidates = {
        "a": lambda: model.generate(**inputs, generation_mode="image", guidance_scale=args.guidance_scale,
                                    do_sample=False),
        "b": lambda: official.generate(inputs, False, None),
        "c": lambda: model.generate(**inputs, generation_mode="image", guidance_scale=args.guidance_scale,
                                    do_sample=False, cache_implementation="static"),
    }  # fmt: skip
    # the warm-up call is also (c)'s compilation for this batch
    codes, times = round_robin(candidates, args.curve_repeats, device)
    out = {f"{name}_{stat}_images_per_s": images / f(ts) for name, ts in times.items()
           for stat, f in (("best", min), ("median", statistics.median))}  # fmt: skip
    out["speedup_best"] = out["a_best_images_per_s"] / out["b_best_images_per_s"]
    out["static_speedup_best"] = out["c_best_images_per_s"] / out["b_best_images_per_s"]
    out["codes_identical"] = bool(torch.equal(codes["a"], codes["b"]))
    out["static_codes_identical"] = bool(torch.equal(codes["a"], codes["c"]))
    return out


def round_robin(candidates: dict, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """One untimed call of each candidate, then `repeats` timed rounds (a, b, ...); returns the last outputs and the
    seconds of every timed call, per candidate."""
    codes = {name: fn() for name, fn in candidates.items()}
    times = {name: [] for name in candidates}
    sync = Stopwatch(device)._sync
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync()
            t0 = time.perf_counter()
            codes[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return codes, times


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@torch.no_grad()
def depth_head_by_batch(model, official, images: int, args) -> dict:
    """The depth loop alone for one image position of `images` images (CFG: 2 * images rows of random LLM states),
    greedy: (a) the library's cached loop, (b) the recomputing one and (c) the static path's compiled loop,
    round-robin after one untimed call each (which compiles (c)), best and median ms per call."""
    head, vision = model.depth_head, model.config.vision_config
    hidden = torch.randn(2 * images, head.config.llm_hidden_size, generator=torch.Generator().manual_seed(args.seed))
    hidden = hidden.to(model.device)
    warpers = generation_module.build_depth_warpers(1.0, None, None, vision.pixel_depth, vision.codebook_size)
    candidates = {
        "a": lambda: generation_module._sample_depths(head, model.vision_tower.quantizer, hidden, warpers, True,
                                                      args.guidance_scale, False, None, True, images),
        "b": lambda: official.depth_loop(hidden, False, None),
        "c": lambda: _compiled_position_codes()(model, hidden, None, warpers, args.guidance_scale, images, False)[0],
    }  # fmt: skip
    codes, times = round_robin(candidates, args.head_repeats, model.device)
    out = {f"{name}_{stat}_ms": f(ts) * 1e3 for name, ts in times.items()
           for stat, f in (("best", min), ("median", statistics.median))}  # fmt: skip
    out["speedup_best"] = out["b_best_ms"] / out["a_best_ms"]
    out["speedup_median"] = out["b_median_ms"] / out["a_median_ms"]
    out["static_speedup_best"] = out["b_best_ms"] / out["c_best_ms"]
    out["static_speedup_median"] = out["b_median_ms"] / out["c_median_ms"]
    out["codes_identical"] = bool(torch.equal(codes["a"], codes["b"]))
    out["static_codes_identical"] = bool(torch.equal(codes["a"], codes["c"]))
    return out


def _few_row_position_codes(*args):
    with generation_module._FewRowLinear():
        return generation_module._position_codes(*args)


@functools.cache
def _compiled_position_codes():
    """The static path's depth loop alone (`_position_codes`), compiled as the position step compiles it (with
    `_FewRowLinear`)."""
    return torch.compile(_few_row_position_codes, fullgraph=True, dynamic=False)


# ----------------------------------------------------------------------------- report
def print_size(size: str, r: dict, args) -> None:
    p, llm, head = r["parameters"], r["llm"], r["depth_head"]
    print(f"\n== {size}: LLM {llm['num_hidden_layers']} x {llm['hidden_size']} ({p['llm'] / 1e6:.2f}M params), "
          f"depth head {head['num_hidden_layers']} x {head['hidden_size']} ({p['depth_head'] / 1e6:.2f}M, "
          f"classifiers {p['depth_head_classifiers'] / 1e6:.2f}M of it), grid {r['grid']}x{r['grid']}, "
          f"{r['pixel_depth']} depths x {r['codebook_size']} codes, {r['images_per_call']} image(s) per call, "
          f"CFG {args.guidance_scale}")
    labels = {"a": "(a) generate(generation_mode='image')", "b": "(b) official algorithm (no depth cache)",
              "c": "(c) (a), static cache + compiled step"}
    print(f"{'mode / implementation':48s} {'best s/img':>10s} {'median':>8s} {'head best':>9s} {'head med':>8s} | "
          f"{'LLM':>6s} {'layers':>6s} {'classif':>7s} {'sampl+':>6s} {'step':>6s} {'other':>6s}  (s/img, best run; "
          "step: (c)'s compiled position step, all of the depth loop and the LLM)")
    for mode in ("greedy", "sampled"):
        e = r[mode]
        for name in ("a", "b", "c"):
            s, parts = e[name], e[name]["parts_of_best"]
            print(f"{mode + ' ' + labels[name]:48s} {s['best_s']:10.3f} {s['median_s']:8.3f} "
                  f"{s['depth_head_best_s']:9.3f} {s['depth_head_median_s']:8.3f} | {parts['llm']:6.3f} "
                  f"{parts['depth_head_layers']:6.3f} {parts['depth_head_classifiers']:7.3f} "
                  f"{parts['depth_loop_sampling_and_rest']:6.3f} {parts['compiled_position_step']:6.3f} "
                  f"{parts['other']:6.3f}")
        print(f"{mode}: (b)/(a) end to end {e['speedup_end_to_end_best']:.2f}x best, "
              f"{e['speedup_end_to_end_median']:.2f}x median; depth head {e['speedup_depth_head_best']:.2f}x best, "
              f"{e['speedup_depth_head_median']:.2f}x median; codes identical: {e['codes_identical']} "
              f"(first {e['positions_identical_before_first_difference']} positions equal)")
        print(f"{mode}: (b)/(c) end to end {e['speedup_static_end_to_end_best']:.2f}x best, "
              f"{e['speedup_static_end_to_end_median']:.2f}x median; (a)/(c) {e['speedup_static_vs_dynamic_best']:.2f}x "
              f"best; codes of (c) identical to (a): {e['static_codes_identical']}")
    if r["depth_head_by_batch"]:
        print("depth head alone, one position, greedy (ms per call):  images  (a) best  (b) best  (c) best  (b)/(a) "
              "best (median)  (b)/(c) best (median)  codes identical (a-b, a-c)")
        for images, h in r["depth_head_by_batch"].items():
            print(f"{'':55s}{images:>6s} {h['a_best_ms']:9.2f} {h['b_best_ms']:9.2f} {h['c_best_ms']:9.2f} "
                  f"{h['speedup_best']:8.2f} ({h['speedup_median']:.2f}) {h['static_speedup_best']:8.2f} "
                  f"({h['static_speedup_median']:.2f})  {h['codes_identical']}, {h['static_codes_identical']}")
    if r["images_per_second_by_batch"]:
        print("end to end, greedy (images per second):  images  (a) best  (b) best  (c) best  (a)/(b)  (c)/(b)  "
              "codes identical (a-b, a-c)")
        for images, c in r["images_per_second_by_batch"].items():
            print(f"{'':40s}{images:>6s} {c['a_best_images_per_s']:9.3f} {c['b_best_images_per_s']:9.3f} "
                  f"{c['c_best_images_per_s']:9.3f} {c['speedup_best']:8.2f} {c['static_speedup_best']:8.2f}  "
                  f"{c['codes_identical']}, {c['static_codes_identical']}")
    m = r["multiply_adds_per_position"]
    print(f"multiply-adds per position: LLM {m['llm'] / 1e6:.1f}M, head cached {m['head_cached'] / 1e6:.1f}M, "
          f"uncached {m['head_uncached'] / 1e6:.1f}M -> compute ratio head {m['head_ratio']:.2f}x, "
          f"end to end {m['end_to_end_ratio']:.2f}x")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")
    paper = multiply_adds_per_position(PAPER_LLM, PAPER_HEAD, PAPER_CODEBOOK_SIZE, PAPER_PIXEL_DEPTH, 2)  # fmt: skip
    results = {"device": str(device), "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "repeats": args.repeats,
               "guidance_scale": args.guidance_scale, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
               "paper_size_multiply_adds_per_position": paper, "sizes": {}}  # fmt: skip
    t0 = time.perf_counter()
    for size in sizes:
        results["sizes"][size] = benchmark_size(size, args, device)
        print_size(size, results["sizes"][size], args)
    results["loadavg_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - t0
    print(f"\npaper size (Qwen2.5-7B + 6 x 2560 head, 32,768 codes), multiply-adds per position with CFG: head cached "
          f"{paper['head_cached'] / 1e9:.2f}G vs uncached {paper['head_uncached'] / 1e9:.2f}G "
          f"({paper['head_ratio']:.2f}x), end to end {paper['end_to_end_ratio']:.2f}x")
    print(f"load average {results['loadavg_start'][0]:.2f} at start, {results['loadavg_end'][0]:.2f} at end; "
          f"{results['wall_s']:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
