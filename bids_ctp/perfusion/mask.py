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


def slice_axis_from_affine(affine: np.ndarray) -> int:
    """Voxel axis closest to the head's inferior-superior world axis (axial slice stacking)."""
    directions = np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[2])))


def brain_mask(mean_image: np.ndarray, spacing, slice_axis: int = 2) -> np.ndarray:
    """Intracranial soft tissue (brain, CSF, intracranial vessels) of a time-averaged CT image.

    Steps: bone by threshold; gaps in the skull closed; the region each axial slice's skull
    encloses; soft tissue within it; thin bridges cut and the largest 3D component kept, so scalp,
    orbit and neck tissue outside the skull ring are excluded.
    """
    spacing = tuple(float(s) for s in spacing)
    bone = mean_image > BONE_HU
    skull = erode(dilate(bone, SKULL_GAP_MM, spacing), SKULL_GAP_MM, spacing) | bone
    enclosed = fill_holes_per_slice(skull, slice_axis) & ~skull
    soft = (mean_image > SOFT_TISSUE_HU[0]) & (mean_image < SOFT_TISSUE_HU[1])
    brain = enclosed & soft
    if not brain.any():
        return brain
    opened = dilate(erode(brain, BRIDGE_MM, spacing), BRIDGE_MM, spacing) & brain
    brain = largest_component(opened if opened.any() else brain)
    return fill_holes_per_slice(brain, slice_axis) & ~skull
