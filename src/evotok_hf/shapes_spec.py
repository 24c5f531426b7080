"""What EvoTok Shapes is, as both its generator (`miniature.shapes`) and its scorer (`evaluation.shapes_scoring`)
need it: the canvas size, the shapes, the palette, the caption categories and question types, the relation rule and how
a shape fills its box. It lives outside both packages so that the scorer reads the domain's definition without
importing the miniature (which imports the scorer): the arrows point one way. `miniature.shapes` describes the domain
in full.
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
CATEGORIES = ("single_object", "colors", "two_object", "counting", "position", "color_attr")
QUESTION_TYPES = ("color", "shape", "count", "position", "existence")
RELATIONS = ("left of", "right of", "above", "below")
MIN_CENTRE_OFFSET = 8
# Drawing at 4x and averaging 4 x 4 blocks down gives anti-aliased edges (17 coverage levels) while interior pixels
# keep the exact palette colour and background pixels the exact grey.
SUPERSAMPLE = 4


def box_centre(bbox: Sequence[float]) -> tuple[float, float]:
    """Centre (x, y) of a `[x0, y0, x1, y1]` box."""
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def relation_holds(bbox_a: Sequence[float], bbox_b: Sequence[float], relation: str) -> bool:
    """Whether the object in box a is `relation` ("left of", "right of", "above", "below") the object in box b, by
    box centres: the centres must differ by at least `MIN_CENTRE_OFFSET` px in the relation's direction."""
    (ax, ay), (bx, by) = box_centre(bbox_a), box_centre(bbox_b)
    offsets = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}
    if relation not in offsets:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}.")
    return offsets[relation] >= MIN_CENTRE_OFFSET


def draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, bbox: Sequence[int], fill, scale: int = 1) -> None:
    """Fill a shape's region of box `bbox` (canvas pixels, exclusive ends) on a canvas `scale` times larger: a square
    the whole box, a circle the inscribed disc, a triangle the isosceles triangle with its base on the box's bottom
    edge and its apex at the middle of the top edge."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")
    x0, y0, x1, y1 = (int(v) * scale for v in bbox)
    # PIL's rectangle and ellipse include their end coordinates, hence the -1 for exclusive box ends
    if shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
