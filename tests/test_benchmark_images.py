"""scripts/generate_benchmark_images.py on a tiny text-to-image VLM: the GenEval, DPG-Bench and GenAI-Bench layouts
as their evaluators read them, reproducible seeds, resume after a kill, and clear errors for bad prompt files."""

import json
import os
import pathlib
import re
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate_benchmark_images.py"
SIZE = 32  # the tiny VLM's image size
PROMPTS = ["a red bicycle on a green hill", "a cat", "a dog."]

script = runpy.run_path(str(SCRIPT), run_name="not_main")
main, batch_seed = script["main"], script["batch_seed"]


@pytest.fixture(scope="module")
def vlm_folder(t2i_vlm, t2i_processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm")
    t2i_vlm.save_pretrained(folder)
    t2i_processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    """The three benchmarks' prompt files, each with the three prompts, in their published formats."""
    root = tmp_path_factory.mktemp("prompts")
    geneval = root / "evaluation_metadata.jsonl"
    lines = [{"tag": "single_object", "include": [{"class": "bicycle", "count": 1}], "prompt": PROMPTS[0]},
             {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": PROMPTS[1]},
             {"tag": "two_object", "include": [{"class": "dog", "count": 1}], "prompt": PROMPTS[2]}]
    geneval.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dpg = root / "dpg_prompts"
    dpg.mkdir()
    for item_id, text in zip(["partiprompts7", "COCOval2014000000000139", "vrd13"], PROMPTS):
        (dpg / f"{item_id}.txt").write_text(text)  # the published files have no final newline
    genai = root / "genai_image.json"
    genai.write_text(json.dumps({f"{i:05d}": {"id": f"{i:05d}", "prompt": text, "models": {}}
                                 for i, text in enumerate(PROMPTS)}))
    return {"geneval": geneval, "dpg": dpg, "genai": genai, "geneval_lines": lines}


def _run(vlm_folder, benchmark, prompts, outdir, *extra):
    return main(["--benchmark", benchmark, "--prompts", str(prompts), "--model", str(vlm_folder), "--outdir",
                 str(outdir), "--no_progress", *extra])


def _pipeline_images(t2i_vlm, t2i_processor, prompts, count, seed_index, seed=0):
    """What the pipeline itself samples for one batch, with the script's documented seed."""
    from evotok_hf.pipelines import EvoTokPipeline

    pipe = EvoTokPipeline(model=t2i_vlm, processor=t2i_processor)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(batch_seed(seed, seed_index))
    return [np.asarray(image) for image in pipe(prompts, num_images_per_prompt=count, generator=generator).images]


def _pixels(path):
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def _no_partials(outdir):
    return not [p for p in pathlib.Path(outdir).iterdir() if p.name.endswith(".partial")]


# --- GenEval ---------------------------------------------------------------------------------------------------------

def _geneval_reader(imagedir):
    """What djghosh13/geneval evaluation/evaluate_images.py reads: folders whose names are digits, each with a
    metadata.jsonl read by one json.load, and files of samples/ matching r"\\d+\\.png"."""
    found = {}
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        images = sorted(name for name in os.listdir(os.path.join(folderpath, "samples"))
                        if re.match(r"\d+\.png", name))  # fmt: skip
        found[subfolder] = (metadata, images)
    return found


def test_geneval_layout_is_what_its_evaluator_reads(vlm_folder, prompt_files, t2i_vlm, t2i_processor, tmp_path):
    out = _run(vlm_folder, "geneval", prompt_files["geneval"], tmp_path / "geneval", "--batch_size", "2")
    assert out["written"] == 3
    found = _geneval_reader(tmp_path / "geneval")
    assert sorted(found) == ["00000", "00001", "00002"]
    for index, key in enumerate(sorted(found)):
        metadata, images = found[key]
        assert metadata == prompt_files["geneval_lines"][index]
        assert images == ["0000.png", "0001.png", "0002.png", "0003.png"]
    # The images are the pipeline's, batch by batch (prompts 0-1 seeded by index 0, prompt 2 by index 2).
    expected = (_pipeline_images(t2i_vlm, t2i_processor, PROMPTS[:2], 4, seed_index=0)
                + _pipeline_images(t2i_vlm, t2i_processor, PROMPTS[2:], 4, seed_index=2))
    saved = [_pixels(tmp_path / "geneval" / key / "samples" / f"{j:04d}.png")
             for key in sorted(found) for j in range(4)]  # fmt: skip
    assert all(image.shape == (SIZE, SIZE, 3) for image in saved)
    for a, b in zip(saved, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    settings = json.loads((tmp_path / "geneval" / "generation_settings.json").read_text())
    assert settings["benchmark"] == "geneval" and settings["images_per_prompt"] == 4 and settings["batch_size"] == 2
    assert settings["guidance_scale"] == 7.5 and settings["depth_decoder_top_k"] == 900  # the checkpoint's defaults
    assert _no_partials(tmp_path / "geneval")


# --- DPG-Bench -------------------------------------------------------------------------------------------------------

def test_dpg_layout_is_a_2x2_grid_named_by_item_id(vlm_folder, prompt_files, t2i_vlm, t2i_processor, tmp_path):
    _run(vlm_folder, "dpg", prompt_files["dpg"], tmp_path / "dpg")
    item_ids = sorted(p.stem for p in prompt_files["dpg"].glob("*.txt"))
    images = sorted(p.name for p in (tmp_path / "dpg").iterdir() if p.suffix == ".png")
    assert images == sorted(f"{item_id}.png" for item_id in item_ids)
    settings = json.loads((tmp_path / "dpg" / "generation_settings.json").read_text())
    resolution = settings["dpg_resolution"]
    assert resolution == SIZE
    # TencentQQGYLab/ELLA dpg_bench/compute_dpg_bench.py: the key is the file name up to its first dot, and the four
    # images are these crops of the grid, at --resolution.
    crops = [(0, 0, resolution, resolution), (resolution, 0, resolution * 2, resolution),
             (0, resolution, resolution, resolution * 2), (resolution, resolution, resolution * 2, resolution * 2)]
    for index, item_id in enumerate(item_ids):
        path = tmp_path / "dpg" / f"{item_id}.png"
        assert os.path.basename(path).split(".")[0] == item_id
        grid = PIL.Image.open(path)
        assert grid.size == (2 * SIZE, 2 * SIZE) and grid.format == "PNG"
        expected = _pipeline_images(t2i_vlm, t2i_processor, [PROMPTS[0 if item_id == "partiprompts7" else
                                                                     1 if item_id.startswith("COCO") else 2]],
                                    4, seed_index=index)
        for crop, image in zip(crops, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(grid.convert("RGB").crop(crop)), image)
    # The same prompts from DPG-Bench's CSV (one row per question; item_id and text repeat).
    csv_file = tmp_path / "dpg_bench.csv"
    rows = ["item_id,text,proposition_id"] + [f'{item_id},"{(prompt_files["dpg"] / f"{item_id}.txt").read_text()}",{q}'
                                              for item_id in item_ids for q in (1, 2)]
    csv_file.write_text("\n".join(rows) + "\n")
    out = _run(vlm_folder, "dpg", csv_file, tmp_path / "dpg_csv")
    assert out["prompts"] == 3
    assert sorted(p.name for p in (tmp_path / "dpg_csv").glob("*.png")) == images


# --- GenAI-Bench -----------------------------------------------------------------------------------------------------

def test_genai_layout_is_one_jpeg_per_prompt_id(vlm_folder, prompt_files, t2i_vlm, t2i_processor, tmp_path):
    outdir = tmp_path / "outputs" / "evotok-tiny"
    _run(vlm_folder, "genai", prompt_files["genai"], outdir, "--batch_size", "3")
    # linzhiqiu/t2v_metrics genai_bench/evaluate.py: for each key of genai_image.json,
    # os.path.join(output_dir, gen_model, f"{prompt_idx}.jpeg") must exist.
    dataset = json.loads(prompt_files["genai"].read_text())
    expected = _pipeline_images(t2i_vlm, t2i_processor, PROMPTS, 1, seed_index=0)
    for index, prompt_idx in enumerate(dataset):
        path = os.path.join(str(tmp_path / "outputs"), "evotok-tiny", f"{prompt_idx}.jpeg")
        assert os.path.exists(path)
        image = PIL.Image.open(path)
        assert image.format == "JPEG" and image.size == (SIZE, SIZE)
        # JPEG is lossy: close to the pipeline's image, not equal
        assert np.abs(np.asarray(image.convert("RGB"), dtype=float) - expected[index]).mean() < 20
    assert json.loads((outdir / "generation_settings.json").read_text())["jpeg_quality"] == 75


# --- seeds, settings and errors --------------------------------------------------------------------------------------

def test_same_seed_same_images_and_settings_are_recorded(vlm_folder, prompt_files, tmp_path):
    args = ("--depth_decoder_top_k", "5,none", "--guidance_scale", "3", "--seed", "7")
    first = _run(vlm_folder, "genai", prompt_files["genai"], tmp_path / "a", *args)
    _run(vlm_folder, "genai", prompt_files["genai"], tmp_path / "b", *args)
    other = tmp_path / "c"
    _run(vlm_folder, "genai", prompt_files["genai"], other, *args[:-1], "8")
    for key in ("00000", "00001", "00002"):
        assert (tmp_path / "a" / f"{key}.jpeg").read_bytes() == (tmp_path / "b" / f"{key}.jpeg").read_bytes()
    assert any((tmp_path / "a" / f"{k}.jpeg").read_bytes() != (other / f"{k}.jpeg").read_bytes()
               for k in ("00000", "00001", "00002"))
    settings = first["settings"]
    assert settings["depth_decoder_top_k"] == [5, None] and settings["guidance_scale"] == 3.0
    assert settings["seed"] == 7 and settings["prompts_sha256"]
    assert batch_seed(7, 0) == int.from_bytes(__import__("hashlib").sha256(b"7:0").digest()[:8], "little")
    # Resuming a finished folder writes nothing; other settings for it are refused.
    assert _run(vlm_folder, "genai", prompt_files["genai"], tmp_path / "a", *args)["written"] == 0
    with pytest.raises(ValueError, match=r"other settings \(guidance_scale: 3.0 -> 2.0\)"):
        _run(vlm_folder, "genai", prompt_files["genai"], tmp_path / "a", *args[:3], "2", *args[4:])


@pytest.mark.parametrize("benchmark,content,message", [
    ("geneval", '{"prompt": "a cat"}\nnot json\n', r"line 2: not a JSON object"),
    ("geneval", '{"prompt": "a cat"}\n{"tag": "counting"}\n', r"line 2: expected a JSON object with a 'prompt'"),
    ("geneval", '{"prompt": "  "}\n', r"line 1: the prompt must be a non-empty string"),
    ("geneval", "\n\n", "no prompts"),
    ("genai", '["a cat"]', "expected GenAI-Bench's genai_image.json"),
    ("genai", '{"00000": {"prompt": "a"}, ', "not JSON"),
    ("dpg", "id,prompt\n1,a cat\n", "'item_id' and 'text' columns"),
    ("dpg", "item_id,text\nx,a cat\nx,a dog\n", "item 'x' has two different texts"),
])  # fmt: skip
def test_a_bad_prompt_file_gets_a_clear_error(vlm_folder, tmp_path, benchmark, content, message):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        _run(vlm_folder, benchmark, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_other_bad_arguments(vlm_folder, prompt_files, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        _run(vlm_folder, "geneval", tmp_path / "missing.jsonl", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no <item_id>.txt prompt files"):
        _run(vlm_folder, "dpg", empty, tmp_path / "out")
    with pytest.raises(ValueError, match="is a folder"):
        _run(vlm_folder, "genai", empty, tmp_path / "out")
    with pytest.raises(ValueError, match="--n_samples applies to GenEval"):
        _run(vlm_folder, "dpg", prompt_files["dpg"], tmp_path / "out", "--n_samples", "2")
    with pytest.raises(ValueError, match="depth_decoder_top_p"):
        _run(vlm_folder, "genai", prompt_files["genai"], tmp_path / "out", "--depth_decoder_top_p", "1.5")


# --- resume after a kill ---------------------------------------------------------------------------------------------

# Runs the script with PIL's save slowed at the sixth image (the second sample of the second GenEval prompt): it writes
# half of that file, says so, and waits to be killed, as a run killed while writing would leave it.
KILLED_RUN = r"""
import pathlib, runpy, sys, time
import PIL.Image

ready, script = pathlib.Path(sys.argv[1]), sys.argv[2]
original_save = PIL.Image.Image.save
saves = []

def save(self, fp, *args, **kwargs):
    saves.append(fp)
    original_save(self, fp, *args, **kwargs)
    if len(saves) == 6:
        data = pathlib.Path(fp).read_bytes()
        pathlib.Path(fp).write_bytes(data[: len(data) // 2])
        ready.touch()
        time.sleep(600)

PIL.Image.Image.save = save
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.integration
def test_resume_after_a_kill_writes_what_an_uninterrupted_run_writes(vlm_folder, prompt_files, tmp_path):
    args = ["--benchmark", "geneval", "--prompts", str(prompt_files["geneval"]), "--model", str(vlm_folder),
            "--no_progress", "--seed", "3"]
    ready, outdir = tmp_path / "ready", tmp_path / "resumed"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(ready), str(SCRIPT), *args, "--outdir",
                                str(outdir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not ready.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended before the kill:\n{process.stdout.read().decode()}")
            assert time.monotonic() < deadline, "the run did not reach the second prompt"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # What an evaluator sees now: the first prompt, complete; the second only under a hidden name, half written.
    assert sorted(_geneval_reader(outdir)) == ["00000"]
    assert len(_geneval_reader(outdir)["00000"][1]) == 4
    assert (outdir / ".00001.partial" / "samples" / "0000.png").is_file()

    out = main([*args, "--outdir", str(outdir)])
    assert out["written"] == 2 and _no_partials(outdir)
    main([*args, "--outdir", str(tmp_path / "uninterrupted")])
    found = _geneval_reader(outdir)
    assert sorted(found) == ["00000", "00001", "00002"]
    for key in found:
        for j in range(4):
            name = pathlib.Path(key) / "samples" / f"{j:04d}.png"
            np.testing.assert_array_equal(_pixels(outdir / name), _pixels(tmp_path / "uninterrupted" / name))
