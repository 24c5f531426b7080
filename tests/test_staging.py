"""hub/staging.py: folders written through the staging helper get the permissions the user's umask gives any other
folder and file (not the owner-only ones of a temporary folder, nor the 0600 safetensors writes its files with)."""

import os
import stat

import pytest
import torch

from evotok_hf import EvoTokConfig, EvoTokModel
from evotok_hf.hub.staging import staged_output_dir


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def reference_modes(folder):
    """What the umask gives a folder, a file and an executable made the ordinary way: the independent reference."""
    os.mkdir(folder / "reference")
    (folder / "reference.txt").write_text("x")
    script = folder / "reference.sh"
    fd = os.open(script, os.O_CREAT | os.O_WRONLY, 0o777)
    os.close(fd)
    return mode(folder / "reference"), mode(folder / "reference.txt"), mode(script)


def write_outputs(folder):
    torch.manual_seed(0)
    EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).save_pretrained(folder)  # safetensors writes 0600
    (folder / "evaluation").mkdir(mode=0o700)
    (folder / "evaluation" / "report.json").write_text("{}")
    os.chmod(folder / "evaluation" / "report.json", 0o600)
    (folder / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(folder / "run.sh", 0o700)


@pytest.mark.parametrize("named", [True, False], ids=["output_dir", "temporary"])
def test_staged_outputs_get_the_umask_permissions(umask, named, tmp_path, monkeypatch):
    folder_mode, file_mode, executable_mode = reference_modes(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with staged_output_dir(tmp_path / "out" if named else None) as staging:
        write_outputs(staging)
    result = tmp_path / "out" if named else staging
    assert result.is_dir() and (result / "model.safetensors").is_file()
    assert mode(result) == mode(result / "evaluation") == folder_mode
    for name in ("model.safetensors", "config.json", "evaluation/report.json"):
        assert mode(result / name) == file_mode, name
    assert mode(result / "run.sh") == executable_mode
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".umask-probe" in p.name]

