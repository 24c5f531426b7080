"""Generate a text-to-image benchmark's images with an EvoTok VLM, in the folder layout its official evaluator reads.

    python scripts/generate_benchmark_images.py --benchmark geneval \\
        --prompts geneval/prompts/evaluation_metadata.jsonl --model <EvoTok VLM folder or Hub id> \\
        --outdir outputs/geneval
    python scripts/generate_benchmark_images.py --benchmark dpg --prompts ELLA/dpg_bench/prompts \\
        --model <...> --outdir outputs/dpg
    python scripts/generate_benchmark_images.py --benchmark genai \\
        --prompts datasets/GenAI-Image-1600/genai_image.json --model <...> --outdir outputs/genai/evotok

Layouts, as each evaluator reads them (checked against their code, see the README):
- geneval (djghosh13/geneval, evaluation/evaluate_images.py): the prompt file is `evaluation_metadata.jsonl`, one
  JSON object per line with a "prompt". For line i: `<outdir>/<i:05d>/metadata.jsonl` (that line's object, which
  the evaluator reads with one `json.load`) and `<outdir>/<i:05d>/samples/<j:04d>.png`, `--n_samples` (4) per prompt.
- dpg (TencentQQGYLab/ELLA, dpg_bench/compute_dpg_bench.py): the prompt file is the `dpg_bench/prompts` folder (one
  `<item_id>.txt` each) or `dpg_bench.csv` (columns item_id, text). One PNG per prompt, `<outdir>/<item_id>.png`: four
  images in a 2 x 2 grid without gaps (the evaluator crops tiles of `--resolution` pixels: pass the model's image
  size, recorded in the settings file).
- genai (linzhiqiu/t2v_metrics, genai_bench/evaluate.py): the prompt file is `genai_image.json` (prompt id ->
  {"prompt": ...}). One image per prompt, `<outdir>/<prompt_id>.jpeg` (the evaluator opens exactly that name; JPEG
  at `--jpeg_quality`, 75 as genai_bench/generate.py saves them); the evaluator takes `--output_dir` = the parent of
  `<outdir>` and `--gen_model` = its name.

Sampling goes through `EvoTokPipeline` (the model's own generate); the guidance scale and the depth head's settings
default to the checkpoint's generation config. `<outdir>/generation_settings.json` records every setting used.

Seeds: the prompts are cut, in file order, into fixed batches of `--batch_size`; the batch whose first prompt is the
i-th (from 0) is sampled with one torch.Generator seeded with the first 8 bytes (little-endian) of
sha256(f"{seed}:{i}"). Images thus depend on the seed, the batch size and the settings, not on which prompts were
already done: a resumed run writes the images an uninterrupted one would (on the same hardware and versions).

Resume: running again with the same settings skips finished prompts. Every file is written under a hidden
`.<name>.partial` name and renamed when complete (a GenEval prompt folder as a whole), so a killed run never leaves
a half-written image where an evaluator looks; leftovers are removed on the next run. A batch with an unfinished
prompt is sampled again whole, so its images stay those of its seed. Different settings for an existing folder are
refused.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import PIL.Image
import torch

import evotok_hf
from evotok_hf.modeling.generation import (
    DEPTH_DECODER_PREFIX,
    DEPTH_DECODER_SETTINGS,
    resolve_image_generation_config,
)
from evotok_hf.pipelines import EvoTokPipeline

logger = logging.getLogger(__name__)

BENCHMARKS = ("geneval", "dpg", "genai")
SETTINGS_FILE = "generation_settings.json"
PARTIAL_SUFFIX = ".partial"
# Settings that do not decide the images, so a resume may differ in them: where the prompt file lies (its content's
# digest is compared) and the package versions (a change is warned about).
NOT_COMPARED_ON_RESUME = ("prompts", "versions")
# Images per prompt that each evaluator reads: GenEval's default (any count works), DPG-Bench's 2 x 2 grid and
# GenAI-Bench's single image.
IMAGES_PER_PROMPT = {"geneval": 4, "dpg": 4, "genai": 1}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: `key` names its output (GenEval's folder index, DPG-Bench's item id, GenAI-Bench's
    prompt id); `metadata` is GenEval's whole line, written back beside its images."""

    key: str
    text: str
    metadata: dict | None = None


# ----------------------------------------------------------------------------------------------------- prompts
def _checked_text(text, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: the prompt must be a non-empty string, got {text!r}")
    return text.strip()


def _read_geneval(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            metadata = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON object ({error}); GenEval's evaluation_metadata.jsonl holds one "
                             "object per line") from error
        if not isinstance(metadata, dict) or "prompt" not in metadata:
            raise ValueError(f"{where}: expected a JSON object with a 'prompt', got {line.strip()[:80]!r}")
        prompts.append(Prompt(f"{len(prompts):05d}", _checked_text(metadata["prompt"], where), metadata))
    return prompts


def _read_dpg(path: Path) -> list[Prompt]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"{path}: no <item_id>.txt prompt files (DPG-Bench's dpg_bench/prompts folder)")
        return [Prompt(f.stem, _checked_text(f.read_text(encoding="utf-8"), str(f))) for f in files]
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"item_id", "text"} <= set(rows[0]):
        raise ValueError(f"{path}: expected DPG-Bench's dpg_bench.csv with 'item_id' and 'text' columns, or its "
                         "prompts folder")
    texts = {}
    for number, row in enumerate(rows, start=2):
        text = _checked_text(row["text"], f"{path}, line {number}")
        if texts.setdefault(row["item_id"], text) != text:
            raise ValueError(f"{path}, line {number}: item {row['item_id']!r} has two different texts")
    return [Prompt(key, text) for key, text in texts.items()]


def _read_genai(path: Path) -> list[Prompt]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error}); expected GenAI-Bench's genai_image.json") from error
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "prompt" in v for v in data.values()):
        raise ValueError(f"{path}: expected GenAI-Bench's genai_image.json, an object of prompt id -> "
                         "{'prompt': ...}")
    return [Prompt(str(key), _checked_text(value["prompt"], f"{path}, prompt {key}")) for key, value in data.items()]


def read_prompts(benchmark: str, path: str | os.PathLike) -> list[Prompt]:
    """The prompts of a benchmark's prompt file, in file order; a ValueError says what is wrong with a bad one."""
    path = Path(path)
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    if not path.exists():
        raise ValueError(f"prompt file {path} does not exist")
    if path.is_dir() and benchmark != "dpg":
        raise ValueError(f"{path} is a folder; --benchmark {benchmark} reads one file")
    prompts = {"geneval": _read_geneval, "dpg": _read_dpg, "genai": _read_genai}[benchmark](path)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    keys = [p.key for p in prompts]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"{path}: prompt ids used twice: {duplicates[:5]}")
    bad = [k for k in keys if not k or k.startswith(".") or "/" in k or os.sep in k]
    if bad:
        raise ValueError(f"{path}: prompt ids that cannot name a file: {bad[:5]}")
    return prompts


# ----------------------------------------------------------------------------------------------------- layouts
def _write_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, then rename onto `path`: the file appears whole or not at all."""
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    write(partial)
    os.replace(partial, path)


def image_grid(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """Four equal images as DPG-Bench's 2 x 2 grid, without gaps: first row images 0 and 1, second row 2 and 3 (the
    order of the evaluator's crops)."""
    if len(images) != 4 or len({image.size for image in images}) != 1:
        raise ValueError(f"a 2 x 2 grid needs four images of one size, got {[image.size for image in images]}")
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (2 * width, 2 * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % 2) * width, (index // 2) * height))
    return grid


class Layout:
    """Where a benchmark's evaluator reads a prompt's images: `is_finished(prompt)` and `write(prompt, images)`."""

    def __init__(self, benchmark: str, outdir: Path, images_per_prompt: int, jpeg_quality: int):
        self.benchmark, self.outdir = benchmark, outdir
        self.images_per_prompt, self.jpeg_quality = images_per_prompt, jpeg_quality

    def paths(self, prompt: Prompt) -> list[Path]:
        """Every file a finished prompt has."""
        if self.benchmark == "geneval":
            folder = self.outdir / prompt.key
            return [folder / "metadata.jsonl"] + [folder / "samples" / f"{j:04d}.png"
                                                  for j in range(self.images_per_prompt)]
        suffix = ".png" if self.benchmark == "dpg" else ".jpeg"
        return [self.outdir / f"{prompt.key}{suffix}"]

    def is_finished(self, prompt: Prompt) -> bool:
        return all(path.is_file() for path in self.paths(prompt))

    def write(self, prompt: Prompt, images: list[PIL.Image.Image]) -> None:
        if self.benchmark == "geneval":
            self._write_geneval(prompt, images)
        elif self.benchmark == "dpg":
            _write_atomically(self.paths(prompt)[0], lambda path: image_grid(images).save(path, format="PNG"))
        else:
            (image,) = images
            _write_atomically(self.paths(prompt)[0],
                              lambda path: image.save(path, format="JPEG", quality=self.jpeg_quality))

    def _write_geneval(self, prompt: Prompt, images: list[PIL.Image.Image]) -> None:
        """The prompt's folder is filled under a hidden name and renamed when complete; GenEval's evaluator skips
        folder names that are not digits."""
        folder = self.outdir / prompt.key
        partial = self.outdir / f".{prompt.key}{PARTIAL_SUFFIX}"
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "samples").mkdir(parents=True)
        for j, image in enumerate(images):
            image.save(partial / "samples" / f"{j:04d}.png", format="PNG")
        # GenEval's own generator writes the line's object with one json.dump; the evaluator reads it with json.load.
        (partial / "metadata.jsonl").write_text(json.dumps(prompt.metadata), encoding="utf-8")
        if folder.exists():  # an incomplete folder of an earlier run (files removed by hand)
            shutil.rmtree(folder)
        os.replace(partial, folder)

    def remove_partials(self) -> None:
        for partial in self.outdir.glob(f".*{PARTIAL_SUFFIX}"):
            if partial.is_dir():
                shutil.rmtree(partial)
            else:
                partial.unlink()


# ----------------------------------------------------------------------------------------------------- sampling
def batch_seed(seed: int, first_index: int) -> int:
    """The generator seed of the batch whose first prompt is the `first_index`-th: the first 8 bytes (little-endian)
    of sha256(f"{seed}:{first_index}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_index}".encode()).digest()[:8], "little")


def _per_depth(cast):
    """argparse type of a depth-head setting: one value, or a comma list with one value per pixel depth ("none"
    switches that depth's warper off)."""

    def parse(text: str):
        values = [None if item.strip().lower() == "none" else cast(item) for item in text.split(",")]
        return values if len(values) > 1 else values[0]

    return parse


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--prompts", required=True,
                   help="the benchmark's prompt file (DPG-Bench: its prompts folder or CSV)")
    p.add_argument("--model", required=True, help="EvoTok VLM folder or Hub id with a generation head")
    p.add_argument("--outdir", required=True)
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--depth_decoder_do_sample", type=_bool, default=None,
                   help="true / false; default: the checkpoint's")
    for name, cast in (("temperature", float), ("top_k", int), ("top_p", float)):
        p.add_argument(f"--depth_decoder_{name}", type=_per_depth(cast), default=None,
                       help="one value or one per pixel depth (comma list, 'none' for off); default: the checkpoint's")
    p.add_argument("--n_samples", type=int, default=None, help="GenEval only: images per prompt (default 4)")
    p.add_argument("--jpeg_quality", type=int, default=75, help="GenAI-Bench only: JPEG quality of the images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=1, help="prompts sampled together (images depend on it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def _images_per_prompt(args) -> int:
    if args.n_samples is None:
        return IMAGES_PER_PROMPT[args.benchmark]
    if args.benchmark != "geneval" and args.n_samples != IMAGES_PER_PROMPT[args.benchmark]:
        raise ValueError(f"--n_samples applies to GenEval; {args.benchmark} reads {IMAGES_PER_PROMPT[args.benchmark]} "
                         "image(s) per prompt")
    if args.n_samples < 1:
        raise ValueError(f"--n_samples must be positive, got {args.n_samples}")
    return args.n_samples


def _settings(args, pipe, sampling: dict, prompts_path: Path, images_per_prompt: int, dtype: torch.dtype) -> dict:
    """Everything that decides the images (compared on resume), plus where the prompts are and the versions used."""
    generation, depth, _ = resolve_image_generation_config(pipe.model, None, **sampling)
    vision = pipe.model.config.vision_config
    settings = {
        "benchmark": args.benchmark,
        "prompts": str(prompts_path.resolve()),
        "prompts_sha256": _digest(prompts_path),
        "model": args.model,
        "images_per_prompt": images_per_prompt,
        "image_size": vision.image_size,
        "guidance_scale": generation.guidance_scale,
        **{DEPTH_DECODER_PREFIX + name: getattr(depth, name) for name in DEPTH_DECODER_SETTINGS},
        "seed": args.seed,
        "batch_size": args.batch_size,
        "seed_per_batch": "sha256(f'{seed}:{index of the batch's first prompt}')[:8], little-endian",
        "device": torch.device(args.device).type,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if args.benchmark == "genai":
        settings["jpeg_quality"] = args.jpeg_quality
    if args.benchmark == "dpg":
        settings["dpg_resolution"] = vision.image_size  # compute_dpg_bench.py --resolution: one tile's side
    settings["versions"] = {"evotok_hf": evotok_hf.__version__, "torch": torch.__version__}
    return settings


def _digest(path: Path) -> str:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _check_or_write_settings(outdir: Path, settings: dict) -> None:
    path = outdir / SETTINGS_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in set(settings) | set(previous)
                         if k not in NOT_COMPARED_ON_RESUME and settings.get(k) != previous.get(k))  # fmt: skip
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(f"{outdir} holds images made with other settings ({details}); use a new --outdir, or "
                             "the same settings to resume")
        if previous.get("versions") != settings["versions"]:
            logger.warning("resuming with other versions (%s, before: %s): images may differ from those already "
                           "written", settings["versions"], previous.get("versions"))
    _write_atomically(path, lambda p: p.write_text(json.dumps(settings, indent=2) + "\n"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise ValueError(f"--jpeg_quality must lie in 1..100, got {args.jpeg_quality}")
    images_per_prompt = _images_per_prompt(args)
    prompts_path = Path(args.prompts)
    prompts = read_prompts(args.benchmark, prompts_path)
    outdir = Path(args.outdir)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype, torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
    pipe = EvoTokPipeline.from_pretrained(args.model, dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)  # one bar over prompts, below
    sampling = {"guidance_scale": args.guidance_scale}
    sampling.update({DEPTH_DECODER_PREFIX + name: getattr(args, DEPTH_DECODER_PREFIX + name)
                     for name in DEPTH_DECODER_SETTINGS})  # fmt: skip
    settings = _settings(args, pipe, sampling, prompts_path, images_per_prompt, dtype)  # checks every setting

    outdir.mkdir(parents=True, exist_ok=True)
    _check_or_write_settings(outdir, settings)
    layout = Layout(args.benchmark, outdir, images_per_prompt, args.jpeg_quality)
    layout.remove_partials()

    from tqdm.auto import tqdm

    finished = [layout.is_finished(p) for p in prompts]
    bar = tqdm(total=len(prompts), initial=sum(finished), desc=args.benchmark, unit="prompt",
               disable=args.no_progress)
    written = 0
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first:first + args.batch_size]
        if all(finished[first:first + len(batch)]):
            continue
        generator = torch.Generator(device=pipe.model.device.type).manual_seed(batch_seed(args.seed, first))
        images = pipe([p.text for p in batch], num_images_per_prompt=images_per_prompt, generator=generator,
                      **{k: v for k, v in sampling.items() if v is not None}).images
        for offset, prompt in enumerate(batch):
            if not finished[first + offset]:
                layout.write(prompt, images[offset * images_per_prompt:(offset + 1) * images_per_prompt])
                written += 1
                bar.update(1)
    bar.close()
    print(f"{args.benchmark}: {len(prompts)} prompts in {outdir} ({written} written now, "
          f"{len(prompts) - written} already there); settings in {outdir / SETTINGS_FILE}")
    return {"outdir": str(outdir), "prompts": len(prompts), "written": written, "settings": settings}


if __name__ == "__main__":
    main()
