"""benchmarks/encode_precision.py: its mixed-precision encode is the model's encode, and the agreement it reports is
the share of equal codes counted independently; benchmarks/run_gpu.sh runs every benchmark it names."""

import json
import os
import pathlib
import runpy
import subprocess
import sys

import pytest
import torch

from evotok_hf import EvoTokConfig, EvoTokModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = runpy.run_path(str(ROOT / "benchmarks" / "encode_precision.py"), run_name="not_main")


def _tiny_tokenizer(folder):
    torch.manual_seed(0)
    model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny", codebook_size=64)).eval()
    model.save_pretrained(folder)
    from evotok_hf import EvoTokImageProcessor

    EvoTokImageProcessor(size={"height": model.config.image_size, "width": model.config.image_size}).save_pretrained(folder)
    return model


def test_mixed_precision_encode_in_fp32_is_the_models_encode():
    torch.manual_seed(0)
    model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).eval()
    pixels = torch.rand(3, 3, model.config.image_size, model.config.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(BENCH["mixed_precision_encode"](model, pixels), model.encode(pixels).codes)


def test_benchmark_reports_agreement_counted_independently(tmp_path):
    model = _tiny_tokenizer(tmp_path / "tok")
    result = BENCH["main"](["--tokenizer", str(tmp_path / "tok"), "--images", "5", "--repeats", "1",
                            "--last-layers", "1", "--json", str(tmp_path / "r.json")])  # fmt: skip
    modes = result["modes"]
    assert set(modes) == {"fp32", "bf16-load", "bf16-load+fp32-task-layer", "bf16-load+fp32-last-1", "bf16-autocast"}
    assert modes["fp32"]["agreement"]["per_depth"] == [1.0] * model.config.semantic_depth
    # the bf16 load's agreement, counted here with loops over a separately loaded bf16 model
    pixels = BENCH["shapes_pixel_values"](str(tmp_path / "tok"), 5)
    low = EvoTokModel.from_pretrained(tmp_path / "tok", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        reference, codes = model.encode(pixels).codes, low.encode(pixels).codes
    positions = reference.shape[0] * reference.shape[1] * reference.shape[2]
    for depth in range(model.config.semantic_depth):
        equal = sum(int(reference[b, i, j, depth] == codes[b, i, j, depth]) for b in range(reference.shape[0])
                    for i in range(reference.shape[1]) for j in range(reference.shape[2]))  # fmt: skip
        assert modes["bf16-load"]["agreement"]["per_depth"][depth] == equal / positions
    prefix = modes["bf16-load"]["agreement"]["prefix"]
    assert all(a >= b for a, b in zip(prefix, prefix[1:]))
    assert (tmp_path / "r.json").is_file()


def test_bf16_copy_keeps_codebooks_fp32_and_the_chosen_layers():
    torch.manual_seed(0)
    model = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).eval()
    low = BENCH["bf16_copy"](model, fp32_last_layers=1)
    assert low.quantizer.codebook.dtype == torch.float32
    layers = low.encoder.encoder.layers[: low.config.num_encoder_layers_used]
    assert [layer.mlp.fc1.weight.dtype for layer in layers] == [torch.bfloat16] * (len(layers) - 1) + [torch.float32]
    assert low.encode_task_layer[0].weight.dtype == torch.float32
    assert low.encoder.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.encoder.embeddings.patch_embedding.weight.dtype == torch.float32  # the original is untouched


@pytest.mark.integration
def test_gpu_script_runs_every_benchmark_in_smoke_mode(tmp_path):
    """benchmarks/run_gpu.sh on a CPU at tiny sizes: it runs the three benchmarks and writes their JSON (the real run
    needs a GPU, which no test machine has)."""
    env = {**os.environ, "DEVICE": "cpu", "SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), str(tmp_path)], check=True, env=env)
    quantizer = json.loads((tmp_path / "quantizer.json").read_text())
    search = next(k for k in quantizer if k.startswith("a_chunkauto") and k.endswith("_vs_b"))
    assert quantizer[search] == {"vectors_differing": 0}
    encode = json.loads((tmp_path / "encode_decode.json").read_text())
    timed = {"fp32", "bf16-load", "decode fp32", "decode bf16-load", "semantic features bf16-load"}
    assert timed <= set(encode["paper_size_timing"])
    generation = json.loads((tmp_path / "generation.json").read_text())
    assert generation["dtype"] == "bfloat16" and "tiny" in generation["sizes"]
    assert set(generation["sizes"]["tiny"]["images_per_second_by_batch"]) == {"1", "2"}
    assert "c" in generation["sizes"]["tiny"]["greedy"]  # the static cache + compiled step variant ran
