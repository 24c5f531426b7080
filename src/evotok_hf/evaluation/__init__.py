"""Evaluation of EvoTok tokenizers per residual depth: reconstruction metrics (PSNR, SSIM, rFID, LPIPS), semantic
similarity to a teacher, codebook health, and representation analysis (k-means, probes, NMI); on EvoTok Shapes, the
mini-GenEval, VQA and per-depth NMI scorers."""

from ..frozen_networks import (
    FID_IMPLEMENTATIONS,
    CleanFIDInceptionFeatures,
    EfficientNetLite0Features,
    InceptionV3Features,
    PytorchFIDInceptionFeatures,
    build_feature_network,
)
from .metrics import (
    FeatureStatistics,
    fid_from_statistics,
    frechet_distance,
    mean_colour_baseline,
    metric_path,
    psnr,
    ssim,
)
from .reconstruction import (
    CENTER_CROPS,
    ReconstructionReport,
    adm_center_crop,
    evaluate_reconstruction,
)
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
