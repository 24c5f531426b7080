"""The mini-SigLIP teacher: a small `transformers.SiglipModel` trained from scratch on EvoTok Shapes with its own
sigmoid loss (`return_loss=True`).

In the paper the frozen SigLIP2's `hidden_states[-2]` is the semantic target of the tokenizer and the same SigLIP2
initialises the tokenizer's encoder; here the mini-SigLIP plays both parts
(`SiglipTeacher.from_pretrained(folder, grid_size=...)` and `EvoTokModel.from_encoder_pretrained(folder)`), so its
vision tower has the shape of the "evotok-small" encoder.

SigLIP's sigmoid loss treats every other pair of a batch as a negative, and EvoTok Shapes repeats captions ("a photo
of a circle" has three variants), so a batch holds each text at most once. Half of the texts are the GenEval
caption, half a description naming every object with its colour (`describe_scene`), so colour is bound to shape in
every image.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch

from ..shapes_spec import COLORS, SHAPES
from .text import describe_scene

logger = logging.getLogger(__name__)

MAX_TEXT_LENGTH = 24


def mini_siglip_config(tokenizer, encoder_config: dict):
    """A `SiglipConfig` whose vision tower is `encoder_config` (the tokenizer's encoder shape) and whose text tower is a
    2-layer transformer of the same width over `tokenizer`'s vocabulary."""
    from transformers import SiglipConfig

    width = encoder_config["hidden_size"]
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": 2,
        "num_attention_heads": encoder_config["num_attention_heads"], "max_position_embeddings": MAX_TEXT_LENGTH,
        "projection_size": width, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }  # fmt: skip
    return SiglipConfig(text_config=text_config, vision_config=dict(encoder_config))


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8 (converted to [-1, 1] per batch: SigLIP's mean = std = 0.5)."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def to_pixel_values(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


def encode_texts(tokenizer, texts: list[str]) -> torch.Tensor:
    """SigLIP's text convention: padded to a fixed length (its pooled output is the last position)."""
    return tokenizer(texts, padding="max_length", max_length=MAX_TEXT_LENGTH, truncation=True,
                     return_tensors="pt").input_ids  # fmt: skip


def _batch(rng: np.random.Generator, captions: list[str], descriptions: list[str], batch_size: int,
           twins: dict[int, list[int]] | None = None):
    """Indices and texts of one batch: each text at most once (the sigmoid loss's negatives must be true negatives).

    With `twins` (`shape_twins`), half of the batch comes in pairs of scenes that have the same colours but other
    shapes, each with its description: a pair only the shapes tell apart. Colour is visible in every pixel and is
    learnt within a few dozen steps; circle against square is a matter of a few corner pixels, which random batches
    rarely make the loss look at."""
    indices, texts, seen = [], [], set()

    def add(index: int, text: str) -> None:
        if text in seen or int(index) in indices or len(indices) == batch_size:
            return
        seen.add(text)
        indices.append(int(index))
        texts.append(text)

    order = rng.permutation(len(captions))
    if twins:
        for index in order:
            if len(indices) >= batch_size // 2:
                break
            partners = twins.get(int(index))
            if not partners:
                continue
            partner = partners[rng.integers(len(partners))]
            if descriptions[index] in seen or descriptions[partner] in seen or index in indices or partner in indices:
                continue
            add(index, descriptions[index])
            add(partner, descriptions[partner])
    for index in order:
        if len(indices) == batch_size:
            break
        add(index, descriptions[index] if rng.random() < 0.5 else captions[index])
    return indices, texts


def shape_twins(objects_per_scene) -> dict[int, list[int]]:
    """For each scene, the scenes with the same colours (as a multiset) but other shapes."""
    by_colours: dict[tuple, list[int]] = {}
    for index, objects in enumerate(objects_per_scene):
        by_colours.setdefault(tuple(sorted(obj["color"] for obj in objects)), []).append(index)
    twins = {}
    for members in by_colours.values():
        shapes = {index: sorted(obj["shape"] for obj in objects_per_scene[index]) for index in members}
        for index in members:
            twins[index] = [other for other in members if shapes[other] != shapes[index]]
    return twins


def patch_labels(objects_per_scene, grid_size: int) -> torch.LongTensor:
    """The grounding targets of each scene's patch grid, `(num_scenes, grid_size**2)` in row-major order: 0 where no
    object covers at least half of the patch, else 1 + shape index * len(COLORS) + colour index of the object that
    covers most of it (`evaluation.shapes_scoring.position_labels`)."""
    from ..evaluation.shapes_scoring import position_labels

    colours, shapes, covered = position_labels(objects_per_scene, grid_size)
    colour_index = {name: i for i, name in enumerate(COLORS)}
    shape_index = {name: i for i, name in enumerate(SHAPES)}
    labels = [1 + shape_index[s] * len(COLORS) + colour_index[c] if hit else 0
              for c, s, hit in zip(colours, shapes, covered)]  # fmt: skip
    return torch.tensor(labels, dtype=torch.long).view(len(objects_per_scene), grid_size * grid_size)


def train_mini_siglip(
    dataset,
    tokenizer,
    encoder_config: dict,
    max_steps: int = 300,
    batch_size: int = 96,
    learning_rate: float = 1e-3,
    warmup_steps: int = 20,
    weight_decay: float = 1e-4,
    hard_negatives: bool = True,
    grounding_weight: float = 0.0,
    bf16: bool = True,
    attn_implementation: str = "eager",
    seed: int = 0,
    progress: bool = True,
):
    """Train a mini-SigLIP on the (image, caption) pairs of `dataset` (an EvoTok Shapes split). Returns
    `(model, summary)`; the model is in eval mode.

    `bf16` trains under bfloat16 autocast (fp32 weights and optimiser) and `attn_implementation` picks the attention:
    eager + bf16 is the fastest pair on a CPU with bf16 instructions (benchmarks/miniature_attention.py).

    With `grounding_weight > 0` a linear head on the vision tower's `hidden_states[-2]` (the tokenizer's semantic
    target) learns each patch's object, colour and shape (`patch_labels`), its cross-entropy added to the sigmoid
    loss with that weight. SigLIP2 owes its local patch features to such dense objectives (LocCa's grounded captions
    and referring expressions, self-distillation, masked prediction); the sigmoid loss alone leaves the mini
    teacher's patches describing the whole scene, where no patch says what lies at it (README). The head is dropped
    after training: the teacher is a plain `SiglipModel`."""
    from tqdm.auto import tqdm
    from transformers import SiglipModel

    if max_steps < 1 or batch_size < 2:
        raise ValueError(f"need max_steps >= 1 and batch_size >= 2, got {max_steps}, {batch_size}")
    torch.manual_seed(seed)
    model = SiglipModel(mini_siglip_config(tokenizer, encoder_config))
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():  # the paper's initialisation of the sigmoid loss's temperature and bias
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    images = images_to_tensor(dataset["image"])
    captions = list(dataset["caption"])
    objects = list(dataset["objects"])
    descriptions = [describe_scene(scene) for scene in objects]
    twins = shape_twins(objects) if hard_negatives else None
    parameters = list(model.parameters())
    grounding_head = labels = None
    if grounding_weight > 0:
        grid_size = encoder_config["image_size"] // encoder_config["patch_size"]
        labels = patch_labels(objects, grid_size)
        grounding_head = torch.nn.Linear(encoder_config["hidden_size"], 1 + len(SHAPES) * len(COLORS))
        parameters += list(grounding_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, max_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = np.random.default_rng(seed)
    model.train()
    losses, grounding_losses = [], []
    start = time.perf_counter()
    for step in tqdm(range(max_steps), desc="mini-SigLIP", disable=not progress):
        indices, texts = _batch(rng, captions, descriptions, batch_size, twins)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = model(input_ids=encode_texts(tokenizer, texts), pixel_values=to_pixel_values(images[indices]),
                           return_loss=True, output_hidden_states=grounding_head is not None)  # fmt: skip
            loss = output.loss
            if grounding_head is not None:
                patches = output.vision_model_output.hidden_states[-2]
                grounding = torch.nn.functional.cross_entropy(
                    grounding_head(patches).flatten(0, 1).float(), labels[indices].flatten()
                )
                loss = loss + grounding_weight * grounding
                grounding_losses.append(float(grounding.detach()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(output.loss.detach()))
    model.eval()
    summary = {"steps": max_steps, "batch_size": batch_size, "train_seconds": time.perf_counter() - start,
               "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:]))}  # fmt: skip
    if grounding_head is not None:
        summary.update(grounding_weight=grounding_weight, first_grounding_loss=grounding_losses[0],
                       final_grounding_loss=float(np.mean(grounding_losses[-10:])))  # fmt: skip
    return model, summary


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, dataset, batch_size: int = 128) -> dict:
    """Zero-shot classification of the one-object scenes of `dataset` among the prompts "a photo of a {color}
    {shape}" (every colour x shape): accuracy of the predicted colour, of the predicted shape, and of both."""
    rows = [i for i, objects in enumerate(dataset["objects"]) if len(objects) == 1]
    if not rows:
        raise ValueError("zero_shot_accuracy needs scenes with exactly one object")
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    text_embeds = model.get_text_features(input_ids=encode_texts(tokenizer, [f"a photo of a {c} {s}" for c, s in pairs]))
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    subset = dataset.select(rows)
    images = images_to_tensor(subset["image"])
    predictions = []
    for chunk in images.split(batch_size):
        image_embeds = model.get_image_features(pixel_values=to_pixel_values(chunk))
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        predictions.extend((image_embeds @ text_embeds.T).argmax(-1).tolist())
    truth = [(objects[0]["color"], objects[0]["shape"]) for objects in subset["objects"]]
    guessed = [pairs[p] for p in predictions]
    n = len(truth)
    return {
        "num_images": n,
        "color_accuracy": sum(g[0] == t[0] for g, t in zip(guessed, truth)) / n,
        "shape_accuracy": sum(g[1] == t[1] for g, t in zip(guessed, truth)) / n,
        "pair_accuracy": sum(g == t for g, t in zip(guessed, truth)) / n,
        "chance": {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "pair": 1 / len(pairs)},
    }


def save_mini_siglip(model, tokenizer, folder: str | os.PathLike) -> str:
    """`save_pretrained` of the model and its text tokenizer: the folder loads with `SiglipModel.from_pretrained`,
    as a teacher with `SiglipTeacher.from_pretrained(folder, grid_size=...)` and as an encoder with `EvoTokModel.from_encoder_pretrained(folder)`."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


__all__ = ["mini_siglip_config", "patch_labels", "save_mini_siglip", "shape_twins", "train_mini_siglip", "zero_shot_accuracy"]
