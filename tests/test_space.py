"""The Hub Space demo (spaces/evotok-demo/app.py), served for real: a tiny tokenizer and a tiny VLM saved to folders,
loaded by `load_models`, called through gradio_client and through headless Chromium."""

import importlib.util
import os
import re
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config

from evotok_hf import (
    EvoTokConfig,
    EvoTokForConditionalGeneration,
    EvoTokImageProcessor,
    EvoTokModel,
    EvoTokProcessor,
    EvoTokVLMConfig,
)
from evotok_hf.data import load_bundled_photos

APP_PATH = Path(__file__).resolve().parents[1] / "spaces" / "evotok-demo" / "app.py"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]  # fmt: skip
MAX_UPLOAD_PIXELS = 1_200_000
MAX_UPLOAD_BYTES = 2_000_000
CHAT_TOKENS = 6


def load_app():
    spec = importlib.util.spec_from_file_location("evotok_space_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_vlm(folder: Path, vision_config: EvoTokConfig) -> None:
    """A random tiny Qwen2 VLM over the tiny tokenizer, with a word-level text tokenizer, as in test_vlm.py."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["user describe the image please", "assistant a cat on a red mat", "what colour is the sky", "blue"]
    specials = ["<pad>", "<unk>", "<image>", "<boi>", "<eoi>", "<eos>"]
    backend.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    text_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        additional_special_tokens=["<image>", "<boi>", "<eoi>"],
    )  # fmt: skip
    text_config = Qwen2Config(
        vocab_size=len(text_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.5,
        pad_token_id=text_tokenizer.pad_token_id, eos_token_id=text_tokenizer.eos_token_id,
    )  # fmt: skip
    config = EvoTokVLMConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=text_tokenizer.convert_tokens_to_ids("<image>"),
        boi_token_id=text_tokenizer.convert_tokens_to_ids("<boi>"),
        eoi_token_id=text_tokenizer.convert_tokens_to_ids("<eoi>"),
    )
    torch.manual_seed(0)
    EvoTokForConditionalGeneration(config).save_pretrained(folder)
    size = vision_config.image_size
    EvoTokProcessor(
        image_processor=EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash"),
        tokenizer=text_tokenizer, num_image_tokens=vision_config.grid_size**2, boi_token="<boi>", eoi_token="<eoi>",
    ).save_pretrained(folder)  # fmt: skip


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data (readers see the size first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    config = EvoTokConfig.from_preset("evotok-tiny")
    torch.manual_seed(0)
    EvoTokModel(config).save_pretrained(root / "tokenizer")
    size = config.image_size
    EvoTokImageProcessor(size={"height": size, "width": size}).save_pretrained(root / "tokenizer")
    save_tiny_vlm(root / "vlm", config)
    load_bundled_photos(["astronaut"])["astronaut"].save(root / "astronaut.png")
    PIL.Image.new("RGB", (1500, 1500), (40, 90, 160)).save(root / "too_many_pixels.png")  # 2.25 MP, a few kB
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(root / "too_many_bytes.png")  # 1 MP, about 3 MB
    png_claiming_size(root / "bomb.png", 20_000, 20_000)
    return root


@pytest.fixture(scope="module")
def app():
    """The app module, imported while every outgoing connection is recorded and refused: importing it (gradio
    included) must not touch the network."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("network access during import")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        module = load_app()
    assert attempts == []
    return module


@pytest.fixture(scope="module")
def server(app, files):
    """The demo, loaded with `load_models` from the saved folders and served on a free port, once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(files / "gradio"))
        models = app.load_models(str(files / "tokenizer"), str(files / "vlm"), device="cpu")
        demo = app.build_demo(*models, max_upload_pixels=MAX_UPLOAD_PIXELS, max_upload_bytes=MAX_UPLOAD_BYTES)
        port = free_port()
        app.launch_demo(demo, port=port, max_upload_bytes=MAX_UPLOAD_BYTES, prevent_thread_lock=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


@pytest.fixture(scope="module")
def client(server, files):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=str(files / "downloads"))


@pytest.fixture(scope="module")
def tokenizer(files):
    folder = files / "tokenizer"
    return EvoTokModel.from_pretrained(folder).eval(), EvoTokImageProcessor.from_pretrained(folder)


def expected_psnr_text(tokenizer, photo: Path, depth: int):
    """The reconstruction and its PSNR computed here, with the model directly and the PSNR in NumPy."""
    model, processor = tokenizer
    pixel_values = processor(PIL.Image.open(photo), return_tensors="pt").pixel_values
    with torch.no_grad():
        reconstruction = model.decode(model.encode(pixel_values).codes[..., :depth])
    a = (np.clip(reconstruction.double().numpy(), -1, 1) + 1) / 2
    b = (pixel_values.double().numpy() + 1) / 2
    value = -10 * np.log10(np.mean((a - b) ** 2))
    return f"PSNR {value:.2f} dB", processor.postprocess(reconstruction)[0]


def test_endpoints(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/reconstruct", "/semantic_depths", "/chat",
    }  # fmt: skip


@pytest.mark.parametrize("depth", [1, 2])
def test_reconstruct_matches_direct_tokenizer(client, files, tokenizer, depth):
    from gradio_client import handle_file

    photo = files / "astronaut.png"
    preprocessed, reconstruction, psnr_text, code_map, code_table = client.predict(
        handle_file(str(photo)), depth, api_name="/reconstruct"
    )
    expected_text, expected_image = expected_psnr_text(tokenizer, photo, depth)
    assert psnr_text.startswith(expected_text + " "), (psnr_text, expected_text)
    size = tokenizer[0].config.image_size
    returned = PIL.Image.open(reconstruction)
    assert returned.size == (size, size)
    np.testing.assert_array_equal(np.asarray(returned.convert("RGB")), np.asarray(expected_image))
    assert PIL.Image.open(preprocessed).size == (size, size)
    grid = tokenizer[0].config.grid_size
    assert np.asarray(code_table["data"]).shape == (grid, grid)
    assert PIL.Image.open(code_map).size[0] % grid == 0


def test_semantic_depths(client, files, tokenizer):
    from gradio_client import handle_file

    table, _, gallery = client.predict(handle_file(str(files / "astronaut.png")), api_name="/semantic_depths")
    depth = tokenizer[0].config.semantic_depth
    assert table["headers"] == ["k", "cosine"]
    assert [row[0] for row in table["data"]] == list(range(1, depth + 1))
    assert table["data"][-1][1] == 1.0
    assert all(-1.0 <= row[1] <= 1.0 for row in table["data"])
    assert [item["caption"] for item in gallery] == [f"k = {k}" for k in range(1, depth + 1)]


def test_chat_matches_direct_generate(client, files):
    from gradio_client import handle_file

    photo = files / "astronaut.png"
    question = "describe the image please"
    answer = client.predict(handle_file(str(photo)), question, CHAT_TOKENS, api_name="/chat")

    vlm = EvoTokForConditionalGeneration.from_pretrained(files / "vlm").eval()
    processor = EvoTokProcessor.from_pretrained(files / "vlm")
    messages = [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(photo)},
                                             {"type": "text", "text": question}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    special = [vlm.config.image_token_id, vlm.config.boi_token_id, vlm.config.eoi_token_id]
    with torch.no_grad():
        output = vlm.generate(**inputs, max_new_tokens=CHAT_TOKENS, do_sample=False, suppress_tokens=special)
    expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert expected  # the random LM says something, so the comparison means something
    assert answer == expected


def test_oversized_uploads_are_rejected_with_a_message(client, files, app, tokenizer):
    from gradio_client import handle_file

    with pytest.raises(Exception, match=r"Image too large: 1500x1500 = 2\.2 megapixels.*at most 1\.2 megapixels"):
        client.predict(handle_file(str(files / "too_many_pixels.png")), 1, api_name="/reconstruct")
    with pytest.raises(Exception, match="Image too large"):
        client.predict(handle_file(str(files / "too_many_pixels.png")), api_name="/semantic_depths")
    # A header claiming 400 MP: PIL's own bomb guard answers while gradio reads the header; the message gets through.
    with pytest.raises(Exception, match="exceeds limit"):
        client.predict(handle_file(str(files / "bomb.png")), 1, api_name="/reconstruct")
    # Too many bytes: refused before the upload (gradio's max_file_size, which the client also reads).
    with pytest.raises(Exception, match="maximum file size"):
        client.predict(handle_file(str(files / "too_many_bytes.png")), 1, api_name="/reconstruct")
    # ... and by the handler itself, however the app is served.
    handlers = app.EvoTokDemo(*tokenizer, max_upload_pixels=MAX_UPLOAD_PIXELS, max_upload_bytes=MAX_UPLOAD_BYTES)
    with pytest.raises(Exception, match=r"File too large: 3\.\d MB; this demo accepts at most 2\.0 MB"):
        handlers.open_upload(str(files / "too_many_bytes.png"))
    # the server is still up
    assert client.predict(handle_file(str(files / "astronaut.png")), 1, api_name="/reconstruct")[2].startswith("PSNR")


def test_without_vlm_the_chat_tab_is_a_note(app, tokenizer):
    demo = app.build_demo(*tokenizer)
    elem_ids = {c["props"].get("elem_id") for c in demo.config["components"]}
    assert "chat-note" in elem_ids and "chat-button" not in elem_ids and "tab-text-to-image" not in elem_ids
    assert {"recon-input", "recon-depth", "recon-button", "recon-output", "recon-psnr", "recon-codes"} <= elem_ids
    assert {"semantic-input", "semantic-button", "semantic-table", "semantic-plot", "semantic-pca"} <= elem_ids
    assert {d["api_name"] for d in demo.config["dependencies"]} == {"reconstruct", "semantic_depths"}


@pytest.mark.browser
def test_browser_reconstruct(server, files, tokenizer, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    photo = files / "astronaut.png"
    screenshot = tmp_path / "reconstruct.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_selector("#recon-input")
            page.set_input_files("#recon-input input[type=file]", str(photo))
            page.wait_for_selector("#recon-input img")  # the upload finished and is previewed
            page.click("#recon-button")
            psnr_box = page.locator("#recon-psnr textarea")
            expect(psnr_box).to_have_value(re.compile("dB"), timeout=30_000)
            page.wait_for_selector("#recon-output img")
            page.screenshot(path=str(screenshot), full_page=True)
            psnr_text = psnr_box.input_value()
        finally:
            browser.close()
    depth = tokenizer[0].config.pixel_depth  # the slider's default
    assert psnr_text.startswith(expected_psnr_text(tokenizer, photo, depth)[0] + " ")
    assert screenshot.stat().st_size > 10_000
    shot = np.asarray(PIL.Image.open(screenshot).convert("RGB"))
    assert shot.shape[1] == 1280 and shot.std() > 5
