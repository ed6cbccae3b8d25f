"""Procedural production-line images: turned steel flanges on a moving conveyor belt.

Used by the demo and by tests that must run anywhere, so everything here is generated from
scratch and is deterministic per seed. The scene imitates an inspection station: a dark rubber
belt running left to right between two static steel guide rails, one machined flange per frame
(lathe-turned face with the bow-tie reflection typical of turned metal, raised hub, bore, six
through-holes, a laser-etched mark), a soft drop shadow, camera blur, sensor noise and mild
lighting drift. Normal variation (position, rotation, belt texture under the part, lighting,
noise) is wide enough to be realistic and narrow enough that a small EfficientAD learns it in a
few hundred steps. Defects are those of the product:

- ``scratch``: a thin gouge with a bright core and dark burr, slightly curved;
- ``spot``: an irregular rust/oil stain;
- ``crack``: a dark jagged line with branches, starting at the rim or at a hole;
- ``missing``: a chipped-off piece of the rim (belt visible where metal should be).

Masks mark the defect pixels (for ``missing``: where the material should have been).
Outputs: ``generate_mvtec`` (a training/test category), ``line_frames`` / ``write_line`` /
``write_frames`` (a camera stream with defect episodes at known frames).

Why this module is long: it is one renderer. Belt, part sprite, defects and compositing share
private geometry, lighting and random-stream conventions that every output must follow (the
same part must look the same in a training set and in a line stream), so they stay together
instead of exporting their internals.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from models.model_card import DEFAULT_IMAGE_SIZE

DEFECT_TYPES = ("scratch", "spot", "crack", "missing")
GENERATOR_VERSION = 1
_BELT_SEED = 20240607  # one physical belt: the same texture in training data and line streams
_BELT_LOOP = 6  # belt loop length in frame widths
_N_HOLES = 6
_MARK_TEXT = "A7"


@dataclass(frozen=True)
class _Lighting:
    gain: float
    gradient: tuple[float, float]  # relative brightness change per frame width along x and y
    light_angle: float  # radians: direction of the bow-tie reflection on the turned face
    noise_sigma: float


@dataclass
class _Sprite:
    """A rendered part in its own canvas: colour (BGR float), coverage alpha, defect mask."""

    color: np.ndarray  # (S, S, 3) float32
    alpha: np.ndarray  # (S, S) float32 in [0, 1]
    mask: np.ndarray  # (S, S) bool
    shadow: np.ndarray  # (S, S) float32 in [0, 1], blurred coverage


@dataclass
class LineEpisode:
    start: int
    length: int
    defect: str

    @property
    def end(self) -> int:
        return self.start + self.length


# ---------------------------------------------------------------------------------------------
# Scene: belt, rails, lighting


def _wrap_blur(noise: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur that wraps around along x so the belt loop has no seam."""
    pad = math.ceil(3 * sigma) + 1
    padded = np.concatenate([noise[:, -pad:], noise, noise[:, :pad]], axis=1)
    blurred = cv2.GaussianBlur(padded, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    return blurred[:, pad:-pad]


def _rail_rows(height: int) -> int:
    return max(4, round(0.085 * height))


@lru_cache(maxsize=8)
def _belt_texture(height: int, width: int) -> np.ndarray:
    """The belt loop, (H, L, 3) float32 BGR, periodic along x."""
    unit = min(height, width) / 256.0
    length = _BELT_LOOP * width
    rng = np.random.default_rng(_BELT_SEED)
    grain = _wrap_blur(rng.normal(0.0, 1.0, (height, length)).astype(np.float32), 0.7 * unit)
    grain *= 9.0 / max(float(grain.std()), 1e-6)
    mottle = _wrap_blur(rng.normal(0.0, 1.0, (height, length)).astype(np.float32), 9.0 * unit)
    mottle *= 4.0 / max(float(mottle.std()), 1e-6)
    streak_rows = cv2.GaussianBlur(
        rng.normal(0.0, 1.0, (height, 1)).astype(np.float32), (0, 0), sigmaX=0.1, sigmaY=1.5 * unit
    )
    streak_rows *= 3.0 / max(float(streak_rows.std()), 1e-6)
    grey = 66.0 + grain + mottle + streak_rows
    # fabric-reinforced belts show faint transverse ribs every few millimetres
    x = np.arange(length, dtype=np.float32)
    period = length / round(length / (7.0 * unit))
    grey += 2.5 * np.cos(2 * np.pi * x / period)[None, :]
    # worn light specks (rubber abrasion), part of the belt, hence identical in every frame
    n_specks = int(length * height / (1800.0 * unit * unit))
    speck_layer = np.zeros((height, length), np.float32)
    xs = rng.integers(0, length, n_specks)
    ys = rng.integers(0, height, n_specks)
    speck_layer[ys, xs] = rng.uniform(8.0, 18.0, n_specks)
    grey += _wrap_blur(speck_layer, 0.6 * unit) * 2.0
    tint = np.array([1.0, 1.0, 1.04], np.float32)  # warm rubber, BGR
    return np.clip(grey[..., None] * tint, 0, 255).astype(np.float32)


@lru_cache(maxsize=8)
def _rails(height: int, width: int) -> np.ndarray:
    """Static guide rails (H, W, 3) with brushed-steel texture; only the top and bottom
    ``_rail_rows`` rows are used."""
    unit = min(height, width) / 256.0
    rows = _rail_rows(height)
    rng = np.random.default_rng(_BELT_SEED + 1)
    color = np.zeros((height, width, 3), np.float32)
    t = np.linspace(0.0, 1.0, rows, dtype=np.float32)
    profile = 112.0 + 55.0 * np.sin(np.pi * (0.15 + 0.7 * t)) ** 3  # cylindrical shading
    for top in (True, False):
        brushed = cv2.GaussianBlur(
            rng.normal(0.0, 1.0, (rows, width)).astype(np.float32),
            (0, 0),
            sigmaX=12.0 * unit,
            sigmaY=0.4,
        )
        brushed *= 7.0 / max(float(brushed.std()), 1e-6)
        band = profile[:, None] + brushed
        band[-1 if top else 0] *= 0.45  # dark gap between rail and belt
        sl = slice(0, rows) if top else slice(height - rows, height)
        values = band if top else band[::-1]
        color[sl] = values[..., None] * np.array([1.03, 1.0, 0.97], np.float32)
    return color


def _background(height: int, width: int, belt_offset: float) -> np.ndarray:
    belt = _belt_texture(height, width)
    length = belt.shape[1]
    start = round(belt_offset) % length
    cols = (np.arange(width) - start) % length  # belt runs left to right
    return np.take(belt, cols, axis=1)


def _random_lighting(rng: np.random.Generator) -> _Lighting:
    return _Lighting(
        gain=float(rng.uniform(0.92, 1.08)),
        gradient=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.04, 0.04))),
        light_angle=float(np.deg2rad(35.0 + rng.uniform(-8.0, 8.0))),
        noise_sigma=float(rng.uniform(1.5, 3.0)),
    )


# ---------------------------------------------------------------------------------------------
# The part


@lru_cache(maxsize=8)
def _polar_grid(canvas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    c = (canvas - 1) / 2.0
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    dx, dy = xs - c, ys - c
    return dx, dy, np.hypot(dx, dy), np.arctan2(dy, dx)


def _disc(r: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coverage of a disc given the distance map."""
    return np.clip(radius - r + 0.5, 0.0, 1.0)


def _radial_profile(rng: np.random.Generator, radius: float, unit: float) -> np.ndarray:
    """Turning marks: random tool-path irregularity plus fine grooves, sampled every 1/4 px."""
    n = int(radius * 4) + 8
    coarse = cv2.GaussianBlur(
        rng.normal(0.0, 1.0, (n, 1)).astype(np.float32), (0, 0), sigmaX=0.1, sigmaY=6.0 * unit
    ).ravel()
    coarse *= 5.0 / max(float(coarse.std()), 1e-6)
    fine = rng.normal(0.0, 1.0, n).astype(np.float32)
    fine = np.convolve(fine, np.ones(3, np.float32) / 3.0, mode="same") * 3.0
    grooves = 2.0 * np.sin(np.arange(n, dtype=np.float32) / 4.0 * 2 * np.pi / (2.6 * unit))
    return coarse + fine + grooves


def _render_sprite(
    rng: np.random.Generator, unit: float, defect: str | None, lighting: _Lighting
) -> _Sprite:
    radius = 76.0 * unit * float(rng.uniform(0.985, 1.015))  # casting/turning tolerance
    margin = math.ceil(14 * unit)
    canvas = math.ceil(2 * radius) + 2 * margin + 1
    dx, dy, r, theta = _polar_grid(canvas)
    rotation = float(rng.uniform(-np.pi / 6, np.pi / 6))  # six holes: covers every orientation
    # defects draw from their own stream, so the same seed gives the same part with or without one
    defect_rng = np.random.default_rng(int(rng.integers(0, 2**63)))

    # face shading: turning marks, bow-tie reflection, hub step, chamfers
    profile = _radial_profile(rng, radius, unit)
    grey = np.interp(r * 4.0, np.arange(profile.size, dtype=np.float32), profile).astype(np.float32)
    facing = np.cos(theta - lighting.light_angle)
    bowtie = (facing * facing) ** 3
    grey += 138.0 + 48.0 * bowtie * np.minimum(r / (0.3 * radius), 1.0)
    hub_in, hub_out = 0.21 * radius, 0.33 * radius
    on_hub = (r > hub_in) & (r < hub_out)
    grey[on_hub] += 14.0 - 6.0 * facing[on_hub]
    step = np.abs(r - hub_out) < 1.0 * unit
    grey[step] -= 35.0 * np.maximum(facing[step], 0.0) + 10.0
    chamfer = (r > radius - 3.2 * unit) & (r <= radius + 1)
    grey[chamfer] = grey[chamfer] * 0.62 + 30.0 * np.maximum(-np.sin(theta[chamfer]), 0.0)

    alpha = _disc(r, radius)
    bore = 0.155 * radius
    alpha *= 1.0 - _disc(r, bore)
    grey[np.abs(r - bore - 1.6 * unit) < 1.6 * unit] *= 0.55

    pitch = 0.64 * radius
    hole = 0.078 * radius
    c = (canvas - 1) / 2.0
    reach = math.ceil(hole + 3 * unit) + 1
    for k in range(_N_HOLES):
        a = rotation + k * 2 * np.pi / _N_HOLES
        hx, hy = c + pitch * np.cos(a), c + pitch * np.sin(a)
        win = (
            slice(int(hy) - reach, int(hy) + reach + 2),
            slice(int(hx) - reach, int(hx) + reach + 2),
        )
        d = np.hypot(dx[win] - (hx - c), dy[win] - (hy - c))
        alpha[win] *= 1.0 - _disc(d, hole)
        ring = (d > hole) & (d < hole + 2.2 * unit)
        grey[win] = np.where(ring, grey[win] * 0.58, grey[win])  # countersink

    a = rotation + np.pi / _N_HOLES  # between two holes on the pitch circle
    scale = 0.33 * unit
    (tw, th), _ = cv2.getTextSize(_MARK_TEXT, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    text = np.zeros((canvas, canvas), np.uint8)
    cv2.putText(
        text,
        _MARK_TEXT,
        (round(c - tw / 2), round(c + th / 2)),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        255,
        max(1, round(unit)),
        cv2.LINE_AA,
    )
    place = cv2.getRotationMatrix2D((c, c), -np.rad2deg(a - np.pi / 2), 1.0)
    place[:, 2] += (pitch * np.cos(a), pitch * np.sin(a))
    mark = cv2.warpAffine(text, place, (canvas, canvas), flags=cv2.INTER_LINEAR)
    mark = mark.astype(np.float32) / 255.0
    grey = grey * (1.0 - 0.5 * mark)

    tint = np.array([1.03, 1.0, 0.965], np.float32)  # cool steel, BGR
    color = grey[..., None] * tint
    mask = np.zeros((canvas, canvas), bool)
    if defect is not None:
        color, alpha, mask = _apply_defect(
            defect_rng, defect, color, alpha, r, theta, radius, unit, rotation
        )

    shadow = cv2.GaussianBlur(alpha, (0, 0), sigmaX=4.0 * unit)
    return _Sprite(color.astype(np.float32), alpha.astype(np.float32), mask, shadow)


# ---------------------------------------------------------------------------------------------
# Defects


def _face_point(rng: np.random.Generator, radius: float, lo: float, hi: float) -> np.ndarray:
    rr = radius * math.sqrt(rng.uniform(lo * lo, hi * hi))
    a = rng.uniform(0, 2 * np.pi)
    return np.array([rr * math.cos(a), rr * math.sin(a)])


def _stroke(canvas: int, points: list[np.ndarray], thickness: int) -> np.ndarray:
    """Anti-aliased polyline coverage in [0, 1] (points relative to the canvas centre)."""
    layer = np.zeros((canvas, canvas), np.uint8)
    c = (canvas - 1) / 2.0
    shift = 4  # sub-pixel precision for cv2 drawing
    pts = np.array([[(p[0] + c) * 16, (p[1] + c) * 16] for p in points], np.int32)
    cv2.polylines(layer, [pts], False, 255, thickness, cv2.LINE_AA, shift)
    return layer.astype(np.float32) / 255.0


def _apply_defect(
    rng: np.random.Generator,
    defect: str,
    color: np.ndarray,
    alpha: np.ndarray,
    r: np.ndarray,
    theta: np.ndarray,
    radius: float,
    unit: float,
    rotation: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    canvas = alpha.shape[0]
    solid = alpha > 0.5
    if defect == "scratch":
        start = _face_point(rng, radius, 0.35, 0.8)
        direction = rng.uniform(0, 2 * np.pi)
        length = radius * rng.uniform(0.55, 0.95)
        end = start + length * np.array([math.cos(direction), math.sin(direction)])
        bend = rng.normal(0, 0.12) * length
        normal = np.array([-math.sin(direction), math.cos(direction)])
        ts = np.linspace(0, 1, 24)
        pts = [(1 - t) * start + t * end + 4 * t * (1 - t) * bend * normal for t in ts]
        width = max(1, round(1.3 * unit))
        burr = _stroke(canvas, pts, width + max(2, round(2 * unit)))
        core = _stroke(canvas, pts, width)
        grey_shift = -55.0 * burr + 115.0 * core
        color = color + (grey_shift * alpha)[..., None]
        mask = (burr > 0.25) & solid
    elif defect == "spot":
        centre = _face_point(rng, radius, 0.25, 0.8)
        blob_r = radius * rng.uniform(0.12, 0.19)
        field = np.zeros(alpha.shape, np.float32)
        c = (canvas - 1) / 2.0
        for _ in range(int(rng.integers(3, 7))):
            off = centre + rng.normal(0, 0.45 * blob_r, 2)
            rr = blob_r * rng.uniform(0.5, 0.9)
            cv2.circle(field, (round(off[0] + c), round(off[1] + c)), max(1, round(rr)), 1.0, -1)
        field = cv2.GaussianBlur(field, (0, 0), 2.0 * unit)
        rough = cv2.GaussianBlur(rng.normal(0, 1, alpha.shape).astype(np.float32), (0, 0), unit)
        rough *= 0.5 / max(float(rough.std()), 1e-6)
        stain = np.clip((field * (1.0 + rough) - 0.4) * 4.0, 0.0, 1.0) * alpha
        rust = rng.uniform() < 0.5
        target = np.array([38, 62, 112] if rust else [34, 36, 40], np.float32)  # BGR
        opacity = 0.82
        color = color * (1 - opacity * stain[..., None]) + target * (opacity * stain[..., None])
        mask = (stain > 0.3) & solid
    elif defect == "crack":
        if rng.uniform() < 0.6:  # from the rim inwards
            a = rng.uniform(0, 2 * np.pi)
            start = np.array([math.cos(a), math.sin(a)]) * (radius - 1)
            heading = a + np.pi + rng.uniform(-0.4, 0.4)
            length = radius * rng.uniform(0.4, 0.6)
        else:  # from a through-hole out to the rim, where stress concentrates
            k = int(rng.integers(0, _N_HOLES))
            a = rotation + k * 2 * np.pi / _N_HOLES
            start = np.array([math.cos(a), math.sin(a)]) * (0.64 + 0.078) * radius
            heading = a + rng.uniform(-0.3, 0.3)
            length = radius * 0.3
        paths = [_crack_path(rng, start, heading, length, unit)]
        for _ in range(int(rng.integers(1, 3))):
            base = paths[0][int(rng.integers(len(paths[0]) // 3, len(paths[0])))]
            paths.append(
                _crack_path(
                    rng,
                    base,
                    heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1),
                    radius * rng.uniform(0.12, 0.22),
                    unit,
                )
            )
        cover = np.zeros(alpha.shape, np.float32)
        for i, path in enumerate(paths):
            thickness = max(1, round((2.0 if i == 0 else 1.3) * unit))
            cover = np.maximum(cover, _stroke(canvas, path, thickness))
        cover *= alpha
        color = color * (1.0 - 0.82 * cover[..., None])
        grown = cv2.dilate((cover > 0.2).astype(np.uint8), np.ones((3, 3), np.uint8))
        mask = grown.astype(bool) & solid
    elif defect == "missing":
        a = rng.uniform(0, 2 * np.pi)
        centre = np.array([math.cos(a), math.sin(a)]) * radius * rng.uniform(0.93, 1.0)
        size = radius * rng.uniform(0.2, 0.3)
        n = int(rng.integers(7, 12))
        angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * np.pi / n)
        c = (canvas - 1) / 2.0
        poly = np.array(
            [
                [
                    (centre[0] + size * rng.uniform(0.6, 1.0) * math.cos(t) + c) * 16,
                    (centre[1] + size * rng.uniform(0.6, 1.0) * math.sin(t) + c) * 16,
                ]
                for t in angles
            ],
            np.int32,
        )
        chip = np.zeros(alpha.shape, np.uint8)
        cv2.fillPoly(chip, [poly], 255, cv2.LINE_AA, 4)
        chip_f = chip.astype(np.float32) / 255.0
        mask = (chip_f > 0.5) & solid
        edge = cv2.GaussianBlur(chip_f, (0, 0), 1.5 * unit)
        fracture = np.clip(edge * 2.0, 0, 1) * (1.0 - chip_f)  # rough, dull fracture surface
        color = color * (1.0 - 0.45 * fracture[..., None])
        alpha = alpha * (1.0 - chip_f)
    else:
        raise ValueError(f"unknown defect type {defect!r}; expected one of {DEFECT_TYPES}")
    return color, alpha, mask


def _crack_path(
    rng: np.random.Generator, start: np.ndarray, heading: float, length: float, unit: float
) -> list[np.ndarray]:
    points = [start]
    travelled = 0.0
    while travelled < length:
        step = rng.uniform(2.0, 4.5) * unit
        heading += rng.normal(0, 0.35)
        points.append(points[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
        travelled += step
    return points


# ---------------------------------------------------------------------------------------------
# Composition


def _paste_region(
    height: int, width: int, canvas: int, x0: int, y0: int
) -> tuple[slice, slice, slice, slice] | None:
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + canvas, width), min(y0 + canvas, height)
    if fx0 >= fx1 or fy0 >= fy1:
        return None
    return (slice(fy0, fy1), slice(fx0, fx1), slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))


@lru_cache(maxsize=4)
def _noise_bank(n_values: int) -> np.ndarray:
    return np.random.default_rng(_BELT_SEED + 2).standard_normal(2 * n_values, dtype=np.float32)


def _sensor_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit Gaussian noise: a random window of a fixed bank, 10x cheaper than fresh draws and
    indistinguishable in an image (consecutive frames use unrelated windows)."""
    n = int(np.prod(shape))
    bank = _noise_bank(n)
    start = int(rng.integers(0, n))
    return bank[start : start + n].reshape(shape)


def _compose(
    size: tuple[int, int],
    sprite: _Sprite,
    centre: tuple[float, float],
    belt_offset: float,
    lighting: _Lighting,
    noise_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    height, width = size
    unit = min(height, width) / 256.0
    frame = _background(height, width, belt_offset)
    canvas = sprite.alpha.shape[0]
    x0 = round(centre[0] - (canvas - 1) / 2.0)
    y0 = round(centre[1] - (canvas - 1) / 2.0)
    mask = np.zeros((height, width), bool)

    sdx, sdy = round(3 * unit), round(5 * unit)  # light from the upper left
    region = _paste_region(height, width, canvas, x0 + sdx, y0 + sdy)
    if region is not None:
        fy, fx, sy, sx = region
        frame[fy, fx] *= (1.0 - 0.55 * sprite.shadow[sy, sx])[..., None]
    region = _paste_region(height, width, canvas, x0, y0)
    if region is not None:
        fy, fx, sy, sx = region
        a = sprite.alpha[sy, sx][..., None]
        frame[fy, fx] = frame[fy, fx] * (1.0 - a) + sprite.color[sy, sx] * a
        mask[fy, fx] = sprite.mask[sy, sx]

    rows = _rail_rows(height)
    rail_color = _rails(height, width)
    frame[:rows] = rail_color[:rows]
    frame[height - rows :] = rail_color[height - rows :]
    mask[:rows] = False  # a part edge hidden by a rail is not visible, hence not labelled
    mask[height - rows :] = False

    gx = np.linspace(-0.5, 0.5, width, dtype=np.float32) * lighting.gradient[0]
    gy = np.linspace(-0.5, 0.5, height, dtype=np.float32) * lighting.gradient[1]
    frame *= (lighting.gain * (1.0 + gy[:, None] + gx[None, :]))[..., None]
    frame = cv2.GaussianBlur(frame, (0, 0), sigmaX=0.55 * unit)  # optics
    frame += _sensor_noise(noise_rng, frame.shape) * lighting.noise_sigma
    return np.clip(frame + 0.5, 0, 255).astype(np.uint8), mask


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    height, width = int(size[0]), int(size[1])
    if height < 64 or width < 64:
        raise ValueError(f"image size must be at least 64x64, got {height}x{width}")
    if width < 0.8 * height:
        raise ValueError(f"image must not be much taller than wide, got {height}x{width}")
    return height, width


def _check_defect(defect: str | None) -> None:
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect!r}; expected one of {DEFECT_TYPES}")


def render_part(
    rng: np.random.Generator, size: tuple[int, int] = DEFAULT_IMAGE_SIZE, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One inspection image (BGR uint8, (H, W, 3)) and its defect mask (bool, (H, W))."""
    _check_defect(defect)
    height, width = _check_size(size)
    unit = min(height, width) / 256.0
    lighting = _random_lighting(rng)
    sprite = _render_sprite(rng, unit, defect, lighting)
    centre = (
        width / 2.0 + rng.uniform(-0.07, 0.07) * width,
        height / 2.0 + rng.uniform(-0.025, 0.025) * height,
    )
    belt_offset = float(rng.uniform(0, _BELT_LOOP * width))
    return _compose((height, width), sprite, centre, belt_offset, lighting, rng)


# ---------------------------------------------------------------------------------------------
# Datasets and line streams


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def generate_mvtec(
    root: Path,
    category: str = "synthetic_part",
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect_per_type: int = 8,
    size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 42,
    overwrite: bool = False,
) -> Path:
    """Write an MVTec-AD-layout category under ``root``; returns the category folder.

    Each image has its own random stream derived from (seed, split, type, index), so changing one
    count does not change the other images. A folder generated earlier with identical parameters
    is reused as is; a different existing folder is an error unless ``overwrite``.
    """
    height, width = _check_size(size)
    for name, count in (
        ("n_train", n_train),
        ("n_test_good", n_test_good),
        ("n_test_defect_per_type", n_test_defect_per_type),
    ):
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    if n_train < 1:
        raise ValueError("n_train must be >= 1: a category needs training images")
    out = Path(root) / category
    params = {
        "generator_version": GENERATOR_VERSION,
        "category": category,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect_per_type": n_test_defect_per_type,
        "size": [height, width],
        "seed": seed,
        "defect_types": list(DEFECT_TYPES),
    }
    info_path = out / "synth.json"
    if out.exists() and any(out.iterdir()):
        if _is_complete(out, info_path, params):
            return out
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and was not generated with these parameters; "
                "choose another folder or pass overwrite=True"
            )
        for sub in ("train", "test", "ground_truth"):
            shutil.rmtree(out / sub, ignore_errors=True)
        info_path.unlink(missing_ok=True)

    jobs: list[tuple[str, str | None, int, int]] = [("train", None, i, 0) for i in range(n_train)]
    jobs += [("test", None, i, 1) for i in range(n_test_good)]
    for t, defect in enumerate(DEFECT_TYPES):
        jobs += [("test", defect, i, 2 + t) for i in range(n_test_defect_per_type)]
    for split, defect, index, stream in jobs:
        folder = out / split / (defect or "good")
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, stream, index])
        image, mask = render_part(rng, (height, width), defect)
        name = f"{index:03d}"
        _write_png(folder / f"{name}.png", image)
        if defect is not None:
            gt = out / "ground_truth" / defect
            gt.mkdir(parents=True, exist_ok=True)
            _write_png(gt / f"{name}_mask.png", mask.astype(np.uint8) * 255)
    (out / "train" / "good").mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(params, indent=2) + "\n")
    return out


def _is_complete(out: Path, info_path: Path, params: dict) -> bool:
    try:
        if json.loads(info_path.read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    expected = {("train", "good"): params["n_train"], ("test", "good"): params["n_test_good"]}
    for defect in DEFECT_TYPES:
        expected[("test", defect)] = params["n_test_defect_per_type"]
        expected[("ground_truth", defect)] = params["n_test_defect_per_type"]
    for (split, sub), count in expected.items():
        folder = out / split / sub
        found = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
        if found != count:
            return False
    return True


def plan_episodes(
    n_frames: int, n_episodes: int, min_len: int, max_len: int, min_gap: int, seed: int
) -> list[LineEpisode]:
    """Random, non-overlapping defect episodes with at least ``min_gap`` clean frames before,
    between and after them (so every alarm can start and end); defect types cycle randomly."""
    if n_episodes < 0 or min_len < 1 or max_len < min_len or min_gap < 0:
        raise ValueError(
            f"need n_episodes >= 0, 1 <= min_len <= max_len and min_gap >= 0; got "
            f"n_episodes={n_episodes}, min_len={min_len}, max_len={max_len}, min_gap={min_gap}"
        )
    if n_episodes == 0:
        return []
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n_episodes)
    required = int(lengths.sum()) + (n_episodes + 1) * min_gap
    if required > n_frames:
        raise ValueError(
            f"{n_episodes} episodes of {min_len}..{max_len} frames with gaps of {min_gap} need "
            f"{required} frames, only {n_frames} available"
        )
    slack = n_frames - required
    cuts = np.sort(rng.integers(0, slack + 1, n_episodes))
    extra = np.diff(np.concatenate([[0], cuts]))  # extra clean frames before each episode
    defects = rng.permutation(np.resize(np.array(DEFECT_TYPES), n_episodes))
    episodes = []
    position = 0
    for length, gap, defect in zip(lengths, extra, defects, strict=True):
        position += min_gap + int(gap)
        episodes.append(LineEpisode(start=position, length=int(length), defect=str(defect)))
        position += int(length)
    return episodes


def _validate_episodes(n_frames: int, episodes: list[LineEpisode]) -> list[LineEpisode]:
    ordered = sorted(episodes, key=lambda e: e.start)
    previous_end = 0
    for ep in ordered:
        _check_defect(ep.defect)
        if ep.length < 1 or ep.start < 0 or ep.end > n_frames:
            raise ValueError(f"episode {asdict(ep)} does not fit in {n_frames} frames")
        if ep.start < previous_end:
            raise ValueError(f"episode {asdict(ep)} overlaps the previous episode")
        previous_end = ep.end
    return ordered


def _passes(
    n_frames: int, episodes: list[LineEpisode], frames_per_part: int
) -> Iterator[tuple[int, int, str | None]]:
    """Parts passing the camera: (first frame, frame count, defect); episodes start new parts."""
    boundaries: list[tuple[int, int, str | None]] = []
    cursor = 0
    for ep in episodes:
        if ep.start > cursor:
            boundaries.append((cursor, ep.start, None))
        boundaries.append((ep.start, ep.end, ep.defect))
        cursor = ep.end
    if cursor < n_frames:
        boundaries.append((cursor, n_frames, None))
    for start, end, defect in boundaries:
        for first in range(start, end, frames_per_part):
            yield first, min(frames_per_part, end - first), defect


def line_frames(
    n_frames: int,
    episodes: list[LineEpisode],
    size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 42,
    frames_per_part: int = 4,
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None, str | None]]:
    """A continuous camera stream over the conveyor: (index, frame BGR, mask or None, defect).

    The belt moves left to right at constant speed and carries one part through the field of
    view every ``frames_per_part`` frames (the part moves with the belt within its pass, inside the
    position range of ``generate_mvtec`` images). Every frame of an episode shows a defective
    part of the episode's type; an episode boundary always starts a new part.
    """
    if n_frames < 0 or frames_per_part < 1:
        raise ValueError(
            f"need n_frames >= 0 and frames_per_part >= 1, got {n_frames}, {frames_per_part}"
        )
    height, width = _check_size(size)
    unit = min(height, width) / 256.0
    ordered = _validate_episodes(n_frames, episodes)
    station = np.random.default_rng([seed, 0])
    lighting = _random_lighting(station)
    travel = 0.12 * width
    speed = travel / max(frames_per_part - 1, 1)
    belt_offset = float(station.uniform(0, _BELT_LOOP * width))
    for part_index, (first, count, defect) in enumerate(
        _passes(n_frames, ordered, frames_per_part)
    ):
        rng = np.random.default_rng([seed, 1, part_index])
        part_lighting = _Lighting(
            gain=lighting.gain,
            gradient=lighting.gradient,
            light_angle=lighting.light_angle + float(rng.uniform(-0.03, 0.03)),
            noise_sigma=lighting.noise_sigma,
        )
        sprite = _render_sprite(rng, unit, defect, part_lighting)
        cy = height / 2.0 + rng.uniform(-0.025, 0.025) * height
        for j in range(count):
            index = first + j
            noise_rng = np.random.default_rng([seed, 2, index])
            flicker = _Lighting(
                gain=part_lighting.gain * float(noise_rng.uniform(0.99, 1.01)),
                gradient=part_lighting.gradient,
                light_angle=part_lighting.light_angle,
                noise_sigma=part_lighting.noise_sigma,
            )
            cx = width / 2.0 - travel / 2.0 + j * speed
            frame, mask = _compose(
                (height, width), sprite, (cx, cy), belt_offset, flicker, noise_rng
            )
            belt_offset += speed
            yield index, frame, (mask if defect is not None else None), defect


def write_frames(
    folder: Path,
    n_frames: int,
    episodes: list[LineEpisode],
    size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 42,
    frames_per_part: int = 4,
) -> int:
    """The frames of ``line_frames`` as ``frame_<index>.png`` in ``folder`` (older PNGs removed),
    a replay source for a capture; returns how many were written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    count = 0
    for index, frame, _mask, _defect in line_frames(
        n_frames, episodes, size, seed=seed, frames_per_part=frames_per_part
    ):
        _write_png(folder / f"frame_{index:06d}.png", frame)
        count += 1
    return count


def write_line(
    out: Path,
    n_frames: int,
    episodes: list[LineEpisode],
    size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 42,
    fps: float = 10.0,
    video: bool = True,
) -> Path:
    """Write a line stream for manual testing: frames/*.png, masks/*.png, labels.json, line.avi."""
    out = Path(out)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    height, width = _check_size(size)
    writer = None
    if video:
        writer = cv2.VideoWriter(
            str(out / "line.avi"), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height)
        )
        if not writer.isOpened():
            raise OSError(f"could not open a video writer for {out / 'line.avi'}")
    labels = []
    try:
        for index, frame, mask, defect in line_frames(n_frames, episodes, size, seed):
            name = f"{index:06d}"
            _write_png(out / "frames" / f"{name}.png", frame)
            if mask is not None:
                _write_png(out / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
            if writer is not None:
                writer.write(frame)
            labels.append({"frame": index, "defect": defect})
    finally:
        if writer is not None:
            writer.release()
    meta = {
        "generator_version": GENERATOR_VERSION,
        "n_frames": n_frames,
        "size": [height, width],
        "seed": seed,
        "fps": fps,
        "episodes": [asdict(e) for e in episodes],
        "frames": labels,
    }
    (out / "labels.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
