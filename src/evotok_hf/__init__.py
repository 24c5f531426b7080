"""evotok_hf: EvoTok, a unified image tokenizer for understanding and generation, native to the Hugging Face stack.

Importing the package registers `AutoConfig`, `AutoModel` and `AutoImageProcessor` for model_type "evotok".
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .modeling import (
    EVOTOK_PRESETS,
    EvoTokConfig,
    EvoTokEncoderOutput,
    EvoTokModel,
    EvoTokModelOutput,
    EvoTokPreTrainedModel,
    EvoTokResidualQuantizer,
)
from .processing import EvoTokImageProcessor

__version__ = "0.1.0.dev0"

AutoConfig.register(EvoTokConfig.model_type, EvoTokConfig, exist_ok=True)
AutoModel.register(EvoTokConfig, EvoTokModel, exist_ok=True)
AutoImageProcessor.register(EvoTokConfig, image_processor_classes={"pil": EvoTokImageProcessor}, exist_ok=True)

__all__ = [
    "EVOTOK_PRESETS",
    "EvoTokConfig",
    "EvoTokEncoderOutput",
    "EvoTokImageProcessor",
    "EvoTokModel",
    "EvoTokModelOutput",
    "EvoTokPreTrainedModel",
    "EvoTokResidualQuantizer",
]
