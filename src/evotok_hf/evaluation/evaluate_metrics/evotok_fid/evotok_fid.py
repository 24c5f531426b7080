"""`evaluate` metric: rFID, the Fréchet distance between the feature statistics of original images and of their
reconstructions.

A local module, loaded offline with `evaluate.load(evotok_hf.evaluation.metrics.metric_path("evotok_fid"))`. It
only adapts evaluate's inputs; the computation is `evotok_hf.evaluation.metrics` (`FeatureStatistics`,
`fid_from_statistics`) over a network of `evotok_hf.frozen_networks.build_feature_network`, so `evotok_hf` must be
installed in the environment that loads it (`pip install "evotok_hf[eval]"`; the standard Inception network also
needs `pip install "evotok_hf[online]"`).
"""

from evotok_hf.evaluation.image_pair_metric import ImagePairMetric, inputs_description
from evotok_hf.evaluation.metrics import FeatureStatistics, fid_from_statistics, image_pair_batches
from evotok_hf.frozen_networks import build_feature_network

_DESCRIPTION = """Fréchet distance between Gaussians fitted to a feature network's outputs on the references
(originals) and on the predictions (reconstructions). The default network is the offline EfficientNet-Lite0 stand-in,
whose values are NOT comparable with published rFID; pass feature_network="inception" for the standard FID
Inception-v3 (downloads its weights on first use). The result names the network used."""

_KWARGS_DESCRIPTION = inputs_description(
    "fid",
    arguments="""    references: the original images, in the same convention. At least two of each.
    feature_network: "efficientnet-lite0" (default, offline), "inception", or an nn.Module with an integer
        `num_features` that maps (B, 3, H, W) images in [-1, 1] to (B, num_features) features.
    batch_size: images per forward pass (default 32).
    device: where the feature network runs (default: CPU).""",
    returns="""    fid: the Fréchet distance.
    feature_network: the name of the feature network, to keep values from different networks apart.""",
)

_CITATION = """@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={Advances in Neural Information Processing Systems}, year={2017}
}"""


class EvotokFid(ImagePairMetric, description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION):
    def _feature_network(self, spec):
        # Built networks are kept per name spec: loading one costs more than a small evaluation.
        if not isinstance(spec, str):
            return build_feature_network(spec)
        cache = self.__dict__.setdefault("_feature_networks", {})
        if spec not in cache:
            cache[spec] = build_feature_network(spec)
        return cache[spec]

    def _compute(self, predictions, references, feature_network="efficientnet-lite0", batch_size=32, device="cpu"):
        network = self._feature_network(feature_network).to(device)
        real, fake = FeatureStatistics(), FeatureStatistics()
        for fake_batch, real_batch in image_pair_batches(predictions, references, batch_size):
            fake.update(network(fake_batch.to(device)))
            real.update(network(real_batch.to(device)))
        return {"fid": fid_from_statistics(real, fake), "feature_network": network.name}
