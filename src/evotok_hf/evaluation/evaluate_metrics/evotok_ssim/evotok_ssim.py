"""`evaluate` metric: mean per-image SSIM of reconstructions against their originals.

A local module, loaded offline with `evaluate.load(evotok_hf.evaluation.metrics.metric_path("evotok_ssim"))`. It
only adapts evaluate's inputs; the computation is `evotok_hf.evaluation.metrics.ssim` (11x11 Gaussian window,
sigma 1.5, K1 = 0.01, K2 = 0.03, population covariance, mean over channels), so `evotok_hf` must be installed in
the environment that loads it (`pip install "evotok_hf[eval]"`).
"""

from evotok_hf.evaluation.image_pair_metric import ImagePairMetric, inputs_description, mean_per_image
from evotok_hf.evaluation.metrics import ssim

_DESCRIPTION = """Mean over images of the per-image SSIM (Wang et al. 2004) on the 0..255 scale, as
`skimage.metrics.structural_similarity(..., channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)` computes it. Images must be at least 11x11."""

_KWARGS_DESCRIPTION = inputs_description(
    "ssim",
    arguments="""    references: the original images, in the same convention, each the size of its prediction.
    batch_size: images per computation batch (default 32).""",
    returns="    ssim: the mean per-image SSIM.",
)

_CITATION = """@article{wang2004ssim,
  title={Image quality assessment: from error visibility to structural similarity},
  author={Wang, Zhou and Bovik, Alan C. and Sheikh, Hamid R. and Simoncelli, Eero P.},
  journal={IEEE Transactions on Image Processing}, volume={13}, number={4}, pages={600--612}, year={2004}
}"""


class EvotokSsim(ImagePairMetric, description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION):
    def _compute(self, predictions, references, batch_size=32):
        return {"ssim": mean_per_image(ssim, predictions, references, batch_size)}
