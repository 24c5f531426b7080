"""EvoTok in miniature: the paper's recipe on EvoTok Shapes, a synthetic domain small enough to train end to end on
a CPU and scored objectively (see `evotok_hf.evaluation.shapes_scoring`)."""

from .shapes import (
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    MIN_CENTRE_OFFSET,
    QUESTION_TYPES,
    RELATIONS,
    SHAPES,
    box_centre,
    draw_shape,
    generate_scenes,
    geneval_prompts,
    load_shapes_dataset,
    relation_holds,
    render_scene,
    sample_prompt,
    sample_scene,
    scene_for_prompt,
    scene_questions,
    shapes_features,
    split_exclude_pairs,
)
