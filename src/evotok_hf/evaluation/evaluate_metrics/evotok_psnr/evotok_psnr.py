"""`evaluate` metric: mean per-image PSNR (dB) of reconstructions against their originals.

A local module, loaded offline with `evaluate.load(evotok_hf.evaluation.metrics.metric_path("evotok_psnr"))`. It
only adapts evaluate's inputs; the computation is `evotok_hf.evaluation.metrics.psnr`, so `evotok_hf` must be
installed in the environment that loads it (`pip install "evotok_hf[eval]"`).
"""

import evaluate
import torch

from evotok_hf.evaluation.metrics import image_pair_batches
from evotok_hf.evaluation.metrics import image_pair_metric_info
from evotok_hf.evaluation.metrics import psnr

_DESCRIPTION = """Mean over images of the per-image PSNR in dB, with peak 255 on 0..255 pixels. A perfect
reconstruction has infinite PSNR, and so has the mean over a set that contains one."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the reconstructions, as PIL images or (H, W, 3) uint8 arrays with values 0..255. Float arrays
        are rejected: convert [0, 1] floats with `(x * 255).round().astype(np.uint8)`.
    references: the original images, in the same convention, each the size of its prediction.
    batch_size: images per computation batch (default 32).
Returns:
    psnr: the mean per-image PSNR in dB.
Examples:
    >>> import evaluate
    >>> from evotok_hf.evaluation.metrics import metric_path
    >>> metric = evaluate.load(metric_path("evotok_psnr"))
    >>> metric.compute(predictions=reconstructions, references=originals)["psnr"]
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EvotokPsnr(evaluate.Metric):
    def _info(self):
        return image_pair_metric_info(_DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, batch_size=32):
        values = torch.cat([psnr(p, r) for p, r in image_pair_batches(predictions, references, batch_size)])
        return {"psnr": float(values.mean())}
