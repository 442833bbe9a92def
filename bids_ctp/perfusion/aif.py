"""Automatic arterial input function (AIF) selection and gamma-variate quality scoring.

Idea (after Mouridsen 2006, adapted to CT): arteries are the voxels whose enhancement is high,
early and narrow. Candidates are the brain voxels enhancing at least ``CANDIDATE_FRACTION`` of the
robust maximum (this excludes tissue, which enhances ~20x less). Candidates form connected
clusters (vessel cross-sections); a venous sinus is also bright, often brighter than a
partial-volumed artery, but it peaks seconds later, so only clusters whose time to peak is within
``EARLY_WINDOW_S`` of the earliest cluster stay. From these, the most strongly enhancing voxels
(the centres of the largest arteries, least partial-volumed) are averaged. The mean curve is fitted
with a gamma variate over its first pass; R² of that fit is the quality score.

Venous output function (VOF): the voxels peaking later than the arteries and shaped like a
vessel, from the cluster holding most of them (the superior sagittal sinus), those with the largest
first-pass area. All contrast that enters the brain leaves through the veins, so the VOF is the
true AIF dispersed by a unit-area transit kernel; a partial-volumed AIF has less area, and is
scaled up by the factor that fits the VOF (``venous_transit_fit``, ``vof_scale_factor``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator
from scipy.optimize import OptimizeWarning, curve_fit, least_squares
from scipy.special import gammaln

from bids_ctp.errors import DataError
from bids_ctp.perfusion.curves import (ARTERIAL_REFERENCE_FRACTION, EARLY_WINDOW_S,
                                      RETURN_FRACTION, tail_level, time_to_peak)
from bids_ctp.perfusion import motion
from bids_ctp.perfusion.mask import BONE_HU

CANDIDATE_FRACTION = 0.3  # of the 99.9th percentile of peak enhancement in the brain
MIN_CLUSTER_MM3 = 2.0  # smaller bright clusters are noise or tiny vessels
CENTRE_FRACTION = 0.8  # keep voxels reaching this fraction of the best early voxel's peak
MAX_AIF_VOXELS = 40
FIRST_PASS_END = 0.6  # fraction of the peak where the fitted first pass ends
ARRIVAL_SCREEN_FRACTION = 0.25  # of the arrival reference's weakest rise: screened for motion
MAX_VOF_SCALE = 3.0  # larger AIF corrections are applied but flagged: the AIF is mostly not artery
# A VOF with less area than the AIF is partial-volumed or no sinus (full-volume AIFs measure
# 0.96-1.02 on the phantoms; a CSF voxel that became the VOF after head motion, 0.62)
MIN_VOF_SCALE = 0.9
MIN_AIF_PEAK_HU = 100.0  # weaker arterial enhancement makes every map noisy
# Arterial blood keeps contrast after the first pass, so the AIF's last frames (this fraction
# of the scan) cannot lie below its baseline: flagged when they do by more than
# MAX_TAIL_DEFICIT of the peak and TAIL_DEFICIT_Z standard errors. Independent phantom, 1 mm /
# 1 deg jerk after the bolus (5 mm slices): the 6 AIF voxels lost 10-20 HU from the jerk on
# (late mean -2.3 % of the peak, 3.6 standard errors; true tail +1 %), the residue family
# came out exponential and every CBF +44...+51 %. The 87 series of our phantom sets: at most
# 0.3 % below (1.6 standard errors).
AIF_TAIL_FRACTION = 0.3
MAX_TAIL_DEFICIT = 0.01
TAIL_DEFICIT_Z = 3.0
# VOF voxels end the scan at the sinus' common level (recirculation, as a fraction of their
# peak) within this much; bone sliding in or out after head motion shifts a voxel's tail away
# from it (phantom, 2 mm motion: the 40 largest-area sinus voxels had tails of 5-35 % of
# their peak against 3 % in truth, and gave a VOF scale of 1.49 where a still head gives
# 1.016; with this tolerance 1.04, with 0.05 1.06).
VOF_TAIL_TOLERANCE = 0.03
# The VOF's voxels: first-pass areas within CENTRE_FRACTION of (above: 1 / CENTRE_FRACTION
# times) this percentile of the sinus'. Full-volume sinus voxels share one area, so a few far
# above it carry bone (2.5 mm slices, 2 mm motion: 2 of 340 at 3929 against a plateau of
# 2775 had become the whole VOF, scale 1.49, every CBF and CBV -28...-40 %).
VOF_REFERENCE_PERCENTILE = 90
# After head motion, the AIF's voxels: peaks within CENTRE_FRACTION of (above: 1 /
# CENTRE_FRACTION times) the early clusters' AIF_REFERENCE_RANK-th highest peak (a rank, not a
# percentile: artery centres are few among their partial-volume rims). 2 mm motion, 220 HU
# bolus: 3 voxels at 296 HU against the arteries' 234 had become the whole AIF, every CBV
# -39...-51 %. A still head keeps the highest peak as reference: at 4 mm pixels (two slices)
# its arteries have fewer than 5 centre voxels, and the 5th-highest halved the AIF.
AIF_REFERENCE_RANK = 5
# After head motion, the AIF's voxels: those whose content moving and correcting back changes
# by at most this fraction of their peak (``round_trip_loss``), when there are any. Arteries
# lying in a 5 mm slice lose it across the slices: on an independent phantom (1-1.5 deg,
# 1-2 mm jerks, 0.85 mm pixels) the 40 strongest artery voxels kept 0.59 of the bolus after
# the jerk, and CBF came out +63...+98 %.
MAX_ROUND_TRIP_LOSS = 0.2
# After head motion, a voxel the motion can change by more than its peak (``round_trip_loss``)
# joins no vessel cluster. On the independent phantom (1-1.5 deg jerks at 5 mm slices) CSF and
# cortex next to bone (loss 1.2-1.7) joined all arteries, sinus and CSF into one cluster of
# 18 866 voxels that was no longer bolus-shaped, and the AIF became CSF that bone moved into
# for 7 frames (every CBF -100 %). Arteries lying in a 5 mm slice lose up to about 0.5.
MAX_CLUSTER_LOSS = 1.0
MIN_FIT_R2 = 0.8  # gamma-variate fits worse than this are not trusted for VOF scaling
# venous_transit_fit: time step (s) of its convolution, and (start, lower, upper) of scale,
# kernel shape and mean transit (s)
VOF_FIT_STEP_S = 0.1
VOF_FIT_START = (1.0, 3.0, 5.0)
VOF_FIT_BOUNDS = ((0.1, 20.0), (1.0, 200.0), (0.3, 30.0))
# Bolus shape: cosine similarity of a curve with its best-matching gamma variate (alpha 3, a grid
# of arrival times and widths). Vessel curves score >= 0.97 on the phantom, with or without head
# motion; bone or CSF edges that motion turns into bright "curves" (drifts and steps) score a
# median 0.85. Clusters whose median is below this are not vessels.
MIN_BOLUS_SHAPE = 0.95
# A vessel voxel's own bolus shape at least (vessels score >= 0.97): the VOF's voxels, and the
# AIF's after head motion. 2 mm motion with a 2 mm jump through 5 mm slices at the bolus' arrival:
# bone smeared into 63 CSF and grey-matter voxels above the skull base made a cluster 1.7 s after
# the arteries (median shape 0.954, its strongest voxels 0.88-0.92, peaks up to 299 HU against
# the arteries' 231-257); 16 of them joined the AIF, every CBF +70...+154 %.
MIN_VOXEL_SHAPE = 0.97
# The earliest vessels may start at most this fraction of their rise above the level they
# come back down to: more, and the bolus was already arriving in frame 0.
MAX_FIRST_FRAME_FRACTION = 0.25
# Vessels counted there fall to half their rise within this time of their peak, as an arterial
# first pass does (3-4 s); bone that uncorrected head motion slides out of an edge voxel
# also starts high and falls, but over the whole drift (10-20 s on the phantom).
FIRST_PASS_HALF_FALL_S = 8.0
SHAPE_WIDTHS_S = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # gamma-variate beta (s); alpha = 3
# After head motion, a cluster whose voxels can carry a motion artefact this many times their
# peak enhancement (median; ``motion.expected_artefact_hu``) is no artery. Phantoms with 1-2 mm
# motion: artery clusters 0.01-0.12; CSF clusters against bone 0.54-12, bolus-shaped
# (0.95-0.97). With 2.5 mm slices, 1-2 voxel ones peaking 3.5 s before the arteries became a
# one-voxel AIF (CBF +108...+198 %); with a 220 HU bolus a 96-voxel one, 2 s later and brighter
# than the arteries (ratio 0.90), gave 9 of 17 AIF voxels.
MAX_ARTEFACT_TO_PEAK = 0.5


class VesselClusters(NamedTuple):
    """``vessel_clusters``' result: per candidate voxel, then per cluster label (0 unused)."""
    candidates: np.ndarray  # indices of the candidate voxels (rows of the enhancement)
    cluster_of: np.ndarray  # each candidate's cluster label
    ttp: np.ndarray  # each candidate's time to peak (s)
    shape: np.ndarray  # each candidate's bolus shape (``bolus_shape`` cosine)
    peak: np.ndarray  # each candidate's peak enhancement (HU)
    first_pass: np.ndarray  # each candidate's first-pass area (HU s)
    cluster_ttp: np.ndarray  # each cluster's median time to peak; inf: no vessel
    arterial_ttp: np.ndarray  # cluster_ttp, inf also for clusters that are not arteries
    loss: np.ndarray | None = None  # each candidate's ``round_trip_loss`` (given the head)


@dataclass
class VesselCurve:
    curve: np.ndarray  # enhancement (HU) at the frame times
    voxels: np.ndarray  # (n, 3) voxel indices of the voxels averaged
    peak_hu: float
    ttp_s: float
    fit: dict  # gamma-variate parameters (amplitude HU, t0 s, alpha, beta s) and r2
    shape_score: float  # bolus_shape cosine of the whole curve (1 = a gamma variate)
    times: np.ndarray  # s, of the curve's samples


def gamma_variate(t, amplitude, t0, alpha, beta):
    """Peak-normalised gamma variate: ``amplitude`` at t0 + alpha·beta, 0 before t0."""
    x = np.clip((np.asarray(t, float) - t0) / (alpha * beta), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = amplitude * x**alpha * np.exp(alpha * (1.0 - x))
    return np.nan_to_num(y)


def fit_gamma_variate(times, curve) -> dict:
    """Fit the first pass: from arrival to where the curve falls below FIRST_PASS_END x peak.

    Stopping at 60 % of the peak on the down-slope keeps recirculation out of the fit (with
    40 %, a venous curve's first-pass area came out 2.6 % too large on the phantom, 1.2 % at
    60 %), while leaving a few samples after the peak at 1-2 s sampling.
    """
    t = np.asarray(times, float)
    c = np.asarray(curve, float)
    top = int(np.argmax(c))
    after = np.flatnonzero(c[top:] < FIRST_PASS_END * c[top])
    end = top + (int(after[0]) if after.size else len(c) - top - 1)
    before = np.flatnonzero(c[: top + 1] < 0.1 * c[top])
    start = int(before[-1]) if before.size else 0
    t0_guess = t[start]
    guess = [c[top], t0_guess, 3.0, max((t[top] - t0_guess) / 3.0, 0.3)]
    window = slice(max(0, start - 2), end + 1)
    try:
        with warnings.catch_warnings():
            # the covariance is not used: too few first-pass samples to estimate it (a scan cut
            # off after the peak) is no error, and the warning was an extra line on stderr
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(gamma_variate, t[window], c[window], p0=guess, maxfev=4000,
                                  bounds=([0, t[0] - 10, 0.5, 0.1], [np.inf, t[top], 20.0, 20.0]))
    except (RuntimeError, ValueError):
        params = np.array(guess)
    model = gamma_variate(t[window], *params)
    ss_res = float(((c[window] - model) ** 2).sum())
    ss_tot = float(((c[window] - c[window].mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    keys = ("amplitude_hu", "t0_s", "alpha", "beta_s")
    return {**{k: float(v) for k, v in zip(keys, params)}, "r2": r2}


def gamma_variate_area(fit: dict) -> float:
    """Analytic area (HU·s) of a fitted peak-normalised gamma variate."""
    a, b = fit["alpha"], fit["beta_s"]
    return float(fit["amplitude_hu"] * b * np.exp(a + gammaln(a + 1) - a * np.log(a)))


def continuous_aif(aif_times, aif):
    """The AIF between its samples: fitted gamma-variate first pass + PCHIP of the remainder.

    Passes through every sample. At 2-3 s sampling the peak usually falls between samples;
    a straight line (or a plain PCHIP) cuts it short, which made the model fit overestimate CBF
    by 18 % (exponential residue, MTT 4 s) and 85 % (box residue, MTT 2 s); the gamma-variate
    shape of the first pass restores it (errors <= 2 %). Plain PCHIP when the fit is poor.
    """
    aif_times, aif = np.asarray(aif_times, float), np.asarray(aif, float)
    fit = fit_gamma_variate(aif_times, aif)
    if fit["r2"] < MIN_FIT_R2:
        return PchipInterpolator(aif_times, aif)
    params = [fit[k] for k in ("amplitude_hu", "t0_s", "alpha", "beta_s")]
    remainder = PchipInterpolator(aif_times, aif - gamma_variate(aif_times, *params))
    return lambda t: gamma_variate(t, *params) + remainder(t)


def bolus_shape(times, curves) -> tuple[np.ndarray, np.ndarray]:
    """How much each curve looks like a bolus passage, and its first-pass area.

    Every curve is compared with a grid of gamma variates (alpha 3, arrival times every 0.5 s,
    widths ``SHAPE_WIDTHS_S``): returns the best cosine similarity (1 = a gamma variate) and
    the area (HU·s) of the best-matching gamma variate scaled to the curve (least squares), a
    first-pass area that a step or drift added by head motion hardly changes.
    """
    times = np.asarray(times, float)
    curves = np.atleast_2d(np.asarray(curves, float))
    onsets = np.arange(times[0] - 5.0, times[-1], 0.5)
    templates = np.array([gamma_variate(times, 1.0, t0, 3.0, b)
                          for t0 in onsets for b in SHAPE_WIDTHS_S])
    norms = np.linalg.norm(templates, axis=1)
    keep = norms > 0
    templates, norms = templates[keep], norms[keep]
    proj = curves @ (templates / norms[:, None]).T
    best = np.argmax(proj, axis=1)
    rows = np.arange(len(curves))
    cosine = proj[rows, best] / np.maximum(np.linalg.norm(curves, axis=1), 1e-12)
    widths = np.tile(SHAPE_WIDTHS_S, len(onsets))[keep][best]
    unit_area = gamma_variate_area({"amplitude_hu": 1.0, "alpha": 3.0, "beta_s": 1.0}) * widths
    return cosine, np.maximum(proj[rows, best], 0.0) / norms[best] * unit_area


def contrast_in_first_frame(times, curves: np.ndarray) -> float:
    """How far into the bolus the earliest vessels already are in frame 0.

    The median, over the earliest-peaking fifth of the strongly enhancing, bolus-shaped voxels
    whose first pass is over within the scan, of (frame 0 - minimum after the peak) /
    (peak - that minimum); about 0 when the scan starts before the bolus. Arrival timing
    against frame 0 cannot see this (an artery already at 70 % of its peak barely rises from
    there, and the late vein then dominates the arterial reference). The quick fall keeps out
    edge voxels that bone slides out of during head motion (they too start high and fall).
    """
    curves = np.asarray(curves, dtype=np.float32)
    top = np.argmax(curves, axis=1)
    from_top = np.arange(curves.shape[1]) >= top[:, None]
    after = np.where(from_top, curves, np.inf).min(axis=1)
    rise = curves[np.arange(len(curves)), top] - after
    # a first pass: back below half its rise within FIRST_PASS_HALF_FALL_S of the peak
    times = np.asarray(times, float)
    below = from_top & (curves < (after + 0.5 * rise)[:, None])
    fall = times[np.argmax(below, axis=1)] - times[top]
    passing = (rise > 0) & below.any(axis=1) & (fall <= FIRST_PASS_HALF_FALL_S)
    if not passing.any():
        return 0.0
    strong = np.flatnonzero(passing & (rise >= 0.5 * rise[passing].max()))
    if strong.size:
        cosine, _ = bolus_shape(times, curves[strong] - after[strong, None])
        strong = strong[cosine >= MIN_BOLUS_SHAPE]
    if not strong.size:
        return 0.0
    early = strong[top[strong] <= np.percentile(top[strong], 20)]
    return float(np.median((curves[early, 0] - after[early]) / rise[early]))


def check_first_frame(times, curves: np.ndarray, source: str = "image") -> None:
    """DataError when ``contrast_in_first_frame`` exceeds MAX_FIRST_FRAME_FRACTION."""
    already = contrast_in_first_frame(times, curves)
    if already > MAX_FIRST_FRAME_FRACTION:
        raise DataError(f"{source}: contrast is already arriving in the first frame (the "
                        f"earliest vessels start {100 * already:.0f} % of the way up to their "
                        "peak): no unenhanced frames for a baseline")


def vessel_clusters(enhancement, voxels, shape, times, spacing, source="image",
                    motion_parameters=None, edge=None, scene=None):
    """Bright, bolus-shaped voxels grouped into connected vessel-sized clusters (computed once
    and shared by ``select_aif`` and ``select_vof``). With ``motion_parameters`` (T, 6) and
    ``edge`` (``motion.edge_strength`` of the unenhanced head), clusters that head motion can
    fill with more than MAX_ARTEFACT_TO_PEAK of their enhancement are not arteries: they
    neither set the arterial time nor join the AIF (the VOF's sinus runs along the skull, and
    ``select_vof`` handles its motion voxel by voxel). Given ``scene`` too (the unenhanced
    head over the whole grid), voxels whose ``round_trip_loss`` exceeds MAX_CLUSTER_LOSS
    join no cluster.

    Returns ``VesselClusters``; a cluster's time to peak is inf when it is too small to be a
    vessel or not bolus-shaped.
    """
    peak = enhancement.max(axis=1)
    # A bolus passes: by the last frames a vessel is well below its peak, whereas a step
    # (bone sliding into the voxel after head motion) stays up. When no bright voxel has come
    # back down, the scan is too short to tell (truncated bolus) and every bright voxel stays.
    # The brightness threshold comes from the voxels that came back down, so that hundreds
    # of HU of bone at the brain's edge after head motion do not raise it above the arteries.
    returned = tail_level(enhancement) < RETURN_FRACTION * peak
    threshold = CANDIDATE_FRACTION * np.percentile(peak[returned] if returned.any() else peak,
                                                   99.9)
    bright = peak >= threshold
    candidates = np.flatnonzero(bright & returned if (bright & returned).any() else bright)
    if threshold <= 0 or candidates.size == 0:
        raise DataError(f"{source}: no arterial input candidate (no voxel enhances)")
    moved = motion_parameters is not None and edge is not None
    volume = np.zeros(shape, dtype=bool)
    volume[tuple(voxels[candidates].T)] = True
    loss = None
    if moved and scene is not None:
        # voxels the motion can change by more than their peak join no cluster: through 5 mm
        # slices they bridged the arteries, sinus and CSF into one cluster
        loss = round_trip_loss(peak, voxels, shape, spacing, motion_parameters, scene,
                               candidates)
        volume[tuple(voxels[candidates[loss > MAX_CLUSTER_LOSS]].T)] = False
    labels, n_clusters = ndimage.label(volume, structure=np.ones((3, 3, 3)))
    cluster_of = labels[tuple(voxels[candidates].T)]
    ttp = time_to_peak(times, enhancement[candidates])
    min_voxels = max(1, int(np.ceil(MIN_CLUSTER_MM3 / float(np.prod(spacing)))))
    sizes = np.bincount(cluster_of, minlength=n_clusters + 1)
    cosine, first_pass = bolus_shape(times, enhancement[candidates])
    labels_ok = [label for label in np.flatnonzero(sizes >= min_voxels) if label]
    shaped = [label for label in labels_ok
              if np.median(cosine[cluster_of == label]) >= MIN_BOLUS_SHAPE]
    cluster_ttp = np.full(n_clusters + 1, np.inf)
    for label in shaped or labels_ok:  # none bolus-shaped: keep them all, the fit will flag it
        cluster_ttp[label] = np.median(ttp[cluster_of == label])
    if not np.isfinite(cluster_ttp).any():
        raise DataError(f"{source}: no arterial input candidate (no vessel-sized cluster)")
    arterial_ttp = cluster_ttp.copy()
    if moved:
        artefact = motion.expected_artefact_hu(motion_parameters, edge, spacing,
                                               voxels[candidates])
        ratio = artefact / np.maximum(peak[candidates], 1e-6)
        steady = [label for label in labels_ok
                  if np.median(ratio[cluster_of == label]) <= MAX_ARTEFACT_TO_PEAK]
        if steady:  # else none steady: keep them all, the fit will flag it
            # bolus-shaped among them, else all of them: a jerk during the arterial first
            # pass can leave no artery bolus-shaped while CSF that bone moves into is
            arterial_ttp = np.full(n_clusters + 1, np.inf)
            for label in [label for label in steady if label in shaped] or steady:
                arterial_ttp[label] = np.median(ttp[cluster_of == label])
    return VesselClusters(candidates, cluster_of, ttp, cosine, peak[candidates], first_pass,
                          cluster_ttp, arterial_ttp, loss)


def arrival_reference_voxels(curves, voxels, spacing, motion_parameters, edge) -> np.ndarray:
    """Which ``curves`` (n, T) may time the bolus arrival (``curves.bolus_arrival_frame``): all
    but the bright ones (rising at least ARRIVAL_SCREEN_FRACTION of the arrival reference's
    weakest) that head motion can fill with more than MAX_ARTEFACT_TO_PEAK of their rise
    (``motion.expected_artefact_hu``, as for the AIF's clusters). Bone moving in and out of
    the CSF next to the skull outshone the arteries: with the head moving after the first pass at
    1.5 mm pixels the reference rose with the movement, arrival came 3 frames late, and the
    baseline held the arterial bolus (the arteries' curves -39 HU before it, AIF 110 HU, CBF
    +30 %; with a trial smoothing the AIF went to the sinus, CBF +215 %). All of them when no
    head motion is given, or when none would be left.
    """
    keep = np.ones(len(curves), bool)
    if motion_parameters is None or edge is None or not np.any(motion_parameters):
        return keep
    rise = curves.max(axis=1) - curves[:, 0]  # no (n, T) temporary
    n_ref = max(1, int(round(ARTERIAL_REFERENCE_FRACTION * len(rise))))
    bright = np.flatnonzero(rise >= ARRIVAL_SCREEN_FRACTION * np.partition(rise, -n_ref)[-n_ref])
    voxels = np.asarray(voxels)
    chunk = 100_000  # bounded memory: (chunk, T) displacements
    for start in range(0, len(bright), chunk):
        part = bright[start:start + chunk]
        artefact = motion.expected_artefact_hu(motion_parameters, edge, spacing, voxels[part])
        keep[part[artefact > MAX_ARTEFACT_TO_PEAK * rise[part]]] = False
    return keep if keep.any() else np.ones(len(curves), bool)


def vessel_curve(enhancement, voxels, chosen, times) -> VesselCurve:
    """Mean curve of the ``chosen`` rows, with its peak, time to peak and gamma-variate fit."""
    times = np.asarray(times, float)
    curve = enhancement[chosen].mean(axis=0)
    return VesselCurve(curve=curve.astype(np.float32), voxels=voxels[chosen],
                       peak_hu=float(curve.max()),
                       ttp_s=float(time_to_peak(times, curve[None])[0]),
                       fit=fit_gamma_variate(times, curve),
                       shape_score=float(bolus_shape(times, curve[None])[0][0]), times=times)


def _near(strength, reference):
    """Which ``strength`` lie within CENTRE_FRACTION of ``reference`` (and at most
    ``reference`` / CENTRE_FRACTION): a vessel's full-volume voxels."""
    return (strength >= CENTRE_FRACTION * reference) & (strength <= reference / CENTRE_FRACTION)


def _strongest(indices, strength, reference=None):
    """The members of ``indices`` ``_near`` ``reference`` (reaching CENTRE_FRACTION of the
    strongest when not given), strongest first."""
    keep = np.zeros(strength.shape, bool)
    if reference is not None and reference > 0:
        keep = _near(strength, reference)
    if not keep.any():  # no reference, or none near it (e.g. no positive area): the strongest
        keep = strength >= CENTRE_FRACTION * np.nanmax(strength)
    order = np.argsort(strength[keep])[::-1]
    return indices[keep][order][:MAX_AIF_VOXELS]


def _least_moved_half(motion_parameters, edge, spacing, voxels, among=slice(None)):
    """Which ``voxels`` (n, 3) expect a motion artefact (``motion.expected_artefact_hu``) no
    larger than the median of those selected by ``among``: the half that head motion can fill
    least with bone."""
    artefact = motion.expected_artefact_hu(motion_parameters, edge, spacing, voxels)
    return artefact <= np.median(artefact[among])


def select_aif(enhancement: np.ndarray, voxels: np.ndarray, shape, times, spacing,
               source: str = "image", clusters=None, motion_parameters=None,
               edge=None, scene=None) -> VesselCurve:
    """Pick the AIF among brain voxels: the strongest voxels of the earliest vessel clusters.

    ``enhancement`` (n, T) are the baseline-subtracted curves of the voxels at indices
    ``voxels`` (n, 3) of a volume of ``shape``; ``spacing`` in mm. ``clusters``: the result of
    ``vessel_clusters`` for these arguments, computed here when not given. With
    ``motion_parameters`` (T, 6), ``edge`` (``motion.edge_strength``) and ``scene`` (the
    unenhanced head over the whole grid), only voxels the motion keeps (their clusters'
    ``round_trip_loss`` at most MAX_ROUND_TRIP_LOSS) are taken, when there are any.
    """
    times = np.asarray(times, float)
    found = clusters or vessel_clusters(enhancement, voxels, shape, times, spacing, source,
                                        motion_parameters, edge, scene)
    arterial_ttp = found.arterial_ttp
    early = np.isin(found.cluster_of,
                    np.flatnonzero(arterial_ttp <= arterial_ttp.min() + EARLY_WINDOW_S))
    chosen, strength = found.candidates[early], found.peak[early]
    # After head motion, full-volume artery centres share one peak: the AIF_REFERENCE_RANK-th
    # highest stands for it, so that a few voxels far above it (bone moved in with the bolus)
    # cannot set the bar. Only then: at 4 mm pixels a still head has fewer centre voxels.
    moved = edge is not None and motion_parameters is not None
    vessel_shaped = found.shape[early] >= MIN_VOXEL_SHAPE
    if moved and scene is not None:  # the clusters' loss: they were found given the head too
        steady = found.loss[early] <= MAX_ROUND_TRIP_LOSS
        if steady.any():
            chosen, strength = chosen[steady], strength[steady]
            vessel_shaped = vessel_shaped[steady]
    reference = (np.sort(strength)[-min(AIF_REFERENCE_RANK, strength.size)] if moved
                 else strength.max())
    if moved and vessel_shaped.any():  # after the reference: it stands for all artery centres
        chosen, strength = chosen[vessel_shaped], strength[vessel_shaped]
    aif = vessel_curve(enhancement, voxels, _strongest(chosen, strength, reference), times)
    if aif.shape_score < MIN_BOLUS_SHAPE and moved:
        # Not bolus-shaped after head motion: try the half of the artery centres that the
        # motion can fill least with bone from the next slice, as for the VOF. At 0.45 mm
        # pixels a +130 HU step after a jerk in the strongest voxels (shape 0.86) made the
        # AIF's area 2.3x too large and every MTT 70 % low. Only then: applied to every moving
        # scan, it took 2 mm pixels' AIF to worse voxels (CBF +50 %).
        centre = _near(strength, reference)
        steady = _least_moved_half(motion_parameters, edge, spacing, voxels[chosen[centre]])
        retry = vessel_curve(enhancement, voxels, _strongest(
            chosen[centre][steady], strength[centre][steady], reference), times)
        if retry.shape_score > aif.shape_score:
            aif = retry
    return aif


def round_trip_loss(peak, voxels, shape, spacing, motion_parameters, scene,
                    rows) -> np.ndarray:
    """How much of their content head motion and its correction can change, at the ``rows``
    of ``peak`` (each voxel's peak enhancement, HU; voxel indices ``voxels``, of a volume of
    ``shape``): the largest change over the frames, as a fraction of a voxel's peak, that
    moving by each frame's motion and correcting back (``motion.round_trip_at``) makes to
    the unenhanced head ``scene`` (bone sliding in) plus to the image of peak enhancement
    (the vessel sliding out)."""
    image = np.zeros(shape, np.float32)
    image[tuple(voxels.T)] = peak
    at = voxels[rows]
    index = tuple(at.T)
    change = np.abs(motion.round_trip_at(scene, spacing, motion_parameters, at)
                    - np.asarray(scene, np.float32)[index][:, None])
    change += np.abs(motion.round_trip_at(image, spacing, motion_parameters, at)
                     - image[index][:, None])
    return change.max(axis=1) / np.maximum(image[index], 1e-6)


def select_vof(enhancement: np.ndarray, voxels: np.ndarray, shape, times, spacing,
               source: str = "image", clusters=None, baseline=None,
               motion_parameters=None, edge=None) -> VesselCurve | None:
    """Pick the venous output function: the largest first-pass voxels among the late,
    vessel-shaped voxels of the cluster holding most of them.

    Late = peaking more than EARLY_WINDOW_S after the earliest (arterial) cluster. A venous
    sinus is wide, so its centre is free of partial volume; its curve area is the reference
    for the AIF's. Returns None when no late voxel or cluster exists. ``clusters`` as for
    ``select_aif``; ``baseline``: the unenhanced image (HU), to keep the VOF away from bone. With
    ``motion_parameters`` (T, 6) and ``edge`` (``motion.edge_strength`` of the unenhanced
    head), the half of the sinus the head motion can fill with the most bone is left out.
    """
    times = np.asarray(times, float)
    found = clusters or vessel_clusters(enhancement, voxels, shape, times, spacing, source,
                                        motion_parameters, edge)
    cluster_of, cluster_ttp = found.cluster_of, found.cluster_ttp
    late = found.arterial_ttp.min() + EARLY_WINDOW_S
    # The VOF's voxels peak late and are vessel-shaped; its cluster is the one holding most of
    # them. Not the largest late cluster: one joining an artery to curves that through-plane
    # motion made of anatomy from beyond the slab (median shape 0.958) outgrew the sinus
    # (0.987) and made a step the VOF. Nor only clusters whose median voxel is a vessel:
    # after head motion the sinus can merge with a larger rim of bent CSF and cortex curves
    # (1x1x2.5 mm: 3596 voxels of median shape 0.969 lost to 42 CSF voxels; 2 mm pixels: 595
    # voxels, 195 of them sinus, below 0.95 counted as no vessel, the VOF one CSF voxel and
    # every CBF +7...+33 %); its voxels that do not look like a vein are left out.
    venous = (found.ttp > late) & (found.shape >= MIN_VOXEL_SHAPE)
    if venous.any():
        counts = np.bincount(cluster_of[venous], minlength=len(cluster_ttp))
        chosen = venous & (cluster_of == np.argmax(counts))
    else:  # no vessel-shaped late voxel: the largest late cluster, as it is
        late_labels = np.flatnonzero(np.isfinite(cluster_ttp) & (cluster_ttp > late))
        if late_labels.size == 0:
            return None
        sizes = np.bincount(cluster_of, minlength=len(cluster_ttp))
        chosen = cluster_of == late_labels[np.argmax(sizes[late_labels])]
    members, area = found.candidates[chosen], found.first_pass[chosen]
    # ranked by first-pass area (a plain integral would favour voxels at the sinus' bony edge,
    # where head motion adds a plateau), among voxels whose tail matches the sinus'
    curves = enhancement[members]
    tail = tail_level(curves) / curves.max(axis=1)
    common = np.abs(tail - np.median(tail)) <= VOF_TAIL_TOLERANCE
    if not common.any():  # two groups of tails, none at their median: no level to prefer
        common[:] = True
    if edge is not None and motion_parameters is not None:
        # A few sinus voxels next to bone can keep a bone plateau between two jerks after
        # correction; ranked by area they were chosen alone (4 voxels, VOF area +26 %, all
        # CBF -30 % on a 2 mm motion phantom). Keep the half that motion reaches least.
        common &= _least_moved_half(motion_parameters, edge, spacing, voxels[members], common)
    if baseline is not None and (baseline > BONE_HU).any():
        # and in the sinus' half farthest from bone: the sinus runs along the skull, and next
        # to bone the motion correction's interpolation across thick slices adds bone HU to
        # the whole curve (0.05 mm of through-plane motion: +12 HU), inflating its area
        from_bone = ndimage.distance_transform_edt(baseline <= BONE_HU, sampling=spacing)
        from_bone = from_bone[tuple(voxels[members].T)]
        common &= from_bone >= np.median(from_bone[common])
    area = area[common]
    return vessel_curve(enhancement, voxels, _strongest(
        members[common], area, np.percentile(area, VOF_REFERENCE_PERCENTILE)), times)


def venous_transit_fit(aif: VesselCurve, vof: VesselCurve) -> dict:
    """The VOF as the AIF dispersed by the brain: vof(t) = scale x (aif * h)(t), h a unit-area
    gamma kernel of ``shape`` and ``mean_transit_s``; returns those three and the fit's R².

    All contrast that enters the brain leaves through its veins, so a full-volume VOF is the
    true AIF convolved with such a kernel, and ``scale`` is the ratio of the true AIF's area to
    the measured one's: the partial-volume correction. The convolution carries the AIF's
    recirculation into the VOF as the veins do, and needs no area beyond the last frame. A
    ratio of first-pass gamma-variate areas counted the recirculation that overlaps the wider
    venous first pass: on a phantom with 20 % recirculation it gave 1.049 for a full-volume
    AIF (every CBF and CBV -5 %); this fit gives 0.998, kernel shape 4.06 and mean 4.81 s
    (truth 1, 4 and 4.8 s). The AIF between samples: ``continuous_aif``.
    """
    times = np.asarray(aif.times, float)
    step = VOF_FIT_STEP_S
    fine = np.arange(times[0], times[-1] + step, step)
    arterial = np.where(fine < times[0], 0.0,
                        continuous_aif(times, aif.curve)(np.clip(fine, times[0], times[-1])))
    tau = (np.arange(len(fine)) + 0.5) * step
    venous = np.asarray(vof.curve, float)

    def model(p):
        scale, shape, mean = p
        kernel = np.exp((shape - 1.0) * np.log(tau) - tau * shape / mean - gammaln(shape)
                        - shape * np.log(mean / shape)) * step
        dispersed = np.convolve(arterial, kernel)[: len(fine)]
        return scale * np.interp(times, fine + 0.5 * step, dispersed)

    lower, upper = zip(*VOF_FIT_BOUNDS)
    fit = least_squares(lambda p: model(p) - venous, VOF_FIT_START, bounds=(lower, upper),
                        loss="soft_l1", f_scale=max(0.02 * float(venous.max()), 1e-6))
    ss_res = float(((model(fit.x) - venous) ** 2).sum())
    ss_tot = float(((venous - venous.mean()) ** 2).sum())
    return {"scale": float(fit.x[0]), "shape": float(fit.x[1]), "mean_transit_s": float(fit.x[2]),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0}


def vof_scaling(aif: VesselCurve, vof: VesselCurve | None) -> tuple[float, dict | None, str | None]:
    """``vof_scale_factor``, the ``venous_transit_fit`` (None when not reached) and why the
    VOF cannot scale the AIF (None when it can)."""
    problem, transit = _vof_problem(aif, vof)
    if problem is None and transit["scale"] > MAX_VOF_SCALE:
        # Still the best area there is: unscaled, every CBF and CBV is that factor too high
        # (independent phantom, head jerk on the arterial upslope: AIF at 99 HU, VOF 3.4x, CBF
        # +180...+350 % unscaled).
        return transit["scale"], transit, (
            f"VOF: its area is {transit['scale']:.1f}x the AIF's (> {MAX_VOF_SCALE:.0f}x): the "
            "AIF is mostly partial volume or a small vessel; scaled, but check it")
    return (1.0 if problem else max(1.0, transit["scale"])), transit, problem


def _vof_problem(aif, vof):
    if vof is None:
        return "VOF: none found; the AIF is not corrected for partial volume", None
    if vof.shape_score < MIN_BOLUS_SHAPE:
        return (f"VOF: curve not bolus-shaped (score {vof.shape_score:.2f} < {MIN_BOLUS_SHAPE}; "
                "bone at the sinus edge after head motion?); not used"), None
    if min(aif.fit["r2"], vof.fit["r2"]) < MIN_FIT_R2:
        return (f"VOF: gamma-variate fit R2 {vof.fit['r2']:.2f} < {MIN_FIT_R2}; not used"
                if vof.fit["r2"] < MIN_FIT_R2 else "VOF: not used: the AIF's fit is poor"), None
    transit = venous_transit_fit(aif, vof)
    if transit["r2"] < MIN_FIT_R2:
        return (f"VOF: not the AIF dispersed (transit fit R2 {transit['r2']:.2f} < "
                f"{MIN_FIT_R2}); not used"), transit
    if transit["scale"] < MIN_VOF_SCALE:
        return (f"VOF: its area is only {transit['scale']:.2f}x the AIF's (< {MIN_VOF_SCALE}x: "
                "partial-volumed, or not a sinus); not used"), transit
    return None, transit


def vessel_problems(aif: VesselCurve, vof: VesselCurve | None) -> list[str]:
    """Quality flags of the AIF/VOF pair, empty when both look sound (``aif_problems`` and
    ``vof_scaling``'s reason, for a caller that needs only the flags)."""
    vof_problem = vof_scaling(aif, vof)[2]
    return aif_problems(aif) + ([vof_problem] if vof_problem else [])


def aif_problems(aif: VesselCurve) -> list[str]:
    """Quality flags of the AIF alone, empty when it looks sound."""
    problems = []
    if aif.fit["r2"] < MIN_FIT_R2:
        problems.append(f"AIF: gamma-variate fit R2 {aif.fit['r2']:.2f} < {MIN_FIT_R2}")
    if aif.peak_hu < MIN_AIF_PEAK_HU:
        problems.append(f"AIF: low arterial signal (peak {aif.peak_hu:.0f} HU < "
                        f"{MIN_AIF_PEAK_HU:.0f} HU)")
    if aif.shape_score < MIN_BOLUS_SHAPE:
        problems.append(f"AIF: curve not bolus-shaped (score {aif.shape_score:.2f} < "
                        f"{MIN_BOLUS_SHAPE}); head motion or a wrong vessel?")
    deficit, z = tail_deficit(aif.times, aif.curve)
    if deficit > MAX_TAIL_DEFICIT and z > TAIL_DEFICIT_Z:
        problems.append(f"AIF: ends {100 * deficit:.1f} % of its peak below its baseline (a "
                        "step from head motion?); CBF, CBV and the residue family may be biased")
    return problems


def tail_deficit(times, curve) -> tuple[float, float]:
    """How far the mean of the curve's last AIF_TAIL_FRACTION of the scan lies below 0, as a
    fraction of the peak (negative: above), and in standard errors. The noise is that of
    successive differences over those frames (a slow decay hardly adds to it); the standard
    error counts the baseline's too (the frames before the curve reaches a tenth of its
    peak), since a wrong baseline shifts the whole curve."""
    times, curve = np.asarray(times, float), np.asarray(curve, float)
    peak = float(curve.max())
    late = times >= times[-1] - AIF_TAIL_FRACTION * (times[-1] - times[0])
    if peak <= 0 or late.sum() < 3:
        return 0.0, 0.0
    noise = np.std(np.diff(curve[late])) / np.sqrt(2.0)
    n_baseline = max(1, int(np.argmax(curve >= 0.1 * peak)))
    error = noise * np.sqrt(1.0 / late.sum() + 1.0 / n_baseline)
    deficit = -float(curve[late].mean())
    return deficit / peak, (deficit / error if error > 0 else 0.0)


def vof_scale_factor(aif: VesselCurve, vof: VesselCurve | None) -> float:
    """Factor that gives the AIF the VOF's area (partial-volume correction):
    ``venous_transit_fit``'s scale.

    Never below 1: an artery can only lose signal to partial volume, so a smaller VOF means the
    VOF is the one partial-volumed. 1 when there is no VOF, either gamma-variate fit or the
    transit fit is poor (R² < MIN_FIT_R2), the VOF is not bolus-shaped (``bolus_shape`` below
    MIN_BOLUS_SHAPE: after head motion, bone at the sinus edge adds steps that inflate its
    area). A factor above MAX_VOF_SCALE is applied and flagged (``vof_scaling``).
    """
    return vof_scaling(aif, vof)[0]
