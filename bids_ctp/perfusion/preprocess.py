"""Noise estimation and edge-preserving, spacing-aware smoothing of the 4D CTP series.

Filter choice: a cross (joint) bilateral filter whose range weights come from adaptive weights
smoothing of the guide (propagation-separation, Polzehl & Spokoiny 2006). Every frame is
averaged over a spatial Gaussian neighbourhood (sigma in mm, so the same anatomy is averaged at
any pixel size), weighted by how similar the neighbours are in a guide: a few images that
sum up each voxel's curve where tissue curves differ most (``guide_channels``: unenhanced
contrast, bolus amplitude, bolus timing). That guide is itself smoothed in steps of growing
neighbourhood, and neighbours are compared by the distance of their current estimates relative
to its noise, which shrinks as the neighbourhoods grow. Skull, air, CSF, grey and white matter
and vessels differ by far more than the noise, and so, after a few steps, do regions whose
guide differs by only one or two noise units per voxel (ischemic core next to penumbra,
penumbra next to healthy tissue of the same CBV but an earlier bolus): every tissue curve is
averaged only with curves of its own kind. Unlike iterative diffusion filters (SimpleITK
CurvatureFlow or anisotropic diffusion, whose stable time step depends on the spacing), it has
no time step and no stability condition, and every frame gets identical weights, so the shape
of the curves (hence CBF and Tmax) is not distorted frame by frame.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.signal import fftconvolve
from scipy.stats import chi2
from threadpoolctl import threadpool_limits

TARGET_NOISE_HU = 0.5  # residual per-frame noise the smoothing aims for
SIGMA_RANGE_MM = (1.0, 4.5)  # spatial Gaussian sigma bounds; neighbourhood truncated at 2 sigma
# ... but the upper bound gives way (up to SIGMA_LIMIT_MM) where it would leave more than
# MAX_NOISE_HU: at coarse pixels 4.5 mm averages few voxels, and the noise left in the low
# signal of the ischemic core biased it (see smoothing_sigma)
MAX_NOISE_HU = 0.6
SIGMA_LIMIT_MM = 10.0
SOFT_TISSUE_HU = (-50.0, 150.0)  # voxels used to estimate the noise
AIR_HU = -500.0  # time-averaged voxels below this are air, left unsmoothed
# Separation: with one guide channel, estimates 3 of their SDs apart weigh 1/e. 9 rather than 6
# (2.4 SDs): with a time-average guide partly matched to the bolus, the worst regional error fell
# on 7 of 8 phantoms (e.g. 2 s sampling and motion 11 -> 8 %, 2 mm motion GM MTT on five motion
# paths by 1-2 points). With K channels the squared distance of pure noise is chi-square with K
# degrees of freedom, and the separation is that distribution's quantile at the same level.
ADAPTIVE_LAMBDA = 9.0
# The guide's channels (``guide_channels``): unenhanced contrast, bolus amplitude, bolus timing
GUIDE_CHANNELS = 3
# Delay (s) of the timing channel's copy of the bolus. Penumbra's bolus comes seconds after
# healthy tissue's (Tmax > 6 s is hypoperfused); of healthy white matter against penumbra 4 s
# and 7 s late, a copy 3 s late captured 2.6 and 3.0 noise units², 4 s 3.1 and 3.6, the slope of
# the bolus (the first-order change of a delay) 1.7 and 2.3, of 3.9 and 6.0 in all frames.
GUIDE_DELAY_S = 4.0
MIN_BOLUS_HU = 0.5  # median soft-tissue enhancement below which the guide is the constant only
TILE = (8, 8, 2)  # voxels per matrix product of the smoothing (x, y, slices per slab)
OFFSET_BLOCK_VALUES = 256 * 1024  # floats per block of _offset_average (1 MB, in the CPU cache)
ADAPTIVE_AREA_GROWTH = 2.0  # neighbourhood area doubles per step (finer steps measured no better)
NOISE_SAMPLE_VOXELS = 50_000  # soft-tissue curves the noise and bolus medians look at
# neighbour correlations of the noise below this are white noise (white-noise phantoms measure
# 0.00 +- 0.01)
MIN_NOISE_CORRELATION = 0.05


def soft_tissue_curves(data: np.ndarray) -> np.ndarray:
    """(n, T) curves of an even subsample of at most ~50 000 soft-tissue voxels.

    Random-free, and taken before copying any curve, so a whole-brain series is not
    duplicated in memory. Plenty for the medians below (the median absolute deviation of
    2.6 million residuals has a relative standard error of ~0.1 %); 260 000 curves took
    0.6 s per median at the seed size.
    """
    mean = data.mean(axis=-1)
    soft = (mean > SOFT_TISSUE_HU[0]) & (mean < SOFT_TISSUE_HU[1])
    where = np.nonzero(soft if soft.any() else np.ones(mean.shape, dtype=bool))
    step = max(1, -(-where[0].size // NOISE_SAMPLE_VOXELS))
    return np.asarray(data[tuple(axis[::step] for axis in where)], dtype=np.float32)


def _noise_sd(curves: np.ndarray, axis: int | None = None):
    """Noise SD (HU) of (n, T) curves (T >= 3), per frame with ``axis=0``.

    From the second temporal difference r = I(t) - (I(t-1) + I(t+1)) / 2, which removes slowly
    varying signal (var(r) = 1.5 sigma² for white noise); a median absolute deviation ignores
    the few vessels where the bolus is not slow.
    """
    resid = curves[:, 1:-1] - 0.5 * (curves[:, :-2] + curves[:, 2:])
    centre = np.median(resid, axis=axis, keepdims=axis is not None)
    return 1.4826 * np.median(np.abs(resid - centre), axis=axis) / np.sqrt(1.5)


def estimate_noise(data: np.ndarray) -> float:
    """Per-frame noise SD (HU) in soft tissue, robust to the bolus (``_noise_sd``)."""
    return float(_noise_sd(soft_tissue_curves(data)))


def frame_noise(data: np.ndarray) -> tuple[float, np.ndarray]:
    """Noise SD (HU) of the series and of each of its frames, in soft tissue.

    Measure it on the series as acquired, before motion correction: interpolation averages
    neighbouring voxels, so a moved frame's voxels show about half the noise (10 -> 5-6 HU on
    the phantoms), but that noise is correlated and a spatial average removes no more of it
    than of the acquired noise. Smoothing sized and weighted for the lower figure left the
    moving phantoms' ischemic core 1-3 points higher in CBF and CBV (CBF +8.0 -> +4.8 % over
    four motion paths) and nearly doubled the per-voxel CBF error in white matter.
    """
    sample = soft_tissue_curves(data)
    noise_sd = float(_noise_sd(sample))
    return noise_sd, noise_sd * relative_frame_noise(sample)


def relative_frame_noise(curves: np.ndarray) -> np.ndarray:
    """Noise SD of every frame relative to the whole series', from (n, T) soft-tissue curves.

    Frames differ after motion correction: linear interpolation averages neighbouring voxels,
    so a moved frame can have half the noise of a still one (10 -> 5 HU on the phantoms).
    All ones for fewer than 3 frames.
    """
    if curves.shape[1] < 3:
        return np.ones(curves.shape[1])
    sd = _noise_sd(curves, axis=0) / max(float(_noise_sd(curves)), 1e-12)
    return np.concatenate([sd[:1], sd, sd[-1:]])


def noise_correlation(data: np.ndarray, max_slices: int = 8) -> tuple[float, ...]:
    """Correlation of the noise between neighbouring voxels along each axis (x, y, z).

    CT noise is not white: the reconstruction kernel correlates neighbouring pixels, and a
    spatial average removes less of it than of independent noise. Measured on the second
    temporal difference of the first frames (noise only, before the bolus) in soft tissue, on
    at most ``max_slices`` central slices; residuals beyond 4 SDs (vessels, edges) are left
    out. Correlations below MIN_NOISE_CORRELATION count as 0 (white noise).
    """
    n_z, n_t = data.shape[2:]
    if n_t < 4:
        return (0.0, 0.0, 0.0)
    z0 = max(0, n_z // 2 - max_slices // 2)
    block = np.asarray(data[:, :, z0:z0 + max_slices, :4], dtype=np.float32)
    residual = block[..., 1:3] - 0.5 * (block[..., 0:2] + block[..., 2:4])  # frames 1 and 2
    mean = block.mean(axis=-1, keepdims=True)
    usable = (mean > SOFT_TISSUE_HU[0]) & (mean < SOFT_TISSUE_HU[1])
    usable = np.broadcast_to(usable, residual.shape)
    if usable.sum() < 100:
        return (0.0, 0.0, 0.0)
    sd = 1.4826 * np.median(np.abs(residual[usable]))
    usable = usable & (np.abs(residual) < 4.0 * max(sd, 1e-6))
    out = []
    for axis in range(3):
        if residual.shape[axis] < 2:
            out.append(0.0)
            continue
        lo = [slice(None)] * 4
        hi = [slice(None)] * 4
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        both = usable[tuple(lo)] & usable[tuple(hi)]
        a, b = residual[tuple(lo)][both].astype(float), residual[tuple(hi)][both].astype(float)
        rho = float(np.sum(a * b) / max(np.sqrt(np.sum(a * a) * np.sum(b * b)), 1e-12))
        out.append(rho if rho >= MIN_NOISE_CORRELATION else 0.0)
    return tuple(out)


def guide_channels(curves: np.ndarray, frame_sd, times) -> np.ndarray:
    """Frame weights (T, K) of the smoothing guide's channels, from (n, T) soft-tissue curves,
    each frame's noise SD and the frame times (s).

    The channels measure a curve along three directions, in units of the noise and
    uncorrelated with each other (orthonormal once every frame is divided by its noise SD):
    a constant (unenhanced contrast: grey and white matter, CSF, bone), the median soft-tissue
    enhancement (bolus amplitude, i.e. CBV) and the same enhancement GUIDE_DELAY_S later (bolus
    timing). The distance between two voxels' guides is then the part of their curves'
    difference that lies in those directions. A single time average (the guide before) saw
    only the first two, mixed: on an independently made phantom, penumbra of healthy white
    matter's CBV but a bolus 4-7 s later was at a squared distance of 0.0 noise units² per
    voxel from it there, 3.1-3.6 in these channels (3.9-6.0 in all 45 frames), and smoothing
    mixed the two (penumbra CBF -13...-24 %, Tmax -0.7...-1.0 s). The leading principal
    components of the curves did as well on still scans, but under head motion they follow the
    motion's artefacts instead. Only the constant when no bolus stands out of the median curve's
    noise; with no more frames than channels, every frame is a channel (a single image: itself).
    """
    sd = np.maximum(np.asarray(frame_sd, dtype=float), 1e-3)  # noise-free data: no division by 0
    n_frames = curves.shape[1]
    if n_frames <= GUIDE_CHANNELS:
        return np.diag(1.0 / sd)
    median = np.median(curves, axis=0)
    enhancement = np.clip(median - np.percentile(median, 20), 0.0, None)
    directions = [np.ones(n_frames)]
    # the median curve's own noise is ~1.25 sigma / sqrt(n): a bolus must stand well above it
    median_noise = 1.25 * _noise_sd(curves) / np.sqrt(len(curves))
    if enhancement.max() >= max(MIN_BOLUS_HU, 6.0 * median_noise):
        times = np.asarray(times, dtype=float)
        directions += [enhancement, np.interp(times - GUIDE_DELAY_S, times, enhancement)]
    orthonormal = np.linalg.qr(np.stack(directions, axis=1) / sd[:, None])[0]
    return orthonormal / sd[:, None]


def smoothing_sigma(noise_sd: float, spacing, correlation=(0.0, 0.0, 0.0)) -> float:
    """Spatial sigma (mm) that averages enough voxels to bring ``noise_sd`` to TARGET_NOISE_HU.

    Averaging with weights w lowers white noise by sqrt(n_eff), n_eff = (sum w)² / sum w², so
    the sigma is the smallest whose truncated Gaussian (:func:`neighbourhood`, on this voxel
    grid: a thick-slice scan averages in-plane, a thin-slice one in 3D) reaches
    n_eff = (noise_sd / TARGET_NOISE_HU)². Bounded in mm to keep lesions resolved
    (SIGMA_RANGE_MM), unless the bound would leave more than MAX_NOISE_HU: then the sigma that
    reaches MAX_NOISE_HU (at most SIGMA_LIMIT_MM). Nothing changes on 1 mm pixels at 10 HU
    (4.3 mm) or 0.45 x 0.5 x 2.5 mm voxels at 25 HU (3.8 mm); 2.5 mm pixels at 10 HU get
    7.2 mm instead of 4.5 (1.2 HU left), which took the ischemic core's CBF over four noise
    seeds from +11...+25 % to -5...+8 % (GM CBF -3...-6 %, was within 1 %); 2 mm pixels get
    6.1 mm, core CBF +8...+13 % -> -0...+7 %. A 0.75 HU ceiling left the core at -2...+16 %.
    ``correlation``: the noise's neighbour correlations (``noise_correlation``); correlated
    noise averages down less, n_eff = (sum w)² / sum_ij w_i w_j rho(i - j) (``effective_voxels``).
    """
    lo, hi = SIGMA_RANGE_MM
    hi = max(hi, _sigma_reaching((noise_sd / MAX_NOISE_HU) ** 2, spacing, lo, SIGMA_LIMIT_MM,
                                 correlation))
    return _sigma_reaching((noise_sd / TARGET_NOISE_HU) ** 2, spacing, lo, hi, correlation)


def effective_voxels(spacing, sigma_mm: float, correlation=(0.0, 0.0, 0.0)) -> float:
    """How many independent voxels the neighbourhood's weighted mean is worth for noise of
    these neighbour correlations: (sum w)² / sum_ij w_i w_j rho(i - j), with a Gaussian
    correlation rho(d) = prod_axes rho_axis ** (d_axis²) (noise blurred by the reconstruction
    kernel); (sum w)² / sum w² for white noise."""
    offsets, w = neighbourhood(spacing, sigma_mm)
    w = w.astype(float)
    if not any(correlation):
        return w.sum() ** 2 / (w**2).sum()
    radius = np.abs(offsets).max(axis=0)
    dense = np.zeros(tuple(2 * radius + 1))
    dense[tuple((offsets + radius).T)] = w
    # sum_ij w_i w_j rho(i - j) = sum over lags of the kernel's autocorrelation x rho(lag)
    auto = fftconvolve(dense, dense[::-1, ::-1, ::-1])
    lags = np.meshgrid(*[np.arange(-2 * r, 2 * r + 1) for r in radius], indexing="ij")
    rho = np.ones_like(auto)
    for lag, r in zip(lags, correlation):
        rho *= np.float64(r) ** (lag * lag)
    return w.sum() ** 2 / max(float(np.sum(auto * rho)), 1e-12)


def _sigma_reaching(n_needed: float, spacing, lo: float, hi: float,
                    correlation=(0.0, 0.0, 0.0)) -> float:
    """The smallest sigma in [lo, hi] whose neighbourhood averages n_needed voxels (n_eff)."""
    def n_eff(sigma):
        return effective_voxels(spacing, sigma, correlation)

    if n_eff(lo) >= n_needed:
        return lo
    if n_eff(hi) < n_needed:
        return hi
    for _ in range(20):  # bisection to ~2e-6 of the range
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if n_eff(mid) >= n_needed else (mid, hi)
    return float(hi)


def neighbourhood(spacing, sigma_mm: float):
    """Offsets (voxels) and spatial weights of a Gaussian truncated at 2 sigma, in mm."""
    radius = [int(np.floor(2 * sigma_mm / s)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    d2 = ((offsets * np.asarray(spacing, dtype=float)) ** 2).sum(axis=1)
    keep = d2 <= (2 * sigma_mm) ** 2
    return offsets[keep], np.exp(-0.5 * d2[keep] / sigma_mm**2).astype(np.float32)


def cross_bilateral(data: np.ndarray, spacing, sigma_mm: float | None = None,
                    noise_sd: float | None = None, n_threads: int = 1,
                    frame_noise_sd=None, out: np.ndarray | None = None,
                    correlation=(0.0, 0.0, 0.0), times=None, channels=None) -> np.ndarray:
    """Edge-preserving smoothing of a 4D series (x, y, z, t) guided by a few summaries of every
    voxel's curve (``guide_channels``; ``times``: frame times in s, default 1 s apart).

    Returns a new float32 array, or ``out`` (same shape, e.g. a memory-mapped file) filled.
    Processed in slabs along the third axis (with a halo), in ``n_threads`` threads, so memory
    stays at a few frames' worth beyond input and output.
    ``sigma_mm`` defaults to :func:`smoothing_sigma` of the estimated noise.

    The range weights of the last step come from the guide's adaptive smoothing (module
    docstring): at each step, penalty = effective sample size / separation, weight = spatial x
    exp(-penalty x squared distance of the estimates), the guide in units of its noise
    (``guide_channels``; separation: ADAPTIVE_LAMBDA's chi-square level for that many
    channels). The frames' noise is by default ``noise_sd`` x ``relative_frame_noise`` of
    ``data``; pass :func:`frame_noise` of the acquired series as ``frame_noise_sd`` for a
    motion-corrected one. ``channels``: the guide's frame weights (``guide_channels``),
    computed here when not given.
    ``correlation``: the noise's neighbour correlations (``noise_correlation``); an estimate
    over a neighbourhood then keeps more of its noise than white noise would leave
    (``effective_voxels``), and the penalty counts that.
    """
    data = np.asarray(data, dtype=np.float32)
    # the soft-tissue sample only when something below is to be estimated from it (SmoothCTP
    # passes noise, frame noise and channels, having sampled once itself)
    needs_sample = noise_sd is None or frame_noise_sd is None or channels is None
    sample = soft_tissue_curves(data) if needs_sample else None
    if noise_sd is None:
        noise_sd = float(_noise_sd(sample))  # estimate_noise(data), without sampling again
    if sigma_mm is None:
        sigma_mm = smoothing_sigma(noise_sd, spacing, correlation)
    frame_sd = (noise_sd * relative_frame_noise(sample) if frame_noise_sd is None
                else np.asarray(frame_noise_sd, float))
    n_frames = data.shape[-1]
    if channels is None:
        channels = guide_channels(sample, frame_sd, np.arange(n_frames) if times is None else times)
    # the time average as well, to find the air around the head
    weights = np.column_stack([np.full(n_frames, 1.0 / n_frames), channels]).astype(np.float32)
    # einsum: 8x faster than @ on the Fortran-ordered series nibabel loads
    guide = np.einsum("...t,tk->...k", data, weights)
    if out is None:
        out = data.copy()
    else:
        out[...] = data
    # Air needs no smoothing: work inside the head's bounding box only, and there the series
    # pass skips tiles of nothing but air (half the box of a whole-brain scan)
    not_air = guide[..., 0] > AIR_HU
    head = np.argwhere(not_air.any(axis=2))
    if head.size == 0:
        return out
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(head.min(axis=0), head.max(axis=0)))
    guide = np.ascontiguousarray(guide[box][..., 1:])
    separation = chi2.ppf(chi2.cdf(ADAPTIVE_LAMBDA, 1), channels.shape[1])
    # start from single voxels: effective sample size 1
    estimate = guide
    penalty = np.full(guide.shape[:3], np.float32(1.0 / separation))
    for sigma in _growing_sigmas(min(spacing[:2]), sigma_mm)[:-1]:
        estimate, wsum = _adaptive_average(guide, estimate, penalty, spacing, sigma, n_threads)
        # correlated noise: the estimate's variance is this much above the white-noise figure
        excess = (1.0 if not any(correlation) else
                  effective_voxels(spacing, sigma) / effective_voxels(spacing, sigma, correlation))
        penalty = (wsum / np.float32(separation * excess)).astype(np.float32)
    _adaptive_average(data[box], estimate, penalty, spacing, sigma_mm, n_threads, out=out[box],
                      unsmoothed=~not_air[box])
    return out


def _growing_sigmas(pixel_mm: float, sigma_mm: float) -> list[float]:
    """Spatial sigmas from half a pixel up to ``sigma_mm``, area growing geometrically."""
    sigmas, s = [], 0.5 * float(pixel_mm)
    while s < sigma_mm:
        s = min(sigma_mm, s * np.sqrt(ADAPTIVE_AREA_GROWTH))
        sigmas.append(s)
    return sigmas or [sigma_mm]


def _adaptive_average(values: np.ndarray, estimate: np.ndarray, penalty: np.ndarray, spacing,
                      sigma_mm: float, n_threads: int, out: np.ndarray | None = None,
                      unsmoothed: np.ndarray | None = None):
    """Weighted neighbourhood mean of ``values`` (x, y, z, t) (into ``out`` if given: no
    second copy of a 4D series), and the weight sums. ``unsmoothed``: optional boolean image of
    voxels that need no average (air); tiles of nothing else keep their values (weight sum 1).

    Weight of neighbour j at voxel i: spatial Gaussian(sigma_mm) x
    exp(-penalty_i (estimate_j - estimate_i)²). Slab-wise along z in threads, each slab in
    tiles of TILE voxels: the weights of a tile's voxels to every voxel of the tile's
    neighbourhood box form a matrix (zero beyond each voxel's neighbourhood) whose product
    with the box's curves is one BLAS call. That does 5-8x the arithmetic of a sum over
    offsets but at 15-20x its speed (the series pass of the seed-size scan: 5.7 -> 1.8 s).
    """
    offsets, spatial_w = neighbourhood(spacing, sigma_mm)
    out = np.empty(values.shape, np.float32) if out is None else out
    wsum_out = np.empty(estimate.shape[:3], np.float32)
    if values.shape[-1] <= GUIDE_CHANNELS:  # the guide (few images): offset by offset is faster
        return _offset_average(values, estimate, penalty, offsets, spatial_w, n_threads, out,
                               wsum_out)
    halo = int(np.abs(offsets[:, 2]).max())
    radius = np.abs(offsets[:, :2]).max(axis=0)
    nx, ny, nz = values.shape[:3]
    n_frames = values.shape[-1]
    tx, ty = TILE[:2]
    # edge padding by the radius, and on the high side up to whole tiles
    pad = [(int(radius[0]), int(radius[0] + (-nx) % tx)),
           (int(radius[1]), int(radius[1] + (-ny) % ty))]
    slab = TILE[2]
    plans = {}

    def plan(tz):
        """Column of each (tile voxel, offset) pair in the neighbourhood box, C order."""
        if tz not in plans:
            box = (tx + 2 * radius[0], ty + 2 * radius[1], tz + 2 * halo)
            a, b, c = np.meshgrid(np.arange(tx), np.arange(ty), np.arange(tz), indexing="ij")
            centre = np.ravel_multi_index((a.ravel() + radius[0], b.ravel() + radius[1],
                                           c.ravel() + halo), box)
            step = np.ravel_multi_index((offsets + [radius[0], radius[1], halo]).T, box) - \
                np.ravel_multi_index((radius[0], radius[1], halo), box)
            columns = centre[:, None] + step[None, :]
            # flat positions in the (tile voxels x box) weight matrix, for one np.put per tile
            flat = (np.arange(len(columns))[:, None] * int(np.prod(box)) + columns).ravel()
            plans[tz] = box, centre, columns, flat
        return plans[tz]

    def run(z0):
        z1 = min(nz, z0 + slab)
        g, d = _padded_slab(estimate, values, z0, z1, halo, pad)
        g = np.moveaxis(g, 3, 0).copy()  # channel by channel: gathers from a 1D array are fast
        tz = z1 - z0
        box, centre, columns, flat = plan(tz)
        weights = np.zeros((len(columns), int(np.prod(box))), np.float32)
        acc = np.empty((nx + pad[0][1] - radius[0], ny + pad[1][1] - radius[1], tz, n_frames),
                       np.float32)
        wsum = np.empty(acc.shape[:3], np.float32)
        for x0 in range(0, acc.shape[0], tx):
            for y0 in range(0, acc.shape[1], ty):
                if unsmoothed is not None and unsmoothed[x0:x0 + tx, y0:y0 + ty, z0:z1].all():
                    acc[x0:x0 + tx, y0:y0 + ty] = d[x0 + radius[0]:x0 + radius[0] + tx,
                                                    y0 + radius[1]:y0 + radius[1] + ty,
                                                    halo:halo + tz]
                    wsum[x0:x0 + tx, y0:y0 + ty] = 1.0
                    continue
                curves = d[x0:x0 + box[0], y0:y0 + box[1]].reshape(-1, n_frames)
                centre_pen = penalty[x0:x0 + tx, y0:y0 + ty, z0:z1]
                if centre_pen.shape != (tx, ty, tz):  # beyond the grid: edge values
                    centre_pen = np.pad(centre_pen, [(0, tx - centre_pen.shape[0]),
                                                     (0, ty - centre_pen.shape[1]), (0, 0)],
                                        mode="edge")
                near_w = np.zeros(columns.shape, np.float32)
                for channel in g:  # squared distance over the guide's channels
                    near = channel[x0:x0 + box[0], y0:y0 + box[1]].ravel()
                    diff = near[columns]
                    diff -= near[centre][:, None]
                    diff *= diff
                    near_w += diff
                near_w *= -centre_pen.reshape(-1, 1)
                np.exp(near_w, out=near_w)
                near_w *= spatial_w
                np.put(weights, flat, near_w)
                total = near_w.sum(axis=1)
                acc[x0:x0 + tx, y0:y0 + ty] = (weights @ curves / total[:, None]).reshape(
                    tx, ty, tz, n_frames)
                wsum[x0:x0 + tx, y0:y0 + ty] = total.reshape(tx, ty, tz)
        out[:, :, z0:z1] = acc[:nx, :ny]
        wsum_out[:, :, z0:z1] = wsum[:nx, :ny]

    # one BLAS thread per tile product: the tiles already run in n_threads threads, and
    # BLAS's own threads on top of them made the products 2x slower
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
        list(pool.map(run, range(0, nz, slab)))
    return out, wsum_out


def _padded_slab(estimate, values, z0: int, z1: int, halo: int, pad):
    """Slices z0..z1 of ``estimate`` and ``values`` (both 4D) with ``halo`` slices either side
    and the in-plane ``pad``, edge values beyond the grid."""
    nz = estimate.shape[2]
    lo, hi = max(0, z0 - halo), min(nz, z1 + halo)
    zpad = [(halo - (z0 - lo), halo - (hi - z1))]
    return (np.pad(estimate[:, :, lo:hi], pad + zpad + [(0, 0)], mode="edge"),
            np.pad(values[:, :, lo:hi], pad + zpad + [(0, 0)], mode="edge"))


def _offset_average(values, estimate, penalty, offsets, spatial_w, n_threads, out, wsum_out):
    """``_adaptive_average`` as a sum over the neighbourhood's offsets, each a shifted copy of
    a block of rows: without the tiles' per-call overhead and their zero weights, faster for a
    few images (the seed-size scan's 3-channel guide at sigma 4 mm, 439 offsets: 0.9 s against
    1.45 s in tiles; 1 mm, 13 offsets: 0.05 against 0.3 s), 10x slower for a 55-frame series."""
    halo = int(np.abs(offsets[:, 2]).max())
    pad = [(r, r) for r in np.abs(offsets[:, :2]).max(axis=0)]
    nx, ny, nz = values.shape[:3]
    slab = 2

    def run(z0):
        z1 = min(nz, z0 + slab)
        g, d = _padded_slab(estimate, values, z0, z1, halo, pad)
        # as (channel, z, x, y): numpy's loops are slow on a short last axis (1-3 channels, or
        # the slab's few slices), so the innermost one is y
        g, d = np.transpose(g, (3, 2, 0, 1)).copy(), np.transpose(d, (3, 2, 0, 1)).copy()
        # rows in blocks whose temporaries stay in the CPU cache
        rows = max(1, OFFSET_BLOCK_VALUES // (ny * (z1 - z0) * max(len(d), len(g))))
        for x0 in range(0, nx, rows):
            x1 = min(nx, x0 + rows)
            core = (slice(halo, halo + z1 - z0), slice(pad[0][0] + x0, pad[0][0] + x1),
                    slice(pad[1][0], pad[1][0] + ny))
            g0 = [channel[core] for channel in g]
            minus_pen = -np.transpose(penalty[x0:x1, :, z0:z1], (2, 0, 1))
            acc = np.zeros((len(d),) + minus_pen.shape, dtype=np.float32)
            wsum = np.zeros(minus_pen.shape, dtype=np.float32)
            # in place, in three buffers: the exp of every (voxel, offset) pair is the work here
            w, wd, wk = np.empty_like(wsum), np.empty_like(wsum), np.empty_like(wsum)
            for (ox, oy, oz), ws in zip(offsets, spatial_w):
                sl = tuple(slice(c.start + o, c.stop + o) for c, o in zip(core, (oz, ox, oy)))
                w[...] = 0.0
                for channel, centre in zip(g, g0):  # squared distance over the guide's channels
                    np.subtract(channel[sl], centre, out=wk)
                    np.square(wk, out=wk)
                    w += wk
                w *= minus_pen
                np.exp(w, out=w)
                w *= ws
                wsum += w
                for channel, total in zip(d, acc):
                    np.multiply(w, channel[sl], out=wd)
                    total += wd
            out[x0:x1, :, z0:z1] = np.transpose(acc / wsum, (2, 3, 1, 0))
            wsum_out[x0:x1, :, z0:z1] = np.transpose(wsum, (1, 2, 0))

    with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
        list(pool.map(run, range(0, nz, slab)))
    return out, wsum_out
