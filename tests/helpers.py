"""Tiny synthetic datasets shared by the input-side tests."""
import json
from pathlib import Path

import nibabel as nb
import numpy as np


def make_ctp(root, rel, sidecar=None, shape=(6, 6, 2, 12), pixdim4=0.0):
    """Write a tiny int16 NIfTI at root/rel (+ JSON sidecar when given)."""
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nb.Nifti1Image(np.zeros(shape, np.int16), np.eye(4))
    if len(shape) == 4:
        img.header.set_zooms((1.0, 1.0, 5.0, pixdim4))
        img.header.set_xyzt_units("mm", "sec")
    nb.save(img, str(path))
    if sidecar is not None:
        name = path.name.replace(".nii.gz", "").replace(".nii", "")
        (path.parent / f"{name}.json").write_text(json.dumps(sidecar))
    return path


def listing(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def snapshot(root):
    """Every entry under root: relative path -> sha256 of a file's content, or "dir" (listing + checksums)."""
    import hashlib

    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out
