"""diffusers integration: [`EvoTokPipeline`], text-to-image with an EvoTok VLM.

diffusers is an optional dependency (`pip install evotok_hf[diffusers]`), imported only when this subpackage is.
"""

from .pipeline_evotok import EvoTokPipeline, EvoTokPipelineOutput

__all__ = ["EvoTokPipeline", "EvoTokPipelineOutput"]
