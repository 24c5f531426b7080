"""Configuration of EvoTok's residual-depth head (the image-generation head of the multimodal LLM).

At every image position the LLM's hidden state starts a short causal sequence over the residual depths: the head
predicts the code of depth 0 from that state, then the code of depth d from the state and the cumulative sums of the
code embeddings already chosen. It is the RQ-Transformer depth transformer of VILA-U / UniTok, as used by the EvoTok
authors (their `rqtransformer`): 6 pre-norm GPT blocks of width 2560 with 40 heads on top of Qwen2.5-7B.
"""

from __future__ import annotations

from transformers.activations import ACT2FN

from .configuration_evotok import RemoteCodeConfig


class EvoTokDepthHeadConfig(RemoteCodeConfig):
    r"""Configuration of [`EvoTokDepthTransformer`]. Defaults describe the authors' head on Qwen2.5-7B.

    Args:
        hidden_size (`int`, defaults to 2560): width E of the depth transformer.
        num_hidden_layers (`int`, defaults to 6): causal transformer blocks.
        num_attention_heads (`int`, defaults to 40): attention heads per block; must divide `hidden_size`.
        intermediate_size (`int`, *optional*): width of the MLP; by default `4 * hidden_size` (as in the authors' head).
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact, erf-based GELU in the authors' head).
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm (PyTorch's default, which the authors'
            head uses).
        resid_dropout (`float`, defaults to 0.1): dropout on the attention and MLP outputs before each residual add
            (training only).
        attention_dropout (`float`, defaults to 0.0): dropout on the attention weights (training only).
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal init of linear layers and of the
            normal init of the depth embeddings.
        code_dim (`int`, defaults to 32): width of the tokenizer's code embeddings (its `codebook_dim`).
        codebook_size (`int`, defaults to 32768): entries per codebook, i.e. classes of each depth's classifier.
        pixel_depth (`int`, defaults to 4): residual depths the head predicts (the tokenizer's `pixel_depth`); one
            depth embedding and one classifier per depth.
        llm_hidden_size (`int`, defaults to 3584): width of the LLM hidden state that starts each depth sequence
            (3584 for Qwen2.5-7B).
    """

    model_type = "evotok_depth_head"

    hidden_size: int = 2560
    num_hidden_layers: int = 6
    num_attention_heads: int = 40
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    resid_dropout: float = 0.1
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    code_dim: int = 32
    codebook_size: int = 32768
    pixel_depth: int = 4
    llm_hidden_size: int = 3584

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self._validate_depth_head()

    def _validate_depth_head(self) -> None:
        for name in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "code_dim",
            "codebook_size", "pixel_depth", "llm_hidden_size",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EvoTokDepthHeadConfig: `{name}` must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"EvoTokDepthHeadConfig: `hidden_size` ({self.hidden_size}) must be divisible by "
                f"`num_attention_heads` ({self.num_attention_heads})."
            )
        for name in ("resid_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"EvoTokDepthHeadConfig: `{name}` must lie in [0, 1), got {value!r}.")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EvoTokDepthHeadConfig: `{name}` must be a positive number, got {value!r}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"EvoTokDepthHeadConfig: `hidden_act` {self.hidden_act!r} is not a known activation.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["EvoTokDepthHeadConfig"]
