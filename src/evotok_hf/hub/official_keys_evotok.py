"""The authors' tokenizer checkpoint keys -> `EvoTokModel` keys (timm's `checkpoint_filter_fn` habit: the mapping is
a visible, testable function of the model's own names).

Keys are renamed by `TOKENIZER_KEY_RULES`; the per-depth codebooks `quantize.codebooks.{d}.weight` (K + 1 rows, the
last one padding) are stacked into `quantizer.codebook` (depth, K, dim) without the padding row. The
`EvoTokModel` names are those of `modeling/modeling_evotok.py` and `modeling/quantizer.py`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .state_dict_conversion import UNMATCHED, KeyRules, rename_key

# Official tokenizer key -> our `EvoTokModel` key. The quantizer rules produce per-depth names ("...codebook.3")
# that `map_official_tokenizer_state_dict` stacks over depths.
TOKENIZER_KEY_RULES: KeyRules = [
    # SiglipVisionModel as saved by transformers 4.51 has a `vision_model.` level that transformers 5 no longer has.
    (r"^encoder_vqkd\.(?:vision_model\.)?", "encoder."),
    (r"^decoder_vqkd\.", "semantic_decoder."),  # BEiT-v2 ViT; q_bias / v_bias / qkv.weight keep their layout
    (r"^decoder\.", "pixel_decoder."),
    (r"^scaling_layer\.", "input_scaling."),
    (r"^(encode_task_layer|decode_task_layer|post_quant_conv)\.", r"\1."),
    (r"^quantize\.codebooks\.(\d+)\.weight$", r"quantizer.codebook.\1"),
    (r"^quantize\.codebooks\.(\d+)\.cluster_size_ema$", r"quantizer.cluster_size_ema.\1"),
    (r"^quantize\.codebooks\.(\d+)\.embed_ema$", r"quantizer.embed_ema.\1"),
    (r"^quantize\.codebooks\.(\d+)\.step$", r"quantizer.ema_step.\1"),  # only saved when EMA warm-up > 0
    (r"^quantize\.codebook_used$", None),  # rolling log of the last training batches' codes: training-only
]
# Our quantizer's EMA buffers: training state filled in by the mapping, not weights a model was trained with.
QUANTIZER_EMA_BUFFERS = ("quantizer.cluster_size_ema", "quantizer.embed_ema", "quantizer.ema_step")


def _stack_depths(
    name: str, per_depth: dict[int, torch.Tensor], problems: list[str], sources: dict[str, str]
) -> torch.Tensor | None:
    depths = sorted(per_depth)
    if depths != list(range(len(depths))):
        problems.append(f"official quantizer entries for {name!r} cover depths {depths}, not 0..{len(depths) - 1}")
        return None
    shapes = {tuple(t.shape) for t in per_depth.values()}
    if len(shapes) != 1:
        problems.append(
            f"official quantizer entries for {name!r} have different shapes across depths: {sorted(shapes)}"
        )
        return None
    sources[f"quantizer.{name}"] = f"quantize.codebooks.{{0..{len(depths) - 1}}}"
    return torch.stack([per_depth[d] for d in depths])


def map_official_tokenizer_state_dict(
    state_dict: Mapping[str, torch.Tensor], keep_training_state: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename an official tokenizer state dict to `EvoTokModel` keys.

    Returns `(converted, sources, problems)`: `sources` maps each of our keys to the official key(s) it came from;
    `problems` lists official keys no rule matches and malformed quantizer entries. The codebooks lose their padding
    row. With `keep_training_state` the EMA statistics (`cluster_size_ema`, `embed_ema`, and the warm-up counter
    `step`, equal at every depth) become our `cluster_size_ema` / `embed_ema` / `ema_step`, so training resumes
    where the authors stopped; otherwise they are dropped and ours hold a fresh model's EMA state for the converted
    codebook (zero sizes, sums equal to the codebook, step 0). Fine-tune from a conversion with
    `keep_training_state=True`: from the fresh state nearly every code would count as dead on the first training step.
    """
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    per_depth: dict[str, dict[int, torch.Tensor]] = {}
    problems: list[str] = []
    for key, tensor in state_dict.items():
        new = rename_key(key, TOKENIZER_KEY_RULES)
        if new is UNMATCHED:
            problems.append(f"official key {key!r} has no counterpart in EvoTokModel")
        elif new is not None and new.startswith("quantizer."):
            _, name, depth = new.split(".")
            per_depth.setdefault(name, {})[int(depth)] = tensor
        elif new is not None:
            converted[new] = tensor
            sources[new] = key

    codebooks = per_depth.pop("codebook", None)
    if not codebooks:
        problems.append("the checkpoint has no 'quantize.codebooks.{d}.weight' entries")
        return converted, sources, problems
    bad = {d: tuple(t.shape) for d, t in codebooks.items() if t.ndim != 2 or t.shape[0] < 2}
    if bad:
        problems.append(f"official codebooks must be (codebook_size + 1, dim) matrices, got {bad}")
        return converted, sources, problems
    # Row K of each official codebook is the nn.Embedding padding row: never selected, so never a code.
    codebook = _stack_depths("codebook", {d: t[:-1] for d, t in codebooks.items()}, problems, sources)
    if codebook is None:
        return converted, sources, problems
    converted["quantizer.codebook"] = codebook

    if keep_training_state:
        for name in ("cluster_size_ema", "embed_ema"):
            if name in per_depth:
                stacked = _stack_depths(name, per_depth.pop(name), problems, sources)
                if stacked is not None:
                    converted[f"quantizer.{name}"] = stacked
        steps = per_depth.pop("ema_step", None)
        if steps is None:
            # Without EMA warm-up the authors keep no counter; ours only gates the warm-up.
            converted["quantizer.ema_step"] = torch.zeros((), dtype=torch.long, device=codebook.device)
        else:
            values = {int(t) for t in steps.values()}
            if len(values) != 1 or set(steps) != set(codebooks):
                counters = {d: int(t) for d, t in steps.items()}
                problems.append(f"official EMA step counters differ across depths: {counters}")
            else:
                converted["quantizer.ema_step"] = torch.tensor(values.pop(), dtype=torch.long)
                sources["quantizer.ema_step"] = f"quantize.codebooks.{{0..{len(steps) - 1}}}.step"
    else:
        converted["quantizer.cluster_size_ema"] = torch.zeros(codebook.shape[:2], device=codebook.device)
        converted["quantizer.embed_ema"] = codebook.clone()
        converted["quantizer.ema_step"] = torch.zeros((), dtype=torch.long, device=codebook.device)
    return converted, sources, problems


__all__ = ["QUANTIZER_EMA_BUFFERS", "TOKENIZER_KEY_RULES", "map_official_tokenizer_state_dict"]
