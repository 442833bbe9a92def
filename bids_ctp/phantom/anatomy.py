"""Label anatomy of the CTP phantom head (pure numpy).

Voxel axes: i = left->right, j = posterior->anterior, k = inferior->superior.
Positions are in mm from the volume centre (voxel centre * spacing), so any
spacing, isotropic or not, gives the same anatomy in mm.

Nested ellipsoids centred on the volume centre (semi-axes in mm):
scalp (75, 92, 70); skull 5 mm inside it; inner skull table 6 mm further; a 2 mm
CSF rim; a 3 mm grey-matter ribbon; white matter inside.  Two ventricles (CSF)
at x = -/+9 mm.  Arteries are cylinders along k: MCAs at (x, y) = (-/+35, +10) mm,
radius 2.5 mm; ACAs at (-/+5, +45) mm, radius 1.6 mm; their partial-volume
fraction comes from 4x4 in-plane supersampling and voxels with fraction >= 0.5
are labelled artery.  The superior sagittal sinus (vein, radius 4 mm) runs at
the posterior midline just inside the inner table; its centre follows the inner
table from slice to slice (a straight cylinder would leave the skull on the
outer slices).  Ischemic core: ellipsoid at (+45, 0, 0) mm, semi-axes
(14, 14, 30) mm, restricted to GM/WM; penumbra: the ellipsoid grown by 14 mm
(semi-axes (28, 28, 44) mm) minus the core, restricted to GM/WM in the right
hemisphere (x > 0).

Skull base (lowest ~15 mm of the default 80 mm slab, z < -25 mm): the cranial cavity is
the inner-table ellipsoid cut by fossa floors (``FOSSAE``): anterior fossa at z = -25
(frontal lobes above the orbital roofs), sella at -28, middle fossae (temporal lobes,
|x| > 16 mm) at -42, posterior fossa (cerebellum, brainstem on the clivus) at -48 with the
foramen magnum below it; skull, CSF rim and cortex keep their thickness along floors and
walls.  Below the floors the skull ellipsoid holds face/neck muscle, orbits (bony wall open
in front, fat, eye globe), ethmoid and sphenoid sinuses and the nasal cavity (label sinus,
air), and a 5 mm superior orbital fissure of soft tissue joining each middle fossa to its
orbit.  Temporal muscles lie lateral to the skull under the scalp (z from -54 to -10 mm).
Above z = -19 mm the anatomy is unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

# Label index -> name; also written as the dseg.tsv lookup table.
AIR, SCALP, SKULL, CSF, GM, WM, ARTERY, VEIN, CORE, PENUMBRA, MUSCLE, ORBITAL_FAT, EYE, SINUS = range(14)
LABELS: dict[int, str] = {
    AIR: "air",
    SCALP: "scalp",
    SKULL: "skull",
    CSF: "csf",
    GM: "grey_matter",
    WM: "white_matter",
    ARTERY: "artery",
    VEIN: "vein",
    CORE: "ischemic_core",
    PENUMBRA: "penumbra",
    MUSCLE: "muscle",  # extracranial soft tissue: temporal, facial and neck muscle, nerves in foramina
    ORBITAL_FAT: "orbital_fat",
    EYE: "eye",
    SINUS: "sinus",  # air in the paranasal sinuses and nasal cavity
}
EXTRACRANIAL_SOFT = (SCALP, MUSCLE, ORBITAL_FAT, EYE)
INTRACRANIAL = (CSF, GM, WM, ARTERY, VEIN, CORE, PENUMBRA)

HEAD_SEMI_AXES = (75.0, 92.0, 70.0)  # outer scalp (mm)
SCALP_MM, SKULL_MM, CSF_MM, GM_MM = 5.0, 6.0, 2.0, 3.0
VENTRICLES = (((-9.0, 2.0, 8.0), (5.0, 18.0, 14.0)), ((9.0, 2.0, 8.0), (5.0, 18.0, 14.0)))  # (centre, semi-axes)
ARTERIES = (  # (x, y, radius) in mm; cylinders along k
    (-35.0, 10.0, 2.5),  # left MCA
    (35.0, 10.0, 2.5),  # right MCA
    (-5.0, 45.0, 1.6),  # left ACA
    (5.0, 45.0, 1.6),  # right ACA
)
VEIN_RADIUS = 4.0
CORE_CENTRE, CORE_SEMI_AXES = (45.0, 0.0, 0.0), (14.0, 14.0, 30.0)
PENUMBRA_MARGIN = 14.0  # core grown by this many mm -> in-plane semi-axes 28 mm
SUPERSAMPLE = 4

# Skull base (mm).  Cranial cavity = inner-table ellipsoid & union of these boxes, each given as
# (|x| range, y range, z range): the cerebrum above the anterior fossa floor, the middle fossae
# (temporal lobes) and the posterior fossa (cerebellum, brainstem on the clivus) reaching lower.
ANTERIOR_FLOOR, SELLA_FLOOR, MIDDLE_FLOOR, POSTERIOR_FLOOR = -25.0, -28.0, -42.0, -48.0
FOSSAE = (
    ((-np.inf, np.inf), (-np.inf, np.inf), (ANTERIOR_FLOOR, np.inf)),  # cerebrum, anterior fossa
    ((-np.inf, 14.0), (0.0, 34.0), (SELLA_FLOOR, np.inf)),  # sella / planum sphenoidale
    ((16.0, np.inf), (-12.0, 32.0), (MIDDLE_FLOOR, np.inf)),  # middle fossae (temporal lobes)
    ((-np.inf, np.inf), (-np.inf, -14.0), (POSTERIOR_FLOOR, np.inf)),  # posterior fossa (cerebellum)
    ((-np.inf, 12.0), (-np.inf, 0.0), (POSTERIOR_FLOOR, np.inf)),  # clivus: pons and medulla
)
FORAMEN_MAGNUM = ((0.0, -28.0), (13.0, 15.0), POSTERIOR_FLOOR + 1.0)  # centre (x, y), semi-axes, top z
ORBIT = ((30.0, 54.0, -41.0), (15.0, 20.0, 14.0))  # fat-filled cone approximated by an ellipsoid
ORBIT_WALL_MM, ORBIT_RIM_Y = 2.0, 12.0  # bony wall, open anterior to centre y + ORBIT_RIM_Y
GLOBE = ((30.0, 63.0, -40.0), 10.5)  # eye globe centre (x, y, z) and radius
FISSURE = ((20.0, 25.0), (26.0, 44.0), (-40.0, -27.0))  # superior orbital fissure, 5 mm wide, soft tissue
TEMPORALIS = ((62.0, 8.0, -32.0), (10.0, 34.0, 22.0))
SPHENOID = ((0.0, 18.0, -40.0), (17.0, 17.0, 13.0))  # bone block under the sella
SPHENOID_SINUS = ((0.0, 18.0, -40.0), (11.0, 11.0, 8.0))
ETHMOID = ((0.0, 52.0, -36.0), (8.0, 16.0, 10.0))
NASAL_CAVITY = ((0.0, 58.0, -56.0), (11.0, 22.0, 17.0))


def _axes(shape: Sequence[int], spacing: Sequence[float]) -> tuple[NDArray, NDArray, NDArray]:
    """Voxel-centre coordinates (mm from the volume centre), broadcastable to 3D."""
    x, y, z = ((np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing))
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _inside(x, y, z, centre, semi) -> NDArray[np.bool_]:
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2 <= 1.0


def _disc_fraction(x: NDArray, y: NDArray, sx: float, sy: float, cx, cy, radius: float) -> NDArray[np.float64]:
    """In-plane fraction of each voxel inside a disc (cx, cy may vary per slice), by supersampling."""
    off = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    frac = np.zeros(np.broadcast_shapes(x.shape, y.shape, np.shape(cx), np.shape(cy)), dtype=float)
    for ox in off * sx:
        for oy in off * sy:
            frac += (x + ox - cx) ** 2 + (y + oy - cy) ** 2 <= radius**2
    return frac / SUPERSAMPLE**2


def _box(x, y, z, d, xabs=(-np.inf, np.inf), y_=(-np.inf, np.inf), z_=(-np.inf, np.inf)) -> NDArray[np.bool_]:
    """Inside an axis-aligned box (bounds on |x|, y, z in mm) shrunk by ``d`` mm (negative: grown)."""
    ax = np.abs(x)
    return ((ax > xabs[0] + d) & (ax < xabs[1] - d)) & ((y > y_[0] + d) & (y < y_[1] - d)) & ((z > z_[0] + d) & (z < z_[1] - d))


def _cranial_cavity(x, y, z, d: float) -> NDArray[np.bool_]:
    """Intracranial space shrunk by ``d`` mm (d < 0 grows it): the inner-table ellipsoid cut by the fossa floors.

    A union of compartments, each the inner-table ellipsoid intersected with a box; a compartment
    shrunk by d is the ellipsoid with semi-axes minus d intersected with the box shrunk by d, so
    the CSF rim, grey-matter ribbon and skull keep their thickness along the new floors and walls.
    """
    inner = np.array(HEAD_SEMI_AXES) - SCALP_MM - SKULL_MM
    ell = _inside(x, y, z, (0.0, 0.0, 0.0), inner - d)
    cavity = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    for xabs, y_, z_ in FOSSAE:
        cavity |= _box(x, y, z, d, xabs, y_, z_)
    cavity &= ell
    # Foramen magnum: the medulla and its CSF pass down through the posterior fossa floor.
    (cx, cy), (ax, ay), top = FORAMEN_MAGNUM
    r = ((x - cx) / (ax - d)) ** 2 + ((y - cy) / (ay - d)) ** 2 <= 1.0
    cavity |= r & (z < top - d)
    return cavity


def _skull_base(labels: NDArray[np.uint8], x, y, z) -> None:
    """Extracranial structures of the skull base, painted only outside the cranial cavity."""
    cavity = np.isin(labels, INTRACRANIAL)

    def paint(region, label):
        labels[region & ~cavity] = label

    for side in (-1.0, 1.0):
        # Orbit: bony wall (open in front), fat, eye globe; the superior orbital fissure
        # joins the orbital apex to the middle cranial fossa through the sphenoid wall.
        (ox, oy, oz), osemi = ORBIT
        centre = (side * ox, oy, oz)
        wall = _inside(x, y, z, centre, tuple(a + ORBIT_WALL_MM for a in osemi)) & (y < oy + ORBIT_RIM_Y)
        paint(wall, SKULL)
        paint(_inside(x, y, z, centre, osemi), ORBITAL_FAT)
        (gx, gy, gz), gr = GLOBE
        paint(_inside(x, y, z, (side * gx, gy, gz), (gr, gr, gr)), EYE)
        (fx0, fx1), (fy0, fy1), (fz0, fz1) = FISSURE
        paint(_box(x * side, y, z, 0.0, (fx0, fx1), (fy0, fy1), (fz0, fz1)) & (x * side > 0), MUSCLE)
        # Temporal muscle lateral to the skull, under a scalp cover.
        (tx, ty, tz), tsemi = TEMPORALIS
        tcentre = (side * tx, ty, tz)
        outside = ~_inside(x, y, z, (0.0, 0.0, 0.0), np.array(HEAD_SEMI_AXES) - SCALP_MM)
        cover = _inside(x, y, z, tcentre, tuple(a + SCALP_MM for a in tsemi)) & outside & (labels == AIR)
        labels[cover] = SCALP
        labels[_inside(x, y, z, tcentre, tsemi) & outside] = MUSCLE
    for (centre, semi), label in ((SPHENOID, SKULL), (SPHENOID_SINUS, SINUS), (ETHMOID, SINUS), (NASAL_CAVITY, SINUS)):
        region = _inside(x, y, z, centre, semi)
        if label == SINUS:
            region &= labels != SCALP  # air cells stay under the skin
        paint(region, label)


def make_head(shape: Sequence[int], spacing: Sequence[float]) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Labels (uint8, see ``LABELS``) and artery partial-volume fraction (float32) on a voxel grid."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
        raise ValueError("shape and spacing need three positive values")
    x, y, z = _axes(shape, spacing)
    origin = (0.0, 0.0, 0.0)
    labels = np.zeros(shape, dtype=np.uint8)
    semi = np.array(HEAD_SEMI_AXES)
    labels[_inside(x, y, z, origin, semi)] = SCALP
    # Below the fossa floors the skull ellipsoid holds face and neck soft tissue, except for
    # the bone within SKULL_MM of the cranial cavity (vault, fossa floors and walls).
    labels[_inside(x, y, z, origin, semi - SCALP_MM)] = MUSCLE
    labels[_cranial_cavity(x, y, z, -SKULL_MM) & _inside(x, y, z, origin, semi - SCALP_MM)] = SKULL
    for label, depth in ((CSF, 0.0), (GM, CSF_MM), (WM, CSF_MM + GM_MM)):
        labels[_cranial_cavity(x, y, z, depth)] = label
    for centre, axes in VENTRICLES:
        labels[_inside(x, y, z, centre, axes)] = CSF

    parenchyma = (labels == GM) | (labels == WM)
    core = _inside(x, y, z, CORE_CENTRE, CORE_SEMI_AXES) & parenchyma
    grown = tuple(a + PENUMBRA_MARGIN for a in CORE_SEMI_AXES)
    penumbra = _inside(x, y, z, CORE_CENTRE, grown) & parenchyma & ~core & (x > 0)
    labels[core] = CORE
    labels[penumbra] = PENUMBRA

    intracranial = np.isin(labels, INTRACRANIAL)
    sx, sy = spacing[0], spacing[1]
    # Sinus centre hugs the inner table of the posterior midline on every slice.
    inner_a, inner_b, inner_c = semi - SCALP_MM - SKULL_MM
    inner_y = inner_b * np.sqrt(np.clip(1.0 - (z / inner_c) ** 2, 0.0, None))
    vein_cy = -(inner_y - VEIN_RADIUS - 0.5)
    vein = (_disc_fraction(x, y, sx, sy, 0.0, vein_cy, VEIN_RADIUS) >= 0.5) & (inner_y > 2 * VEIN_RADIUS)
    labels[vein & intracranial] = VEIN

    artery = np.zeros(shape[:2] + (1,), dtype=float)
    for cx, cy, radius in ARTERIES:
        artery += _disc_fraction(x, y, sx, sy, cx, cy, radius)
    fraction = np.where(intracranial, np.clip(artery, 0.0, 1.0), 0.0).astype(np.float32)
    labels[fraction >= 0.5] = ARTERY
    _skull_base(labels, x, y, z)
    return labels, fraction
