"""The package as users install it: a wheel built from this checkout, installed into a fresh virtual environment,
renders both model cards, whose templates are read from the installed package (its package data), not from the
repository."""

import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Run by the fresh environment's Python, from a folder outside the checkout.
RENDER_BOTH_CARDS = textwrap.dedent(
    """
    import json

    import evotok_hf
    from evotok_hf import EvoTokConfig, EvoTokVLMConfig
    from evotok_hf.hub import render_tokenizer_card, render_vlm_card
    from evotok_hf.hub.model_card import TEMPLATE_DIR

    config = EvoTokConfig.from_preset("evotok-tiny")
    tokenizer_card = render_tokenizer_card(config, repo_id="org/evotok", license="apache-2.0")
    vlm_card = render_vlm_card(EvoTokVLMConfig(vision_config=config.to_dict()), repo_id="org/evotok-vlm",
                               license="apache-2.0")
    print(json.dumps({"package": evotok_hf.__file__, "templates": str(TEMPLATE_DIR),
                      "tokenizer": str(tokenizer_card), "vlm": str(vlm_card)}))
    """
)


# End to end through other processes (pip, a fresh venv), like the tests tests/conftest.py marks the same way.
@pytest.mark.integration
def test_wheel_installed_in_a_fresh_venv_renders_both_model_cards(tmp_path):
    # Built from a copy of what the wheel is made of: an in-tree build would leave build/ in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("evotok_hf-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # torch, transformers and pip come from the test's own environment: its site-packages as a plain path entry,
    # after the fresh one, whose .pth files (the editable install of this checkout among them) are not processed.
    pathlib.Path(fresh_site, "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)], check=True,
                   capture_output=True, text=True)  # fmt: skip

    result = subprocess.run([str(python), "-c", RENDER_BOTH_CARDS], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rendered = json.loads(result.stdout.strip().splitlines()[-1])
    installed = pathlib.Path(fresh_site) / "evotok_hf"
    assert pathlib.Path(rendered["package"]).parent == installed  # the wheel's copy, not the checkout
    assert pathlib.Path(rendered["templates"]).is_relative_to(installed)
    assert "pipeline_tag: image-to-image" in rendered["tokenizer"] and "org/evotok" in rendered["tokenizer"]
    assert "pipeline_tag: image-text-to-text" in rendered["vlm"] and "org/evotok-vlm" in rendered["vlm"]
    # the lmms-eval task the README points to ships in the wheel, beside the entry point lmms-eval reads
    tasks = installed / "integrations" / "lmms_eval" / "tasks"
    assert sorted(p.name for p in tasks.iterdir() if p.is_file()) == ["evotok_shapes_vqa.yaml", "utils.py"]
    entry_points = next(installed.parent.glob("evotok_hf-*.dist-info")) / "entry_points.txt"
    assert "evotok = evotok_hf.integrations.lmms_eval.manifest:model_manifest" in entry_points.read_text()
