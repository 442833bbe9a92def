"""Compare bids_ctp outputs with the phantom's ground truth, per tissue label.

Usage: python benchmarks/compare_truth.py PHANTOM_DIR OUTPUT_DIR [--desc nlr]
Prints the median estimate, the truth and the relative error (%) per map and region, the
AIF location, and brain-mask Dice.
"""
from __future__ import annotations

import argparse
import glob
import os

import nibabel as nb
import numpy as np

REGIONS = {"grey_matter": 4, "white_matter": 5, "ischemic_core": 8, "penumbra": 9}


def compare(phantom_dir, output_dir, desc="nlr"):
    rows = []
    for truth_cbf in sorted(glob.glob(os.path.join(
            phantom_dir, "derivatives/groundtruth/sub-*/**/*_desc-groundtruth_cbf.nii.gz"),
            recursive=True)):
        prefix = os.path.basename(truth_cbf).split("_desc-")[0]
        tdir = os.path.dirname(truth_cbf)
        rel = os.path.relpath(tdir, os.path.join(phantom_dir, "derivatives/groundtruth"))
        odir = os.path.join(output_dir, rel)
        if not os.path.exists(os.path.join(odir, f"{prefix}_desc-{desc}_cbf.nii.gz")):
            continue  # not processed (e.g. --participant-label chose others)
        labels = np.asarray(nb.load(os.path.join(tdir, f"{prefix}_dseg.nii.gz")).dataobj)
        result = {"series": prefix}
        for name in ("cbf", "cbv", "mtt", "tmax", "ttp"):
            truth = nb.load(os.path.join(tdir, f"{prefix}_desc-groundtruth_{name}.nii.gz"))
            est = nb.load(os.path.join(odir, f"{prefix}_desc-{desc}_{name}.nii.gz"))
            assert est.shape == truth.shape and np.allclose(est.affine, truth.affine, atol=1e-4)
            t, e = truth.get_fdata(), est.get_fdata()
            for region, label in REGIONS.items():
                sel = labels == label
                result[(name, region)] = (float(np.median(e[sel])), float(np.median(t[sel])))
        aif = np.asarray(nb.load(os.path.join(odir, f"{prefix}_desc-aif_mask.nii.gz")).dataobj) > 0
        result["aif_labels"] = np.bincount(labels[aif], minlength=10).tolist()
        truth_mask = np.asarray(nb.load(os.path.join(tdir, f"{prefix}_desc-brain_mask.nii.gz")).dataobj) > 0
        mask = np.asarray(nb.load(os.path.join(odir, f"{prefix}_desc-brain_mask.nii.gz")).dataobj) > 0
        result["dice"] = 2 * (mask & truth_mask).sum() / (mask.sum() + truth_mask.sum())
        rows.append(result)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phantom_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--desc", default="nlr")
    args = parser.parse_args()
    for result in compare(args.phantom_dir, args.output_dir, args.desc):
        print(f"{result['series']}: brain mask Dice {result['dice']:.3f}; "
              f"AIF voxels per label {result['aif_labels']}")
        for key, value in result.items():
            if isinstance(key, tuple):
                (name, region), (est, truth) = key, value
                err = (est / truth - 1) * 100 if name in ("cbf", "cbv", "mtt") else est - truth
                unit = "%" if name in ("cbf", "cbv", "mtt") else "s"
                print(f"  {name:4s} {region:14s} est {est:8.2f} truth {truth:8.2f} "
                      f"error {err:+7.1f} {unit}")


if __name__ == "__main__":
    main()
