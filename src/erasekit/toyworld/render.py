"""ShapesCanvas: deterministic procedural images of one object with attributes.

A scene is one object (:data:`OBJECTS`) of one colour (:data:`COLOURS`), drawn in one style
(:data:`STYLES`) on one background (:data:`BACKGROUNDS`), at a random position, size and rotation.
Rendering is pure numpy with 4x4 supersampling (anti-aliased edges), so the same scene gives the
same pixels on every machine.

The attributes were chosen to survive a 32-pixel canvas and a small VAE: shapes that differ at that
size (no square-vs-rotated-square ambiguity: rotations stay within +-20 degrees and the diamond is
a tall rhombus), solid colours far apart in hue, and styles whose structure is coarse (an outline
two pixels wide, a vertical gradient, a checkerboard of 4-pixel cells).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

OBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "crescent", "diamond")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
STYLES: tuple[str, ...] = ("flat", "outline", "gradient", "checkered")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray")

#: The attribute types of a scene, in the order used everywhere (detector heads, tables).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "object": OBJECTS,
    "colour": COLOURS,
    "style": STYLES,
    "background": BACKGROUNDS,
}

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (150, 50, 190),
    "black": (12, 12, 12),
    "white": (242, 242, 242),
    "gray": (128, 128, 128),
}

SUPERSAMPLE = 4
ROTATION_DEGREES = 20.0


@dataclass(frozen=True)
class Scene:
    """Everything that determines an image: attributes and placement (pixels and degrees)."""

    object: str
    colour: str
    style: str
    background: str
    x: float
    y: float
    radius: float
    rotation: float

    def attributes(self) -> dict[str, str]:
        """``{"object": ..., "colour": ..., "style": ..., "background": ...}``."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sample_placement(rng: np.random.Generator, size: int = 32) -> tuple[float, float, float, float]:
    """Random ``(x, y, radius, rotation)`` that keeps the object inside a ``size`` canvas."""
    radius = float(rng.uniform(0.30, 0.44) * size)
    margin = radius * 0.95 + 1
    x = float(rng.uniform(margin, size - margin))
    y = float(rng.uniform(margin, size - margin))
    rotation = float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
    return x, y, radius, rotation


def sample_scene(rng: np.random.Generator, size: int = 32, **fixed: str) -> Scene:
    """A random scene; attributes given in ``fixed`` (e.g. ``object="circle"``) are kept."""
    for name, value in fixed.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {name!r}; use one of {list(ATTRIBUTES)}")
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r}; use one of {list(ATTRIBUTES[name])}")
    chosen = {name: fixed.get(name) or str(rng.choice(values)) for name, values in ATTRIBUTES.items()}
    return Scene(**chosen, **dict(zip(("x", "y", "radius", "rotation"), sample_placement(rng, size))))


# ----------------------------------------------------------------------------- shapes
def _polygon(vertices: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of the points ``(u, v)`` (vectorised over the points)."""
    inside = np.zeros(u.shape, dtype=bool)
    count = len(vertices)
    for k in range(count):
        (u1, v1), (u2, v2) = vertices[k], vertices[(k + 1) % count]
        crosses = (v1 > v) != (v2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            u_at = u1 + (v - v1) * (u2 - u1) / (v2 - v1)
        inside ^= crosses & (u < u_at)
    return inside


def _star_vertices(points: int = 5, outer: float = 1.0, inner: float = 0.45) -> np.ndarray:
    angles = [math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    radii = [outer if k % 2 == 0 else inner for k in range(2 * points)]
    return np.array([(r * math.cos(a), r * math.sin(a)) for a, r in zip(angles, radii)])


_TRIANGLE = np.array([(0.0, 1.0), (-0.95, -0.75), (0.95, -0.75)])
_STAR = _star_vertices()
_HEART_POINT = np.array([(-0.93, 0.18), (0.93, 0.18), (0.0, -0.98)])


def shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of object ``name`` in its unit frame (``v`` points up, extent about [-1, 1])."""
    if name == "circle":
        return u**2 + v**2 <= 0.92**2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if name == "triangle":
        return _polygon(_TRIANGLE, u, v)
    if name == "star":
        return _polygon(_STAR, u, v)
    if name == "heart":
        # two lobes and a point: a deeper notch and a sharper tip than the smooth heart curve, so
        # that the model's hearts at 32 px are not drawn as round blobs (taken for circles)
        lobes = ((u - 0.47) ** 2 + (v - 0.33) ** 2 <= 0.25) | ((u + 0.47) ** 2 + (v - 0.33) ** 2 <= 0.25)
        return lobes | _polygon(_HEART_POINT, u, v)
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if name == "crescent":
        return (u**2 + v**2 <= 0.95**2) & ((u - 0.45) ** 2 + (v - 0.1) ** 2 > 0.72**2)
    if name == "diamond":
        return np.abs(u) / 0.6 + np.abs(v) <= 1.0
    raise ValueError(f"unknown object {name!r}; use one of {list(OBJECTS)}")


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion with a 3x3 square element, ``steps`` times (pure numpy)."""
    out = mask.copy()
    for _ in range(steps):
        padded = np.pad(out, 1, constant_values=False)
        eroded = np.ones_like(out)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                eroded &= padded[dy : dy + out.shape[0], dx : dx + out.shape[1]]
        out = eroded
    return out


def _unit_frame(
    x: float, y: float, radius: float, rotation: float, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Supersampled pixel coordinates ``(px, py)`` and an object's unit-frame coordinates ``(u, v)``."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # pixel units
    px, py = np.meshgrid(coords, coords)
    angle = math.radians(rotation)
    dx, dy = px - x, y - py  # dy up
    cos, sin = math.cos(angle), math.sin(angle)
    return px, py, (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius


def coverage(name: str, x: float, y: float, radius: float, rotation: float, size: int = 32) -> np.ndarray:
    """The share of each pixel that object ``name`` covers when drawn at this placement: ``(size, size)`` floats."""
    _, _, u, v = _unit_frame(x, y, radius, rotation, size)
    return shape_mask(name, u, v).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render ``scene`` as a ``(size, size, 3)`` uint8 RGB image (deterministic)."""
    px, py, u, v = _unit_frame(scene.x, scene.y, scene.radius, scene.rotation, size)
    return _paint(scene, shape_mask(scene.object, u, v), px, py, size)


def _paint(scene: Scene, inside: np.ndarray, px: np.ndarray, py: np.ndarray, size: int) -> np.ndarray:
    """Colour, style and background of ``scene`` on the supersampled object mask ``inside``, downsampled."""
    n = size * SUPERSAMPLE
    colour = np.array(RGB[scene.colour], dtype=np.float64)
    fill = np.broadcast_to(colour, (n, n, 3)).copy()
    if scene.style == "outline":
        inside = inside & ~_erode(inside, max(1, round(2 * SUPERSAMPLE * size / 32)))
    elif scene.style == "gradient":
        # Full colour at the object's top fading to 25 % at its bottom (image axes, not rotated).
        t = np.clip((scene.y + scene.radius - py) / (2 * scene.radius), 0.0, 1.0)
        fill *= (0.25 + 0.75 * t)[..., None]
    elif scene.style == "checkered":
        cell = 4 * size / 32
        odd = ((np.floor(px / cell) + np.floor(py / cell)) % 2).astype(bool)
        fill[odd] = colour * 0.35
    elif scene.style != "flat":
        raise ValueError(f"unknown style {scene.style!r}; use one of {list(STYLES)}")

    background = np.array(RGB[scene.background], dtype=np.float64)
    image = np.where(inside[..., None], fill, background)
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_morph(scene: Scene, other: str, t: float, size: int = 32) -> np.ndarray:
    """``scene`` with its object replaced by a shape ``t`` of the way from it to object ``other``.

    Both silhouettes are softened (a box blur of a tenth of the radius, at the supersampled
    resolution) and mixed with weights ``1 - t`` and ``t``; the morph is where the mix exceeds one
    half, so ``t`` = 0.5 between a circle and a square is a rounded square. Colour, style and
    background are drawn as :func:`render` draws them. For judging in-between shapes: a judge
    should name the scene's object near 0, ``other`` near 1, and hesitate in between.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    px, py, u, v = _unit_frame(scene.x, scene.y, scene.radius, scene.rotation, size)
    width = max(1, round(0.1 * scene.radius * SUPERSAMPLE))

    def soft(name: str) -> np.ndarray:
        field = shape_mask(name, u, v).astype(np.float64)
        kernel = np.ones(2 * width + 1) / (2 * width + 1)
        for axis in (0, 1):
            field = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), axis, field)
        return field

    inside = (1 - t) * soft(scene.object) + t * soft(other) > 0.5
    return _paint(scene, inside, px, py, size)


# ----------------------------------------------------------------------------- "no object" images
NONE_KINDS: tuple[str, ...] = ("empty", "blob", "noise")


def render_none(rng: np.random.Generator, size: int = 32, kind: str | None = None) -> np.ndarray:
    """An image that shows no object: an empty background, a soft colour blob, or noise.

    These train the object detector's ``none`` class, so an erased image that shows nothing
    recognisable is not forced into an object class.
    """
    kind = kind or str(rng.choice(NONE_KINDS))
    background = np.array(RGB[str(rng.choice(BACKGROUNDS))], dtype=np.float64)
    if kind == "empty":
        image = np.broadcast_to(background, (size, size, 3)).copy()
        image += rng.normal(0, 3, image.shape)
    elif kind == "blob":
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        image = np.broadcast_to(background, (size, size, 3)).copy()
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(4, size - 4, 2)
            sx, sy = rng.uniform(2, size / 4, 2)
            weight = np.exp(-((xx - cx) ** 2) / (2 * sx**2) - ((yy - cy) ** 2) / (2 * sy**2))[..., None]
            colour = np.array(RGB[str(rng.choice(COLOURS))], dtype=np.float64)
            image = image * (1 - weight * 0.9) + colour * weight * 0.9
    elif kind == "noise":
        low = rng.normal(0, 1, (size // 8, size // 8, 3))
        image = np.kron(low, np.ones((8, 8, 1))) * 50 + background + rng.normal(0, 20, (size, size, 3))
    else:
        raise ValueError(f"unknown kind {kind!r}; use one of {list(NONE_KINDS)}")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
