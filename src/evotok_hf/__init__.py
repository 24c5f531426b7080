"""evotok_hf: EvoTok, a unified image tokenizer for understanding and generation, native to the Hugging Face stack.

Importing the package registers `AutoConfig`, `AutoModel` and `AutoImageProcessor` for model_type "evotok" (the
tokenizer), and `AutoConfig`, `AutoModelForImageTextToText`, `AutoModelForCausalLM`, `AutoModel` (all three the whole
VLM) and `AutoProcessor` for "evotok_vlm" (the VLM).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling import (
    EVOTOK_PRESETS,
    EvoTokConfig,
    EvoTokDepthHeadConfig,
    EvoTokDepthTransformer,
    EvoTokEncoderOutput,
    EvoTokForConditionalGeneration,
    EvoTokModel,
    EvoTokModelOutput,
    EvoTokPreTrainedModel,
    EvoTokResidualQuantizer,
    EvoTokVLMConfig,
)
from .processing import EvoTokImageProcessor, EvoTokProcessor

__version__ = "0.1.0.dev0"

AutoConfig.register(EvoTokConfig.model_type, EvoTokConfig, exist_ok=True)
AutoModel.register(EvoTokConfig, EvoTokModel, exist_ok=True)
AutoImageProcessor.register(EvoTokConfig, image_processor_classes={"pil": EvoTokImageProcessor}, exist_ok=True)
AutoConfig.register(EvoTokDepthHeadConfig.model_type, EvoTokDepthHeadConfig, exist_ok=True)
AutoModel.register(EvoTokDepthHeadConfig, EvoTokDepthTransformer, exist_ok=True)
AutoConfig.register(EvoTokVLMConfig.model_type, EvoTokVLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(EvoTokVLMConfig, EvoTokForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(EvoTokVLMConfig, EvoTokForConditionalGeneration, exist_ok=True)
# The whole VLM, as the auto_map of an exported folder says (hub/remote_code.py): a folder gives the same class with
# or without the package imported.
AutoModel.register(EvoTokVLMConfig, EvoTokForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(EvoTokVLMConfig, image_processor_classes={"pil": EvoTokImageProcessor}, exist_ok=True)
AutoProcessor.register(EvoTokVLMConfig, EvoTokProcessor, exist_ok=True)



def __getattr__(name):
    # The diffusers pipeline is imported on first use, so `import evotok_hf` does not pull in diffusers.
    if name in ("EvoTokPipeline", "EvoTokPipelineOutput"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'evotok_hf' has no attribute {name!r}")


__all__ = [
    "EVOTOK_PRESETS",
    "EvoTokConfig",
    "EvoTokDepthHeadConfig",
    "EvoTokDepthTransformer",
    "EvoTokEncoderOutput",
    "EvoTokForConditionalGeneration",
    "EvoTokImageProcessor",
    "EvoTokModel",
    "EvoTokModelOutput",
    "EvoTokPipeline",
    "EvoTokPipelineOutput",
    "EvoTokPreTrainedModel",
    "EvoTokProcessor",
    "EvoTokResidualQuantizer",
    "EvoTokVLMConfig",
]
