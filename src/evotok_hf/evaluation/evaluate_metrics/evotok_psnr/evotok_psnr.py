"""`evaluate` metric: mean per-image PSNR (dB) of reconstructions against their originals.

A local module, loaded offline with `evaluate.load(evotok_hf.evaluation.metrics.metric_path("evotok_psnr"))`. It
only adapts evaluate's inputs; the computation is `evotok_hf.evaluation.metrics.psnr`, so `evotok_hf` must be
installed in the environment that loads it (`pip install "evotok_hf[eval]"`).
"""

from evotok_hf.evaluation.image_pair_metric import ImagePairMetric, inputs_description, mean_per_image
from evotok_hf.evaluation.metrics import psnr

_DESCRIPTION = """Mean over images of the per-image PSNR in dB, with peak 255 on 0..255 pixels. A perfect
reconstruction has infinite PSNR, and so has the mean over a set that contains one."""

_KWARGS_DESCRIPTION = inputs_description(
    "psnr",
    arguments="""    references: the original images, in the same convention, each the size of its prediction.
    batch_size: images per computation batch (default 32).""",
    returns="    psnr: the mean per-image PSNR in dB.",
)

_CITATION = ""


class EvotokPsnr(ImagePairMetric, description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION):
    def _compute(self, predictions, references, batch_size=32):
        return {"psnr": mean_per_image(psnr, predictions, references, batch_size)}
