"""Automatic arterial input function (AIF) selection and gamma-variate quality scoring.

Idea (after Mouridsen 2006, adapted to CT): arteries are the voxels whose enhancement is high,
early and narrow. Candidates are the brain voxels enhancing at least ``CANDIDATE_FRACTION`` of the
robust maximum (this excludes tissue, which enhances ~20x less). Candidates form connected
clusters (vessel cross-sections); a venous sinus is also bright, often brighter than a
partial-volumed artery, but it peaks seconds later, so only clusters whose time to peak is within
``EARLY_WINDOW_S`` of the earliest cluster stay. From these, the most strongly enhancing voxels
(the centres of the largest arteries, least partial-volumed) are averaged. The mean curve is fitted
with a gamma variate over its first pass; R² of that fit is the quality score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import curve_fit

from bids_ctp.errors import DataError
from bids_ctp.perfusion.curves import time_to_peak

CANDIDATE_FRACTION = 0.3  # of the 99.9th percentile of peak enhancement in the brain
MIN_CLUSTER_MM3 = 2.0  # smaller bright clusters are noise or tiny vessels
EARLY_WINDOW_S = 2.0  # clusters peaking later than the earliest one + this are veins
CENTRE_FRACTION = 0.8  # keep voxels reaching this fraction of the best early voxel's peak
MAX_AIF_VOXELS = 40


@dataclass
class AIF:
    curve: np.ndarray  # enhancement (HU) at the frame times
    voxels: np.ndarray  # (n, 3) voxel indices of the voxels averaged
    peak_hu: float
    ttp_s: float
    fit: dict  # gamma-variate parameters (amplitude HU, t0 s, alpha, beta s) and r2


def gamma_variate(t, amplitude, t0, alpha, beta):
    """Peak-normalised gamma variate: ``amplitude`` at t0 + alpha·beta, 0 before t0."""
    x = np.clip((np.asarray(t, float) - t0) / (alpha * beta), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = amplitude * x**alpha * np.exp(alpha * (1.0 - x))
    return np.nan_to_num(y)


def fit_gamma_variate(times, curve) -> dict:
    """Fit the first pass (arrival to where the curve falls below 40 % of peak after it)."""
    t = np.asarray(times, float)
    c = np.asarray(curve, float)
    top = int(np.argmax(c))
    after = np.flatnonzero(c[top:] < 0.4 * c[top])
    end = top + (int(after[0]) if after.size else len(c) - top - 1)
    before = np.flatnonzero(c[: top + 1] < 0.1 * c[top])
    start = int(before[-1]) if before.size else 0
    t0_guess = t[start]
    guess = [c[top], t0_guess, 3.0, max((t[top] - t0_guess) / 3.0, 0.3)]
    window = slice(max(0, start - 2), end + 1)
    try:
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


def select_aif(enhancement: np.ndarray, voxels: np.ndarray, shape, times, spacing,
               source: str = "image") -> AIF:
    """Pick the AIF among brain voxels.

    ``enhancement`` (n, T) are the baseline-subtracted curves of the voxels at indices
    ``voxels`` (n, 3) of a volume of ``shape``; ``spacing`` in mm.
    """
    times = np.asarray(times, float)
    peak = enhancement.max(axis=1)
    threshold = CANDIDATE_FRACTION * np.percentile(peak, 99.9)
    candidates = np.flatnonzero(peak >= threshold)
    if threshold <= 0 or candidates.size == 0:
        raise DataError(f"{source}: no arterial input candidate (no voxel enhances)")
    volume = np.zeros(shape, dtype=bool)
    volume[tuple(voxels[candidates].T)] = True
    labels, n_clusters = ndimage.label(volume, structure=np.ones((3, 3, 3)))
    cluster_of = labels[tuple(voxels[candidates].T)]
    ttp = time_to_peak(times, enhancement[candidates])
    min_voxels = max(1, int(np.ceil(MIN_CLUSTER_MM3 / float(np.prod(spacing)))))
    sizes = np.bincount(cluster_of, minlength=n_clusters + 1)
    cluster_ttp = np.full(n_clusters + 1, np.inf)
    for label in np.flatnonzero(sizes >= min_voxels):
        if label:
            cluster_ttp[label] = np.median(ttp[cluster_of == label])
    if not np.isfinite(cluster_ttp).any():
        raise DataError(f"{source}: no arterial input candidate (no vessel-sized cluster)")
    early = np.isin(cluster_of, np.flatnonzero(cluster_ttp <= cluster_ttp.min() + EARLY_WINDOW_S))
    early_idx = candidates[early]
    early_peak = peak[early_idx]
    chosen = early_idx[early_peak >= CENTRE_FRACTION * early_peak.max()]
    chosen = chosen[np.argsort(peak[chosen])[::-1][:MAX_AIF_VOXELS]]
    curve = enhancement[chosen].mean(axis=0)
    return AIF(curve=curve.astype(np.float32), voxels=voxels[chosen], peak_hu=float(curve.max()),
               ttp_s=float(time_to_peak(times, curve[None])[0]),
               fit=fit_gamma_variate(times, curve))
