"""Reading and writing the intermediate images that travel between workflow nodes.

Between nodes, images are uncompressed float32 NIfTI files (memory-mapped on read, no gzip
round-trip) carrying the input's affine and header, so every output stays on the input grid.
"""
from __future__ import annotations

import os

import nibabel as nb
import numpy as np


def load(path, dtype=np.float32) -> np.ndarray:
    """Voxel data of a NIfTI file as ``dtype``, scaling applied.

    Integer data (CT's int16) is read unscaled and scaled in ``dtype``: nibabel's own scaled
    read goes through float64 and took 0.96 s instead of 0.6 s for a 220×220×16×55 series.
    """
    proxy = nb.load(os.fspath(path)).dataobj
    if not hasattr(proxy, "get_unscaled") or np.issubdtype(proxy.dtype, np.floating):
        return np.asarray(proxy, dtype=dtype)
    data = np.asarray(proxy.get_unscaled()).astype(dtype)
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope != 1.0:
        data *= dtype(slope) if np.issubdtype(dtype, np.floating) else slope
    if inter != 0.0:
        data += dtype(inter) if np.issubdtype(dtype, np.floating) else inter
    return data


def spacing(path) -> tuple[float, ...]:
    return tuple(float(z) for z in nb.load(os.fspath(path)).header.get_zooms()[:3])


def affine(path) -> np.ndarray:
    return nb.load(os.fspath(path)).affine


def save_like(data: np.ndarray, reference, filename: str, dtype=np.float32) -> str:
    """Save ``data`` in the working directory with the grid (affine, qform/sform) of ``reference``."""
    ref = nb.load(os.fspath(reference))
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    header.set_data_shape(data.shape)
    img = nb.Nifti1Image(np.asarray(data, dtype=dtype), ref.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
    img.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    out = os.path.abspath(filename)
    nb.save(img, out)
    return out
