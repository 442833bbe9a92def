"""Known-answer tests of the pure perfusion science (curves, mask, preprocess, AIF,
deconvolution, maps).

Every expected value comes from an analytic formula or from the parameters the phantom model was
built with (``bids_ctp.phantom.model``), never from a previous run of the code under test.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from bids_ctp.errors import DataError
from bids_ctp.perfusion import aif as af
from bids_ctp.perfusion import curves as cv
from bids_ctp.perfusion import deconvolution as dc
from bids_ctp.perfusion import mask as mk
from bids_ctp.perfusion import motion as mo
from bids_ctp.perfusion import maps as mp
from bids_ctp.perfusion import preprocess as pp
from bids_ctp.phantom.model import (
    CONSTANTS,
    arterial_input,
    gamma_variate,
    tissue_enhancement,
    venous_output,
)

C = CONSTANTS
HCT = C.density / C.kh  # tissue curve = HCT * (CBF/6000) * (AIF conv R)


def true_k_max(cbf):
    """Height of k = (rho/kH) * F, F in 1/s, for CBF in mL/100g/min."""
    return HCT * np.asarray(cbf, float) / 6000.0


# ====================================================================== curves
def test_bolus_arrival_frame_follows_the_earliest_strongest_voxels():
    rng = np.random.default_rng(0)
    t = np.arange(40.0)
    n_tissue, n_artery = 995, 5  # 0.5 % of 1000 voxels are the arterial reference
    # Artery: 0 up to frame 6 (t0 = 6 s), 42 % of its peak in frame 7 -> arrival frame 7.
    artery = 350.0 * gamma_variate(t, 6.0, 2.0, 1.5)
    assert artery[6] == 0.0 and artery[7] > 0.3 * artery.max()  # construction check
    tissue = 30.0 * gamma_variate(t, 10.0, 3.0, 2.0)  # arrives 4 s later, 12x weaker
    base = rng.uniform(20.0, 50.0, size=(n_tissue + n_artery, 1))  # unequal baselines
    curves = np.vstack([np.tile(tissue, (n_tissue, 1)), np.tile(artery, (n_artery, 1))])
    curves = base + curves + rng.normal(0.0, 1.0, curves.shape)
    curves = curves[rng.permutation(len(curves))]
    assert cv.bolus_arrival_frame(curves) == 7


def test_bolus_arrival_frame_is_timed_by_the_arteries_not_a_brighter_larger_sinus():
    """A venous sinus peaks higher than partial-volumed arteries (0.6 of the AIF here) and has
    4x their voxels, 5 s later: the reference is the earliest vessels, not the strongest."""
    rng = np.random.default_rng(3)
    t = np.arange(40.0)
    artery = 400.0 * gamma_variate(t, 6.0, 2.0, 1.5)  # arrival frame 7
    vein = 1.1 * np.interp(t - 5.0, t, artery, left=0.0)
    tissue = 30.0 * gamma_variate(t, 8.0, 3.0, 2.0)
    curves = 35.0 + np.vstack([np.tile(tissue, (9500, 1)), np.tile(0.6 * artery, (100, 1)),
                               np.tile(vein, (400, 1))])
    curves += rng.normal(0.0, 1.0, curves.shape)
    assert cv.bolus_arrival_frame(curves, times=t) == 7


def test_bolus_arrival_frame_is_not_timed_by_bone_moving_in():
    """After a head jerk in frame 3, bone (hundreds of HU, brighter than any vessel) stays in a
    few edge voxels; a vessel comes back down, so the arrival is still the artery's (frame 7).
    A bolus cut off by the end of the scan (no vessel back down yet) keeps every voxel."""
    t = np.arange(40.0)
    artery = 350.0 * gamma_variate(t, 6.0, 2.0, 1.5)
    tissue = 30.0 * gamma_variate(t, 10.0, 3.0, 2.0)
    curves = 35.0 + np.vstack([np.tile(tissue, (990, 1)), np.tile(artery, (5, 1)),
                               np.tile(np.where(t >= 3, 600.0, 0.0), (5, 1))])
    assert cv.bolus_arrival_frame(curves) == 7
    assert cv.bolus_arrival_frame(curves[:995, :12]) == 7


def test_bolus_arrival_is_not_timed_by_motion_artefacts_next_to_bone():
    """The head moves 2 mm along the 5 mm slices in frames 10-15, after the arterial bolus
    (frame 7): bone fills the whole slice next to the skull (300 HU, far more voxels than the
    arterial reference holds) and leaves again. Timed by all voxels, the bolus arrives with the
    movement; without those that the motion can fill (``arrival_reference_voxels``), with the
    artery."""
    t = np.arange(40.0)
    shape, spacing = (20, 20, 6), (1.0, 1.0, 5.0)
    unenhanced = np.full(shape, 35.0, np.float32)
    unenhanced[:, :, 0] = 1000.0  # skull below the brain
    brain = np.zeros(shape, bool)
    brain[:, :, 1:] = True
    voxels = np.argwhere(brain)
    curves = np.tile(35.0 + 30.0 * gamma_variate(t, 10.0, 3.0, 2.0), (len(voxels), 1))
    curves[voxels[:, 2] == 1] += np.where((t >= 10) & (t < 16), 300.0, 0.0)
    curves[(voxels[:, 2] == 3) & (voxels[:, 0] < 2) & (voxels[:, 1] < 2)] = \
        35.0 + 150.0 * gamma_variate(t, 6.0, 2.0, 1.5)  # 4 artery voxels
    motion_parameters = np.zeros((t.size, 6))
    motion_parameters[10:16, 5] = 2.0  # mm along the slice axis
    edge = mo.edge_strength(unenhanced, spacing)
    assert cv.bolus_arrival_frame(curves) >= 10  # the artefact sets the reference
    steady = af.arrival_reference_voxels(curves, voxels, spacing, motion_parameters, edge)
    assert not steady[voxels[:, 2] == 1].any() and steady[voxels[:, 2] > 1].all()
    assert cv.bolus_arrival_frame(curves[steady]) == 7
    assert cv.bolus_arrival_frame(curves, eligible=steady) == 7
    # a still head: every voxel times the bolus
    assert af.arrival_reference_voxels(curves, voxels, spacing, None, None).all()


@pytest.mark.parametrize("peak", [10.0, 5000.0])
def test_intensity_scale_brings_non_hu_series_to_a_ct_like_arterial_peak(peak):
    t = np.arange(40.0)
    artery = gamma_variate(t, 6.0, 2.0, 1.5)
    curves = np.vstack([np.tile(0.1 * artery, (95, 1)), np.tile(artery, (5, 1))])
    curves *= peak / artery.max()
    assert cv.intensity_scale(curves, 0.0) == pytest.approx(cv.NOMINAL_PEAK_HU / peak)
    assert cv.intensity_scale(curves * (400.0 / peak), 0.0) == 1.0  # CT range: untouched


def test_intensity_scale_does_not_blow_up_noise_into_a_bolus():
    noise = np.random.default_rng(1).normal(0.0, 1.0, (10_000, 40))
    assert cv.intensity_scale(noise, 1.0) == 1.0  # peak ~5 SD: no bolus, left to be reported


def test_dsc_signal_is_recognised_and_becomes_proportional_to_concentration():
    t = np.arange(40.0)
    conc = np.outer([1.0, 0.05, 0.02], gamma_variate(t, 6.0, 2.0, 1.5))  # artery, two tissues
    signal = 800.0 * np.exp(-1.2 * conc / conc.max())
    assert cv.is_signal_drop(signal, 1.0)
    assert np.allclose(cv.signal_to_concentration(signal), 1.2 * conc / conc.max(), atol=1e-5)
    # CT: the bolus raises HU; bone sliding in and out of edge voxels goes both ways
    ct = 35.0 + 400.0 * conc
    ct[2, 20:] += 700.0
    ct = np.vstack([ct, 35.0 + np.where(t >= 20, -700.0, 0.0) + 700.0])
    assert not cv.is_signal_drop(ct, 1.0)


def test_bolus_arrival_frame_without_arteries_uses_tissue_arrival():
    t = np.arange(30.0)
    tissue = 25.0 * gamma_variate(t, 11.0, 2.0, 2.0)  # frame 11 is 0, frame 12 is 0.39 of peak
    assert tissue[11] == 0.0 and tissue[12] > 0.2 * tissue.max()
    curves = 35.0 + np.tile(tissue, (200, 1))
    assert cv.bolus_arrival_frame(curves) == 12


def test_baseline_is_mean_of_pre_arrival_frames_not_frame_0():
    rng = np.random.default_rng(1)
    base = rng.uniform(-10.0, 60.0, size=(2, 3, 4))
    # Five pre-arrival frames whose deviations average to exactly 0, frame 0 an outlier (+12).
    deviation = np.array([12.0, -3.0, -3.0, -3.0, -3.0, 80.0, 200.0, 150.0])
    curves = (base[..., None] + deviation).astype(np.float32)
    b = cv.baseline(curves, 5)
    assert b.shape == base.shape
    np.testing.assert_allclose(b, base, atol=1e-4)
    assert np.all(np.abs(b - curves[..., 0]) > 11.0)  # frame 0 alone would be 12 HU off


def test_baseline_frame_count_leaves_a_margin_before_arrival():
    t = np.arange(0.0, 30.0)  # 1 s frames
    assert cv.baseline_frame_count(t, 8) == 6  # frames 6 and 7 lie within 2 s of arrival
    assert cv.baseline_frame_count(2.0 * t, 8) == 7  # 2 s frames: only frame 7 does
    assert cv.baseline_frame_count(t, 3) == 3  # margin would leave 1 frame: keep all 3
    with pytest.raises(DataError, match="sub-01"):
        cv.baseline_frame_count(t, 1, source="sub-01")


@pytest.mark.parametrize("arrival", [0, 1])
def test_baseline_needs_two_unenhanced_frames(arrival):
    curves = np.zeros((4, 10), np.float32)
    with pytest.raises(DataError, match="sub-01"):
        cv.baseline(curves, arrival, source="sub-01")


def test_baseline_with_exactly_two_frames():
    curves = np.array([[10.0, 20.0, 300.0, 400.0]], np.float32)
    np.testing.assert_allclose(cv.baseline(curves, 2), [15.0])


# Non-uniform frame times (long gaps before and after the bolus, dense around it).
T_NONUNIFORM = np.array([0.0, 2.0, 4.0, 6.0, 7.0, 8.1, 8.9, 10.0, 10.8, 11.9, 13.1, 13.8, 15.0,
                         16.5, 18.0, 20.5, 23.0, 26.0, 30.0, 35.0, 40.0])


def test_time_to_peak_exact_for_parabola_on_nonuniform_times():
    vertices = np.array([[7.3, 9.55], [11.2, 14.6]])  # any shape (..., T) is accepted
    y = 100.0 - 2.0 * (T_NONUNIFORM - vertices[..., None]) ** 2
    ttp = cv.time_to_peak(T_NONUNIFORM, y)
    assert ttp.shape == vertices.shape
    np.testing.assert_allclose(ttp, vertices, atol=1e-4)


@pytest.mark.parametrize("t0, alpha, beta", [(5.0, 3.0, 1.5), (6.3, 4.0, 1.2), (4.0, 2.5, 2.9)])
def test_time_to_peak_continuous_for_gamma_variate(t0, alpha, beta):
    truth = t0 + alpha * beta  # analytic maximum of the gamma variate
    y = 300.0 * gamma_variate(T_NONUNIFORM, t0, alpha, beta)
    ttp = float(cv.time_to_peak(T_NONUNIFORM, y[None])[0])
    local_dt = np.diff(T_NONUNIFORM)[np.searchsorted(T_NONUNIFORM, truth) - 1]
    assert abs(ttp - truth) < 0.15 < 0.2 * local_dt  # well below the frame interval
    # the refinement really helps: the best frame is further from the truth
    assert abs(T_NONUNIFORM[np.argmax(y)] - truth) > abs(ttp - truth)


def test_time_to_peak_at_the_ends_of_the_scan():
    t = np.arange(10.0)
    assert cv.time_to_peak(t, 2.0 * t)[()] == pytest.approx(9.0)  # still rising at scan end
    assert cv.time_to_peak(t, 50.0 - 2.0 * t)[()] == pytest.approx(0.0)  # max in first frame


def test_uniform_grid():
    g = cv.uniform_grid([0.0, 1.0, 2.0, 3.5, 5.0, 7.0, 10.0])
    np.testing.assert_allclose(g, np.arange(11.0))
    g = cv.uniform_grid([2.5, 3.2, 4.5, 5.5])  # shortest interval 0.7, does not divide 3 s
    np.testing.assert_allclose(g, [2.5, 3.2, 3.9, 4.6, 5.3])
    g = cv.uniform_grid(T_NONUNIFORM)
    assert g[0] == 0.0 and np.allclose(np.diff(g), 0.7)
    assert g[-1] <= 40.0 < g[-1] + 0.7


def test_resample_identity_on_uniform_input():
    rng = np.random.default_rng(2)
    t = np.arange(0.0, 30.0, 1.5)
    y = rng.normal(size=(3, 5, len(t))).astype(np.float32)
    np.testing.assert_array_equal(cv.resample(t, y, t.copy()), y)


def test_resample_exact_on_linear_functions():
    t = T_NONUNIFORM
    slopes, offsets = np.array([[2.0], [-0.5], [0.0]]), np.array([[1.0], [30.0], [7.0]])
    y = slopes * t + offsets
    new = cv.uniform_grid(t)
    out = cv.resample(t, y, new)
    assert out.shape == (3, len(new))
    np.testing.assert_allclose(out, slopes * new + offsets, atol=1e-4)
    # also exact at (and between) the original end points
    ends = np.array([0.0, 0.3, 39.9, 40.0])
    np.testing.assert_allclose(cv.resample(t, y, ends), slopes * ends + offsets, atol=1e-4)


# ====================================================================== mask
HEAD_FOV_MM = (110.0, 96.0, 54.0)
# Nested ellipsoids (semi-axes, mm): scalp outer surface, skull outer, skull inner, brain.
# The third semi-axis exceeds the field of view, so the volume is an axial slab of the head.
SCALP, SKULL_OUT, SKULL_IN, BRAIN = (50.0, 42.0, 70.0), (46.0, 38.0, 66.0), (41.0, 33.0, 61.0), \
    (38.0, 30.0, 58.0)


@lru_cache(maxsize=None)
def synthetic_head(spacing):
    """Time-averaged CT of a head slab: (image, intracranial truth, scalp, gap voxels)."""
    axes = [s * np.arange(-int(f / 2 / s), int(f / 2 / s) + 1) for s, f in zip(spacing, HEAD_FOV_MM)]
    x, y, z = np.meshgrid(*axes, indexing="ij")

    def inside(semi):
        return (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0

    outer, skull_out, skull_in, brain = inside(SCALP), inside(SKULL_OUT), inside(SKULL_IN), \
        inside(BRAIN)
    img = np.full(x.shape, -1000.0, np.float32)  # air
    img[outer] = 40.0  # scalp
    img[skull_out] = 1000.0  # skull shell
    img[skull_in] = 8.0  # CSF rim
    img[brain] = 35.0  # brain
    vessel = ((x - 10.0) ** 2 + (y + 5.0) ** 2 <= 1.5**2) & brain  # bright vessel through slab
    img[vessel] = 120.0
    # One-voxel-wide soft-tissue gap through the skull on the central slice (y == 0, x > 0).
    gap = np.zeros_like(outer)
    zc = int(np.argmin(np.abs(axes[2])))
    gap[:, :, zc] = (np.abs(y[:, :, zc]) < 0.5 * spacing[1]) & (x[:, :, zc] > 0)
    gap &= skull_out & ~skull_in
    img[gap] = 40.0
    return img, skull_in, outer & ~skull_out, gap, vessel


def dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


@lru_cache(maxsize=None)
def head_mask(spacing):
    return mk.brain_mask(synthetic_head(spacing)[0], spacing)


@pytest.mark.parametrize("spacing", [(0.5, 0.6, 3.0), (1.0, 0.9, 1.5)])
def test_brain_mask_matches_intracranial_region(spacing):
    img, truth, scalp, gap, vessel = synthetic_head(spacing)
    assert 1 <= gap.sum() and (img[gap] == 40.0).all()  # the skull really is open
    m = head_mask(spacing)
    assert m.shape == img.shape and m.dtype == bool
    assert dice(m, truth) >= 0.95
    assert not (m & scalp).any()
    assert not (m & gap).any()
    assert m[vessel].all()  # intracranial vessels belong to the mask
    # the slice with the skull gap is not lost (leak through the gap would empty it)
    zc = int(np.argmax(gap.any(axis=(0, 1))))
    assert dice(m[:, :, zc], truth[:, :, zc]) >= 0.95


def test_brain_mask_is_spacing_aware():
    a, b = (0.5, 0.6, 3.0), (1.0, 0.9, 1.5)
    da = dice(head_mask(a), synthetic_head(a)[1])
    db = dice(head_mask(b), synthetic_head(b)[1])
    assert abs(da - db) < 0.01
    # volume in mm^3 agrees with the analytic ellipsoid slab too (within 3 %)
    for s in (a, b):
        vol_mm3 = head_mask(s).sum() * np.prod(s)
        truth_mm3 = synthetic_head(s)[1].sum() * np.prod(s)
        assert vol_mm3 == pytest.approx(truth_mm3, rel=0.03)


def test_brain_mask_with_slices_on_first_axis():
    spacing = (0.5, 0.6, 3.0)
    img = synthetic_head(spacing)[0]
    moved = np.moveaxis(img, 2, 0)
    m = mk.brain_mask(moved, (3.0, 0.5, 0.6), slice_axis=0)
    np.testing.assert_array_equal(m, np.moveaxis(head_mask(spacing), 2, 0))


def test_brain_mask_of_empty_image_is_empty():
    m = mk.brain_mask(np.full((20, 20, 5), -1000.0, np.float32), (1.0, 1.0, 3.0))
    assert m.shape == (20, 20, 5) and not m.any()


def test_slice_axis_from_affine():
    assert mk.slice_axis_from_affine(np.diag([0.5, 0.6, 3.0, 1.0])) == 2
    permuted = np.array([[0.0, 0.5, 0.0, -60.0],
                         [0.0, 0.0, -0.6, 40.0],
                         [3.0, 0.0, 0.0, -20.0],
                         [0.0, 0.0, 0.0, 1.0]])
    assert mk.slice_axis_from_affine(permuted) == 0
    # slices stacked along voxel axis 1 pointing inferior, 15 degrees oblique, 5 mm slices
    tilt = np.deg2rad(15.0)
    axis0 = np.array([np.cos(tilt), 0.0, np.sin(tilt)]) * 0.45
    axis1 = np.array([0.0, np.sin(tilt), -np.cos(tilt)]) * 5.0
    axis2 = np.array([-np.sin(tilt), np.cos(tilt), 0.0]) * 0.45
    aff = np.eye(4)
    aff[:3, :3] = np.column_stack([axis0, axis1, axis2])
    assert mk.slice_axis_from_affine(aff) == 1


# ====================================================================== preprocess
def test_estimate_noise_ignores_slow_bolus():
    rng = np.random.default_rng(3)
    t = np.arange(30.0)
    signal = 30.0 + 25.0 * gamma_variate(t, 6.0, 3.0, 3.0)
    data = (signal + rng.normal(0.0, 10.0, (16, 16, 4, len(t)))).astype(np.float32)
    assert pp.estimate_noise(data) == pytest.approx(10.0, rel=0.10)


def test_estimate_noise_ignores_bone_and_air():
    rng = np.random.default_rng(4)
    data = rng.normal(0.0, 5.0, (20, 20, 3, 25)) + 40.0
    data[:5] += 1000.0 + rng.normal(0.0, 80.0, (5, 20, 3, 25))  # noisy bone outside soft range
    assert pp.estimate_noise(data.astype(np.float32)) == pytest.approx(5.0, rel=0.10)


def test_relative_frame_noise_sees_interpolated_frames():
    """Frames 15+ carry half the noise (as linearly interpolated frames after motion do)."""
    rng = np.random.default_rng(7)
    sd = np.where(np.arange(30) >= 15, 5.0, 10.0)
    curves = (40.0 + rng.normal(0.0, 1.0, (20_000, 30)) * sd).astype(np.float32)
    rel = pp.relative_frame_noise(curves)
    # the series' noise is a median over all frames: ~7 HU here
    np.testing.assert_allclose(rel[2:13] / rel[17:28].mean(), 2.0, rtol=0.08)
    assert np.all(pp.relative_frame_noise(curves[:, :2]) == 1.0)


def test_guide_channels_measure_contrast_amplitude_and_timing():
    """Three uncorrelated channels of unit noise. Of the difference between a bolus and the
    same bolus 5 s later (invisible in a time average) they keep 96 % (in noise units², of all
    frames'); with the timing channel's copy 2 s late 75 %, without that channel 32 %. No
    bolus: the (noise-weighted) time average alone."""
    t = np.arange(0.0, 60.0, 1.5)
    rng = np.random.default_rng(8)
    bolus = gamma_variate(t, 10.0, 3.0, 2.0)
    curves = (35.0 + 20.0 * bolus + rng.normal(0.0, 10.0, (5000, t.size))).astype(np.float32)
    frame_sd = np.full(t.size, 10.0)
    frame_sd[::3] = 5.0  # frames of unequal noise
    w = pp.guide_channels(curves, frame_sd, t)
    assert w.shape == (t.size, 3)
    np.testing.assert_allclose((w * frame_sd[:, None] ** 2).T @ w, np.eye(3), atol=1e-9)
    late = 20.0 * gamma_variate(t, 15.0, 3.0, 2.0) - 20.0 * bolus  # same area, 5 s later
    assert abs(late.mean()) < 0.01 * 20.0 * bolus.max()
    full = np.sum((late / frame_sd) ** 2)  # the squared distance in noise units, all frames
    assert np.sum((late @ w) ** 2) > 0.9 * full
    flat = (35.0 + rng.normal(0.0, 10.0, (5000, t.size))).astype(np.float32)
    w_flat = pp.guide_channels(flat, frame_sd, t)
    inverse_variance = frame_sd**-2 / np.sum(frame_sd**-2)
    np.testing.assert_allclose(w_flat[:, 0] / w_flat[:, 0].sum(), inverse_variance)
    assert w_flat.shape == (t.size, 1)


def test_neighbourhood_scales_with_spacing():
    sigma = 1.2  # mm, neighbourhood radius 2.4 mm
    # lattice points with i^2 + j^2 <= 5.76 (1 mm) and <= 1.44 / 4 = 0.36 (2 mm): 21 and 5
    off1, w1 = pp.neighbourhood((1.0, 1.0, 3.0), sigma)
    off2, w2 = pp.neighbourhood((2.0, 2.0, 3.0), sigma)
    off_fine, _ = pp.neighbourhood((0.5, 0.5, 3.0), sigma)
    assert len(off_fine) > len(off1) == 21 > len(off2) == 5
    for off in (off1, off2, off_fine):  # slice spacing 3 mm > 2 sigma: in-plane only
        assert np.all(off[:, 2] == 0)
    d = np.sqrt(((off1 * [1.0, 1.0, 3.0]) ** 2).sum(axis=1))
    np.testing.assert_allclose(w1, np.exp(-0.5 * (d / sigma) ** 2), rtol=1e-6)
    assert w1[np.all(off1 == 0, axis=1)][0] == pytest.approx(1.0)
    # isotropic 1 mm: through-plane neighbours up to 2 slices; all within 2 sigma
    iso, _ = pp.neighbourhood((1.0, 1.0, 1.0), sigma)
    assert np.abs(iso[:, 2]).max() == 2
    assert np.all((iso**2).sum(axis=1) <= 5.76)
    assert len(iso) == 57  # lattice points of a ball of radius^2 5.76: 1+6+12+8+6+24


def _two_region_series(seed=5, n=24, frames=20, noise=10.0):
    rng = np.random.default_rng(seed)
    t = np.arange(float(frames))
    bolus = 15.0 * gamma_variate(t, 4.0, 3.0, 1.5)
    truth = np.empty((n, n, 4, frames), np.float32)
    truth[: n // 2] = 40.0 + bolus  # region A: time average ~45 HU
    truth[n // 2 :] = 70.0 + bolus  # region B: 30 HU brighter
    data = truth + rng.normal(0.0, noise, truth.shape).astype(np.float32)
    return truth, data


def test_cross_bilateral_smooths_regions_and_preserves_edge():
    truth, data = _two_region_series()
    half = truth.shape[0] // 2
    out = pp.cross_bilateral(data, (1.0, 1.0, 1.0), n_threads=2)
    assert out.shape == data.shape and out.dtype == np.float32
    gauss = ndimage.gaussian_filter(data, sigma=(1.2, 1.2, 1.2, 0.0), truncate=2.0, mode="nearest")
    for region in (slice(3, half - 3), slice(half + 3, 2 * half - 3)):  # away from the edge
        raw_sd = (data[region] - truth[region]).std()
        assert raw_sd == pytest.approx(10.0, rel=0.05)
        assert (out[region] - truth[region]).std() < raw_sd / 2.5
        assert abs((out[region] - truth[region]).mean()) < 0.5  # no bias
    for row in (half - 1, half):  # the voxel rows adjacent to the edge
        bilateral_err = abs(float((out[row] - truth[row]).mean()))
        gauss_err = abs(float((gauss[row] - truth[row]).mean()))
        assert bilateral_err < 2.0
        assert gauss_err > 5.0 and gauss_err > 3 * bilateral_err


def test_cross_bilateral_keeps_curve_shape():
    truth, data = _two_region_series(seed=6)
    out = pp.cross_bilateral(data, (1.0, 1.0, 1.0), noise_sd=10.0)
    # mean curve of region A interior equals the truth curve frame by frame (within 1 HU)
    np.testing.assert_allclose(out[3:9].mean(axis=(0, 1, 2)), truth[5, 5, 0], atol=1.0)


@pytest.mark.parametrize("n_values", [1, 3, 20])
def test_adaptive_average_both_paths_follow_the_definition(n_values, monkeypatch):
    """The offset path (few images) and the tile path (series) compute the same weighted mean:
    weight = spatial Gaussian x exp(-penalty_i |estimate_j - estimate_i|^2), edge values beyond
    the grid. Checked against the definition on anisotropic voxels (the kernel spans 5 slices,
    and x and y cannot be swapped unnoticed), partial tiles at the edges and voxel-dependent
    penalties."""
    rng = np.random.default_rng(3)
    shape, spacing, sigma = (13, 11, 5), (0.8, 1.1, 1.5), 1.6
    estimate = rng.normal(0.0, 1.0, shape + (3,)).astype(np.float32)
    values = rng.normal(0.0, 10.0, shape + (n_values,)).astype(np.float32)
    penalty = rng.uniform(0.1, 2.0, shape).astype(np.float32)
    offsets, spatial = pp.neighbourhood(spacing, sigma)
    assert np.abs(offsets[:, 2]).max() == 2
    radius = np.abs(offsets).max(axis=0)
    pad = [(r, r) for r in radius]
    est_p = np.pad(estimate, pad + [(0, 0)], mode="edge")
    val_p = np.pad(values, pad + [(0, 0)], mode="edge")
    num, den = np.zeros(values.shape), np.zeros(shape)
    for (ox, oy, oz), ws in zip(offsets, spatial):
        sl = tuple(slice(r + o, r + o + n) for r, o, n in zip(radius, (ox, oy, oz), shape))
        w = ws * np.exp(-penalty * ((est_p[sl] - estimate) ** 2).sum(axis=-1))
        num += w[..., None] * val_p[sl]
        den += w
    for guide_channels in (pp.GUIDE_CHANNELS, 0):  # the offset path for n <= 3, then tiles
        monkeypatch.setattr(pp, "GUIDE_CHANNELS", guide_channels)
        out, wsum = pp._adaptive_average(values, estimate, penalty, spacing, sigma, n_threads=2)
        np.testing.assert_allclose(wsum, den, rtol=1e-5)
        np.testing.assert_allclose(out, num / den[..., None], atol=1e-4)


def test_series_pass_leaves_tiles_of_air_alone():
    """The series pass skips tiles that are nothing but air (``unsmoothed``): they keep their
    values, and every other voxel gets exactly the average it gets without the skip."""
    rng = np.random.default_rng(4)
    shape, spacing = (20, 20, 4), (1.0, 1.0, 2.0)
    estimate = rng.normal(0.0, 1.0, shape + (3,)).astype(np.float32)
    values = rng.normal(0.0, 10.0, shape + (20,)).astype(np.float32)
    penalty = np.full(shape, 0.5, np.float32)
    tx, ty, tz = pp.TILE
    tile = np.zeros(shape, bool)
    tile[:tx, :ty, :tz] = True  # one whole tile of air
    air = tile.copy()
    air[tx:tx + ty // 2, :, :] = True  # and parts of tiles: averaged as before
    plain, _ = pp._adaptive_average(values, estimate, penalty, spacing, 2.0, n_threads=1)
    skipped, wsum = pp._adaptive_average(values, estimate, penalty, spacing, 2.0, n_threads=1,
                                         unsmoothed=air)
    np.testing.assert_array_equal(skipped[tile], values[tile])
    np.testing.assert_array_equal(wsum[tile], 1.0)
    np.testing.assert_array_equal(skipped[~tile], plain[~tile])
    assert np.abs(plain[tile] - values[tile]).mean() > 1.0  # without the skip, averaged


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_bilateral_keeps_core_apart_from_penumbra(seed):
    """Same baseline, bolus 4 vs 10 HU (like ischemic core next to penumbra): the plain time
    average differs by only ~1.5 of its per-voxel noise units. A fixed range sigma (the filter
    before adaptive weights) mixed 35 % of the contrast into the rows next to the edge and 10 %
    two to three rows away. At this sigma (4.3 mm), contrast leaked into the rows next to the
    edge / two to three rows in / four to five rows in, and the interior noise:
    plain time average as guide, separation lambda 6: 19-22 / 5-6 / 5-7 %, 0.96-1.01 HU;
    a quarter of the guide matched to the bolus, lambda 6: 11-12 / 8-11 / 7 %, 0.94-0.99 HU;
    plain time average, lambda 9: 22-23 / 2-3 / 3-4 %, 0.69-0.72 HU;
    a quarter matched, lambda 9: 14 / 4 / 4-5 %, 0.69-0.73 HU;
    constant, bolus and delayed-bolus channels (the filter): 8-9 / 2-3 / 2-3 %, 0.72-0.73 HU."""
    rng = np.random.default_rng(seed)
    t = np.arange(40.0)
    bolus = gamma_variate(t, 5.0, 3.0, 2.0)
    truth = np.empty((48, 48, 4, t.size), np.float32)
    truth[:24] = 35.0 + 4.0 * bolus
    truth[24:] = 35.0 + 10.0 * bolus
    out = pp.cross_bilateral(truth + rng.normal(0.0, 10.0, truth.shape).astype(np.float32),
                             (1.0, 1.0, 5.0), noise_sd=10.0)
    contrast = 6.0 * bolus.sum()

    def mixed(rows):  # fraction of the contrast that leaked into these rows, averaged
        return np.mean([abs(float((out[r] - truth[r]).sum(-1).mean())) for r in rows]) / contrast

    assert mixed([23, 24]) < 0.12
    assert mixed([21, 22, 25, 26]) < 0.035
    assert mixed([19, 20, 27, 28]) < 0.04
    interior = out[4:18] - truth[4:18]
    assert interior.std() < 0.8 and abs(interior.mean()) < 0.1  # 10 HU brought to ~0.7 HU


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_bilateral_keeps_delayed_tissue_apart(seed):
    """Same baseline and bolus area, one side's bolus 5 s later (healthy tissue next to
    penumbra of equal CBV): a time average cannot tell them apart, the guide's timing channel
    can. Fraction of the curves' difference that leaked into the rows next to the edge / two to
    three rows in, and the interior noise: time average partly matched to the bolus as guide
    49 / 34 %, 0.72-0.76 HU; the filter 19-22 / 11-15 %, 0.76-0.79 HU."""
    rng = np.random.default_rng(seed)
    t = np.arange(45.0)
    early, late = gamma_variate(t, 5.0, 3.0, 2.0), gamma_variate(t, 10.0, 3.0, 2.0)
    truth = np.empty((48, 48, 4, t.size), np.float32)
    truth[:24] = 35.0 + 8.0 * early
    truth[24:] = 35.0 + 8.0 * late
    out = pp.cross_bilateral(truth + rng.normal(0.0, 10.0, truth.shape).astype(np.float32),
                             (1.0, 1.0, 5.0), noise_sd=10.0, times=t)
    difference = 8.0 * np.abs(early - late).sum()

    def mixed(rows):  # the rows' mean curve error, as a fraction of the difference
        return np.mean([np.abs((out[r] - truth[r]).mean(axis=(0, 1))).sum()
                        for r in rows]) / difference

    assert mixed([23, 24]) < 0.25
    assert mixed([21, 22, 25, 26]) < 0.18
    assert (out[4:18] - truth[4:18]).std() < 0.8


# ====================================================================== aif
T_VESSELS = np.arange(0.0, 50.0)
VESSEL_SHAPE = (30, 30, 4)
ARTERY_CORE = np.array([(i, j, k) for i in (5, 6) for j in (5, 6) for k in (1, 2)])
SINUS = np.array([(i, j, k) for i in range(18, 23) for j in range(18, 23) for k in range(4)])


def _rows(voxels):
    """Rows of ``_vessel_volume``'s enhancement (flat indices in VESSEL_SHAPE) of voxels (n, 3)."""
    return np.ravel_multi_index(tuple(np.asarray(voxels).T), VESSEL_SHAPE)


def _vessel_volume(artery_scale=1.0, vein_scale=1.4, seed=7):
    """Tissue, an artery (centre + half-filled wall) and a venous sinus peaking ~5 s later.

    The artery centre carries ``artery_scale`` x the AIF (partial volume when < 1); the sinus
    carries the VOF scaled to ``vein_scale`` x the AIF's peak (None: the VOF as it is, whose
    area equals the AIF's).
    """
    rng = np.random.default_rng(seed)
    t, shape = T_VESSELS, VESSEL_SHAPE
    vox = np.argwhere(np.ones(shape, bool))
    tissue = tissue_enhancement(t, 50.0, 4.0, 1.0)
    artery, vein = arterial_input(t), venous_output(t)
    if vein_scale is not None:
        vein = vein * (vein_scale * artery.max() / vein.max())
    edge = np.array([(i, j, k) for i in range(4, 8) for j in range(4, 8) for k in (1, 2)
                     if not (i in (5, 6) and j in (5, 6))])
    enh = np.tile(tissue, (len(vox), 1))
    enh[_rows(ARTERY_CORE)] = artery_scale * artery
    enh[_rows(edge)] = 0.5 * artery_scale * artery + 0.5 * tissue  # partial-volumed wall
    enh[_rows(SINUS)] = vein
    enh += rng.normal(0.0, 2.0, enh.shape)
    return enh, vox, artery, vein


def test_aif_after_motion_takes_only_bolus_shaped_voxels(monkeypatch):
    """After a jerk through 5 mm slices at the bolus' arrival, bone smeared by the correction
    into CSF and grey-matter voxels above the skull base formed a cluster 1.7 s after the
    arteries whose median shape passed as a vessel (0.954) but whose brightest voxels, up to
    299 HU against the arteries' 231-257, were steps (shape 0.88-0.92): 16 of them joined
    the AIF, every CBF +70...+154 %. Given the motion, only voxels shaped like a vessel
    (>= 0.97) can join the AIF."""
    enh, vox, artery, _ = _vessel_volume()
    centre = _rows(ARTERY_CORE)
    smear = _rows([(i, j, k) for i in range(12, 16) for j in range(12, 16) for k in (1, 2)])
    arrival = T_VESSELS[artery.argmax()] + 1.0
    step = np.where(T_VESSELS >= arrival, np.where(T_VESSELS < arrival + 13, 1.0, 0.3), 0.0)
    enh[smear] = 0.3 * arterial_input(T_VESSELS - 1.0) + 1.2 * artery.max() * step
    candidates = np.concatenate([centre, smear])
    cluster_of = np.repeat([1, 2], [len(centre), len(smear)])
    shape, _ = af.bolus_shape(T_VESSELS, enh[candidates])
    assert shape[cluster_of == 1].min() >= 0.97 > shape[cluster_of == 2].max()  # construction
    ttp = cv.time_to_peak(T_VESSELS, enh[candidates])
    cluster_ttp = np.array([np.inf, np.median(ttp[:len(centre)]), np.median(ttp[len(centre):])])
    assert cluster_ttp[2] - cluster_ttp[1] < af.EARLY_WINDOW_S  # construction: both early
    clusters = af.VesselClusters(candidates, cluster_of, ttp, shape, enh[candidates].max(axis=1),
                                 np.ones(len(candidates)), cluster_ttp, cluster_ttp)
    motion = np.zeros((len(T_VESSELS), 6))
    motion[T_VESSELS >= arrival, 5] = 2.0
    select = lambda: af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 5.0),  # noqa: E731
                                   clusters=clusters, motion_parameters=motion,
                                   edge=np.zeros(VESSEL_SHAPE, np.float32))
    aif = select()
    assert set(_rows(aif.voxels)) == set(centre)
    assert aif.peak_hu == pytest.approx(artery.max(), rel=0.03)
    monkeypatch.setattr(af, "MIN_VOXEL_SHAPE", 0.0)  # every voxel passes: the smear wins
    assert set(_rows(select().voxels)) <= set(smear)


def test_select_aif_is_not_shut_out_by_a_few_early_weak_voxels():
    """A head jerk on the arterial upslope cut short the rise of a few artery-edge voxels: weak
    (55 % of the artery) and peaking 2.4 s before the arteries. With a 2 s window after the
    earliest cluster they were the AIF; the arteries (and not the vein, 5 s later) are."""
    enh, vox, artery, _ = _vessel_volume()
    early = _rows([(i, j, k) for i in (24, 25) for j in (5, 6) for k in (1, 2)])
    enh[early] = 0.55 * arterial_input(T_VESSELS + 2.4)
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    assert set(_rows(aif.voxels)) <= set(_rows(ARTERY_CORE))
    assert aif.peak_hu == pytest.approx(artery.max(), rel=0.05)


def test_select_aif_picks_artery_centre_not_vein_or_partial_volume():
    t = T_VESSELS
    enh, vox, artery, vein = _vessel_volume()
    vein_delay = cv.time_to_peak(t, vein[None])[0] - cv.time_to_peak(t, artery[None])[0]
    assert 4.0 < vein_delay < 7.0  # construction check: ~5 s later
    core = ARTERY_CORE
    res = af.select_aif(enh, vox, VESSEL_SHAPE, t, (1.0, 1.0, 1.0))
    chosen = {tuple(v) for v in res.voxels}
    assert chosen and chosen <= {tuple(v) for v in core}
    assert res.curve.max() == pytest.approx(artery.max(), rel=0.05)
    assert res.peak_hu == pytest.approx(C.peak_hu, rel=0.05)
    assert res.ttp_s == pytest.approx(C.aif_t0 + C.aif_alpha * C.aif_beta, abs=0.5)
    assert res.fit["r2"] > 0.99
    assert res.fit["t0_s"] == pytest.approx(C.aif_t0, abs=0.5)


def test_aif_ignores_a_few_artery_voxels_far_brighter_than_the_rest():
    """After head motion, artery centres share one peak; two whose bolus came out 35 % higher
    (bone moved in with it) are artefact. Ranked against the brightest they were the whole AIF
    (2 mm motion, 220 HU bolus: 3 voxels 27 % above the arteries, every CBV -39...-51 %). A
    still head keeps the brightest as reference (at 4 mm pixels arteries have few centres)."""
    enh, vox, artery, _ = _vessel_volume()
    bright = ARTERY_CORE[:2]
    enh[_rows(bright)] *= 1.35
    still = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    assert {tuple(v) for v in still.voxels} == {tuple(v) for v in bright}
    motion = np.zeros((len(T_VESSELS), 6))
    motion[T_VESSELS >= 20, 5] = 1.0  # a jerk along the slice axis
    res = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0),
                        motion_parameters=motion, edge=np.zeros(VESSEL_SHAPE, np.float32))
    assert {tuple(v) for v in res.voxels} == {tuple(v) for v in ARTERY_CORE[2:]}
    assert res.curve.max() == pytest.approx(artery.max(), rel=0.03)


@pytest.mark.parametrize("voxel_bar", ["in effect", "passed by none"])
def test_aif_leaves_out_artery_voxels_the_motion_can_fill_with_bone(monkeypatch, voxel_bar):
    """After a jerk, the artery's voxels next to a bright slice keep a step (bone moved in
    through the slab; +130 HU on a 0.45 mm phantom, AIF area 2.3x, MTT -70 %). Given the
    motion, the stepped voxels fail the per-voxel shape bar (MIN_VOXEL_SHAPE); when no voxel
    passes it, an AIF that is not bolus-shaped is taken again from the half of the artery
    centres the displacement reaches least (here 4 voxels instead of 40, from 8 centres)."""
    monkeypatch.setattr(af, "MAX_AIF_VOXELS", 4)
    if voxel_bar == "passed by none":  # the second look must do it alone
        monkeypatch.setattr(af, "MIN_VOXEL_SHAPE", 1.01)
    spacing = (1.0, 1.0, 5.0)
    enh, vox, artery, _ = _vessel_volume()
    clean = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing)
    top = ARTERY_CORE[ARTERY_CORE[:, 2] == 2]
    rows = _rows(top)
    after_jerk = T_VESSELS >= 25
    enh[rows] = 1.02 * enh[rows] + np.where(after_jerk, 0.3 * artery.max(), 0.0)
    baseline = np.full(VESSEL_SHAPE, 35.0, np.float32)
    baseline[:, :, 3] = 0.0  # outside the brain mask
    motion = np.zeros((len(T_VESSELS), 6))
    motion[after_jerk, 5] = 1.0
    area = lambda a: af.gamma_variate_area(a.fit)  # noqa: E731
    fooled = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing)
    assert {tuple(v) for v in fooled.voxels} & {tuple(v) for v in top}  # construction check
    assert fooled.curve[after_jerk].mean() > 1.5 * clean.curve[after_jerk].mean()
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing, motion_parameters=motion,
                        edge=mo.edge_strength(baseline, spacing))
    assert not {tuple(v) for v in aif.voxels} & {tuple(v) for v in top}
    assert np.allclose(aif.curve, clean.curve, atol=3.0)
    assert area(aif) == pytest.approx(area(clean), rel=0.02)
    assert fooled.shape_score < af.MIN_BOLUS_SHAPE <= aif.shape_score  # why it needs either
    # a bolus-shaped AIF is kept as it is, motion or not
    clean_moved = af.select_aif(_vessel_volume()[0], vox, VESSEL_SHAPE, T_VESSELS, spacing,
                                motion_parameters=motion, edge=mo.edge_strength(baseline, spacing))
    assert {tuple(v) for v in clean_moved.voxels} == {tuple(v) for v in clean.voxels}


def test_aif_after_motion_is_taken_where_the_motion_keeps_the_artery():
    """An artery lying within one 5 mm slice loses half its bolus when the head moves 2 mm
    through the slices and is moved back (an independent phantom: 0.59 of it kept, every
    CBF +63...+98 %); one running through the slices keeps all of it. Moved and corrected as
    ``motion.round_trip`` does, the in-plane artery is brighter but the AIF comes from the
    through-plane one, and ``motion.round_trip_at`` gives the round trip voxel by voxel."""
    spacing, shape = (1.0, 1.0, 5.0), (24, 24, 6)
    times = T_VESSELS
    artery = arterial_input(times)
    fraction = np.zeros(shape, np.float32)
    fraction[3:21, 5:7, 2] = 1.0  # in plane, in slice 2 only
    fraction[15:17, 15:17, :] = 0.7  # through the slices
    tissue = tissue_enhancement(times, 50.0, 4.0, 1.0)
    scene = np.full(shape, 35.0, np.float32)
    frames = (scene[..., None] + fraction[..., None] * artery
              + (1.0 - fraction[..., None]) * tissue).astype(np.float32)
    motion = np.zeros((times.size, 6))
    motion[times >= artery.argmax() + 3, 5] = 2.0  # the jerk, on the first pass' way down
    for t in np.flatnonzero(motion[:, 5]):
        frames[..., t] = mo.round_trip(frames[..., t], spacing, motion[t])
    voxels = np.argwhere(np.ones(shape, bool))
    kept = mo.round_trip_at(frames[..., 0], spacing, motion, voxels)
    for t in (0, times.size - 1):
        assert np.allclose(kept[:, t], mo.round_trip(frames[..., 0], spacing,
                                                     motion[t])[tuple(voxels.T)], atol=1e-3)
    rng = np.random.default_rng(3)
    enhancement = (frames - scene[..., None])[tuple(voxels.T)]
    enhancement += rng.normal(0.0, 1.0, enhancement.shape).astype(np.float32)
    in_plane = {tuple(v) for v in np.argwhere(fraction == 1.0)}
    through = {tuple(v) for v in np.argwhere(fraction == 0.7)}
    args = (enhancement, voxels, shape, times, spacing)
    model = {"motion_parameters": motion, "edge": mo.edge_strength(scene, spacing)}
    fooled = af.select_aif(*args, **model)
    assert {tuple(v) for v in fooled.voxels} <= in_plane  # construction check
    after = motion[:, 5] > 0
    assert fooled.curve[after].sum() < 0.6 * artery[after].sum()
    aif = af.select_aif(*args, **model, scene=scene)
    assert {tuple(v) for v in aif.voxels} <= through
    truth = 0.7 * artery + 0.3 * tissue
    assert aif.curve[after].sum() == pytest.approx(truth[after].sum(), rel=0.02)
    assert aif.peak_hu == pytest.approx(truth.max(), rel=0.02)


def test_voxels_the_motion_can_fill_with_bone_join_no_vessel_cluster():
    """Through 5 mm slices, bone moving in and out for 7 frames gave CSF next to the skull
    bolus-like bumps, and those voxels bridged the arteries, sinus and CSF into one cluster
    of 18 866 voxels (independent phantom; the AIF became CSF, every CBF -100 %). Given the
    unenhanced head, voxels whose round trip loss exceeds their peak join no cluster."""
    spacing = (1.0, 1.0, 5.0)
    enh, vox, artery, _ = _vessel_volume()
    scene = np.full(VESSEL_SHAPE, 35.0, np.float32)
    scene[7:18, 7:18, 3] = 1200.0  # bone in the slice above
    bridge = np.array([(i, i, 2) for i in range(8, 18)])  # from the artery's wall to the sinus
    motion = np.zeros((len(T_VESSELS), 6))
    motion[(T_VESSELS >= 37) & (T_VESSELS < 44), 5] = 1.5
    bump = mo.round_trip_at(scene, spacing, motion, bridge) - scene[tuple(bridge.T)][:, None]
    assert bump.max() > 0.5 * artery.max()  # construction: as bright as a vessel
    enh[_rows(bridge)] += bump
    model = {"motion_parameters": motion, "edge": mo.edge_strength(scene, spacing)}

    def clusters_of(found, voxels):
        return set(found.cluster_of[np.isin(found.candidates, _rows(voxels))].tolist())

    merged = af.vessel_clusters(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing, **model)
    assert clusters_of(merged, ARTERY_CORE) == clusters_of(merged, SINUS) == {1}  # construction
    found = af.vessel_clusters(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing, **model, scene=scene)
    assert clusters_of(found, bridge) == {0}
    assert len(clusters_of(found, ARTERY_CORE)) == 1 and 0 not in clusters_of(found, ARTERY_CORE)
    assert clusters_of(found, ARTERY_CORE).isdisjoint(clusters_of(found, SINUS))
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing, clusters=found, **model)
    assert {tuple(v) for v in aif.voxels} <= {tuple(v) for v in ARTERY_CORE}
    assert aif.peak_hu == pytest.approx(artery.max(), rel=0.05)


def test_aif_is_not_a_bone_edge_cluster_the_motion_made_early():
    """After head motion, a CSF voxel pair next to bone can carry a bolus-shaped artefact
    peaking before the arteries (2.5 mm slices, 2 mm motion: a one-voxel AIF in CSF, CBF
    +108 %). Given the motion, a cluster whose expected artefact exceeds its enhancement is
    no vessel, and the artery centre is the AIF again."""
    spacing = (1.0, 1.0, 5.0)
    enh, vox, artery, _ = _vessel_volume()
    pair = np.array([(15, 5, 1), (15, 5, 2)])
    early_bump = 0.5 * arterial_input(T_VESSELS + 3.0)  # 3 s before the artery
    enh[_rows(pair)] = early_bump
    baseline = np.full(VESSEL_SHAPE, 35.0, np.float32)
    baseline[16, 4:7, :] = 1200.0  # bone beside the pair
    motion = np.zeros((len(T_VESSELS), 6))
    motion[:, 5] = np.linspace(0.0, 1.0, len(T_VESSELS))  # 1 mm drift through the slices
    edge = mo.edge_strength(baseline, spacing)
    assert mo.expected_artefact_hu(motion, edge, spacing, pair).min() > early_bump.max()
    fooled = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing)
    assert {tuple(v) for v in fooled.voxels} == {tuple(v) for v in pair}  # construction check
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing, motion_parameters=motion,
                        edge=edge)
    assert {tuple(v) for v in aif.voxels} <= {tuple(v) for v in ARTERY_CORE}
    assert aif.peak_hu == pytest.approx(artery.max(), rel=0.05)


def test_select_vof_picks_sinus_and_scaling_undoes_partial_volume():
    # artery at 60 % (partial volume), sinus carrying the full-area VOF
    enh, vox, artery, vein = _vessel_volume(artery_scale=0.6, vein_scale=None)
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    assert {tuple(v) for v in vof.voxels} <= {tuple(v) for v in SINUS}
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    true_first_pass = C.peak_hu * C.aif_beta * np.exp(C.aif_alpha) * 6.0 / C.aif_alpha**3
    assert af.gamma_variate_area(aif.fit) == pytest.approx(0.6 * true_first_pass, rel=0.03)
    # the VOF is the true AIF (recirculation included) dispersed: the factor is 1/0.6
    assert af.vof_scale_factor(aif, vof) == pytest.approx(1 / 0.6, rel=0.02)


def test_vof_scaling_above_three_is_applied_and_flagged():
    """An AIF keeping a quarter of the arterial area (partial volume after a head jerk): left
    unscaled, every CBF and CBV would be 4x too high; the VOF's factor is used and flagged."""
    t = np.arange(0.0, 60.0, 1.5)
    aif = af.vessel_curve(0.25 * arterial_input(t, C)[None], np.zeros((1, 3), int), [0], t)
    vof = af.vessel_curve(venous_output(t, C)[None], np.zeros((1, 3), int), [0], t)
    factor, transit, flag = af.vof_scaling(aif, vof)
    assert factor == pytest.approx(4.0, rel=0.02) and transit["r2"] > 0.99
    assert "4.0x" in flag and "check" in flag


@pytest.mark.parametrize("recirculation", [0.12, 0.25])
def test_venous_transit_fit_recovers_scale_and_kernel_despite_recirculation(recirculation):
    """VOF = AIF convolved with a unit-area gamma kernel (shape 4, mean 4.8 s); the AIF seen at
    70 % (partial volume), sampled every 1.5 s, noise-free. The scale is the
    partial-volume correction 1/0.7, whatever the recirculation; a ratio of first-pass
    gamma-variate areas is biased by the recirculation the venous first pass overlaps (+2.9 %
    and +6.8 % here)."""
    c = dataclasses.replace(C, recirc_fraction=recirculation, vof_beta=1.2, aif_beta=2.0)
    t = np.arange(0.0, 60.0, 1.5)
    aif = af.vessel_curve(0.7 * arterial_input(t, c)[None], np.zeros((1, 3), int), [0], t)
    vof = af.vessel_curve(venous_output(t, c)[None], np.zeros((1, 3), int), [0], t)
    fit = af.venous_transit_fit(aif, vof)
    assert fit["scale"] == pytest.approx(1 / 0.7, rel=0.01)
    assert fit["shape"] == pytest.approx(c.vof_alpha + 1, rel=0.05)
    assert fit["mean_transit_s"] == pytest.approx(c.vof_mean_transit, rel=0.03)
    assert fit["r2"] > 0.999
    assert af.vof_scale_factor(aif, vof) == pytest.approx(1 / 0.7, rel=0.01)
    first_pass_ratio = af.gamma_variate_area(vof.fit) / af.gamma_variate_area(aif.fit)
    assert abs(first_pass_ratio * 0.7 - 1) > 0.015  # what the scaling used before


def test_vof_ignores_sinus_voxels_whose_tail_moved_with_bone():
    """Head motion slides bone into part of the sinus late in the scan: those voxels have the
    largest areas, but their tails leave the sinus' common level, so the VOF (and the AIF
    scale) stays that of the clean sinus voxels."""
    enh, vox, artery, vein = _vessel_volume(artery_scale=0.6, vein_scale=None)
    clean_scale = af.vof_scale_factor(
        af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0)),
        af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0)))
    rim = _rows(SINUS[SINUS[:, 0] == 18])
    enh[rim] += np.where(T_VESSELS >= 30, 0.3 * vein.max(), 0.0)  # a bone plateau after a jerk
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    assert not {tuple(v) for v in vof.voxels} & {tuple(v) for v in SINUS[SINUS[:, 0] == 18]}
    assert af.vof_scale_factor(aif, vof) == pytest.approx(clean_scale, rel=0.02)


def test_vof_ignores_a_few_sinus_voxels_far_brighter_than_the_rest():
    """Full-volume sinus voxels share one first-pass area; two whose whole bolus came out 40 %
    larger (bone moved across them with the bolus) are artefact, not the sinus' true level.
    Ranked against the brightest voxel they were the whole VOF (2.5 mm slices, 2 mm motion:
    scale 1.49, every CBF -28...-40 %); the VOF keeps to the sinus' common plateau."""
    enh, vox, artery, vein = _vessel_volume(artery_scale=0.6, vein_scale=None)
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    clean_scale = af.vof_scale_factor(
        aif, af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0)))
    bright = SINUS[:2]
    enh[_rows(bright)] *= 1.4
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    assert not {tuple(v) for v in vof.voxels} & {tuple(v) for v in bright}
    assert len(vof.voxels) > 10
    assert af.vof_scale_factor(aif, vof) == pytest.approx(clean_scale, rel=0.02)


def test_vof_keeps_away_from_bone():
    """Half of a sinus running along the skull (slices 2-3 of 5 mm, bone beside it in slice 3):
    motion correction's interpolation across thick slices adds bone HU to those voxels' whole
    curves, growing with the displacement. Half the sinus shares that tail, so the tail test
    cannot single it out, and it has the largest areas; still vessel-shaped (0.978), so the
    shape test cannot either. Given the unenhanced image, the VOF comes from the half of the
    sinus farthest from bone. Measured AIF scale (clean 1.67): 1.90 fooled."""
    spacing = (1.0, 1.0, 5.0)
    enh, vox, artery, vein = _vessel_volume(artery_scale=0.6, vein_scale=None)
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing)
    clean_scale = af.vof_scale_factor(aif, af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS,
                                                         spacing))
    near_bone = SINUS[SINUS[:, 2] >= 2]
    ramp = 0.08 * vein.max() * np.clip(T_VESSELS / 30.0, 0.0, 1.0)
    enh[_rows(near_bone)] += ramp
    fooled = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing)
    assert abs(af.vof_scale_factor(aif, fooled) / clean_scale - 1) > 0.08
    baseline = np.full(VESSEL_SHAPE, 35.0, np.float32)
    baseline[15:26, 15:26, 3] = 1200.0  # bone beside the sinus in slice 3
    baseline[18:23, 18:23, 3] = 40.0
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing, baseline=baseline)
    assert not {tuple(v) for v in vof.voxels} & {tuple(v) for v in near_bone}
    assert af.vof_scale_factor(aif, vof) == pytest.approx(clean_scale, rel=0.02)


def test_vof_leaves_out_sinus_voxels_the_motion_can_fill_with_bone():
    """Between two jerks a bone plateau stays in the rim voxels of the sinus, next to the
    brain mask's edge (no bone > 250 HU inside the mask to keep away from). Ranked by area
    they were chosen alone (a 2 mm motion phantom: 4 voxels, VOF area +26 %, CBF -30 %);
    given the motion, the VOF keeps to the half of the sinus the displacement reaches least."""
    spacing = (1.0, 1.0, 5.0)
    enh, vox, artery, vein = _vessel_volume(artery_scale=0.6, vein_scale=None)
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing)
    clean_scale = af.vof_scale_factor(aif, af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS,
                                                         spacing))
    rim = SINUS[SINUS[:, 0] == 18]  # a fifth of the sinus: more than its top tenth
    between_jerks = (T_VESSELS >= 20) & (T_VESSELS < 34)
    enh[_rows(rim)] += np.where(between_jerks, 0.3 * vein.max(), 0.0)
    baseline = np.full(VESSEL_SHAPE, 35.0, np.float32)
    baseline[:18] = 0.0  # outside the brain mask
    motion = np.zeros((len(T_VESSELS), 6))
    motion[between_jerks, 5] = 1.0  # 1 mm along the slice axis
    fooled = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing, baseline=baseline)
    assert {tuple(v) for v in fooled.voxels} <= {tuple(v) for v in rim}  # construction check
    assert af.vof_scale_factor(aif, fooled) / clean_scale - 1 > 0.08
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing, baseline=baseline,
                        motion_parameters=motion, edge=mo.edge_strength(baseline, spacing))
    assert not {tuple(v) for v in vof.voxels} & {tuple(v) for v in rim}
    assert af.vof_scale_factor(aif, vof) == pytest.approx(clean_scale, rel=0.02)


@pytest.mark.parametrize("garbage_shape", [0.96, 0.99])
def test_vof_cluster_is_the_largest_late_vessel_like_one(garbage_shape):
    """A late cluster larger than the sinus whose curves look less like a bolus (shape 0.96 <
    0.97: steps that through-plane motion made) is passed over; one that looks as much like a
    vessel is not (the cluster with the most late, vessel-shaped voxels wins)."""
    enh, vox, _, _ = _vessel_volume()
    artery, sinus = _rows(ARTERY_CORE), _rows(SINUS)
    garbage = _rows([(i, j, k) for i in range(2, 14) for j in range(20, 28) for k in range(4)])
    candidates = np.concatenate([artery, sinus, garbage])
    cluster_of = np.repeat([1, 2, 3], [len(artery), len(sinus), len(garbage)])
    ttp = np.array([np.inf, 10.0, 16.0, 16.0])
    shape = np.array([0.0, 0.99, 0.99, garbage_shape])
    clusters = af.VesselClusters(candidates, cluster_of, ttp[cluster_of], shape[cluster_of],
                                 enh[candidates].max(axis=1), np.ones(len(candidates)), ttp, ttp)
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0), clusters=clusters)
    chosen = set(_rows(vof.voxels))
    assert chosen <= set(sinus if garbage_shape < af.MIN_VOXEL_SHAPE else garbage)


def test_vof_cluster_is_the_sinus_even_when_merged_with_a_moving_rim():
    """After head motion the sinus' cluster can take in a larger rim of CSF voxels whose
    curves the motion bent (shape 0.95): its median shape falls below 0.97. It still has the
    most late, vessel-shaped voxels, and a few clean-looking voxels elsewhere do not beat it
    (a phantom with 2 mm motion: 42 CSF voxels had become the VOF, at half the sinus' peak)."""
    enh, vox, _, _ = _vessel_volume()
    artery, sinus = _rows(ARTERY_CORE), _rows(SINUS)
    rim = _rows([(i, j, k) for i in range(2, 14) for j in range(20, 28) for k in range(4)])
    few = _rows([(i, 2, 0) for i in range(2, 8)])
    candidates = np.concatenate([artery, sinus, rim, few])
    cluster_of = np.repeat([1, 2, 2, 3], [len(artery), len(sinus), len(rim), len(few)])
    shape = np.repeat([0.99, 0.99, 0.95, 0.975], [len(artery), len(sinus), len(rim), len(few)])
    ttp = np.where(cluster_of == 1, 10.0, 16.0)
    assert len(rim) > len(sinus)  # construction: the merged cluster's median shape is 0.95
    cluster_ttp = np.array([np.inf, 10.0, 16.0, 16.0])
    clusters = af.VesselClusters(candidates, cluster_of, ttp, shape, enh[candidates].max(axis=1),
                                 np.ones(len(candidates)), cluster_ttp, cluster_ttp)
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0), clusters=clusters)
    chosen = set(_rows(vof.voxels))
    assert chosen <= set(sinus) | set(rim) and not chosen <= set(few)


def test_vof_found_when_the_sinus_merges_with_bent_curves():
    """Head motion can bend the curves of the CSF and cortex around a sinus into bright steps
    (bone slid in between two jerks). Joined to the sinus they made a cluster of median shape
    below 0.95, which counted as no vessel at all (2 mm pixels, 1 mm motion: the VOF was one
    CSF voxel, every CBF +7...+33 %). The VOF now takes the late, vessel-shaped voxels of the
    cluster holding most of them."""
    enh, vox, _, vein = _vessel_volume(artery_scale=0.7, vein_scale=None)
    spacing = (1.0, 1.0, 1.0)
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing)
    clean = af.vof_scale_factor(aif, af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing))
    assert clean == pytest.approx(1 / 0.7, rel=0.03)  # construction check
    sinus = {tuple(v) for v in SINUS}
    rim = np.array([(i, j, k) for i in range(12, 28) for j in range(12, 28) for k in range(4)
                    if (i, j, k) not in sinus])
    assert len(rim) > 2 * len(SINUS)  # the merged cluster's median voxel is a step
    step = np.where((T_VESSELS >= 16) & (T_VESSELS < 34), 0.8 * vein.max(), 0.0)
    enh[_rows(rim)] = step
    cosine, _ = af.bolus_shape(T_VESSELS, step[None])
    assert cosine[0] < af.MIN_BOLUS_SHAPE  # construction check: a step is no bolus
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, spacing)
    assert vof is not None and {tuple(v) for v in vof.voxels} <= sinus
    assert af.vof_scale_factor(aif, vof) == pytest.approx(clean, rel=0.02)


def test_vof_scaling_never_shrinks_the_aif_and_needs_a_vof():
    enh, vox, _, _ = _vessel_volume(artery_scale=1.0, vein_scale=0.3)  # partial-volumed sinus
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    assert af.gamma_variate_area(vof.fit) < af.gamma_variate_area(aif.fit)
    assert af.vof_scale_factor(aif, vof) == 1.0
    assert af.vof_scale_factor(aif, None) == 1.0
    # and the user is told: a VOF with less area than the AIF is no full-volume sinus
    factor, transit, problem = af.vof_scaling(aif, vof)
    assert transit["scale"] == pytest.approx(0.45, abs=0.05)  # a peak of 0.3x, but wider
    assert problem.startswith(f"VOF: its area is only {transit['scale']:.2f}x the AIF's")
    clean = af.select_vof(*_vessel_volume(artery_scale=1.0, vein_scale=None)[:2], VESSEL_SHAPE,
                          T_VESSELS, (1.0, 1.0, 1.0))
    assert af.vof_scaling(aif, clean)[2] is None


@pytest.mark.parametrize("times", [np.arange(0.0, 40.0), T_NONUNIFORM])
def test_fit_gamma_variate_recovers_parameters(times):
    amplitude, t0, alpha, beta = 300.0, 6.3, 4.0, 1.2
    curve = af.gamma_variate(times, amplitude, t0, alpha, beta)
    fit = af.fit_gamma_variate(times, curve)
    assert fit["amplitude_hu"] == pytest.approx(amplitude, rel=0.05)
    assert fit["t0_s"] == pytest.approx(t0, rel=0.05)
    assert fit["alpha"] == pytest.approx(alpha, rel=0.05)
    assert fit["beta_s"] == pytest.approx(beta, rel=0.05)
    assert fit["r2"] > 0.99


def test_gamma_variate_matches_phantom_definition():
    t = np.linspace(0.0, 40.0, 401)
    np.testing.assert_allclose(af.gamma_variate(t, 2.0, 8.0, 3.0, 1.5),
                               2.0 * gamma_variate(t, 8.0, 3.0, 1.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", [0.0, -5.0])
def test_select_aif_without_enhancement_raises(level):
    shape = (6, 6, 2)
    vox = np.argwhere(np.ones(shape, bool))
    enh = np.full((len(vox), 20), level)
    with pytest.raises(DataError, match="sub-02"):
        af.select_aif(enh, vox, shape, np.arange(20.0), (1.0, 1.0, 1.0), source="sub-02")


# ====================================================================== deconvolution
def test_convolution_matrix_approximates_discrete_convolution():
    dt = 0.5
    t = np.arange(0.0, 60.0, dt)
    aif = arterial_input(t)
    k = 0.01 * np.exp(-t / 4.0)
    expected = np.convolve(aif, k)[: len(t)] * dt
    lower = dc.convolution_matrix(aif, dt, circulant=False)
    assert lower.shape == (len(t), len(t))
    assert np.all(np.triu(lower, 1) == 0.0)  # causal
    np.testing.assert_allclose(lower @ k, expected, atol=0.01 * expected.max())
    circ = dc.convolution_matrix(aif, dt, circulant=True)
    assert circ.shape == (2 * len(t), 2 * len(t))
    np.testing.assert_allclose(circ[: len(t), : len(t)], lower)  # no wrap for positive lags
    padded = circ @ np.concatenate([k, np.zeros_like(k)])
    np.testing.assert_allclose(padded[: len(t)], lower @ k, rtol=1e-12)


# (cbf mL/100g/min, cbv mL/100g, delay s) with MTT = 60 cbv/cbf from 3 to 12 s
FIT_SETS = [(60.0, 3.0, 0.0), (50.0, 4.0, -1.0), (30.0, 3.0, 3.0), (20.0, 4.0, 1.5),
            (80.0, 5.0, 3.0), (40.0, 6.0, -1.0), (25.0, 5.0, 0.0)]
FRAME_TIMES = {
    "uniform_1s": np.arange(0.0, 60.0),
    "nonuniform": np.r_[0.0:6.0:2.0, 6.0:31.0:1.0, 32.0:47.0:2.0, 49.0:62.0:3.0],
}


def _fit(times, tissue):
    aif = arterial_input(times)
    flow, delay, mtt = dc.fit_model(tissue, times, times, aif)
    maps = mp.perfusion_maps(flow, flow * mtt, delay, np.zeros_like(delay))
    return maps, delay


@pytest.mark.parametrize("sampling", sorted(FRAME_TIMES))
def test_fit_model_recovers_phantom_truth_noise_free(sampling):
    times = FRAME_TIMES[sampling]
    cbf, cbv, delay = (np.array(v) for v in zip(*FIT_SETS))
    maps, fitted_delay = _fit(times, tissue_enhancement(times, cbf, cbv, delay))
    np.testing.assert_allclose(maps["cbf"], cbf, rtol=0.05)
    np.testing.assert_allclose(maps["mtt"], 60.0 * cbv / cbf, rtol=0.05)
    np.testing.assert_allclose(maps["cbv"], cbv, rtol=0.05)
    np.testing.assert_allclose(fitted_delay, delay, atol=0.25)


def test_fit_model_with_noise_medians():
    rng = np.random.default_rng(8)
    times = FRAME_TIMES["uniform_1s"]
    for cbf, cbv, delay in FIT_SETS:
        clean = tissue_enhancement(times, cbf, cbv, delay)
        noisy = clean + rng.normal(0.0, 1.0, (200, len(times)))
        maps, fitted_delay = _fit(times, noisy)
        assert np.median(maps["cbf"]) == pytest.approx(cbf, rel=0.10)
        assert np.median(maps["mtt"]) == pytest.approx(60.0 * cbv / cbf, rel=0.10)
        assert np.median(fitted_delay) == pytest.approx(delay, abs=0.5)


def test_fit_model_takes_each_voxels_baseline_level_as_an_unknown():
    """The baseline subtracted before the fit is the mean of a few noisy frames, so its error
    shifts the whole curve (a long, late, low curve like the ischemic core's reads it as a
    tail). Fitted as one more unknown, that shift changes nothing noise-free and leaves CBV
    unbiased and less spread than when the subtracted baseline is taken as exact."""
    times = FRAME_TIMES["uniform_1s"]
    aif = arterial_input(times)
    clean = tissue_enhancement(times, 10.0, 1.5, 4.0)  # MTT 9 s, 4 s late
    exact = dc.fit_model(clean[None], times, times, aif)
    for weights in (None, np.ones((1, len(times)), np.float32)):
        shifted = dc.fit_model(clean[None] + 0.5, times, times, aif, weights=weights)
        np.testing.assert_allclose(shifted, exact, rtol=2e-3)
    tilted = dc.fit_model(clean[None] + 0.5, times, times, aif, baseline_offset=False)
    assert tilted[0] * tilted[2] > 1.2 * exact[0] * exact[2]  # CBV, were the shift taken as tissue

    rng = np.random.default_rng(5)
    noisy = clean + rng.normal(0.0, 0.5, (2000, len(times)))  # noise left after smoothing
    noisy -= noisy[:, :7].mean(axis=1, keepdims=True)  # the baseline: frames before arrival
    cbv = {}
    for offset in (True, False):
        flow, _, mtt = dc.fit_model(noisy, times, times, aif, baseline_offset=offset)
        cbv[offset] = mp.perfusion_maps(flow, flow * mtt, mtt, mtt)["cbv"]
    assert np.median(cbv[True]) == pytest.approx(1.5, rel=0.03)
    assert np.std(cbv[True]) < 0.85 * np.std(cbv[False])  # measured 0.75


def test_csvd_is_delay_insensitive_ssvd_is_not():
    times = np.arange(0.0, 70.0)
    aif = arterial_input(times)
    delays = np.array([-2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0])
    tissue = tissue_enhancement(times, 50.0, 4.0, delays)
    csvd, csvd_tmax, _ = dc.deconvolve(tissue, aif, 1.0, "csvd")
    ssvd, _, _ = dc.deconvolve(tissue, aif, 1.0, "ssvd")
    at = {d: i for i, d in enumerate(delays)}
    assert csvd[at[4.0]] == pytest.approx(csvd[at[0.0]], rel=0.03)
    assert csvd.max() / csvd.min() - 1.0 < 0.03  # over every delay, even negative
    # the circulant k moves with the tracer delay (Tmax differences = delay differences)
    np.testing.assert_allclose(csvd_tmax - csvd_tmax[at[0.0]], delays, atol=0.1)
    assert ssvd[at[4.0]] < ssvd[at[0.0]]  # later tissue, lower sSVD flow
    assert ssvd.max() / ssvd.min() - 1.0 > 0.10  # sSVD flow depends on the delay
    assert abs(ssvd[at[-2.0]] / ssvd[at[0.0]] - 1.0) > 0.10  # tissue before AIF: acausal


def test_svd_underestimates_gm_cbf_but_keeps_cbv():
    """Documented bias of truncated SVD (README): CBF of GM-like tissue low even noise-free."""
    times = np.arange(0.0, 70.0)
    tissue = tissue_enhancement(times, 60.0, 4.0, 1.0)[None]
    flow, _, area = dc.deconvolve(tissue, arterial_input(times), 1.0, "csvd")
    maps = mp.perfusion_maps(flow, area, 0.0, 0.0)
    assert maps["cbf"][0] < 0.9 * 60.0
    assert maps["cbf"][0] > 0.3 * 60.0
    assert maps["cbv"][0] == pytest.approx(4.0, rel=0.05)  # area of k is preserved


def test_deconvolve_rejects_unknown_method():
    with pytest.raises(ValueError, match="nlr"):
        dc.deconvolve(np.zeros((1, 10)), np.ones(10), 1.0, "nlr")


def test_ssvd_tmax_not_negative_for_zero_delay():
    times = np.arange(0.0, 60.0)
    aif = arterial_input(times)
    _, tmax, _ = dc.deconvolve(0.01 * aif[None], aif, 1.0, "ssvd")  # tissue timed like the AIF
    assert tmax[0] >= 0.0


# ====================================================================== maps
def test_perfusion_maps_units():
    flow = np.array([HCT * 60.0 / 6000.0])
    area = np.array([HCT * 0.04])
    maps = mp.perfusion_maps(flow, area, [2.5], [14.0])
    assert maps["cbf"][0] == pytest.approx(60.0, rel=1e-5)
    assert maps["cbv"][0] == pytest.approx(4.0, rel=1e-5)
    assert maps["mtt"][0] == pytest.approx(4.0, rel=1e-5)
    assert maps["tmax"][0] == pytest.approx(2.5) and maps["ttp"][0] == pytest.approx(14.0)
    assert all(v.dtype == np.float32 for v in maps.values())
    assert set(maps) == set(mp.UNITS)


def test_perfusion_maps_custom_density_and_kh():
    flow, area = np.array([0.01]), np.array([0.05])
    maps = mp.perfusion_maps(flow, area, 0.0, 0.0, density=1.0, kh=0.5)
    assert maps["cbf"][0] == pytest.approx(0.01 * 0.5 * 6000.0, rel=1e-5)  # 30
    assert maps["cbv"][0] == pytest.approx(0.05 * 0.5 * 100.0, rel=1e-5)  # 2.5
    assert maps["mtt"][0] == pytest.approx(5.0, rel=1e-5)  # MTT independent of scale


def test_perfusion_maps_negative_values_become_zero():
    flow = np.array([[-0.01, 0.01], [0.0, 0.02]])
    area = np.array([[0.05, -0.02], [0.0, 0.08]])
    maps = mp.perfusion_maps(flow, area, np.zeros((2, 2)), np.zeros((2, 2)))
    assert maps["cbf"].shape == (2, 2)
    scale = C.kh / C.density * 100.0
    np.testing.assert_allclose(maps["cbf"], [[0.0, 0.01 * scale * 60], [0.0, 0.02 * scale * 60]],
                               rtol=1e-5)
    np.testing.assert_allclose(maps["cbv"], [[0.05 * scale, 0.0], [0.0, 0.08 * scale]], rtol=1e-5)
    np.testing.assert_allclose(maps["mtt"], [[0.0, 0.0], [0.0, 4.0]], rtol=1e-5)


def test_bolus_truncated_when_tissue_still_rises_at_the_end():
    t = np.arange(0.0, 60.0)
    complete = tissue_enhancement(t, 60.0, 4.0, 1.0)
    assert not cv.bolus_truncated(complete)
    assert cv.bolus_truncated(complete[:14])  # scan stopped before the tissue peak (~16 s)


def test_vessel_problems_name_each_failure():
    enh, vox, _, _ = _vessel_volume()
    aif = af.select_aif(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    vof = af.select_vof(enh, vox, VESSEL_SHAPE, T_VESSELS, (1.0, 1.0, 1.0))
    assert af.vessel_problems(aif, vof) == []
    assert any(p.startswith("VOF: none found") for p in af.vessel_problems(aif, None))
    weak = af.vessel_curve(0.2 * enh, vox, np.flatnonzero(np.isin(_rows(vox), _rows(ARTERY_CORE))),
                              T_VESSELS)
    assert any("low arterial signal" in p for p in af.vessel_problems(weak, vof))
    # a VOF with 4x the AIF's area is used (unscaled, every CBF would be 4x), and flagged
    huge = af.vessel_curve(4.0 * enh, vox, np.flatnonzero(np.isin(_rows(vox), _rows(ARTERY_CORE))),
                              T_VESSELS)
    assert any("check it" in p for p in af.vessel_problems(aif, huge))
    assert af.vof_scale_factor(aif, huge) == pytest.approx(4.0, rel=0.02)


def test_aif_ending_below_its_baseline_is_flagged():
    """A head jerk after the bolus can leave the AIF's voxels 10-20 HU lower for the rest of
    the scan; arterial blood keeps contrast, so a tail below the baseline is flagged. 3 HU
    per frame (about 25 voxels at 15 HU), 2 s sampling, 300 noise draws each: measured 0.7 %
    false flags without the step and 92 % flagged with a 10 HU one (3 % of the peak)."""
    t = np.arange(0.0, 60.0, 2.0)
    rng = np.random.default_rng(0)

    def flagged(step_hu):
        curve = arterial_input(t) + rng.normal(0.0, 3.0, t.size)
        curve[12:] -= step_hu  # from 24 s, after the first pass
        aif = af.VesselCurve(curve=(curve - curve[:3].mean()).astype(np.float32),
                             voxels=np.zeros((1, 3), int), peak_hu=float(curve.max()),
                             ttp_s=14.0, fit={"r2": 0.99}, shape_score=0.99, times=t)
        return any("below its baseline" in p for p in af.aif_problems(aif))

    assert np.mean([flagged(0.0) for _ in range(300)]) <= 0.03
    assert np.mean([flagged(10.0) for _ in range(300)]) >= 0.85
    deficit, z = af.tail_deficit(t, arterial_input(t) - np.where(t >= 24.0, 10.0, 0.0))
    assert deficit == pytest.approx((10.0 - arterial_input(t)[t >= 42.0].mean())
                                    / arterial_input(t).max(), rel=1e-6)


def _residual_noise(noise, spacing, sigma):
    w = pp.neighbourhood(spacing, sigma)[1].astype(float)
    return noise / np.sqrt(w.sum() ** 2 / (w ** 2).sum())


def test_smoothing_sigma_reaches_the_target_and_the_ceiling_beyond_the_bound():
    """0.5 HU within 1-4.5 mm where that is enough (1 mm pixels at 10 HU: 4.3 mm); where
    4.5 mm would leave more than 0.6 HU (2.5 mm pixels: 1.2 HU), the sigma reaching 0.6 HU."""
    fine = pp.smoothing_sigma(10.29, (1.0, 1.0, 5.0))
    assert 4.0 < fine < pp.SIGMA_RANGE_MM[1]
    assert _residual_noise(10.29, (1.0, 1.0, 5.0), fine) == pytest.approx(pp.TARGET_NOISE_HU, rel=0.02)
    coarse = (2.5, 2.5, 5.0)
    assert _residual_noise(10.29, coarse, pp.SIGMA_RANGE_MM[1]) > 1.2  # measured 1.24 HU
    sigma = pp.smoothing_sigma(10.29, coarse)
    assert 6.5 < sigma < pp.SIGMA_LIMIT_MM  # measured 7.2 mm
    assert _residual_noise(10.29, coarse, sigma) == pytest.approx(pp.MAX_NOISE_HU, rel=0.05)


def _correlated_noise(shape, blur_px, sd, seed=0):
    """Gaussian noise blurred in-plane by ``blur_px`` (as a reconstruction kernel does), SD
    ``sd``; neighbour correlation exp(-1 / (4 blur_px²)) along x and y, none along z."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    noise = ndimage.gaussian_filter(noise, (blur_px, blur_px) + (0,) * (len(shape) - 2))
    return (noise * sd / noise.std()).astype(np.float32)


def test_noise_correlation_is_measured_along_each_axis():
    shape = (64, 64, 6, 8)
    white = 40.0 + _correlated_noise(shape, 0.0, 10.0)
    assert pp.noise_correlation(white) == (0.0, 0.0, 0.0)
    blurred = 40.0 + _correlated_noise(shape, 0.7, 10.0)
    rho_x, rho_y, rho_z = pp.noise_correlation(blurred)
    expected = np.exp(-1.0 / (4 * 0.7**2))  # 0.60
    assert rho_x == pytest.approx(expected, abs=0.04)
    assert rho_y == pytest.approx(expected, abs=0.04)
    assert rho_z == 0.0


def test_effective_voxels_of_correlated_noise_match_a_measured_average():
    """The neighbourhood mean of kernel-correlated noise keeps the variance the formula says
    (white noise's n_eff would claim 3 times too many independent voxels here). One thick
    slice, so the neighbourhood is in-plane."""
    spacing, sigma = (1.0, 1.0, 20.0), 4.0
    noise = _correlated_noise((200, 200, 1), 0.7, 1.0, seed=1)
    rho = pp.noise_correlation(np.repeat(noise[..., None], 4, axis=3) +
                               _correlated_noise((200, 200, 1, 4), 0.7, 1e-3, seed=2))
    offsets, w = pp.neighbourhood(spacing, sigma)
    kernel = np.zeros((2 * offsets[:, 0].max() + 1, 2 * offsets[:, 1].max() + 1))
    kernel[offsets[:, 0] + offsets[:, 0].max(), offsets[:, 1] + offsets[:, 1].max()] = w
    mean = ndimage.convolve(noise[..., 0], kernel / kernel.sum(), mode="wrap")
    measured = noise.var() / mean.var()
    white = pp.effective_voxels(spacing, sigma)
    assert white == pytest.approx(w.sum() ** 2 / (w.astype(float) ** 2).sum())
    assert pp.effective_voxels(spacing, sigma, rho) == pytest.approx(measured, rel=0.15)
    assert white > 2.5 * measured


def test_smoothing_of_correlated_noise_is_sized_and_weighted_for_it():
    """10 HU of noise correlated by the reconstruction kernel (neighbour correlation 0.58), one
    thick slice: sized for white noise, the sigma (5.4 mm) leaves 1.4 HU even as a plain
    Gaussian, and the adaptive weights, taking the correlated noise for structure, keep 2.3 HU.
    Sized and weighted for the measured correlation, the sigma reaches the 10 mm limit, where a
    plain Gaussian leaves 0.77 HU and the filter 0.67 HU (on the phantom: core CBF +16.6 ->
    +3.9 %)."""
    spacing = (1.0, 1.0, 20.0)
    data = 40.0 + _correlated_noise((96, 96, 1, 10), 0.7, 10.0, seed=3)
    rho = pp.noise_correlation(data)
    assert min(rho[:2]) > 0.5
    assert pp.smoothing_sigma(10.0, spacing, rho) == pytest.approx(pp.SIGMA_LIMIT_MM)
    left = {}
    for name, corr in (("white", (0.0, 0.0, 0.0)), ("measured", rho)):
        out = pp.cross_bilateral(data, spacing, noise_sd=10.0, correlation=corr)
        inner = out[24:-24, 24:-24]
        left[name] = float((inner - inner.mean(axis=(0, 1, 2))).std())
    plain = 10.0 / np.sqrt(pp.effective_voxels(spacing, pp.SIGMA_LIMIT_MM, rho))
    assert left["white"] > 2.0
    assert left["measured"] < plain < 0.8


def test_vessel_voxels_fall_back_to_the_strongest_when_none_lies_near_the_reference():
    """A reference with nothing in its band (a negative one, say) must not leave the vessel
    empty: on a moving 4 mm-pixel scan the VOF had 0 voxels, a NaN curve and the run crashed
    writing its sidecar. The strongest voxels are taken instead."""
    chosen = af._strongest(np.arange(4), np.array([-5.0, -4.0, -3.0, 2.0]), reference=-4.0)
    assert chosen.tolist() == [3]
    chosen = af._strongest(np.arange(3), np.array([10.0, 9.0, 1.0]), reference=9.5)
    assert chosen.tolist() == [0, 1]
