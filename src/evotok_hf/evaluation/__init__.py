from .per_depth import mean_colour_baseline, per_depth_psnr, per_depth_semantic_cosine, psnr
