import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from evotok_hf import EvoTokConfig, EvoTokModel  # noqa: E402
from vlm_helpers import T2I_CORPUS, bpe_tokenizer, tiny_generation_vlm, tiny_processor  # noqa: E402

# ----------------------------------------------------------------------------- the `integration` mark
# The tests that run the package end to end: through another process (a subprocess, torchrun, spawned ranks), a live
# Gradio server or headless Chromium, or the real SmolLM2 weights. `make test` (and so CI) runs them; `make test-fast`
# leaves them out. Most are found by a fixture they use; the others are named. A named test that a collected file no
# longer holds is an error, so a rename cannot quietly move a test out of the mark.
INTEGRATION_FIXTURES = {
    "server": "a live Gradio server (test_space.py)",
    "generation_server": "a live Gradio server (test_space.py)",
    "smollm2": "the real SmolLM2-135M weights (test_vlm_smollm2.py)",
    "tiny_run": "scripts/demo_miniature.py in a subprocess (test_miniature_pipeline.py)",
}
INTEGRATION_TESTS = {
    "test_distributed.py::test_codebooks_identical_on_two_processes": "two spawned gloo ranks",
    "test_training_loop.py::test_two_process_run_keeps_ranks_identical": "torchrun with two ranks",
    "test_generation_training.py::test_two_process_step_weighs_the_image_loss_as_one_process": "torchrun with two "
    "ranks",
    "test_training_loop.py::test_kill_then_resume_restores_everything": "a training subprocess, killed and resumed",
    "test_training_resume.py::test_resume_after_a_kill_equals_the_uninterrupted_run": "training subprocesses, killed",
    "test_hub.py::test_remote_code_loads_without_evotok_hf_and_matches_the_package": "a subprocess without evotok_hf",
    "test_remote_code_resave.py::test_resaved_remote_code_folder_loads_without_evotok_hf": "a subprocess without "
    "evotok_hf",
    "test_depth_allocation.py::test_remote_code_export_of_semantic_to_pixel_models_loads_without_evotok_hf": "a "
    "subprocess without evotok_hf",
    "test_publish_script_errors.py::test_a_refused_output_folder_is_one_line": "the publishing scripts as subprocesses",
    "test_convert_official.py::test_script_refuses_a_non_empty_output_folder_in_one_line": "the script as a subprocess",
    "test_space.py::test_push_space_dry_run_builds_a_space_that_imports_the_copied_package": "the written Space, "
    "imported in a subprocess",
    "test_scripts.py::test_demo_trains_caches_and_writes_outputs": "scripts/demo.py, three runs",
    "test_scripts.py::test_demo_figures_do_not_depend_on_the_ambient_thread_count": "scripts/demo.py, two runs",
    "test_scripts.py::test_an_interrupted_demo_does_not_block_the_next_run": "scripts/demo.py, interrupted and rerun",
    "test_scripts.py::test_training_throughput_benchmark_runs": "benchmarks/train_throughput.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if name in INTEGRATION_TESTS or INTEGRATION_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    modules = {item.path.name: item.module for item in items if getattr(item, "module", None) is not None}
    missing = [
        name for name in INTEGRATION_TESTS
        if name.split("::")[0] in modules and not hasattr(modules[name.split("::")[0]], name.split("::")[1])
    ]  # fmt: skip
    if missing:
        raise pytest.UsageError(f"tests/conftest.py INTEGRATION_TESTS names tests that do not exist: {missing}")


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


# ----------------------------------------------------------------------------- a tiny text-to-image VLM
# The image-generation test modules share these. Each module gets its own model, so settings one module changes (and
# restores) never reach another.
@pytest.fixture(scope="module")
def t2i_tokenizer():
    return bpe_tokenizer(T2I_CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def t2i_vlm(t2i_tokenizer):
    return tiny_generation_vlm(t2i_tokenizer)


@pytest.fixture(scope="module")
def t2i_processor(t2i_tokenizer):
    return tiny_processor(t2i_tokenizer, wrap_image_tokens=True)


@pytest.fixture(scope="module")
def t2i_pipe(t2i_vlm, t2i_processor):
    """`EvoTokPipeline` over `t2i_vlm`, without a progress bar."""
    from evotok_hf.pipelines import EvoTokPipeline

    pipe = EvoTokPipeline(model=t2i_vlm, processor=t2i_processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
