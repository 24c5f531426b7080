"""The `lmms_eval.models` entry point: what `--model evotok` resolves to.

lmms-eval loads every installed entry point while its model registry starts, so this module stays light: lmms_eval is
imported inside the function (lmms-eval accepts a function returning the manifest), and the model module only when a
run asks for `evotok`. Importing `lmms_eval` here at module level would also be circular whenever `model.py` is
imported first: lmms_eval's registry would load this module while it is still half imported.
"""


def model_manifest():
    """`evotok`: the chat model by default; `--force_simple` picks the simple one, which lmms-eval needs for
    multiple-choice (loglikelihood) tasks."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="evotok",
        chat_class_path="evotok_hf.integrations.lmms_eval.model.EvoTokChat",
        simple_class_path="evotok_hf.integrations.lmms_eval.model.EvoTokSimple",
    )
