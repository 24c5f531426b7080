"""scripts/push_to_hub.py and scripts/push_space.py run from a shell: bad input ends them with a one-line message
naming the flag, not a traceback around it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, argv",
    [
        ("push_to_hub.py", ["--model-dir", "{model}", "--repo-id", "org/evotok", "--license", "mit", "--dry-run"]),
        ("push_space.py", ["--repo-id", "org/evotok-demo", "--tokenizer", "org/evotok", "--dry-run"]),
    ],
)
def test_a_refused_output_folder_is_one_line(script, argv, tmp_path):
    (tmp_path / "model").mkdir()
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    argv = [arg.replace("{model}", str(tmp_path / "model")) for arg in argv] + ["--output-dir", str(output)]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"{script}: error: --output-dir {str(output)!r} exists and is not an empty folder; nothing is overwritten."
    ]
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
