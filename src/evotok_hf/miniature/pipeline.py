"""EvoTok in miniature, end to end: the paper's recipe at toy sizes on EvoTok Shapes, every step through the package's
public code paths, scored objectively.

Stages (each writes a folder under `output_dir` and a `stage.json` marker holding the settings it was built with; a
later run reuses a stage whose marker matches, unless `retrain`):

1. data: the EvoTok Shapes splits (`load_shapes_dataset`), saved with `save_to_disk`, the train / validation splits
   also as parquet (what `scripts/train_tokenizer.py --train_data` reads) and the train images as PNG files (what
   `scripts/train_vlm.py --image_folder` reads);
2. text: a byte-level BPE tokenizer trained on the dataset's text (`miniature.text`), shared by the teacher's text
   tower and the LLM;
3. siglip: the mini-SigLIP teacher (`miniature.siglip`), trained with SigLIP's sigmoid loss, with its zero-shot
   colour / shape accuracy;
4. tokenizer: `scripts/train_tokenizer.py --preset shapes` (encoder initialised from the mini-SigLIP through
   `EvoTokModel.from_encoder_pretrained`, teacher = the mini-SigLIP's `hidden_states[-2]`);
5. llm: a small Qwen2 built from its config (trained from scratch in the joint stages);
6. vlm: `scripts/train_vlm.py --task joint`, stage 1 (`pretrain`: the projectors and the depth head, on a VLM
   assembled with `EvoTokForConditionalGeneration.from_components`) then stage 2 (`sft`: everything but the image
   tokenizer), on VQA conversations and caption -> image turns (LLaVA JSON, `vlm_training_rows`), read in batches of
   one task each (`single_task_batches`); the result is one folder that
   `AutoModelForImageTextToText`, `AutoProcessor` and `EvoTokPipeline` load;
7. scores: per-depth reconstruction and semantic cosine, per-depth NMI, VQA and mini-GenEval
   (`evotok_hf.evaluation.shapes_scoring`), written to `report.json` and `report.html` (`miniature.report`).

The scripts run as subprocesses of the current interpreter (a fresh Accelerate state each, the thread count in their
environment), so what the demo trains is exactly what a user gets from the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"
# What a question / a caption turn looks like to the model (LLaVA JSON, as the paper's data).
IMAGE_PLACEHOLDER = "<image>"
# the captioning turn of the VQA conversations (`vlm_training_rows(describe=True)`)
DESCRIBE_PROMPT = "Describe the image."


@dataclass
class MiniatureConfig:
    """Every size and budget of the miniature run. `MINIATURE_PRESETS` holds the demo's ("demo") and the tests'
    ("tiny"); the stage budgets of "demo" are sized for about 15 minutes on two quiet CPU cores."""

    # data
    num_train: int = 3000
    num_validation: int = 200
    num_test: int = 300
    seed: int = 0
    bpe_vocab_size: int = 512
    # teacher
    siglip_steps: int = 1200
    siglip_batch_size: int = 64
    siglip_learning_rate: float = 1e-3
    # half of each batch in pairs of scenes only the shapes tell apart (`miniature.siglip.shape_twins`)
    siglip_hard_negatives: bool = True
    # weight of the per-patch grounding loss (`miniature.siglip.train_mini_siglip`); 0 trains the sigmoid loss alone
    siglip_grounding_weight: float = 0.0
    # image tokenizer (scripts/train_tokenizer.py --preset shapes; these override the preset)
    tokenizer_steps: int = 1200
    tokenizer_batch_size: int = 16
    tokenizer_overrides: dict = field(default_factory=dict)
    # language model
    llm_hidden_size: int = 192
    llm_layers: int = 3
    llm_heads: int = 4
    llm_kv_heads: int = 2
    depth_head: dict = field(default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "resid_dropout": 0.0})  # fmt: skip
    # VLM (scripts/train_vlm.py --task joint)
    vlm_stage1_steps: int = 60
    vlm_stage1_learning_rate: float = 1e-3
    vlm_stage2_steps: int = 1300
    vlm_stage2_learning_rate: float = 1e-3
    vlm_batch_size: int = 32
    # learned 2-D position embeddings of the image tokens (EvoTokVLMConfig.image_position_embeddings): the
    # mini-SigLIP's features, and the tokenizer's semantic features after them, carry too little of each token's grid
    # position for a 3-layer LLM trained from scratch to answer "is the square left of the circle?" (README)
    vlm_image_position_embeddings: bool = True
    vlm_bf16: bool = True
    # eager attention trains these small models faster than SDPA on a CPU (benchmarks/README.md)
    vlm_attn_implementation: str | None = "eager"
    # the VQA rows hold at most this many questions of a scene (None: all of them, up to 10), and each caption -> image
    # row appears this many times. Rows of at most 4 questions make a step 1.6x cheaper (a batch is padded to its
    # longest row), but split a scene's yes / no pair of existence questions over two rows, and in five of seven runs
    # the model then gave one answer to every existence question; with rows of whole scenes it never did (README)
    vlm_max_questions_per_row: int | None = None
    vlm_caption_repeats: int = 2
    # each VQA conversation opens with a captioning turn naming every object (`vlm_training_rows(describe=True)`)
    vlm_describe: bool = False
    # Batches of one task each (VQA rows or caption -> image rows), in a random order, read in that order
    # (`single_task_batches`): a batch is padded to its longest row, and beside VQA rows of 127-252 tokens the
    # 93-98-token caption -> image rows left random mixed batches 48% padding, batches of one task 12%; a stage-2 step
    # of the demo took 0.26 s instead of 0.42 s. Not grouped by length, which trains runs of ~25 batches of one task
    # and undid the joint learning (README).
    vlm_single_task_batches: bool = True
    # EvoTokVLMConfig.image_loss_weight: text_loss + weight * image_loss
    vlm_image_loss_weight: float = 1.0
    # how often a caption -> image row trains the unconditional prompt (classifier-free guidance needs that model)
    vlm_unconditional_probability: float = 0.1
    # the checkpoint's image-generation defaults, saved as `guidance_scale` / `depth_decoder_*` in
    # generation_config.json: the paper's guidance scale and the authors' temperature, without their top-p of 0.96 (or
    # their top-k of 900, which keeps every code of a 16-entry codebook anyway). Over 16 codes the background takes
    # most of a position's probability, and a top-p of 0.96 cuts the tail of codes that start an object: on four
    # VLMs trained apart, mini-GenEval at guidance 7.5 gained 0.015-0.028 without it (README)
    image_generation_defaults: dict = field(default_factory=lambda: {
        "guidance_scale": 7.5, "depth_decoder_do_sample": True, "depth_decoder_temperature": 1.0,
        "depth_decoder_top_p": 1.0})  # fmt: skip
    # scoring
    geneval_per_category: int = 50
    geneval_images_per_prompt: int = 4
    geneval_guidance_scales: tuple = (1.0, 3.0, 7.5)
    geneval_batch_size: int = 50
    vqa_num_scenes: int = 300
    vqa_batch_size: int = 64
    depth_eval_images: int = 200
    nmi_images: int = 100
    num_threads: int = 2

    def stage_settings(self, *names: str) -> dict:
        return {name: _jsonable(getattr(self, name)) for name in names}


MINIATURE_PRESETS: dict[str, dict] = {
    "demo": {},
    # A few steps of every stage at tiny sizes: the tests' end-to-end run (well under a minute).
    "tiny": {
        "num_train": 36, "num_validation": 12, "num_test": 12, "siglip_steps": 2, "siglip_batch_size": 8,
        "tokenizer_steps": 2, "tokenizer_batch_size": 4, "llm_hidden_size": 32, "llm_layers": 1, "llm_heads": 2,
        "llm_kv_heads": 1, "depth_head": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "resid_dropout": 0.0},
        "vlm_stage1_steps": 1, "vlm_stage2_steps": 2, "vlm_batch_size": 4, "vlm_bf16": False,
        "geneval_per_category": 1, "geneval_images_per_prompt": 1, "geneval_guidance_scales": (1.0, 7.5),
        "geneval_batch_size": 6, "vqa_num_scenes": 3, "vqa_batch_size": 16, "depth_eval_images": 6, "nmi_images": 6,
        "num_threads": 1,
    },  # fmt: skip
}

# What each stage's result depends on (a change re-runs that stage and every later one).
STAGE_SETTINGS = {
    "data": ("num_train", "num_validation", "num_test", "seed"),
    "text": ("bpe_vocab_size",),
    "siglip": ("siglip_steps", "siglip_batch_size", "siglip_learning_rate", "siglip_hard_negatives",
               "siglip_grounding_weight"),
    "tokenizer": ("tokenizer_steps", "tokenizer_batch_size", "tokenizer_overrides"),
    "llm": ("llm_hidden_size", "llm_layers", "llm_heads", "llm_kv_heads"),
    "vlm": ("depth_head", "vlm_max_questions_per_row", "vlm_caption_repeats", "vlm_describe", "vlm_single_task_batches",
            "vlm_stage1_steps",
            "vlm_stage1_learning_rate", "vlm_stage2_steps", "vlm_stage2_learning_rate", "vlm_batch_size", "vlm_bf16",
            "vlm_image_position_embeddings", "vlm_attn_implementation", "vlm_unconditional_probability",
            "vlm_image_loss_weight",
            "image_generation_defaults"),
    "scores": ("geneval_per_category", "geneval_images_per_prompt", "geneval_guidance_scales", "geneval_batch_size",
               "vqa_num_scenes", "depth_eval_images", "nmi_images"),
}  # fmt: skip
STAGES = tuple(STAGE_SETTINGS)


def miniature_config(preset: str = "demo", **overrides) -> MiniatureConfig:
    if preset not in MINIATURE_PRESETS:
        raise ValueError(f"unknown miniature preset {preset!r}; available: {sorted(MINIATURE_PRESETS)}")
    values = {**MINIATURE_PRESETS[preset], **overrides}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(MiniatureConfig)})
    if unknown:
        raise ValueError(f"unknown MiniatureConfig fields {unknown}")
    return MiniatureConfig(**values)


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def set_num_threads(num_threads: int) -> None:
    """One thread count for this process and every script it starts: results and timings are then reproducible."""
    import torch

    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(num_threads)
    torch.set_num_threads(num_threads)


# ------------------------------------------------------------------------------------------------------------ caching
class StageCache:
    """Stage folders under `output_dir` with their `stage.json` markers. A stage is fresh when its marker records the
    same settings key as now; each key chains the previous stage's, so changing a stage re-runs everything after it."""

    def __init__(self, output_dir: str, config: MiniatureConfig, retrain: bool = False):
        self.output_dir = output_dir
        self.retrain = retrain
        self.keys, previous = {}, ""
        for stage, names in STAGE_SETTINGS.items():
            blob = json.dumps({"previous": previous, **config.stage_settings(*names)}, sort_keys=True)
            previous = self.keys[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.rebuilt: set[str] = set()

    def path(self, stage: str, *parts: str) -> str:
        return os.path.join(self.output_dir, stage, *parts)

    def fresh(self, stage: str) -> bool:
        if self.retrain:
            return False
        marker = self.path(stage, STAGE_MARKER)
        if not os.path.isfile(marker):
            return False
        with open(marker) as f:
            return json.load(f).get("key") == self.keys[stage]

    def start(self, stage: str) -> str:
        """An empty folder for a stage that is about to be rebuilt."""
        folder = self.path(stage)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.makedirs(folder)
        return folder

    def finish(self, stage: str, summary: dict) -> dict:
        with open(self.path(stage, STAGE_MARKER), "w") as f:
            json.dump({"key": self.keys[stage], "summary": summary}, f, indent=2)
        self.rebuilt.add(stage)
        return summary

    def record_build_seconds(self, stage: str, seconds: float) -> None:
        """Keep how long a stage took to build in its marker, so a cached run still reports the training times."""
        marker = self.path(stage, STAGE_MARKER)
        with open(marker) as f:
            content = json.load(f)
        content["build_seconds"] = seconds
        with open(marker, "w") as f:
            json.dump(content, f, indent=2)

    def build_seconds(self, stage: str) -> float:
        with open(self.path(stage, STAGE_MARKER)) as f:
            return json.load(f).get("build_seconds", float("nan"))

    def summary(self, stage: str) -> dict:
        with open(self.path(stage, STAGE_MARKER)) as f:
            return json.load(f)["summary"]


# ------------------------------------------------------------------------------------------------------------ stages
def build_data(cache: StageCache, config: MiniatureConfig) -> dict:
    """The Shapes splits (`save_to_disk`), train / validation parquet for the tokenizer script, and the train images as
    PNG files for the VLM's LLaVA rows (written by the vlm stage)."""
    from .shapes import load_shapes_dataset

    folder = cache.start("data")
    start = time.perf_counter()
    dataset = load_shapes_dataset(config.num_train, config.num_validation, config.num_test, seed=config.seed)
    dataset.save_to_disk(os.path.join(folder, "shapes_dataset"))
    parquet = os.path.join(folder, "shapes_parquet")
    os.makedirs(parquet)
    for split in ("train", "validation"):
        dataset[split].select_columns(["image", "caption"]).to_parquet(os.path.join(parquet, f"{split}.parquet"))
    images = os.path.join(folder, "vlm_images")
    os.makedirs(images)
    for index, image in enumerate(dataset["train"]["image"]):
        image.save(os.path.join(images, f"{index:06d}.png"))
    summary = {"splits": {split: len(dataset[split]) for split in dataset}, "seconds": time.perf_counter() - start}
    return cache.finish("data", summary)


def vlm_training_rows(split, image_folder: str, seed: int = 0, max_questions_per_row: int | None = None,
                      caption_repeats: int = 1, write_images: bool = True, describe: bool = False) -> list[dict]:
    """LLaVA JSON rows for the joint VLM: VQA conversations (the image and one question in the first user turn, more
    of the scene's questions as later turns, in a shuffled order so every question type comes first sometimes) and
    caption -> image turns (an image in the assistant turn is an image to write), in a shuffled order.

    Each scene's questions are split into conversations of at most `max_questions_per_row` questions (as even as
    possible; every question kept): a batch is padded to its longest row, and a scene's 7 questions make a row twice as
    long as a caption -> image row. Each caption -> image row appears `caption_repeats` times. Images are written as
    PNG files under `image_folder` (or, with `write_images=False`, taken to be there already).

    With `describe`, each VQA conversation opens with `DESCRIBE_PROMPT`, answered by `describe_scene` (every object
    with its colour, left to right): the captioning turn of LLaVA's recipe, which names every object of the scene
    where a question asks about one."""
    if max_questions_per_row is not None and max_questions_per_row < 1:
        raise ValueError(f"max_questions_per_row must be >= 1 or None, got {max_questions_per_row}")
    if caption_repeats < 1:
        raise ValueError(f"caption_repeats must be >= 1, got {caption_repeats}")
    from .text import describe_scene

    os.makedirs(image_folder, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    if not write_images and "image" in getattr(split, "column_names", ()):
        split = split.remove_columns("image")  # nothing to decode
    for index, example in enumerate(split):
        name = f"{index:06d}.png"
        if write_images:
            example["image"].save(os.path.join(image_folder, name))
        questions = list(example["questions"])
        rng.shuffle(questions)
        per_row = max_questions_per_row or max(1, len(questions))
        num_rows = -(-len(questions) // per_row)
        for part in range(num_rows):
            conversation = []
            turns = questions[part::num_rows]
            if describe:
                turns = [{"question": DESCRIBE_PROMPT, "answer": describe_scene(example["objects"])}, *turns]
            for turn, qa in enumerate(turns):
                prefix = f"{IMAGE_PLACEHOLDER}\n" if turn == 0 else ""
                conversation.append({"from": "human", "value": prefix + qa["question"]})
                conversation.append({"from": "gpt", "value": qa["answer"]})
            suffix = f"-{part}" if num_rows > 1 else ""
            rows.append({"id": f"vqa-{index}{suffix}", "image": name, "conversations": conversation})
        for repeat in range(caption_repeats):
            suffix = f"-{repeat}" if caption_repeats > 1 else ""
            rows.append({"id": f"t2i-{index}{suffix}", "image": name, "conversations": [
                {"from": "human", "value": example["caption"]}, {"from": "gpt", "value": IMAGE_PLACEHOLDER}]})  # fmt: skip
    rng.shuffle(rows)
    return rows


def single_task_batches(passes: Iterable[list[dict]], batch_size: int, num_rows: int, seed: int = 0) -> list[dict]:
    """A training stream of at least `num_rows` rows, to be read in order: batches of `batch_size` rows of one task
    each (VQA rows or caption -> image rows of `vlm_training_rows`, told apart by their `id`), in a random order of
    batches. Each pass over the data takes the next list of rows from `passes` (e.g. `vlm_training_rows` with a new
    seed, so that a scene's questions come in a new order) and leaves out each task's last partial batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    stream: list[dict] = []
    passes = iter(passes)
    while len(stream) < num_rows:
        rows = next(passes, None)
        if rows is None:
            raise ValueError(f"the passes ran out after {len(stream)} of {num_rows} rows")
        by_task: dict[str, list[dict]] = {}
        for row in rows:
            by_task.setdefault(row["id"].split("-")[0], []).append(row)
        batches = []
        for task_rows in by_task.values():
            order = rng.sample(task_rows, len(task_rows))
            batches += [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        if not batches:
            sizes = {task: len(task_rows) for task, task_rows in by_task.items()}
            raise ValueError(f"no task has a full batch of {batch_size} rows: {sizes}")
        rng.shuffle(batches)
        stream += [row for batch in batches for row in batch]
    return stream


def load_data(cache: StageCache):
    import datasets

    return datasets.load_from_disk(cache.path("data", "shapes_dataset"))


def build_text_tokenizer(cache: StageCache, config: MiniatureConfig, dataset) -> dict:
    from .text import shapes_text_corpus, train_bpe_tokenizer

    folder = cache.start("text")
    tokenizer = train_bpe_tokenizer(shapes_text_corpus(dataset["train"]), vocab_size=config.bpe_vocab_size)
    tokenizer.save_pretrained(folder)
    return cache.finish("text", {"vocab_size": len(tokenizer)})


def build_siglip(cache: StageCache, config: MiniatureConfig, dataset, progress: bool = True) -> dict:
    from transformers import AutoTokenizer

    from ..modeling.configuration_evotok import EVOTOK_PRESETS
    from ..training.trainer import TRAINING_PRESETS
    from .siglip import save_mini_siglip, train_mini_siglip, zero_shot_accuracy

    folder = cache.start("siglip")
    tokenizer = AutoTokenizer.from_pretrained(cache.path("text"))
    encoder_config = EVOTOK_PRESETS[TRAINING_PRESETS["shapes"]["model_preset"]]["encoder_config"]
    model, summary = train_mini_siglip(
        dataset["train"], tokenizer, encoder_config, max_steps=config.siglip_steps, batch_size=config.siglip_batch_size,
        learning_rate=config.siglip_learning_rate, hard_negatives=config.siglip_hard_negatives,
        grounding_weight=config.siglip_grounding_weight, seed=config.seed, progress=progress,
    )  # fmt: skip
    summary["zero_shot_test"] = zero_shot_accuracy(model, tokenizer, dataset["test"])
    save_mini_siglip(model, tokenizer, folder)
    return cache.finish("siglip", summary)


def _run_script(script: str, argv: list[str], num_threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(num_threads), "MKL_NUM_THREADS": str(num_threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = [sys.executable, script, *argv]
    logger.info("running %s", " ".join(command))
    subprocess.run(command, check=True, env=env)


def build_tokenizer(cache: StageCache, config: MiniatureConfig, scripts_dir: str) -> dict:
    """`scripts/train_tokenizer.py --preset shapes` with the mini-SigLIP as encoder initialisation and teacher."""
    folder = cache.start("tokenizer")
    # The script's output folder holds checkpoints and `final/`; the stage folder is the final tokenizer itself.
    run = os.path.join(cache.output_dir, "tokenizer_run")
    if os.path.exists(run):
        shutil.rmtree(run)
    siglip, data = cache.path("siglip"), cache.path("data", "shapes_parquet")
    argv = ["--preset", "shapes", "--output_dir", run, "--encoder_pretrained", siglip, "--teacher", siglip,
            "--train_data", data, "--eval_data", data, "--max_train_steps", str(config.tokenizer_steps),
            "--train_batch_size", str(config.tokenizer_batch_size), "--seed", str(config.seed)]  # fmt: skip
    for key, value in config.tokenizer_overrides.items():
        argv += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    _run_script(os.path.join(scripts_dir, "train_tokenizer.py"), argv, config.num_threads)
    with open(os.path.join(run, "train_summary.json")) as f:
        summary = json.load(f)
    for name in os.listdir(os.path.join(run, "final")):
        shutil.move(os.path.join(run, "final", name), os.path.join(folder, name))
    shutil.rmtree(run)
    return cache.finish("tokenizer", {k: summary[k] for k in ("global_step", "train_seconds", "steps_per_s", "eval",
                                                               "history") if k in summary})  # fmt: skip


def build_llm(cache: StageCache, config: MiniatureConfig) -> dict:
    from transformers import AutoTokenizer

    from .text import build_qwen2

    folder = cache.start("llm")
    tokenizer = AutoTokenizer.from_pretrained(cache.path("text"))
    model = build_qwen2(tokenizer, hidden_size=config.llm_hidden_size, num_hidden_layers=config.llm_layers,
                        num_attention_heads=config.llm_heads, num_key_value_heads=config.llm_kv_heads,
                        seed=config.seed)  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return cache.finish("llm", {"parameters": sum(p.numel() for p in model.parameters())})


def _vlm_argv(config: MiniatureConfig, output_dir: str, steps: int, learning_rate: float) -> list[str]:
    import torch

    argv = ["--task", "joint", "--output_dir", output_dir, "--max_steps", str(steps), "--learning_rate",
            str(learning_rate), "--per_device_train_batch_size", str(config.vlm_batch_size), "--lr_scheduler_type",
            "cosine", "--warmup_steps", str(max(1, steps // 20)), "--weight_decay", "0.0", "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", str(max(1, steps // 10)), "--seed", str(config.seed),
            "--dataloader_num_workers", "0", "--max_length", "1024",
            "--unconditional_probability", str(config.vlm_unconditional_probability),
            "--image_loss_weight", str(config.vlm_image_loss_weight)]  # fmt: skip
    # TRL's SFTConfig turns bf16 on by default; say explicitly what this run uses.
    argv += ["--bf16", "true" if config.vlm_bf16 else "false"]
    # TRL's SFTConfig turns activation checkpointing on; models this small do not need the memory, and recomputing
    # every forward in the backward costs a fifth of a step
    argv += ["--activation_checkpointing", "false"]
    if config.vlm_attn_implementation:
        argv += ["--attn_implementation", config.vlm_attn_implementation]
    if not torch.cuda.is_available():
        argv.append("--use_cpu")  # the Trainer refuses bf16 on a CPU-only machine unless told it is one
    return argv


def build_vlm(cache: StageCache, config: MiniatureConfig, dataset, scripts_dir: str) -> dict:
    """Stage 1 then stage 2 of `scripts/train_vlm.py --task joint`; the final folder gets the image-generation
    defaults in its generation config."""
    from transformers import GenerationConfig

    folder = cache.start("vlm")
    stage1 = os.path.join(cache.output_dir, "vlm_stage1")
    if os.path.exists(stage1):
        shutil.rmtree(stage1)
    def rows_of_pass(index: int) -> list[dict]:
        return vlm_training_rows(dataset["train"], cache.path("data", "vlm_images"), seed=config.seed + index,
                                 max_questions_per_row=config.vlm_max_questions_per_row,
                                 caption_repeats=config.vlm_caption_repeats, write_images=False,
                                 describe=config.vlm_describe)  # fmt: skip

    rows = rows_of_pass(0)
    counts = {"vqa": sum(r["id"].startswith("vqa-") for r in rows), "t2i": sum(r["id"].startswith("t2i-") for r in rows)}
    order = []
    if config.vlm_single_task_batches:  # each stage reads the stream from its start
        length = max(config.vlm_stage1_steps, config.vlm_stage2_steps) * config.vlm_batch_size
        rows = single_task_batches(map(rows_of_pass, itertools.count()), config.vlm_batch_size, length,
                                   seed=config.seed)  # fmt: skip
        order = ["--train_sampling_strategy", "sequential"]
    rows_path = os.path.join(cache.output_dir, "vlm_train.json")
    with open(rows_path, "w") as f:
        json.dump(rows, f)
    data = ["--dataset", rows_path, "--image_folder", cache.path("data", "vlm_images"), *order]
    script = os.path.join(scripts_dir, "train_vlm.py")
    start = time.perf_counter()
    _run_script(script, [
        "--stage", "pretrain", "--tokenizer_name_or_path", cache.path("tokenizer"), "--llm_name_or_path",
        cache.path("llm"), "--depth_head_config", json.dumps(config.depth_head), *data,
        *(["--image_position_embeddings", "true"] if config.vlm_image_position_embeddings else []),
        *_vlm_argv(config, stage1, config.vlm_stage1_steps, config.vlm_stage1_learning_rate)], config.num_threads)
    stage1_seconds = time.perf_counter() - start
    _run_script(script, ["--stage", "sft", "--model_name_or_path", stage1, *data,
                         *_vlm_argv(config, folder, config.vlm_stage2_steps, config.vlm_stage2_learning_rate)],
                config.num_threads)  # fmt: skip
    generation_config = GenerationConfig.from_pretrained(folder)
    generation_config.update(**config.image_generation_defaults, allow_custom_entries=True)
    # a file marked as built from the model config keeps only GenerationConfig's own fields when read back
    generation_config._from_model_config = False
    generation_config.save_pretrained(folder)
    results = {}
    for name, path in (("stage1", stage1), ("stage2", folder)):
        with open(os.path.join(path, "train_results.json")) as f:
            results[name] = json.load(f)
    shutil.rmtree(stage1)
    os.remove(rows_path)
    results["rows"] = counts
    results["stage1_seconds"] = stage1_seconds
    results["stage2_seconds"] = time.perf_counter() - start - stage1_seconds
    return cache.finish("vlm", results)


# ------------------------------------------------------------------------------------------------------------ scoring
def score(cache: StageCache, config: MiniatureConfig, dataset, progress: bool = True) -> dict:
    """Every score of the miniature; the generated and reconstructed images the report shows are saved beside it."""
    from .scoring import score_miniature

    folder = cache.start("scores")
    scores = score_miniature(cache, config, dataset, folder, progress=progress)
    with open(os.path.join(folder, "scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
    return cache.finish("scores", {"seconds": scores["seconds"]})


def run_miniature(
    output_dir: str = "outputs/demo",
    config: MiniatureConfig | None = None,
    scripts_dir: str | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> dict:
    """Run (or reuse) every stage, then write `report.json` and `report.html`. Returns the report."""
    from .report import build_report, write_report

    config = config or miniature_config()
    if scripts_dir is None or not os.path.isfile(os.path.join(scripts_dir, "train_tokenizer.py")):
        raise ValueError(f"scripts_dir must be the folder holding train_tokenizer.py and train_vlm.py, got {scripts_dir!r}")
    set_num_threads(config.num_threads)
    os.makedirs(output_dir, exist_ok=True)
    cache = StageCache(output_dir, config, retrain=retrain)
    timings = {}
    run_start = time.perf_counter()

    def stage(name, build):
        start = time.perf_counter()
        if cache.fresh(name):
            logger.info("stage %s: cached", name)
        else:
            logger.info("stage %s: building", name)
            build()
            cache.record_build_seconds(name, time.perf_counter() - start)
        timings[name] = time.perf_counter() - start

    stage("data", lambda: build_data(cache, config))
    dataset = load_data(cache)
    stage("text", lambda: build_text_tokenizer(cache, config, dataset))
    stage("siglip", lambda: build_siglip(cache, config, dataset, progress=progress))
    stage("tokenizer", lambda: build_tokenizer(cache, config, scripts_dir))
    stage("llm", lambda: build_llm(cache, config))
    stage("vlm", lambda: build_vlm(cache, config, dataset, scripts_dir))
    stage("scores", lambda: score(cache, config, dataset, progress=progress))
    timings["total"] = time.perf_counter() - run_start
    report = build_report(cache, config, timings)
    write_report(report, cache, output_dir)
    return report


__all__ = ["MINIATURE_PRESETS", "MiniatureConfig", "StageCache", "miniature_config", "run_miniature",
           "single_task_batches", "vlm_training_rows"]  # fmt: skip
