"""Enhancement curves: bolus arrival, baseline, time to peak, area, uniform resampling.

Convention: CT enhancement (HU above the pre-bolus baseline) is proportional to contrast
concentration. The baseline of every voxel is the mean of the frames acquired before the bolus
arrives (not frame 0 alone), so noise in a single frame does not shift the whole curve.
Times are seconds from the start of the first frame (scan start).
"""
from __future__ import annotations

import numpy as np

from bids_ctp.errors import DataError

# Bolus arrival = the first frame in which the arterial reference curve exceeds this fraction of
# its peak; every frame before it is baseline.
ARRIVAL_FRACTION = 0.10
# Fraction of the brightest-enhancing voxels whose mean curve serves as the arterial reference.
ARTERIAL_REFERENCE_FRACTION = 0.005
MIN_BASELINE_FRAMES = 2
BASELINE_MARGIN_S = 2.0  # frames this close before arrival are left out of the baseline
RETURN_FRACTION = 0.5  # vessel curves end below this fraction of their peak
# Vessels for the arterial reference: voxels rising this fraction of the strongest ones'
# rise, peaking within EARLY_WINDOW_S of the earliest (this percentile) of them
# (_earliest_vessels)
VESSEL_RISE_FRACTION = 0.3
EARLIEST_PERCENTILE = 5
# Vessels peaking later than the earliest ones + this are veins, both for the arrival reference
# and for the AIF's clusters (aif.py; phantom sinuses peak 4-7 s after the arteries). 2 s let a
# few weak artery-edge voxels whose rise a head jerk cut short (peaking 2.2-2.6 s before the
# arteries themselves) shut the arteries out: 99 HU AIF, every CBF +180...+350 % (independent
# phantom, jerk on the arterial upslope). On 41 other phantom sets 3 s changed one series (GM
# CBF +9.1 -> +11.6 %, its core -1 point) and nothing else.
EARLY_WINDOW_S = 3.0
MIN_BOLUS_HU = 20.0  # arterial reference enhancing less than this: no usable bolus
# A skull-less series whose strongest enhancement lies outside what contrast gives a CT artery
# is not in HU (e.g. a DSC test object in concentration units): it is scaled to this peak.
CT_PEAK_ENHANCEMENT_HU = (MIN_BOLUS_HU, 2000.0)
NOMINAL_PEAK_HU = 400.0
MIN_PEAK_NOISE_RATIO = 8.0  # noise alone peaks at 4-5 SDs somewhere among 1e5 voxels


def _largest(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values (unordered)."""
    return np.argpartition(values, -n)[-n:]


def tail_level(curves: np.ndarray) -> np.ndarray:
    """Mean of each curve's last tenth of frames (at least one): where a passing bolus has come
    back down and a step added by head motion has not."""
    curves = np.asarray(curves)
    return curves[..., -max(1, curves.shape[-1] // 10):].mean(axis=-1)


def _strongest_changes(data: np.ndarray) -> tuple[float, float]:
    """The largest rise above, and the largest drop below, any voxel's mean of its first frames."""
    start = data[..., :MIN_BASELINE_FRAMES].mean(axis=-1)
    return float((data.max(axis=-1) - start).max()), float((start - data.min(axis=-1)).max())


def is_signal_drop(data: np.ndarray, noise_sd: float) -> bool:
    """Whether a series without negative values is MR signal that the bolus lowers (DSC): its
    strongest drop is clear of the noise (``noise_sd``) and twice its strongest rise. (CT
    contrast only ever raises HU; a moving skull lowers and raises voxels alike.)"""
    rise, drop = _strongest_changes(data)
    return drop > MIN_PEAK_NOISE_RATIO * noise_sd and drop > 2.0 * rise


def signal_to_concentration(data: np.ndarray) -> np.ndarray:
    """-ln(S(t) / S0), S0 each voxel's mean over the first frames: DSC signal
    S = S0 exp(-TE r2* C) becomes TE r2* C, proportional to the concentration (the constant
    cancels in CBF, CBV and MTT) and about 0 before the bolus, as CT enhancement is (the later
    stages refine the baseline). Voxels without signal (background) become 0."""
    data = np.asarray(data, dtype=np.float32)
    floor = np.float32(max(float(data.max()), 1e-30) * 1e-6)
    start = data[..., :MIN_BASELINE_FRAMES].mean(axis=-1, keepdims=True)
    ratio = np.where(start > floor, np.maximum(data, floor) / np.maximum(start, floor), 1.0)
    return -np.log(ratio).astype(np.float32)


def intensity_scale(data: np.ndarray, noise_sd: float) -> float:
    """Factor that brings a skull-less series not in Hounsfield units to a CT-like scale; 1 for CT.

    For series without a skull only (e.g. a digital reference object of concentration curves,
    a DSC test suite): CBF, CBV and MTT are ratios of tissue to arterial enhancement and do not
    depend on the scale, but the thresholds of the other stages (brain mask, smoothing, the
    bolus check) are in HU. When the strongest enhancement of any voxel over its first frames
    lies outside CT_PEAK_ENHANCEMENT_HU, the series is scaled so that it is NOMINAL_PEAK_HU;
    not when it is within MIN_PEAK_NOISE_RATIO noise SDs (``noise_sd``, per frame): that is no
    bolus, which ``bolus_arrival_frame`` reports.
    """
    peak = _strongest_changes(np.asarray(data))[0]
    low, high = CT_PEAK_ENHANCEMENT_HU
    if low <= peak <= high or peak <= MIN_PEAK_NOISE_RATIO * noise_sd:
        return 1.0
    return NOMINAL_PEAK_HU / peak


def bolus_arrival_frame(curves: np.ndarray, source: str = "image", eligible=None,
                        times=None) -> int:
    """Index of the first frame showing the bolus in the earliest, strongest-enhancing voxels.

    ``curves`` has shape (n_voxels, n_frames) in HU. The arterial reference is the mean curve of
    the ``ARTERIAL_REFERENCE_FRACTION`` of voxels enhancing most over frame 0 among the earliest
    vessels (``_earliest_vessels``); tissue enhances later, so frames before this index are
    unenhanced everywhere. ``eligible``: optional (n_voxels,) bool, the voxels that may join the
    reference (a mask rather than a subset: no copy of a whole-brain series). ``times``: the
    frame times (s; default one frame per second).
    """
    curves = np.asarray(curves, dtype=np.float32)
    first = curves[:, 0]
    peak = curves.max(axis=1) - first  # the rise above frame 0, without an (n, T) temporary
    n_ref = max(1, int(round(ARTERIAL_REFERENCE_FRACTION * (
        len(peak) if eligible is None else int(np.count_nonzero(eligible))))))
    if eligible is not None:
        peak[~np.asarray(eligible, bool)] = -np.inf
    ref_idx = _largest(peak, n_ref)
    # A bolus passes and a vessel comes back down; bone sliding into an edge voxel after head
    # motion stays up and, being brighter than any vessel, would time the motion instead. When
    # nothing bright has come back down (a bolus cut off by the end of the scan) all voxels stay.
    returned = np.flatnonzero(tail_level(curves) - first < RETURN_FRACTION * peak)
    if len(returned) >= n_ref:
        strongest = returned[_largest(peak[returned], n_ref)]
        if peak[strongest].mean() >= RETURN_FRACTION * peak[ref_idx].mean():
            early = _earliest_vessels(curves, returned, peak, peak[strongest].mean(), times)
            ref_idx = early[_largest(peak[early], min(n_ref, len(early)))]
    reference = curves[ref_idx].mean(axis=0)  # frame 0 drops out with the baseline below
    reference -= reference[:MIN_BASELINE_FRAMES].mean()
    top = int(np.argmax(reference))
    if reference[top] < MIN_BOLUS_HU:
        raise DataError(f"{source}: no contrast bolus found (the most enhancing vessels rise "
                        f"{reference[top]:.1f} HU, expected >= {MIN_BOLUS_HU:.0f} HU)")
    below = np.flatnonzero(reference[: top + 1] < ARRIVAL_FRACTION * reference[top])
    return int(below[-1] + 1) if below.size else 0


def _earliest_vessels(curves, candidates, rise, strongest_rise, times=None) -> np.ndarray:
    """The ``candidates`` rising at least VESSEL_RISE_FRACTION of ``strongest_rise`` (vessels)
    that peak within EARLY_WINDOW_S of the earliest of them (its EARLIEST_PERCENTILE
    percentile, so a few noisy voxels cannot set it): the arteries. A venous sinus is often
    brighter than the partial-volumed arteries and larger: timed by the strongest voxels alone,
    the independent phantom's bolus arrived with the sinus, 6 s after the arteries; their bolus
    then fell into the baseline, they no longer looked like a bolus, and the sinus became the
    AIF (Tmax -3.5...-6 s, CBF +70...+380 %)."""
    vessels = candidates[rise[candidates] >= VESSEL_RISE_FRACTION * strongest_rise]
    t = np.arange(curves.shape[1], dtype=float) if times is None else np.asarray(times, float)
    peak_time = t[np.argmax(curves[vessels], axis=1)]
    first = np.percentile(peak_time, EARLIEST_PERCENTILE)
    return vessels[peak_time <= first + EARLY_WINDOW_S]


def baseline_frame_count(times, arrival_frame: int, source: str = "image") -> int:
    """How many leading frames form the baseline.

    The frames before arrival, less those within BASELINE_MARGIN_S of it when enough remain:
    the arterial reference crosses 10 % of its peak only at ``arrival_frame``, the frame before
    may already hold some contrast, and tissue fed earlier than the chosen artery (an AIF taken
    downstream) enhances up to a few seconds sooner.
    """
    if arrival_frame < MIN_BASELINE_FRAMES:
        raise DataError(
            f"{source}: the bolus arrives in frame {arrival_frame}; at least "
            f"{MIN_BASELINE_FRAMES} unenhanced frames are needed for a baseline"
        )
    t = np.asarray(times, dtype=np.float64)
    with_margin = int(np.searchsorted(t, t[arrival_frame] - BASELINE_MARGIN_S, side="left"))
    return with_margin if with_margin >= MIN_BASELINE_FRAMES else arrival_frame


def baseline(curves: np.ndarray, n_frames: int, source: str = "image") -> np.ndarray:
    """Mean of the first ``n_frames`` frames (the baseline), per voxel (last axis is time)."""
    if n_frames < MIN_BASELINE_FRAMES:
        raise DataError(
            f"{source}: the bolus arrives in frame {n_frames}; at least "
            f"{MIN_BASELINE_FRAMES} unenhanced frames are needed for a baseline"
        )
    return curves[..., :n_frames].mean(axis=-1, dtype=np.float64).astype(np.float32)


def bolus_truncated(mean_enhancement: np.ndarray) -> bool:
    """Whether the tissue is still enhancing at the end of the scan (its peak in the last 2
    frames): CBV, MTT and the fit of slow tissue are then underestimated or unreliable."""
    return int(np.argmax(mean_enhancement)) >= len(mean_enhancement) - 2


def time_to_peak(times: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Time of the curve maximum, refined by a parabola through the peak frame and its neighbours.

    Works on non-uniform frame times (Lagrange vertex of the three points), so TTP is continuous
    rather than a multiple of the frame interval.
    """
    t = np.asarray(times, dtype=np.float64)
    peak = np.argmax(curves, axis=-1)
    k = np.clip(peak, 1, len(t) - 2)
    y0 = np.take_along_axis(curves, (k - 1)[..., None], -1)[..., 0].astype(np.float64)
    y1 = np.take_along_axis(curves, k[..., None], -1)[..., 0].astype(np.float64)
    y2 = np.take_along_axis(curves, (k + 1)[..., None], -1)[..., 0].astype(np.float64)
    vertex = parabolic_vertex(t[k - 1], t[k], t[k + 1], y0, y1, y2)
    # a maximum on the first or last frame cannot be refined: report that frame
    return np.where(peak == k, vertex, t[peak]).astype(np.float32)


def parabolic_vertex(t0, t1, t2, y0, y1, y2):
    """Abscissa of the vertex of the parabola through three points, kept within [t0, t2].

    Falls back to t1 where the points are collinear or the parabola opens upwards.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # degenerate triples fall back below
        d0 = (y1 - y0) / (t1 - t0)
        d1 = (y2 - y1) / (t2 - t1)
        curvature = (d1 - d0) / (t2 - t0)
        vertex = 0.5 * (t0 + t1) - d0 / (2.0 * curvature)
    ok = np.isfinite(vertex) & (curvature < 0)
    return np.clip(np.where(ok, vertex, t1), t0, t2)


def uniform_grid(times: np.ndarray) -> np.ndarray:
    """Uniform time grid spanning the acquisition with the shortest sampled interval.

    Deconvolution needs uniform sampling; the shortest interval keeps every acquired detail.
    """
    t = np.asarray(times, dtype=np.float64)
    dt = float(np.min(np.diff(t)))
    n = int(np.floor((t[-1] - t[0]) / dt + 1e-6)) + 1
    return t[0] + dt * np.arange(n)


def resample(times: np.ndarray, curves: np.ndarray, new_times: np.ndarray) -> np.ndarray:
    """Linear interpolation of every curve (last axis) onto ``new_times``, vectorised.

    A uniform ``times`` that equals ``new_times`` returns the curves unchanged.
    """
    t = np.asarray(times, dtype=np.float64)
    new_times = np.asarray(new_times, dtype=np.float64)
    if len(t) == len(new_times) and np.allclose(t, new_times):
        return np.asarray(curves, dtype=np.float32)
    right = np.clip(np.searchsorted(t, new_times, side="right"), 1, len(t) - 1)
    left = right - 1
    w = ((new_times - t[left]) / (t[right] - t[left])).astype(np.float32)
    curves = np.asarray(curves, dtype=np.float32)
    return curves[..., left] * (1 - w) + curves[..., right] * w
