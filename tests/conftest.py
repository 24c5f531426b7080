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
