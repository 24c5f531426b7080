"""The Hub Space demo (spaces/evotok-demo/app.py), served for real: a tiny tokenizer and a tiny VLM saved to folders,
loaded by `load_models`, called through gradio_client and through headless Chromium (a second server with a tiny
generation-only VLM serves the Text-to-image tab); and scripts/push_space.py, which builds the Space folder (dry run
offline, upload arguments, the package copy the folder's app imports)."""

import ast
import contextlib
import importlib.util
import json
import os
import re
import runpy
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch
from vlm_helpers import (
    bpe_tokenizer,
    tiny_generation_vlm,
    tiny_processor,
    tiny_vlm_config,
    understanding_vlm_config,
    word_level_tokenizer,
)

from evotok_hf import EvoTokConfig, EvoTokForConditionalGeneration, EvoTokImageProcessor, EvoTokModel, EvoTokProcessor
from evotok_hf.bundled_photos import load_bundled_photos

ROOT = Path(__file__).resolve().parents[1]
APP_PATH = ROOT / "spaces" / "evotok-demo" / "app.py"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]  # fmt: skip
MAX_UPLOAD_PIXELS = 1_200_000
MAX_UPLOAD_BYTES = 2_000_000
CHAT_TOKENS = 6
T2I_PROMPT = "a red bicycle on a green hill"
T2I_CORPUS = ["system user assistant You are a helpful assistant.", T2I_PROMPT, "a cat, a dog, blurry."]


def load_app():
    spec = importlib.util.spec_from_file_location("evotok_space_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_vlm(folder: Path, vision_config: EvoTokConfig) -> None:
    """A random tiny Qwen2 VLM over the tiny tokenizer, with a word-level text tokenizer, as in test_vlm.py."""
    corpus = ["user describe the image please", "assistant a cat on a red mat", "what colour is the sky", "blue"]
    text_tokenizer = word_level_tokenizer(corpus)
    torch.manual_seed(0)
    EvoTokForConditionalGeneration(understanding_vlm_config(text_tokenizer, vision_config)).save_pretrained(folder)
    size = vision_config.image_size
    EvoTokProcessor(
        image_processor=EvoTokImageProcessor(size={"height": size, "width": size}, resize_mode="squash"),
        tokenizer=text_tokenizer, num_image_tokens=vision_config.grid_size**2, boi_token="<boi>", eoi_token="<eoi>",
    ).save_pretrained(folder)  # fmt: skip


def save_tiny_generation_vlm(folder: Path) -> None:
    """A random tiny generation-only VLM (generation head, no understanding head) with its processor."""
    text_tokenizer = bpe_tokenizer(T2I_CORPUS, vocab_size=300)
    tiny_generation_vlm(text_tokenizer).save_pretrained(folder)
    tiny_processor(text_tokenizer, wrap_image_tokens=True).save_pretrained(folder)


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data (readers see the size first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    config = EvoTokConfig.from_preset("evotok-tiny")
    torch.manual_seed(0)
    EvoTokModel(config).save_pretrained(root / "tokenizer")
    size = config.image_size
    EvoTokImageProcessor(size={"height": size, "width": size}).save_pretrained(root / "tokenizer")
    save_tiny_vlm(root / "vlm", config)
    save_tiny_generation_vlm(root / "generation_vlm")
    load_bundled_photos(["astronaut"])["astronaut"].save(root / "astronaut.png")
    PIL.Image.new("RGB", (1500, 1500), (40, 90, 160)).save(root / "too_many_pixels.png")  # 2.25 MP, a few kB
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(root / "too_many_bytes.png")  # 1 MP, about 3 MB
    png_claiming_size(root / "bomb.png", 20_000, 20_000)
    # Non-RGB uploads: hidden red under full transparency on the left half, and a 16-bit grey ramp above 255.
    rgba = np.zeros((40, 48, 4), dtype=np.uint8)
    rgba[:, :24] = (255, 0, 0, 0)
    rgba[:, 24:, :3] = np.random.default_rng(1).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    rgba[:, 24:, 3] = 255
    PIL.Image.fromarray(rgba).save(root / "transparent.png")
    PIL.Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)).save(root / "grey16.png")
    rgba_large = np.zeros((1500, 1500, 4), dtype=np.uint8)
    PIL.Image.fromarray(rgba_large).save(root / "too_many_pixels_rgba.png")  # 2.25 MP, decodable, a few kB
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


def serve(app, files, models):
    """Serve the demo of `models` until the generator is closed; yields its URL. The port is gradio's choice: it takes
    the first one its server starts on and reports it, so no other process can take it between a check and the
    start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(files / "gradio"))
        demo = app.build_demo(*models, max_upload_pixels=MAX_UPLOAD_PIXELS, max_upload_bytes=MAX_UPLOAD_BYTES)
        app.launch_demo(demo, max_upload_bytes=MAX_UPLOAD_BYTES, prevent_thread_lock=True)
        try:
            yield demo.local_url
        finally:
            demo.close()


@pytest.fixture(scope="module")
def server(app, files):
    """The demo, loaded with `load_models` from the saved folders and served, once for the module."""
    yield from serve(app, files, app.load_models(str(files / "tokenizer"), str(files / "vlm"), device="cpu"))


@pytest.fixture(scope="module")
def client(server, files):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=str(files / "downloads"))


@pytest.fixture(scope="module")
def generation_models(app, files):
    return app.load_models(str(files / "tokenizer"), str(files / "generation_vlm"), device="cpu")


@pytest.fixture(scope="module")
def generation_server(app, files, generation_models):
    """A second demo, serving the tiny generation-only VLM (Text-to-image tab, no Chat tab)."""
    yield from serve(app, files, generation_models)


@pytest.fixture(scope="module")
def generation_client(generation_server, files):
    from gradio_client import Client

    return Client(generation_server, verbose=False, download_files=str(files / "generation_downloads"))


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


@pytest.mark.parametrize("name, mode", [("transparent.png", "RGBA"), ("grey16.png", "I;16")])
def test_non_rgb_uploads_reach_the_model_as_the_image_processor_converts_them(client, files, tokenizer, name, mode):
    from gradio_client import handle_file

    photo = files / name
    model, processor = tokenizer
    assert PIL.Image.open(photo).mode == mode
    expected = processor.postprocess(processor(PIL.Image.open(photo), return_tensors="pt").pixel_values)[0]
    # What a plain RGB conversion (gradio's default image_mode) would feed the model differs: the test tells them apart.
    rgb = processor.postprocess(processor(PIL.Image.open(photo).convert("RGB"), return_tensors="pt").pixel_values)[0]
    assert not np.array_equal(np.asarray(rgb), np.asarray(expected))

    preprocessed, _, psnr_text, _, _ = client.predict(handle_file(str(photo)), 1, api_name="/reconstruct")
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(preprocessed).convert("RGB")), np.asarray(expected))
    assert psnr_text.startswith(expected_psnr_text(tokenizer, photo, 1)[0] + " ")


def test_oversized_uploads_are_refused_from_the_header_without_decoding(client, files, monkeypatch):
    """A 2.25 MP RGBA file (over the 1.2 MP limit) is refused by its header: no pixel of it is ever decoded, neither by
    gradio (whose RGB conversion decoded non-RGB uploads before the handler saw them) nor by the handler."""
    from gradio_client import handle_file

    decoded = []
    load = PIL.ImageFile.ImageFile.load

    def recording_load(image):  # the server runs in this process: every decode of an uploaded file passes here
        decoded.append(Path(getattr(image, "filename", "") or "").name)
        return load(image)

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", recording_load)
    for api_name, extra in (("/reconstruct", (1,)), ("/semantic_depths", ()), ("/chat", ("what colour is the sky", 2))):
        with pytest.raises(Exception, match=r"Image too large: 1500x1500 = 2\.2 megapixels"):
            client.predict(handle_file(str(files / "too_many_pixels_rgba.png")), *extra, api_name=api_name)
    assert "too_many_pixels_rgba.png" not in decoded
    client.predict(handle_file(str(files / "transparent.png")), 1, api_name="/reconstruct")
    assert "transparent.png" in decoded  # the recorder sees the decodes of accepted uploads


def test_without_vlm_the_chat_tab_is_a_note(app, tokenizer):
    demo = app.build_demo(*tokenizer)
    elem_ids = {c["props"].get("elem_id") for c in demo.config["components"]}
    assert "chat-note" in elem_ids and "chat-button" not in elem_ids and "tab-text-to-image" not in elem_ids
    assert {"recon-input", "recon-depth", "recon-button", "recon-output", "recon-psnr", "recon-codes"} <= elem_ids
    assert {"semantic-input", "semantic-button", "semantic-table", "semantic-plot", "semantic-pca"} <= elem_ids
    assert {d["api_name"] for d in demo.config["dependencies"]} == {"reconstruct", "semantic_depths"}


# ----------------------------------------------------------------------------- text to image
def elem_ids_and_endpoints(demo):
    return ({c["props"].get("elem_id") for c in demo.config["components"]},
            {d["api_name"] for d in demo.config["dependencies"]})  # fmt: skip


T2I_IDS = {"t2i-prompt", "t2i-negative", "t2i-guidance", "t2i-sample", "t2i-seed", "t2i-button", "t2i-output",
           "t2i-codes"}  # fmt: skip
CHAT_IDS = {"chat-image", "chat-question", "chat-button", "chat-answer"}


def test_tabs_follow_the_vlm_heads(app, tokenizer, generation_models):
    elem_ids, endpoints = elem_ids_and_endpoints(app.build_demo(*generation_models))
    assert T2I_IDS <= elem_ids and not (CHAT_IDS | {"chat-note", "tab-chat"}) & elem_ids  # no head to chat with
    assert endpoints == {"reconstruct", "semantic_depths", "text_to_image"}
    text_tokenizer = bpe_tokenizer(T2I_CORPUS, vocab_size=300)
    both = EvoTokForConditionalGeneration(tiny_vlm_config(text_tokenizer, has_generation_head=True)).eval()
    demo = app.build_demo(*tokenizer, both, tiny_processor(text_tokenizer))
    elem_ids, endpoints = elem_ids_and_endpoints(demo)
    assert T2I_IDS | CHAT_IDS | {"tab-chat", "tab-text-to-image"} <= elem_ids
    assert endpoints == {"reconstruct", "semantic_depths", "chat", "text_to_image"}
    guidance = next(c for c in demo.config["components"] if c["props"].get("elem_id") == "t2i-guidance")
    assert guidance["props"]["value"] == 7.5  # the model's default


def test_text_to_image_settings_start_at_the_checkpoints(app, tokenizer):
    """The settings boxes show what `generate` would use: the model's generation configs, defaults elsewhere."""
    text_tokenizer = bpe_tokenizer(T2I_CORPUS, vocab_size=300)
    vlm = tiny_generation_vlm(text_tokenizer)
    vlm.generation_config.guidance_scale = 3.0
    vlm.depth_head.generation_config.do_sample = False
    vlm.depth_head.generation_config.top_k = [20, 10]
    demo = app.build_demo(*tokenizer, vlm, tiny_processor(text_tokenizer, wrap_image_tokens=True))
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in demo.config["components"]}
    assert values["t2i-guidance"] == 3.0 and values["t2i-sample"] is False
    assert (values["t2i-temperature"], values["t2i-top-k"], values["t2i-top-p"]) == ("1.0", "20, 10", "0.96")


def direct_text_to_image(folder, prompt, negative_prompt, guidance_scale, do_sample, seed, **settings):
    """What the endpoint must return, computed here with the model and processor loaded from the folder."""
    vlm = EvoTokForConditionalGeneration.from_pretrained(folder).eval()
    processor = EvoTokProcessor.from_pretrained(folder)
    inputs = processor(text=prompt, generation_mode="image", negative_prompt=negative_prompt, return_tensors="pt")
    with torch.no_grad():
        codes = vlm.generate(**inputs, generation_mode="image", guidance_scale=guidance_scale, do_sample=do_sample,
                             generator=torch.Generator().manual_seed(seed), **settings)  # fmt: skip
        image = processor.image_processor.postprocess(vlm.decode_image_tokens(codes))[0]
    return image, codes[0, ..., 0].numpy()


@pytest.mark.parametrize(
    "negative, guidance, do_sample, seed, boxes, settings",
    [
        ("", 7.5, False, 0, ("", "", ""), {}),
        ("blurry", 3.0, True, 5, ("1.0", "20, 10", "0.9"),
         {"depth_temperature": 1.0, "depth_top_k": [20, 10], "depth_top_p": 0.9}),
    ],
    ids=["greedy", "sampled"],
)  # fmt: skip
def test_text_to_image_matches_direct_generate(generation_client, files, negative, guidance, do_sample, seed, boxes,
                                               settings):  # fmt: skip
    image, code_map, table = generation_client.predict(T2I_PROMPT, negative, guidance, do_sample, seed, *boxes,
                                                       api_name="/text_to_image")  # fmt: skip
    expected_image, expected_codes = direct_text_to_image(files / "generation_vlm", T2I_PROMPT, negative or None,
                                                          guidance, do_sample, seed, **settings)  # fmt: skip
    returned = PIL.Image.open(image)
    assert returned.format == "PNG" and returned.size == expected_image.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(returned.convert("RGB")), np.asarray(expected_image))
    np.testing.assert_array_equal(np.asarray(table["data"]), expected_codes)
    assert PIL.Image.open(code_map).size[0] % expected_codes.shape[1] == 0
    if do_sample:  # the seed matters
        _, other_codes = direct_text_to_image(files / "generation_vlm", T2I_PROMPT, negative, guidance, True,
                                              seed + 1, **settings)  # fmt: skip
        assert not np.array_equal(other_codes, expected_codes)


def test_text_to_image_progress_and_errors(app, generation_models, generation_client):
    handlers = app.EvoTokDemo(*generation_models)
    steps = []
    handlers.text_to_image(T2I_PROMPT, "", 7.5, True, 0, "", "", "", progress=lambda step, **kw: steps.append(step))
    grid = generation_models.vlm.config.vision_config.grid_size
    assert steps == [(i, grid * grid) for i in range(grid * grid + 1)]  # one step per generated position
    for boxes, message in [
        (("", "ten", ""), "Top-k: expected one int"),
        (("", "1, 2, 3", ""), "give one value or 2"),
        (("", "", "0"), "depth_decoder_top_p must be in"),  # the model's ValueError, as a gr.Error
    ]:
        with pytest.raises(Exception, match=message):
            handlers.text_to_image(T2I_PROMPT, "", 7.5, True, 0, *boxes, progress=lambda *a, **kw: None)
    with pytest.raises(Exception, match="Type a prompt"):
        generation_client.predict(" ", "", 7.5, True, 0, "", "", "", api_name="/text_to_image")


@contextlib.contextmanager
def chromium_page(url: str):
    """A 1280 px wide page of the system's headless Chromium, opened at `url` and closed after the block."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.goto(url, wait_until="domcontentloaded")
            yield page
        finally:
            browser.close()


def assert_screenshot_shows_a_page(screenshot: Path) -> None:
    """The full-page screenshot of a `chromium_page` holds more than a blank page."""
    assert screenshot.stat().st_size > 10_000
    shot = np.asarray(PIL.Image.open(screenshot).convert("RGB"))
    assert shot.shape[1] == 1280 and shot.std() > 5


@pytest.mark.browser
def test_browser_text_to_image(generation_server, tmp_path):
    screenshot = tmp_path / "text_to_image.png"
    with chromium_page(generation_server) as page:
        page.get_by_role("tab", name="Text to image").click()
        page.wait_for_selector("#t2i-prompt textarea")
        page.fill("#t2i-prompt textarea", T2I_PROMPT)
        page.click("#t2i-button")
        page.wait_for_selector("#t2i-output img", timeout=30_000)
        page.wait_for_selector("#t2i-codes img")
        page.screenshot(path=str(screenshot), full_page=True)
        natural_size = page.eval_on_selector("#t2i-output img", "img => [img.naturalWidth, img.naturalHeight]")
    assert natural_size == [32, 32]  # the generated image itself, shown enlarged
    assert_screenshot_shows_a_page(screenshot)


@pytest.mark.browser
@pytest.mark.parametrize("name", ["astronaut.png", "grey16.png"])  # a 16-bit grey reaches the model as uploaded
def test_browser_reconstruct(server, files, tokenizer, tmp_path, name):
    photo = files / name
    screenshot = tmp_path / "reconstruct.png"
    with chromium_page(server) as page:
        from playwright.sync_api import expect

        page.wait_for_selector("#recon-input")
        page.set_input_files("#recon-input input[type=file]", str(photo))
        page.wait_for_selector("#recon-input img")  # the upload finished and is previewed
        page.click("#recon-button")
        psnr_box = page.locator("#recon-psnr textarea")
        expect(psnr_box).to_have_value(re.compile("dB"), timeout=30_000)
        page.wait_for_selector("#recon-output img")
        page.screenshot(path=str(screenshot), full_page=True)
        psnr_text = psnr_box.input_value()
    depth = tokenizer[0].config.pixel_depth  # the slider's default
    assert psnr_text.startswith(expected_psnr_text(tokenizer, photo, depth)[0] + " ")
    assert_screenshot_shows_a_page(screenshot)


# ----------------------------------------------------------------------------- the published models
def test_space_config_sets_defaults_below_the_environment(app, tmp_path, monkeypatch):
    monkeypatch.delenv("EVOTOK_TOKENIZER", raising=False)
    monkeypatch.delenv("EVOTOK_VLM", raising=False)
    monkeypatch.setattr(app, "SPACE_CONFIG_PATH", tmp_path / "space_config.json")
    with pytest.raises(SystemExit):  # no tokenizer anywhere
        app.parse_args([])
    (tmp_path / "space_config.json").write_text(json.dumps({"tokenizer": "org/tok", "vlm": "org/vlm"}))
    args = app.parse_args([])
    assert (args.tokenizer, args.vlm) == ("org/tok", "org/vlm")
    monkeypatch.setenv("EVOTOK_TOKENIZER", "env/tok")
    monkeypatch.setenv("EVOTOK_VLM", "")  # an empty variable turns the VLM off
    args = app.parse_args([])
    assert (args.tokenizer, args.vlm) == ("env/tok", "")
    assert app.parse_args(["--tokenizer", "flag/tok"]).tokenizer == "flag/tok"
    (tmp_path / "space_config.json").write_text(json.dumps({"vlm": "org/vlm"}))
    with pytest.raises(ValueError, match="must hold"):
        app.parse_args([])


def test_requirements_list_the_package_dependencies():
    """requirements.txt says it holds evotok_hf's dependencies (the Space imports a copy of the package)."""
    setup = ast.parse((ROOT / "setup.py").read_text())
    install_requires = next(
        ast.literal_eval(node.value) for node in ast.walk(setup)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "install_requires"
    )  # fmt: skip
    lines = (APP_PATH.parent / "requirements.txt").read_text().splitlines()
    requirements = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert set(install_requires) <= requirements
    assert not any(line.startswith("gradio") for line in requirements)  # the SDK pins it


# ----------------------------------------------------------------------------- scripts/push_space.py
SPACE_REPO = "evotok-test/evotok-demo"
SPACE_MODELS = ["evotok-test/evotok-tiny", "evotok-test/evotok-tiny-vlm"]

# Run in the built Space folder, as the Space runs `python app.py`: the app's folder first on sys.path, and the
# editable install of evotok_hf taken away, as on a Space where the package is not installed.
SPACE_PROCESS = r"""
import importlib.util, json, os, socket, sys

sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "evotok_hf"))]
assert importlib.util.find_spec("evotok_hf") is None
sys.path.insert(0, os.getcwd())

def no_network(*args, **kwargs):
    raise OSError("network access is blocked in this process")

socket.socket.connect = no_network
spec = importlib.util.spec_from_file_location("app", "app.py")
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)
args = app.parse_args([])
modules = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
           if name.split(".")[0] == "evotok_hf"}
print(json.dumps({"modules": modules, "tokenizer": args.tokenizer, "vlm": args.vlm}))
"""


def load_push_space():
    return runpy.run_path(str(ROOT / "scripts" / "push_space.py"), run_name="not_main")


def relative_files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_space_dry_run_builds_a_space_that_imports_the_copied_package(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi, SpaceCard

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not touch the network")

    for method in ("create_repo", "upload_folder", "upload_file", "create_commit", "whoami"):
        monkeypatch.setattr(HfApi, method, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    # the package as the script reads it, with bytecode that must not be copied
    package = tmp_path / "src" / "evotok_hf"
    shutil.copytree(ROOT / "src" / "evotok_hf", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "data.cpython-311.pyc").write_bytes(b"stale")
    main = load_push_space()["main"]
    monkeypatch.setitem(main.__globals__, "PACKAGE_DIR", package)

    folder = Path(main(["--repo-id", SPACE_REPO, "--tokenizer", SPACE_MODELS[0], "--vlm", SPACE_MODELS[1],
                        "--dry-run", "--output-dir", str(tmp_path / "space")])["folder"])  # fmt: skip
    assert folder == tmp_path / "space" and str(folder) in capsys.readouterr().out
    names = {p.name for p in folder.iterdir()}
    assert names == {"app.py", "README.md", "requirements.txt", "LICENSE", "space_config.json", "evotok_hf"}
    source = {k: v for k, v in relative_files(package).items() if "__pycache__" not in k}
    assert relative_files(folder / "evotok_hf") == source  # the whole package, no bytecode
    assert (folder / "app.py").read_bytes() == APP_PATH.read_bytes()
    assert (folder / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    card = SpaceCard.load(folder / "README.md")
    assert card.data.models == SPACE_MODELS and card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.text == SpaceCard.load(APP_PATH.parent / "README.md").text
    assert json.loads((folder / "space_config.json").read_text()) == {"tokenizer": SPACE_MODELS[0],
                                                                      "vlm": SPACE_MODELS[1]}  # fmt: skip

    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}  # fmt: skip
    proc = subprocess.run([sys.executable, "-I", "-c", SPACE_PROCESS], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["modules"]["evotok_hf"] == str(folder / "evotok_hf" / "__init__.py")
    assert all(path is None or path.startswith(str(folder / "evotok_hf") + os.sep) for path in info["modules"].values())
    assert (info["tokenizer"], info["vlm"]) == tuple(SPACE_MODELS)

    # without --vlm, only the tokenizer; the default folder is a new temporary one
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    folder = Path(main(["--repo-id", SPACE_REPO, "--tokenizer", SPACE_MODELS[0], "--dry-run"])["folder"])
    assert folder.parent == tmp_path / "tmp" and folder.name.startswith("evotok-space-evotok-demo-")
    assert SpaceCard.load(folder / "README.md").data.models == SPACE_MODELS[:1]
    assert json.loads((folder / "space_config.json").read_text()) == {"tokenizer": SPACE_MODELS[0], "vlm": None}

    with pytest.raises(ValueError, match="local path"):
        main(["--repo-id", SPACE_REPO, "--tokenizer", str(tmp_path / "space"), "--dry-run"])
    with pytest.raises(ValueError, match="org/name"):
        main(["--repo-id", "evotok-demo", "--tokenizer", SPACE_MODELS[0], "--dry-run"])
    with pytest.raises(ValueError, match="not a valid Hub repository id"):
        main(["--repo-id", SPACE_REPO, "--tokenizer", "org/bad--name", "--dry-run"])
    with pytest.raises(ValueError, match="not an empty folder"):
        main(["--repo-id", SPACE_REPO, "--tokenizer", SPACE_MODELS[0], "--dry-run", "--output-dir",
              str(tmp_path / "space")])  # fmt: skip
    with pytest.raises(ValueError, match="overlaps the source"):
        main(["--repo-id", SPACE_REPO, "--tokenizer", SPACE_MODELS[0], "--dry-run", "--output-dir",
              str(package / "space")])  # fmt: skip
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]  # no staging folder left behind
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [folder.name]


def test_push_space_upload_arguments(tmp_path, recorded_hub_uploads):
    calls = recorded_hub_uploads
    result = load_push_space()["main"](
        ["--repo-id", SPACE_REPO, "--tokenizer", SPACE_MODELS[0], "--private", "--output-dir", str(tmp_path / "out"),
         "--commit-message", "first upload"]
    )  # fmt: skip
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    _, args, kwargs = calls[0]
    assert args == (SPACE_REPO,)
    assert kwargs == {"repo_type": "space", "space_sdk": "gradio", "private": True, "exist_ok": True}
    _, args, kwargs = calls[1]
    assert kwargs == {"repo_id": SPACE_REPO, "repo_type": "space", "folder_path": str(tmp_path / "out"),
                      "commit_message": "first upload", "delete_patterns": ["evotok_hf/**"]}  # fmt: skip
    assert result["uploaded"] is True and (tmp_path / "out" / "evotok_hf" / "__init__.py").is_file()


# ----------------------------------------------------------------------------- text-to-image settings, as generate
def generate_error(vlm, processor, **settings) -> str:
    """The ValueError `generate(generation_mode="image")` raises for these settings."""
    inputs = processor(text=T2I_PROMPT, generation_mode="image", return_tensors="pt")
    with pytest.raises(ValueError) as info:
        vlm.generate(**inputs, generation_mode="image", **settings)
    return str(info.value)


def test_text_to_image_refuses_what_generate_refuses_with_its_message(app, generation_models, generation_client):
    handlers = app.EvoTokDemo(*generation_models)
    vlm, processor = generation_models.vlm, generation_models.vlm_processor
    cases = [  # (guidance slider, Sample box, temperature / top-k / top-p boxes) -> the same settings given to generate
        ((7.5, True, "", "", "1.5"), {"depth_decoder_top_p": 1.5}),
        ((7.5, True, "", "", "nan"), {"depth_decoder_top_p": float("nan")}),
        ((7.5, True, "inf", "", ""), {"depth_decoder_temperature": float("inf")}),
        ((7.5, True, "0", "", ""), {"depth_decoder_temperature": 0.0}),
        ((float("nan"), True, "", "", ""), {"guidance_scale": float("nan")}),
        ((float("nan"), False, "", "", ""), {"guidance_scale": float("nan"), "do_sample": False}),
        ((float("inf"), True, "", "", ""), {"guidance_scale": float("inf")}),
        (("high", True, "", "", ""), {"guidance_scale": "high"}),  # an API client can send anything
    ]
    for (guidance, do_sample, *boxes), settings in cases:
        message = generate_error(vlm, processor, **settings)
        with pytest.raises(app.gr.Error) as info:
            handlers.text_to_image(T2I_PROMPT, "", guidance, do_sample, 0, *boxes, progress=lambda *a, **kw: None)
        assert info.value.message == message, settings
    # served: the message reaches the client
    with pytest.raises(Exception, match=re.escape("depth_decoder_top_p must be in (0, 1], got 1.5 at depth 0")):
        generation_client.predict(T2I_PROMPT, "", 7.5, True, 0, "", "", "1.5", api_name="/text_to_image")


def test_text_to_image_without_sampling_accepts_a_zero_temperature(app, generation_models):
    handlers = app.EvoTokDemo(*generation_models)
    greedy = handlers.text_to_image(T2I_PROMPT, "", 3.0, False, 0, "", "", "", progress=lambda *a, **kw: None)
    zero = handlers.text_to_image(T2I_PROMPT, "", 3.0, False, 0, "0", "", "", progress=lambda *a, **kw: None)
    np.testing.assert_array_equal(np.asarray(zero[0]), np.asarray(greedy[0]))
    np.testing.assert_array_equal(np.asarray(zero[2]), np.asarray(greedy[2]))
