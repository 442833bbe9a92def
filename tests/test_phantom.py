"""Known-answer tests of the CTP phantom (model physics, anatomy, written dataset, CLI)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_ctp.phantom import make_dataset
from bids_ctp.phantom import anatomy as an
from bids_ctp.phantom.cli import main
from bids_ctp.phantom.dataset import BASELINE_HU, PERFUSION_TRUTH, frame_times
from bids_ctp.phantom.model import (
    CONSTANTS,
    arterial_input,
    gamma_variate,
    residue,
    tissue_enhancement,
    true_ttp,
    venous_output,
)

C = CONSTANTS
HCT = C.density / C.kh
T_LONG = np.arange(0.0, 400.0, 0.05)  # long enough for every curve to return to ~0


# ---------------------------------------------------------------- model
def test_gamma_variate_peak():
    t = np.arange(0.0, 40.0, 0.001)
    g = gamma_variate(t, 8.0, 3.0, 1.5)
    assert g.max() == pytest.approx(1.0, abs=1e-9)
    assert t[np.argmax(g)] == pytest.approx(8.0 + 3.0 * 1.5, abs=2e-3)
    assert np.all(g[t <= 8.0] == 0.0)
    assert arterial_input(12.5) == pytest.approx(C.peak_hu, rel=1e-3)  # recirculation not yet arrived


@pytest.mark.parametrize("shape", ["exponential", "box", "linear"])
@pytest.mark.parametrize("mtt", [4.0, 9.6])
def test_residue_integrates_to_mtt(shape, mtt):
    t = np.arange(-5.0, 300.0, 0.001)
    r = residue(t, mtt, shape)
    assert r[t < 0].max() == 0.0 and residue(0.0, mtt, shape) == 1.0
    assert np.trapezoid(r, t) == pytest.approx(mtt, rel=1e-3)


@pytest.mark.parametrize("shape", ["exponential", "box", "linear"])
def test_tissue_area_ratio_is_cbv(shape):
    cbf, cbv, delay = np.array([60.0, 25.0, 10.0, 25.0]), np.array([4.0, 2.0, 1.5, 4.0]), np.array([1.0, 1.5, 4.0, 4.0])
    ct = tissue_enhancement(T_LONG, cbf, cbv, delay, shape)
    ratio = np.trapezoid(ct, T_LONG, axis=1) / np.trapezoid(arterial_input(T_LONG), T_LONG)
    np.testing.assert_allclose(ratio, HCT * cbv / 100.0, rtol=0.01)


def test_box_residue_peak_is_windowed_aif_area():
    cbf, cbv, delay = 25.0, 4.0, 4.0
    mtt = 60 * cbv / cbf
    t = np.arange(0.0, 80.0, 0.01)
    ct = tissue_enhancement(t, cbf, cbv, delay, "box")
    # With a box residue C_t(t) = k * integral of C_a(. - delay) over [t - MTT, t].
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (arterial_input(t[1:] - delay) + arterial_input(t[:-1] - delay)) * 0.01)])
    window = cum[int(round(mtt / 0.01)):] - cum[: -int(round(mtt / 0.01))]
    assert ct.max() == pytest.approx(HCT * cbf / 6000.0 * window.max(), rel=0.01)


def test_scalar_and_vector_calls_agree():
    t = np.arange(55.0)
    many = tissue_enhancement(t, [60.0, 10.0], [4.0, 1.5], [1.0, 4.0])
    assert many.shape == (2, 55)
    np.testing.assert_allclose(tissue_enhancement(t, 10.0, 1.5, 4.0), many[1])


def test_true_ttp_and_delay():
    t = np.arange(0.0, 55.0, 0.01)
    for shape in ("exponential", "box"):
        for tr in PERFUSION_TRUTH.values():
            ct = tissue_enhancement(t, tr.cbf, tr.cbv, tr.delay, shape)
            assert true_ttp(t, tr.cbf, tr.cbv, tr.delay, shape) == pytest.approx(t[np.argmax(ct)], abs=0.02)
    # Delay shifts the whole curve; TTP moves by the same amount.
    assert true_ttp(t, 60, 4, 3.0) - true_ttp(t, 60, 4, 1.0) == pytest.approx(2.0, abs=0.02)


def test_vof_conserves_mass_and_peaks_later():
    aif, vof = arterial_input(T_LONG), venous_output(T_LONG)
    assert np.trapezoid(vof, T_LONG) == pytest.approx(np.trapezoid(aif, T_LONG), rel=0.01)
    assert T_LONG[np.argmax(vof)] > T_LONG[np.argmax(aif)] + 2.0
    half_artery = 0.5 * aif + 0.5 * tissue_enhancement(T_LONG, 60.0, 4.0, 1.0)
    assert vof.max() > half_artery.max()


# ---------------------------------------------------------------- anatomy
@pytest.mark.parametrize("spacing", [(0.5, 0.5, 5.0), (1.0, 1.0, 5.0), (1.5, 1.5, 2.0), (1.3, 0.7, 4.0)])
def test_anatomy_is_spacing_independent(spacing):
    shape = [int(np.ceil(f / s)) for f, s in zip((220, 220, 80), spacing)]
    labels, fraction = an.make_head(shape, spacing)
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]
    for side in (x < -20, x > 20):  # each MCA has fully filled voxels
        assert fraction[side].max() == pytest.approx(1.0)
    assert set(np.unique(labels)) == set(an.LABELS)
    voxel_ml = np.prod(spacing) / 1000.0
    # Same anatomy in mm whatever the grid: parenchyma above the skull base (z > -19 mm) =
    # brain ellipsoid cut to those slices, minus both ventricles (vessels are < 1 % of it).
    z = (np.arange(shape[2]) - (shape[2] - 1) / 2) * spacing[2]
    upper = z > -19.0
    gm_wm = np.isin(labels[:, :, upper], (an.GM, an.WM, an.CORE, an.PENUMBRA)).sum() * voxel_ml
    a, b, c = np.array(an.HEAD_SEMI_AXES) - (an.SCALP_MM + an.SKULL_MM + an.CSF_MM)
    z0, z1 = z[upper][0] - spacing[2] / 2, z[upper][-1] + spacing[2] / 2
    slab = np.pi * a * b * ((z1 - z0) - (z1**3 - z0**3) / (3 * c**2)) / 1000.0
    ventricles = sum(4 / 3 * np.pi * np.prod(semi) for _, semi in an.VENTRICLES) / 1000.0
    assert gm_wm == pytest.approx(slab - ventricles, rel=0.02)
    core_x = np.broadcast_to(x[:, None, None], shape)[labels == an.CORE]
    assert core_x.min() > 0  # right hemisphere


# ---------------------------------------------------------------- dataset
SMALL = dict(shape=(96, 96, 3), spacing=(2.0, 2.0, 5.0), n_frames=20, noise_hu=10.0, orientation="oblique")


def _raw_header(path: Path) -> nib.Nifti1Header:
    with gzip.open(path) as f:
        return nib.Nifti1Header.from_fileobj(f)


@pytest.mark.parametrize("layout,sessions", [("bep024", False), ("bep024", True), ("isles24", False)])
def test_small_dataset(tmp_path, layout, sessions):
    ds = make_dataset(tmp_path / "bids", layout=layout, n_subjects=2, seed=3, sessions=sessions, **SMALL)
    root = ds.root
    expected = {
        ("bep024", False): ["sub-01/ct/sub-01_ctp.nii.gz", "sub-02/ct/sub-02_ctp.nii.gz"],
        ("bep024", True): ["sub-01/ses-01/ct/sub-01_ses-01_ctp.nii.gz", "sub-02/ses-01/ct/sub-02_ses-01_ctp.nii.gz"],
        ("isles24", False): ["sub-stroke0001/ses-01/sub-stroke0001_ses-01_ctp.nii.gz", "sub-stroke0002/ses-01/sub-stroke0002_ses-01_ctp.nii.gz"],
    }[(layout, sessions)]
    assert [p.relative_to(root).as_posix() for p in (im.ctp for im in ds.images)] == expected
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "raw"
    assert set((root / ".bidsignore").read_text().split()) >= {"*_ctp.*", "ct/"}
    tdesc = json.loads((root / "derivatives/groundtruth/dataset_description.json").read_text())
    assert tdesc["DatasetType"] == "derivative" and tdesc["GeneratedBy"][0]["Name"] == "bids_ctp-phantom"

    image = ds.images[0]
    prefix = image.ctp.name.replace("_ctp.nii.gz", "")
    img = nib.load(image.ctp)
    hdr = _raw_header(image.ctp)
    assert img.shape == (96, 96, 3, 20) and img.get_data_dtype() == np.int16
    assert (hdr["scl_slope"], hdr["scl_inter"], hdr["qform_code"], hdr["sform_code"]) == (1.0, 0.0, 1, 2)
    assert hdr.get_xyzt_units() == ("mm", "sec") and hdr["pixdim"][4] == pytest.approx(1.0)
    np.testing.assert_allclose(img.get_qform(), img.affine, atol=1e-5)
    assert not np.allclose(img.affine[:3, :3], np.diag(np.diag(img.affine[:3, :3])))  # oblique
    sidecar = json.loads(image.ctp.with_name(prefix + "_ctp.json").read_text())
    assert len(sidecar["FrameTimesStart"]) == 20 and sidecar["RepetitionTime"] == 1.0
    assert sidecar["ContrastBolusIngredient"] == "IODINE" and sidecar["Modality"] == "CT"

    tdir = root / "derivatives/groundtruth" / image.ctp.parent.relative_to(root).as_posix().removesuffix("/ct") / "perf"
    for m in ("cbf", "cbv", "mtt", "tmax", "ttp"):
        t_img = nib.load(tdir / f"{prefix}_desc-groundtruth_{m}.nii.gz")
        assert t_img.shape == img.shape[:3] and t_img.get_data_dtype() == np.float32
        np.testing.assert_allclose(t_img.affine, img.affine, atol=1e-6)
        assert json.loads((tdir / f"{prefix}_desc-groundtruth_{m}.json").read_text())["Units"]
    labels = np.asanyarray(nib.load(tdir / f"{prefix}_dseg.nii.gz").dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= set(an.LABELS)
    lut = (tdir / f"{prefix}_dseg.tsv").read_text().splitlines()
    assert lut[0] == "index\tname" and len(lut) == len(an.LABELS) + 1
    mask = np.asanyarray(nib.load(tdir / f"{prefix}_desc-brain_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask == 1, np.isin(labels, an.INTRACRANIAL))
    cbf = np.asarray(nib.load(tdir / f"{prefix}_desc-groundtruth_cbf.nii.gz").dataobj)
    for k, tr in PERFUSION_TRUTH.items():
        assert np.all(cbf[labels == k] == tr.cbf)
    assert np.all(cbf[np.isin(labels, (an.AIR, an.SKULL, an.CSF, an.ARTERY, an.VEIN))] == 0)
    aif = np.loadtxt(tdir / f"{prefix}_desc-groundtruth_aif.tsv", skiprows=1)
    assert aif.shape == (20, 2) and aif[:, 1].max() > 300
    params = json.loads((tdir / f"{prefix}_desc-groundtruth_parameters.json").read_text())
    assert params["Constants"]["kh"] == 0.73 and params["Seed"] == 3

    data = np.asanyarray(img.dataobj).astype(np.float32)
    csf = data[labels == an.CSF]  # CSF never enhances: its temporal spread is pure noise
    assert csf.std(axis=1, ddof=1).mean() == pytest.approx(10.0, rel=0.05)
    assert csf.mean() == pytest.approx(BASELINE_HU[an.CSF], abs=0.5)
    gm = data[labels == an.GM].mean(axis=0)
    assert gm.max() - gm[:5].mean() > 8  # grey matter enhances
    other = np.asanyarray(nib.load(ds.images[1].ctp).dataobj)
    assert not np.array_equal(other, data.astype(np.int16))  # independent noise per subject


def test_nonuniform_frames(tmp_path):
    times = frame_times(55, 1.0, nonuniform=True)
    gaps = np.round(np.diff(times), 6)
    assert gaps[0] == 1.0 and len(set(gaps)) >= 3 and np.all(gaps > 0)
    assert abs(times[-1] - 54.0) <= 1.5
    ds = make_dataset(tmp_path / "nu", nonuniform=True, shape=(48, 48, 2), spacing=(4.0, 4.0, 5.0), n_frames=55, orientation="LPS")
    sidecar = json.loads(ds.images[0].ctp.with_name("sub-01_ctp.json").read_text())
    assert sidecar["FrameTimesStart"] == times and "RepetitionTime" not in sidecar
    img = nib.load(ds.images[0].ctp)
    assert img.shape[3] == len(times) and img.header.get_zooms()[3] == pytest.approx(float(np.median(gaps)))
    # LPS: axes negated, arrays flipped -> the core is still in the patient's right (world x > 0).
    assert img.affine[0, 0] < 0 and img.affine[1, 1] < 0
    labels = np.asanyarray(nib.load(ds.images[0].truth["dseg"]).dataobj)
    ijk = np.argwhere(labels == an.CORE)
    assert np.all(nib.affines.apply_affine(img.affine, ijk)[:, 0] > 0)


def test_cli_refuses_foreign_directory_and_reruns(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    assert main([str(foreign), "--shape", "32", "32", "2", "--spacing", "6", "6", "5", "--frames", "5"]) == 73
    assert "refusing" in capsys.readouterr().err and (foreign / "data.txt").exists()

    out = tmp_path / "ph"
    args = ["--shape", "32", "32", "2", "--spacing", "6", "6", "5", "--frames", "5"]
    assert main([str(out), "--subjects", "2", *args]) == 0
    assert main([str(out), *args, "--layout", "isles24"]) == 0  # a previous phantom is replaced
    assert not (out / "sub-02").exists() and (out / "sub-stroke0001/ses-01/sub-stroke0001_ses-01_ctp.nii.gz").exists()
    assert "sub-stroke0001_ses-01_ctp.nii.gz" in capsys.readouterr().out


def test_motion_option(tmp_path):
    args = ["--shape", "40", "40", "3", "--spacing", "5", "5", "5", "--frames", "6", "--seed", "2"]
    assert main([str(tmp_path / "still"), *args]) == 0
    assert main([str(tmp_path / "moved"), *args, "--motion", "1.5"]) == 0
    truth = tmp_path / "moved/derivatives/groundtruth/sub-01/perf/sub-01_desc-groundtruth_motion.tsv"
    assert truth.read_text().splitlines()[0].split("\t") == ["rot_x", "rot_y", "rot_z", "trans_x", "trans_y", "trans_z"]
    p = np.loadtxt(truth, skiprows=1)
    assert p.shape == (6, 6) and np.all(p[0] == 0)
    assert np.abs(p[:, 3:]).max() == pytest.approx(1.5) and np.degrees(np.abs(p[:, :3]).max()) == pytest.approx(1.5)
    assert not (tmp_path / "still/derivatives/groundtruth/sub-01/perf/sub-01_desc-groundtruth_motion.tsv").exists()
    still = np.asanyarray(nib.load(tmp_path / "still/sub-01/ct/sub-01_ctp.nii.gz").dataobj)
    moved = np.asanyarray(nib.load(tmp_path / "moved/sub-01/ct/sub-01_ctp.nii.gz").dataobj)
    assert moved.dtype == np.int16 and moved.shape == still.shape and not np.array_equal(moved[..., -1], still[..., -1])
    # motion=0 is the motion-free dataset, bit for bit.
    ds = make_dataset(tmp_path / "zero", shape=(40, 40, 3), spacing=(5, 5, 5), n_frames=6, seed=2, motion=0.0)
    assert np.array_equal(np.asanyarray(nib.load(ds.images[0].ctp).dataobj), still)
    # sub-voxels as large as the voxels: the grid itself is moved, frame 0 is the still one
    assert main([str(tmp_path / "grid"), *args, "--motion", "1.5", "--motion-subvoxel", "5"]) == 0
    grid = np.asanyarray(nib.load(tmp_path / "grid/sub-01/ct/sub-01_ctp.nii.gz").dataobj)
    assert np.array_equal(grid[..., 0], still[..., 0]) and not np.array_equal(grid[..., 0], moved[..., 0])
    assert not np.array_equal(grid[..., -1], still[..., -1])


def test_motion_phantom_truth_is_volume_weighted(tmp_path):
    """Motion phantoms average each voxel over sub-voxels (partial volume), so a voxel's CBV truth
    must be what its enhancement shows: the first-pass area over CBV is the same in partial-
    volume voxels as in pure ones. Measured: median deviation 2.6 % (the label at the voxel
    centre, the truth before: 18 %)."""
    ds = make_dataset(tmp_path / "pv", shape=(120, 120, 4), spacing=(1.5, 1.5, 5.0), n_frames=40,
                      noise_hu=0.0, motion=0.001, seed=1)  # 0.001 mm: the partial-volume path
    image = ds.images[0]
    data = np.asarray(nib.load(image.ctp).dataobj, float)
    cbv = np.asarray(nib.load(image.truth["cbv"]).dataobj, float)
    labels = np.asarray(nib.load(image.truth["dseg"]).dataobj)
    area = (data - data[..., :6].mean(-1, keepdims=True)).sum(-1)  # bolus arrives at 8 s
    vessels = ndimage.binary_dilation(np.isin(labels, [an.ARTERY, an.VEIN]), iterations=2)
    tissue = np.isin(labels, [an.GM, an.WM]) & ~vessels & (cbv >= 1.5)
    pure = tissue & np.isin(cbv, [PERFUSION_TRUTH[an.GM].cbv, PERFUSION_TRUTH[an.WM].cbv])
    per_cbv = np.median(area[pure] / cbv[pure])
    assert np.abs(area[pure] / cbv[pure] / per_cbv - 1).max() < 0.05
    mixed = tissue & ~pure
    assert mixed.sum() > 1000
    assert np.median(np.abs(area[mixed] / cbv[mixed] / per_cbv - 1)) < 0.05
    # CBF adds by volume too, and MTT = 60 CBV / CBF
    cbf = np.asarray(nib.load(image.truth["cbf"]).dataobj, float)
    mtt = np.asarray(nib.load(image.truth["mtt"]).dataobj, float)
    assert np.all((cbf[mixed] > 0) & (cbf[mixed] <= 60.0 + 1e-3))
    np.testing.assert_allclose(mtt[mixed], 60.0 * cbv[mixed] / cbf[mixed], rtol=1e-4)
