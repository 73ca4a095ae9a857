"""Synthetic faces written in the CelebAMask-HQ layout, so the real loader runs without a download.

A face is a handful of parametric shapes (face oval, ears, neck, clothes, hair in several styles,
brows, eyes, nose, lips, open or closed mouth; glasses, hat, earrings and necklace on some faces)
rasterised at the label level, then an image is rendered from the label map with per-face colours,
shading and texture. Geometry and appearance come from two independent random streams seeded by
``(seed, index)``, so face ``i`` is the same whatever ``n`` or the number of workers, and the same
geometry can be rendered with different looks.

Shapes live in face-local coordinates: ``u`` across the face and ``v`` downwards, in units of the
face's half width, centred on the face and rotated with the head tilt. Neck and clothes use the same
units without the tilt (the body stays upright). Every shape is an inequality on a grid of pixel
centres, so the image (``size`` px) and the masks (``size / 2`` px, as in CelebAMask-HQ) are
rasterisations of the same geometry. ``l_`` parts (eye, brow, ear) lie on the image's left.

Layout written (``i`` the face index, ``part`` one of :data:`bench.data.PART_NAMES`)::

    DIR/CelebA-HQ-img/{i}.jpg                                     size x size RGB
    DIR/CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png    size/2 binary 0/255, one per part present
    DIR/synth.json                                                manifest: n, size, seed, generator version
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import typer
from PIL import Image, ImageFilter

from bench.cli import command
from bench.data import (
    CACHE_DIRNAME,
    CLASS_NAMES,
    IMAGE_DIRNAME,
    MASK_DIRNAME,
    data_app,
    mask_path,
    image_path,
    write_atomic,
)
from bench.errors import BenchError

GENERATOR_VERSION = 1  # bump whenever a face for a given (seed, index) changes: old sets get regenerated
MANIFEST_NAME = "synth.json"
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 1  # binary masks compress well even at the fastest level
MIN_SIZE = 16
CLS = {name: k for k, name in enumerate(CLASS_NAMES)}

# Painter's order, back to front. It differs from the label order where the picture needs it
# (long hair falls in front of the neck and clothes; earrings hang in front of hair); the part files
# are derived so that merging them in label order reproduces exactly this picture.
PAINT_ORDER = ("neck", "cloth", "neck_l", "l_ear", "r_ear", "skin", "nose", "eye_g", "l_eye", "r_eye",
               "l_brow", "r_brow", "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r")

HAIR_STYLES = ("short", "long", "bob", "fringe", "bun", "curly", "thin")
HAIR_STYLE_P = (0.24, 0.22, 0.13, 0.12, 0.08, 0.13, 0.08)
P_GLASSES, P_HAT, P_EARRINGS, P_NECKLACE, P_MOUTH_OPEN = 0.22, 0.15, 0.25, 0.22, 0.4
EAR_X, EAR_DROP = 0.97, 0.16   # ear centre: at the face's side, a little below the eye line
NECK_LEAN = 0.6                # how far the neck follows the chin when the head tilts


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

@dataclass
class Geometry:
    """Shape parameters of one face (lengths in face half-widths unless noted)."""

    cx: float            # face centre, fraction of the image width
    cy: float            # face centre, fraction of the image height
    scale: float         # face half width, fraction of the image width
    tilt: float          # head roll, radians
    h: float             # face half height
    jaw: float           # how much the oval narrows towards the chin
    eye_x: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_slant: float
    gaze: tuple[float, float]
    brow_gap: float
    brow_w: float
    brow_t: float
    brow_arch: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    smile: float
    lip_u: float
    lip_l: float
    mouth_open: float    # 0 = closed
    ear_w: float
    ear_h: float
    neck_w: float
    shoulder_gap: float
    shoulder_drop: float
    neckline: str        # "round", "v" or "high"
    neckline_depth: float
    hair: str
    hairline: float
    hair_len: float
    hair_part: float
    hair_volume: float
    glasses: str         # "" (none), "round" or "square"
    lens_w: float
    lens_h: float
    hat: str             # "" (none), "beanie" or "brim"
    hat_line: float
    earrings: str        # "" (none), "stud" or "hoop"
    earring_r: float
    necklace: bool
    necklace_dip: float


def sample_geometry(rng: np.random.Generator) -> Geometry:
    """Draw the shape parameters of one face."""
    u = rng.uniform
    h = u(1.22, 1.42)
    return Geometry(
        cx=u(0.43, 0.57), cy=u(0.44, 0.51), scale=u(0.21, 0.265), tilt=math.radians(u(-13, 13)),
        h=h, jaw=u(0.12, 0.38),
        eye_x=u(0.37, 0.45), eye_y=-u(0.10, 0.16) * h, eye_w=u(0.18, 0.24), eye_h=u(0.075, 0.12),
        eye_slant=u(-0.02, 0.04), gaze=(u(-0.04, 0.04), u(-0.015, 0.015)),
        brow_gap=u(0.16, 0.25), brow_w=u(0.2, 0.27), brow_t=u(0.07, 0.11), brow_arch=u(0.0, 0.07),
        nose_len=u(0.38, 0.5), nose_w=u(0.12, 0.17),
        mouth_y=u(0.48, 0.56) * h, mouth_w=u(0.28, 0.4), smile=u(-0.03, 0.09),
        lip_u=u(0.055, 0.085), lip_l=u(0.07, 0.115),
        mouth_open=u(0.05, 0.15) if rng.random() < P_MOUTH_OPEN else 0.0,
        ear_w=u(0.15, 0.21), ear_h=u(0.28, 0.36),
        neck_w=u(0.5, 0.66), shoulder_gap=u(0.12, 0.4), shoulder_drop=u(0.15, 0.45),
        neckline=str(rng.choice(("round", "v", "high"))), neckline_depth=u(0.25, 0.6),
        hair=str(rng.choice(HAIR_STYLES, p=HAIR_STYLE_P)), hairline=-u(0.5, 0.68) * h,
        hair_len=u(0.2, 1.6), hair_part=u(-0.25, 0.25), hair_volume=u(1.06, 1.18),
        glasses=str(rng.choice(("round", "square"))) if rng.random() < P_GLASSES else "",
        lens_w=u(0.25, 0.32), lens_h=u(0.17, 0.23),
        hat=str(rng.choice(("beanie", "brim"))) if rng.random() < P_HAT else "",
        hat_line=-u(0.5, 0.66) * h,
        earrings=str(rng.choice(("stud", "hoop"))) if rng.random() < P_EARRINGS else "",
        earring_r=u(0.08, 0.13),
        necklace=bool(rng.random() < P_NECKLACE), necklace_dip=u(0.1, 0.3),
    )


class Grid:
    """Pixel-centre coordinates of a ``res`` x ``res`` raster in face-local units (tilted and upright)."""

    def __init__(self, g: Geometry, res: int, rows: slice = slice(None), cols: slice = slice(None)):
        c = (np.arange(res, dtype=np.float32) + 0.5) / res
        x = (c[None, cols] - g.cx) / g.scale           # (1, C)
        y = (c[rows, None] - g.cy) / g.scale           # (R, 1)
        cos, sin = math.cos(g.tilt), math.sin(g.tilt)
        self.g, self.res = g, res
        self.u = x * cos + y * sin                     # (R, C) rotated with the head
        self.v = -x * sin + y * cos
        self.x, self.y = np.broadcast_arrays(x, y)     # (R, C) upright, for neck and clothes
        self.chin_x = -g.h * sin                       # where the chin lands in upright coordinates
        self.chin_y = g.h * cos
        self.neck_x = NECK_LEAN * self.chin_x          # the neck follows the head's tilt only partly

    def window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
        """Rows and columns of the pixels that a face-local box (rotated with the head) can touch."""
        g = self.g
        cos, sin = math.cos(g.tilt), math.sin(g.tilt)
        corners = [(u, v) for u in (u0, u1) for v in (v0, v1)]
        cols = [(g.cx + g.scale * (u * cos - v * sin)) * self.res for u, v in corners]
        rows = [(g.cy + g.scale * (u * sin + v * cos)) * self.res for u, v in corners]
        clamp = lambda a: min(max(a, 0), self.res)  # noqa: E731
        return (slice(clamp(math.floor(min(rows)) - 1), clamp(math.ceil(max(rows)) + 1)),
                slice(clamp(math.floor(min(cols)) - 1), clamp(math.ceil(max(cols)) + 1)))

    def crop(self, box: tuple[slice, slice]) -> "Grid":
        return Grid(self.g, self.res, *box)


def _ellipse(u, v, cu, cv, ru, rv, power=2.0):
    """Inside of a (super-)ellipse."""
    return np.abs((u - cu) / ru) ** power + np.abs((v - cv) / rv) ** power <= 1.0


def _face_oval(g: Geometry, q: Grid):
    """Egg-shaped face: narrower towards the chin."""
    below = np.clip(q.v / g.h, 0.0, 1.0)
    half_w = 1.0 - g.jaw * below ** 2
    return (q.u / half_w) ** 2 + (q.v / g.h) ** 2 <= 1.0


def _hairline(g: Geometry, u):
    """Lower edge of the hair on the forehead: lower at the temples, tilted by the parting."""
    return g.hairline + 0.22 * u ** 2 + g.hair_part * u * 0.3


def _almond(g: Geometry, q: Grid, side: int):
    """Eye region and, for rendering, its normalised position (s across, t down in [0, 1])."""
    s = (q.u - side * g.eye_x) / g.eye_w
    inside_s = np.abs(s) < 1.0
    centre = g.eye_y - g.eye_slant * s * side
    bulge = np.clip(1.0 - s ** 2, 0.0, None)
    top = centre - g.eye_h * bulge ** 0.8
    bottom = centre + 0.75 * g.eye_h * bulge
    region = inside_s & (q.v >= top) & (q.v <= bottom)
    t = (q.v - top) / np.maximum(bottom - top, 1e-6)
    return region, t


def _brow(g: Geometry, q: Grid, side: int):
    """A tapering arched band above the eye."""
    bx = side * (g.eye_x + 0.03)
    s = (q.u - bx) / g.brow_w
    outward = np.clip((s * side + 1.0) / 2.0, 0.0, 1.0)            # 0 at the inner end, 1 at the outer
    centre = g.eye_y - g.brow_gap - g.brow_arch * (1.0 - s ** 2) + 0.03 * outward
    thick = g.brow_t * (1.0 - 0.55 * outward ** 2)
    return (np.abs(s) < 1.0) & (np.abs(q.v - centre) <= thick / 2)


def _nose(g: Geometry, q: Grid):
    """A nose widening from the bridge to a rounded base; also its relative height (0 top, 1 base)."""
    top = g.eye_y + 0.02
    base = top + g.nose_len
    k = np.clip((q.v - top) / (base - top), 0.0, 1.0)
    half_w = g.nose_w * (0.3 + 0.7 * k ** 2.5)
    region = (q.v >= top) & (q.v <= base + 0.04) & (np.abs(q.u) <= half_w)
    region &= ~((q.v > base) & ((q.u / g.nose_w) ** 2 + ((q.v - base) / 0.045) ** 2 > 1.0))
    return region, k


def _mouth(g: Geometry, q: Grid):
    """Upper lip, lower lip and inner mouth as three regions, plus the lip midline for rendering."""
    s = q.u / g.mouth_w
    inside = np.abs(s) < 1.0
    span = np.clip(1.0 - s ** 2, 0.0, None)
    line = g.mouth_y - g.smile * s ** 2
    gap = g.mouth_open * span ** 0.7
    bow = 1.0 - 0.35 * np.exp(-(s / 0.12) ** 2)                      # the dip of the cupid's bow
    upper_top = line - gap / 2 - g.lip_u * np.sqrt(span) * bow
    lower_bottom = line + gap / 2 + g.lip_l * np.sqrt(span)
    u_lip = inside & (q.v >= upper_top) & (q.v < line - gap / 2)
    l_lip = inside & (q.v > line + gap / 2) & (q.v <= lower_bottom)
    mouth = inside & (q.v >= line - gap / 2) & (q.v <= line + gap / 2) & (gap > 1e-3)
    return u_lip, l_lip, mouth, line, gap


def _ear(g: Geometry, q: Grid, side: int):
    return _ellipse(q.u, q.v, side * EAR_X, g.eye_y + EAR_DROP, g.ear_w, g.ear_h)


def _ear_lobe(g: Geometry, side: int) -> tuple[float, float]:
    return side * EAR_X, g.eye_y + EAR_DROP + g.ear_h * 0.85


def _hair(g: Geometry, q: Grid, face):
    """Hair of the face's style: a cap over the head, plus curtains, bun or curls; never over the face."""
    u, v, h = q.u, q.v, g.h
    vol = g.hair_volume
    cap = _ellipse(u, v, 0.0, -0.06 * h, vol, (vol - 0.02) * h)
    ear_level = g.eye_y + 0.05
    if g.hair == "short":
        region = cap & (v <= ear_level)
    elif g.hair in ("long", "bob"):
        # Below the cap the hair falls as an elliptical mass with a wavy lower edge.
        bottom = h + g.hair_len if g.hair == "long" else h * 0.85
        top = -0.3 * h
        mass = _ellipse(u, v, 0.0, top, vol + 0.22, bottom - top) & (v >= top)
        mass &= v <= bottom - 0.06 - 0.06 * np.sin(10.0 * u)
        mass &= ~((np.abs(u) < 0.9 * g.neck_w) & (v > 0.5 * h))     # it falls behind the neck, not over it
        region = cap | mass
    elif g.hair == "fringe":
        region = cap & (v <= ear_level)
    elif g.hair == "bun":
        region = (cap & (v <= ear_level)) | _ellipse(u, v, 0.0, -1.12 * h, 0.42, 0.36)
    elif g.hair == "curly":
        phi = np.arctan2(v + 0.25 * h, u)
        radius = (vol + 0.35) * (1.0 + 0.07 * np.sin(9.0 * phi))
        region = (u ** 2 + ((v + 0.25 * h) / 1.05) ** 2 <= radius ** 2) & (v <= 0.55 * h)
    else:  # thin: a close crop that only shows round the top and sides
        region = _ellipse(u, v, 0.0, -0.03 * h, 1.04, 1.02 * h) & (v <= ear_level - 0.1)
    hairline = _hairline(g, u)
    if g.hair == "fringe":
        hairline = -0.45 * h + 0.06 + g.hair_part * u * 0.5 + 0.04 * np.abs(np.sin(11.0 * u))
    if g.hair == "thin":
        hairline = g.hairline - 0.18 * h + 0.22 * u ** 2
    return region & ~(face & (v > hairline))


def _hat(g: Geometry, q: Grid):
    u, v, h = q.u, q.v, g.h
    if g.hat == "beanie":
        fit = 1.25 if g.hair == "curly" else 1.0                        # stretched over big curls
        return _ellipse(u, v, 0.0, -0.12 * h, 1.2 * fit, 1.12 * h * fit) & (v <= g.hat_line)
    crown = _ellipse(u, v, 0.0, g.hat_line, 0.95, 0.72 * h) & (v <= g.hat_line)
    brim = (np.abs(u) <= 1.6) & (np.abs(v - g.hat_line + 0.03) <= 0.075) & (
        (u / 1.6) ** 2 + ((v - g.hat_line) / 0.2) ** 2 <= 1.0)
    return crown | brim


def _glasses(g: Geometry, q: Grid):
    """Glasses region (lenses, bridge, temples) and, for rendering, the frame alone."""
    u, v = q.u, q.v
    power = 2.0 if g.glasses == "round" else 5.0
    frame_t = 0.045
    lens_y = g.eye_y + 0.01
    lenses = np.zeros_like(u, dtype=bool)
    rims = np.zeros_like(u, dtype=bool)
    for side in (-1, 1):
        outer = _ellipse(u, v, side * g.eye_x, lens_y, g.lens_w, g.lens_h, power)
        inner = _ellipse(u, v, side * g.eye_x, lens_y, g.lens_w - frame_t, g.lens_h - frame_t, power)
        lenses |= outer
        rims |= outer & ~inner
    inner_edge = g.eye_x - g.lens_w + 0.02
    bridge = (np.abs(u) <= inner_edge) & (np.abs(v - (lens_y - 0.35 * g.lens_h)) <= frame_t / 2 + 0.005)
    outer_edge = g.eye_x + g.lens_w - 0.02
    temples = (np.abs(u) >= outer_edge) & (np.abs(u) <= 1.02) & (np.abs(v - (lens_y - 0.45 * g.lens_h)) <= 0.025)
    frame = rims | bridge | temples
    return lenses | frame, frame


def _earrings(g: Geometry, q: Grid):
    region = np.zeros_like(q.u, dtype=bool)
    for side in (-1, 1):
        lx, ly = _ear_lobe(g, side)
        r = g.earring_r
        d2 = (q.u - lx) ** 2 + (q.v - (ly + r)) ** 2
        ring = d2 <= r ** 2
        if g.earrings == "hoop":
            ring &= d2 >= (0.45 * r) ** 2
        region |= ring
    return region


def _neck(g: Geometry, q: Grid):
    return (np.abs(q.x - q.neck_x) <= g.neck_w) & (q.y >= 0.0)


def _shoulder_line(g: Geometry, q: Grid):
    return q.chin_y + g.shoulder_gap


def _cloth(g: Geometry, q: Grid):
    """Shoulders sloping outwards, with a round, V or high neckline that shows the neck."""
    nx = q.neck_x
    top = _shoulder_line(g, q)
    dx = q.x - nx
    body = q.y >= top + g.shoulder_drop * np.clip(np.abs(dx) - g.neck_w, 0.0, None) ** 1.5
    if g.neckline == "round":
        cut = _ellipse(q.x, q.y, nx, top, g.neck_w * 1.05, g.neckline_depth)
    elif g.neckline == "v":
        cut = (q.y >= top) & (np.abs(dx) <= g.neck_w * (1.0 - (q.y - top) / (g.neckline_depth + 0.3)))
    else:
        cut = np.zeros_like(body)
    return body & ~cut


def _necklace(g: Geometry, q: Grid):
    s = (q.x - q.neck_x) / g.neck_w
    centre = _shoulder_line(g, q) - 0.1 + g.necklace_dip * (1.0 - s ** 2)
    return (np.abs(s) <= 1.0) & (np.abs(q.y - centre) <= 0.045)


def draw_shapes(g: Geometry, q: Grid) -> dict[str, np.ndarray]:
    """Every part's full shape (occluded pixels included) as boolean arrays on the grid.

    Small parts are evaluated only inside a box around them: most of the raster is far from an eye.
    """
    def boxed(u0, u1, v0, v1, fn) -> list[np.ndarray]:
        box = q.window(u0, u1, v0, v1)
        outs = []
        for sub in fn(q.crop(box)):
            full = np.zeros((q.res, q.res), bool)
            full[box] = sub
            outs.append(full)
        return outs

    face = _face_oval(g, q)
    shapes = {"skin": face, "neck": _neck(g, q), "cloth": _cloth(g, q)}
    for side, lr in ((-1, "l"), (1, "r")):
        ex, bx, ey = side * g.eye_x, side * (g.eye_x + 0.03), g.eye_y
        shapes[f"{lr}_ear"], = boxed(side * EAR_X - g.ear_w, side * EAR_X + g.ear_w, ey + EAR_DROP - g.ear_h,
                                     ey + EAR_DROP + g.ear_h, lambda w, side=side: [_ear(g, w, side)])
        shapes[f"{lr}_eye"], = boxed(ex - g.eye_w, ex + g.eye_w, ey - 0.25, ey + 0.25,
                                     lambda w, side=side: [_almond(g, w, side)[0]])
        shapes[f"{lr}_brow"], = boxed(bx - g.brow_w, bx + g.brow_w, ey - g.brow_gap - 0.25, ey - g.brow_gap + 0.25,
                                      lambda w, side=side: [_brow(g, w, side)])
    shapes["nose"], = boxed(-g.nose_w, g.nose_w, g.eye_y - 0.05, g.eye_y + g.nose_len + 0.15,
                            lambda w: [_nose(g, w)[0]])
    shapes["u_lip"], shapes["l_lip"], shapes["mouth"] = boxed(
        -g.mouth_w, g.mouth_w, g.mouth_y - 0.3, g.mouth_y + 0.3, lambda w: _mouth(g, w)[:3])
    shapes["hair"] = _hair(g, q, face)
    if g.glasses:
        shapes["eye_g"], = boxed(-1.05, 1.05, g.eye_y - g.lens_h - 0.05, g.eye_y + g.lens_h + 0.05,
                                 lambda w: [_glasses(g, w)[0]])
    if g.hat:
        shapes["hat"] = _hat(g, q)
    if g.earrings:
        lobe_y = _ear_lobe(g, 1)[1]
        shapes["ear_r"], = boxed(-1.0 - g.earring_r - 0.05, 1.0 + g.earring_r + 0.05, lobe_y - 0.05,
                                 lobe_y + 2 * g.earring_r + 0.05, lambda w: [_earrings(g, w)])
    if g.necklace:
        shapes["neck_l"] = _necklace(g, q)
    return shapes


def paint(shapes: dict[str, np.ndarray]) -> np.ndarray:
    """Label map (uint8 class indices) of the shapes painted back to front."""
    label = np.zeros(next(iter(shapes.values())).shape, np.uint8)
    for part in PAINT_ORDER:
        if part in shapes:
            label[shapes[part]] = CLS[part]
    return label


def part_masks(shapes: dict[str, np.ndarray], label: np.ndarray) -> dict[str, np.ndarray]:
    """Binary part masks that merge (label order, later over earlier) into ``label``.

    A part keeps its visible pixels plus the pixels of its shape covered by a part with a higher
    label (which overwrites them anyway when merged), so parts overlap as in the real annotations
    (skin under the eyes, hair under the hat); parts with no visible pixel are not written.
    """
    parts = {}
    for part in CLASS_NAMES[1:]:
        visible = label == CLS[part]
        if not visible.any():
            continue
        parts[part] = visible | (shapes[part] & (label > CLS[part]))
    return parts


# ----------------------------------------------------------------------------------------------
# Appearance
# ----------------------------------------------------------------------------------------------

SKIN_LIGHT, SKIN_DARK = np.array([0.97, 0.82, 0.71]), np.array([0.33, 0.2, 0.13])
HAIR_COLOURS = np.array([[0.07, 0.06, 0.05], [0.2, 0.13, 0.08], [0.38, 0.25, 0.14], [0.8, 0.66, 0.42],
                         [0.58, 0.25, 0.11], [0.62, 0.61, 0.6]])
IRIS_COLOURS = np.array([[0.3, 0.18, 0.08], [0.13, 0.08, 0.05], [0.25, 0.45, 0.7], [0.3, 0.5, 0.3],
                         [0.45, 0.5, 0.55]])
METALS = np.array([[0.85, 0.68, 0.3], [0.8, 0.8, 0.82], [0.95, 0.93, 0.88]])
SCLERA = np.array([0.93, 0.91, 0.88], np.float32)
MOUTH_INSIDE = np.array([0.32, 0.08, 0.1], np.float32)
TEETH = np.array([0.93, 0.91, 0.85], np.float32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One RGB colour in [0, 1] from hue, saturation, value."""
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


@dataclass
class Appearance:
    """Colours, lighting and texture choices of one rendering."""

    skin: np.ndarray
    hair: np.ndarray
    lips: np.ndarray
    iris: np.ndarray
    cloth: np.ndarray
    cloth2: np.ndarray
    cloth_pattern: str
    hat: np.ndarray
    metal: np.ndarray
    frame: np.ndarray
    lens_tint: np.ndarray
    bg: tuple[np.ndarray, np.ndarray]
    bg_angle: float
    light: np.ndarray
    ambient: float
    teeth: bool
    strand_freq: float


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Draw the colours and lighting of one rendering."""
    u = rng.uniform
    skin = SKIN_LIGHT + (SKIN_DARK - SKIN_LIGHT) * u(0, 1) ** 1.3
    skin = np.clip(skin * rng.normal(1.0, 0.03, 3), 0, 1)
    if rng.random() < 0.1:
        hair = _hsv(u(0, 1), u(0.4, 0.8), u(0.3, 0.8))                  # dyed
    else:
        hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.normal(1.0, 0.08, 3)
    red = np.array([0.72, 0.22, 0.28])
    lips = np.clip((skin * np.array([0.85, 0.55, 0.55])) * (1 - u(0, 0.6)) + red * u(0, 0.5), 0, 1)
    bg_a = _hsv(u(0, 1), u(0, 0.5), u(0.15, 0.95))
    bg_b = np.clip(bg_a * u(0.6, 1.3) + rng.normal(0, 0.08, 3), 0, 1)
    light = np.array([u(-0.6, 0.6), u(-0.5, 0.1), 1.0])
    f32 = lambda c: np.asarray(c, np.float32)  # noqa: E731  float32 keeps the shading arithmetic in float32
    return Appearance(
        skin=f32(skin), hair=f32(np.clip(hair, 0, 1)), lips=f32(lips),
        iris=f32(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]),
        cloth=f32(_hsv(u(0, 1), u(0.1, 0.9), u(0.15, 0.95))), cloth2=f32(_hsv(u(0, 1), u(0, 0.8), u(0.2, 1.0))),
        cloth_pattern=str(rng.choice(("plain", "plain", "stripes", "check"))),
        hat=f32(_hsv(u(0, 1), u(0.3, 0.9), u(0.2, 0.9))),
        metal=f32(METALS[rng.integers(len(METALS))]),
        frame=f32(_hsv(u(0, 1), u(0, 0.6), u(0.05, 0.5))),
        lens_tint=f32(np.clip(1.0 - rng.uniform(0, 0.25, 3), 0, 1)),
        bg=(f32(bg_a), f32(bg_b)), bg_angle=u(0, 2 * math.pi),
        light=f32(light / np.linalg.norm(light)), ambient=u(0.35, 0.55),
        teeth=bool(rng.random() < 0.7), strand_freq=u(9, 16),
    )


def _smooth_noise(rng: np.random.Generator, res: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled smoothly."""
    coarse = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((res, res), Image.BICUBIC), dtype=np.float32)


@dataclass
class Pixels:
    """The pixels of one class, flattened: coordinates, noise fields, and the face they belong to."""

    u: np.ndarray
    v: np.ndarray
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray      # low-frequency noise in about [-1, 1]
    mid: np.ndarray      # mid-frequency noise
    chin_y: float
    neck_x: float
    g: Geometry
    a: Appearance

    def head_shade(self) -> np.ndarray:
        """Diffuse light on the head seen as an ellipsoid."""
        nu, nv = self.u / 1.35, self.v / (1.35 * self.g.h)
        nz = np.sqrt(np.clip(1.0 - nu ** 2 - nv ** 2, 0.0, 1.0))
        light = self.a.light
        lam = np.clip(nu * light[0] + nv * light[1] + nz * light[2], 0.0, 1.0)
        return self.a.ambient + (1 - self.a.ambient) * lam

    def body_shade(self) -> np.ndarray:
        """Diffuse light on the body seen as an upright cylinder."""
        bx = np.clip((self.x - self.neck_x) / 2.2, -1, 1)
        lam = np.clip(bx * self.a.light[0] + np.sqrt(1 - bx ** 2) * self.a.light[2], 0, 1)
        return self.a.ambient + (1 - self.a.ambient) * lam

    def skin(self) -> np.ndarray:
        return self.a.skin * (self.head_shade() * (1 + 0.05 * self.low))[:, None]


PAINTERS: dict[str, Callable[[Pixels], np.ndarray]] = {}


def _painter(*parts: str):
    """Register the function that colours the pixels of ``parts``: ``fn(pixels) -> (n, 3)`` RGB."""

    def deco(fn):
        for part in parts:
            PAINTERS[part] = fn
        return fn

    return deco


@_painter("background")
def _paint_background(p: Pixels):
    a = p.a
    t = (np.clip(p.x * math.cos(a.bg_angle) + p.y * math.sin(a.bg_angle), -4, 4) / 8 + 0.5)[:, None]
    return a.bg[0] * (1 - t) + a.bg[1] * t + 0.04 * p.low[:, None]


@_painter("neck")
def _paint_neck(p: Pixels):
    chin_shadow = 0.72 + 0.28 * np.clip((p.y - p.chin_y) / 0.5, 0, 1)
    return p.a.skin * (p.body_shade() * chin_shadow * 0.9)[:, None]


@_painter("cloth")
def _paint_cloth(p: Pixels):
    a = p.a
    if a.cloth_pattern == "stripes":
        first = np.sin(p.y * 9.0) > 0
    elif a.cloth_pattern == "check":
        first = (np.sin(p.y * 7.0) > 0) ^ (np.sin(p.x * 7.0) > 0)
    else:
        first = np.ones_like(p.x, dtype=bool)
    cloth = np.where(first[:, None], a.cloth, a.cloth2)
    folds = 1 + 0.08 * p.mid * np.clip(p.low + 1.0, 0.0, 2.0)
    return cloth * (p.body_shade() * folds)[:, None]


@_painter("neck_l")
def _paint_necklace(p: Pixels):
    return p.a.metal * (0.8 + 0.2 * np.sin(p.x * 60.0))[:, None]          # beads


@_painter("l_ear", "r_ear")
def _paint_ear(p: Pixels):
    g = p.g
    ear = p.a.skin * (p.head_shade() * 0.88)[:, None]
    inner = np.zeros_like(p.u, dtype=bool)
    for side in (-1, 1):
        inner |= _ellipse(p.u, p.v, side * EAR_X, g.eye_y + EAR_DROP, g.ear_w * 0.5, g.ear_h * 0.6)
    return np.where(inner[:, None], ear * 0.82, ear)


@_painter("skin")
def _paint_skin(p: Pixels):
    return p.skin()


@_painter("nose")
def _paint_nose(p: Pixels):
    g, a = p.g, p.a
    _, k = _nose(g, p)
    side_lit = np.clip(np.sign(p.u) * a.light[0], 0.0, 1.0)    # the side facing the light stays bright
    shade = 1.0 - 0.35 * np.clip(np.abs(p.u) / g.nose_w, 0, 1) ** 2 * (1 - 0.7 * side_lit) * (1 - 0.4 * k)
    base = g.eye_y + 0.02 + g.nose_len
    nostrils = np.zeros_like(p.u, dtype=bool)
    for side in (-1, 1):
        nostrils |= _ellipse(p.u, p.v, side * 0.45 * g.nose_w, base - 0.01, 0.045, 0.022)
    skin = p.skin()
    return np.where(nostrils[:, None], skin * 0.45, skin * (0.95 * shade)[:, None])


@_painter("eye_g")
def _paint_glasses(p: Pixels):
    a = p.a
    _, frame = _glasses(p.g, p)
    lens = p.skin() * a.lens_tint + 0.12 * np.clip(np.sin((p.u + p.v) * 6.0), 0, 1)[:, None]   # reflection
    return np.where(frame[:, None], a.frame * (p.head_shade()[:, None] * 0.5 + 0.5), lens)


@_painter("l_eye", "r_eye")
def _paint_eye(p: Pixels):
    g, a = p.g, p.a
    side = np.where(p.u < 0, -1.0, 1.0)
    _, t_top = _almond(g, p, side)
    iris_r = min(0.1, 0.55 * g.eye_w)
    d = np.sqrt((p.u - side * g.eye_x - g.gaze[0]) ** 2 + (p.v - g.eye_y - g.gaze[1]) ** 2)
    eye = np.where((d <= iris_r)[:, None], a.iris * (0.7 + 0.3 * d / iris_r)[:, None], SCLERA)
    eye = np.where((d <= 0.45 * iris_r)[:, None], 0.05, eye)               # pupil
    lid = np.clip(1.0 - t_top / 0.3, 0, 1)[:, None]                      # dark upper lid line
    return eye * (1 - 0.75 * lid)


@_painter("l_brow", "r_brow")
def _paint_brow(p: Pixels):
    return p.a.hair * (0.75 * (1 + 0.25 * np.sin(p.u * 80.0)))[:, None]


@_painter("mouth")
def _paint_mouth(p: Pixels):
    _, _, _, line, gap = _mouth(p.g, p)
    teeth = (p.v < line - gap / 2 + 0.45 * gap) & p.a.teeth
    return np.where(teeth[:, None], TEETH, MOUTH_INSIDE) * p.head_shade()[:, None]


@_painter("u_lip")
def _paint_upper_lip(p: Pixels):
    return p.a.lips * (0.85 * p.head_shade())[:, None]


@_painter("l_lip")
def _paint_lower_lip(p: Pixels):
    g = p.g
    _, _, _, line, gap = _mouth(g, p)
    shine = 0.15 * np.exp(-((p.v - line - gap / 2 - 0.35 * g.lip_l) / (0.3 * g.lip_l)) ** 2)
    return p.a.lips * p.head_shade()[:, None] + shine[:, None]


@_painter("hair")
def _paint_hair(p: Pixels):
    a = p.a
    strands = np.sin(a.strand_freq * (p.u + 0.35 * p.low) * math.pi) * 0.5 + 0.5
    return a.hair * (0.25 + 0.95 * p.head_shade() * (0.75 + 0.35 * strands))[:, None]


@_painter("hat")
def _paint_hat(p: Pixels):
    knit = 0.85 + 0.15 * np.sin(p.u * 40.0) * np.sin(p.v * 40.0)
    return p.a.hat * (p.head_shade() * knit)[:, None]


@_painter("ear_r")
def _paint_earring(p: Pixels):
    return p.a.metal * np.clip(1.2 - 0.6 * np.abs(p.u - p.v), 0.6, 1.2)[:, None]   # metallic glint


def render_image(label: np.ndarray, g: Geometry, a: Appearance, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 image of a face whose label map (at the image resolution) is ``label``.

    Each class's painter runs on that class's pixels only, so every pixel is shaded once.
    """
    res = label.shape[0]
    q = Grid(g, res)
    low = _smooth_noise(rng, res, 6).ravel()
    mid = _smooth_noise(rng, res, 20).ravel()
    fields = [q.u.ravel(), q.v.ravel(), q.x.ravel(), q.y.ravel(), low, mid]
    flat = label.ravel()
    order = np.argsort(flat, kind="stable")
    ends = np.cumsum(np.bincount(flat, minlength=len(CLASS_NAMES)))
    img = np.empty((res * res, 3), np.float32)
    for k, name in enumerate(CLASS_NAMES):
        idx = order[ends[k - 1] if k else 0:ends[k]]
        if idx.size:
            pix = Pixels(*(f[idx] for f in fields), chin_y=q.chin_y, neck_x=q.neck_x, g=g, a=a)
            img[idx] = PAINTERS[name](pix)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 0.015       # sensor-like grain
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(res, res, 3))
    return np.asarray(out.filter(ImageFilter.BoxBlur(0.35 * res / 128)))   # soften the raster's stair steps


# ----------------------------------------------------------------------------------------------
# One face, the whole set
# ----------------------------------------------------------------------------------------------

@dataclass
class SynthFace:
    """One generated face: its image, its label map at mask resolution and its binary part masks."""

    image: np.ndarray              # (S, S, 3) uint8
    label: np.ndarray              # (S/2, S/2) uint8 class indices, what merging the parts gives
    parts: dict[str, np.ndarray]   # part name -> (S/2, S/2) bool


def _check_size(size: int) -> None:
    if size < MIN_SIZE or size % 2:
        raise BenchError(f"--size {size} is not usable: give an even image size >= {MIN_SIZE} "
                         f"(masks are written at half of it), e.g. 256")


def make_face(seed: int, index: int, size: int, appearance_seed: int | None = None) -> SynthFace:
    """Face ``index`` of the set with ``seed`` at ``size`` px; ``appearance_seed`` re-renders the same mask."""
    _check_size(size)
    g = sample_geometry(np.random.default_rng([seed, index, 0]))
    look_rng = np.random.default_rng([seed, index, 1] if appearance_seed is None else [appearance_seed, index, 2])
    appearance = sample_appearance(look_rng)
    mask_grid = Grid(g, size // 2)
    shapes = draw_shapes(g, mask_grid)
    label = paint(shapes)
    image = render_image(paint(draw_shapes(g, Grid(g, size))), g, appearance, look_rng)
    return SynthFace(image=image, label=label, parts=part_masks(shapes, label))


def write_face(root: Path, index: int, face: SynthFace) -> None:
    """Write one face's image and part masks into the CelebAMask-HQ layout under ``root``.

    Files are written in place, not through a temporary file each: the set's unit of atomicity is
    its manifest, marked complete only after the last face, so an interrupted set is never reused.
    """
    Image.fromarray(face.image).save(image_path(root, index), "JPEG", quality=JPEG_QUALITY)
    for part, mask in face.parts.items():
        Image.fromarray(mask.view(np.uint8) * np.uint8(255)).save(mask_path(root, index, part), "PNG",
                                                                 compress_level=PNG_COMPRESS_LEVEL)


def _generate_one(job: tuple[str, int, int, int]) -> int:
    root, index, size, seed = job
    write_face(Path(root), index, make_face(seed, index, size))
    return index


@dataclass
class Manifest:
    """What a synthetic set holds; ``complete`` turns true only after every face was written."""

    n: int
    size: int
    seed: int
    version: int = GENERATOR_VERSION
    generator: str = "sis-bench synthetic faces"
    complete: bool = False


def read_manifest(root: Path) -> Manifest | None:
    try:
        return Manifest(**json.loads((Path(root) / MANIFEST_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_manifest(root: Path, m: Manifest) -> None:
    write_atomic(root / MANIFEST_NAME, lambda f: f.write(json.dumps(asdict(m), indent=2).encode()))


def _prepare_folder(root: Path) -> None:
    """Empty the layout of an earlier synthetic set in ``root``; refuse to touch anyone else's files."""
    if root.exists() and not root.is_dir():
        raise BenchError(f"{root} is a file; give a folder for the synthetic set")
    ours = (root / MANIFEST_NAME).exists()
    if root.exists() and any(root.iterdir()) and not ours:
        raise BenchError(f"{root} is not empty and holds no {MANIFEST_NAME} (not a synthetic set); "
                         f"give an empty or new folder")
    for sub in (IMAGE_DIRNAME, MASK_DIRNAME, CACHE_DIRNAME):
        shutil.rmtree(root / sub, ignore_errors=True)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def generate_synthetic(out_dir: str | os.PathLike, n: int, size: int = 256, seed: int = 0,
                       workers: int | None = None, progress: bool = True) -> Path:
    """Write ``n`` synthetic faces at ``size`` px into ``out_dir`` in the CelebAMask-HQ layout."""
    from tqdm import tqdm

    if n < 1:
        raise BenchError(f"--n {n}: give at least one face")
    _check_size(size)
    root = Path(out_dir)
    _prepare_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(n=n, size=size, seed=seed)
    _write_manifest(root, manifest)
    for sub in range((n - 1) // 2000 + 1):
        (root / MASK_DIRNAME / str(sub)).mkdir(parents=True, exist_ok=True)
    (root / IMAGE_DIRNAME).mkdir(parents=True, exist_ok=True)

    workers = default_workers() if workers is None else max(1, workers)
    jobs = [(str(root), i, size, seed) for i in range(n)]
    bar = tqdm(total=n, desc="synthetic faces", unit="face", disable=not progress)
    if workers == 1 or n < 4 * workers:
        for job in jobs:
            _generate_one(job)
            bar.update()
    else:
        import multiprocessing

        with multiprocessing.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(_generate_one, jobs, chunksize=8):
                bar.update()
    bar.close()
    manifest.complete = True
    _write_manifest(root, manifest)
    return root


def ensure_synthetic(out_dir: str | os.PathLike, n: int, size: int = 256, seed: int = 0,
                     progress: bool = True) -> Path:
    """The synthetic set in ``out_dir``: reused when its manifest matches, (re)generated otherwise."""
    root = Path(out_dir)
    m = read_manifest(root)
    if m is not None and m.complete and (m.n, m.size, m.seed, m.version) == (n, size, seed, GENERATOR_VERSION):
        return root
    return generate_synthetic(root, n, size, seed, progress=progress)


@command("synth", parent=data_app)
def synth_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write the set into (new, empty, or an earlier synthetic set)."),
    n: int = typer.Option(2000, "--n", help="Number of faces."),
    size: int = typer.Option(256, "--size", help="Image size in pixels (even); masks are written at half of it."),
    seed: int = typer.Option(0, "--seed", help="Seed: face i depends only on (seed, i), not on --n or --workers."),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0: one per available core, up to 8)."),
):
    """Generate synthetic faces in the CelebAMask-HQ layout (images, one binary PNG per part)."""
    root = generate_synthetic(out, n, size, seed, workers=workers or None)
    typer.echo(f"wrote {n} faces ({size} px images, {size // 2} px masks) to {root}")
