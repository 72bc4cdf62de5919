"""The synthetic world's scenes: 1-3 shapes (6 kinds, 6 colours, two sizes) in distinct cells of a 3x3
grid on one of several backgrounds, drawn with Pillow, and written down as data (like GQA's scene
graphs) so every question about an image can be checked against what it shows."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 185),
    "orange": (240, 135, 25),
}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (205, 205, 205), "beige": (235, 225, 200), "black": (25, 25, 25)}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SIZES = ("small", "large")
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "star": 10, "diamond": 4, "hexagon": 6}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        if self.row == 1 and self.col == 1:
            return "center"
        return f"{ROWS[self.row]} {COLS[self.col]}"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    width: int
    height: int
    jitter: tuple[tuple[float, float], ...] = field(default=())


#: How many shapes a scene holds, drawn uniformly from this tuple (1-3, fewer threes).
SHAPE_COUNTS = (1, 1, 2, 2, 3)


def random_scene(rng: random.Random, shape_counts: Sequence[int] = SHAPE_COUNTS) -> Scene:
    """Draw a scene: 1-3 shapes in distinct grid cells, distinct (colour, kind) pairs."""
    n = rng.choice(shape_counts)
    cells = rng.sample(range(9), n)
    pairs = rng.sample([(k, c) for k in SHAPES for c in COLOURS], n)
    shapes = tuple(
        Shape(kind=k, colour=c, size=rng.choice(SIZES), row=cell // 3, col=cell % 3)
        for (k, c), cell in zip(pairs, cells)
    )
    width, height = rng.choice(((128, 128), (128, 128), (160, 128), (128, 160)))
    jitter = tuple((rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)) for _ in shapes)
    return Scene(shapes, rng.choice(tuple(BACKGROUNDS)), width, height, jitter)


def save_image(img: Image.Image, path: Path) -> None:
    if path.suffix == ".jpg":
        img.save(path, format="JPEG", quality=90)
    else:
        img.save(path, format="PNG", optimize=False)


def geometry(scene: Scene, scale: int = 1) -> list[tuple[float, float, float]]:
    """Each shape's centre and radius in pixels, in the order of ``scene.shapes``."""
    cw, ch = scene.width * scale / 3, scene.height * scale / 3
    return [((s.col + 0.5 + jx) * cw, (s.row + 0.5 + jy) * ch, min(cw, ch) * (0.24 if s.size == "small" else 0.42))
            for s, (jx, jy) in zip(scene.shapes, scene.jitter)]


def render(scene: Scene, scale: int = 1) -> Image.Image:
    """Draw a scene with Pillow (RGB), ``scale`` times its nominal size."""
    w, h = scene.width * scale, scene.height * scale
    img = Image.new("RGB", (w, h), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for shape, (cx, cy, r) in zip(scene.shapes, geometry(scene, scale)):
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
        elif shape.kind == "triangle":
            draw.regular_polygon((cx, cy, r), 3, fill=fill)
        elif shape.kind == "diamond":
            draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
        elif shape.kind == "hexagon":
            draw.regular_polygon((cx, cy, r), 6, fill=fill)
        elif shape.kind == "star":
            pts = []
            for i in range(10):
                rad = r if i % 2 == 0 else r * 0.45
                a = -math.pi / 2 + i * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            draw.polygon(pts, fill=fill)
    return img


def scene_record(image: str, scene: Scene) -> dict:
    """A scene as data (like GQA's scene graphs): what each image shows, for checking questions."""
    return {"image": image, "width": scene.width, "height": scene.height, "background": scene.background,
            "shapes": [{**asdict(s), "position": s.position, "center": [round(x, 2), round(y, 2)], "radius": round(r, 2)}
                       for s, (x, y, r) in zip(scene.shapes, geometry(scene))]}


def scene_from_record(record: dict) -> Scene:
    """The :class:`Scene` a :func:`scene_record` row describes (its jitter is not kept: what it shows is)."""
    shapes = tuple(Shape(kind=s["kind"], colour=s["colour"], size=s["size"], row=s["row"], col=s["col"])
                   for s in record["shapes"])
    return Scene(shapes, record["background"], record["width"], record["height"])
