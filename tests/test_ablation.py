"""The depth ablation in miniature (`evotok_hf.miniature.ablation`, `scripts/reproduce_ablation.py`): the allocations'
configurations, the shared stages, the per-seed verdicts, and (slow) the whole reduced reproduction end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from evotok_hf.miniature.ablation import (
    ALLOCATIONS,
    CLAIMS,
    PAPER_TABLE4,
    _verdict,
    allocation_config,
    link_shared_stages,
)
from evotok_hf.miniature.pipeline import StageCache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "reproduce_ablation.py")


def test_allocations_are_the_papers_three_rows():
    assert ALLOCATIONS == {"pixel-to-semantic": (4, 16), "entangled": (4, 4), "semantic-to-pixel": (16, 4)}
    assert set(PAPER_TABLE4) == set(ALLOCATIONS)
    assert all(better in ALLOCATIONS and worse in ALLOCATIONS for _, _, better, worse, _ in CLAIMS)


def test_allocation_config_sets_only_the_depths_and_keeps_other_model_overrides():
    config = allocation_config("semantic-to-pixel", seed=3, preset="tiny",
                               tokenizer_overrides={"model_overrides": {"ema_warmup_steps": 0}, "learning_rate": 1e-3})
    assert config.seed == 3 and config.tokenizer_steps == 2  # the tiny preset's budget
    assert config.tokenizer_overrides == {"learning_rate": 1e-3, "model_overrides": {
        "ema_warmup_steps": 0, "pixel_depth": 16, "semantic_depth": 4}}  # fmt: skip
    # identical budgets: the allocations differ in the tokenizer's depths and nothing else
    other = allocation_config("entangled", seed=3, preset="tiny",
                              tokenizer_overrides={"model_overrides": {"ema_warmup_steps": 0}, "learning_rate": 1e-3})
    differing = {k for k, v in vars(config).items() if vars(other)[k] != v}
    assert differing == {"tokenizer_overrides"}
    with pytest.raises(ValueError, match="unknown allocation"):
        allocation_config("pixel-first", seed=0)


def test_shared_stages_keep_their_cache_keys_and_link_to_the_first_run(tmp_path):
    first, other = allocation_config("pixel-to-semantic", 0, "tiny"), allocation_config("semantic-to-pixel", 0, "tiny")
    first_keys, other_keys = StageCache(str(tmp_path), first).keys, StageCache(str(tmp_path), other).keys
    # the data, text and teacher stages do not depend on the depths; the tokenizer and everything after it do
    assert [first_keys[s] == other_keys[s] for s in first_keys] == [True, True, True, False, False, False, False]
    source, target = tmp_path / "a", tmp_path / "b"
    for stage in ("data", "text", "siglip"):
        (source / stage).mkdir(parents=True)
    (target / "siglip").mkdir(parents=True)  # a stage the target already holds stays its own
    link_shared_stages(str(source), str(target))
    assert os.path.realpath(target / "data") == str(source / "data") and os.path.islink(target / "text")
    assert not os.path.islink(target / "siglip")
    assert not os.path.isabs(os.readlink(target / "data"))  # relative: the runs folder can move


def test_verdicts_compare_seed_by_seed():
    values = {"a": {0: 0.5, 1: 0.7}, "b": {0: 0.4, 1: 0.6}}
    assert _verdict(values, "a", "b", True)["verdict"] == "holds"
    assert _verdict(values, "b", "a", True)["verdict"] == "reversed"
    assert _verdict(values, "a", "b", False)["verdict"] == "reversed"  # lower is better (a distance)
    mixed = {"a": {0: 0.5, 1: 0.5}, "b": {0: 0.4, 1: 0.6}}
    result = _verdict(mixed, "a", "b", True)
    assert result["verdict"] == "unresolved" and result["differences_by_seed"] == pytest.approx({0: 0.1, 1: -0.1})
    assert _verdict({"a": {0: 0.5}, "b": {0: 0.5}}, "a", "b", True)["verdict"] == "unresolved"  # a tie
    # the same sign in every seed, but a margin (0.1) within how far an allocation moves between seeds
    assert _verdict(values, "a", "b", True, spread=0.14)["verdict"] == "unresolved"
    assert _verdict(values, "b", "a", True, spread=0.14)["verdict"] == "unresolved"
    assert _verdict(values, "a", "b", True, spread=0.05)["verdict"] == "holds"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_reduced_reproduction_fills_every_table_cell(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    # 8 prompts per category: each category has another prompt to be the control, and both seeds draw held-out pairs
    command = [sys.executable, SCRIPT, "--preset", "tiny", "--seeds", "0", "1", "--output-dir", str(runs),
               "--results-dir", str(results), "--no-progress", "--overrides", '{"geneval_per_category": 8}']  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=1800)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("README.md", "ablation.json", "fig5b.png", "fig6_nmi.png",
                 *(f"fig6_clusters_{a}.png" for a in ALLOCATIONS)):  # fmt: skip
        assert (results / name).stat().st_size > 0, name
    summary = json.loads((results / "ablation.json").read_text())
    assert summary["seeds"] == [0, 1] and list(summary["allocations"]) == list(ALLOCATIONS)
    for name, table in summary["table"].items():
        for key in ("psnr", "ssim", "rfid", "vqa", "geneval", "semantic_cosine"):
            assert set(table[key]["by_seed"]) == {"0", "1"}, (name, key)
            assert all(isinstance(v, float) and v == v for v in table[key]["by_seed"].values()), (name, key)
    # the Fig. 5b curves run to each allocation's own depths
    for name, (pixel, semantic) in ALLOCATIONS.items():
        curves = summary["curves"][name]["0"]
        assert set(map(int, curves["psnr"])) == set(range(1, pixel + 1))
        assert set(map(int, curves["semantic_cosine"])) == set(range(1, semantic + 1))
        assert set(map(int, curves["nmi_color"])) == set(range(1, max(pixel, semantic) + 1))
    assert len(summary["claims"]) == len(CLAIMS)
    # every cell of the README's tables is filled
    readme = (results / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("|") and not line.startswith("|---")]
    assert len(rows) >= 3 * 5 + len(CLAIMS)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert all(cells) and not {"nan", "n/a", "-"} & set(cells), row
    main_rows = [row for row in rows if re.match(r"\| (pixel-to-semantic|entangled|semantic-to-pixel) \| \(", row)]
    assert sum("±" in row for row in main_rows) == 3  # the measured rows, with their spread over seeds
    # a second call reuses every stage of every run
    again = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0 and "building" not in again.stderr
