import io

import numpy as np
import PIL.Image
import pytest
import torch

from evotok_hf import EvoTokImageProcessor


@pytest.fixture
def processor():
    return EvoTokImageProcessor(size={"height": 32, "width": 32})


def photo(width=48, height=40):
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_output_range_shape_and_values(processor):
    img = PIL.Image.new("RGB", (32, 32), (255, 0, 128))
    pv = processor(img, return_tensors="pt").pixel_values
    assert pv.shape == (1, 3, 32, 32) and pv.dtype == torch.float32
    torch.testing.assert_close(pv[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))


def test_center_crop_vs_squash_against_pil():
    img = photo(64, 32)
    crop = EvoTokImageProcessor(size={"height": 16, "width": 16})
    squash = EvoTokImageProcessor(size={"height": 16, "width": 16}, resize_mode="squash")
    # independent: PIL resize of the shortest side to 16 (64x32 -> 32x16), then the centre 16x16
    expected_crop = np.asarray(img.resize((32, 16), PIL.Image.BICUBIC))[:, 8:24]
    expected_squash = np.asarray(img.resize((16, 16), PIL.Image.BICUBIC))
    for proc, expected in [(crop, expected_crop), (squash, expected_squash)]:
        got = proc(img, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        np.testing.assert_allclose(got, expected / 127.5 - 1.0, atol=1e-5)
    # the mode can also be chosen per call
    per_call = crop(img, resize_mode="squash", return_tensors="np").pixel_values[0].transpose(1, 2, 0)
    np.testing.assert_allclose(per_call, expected_squash / 127.5 - 1.0, atol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_every_pil_mode_becomes_rgb(processor, mode):
    base = photo(32, 32)
    if mode == "I;16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        img = PIL.Image.fromarray(arr)
        assert img.mode == "I;16"
    elif mode == "F":
        img = PIL.Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0)
    elif mode == "I":
        img = PIL.Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 257)
    else:
        img = base.convert(mode)
    pv = processor(img, return_tensors="pt").pixel_values
    assert pv.shape == (1, 3, 32, 32)
    assert pv.min() >= -1.0 - 1e-6 and pv.max() <= 1.0 + 1e-6
    if mode in ("I;16", "I", "F"):
        # 16-bit / float greys are rescaled to the same picture as their 8-bit grey, not clipped to white
        grey = processor(base.convert("L"), return_tensors="pt").pixel_values
        torch.testing.assert_close(pv, grey, atol=2 / 255, rtol=0)


def test_transparency_is_composited_on_white(processor):
    img = PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    pv = processor(img, return_tensors="pt").pixel_values
    torch.testing.assert_close(pv, torch.ones_like(pv))


def test_numpy_and_torch_inputs(processor):
    arr = np.array(photo(32, 32))
    a = processor(arr, return_tensors="pt").pixel_values
    b = processor(torch.from_numpy(arr).permute(2, 0, 1), return_tensors="pt").pixel_values
    c = processor(PIL.Image.fromarray(arr), return_tensors="pt").pixel_values
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, c)


def test_bad_inputs(processor, tmp_path):
    with pytest.raises(ValueError, match="no images"):
        processor([], return_tensors="pt")
    with pytest.raises(ValueError, match="empty image"):
        processor(PIL.Image.new("RGB", (0, 5)), return_tensors="pt")
    with pytest.raises(ValueError, match="empty array"):
        processor(np.zeros((0, 4, 3), dtype=np.uint8), return_tensors="pt")
    buffer = io.BytesIO()
    photo(64, 64).save(buffer, format="PNG")
    truncated = PIL.Image.open(io.BytesIO(buffer.getvalue()[:200]))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        processor(truncated, return_tensors="pt")
    garbage = tmp_path / "broken.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="could not open image"):
        processor(str(garbage), return_tensors="pt")
    with pytest.raises(ValueError, match="expected 3 channels"):
        processor(np.zeros((2, 8, 8), dtype=np.uint8), input_data_format="channels_first", do_convert_rgb=False,
                  return_tensors="pt")
    with pytest.raises(ValueError, match="resize_mode"):
        EvoTokImageProcessor(resize_mode="stretch")


def test_postprocess_inverts_preprocess(processor):
    img = photo(32, 32)
    pv = processor(img, return_tensors="pt").pixel_values
    pil = processor.postprocess(pv, return_tensors="PIL.Image.Image")
    assert np.array_equal(np.asarray(pil[0]), np.asarray(img))
    arr = processor.postprocess(pv, return_tensors="np")
    assert arr.shape == (1, 32, 32, 3) and arr.min() >= 0 and arr.max() <= 1
    pt = processor.postprocess(pv[0] * 5, return_tensors="pt")  # out-of-range values are clipped
    assert pt.shape == (1, 3, 32, 32) and pt.max() == 1.0
    with pytest.raises(ValueError, match="return_tensors"):
        processor.postprocess(pv, return_tensors="tf")
    with pytest.raises(ValueError, match="batch, 3, H, W"):
        processor.postprocess(torch.zeros(1, 4, 8, 8))


def test_save_load(tmp_path):
    proc = EvoTokImageProcessor(size={"height": 64, "width": 64}, resize_mode="squash")
    proc.save_pretrained(tmp_path)
    again = EvoTokImageProcessor.from_pretrained(tmp_path)
    assert again.resize_mode == "squash" and again.size.height == 64


def test_float_and_16_bit_arrays_give_the_pixels_of_their_8_bit_image(processor):
    """Float arrays and tensors in [0, 1] (the float image convention: scikit-image, `ToTensor`) and 16-bit arrays are
    read on their own scale: the pixels of the same picture as 8-bit, not divided by 255 a second time into black."""
    rgb = np.array(photo(48, 40))
    expected = processor(PIL.Image.fromarray(rgb), return_tensors="pt").pixel_values
    inputs = {
        "float32 in [0, 1]": rgb.astype(np.float32) / 255,
        "float64 in [0, 1]": rgb / 255.0,
        "torch float (3, H, W) in [0, 1]": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        "opaque RGBA float in [0, 1]": np.concatenate([rgb / 255.0, np.ones((40, 48, 1))], axis=-1),
        "float in [0, 255], not integer-valued": rgb.astype(np.float32) + 0.25,
        "uint16": rgb.astype(np.uint16) * 257,
    }
    for name, image in inputs.items():
        got = processor(image, return_tensors="pt").pixel_values
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
    # transformers' convention: `do_rescale=False` takes the values as already in [0, 1]
    as_given = processor(rgb / 255.0, do_rescale=False, return_tensors="pt").pixel_values
    torch.testing.assert_close(as_given, expected, rtol=0, atol=2 / 255)
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor(np.full((8, 8, 3), np.nan, dtype=np.float32), return_tensors="pt")


def test_paths_urls_and_base64_give_the_pil_images_pixels(processor, tmp_path):
    """Strings are opened by the processor, so a file gets the conversion its PIL image gets: transparency composited
    on white (transformers' loader converts to RGB by dropping alpha, which shows a transparent pixel's hidden colour)
    and the EXIF orientation applied."""
    import base64
    import functools
    import http.server
    import threading

    rgba = np.asarray(photo(48, 40).convert("RGBA")).copy()
    rgba[:20, :, 3] = 0  # the top half is transparent over its (random) hidden colours
    image = PIL.Image.fromarray(rgba)
    image.save(tmp_path / "transparent.png")
    expected = processor(image, return_tensors="pt").pixel_values
    encoded = base64.b64encode((tmp_path / "transparent.png").read_bytes()).decode()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/transparent.png"
        for source in (str(tmp_path / "transparent.png"), encoded, "data:image/png;base64," + encoded, url):
            got = processor(source, return_tensors="pt").pixel_values
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=source[:40])
    finally:
        server.shutdown()
        server.server_close()

    upright = photo(48, 40)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: stored rotated, shown turned 90 degrees clockwise
    upright.transpose(PIL.Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png", exif=exif)
    got = processor(str(tmp_path / "rotated.png"), return_tensors="pt").pixel_values
    torch.testing.assert_close(got, processor(upright, return_tensors="pt").pixel_values, rtol=0, atol=0)


def test_a_missing_image_file_is_reported_as_missing(processor, tmp_path):
    """A path that does not exist is named as a missing file (transformers' loader falls back to base64 and reports
    "Incorrect padding"), also when it comes as an image part of a chat."""
    from vlm_helpers import bpe_tokenizer, tiny_processor

    missing = str(tmp_path / "holiday" / "cat.jpg")
    with pytest.raises(ValueError, match=r"image file '.*cat\.jpg' does not exist"):
        processor(missing, return_tensors="pt")
    with pytest.raises(ValueError, match="is a directory"):
        processor(str(tmp_path), return_tensors="pt")
    with pytest.raises(ValueError, match="could not decode the base64 image data"):
        processor("data:image/png;base64,bm90IGFuIGltYWdl", return_tensors="pt")
    chat_processor = tiny_processor(bpe_tokenizer(["describe the image"]))
    messages = [{"role": "user", "content": [{"type": "image", "path": missing}, {"type": "text", "text": "describe"}]}]
    with pytest.raises(ValueError, match="does not exist"):
        chat_processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
