from .configuration_evotok import EVOTOK_PRESETS, EvoTokConfig
from .modeling_evotok import EvoTokEncoderOutput, EvoTokModel, EvoTokModelOutput, EvoTokPreTrainedModel
from .quantizer import EvoTokResidualQuantizer, ResidualQuantizerOutput
