"""The toy world: captioned pictures of one flat-coloured shape on a plain background, and a judge that reads a
picture back into what its caption says.

Captions follow one grammar, `a [size] COLOUR SHAPE on a COLOUR background[, at the POSITION]`. A fixed fifth of
the (shape colour, background colour) pairs never appears in training: those pairs are the test set. A caption
without a size draws a medium shape; one without a position draws it near the center.
"""

import random
from dataclasses import dataclass

import numpy as np

PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30), "purple": (140, 60, 180),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")  # and none: medium
POSITIONS = ("center", "left", "right", "top", "bottom")  # and none: near the center
HALF_EXTENT = {"small": 0.13, None: 0.2, "large": 0.27}  # half the shape's side, as a fraction of the shorter side
ANCHORS = {"center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
JITTER = 0.04  # of each side: how far a shape's center wanders from its anchor
HELD_OUT_SEED = 27  # the number: which fifth of the colour pairs is held out never changes
PAIRS = tuple((shape, back) for shape in COLOURS for back in COLOURS if shape != back)
HELD_OUT = frozenset(random.Random(HELD_OUT_SEED).sample(PAIRS, len(PAIRS) // 5))
TRAIN_PAIRS = tuple(p for p in PAIRS if p not in HELD_OUT)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str | None = None
    position: str | None = None

    @property
    def caption(self) -> str:
        size = f"{self.size} " if self.size else ""
        at = f", at the {self.position}" if self.position else ""
        return f"a {size}{self.colour} {self.shape} on a {self.background} background{at}"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.background) in HELD_OUT


def random_scene(rng: random.Random, pairs=TRAIN_PAIRS) -> Scene:
    colour, background = rng.choice(pairs)
    size = rng.choice((None, *SIZES))
    position = rng.choice((None, None, *POSITIONS))
    return Scene(colour, rng.choice(SHAPES), background, size, position)


def render(scene: Scene, height: int, width: int, rng: random.Random) -> np.ndarray:
    """The scene as an RGB uint8 array [height, width, 3]; `rng` places the shape near its anchor."""
    side = min(height, width)
    r = HALF_EXTENT[scene.size] * side
    ax, ay = ANCHORS[scene.position or "center"]
    cx = min(max(ax * width + rng.uniform(-JITTER, JITTER) * width, r + 2), width - r - 2)
    cy = min(max(ay * height + rng.uniform(-JITTER, JITTER) * height, r + 2), height - r - 2)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if scene.shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif scene.shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # an upright isosceles triangle filling half its bounding square
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = PALETTE[scene.background]
    image[mask] = PALETTE[scene.colour]
    return image


def demo_scenes(count: int = 36, seed: int = 0) -> list[Scene]:
    """The demo's prompts: every shape, size and position, every colour in both roles, half of them held out."""
    rng = random.Random(seed)
    held, trained = sorted(HELD_OUT), list(TRAIN_PAIRS)
    scenes = []
    for i in range(count):
        colour, background = held[i % len(held)] if i % 2 == 0 else rng.choice(trained)
        scenes.append(Scene(colour, SHAPES[i % 3], background, (None, *SIZES)[(i // 3) % 3],
                            (None, *POSITIONS)[i % 6]))
    return scenes


def held_out_scenes(count: int, seed: int = 1) -> list[Scene]:
    """Scenes of the held-out pairs only, every one with a position, for measuring accuracy."""
    return _test_scenes(sorted(HELD_OUT), count, seed)


def trained_pair_scenes(count: int, seed: int = 1) -> list[Scene]:
    """The same, on (shape colour, background colour) pairs that training draws: what a model that does not
    generalise to the held-out pairs still gets right."""
    return _test_scenes(sorted(random.Random(seed).sample(TRAIN_PAIRS, len(HELD_OUT))), count, seed)


def _test_scenes(pairs: list[tuple[str, str]], count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [Scene(pairs[i % len(pairs)][0], SHAPES[i % 3], pairs[i % len(pairs)][1], rng.choice((None, *SIZES)),
                  POSITIONS[(i // 3) % 5]) for i in range(count)]


# The judge ----------------------------------------------------------------------------------------------------

COLOUR_ARRAY = np.array([PALETTE[c] for c in COLOURS], np.float32)
FAR = 60.0  # RGB distance from the background beyond which a pixel counts as the shape's
FRAME = 4  # pixels at the edges that count toward the background only: half a Stage A latent pixel
SQUARE_FILL = 0.9  # a square fills its box; a circle π/4 of it, an upright triangle half
TRIANGLE_TAPER = 0.7  # see taper()
OPENING = 1  # radius of the opening that drops specks from the shape's pixels


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    position: str | None
    fill: float  # the shape's pixels over its bounding box's


def nearest_colour(rgb) -> str:
    return COLOURS[int(np.argmin(((COLOUR_ARRAY - np.asarray(rgb, np.float32)) ** 2).sum(1)))]


def _spread(mask: np.ndarray, radius: int, reduce) -> np.ndarray:
    padded = np.pad(mask, radius, mode="edge")
    height, width = mask.shape
    shifted = [padded[dy: dy + height, dx: dx + width] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    return reduce(np.stack(shifted), axis=0)


def shape_mask(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The background's median border colour, and which pixels are far from it, less specks and lines thinner than
    3 pixels (a morphological opening) and the outermost FRAME pixels, where Stage A's corners blur: a decoder's
    stray pixels are not part of the shape (shapes keep 2 pixels from the edges)."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    back = np.median(border, axis=0)
    far = np.sqrt(((pixels - back) ** 2).sum(-1)) > FAR
    far[:FRAME], far[-FRAME:], far[:, :FRAME], far[:, -FRAME:] = False, False, False, False
    return back, _spread(_spread(far, OPENING, np.min), OPENING, np.max)


def taper(far: np.ndarray, y0: float, y1: float) -> float:
    """The shape's mean width a quarter of the way down its box over its width three quarters down: 1 for a circle
    or a square, 1/3 for an upright triangle. A blurred edge moves a triangle's fill ratio toward a circle's, but
    not this."""
    rows = far.sum(1).astype(np.float32)
    h = y1 - y0 + 1

    def width(at: float) -> float:
        band = rows[int(y0 + (at - 0.1) * h): int(y0 + (at + 0.1) * h) + 1]
        return float(band.mean()) if len(band) else 0.0
    return width(0.25) / max(width(0.75), 1.0)


def read(image: np.ndarray) -> Reading:
    """What an image shows: background = the median of its border pixels, shape colour = the median of the pixels
    far from the background, shape = square where they fill their bounding box, else triangle where they taper
    upward, else circle, position = the anchor nearest the center
    of their box (all colours snapped to the nearest palette colour)."""
    back, far = shape_mask(image)
    background = nearest_colour(back)
    if far.sum() < 0.002 * far.size:
        return Reading(background, None, None, None, 0.0)
    ys, xs = np.nonzero(far)
    colour = nearest_colour(np.median(image[far].astype(np.float32), axis=0))
    # The bounding box of the bulk of the shape: stray pixels at the edges would inflate it.
    y0, y1 = np.percentile(ys, (1, 99))
    x0, x1 = np.percentile(xs, (1, 99))
    box = (y1 - y0 + 1) * (x1 - x0 + 1)
    inside = ((ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)).sum()
    fill = float(inside / box)
    shape = "square" if fill > SQUARE_FILL else "triangle" if taper(far, y0, y1) < TRIANGLE_TAPER else "circle"
    height, width = far.shape
    cx, cy = (x0 + x1 + 1) / 2 / width, (y0 + y1 + 1) / 2 / height  # the box's center: a triangle's centroid is low
    position = min(ANCHORS, key=lambda a: (ANCHORS[a][0] - cx) ** 2 + (ANCHORS[a][1] - cy) ** 2)
    return Reading(background, colour, shape, position, fill)


def colour_share(image: np.ndarray, colour: str) -> float:
    """The share of an image's pixels whose nearest palette colour is `colour`."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    nearest = np.argmin(((pixels[:, None, :] - COLOUR_ARRAY[None]) ** 2).sum(-1), axis=1)
    return float((nearest == COLOURS.index(colour)).mean())


def accuracy(scenes: list[Scene], images: list[np.ndarray]) -> dict[str, float]:
    """Per attribute, the fraction of images whose reading matches the scene (position: scenes that name one)."""
    readings = [read(image) for image in images]
    pairs = list(zip(scenes, readings, strict=True))
    placed = [(s, r) for s, r in pairs if s.position]
    return {
        "background": sum(r.background == s.background for s, r in pairs) / len(pairs),
        "colour": sum(r.colour == s.colour for s, r in pairs) / len(pairs),
        "shape": sum(r.shape == s.shape for s, r in pairs) / len(pairs),
        "position": sum(r.position == s.position for s, r in placed) / max(1, len(placed)),
    }
