"""Drawing of one synthetic dental panoramic radiograph: anatomy once per patient, exposure per visit.

Geometry.  The jaw is laid out on a reference field `field_width_mm` wide and half as high
(290 mm x 145 mm by default: a panoramic detector read at ~0.1 mm/px when 2900 px wide), scaled
to the requested pixel size with square pixels: 0.283 mm/px at the default 1024 px width, so a
3 mm cortex is ~10.6 px there.  Landmark positions are fractions of that field (d or u: horizontal
offset from the midline / field width; v: depth / reference height), read off typical adult
panoramics; sizes (cortex, teeth, canal, blur) are in mm.  A field taller than half its width keeps
the jaw centred at the same scale.

Projection.  Tissues add up as an attenuation map A (soft tissue ~0.25, cancellous bone ~0.2
on top, cortex ~0.7, dentin ~0.75, enamel ~1.15, metal ~2.5) drawn in an upright "anatomy frame"
(teeth are denser than the cortex, as on real films, so the cortex does not sit in the extreme
bright tail of the histogram where a small change would show globally); a visit warps
A with its pose (one affine warp), maps it to intensity with its exposure, contrast and gamma,
blurs it and adds noise.  Follow-up images of a patient reuse the same anatomy.

Class signal (Klemetti et al. 1994; Devlin et al. 2007, OSTEODENT; docs/PHANTOM.md): only the mandibular
bone, driven by one latent `severity` in (0, 1): the width of the inferior cortex (`cortex_mm`:
healthy ~3-5 mm, osteoporotic < 3 mm), semilunar erosions and cortical residues on its endosteal
margin, cortical porosity, and a sparser trabecular pattern.  To keep the class out of global
image statistics, the cortex changes only within ZONE_MM of each mental foramen (elsewhere its
width is the patient's own, class-free `base_cortex_mm`) and cancellous bone is histogram-matched
to one fixed distribution.  Every other draw ignores the class.

Speed.  Each shape is evaluated inside its own bounding box with cheap ramps instead of
transcendental functions; one patient draws in a few tens of milliseconds at 1024 x 512.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

# ------------------------------------------------------------------------------ landmarks
V_MID = 0.84          # inferior border at the symphysis, as a fraction of the reference height
A_INF, B_INF = 1.25, 3.7  # rise of the inferior border towards the angles: v = V_MID - a d^2 - b d^4
GONIAL_D = 0.31       # where the inferior border turns into the posterior ramus border
V_OCC = 0.50          # occlusal plane at the midline
OCC_CURVE = 0.45      # its upward curve towards the molars (curve of Spee)
ARCH_HALF = 0.255     # one half arch of 8 teeth spans this fraction of the field width
FORAMEN_D = 0.12      # mental foramen below the premolars
FORAMEN_H_MM = 13.0   # height of the foramen above the inferior border
WINDOW_MM = 30.0      # length of the diagnostic cortex band (mask) centred below each foramen
ZONE_MM = (10.0, 25.0)  # the class acts fully within 10 mm of a foramen, fading out by 25 mm
BOX_ABOVE_MM, BOX_BELOW_MM = 8.0, 1.0  # the annotator's box: from 1 mm below the border to 8 mm above

# name, width (relative), lower crown/root mm and roots, upper crown/root mm and roots
TEETH = (
    ("central incisor", 1.00, 10.5, 17.0, 1, 12.0, 17.0, 1),
    ("lateral incisor", 0.95, 10.5, 18.0, 1, 10.5, 16.0, 1),
    ("canine", 1.05, 12.0, 21.0, 1, 12.0, 22.0, 1),
    ("first premolar", 1.00, 9.5, 18.0, 1, 9.5, 17.0, 2),
    ("second premolar", 1.00, 9.0, 18.0, 1, 9.0, 17.0, 1),
    ("first molar", 1.45, 8.5, 17.0, 2, 8.5, 16.0, 3),
    ("second molar", 1.40, 8.0, 16.0, 2, 8.0, 15.0, 3),
    ("third molar", 1.30, 7.5, 14.0, 2, 7.5, 13.0, 2),
)
_UNITS = np.cumsum([0.0] + [t[1] for t in TEETH])
TOOTH_CENTRE_D = (_UNITS[:-1] + _UNITS[1:]) / 2 / _UNITS[-1] * ARCH_HALF
TOOTH_WIDTH_D = np.array([t[1] for t in TEETH]) / _UNITS[-1] * ARCH_HALF

# attenuation of the tissues (arbitrary units, see the module docstring)
ATT_SOFT, ATT_TRAB, ATT_CORTEX = 0.25, 0.22, 0.70
ATT_DENTIN, ATT_ENAMEL, ATT_METAL = 0.75, 1.15, 2.5
# the one distribution of cancellous-bone attenuation (quantiles 0, 1/32, ..., 1), whatever the class
TRAB_QUANTILES = ATT_TRAB * (1.0 + 0.30 * np.clip(np.tan(np.linspace(-1.25, 1.25, 33)) / 1.6, -1.8, 1.8))


@dataclass(frozen=True)
class Field:
    width: int
    height: int
    field_width_mm: float = 290.0

    @property
    def mm_per_px(self) -> float:
        return self.field_width_mm / self.width

    @property
    def ref_height_mm(self) -> float:
        return self.field_width_mm / 2

    def y_of(self, v):
        """Reference-height fraction -> pixel row (the jaw stays centred in a taller field)."""
        ref_h = self.width / 2
        return (self.height - ref_h) / 2 + np.asarray(v) * ref_h

    def x_of(self, d):
        return (0.5 + np.asarray(d)) * self.width


@dataclass(frozen=True)
class Patient:
    """Everything that stays the same across one patient's visits."""

    severity: float           # latent bone loss in (0, 1): drives everything class-related below
    cortex_mm: float          # cortical width below the mental foramen
    base_cortex_mm: float = 3.6  # the patient's cortical width away from the foramina (class-independent)
    arch: float = 1.0         # horizontal scale of the jaw
    v_mid: float = V_MID
    curve: float = 1.0        # scales the rise of the inferior border
    occlusal: float = V_OCC
    foramen_d: float = FORAMEN_D
    foramen_h_mm: float = FORAMEN_H_MM
    present: tuple = field(default_factory=lambda: (True,) * 32)   # 0-15 lower, 16-31 upper; 0-7 left
    restoration: tuple = field(default_factory=lambda: (0,) * 32)  # 0 none, 1 filling, 2 metal crown
    tilt_deg: tuple = field(default_factory=lambda: (0.0,) * 32)
    soft_tissue: float = 1.0
    density: float = 1.0      # scales bone and teeth: jaw thickness and mineral content (class-independent)
    cortex_density: float = 1.0  # brightness of compact bone relative to the rest (class-independent)
    seed: int = 0             # textures

    @property
    def erosion(self) -> float:
        """Klemetti C2/C3 endosteal erosion: absent in healthy bone, grows with severity."""
        return _smoothstep(0.40, 0.95, self.severity)

    @property
    def porosity(self) -> float:
        return _smoothstep(0.50, 1.00, self.severity)


@dataclass(frozen=True)
class Visit:
    """One exposure of a patient: pose, exposure and detector, and where the annotator drew the box."""

    rotation_deg: float = 0.0
    shift_mm: tuple = (0.0, 0.0)
    scale: float = 1.0
    offset: float = 0.0       # intensity = offset + gain * (1 - exp(-k A)), then ** gamma
    gain: float = 1.0
    k: float = 1.2
    gamma: float = 1.0
    uneven: float = 0.0       # amplitude of a smooth exposure gradient
    blur_mm: float = 0.2
    noise: float = 0.02
    box_side: int = 0         # 0: image left (the patient's right), 1: image right
    box_len_mm: float = 20.0
    box_jitter_mm: tuple = (0.0, 0.0, 0.0, 0.0)
    seed: int = 0


@dataclass
class Anatomy:
    """A patient's attenuation map in the upright anatomy frame, with its ground truth."""

    atten: np.ndarray         # float32 (H, W)
    mask: np.ndarray          # uint8 0/255 (H, W): diagnostic cortex band, both sides
    border_y: np.ndarray      # float (W,): inferior border row per column (nan off the body)
    foramen_x: tuple          # columns of the left and right mental foramen


@dataclass
class Radiograph:
    image: np.ndarray         # float32 (H, W) in [0, 1]
    mask: np.ndarray          # bool (H, W)
    box: tuple                # (x, y, w, h) integer pixels, on one side's cortex below the foramen


def _smoothstep(lo: float, hi: float, x):
    t = np.clip((np.asarray(x, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    out = t * t * (3 - 2 * t)
    return float(out) if np.ndim(out) == 0 else out


def _ramp(x, width: float):
    """A soft step from 0 to 1 over `width` around x = 0 (cheaper than a logistic)."""
    return np.clip(np.asarray(x, dtype=np.float32) * (1.0 / width) + 0.5, 0.0, 1.0)


def _bump(x, width: float):
    """A tent 1 - |x| / width, zero beyond: a cheap band profile."""
    return np.clip(1.0 - np.abs(np.asarray(x, dtype=np.float32)) * (1.0 / width), 0.0, 1.0)


def _texture(rng: np.random.Generator, shape, sigma_px: float) -> np.ndarray:
    """Uniform noise smoothed to a correlation length sigma_px, centred to unit variance.

    Blurred uniform noise is Gaussian enough and 4x cheaper to draw than normal noise; large
    correlation lengths are blurred at a lower resolution and scaled back up.
    """
    h, w = shape
    factor = int(max(1, sigma_px // 3))
    small = (max(2, -(-h // factor)), max(2, -(-w // factor)))
    n = rng.random(small, dtype=np.float32)
    if sigma_px / factor > 0.3:
        n = cv2.GaussianBlur(n, (0, 0), sigma_px / factor)
    if factor > 1:
        n = cv2.resize(n, (small[1] * factor, small[0] * factor), interpolation=cv2.INTER_LINEAR)[:h, :w]
    sub = n[::3, ::3]
    n -= float(sub.mean())
    n *= 1.0 / max(float(sub.std()), 1e-6)
    return n


def _smooth_field(rng: np.random.Generator, shape, cells: int) -> np.ndarray:
    """A very smooth random field with about `cells` bumps across, drawn coarse and upsampled."""
    h, w = shape
    coarse = rng.standard_normal((max(2, cells * h // w + 2), cells + 2)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


class _Grid:
    """Column offsets u and row depths v of a field, and slices of them for bounding boxes."""

    def __init__(self, f: Field):
        self.f = f
        self.u = ((np.arange(f.width) + 0.5) / f.width - 0.5).astype(np.float32)
        self.v = ((np.arange(f.height) + 0.5 - f.y_of(0.0)) / (f.width / 2)).astype(np.float32)

    def cols(self, u0: float, u1: float) -> slice:
        a, b = np.searchsorted(self.u, [u0, u1])
        return slice(int(a), int(b))

    def rows(self, v0: float, v1: float) -> slice:
        a, b = np.searchsorted(self.v, [v0, v1])
        return slice(int(a), int(b))


# --------------------------------------------------------------------------- the jaw outline
def inferior_v(p: Patient, d):
    """Depth (reference fraction) of the inferior mandibular border at horizontal offset d."""
    dd = np.asarray(d) / p.arch
    return p.v_mid - p.curve * (A_INF * dd**2 + B_INF * dd**4)


def occlusal_v(p: Patient, d):
    dd = np.asarray(d) / p.arch
    return p.occlusal - OCC_CURVE * dd**2


def _crown_mm(d, lower: bool):
    col = 2 if lower else 5
    return np.interp(np.abs(d), TOOTH_CENTRE_D, [t[col] for t in TEETH])


def alveolar_v(p: Patient, d, f: Field):
    """Alveolar crest: 1.5 mm below the enamel-cement junction of the lower teeth."""
    return occlusal_v(p, d) + (_crown_mm(np.asarray(d) / p.arch, True) + 1.5) / f.ref_height_mm


def _bezier(p0, p1, p2, n=12):
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def _outline(p: Patient, f: Field, n_border: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """(whole mandible polygon, inferior+posterior border closed over the image top) in pixels."""
    a = p.arch
    g_v = float(inferior_v(p, -GONIAL_D * a))
    back = np.array([(-0.392, 0.175), (-0.402, 0.183), (-0.405, 0.200), (-0.398, 0.230),
                     (-0.392, 0.270), (-0.378, 0.400), (-0.362, 0.550)]) * [a, 1]
    angle = _bezier(back[-1], (-0.350 * a, float(inferior_v(p, -0.335 * a)) + 0.012), (-GONIAL_D * a, g_v))
    back_l = np.vstack([back, angle[1:]])
    crest_d = -0.27 * a
    front_l = np.array([
        (crest_d, float(alveolar_v(p, crest_d, f))), (-0.29 * a, 0.45), (-0.298 * a, 0.33),
        (-0.305 * a, 0.262), (-0.318 * a, 0.275), (-0.335 * a, 0.305), (-0.348 * a, 0.318),
        (-0.362 * a, 0.300), (-0.372 * a, 0.265), (-0.380 * a, 0.205), (-0.384 * a, 0.188),
    ])
    back_r, front_r = back_l * [-1, 1], front_l * [-1, 1]
    dd = np.linspace(-GONIAL_D * a, GONIAL_D * a, n_border)[1:-1]
    inferior = np.stack([dd, inferior_v(p, dd)], axis=1)
    dc = np.linspace(0.27 * a, -0.27 * a, n_border)[1:-1]
    crest = np.stack([dc, alveolar_v(p, dc, f)], axis=1)

    def to_px(pts):
        return np.stack([f.x_of(pts[:, 0]), f.y_of(pts[:, 1])], axis=1)

    lower_chain = to_px(np.vstack([back_l, inferior, back_r[::-1]]))
    full = to_px(np.vstack([back_l, inferior, back_r[::-1], front_r[::-1], crest, front_l]))
    over_top = np.array([[lower_chain[-1, 0], -4.0], [lower_chain[0, 0], -4.0]])
    return full, np.vstack([lower_chain, over_top])


def _fill(poly_px: np.ndarray, shape, origin) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    shift = 4  # sub-pixel vertices
    pts = np.round((poly_px - np.asarray(origin, float)) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_8, shift=shift)
    return mask


# ------------------------------------------------------------------------------- drawing
def draw_anatomy(p: Patient, f: Field) -> Anatomy:
    """The patient's attenuation map and cortex mask in the anatomy frame (no pose, no noise)."""
    rng = np.random.default_rng(p.seed)
    g = _Grid(f)
    atten = _soft_tissue(rng, p, g)
    _draw_skull(atten, rng, p, g)
    mask, border_y, fx = _draw_mandible(atten, rng, p, g)
    _draw_teeth(atten, p, g)
    return Anatomy(atten=atten, mask=mask, border_y=border_y, foramen_x=fx)


@functools.lru_cache(maxsize=4)
def _background(f: Field) -> tuple[np.ndarray, np.ndarray]:
    """What every patient shares at a field size: (soft-tissue envelope, static structures).

    The envelope is bright over face and neck and dark in the air at the corners; the static
    structures (air spaces, orbits, zygomatic arches, nasal cavity, the spine projected twice at
    the edges) are blurred ghosts in a panoramic and vary with the pose only.
    """
    g = _Grid(f)
    u, v = g.u, g.v
    au = np.abs(u)
    env = np.outer(np.exp(-(((v - 0.55) / 0.75) ** 6)), np.exp(-((u / 0.42) ** 6))).astype(np.float32)
    static = np.zeros((f.height, f.width), np.float32)
    r = g.rows(0.35, 0.46)  # palatoglossal air space under the palate
    static[r] -= 0.10 * np.outer(_bump(v[r] - 0.405, 0.03), ((au < 0.36) & (au > 0.06)).astype(np.float32))
    r = g.rows(0.30, 2.0)  # pharyngeal airway crossing the rami
    static[r] -= 0.07 * np.outer(_ramp(v[r] - 0.33, 0.06), _bump(au - 0.37, 0.035))
    for sgn in (-1, 1):
        c, r = g.cols(sgn * 0.16 - 0.08, sgn * 0.16 + 0.08), g.rows(-0.03, 0.15)
        orbit = ((u[c][None, :] - sgn * 0.16) / 0.07) ** 2 + ((v[r][:, None] - 0.06) / 0.07) ** 2
        static[r, c] += 0.12 * _bump(orbit - 1, 0.2)
        c, r = (g.cols(0.25, 0.43) if sgn > 0 else g.cols(-0.43, -0.25)), g.rows(0.22, 0.33)
        centre = 0.29 - 0.15 * (au[c] - 0.27)
        static[r, c] += 0.20 * _bump(v[r][:, None] - centre[None, :], 0.03)  # zygomatic arch
        c, r = (g.cols(0.42, 0.5) if sgn > 0 else g.cols(-0.5, -0.42)), g.rows(0.2, 2.0)
        blocks = 0.6 + 0.4 * (0.5 + 0.5 * np.cos(2 * np.pi * (v[r] - 0.1) / 0.13))
        static[r, c] += 0.22 * np.outer(blocks, _bump(au[c] - 0.465, 0.045))  # cervical spine ghost
    c, r = g.cols(-0.07, 0.07), g.rows(0.06, 0.32)
    nasal = np.outer(_ramp(0.31 - v[r], 0.02) * _ramp(v[r] - 0.09, 0.04), _ramp(0.055 - au[c], 0.02))
    static[r, c] += nasal * (-0.10 + 0.12 * _bump(u[c], 0.006)[None, :])
    env.setflags(write=False)
    static.setflags(write=False)
    return env, static


def _soft_tissue(rng, p: Patient, g: _Grid) -> np.ndarray:
    """Soft tissue of this patient over the shared background, with gentle unevenness."""
    env, static = _background(g.f)
    atten = (ATT_SOFT * p.soft_tissue * 0.55) * env
    atten += static
    atten += 0.04 * _smooth_field(rng, env.shape, 6) + ATT_SOFT * p.soft_tissue * 0.45
    return atten


def _draw_skull(atten: np.ndarray, rng, p: Patient, g: _Grid) -> None:
    """The patient's maxilla, hard palate and maxillary sinuses (they follow the arch width)."""
    f, u, v = g.f, g.u, g.v
    au = np.abs(u)
    # maxilla: from the nasal floor down to the upper alveolar crest, textured
    c, r = g.cols(-0.30 * p.arch, 0.30 * p.arch), g.rows(0.27, 0.52)
    uu, vv = u[c][None, :], v[r][:, None]
    crest_up = occlusal_v(p, uu) - (2.0 + _crown_mm(uu / p.arch, False) + 1.5) / f.ref_height_mm
    maxilla = _ramp(vv - 0.305, 0.02) * _ramp(crest_up - vv, 0.012) * _ramp(0.29 * p.arch - np.abs(uu), 0.02)
    tex = _texture(rng, maxilla.shape, 0.6 / f.mm_per_px)
    atten[r, c] += maxilla * ATT_TRAB * (1.0 + 0.25 * np.clip(tex, -2, 2))
    r = g.rows(0.31, 0.38)
    atten[r, c] += 0.20 * np.outer(_bump(v[r] - 0.345, 0.02), _ramp(0.27 - au[c], 0.04))  # hard palate
    for sgn in (-1, 1):
        c = g.cols(sgn * 0.19 * p.arch - 0.09, sgn * 0.19 * p.arch + 0.09)
        r = g.rows(0.19, 0.35)
        ell = ((u[c][None, :] - sgn * 0.19 * p.arch) / 0.075) ** 2 + ((v[r][:, None] - 0.27) / 0.065) ** 2
        atten[r, c] += -0.10 * _ramp(1 - ell, 0.15) * (v[r][:, None] < 0.335) + 0.10 * _bump(ell - 1, 0.12)


def _draw_mandible(atten: np.ndarray, rng, p: Patient, g: _Grid):
    """Bone, cortex (the class signal), canal and foramina; returns (mask, border rows, foramen columns)."""
    f, u = g.f, g.u
    mm = f.mm_per_px
    full_px, ext_px = _outline(p, f)
    y0, y1 = max(0, int(full_px[:, 1].min()) - 2), min(f.height, int(full_px[:, 1].max()) + 3)
    x0, x1 = max(0, int(full_px[:, 0].min()) - 2), min(f.width, int(full_px[:, 0].max()) + 3)
    shape = (y1 - y0, x1 - x0)
    jaw = _fill(full_px, shape, (x0, y0))
    lower = _fill(ext_px, shape, (x0, y0))
    inside = (jaw > 0).astype(np.float32)
    # distance (mm) into the bone from the inferior/posterior border, and from any border
    depth_low = cv2.distanceTransform(lower, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * mm
    uu = u[x0:x1]
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]

    # cancellous bone: a network of trabeculae (zero-crossings of band-pass noise) over coarser
    # marrow blobs; osteoporosis thins and spaces them out.  Its values are then mapped onto one
    # fixed distribution (histogram matching), so the class changes the pattern's structure
    # but not the image's histogram.
    s = p.severity
    fine = _texture(rng, shape, 0.55 * (1 + 0.7 * s) / mm)
    blobs = _texture(rng, shape, 1.6 / mm)
    net = _bump(fine, 0.55 - 0.25 * s) * _ramp(blobs + 0.8 - 0.9 * s, 1.2)
    net += 0.02 * blobs  # breaks the ties of the clipped ramps, so the matching below is exact
    trab = _match_histogram(net, inside, TRAB_QUANTILES)

    # cortex width along the border: full width below the premolars, thinning towards the angles.
    # The class sets it (and erosion, residues, porosity) only in the zone around each mental
    # foramen, where it is measured clinically; elsewhere the width is the patient's own,
    # class-independent, so the class does not change how much bright cortex the image holds.
    ad = np.abs(uu) / p.arch
    cols = np.arange(x0, x1) + 0.5
    fx = tuple(float(f.x_of(sgn * p.foramen_d * p.arch)) for sgn in (-1, 1))
    zone = np.zeros(uu.size)
    for xf in fx:
        zone = np.maximum(zone, _smoothstep(ZONE_MM[1], ZONE_MM[0], np.abs(cols - xf) * mm))
    local = zone * p.cortex_mm + (1 - zone) * p.base_cortex_mm
    width_col = local * np.interp(ad, [0.0, 0.20, 0.26, 0.31, 0.36, 0.5], [0.95, 1.0, 0.85, 0.6, 0.45, 0.45])
    eroded = (width_col * (1 - _erosions(rng, p, zone, mm))).astype(np.float32)
    cortex = np.clip((eroded[None, :] - depth_low) * (1.0 / mm) + 1.0, 0.0, 1.0) * inside
    cortex_att = np.full(shape, ATT_CORTEX * p.cortex_density, np.float32)
    if p.porosity > 0.01:  # pores only where the class acts: the zone's columns, the border's rows
        zc = np.flatnonzero(zone > 0)
        yb = f.y_of(inferior_v(p, uu[zc])) - y0
        r = slice(max(0, int(yb.min() - 8 / mm)), int(yb.max() + 2))
        c = slice(int(zc[0]), int(zc[-1]) + 1)
        pores = _ramp(_texture(rng, cortex_att[r, c].shape, 0.22 / mm) - (2.4 - 1.2 * p.porosity), 0.5)
        cortex_att[r, c] *= 1 - (0.8 * p.porosity) * pores * zone[None, c].astype(np.float32)
    # the thin cortex of crest, ramus and condyle: the outer 0.7 mm of the whole outline
    k = 2 * max(1, int(round(0.7 / mm))) + 1
    thin = inside - (cv2.erode(jaw, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) > 0)
    bone = inside * trab
    bone += cortex * (cortex_att - bone)
    bone = np.maximum(bone, thin * (ATT_CORTEX * 0.75))
    bone += _residues(rng, p, width_col, zone, depth_low, mm) * inside
    _draw_canal(bone, p, f, uu, ys, x0)
    atten[y0:y1, x0:x1] += bone * (inside * np.float32(p.density))

    border_y = np.full(f.width, np.nan)
    on = np.abs(u) / p.arch <= GONIAL_D
    border_y[on] = f.y_of(inferior_v(p, u[on]))
    mask = np.zeros((f.height, f.width), np.uint8)
    for xf in fx:  # the cortex band within WINDOW_MM of each foramen, near the inferior border
        c = np.flatnonzero(np.abs(cols - xf) * mm <= WINDOW_MM / 2)
        near = np.abs(ys - border_y[x0 + c][None, :]) * mm < 12.0
        band = (depth_low[:, c] < width_col[None, c]) & (inside[:, c] > 0) & near
        mask[y0:y1, x0 + c] = np.where(band, 255, 0).astype(np.uint8)
    return mask, border_y, fx


def _match_histogram(values: np.ndarray, where: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Map values monotonically so that, inside `where`, their quantiles become `target`."""
    sample = values[::2, ::2][where[::2, ::2] > 0]
    if sample.size < target.size:
        return np.interp(values, [values.min(), values.max() + 1e-6], [target[0], target[-1]]).astype(np.float32)
    q = np.quantile(sample, np.linspace(0, 1, target.size))
    q += np.arange(q.size) * 1e-7  # np.interp needs increasing knots
    # a 1024-entry table instead of np.interp on every pixel: 5x cheaper, 0.1% of the range off at most
    lo, hi = float(q[0]), float(q[-1])
    table = np.interp(np.linspace(lo, hi, 1024), q, target).astype(np.float32)
    index = np.clip((values - lo) * (1023.0 / (hi - lo)) + 0.5, 0, 1023).astype(np.int32)
    return table[index]


def _erosions(rng, p: Patient, zone: np.ndarray, mm: float) -> np.ndarray:
    """Per-column fraction of the cortex lost to semilunar endosteal defects (Klemetti C2/C3)."""
    e = p.erosion
    n_cols = zone.size
    out = np.zeros(n_cols)
    x = np.arange(n_cols) * mm
    n = rng.poisson(e * n_cols * mm / 6.0)  # up to one defect every ~6 mm of border
    for c, r, dep in zip(rng.uniform(0, n_cols * mm, n), rng.uniform(0.8, 2.2, n), rng.uniform(0.35, 0.75, n) * e):
        lo, hi = np.searchsorted(x, [c - r, c + r])
        seg = np.sqrt(np.clip(1 - ((x[lo:hi] - c) / r) ** 2, 0, 1)) * dep
        out[lo:hi] = np.maximum(out[lo:hi], seg)
    # every margin is slightly wavy; an eroded one is irregular
    wave = cv2.GaussianBlur(rng.standard_normal((1, n_cols)).astype(np.float32), (0, 0), max(1.0, 1.5 / mm))[0]
    wave /= max(float(wave.std()), 1e-6)
    return np.clip(out * zone + (0.03 + 0.08 * e * zone) * wave, 0, 0.85)


def _residues(rng, p: Patient, width_col, zone, depth_low, mm: float) -> np.ndarray:
    """Cortical residues: broken thin bright streaks just above the eroded endosteal margin."""
    e = p.erosion
    out = np.zeros(depth_low.shape, np.float32)
    if e <= 0.05:
        return out
    n_cols = width_col.size
    rows = np.flatnonzero((depth_low < float(width_col.max()) + 3.0).any(axis=1))
    if rows.size == 0:
        return out
    r = slice(int(rows[0]), int(rows[-1]) + 1)
    for _ in range(1 + int(round(2 * e * rng.random()))):
        gap, thick = rng.uniform(0.3, 1.6), rng.uniform(0.25, 0.45)
        onoff = cv2.GaussianBlur(rng.standard_normal((1, n_cols)).astype(np.float32), (0, 0), 1.2 / mm)[0]
        onoff = (onoff > np.quantile(onoff, 1 - 0.55 * e)) * zone.astype(np.float32)
        streak = _bump(depth_low[r] - (width_col + gap)[None, :].astype(np.float32), thick)
        out[r] += (0.35 * e * ATT_CORTEX) * streak * onoff[None, :]
    return out


def _draw_canal(bone: np.ndarray, p: Patient, f: Field, uu, ys, x0: int) -> None:
    """Mandibular canal (dark band with bright walls) ending in the mental foramen."""
    mm = f.mm_per_px
    ad = np.abs(uu) / p.arch
    h_mm = np.interp(ad, [p.foramen_d, 0.2, 0.27, 0.31], [p.foramen_h_mm, 9.5, 10.0, 16.0])
    y_c = f.y_of(inferior_v(p, uu) - h_mm / f.ref_height_mm).astype(np.float32)
    on = np.flatnonzero((ad >= p.foramen_d) & (ad <= 0.31))
    if on.size:
        lo, hi = int(max(0, y_c[on].min() - 3 / mm - ys[0, 0])), int(y_c[on].max() + 3 / mm - ys[0, 0])
        r = slice(max(0, lo), max(0, min(bone.shape[0], hi)))
        dist = np.abs(ys[r] - y_c[None, on]) * mm
        bone[r, on] += -0.10 * np.clip(1.6 - dist, 0, 1) + 0.06 * _bump(dist - 1.7, 0.4)
    for sgn in (-1, 1):
        xf = f.x_of(sgn * p.foramen_d * p.arch) - x0
        yf = f.y_of(inferior_v(p, sgn * p.foramen_d * p.arch) - p.foramen_h_mm / f.ref_height_mm) - ys[0, 0]
        c = slice(max(0, int(xf - 3 / mm)), int(xf + 3 / mm) + 1)
        r = slice(max(0, int(yf - 3 / mm)), int(yf + 3 / mm) + 1)
        xx = (np.arange(c.start, c.start + bone[r, c].shape[1]) - xf)[None, :]
        yy = (np.arange(r.start, r.start + bone[r, c].shape[0]) - yf)[:, None]
        r2 = (xx * mm / 2.0) ** 2 + (yy * mm / 1.6) ** 2
        bone[r, c] -= 0.14 * _ramp(1 - r2, 0.3)


def _draw_teeth(atten: np.ndarray, p: Patient, g: _Grid) -> None:
    """Both arches: crowns with enamel, tapered roots with pulp; gaps, fillings and metal crowns."""
    f = g.f
    H, W = atten.shape
    mm = f.mm_per_px
    for jaw in (0, 1):  # 0 lower, 1 upper
        for side in (-1, 1):
            for k, (_, _, lc, lr, ln, uc, ur, un) in enumerate(TEETH):
                idx = jaw * 16 + (0 if side < 0 else 8) + k
                if not p.present[idx]:
                    continue
                crown, root, nroots = (lc, lr, ln) if jaw == 0 else (uc, ur, un)
                d = side * TOOTH_CENTRE_D[k] * p.arch
                w_mm = TOOTH_WIDTH_D[k] * p.arch * f.field_width_mm * 0.92
                # lower teeth meet the occlusal plane; upper ones stop 1-3 mm above it (bite block)
                gap = 1.0 + 2.0 * TOOTH_CENTRE_D[k] / ARCH_HALF
                y_occ = float(f.y_of(occlusal_v(p, d) - (0 if jaw == 0 else gap / f.ref_height_mm)))
                xc = float(f.x_of(d))
                span = (crown + root + 2) / mm
                x0, x1 = int(max(0, xc - w_mm / mm)), int(min(W, xc + w_mm / mm + 1))
                if jaw == 0:
                    y0, y1 = int(max(0, y_occ - 2 / mm)), int(min(H, y_occ + span))
                else:
                    y0, y1 = int(max(0, y_occ - span)), int(min(H, y_occ + 2 / mm))
                if x1 <= x0 or y1 <= y0:
                    continue
                tilt = math.radians(p.tilt_deg[idx])
                dx = (np.arange(x0, x1, dtype=np.float32)[None, :] - xc) * mm
                dy = (np.arange(y0, y1, dtype=np.float32)[:, None] - y_occ) * (mm if jaw == 0 else -mm)
                s = dx * math.cos(tilt) - dy * math.sin(tilt)  # across the tooth, mm
                r = dx * math.sin(tilt) + dy * math.cos(tilt)  # from the occlusal edge towards the apex, mm
                atten[y0:y1, x0:x1] += p.density * _tooth(s, r, w_mm / 2, crown, root, nroots, p.restoration[idx])


def _tooth(s, r, half: float, crown: float, root: float, nroots: int, restoration: int) -> np.ndarray:
    """Attenuation of one tooth in its own frame (s across, r from the occlusal edge to the apex, mm)."""
    a = np.abs(s) * (1 / half)
    b = np.abs(r - crown / 2) * (2 / crown)
    cr = a * a * a + b * b * b  # a rounded-box crown (superellipse of order 3)
    in_crown = _ramp(1 - cr, 0.15)
    enamel = in_crown * _ramp(crown * 0.6 - r, 0.6) * _ramp(cr - 0.35, 0.2)
    rr = np.clip((r - crown) * (1 / root), 0, 1)
    taper = 1 - 0.75 * rr
    root_zone = _ramp(root + crown - r, 0.8) * (r > crown * 0.8)
    if nroots == 1:
        in_root = _ramp(half * 0.75 * taper - np.abs(s), 0.3) * root_zone
        pulp = in_root * _ramp(0.3 * half * taper - np.abs(s), 0.2)
    else:
        in_root = _ramp(half * 0.85 - np.abs(s), 0.3) * (r < crown + 3.0)  # the trunk before the fork
        for j in range(nroots):
            cj = (j - (nroots - 1) / 2) * (half * 0.95 / (nroots - 1))
            in_root = np.maximum(in_root, _ramp(half * 0.42 * taper - np.abs(s - cj), 0.3))
        in_root *= root_zone
        pulp = 0.0
    pulp = pulp + _ramp(0.35 - cr, 0.1) * (r > crown * 0.3)
    tooth = ATT_DENTIN * np.maximum(in_crown, in_root) + (ATT_ENAMEL - ATT_DENTIN) * enamel - 0.25 * pulp
    if restoration == 1:  # occlusal filling
        filling = ((s / (half * 0.55)) ** 2 + ((r - crown * 0.2) / (crown * 0.35)) ** 2) < 1
        tooth = np.where(filling, np.float32(ATT_METAL), tooth)
    elif restoration == 2:  # metal-ceramic crown
        tooth = np.where(in_crown > 0.5, np.float32(ATT_METAL * 0.8), tooth)
    return tooth.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------- acquisition
def pose_matrix(v: Visit, f: Field) -> np.ndarray:
    """2x3 affine from the anatomy frame to the image (rotation and scale about the centre, shift)."""
    m = cv2.getRotationMatrix2D((f.width / 2, f.height / 2), v.rotation_deg, v.scale)
    m[:, 2] += np.asarray(v.shift_mm) / f.mm_per_px
    return m


def acquire(anat: Anatomy, v: Visit, f: Field) -> Radiograph:
    """Expose the patient's anatomy once: pose, film response, blur, noise; plus mask and box."""
    rng = np.random.default_rng(v.seed)
    H, W = f.height, f.width
    m = pose_matrix(v, f)
    a = cv2.warpAffine(anat.atten, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpAffine(anat.mask, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT) >= 128
    img = cv2.exp(a * np.float32(-v.k))
    img = np.float32(v.offset + v.gain) - np.float32(v.gain) * img
    img += np.float32(v.uneven) * _smooth_field(rng, (H, W), 3)
    img = cv2.pow(np.clip(img, 0.0, 1.0), v.gamma)
    sigma = v.blur_mm / f.mm_per_px
    if sigma > 0.2:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    # quantum noise grows with the signal; uniform noise scaled to the same variance looks alike
    noise = rng.random((H, W), dtype=np.float32) - np.float32(0.5)
    img += np.float32(v.noise * math.sqrt(12.0)) * cv2.sqrt(img + np.float32(0.25)) * noise
    return Radiograph(image=np.clip(img, 0.0, 1.0), mask=mask, box=_box(anat, v, f, m))


def _box(anat: Anatomy, v: Visit, f: Field, m: np.ndarray) -> tuple:
    """The annotator's thin box on one side's inferior cortex below the mental foramen.

    Its extent is fixed in mm around the border (not fitted to the cortex), so the box carries
    no class information; the annotator's imprecision is the visit's jitter.
    """
    mm = f.mm_per_px
    xf = anat.foramen_x[v.box_side]
    half = v.box_len_mm / 2 / mm
    cols = np.arange(int(xf - half), int(xf + half) + 1)
    cols = cols[(cols >= 0) & (cols < f.width)]
    yb = anat.border_y[cols]
    yb = yb[np.isfinite(yb)]
    top, bottom = float(yb.min()) - BOX_ABOVE_MM / mm, float(yb.max()) + BOX_BELOW_MM / mm
    corners = np.array([[cols[0], top], [cols[-1] + 1, top], [cols[0], bottom], [cols[-1] + 1, bottom]], float)
    pts = corners @ m[:, :2].T + m[:, 2]
    j = np.asarray(v.box_jitter_mm) / mm
    x0, y0 = pts[:, 0].min() + j[0], pts[:, 1].min() + j[1]
    x1, y1 = pts[:, 0].max() + j[2], pts[:, 1].max() + j[3]
    x0, y0 = min(max(0, int(round(x0))), f.width - 2), min(max(0, int(round(y0))), f.height - 2)
    x1, y1 = min(f.width, int(round(x1))), min(f.height, int(round(y1)))
    return (x0, y0, max(1, x1 - x0), max(1, y1 - y0))
