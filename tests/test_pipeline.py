"""EvoTokPipeline: diffusers text-to-image over a tiny EvoTok VLM with a generation head (conftest's `t2i_*`)."""

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import get_device
from transformers import GenerationConfig, LogitsProcessor
from vlm_helpers import T2I_PROMPTS, generate_codes

from evotok_hf import EvoTokForConditionalGeneration, EvoTokProcessor
from evotok_hf.pipelines import EvoTokPipeline, EvoTokPipelineOutput


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def run(pipe, prompts=T2I_PROMPTS, seed=0, **kwargs):
    return pipe(prompts, generator=seeded(seed), output_type="pt", **kwargs).images


# ----------------------------------------------------------------------------- outputs
def test_output_types_shapes_and_ranges(t2i_pipe, t2i_vlm):
    size = t2i_vlm.config.vision_config.image_size
    pt = t2i_pipe(T2I_PROMPTS, generator=seeded(), output_type="pt").images
    array = t2i_pipe(T2I_PROMPTS, generator=seeded(), output_type="np").images
    pil = t2i_pipe(T2I_PROMPTS, generator=seeded()).images  # "pil" by default
    assert pt.shape == (2, 3, size, size) and pt.dtype == torch.float32
    assert 0.0 <= pt.min() and pt.max() <= 1.0 and pt.std() > 0
    assert isinstance(array, np.ndarray) and array.shape == (2, size, size, 3) and array.dtype == np.float32
    np.testing.assert_array_equal(array, pt.permute(0, 2, 3, 1).numpy())  # same seed, same images
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.mode == "RGB" and im.size == (size, size) for im in pil)
    np.testing.assert_array_equal(np.asarray(pil[0]), np.rint(array[0] * 255).astype(np.uint8))
    output = t2i_pipe("a cat", generator=seeded(), output_type="np")
    assert isinstance(output, EvoTokPipelineOutput) and output.images.shape == (1, size, size, 3)
    as_tuple = t2i_pipe("a cat", generator=seeded(), output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and np.array_equal(as_tuple[0], output.images)


def test_equals_model_generate_and_decode(t2i_pipe, t2i_vlm, t2i_processor):
    settings = dict(guidance_scale=3.0, depth_temperature=[0.7, 1.3], depth_top_k=20, depth_top_p=0.9)
    images = run(t2i_pipe, seed=3, num_images_per_prompt=2, **settings)
    codes = generate_codes(t2i_vlm, t2i_processor, do_sample=True, num_return_sequences=2, generator=seeded(3),
                           **settings)  # fmt: skip
    with torch.no_grad():
        expected = (t2i_vlm.decode_image_tokens(codes) * 0.5 + 0.5).clamp(0, 1)  # image_mean = image_std = 0.5
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_defaults_sample_with_guidance_and_seeds_reproduce(t2i_pipe):
    torch.testing.assert_close(run(t2i_pipe, seed=1), run(t2i_pipe, seed=1), rtol=0, atol=0)
    assert not torch.equal(run(t2i_pipe, seed=1), run(t2i_pipe, seed=2))
    # the defaults are the checkpoint's: guidance 7.5, sampling (not greedy), top-k 900 / top-p 0.96
    explicit = run(t2i_pipe, seed=1, guidance_scale=7.5, do_sample=True, depth_top_k=900, depth_top_p=0.96)
    torch.testing.assert_close(run(t2i_pipe, seed=1), explicit)
    assert not torch.equal(run(t2i_pipe, seed=1), run(t2i_pipe, seed=1, guidance_scale=1.0))


def test_settings_by_generation_config_and_depth_decoder_arguments(t2i_pipe, t2i_vlm):
    """The checkpoint's settings can be replaced by a GenerationConfig or by `generate`'s own arguments, today's
    `depth_decoder_*` names and those of earlier releases alike; a logits processor reaches the depth head."""
    old = dict(guidance_scale=3.0, depth_temperature=[0.7, 1.3], depth_top_k=20, depth_top_p=0.9)
    new = dict(guidance_scale=3.0, depth_decoder_temperature=[0.7, 1.3], depth_decoder_top_k=20,
               depth_decoder_top_p=0.9)  # fmt: skip
    reference = run(t2i_pipe, seed=3, **old)
    torch.testing.assert_close(run(t2i_pipe, seed=3, **new), reference, rtol=0, atol=0)
    by_config = run(t2i_pipe, seed=3, generation_config=GenerationConfig(**new))
    torch.testing.assert_close(by_config, reference, rtol=0, atol=0)
    assert not torch.equal(run(t2i_pipe, seed=3, **dict(new, depth_decoder_top_k=1)), reference)

    class ForceCode(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return torch.where(torch.arange(scores.shape[-1]) == 5, 0.0, -float("inf")).expand_as(scores)

    forced = run(t2i_pipe, logits_processor=[ForceCode()])
    vision = t2i_vlm.config.vision_config
    codes = torch.full((1, vision.grid_size, vision.grid_size, vision.pixel_depth), 5)
    with torch.no_grad():
        expected = (t2i_vlm.decode_image_tokens(codes) * 0.5 + 0.5).clamp(0, 1)
    torch.testing.assert_close(forced, expected.expand_as(forced), rtol=0, atol=1e-5)  # decoded one batch vs two


def test_no_cache_gives_the_same_images(t2i_pipe):
    torch.testing.assert_close(run(t2i_pipe, do_sample=False), run(t2i_pipe, do_sample=False, use_cache=False),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_progress_bar_counts_image_positions(t2i_vlm, t2i_processor):
    pipe = EvoTokPipeline(model=t2i_vlm, processor=t2i_processor)
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, disable=False, ascii=True)
    pipe("a cat", generator=seeded(), output_type="np")
    positions = t2i_vlm.config.vision_config.grid_size ** 2
    assert f"{positions}/{positions}" in stream.getvalue() and "100%" in stream.getvalue()
    pipe.set_progress_bar_config(file=stream, disable=True)
    before = stream.getvalue()
    pipe("a cat", generator=seeded(), output_type="np")
    assert stream.getvalue() == before


def test_num_images_per_prompt_groups_by_prompt(t2i_pipe):
    images = run(t2i_pipe, num_images_per_prompt=3, do_sample=False)
    assert images.shape[0] == 6
    alone = [run(t2i_pipe, prompts=[p], do_sample=False)[0] for p in T2I_PROMPTS]
    for index in range(6):  # greedy: the images of one prompt are identical and equal that prompt's alone
        torch.testing.assert_close(images[index], alone[index // 3], rtol=0, atol=1e-5)
    sampled = run(t2i_pipe, num_images_per_prompt=2)
    assert not torch.equal(sampled[0], sampled[1])


def test_negative_prompt_changes_the_output(t2i_pipe):
    default = run(t2i_pipe, do_sample=False)
    assert torch.equal(default, run(t2i_pipe, do_sample=False, negative_prompt=" "))  # the default negative prompt
    changed = run(t2i_pipe, do_sample=False, negative_prompt="a red bicycle on a green hill")
    assert not torch.equal(default, changed)
    per_prompt = run(t2i_pipe, do_sample=False, negative_prompt=["a red bicycle on a green hill", " "])
    torch.testing.assert_close(per_prompt[0], changed[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(per_prompt[1], default[1], rtol=0, atol=1e-5)
    # without guidance the negative prompt is unused
    torch.testing.assert_close(run(t2i_pipe, do_sample=False, guidance_scale=1.0),
                               run(t2i_pipe, do_sample=False, guidance_scale=1.0, negative_prompt="a cat"))  # fmt: skip


# ----------------------------------------------------------------------------- loading
def test_save_load_round_trip_with_model_index(t2i_pipe, tmp_path):
    t2i_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "EvoTokPipeline"
    assert index["model"] == ["evotok_hf.modeling.modeling_evotok_vlm", "EvoTokForConditionalGeneration"]
    assert index["processor"] == ["evotok_hf.processing.processing_evotok", "EvoTokProcessor"]
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "processor").is_dir()
    loaded = EvoTokPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.model, EvoTokForConditionalGeneration) and isinstance(loaded.processor, EvoTokProcessor)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, seed=5), run(t2i_pipe, seed=5), rtol=0, atol=0)
    half = EvoTokPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    assert half.model.vision_tower.quantizer.codebook.dtype == torch.float32  # codebooks stay fp32


def test_plain_vlm_folder_without_model_index(t2i_pipe, t2i_vlm, t2i_processor, tmp_path):
    t2i_vlm.save_pretrained(tmp_path)
    t2i_processor.save_pretrained(tmp_path)
    assert not (tmp_path / "model_index.json").exists()
    with pytest.raises(EnvironmentError):  # diffusers' own loader needs model_index.json
        DiffusionPipeline.from_pretrained(tmp_path)
    loaded = EvoTokPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded.model, EvoTokForConditionalGeneration) and not loaded.model.training
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, seed=5), run(t2i_pipe, seed=5), rtol=0, atol=0)
    # dtype / device_map go to the model; torch_dtype (the diffusers spelling) is accepted too
    half = EvoTokPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert half.model.dtype == torch.bfloat16 and half.model.device.type == "cpu"
    assert EvoTokPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).model.dtype == torch.bfloat16
    assert half.model.vision_tower.quantizer.codebook.dtype == torch.float32
    assert EvoTokPipeline.from_pretrained(tmp_path, model=t2i_vlm).model is t2i_vlm  # a given component is used as is


def test_hub_repositories_with_and_without_model_index(t2i_pipe, t2i_vlm, t2i_processor, tmp_path):
    """Hub ids resolve through the Hugging Face cache (offline here: two repositories written straight into it)."""
    commit = "0" * 40

    def cached_repo(name):
        repo = tmp_path / f"models--org--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    t2i_pipe.save_pretrained(cached_repo("evotok-pipeline"))
    t2i_vlm.save_pretrained(cached_repo("evotok-vlm"))
    t2i_processor.save_pretrained(tmp_path / "models--org--evotok-vlm" / "snapshots" / commit)
    for repo_id in ("org/evotok-pipeline", "org/evotok-vlm"):
        loaded = EvoTokPipeline.from_pretrained(repo_id, cache_dir=str(tmp_path), local_files_only=True)
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(run(loaded, seed=6), run(t2i_pipe, seed=6), rtol=0, atol=0)


# ----------------------------------------------------------------------------- offload
def test_model_cpu_offload(t2i_vlm, t2i_processor):
    pipe = EvoTokPipeline(model=t2i_vlm, processor=t2i_processor)
    pipe.set_progress_bar_config(disable=True)
    assert EvoTokPipeline.model_cpu_offload_seq == "model"
    reference = run(pipe, seed=4)
    try:
        if get_device() == "cpu":
            with pytest.raises(RuntimeError, match="requires accelerator"):
                pipe.enable_model_cpu_offload()
        else:
            pipe.enable_model_cpu_offload()
            images = pipe(T2I_PROMPTS, generator=torch.Generator(get_device()).manual_seed(4), output_type="pt").images
            assert images.shape == reference.shape and t2i_vlm.device.type == "cpu"  # offloaded again afterwards
        # the hook mechanics (onload before generation, offload after) on the CPU as the "accelerator"
        pipe.enable_model_cpu_offload(device="cpu")
        assert hasattr(t2i_vlm, "_hf_hook") and pipe._execution_device.type == "cpu"
        torch.testing.assert_close(run(pipe, seed=4), reference, rtol=0, atol=0)
    finally:
        pipe.remove_all_hooks()
    assert not hasattr(t2i_vlm, "_hf_hook")


# ----------------------------------------------------------------------------- errors
def test_input_errors(t2i_pipe):
    with pytest.raises(ValueError, match="non-empty list"):
        t2i_pipe([])
    with pytest.raises(ValueError, match="non-empty list"):
        t2i_pipe(["a cat", 3])
    with pytest.raises(ValueError, match="output_type"):
        t2i_pipe("a cat", output_type="latent")
    with pytest.raises(ValueError, match="1 entries for 2 prompts"):
        t2i_pipe(T2I_PROMPTS, negative_prompt=["x"])
    with pytest.raises(ValueError, match="negative_prompt"):
        t2i_pipe("a cat", negative_prompt=3)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        t2i_pipe("a cat", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="one torch.Generator"):
        t2i_pipe("a cat", generator=[seeded(), seeded()])
    with pytest.raises(ValueError, match="guidance_scale"):
        t2i_pipe("a cat", guidance_scale="high")
    with pytest.raises(ValueError, match="depth_top_k"):  # the model's own checks still apply
        t2i_pipe("a cat", depth_top_k=[1, 2, 3])
    with pytest.raises(ValueError, match=r"unknown arguments \['temperature'\]"):  # the depth head's: depth_decoder_
        t2i_pipe("a cat", temperature=0.5)
    if torch.cuda.is_available():  # a generator must live where the model runs (here the CPU)
        with pytest.raises(ValueError, match="generator.*is on cuda"):
            t2i_pipe("a cat", generator=torch.Generator("cuda"))
