"""Evaluation of EvoTok tokenizers per residual depth: reconstruction metrics (PSNR, SSIM, rFID, LPIPS), semantic
similarity to a teacher, codebook health, and representation analysis (k-means, probes)."""

from .metrics import (
    EfficientNetLite0Features,
    FeatureStatistics,
    InceptionV3Features,
    build_feature_network,
    fid_from_statistics,
    frechet_distance,
    metric_path,
    psnr,
    ssim,
)
from .per_depth import mean_colour_baseline, per_depth_psnr, per_depth_semantic_cosine
from .reconstruction import ReconstructionReport, evaluate_reconstruction
