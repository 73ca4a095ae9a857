"""Rendering of a synthetic face: colours, lighting and texture painted class by class from its label map."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from bench.data import CLASS_NAMES
from bench.synth.geometry import EAR_DROP, EAR_X, Geometry, Grid, _almond, _ellipse, _glasses, _mouth, _nose

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
