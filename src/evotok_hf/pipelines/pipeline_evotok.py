"""EvoTokPipeline: text-to-image with an EvoTok VLM as a diffusers `DiffusionPipeline`.

The pipeline is a thin shell over the model's own generation path: `EvoTokProcessor(text=..., generation_mode="image")`
builds the prompts, `EvoTokForConditionalGeneration.generate(..., generation_mode="image")` samples the pixel codes
position by position (its `streamer` hook drives the diffusers progress bar), `decode_image_tokens` turns them into
pixels and the image processor's `postprocess` into PIL images, numpy arrays or tensors.

Two folder layouts load with `EvoTokPipeline.from_pretrained`:

* a pipeline folder written by `pipe.save_pretrained` (`model_index.json` + `model/` + `processor/`): diffusers' own
  loader. `model_index.json` names each component by its defining module (e.g.
  `["evotok_hf.modeling.modeling_evotok_vlm", "EvoTokForConditionalGeneration"]`); diffusers resolves such names from
  the modules already imported, which importing this file guarantees.
* a plain VLM folder or Hub repository (`model.save_pretrained` + `processor.save_pretrained`, no `model_index.json`):
  the model and the processor are loaded with their transformers `from_pretrained`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from ..modeling import EvoTokForConditionalGeneration
from ..modeling.generation import resolve_image_generation_config
from ..processing import EvoTokProcessor

logger = logging.getLogger(__name__)

OUTPUT_TYPES = {"pil": "PIL.Image.Image", "np": "np", "pt": "pt"}
# `from_pretrained` arguments that say where files come from: shared by the model and the processor of a plain VLM
# folder; every other argument (dtype, device_map, ...) goes to the model only.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


@dataclass
class EvoTokPipelineOutput(BaseOutput):
    """Output of [`EvoTokPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): `batch * num_images_per_prompt` images,
            grouped by prompt: a list of RGB PIL images (`output_type="pil"`), a float32 array `(batch, H, W, 3)` in
            [0, 1] (`"np"`) or a float32 CPU tensor `(batch, 3, H, W)` in [0, 1] (`"pt"`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class _ProgressStreamer:
    """The `streamer` of `generate_image_codes`: one progress-bar step per generated image position."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, codes: torch.Tensor) -> None:
        self.bar.update(1)

    def end(self) -> None:
        pass


def _has_model_index(path: str | os.PathLike, hub_kwargs: dict) -> bool:
    """Whether `path` (a local folder or a Hub repository id) holds a diffusers `model_index.json`."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, DiffusionPipeline.config_name))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(str(path), DiffusionPipeline.config_name, **hub_kwargs)
    except EntryNotFoundError:  # missing remotely, or (offline) never cached: treat the repository as a plain VLM
        return False
    return True


class EvoTokPipeline(DiffusionPipeline):
    """Text-to-image with EvoTok: an [`EvoTokForConditionalGeneration`] with a generation head (`model`) and its
    [`EvoTokProcessor`] (`processor`).

    ```python
    pipe = EvoTokPipeline.from_pretrained("org/evotok-qwen2.5-7b", dtype=torch.bfloat16).to("cuda")
    images = pipe("a red bicycle", num_images_per_prompt=4,
                  generator=torch.Generator("cuda").manual_seed(0)).images
    ```
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model: EvoTokForConditionalGeneration, processor: EvoTokProcessor):
        super().__init__()
        self.register_modules(model=model, processor=processor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> EvoTokPipeline:
        """Load a pipeline folder (with `model_index.json`, diffusers' loader and arguments) or a plain VLM folder /
        Hub repository without one: then `model` and `processor` are loaded with their own `from_pretrained`, the
        hub arguments (`cache_dir`, `revision`, `token`, `local_files_only`, ...) going to both and every other
        argument (`dtype`, `device_map`, ...) to the model; an already loaded `model=` or `processor=` is used as
        given."""
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        if _has_model_index(pretrained_model_name_or_path, hub_kwargs):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

        model_kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS and k not in ("model", "processor")}
        if "torch_dtype" in model_kwargs:  # the diffusers spelling; transformers 5 reads `dtype`
            model_kwargs.setdefault("dtype", model_kwargs.pop("torch_dtype"))
        model = kwargs.get("model")
        if model is None:
            model = EvoTokForConditionalGeneration.from_pretrained(
                pretrained_model_name_or_path, **hub_kwargs, **model_kwargs
            )
        processor = kwargs.get("processor")
        if processor is None:
            processor = EvoTokProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        return cls(model=model.eval(), processor=processor)

    def _onload_model(self) -> None:
        """Under `enable_model_cpu_offload` the model moves to the accelerator when its `forward` runs; image
        generation calls its parts directly, so run that hook by hand first."""
        hook = getattr(self.model, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self.model)

    @staticmethod
    def _check_inputs(prompt, negative_prompt, num_images_per_prompt, output_type, generator) -> list:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
                raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r}.")
            if len(negative_prompt) != len(prompts):
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries for {len(prompts)} prompts: give one string "
                    "for all prompts or one per prompt."
                )
        count = num_images_per_prompt
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive int, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {sorted(OUTPUT_TYPES)}, got {output_type!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be one torch.Generator (for the whole batch), got {type(generator)}.")
        return prompts

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        generation_config: GenerationConfig | None = None,
        return_dict: bool = True,
        **generate_kwargs,
    ) -> EvoTokPipelineOutput | tuple:
        """Generate images from text prompts.

        Args:
            prompt (`str` or `list[str]`): the text prompt(s).
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional prompt of classifier-free guidance,
                one for all prompts or one per prompt; by default the authors' (a single space).
            guidance_scale (`float`, *optional*): classifier-free guidance scale (1.0 switches guidance off). None:
                the checkpoint's (its `generation_config.guidance_scale`, else the paper's 7.5).
            num_images_per_prompt (`int`): images per prompt; the output groups them by prompt.
            generator (`torch.Generator`, *optional*): one generator on the device the model runs on, for
                reproducible images.
            output_type (`str`): `"pil"`, `"np"` (float32 `(batch, H, W, 3)` in [0, 1]) or `"pt"` (float32
                `(batch, 3, H, W)` in [0, 1], on the CPU).
            generation_config (`GenerationConfig`, *optional*): settings that replace the checkpoint's where set, as
                in `generate`.
            return_dict (`bool`): return an [`EvoTokPipelineOutput`] rather than a tuple `(images,)`.
            generate_kwargs: any other setting of `generate(generation_mode="image")`, e.g. the depth head's
                sampling (`depth_decoder_do_sample`, `depth_decoder_temperature`, `depth_decoder_top_k`,
                `depth_decoder_top_p`: a scalar or one value per pixel depth), `use_cache` or `logits_processor`.
                Unset, the checkpoint's generation config decides. Every setting is checked before any work, by the
                model's own rules (`resolve_image_generation_config`).
        """
        prompts = self._check_inputs(prompt, negative_prompt, num_images_per_prompt, output_type, generator)
        config = self.model.config
        if not config.has_generation_head:
            raise ValueError("EvoTokPipeline needs a checkpoint with an image generation head (has_generation_head).")
        settings = dict(generate_kwargs, guidance_scale=guidance_scale, num_return_sequences=num_images_per_prompt)
        # checked before any work (and before offloading hooks move the model), by the model's own rules
        _, _, unknown = resolve_image_generation_config(self.model, generation_config, **settings)
        unknown.pop("logits_processor", None)  # an argument of `generate`, not a setting
        if unknown:
            raise ValueError(f"EvoTokPipeline: unknown arguments {sorted(unknown)}.")
        inputs = self.processor(text=prompts, generation_mode="image", negative_prompt=negative_prompt,
                                return_tensors="pt")  # fmt: skip

        self._onload_model()
        device = self.model.device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"`generator` is on {generator.device} but the model runs on {device}: create it with "
                f"torch.Generator(device='{device.type}')."
            )
        grid = config.vision_config.grid_size
        with self.progress_bar(total=grid * grid) as bar:
            output = self.model.generate(
                **inputs,
                generation_mode="image",
                generation_config=generation_config,
                generator=generator,
                streamer=_ProgressStreamer(bar),
                **settings,
            )
        codes = output.sequences if isinstance(output, ModelOutput) else output  # return_dict_in_generate=True
        pixels = self.model.decode_image_tokens(codes)
        images = self.processor.image_processor.postprocess(pixels, return_tensors=OUTPUT_TYPES[output_type])
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return EvoTokPipelineOutput(images=images)


__all__ = ["EvoTokPipeline", "EvoTokPipelineOutput"]
