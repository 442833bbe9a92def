"""A skull-less digital reference object (DSC-style test suite): blocks of delay-free tissue
curves with known CBF and MTT, an arterial block given with ``--aif-mask``, no head around it.

Before the image was taken as skull-stripped this failed with "brain mask is empty"; with a
user brain mask, motion correction (driven by the enhancing blocks) invented 0.6 mm of motion
and CBF came out 8-66 % high. The same object in concentration units (arterial peak 10) and
as DSC MR signal (800 exp(-C/8), arterial signal dropping to 246) failed with "no contrast
bolus found" until such series were recognised and brought to a CT-like scale.
"""
from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest

from bids_ctp.cli.run import main

KH, DENSITY = 0.73, 1.05
CELLS = [(20.0, 3.0), (20.0, 10.0), (60.0, 3.0), (60.0, 10.0)]  # CBF mL/100g/min, MTT s
BLOCK, SIZE = 10, 24  # block edge and image edge in voxels (1 x 1 x 5 mm)


UNITS = {  # how the object's enhancement C (HU) is stored
    "HU": lambda c: 30.0 + c,
    "concentration": lambda c: c / 40.0,
    "DSC signal": lambda c: 800.0 * np.exp(-c / 340.0),
}


def _reference_object(root, units="HU"):
    times = np.arange(40.0)
    fine = np.arange(0.0, 40.0, 0.01)
    s = np.clip(fine - 6.0, 0.0, None)
    aif = s ** 3 * np.exp(-s / 1.5)
    aif *= 400.0 / aif.max()
    data = np.zeros((SIZE, SIZE, 4, times.size), np.float32)
    for n, (cbf, mtt) in enumerate(CELLS):
        flow = cbf / 6000.0 * DENSITY / KH  # 1/s
        kernel = np.exp(-fine / mtt) * 0.01
        kernel[0] *= 0.5  # trapezoid rule: the convolution integral is exact to < 0.1 %
        tissue = flow * np.convolve(aif, kernel)[:fine.size]
        i, j = 2 + (n // 2) * (BLOCK + 1), 2 + (n % 2) * (BLOCK + 1)
        data[i:i + BLOCK, j:j + BLOCK] = np.interp(times, fine, tissue)
    data[:2, :2] = np.interp(times, fine, aif)
    data = UNITS[units](data).astype(np.float32)
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    ctp = root / "bids" / "sub-01" / "ct" / "sub-01_ctp.nii.gz"
    ctp.parent.mkdir(parents=True)
    (root / "bids" / "dataset_description.json").write_text(
        json.dumps({"Name": "reference object", "BIDSVersion": "1.9.0"}))
    nb.save(nb.Nifti1Image(data, affine), ctp)
    ctp.with_name("sub-01_ctp.json").write_text(json.dumps({"RepetitionTime": 1.0}))
    aif_mask = np.zeros(data.shape[:3], np.uint8)
    aif_mask[:2, :2] = 1
    nb.save(nb.Nifti1Image(aif_mask, affine), root / "aif_mask.nii.gz")
    return root / "bids", root / "aif_mask.nii.gz"


@pytest.fixture(scope="module", params=list(UNITS))
def derivatives(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_object")
    bids, aif_mask = _reference_object(root, request.param)
    out = root / "out"
    assert main([str(bids), str(out), "participant", "-w", str(root / "work"),
                 "--aif-mask", str(aif_mask)]) == 0
    return out / "sub-01" / "perf", request.param


def test_maps_match_the_known_values(derivatives):
    derivatives, _ = derivatives
    maps = {m: nb.load(derivatives / f"sub-01_desc-nlr_{m}.nii.gz").get_fdata()
            for m in ("cbf", "cbv", "mtt", "tmax")}
    for n, (cbf, mtt) in enumerate(CELLS):
        i, j = 4 + (n // 2) * (BLOCK + 1), 4 + (n % 2) * (BLOCK + 1)
        centre = (slice(i, i + BLOCK - 4), slice(j, j + BLOCK - 4))
        got = {m: float(np.median(v[centre])) for m, v in maps.items()}
        assert got["cbf"] == pytest.approx(cbf, rel=0.03), (cbf, mtt, got)
        assert got["cbv"] == pytest.approx(cbf * mtt / 60.0, rel=0.03), (cbf, mtt, got)
        assert got["mtt"] == pytest.approx(mtt, rel=0.03), (cbf, mtt, got)
        assert abs(got["tmax"]) < 0.2, (cbf, mtt, got)


def test_no_skull_means_no_registration_and_a_tissue_mask(derivatives):
    derivatives, units = derivatives
    flags = json.loads((derivatives / "sub-01_desc-nlr_cbf.json").read_text())["QualityFlags"]
    assert any(f.startswith("motion correction skipped: no skull") for f in flags)
    assert any(f.startswith("brain mask: no skull") for f in flags)
    scaled = [f for f in flags if f.startswith("intensities: no skull")]
    dsc = [f for f in flags if "taken as MR (DSC) signal" in f]
    assert len(scaled) == (units != "HU") and len(dsc) == (units == "DSC signal"), flags
    fd = np.loadtxt(derivatives / "sub-01_desc-motion_timeseries.tsv", skiprows=1, usecols=-1)
    assert np.all(fd == 0)
    brain = nb.load(derivatives / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    assert brain.all()  # every voxel (background 0 HU included) is soft tissue
