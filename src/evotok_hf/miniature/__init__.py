"""EvoTok in miniature: the paper's recipe on EvoTok Shapes, a synthetic domain small enough to train end to end on
a CPU and scored objectively (see `evotok_hf.evaluation.shapes_scoring`)."""

from ..shapes_spec import (
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    MIN_CENTRE_OFFSET,
    QUESTION_TYPES,
    RELATIONS,
    SHAPES,
    box_centre,
    draw_shape,
    relation_holds,
)
from .shapes import (
    HELDOUT_PAIRS,
    generate_scenes,
    geneval_prompts,
    load_shapes_dataset,
    render_scene,
    sample_prompt,
    sample_scene,
    scene_for_prompt,
    scene_questions,
    shapes_features,
    split_exclude_pairs,
)
