"""Deconvolution of tissue curves by the arterial input function (AIF).

Model (Østergaard 1996): C_t(t) = k ⊗ C_a (t), with k(t) = (rho / kH) · F · R(t), where R is the
residue function (R(0) = 1), F the flow per mass. After deconvolution, max k = (rho / kH) · F and
the time of that maximum is Tmax, the delay between AIF and tissue.

Methods (both vectorised: one pseudo-inverse per AIF, one matrix product per chunk of voxels):

- ``ssvd``: truncated SVD of the lower-triangular convolution matrix (Østergaard 1996). Sensitive
  to tracer delay: on the phantom, CBF changes by 5-15 % over delays of -2..6 s, not
  monotonically, and tissue arriving before the AIF cannot be represented.
- ``nlr`` (default): least-squares fit of the delayed one-compartment model
  C_t(t) = k_max · ∫ C_a(τ - δ) exp(-(t - τ)/MTT) dτ, the indicator-dilution model with an
  exponential residue. Truncated SVD cannot recover the step at the start of the residue from a
  smooth AIF: even with a perfect AIF and no noise it underestimates CBF by 20-40 % and delays
  Tmax by 1.5-2.5 s (measured on the phantom, README "Method"), so the default fits the model
  instead. Vectorised as a grid search: every (δ, MTT) pair on a grid gives one model curve; the
  best amplitude per voxel and pair is a dot product, so the whole search is one matrix product
  per chunk of voxels, followed by parabolic refinement of δ and log MTT between grid points.
  Works directly on the acquired (possibly non-uniform) frame times.
- ``csvd``: block-circulant SVD (Wu 2003): AIF and tissue are zero-padded to twice the length and
  the convolution is circular, so a delay shifts k without changing its height. Negative delays
  (tissue before the AIF) wrap to the end and are reported as negative Tmax.

The convolution matrix uses the linear-interpolation quadrature (weights 1/6, 4/6, 1/6 of
neighbouring AIF samples), which assumes both AIF and residue vary linearly between samples and
recovers the plateau of k better than the rectangle rule. Singular values below
``threshold x`` the largest one are discarded (truncation); the defaults below were chosen on
the digital phantom after edge-preserving smoothing (see README, "Method").
"""
from __future__ import annotations

import numpy as np

from bids_ctp.perfusion.curves import parabolic_vertex

METHODS = ("nlr", "csvd", "ssvd")
# Relative singular-value cut-off per method (fraction of the largest singular value).
DEFAULT_THRESHOLD = {"csvd": 0.10, "ssvd": 0.20}
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
               threshold: float | None = None):
    """Deconvolve uniformly sampled tissue curves (n_voxels, N) by the AIF (N,).

    Returns ``flow`` = max k (1/s), ``tmax`` (s, sub-sample precision, parabolic refinement of
    the maximum) and ``area`` = ∫k dt (dimensionless, = CBV·rho/kH when the curve is complete).
    """
    if method not in ("csvd", "ssvd"):
        raise ValueError(f"unknown deconvolution method {method!r}; choose from {METHODS}")
    if threshold is None:
        threshold = DEFAULT_THRESHOLD[method]
    circulant = method == "csvd"
    n = len(aif)
    pinv = truncated_pinv(convolution_matrix(aif, dt, circulant), threshold).astype(np.float32)
    length = pinv.shape[0]
    tissue = np.asarray(tissue, dtype=np.float32)
    flow = np.empty(len(tissue), dtype=np.float32)
    tmax = np.empty(len(tissue), dtype=np.float32)
    area = np.empty(len(tissue), dtype=np.float32)
    for start in range(0, len(tissue), CHUNK_VOXELS):
        chunk = tissue[start : start + CHUNK_VOXELS]
        if circulant:
            chunk = np.concatenate([chunk, np.zeros_like(chunk)], axis=1)
        k = chunk @ pinv.T
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
        flow[start : start + len(k)] = np.where(
            shift == 0, top, top + 0.5 * (nxt - prev) * shift + curvature * shift**2)
        tmax[start : start + len(k)] = vertex * dt
        area[start : start + len(k)] = k.sum(axis=1) * dt
    return flow, tmax, area


# Model-fit grid: delays (s) and mean transit times (s, logarithmic).
FIT_DELAYS = np.arange(-3.0, 12.01, 0.5)
FIT_MTTS = np.geomspace(1.0, 30.0, 24)
FIT_FINE_DT = 0.05  # s, time step of the model convolution


def model_curves(times, aif_times, aif, delays=FIT_DELAYS, mtts=FIT_MTTS) -> np.ndarray:
    """Noise-free tissue curves of the delayed exponential-residue model with unit k_max.

    Shape (len(delays), len(mtts), len(times)): ∫ C_a(τ - δ) exp(-(t - τ)/MTT) dτ at ``times``.
    """
    fine = np.arange(aif_times[0] - delays.max() - FIT_FINE_DT, times[-1] - delays.min() + 1.0,
                     FIT_FINE_DT)
    aif_fine = np.interp(fine, aif_times, aif, left=0.0, right=float(aif[-1]))
    out = np.empty((len(delays), len(mtts), len(times)))
    for j, mtt in enumerate(mtts):
        kernel = np.exp(-np.arange(len(fine)) * FIT_FINE_DT / mtt) * FIT_FINE_DT
        conv = np.convolve(aif_fine, kernel)[: len(fine)]
        for i, delay in enumerate(delays):
            out[i, j] = np.interp(times - delay, fine, conv, left=0.0)
    return out


def fit_model(tissue: np.ndarray, times, aif_times, aif, delays=FIT_DELAYS, mtts=FIT_MTTS):
    """Least-squares fit of the delayed exponential-residue model to every tissue curve.

    Returns ``flow`` (k_max, 1/s), ``delay`` (s; Tmax of an exponential residue) and ``mtt`` (s).
    """
    basis = model_curves(np.asarray(times, float), np.asarray(aif_times, float),
                         np.asarray(aif, float), delays, mtts)
    nd, nm = basis.shape[:2]
    basis = basis.reshape(nd * nm, -1).astype(np.float32)
    norm2 = np.maximum((basis * basis).sum(axis=1), 1e-12)
    tissue = np.asarray(tissue, dtype=np.float32)
    flow = np.empty(len(tissue), dtype=np.float32)
    delay = np.empty(len(tissue), dtype=np.float32)
    mtt = np.empty(len(tissue), dtype=np.float32)
    log_mtts = np.log(mtts)
    chunk_size = max(1, CHUNK_VOXELS // 8)
    for start in range(0, len(tissue), chunk_size):
        proj = tissue[start : start + chunk_size] @ basis.T  # (voxels, bases)
        amplitude = proj / norm2
        # explained sum of squares; negative amplitudes are unphysical and excluded
        score = np.where(amplitude > 0, proj * amplitude, 0.0).reshape(-1, nd, nm)
        best = np.argmax(score.reshape(len(score), -1), axis=1)
        i, j = np.divmod(best, nm)
        rows = np.arange(len(score))
        ip, im = np.minimum(i + 1, nd - 1), np.maximum(i - 1, 0)
        jp, jm = np.minimum(j + 1, nm - 1), np.maximum(j - 1, 0)
        d_ref = parabolic_vertex(delays[im], delays[i], delays[ip], score[rows, im, j],
                                 score[rows, i, j], score[rows, ip, j])
        m_ref = parabolic_vertex(log_mtts[jm], log_mtts[j], log_mtts[jp], score[rows, i, jm],
                                 score[rows, i, j], score[rows, i, jp])
        # the area k_max·MTT is well determined by the data; keep it while refining MTT
        area = amplitude.reshape(-1, nd, nm)[rows, i, j] * mtts[j]
        sl = slice(start, start + len(score))
        delay[sl] = np.where((i > 0) & (i < nd - 1), d_ref, delays[i])
        mtt[sl] = np.exp(np.where((j > 0) & (j < nm - 1), m_ref, log_mtts[j]))
        flow[sl] = np.where(area > 0, area / mtt[sl], 0.0)
    return flow, delay, mtt
