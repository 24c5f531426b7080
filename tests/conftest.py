import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from evotok_hf import EvoTokConfig, EvoTokModel  # noqa: E402



@pytest.fixture
def tiny_config():
    return EvoTokConfig.from_preset("evotok-tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return EvoTokModel(tiny_config).eval()


@pytest.fixture
def tiny_images(tiny_config):
    g = torch.Generator().manual_seed(1)
    size = tiny_config.image_size
    return torch.rand(3, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state (mixed precision, device): a Trainer run with bf16 (TRL's default) would
    make a later Accelerator with other settings refuse to start. Each test starts from a clean state, as a fresh
    process does."""
    yield
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def recorded_hub_uploads(monkeypatch):
    """`HfApi.create_repo` / `upload_folder` replaced by recorders (no network): returns the list of
    `(method, args, kwargs)` calls."""
    from huggingface_hub import HfApi

    calls = []

    def record(name, returns):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return returns(args, kwargs)

        return method

    monkeypatch.setattr(HfApi, "create_repo", record("create_repo", lambda a, k: f"https://huggingface.co/{a[0]}"))
    monkeypatch.setattr(HfApi, "upload_folder", record("upload_folder", lambda a, k: "commit-url"))
    return calls
