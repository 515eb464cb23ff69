"""The visual side of the synthetic world: shapes, scenes, rendered words, moving-object clips.

Everything is drawn with Pillow from a seeded generator, so a seed fixes every pixel. Some
(colour, shape) pairs are held out of training and used only by the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (50, 80, 230), "yellow": (235, 205, 30),
           "purple": (150, 60, 190), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WORDS = ("cat", "dog", "sun", "map", "box", "cup", "hat", "pen", "bus", "fox", "egg", "key",
         "owl", "jam", "net", "toy", "bag", "car", "ink", "log")
HELD_OUT = {("purple", "triangle"), ("orange", "square"), ("green", "diamond"), ("yellow", "circle")}
"""(colour, shape) pairs that appear only in the test split."""
BACKGROUND = (245, 245, 240)


@dataclass
class Shape:
    colour: str
    kind: str
    big: bool
    x: float  # centre, as a fraction of the width
    y: float
    slot: float = 1.0  # width of the horizontal slot the shape owns, as a fraction of the width

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def pairs(split: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs a split may draw: held-out ones only in test, the rest everywhere
    ("held_out": the held-out pairs alone, to measure how a model does on them)."""
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "held_out":
        return [p for p in every if p in HELD_OUT]
    return every if split == "test" else [p for p in every if p not in HELD_OUT]


SMALL_RADIUS = 0.32 / 3
"""A small shape's radius as a fraction of the picture's width, whatever the shape count: "big or
small" is then read off the pixels. (Scaled by the slot, a big shape among three was smaller than
a small one alone, and the answer depended on the count: 23 % on test, chance 50 %.)"""


def draw_shape(draw, shape: Shape, width: int, height: int, fill=None) -> None:
    """Draw `shape` in its colour, or in `fill` (e.g. a label index on an "L" image)."""
    room = min(shape.slot * width, height)  # shapes never overlap: each keeps to its slot
    # large enough for 8-px patches to tell shapes apart; a big one is always larger than a small one
    radius = 0.46 * room if shape.big else min(0.32 * room, SMALL_RADIUS * width)
    cx, cy = shape.x * width, shape.y * height
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLOURS[shape.colour] if fill is None else fill
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)


def random_fill(rng: np.random.Generator) -> tuple[int, int, int]:
    """Any RGB colour, not only the world's named ones, that stands out from the background."""
    while True:
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if max(abs(a - b) for a, b in zip(fill, BACKGROUND)) >= 60:
            return fill


def render(shapes: list[Shape], width: int, height: int, rng: np.random.Generator, fills: list | None = None):
    """An RGB PIL image of `shapes` on a lightly noisy background, each in its colour or in `fills`
    (one RGB tuple per shape)."""
    from PIL import Image, ImageDraw

    noise = rng.integers(-8, 9, (height, width, 1))
    base = np.clip(np.array(BACKGROUND)[None, None, :] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for i, shape in enumerate(shapes):
        draw_shape(draw, shape, width, height, None if fills is None else fills[i])
    return image


def coverage(shapes: list[Shape], size: int, grid: int) -> np.ndarray:
    """(grid * grid, shapes): how many pixels of each cell of a `grid` x `grid` split of a square
    `size`-px picture each shape covers, cells in row-major order (as a tile's pooled tokens)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    for i, shape in enumerate(shapes):
        draw_shape(ImageDraw.Draw(mask), shape, size, size, fill=i + 1)
    side = size // grid
    owners = np.asarray(mask).reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    return (owners[:, :, None] == np.arange(1, len(shapes) + 1)).sum(1)


def cell_owners(shapes: list[Shape], size: int, grid: int, min_share: float = 0.05) -> np.ndarray:
    """(grid * grid,): per cell (as `coverage`), the index of the shape covering most of it, or -1
    where none covers `min_share` of the cell: whose attributes a pooled token is labelled with."""
    covered = coverage(shapes, size, grid)
    return np.where(covered.max(1) >= min_share * (size // grid) ** 2, covered.argmax(1), -1)


def scene(rng: np.random.Generator, split: str, count: int) -> list[Shape]:
    """`count` shapes of distinct kinds and distinct colours (so "what shape is red?" has one answer),
    spread left to right without overlapping."""
    chosen = rng.choice(len(SHAPES), size=count, replace=False)
    allowed = pairs(split)
    shapes = []
    slots = rng.permutation(count)
    for i, kind_index in enumerate(chosen):
        kind = SHAPES[kind_index]
        colours = [c for c, s in allowed if s == kind and c not in {shape.colour for shape in shapes}]
        colour = colours[rng.integers(len(colours))]
        x = (slots[i] + 0.5) / count
        shapes.append(Shape(colour, kind, bool(rng.integers(2)), x, 0.5 + rng.uniform(-0.12, 0.12), slot=1 / count))
    return shapes


# Words are printed like labels, at a known place and in a narrow range of sizes, on purpose:
# the stand-in tower (a 3-layer ViT trained for a minute) reads them so after ~200 steps of
# words, but with the centre free by +-6 px and sizes 18-24 it was at 54 % after 600 steps.
WORD_SIZES = (17, 21)
"""Font sizes (px) of a printed word, inclusive."""
WORD_JITTER = 1.0
"""How far (px) a word's centre may stray from where it is printed, each way."""


def word_image(word: str, width: int, height: int, rng: np.random.Generator, at: tuple[float, float] = (0.5, 0.5)):
    """`word` in dark ink centred near relative position `at`, in a size from `WORD_SIZES`."""
    from PIL import Image, ImageDraw

    noise = rng.integers(-8, 9, (height, width, 1))
    image = Image.fromarray(np.clip(np.array(BACKGROUND)[None, None, :] + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = _font(int(rng.integers(WORD_SIZES[0], WORD_SIZES[1] + 1)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = at[0] * width - (right - left) / 2 + rng.uniform(-WORD_JITTER, WORD_JITTER)
    y = at[1] * height - (bottom - top) / 2 - top + rng.uniform(-WORD_JITTER, WORD_JITTER)
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    draw.text((x, y), word, fill=ink, font=font)
    return image


@lru_cache(maxsize=None)
def _font(size: int):
    """Pillow's bundled font at `size` px (loading it decodes the font file: a third of a word's rendering)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


@dataclass
class Clip:
    frames: list[np.ndarray]
    fps: float
    questions: list[tuple[str, str]]
    """(question, answer) pairs the clip answers, the main one first (a random one of its kind)."""


def moving_clip(rng: np.random.Generator, split: str, seconds: float, size: int, fps: float) -> Clip:
    """One shape crossing the frame (left, right, up or down), or shapes appearing one by one."""
    if rng.random() < 0.5:
        return crossing_clip(rng, split, seconds, size, fps)
    return appearing_clip(rng, split, seconds, size, fps)


def crossing_clip(rng: np.random.Generator, split: str, seconds: float, size: int, fps: float) -> Clip:
    """One shape crossing the frame left, right, up or down: "Which way does the <colour> <shape> move?"."""
    from PIL import Image, ImageDraw

    n = _frame_count(seconds, fps)
    colour, kind, direction = random_crossing(rng, split)
    frames = []
    for i in range(n):
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw_shape(ImageDraw.Draw(image), crossing_shape(colour, kind, direction, i / (n - 1)), size, size)
        frames.append(np.asarray(image))
    return Clip(frames, fps, [(f"Which way does the {colour} {kind} move?", direction),
                              (f"What colour is the moving {kind}?", colour)])


DIRECTIONS = ("left", "right", "up", "down")


def random_crossing(rng: np.random.Generator, split: str) -> tuple[str, str, str]:
    """What a crossing clip shows: a (colour, shape) pair `split` may draw, and its direction."""
    allowed = pairs(split)
    colour, kind = allowed[rng.integers(len(allowed))]
    return colour, kind, DIRECTIONS[rng.integers(len(DIRECTIONS))]


def crossing_shape(colour: str, kind: str, direction: str, progress: float) -> Shape:
    """The shape of a crossing clip `progress` (0-1) of the way along its path: from 0.15 to 0.85 of
    the frame, through its middle. Never asked about its size: big in a 0.42-wide slot is a radius
    of 0.19 of the frame."""
    t = 0.15 + 0.7 * progress
    x, y = {"right": (t, 0.5), "left": (1 - t, 0.5), "down": (0.5, t), "up": (0.5, 1 - t)}[direction]
    return Shape(colour, kind, True, x, y, slot=0.42)


def appearing_clip(rng: np.random.Generator, split: str, seconds: float, size: int, fps: float) -> Clip:
    """2-3 shapes appearing one by one: "Which colour appears first?", "How many shapes appear?"."""
    from PIL import Image, ImageDraw

    n = _frame_count(seconds, fps)
    count = int(rng.integers(2, 4))
    shapes = scene(rng, split, count)
    order = rng.permutation(count)
    frames = []
    for i in range(n):
        visible = int(np.ceil((i + 1) / n * count))  # shapes appear at even intervals, in `order`
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for j in order[:visible]:
            draw_shape(draw, shapes[j], size, size)
        frames.append(np.asarray(image))
    questions = [("Which colour appears first?", shapes[order[0]].colour), ("How many shapes appear?", NUMBERS[count])]
    return Clip(frames, fps, questions if rng.random() < 0.5 else questions[::-1])


def _frame_count(seconds: float, fps: float) -> int:
    return max(2, int(round(seconds * fps)))
