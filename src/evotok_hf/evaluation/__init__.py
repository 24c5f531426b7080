"""Evaluation of EvoTok tokenizers per residual depth: reconstruction metrics (PSNR, SSIM, rFID, LPIPS), semantic
similarity to a teacher, codebook health, and representation analysis (k-means, probes, NMI); on EvoTok Shapes, the
mini-GenEval, VQA and per-depth NMI scorers."""

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
from .representation import label_nmi, nmi_by_depth
from .shapes_scoring import (
    Detection,
    detect_objects,
    evaluate_geneval_mini,
    evaluate_vqa,
    prompt_satisfied,
    score_geneval_mini,
    shapes_nmi_by_depth,
    vqa_accuracy,
)
