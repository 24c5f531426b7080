"""Model cards for EvoTok checkpoints: the Jinja templates in `model_cards/` beside this module (package data, so
rendering works from an installed wheel) rendered by `huggingface_hub.ModelCard`.

What a card says follows three rules:
- Numbers from the paper are shown in a table labelled "reported in the paper (not measured on these weights)";
  numbers measured on the weights come only from an evaluation JSON (`ReconstructionReport.save_json`) and go to
  the `model-index` metadata as well.
- Converted official weights carry `license: other` and say that the authors' repository has no licence file, so no
  licence is stated; nothing is invented. Weights trained with this project carry the licence their owner passes.
- `library_name: transformers`, and the card says how the classes get there: `import evotok_hf`, or
  `trust_remote_code=True` for a folder exported with `export_remote_code`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..modeling.generation import (
    DEPTH_DECODER_PREFIX,
    DEPTH_DECODER_SETTINGS,
    IMAGE_GENERATION_DEFAULTS,
    resolve_image_generation_config,
)

TEMPLATE_DIR = Path(__file__).resolve().parent / "model_cards"
PAPER_URL = "https://arxiv.org/abs/2603.12108"
PAPER_ARXIV_TAG = "arxiv:2603.12108"
AUTHORS_CODE = "VisionXLab/EvoTok"
# What the official checkpoints were initialised from (paper: the SigLIP2 encoder; the Qwen2.5-7B-Instruct LLM).
OFFICIAL_TOKENIZER_BASE = ["google/siglip2-large-patch16-256"]
OFFICIAL_VLM_BASE = ["Qwen/Qwen2.5-7B-Instruct"]
# A Hub licence identifier: lowercase letters, digits, dots and dashes (e.g. "apache-2.0", "cc-by-nc-4.0", "other").
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
# rFID is comparable with published numbers only with the standard FID Inception features.
_INCEPTION = re.compile(r"inception", re.IGNORECASE)

# Paper tables (arXiv 2603.12108), quoted as reported; the templates label them as not measured on the weights.
PAPER_TOKENIZER_RESULTS = [
    {"source": "Table 1", "setting": "ImageNet-1K val, 256 px", "metric": "rFID", "value": "0.43"},
    {"source": "Table 4 (ablation, D_pix=4 / D_sem=16)", "setting": "ablation setting", "metric": "rFID",
     "value": "0.55"},
    {"source": "Table 4 (ablation, D_pix=4 / D_sem=16)", "setting": "ablation setting", "metric": "PSNR (dB)",
     "value": "23.60"},
    {"source": "Table 4 (ablation, D_pix=4 / D_sem=16)", "setting": "ablation setting", "metric": "SSIM",
     "value": "0.77"},
]  # fmt: skip
PAPER_UNDERSTANDING_RESULTS = [
    ("SEED-Bench", "71.8"), ("MM-Vet", "39.9"), ("GQA", "61.8"), ("AI2D", "76.2"), ("RealWorldQA", "62.0"),
    ("MMMU", "45.9"), ("MMBench", "74.9"), ("MME", "1895.1"), ("MME-P", "1455.9"),
]  # fmt: skip
PAPER_GENERATION_RESULTS = [("GenEval (overall)", "0.75"), ("GenAI-Bench (basic)", "0.87"),
                            ("GenAI-Bench (advanced)", "0.66")]  # fmt: skip


# ----------------------------------------------------------------------------- validation helpers
def _config_of(model_or_config, model_type: str, function: str):
    config = getattr(model_or_config, "config", model_or_config)
    found = getattr(config, "model_type", None)
    if found != model_type:
        raise ValueError(
            f"{function}: expected an EvoTok model or config of model_type {model_type!r}, got "
            f"{type(model_or_config).__name__} (model_type {found!r})."
        )
    return config


def _check_repo_id(repo_id, what: str = "repo_id", need_namespace: bool = True) -> str:
    if not isinstance(repo_id, str):
        raise ValueError(f"{what} must be a string like 'org/name', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what} {repo_id!r} is not a valid Hub repository id: {err}") from err
    if need_namespace and repo_id.count("/") != 1:
        raise ValueError(f"{what} must be 'org/name' (with a namespace), got {repo_id!r}.")
    return repo_id


def _repo_list(value, what: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        return None
    return [_check_repo_id(v, what, need_namespace=False) for v in values]


def _resolve_license(license: str | None, official: bool) -> str:
    if license is not None and (not isinstance(license, str) or not _LICENSE_ID.match(license)):
        raise ValueError(
            f"license must be a Hub licence identifier such as 'apache-2.0', 'mit' or 'other', got {license!r}."
        )
    if official:
        if license not in (None, "other"):
            raise ValueError(
                f"official=True: the EvoTok authors' repository has no licence file, so converted official weights "
                f"have no stated licence and the card uses license 'other'; got license={license!r}. Do not pass a "
                "licence the authors have not granted."
            )
        return "other"
    if license is None:
        raise ValueError(
            "license is required for weights trained with this project: pass the licence you release them under "
            "(a Hub identifier such as 'apache-2.0'), or official=True for converted official weights."
        )
    return license


# ----------------------------------------------------------------------------- evaluation JSON -> model-index
def _depth_dict(values) -> dict[int, float]:
    """JSON turns the report's int depth keys into strings; keep finite numbers only."""
    out = {}
    for key, value in (values or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[int(key)] = float(value)
    return out


def load_reconstruction_results(
    path, *, dataset: str | None = None, split: str | None = None, task_name: str = "Image reconstruction"
) -> tuple[list[EvalResult], dict]:
    """Read a `ReconstructionReport` JSON and return (`model-index` results, a table for the card body).

    PSNR / SSIM / rFID / LPIPS per pixel depth k become one result each (`metric_config` "pixel_depth_k"). rFID is
    named after its feature network: only Inception features give the standard, comparable rFID.
    The data is the one the report records ("dataset" / "split", written by `evaluate_reconstruction`); `dataset` /
    `split` override it (e.g. a Hub id instead of the local folder the evaluation read)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eval_results_path {str(path)!r} is not a file.")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"eval_results_path {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(report, dict) or "pixel_depths" not in report or "num_images" not in report:
        raise ValueError(
            f"{str(path)!r} is not a reconstruction report (ReconstructionReport.save_json / "
            "scripts/evaluate_reconstruction.py report.json): it needs 'num_images' and 'pixel_depths'."
        )
    dataset = dataset or report.get("dataset")
    split = split or report.get("split")
    if not dataset:
        raise ValueError(
            f"{str(path)!r} does not name the dataset it was measured on (a report written before reports recorded "
            "it); pass eval_dataset (a Hub dataset id such as 'ILSVRC/imagenet-1k', or a short name of the local "
            "data)."
        )
    network = report.get("feature_network")
    standard_rfid = bool(network and _INCEPTION.search(network))
    metrics = {
        "psnr": ("PSNR (dB)", _depth_dict(report.get("psnr"))),
        "ssim": ("SSIM", _depth_dict(report.get("ssim"))),
        "rfid": ("rFID" if standard_rfid else f"rFID ({network} features, not comparable with Inception rFID)",
                 _depth_dict(report.get("rfid"))),
        "lpips": ("LPIPS", _depth_dict(report.get("lpips"))),
    }  # fmt: skip
    present = [name for name, (_, values) in metrics.items() if values]
    if not present:
        raise ValueError(f"{str(path)!r} holds no PSNR / SSIM / rFID / LPIPS values.")

    results, rows = [], []
    for k in [int(k) for k in report["pixel_depths"]]:
        row = {"depth": k}
        for name in present:
            label, values = metrics[name]
            if k not in values:
                continue
            row[name] = values[k]
            metric_type = name if name != "rfid" or standard_rfid else f"rfid-{_slug(network)}"
            results.append(
                EvalResult(
                    task_type="image-to-image",
                    task_name=task_name,
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=f"{label}, first {k} depth{'s' if k > 1 else ''}",
                    metric_config=f"pixel_depth_{k}",
                    metric_value=round(values[k], 4),
                )
            )
        rows.append(row)
    table = {
        "columns": [(name, metrics[name][0]) for name in present],
        "rows": rows,
        "num_images": report["num_images"],
        "dataset": dataset,
        "split": split,
        "feature_network": network if "rfid" in present else None,
    }
    return results, table


def _slug(text) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


# ----------------------------------------------------------------------------- pipeline tags
# transformers' "image-feature-extraction" pipeline returns `model(**inputs)[0]`, the first field of
# `EvoTokModelOutput` that is set: the reconstruction, not the semantic features, so a tokenizer card says
# "image-to-image" (encode -> decode). tests/test_hub.py checks this against the pipeline itself.
TOKENIZER_PIPELINE_TAG = "image-to-image"


def vlm_pipeline_tag(config) -> str:
    return "any-to-any" if getattr(config, "has_generation_head", False) else "image-text-to-text"


def image_generation_settings(model_or_config) -> dict:
    """The text-to-image settings a card states, by the names generation_config.json gives them: a model's own
    (its generation configs, as `generate` resolves them), or for a bare config the defaults of a checkpoint that
    saves none (`IMAGE_GENERATION_DEFAULTS`)."""
    if not hasattr(model_or_config, "generation_config"):
        return dict(IMAGE_GENERATION_DEFAULTS)
    generation_config, depth_generation_config, _ = resolve_image_generation_config(model_or_config)
    return {"guidance_scale": generation_config.guidance_scale,
            **{DEPTH_DECODER_PREFIX + name: getattr(depth_generation_config, name) for name in DEPTH_DECODER_SETTINGS}}


# ----------------------------------------------------------------------------- rendering
def _render(template: str, template_path, *, pipeline_tag: str, tags: list[str], repo_id: str, license: str,
            base_model, datasets, results, measured, official: bool, remote_code: bool,
            **template_values) -> ModelCard:  # fmt: skip
    """The card data (metadata) and the template values both card kinds share, then the kind's own values."""
    path = Path(template_path) if template_path is not None else TEMPLATE_DIR / template
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {str(path)!r} not found (the templates ship in evotok_hf/hub/model_cards/)."
        )
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        base_model=base_model,
        datasets=datasets,
        tags=tags + (["custom_code"] if remote_code else []),
        model_name=model_name,
        eval_results=results,
    )
    return ModelCard.from_template(
        card_data, template_path=str(path), repo_id=repo_id, model_display_name=model_name, remote_code=remote_code,
        paper_url=PAPER_URL, measured=measured, base_models=base_model or [], official=official, license_id=license,
        authors_code=AUTHORS_CODE, **template_values,
    )  # fmt: skip


def _shared_card_values(repo_id, license, official, eval_results_path, base_model, datasets, eval_dataset, eval_split,
                        remote_code, default_base, task_name) -> dict:  # fmt: skip
    """The arguments both card kinds take, checked and resolved into the values `_render` takes for them."""
    repo_id = _check_repo_id(repo_id)
    if not isinstance(official, bool):
        raise ValueError(f"official must be True or False, got {official!r}.")
    license = _resolve_license(license, official)
    base_model = _repo_list(base_model, "base_model") or (list(default_base) if official else None)
    datasets = _repo_list(datasets, "datasets")
    results, measured = None, None
    if eval_results_path is not None:
        results, measured = load_reconstruction_results(
            eval_results_path, dataset=eval_dataset, split=eval_split, task_name=task_name
        )
    return {"repo_id": repo_id, "license": license, "base_model": base_model, "datasets": datasets, "results": results,
            "measured": measured, "official": official, "remote_code": remote_code}  # fmt: skip


def _tokenizer_facts(config) -> dict:
    """The facts of an `EvoTokConfig` that both cards state (the VLM card, of its image tokenizer)."""
    return {
        "image_size": config.image_size,
        "grid_size": config.grid_size,
        "pixel_depth": config.pixel_depth,
        "semantic_depth": config.semantic_depth,
        "num_depths": config.num_depths,
        "codebook_size": config.codebook_size,
    }


def render_tokenizer_card(
    model_or_config,
    *,
    repo_id: str,
    license: str | None = None,
    official: bool = False,
    eval_results_path=None,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    eval_dataset: str | None = None,
    eval_split: str | None = None,
    remote_code: bool = False,
    template_path=None,
) -> ModelCard:
    """The model card of an EvoTok image tokenizer (`EvoTokModel` or `EvoTokConfig`).

    Args:
        repo_id: "org/name" of the Hub repository (also what the usage snippets load).
        license: the licence of weights trained with this project (required then); with `official=True` only None
            or "other" (the authors stated no licence).
        official: the weights are converted from the EvoTok authors' checkpoints.
        eval_results_path: a `ReconstructionReport` JSON measured on these weights (model-index + a table).
        base_model / datasets: Hub ids for the metadata (official weights default to the paper's SigLIP2 encoder).
        eval_dataset / eval_split: override the data the report records (its "dataset" / "split"), e.g. with the
            Hub id of the local folder it read; needed only for reports that do not record it.
        remote_code: the folder ships its code (`export_remote_code`): snippets use `trust_remote_code=True`.
        template_path: another template than the packaged `model_cards/tokenizer.md`.
    """
    config = _config_of(model_or_config, "evotok", "render_tokenizer_card")
    shared = _shared_card_values(
        repo_id, license, official, eval_results_path, base_model, datasets, eval_dataset, eval_split, remote_code,
        OFFICIAL_TOKENIZER_BASE, "Image reconstruction",
    )  # fmt: skip
    encoder = config.encoder_config
    return _render(
        "tokenizer.md", template_path, pipeline_tag=TOKENIZER_PIPELINE_TAG,
        tags=["evotok", "image-tokenizer", "vector-quantization", "residual-quantization", PAPER_ARXIV_TAG], **shared,
        paper_tokenizer_results=PAPER_TOKENIZER_RESULTS,
        **_tokenizer_facts(config),
        codebook_dim=config.codebook_dim,
        teacher_dim=config.teacher_dim,
        encoder_hidden_size=encoder.hidden_size,
        encoder_layers=encoder.num_hidden_layers,
        encoder_patch_size=encoder.patch_size,
    )  # fmt: skip


def render_vlm_card(
    model_or_config,
    *,
    repo_id: str,
    license: str | None = None,
    official: bool = False,
    eval_results_path=None,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    eval_dataset: str | None = None,
    eval_split: str | None = None,
    remote_code: bool = False,
    template_path=None,
) -> ModelCard:
    """The model card of an EvoTok VLM (`EvoTokForConditionalGeneration` or `EvoTokVLMConfig`); arguments as in
    `render_tokenizer_card` (`eval_results_path`: a reconstruction report of its image tokenizer; official weights
    default to the paper's Qwen2.5-7B-Instruct as base model). Usage snippets follow the heads: image-text-to-text
    with the understanding head; text-to-image (`generate(..., generation_mode="image")`, and the diffusers
    `EvoTokPipeline` unless `remote_code`) with the generation head, which also makes the pipeline tag "any-to-any";
    the text-to-image settings the card states are a model's own (its generation config), the defaults for a
    config."""
    config = _config_of(model_or_config, "evotok_vlm", "render_vlm_card")
    shared = _shared_card_values(
        repo_id, license, official, eval_results_path, base_model, datasets, eval_dataset, eval_split, remote_code,
        OFFICIAL_VLM_BASE, "Image reconstruction (the VLM's image tokenizer)",
    )  # fmt: skip
    tags = ["evotok", "vision-language", "multimodal", "image-tokenizer", PAPER_ARXIV_TAG]
    if config.has_generation_head:
        tags.append("text-to-image")
    vision, text = config.vision_config, config.text_config
    return _render(
        "vlm.md", template_path, pipeline_tag=vlm_pipeline_tag(config), tags=tags, **shared,
        paper_tokenizer_results=PAPER_TOKENIZER_RESULTS[:1],
        paper_understanding_results=PAPER_UNDERSTANDING_RESULTS,
        paper_generation_results=PAPER_GENERATION_RESULTS,
        has_understanding_head=config.has_understanding_head,
        has_generation_head=config.has_generation_head,
        image_generation=image_generation_settings(model_or_config) if config.has_generation_head else None,
        wrap_image_tokens=config.wrap_image_tokens,
        num_image_tokens=config.num_image_tokens,
        **_tokenizer_facts(vision),
        text_model_type=text.model_type,
        text_hidden_size=text.hidden_size,
        text_layers=text.num_hidden_layers,
    )  # fmt: skip


__all__ = [
    "PAPER_GENERATION_RESULTS",
    "PAPER_TOKENIZER_RESULTS",
    "PAPER_UNDERSTANDING_RESULTS",
    "TOKENIZER_PIPELINE_TAG",
    "load_reconstruction_results",
    "render_tokenizer_card",
    "render_vlm_card",
    "vlm_pipeline_tag",
]
