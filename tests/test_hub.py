"""Hub publishing: rendered model cards (metadata, licence rules, model-index, executed usage snippets, for a
tokenizer, an understanding VLM and a generation-only VLM), scripts/push_to_hub.py (dry run offline, upload arguments)
and the flat remote-code export, loaded in a clean process where evotok_hf cannot be imported."""

import hashlib
import json
import pathlib
import runpy
import socket
import subprocess
import sys
import tempfile

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModel, PreTrainedTokenizerFast, Qwen2Config
from vlm_helpers import BLOCK_EVOTOK_HF, bpe_tokenizer, fresh_user_env, tiny_generation_vlm, tiny_processor

from evotok_hf import (
    EvoTokConfig,
    EvoTokForConditionalGeneration,
    EvoTokImageProcessor,
    EvoTokModel,
    EvoTokProcessor,
    EvoTokVLMConfig,
)
from evotok_hf.hub.model_card import TOKENIZER_PIPELINE_TAG, render_tokenizer_card, render_vlm_card
from evotok_hf.hub.remote_code import RemoteCodeExportError, check_flat_imports, exportable_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER_LABEL = "reported in the paper (not measured on these weights)"
REPO_TOK = "evotok-test/evotok-tiny"
REPO_VLM = "evotok-test/evotok-tiny-vlm"
REPO_GEN = "evotok-test/evotok-tiny-t2i"
PROMPT = "user <image> describe the image please"
T2I_PROMPT = "a red bicycle on a green hill"  # the prompt of the card's text-to-image snippets


def load_main(path):
    return runpy.run_path(str(ROOT / path), run_name="not_main")["main"]


def fixed_image(seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))


def files_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pathlib.Path(folder).iterdir())}


def python_blocks(card_text):
    return [block.split("```", 1)[0] for block in card_text.split("```python\n")[1:]]


def card_snippet_image(folder):
    """The image the card's text-to-image snippets write, computed with the package's classes on `folder`."""
    model = EvoTokForConditionalGeneration.from_pretrained(folder).eval()
    processor = EvoTokProcessor.from_pretrained(folder)
    inputs = processor(text=T2I_PROMPT, generation_mode="image", return_tensors="pt")
    with torch.no_grad():
        codes = model.generate(**inputs, generation_mode="image", guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
        return codes, processor.image_processor.postprocess(model.decode_image_tokens(codes))[0]


# ----------------------------------------------------------------------------- tiny saved models
@pytest.fixture(scope="module")
def source_dirs(tmp_path_factory):
    """A saved tiny tokenizer, a saved tiny VLM and a saved tiny generation-only VLM (each with its processor), as a
    user's checkpoints."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    config = EvoTokConfig.from_preset("evotok-tiny")
    size = {"height": config.image_size, "width": config.image_size}
    EvoTokModel(config).save_pretrained(root / "tok")
    EvoTokImageProcessor(size=size).save_pretrained(root / "tok")

    special = ["<pad>", "<unk>", "<image>", "<boi>", "<eoi>", "<eos>"]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [PROMPT, "assistant a cat on a red mat"]
    backend.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=special))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        additional_special_tokens=["<image>", "<boi>", "<eoi>"],
    )  # fmt: skip
    text_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vlm_config = EvoTokVLMConfig(
        vision_config=config.to_dict(), text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    vlm = EvoTokForConditionalGeneration(vlm_config)
    vlm.generation_config.suppress_tokens = [vlm_config.image_token_id]  # as from_components does
    vlm.save_pretrained(root / "vlm")
    EvoTokProcessor(
        image_processor=EvoTokImageProcessor(size=size, resize_mode="squash"), tokenizer=tokenizer,
        num_image_tokens=config.grid_size**2,
    ).save_pretrained(root / "vlm")  # fmt: skip

    text_tokenizer = bpe_tokenizer(["system user assistant You are a helpful assistant.", T2I_PROMPT], vocab_size=300)
    tiny_generation_vlm(text_tokenizer).save_pretrained(root / "gen")
    tiny_processor(text_tokenizer, wrap_image_tokens=True).save_pretrained(root / "gen")
    return {"tok": root / "tok", "vlm": root / "vlm", "gen": root / "gen"}


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory):
    """A small ReconstructionReport JSON (as report.save_json writes it: depth keys become strings; the data it was
    measured on recorded as scripts/evaluate_reconstruction.py records it)."""
    path = tmp_path_factory.mktemp("eval") / "report.json"
    report = {
        "num_images": 15, "pixel_depths": [1, 2], "semantic_depths": [1, 2, 3, 4],
        "psnr": {"1": 17.25, "2": 19.5}, "ssim": {"1": 0.41, "2": 0.52}, "rfid": {"1": 80.0, "2": 61.5},
        "lpips": {}, "semantic_cosine": {"1": 0.2}, "codebook_usage": [0.5] * 4, "perplexity": [9.0] * 4,
        "feature_network": "efficientnet-lite0", "teacher": "efficientnet-lite0", "dataset": "bundled",
        "split": "validation", "seconds": 1.0,
    }  # fmt: skip
    path.write_text(json.dumps(report))
    return path


@pytest.fixture(scope="module")
def published(source_dirs, eval_json, tmp_path_factory):
    """push_to_hub --dry-run of the three models, with and without --remote-code."""
    main = load_main("scripts/push_to_hub.py")
    out = tmp_path_factory.mktemp("published")
    folders = {}
    for kind, repo_id in (("tok", REPO_TOK), ("vlm", REPO_VLM), ("gen", REPO_GEN)):
        for remote in (False, True):
            name = f"{kind}-remote" if remote else kind
            argv = ["--model-dir", str(source_dirs[kind]), "--repo-id", repo_id, "--license", "apache-2.0",
                    "--eval-json", str(eval_json), "--eval-dataset", "bundled-photos", "--eval-split", "test",
                    "--dry-run", "--output-dir", str(out / name)]  # fmt: skip
            folders[name] = pathlib.Path(main(argv + (["--remote-code"] if remote else []))["folder"])
    return folders


@pytest.fixture
def image_cwd(tmp_path, monkeypatch):
    """A working directory holding the `image.jpg` the card snippets open."""
    fixed_image().save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- (a) card metadata and licence rules
def test_tokenizer_card_metadata_model_index_and_labels(published):
    card = ModelCard.load(published["tok"] / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.pipeline_tag == TOKENIZER_PIPELINE_TAG == "image-to-image"
    assert "evotok" in data.tags and "custom_code" not in data.tags
    assert data.model_name == "evotok-tiny"
    results = {(r.metric_type, r.metric_config): r for r in data.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == {
        ("psnr", "pixel_depth_1"): 17.25, ("psnr", "pixel_depth_2"): 19.5,
        ("ssim", "pixel_depth_1"): 0.41, ("ssim", "pixel_depth_2"): 0.52,
        ("rfid-efficientnet-lite0", "pixel_depth_1"): 80.0, ("rfid-efficientnet-lite0", "pixel_depth_2"): 61.5,
    }  # fmt: skip
    assert all(r.dataset_type == "bundled-photos" and r.dataset_split == "test" for r in data.eval_results)
    assert "not comparable with Inception rFID" in results[("rfid-efficientnet-lite0", "pixel_depth_1")].metric_name
    text = card.text
    assert f"Results {PAPER_LABEL}" in text and "| Table 1 | ImageNet-1K val, 256 px | rFID | 0.43 |" in text
    assert "Evaluation (measured on these weights)" in text and "| 2 | 19.5000 | 0.5200 | 61.5000 |" in text
    assert "import evotok_hf" in text and "trust_remote_code" in text  # says how the classes get loaded
    assert "releases these weights under the licence `apache-2.0`" in text

    remote = ModelCard.load(published["tok-remote"] / "README.md")
    assert "custom_code" in remote.data.tags and "import evotok_hf" not in remote.text


def test_vlm_card_metadata_and_pipeline_tags(published, source_dirs):
    card = ModelCard.load(published["vlm"] / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "apache-2.0" and len(card.data.eval_results) == 6
    assert f"Results {PAPER_LABEL}" in card.text
    for row in ("| Table 2 (understanding) | MME | 1895.1 |", "| Table 3 (generation) | GenEval (overall) | 0.75 |"):
        assert row in card.text
    generation_config = EvoTokVLMConfig.from_pretrained(source_dirs["vlm"])
    generation_config.has_generation_head = True
    generating = render_vlm_card(generation_config, repo_id=REPO_VLM, license="mit")
    assert generating.data.pipeline_tag == "any-to-any" and "image-generation head" in generating.text
    blocks = python_blocks(generating.text)  # both heads: understanding (2) and text to image (2)
    assert len(blocks) == 4 and sum('generation_mode="image"' in b for b in blocks) == 1
    assert "EvoTokPipeline.from_pretrained" in blocks[3]

    generation_only = ModelCard.load(published["gen"] / "README.md")
    assert generation_only.data.pipeline_tag == "any-to-any" and "text-to-image" in generation_only.data.tags
    assert "image-generation head" in generation_only.text and "Describe this image" not in generation_only.text
    remote = ModelCard.load(published["gen-remote"] / "README.md")
    assert len(python_blocks(remote.text)) == 1  # the diffusers pipeline needs evotok_hf: named, not a snippet
    assert "EvoTokPipeline.from_pretrained" in remote.text


@pytest.mark.parametrize("render", [render_tokenizer_card, render_vlm_card])
def test_official_weights_state_no_licence(render, tmp_path):
    config = EvoTokConfig.from_preset("evotok-tiny") if render is render_tokenizer_card else EvoTokVLMConfig()
    for license in (None, "other"):
        card = render(config, repo_id="org/evotok", official=True, license=license)
        card.save(tmp_path / "README.md")
        loaded = ModelCard.load(tmp_path / "README.md")
        assert loaded.data.license == "other"
        assert "No licence is stated for these weights" in loaded.text and "no licence" in loaded.text
        assert "converted from the checkpoints of the EvoTok authors" in loaded.text
        assert loaded.data.base_model  # the paper's base models
    with pytest.raises(ValueError, match="no licence file"):
        render(config, repo_id="org/evotok", official=True, license="apache-2.0")


def test_card_cites_the_data_the_report_records_unless_overridden(eval_json):
    config = EvoTokConfig.from_preset("evotok-tiny")
    card = render_tokenizer_card(config, repo_id="org/x", license="mit", eval_results_path=eval_json)
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in card.data.eval_results} == {
        ("bundled", "bundled", "validation")
    }
    assert "15 images of `bundled` (validation split)" in card.text
    card = render_tokenizer_card(config, repo_id="org/x", license="mit", eval_results_path=eval_json,
                                 eval_dataset="org/photos", eval_split="test")  # fmt: skip
    assert {(r.dataset_name, r.dataset_split) for r in card.data.eval_results} == {("org/photos", "test")}


def test_card_input_validation(eval_json, tmp_path):
    config = EvoTokConfig.from_preset("evotok-tiny")
    with pytest.raises(ValueError, match="license is required"):
        render_tokenizer_card(config, repo_id="org/x")
    with pytest.raises(ValueError, match="Hub licence identifier"):
        render_tokenizer_card(config, repo_id="org/x", license="Apache 2.0")
    with pytest.raises(ValueError, match="org/name"):
        render_tokenizer_card(config, repo_id="just-a-name", license="mit")
    with pytest.raises(ValueError, match="not a valid Hub repository id"):
        render_tokenizer_card(config, repo_id="org/bad--name", license="mit")
    with pytest.raises(ValueError, match="model_type 'evotok_vlm'"):
        render_vlm_card(config, repo_id="org/x", license="mit")
    with pytest.raises(ValueError, match="base_model"):
        render_tokenizer_card(config, repo_id="org/x", license="mit", base_model="a/b/c")
    unnamed = json.loads(eval_json.read_text())
    del unnamed["dataset"], unnamed["split"]  # a report from before reports recorded their data
    (tmp_path / "unnamed.json").write_text(json.dumps(unnamed))
    with pytest.raises(ValueError, match="eval_dataset"):
        render_tokenizer_card(config, repo_id="org/x", license="mit", eval_results_path=tmp_path / "unnamed.json")
    card = render_tokenizer_card(config, repo_id="org/x", license="mit", eval_results_path=tmp_path / "unnamed.json",
                                 eval_dataset="my/photos")  # fmt: skip
    assert {(r.dataset_name, r.dataset_split) for r in card.data.eval_results} == {("my/photos", None)}
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 1.0}))
    with pytest.raises(ValueError, match="not a reconstruction report"):
        render_tokenizer_card(config, repo_id="org/x", license="mit", eval_results_path=tmp_path / "other.json",
                              eval_dataset="d")  # fmt: skip
    with pytest.raises(ValueError, match="not a file"):
        render_tokenizer_card(config, repo_id="org/x", license="mit", eval_results_path=tmp_path / "missing.json")


def test_pipeline_tag_matches_what_the_feature_extraction_pipeline_returns(source_dirs):
    """transformers' image-feature-extraction pipeline returns model(**inputs)[0]; the card may only claim that tag
    when this is the semantic features (today it is the reconstruction, hence image-to-image)."""
    from transformers import pipeline

    pipe = pipeline("image-feature-extraction", model=str(source_dirs["tok"]))
    features = pipe(fixed_image(), return_tensors=True)
    model, processor = pipe.model, pipe.image_processor
    with torch.no_grad():
        codes = model.encode(processor(fixed_image(), return_tensors="pt").pixel_values).codes
        semantic = model.get_semantic_features(codes)
    returns_semantic = features.shape == semantic.shape and torch.allclose(features, semantic)
    assert returns_semantic == (TOKENIZER_PIPELINE_TAG == "image-feature-extraction")


# ----------------------------------------------------------------------------- (b) the card snippets run
@pytest.mark.parametrize("name, repo_id", [("tok", REPO_TOK), ("vlm", REPO_VLM), ("gen", REPO_GEN)])
def test_card_usage_snippets_run(published, name, repo_id, image_cwd):
    folder = published[name]
    blocks = python_blocks((folder / "README.md").read_text())
    assert len(blocks) == (1 if name == "tok" else 2)
    generated = []
    for block in blocks:
        assert repo_id in block
        exec(compile(block.replace(repo_id, str(folder)), f"{name}/README.md", "exec"), {"__name__": "card"})
        if name == "gen":  # each snippet (generate + decode, then the pipeline) writes generated.png
            generated.append(np.asarray(PIL.Image.open(image_cwd / "generated.png").convert("RGB")))
    if name == "tok":
        assert PIL.Image.open(image_cwd / "reconstruction.png").size == (32, 32)
    if name == "gen":
        expected = np.asarray(card_snippet_image(folder)[1])
        assert expected.shape == (32, 32, 3)
        for image in generated:  # same prompt, seed and settings: the same image both ways
            np.testing.assert_array_equal(image, expected)


# ----------------------------------------------------------------------------- (c) push_to_hub.py
def test_dry_run_writes_a_complete_folder_offline(source_dirs, eval_json, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not touch the network")

    for method in ("create_repo", "upload_folder", "upload_file", "create_commit", "whoami"):
        monkeypatch.setattr(HfApi, method, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the default output folder goes
    (tmp_path / "tmp").mkdir()
    before = {kind: files_digest(folder) for kind, folder in source_dirs.items()}
    main = load_main("scripts/push_to_hub.py")

    result = main(["--model-dir", str(source_dirs["vlm"]), "--repo-id", REPO_VLM, "--official", "--dry-run",
                   "--output-dir", str(tmp_path / "vlm"), "--eval-json", str(eval_json)])
    folder = pathlib.Path(result["folder"])
    assert result["uploaded"] is False and folder == tmp_path / "vlm"
    assert str(folder) in capsys.readouterr().out
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer.json", "README.md", "evaluation"} <= names  # fmt: skip
    assert not any(name.endswith(".py") for name in names)  # remote code only when asked
    assert ModelCard.load(folder / "README.md").data.license == "other"
    image_token_id = json.loads((folder / "config.json").read_text())["image_token_id"]
    assert json.loads((folder / "generation_config.json").read_text())["suppress_tokens"] == [image_token_id]

    result = main(["--model-dir", str(source_dirs["tok"]), "--repo-id", REPO_TOK, "--license", "mit", "--dry-run"])
    default_folder = pathlib.Path(result["folder"])
    assert default_folder.parent == tmp_path / "tmp" and default_folder.name.startswith("evotok-hub-evotok-tiny-")
    names = {p.name for p in default_folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp", "vlm"]  # no staging folder left behind
    assert {kind: files_digest(folder) for kind, folder in source_dirs.items()} == before  # sources untouched

    with pytest.raises(ValueError, match="overlaps the source"):
        main(["--model-dir", str(source_dirs["tok"]), "--repo-id", REPO_TOK, "--license", "mit", "--dry-run",
              "--output-dir", str(source_dirs["tok"])])  # fmt: skip
    with pytest.raises(ValueError, match="not an empty folder"):
        main(["--model-dir", str(source_dirs["tok"]), "--repo-id", REPO_TOK, "--license", "mit", "--dry-run",
              "--output-dir", str(tmp_path / "vlm")])  # fmt: skip
    with pytest.raises(ValueError, match="license is required"):
        main(["--model-dir", str(source_dirs["tok"]), "--repo-id", REPO_TOK, "--dry-run"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp", "vlm"]
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [default_folder.name]


def test_upload_calls_create_repo_and_upload_folder(source_dirs, tmp_path, recorded_hub_uploads):
    calls = recorded_hub_uploads
    result = load_main("scripts/push_to_hub.py")(
        ["--model-dir", str(source_dirs["tok"]), "--repo-id", REPO_TOK, "--license", "mit", "--private",
         "--remote-code", "--output-dir", str(tmp_path / "out"), "--commit-message", "first upload"]
    )  # fmt: skip
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    _, args, kwargs = calls[0]
    assert args == (REPO_TOK,) and kwargs["exist_ok"] is True and kwargs["private"] is True
    assert kwargs["repo_type"] == "model"
    _, args, kwargs = calls[1]
    assert kwargs == {"repo_id": REPO_TOK, "repo_type": "model", "folder_path": str(tmp_path / "out"),
                      "commit_message": "first upload"}  # fmt: skip
    assert result["uploaded"] is True and (tmp_path / "out" / "modeling_evotok.py").is_file()


# ----------------------------------------------------------------------------- (d) remote code in a clean process
def test_auto_model_gives_the_whole_vlm_with_the_package_imported(published, source_dirs):
    """With evotok_hf imported, AutoModel resolves a VLM folder, plain or exported, to the package's class: the class
    the exported auto_map names, so a folder loads the same way with or without the package."""
    assert json.loads((published["vlm-remote"] / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_evotok_vlm.EvoTokForConditionalGeneration")  # fmt: skip
    for folder in (source_dirs["vlm"], published["vlm-remote"]):
        assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)) is EvoTokForConditionalGeneration


def test_exported_files_import_only_siblings(tmp_path):
    names = [p.name for p in exportable_files()]
    assert "modeling_evotok.py" in names and "image_processing_evotok.py" in names and "__init__.py" not in names
    folder = tmp_path / "modeling"
    folder.mkdir()
    for source, message in [
        ("from ..training.losses import x\n", "outside `modeling/`"),
        ("from .missing import x\n", "not a file of `modeling/`"),
        ("import einops\n", "einops"),
        ("def f():\n    from evotok_hf.evaluation import metrics\n", "evotok_hf.evaluation"),
    ]:
        path = folder / "bad.py"
        path.write_text(source)
        with pytest.raises(RemoteCodeExportError, match=message):
            check_flat_imports(path, {"bad", "sibling"})
    path.write_text("import torch\nfrom . import sibling\nfrom .sibling import y\nfrom __future__ import annotations\n")
    check_flat_imports(path, {"bad", "sibling"})


CLEAN_PROCESS = BLOCK_EVOTOK_HF + r"""
import json, socket
network = []

def no_network(*args, **kwargs):
    network.append(repr(args))
    raise OSError("network access is blocked in this process")

socket.socket.connect = no_network
socket.create_connection = no_network

import PIL.Image
import torch
from transformers import (AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoProcessor)

tok_dir, vlm_dir, workdir, out_path = sys.argv[1:5]
gen_dir, t2i_prompt = sys.argv[8:10]
image = PIL.Image.open(os.path.join(workdir, "image.jpg"))
out = {}
model = AutoModel.from_pretrained(tok_dir, trust_remote_code=True).eval()
image_processor = AutoImageProcessor.from_pretrained(tok_dir, trust_remote_code=True)
pixel_values = image_processor(image, return_tensors="pt").pixel_values
with torch.no_grad():
    codes = model.encode(pixel_values).codes
    out["tok_pixel_values"] = pixel_values
    out["tok_codes"] = codes
    out["tok_reconstruction"] = model.decode(codes[..., : model.config.pixel_depth])
    out["tok_semantic"] = model.get_semantic_features(codes)

vlm = AutoModelForImageTextToText.from_pretrained(vlm_dir, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(vlm_dir, trust_remote_code=True)
inputs = processor(images=image, text=sys.argv[5], return_tensors="pt")
with torch.no_grad():
    out["vlm_input_ids"] = inputs.input_ids
    out["vlm_logits"] = vlm(**inputs).logits
    out["vlm_generated"] = vlm.generate(**inputs, max_new_tokens=4, do_sample=False)
causal = AutoModelForCausalLM.from_pretrained(vlm_dir, trust_remote_code=True)
# Generic clients (lmms-eval's `huggingface` model) fall back to AutoModel and call generate on it: the whole VLM.
auto_vlm = AutoModel.from_pretrained(vlm_dir, trust_remote_code=True).eval()
with torch.no_grad():
    out["auto_model_generated"] = auto_vlm.generate(**inputs, max_new_tokens=4, do_sample=False)
# Without trust_remote_code, AutoProcessor refuses (it must not fall back to the bare text tokenizer).
try:
    refused = repr(type(AutoProcessor.from_pretrained(vlm_dir)))
except ValueError as err:
    refused = str(err)

t2i_vlm = AutoModelForImageTextToText.from_pretrained(gen_dir, trust_remote_code=True).eval()
t2i_auto = AutoModel.from_pretrained(gen_dir, trust_remote_code=True)
t2i_processor = AutoProcessor.from_pretrained(gen_dir, trust_remote_code=True)
inputs = t2i_processor(text=t2i_prompt, generation_mode="image", return_tensors="pt")
out["gen_codes"] = t2i_vlm.generate(**inputs, generation_mode="image", guidance_scale=7.5,
                                    generator=torch.Generator().manual_seed(0))

os.chdir(workdir)
cards = (("tok", tok_dir, sys.argv[6]), ("vlm", vlm_dir, sys.argv[7]), ("gen", gen_dir, sys.argv[10]))
for name, folder, repo_id in cards:
    text = open(os.path.join(folder, "README.md")).read()
    for block in [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]:
        exec(compile(block.replace(repo_id, folder), name + "/README.md", "exec"), {"__name__": "card"})

classes = [type(model), type(image_processor), type(vlm), type(processor), type(processor.image_processor),
           type(causal), type(auto_vlm), type(t2i_vlm), type(t2i_auto), type(t2i_processor)]
out["info"] = {
    "modules": [c.__module__ for c in classes],
    "class_names": {"vlm": [type(m).__name__ for m in (vlm, causal, auto_vlm, t2i_vlm, t2i_auto)],
                    "processors": [type(p).__name__ for p in (processor, t2i_processor)]},
    "processor_without_trust": refused,
    "evotok_hf_imported": any(m.split(".")[0] == "evotok_hf" for m in sys.modules),
    "network": network,
}
torch.save(out, out_path)
"""


def test_remote_code_loads_without_evotok_hf_and_matches_the_package(published, source_dirs, image_cwd, tmp_path):
    for name in ("tok-remote", "vlm-remote", "gen-remote"):
        names = {p.name for p in published[name].iterdir()}
        assert {"configuration_evotok.py", "modeling_evotok.py", "quantizer.py", "image_processing_evotok.py",
                "processing_evotok.py"} <= names and "__init__.py" not in names  # fmt: skip
    assert {"generation.py", "depth_head.py"} <= {p.name for p in published["gen-remote"].iterdir()}
    config = json.loads((published["vlm-remote"] / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_evotok_vlm.EvoTokForConditionalGeneration"

    out_path = tmp_path / "remote_outputs.pt"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CLEAN_PROCESS, str(published["tok-remote"]), str(published["vlm-remote"]),
         str(image_cwd), str(out_path), PROMPT, REPO_TOK, REPO_VLM, str(published["gen-remote"]), T2I_PROMPT,
         REPO_GEN],
        env=fresh_user_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = torch.load(out_path, weights_only=False)
    info = remote.pop("info")
    assert info["network"] == [] and info["evotok_hf_imported"] is False
    assert info["class_names"] == {"vlm": ["EvoTokForConditionalGeneration"] * 5, "processors": ["EvoTokProcessor"] * 2}
    assert "trust_remote_code=True" in info["processor_without_trust"], info["processor_without_trust"]
    assert all(module.startswith("transformers_modules.") for module in info["modules"]), info["modules"]
    assert (image_cwd / "reconstruction.png").is_file()  # the remote-code card snippets ran there
    gen_codes, gen_image = card_snippet_image(source_dirs["gen"])
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(image_cwd / "generated.png").convert("RGB")),
                                  np.asarray(gen_image))  # fmt: skip

    # The same computation with the package's classes on the source folders.
    image = PIL.Image.open(image_cwd / "image.jpg")
    model = EvoTokModel.from_pretrained(source_dirs["tok"]).eval()
    pixel_values = EvoTokImageProcessor.from_pretrained(source_dirs["tok"])(image, return_tensors="pt").pixel_values
    vlm = EvoTokForConditionalGeneration.from_pretrained(source_dirs["vlm"]).eval()
    inputs = EvoTokProcessor.from_pretrained(source_dirs["vlm"])(images=image, text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        codes = model.encode(pixel_values).codes
        expected = {
            "tok_pixel_values": pixel_values,
            "tok_codes": codes,
            "tok_reconstruction": model.decode(codes[..., : model.config.pixel_depth]),
            "tok_semantic": model.get_semantic_features(codes),
            "vlm_input_ids": inputs.input_ids,
            "vlm_logits": vlm(**inputs).logits,
            "vlm_generated": vlm.generate(**inputs, max_new_tokens=4, do_sample=False),
            "auto_model_generated": vlm.generate(**inputs, max_new_tokens=4, do_sample=False),
            "gen_codes": gen_codes,
        }
    assert remote.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():  # same math; the thread count may differ between the processes
            torch.testing.assert_close(remote[key], value, rtol=1e-5, atol=1e-5, msg=key)
        else:
            assert torch.equal(remote[key], value), key
