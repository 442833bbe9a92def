"""Residual head-motion artefacts: bolus-shape test of vessel curves and the motion regressor of
the model fit, against curves with known truth."""
from __future__ import annotations

from types import SimpleNamespace

import nibabel as nb
import numpy as np
import pytest

from bids_ctp.interfaces.perfusion import _motion_artefact_model
from bids_ctp.perfusion import aif as af
from bids_ctp.perfusion import deconvolution as dc
from bids_ctp.perfusion import motion as mo
from bids_ctp.phantom.model import arterial_input, tissue_enhancement

TIMES = np.arange(0.0, 55.0, 1.0)


def _step(at=24, height=120.0):
    return np.where(TIMES >= at, height, 0.0)


def test_bolus_shape_scores_vessels_high_and_motion_steps_low():
    vessel = arterial_input(TIMES)
    cosine, area = af.bolus_shape(TIMES, np.stack([vessel, 0.6 * vessel + _step(), _step()]))
    assert cosine[0] > 0.97 and cosine[2] < 0.8 and cosine[1] < af.MIN_BOLUS_SHAPE
    # first-pass area of the artery: within 15 % of its gamma-variate fit's
    fit_area = af.gamma_variate_area(af.fit_gamma_variate(TIMES, vessel))
    assert area[0] == pytest.approx(fit_area, rel=0.15)


def _vessel(curve):
    return af.vessel_curve(curve[None].astype(np.float32), np.zeros((1, 3), int), [0], TIMES)


def test_a_vof_with_a_motion_step_is_not_used_for_scaling():
    artery = _vessel(0.7 * arterial_input(TIMES))
    clean_vof = _vessel(arterial_input(TIMES - 5.0))
    assert af.vof_scale_factor(artery, clean_vof) == pytest.approx(1 / 0.7, rel=0.05)
    stepped = _vessel(arterial_input(TIMES - 5.0) + _step())
    assert af.vof_scale_factor(artery, stepped) == 1.0
    assert any("not bolus-shaped" in p for p in af.vessel_problems(artery, stepped))


def test_model_fit_with_motion_regressor_recovers_flow_and_mtt():
    aif = arterial_input(TIMES)
    cbv, mtt = 4.0, 4.0
    tissue = tissue_enhancement(TIMES, 60.0 * cbv / mtt, cbv, 1.0, "exponential")
    # a drift and a jerk, like head motion, seen by a voxel at a bone edge: 8 HU per mm
    shift = 0.5 * TIMES / TIMES[-1] + np.where(TIMES >= 24, 1.2, 0.0)
    moved = tissue + 8.0 * shift
    truth_flow, truth_mtt, *_ = dc.fit_model(tissue[None], TIMES, TIMES, aif)
    plain_flow, plain_mtt, *_ = dc.fit_model(moved[None], TIMES, TIMES, aif)
    flow, delay, fit_mtt = dc.fit_model(moved[None], TIMES, TIMES, aif, nuisance=shift[None])
    # without the regressor CBV is 45 % off (the fitted baseline level takes a little of it)
    assert abs(plain_flow[0] * plain_mtt[0] / (truth_flow[0] * truth_mtt[0]) - 1) > 0.4
    assert flow[0] == pytest.approx(truth_flow[0], rel=0.03)
    assert fit_mtt[0] == pytest.approx(mtt, rel=0.05)
    assert delay[0] == pytest.approx(1.0, abs=0.25)


def test_slice_displacement_and_residual_regressor():
    shape, spacing = (20, 20, 6), (1.0, 1.0, 5.0)
    voxels = np.argwhere(np.ones(shape, bool))
    params = np.zeros((4, 6))
    params[2:, 5] = 1.5  # 1.5 mm along k from frame 2
    shift = mo.slice_displacement(params, shape, spacing, voxels)
    np.testing.assert_allclose(shift[:, :2], 0.0, atol=1e-6)
    np.testing.assert_allclose(shift[:, 2:], 1.5, atol=1e-5)
    # the regressor exists only near edges of the baseline image
    baseline = np.zeros(shape, np.float32)
    baseline[:, :, 3:] = 1000.0  # bone above slice 3
    brain = np.ones(shape, bool)
    regressor = mo.residual_motion_regressor(params, mo.edge_strength(baseline, spacing), spacing,
                                            brain, 2)
    near = (voxels[:, 2] == 2) | (voxels[:, 2] == 3)
    assert regressor.shape == (len(voxels), 1, 4)  # no scene: the displacement alone
    np.testing.assert_allclose(regressor[near][:, 0, 2:], 1.5, atol=1e-5)
    assert not regressor[~near].any()
    assert mo.residual_motion_regressor(np.zeros((4, 6)), mo.edge_strength(baseline, spacing),
                                        spacing, brain, 2) is None


@pytest.mark.parametrize("shape", ["box", "exponential"])
def test_weights_keep_a_nonlinear_motion_artefact_out_of_the_fit(shape):
    """Cortex at a bone edge: after the jerk at frame 24 the edge's partial volume grows faster
    than the displacement (it crosses into the next slice at frame 40), so the linear regressor
    removes only part of it (here 40 % of the linear artefact, where ``artefact_weights``
    expects 5 %). Weighting frames by their expected artefact fits the voxel mostly on the
    frames near its baseline position. Measured (CBF / MTT): regressor alone box
    +9 / +597 %, exponential +60 / -74 %; with weights box +17 / -21 %, exponential +39 / -45 %
    (Tmax 1.39 / 1.71 s for a true 1 s; before the baseline level was fitted, +19 / -24 % and
    +37 / -43 %, 1.44 / 1.66 s)
    (+14 / -18 % and +16 / -28 % when they expected 10 %, +8 / -12 % and +6 / -17 % with the
    whole linear artefact, which overweighted such voxels' baseline frames on phantoms)."""
    aif = arterial_input(TIMES)
    cbf, cbv = 60.0, 4.0
    tissue = tissue_enhancement(TIMES, cbf, cbv, 1.0, shape)
    shift = 0.3 * TIMES / TIMES[-1] + np.where(TIMES >= 24, 1.5, 0.0)  # mm
    moved = tissue + 40.0 * shift * np.where(TIMES >= 40, 1.4, 1.0)  # 40 HU/mm at the edge
    baseline = np.zeros((3, 3, 3), np.float32)
    baseline[:, :, 2] = 80.0  # voxel (1, 1, 1): 40 HU/mm along k
    brain = np.zeros(baseline.shape, bool)
    brain[1, 1, 1] = True
    weights = mo.artefact_weights(shift[None], mo.edge_strength(baseline, (1.0, 1.0, 1.0))[brain],
                                  noise_sd=1.0)
    assert weights[0, 0] == 1.0 and weights[0, 30] < 0.1

    def fitted(**kw):
        flow, delay, mtt = dc.fit_model(moved[None], TIMES, TIMES, aif, shape=shape, **kw)
        return flow[0] * 6000 * 0.73 / 1.05 / cbf - 1, mtt[0] / (60 * cbv / cbf) - 1, delay[0]

    cbf_err, mtt_err, _ = fitted(nuisance=shift[None])
    assert max(abs(cbf_err), abs(mtt_err)) > 0.7
    cbf_err, mtt_err, delay = fitted(nuisance=shift[None], weights=weights)
    assert abs(cbf_err) < 0.45 and abs(mtt_err) < 0.5
    assert delay == pytest.approx(1.0, abs=0.75)


def test_round_trip_blurs_an_edge_by_the_subvoxel_part_of_the_shift():
    scene = np.where(np.arange(20) >= 10, 1000.0, 0.0)[:, None, None] * np.ones((20, 6, 6))
    half = mo.round_trip(scene, (1.0, 1.0, 1.0), [0, 0, 0, 0.5, 0, 0])[:, 3, 3]
    np.testing.assert_allclose(half[8:12], [0.0, 250.0, 750.0, 1000.0], atol=1e-3)
    whole = mo.round_trip(scene, (1.0, 1.0, 1.0), [0, 0, 0, 1.0, 0, 0])[:, 3, 3]
    np.testing.assert_allclose(whole, scene[:, 3, 3], atol=1e-3)


def test_round_trip_regressor_removes_the_interpolation_artefact():
    """Cortex one 5 mm slice below bone, the head drifting up to 2 mm through the slices: the
    correction's interpolation there and back adds up to 0.24 x 970 HU, not quite linearly in
    the displacement. Measured (CBF / MTT): displacement regressor alone +3 / +243 %, with the
    round-trip regressor too +1.4 / -0.7 %."""
    spacing = (1.0, 1.0, 5.0)
    scene = np.full((6, 6, 6), 30.0, np.float32)
    scene[:, :, 3:] = 1000.0  # bone from slice 3
    brain = np.zeros(scene.shape, bool)
    brain[3, 3, 2] = True
    params = np.zeros((TIMES.size, 6))
    params[:, 5] = 1.2 * TIMES / TIMES[-1] + np.where(TIMES >= 24, 0.8, 0.0)
    artefact = np.array([mo.round_trip(scene, spacing, p)[3, 3, 2] for p in params])
    artefact -= artefact[:3].mean()  # enhancement is relative to the 3 baseline frames
    cbf, cbv = 60.0, 4.0
    tissue = (tissue_enhancement(TIMES, cbf, cbv, 1.0, "exponential") + artefact)[None]
    edge = mo.edge_strength(scene, spacing)
    aif = arterial_input(TIMES)

    def errors(scene_or_none):
        regressors = mo.residual_motion_regressor(params, edge, spacing, brain, 3, scene_or_none)
        weights = mo.artefact_weights(regressors, edge[brain], noise_sd=1.0)
        flow, _, mtt = dc.fit_model(tissue, TIMES, TIMES, aif, nuisance=regressors,
                                    weights=weights)
        return flow[0] * 6000 * 0.73 / 1.05 / cbf - 1, mtt[0] / (60 * cbv / cbf) - 1

    assert max(np.abs(errors(None))) > 0.3
    assert max(np.abs(errors(scene))) < 0.03


def test_noise_free_frame_weights_count_the_rounding(tmp_path):
    """A noise-free head stored in whole HU, moved 1 mm through-plane from frame 4: its curves
    have no noise, so the frame weights 1 / (1 + (a / sigma)²) once divided a ~1 HU artefact by
    0.001 HU and gave every moved frame near an edge no weight at all. sigma is now never below
    the rounding's sqrt(1/12) HU; with noise (10 HU acquired) nothing changes."""
    shape, n_frames = (24, 24, 6), 8
    x = np.arange(shape[0])[:, None, None] * np.ones(shape)
    head = np.round(40.0 + 4.0 * x).astype(np.float32)  # a gentle 4 HU/mm gradient
    data = np.repeat(head[..., None], n_frames, axis=3)
    path = tmp_path / "ctp.nii.gz"
    nb.save(nb.Nifti1Image(data, np.eye(4)), path)
    parameters = np.zeros((n_frames, 6))
    parameters[4:, 5] = 1.0  # 1 mm along z from frame 4
    brain = np.zeros(shape, bool)
    brain[4:-4, 4:-4, 1:-1] = True
    tissue = data[brain] - head[brain][:, None]
    weights = {}
    for noise_sd in (0.0, 10.0):
        inputs = SimpleNamespace(motion_parameters=parameters.tolist(), in_file=str(path),
                                 baseline_frames=3, noise_sd=noise_sd, n_threads=1)
        regressor, weights[noise_sd] = _motion_artefact_model(inputs, brain, data, tissue)
        assert regressor is not None
    edge = mo.edge_strength(head, (1.0, 1.0, 1.0))[brain]
    a = mo.ARTEFACT_FRACTION * edge[:, None] * np.abs(regressor[:, 0])
    expected = 1.0 / (1.0 + a**2 / dc.rounding_floor(0.0))
    np.testing.assert_allclose(weights[0.0], expected, rtol=1e-4)
    moved = weights[0.0][:, 4:][a[:, 4:] > 0]
    assert moved.size and moved.min() > 0.3  # a = 0.4 HU against 0.29 HU of rounding
    assert weights[10.0][:, 4:][a[:, 4:] > 0].max() < 0.01  # no noise in the curves: 0.001 HU


def test_round_trip_regressor_is_the_whole_grid_round_trip_where_it_is_kept():
    """The round-trip regressor reads the correction back at its own voxels only; there it
    must equal the whole grid's ``round_trip``, also in the first and last slices, where the
    correction of a through-plane shift reaches beyond the grid."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    shape, spacing = (24, 20, 6), (0.9, 0.9, 5.0)
    scene = (ndimage.gaussian_filter(rng.normal(0.0, 300.0, shape), 1.5) + 40.0).astype(np.float32)
    scene[:8] = 40.0  # uniform tissue there: no edge, no regressor
    params = np.zeros((5, 6))
    params[2:] = [0.02, -0.015, 0.03, 0.7, -1.1, 1.8]
    params[4, 5] = -2.5
    brain = np.ones(shape, bool)
    regressor = mo.residual_motion_regressor(params, mo.edge_strength(scene, spacing), spacing,
                                            brain, 2, scene)
    kept = regressor[:, 0].any(axis=1)
    assert kept.mean() > 0.5 and (~kept).any()
    whole = np.stack([mo.round_trip(scene, spacing, p)[brain] - scene[brain] for p in params],
                     axis=1)
    whole -= whole[:, :2].mean(axis=1, keepdims=True)
    assert np.abs(whole[kept][:, 2:]).max() > 50.0  # an artefact worth reading
    np.testing.assert_allclose(regressor[kept, 1], whole[kept], atol=0.01)
    assert not regressor[~kept].any()


def test_voxels_without_regressors_get_the_plain_fit():
    """Voxels whose regressors are 0 and frame weights 1 take the unweighted least squares, the
    others the weighted one with their regressors: each as if fitted alone."""
    rng = np.random.default_rng(5)
    aif = arterial_input(TIMES)
    tissue = np.stack([tissue_enhancement(TIMES, cbf, cbv, delay, "exponential")
                       for cbf, cbv, delay in ((60, 4, 0.5), (25, 2.5, 1.5), (15, 3, 4.0))] * 2)
    tissue = (tissue + rng.normal(0.0, 0.5, tissue.shape)).astype(np.float32)
    nuisance = np.zeros((6, 2, TIMES.size), np.float32)
    nuisance[3:] = rng.normal(0.0, 1.0, (3, 2, TIMES.size))
    weights = np.ones((6, TIMES.size), np.float32)
    weights[3:] = rng.uniform(0.2, 1.0, (3, TIMES.size))
    together = dc.fit_model(tissue, TIMES, TIMES, aif, nuisance=nuisance, weights=weights)
    plain = dc.fit_model(tissue[:3], TIMES, TIMES, aif)
    alone = dc.fit_model(tissue[3:], TIMES, TIMES, aif, nuisance=nuisance[3:],
                         weights=weights[3:])
    for both, first, last in zip(together, plain, alone):
        np.testing.assert_allclose(both, np.concatenate([first, last]), rtol=1e-4, atol=1e-6)
    # and the plain ones are not fitted as the weighted ones are
    assert not np.allclose(together[0][3:], dc.fit_model(tissue[3:], TIMES, TIMES, aif)[0],
                           rtol=1e-3)


def test_white_matter_under_a_grey_matter_slice_gets_the_regressor():
    """White matter in the slice below a grey-matter slice, the head 0.8 mm higher from frame 24:
    its first-order artefact is estimated at 0.8 HU (the acquired slices' edge), but the anatomy
    within the 5 mm slice steps it by 2 HU (the independent moving phantom's white matter: +2.2 HU
    at a peak of 10). Below the former 2 HU threshold it had no regressor: MTT -22 %."""
    spacing = (1.0, 1.0, 5.0)
    scene = np.full((6, 6, 6), 25.0, np.float32)
    scene[:, :, 4:] = 35.0
    brain = np.zeros(scene.shape, bool)
    brain[3, 3, 3] = True
    params = np.zeros((TIMES.size, 6))
    params[24:, 5] = 0.8
    edge = mo.edge_strength(scene, spacing)
    assert edge[3, 3, 3] * 0.8 == pytest.approx(0.8, abs=0.01)
    cbf, cbv = 25.0, 2.5
    tissue = (tissue_enhancement(TIMES, cbf, cbv, 1.0, "box") + _step(height=2.0))[None]
    regressor = mo.residual_motion_regressor(params, edge, spacing, brain, 3, scene)
    assert regressor is not None
    flow, _, mtt = dc.fit_model(tissue, TIMES, TIMES, arterial_input(TIMES), shape="box",
                                nuisance=regressor,
                                weights=mo.artefact_weights(regressor, edge[brain], 1.0))
    assert flow[0] * 6000 * 0.73 / 1.05 == pytest.approx(cbf, rel=0.02)
    assert mtt[0] == pytest.approx(60 * cbv / cbf, rel=0.02)
    without = mo.residual_motion_regressor(params, edge, spacing, brain, 3, scene,
                                           min_artefact_hu=2.0)
    assert without is None
    _, _, mtt = dc.fit_model(tissue, TIMES, TIMES, arterial_input(TIMES), shape="box")
    assert mtt[0] < 0.85 * 60 * cbv / cbf
