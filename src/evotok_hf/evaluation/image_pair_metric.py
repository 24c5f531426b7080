"""What the `evaluate` metric modules in `evaluate_metrics/` share, so that each states only its own computation and
documentation: the metric class they extend, the mean of a per-image metric, and the parts of their inputs
description that are the same for all.

evaluate loads such a module by path (`evaluate.load(metric_path("evotok_psnr"))`) and takes as its metric the first
`evaluate.Metric` subclass in the module that is not abstract; `ImagePairMetric` is abstract, so the modules may import
it by name. This module imports `evaluate` (the `eval` extra): only the metric modules import it.
"""

import abc

import evaluate
import torch

from .metrics import image_pair_batches, image_pair_metric_info


class ImagePairMetric(evaluate.Metric, metaclass=abc.ABCMeta):
    """An `evaluate` metric of reconstructions (`predictions`) against their originals (`references`), both given as
    images. A subclass passes its module's texts as class keywords and implements `_compute`:

        class EvotokPsnr(ImagePairMetric, description=_DESCRIPTION, citation=_CITATION,
                         inputs_description=_KWARGS_DESCRIPTION):
    """

    def __init_subclass__(cls, *, description: str, citation: str, inputs_description: str, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._texts = (description, citation, inputs_description)
        # the class documentation evaluate's own metrics get from this decorator
        evaluate.utils.file_utils.add_start_docstrings(description, inputs_description)(cls)

    def _info(self):
        return image_pair_metric_info(*self._texts)

    @abc.abstractmethod
    def _compute(self, predictions, references, **kwargs) -> dict:
        """The metric's values from the images (evaluate's `compute` calls this with the gathered inputs)."""


def mean_per_image(metric, predictions, references, batch_size: int) -> float:
    """The mean over image pairs of `metric(prediction_batch, reference_batch)`, a per-image metric of pixel values in
    [-1, 1] (`evotok_hf.evaluation.metrics.psnr`, `ssim`), computed in batches of images of the same size."""
    return float(torch.cat([metric(p, r) for p, r in image_pair_batches(predictions, references, batch_size)]).mean())


def inputs_description(result: str, arguments: str, returns: str) -> str:
    """A module's `_KWARGS_DESCRIPTION`: the `predictions` every image-pair metric takes, then the module's own
    `arguments` (`references` first) and `returns` (lines indented by four spaces), and an example that reads the
    value `result` of the module `evotok_<result>`."""
    return f"""
Args:
    predictions: the reconstructions, as PIL images or (H, W, 3) uint8 arrays with values 0..255. Float arrays
        are rejected: convert [0, 1] floats with `(x * 255).round().astype(np.uint8)`.
{arguments}
Returns:
{returns}
Examples:
    >>> import evaluate
    >>> from evotok_hf.evaluation.metrics import metric_path
    >>> metric = evaluate.load(metric_path("evotok_{result}"))
    >>> metric.compute(predictions=reconstructions, references=originals)["{result}"]
"""


__all__ = ["ImagePairMetric", "inputs_description", "mean_per_image"]
