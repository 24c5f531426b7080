"""EvoTok's VLM as an lmms-eval model: `pip install evotok_hf[lmms-eval]`, then

    lmms-eval eval --model evotok --model_args pretrained=<folder or Hub id>,dtype=bfloat16,batch_size=8 --tasks mme

lmms-eval finds the model through the `lmms_eval.models` entry point, which names `manifest.model_manifest`; the model
classes live in `model.py`, imported only when a run asks for `evotok`. This package imports nothing at import time.
"""
