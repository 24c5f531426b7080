"""A remote-code folder (hub/remote_code.py) loaded with evotok_hf imported and saved again stays a remote-code folder:
the code its auto_map names is copied again and the processor keeps its auto_map, so the re-saved folder loads with
`trust_remote_code=True` in a process where evotok_hf cannot be imported, and computes what the package computes."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor
from vlm_helpers import BLOCK_EVOTOK_HF, bpe_tokenizer, fresh_user_env, tiny_generation_vlm, tiny_processor

from evotok_hf import EvoTokConfig, EvoTokImageProcessor, EvoTokModel
from evotok_hf.hub.remote_code import export_remote_code

PROMPT = "a red bicycle on a green hill"

BLOCKED_PROCESS = BLOCK_EVOTOK_HF + r"""
import numpy as np
import PIL.Image
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

tok_dir, vlm_dir, prompt, out_path = sys.argv[1:5]
image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
tokenizer = AutoModel.from_pretrained(tok_dir, trust_remote_code=True).eval()
pixel_values = AutoImageProcessor.from_pretrained(tok_dir, trust_remote_code=True)(image, return_tensors="pt")
vlm = AutoModelForImageTextToText.from_pretrained(vlm_dir, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(vlm_dir, trust_remote_code=True)
inputs = processor(text=prompt, return_tensors="pt")  # a generation-only VLM: text in
with torch.no_grad():
    out = {"codes": tokenizer.encode(pixel_values.pixel_values).codes, "logits": vlm(**inputs).logits}
out["modules"] = [type(obj).__module__ for obj in (tokenizer, vlm, processor, processor.image_processor)]
out["evotok_hf_imported"] = any(m.split(".")[0] == "evotok_hf" for m in sys.modules)
torch.save(out, out_path)
"""


@pytest.fixture(scope="module")
def resaved(tmp_path_factory):
    """A tokenizer folder and a VLM folder exported with remote code, loaded through the Auto classes with the package
    imported (which gives the package's classes) and saved again, as a user fine-tuning a Hub checkpoint would."""
    root = tmp_path_factory.mktemp("resave")
    torch.manual_seed(0)
    tokenizer = EvoTokModel(EvoTokConfig.from_preset("evotok-tiny")).eval()
    image_processor = EvoTokImageProcessor(size={"height": 32, "width": 32})
    tokenizer.save_pretrained(root / "tok")
    image_processor.save_pretrained(root / "tok")
    export_remote_code(tokenizer, image_processor, root / "tok")

    text_tokenizer = bpe_tokenizer(["system user assistant You are a helpful assistant.", PROMPT], vocab_size=300)
    vlm, processor = tiny_generation_vlm(text_tokenizer), tiny_processor(text_tokenizer, wrap_image_tokens=True)
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    export_remote_code(vlm, processor, root / "vlm")

    AutoModel.from_pretrained(root / "tok", trust_remote_code=True).save_pretrained(root / "tok-resaved")
    AutoImageProcessor.from_pretrained(root / "tok", trust_remote_code=True).save_pretrained(root / "tok-resaved")
    AutoModelForImageTextToText.from_pretrained(root / "vlm", trust_remote_code=True).save_pretrained(
        root / "vlm-resaved"
    )
    AutoProcessor.from_pretrained(root / "vlm", trust_remote_code=True).save_pretrained(root / "vlm-resaved")
    return root


def read_json(path):
    return json.loads(path.read_text())


def test_resaved_remote_code_folder_keeps_code_and_auto_map(resaved):
    for kind in ("tok", "vlm"):
        source, copy = resaved / kind, resaved / f"{kind}-resaved"
        for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
            if (source / name).is_file():
                assert read_json(copy / name).get("auto_map") == read_json(source / name)["auto_map"], (kind, name)
        code = {p.name for p in copy.glob("*.py")}
        assert "__init__.py" not in code
        # every module an auto_map names is in the folder
        maps = [read_json(copy / "config.json")["auto_map"]]
        if kind == "tok":
            maps.append(read_json(copy / "preprocessor_config.json")["auto_map"])
        else:
            processor_config = read_json(copy / "processor_config.json")
            maps += [processor_config["auto_map"], processor_config["image_processor"]["auto_map"]]
        named = {ref.rsplit(".", 1)[0] + ".py" for auto_map in maps for ref in auto_map.values()}
        assert named <= code, (kind, named - code)


def test_resaved_remote_code_folder_loads_without_evotok_hf(resaved, tmp_path):
    out_path = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", BLOCKED_PROCESS, str(resaved / "tok-resaved"), str(resaved / "vlm-resaved"),
         PROMPT, str(out_path)],
        env=fresh_user_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = torch.load(out_path, weights_only=False)
    assert remote["evotok_hf_imported"] is False
    assert all(m.startswith("transformers_modules.") for m in remote["modules"]), remote["modules"]

    # The same computation with the package's classes on the re-saved folders.
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    tokenizer = AutoModel.from_pretrained(resaved / "tok-resaved").eval()
    pixel_values = AutoImageProcessor.from_pretrained(resaved / "tok-resaved")(image, return_tensors="pt")
    vlm = AutoModelForImageTextToText.from_pretrained(resaved / "vlm-resaved").eval()
    inputs = AutoProcessor.from_pretrained(resaved / "vlm-resaved")(text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(remote["codes"], tokenizer.encode(pixel_values.pixel_values).codes)
        torch.testing.assert_close(remote["logits"], vlm(**inputs).logits, rtol=1e-5, atol=1e-5)
