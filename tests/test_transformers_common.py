"""transformers' own common tests, run against our classes as a client nobody here wrote: `ModelTesterMixin` and
`ConfigTester` from the transformers sdist matching the installed version (fetched by `transformers_common`), on tiny
configs of the image tokenizer (`EvoTokModel`), the VLM reading images, the VLM with the image-generation head, and
the residual-depth head (`EvoTokDepthTransformer`).

Every skip has its one-line reason in this file: the tests we skip are named with theirs in the `*_SKIPS` tables, and
the skips the mixin takes by itself are matched against `MIXIN_SKIP_REASONS`, which says why each holds for our
classes; a skip with any other reason fails (`CommonTests.skipTest`, `test_decorator_skips_are_explained`), so a newer
transformers cannot skip one of its checks here unnoticed.
"""

import inspect
import unittest
from unittest.mock import patch

import pytest
import torch

from transformers_common import CommonTestsUnavailable, load_common_tests

try:
    test_modeling_common, test_configuration_common = load_common_tests()
except CommonTestsUnavailable as error:
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)

from transformers import Qwen2Config  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from evotok_hf import (  # noqa: E402
    EvoTokConfig,
    EvoTokDepthHeadConfig,
    EvoTokDepthTransformer,
    EvoTokForConditionalGeneration,
    EvoTokModel,
    EvoTokVLMConfig,
)
from evotok_hf.modeling.modeling_evotok_vlm import EvoTokVLMModel  # noqa: E402

ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester

@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """The mixin runs hundreds of tiny models whose ops are too small to share between threads: one thread is faster,
    and on a busy machine several times faster (synchronising threads that wait for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Token ids of the tiny VLMs: the special tokens sit below 5 so that the mixin's clamping of ids into a shrunk
# vocabulary (`test_resize_tokens_embeddings`) never turns text into image placeholders or back.
PAD, IMAGE, BOI, EOI, EOS = 0, 1, 2, 3, 4
VOCAB = 99


# Skips the mixin takes by itself (text found in its reason -> why that holds for our classes).
MIXIN_SKIP_REASONS = {
    # hardware and optional packages (the mixin's `require_*` decorators)
    "test requires": "an accelerator, flash-attention, deepspeed, the kernels library or MPS: not on the CPU machines",
    "test is slow": "transformers' own slow marker: runs only with RUN_SLOW=1, as in transformers' CI",
    # features our classes do not have
    "does not support grouped_mm": "no mixture-of-experts layers",
    "has no sparse experts": "no mixture-of-experts layers",
    "has no `output_router_logits`": "no mixture-of-experts layers",
    "does not support sliding window mask": "no sliding-window attention",
    "does not have position embeddings": "no resizable position embeddings (the LLM's RoPE has none)",
    "does not have partial rope supported": "the only RoPE is the LLM's (Qwen2, full rotation), tested by transformers",
    "has no axial RoPE layer defined": "no vision RoPE: the tokenizer's encoder is SigLIP with learned positions",
    "has no `base_model_class` defined in tester": "the RoPE-scaling tests need the backbone class; the generation "
    "class runs only the full model (its backbone runs in EvoTokVLMUnderstandingCommonTest)",
    "Model is not an encoder-decoder": "decoder-only",
    "No sequence-to-sequence language modeling head to check": "decoder-only",
    "No decoder-only language modeling head to check": "the tokenizer and the depth head have no LM head",
    "No model with a differentiable loss": "the tokenizer and the depth head have no loss output",
    "doesn't use `inputs_embeds`": "the tokenizer and the depth head take pixels / hidden states, not token embeddings",
    "test_resize_embeddings is set to `False`": "the tokenizer and the depth head have no token embeddings",
    "does not have a TP plan": "only the VLM (its LLM) has a tensor-parallel plan",
    "has no _keep_in_fp32_modules": "the depth head keeps nothing in fp32 (only the tokenizer's codebooks are)",
    "No conversion found for": "no checkpoint key renaming registered with transformers (the official checkpoints "
    "convert through evotok_hf.hub.convert_official)",
    "Only PrefixChange conversions found for": "likewise: only transformers' own prefix handling applies",
    # the mixin's wording when a dispatch test for one kind of model meets the other kind; each kind runs its own
    "does not support SDPA": "the non-composite SDPA-dispatch test meeting a composite model (the VLM, the tokenizer "
    "with its SigLIP encoder), or the composite one meeting the depth head; each runs the other test or says why not",
    "is not a composite model": "the depth head: the non-composite attention tests run instead",
    "This model is not composite": "the depth head: the non-composite attention tests run instead",
    "No subconfigs so the test does not make sense": "the depth head's config has no sub-configs",
}


def explained(reason: str) -> bool:
    return any(text in reason for text in MIXIN_SKIP_REASONS)


class CommonTests(ModelTesterMixin):
    """The mixin, with the checks it saves for models it ranks as recent turned on for ours, and only the skips this
    file explains."""

    # Otherwise skipped for models whose config file has no copyright year of 2023 or later ("not prioritized").
    test_can_init_all_missing_weights_before_2023 = True

    def skipTest(self, reason):
        if not explained(reason):
            self.fail(f"transformers' common tests skipped this for a reason this file does not explain: {reason}")
        super().skipTest(reason)


def skip_tests(reasons: dict[str, str]):
    """Class decorator: replace each named mixin test by a skip carrying its reason."""

    def decorate(cls):
        for name, reason in reasons.items():
            if not hasattr(cls, name):
                raise AttributeError(f"{cls.__name__} has no test {name!r} to skip")

            def skipped(self, reason=reason):
                raise unittest.SkipTest(reason)

            skipped.__name__ = name
            setattr(cls, name, skipped)
        return cls

    return decorate


# Skips that hold for every class below.
COMMON_SKIPS = {
    "test_generation_tester_mixin_inheritance": (
        "GenerationTesterMixin lives in transformers' repository (tests/generation/test_utils.py), not in the sdist"
    ),
}


def tiny_tokenizer_config() -> EvoTokConfig:
    """The "evotok-tiny" tokenizer with a 2-layer encoder (the mixin's size limit); layer -2 feeds the quantiser."""
    return EvoTokConfig.from_preset("evotok-tiny", encoder_config={"num_hidden_layers": 2})


def random_pixels(batch: int, size: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


# ----------------------------------------------------------------------------- EvoTokModel (the image tokenizer)
class EvoTokModelTester:
    def __init__(self, parent, batch_size: int = 2):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = True
        config = tiny_tokenizer_config()
        self.image_size = config.image_size
        self.patch_size = config.encoder_config.patch_size
        self.num_channels = 3
        # the sizes the mixin reads (e.g. its two-layer limit): the semantic decoder's
        self.hidden_size = config.semantic_decoder_hidden_size
        self.num_hidden_layers = config.semantic_decoder_layers
        self.num_attention_heads = config.semantic_decoder_num_heads
        self.seq_length = config.grid_size**2

    def get_config(self) -> EvoTokConfig:
        return tiny_tokenizer_config()

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), {"pixel_values": random_pixels(self.batch_size, self.image_size)}


EMA_BUFFER = (
    "the quantiser's `embed_ema` buffer starts as a copy of the random codebook (EMA of code sums), so two "
    "separately initialised models differ by design"
)
NO_TOKEN_EMBEDDINGS = "no token embeddings: the inputs are {}"
# The tokenizer's forward is a round trip (encoder, quantiser, two decoders) with no layer sequence whose hidden states
# or attention weights it could return, as transformers' Encodec; asking for them raises.
NO_LAYER_OUTPUTS = "the tokenizer returns no per-layer hidden states / attentions (a codec round trip, as Encodec)"
EAGER_MATCHES_SDPA = [name for name in dir(ModelTesterMixin) if name.startswith("test_eager_matches_sdpa_inference_")]
TOKENIZER_KERNELS_COMPARED = (
    NO_LAYER_OUTPUTS + ", which the mixin compares; test_attention_interface.py::"
    "test_tokenizer_eager_matches_sdpa_in_float64 compares encode / decode / semantic features"
)
TOKENIZER_NO_LOSS = (
    "no loss output: the tokenizer's objective is assembled by training/losses.py; gradients and checkpointing are "
    "test_model.py's test_forward_gradients_reach_encoder_from_both_paths / test_gradient_checkpointing_*"
)


@skip_tests(
    COMMON_SKIPS
    | {
        "test_model_get_set_embeddings": NO_TOKEN_EMBEDDINGS.format("images"),
        "test_hidden_states_output": NO_LAYER_OUTPUTS,
        "test_retain_grad_hidden_states_attentions": NO_LAYER_OUTPUTS,
        "test_capture_outputs_decorator": NO_LAYER_OUTPUTS + "; the nested SigLIP encoder's are its own",
        "test_can_capture_specific_layers_hidden_states": NO_LAYER_OUTPUTS + "; the nested SigLIP's are its own",
        "test_model_outputs_equivalence": NO_LAYER_OUTPUTS + "; the return_dict half is "
        "test_transformers_conventions.py::test_tokenizer_forward_follows_return_dict",
        "test_attention_outputs": NO_LAYER_OUTPUTS,
        "test_sdpa_can_dispatch_composite_models": "written for a vision tower beside a language model; the "
        "tokenizer's dispatch is test_attention_interface.py::test_set_attn_implementation_runs_the_named_kernel_in_"
        "every_attention_module, and test_attn_implementation_composite_models runs",
        "test_training": TOKENIZER_NO_LOSS,
        "test_training_gradient_checkpointing": TOKENIZER_NO_LOSS,
        "test_training_gradient_checkpointing_use_reentrant_false": TOKENIZER_NO_LOSS,
        "test_training_gradient_checkpointing_use_reentrant_true": TOKENIZER_NO_LOSS,
        "test_init_weights_can_init_buffers": EMA_BUFFER,
    }
    | {name: TOKENIZER_KERNELS_COMPARED for name in EAGER_MATCHES_SDPA}
)
class EvoTokModelCommonTest(CommonTests, unittest.TestCase):
    all_model_classes = (EvoTokModel,)
    test_resize_embeddings = False  # an image model: no token embeddings
    # A composite model: the nested SigLIP encoder has its own sub-config (`encoder_config`), so the mixin's tests of
    # per-sub-config attention implementations (a dict at loading and in `set_attn_implementation`) apply.
    _is_composite = True

    def setUp(self):
        self.model_tester = EvoTokModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=EvoTokConfig, has_text_modality=False, codebook_size=64, pixel_depth=2
        )

    def test_config(self):
        self.config_tester.run_common_tests()


# ----------------------------------------------------------------------------- the VLM
class EvoTokVLMTester:
    """Prompts `text, <image> x grid*grid, text` (reading) or `text, <boi>, <image> x grid*grid, <eoi>, text`
    (a teacher-forced image to generate, with its codes), one image per row."""

    def __init__(self, parent, generation: bool, batch_size: int = 2):
        self.parent = parent
        self.generation = generation
        self.batch_size = batch_size
        self.is_training = True
        self.vision_config = tiny_tokenizer_config()
        self.text_config = dict(
            model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=PAD,
            eos_token_id=EOS, max_position_embeddings=64,
        )  # fmt: skip
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.vocab_size = VOCAB
        self.num_image_tokens = self.vision_config.grid_size**2
        self.seq_length = self.num_image_tokens + (6 if generation else 4)

    def get_config(self) -> EvoTokVLMConfig:
        heads = dict(has_generation_head=True, has_understanding_head=False, wrap_image_tokens=True)
        return EvoTokVLMConfig(
            vision_config=self.vision_config.to_dict(), text_config=Qwen2Config(**self.text_config).to_dict(),
            image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI,
            depth_head_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "resid_dropout": 0.0},
            **(heads if self.generation else {}),
        )  # fmt: skip

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        batch, grid = self.batch_size, self.vision_config.grid_size
        text = torch.randint(5, VOCAB, (batch, 4))
        images = torch.full((batch, self.num_image_tokens), IMAGE)
        if self.generation:
            column = torch.full((batch, 1), 0)
            input_ids = torch.cat([text[:, :2], column + BOI, images, column + EOI, text[:, 2:]], dim=1)
            depth = config.vision_config.pixel_depth
            codes = torch.randint(0, self.vision_config.codebook_size, (batch, grid, grid, depth))
            inputs = {"input_ids": input_ids, "generation_codes": codes}
        else:
            input_ids = torch.cat([text[:, :2], images, text[:, 2:]], dim=1)
            inputs = {"input_ids": input_ids, "pixel_values": random_pixels(batch, self.vision_config.image_size)}
        inputs["attention_mask"] = torch.ones_like(input_ids)
        return config, inputs


FROZEN_TOKENIZER_CHECKPOINTING = (
    "the mixin watches the first checkpointing layer, which sits in the frozen image tokenizer (always in eval mode, "
    "never checkpointed by design); test_vlm.py::test_gradient_checkpointing_gives_same_gradients covers the LLM"
)
IMAGE_FEATURES_TENSOR = (
    "get_image_features returns the projected features as a tensor (this package's public API), not transformers "
    "5's BaseModelOutputWithPooling; moving to the latter is an API change of its own"
)
VLM_SKIPS = COMMON_SKIPS | {
    "test_init_weights_can_init_buffers": EMA_BUFFER,
    "test_training_gradient_checkpointing": FROZEN_TOKENIZER_CHECKPOINTING,
    "test_training_gradient_checkpointing_use_reentrant_false": FROZEN_TOKENIZER_CHECKPOINTING,
    "test_training_gradient_checkpointing_use_reentrant_true": FROZEN_TOKENIZER_CHECKPOINTING,
    "test_get_image_features_output_0": IMAGE_FEATURES_TENSOR,
    "test_get_image_features_output_1": IMAGE_FEATURES_TENSOR,
    "test_get_image_features_output_2": IMAGE_FEATURES_TENSOR,
    "test_get_image_features_hidden_states": IMAGE_FEATURES_TENSOR,
    "test_get_image_features_attentions": IMAGE_FEATURES_TENSOR,
    "test_get_image_features_pooler_output": IMAGE_FEATURES_TENSOR,
}


class VLMCommonTests(CommonTests):
    all_model_classes = (EvoTokVLMModel, EvoTokForConditionalGeneration)
    _is_composite = True
    generation = False

    def setUp(self):
        self.model_tester = EvoTokVLMTester(self, generation=self.generation)
        self.config_tester = ConfigTester(
            self, config_class=EvoTokVLMConfig, has_text_modality=False, image_token_id=IMAGE, boi_token_id=BOI,
            eoi_token_id=EOI,
        )  # fmt: skip
        # The mixin tells model kinds apart by transformers' own name lists: which class is a backbone (no loss to
        # train), which head gets labels, which runs the loss-shift and RoPE checks. Ours are entered there for the
        # duration of each test, so they are driven as an image-text-to-text model of transformers' own would be.
        for names, class_name in ((MODEL_MAPPING_NAMES, "EvoTokVLMModel"),
                                  (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "EvoTokForConditionalGeneration")):
            patcher = patch.dict(names, {EvoTokVLMConfig.model_type: class_name})
            patcher.start()
            self.addCleanup(patcher.stop)  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()


@skip_tests(VLM_SKIPS)
class EvoTokVLMUnderstandingCommonTest(VLMCommonTests, unittest.TestCase):
    generation = False


# The mixin's eager-vs-SDPA test feeds `input_ids` alone, so the generation head never runs in it: each variant would
# repeat EvoTokVLMUnderstandingCommonTest's run of the same code.
SAME_AS_UNDERSTANDING = {
    name: "input_ids only: the same code path as EvoTokVLMUnderstandingCommonTest's run of this test"
    for name in EAGER_MATCHES_SDPA
}


@skip_tests(VLM_SKIPS | SAME_AS_UNDERSTANDING)
class EvoTokVLMGenerationCommonTest(VLMCommonTests, unittest.TestCase):
    generation = True
    # The backbone runs inside the full model here (teacher-forced generation codes, the depth head's loss); on its
    # own it is the backbone EvoTokVLMUnderstandingCommonTest already runs, so it is not run twice (test time).
    all_model_classes = (EvoTokForConditionalGeneration,)


# ----------------------------------------------------------------------------- the residual-depth head
DEPTH_HEAD = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, code_dim=8, codebook_size=64, llm_hidden_size=24,
    pixel_depth=4, resid_dropout=0.0,
)  # fmt: skip


class EvoTokDepthHeadTester:
    def __init__(self, parent, batch_size: int = 3):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = True
        self.hidden_size = DEPTH_HEAD["hidden_size"]
        self.num_hidden_layers = DEPTH_HEAD["num_hidden_layers"]
        self.num_attention_heads = DEPTH_HEAD["num_attention_heads"]
        self.seq_length = DEPTH_HEAD["pixel_depth"]

    def get_config(self) -> EvoTokDepthHeadConfig:
        return EvoTokDepthHeadConfig(**DEPTH_HEAD)

    def prepare_config_and_inputs_for_common(self):
        sums = torch.randn(self.batch_size, DEPTH_HEAD["pixel_depth"] - 1, DEPTH_HEAD["code_dim"]).cumsum(dim=1)
        hidden = torch.randn(self.batch_size, DEPTH_HEAD["llm_hidden_size"])
        return self.get_config(), {"hidden_states": hidden, "code_embedding_sums": sums}


DEPTH_HEAD_NO_LOSS = (
    "no loss output: its cross-entropy is the VLM's image_generation_loss (trained in EvoTokVLMGenerationCommonTest"
    "::test_training); checkpointing: test_depth_head.py::test_gradient_checkpointing_gives_same_gradients"
)


@skip_tests(
    COMMON_SKIPS
    | {
        "test_model_get_set_embeddings": NO_TOKEN_EMBEDDINGS.format("LLM hidden states and code-embedding sums"),
        "test_training": DEPTH_HEAD_NO_LOSS,
        "test_training_gradient_checkpointing": DEPTH_HEAD_NO_LOSS,
        "test_training_gradient_checkpointing_use_reentrant_false": DEPTH_HEAD_NO_LOSS,
        "test_training_gradient_checkpointing_use_reentrant_true": DEPTH_HEAD_NO_LOSS,
    }
)
class EvoTokDepthTransformerCommonTest(CommonTests, unittest.TestCase):
    all_model_classes = (EvoTokDepthTransformer,)
    test_resize_embeddings = False  # no token embeddings: its inputs are hidden states and code-embedding sums
    additional_model_inputs = ["code_embedding_sums"]

    def setUp(self):
        self.model_tester = EvoTokDepthHeadTester(self)
        self.config_tester = ConfigTester(self, config_class=EvoTokDepthHeadConfig, has_text_modality=False,
                                          **DEPTH_HEAD)  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()


# ----------------------------------------------------------------------------- the skips themselves
def test_decorator_skips_are_explained():
    """The mixin's `require_*` decorators skip without calling `skipTest`: their reasons are checked here."""
    classes = (EvoTokModelCommonTest, EvoTokVLMUnderstandingCommonTest, EvoTokVLMGenerationCommonTest,
               EvoTokDepthTransformerCommonTest)  # fmt: skip
    unexplained = {
        f"{cls.__name__}.{name}: {test.__unittest_skip_why__}"
        for cls in classes
        for name, test in inspect.getmembers(cls, callable)
        if name.startswith("test_") and getattr(test, "__unittest_skip__", False)
        and not explained(test.__unittest_skip_why__)
    }
    assert not unexplained
