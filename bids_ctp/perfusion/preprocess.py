"""Noise estimation and edge-preserving, spacing-aware smoothing of the 4D CTP series.

Filter choice: a cross (joint) bilateral filter. Every frame is averaged over a spatial Gaussian
neighbourhood (sigma in mm, so the same anatomy is averaged at any pixel size), weighted by how
similar the neighbours are in the time-averaged image, whose noise is sqrt(n_frames) lower
than a single frame's. Skull, air, CSF, grey and white matter and vessels differ there by far
more than its noise, so edges between them survive while every tissue curve is averaged only
with curves of its own kind. Unlike iterative diffusion filters (SimpleITK CurvatureFlow or
anisotropic diffusion, whose stable time step depends on the spacing), it has no time step and
no stability condition, and every frame gets identical weights, so the shape of the curves
(hence CBF and Tmax) is not distorted frame by frame.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

TARGET_NOISE_HU = 1.5  # residual per-frame noise the smoothing aims for
SIGMA_RANGE_MM = (1.0, 3.0)  # spatial Gaussian sigma bounds; neighbourhood truncated at 2 sigma
RANGE_SIGMA_IN_NOISE_UNITS = 2.5  # range sigma = this x noise of the time-averaged guide
SOFT_TISSUE_HU = (-50.0, 150.0)  # voxels used to estimate the noise
GUIDE_DENOISE_GAIN = 2.0  # the denoised guide's noise is at least this much lower
BASELINE_SIGMA_MM = 2.0  # spatial sigma of the baseline image's own denoising
AIR_HU = -500.0  # time-averaged voxels below this are air, left unsmoothed


def estimate_noise(data: np.ndarray) -> float:
    """Per-frame noise SD (HU) in soft tissue, robust to the bolus.

    Uses the second temporal difference r = I(t) - (I(t-1) + I(t+1)) / 2, which removes slowly
    varying signal; for white noise var(r) = 1.5 sigma^2. A median absolute deviation over
    soft-tissue voxels ignores the few vessels where the bolus is not slow.
    """
    mean = data.mean(axis=-1)
    soft = (mean > SOFT_TISSUE_HU[0]) & (mean < SOFT_TISSUE_HU[1])
    where = np.nonzero(soft if soft.any() else np.ones(mean.shape, dtype=bool))
    # a random-free, even subsample is plenty for a median; taken before copying any curve,
    # so a whole-brain series is not duplicated in memory
    step = max(1, where[0].size // 200_000)
    curves = data[tuple(axis[::step] for axis in where)]
    resid = curves[:, 1:-1] - 0.5 * (curves[:, :-2] + curves[:, 2:])
    mad = np.median(np.abs(resid - np.median(resid)))
    return float(1.4826 * mad / np.sqrt(1.5))


def smoothing_sigma(noise_sd: float, spacing) -> float:
    """Spatial sigma (mm) that averages enough voxels to bring ``noise_sd`` to TARGET_NOISE_HU.

    A 2D Gaussian of sigma s over pixels of area a averages about 4·pi·s²/a independent voxels,
    so noise falls by sqrt of that. Noisier or finer-pixel scans get more smoothing in voxels,
    bounded in mm to keep lesions resolved.
    """
    pixel_area = float(spacing[0]) * float(spacing[1])
    n_needed = (noise_sd / TARGET_NOISE_HU) ** 2
    sigma = np.sqrt(n_needed * pixel_area / (4 * np.pi))
    return float(np.clip(sigma, *SIGMA_RANGE_MM))


def neighbourhood(spacing, sigma_mm: float):
    """Offsets (voxels) and spatial weights of a Gaussian truncated at 2 sigma, in mm."""
    radius = [int(np.floor(2 * sigma_mm / s)) for s in spacing]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    d2 = ((offsets * np.asarray(spacing, dtype=float)) ** 2).sum(axis=1)
    keep = d2 <= (2 * sigma_mm) ** 2
    return offsets[keep], np.exp(-0.5 * d2[keep] / sigma_mm**2).astype(np.float32)


def cross_bilateral(data: np.ndarray, spacing, sigma_mm: float | None = None,
                    noise_sd: float | None = None, n_threads: int = 1) -> np.ndarray:
    """Edge-preserving smoothing of a 4D series (x, y, z, t) guided by its time average.

    Returns a new float32 array. Processed in slabs along the third axis (with a halo), in
    ``n_threads`` threads, so memory stays at a few frames' worth beyond input and output.
    ``sigma_mm`` defaults to :func:`smoothing_sigma` of the estimated noise.
    """
    data = np.asarray(data, dtype=np.float32)
    if noise_sd is None:
        noise_sd = estimate_noise(data)
    if sigma_mm is None:
        sigma_mm = smoothing_sigma(noise_sd, spacing)
    guide = data.mean(axis=-1)
    range_sigma = max(RANGE_SIGMA_IN_NOISE_UNITS * noise_sd / np.sqrt(data.shape[-1]), 1e-3)
    if data.shape[-1] > 1:
        # Denoise the guide itself (a 3D self-guided pass, cheap): at 25 HU noise its own
        # noise made the range sigma as large as the grey/white matter contrast.
        guide = cross_bilateral(guide[..., None], spacing, sigma_mm,
                                noise_sd / np.sqrt(data.shape[-1]), n_threads)[..., 0]
        range_sigma /= GUIDE_DENOISE_GAIN
    offsets, spatial_w = neighbourhood(spacing, sigma_mm)
    # Air around the head needs no smoothing: work inside the head's bounding box only.
    out = data.copy()
    head = np.argwhere((guide > AIR_HU).any(axis=2))
    if head.size == 0:
        return out
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(head.min(axis=0), head.max(axis=0)))
    sub_data, sub_guide = data[box], guide[box]
    sub_out = out[box]  # a view: results land in ``out``
    halo = int(np.abs(offsets[:, 2]).max()) if len(offsets) else 0
    pad = [(r, r) for r in np.abs(offsets[:, :2]).max(axis=0)] if len(offsets) else [(0, 0)] * 2
    nx, ny, nz = sub_data.shape[:3]
    slab = 2  # slices per task: small temporaries, enough tasks for the threads
    inv2r2 = np.float32(-0.5 / range_sigma**2)

    def run(z0):
        z1 = min(nz, z0 + slab)
        lo, hi = max(0, z0 - halo), min(nz, z1 + halo)
        zpad = [(halo - (z0 - lo), halo - (hi - z1))]
        g = np.pad(sub_guide[:, :, lo:hi], pad + zpad, mode="edge")
        d = np.pad(sub_data[:, :, lo:hi], pad + zpad + [(0, 0)], mode="edge")
        core = (slice(pad[0][0], pad[0][0] + nx), slice(pad[1][0], pad[1][0] + ny),
                slice(halo, halo + z1 - z0))
        g0 = g[core]
        acc = np.zeros(d[core].shape, dtype=np.float32)
        term = np.empty_like(acc)
        wsum = np.zeros(g0.shape, dtype=np.float32)
        for (ox, oy, oz), ws in zip(offsets, spatial_w):
            sl = tuple(slice(c.start + o, c.stop + o) for c, o in zip(core, (ox, oy, oz)))
            w = np.exp(inv2r2 * (g[sl] - g0) ** 2) * ws
            wsum += w
            np.multiply(w[..., None], d[sl], out=term)
            acc += term
        sub_out[:, :, z0:z1] = acc / wsum[..., None]

    with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
        list(pool.map(run, range(0, nz, slab)))
    return out


def denoise_baseline(baseline: np.ndarray, spacing, series_noise_sd: float, n_frames: int,
                     n_threads: int = 1) -> np.ndarray:
    """Edge-preserving denoising of the per-voxel baseline (mean of ``n_frames`` frames).

    The baseline is subtracted from every frame, so its noise (``series_noise_sd`` /
    sqrt(n_frames)) becomes a constant offset on the whole enhancement curve; a positive one
    looks like a slow tail. At 2 s sampling (4 baseline frames) that offset made box-residue
    tissue look exponential to the residue-family choice under 1 mm head motion. The baseline
    is a still image, so it can be averaged over its neighbourhood (guided by itself, so tissue
    boundaries stay) without touching the curves' time course.
    """
    noise = series_noise_sd / np.sqrt(max(1, int(n_frames)))
    return cross_bilateral(np.asarray(baseline, np.float32)[..., None], spacing,
                           BASELINE_SIGMA_MM, noise, n_threads)[..., 0]
