"""Deconvolution of tissue curves by the arterial input function (AIF).

Model (Østergaard 1996): C_t(t) = k ⊗ C_a (t), with k(t) = (rho / kH) · F · R(t), where R is the
residue function (R(0) = 1), F the flow per mass. After deconvolution, max k = (rho / kH) · F and
the time of that maximum is Tmax, the delay between AIF and tissue.

Methods (all vectorised: one pseudo-inverse per AIF, matrix products per chunk of voxels):

- ``ssvd``: truncated SVD of the lower-triangular convolution matrix (Østergaard 1996). Sensitive
  to tracer delay: on the phantom, CBF changes by 5-15 % over delays of -2..6 s, not
  monotonically, and tissue arriving before the AIF cannot be represented.
- ``nlr`` (default): least-squares fit of the delayed indicator-dilution model
  C_t(t) = k_max · ∫ C_a(τ - δ) R(t - τ; MTT) dτ. Truncated SVD cannot recover the step at the
  start of the residue from a smooth AIF: even with a perfect AIF and no noise it underestimates
  CBF by 20-40 % and delays Tmax by 1.5-2.5 s (measured on the phantom, README "Method"), so the
  default fits the model instead. The residue family (gamma-distributed transit times:
  exponential, gamma2, gamma3, gamma4, gamma6, box; or linear) is chosen once per scan by
  ``select_residue_shape``; a wrong family biases CBF by 25-150 %. Vectorised as a grid
  search: every (δ, MTT) pair on a grid gives one model curve; the best amplitude per voxel and
  pair is a dot product, so the whole search is one matrix product per chunk of voxels,
  followed by a finer local grid and a joint quadratic refinement of δ and log MTT (see
  ``fit_model``). Each voxel's baseline level is one more unknown of the fit. Works directly
  on the acquired (possibly non-uniform) frame times.
- ``csvd``: block-circulant SVD (Wu 2003): AIF and tissue are zero-padded to twice the length and
  the convolution is circular, so a delay shifts k without changing its height. Negative delays
  (tissue before the AIF) wrap to the end and are reported as negative Tmax.
- ``osvd``: block-circulant SVD with a per-voxel threshold (Wu 2003): k is computed for every
  threshold of the decreasing ladder ``OSVD_THRESHOLDS`` (0.40 ... 0.02 of the largest singular
  value; one product per chunk with the stacked pseudo-inverses) and each voxel keeps the
  smallest threshold whose k has an oscillation index OI = Σ|k[j] − 2k[j−1] + k[j−2]| / (L·k_max)
  below OI_max (indices circular, L = 2N; none below: the largest threshold). OI_max is given as
  ``OSVD_OI_BUDGET`` / L = 10 / L (0.091 for 55 frames at 1 s, 0.18 for 28 frames at 2 s), not
  Wu's fixed 0.035 for DSC-MRI: the true residue's own step contributes 2/L (exponential) or 4/L
  (box) to OI, so a fixed OI_max means a different strictness at every frame count. Measured on
  phantom curves (MTT 2-16 s x delay -2..6 s x exponential/box residue, CBV 4, 55 s scan;
  median CBF error over the grid; noise 1/2 HU on 200 copies): Wu's 0.035 gives -10/-19/-21 %
  (noise-free/1/2 HU) at 1 s and picks the 0.40 maximum at 2 s (-42 %); a budget of 10 gives
  -2/-2/-4 % at 1 s and +2/-12/-14 % at 2 s with the chosen threshold 0.02 noise-free and
  0.05-0.10 with noise. A budget of 15 overestimates CBF by 10-11 % at 1-2 HU (1 s; noise
  peaks in k), one of 6 underestimates it by 12-27 %.
- ``tikhonov``: block-circulant Tikhonov regularisation, SVD filter factors s / (s² + λ²) with
  λ = ``TIKHONOV_MU`` · s_max, μ = 0.07 fixed. On the same grid μ = 0.07 gives median CBF error
  -14/-5/+5 % (noise-free/1/2 HU) at 1 s and -11/-2/+9 % at 2 s; μ = 0.05 gives +23 % at 2 HU
  and μ = 0.10 -21 % noise-free, so 0.07 is centred on the 1-2 HU left after smoothing. The
  filter is smooth (no cut-off), so there is no Gibbs overshoot of a box residue, but the
  per-voxel adaptivity of oSVD is missing: CBF rises with noise.

Known biases of all three circulant methods on the phantom (real physics of regularised
deconvolution with a smooth AIF, not of the implementation): GM-like tissue (exponential
residue, MTT 4 s) noise-free is underestimated by 22 % (osvd), 36 % (tikhonov), 39 % (csvd) at
1 s; Tmax of an exponential residue is late by 1.7-2.5 s; a box residue gives Tmax +3 s (the
maximum of k lies inside its plateau) and osvd overestimates its CBF for MTT 3-16 s by up to
25 % at 1 s and 45 % at 2 s (Gibbs overshoot of the low threshold at the box edges). For MTT 12-16 s with delays of 4-6 s the scan cuts the tail,
and osvd's chosen threshold, hence CBF, changes by up to 9 percentage points with delay.

The convolution matrix uses the linear-interpolation quadrature (weights 1/6, 4/6, 1/6 of
neighbouring AIF samples), which assumes both AIF and residue vary linearly between samples and
recovers the plateau of k better than the rectangle rule. Singular values below
``threshold x`` the largest one are discarded (truncation); the defaults below were chosen on
the digital phantom after edge-preserving smoothing (see README, "Method").
"""
from __future__ import annotations

import numpy as np
from scipy.special import gammaincc

from bids_ctp.perfusion.aif import continuous_aif
from bids_ctp.perfusion.curves import parabolic_vertex

METHODS = ("nlr", "csvd", "ssvd", "osvd", "tikhonov")
# Relative singular-value cut-off per method (fraction of the largest singular value).
DEFAULT_THRESHOLD = {"csvd": 0.10, "ssvd": 0.20}
# oSVD: decreasing ladder of candidate thresholds; the oscillation-index limit is
# OI_max = OSVD_OI_BUDGET / L (L = 2N samples of the circulant k), 0.091 for 55 frames (docstring).
OSVD_THRESHOLDS = (0.40, 0.30, 0.20, 0.15, 0.10, 0.07, 0.05, 0.03, 0.02)
OSVD_OI_BUDGET = 10.0
# Tikhonov: lambda = TIKHONOV_MU x largest singular value (see docstring).
TIKHONOV_MU = 0.07
CHUNK_VOXELS = 65536  # voxels per matrix product; bounds memory to a few 10 MB per chunk


def convolution_matrix(aif: np.ndarray, dt: float, circulant: bool) -> np.ndarray:
    """Matrix A with (A @ k) ≈ (aif ⊗ k) sampled every ``dt`` s.

    Circulant: size 2N × 2N of the zero-padded AIF; otherwise N × N lower-triangular Toeplitz.
    """
    a = np.asarray(aif, dtype=np.float64)
    n = len(a)
    length = 2 * n if circulant else n
    padded = np.zeros(length + 2)
    padded[1 : n + 1] = a  # one zero on each side for the quadrature neighbours
    weighted = (padded[:-2] + 4.0 * padded[1:-1] + padded[2:]) / 6.0
    lag = np.subtract.outer(np.arange(length), np.arange(length))
    if circulant:
        return dt * weighted[lag % length]
    return dt * np.where(lag >= 0, weighted[np.clip(lag, 0, None)], 0.0)


def truncated_pinv(matrix: np.ndarray, threshold: float) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix)
    keep = s >= threshold * s[0]
    return (vt[keep].T / s[keep]) @ u[:, keep].T


def deconvolve(tissue: np.ndarray, aif: np.ndarray, dt: float, method: str = "csvd",
               threshold: float | None = None, *, mu: float | None = None,
               oi_max: float | None = None):
    """Deconvolve uniformly sampled tissue curves (n_voxels, N) by the AIF (N,).

    Returns ``flow`` = max k (1/s), ``tmax`` (s, sub-sample precision, parabolic refinement of
    the maximum) and ``area`` = ∫k dt (dimensionless, = CBV·rho/kH when the curve is complete).
    ``threshold`` applies to ``csvd``/``ssvd``, ``oi_max`` to ``osvd``, ``mu`` to ``tikhonov``
    (defaults: ``DEFAULT_THRESHOLD``, ``OSVD_OI_BUDGET`` / 2N, ``TIKHONOV_MU``).
    """
    if method not in METHODS or method == "nlr":
        raise ValueError(f"unknown deconvolution method {method!r}; choose from {METHODS}")
    if threshold is not None and method not in DEFAULT_THRESHOLD:
        raise ValueError(f"{method} takes no single threshold (csvd/ssvd only)")
    if method == "osvd":
        flow, tmax, area, _ = osvd(tissue, aif, dt, oi_max=oi_max)
        return flow, tmax, area
    if method == "tikhonov":
        pinv = tikhonov_pinv(convolution_matrix(aif, dt, True),
                             TIKHONOV_MU if mu is None else mu)
        return _deconvolve_with(tissue, pinv, len(aif), dt, circulant=True)
    if threshold is None:
        threshold = DEFAULT_THRESHOLD[method]
    circulant = method == "csvd"
    pinv = truncated_pinv(convolution_matrix(aif, dt, circulant), threshold)
    return _deconvolve_with(tissue, pinv, len(aif), dt, circulant)


def _deconvolve_with(tissue, pinv, n, dt, circulant):
    """k = pinv · tissue (zero-padded to 2N if circulant) in chunks; flow, tmax, area of k."""
    pinv = pinv.astype(np.float32)
    tissue = np.asarray(tissue, dtype=np.float32)
    flow = np.empty(len(tissue), dtype=np.float32)
    tmax = np.empty(len(tissue), dtype=np.float32)
    area = np.empty(len(tissue), dtype=np.float32)
    for start in range(0, len(tissue), CHUNK_VOXELS):
        chunk = tissue[start : start + CHUNK_VOXELS]
        if circulant:
            chunk = np.concatenate([chunk, np.zeros_like(chunk)], axis=1)
        sl = slice(start, start + len(chunk))
        flow[sl], tmax[sl], area[sl] = _summarise_residue(chunk @ pinv.T, n, dt, circulant)
    return flow, tmax, area


def _summarise_residue(k, n, dt, circulant):
    """Height and time of the maximum of every row of k (parabolic refinement), and its area."""
    length = k.shape[1]
    peak = np.argmax(k, axis=1)
    rows = np.arange(len(k))
    if circulant:  # neighbours wrap around the circular time axis
        prev, nxt = k[rows, peak - 1], k[rows, (peak + 1) % length]
        lag = np.where(peak < n, peak, peak - length).astype(np.float64)
    else:
        prev, nxt = k[rows, np.maximum(peak - 1, 0)], k[rows, np.minimum(peak + 1, n - 1)]
        lag = peak.astype(np.float64)
    top = k[rows, peak]
    vertex = parabolic_vertex(lag - 1, lag, lag + 1, prev, top, nxt)
    if not circulant:  # a maximum at either end of a causal k cannot be refined
        edge = (peak == 0) | (peak == n - 1)
        vertex = np.where(edge, lag, vertex)
    # height of the parabola at its vertex (equals ``top`` when no refinement was possible)
    shift = vertex - lag
    curvature = 0.5 * (prev + nxt) - top
    flow = np.where(shift == 0, top, top + 0.5 * (nxt - prev) * shift + curvature * shift**2)
    return flow, vertex * dt, k.sum(axis=1) * dt


# ---------------------------------------------------------------- oSVD and Tikhonov (circulant)
def oscillation_index(k: np.ndarray) -> np.ndarray:
    """Oscillation index of Wu et al. 2003 along the last axis of ``k``.

    OI = (1 / (L · k_max)) · Σ_j |k[j] − 2 k[j−1] + k[j−2]| with circular indices (j − 1, j − 2
    taken modulo L), so a circular shift of k (a tracer delay in the block-circulant frame) does
    not change OI. Rows whose maximum is not positive get OI = inf (no shape to judge).
    """
    k = np.asarray(k)
    second = k - 2.0 * np.roll(k, 1, axis=-1) + np.roll(k, 2, axis=-1)
    peak = k.max(axis=-1)
    total = np.abs(second).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        oi = total / (k.shape[-1] * peak)
    return np.where(peak > 0, oi, np.inf)


def osvd(tissue: np.ndarray, aif: np.ndarray, dt: float, thresholds=OSVD_THRESHOLDS,
         oi_max: float | None = None):
    """Block-circulant SVD with a per-voxel threshold chosen by the oscillation index (Wu 2003).

    For every voxel, k is computed at every threshold of ``thresholds`` (one matrix product per
    chunk with the stacked pseudo-inverses); the smallest threshold whose k has
    ``oscillation_index`` < ``oi_max`` is kept, or the largest threshold when none qualifies.
    ``oi_max`` defaults to ``OSVD_OI_BUDGET / L`` with L = 2 · len(aif).
    Returns ``flow``, ``tmax``, ``area`` (as ``deconvolve``) and the chosen ``threshold``.
    """
    ladder = np.sort(np.asarray(thresholds, dtype=np.float64))[::-1]  # decreasing
    n_thr = len(ladder)
    n = len(aif)
    if oi_max is None:
        oi_max = OSVD_OI_BUDGET / (2 * n)
    u, s, vt = np.linalg.svd(convolution_matrix(aif, dt, circulant=True))
    inverse = np.where(s[None, :] >= ladder[:, None] * s[0], 1.0 / s[None, :], 0.0)  # (T, L)
    length = len(s)
    # row block j of ``stacked`` is the truncated pseudo-inverse at ladder[j]
    stacked = ((vt.T[None] * inverse[:, None, :]) @ u.T).reshape(n_thr * length, length)
    stacked = stacked.astype(np.float32)
    tissue = np.asarray(tissue, dtype=np.float32)
    flow = np.empty(len(tissue), dtype=np.float32)
    tmax = np.empty(len(tissue), dtype=np.float32)
    area = np.empty(len(tissue), dtype=np.float32)
    chosen = np.empty(len(tissue))
    chunk_size = max(1, CHUNK_VOXELS // n_thr)  # the same memory as one csvd chunk
    for start in range(0, len(tissue), chunk_size):
        chunk = tissue[start : start + chunk_size]
        chunk = np.concatenate([chunk, np.zeros_like(chunk)], axis=1)
        k_all = (chunk @ stacked.T).reshape(len(chunk), n_thr, length)
        ok = oscillation_index(k_all) < oi_max  # (voxels, thresholds)
        # last acceptable entry of the decreasing ladder = smallest acceptable threshold
        last = n_thr - 1 - np.argmax(ok[:, ::-1], axis=1)
        pick = np.where(ok.any(axis=1), last, 0)
        k = np.take_along_axis(k_all, pick[:, None, None], axis=1)[:, 0]
        sl = slice(start, start + len(chunk))
        flow[sl], tmax[sl], area[sl] = _summarise_residue(k, n, dt, circulant=True)
        chosen[sl] = ladder[pick]
    return flow, tmax, area, chosen


def tikhonov_pinv(matrix: np.ndarray, mu: float) -> np.ndarray:
    """Tikhonov-regularised inverse V · diag(s / (s² + λ²)) · Uᵀ with λ = mu · s_max."""
    u, s, vt = np.linalg.svd(matrix)
    lam = mu * s[0]
    return (vt.T * (s / (s * s + lam * lam))) @ u.T


# Model-fit grid: delays (s) and mean transit times (s, logarithmic).
FIT_DELAYS = np.arange(-3.0, 12.01, 0.5)
FIT_MTTS = np.geomspace(1.0, 30.0, 24)
FIT_FINE_DT = 0.05  # s, time step of the model convolution


# Residue families of the model fit: transit times gamma-distributed with this shape parameter
# (1: exponential residue, the one-compartment model; inf: a single transit time, box residue),
# and "linear", transit times spread evenly over [0, 2 MTT]: R = 1 - τ / (2 MTT). Without it, a
# phantom with a linear residue was fitted with gamma4, CBF -3...-13 % and MTT +4...+17 %
# (worse the longer the MTT); with it, within 2 % (tests/test_deconvolution_methods.py).
# gamma3: without it, shape-3 tissue took gamma4 (CBF -8...-6 %; on the independent phantom,
# sampled every 2 s, GM CBF -10 %) and within 2 % with it (benchmarks/residue_shapes.py).
# gamma6: without it, shapes 5 and 6 took gamma4 (CBF +5...+17 %) and shapes 8 and 10 linear
# (+25...+33 %); with it -3...-5 / 0 / +4...+10 / +7...+12 % (benchmarks/residue_shapes.py,
# tests/test_deconvolution_methods.py). A rung nearer the box (gamma8 or gamma9) fixed shapes
# 8-10 too, but under head motion box tissue then took it by 0.002-0.008 of the score (GM CBF
# +23 % with gamma9): not adopted.
GAMMA_SHAPE = {"exponential": 1.0, "gamma2": 2.0, "gamma3": 3.0, "gamma4": 4.0, "gamma6": 6.0,
               "box": np.inf}
RESIDUE_SHAPES = (*GAMMA_SHAPE, "linear")
LOCAL_SPLIT = (4, 2)  # local grid of fit_model: (centroid, MTT) steps per coarse step
# local-grid steps on each side of the coarse optimum, in c (0.375 s: the coarse optimum's c
# is within a quarter of a delay step) and in MTT (4 coarse steps: across the valley a 0.5 s
# delay step is a whole second of MTT along it for a box, so the coarse optimum can be 3 MTT
# steps from the true one)
LOCAL_REACH = (3, 8)
BASIS_DELAY_SPLIT = 160  # delay resolution of fit_model's basis: 0.003 s for 0.5 s steps
# for the residue family's choice 0.03 s is enough (the local grid's centroid step is 0.125 s)
# and builds the families' bases in a tenth of the time
SHAPE_SELECTION_DELAY_SPLIT = 16
SHAPE_SELECTION_VOXELS = 20000  # tissue curves used to choose the residue family
VESSEL_FRACTION = 0.2  # curves peaking above this fraction of the AIF are vessels, not tissue
SHAPE_OUTLIER_RSS = 2.0  # curves fitted this much worse than the median are not tissue


def residue(tau: np.ndarray, mtt: float, shape: str = "exponential",
            step: float = 0.0) -> np.ndarray:
    """Residue function R(τ) of mean transit time ``mtt`` for a family of RESIDUE_SHAPES.

    ``step`` > 0: the box is averaged over the cell of that width centred on each τ, so it
    changes smoothly with ``mtt`` (point samples moved its edge in FIT_FINE_DT jumps, 2.5 % of
    a 2 s MTT, which left the fit's score surface ragged along the delay-MTT valley).
    """
    if shape == "linear":
        return np.clip(1.0 - tau / (2.0 * mtt), 0.0, 1.0)
    k = GAMMA_SHAPE[shape]
    if np.isinf(k):
        if step > 0:
            return np.clip((mtt - (tau - 0.5 * step)) / step, 0.0, 1.0)
        return (tau < mtt).astype(float)
    return gammaincc(k, k * np.clip(tau, 0, None) / mtt)


def model_curves(times, aif_times, aif, delays=FIT_DELAYS, mtts=FIT_MTTS,
                 shape="exponential") -> np.ndarray:
    """Noise-free tissue curves of the delayed model with unit k_max.

    Shape (len(delays), len(mtts), len(times)): ∫ C_a(τ - δ) R(t - τ; MTT) dτ at ``times``.
    """
    fine = np.arange(aif_times[0] - delays.max() - FIT_FINE_DT, times[-1] - delays.min() + 1.0,
                     FIT_FINE_DT)
    inside = np.clip(fine, aif_times[0], aif_times[-1])
    aif_fine = np.where(fine < aif_times[0], 0.0, continuous_aif(aif_times, aif)(inside))
    tau = (np.arange(len(fine)) + 0.5) * FIT_FINE_DT  # residue averaged over each step
    # conv[n] pairs the AIF at fine[n] - k·dt with the residue at (k + 1/2)·dt: it is the
    # tissue curve at fine[n] + dt/2 (read at fine[n], every delay came out 0.025 s late and
    # short box residues, whose fit hinges on 1 % of the curve, up to 15 % off in CBF)
    at = fine + 0.5 * FIT_FINE_DT
    out = np.empty((len(delays), len(mtts), len(times)))
    for j, mtt in enumerate(mtts):
        kernel = residue(tau, mtt, shape, FIT_FINE_DT) * FIT_FINE_DT
        conv = np.convolve(aif_fine, kernel)[: len(fine)]
        out[:, j] = np.interp(times[None, :] - delays[:, None], at, conv, left=0.0)
    return out


def _model_basis(times, aif_times, aif, delays, mtts, shape):
    basis = model_curves(np.asarray(times, float), np.asarray(aif_times, float),
                         np.asarray(aif, float), delays, mtts, shape)
    basis = basis.reshape(len(delays) * len(mtts), -1).astype(np.float32)
    return basis, np.maximum((basis * basis).sum(axis=1), 1e-12)


def select_residue_shape(tissue: np.ndarray, times, aif_times, aif, delays=FIT_DELAYS,
                         mtts=FIT_MTTS, nuisance=None, weights=None,
                         noise_floor: float = 0.0, baseline_offset=True) -> tuple[str, dict]:
    """The residue family that explains the scan's tissue curves best, with each one's score:
    the mean over the tissue curves of its log-likelihood relative to the curve's best family
    (<= 0; the chosen family's is the largest). How far the runner-up trails is no measure of
    correctness: 0.3-0.9 on most phantoms, 0.06-0.10 on the 2 s linear-residue phantom (right
    when still, wrong under motion) and on a clean 3-slice exponential one (right).

    One family per scan: per voxel, noise makes the families hard to tell apart (and a wrong
    family biases CBF by 25-150 %), while over thousands of tissue curves the best family
    stands out clearly. A family's score is the sum over voxels of its profile log-likelihood
    (Gaussian noise of unknown SD per voxel: -n/2 log RSS) relative to the voxel's best family,
    over the curves whose best fit leaves at most SHAPE_OUTLIER_RSS times the median residual:
    a voxel no family fits (a motion-damaged edge, where the residual is not noise) then cannot
    outvote thousands of ordinary ones. Summed explained squares over all voxels picked the box
    family for exponential tissue under 2 mm head motion, and the exponential one for box
    tissue. Each family's residual is that of its full fit (``fit_model``'s local grid): the
    coarse grid alone leaves a grid error that is smaller for smooth families, which won a
    noise-free box-residue phantom sampled every 2 s for the linear family (CBF +50 %).
    ``noise_floor``: a per-frame variance (HU²) added to every residual, the part no family
    can explain (``rounding_floor``). ``nuisance``, ``weights``: the per-voxel motion
    regressors and frame weights, and ``baseline_offset``, of :func:`fit_model`. Vessel curves
    are left out so they do not dominate.
    """
    tissue = np.asarray(tissue, dtype=np.float32)
    keep = tissue.max(axis=1) < VESSEL_FRACTION * float(np.max(aif))
    if not keep.any():  # e.g. a weak, cut-off AIF: no curve is clearly tissue, use them all
        keep[:] = True
    step = max(1, int(keep.sum()) // SHAPE_SELECTION_VOXELS)
    sample = np.flatnonzero(keep)[::step]  # indices: no copy of every kept curve first
    tissue = tissue[sample]
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)[sample]
    if nuisance is not None:
        nuisance = np.asarray(nuisance)[sample]
    # what the regressors (and the baseline offset) alone explain is no family's residual
    residual, regressors = _fit_inputs(tissue, nuisance, weights, baseline_offset)
    if regressors is not None:
        residual = _without_regressor(residual, regressors, weights)
    total = np.einsum("ij,ij->i", residual if weights is None else weights * residual, residual)
    # frames a voxel weighs less carry less of its evidence
    n_frames = (np.full(len(tissue), float(tissue.shape[1])) if weights is None
                else weights.sum(axis=1, dtype=np.float64))
    rss = []
    for shape in RESIDUE_SHAPES:
        explained = np.empty(len(tissue), dtype=np.float32)
        fit_model(tissue, times, aif_times, aif, delays, mtts, shape, nuisance, weights,
                  explained_out=explained, delay_split=SHAPE_SELECTION_DELAY_SPLIT,
                  baseline_offset=baseline_offset)
        rss.append(np.maximum(total - explained, 1e-6 * np.maximum(total, 1e-12)))
    rss = np.stack(rss, axis=1) + (n_frames * noise_floor)[:, None]
    best = rss.min(axis=1)
    inlier = best <= SHAPE_OUTLIER_RSS * np.median(best)
    loglik = -0.5 * n_frames[inlier, None] * np.log(rss[inlier])
    relative = (loglik - loglik.max(axis=1, keepdims=True)).mean(axis=0)
    scores = dict(zip(RESIDUE_SHAPES, relative.tolist()))
    return max(scores, key=scores.get), scores


def rounding_floor(noise_sd: float, step: float = 1.0) -> float:
    """Per-frame variance (HU²) of the rounding of stored values to ``step`` (CT: whole HU)
    that noise of SD ``noise_sd`` (the series as acquired) leaves undithered.

    Noise dithers rounding: the mean rounding error at a given true value is periodic with
    amplitude damped by exp(-2 π² σ² / step²) (the Gaussian's characteristic function), so it
    vanishes from 0.5 HU of noise on and then averages away with the noise. Without noise every
    voxel of a region rounds its identical curve the same way, and that shared error decides
    the residue family by chance: on a noise-free box-residue phantom (2 s sampling) the
    white matter's 8 HU curve, fitted better by the linear family, outvoted the rest (CBF +50 %).
    """
    damping = np.exp(-2.0 * np.pi**2 * (float(noise_sd) / step) ** 2)
    return float(step * step / 12.0 * damping * damping)


def _orthonormal(nuisance, weights=None):
    """Per-voxel nuisance regressors (voxels, frames) or (voxels, k, frames), made orthonormal
    under each voxel's weights (Gram-Schmidt), as (voxels, k, frames). Rows that are 0, or that
    the earlier regressors already span, come out 0."""
    q = np.array(nuisance, dtype=np.float32)
    if q.ndim == 2:
        q = q[:, None]
    w = np.ones_like(q[:, 0]) if weights is None else np.asarray(weights, np.float32)
    for i in range(q.shape[1]):
        before = np.sqrt(np.einsum("ij,ij->i", w * q[:, i], q[:, i]))
        for j in range(i):
            q[:, i] -= np.einsum("ij,ij->i", w * q[:, i], q[:, j])[:, None] * q[:, j]
        norm = np.sqrt(np.einsum("ij,ij->i", w * q[:, i], q[:, i]))
        ok = norm > 1e-3 * before
        q[:, i] *= np.where(ok, 1.0 / np.where(ok, norm, 1.0), 0.0)[:, None]
    return q


def _without_regressor(curves, regressors, weights=None):
    """Each curve minus its (weighted) least-squares projection on its own regressor rows
    (``_orthonormal`` output; rows whose regressors are 0 unchanged)."""
    out = curves
    for i in range(regressors.shape[1]):
        q = regressors[:, i]
        wq = q if weights is None else weights * q
        out = out - np.einsum("ij,ij->i", curves, wq).astype(curves.dtype)[:, None] * q
    return out


def _fit_inputs(curves, nuisance, weights, baseline_offset):
    """Curves and orthonormal nuisance regressors (or None) of some voxels for the least
    squares. With ``baseline_offset``, each voxel's baseline level is one more unknown:
    unweighted, by centring curves and regressors (the caller centres the model basis once);
    weighted, as a regressor of ones."""
    if baseline_offset and weights is None:
        curves = curves - curves.mean(axis=1, keepdims=True)
        if nuisance is not None:
            nuisance = np.asarray(nuisance, np.float32)
            nuisance = nuisance - nuisance.mean(axis=-1, keepdims=True)
    elif baseline_offset:
        ones = np.ones((len(curves), 1, curves.shape[1]), np.float32)
        nuisance = ones if nuisance is None else np.concatenate(
            [ones, np.asarray(nuisance, np.float32).reshape(len(curves), -1, curves.shape[1])],
            axis=1)
    return curves, (None if nuisance is None else _orthonormal(nuisance, weights))


def _explained(tissue, basis, norm2, nuisance=None, weights=None):
    """Per voxel and model curve: sum of squares the model explains, and its amplitude.

    ``basis`` (curves, frames) is shared by all voxels, ``norm2`` its squared norms. With
    nuisance regressors per voxel (``_orthonormal``, same frames), the model and the regressors
    are fitted jointly and the score is what the model explains beyond them (the model curve
    and the tissue curve are both orthogonalised against them). With ``weights``
    (voxels, frames), the least squares are weighted (frames a voxel's motion artefact may
    dominate count less): every inner product becomes sum_t w_t a_t b_t, two matrix products
    instead of one. Negative amplitudes score 0.
    """
    if weights is None:
        norm2 = np.broadcast_to(norm2, (len(tissue), len(norm2)))
    else:
        norm2 = weights @ (basis * basis).T
    residual = tissue if nuisance is None else _without_regressor(tissue, nuisance, weights)
    proj = (residual if weights is None else weights * residual) @ basis.T  # (voxels, curves)
    if nuisance is not None:
        reduced = norm2
        for i in range(nuisance.shape[1]):
            q = nuisance[:, i]
            cross = (q if weights is None else weights * q) @ basis.T  # regressor · model curve
            reduced = reduced - cross * cross
        norm2 = np.maximum(reduced, 1e-6 * norm2)
    amplitude = proj / norm2
    return np.where(amplitude > 0, proj * amplitude, 0.0), amplitude


def _vertex_2d(score, i, j, max_step=0.5):
    """Offsets (grid steps, each within ±max_step) of the maximum of the quadratic through the
    3 x 3 scores around (i, j) of every voxel's (delays, MTTs) score table; 0 where that
    quadratic has no maximum. Joint in both axes because delay and MTT trade off along a
    tilted ridge (the tissue curve's centroid is fixed), where separate parabolas in each axis
    missed the optimum by up to 14 % in CBF for delays between grid points."""
    rows = np.arange(len(score))

    def at(di, dj):
        return score[rows, i + di, j + dj].astype(np.float64)

    gx, gy = (at(1, 0) - at(-1, 0)) / 2, (at(0, 1) - at(0, -1)) / 2
    hxx, hyy = at(1, 0) - 2 * at(0, 0) + at(-1, 0), at(0, 1) - 2 * at(0, 0) + at(0, -1)
    hxy = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / 4
    det = hxx * hyy - hxy * hxy
    peak = (hxx < 0) & (det > 0)
    safe = np.where(peak, det, 1.0)
    dx = np.where(peak, (hxy * gy - hyy * gx) / safe, 0.0)
    dy = np.where(peak, (hxy * gx - hxx * gy) / safe, 0.0)
    return np.clip(dx, -max_step, max_step), np.clip(dy, -max_step, max_step)


def fit_model(tissue: np.ndarray, times, aif_times, aif, delays=FIT_DELAYS, mtts=FIT_MTTS,
              shape="exponential", nuisance=None, weights=None, explained_out=None,
              delay_split=BASIS_DELAY_SPLIT, baseline_offset=True):
    """Least-squares fit of the delayed model (residue family ``shape``) to every tissue curve.

    Coarse-to-fine grid search: the best (delay, MTT) pair of the coarse grid (``delays``
    evenly spaced, ``mtts`` evenly spaced in log), then the best of a local grid around it in
    (c, log MTT), then the vertex of a joint quadratic through the local scores
    (``_vertex_2d``). c = delay + slope x MTT, with the slope of the valley along which delay
    and MTT trade off (``_valley_slope``: about 1/2 for a box, 1 for a short exponential
    residue, where the curve's centroid is what the data fix). For short box residues that
    valley is narrower than any affordable delay step, so a local grid in (delay, MTT) let the
    best point sit 1-2 steps along it from the optimum (noise-free MTT 2 s box: CBF up to
    +15 %, MTT -13 %). In (c, MTT) the valley lies along a grid axis and the score is close
    to quadratic over the stencil. The local grid has ``LOCAL_SPLIT`` times the coarse
    resolution and reaches ``LOCAL_REACH`` of its steps on each side; its delays are read from
    a basis ``delay_split`` times finer than the coarse grid.
    ``nuisance``: optional (voxels, frames) or (voxels, k, frames) regressors fitted jointly,
    per voxel (the residual head-motion artefact, ``motion.residual_motion_regressor``);
    ``weights``: optional (voxels, frames) weights of a weighted least-squares fit
    (``motion.artefact_weights``). ``explained_out``: optional float32 array (voxels,) that
    receives the sum of squares the best curve of each voxel's local grid explains.
    ``baseline_offset``: fit a constant per voxel too, the error of the subtracted baseline.
    That baseline is the mean of the few frames before the AIF's arrival, and its noise shifts
    the whole curve, which the model reads as a tail (MTT and CBV of late, long, low curves
    such as the ischemic core's). Fitted jointly, the level is set by every frame before the
    voxel's own bolus and by the tail the model expects: noisy phantom curves with 0.5 HU per
    frame, CBV spread 15 -> 11 % (core, MTT 9 s, 4 s late), 4.0 -> 2.7 % (grey matter).
    Returns ``flow`` (k_max, 1/s), ``delay`` (s; the Tmax, as every family's residue is
    largest at τ = 0) and ``mtt`` (s).
    """
    delays, log_mtts = np.asarray(delays, float), np.log(np.asarray(mtts, float))
    nd, nm = len(delays), len(log_mtts)
    fine_delays = np.linspace(delays[0], delays[-1], (nd - 1) * delay_split + 1)
    fine_log_mtts = np.linspace(log_mtts[0], log_mtts[-1], (nm - 1) * LOCAL_SPLIT[1] + 1)
    fine, fine_norm2 = _model_basis(times, aif_times, aif, fine_delays, np.exp(fine_log_mtts),
                                    shape)
    fine = fine.reshape(len(fine_delays), len(fine_log_mtts), -1)
    fine_norm2 = fine_norm2.reshape(fine.shape[:2])
    slope = _valley_slope(fine, fine_delays, np.exp(fine_log_mtts))
    tissue = np.asarray(tissue, dtype=np.float32)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
    # Voxels without regressors and of weight 1 in every frame (under motion: the deep tissue
    # away from the edges the motion moves, 2/3 of the brain on the 2 mm motion phantom) take
    # the plain least squares: the same fit, without the weighted fit's second matrix products
    plain = _plain_rows(len(tissue), nuisance, weights)
    # the fine basis of each kind of voxel; unweighted fits with a baseline offset take it
    # without the offset's part (_fit_inputs), weighted ones as it is
    unweighted = fine, fine_norm2
    if baseline_offset:
        centred = fine - fine.mean(axis=-1, keepdims=True)
        unweighted = centred, np.maximum((centred * centred).sum(axis=-1), 1e-12)
    bases = {True: unweighted, False: unweighted if weights is None else (fine, fine_norm2)}
    # the coarse grid is a subset of the fine one
    coarse = (slice(None, None, delay_split), slice(None, None, LOCAL_SPLIT[1]))
    centroid_step = (delays[1] - delays[0]) / LOCAL_SPLIT[0]
    log_mtt_step = fine_log_mtts[1] - fine_log_mtts[0]
    delay_step = fine_delays[1] - fine_delays[0]
    rc, rm = LOCAL_REACH
    reach_c, reach_m = np.arange(-rc, rc + 1), np.arange(-rm, rm + 1)  # local grid offsets

    def local_grid(i, j, fine, fine_norm2):
        """The local grid around coarse optimum (delay i, MTT j), shared by every voxel whose
        coarse optimum it is: its curves (c x MTT, frames) in ``fine``, their norms, c values,
        MTTs and the valley slope."""
        jf = j * LOCAL_SPLIT[1]  # index into the fine MTTs
        kappa = slope[jf]
        c = delays[i] + kappa * np.exp(fine_log_mtts[jf]) + reach_c * centroid_step
        mj = np.clip(jf, rm, len(fine_log_mtts) - 1 - rm) + reach_m
        local_mtt = np.exp(fine_log_mtts[mj])
        di = np.clip(np.rint((c[:, None] - kappa * local_mtt - fine_delays[0]) / delay_step)
                     .astype(int), 0, len(fine_delays) - 1)
        dj = np.broadcast_to(mj, di.shape)
        return (np.ascontiguousarray(fine[di, dj].reshape(-1, fine.shape[-1])),
                fine_norm2[di, dj].ravel(), c, local_mtt, kappa)

    def inputs_of(rows, kind):
        """The rows' curves, nuisance regressors and weights (``_fit_inputs``; none for
        ``plain`` rows); per chunk, so a whole-brain series' curves and regressors are never
        copied whole."""
        w = None if kind or weights is None else weights[rows]
        q = None if kind or nuisance is None else nuisance[rows]
        return (*_fit_inputs(tissue[rows], q, w, baseline_offset), w)

    flow = np.empty(len(tissue), dtype=np.float32)
    delay = np.empty(len(tissue), dtype=np.float32)
    mtt = np.empty(len(tissue), dtype=np.float32)
    # coarse optimum of every voxel, in chunks whose (voxels x 744 curves) scores stay in
    # cache (twice as fast as 64 k voxels)
    best = np.empty(len(tissue), dtype=np.int64)
    chunk_size = max(1, CHUNK_VOXELS // 16)
    for kind, (fine_k, fine_norm2_k) in bases.items():
        of_kind = np.flatnonzero(plain == kind)
        if not len(of_kind):  # e.g. a still scan: every voxel is plain
            continue
        basis = np.ascontiguousarray(fine_k[coarse]).reshape(nd * nm, -1)
        norm2 = fine_norm2_k[coarse].ravel()
        for start in range(0, len(of_kind), chunk_size):
            rows = of_kind[start : start + chunk_size]
            curves, q, w = inputs_of(rows, kind)
            score, _ = _explained(curves, basis, norm2, q, w)
            best[rows] = np.argmax(score, axis=1)
    # voxels with the same coarse optimum share their local grid: one matrix product each
    order = np.argsort(best, kind="stable")
    for group, kind in ((g[plain[g] == kind], kind) for g in
                        np.split(order, np.flatnonzero(np.diff(best[order])) + 1)
                        for kind in (True, False)):
        if not len(group):
            continue
        local_basis, local_norm2, c, local_mtt, kappa = local_grid(
            *divmod(int(best[group[0]]), nm), *bases[kind])
        for start in range(0, len(group), chunk_size):
            rows = group[start : start + chunk_size]
            curves, q, w = inputs_of(rows, kind)
            local_score, local_amp = _explained(curves, local_basis, local_norm2, q, w)
            a, b = np.divmod(np.argmax(local_score, axis=1), len(reach_m))
            if explained_out is not None:
                explained_out[rows] = local_score.max(axis=1)
            area = local_amp[np.arange(len(rows)), a * len(reach_m) + b] * local_mtt[b]
            # the vertex needs a full 3 x 3 neighbourhood inside the local grid
            a, b = np.clip(a, 1, len(reach_c) - 2), np.clip(b, 1, len(reach_m) - 2)
            step_c, step_m = _vertex_2d(
                local_score.reshape(len(rows), len(reach_c), len(reach_m)), a, b)
            mtt[rows] = local_mtt[b] * np.exp(step_m * log_mtt_step)
            delay[rows] = c[a] + step_c * centroid_step - kappa * mtt[rows]
            # the area k_max·MTT is well determined by the data; keep it while refining MTT
            flow[rows] = np.where(area > 0, area / mtt[rows], 0.0)
    return flow, delay, mtt


def _plain_rows(n: int, nuisance, weights) -> np.ndarray:
    """Which of ``n`` voxels have no nuisance regressor (all 0) and weight 1 in every frame."""
    plain = np.ones(n, dtype=bool)
    for start in range(0, n, CHUNK_VOXELS):  # no whole-brain boolean temporaries
        rows = slice(start, start + CHUNK_VOXELS)
        if weights is not None:
            plain[rows] &= (np.asarray(weights[rows]) == 1).all(axis=1)
        if nuisance is not None:
            q = np.asarray(nuisance[rows])
            plain[rows] &= ~q.reshape(len(q), -1).any(axis=1)
    return plain


def _valley_slope(basis, delays, mtts, at_delay=1.0):
    """Per MTT of ``basis`` (delays, MTTs, frames): how many seconds the delay must fall per
    second of MTT for the model curve to keep its shape best (amplitude free), i.e. the
    direction of the fit's valley; about 1/2 for a box and 1 for a short exponential residue
    (the curve's centroid is kept), less when the scan ends before a long tail does. Taken at
    the delay nearest ``at_delay``."""
    d = int(np.clip(np.argmin(np.abs(delays - at_delay)), 1, len(delays) - 2))
    b = basis[d].astype(np.float64)
    unit = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    along_delay = (basis[d + 1] - basis[d - 1]) / (delays[d + 1] - delays[d - 1])
    along_mtt = np.gradient(b, mtts, axis=0)

    def shape_change(v):  # the part of a change that is not a change of amplitude
        return v - np.einsum("ij,ij->i", v, unit)[:, None] * unit

    gd, gm = shape_change(along_delay), shape_change(along_mtt)
    dd, dm, mm = (np.einsum("ij,ij->i", x, y) for x, y in ((gd, gd), (gd, gm), (gm, gm)))
    # smallest-eigenvalue direction (u_d, u_m) of [[dd, dm], [dm, mm]]: slope = -u_d / u_m
    low = 0.5 * (dd + mm) - np.sqrt(0.25 * (dd - mm) ** 2 + dm**2)
    u_d, u_m = dm, low - dd
    return np.clip(-u_d / np.where(np.abs(u_m) > 1e-30, u_m, 1e-30), 0.0, 1.5)


def model_ttp(times, aif_times, aif, delay, mtt, shape="exponential") -> np.ndarray:
    """Time to peak of each voxel's fitted model curve (s, on the clock of ``times``), kept
    within the scan as for the curves' own TTP. Noise-free, so it is not pulled by noise
    peaks: on the phantom the TTP of the smoothed ischemic-core curves came out 2 s late."""
    times = np.asarray(times, float)
    log_mtts = np.linspace(np.log(FIT_MTTS[0]), np.log(FIT_MTTS[-1]), 8 * len(FIT_MTTS))
    clock = np.arange(times[0], times[-1] + FIT_FINE_DT, FIT_FINE_DT)
    curves = model_curves(clock, np.asarray(aif_times, float), np.asarray(aif, float),
                          np.zeros(1), np.exp(log_mtts), shape)[0]
    peak = clock[np.argmax(curves, axis=1)]  # peak time of a curve with no delay, per MTT
    ttp = np.asarray(delay, float) + np.interp(np.log(np.maximum(mtt, 1e-3)), log_mtts, peak)
    return np.clip(ttp, times[0], times[-1]).astype(np.float32)
