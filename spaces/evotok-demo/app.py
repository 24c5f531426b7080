"""EvoTok demo (a Hugging Face Space): tokenize and reconstruct an image, look at its semantic features per residual
depth, ask the EvoTok VLM about it, and generate an image from text with a VLM that has the generation head.

    python app.py --tokenizer org/evotok [--vlm org/evotok-qwen2.5-7b]       # Hub ids or local folders
    EVOTOK_TOKENIZER=... EVOTOK_VLM=... python app.py                        # the same through the environment

Without a flag or an environment variable, the models named in `space_config.json` next to this file are served: a
Space folder built by scripts/push_space.py carries one. Models are loaded in `main()` (or by the caller of
`load_models`), never at import. The server binds 127.0.0.1 unless `--host` or GRADIO_SERVER_NAME (set by Hugging
Face Spaces) says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageOps  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from evotok_hf import EvoTokForConditionalGeneration, EvoTokImageProcessor, EvoTokModel, EvoTokProcessor  # noqa: E402
from evotok_hf.evaluation.metrics import psnr  # noqa: E402
from evotok_hf.modeling.generation import resolve_image_generation_config  # noqa: E402

logger = logging.getLogger(__name__)

# The models a published Space serves, written by scripts/push_space.py: {"tokenizer": id, "vlm": id or null}.
SPACE_CONFIG_PATH = Path(__file__).with_name("space_config.json")
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
DEFAULT_MAX_UPLOAD_MB = 20.0
DISPLAY_SIZE = 256  # code grids and feature maps are drawn with nearest-neighbour cells up to about this size
GOLDEN_RATIO_CONJUGATE = 0.618033988749895  # hue step that keeps neighbouring code indices far apart in colour
# Images smaller than their box (a tiny tokenizer's 32 x 32) are scaled up to fill it, with sharp pixels.
CSS = """
#recon-preprocessed img, #recon-output img, #t2i-output img { width: 100%; height: 100%; object-fit: contain; }
#recon-preprocessed img, #recon-output img, #recon-codes img, #semantic-pca img { image-rendering: pixelated; }
#t2i-output img, #t2i-codes img { image-rendering: pixelated; }
"""


class DemoModels(NamedTuple):
    tokenizer: EvoTokModel
    image_processor: EvoTokImageProcessor
    vlm: EvoTokForConditionalGeneration | None = None
    vlm_processor: EvoTokProcessor | None = None


def load_models(
    tokenizer_id_or_path: str, vlm_id_or_path: str | None = None, device: str | torch.device | None = None
) -> DemoModels:
    """The tokenizer (`EvoTokModel` + its `EvoTokImageProcessor`) and, optionally, the VLM
    (`EvoTokForConditionalGeneration` + its `EvoTokProcessor`), from Hub ids or local folders. The VLM runs in
    bfloat16 on a GPU (its codebooks stay fp32), float32 on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = EvoTokModel.from_pretrained(tokenizer_id_or_path).to(device).eval()
    image_processor = EvoTokImageProcessor.from_pretrained(tokenizer_id_or_path)
    if not vlm_id_or_path:
        return DemoModels(tokenizer, image_processor)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vlm = EvoTokForConditionalGeneration.from_pretrained(vlm_id_or_path, dtype=dtype).to(device).eval()
    return DemoModels(tokenizer, image_processor, vlm, EvoTokProcessor.from_pretrained(vlm_id_or_path))


# ----------------------------------------------------------------------------- pictures
def _enlarge(rgb: np.ndarray) -> PIL.Image.Image:
    """(grid, grid, 3) uint8 -> a PIL image with square nearest-neighbour cells, about DISPLAY_SIZE wide."""
    cell = max(1, DISPLAY_SIZE // rgb.shape[1])
    image = PIL.Image.fromarray(rgb)
    return image.resize((rgb.shape[1] * cell, rgb.shape[0] * cell), PIL.Image.Resampling.NEAREST)


def code_colour_map(codes: np.ndarray) -> PIL.Image.Image:
    """(grid, grid) code indices -> one colour per index (hue by golden-ratio steps), so equal codes share a colour."""
    hue = np.rint((codes * GOLDEN_RATIO_CONJUGATE) % 1.0 * 255).astype(np.uint8)
    channels = [PIL.Image.fromarray(c) for c in (hue, np.full_like(hue, 170), np.full_like(hue, 235))]
    return _enlarge(np.asarray(PIL.Image.merge("HSV", channels).convert("RGB")))


def pca_rgb(features: list[torch.Tensor], reference: torch.Tensor, grid: int) -> list[PIL.Image.Image]:
    """Each (grid*grid, dim) feature map -> RGB through the top three principal components of `reference`, scaled by
    the reference's range, so the pictures of all maps share one colour scale."""
    mean = reference.mean(0)
    basis = torch.linalg.svd(reference - mean, full_matrices=False).Vh[:3].T
    projected = (reference - mean) @ basis
    low, span = projected.amin(0), (projected.amax(0) - projected.amin(0)).clamp_min(1e-12)
    pictures = []
    for feats in features:
        rgb = (((feats - mean) @ basis - low) / span).clamp(0, 1)
        rgb = F.pad(rgb, (0, 3 - rgb.shape[1]))  # fewer than three components when the features have low rank
        pictures.append(_enlarge(np.rint(rgb.reshape(grid, grid, 3).numpy() * 255).astype(np.uint8)))
    return pictures


def code_table(codes: np.ndarray) -> pd.DataFrame:
    """(grid, grid) code indices -> a table with one column per grid column."""
    return pd.DataFrame(codes, columns=[str(c) for c in range(codes.shape[1])])


# ----------------------------------------------------------------------------- text-to-image settings
def format_depth_setting(value) -> str:
    """A per-depth setting as its settings box shows it: 900 -> "900", [900, 500] -> "900, 500", None -> ""."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return ", ".join("" if v is None else str(v) for v in values)


def parse_depth_setting(text: str | None, name: str, kind: type, pixel_depth: int):
    """A settings box -> a value for every depth ("900" -> 900), one per pixel depth ("900, 500" -> [900, 500]), or
    None for an empty box (the checkpoint's default)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError as err:
        raise gr.Error(
            f"{name}: expected one {kind.__name__} or {pixel_depth} comma-separated ones (one per pixel depth), "
            f"got {text!r}."
        ) from err
    if len(values) == 1:
        return values[0]
    if len(values) != pixel_depth:
        raise gr.Error(f"{name}: give one value or {pixel_depth} (one per pixel depth), got {len(values)}.")
    return values


class ProgressStreamer:
    """The `streamer` of image generation: reports every generated grid position to a `gr.Progress`."""

    def __init__(self, progress, total: int):
        self.progress = progress
        self.total = total
        self.done = 0
        progress((0, total), desc="Generating image positions", unit="positions")

    def put(self, codes: torch.Tensor) -> None:
        self.done += 1
        self.progress((self.done, self.total), desc="Generating image positions", unit="positions")

    def end(self) -> None:
        pass


# ----------------------------------------------------------------------------- the handlers
class EvoTokDemo:
    """What the demo's buttons run: the models, the upload limits, and one method per endpoint."""

    def __init__(
        self,
        tokenizer: EvoTokModel,
        image_processor: EvoTokImageProcessor,
        vlm: EvoTokForConditionalGeneration | None = None,
        vlm_processor: EvoTokProcessor | None = None,
        max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
        max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6),
    ):
        if (vlm is None) != (vlm_processor is None):
            raise ValueError("pass both `vlm` and `vlm_processor`, or neither")
        if max_upload_pixels <= 0 or max_upload_bytes <= 0:
            raise ValueError(f"upload limits must be positive, got {max_upload_pixels} pixels and {max_upload_bytes} B")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.vlm = vlm
        self.vlm_processor = vlm_processor
        self.max_upload_pixels = max_upload_pixels
        self.max_upload_bytes = max_upload_bytes

    def open_upload(self, path: str | None) -> PIL.Image.Image:
        """An uploaded file, as uploaded -> a loaded PIL image in its own mode, upright (EXIF orientation applied, as
        the image processor does for a file); gr.Error (shown to the user) for a missing, oversized or unreadable file.
        Size and pixel count are checked before any pixel is decoded. The mode is left for the image processor to
        convert (alpha over white, 16-bit greys rescaled), so the demo sees what `EvoTokImageProcessor` users see."""
        if not path:
            raise gr.Error("Upload an image first.")
        size = os.path.getsize(path)
        if size > self.max_upload_bytes:
            raise gr.Error(
                f"File too large: {size / 1e6:.1f} MB; this demo accepts at most {self.max_upload_bytes / 1e6:.1f} MB."
            )
        unreadable = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
        try:
            image = PIL.Image.open(path)  # reads the header only
        except unreadable as err:
            raise gr.Error(f"Could not read the image: {err}") from err
        width, height = image.size
        if width * height > self.max_upload_pixels:
            image.close()
            raise gr.Error(
                f"Image too large: {width}x{height} = {width * height / 1e6:.1f} megapixels; this demo accepts at most "
                f"{self.max_upload_pixels / 1e6:.1f} megapixels."
            )
        try:
            image.load()
            return PIL.ImageOps.exif_transpose(image)
        except unreadable as err:
            raise gr.Error(f"Could not read the image: {err}") from err

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        try:
            pixel_values = self.image_processor(image, return_tensors="pt").pixel_values
        except ValueError as err:
            raise gr.Error(str(err)) from err
        return pixel_values.to(self.tokenizer.device)

    @torch.inference_mode()
    def reconstruct(self, path: str | None, depth: float):
        """Image + number of pixel depths k -> (preprocessed input, reconstruction from the first k depths, PSNR text,
        depth-1 code colour map, depth-1 code table)."""
        pixel_depth = self.tokenizer.config.pixel_depth
        if depth is None or not 1 <= int(depth) <= pixel_depth:
            raise gr.Error(f"The depth must be between 1 and {pixel_depth}, got {depth}.")
        depth = int(depth)
        pixel_values = self.preprocess(self.open_upload(path))
        codes = self.tokenizer.encode(pixel_values).codes
        reconstruction = self.tokenizer.decode(codes[..., :depth])
        value = float(psnr(reconstruction, pixel_values)[0])
        size = pixel_values.shape[-1]
        psnr_text = f"PSNR {value:.2f} dB (first {depth} of {pixel_depth} pixel depths, "
        psnr_text += f"vs the {size}x{size} preprocessed input)"
        first_depth = codes[0, ..., 0].cpu().numpy()
        return (
            self.image_processor.postprocess(pixel_values)[0],
            self.image_processor.postprocess(reconstruction)[0],
            psnr_text,
            code_colour_map(first_depth),
            code_table(first_depth),
        )

    @torch.inference_mode()
    def semantic_depths(self, path: str | None):
        """Image -> (table and plot of the mean per-position cosine similarity between the semantic features of the
        first k depths and those of all semantic depths, k = 1..semantic_depth; PCA-to-RGB pictures of the features per
        k)."""
        pixel_values = self.preprocess(self.open_upload(path))
        codes = self.tokenizer.encode(pixel_values).codes
        depths = range(1, self.tokenizer.config.semantic_depth + 1)
        features = [self.tokenizer.get_semantic_features(codes[..., :k])[0].double().cpu() for k in depths]
        cosines = [round(float(F.cosine_similarity(f, features[-1], dim=-1).mean()), 4) for f in features]
        table = pd.DataFrame({"k": list(depths), "cosine": cosines})
        pictures = pca_rgb(features, features[-1], self.tokenizer.config.grid_size)
        return table, table, [(picture, f"k = {k}") for k, picture in zip(depths, pictures)]

    def _suppressed_tokens(self) -> list[int]:
        # An answer is text: image placeholder and image start / end tokens must never be generated.
        config = self.vlm.config
        special = {config.image_token_id, config.boi_token_id, config.eoi_token_id} - {None}
        return sorted(set(self.vlm.generation_config.suppress_tokens or []) | special)

    @torch.inference_mode()
    def chat(self, path: str | None, question: str, max_new_tokens: float) -> str:
        """Image + question -> the VLM's greedy answer (the processor's chat template, one user turn)."""
        if self.vlm is None:
            raise gr.Error("No VLM is configured: start the demo with --vlm or EVOTOK_VLM.")
        if not self.vlm.config.has_understanding_head:
            raise gr.Error("This VLM has no understanding head: it cannot read images.")
        if not question or not question.strip():
            raise gr.Error("Type a question about the image.")
        image = self.open_upload(path)
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        try:
            inputs = self.vlm_processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        except ValueError as err:
            raise gr.Error(str(err)) from err
        inputs = inputs.to(self.vlm.device)
        output = self.vlm.generate(
            **inputs, max_new_tokens=int(max_new_tokens), do_sample=False, suppress_tokens=self._suppressed_tokens()
        )
        answer = output[0, inputs["input_ids"].shape[1] :]
        return self.vlm_processor.tokenizer.decode(answer, skip_special_tokens=True).strip()

    @torch.inference_mode()
    def text_to_image(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance_scale: float,
        do_sample: bool,
        seed: float | None,
        temperature: str | None,
        top_k: str | None,
        top_p: str | None,
        progress=gr.Progress(),
    ):
        """Prompt (+ optional negative prompt) and sampling settings -> (generated image, depth-1 code colour map,
        depth-1 code table). The same as `vlm.generate(**vlm_processor(text=prompt, generation_mode="image",
        negative_prompt=...), generation_mode="image", ..., generator=torch.Generator().manual_seed(seed))`, decoded
        by `vlm.decode_image_tokens` and `vlm_processor.image_processor.postprocess`; an empty negative prompt is the
        model's default one, an empty settings box the checkpoint's default."""
        if self.vlm is None or not self.vlm.config.has_generation_head:
            raise gr.Error("No VLM with a generation head is configured: start the demo with such a --vlm.")
        if not prompt or not prompt.strip():
            raise gr.Error("Type a prompt.")
        if seed is None or not float(seed).is_integer() or not 0 <= seed < 2**63:
            raise gr.Error(f"The seed must be a whole number between 0 and 2**63 - 1, got {seed}.")
        vision = self.vlm.config.vision_config
        settings = {  # the depth head's sampling, as `generate` names it
            "depth_decoder_do_sample": do_sample,
            "depth_decoder_temperature": parse_depth_setting(temperature, "Temperature", float, vision.pixel_depth),
            "depth_decoder_top_k": parse_depth_setting(top_k, "Top-k", int, vision.pixel_depth),
            "depth_decoder_top_p": parse_depth_setting(top_p, "Top-p", float, vision.pixel_depth),
        }
        negative_prompt = negative_prompt if negative_prompt and negative_prompt.strip() else None
        inputs = self.vlm_processor(text=prompt, generation_mode="image", negative_prompt=negative_prompt,
                                    return_tensors="pt").to(self.vlm.device)  # fmt: skip
        generator = torch.Generator(device=self.vlm.device).manual_seed(int(seed))
        try:
            codes = self.vlm.generate(
                **inputs,
                generation_mode="image",
                guidance_scale=guidance_scale,  # as given: the model checks every setting (one rule for all callers)
                generator=generator,
                streamer=ProgressStreamer(progress, vision.grid_size**2),
                **settings,
            )
        except ValueError as err:  # e.g. a top-p outside (0, 1], a guidance scale that is not a finite number
            raise gr.Error(str(err)) from err
        image = self.vlm_processor.image_processor.postprocess(self.vlm.decode_image_tokens(codes))[0]
        first_depth = codes[0, ..., 0].cpu().numpy()
        return image, code_colour_map(first_depth), code_table(first_depth)


# ----------------------------------------------------------------------------- the page
def _model_summary(tokenizer: EvoTokModel, vlm: EvoTokForConditionalGeneration | None) -> str:
    config = tokenizer.config
    lines = [
        "# EvoTok: one residual code trajectory for pixels and semantics",
        f"Tokenizer `{config.name_or_path or 'in memory'}`: {config.image_size}x{config.image_size} images -> "
        f"{config.grid_size}x{config.grid_size} grid, {config.num_depths} residual depths "
        f"(the first {config.pixel_depth} reconstruct pixels, the first {config.semantic_depth} give semantic "
        "features), "
        f"codebooks of {config.codebook_size}.",
    ]
    if vlm is not None:
        heads = {"understanding (chat)": vlm.config.has_understanding_head,
                 "generation (text to image)": vlm.config.has_generation_head}  # fmt: skip
        heads = [name for name, present in heads.items() if present]
        lines.append(f"VLM `{vlm.config.name_or_path or 'in memory'}` with the {' and '.join(heads)} head"
                     f"{'s' if len(heads) > 1 else ''}.")  # fmt: skip
    return "\n\n".join(lines)


def upload_box(elem_id: str) -> gr.Image:
    """An image upload that hands the handler the uploaded file untouched. gradio's default `image_mode="RGB"` would
    decode and convert the file before the handler's size check (a transparent PNG keeping its hidden colours, a
    16-bit grey turning white); with `image_mode=None` gradio reads only the header and passes the file's path."""
    return gr.Image(type="filepath", image_mode=None, label="Image", elem_id=elem_id)


def _reconstruct_tab(handlers: EvoTokDemo) -> None:
    pixel_depth = handlers.tokenizer.config.pixel_depth
    with gr.Row():
        with gr.Column():
            image = upload_box("recon-input")
            depth = gr.Slider(1, pixel_depth, value=pixel_depth, step=1, label="Pixel depths k", elem_id="recon-depth",
                              info="Decode from the sum of the first k code embeddings")  # fmt: skip
            button = gr.Button("Tokenize & reconstruct", variant="primary", elem_id="recon-button")
        with gr.Column():
            with gr.Row():
                preprocessed = gr.Image(label="Preprocessed input", format="png", interactive=False,
                                        height=DISPLAY_SIZE, elem_id="recon-preprocessed")  # fmt: skip
                reconstruction = gr.Image(label="Reconstruction", format="png", interactive=False,
                                          height=DISPLAY_SIZE, elem_id="recon-output")  # fmt: skip
            psnr_text = gr.Textbox(label="PSNR", interactive=False, elem_id="recon-psnr")
    with gr.Row():
        code_map = gr.Image(label="Depth-1 codes (one colour per code)", format="png", interactive=False,
                            elem_id="recon-codes")  # fmt: skip
        code_table = gr.Dataframe(label="Depth-1 codes", interactive=False, elem_id="recon-code-table")
    button.click(
        handlers.reconstruct,
        inputs=[image, depth],
        outputs=[preprocessed, reconstruction, psnr_text, code_map, code_table],
        api_name="reconstruct",
    )


def _semantic_tab(handlers: EvoTokDemo) -> None:
    gr.Markdown(
        "Mean cosine similarity, over the grid positions, between the semantic features decoded from the first k "
        f"depths and from all {handlers.tokenizer.config.semantic_depth} semantic depths; below, the features of each "
        "k in the three principal directions of the all-depth features (as RGB)."
    )
    with gr.Row():
        with gr.Column():
            image = upload_box("semantic-input")
            button = gr.Button("Compare depths", variant="primary", elem_id="semantic-button")
        with gr.Column():
            table = gr.Dataframe(label="Cosine to all depths", interactive=False, elem_id="semantic-table")
            plot = gr.LinePlot(x="k", y="cosine", y_lim=[None, 1.0], label="Cosine to all depths",
                               elem_id="semantic-plot")  # fmt: skip
    pca = gr.Gallery(label="Semantic features (PCA to RGB)", columns=4, format="png", elem_id="semantic-pca")
    button.click(handlers.semantic_depths, inputs=[image], outputs=[table, plot, pca], api_name="semantic_depths")


def _chat_tab(handlers: EvoTokDemo) -> None:
    if handlers.vlm is None:
        gr.Markdown(
            "No VLM is configured. Start the demo with `--vlm <Hub id or folder>` or set the `EVOTOK_VLM` environment "
            "variable (a Space variable on Hugging Face) to an EvoTok VLM checkpoint.",
            elem_id="chat-note",
        )
        return
    with gr.Row():
        with gr.Column():
            image = upload_box("chat-image")
            question = gr.Textbox(label="Question", value="Describe the image.", elem_id="chat-question")
            max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="Max new tokens",
                                       elem_id="chat-max-new-tokens")  # fmt: skip
            button = gr.Button("Ask", variant="primary", elem_id="chat-button")
        answer = gr.Textbox(label="Answer (greedy)", lines=8, interactive=False, elem_id="chat-answer")
    button.click(handlers.chat, inputs=[image, question, max_new_tokens], outputs=[answer], api_name="chat")


def _text_to_image_tab(handlers: EvoTokDemo) -> None:
    # the settings `generate(generation_mode="image")` uses when given none: the checkpoint's generation config
    defaults, depth_defaults, _ = resolve_image_generation_config(handlers.vlm)
    guidance = defaults.guidance_scale
    pixel_depth = handlers.vlm.config.vision_config.pixel_depth
    per_depth = f"one value, or {pixel_depth} comma-separated (one per pixel depth)"
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", value="A red bicycle on a green hill.", elem_id="t2i-prompt")
            negative = gr.Textbox(label="Negative prompt (optional)", elem_id="t2i-negative",
                                  placeholder="Empty: the model's unconditional prompt")  # fmt: skip
            guidance_scale = gr.Slider(1.0, max(15.0, guidance), value=guidance, step=0.1, label="Guidance scale",
                                       info="Classifier-free guidance; 1 turns it off",
                                       elem_id="t2i-guidance")  # fmt: skip
            with gr.Row():
                do_sample = gr.Checkbox(value=depth_defaults.do_sample, label="Sample",
                                        info="Off: the most likely code at every depth",
                                        elem_id="t2i-sample")  # fmt: skip
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="t2i-seed")
            with gr.Accordion("Sampling settings", open=False):
                temperature = gr.Textbox(label="Temperature", value=format_depth_setting(depth_defaults.temperature),
                                         info=per_depth, elem_id="t2i-temperature")  # fmt: skip
                top_k = gr.Textbox(label="Top-k", value=format_depth_setting(depth_defaults.top_k),
                                   info=f"{per_depth}; 0 turns it off", elem_id="t2i-top-k")  # fmt: skip
                top_p = gr.Textbox(label="Top-p", value=format_depth_setting(depth_defaults.top_p),
                                   info=f"{per_depth}; 1.0 turns it off", elem_id="t2i-top-p")  # fmt: skip
            button = gr.Button("Generate", variant="primary", elem_id="t2i-button")
        with gr.Column():
            output = gr.Image(label="Generated image", format="png", interactive=False, height=DISPLAY_SIZE,
                              elem_id="t2i-output")  # fmt: skip
            code_map = gr.Image(label="Depth-1 codes (one colour per code)", format="png", interactive=False,
                                elem_id="t2i-codes")  # fmt: skip
    codes = gr.Dataframe(label="Depth-1 codes", interactive=False, elem_id="t2i-code-table")
    button.click(
        handlers.text_to_image,
        inputs=[prompt, negative, guidance_scale, do_sample, seed, temperature, top_k, top_p],
        outputs=[output, code_map, codes],
        api_name="text_to_image",
    )


def build_demo(
    tokenizer: EvoTokModel,
    image_processor: EvoTokImageProcessor,
    vlm: EvoTokForConditionalGeneration | None = None,
    vlm_processor: EvoTokProcessor | None = None,
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6),
) -> gr.Blocks:
    """The demo page. Endpoints (api_name): "reconstruct", "semantic_depths", "chat" when the VLM has the understanding
    head and "text_to_image" when it has the generation head. Without a VLM the Chat tab says how to configure one."""
    handlers = EvoTokDemo(tokenizer, image_processor, vlm, vlm_processor, max_upload_pixels, max_upload_bytes)
    with gr.Blocks(title="EvoTok demo") as demo:
        gr.Markdown(_model_summary(tokenizer, vlm), elem_id="model-info")
        with gr.Tabs():
            with gr.Tab("Tokenize & reconstruct", id="reconstruct", elem_id="tab-reconstruct"):
                _reconstruct_tab(handlers)
            with gr.Tab("Semantic depths", id="semantic", elem_id="tab-semantic"):
                _semantic_tab(handlers)
            if vlm is None or vlm.config.has_understanding_head:
                with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                    _chat_tab(handlers)
            if vlm is not None and vlm.config.has_generation_head:
                with gr.Tab("Text to image", id="text-to-image", elem_id="tab-text-to-image"):
                    _text_to_image_tab(handlers)
    return demo


def launch_demo(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6),
    prevent_thread_lock: bool = False,
):
    """Serve the demo with a request queue; gradio itself refuses uploads over `max_upload_bytes` while they stream."""
    return demo.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        max_file_size=max_upload_bytes,
        show_error=True,
        css=CSS,
        prevent_thread_lock=prevent_thread_lock,
    )


def space_defaults(path: str | os.PathLike | None = None) -> dict[str, str | None]:
    """The models named in a Space's `space_config.json` (default: SPACE_CONFIG_PATH); {} when there is none."""
    path = Path(path or SPACE_CONFIG_PATH)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("tokenizer"), str)
        or not isinstance(data.get("vlm"), (str, type(None)))
    ):
        raise ValueError(f'{path} must hold {{"tokenizer": "<Hub id>", "vlm": "<Hub id>" or null}}, got {data!r}')
    return {"tokenizer": data["tokenizer"], "vlm": data.get("vlm")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = space_defaults()  # below the environment: a Space variable overrides the published models
    parser.add_argument("--tokenizer", default=os.environ.get("EVOTOK_TOKENIZER", defaults.get("tokenizer")),
                        help="EvoTok tokenizer: Hub id or local folder (env EVOTOK_TOKENIZER, then "
                             "space_config.json)")  # fmt: skip
    parser.add_argument("--vlm", default=os.environ.get("EVOTOK_VLM", defaults.get("vlm")),
                        help="EvoTok VLM: Hub id or local folder (env EVOTOK_VLM, then space_config.json); enables "
                             "the Chat tab (understanding head) and the Text-to-image tab (generation head); an empty "
                             "EVOTOK_VLM turns it off")  # fmt: skip
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1; Spaces set GRADIO_SERVER_NAME=0.0.0.0)")  # fmt: skip
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help="largest accepted upload, in MB")  # fmt: skip
    parser.add_argument("--max-upload-megapixels", type=float, default=DEFAULT_MAX_UPLOAD_PIXELS / 1e6,
                        help="largest accepted image, in megapixels")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.tokenizer:
        parser.error(
            "no tokenizer: pass --tokenizer <Hub id or folder>, set EVOTOK_TOKENIZER, or build the Space folder with "
            "scripts/push_space.py (it writes space_config.json)"
        )
    if args.max_upload_mb <= 0 or args.max_upload_megapixels <= 0:
        parser.error("upload limits must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logger.info("loading tokenizer %s%s", args.tokenizer, f" and VLM {args.vlm}" if args.vlm else "")
    models = load_models(args.tokenizer, args.vlm, device=args.device)
    max_upload_bytes = int(args.max_upload_mb * 1e6)
    demo = build_demo(
        *models, max_upload_pixels=int(args.max_upload_megapixels * 1e6), max_upload_bytes=max_upload_bytes
    )
    launch_demo(demo, host=args.host, port=args.port, max_upload_bytes=max_upload_bytes)


if __name__ == "__main__":
    main()
