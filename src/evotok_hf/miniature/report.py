"""`report.json` and a self-contained `report.html` (images inlined as base64, plots as inline SVG) for the
miniature run: reconstructions by depth, per-depth curves on honest axes (PSNR above the mean-colour baseline, cosine
from 0), generated images per category with pass / fail marks, VQA examples, and the score tables beside the paper's
numbers, which were measured at a different scale on different benchmarks."""

from __future__ import annotations

import base64
import html
import json
import os

from .pipeline import STAGES

# The paper's reported numbers (EVOTOK_REFERENCE.md): SigLIP2-L tokenizer, Qwen2.5-7B, real benchmarks.
PAPER_NUMBERS = {
    "geneval_overall": 0.75,
    "tokenizer_ablation_pixel_to_semantic": {"rFID": 0.55, "PSNR": 23.60, "SSIM": 0.77, "GenEval": 0.67},
    "understanding": {"GQA": 61.8, "SEEDB": 71.8, "MME": 1895.1},
}

# The acceptance floors of the miniature (issue 13); the report marks each as met or not.
FLOORS = {
    "geneval_overall": 0.6,
    "geneval_single_object": 0.9,
    "geneval_colors": 0.8,
    "geneval_control_gap": 0.3,
    "vqa_overall": 0.85,
    "vqa_per_type": 0.7,
    "psnr_gain_depth4_over_depth1": 2.0,
    "cosine_gain_depth16_over_depth4": 0.05,
}


def floors_met(scores: dict) -> dict:
    """Each acceptance floor: the measured value, the floor and whether it is met."""
    geneval = scores["geneval"]["default"]
    per_depth = scores["per_depth"]
    psnr, cosine = per_depth["psnr"], per_depth["semantic_cosine"]
    pixel_depth, semantic_depth = max(psnr), max(cosine)
    vqa_types = scores["vqa"]["per_type"]
    measured = {
        "geneval_overall": geneval["overall"],
        "geneval_single_object": geneval["per_category"].get("single_object", float("nan")),
        "geneval_colors": geneval["per_category"].get("colors", float("nan")),
        "geneval_control_gap": geneval["overall"] - geneval["control"]["overall"],
        "vqa_overall": scores["vqa"]["overall"],
        "vqa_per_type": min(vqa_types.values()) if vqa_types else float("nan"),
        "psnr_gain_depth4_over_depth1": psnr[pixel_depth] - psnr[1],
        "cosine_gain_depth16_over_depth4": cosine[semantic_depth] - cosine[min(4, semantic_depth)],
    }
    return {name: {"value": value, "floor": FLOORS[name], "met": bool(value >= FLOORS[name])}
            for name, value in measured.items()}  # fmt: skip


def _int_keys(mapping: dict) -> dict:
    return {int(k): v for k, v in mapping.items()}


def build_report(cache, config, timings: dict) -> dict:
    """Gather every stage's summary and the scores into the JSON report."""
    import dataclasses

    with open(cache.path("scores", "scores.json")) as f:
        scores = json.load(f)
    for key in ("psnr", "ssim", "semantic_cosine", "rfid"):
        if key in scores["per_depth"]:  # rfid: not in the scores of runs before it was measured
            scores["per_depth"][key] = _int_keys(scores["per_depth"][key])
    scores["nmi_by_depth"] = _int_keys(scores["nmi_by_depth"])
    return {
        "config": {k: v for k, v in dataclasses.asdict(config).items()},
        "timings_seconds": timings,
        "build_seconds": {stage: cache.build_seconds(stage) for stage in STAGES},
        "stages_rebuilt": sorted(cache.rebuilt),
        "stages": {stage: cache.summary(stage) for stage in STAGES},
        "scores": scores,
        "floors": floors_met(scores),
        "paper": PAPER_NUMBERS,
        "folders": {name: os.path.abspath(cache.path(name)) for name in ("siglip", "tokenizer", "vlm")},
    }


# --------------------------------------------------------------------------------------------------------- HTML
def _img(folder: str, name: str, size: int = 96, title: str = "") -> str:
    with open(os.path.join(folder, name), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return (f'<img src="data:image/png;base64,{data}" width="{size}" height="{size}" title="{html.escape(title)}" '
            'style="image-rendering:pixelated">')  # fmt: skip


def line_chart(series: dict[str, dict[int, float]], title: str, y_label: str, y_min: float, y_max: float,
               baseline: float | None = None, baseline_label: str = "") -> str:  # fmt: skip
    """An inline SVG line chart of value by depth with an explicit y range (the caller chooses an honest one)."""
    width, height, left, bottom, top, right = 420, 260, 55, 40, 30, 15
    depths = sorted({d for values in series.values() for d in values})
    x_min, x_max = min(depths), max(depths)

    def x(d):
        return left + (d - x_min) / max(x_max - x_min, 1) * (width - left - right)

    def y(v):
        return height - bottom - (v - y_min) / (y_max - y_min) * (height - bottom - top)

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']  # fmt: skip
    for i in range(5):
        value = y_min + (y_max - y_min) * i / 4
        parts.append(f'<text x="{left - 5}" y="{y(value) + 4}" text-anchor="end">{value:.3g}</text>')
        parts.append(f'<line x1="{left}" y1="{y(value)}" x2="{width - right}" y2="{y(value)}" stroke="#ddd"/>')
    for d in depths:
        parts.append(f'<text x="{x(d)}" y="{height - bottom + 14}" text-anchor="middle">{d}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">depth k (first k residual codes)</text>')
    parts.append(f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle">'
                 f'{html.escape(y_label)}</text>')  # fmt: skip
    if baseline is not None:
        parts.append(f'<line x1="{left}" y1="{y(baseline)}" x2="{width - right}" y2="{y(baseline)}" stroke="gray" '
                     'stroke-dasharray="4"/>')  # fmt: skip
        parts.append(f'<text x="{width - right}" y="{y(baseline) - 4}" text-anchor="end" fill="gray">'
                     f'{html.escape(baseline_label)}</text>')  # fmt: skip
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for (name, values), colour in zip(series.items(), colours):
        points = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v in sorted(values.items()))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for d, v in values.items():
            parts.append(f'<circle cx="{x(d):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"><title>{name} depth {d}: '
                         f'{v:.4f}</title></circle>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _accuracy_by_objects(by_objects: dict) -> tuple[list[int], list[list[str]]]:
    """The object counts present and one row per question type of `vqa_accuracy`'s "per_type_by_num_objects" (its
    keys are strings once the report has been written as JSON and read back)."""
    counts = sorted({int(n) for per_count in by_objects.values() for n in per_count})
    rows = []
    for kind, per_count in by_objects.items():
        cells = {int(n): entry for n, entry in per_count.items()}
        rows.append([html.escape(kind)] + [f"{_fmt(cells[c]['accuracy'])} ({cells[c]['num_questions']})"
                                           if c in cells else "" for c in counts])  # fmt: skip
    return counts, rows


def _fmt(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else html.escape(str(value))


def render_html(report: dict, images_folder: str) -> str:
    scores = report["scores"]
    per_depth, geneval, vqa = scores["per_depth"], scores["geneval"], scores["vqa"]
    pixel_depth, semantic_depth = max(per_depth["psnr"]), max(per_depth["semantic_cosine"])
    sections = ["<h1>EvoTok in miniature</h1>",
                "<p>The paper's recipe at toy size on EvoTok Shapes (64 x 64 synthetic scenes): a mini-SigLIP teacher, the "
                f"EvoTok tokenizer (pixel depth {pixel_depth}, semantic depth {semantic_depth}), and one Qwen2 VLM that both answers questions and "
                "draws, scored by an objective detector (mini-GenEval) and exact-match VQA. Every number here is measured "
                "on this run; the paper's numbers are quoted only for orientation: <b>they come from a 7B model on real "
                "benchmarks (GenEval, GQA, ImageNet) and are not comparable</b>.</p>"]  # fmt: skip

    floor_rows = [[html.escape(name), _fmt(item["value"]), _fmt(item["floor"]),
                   "&#10004; met" if item["met"] else "&#10008; not met"] for name, item in report["floors"].items()]  # fmt: skip
    sections += ["<h2>Acceptance floors</h2>", _table(["measure", "value", "floor", ""], floor_rows)]

    # reconstructions and per-depth curves
    rows = []
    for row in per_depth["reconstructions"]:
        label = "input" if row["depth"] == 0 else f"first k = {row['depth']} depths"
        rows.append([label, "".join(_img(images_folder, name, 80) for name in row["images"])])
    sections += ["<h2>Reconstructions by pixel depth (held-out test scenes)</h2>", _table(["codes", "images"], rows)]
    psnr = per_depth["psnr"]
    baseline = per_depth["psnr_mean_colour_baseline"]
    psnr_chart = line_chart({"PSNR": psnr}, "PSNR by pixel depth", "PSNR (dB)", y_min=min(baseline, min(psnr.values())) - 1,
                            y_max=max(psnr.values()) + 1, baseline=baseline, baseline_label="mean-colour image")
    cosine = per_depth["semantic_cosine"]
    cosine_chart = line_chart({"cosine to teacher": cosine}, "Semantic cosine to the mini-SigLIP by depth",
                              "cosine similarity", y_min=0.0, y_max=1.0)  # fmt: skip
    nmi = scores["nmi_by_depth"]
    nmi_chart = line_chart({"colour": {d: v["color"] for d, v in nmi.items()},
                            "shape": {d: v["shape"] for d, v in nmi.items()}},
                           "NMI of per-position k-means clusters with labels", "NMI", y_min=0.0, y_max=1.0)  # fmt: skip
    sections += ["<h2>Per depth</h2>", f"<div>{psnr_chart} {cosine_chart} {nmi_chart}</div>",
                 "<p>PSNR is drawn from below the mean-colour baseline (dashed), cosine and NMI from 0 to 1. NMI: colour "
                 "in blue, shape in red.</p>"]  # fmt: skip
    if "rfid" in per_depth:  # not in the scores of runs before it was measured
        rfid_rows = [[f"first k = {k} depths", _fmt(v, 2)] for k, v in sorted(per_depth["rfid"].items())]
        rfid_rows.append(["two unpaired sets of real scenes (validation vs test; sampling alone)",
                          _fmt(per_depth.get("rfid_real_vs_real"), 2)])  # fmt: skip
        sections += ["<h3>rFID-style distance in the mini-SigLIP's feature space (pooled image embedding; not "
                     "Inception rFID)</h3>", _table(["reconstruction", "Fréchet distance"], rfid_rows)]  # fmt: skip

    # generation
    default_scale = geneval["default_guidance_scale"]
    scale_rows = []
    for scale, result in geneval["by_guidance_scale"].items():
        cats = result["per_category"]
        scale_rows.append([scale + (" (default)" if float(scale) == default_scale else ""), _fmt(result["overall"]),
                           *[_fmt(cats.get(c, float("nan"))) for c in _categories(geneval)],
                           _fmt(result["control"]["overall"]),
                           _fmt(result["heldout"].get("overall", float("nan")) if result["heldout"] else "-")])  # fmt: skip
    detector = scores["detector_ground_truth"]
    scale_rows.append(["ground-truth renders (detector check)", _fmt(detector["overall"]),
                       *[_fmt(detector["per_category"].get(c, float("nan"))) for c in _categories(geneval)], "-", "-"])
    # older reports (before this score existed) have no reconstruction ceiling
    for depth, ceiling in sorted(scores.get("detector_reconstructions", {}).items(), key=lambda item: int(item[0])):
        scale_rows.append([f"the renders through the tokenizer, first {depth} pixel depth(s) (ceiling)",
                           _fmt(ceiling["overall"]),
                           *[_fmt(ceiling["per_category"].get(c, float("nan"))) for c in _categories(geneval)], "-",
                           "-"])  # fmt: skip
    sections += ["<h2>mini-GenEval</h2>",
                 _table(["guidance", "overall", *_categories(geneval), "control", "held-out pairs"], scale_rows),
                 f"<p>Paper (GenEval, real prompts, 7B model; <b>different benchmark and scale</b>): overall "
                 f"{PAPER_NUMBERS['geneval_overall']}.</p>"]  # fmt: skip
    # older reports (before this score existed) have no object counts
    count_rows = [[scale + (" (default)" if float(scale) == default_scale else ""),
                   *[_object_count_cell(result["object_counts"].get(c)) for c in _categories(geneval)]]
                  for scale, result in geneval["by_guidance_scale"].items() if "object_counts" in result]  # fmt: skip
    if count_rows:
        sections += ["<h3>Objects detected per image (named by the prompt; share of empty canvases)</h3>",
                     _table(["guidance", *_categories(geneval)], count_rows)]
    grid_rows = []
    for item in geneval["grid"]:
        cells = "".join(f"<span class='{'pass' if ok else 'fail'}'>{_img(images_folder, name, 72)}"
                        f"{'&#10004;' if ok else '&#10008;'}</span>" for name, ok in zip(item["images"], item["passed"]))  # fmt: skip
        grid_rows.append([html.escape(item["category"]), html.escape(item["prompt"]) + (" (held-out)" if item["heldout"]
                                                                                     else ""), cells])  # fmt: skip
    sections += [f"<h3>Generated images at guidance {default_scale}</h3>", _table(["category", "prompt", "images"], grid_rows)]

    # understanding
    type_rows = [[html.escape(t), _fmt(v)] for t, v in vqa["per_type"].items()] + [["overall", _fmt(vqa["overall"])]]
    sections += ["<h2>VQA (exact match, test split)</h2>", _table(["question type", "accuracy"], type_rows),
                 "<p>Paper (GQA with a 7B LLM; <b>different benchmark and scale</b>): "
                 f"{PAPER_NUMBERS['understanding']['GQA']}.</p>"]  # fmt: skip
    by_objects = vqa.get("per_type_by_num_objects")
    if by_objects:
        counts, rows = _accuracy_by_objects(by_objects)
        sections += ["<p>By the number of objects in the scene (questions in brackets): with one object a colour "
                     "question only asks to read a colour, with two it asks which object has the shape.</p>",
                     _table(["question type", *(f"{c} object{'s' if c > 1 else ''}" for c in counts)], rows)]
    example_rows = [[_img(images_folder, e["image"], 72), html.escape(e["question"]), html.escape(e["answer"]),
                     html.escape(e["prediction"]), "&#10004;" if e["correct"] else "&#10008;"] for e in vqa["examples"]]  # fmt: skip
    sections.append(_table(["image", "question", "answer", "model", ""], example_rows))

    # teacher, timings
    zero_shot = report["stages"]["siglip"]["zero_shot_test"]
    sections += ["<h2>Teacher: mini-SigLIP zero-shot (one-object test scenes)</h2>",
                 _table(["colour", "shape", "colour + shape"], [[_fmt(zero_shot["color_accuracy"]),
                        _fmt(zero_shot["shape_accuracy"]), _fmt(zero_shot["pair_accuracy"])]])]  # fmt: skip
    build = report["build_seconds"]
    sections += ["<h2>Time per stage (seconds)</h2>",
                 _table(["stage", "when built", "this run"], [[k, _fmt(build.get(k, float("nan")), 1), _fmt(v, 1)]
                                                              for k, v in report["timings_seconds"].items()])]  # fmt: skip
    style = ("<style>body{font-family:sans-serif;max-width:1300px;margin:auto}table{border-collapse:collapse;"
             "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 6px}.pass{color:green}.fail{color:#c00}</style>")
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>EvoTok in miniature</title>{style}</head><body>" \
           + "\n".join(sections) + "</body></html>"


def _object_count_cell(counts: dict | None) -> str:
    if counts is None:
        return "-"
    return f"{counts['detected']:.2f} ({counts['named']:.2f}; {counts['empty']:.0%} empty)"


def _categories(geneval: dict) -> list[str]:
    from ..shapes_spec import CATEGORIES

    return list(CATEGORIES)


def write_report(report: dict, cache, output_dir: str) -> tuple[str, str]:
    json_path = os.path.join(output_dir, "report.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    html_path = os.path.join(output_dir, "report.html")
    with open(html_path, "w") as f:
        f.write(render_html(report, cache.path("scores", "images")))
    return json_path, html_path


__all__ = ["FLOORS", "PAPER_NUMBERS", "build_report", "floors_met", "line_chart", "render_html", "write_report"]
