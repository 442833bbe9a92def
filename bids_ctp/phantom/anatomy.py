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
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

# Label index -> name; also written as the dseg.tsv lookup table.
AIR, SCALP, SKULL, CSF, GM, WM, ARTERY, VEIN, CORE, PENUMBRA = range(10)
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
}
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
    depth = 0.0
    # Nested shells: each label fills everything inside its outer surface.
    for label, thickness in ((SCALP, SCALP_MM), (SKULL, SKULL_MM), (CSF, CSF_MM), (GM, GM_MM), (WM, None)):
        labels[_inside(x, y, z, origin, semi - depth)] = label
        if thickness is not None:
            depth += thickness
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
    return labels, fraction
