"""Face geometry of the synthetic faces: shape parameters, rasterised shapes, the label map and part masks.

Shapes live in face-local coordinates: ``u`` across the face and ``v`` downwards, in units of the face's half
width, centred on the face and rotated with the head tilt. Neck and clothes use the same units without the tilt
(the body stays upright). Every shape is an inequality on a grid of pixel centres, so the image and the masks are
rasterisations of the same geometry. ``l_`` parts (eye, brow, ear) lie on the image's left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.data import CLASS_NAMES

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
