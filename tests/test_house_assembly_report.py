"""`from_components` says in one line what it initialised, instead of transformers' load report listing every
parameter of the new parts on every assembly; a component key that does not fit still reaches the user."""

import logging

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from vlm_helpers import bpe_tokenizer

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokModel

NEW_PARTS = ("model.multi_modal_projector", "model.generation_projector", "depth_head")
DEPTH_HEAD = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}


@pytest.fixture
def components():
    torch.manual_seed(0)
    vision = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny"))
    text_tokenizer = bpe_tokenizer(["a red bicycle on a green hill"])
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(text_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ))  # fmt: skip
    return vision, llm, text_tokenizer


@pytest.fixture
def load_logs(caplog, monkeypatch):
    """Every record of the assembly at INFO, transformers' own included: its loggers do not propagate by default, and
    the test session sets its verbosity to errors (conftest)."""
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    caplog.set_level(logging.INFO, logger="transformers")
    caplog.set_level(logging.INFO)
    return caplog


def test_an_assembly_logs_one_line_instead_of_the_load_report(components, load_logs):
    vision, llm, text_tokenizer = components
    model, _ = EvoTokForConditionalGeneration.from_components(
        vision, llm, text_tokenizer=text_tokenizer, has_generation_head=True, depth_head_config=DEPTH_HEAD
    )
    messages = [record.getMessage() for record in load_logs.records]
    assert not [m for m in messages if "LOAD REPORT" in m or "MISSING" in m], messages
    summaries = [m for m in messages if m.startswith("from_components:")]
    assert len(summaries) == 1, messages
    modules = dict(model.named_modules())
    counts = {part: sum(p.numel() for p in modules[part].parameters()) for part in NEW_PARTS}
    assert f"initialised {sum(counts.values()):,} new parameters" in summaries[0]
    for part, count in counts.items():
        assert f"{part} {count:,}" in summaries[0]


def test_a_component_key_that_does_not_fit_is_reported_and_refused(components, load_logs):
    vision, llm, text_tokenizer = components
    llm.model.register_parameter("stray", nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match=r"model\.language_model\.stray does not fit the VLM"):
        EvoTokForConditionalGeneration.from_components(vision, llm, text_tokenizer=text_tokenizer)
    reports = [r.getMessage() for r in load_logs.records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "stray" in reports[0]
    assert not any(part in reports[0] for part in NEW_PARTS)  # only what is wrong, not the new parts
