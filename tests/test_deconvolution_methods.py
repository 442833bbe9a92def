"""Known-answer tests of the oSVD and Tikhonov deconvolution methods.

Expected values come from hand calculation or from the parameters the phantom model was built
with (``bids_ctp.phantom.model``); the bias bounds are the measured, documented behaviour of
regularised deconvolution (module docstring of ``bids_ctp.perfusion.deconvolution``).
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import gammaincc

from bids_ctp.perfusion import deconvolution as dc
from bids_ctp.perfusion import maps as mp
from bids_ctp.phantom.model import CONSTANTS, arterial_input, tissue_enhancement, true_ttp

HCT = CONSTANTS.density / CONSTANTS.kh
TIMES = np.arange(0.0, 70.0)
AIF = arterial_input(TIMES)
NEW_METHODS = ("osvd", "tikhonov")


def _maps(flow, tmax, area):
    """Maps from the (flow, tmax, area) that ``deconvolve`` returns."""
    return mp.perfusion_maps(flow, area, tmax, np.zeros_like(tmax))


def test_methods_listed_with_nlr_first_and_defaults_beside_threshold():
    assert dc.METHODS[0] == "nlr"
    assert set(NEW_METHODS) <= set(dc.METHODS)
    assert list(dc.OSVD_THRESHOLDS) == sorted(dc.OSVD_THRESHOLDS, reverse=True)
    assert dc.OSVD_OI_BUDGET > 0 and 0 < dc.TIKHONOV_MU < 1


# ------------------------------------------------------------------ oscillation index
def test_oscillation_index_by_hand():
    length = 10
    spike = np.zeros(length)
    spike[3] = 2.5
    # second differences at j = 3, 4, 5: 2.5, -5, 2.5 -> sum 10; OI = 10 / (10 * 2.5)
    assert dc.oscillation_index(spike) == pytest.approx(4.0 / length)
    alternating = np.array([1.0, -1.0] * 4)  # every |k[j] - 2k[j-1] + k[j-2]| = 4
    assert dc.oscillation_index(alternating) == pytest.approx(4.0)
    ramp = np.array([0.0, 1.0, 2.0, 3.0, 0.0, 0.0])  # kinks: +1 at j=1, -4 at 4, +3 at 5
    assert dc.oscillation_index(ramp) == pytest.approx((1.0 + 4.0 + 3.0) / (6 * 3.0))
    # rows are independent; circular indices make OI invariant to a circular shift
    rows = np.stack([spike, np.roll(spike, 7)])
    np.testing.assert_allclose(dc.oscillation_index(rows), [0.4, 0.4])
    # no positive maximum: no shape to judge
    assert dc.oscillation_index(np.zeros(5)) == np.inf
    assert dc.oscillation_index(-spike) == np.inf


# ------------------------------------------------------------------ oSVD selection
def test_osvd_limits_of_oi_max_reproduce_fixed_threshold_csvd():
    tissue = tissue_enhancement(TIMES, np.array([60.0, 20.0]), np.array([4.0, 4.0]), 1.0)
    lo, hi = min(dc.OSVD_THRESHOLDS), max(dc.OSVD_THRESHOLDS)
    flow, tmax, area, chosen = dc.osvd(tissue, AIF, 1.0, oi_max=np.inf)  # everything passes
    np.testing.assert_array_equal(chosen, lo)
    ref = dc.deconvolve(tissue, AIF, 1.0, "csvd", threshold=lo)
    for got, want in zip((flow, tmax, area), ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    flow, tmax, area, chosen = dc.osvd(tissue, AIF, 1.0, oi_max=0.0)  # nothing passes
    np.testing.assert_array_equal(chosen, hi)
    ref = dc.deconvolve(tissue, AIF, 1.0, "csvd", threshold=hi)
    for got, want in zip((flow, tmax, area), ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_osvd_through_deconvolve_matches_osvd():
    tissue = tissue_enhancement(TIMES, 60.0, 4.0, np.array([0.0, 2.0]))
    flow, tmax, area, _ = dc.osvd(tissue, AIF, 1.0)
    for got, want in zip(dc.deconvolve(tissue, AIF, 1.0, "osvd"), (flow, tmax, area)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dt", [1.0, 2.0])
def test_osvd_threshold_adapts_to_noise(dt):
    times = np.arange(0.0, 70.0, dt)
    aif = arterial_input(times)
    clean = tissue_enhancement(times, 60.0, 4.0, 1.0)
    rng = np.random.default_rng(11)
    chosen = {}
    for noise in (0.0, 1.0, 2.0):
        curves = clean + rng.normal(0.0, noise, (200, len(times)))
        chosen[noise] = float(np.median(dc.osvd(curves, aif, dt)[3]))
    assert chosen[0.0] == min(dc.OSVD_THRESHOLDS)  # noise-free: the lowest threshold suffices
    assert chosen[0.0] < chosen[1.0] <= chosen[2.0]


# ------------------------------------------------------------------ Tikhonov
def test_tikhonov_pinv_with_vanishing_mu_is_the_exact_inverse():
    rng = np.random.default_rng(12)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    matrix = q @ np.diag([3.0, 2.5, 2.0, 1.5, 1.2, 1.0]) @ q.T  # condition number 3
    np.testing.assert_allclose(dc.tikhonov_pinv(matrix, 1e-7), np.linalg.inv(matrix), atol=1e-10)
    # a finite mu damps every singular value by s^2 / (s^2 + lambda^2), lambda = mu * s_max
    damped = dc.tikhonov_pinv(matrix, 0.5)  # lambda = 1.5
    s = np.linalg.svd(damped, compute_uv=False)
    np.testing.assert_allclose(np.sort(s), np.sort([v / (v * v + 2.25) for v in
                                                    (3.0, 2.5, 2.0, 1.5, 1.2, 1.0)]))


def test_tikhonov_with_vanishing_mu_recovers_known_residue():
    # AIF = unit spike: quadrature weights 1/6, 4/6, 1/6, circulant eigenvalues 4/6 + 2/6 cos w
    # >= 1/3, so the problem is well conditioned and deconvolution is exact.
    n, dt = 40, 1.0
    aif = np.zeros(n)
    aif[2] = 1.0
    lag = np.arange(n) * dt
    truth = 0.02 * np.exp(-(((lag - 6.0) / 2.0) ** 2))  # symmetric peak: parabola exact at 6 s
    tissue = (dc.convolution_matrix(aif, dt, circulant=True)
              @ np.concatenate([truth, np.zeros(n)]))[:n]
    flow, tmax, area = dc.deconvolve(tissue[None], aif, dt, "tikhonov", mu=1e-7)
    assert flow[0] == pytest.approx(0.02, rel=1e-4)
    assert tmax[0] == pytest.approx(6.0, abs=1e-3)
    assert area[0] == pytest.approx(truth.sum() * dt, rel=1e-4)


# ------------------------------------------------------------------ both methods
@pytest.mark.parametrize("method", NEW_METHODS)
def test_delay_insensitive(method):
    delays = np.array([0.0, 4.0])
    flow, tmax, _ = dc.deconvolve(tissue_enhancement(TIMES, 50.0, 4.0, delays), AIF, 1.0, method)
    assert flow[1] == pytest.approx(flow[0], rel=0.03)
    assert tmax[1] - tmax[0] == pytest.approx(4.0, abs=0.1)  # k moves with the tracer delay


@pytest.mark.parametrize("method", NEW_METHODS + ("csvd", "ssvd"))
def test_zero_tissue_gives_zeros_of_the_right_shape(method):
    flow, tmax, area = dc.deconvolve(np.zeros((7, len(TIMES))), AIF, 1.0, method)
    for values in (flow, tmax, area):
        assert values.shape == (7,) and values.dtype == np.float32
        assert np.all(np.isfinite(values))
    np.testing.assert_array_equal(flow, 0.0)
    np.testing.assert_array_equal(area, 0.0)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_shapes_over_several_chunks(method, monkeypatch):
    monkeypatch.setattr(dc, "CHUNK_VOXELS", 20)  # osvd chunks of 2 voxels, tikhonov of 20
    tissue = tissue_enhancement(TIMES, np.linspace(20.0, 80.0, 45), 4.0, 1.0)
    flow, tmax, area = dc.deconvolve(tissue, AIF, 1.0, method)
    monkeypatch.undo()
    ref = dc.deconvolve(tissue, AIF, 1.0, method)
    for got, want in zip((flow, tmax, area), ref):
        assert got.shape == (45,)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_single_threshold_rejected_for_adaptive_methods():
    for method in NEW_METHODS:
        with pytest.raises(ValueError, match="threshold"):
            dc.deconvolve(np.zeros((1, 10)), np.ones(10), 1.0, method, threshold=0.1)


# ------------------------------------------------------------------ measured biases (physics)
GM = (60.0, 4.0, 1.0)  # CBF mL/100g/min, CBV mL/100g, delay s; exponential residue, MTT 4 s


def test_osvd_gm_noise_free_closer_than_csvd_but_still_low():
    """A smooth AIF cannot resolve the residue's step: even oSVD's 2 % threshold stays low."""
    cbf, cbv, delay = GM
    tissue = tissue_enhancement(TIMES, cbf, cbv, delay)[None]
    osvd = _maps(*dc.deconvolve(tissue, AIF, 1.0, "osvd"))
    csvd = _maps(*dc.deconvolve(tissue, AIF, 1.0, "csvd"))
    assert 0.70 * cbf < osvd["cbf"][0] < 0.85 * cbf  # measured -22 %
    assert osvd["cbf"][0] > 1.15 * csvd["cbf"][0]  # csvd (10 %): -39 %
    assert osvd["cbv"][0] == pytest.approx(cbv, rel=0.02)  # the area of k is kept
    assert 1.0 < osvd["tmax"][0] - delay < 2.0  # measured +1.45 s (csvd +2.1 s)


def test_tikhonov_gm_noise_free_bias():
    cbf, cbv, delay = GM
    tissue = tissue_enhancement(TIMES, cbf, cbv, delay)[None]
    maps = _maps(*dc.deconvolve(tissue, AIF, 1.0, "tikhonov"))
    assert 0.55 * cbf < maps["cbf"][0] < 0.75 * cbf  # measured -36 %
    assert maps["cbv"][0] == pytest.approx(cbv, rel=0.02)
    assert 1.2 < maps["tmax"][0] - delay < 2.3  # measured +1.8 s


def test_noise_lowers_osvd_cbf_and_raises_tikhonov_cbf():
    """oSVD raises its threshold with noise (lower CBF); fixed-mu Tikhonov lets noise peaks in."""
    cbf, cbv, delay = GM
    clean = tissue_enhancement(TIMES, cbf, cbv, delay)
    noisy = clean + np.random.default_rng(13).normal(0.0, 1.5, (200, len(TIMES)))
    for method, low, high in (("osvd", 0.55, 0.75), ("tikhonov", 0.60, 0.80)):
        clean_cbf = _maps(*dc.deconvolve(clean[None], AIF, 1.0, method))["cbf"][0]
        noisy_maps = _maps(*dc.deconvolve(noisy, AIF, 1.0, method))
        median = float(np.median(noisy_maps["cbf"]))
        assert low * cbf < median < high * cbf  # measured -34 % (osvd), -32 % (tikhonov)
        assert np.median(noisy_maps["cbv"]) == pytest.approx(cbv, rel=0.03)
        if method == "osvd":
            assert median < 0.92 * clean_cbf
        else:
            assert clean_cbf < median < 1.15 * clean_cbf


@pytest.mark.parametrize("truth", list(dc.RESIDUE_SHAPES))
def test_residue_family_found_despite_artefact_voxels(truth):
    """Every family is recognised from 2000 noisy tissue curves (MTT 3-12 s, delays 0-4 s), and
    a fifth of the voxels carrying large non-bolus steps (motion-damaged edges) do not flip it."""
    rng = np.random.default_rng(3)
    n = 2000
    delays = rng.uniform(0.0, 4.0, n)
    mtts = np.exp(rng.uniform(np.log(3.0), np.log(12.0), n))
    flows = 4.0 / mtts  # area 4 (CBV-like), a flow of 0.33-1.3 /s
    fine = np.arange(0.0, 70.0, 0.05)
    kernel = [dc.residue(fine, m, truth) * 0.05 for m in mtts]
    aif_fine = np.interp(fine, TIMES, AIF)
    tissue = np.stack([np.interp(TIMES - d, fine, f * np.convolve(aif_fine, k)[: len(fine)],
                                 left=0.0) for d, f, k in zip(delays, flows, kernel)])
    tissue = 0.01 * tissue + rng.normal(0.0, 1.5, tissue.shape)  # peaks of 10-40 HU
    shape, scores = dc.select_residue_shape(tissue, TIMES, TIMES, AIF)
    assert shape == truth, scores
    step = np.where(TIMES >= rng.uniform(10, 50, (n // 5, 1)), rng.choice([-40.0, 40.0], (n // 5, 1)), 0)
    tissue[: n // 5] += step - step[:, :5].mean(axis=1, keepdims=True)
    assert dc.select_residue_shape(tissue, TIMES, TIMES, AIF)[0] == truth


@pytest.mark.parametrize("k, bound", [(5.0, 0.08), (8.0, 0.12)])
def test_transit_times_between_two_families(k, bound):
    """Tissue whose transit times are gamma-distributed with a shape k between two families,
    delay-free (a DSC reference object's lambda 5, say), is fitted with a neighbouring family.
    Noise-free CBF at MTT 3 / 6 / 12 s: shape 5 with gamma4 +7.5 / +6.9 / +4.1 %, with gamma6
    -4.8 / -3.1 / -2.7 % (the two score about the same); shape 8 with gamma6 +7.5 / +6.8 /
    +3.8 %, and with linear, its choice before the gamma6 family existed, +25 / +28 / +29 %."""
    rng = np.random.default_rng(5)
    fine = np.arange(0.0, 80.0, 0.01)
    aif_fine = arterial_input(fine)
    curves, truth = [], []
    for mtt in (3.0, 6.0, 12.0):
        flow = 0.04 / mtt  # k_max of an area of 0.04 (CBV 2.8 mL/100g): peaks of 6-12 HU
        tissue = flow * np.convolve(aif_fine, gammaincc(k, k * fine / mtt))[: len(fine)] * 0.01
        curves.append(np.interp(TIMES, fine, tissue) + rng.normal(0.0, 0.5, (100, len(TIMES))))
        truth += [(flow, mtt)] * 100
    curves, truth = np.concatenate(curves), np.array(truth)
    shape, scores = dc.select_residue_shape(curves, TIMES, TIMES, AIF)
    flow, _, mtt = dc.fit_model(curves, TIMES, TIMES, AIF, shape=shape)
    for true_mtt in (3.0, 6.0, 12.0):
        cell = truth[:, 1] == true_mtt
        assert np.median(flow[cell] / truth[cell, 0]) == pytest.approx(1.0, abs=bound), \
            (true_mtt, shape, scores)
        assert np.median(mtt[cell]) == pytest.approx(true_mtt, rel=bound), (true_mtt, shape)


def test_residue_family_of_noise_free_rounded_curves():
    """A noise-free box-residue scan stored in whole HU, sampled every 2 s, white matter the
    largest region: every white-matter voxel carries the same 8 HU curve and the same rounding
    error, which the linear family happens to fit best. Without a residual floor those
    identical curves outvote the other regions (the penumbra's larger residual even counts as
    an outlier; CBF +50 % on the phantom). Counting the rounding as the floor noise-free data
    cannot go below finds the box; with noise (0.5 HU and up) the floor vanishes."""
    times = np.arange(0.0, 60.0, 2.0)
    aif = arterial_input(times)
    regions = {"grey_matter": (60, 4.0, 1.0, 1000), "white_matter": (25, 2.0, 1.5, 20000),
               "ischemic_core": (10, 1.5, 4.0, 900), "penumbra": (25, 4.0, 4.0, 1500)}
    tissue = np.concatenate([
        np.repeat(np.round(tissue_enhancement(times, cbf, cbv, delay, "box"))[None], n, axis=0)
        for cbf, cbv, delay, n in regions.values()])
    floor = dc.rounding_floor(0.0)
    assert floor == pytest.approx(1 / 12)
    assert dc.rounding_floor(0.5) < 1e-4 * floor
    shape, scores = dc.select_residue_shape(tissue, times, times, aif, noise_floor=floor)
    assert shape == "box", scores
    assert scores["box"] - scores["linear"] > 0.1, scores
    assert dc.select_residue_shape(tissue, times, times, aif)[0] == "linear"


@pytest.mark.parametrize("shape", ["exponential", "box", "linear"])
@pytest.mark.parametrize("interval", [1.0, 2.0])
def test_model_fit_exact_between_grid_points(interval, shape):
    """Noise-free tissue at delays between the fit grid's 0.5 s points: CBF and MTT within 2 %
    (separate parabolas per axis missed by up to 14 % / 13 %; a local grid in delay and MTT
    instead of along the valley left MTT 2 s boxes 15 % off in CBF), delay within 0.02 s
    (model curves read half a convolution step early put every delay 0.025 s late)."""
    times = np.arange(0.0, 60.01, interval)
    aif = arterial_input(times)
    for mtt in (2.0, 4.0, 8.0, 12.0):
        for delay in (-2.0, 2.0, 2.125, 2.25, 2.375, 4.4):
            curve = tissue_enhancement(times, 240.0 / mtt, 4.0, delay, shape)
            flow, fitted_delay, fitted_mtt = dc.fit_model(curve[None], times, times, aif,
                                                          shape=shape)
            cbf = flow[0] * 6000.0 * CONSTANTS.kh / CONSTANTS.density
            assert cbf == pytest.approx(240.0 / mtt, rel=0.02), (mtt, delay)
            assert fitted_mtt[0] == pytest.approx(mtt, rel=0.02), (mtt, delay)
            assert fitted_delay[0] == pytest.approx(delay, abs=0.02), (mtt, delay)


@pytest.mark.parametrize("shape", ["exponential", "box", "linear"])
def test_model_ttp_matches_the_true_curve_peak(shape):
    """TTP of the fitted noise-free curve equals the phantom's continuous TTP within 0.1 s
    (box: 0.3 s; at MTT 16 s the fit's delay is 0.2 s early), also when the peak would come
    after the last frame (then: the last frame, as for the truth)."""
    times = np.arange(0.0, 40.01, 1.0)
    aif = arterial_input(times)
    for mtt in (2.0, 4.0, 8.0, 16.0):
        for delay in (0.3, 2.2, 6.0):
            curve = tissue_enhancement(times, 240.0 / mtt, 4.0, delay, shape)
            flow, fitted_delay, fitted_mtt = dc.fit_model(curve[None], times, times, aif,
                                                          shape=shape)
            ttp = dc.model_ttp(times, times, aif, fitted_delay, fitted_mtt, shape)[0]
            truth = true_ttp(times, 240.0 / mtt, 4.0, delay, shape)
            assert ttp == pytest.approx(truth, abs=0.1 if shape == "exponential" else 0.3), (
                mtt, delay)
