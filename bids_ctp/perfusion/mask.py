"""Automatic brain mask from the time-averaged CT image.

The brain is the soft tissue enclosed by the skull. Morphology uses Euclidean distance
transforms with the voxel spacing in mm, so radii mean the same anatomy at 0.45 mm pixels and
at 5 mm slices, and cost does not grow with the radius.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

BONE_HU = 250.0  # above: bone (cortical skull is 700-1900 HU; enhancing vessels stay below)
SOFT_TISSUE_HU = (-30.0, BONE_HU)  # CSF (~5 HU) up to enhanced blood in the time average
SKULL_GAP_MM = 2.0  # sutures and partial-volumed thin bone up to this width are sealed
BRIDGE_MM = 1.5  # soft-tissue bridges thinner than this (through foramina) are cut
OPENING_MM = 3.5  # the brain spreads between slices only through soft tissue wider than 2x this in-plane
# Soft tissue reaches the brain in 3D only through voxels that see bone in at least this many of
# the 8 in-plane directions (axes and diagonals) within their slice: brain at the skull base sees
# bone nearly all round; neck, face, eyes, ears and scalp see air on one side. Without it, a
# whole-brain scan (0.45 x 0.45 x 0.5 mm, 160 mm) grew from the brainstem into the neck, then
# face, eyes and ears: Dice 0.918 -> 0.993. 5 rather than 6 keeps the brain under a
# craniectomy (bone removed right of +40 mm in the top 80 % of slices: Dice 0.94 before, 0.96
# with 5, 0.83 with 6).
MIN_BONE_DIRECTIONS = 5
IN_PLANE = 1e6  # slice spacing stand-in that makes the 3D distance transforms measure in-plane distances
# Less bone than this and the image is taken as skull-stripped (or a digital reference object):
# calcifications (pineal, choroid plexus) stay well below, a 1 cm slab of skull is ~25 mL.
MIN_SKULL_ML = 5.0


def has_skull(image: np.ndarray, spacing) -> bool:
    """Whether ``image`` (HU) holds at least MIN_SKULL_ML of bone."""
    return float((image > BONE_HU).sum()) * float(np.prod(spacing)) / 1000.0 >= MIN_SKULL_ML


def soft_tissue(image: np.ndarray) -> np.ndarray:
    return (image > SOFT_TISSUE_HU[0]) & (image < SOFT_TISSUE_HU[1])


def dilate(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def erode(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    # Pad so that the image border counts as outside the mask.
    padded = np.pad(mask, 1)
    inner = ndimage.distance_transform_edt(padded, sampling=spacing) > radius_mm
    return inner[tuple(slice(1, -1) for _ in mask.shape)]


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def fill_holes_per_slice(mask: np.ndarray, slice_axis: int) -> np.ndarray:
    moved = np.moveaxis(mask, slice_axis, 0)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
    return np.moveaxis(filled, 0, slice_axis)


def _line_footprint(angle: float, length_mm: float, spacing, slice_axis: int) -> np.ndarray:
    """Symmetric in-plane line of ``length_mm`` at ``angle`` (rad), rasterised on the voxel grid."""
    axes = [a for a in range(3) if a != slice_axis]
    steps = np.array([spacing[a] for a in axes])
    n = int(np.ceil(length_mm / 2 / steps.min()))
    t = np.linspace(-length_mm / 2, length_mm / 2, 4 * n + 1)
    ij = np.rint(np.outer(t, [np.cos(angle), np.sin(angle)]) / steps).astype(int)
    half = np.abs(ij).max(axis=0)
    fp = np.zeros(tuple(2 * half + 1), dtype=bool)
    fp[ij[:, 0] + half[0], ij[:, 1] + half[1]] = True
    return np.expand_dims(fp, slice_axis)


def bony_channels(skull: np.ndarray, width_mm: float, spacing, slice_axis: int) -> np.ndarray:
    """Non-bone voxels with bone on two opposite sides less than ``width_mm`` apart in their slice.

    Closings with in-plane lines in four directions: a fissure or canal through the skull is
    bridged along its width, while tissue next to a single bone surface is not.
    """
    channels = np.zeros(skull.shape, dtype=bool)
    for angle in np.arange(4) * np.pi / 4:
        fp = _line_footprint(angle, width_mm, spacing, slice_axis)
        channels |= ndimage.binary_erosion(ndimage.binary_dilation(skull, fp), fp, border_value=1)
    return channels & ~skull


def _shifted(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``a`` moved by (-dx, -dy) voxels along its first two axes: out[i, j] = a[i + dx, j + dy],
    False beyond the grid."""
    out = np.zeros_like(a)
    nx, ny = a.shape[:2]
    out[max(-dx, 0):nx - max(dx, 0), max(-dy, 0):ny - max(dy, 0)] = \
        a[max(dx, 0):nx + min(dx, 0), max(dy, 0):ny + min(dy, 0)]
    return out


def bone_directions(bone: np.ndarray, slice_axis: int) -> np.ndarray:
    """For every voxel, in how many of the 8 in-plane directions (along the two in-plane voxel
    axes and their diagonals) its slice holds bone somewhere (uint8, 0-8)."""
    planes = np.moveaxis(bone, slice_axis, -1)
    count = np.zeros(planes.shape, np.uint8)
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        seen, k = planes.copy(), 1
        while k < max(planes.shape[:2]):  # doubling: bone at any of 2k steps along (dx, dy)
            seen |= _shifted(seen, k * dx, k * dy)
            k *= 2
        count += seen
    return np.moveaxis(count, -1, slice_axis)


def slice_axis_from_affine(affine: np.ndarray) -> int:
    """Voxel axis closest to the head's inferior-superior world axis (axial slice stacking)."""
    directions = np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[2])))


def brain_mask(mean_image: np.ndarray, spacing, slice_axis: int = 2) -> np.ndarray:
    """Intracranial soft tissue (brain, CSF, intracranial vessels) of a time-averaged CT image.

    An image without a skull (``has_skull`` false: skull-stripped data, a digital reference
    object) is taken as brain already: every soft-tissue voxel is returned.

    Steps: bone by threshold, sutures (gaps up to 2 * SKULL_GAP_MM) closed; soft tissue enclosed
    by the skull in its axial slice seeds the brain, but only where the soft tissue is wide (it
    survives an in-plane erosion by OPENING_MM).  In skull-base slices the skull ring is open
    (fissures, canals, orbits, face), so the per-slice test fails there; the seed is therefore
    grown in 3D through the wide soft tissue, which reaches down from the enclosed slices into
    the temporal lobes, cerebellum and brainstem but not through openings narrower than
    2 * OPENING_MM into orbit, face, neck or temporal muscle.  The eroded region is grown back by
    OPENING_MM plus one pixel within the soft tissue, and soft tissue inside bony channels
    narrower than 2 * OPENING_MM (the mouth of a fissure) is left out.  The growth passes only
    through voxels that see bone in MIN_BONE_DIRECTIONS of 8 in-plane directions: with whole-head
    coverage the brainstem reaches below the skull into the neck, whose tissue sees air.
    """
    spacing = tuple(float(s) for s in spacing)
    if not has_skull(mean_image, spacing):
        return soft_tissue(mean_image)
    plane = tuple(IN_PLANE if axis == slice_axis else s for axis, s in enumerate(spacing))
    pixel = max(s for axis, s in enumerate(spacing) if axis != slice_axis)
    bone = mean_image > BONE_HU
    skull = erode(dilate(bone, SKULL_GAP_MM, spacing), SKULL_GAP_MM, spacing) | bone
    soft = soft_tissue(mean_image) & ~skull
    channels = bony_channels(skull, 2.0 * OPENING_MM, plane, slice_axis)
    enclosed = bone_directions(bone, slice_axis) >= MIN_BONE_DIRECTIONS
    wide = erode(soft, OPENING_MM, plane) & enclosed
    seed = fill_holes_per_slice(skull, slice_axis) & wide
    if not seed.any():
        return np.zeros(mean_image.shape, dtype=bool)
    seed = largest_component(seed)
    labels, _ = ndimage.label(wide)  # face connectivity: slices join where their wide tissue overlaps
    core = np.isin(labels, np.unique(labels[seed]))
    brain = dilate(core, OPENING_MM + pixel, plane) & soft & ~channels
    brain = largest_component(brain)
    return fill_holes_per_slice(brain, slice_axis) & ~skull & ~channels & (mean_image > SOFT_TISSUE_HU[0])
