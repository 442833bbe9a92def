"""Tracer-kinetic model of the CTP phantom (pure numpy, no file I/O).

All curves are *enhancement* in HU above the pre-contrast baseline; time ``t`` is
in seconds from the start of the scan.

Gamma variate (peak value 1 at ``t0 + alpha*beta``)::

    g(t; t0, alpha, beta) = ((t - t0) / (alpha*beta))**alpha * exp(alpha - (t - t0)/beta)   t > t0
                          = 0                                                              t <= t0

Arterial input function (AIF, a full-volume artery), with first pass plus one
recirculation bump::

    C_a(t) = peak_hu * g(t; aif_t0, aif_alpha, aif_beta)
           + recirc_fraction * peak_hu * g(t; aif_t0 + recirc_delay, recirc_alpha, recirc_beta)

Residue functions ``R`` (all integrate to MTT; 0 for t < 0)::

    exponential: R(t) = exp(-t / MTT)
    box:         R(t) = 1 for 0 <= t < MTT, else 0
    linear:      R(t) = 1 - t / (2 MTT) for 0 <= t < 2 MTT, else 0  (transit times uniform)

Tissue enhancement (indicator dilution with a haematocrit correction)::

    C_t(t) = (density / kh) * (CBF / 6000) * integral C_a(tau - delay) R(t - tau) dtau

with CBF in mL/100g/min (``/6000`` converts it to mL/g/s), CBV in mL/100g and
MTT = 60 * CBV / CBF in s.  Consequently
``integral C_t = (density/kh) * (CBV/100) * integral C_a`` and the true Tmax is ``delay``.
The integral is evaluated as a discrete convolution on a fine grid (``dt`` = 0.01 s)
running from 5 s before min(0, first frame) to 5 s after the last frame; the
residue is averaged over each grid cell and the AIF sampled at cell mid-points, so
the discrete kernel integrates to MTT exactly and the scheme is second-order
accurate.  Frame values are linearly interpolated from the fine grid.

Venous output function (superior sagittal sinus)::

    C_v = C_a (*) h,   h(s) = s**vof_alpha * exp(-s/vof_beta) / (Gamma(vof_alpha+1) * vof_beta**(vof_alpha+1))

``h`` has unit area and mean transit ``(vof_alpha + 1) * vof_beta`` (6 s), so the VOF
has the AIF's area (mass conservation) but peaks later and lower, and is wider.

True TTP is the time of the maximum of the noise-free tissue curve on the fine
grid within [first frame, last frame] (continuous, not rounded to frames).

Constants (:class:`PhantomConstants`, defaults): peak_hu 350 HU, aif_t0 8 s,
aif_alpha 3, aif_beta 1.5 s, recirc_fraction 0.12, recirc_delay 10 s,
recirc_alpha 3, recirc_beta 3 s, vof_alpha 3, vof_beta 1.5 s (mean transit 6 s),
density 1.05 g/mL, kh 0.73, dt 0.01 s.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gamma as gamma_fn

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.signal import fftconvolve

RESIDUE_SHAPES = ("exponential", "box", "linear")


@dataclass(frozen=True)
class PhantomConstants:
    """Every physical constant of the phantom (frozen so that tests and docs can read them)."""

    peak_hu: float = 350.0  # AIF first-pass peak enhancement (HU), full-volume artery
    aif_t0: float = 8.0  # bolus arrival in the artery (s)
    aif_alpha: float = 3.0
    aif_beta: float = 1.5  # s; first-pass peak at t0 + alpha*beta = 12.5 s
    recirc_fraction: float = 0.12  # recirculation peak relative to peak_hu
    recirc_delay: float = 10.0  # s after aif_t0
    recirc_alpha: float = 3.0
    recirc_beta: float = 3.0  # s
    vof_alpha: float = 3.0  # venous transit kernel shape
    vof_beta: float = 1.5  # s; kernel mean (alpha+1)*beta = 6 s
    density: float = 1.05  # brain tissue density (g/mL)
    kh: float = 0.73  # large-to-small-vessel haematocrit correction (1-Hct_large)/(1-Hct_small)
    dt: float = 0.01  # fine grid step for the convolutions (s)

    @property
    def vof_mean_transit(self) -> float:
        return (self.vof_alpha + 1.0) * self.vof_beta


CONSTANTS = PhantomConstants()


def gamma_variate(t: ArrayLike, t0: float, alpha: float, beta: float) -> NDArray[np.float64]:
    """Gamma variate normalised to peak value 1 at ``t0 + alpha*beta``; 0 for ``t <= t0``."""
    s = np.asarray(t, dtype=float) - t0
    pos = np.clip(s, 0.0, None)  # avoids negative bases raised to a fractional power
    out = (pos / (alpha * beta)) ** alpha * np.exp(alpha - pos / beta)
    return np.where(s > 0, out, 0.0)


def arterial_input(t: ArrayLike, constants: PhantomConstants = CONSTANTS) -> NDArray[np.float64]:
    """AIF enhancement (HU) of a full-volume artery: first pass plus recirculation."""
    c = constants
    first = gamma_variate(t, c.aif_t0, c.aif_alpha, c.aif_beta)
    recirc = gamma_variate(t, c.aif_t0 + c.recirc_delay, c.recirc_alpha, c.recirc_beta)
    return c.peak_hu * (first + c.recirc_fraction * recirc)


def residue(t: ArrayLike, mtt: float, shape: str = "exponential") -> NDArray[np.float64]:
    """Residue function R(t) with R(0) = 1 and integral MTT; 0 for t < 0."""
    t = np.asarray(t, dtype=float)
    if shape == "exponential":
        return np.where(t >= 0, np.exp(-np.clip(t, 0.0, None) / mtt), 0.0)
    if shape == "box":
        return np.where((t >= 0) & (t < mtt), 1.0, 0.0)
    if shape == "linear":
        return np.where(t >= 0, np.clip(1.0 - t / (2.0 * mtt), 0.0, 1.0), 0.0)
    raise ValueError(f"unknown residue shape {shape!r}; expected one of {RESIDUE_SHAPES}")


def _residue_cells(n: int, dt: float, mtt: NDArray[np.float64], shape: str) -> NDArray[np.float64]:
    """Mean of R over each grid cell [k dt, (k+1) dt), rows = parameter sets.

    Cell averages (rather than point samples) make sum(R_k) * dt equal MTT exactly,
    which keeps the CBV identity of the phantom exact up to round-off.
    """
    lo = np.arange(n) * dt
    m = mtt[:, None]
    if shape == "exponential":
        return m / dt * (np.exp(-lo / m) - np.exp(-(lo + dt) / m))
    if shape == "box":
        return np.clip((m - lo) / dt, 0.0, 1.0)
    if shape == "linear":  # from the integral of R, t - t^2 / (4 MTT) up to 2 MTT
        def integral(t):
            t = np.minimum(t, 2.0 * m)
            return t - t * t / (4.0 * m)
        return (integral(lo + dt) - integral(lo)) / dt
    raise ValueError(f"unknown residue shape {shape!r}; expected one of {RESIDUE_SHAPES}")


def fine_grid(t_frames: ArrayLike, constants: PhantomConstants = CONSTANTS) -> NDArray[np.float64]:
    """Fine time grid used for the convolutions: 5 s before min(0, first frame) to 5 s past the last."""
    t = np.asarray(t_frames, dtype=float)
    start = min(0.0, float(t.min())) - 5.0
    n = int(np.ceil((float(t.max()) + 5.0 - start) / constants.dt)) + 1
    return start + np.arange(n) * constants.dt


def _tissue_fine(
    t_frames: ArrayLike,
    cbf: ArrayLike,
    cbv: ArrayLike,
    delay: ArrayLike,
    shape: str,
    constants: PhantomConstants,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Noise-free tissue curves on the fine grid: (grid, curves[n_sets, n_grid])."""
    cbf_a, cbv_a, delay_a = (np.atleast_1d(np.asarray(v, dtype=float)) for v in np.broadcast_arrays(cbf, cbv, delay))
    if np.any(cbf_a <= 0) or np.any(cbv_a <= 0):
        raise ValueError("cbf and cbv must be positive")
    c = constants
    grid = fine_grid(t_frames, c)
    dt = c.dt
    mtt = 60.0 * cbv_a / cbf_a
    # AIF sampled at cell mid-points (t_m - dt/2), matching the cell-averaged residue.
    aif = arterial_input(grid[None, :] - 0.5 * dt - delay_a[:, None], c)
    kernel = _residue_cells(grid.size, dt, mtt, shape) * dt
    conv = fftconvolve(aif, kernel, axes=1)[:, : grid.size]
    scale = (c.density / c.kh) * (cbf_a / 6000.0)
    return grid, scale[:, None] * conv


def tissue_enhancement(
    t_frames: ArrayLike,
    cbf: ArrayLike,
    cbv: ArrayLike,
    delay: ArrayLike,
    shape: str = "exponential",
    constants: PhantomConstants = CONSTANTS,
) -> NDArray[np.float64]:
    """Tissue enhancement (HU) at ``t_frames`` for one or several (cbf, cbv, delay) sets.

    ``cbf`` mL/100g/min, ``cbv`` mL/100g, ``delay`` s (broadcast together).  Scalars
    give shape ``(n_frames,)``; arrays give ``(n_sets, n_frames)``.
    """
    t = np.asarray(t_frames, dtype=float)
    grid, curves = _tissue_fine(t, cbf, cbv, delay, shape, constants)
    out = np.stack([np.interp(t, grid, row) for row in curves])
    scalar = all(np.ndim(v) == 0 for v in (cbf, cbv, delay))
    return out[0] if scalar else out


def true_ttp(
    t_frames: ArrayLike,
    cbf: ArrayLike,
    cbv: ArrayLike,
    delay: ArrayLike,
    shape: str = "exponential",
    constants: PhantomConstants = CONSTANTS,
) -> float | NDArray[np.float64]:
    """Time to peak (s from scan start) of the noise-free tissue curve, on the fine grid.

    The maximum is searched within [first frame, last frame] (what a scan can see).
    """
    t = np.asarray(t_frames, dtype=float)
    grid, curves = _tissue_fine(t, cbf, cbv, delay, shape, constants)
    inside = (grid >= t.min() - 1e-9) & (grid <= t.max() + 1e-9)
    g = grid[inside]
    ttp = g[np.argmax(curves[:, inside], axis=1)]
    scalar = all(np.ndim(v) == 0 for v in (cbf, cbv, delay))
    return float(ttp[0]) if scalar else ttp


def venous_output(t: ArrayLike, constants: PhantomConstants = CONSTANTS) -> NDArray[np.float64]:
    """VOF (HU): AIF convolved with a unit-area gamma-variate transit kernel (mean 6 s)."""
    c = constants
    t = np.asarray(t, dtype=float)
    grid = fine_grid(t, c)
    dt = c.dt
    # Kernel support long enough for its tail to vanish, normalised to exact unit area on
    # the grid (mass conservation), then cut to the grid (causal: later lags are unused).
    n_kernel = max(grid.size, int(np.ceil(40.0 * c.vof_mean_transit / dt)))
    lags = (np.arange(n_kernel) + 0.5) * dt  # cell mid-points
    h = lags**c.vof_alpha * np.exp(-lags / c.vof_beta) / (gamma_fn(c.vof_alpha + 1.0) * c.vof_beta ** (c.vof_alpha + 1.0))
    h = (h / (h.sum() * dt))[: grid.size]
    aif = arterial_input(grid - 0.5 * dt, c)
    vof = fftconvolve(aif, h * dt)[: grid.size]
    return np.interp(t, grid, vof)
