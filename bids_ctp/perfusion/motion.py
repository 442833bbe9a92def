"""Rigid head-motion correction of a 4D CTP series (pure function on numpy arrays).

Geometry and conventions
------------------------
``data`` is indexed ``(i, j, k, t)`` and ``spacing`` is the voxel size in mm along i, j, k.
Every frame is placed on a physical grid whose axes are the voxel axes scaled by the
spacing, with the volume centre (voxel ``(n - 1) / 2``) at 0 mm.  The rigid transform of a
frame is a SimpleITK ``Euler3DTransform`` centred at that point (the image centre); its six
parameters, in SimpleITK order, are

    rot_x, rot_y, rot_z (rad, about the i, j, k axes; rotation matrix Rz @ Rx @ Ry),
    trans_x, trans_y, trans_z (mm along i, j, k).

The transform maps a point of the reference frame to the same anatomical point in the moved
frame (ITK's fixed-to-moving convention), so ``corrected_t(x) = frame_t(T_t(x))``: it is the
transform that brings frame t back onto the reference.  The parameters are in the voxel-axis
frame, not in world (RAS) coordinates; for a diagonal affine they coincide up to the signs
of flipped axes.  The phantom (``bids_ctp.phantom``) writes its truth in the same convention.

Reference frame
---------------
Frame 0 unless ``reference`` says otherwise.  The best reference would be the median in
time of the pre-bolus frames, but bolus arrival is not known at this stage; frame 0 is
always pre-bolus, is the frame the clock starts at, and is what the phantom truth uses.

Registration (one frame at a time, each to the reference)
---------------------------------------------------------
* Intensities: every frame is converted to float32 HU first (int16 is never handed to the
  registration: linear interpolation of integers rounds, and differences can overflow),
  then clipped to ``REGISTRATION_WINDOW_HU`` = [-1100, 150] HU.  The upper bound caps the
  change an opacified vessel can make (45 -> 150 HU instead of 45 -> ~400 HU) so the bolus
  does not drive the metric; the lower bound leaves air alone.  A narrow soft-tissue
  window (e.g. [-100, 100]) was tried and is worse: clipping is not linear, so a voxel
  partly filled by the 1000 HU air/skin step, once interpolated and then clipped, no longer
  matches the reference, which biased the estimates by ~0.4 mm on the phantom.
* Metric: mean squares (sum of squared HU differences), made robust by Huber weights
  (``HUBER_K`` robust SDs of the residual; the bolus residue and voxels that left the field
  of view are down-weighted).  Frames come from the same scanner and protocol, so apart
  from the bolus a voxel keeps its HU value; the intensity relation is the identity, which
  is exactly the assumption of mean squares.  Mattes mutual information is meant for
  different intensity relations, needs histogram binning and random sampling (noisier,
  not deterministic) and costs several times more.
* Optimiser: inverse-compositional Gauss-Newton (Lucas-Kanade) with Levenberg-Marquardt
  damping, on a SimpleITK ``Euler3DTransform`` (SimpleITK resamples the moving frame at
  each iteration; numpy solves the 6 x 6 system).  SimpleITK's own
  ``ImageRegistrationMethod`` with regular-step gradient descent was tried first: it
  stalled along the rotations about the in-plane axes (weakly constrained by a thin slab)
  and needed 200+ iterations per frame.
* Speed: registration runs on a block-averaged copy (in-plane, and through-plane for thin
  slices) with voxels of about ``REGISTRATION_VOXEL_MM`` (block averaging also lowers the
  noise), in a 2-level pyramid (a further 2 x 2 in-plane average, then the registration
  grid), starting from the previous frame's solution, and refined on a grid of about
  ``REFINE_VOXEL_MM`` when the pixels are 1 mm or smaller (see there). Geometrically
  shrinking steps are extended by the rest of their series (``MAX_STEP_RATIO``), and a level
  that a finer one refines stops early (``COARSE_CONVERGED_MM``). Block averaging is one
  matrix product per axis, and the frames run in threads with one BLAS thread each.  Before
  registering, one Gauss-Newton step from the identity gives a linearised motion estimate; if it is below
  ``SKIP_BELOW_MM`` (FD units, mm) the frame is taken as still: parameters 0, frame copied
  unchanged (no interpolation blur).
* Resampling: every moved frame is resampled from its original full-resolution float32
  values with linear interpolation onto the original grid (same shape); voxels whose source
  lies outside the field of view keep the frame's own value (invented air would look like a
  bolus to the later stages). A registration that does not lower the mean squared difference
  to the reference by 5 % is discarded (featureless or very noisy data can drift).

Framewise displacement (Power et al. 2012, NeuroImage 59:2142)
--------------------------------------------------------------
``FD_t = sum |Delta trans| + FD_RADIUS_MM * sum |Delta rot|`` with rotations in rad turned
into arc length on a 50 mm sphere; Delta is relative to the previous frame (not to the
reference), and FD_0 = 0.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from threadpoolctl import threadpool_limits

REGISTRATION_WINDOW_HU = (-1100.0, 150.0)
REGISTRATION_VOXEL_MM = 4.0  # target voxel size of the block-averaged registration images
# A last level of about this voxel size refines the registration grid's solution when it
# still averages blocks of pixels (pixels of 1 mm or less), with at most REFINE_ITERATIONS
# steps until one moves the head by less than REFINE_CONVERGED_MM. On an independent phantom
# (0.85 mm pixels, 5 mm slices, 1-1.5 deg jerks) the 4 mm grid alone was 0.19 mm off the true
# transform on average (0.35 mm in the worst frame), with it 0.07 mm; the bone edges' residue
# had left a +8 HU step in grey matter from the jerk on, and GM CBF came out +55 %, now -3 %.
# At 2 mm pixels a full-resolution level fitted partial-volume changes instead (0.6 mm off).
REFINE_VOXEL_MM = 2.0
REFINE_ITERATIONS = 10
REFINE_CONVERGED_MM = 0.01
# With Huber weights the Gauss-Newton steps shrink geometrically (by 0.7-0.8 per step: the
# weights of the residuals beyond the threshold make the curvature look larger than it is),
# so a step along the previous one's direction (cosine > 0.9) that shrank by a ratio r in
# (0.2, MAX_STEP_RATIO) is extended by the rest of that series, 1 / (1 - r): half the
# iterations, and against the truth on four phantom series (two independent, two ours) mean
# errors of 0.099 / 0.069 / 0.076 / 0.060 mm instead of 0.104 / 0.085 / 0.074 / 0.061 mm.
MAX_STEP_RATIO = 0.95
# Gaussian pre-filter before block averaging, sigma in blocks: block means alone alias the
# 1000 HU skin/air and skull edges, which biased in-plane rotation by 0.45 deg on the
# phantom (2 mm motion; 0.01 deg with the filter) and left white-matter CBV 13 % high.
ANTIALIAS_SIGMA_BLOCKS = 1.0
AIR_HU = -1024.0  # value of voxels resampled from outside the field of view
HEAD_MIN_HU = -500.0  # registration images: voxels above this are the head (or its support)
FD_RADIUS_MM = 50.0  # Power et al. 2012: rotation (rad) -> arc length on a 50 mm sphere
# Voxels whose first-order motion artefact (edge strength x largest slice displacement) stays
# below this many HU get no motion regressor. The estimate sees only the acquired slices'
# edges, not the anatomy within a thick slice: on an independent phantom (1.3-1.4 deg jerks
# through 5 mm slices) white matter's mean curve stepped by +2.2 HU at the jerk (its peak:
# 10 HU), though most of it was estimated below 2 HU. At 0.5 instead of 2 HU, mean |error|
# of the regional CBF / CBV / MTT medians over 10 moving series 6.55 -> 4.78 % (GM 7.60 ->
# 3.91 %; without the independent one 2.96 -> 2.73 %), in no measurable extra time.
MIN_ARTEFACT_HU = 0.5
HUBER_K = 1.5  # Huber threshold in robust SDs of the residual
DAMPING = 0.1  # Levenberg-Marquardt damping (fraction of the Gauss-Newton diagonal)
HUBER_MIN_HU = 5.0  # floor of the robust residual scale (noise-free or very smooth data)
# the Huber scale is the median |residual| of every 5th voxel (tens of thousands: a scale precise
# to a few %, at a sixth of the full median's time)
SCALE_SAMPLE_STRIDE = 5
MAX_ITERATIONS = 30  # Gauss-Newton iterations per pyramid level
CONVERGED_MM = 0.002  # stop when the update moves the head by less than this (FD units)
# ... and on a level a finer one refines, this: the finer level starts there anyway. On four
# moving phantom series the same accuracy (0.099 / 0.068 / 0.076 / 0.059 mm against the true
# transforms) with a third fewer steps on those levels
COARSE_CONVERGED_MM = 0.03
# Residual artefact expected after the regressors, x the linear one (``artefact_weights``).
ARTEFACT_FRACTION = 0.05
SKIP_BELOW_MM = 0.05  # linearised motion estimate (FD units) below which a frame is left as is
# QC flag threshold.  0.5 mm is the framewise displacement Power et al. use to censor fMRI
# frames; for CTP it is also about half of a typical 0.5-1 mm in-plane pixel, the shift at
# which a skull (~1200 HU) edge starts to smear by hundreds of HU into neighbouring brain
# voxels, far above the 5-30 HU tissue enhancement the perfusion maps are made of.  It is a
# convention borrowed from fMRI, not a CTP-validated limit: the flag means "look at it".
MOTION_FD_THRESHOLD_MM = 0.5
PARAMETER_NAMES = ("rot_x", "rot_y", "rot_z", "trans_x", "trans_y", "trans_z")


class MotionResult(NamedTuple):
    corrected: np.ndarray  # float32, same shape as data
    parameters: np.ndarray  # (T, 6) rot_x, rot_y, rot_z (rad), trans_x, trans_y, trans_z (mm)
    framewise_displacement: np.ndarray  # (T,) mm, relative to the previous frame; FD[0] = 0


# ---------------------------------------------------------------- geometry helpers
def _centred_origin(shape, spacing) -> tuple[float, float, float]:
    return tuple(-0.5 * (n - 1) * s for n, s in zip(shape, spacing))


def to_image(volume: np.ndarray, spacing, origin=None) -> sitk.Image:
    """float32 SimpleITK image of an (i, j, k) array, spacing in mm, centre at 0 mm unless ``origin``."""
    vol = np.asarray(volume, dtype=np.float32)
    img = sitk.GetImageFromArray(vol.T)  # sitk arrays are (k, j, i)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in (origin if origin is not None else _centred_origin(vol.shape, spacing))))
    return img


def rigid_transform(parameters) -> sitk.Euler3DTransform:
    """Euler3DTransform centred at the image centre (0 mm) from (rot_x, rot_y, rot_z, trans_x, trans_y, trans_z)."""
    tx = sitk.Euler3DTransform()
    tx.SetCenter((0.0, 0.0, 0.0))
    tx.SetParameters(tuple(float(p) for p in parameters))
    return tx


def apply_rigid(volume: np.ndarray, spacing, parameters, default: float = AIR_HU, inverse: bool = False, n_threads: int = 1) -> np.ndarray:
    """Resample one (i, j, k) volume with linear interpolation: ``out(x) = volume(T(x))`` (float32, same grid).

    With ``inverse=True`` T^-1 is used instead, i.e. the volume is *moved* by the motion T
    (this is how the phantom simulates motion).
    """
    img = to_image(volume, spacing)
    tx = rigid_transform(parameters)
    if inverse:
        tx = tx.GetInverse()
    return _resample(img, tx, default, n_threads)


def _resample(img: sitk.Image, tx, default: float, n_threads: int,
              extrapolate: bool = False) -> np.ndarray:
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(img)
    f.SetTransform(tx)
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(float(default))
    f.SetUseNearestNeighborExtrapolator(extrapolate)
    f.SetOutputPixelType(sitk.sitkFloat32)
    f.SetNumberOfThreads(max(1, int(n_threads)))
    return sitk.GetArrayFromImage(f.Execute(img)).T


# ---------------------------------------------------------------- framewise displacement and QC
def framewise_displacement(parameters: np.ndarray, radius_mm: float = FD_RADIUS_MM) -> np.ndarray:
    """Power et al. 2012 FD (mm) of (T, 6) parameters, each frame relative to the previous one; FD[0] = 0."""
    p = np.asarray(parameters, dtype=float)
    if p.ndim != 2 or p.shape[1] != 6:
        raise ValueError("parameters must be (T, 6): rot_x, rot_y, rot_z (rad), trans_x, trans_y, trans_z (mm)")
    d = np.abs(np.diff(p, axis=0))
    fd = d[:, 3:].sum(axis=1) + radius_mm * d[:, :3].sum(axis=1)
    return np.concatenate([[0.0], fd])


def motion_qc_flag(framewise_displacement_mm, threshold_mm: float = MOTION_FD_THRESHOLD_MM) -> bool:
    """QC flag: True when any frame moved more than ``threshold_mm`` (FD) since the previous frame."""
    fd = np.asarray(framewise_displacement_mm, dtype=float)
    return bool(fd.size and np.nanmax(fd) > threshold_mm)


# ---------------------------------------------------------------- residual artefact regressor
def slice_displacement(parameters, shape, spacing, voxels) -> np.ndarray:
    """Displacement (mm) of each voxel along the slice axis in every frame, (n_voxels, T) float32.

    Resampling cannot undo motion across thick slices: a slice shifted by 1 mm along its 5 mm
    thickness holds different tissue, and at a skull or CSF edge the difference is tens to
    hundreds of HU, while tissue enhances by 5-30 HU. To first order that residual artefact is
    proportional to the voxel's displacement along the slice axis (on the phantom, 99 % of the
    variance of the artefact in grey matter after correction with the true motion), so the
    perfusion fit takes this displacement as a per-voxel nuisance regressor. The slice axis is
    the one with the largest spacing (k when all are equal).

    ``parameters`` (T, 6) in the convention of this module; ``voxels`` (n, 3) voxel indices of
    a volume of ``shape`` with ``spacing`` (mm).
    """
    spacing = np.asarray(spacing, float)
    axis = 2 if np.ptp(spacing) < 0.01 * spacing.max() else int(np.argmax(spacing))
    x = np.asarray(voxels, float) * spacing + np.asarray(_centred_origin(shape, spacing))
    out = np.empty((len(x), len(parameters)), dtype=np.float32)
    for t, p in enumerate(np.asarray(parameters, float)):
        m = _affine(rigid_transform(p))
        out[:, t] = x @ m[axis, :3] + m[axis, 3] - x[:, axis]
    return out


def edge_strength(baseline: np.ndarray, spacing) -> np.ndarray:
    """|gradient| of an unenhanced image (HU/mm): the HU a displacement of 1 mm moves in or
    out of each voxel, to first order."""
    return np.linalg.norm(np.gradient(np.asarray(baseline, np.float32), *spacing), axis=0)


def expected_artefact_hu(parameters, edge: np.ndarray, spacing, voxels) -> np.ndarray:
    """First-order size (HU) of the motion artefact each voxel can carry after correction:
    ``edge`` (``edge_strength``, HU/mm) at ``voxels`` (n, 3) times their largest
    ``slice_displacement`` (mm). (n,) float32."""
    voxels = np.asarray(voxels)
    reach = np.abs(slice_displacement(parameters, edge.shape, spacing, voxels)).max(axis=1)
    return edge[tuple(voxels.T)] * reach


def round_trip(volume: np.ndarray, spacing, parameters) -> np.ndarray:
    """``volume`` moved by a frame's motion (linear interpolation; beyond the grid, its
    nearest voxel), then corrected as ``correct_motion`` does (linear interpolation back;
    where that falls outside the grid, the moved value)."""
    img = to_image(volume, spacing)
    there = _resample(img, rigid_transform(parameters).GetInverse(), 0.0, 1, extrapolate=True)
    back = _resample(to_image(there, spacing), rigid_transform(parameters), np.nan, 1)
    return np.where(np.isfinite(back), back, there)


def _index_at(shape, spacing, m: np.ndarray, voxels) -> np.ndarray:
    """Continuous voxel index (n, 3) of T(x) for ``voxels`` (n, 3) of a grid of ``shape``,
    with T the 4x4 point mapping ``m`` (``_affine``) in this module's centred frame."""
    spacing = np.asarray(spacing, float)
    origin = np.asarray(_centred_origin(shape, spacing))
    x = np.asarray(voxels, float) * spacing + origin
    return (x @ m[:3, :3].T + m[:3, 3] - origin) / spacing


def round_trip_at(volume: np.ndarray, spacing, parameters, voxels) -> np.ndarray:
    """``round_trip`` of ``volume`` at ``voxels`` (n, 3) only, for every frame of
    ``parameters`` (T, 6): (n, T) float32. Two trilinear interpolations per voxel and frame
    (the move, at the 8 grid nodes the correction then reads, and the correction), so a few
    thousand voxels cost milliseconds where a whole-brain round trip per frame takes seconds.
    Beyond the grid the nearest voxel is used for both steps."""
    volume = np.asarray(volume, np.float32)
    spacing = np.asarray(spacing, float)
    origin = np.asarray(_centred_origin(volume.shape, spacing))
    upper = np.asarray(volume.shape) - 1
    corners = np.array([(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    out = np.empty((len(voxels), len(parameters)), np.float32)
    for t, p in enumerate(np.asarray(parameters, float)):
        if not np.any(p):
            out[:, t] = volume[tuple(np.asarray(voxels).T)]
            continue
        m = _affine(rigid_transform(p))
        # the correction reads the moved image at T(x), between 8 grid nodes
        at = np.clip(_index_at(volume.shape, spacing, m, voxels), 0, upper)
        low = np.minimum(np.floor(at), np.maximum(upper - 1, 0)).astype(int)
        frac = at - low
        nodes = np.minimum(low[:, None, :] + corners[None], upper)  # (n, 8, 3)
        # the moved image at a node g is volume(T^-1 g)
        g = nodes.reshape(-1, 3) * spacing + origin
        back = np.linalg.solve(m[:3, :3], (g - m[:3, 3]).T).T
        moved = ndimage.map_coordinates(volume, ((back - origin) / spacing).T, order=1,
                                        mode="nearest").reshape(len(voxels), 8)
        weights = np.prod(np.where(corners[None], frac[:, None, :], 1 - frac[:, None, :]), axis=2)
        out[:, t] = (weights * moved).sum(axis=1)
    return out


def _corrected_at(moved: np.ndarray, spacing, parameters, voxels) -> np.ndarray:
    """What ``correct_motion``'s resampling of ``moved`` gives at ``voxels`` (n, 3): linear
    interpolation at T(x), the edge value within half a voxel beyond the grid (as SimpleITK),
    and where T(x) is further out, the moved value itself."""
    at = _index_at(moved.shape, spacing, _affine(rigid_transform(parameters)), voxels)
    upper = np.asarray(moved.shape) - 1
    outside = ((at < -0.5) | (at > upper + 0.5)).any(axis=1)
    out = ndimage.map_coordinates(moved, np.clip(at, 0, upper).T, order=1, mode="nearest")
    out[outside] = moved[tuple(np.asarray(voxels)[outside].T)]
    return out


def residual_motion_regressor(parameters, edge: np.ndarray, spacing, brain: np.ndarray,
                              baseline_frames: int, scene: np.ndarray | None = None,
                              min_artefact_hu: float = MIN_ARTEFACT_HU, n_threads: int = 1):
    """Per-voxel nuisance regressors of the motion left after correction, or None.

    1. ``slice_displacement``: the slab of a thick slice holds other tissue.
    2. With ``scene`` (the unenhanced head over the whole grid, bone included): what the
       correction's interpolation does to it, ``round_trip(scene) - scene``. Resampling there
       and back blurs an edge as a function of the sub-voxel part of the shift, not linearly
       in it: next to bone that is tens of HU, as large as the bolus. With it, grey-matter
       MTT on the 2 mm motion phantoms went from +11 to +6 % (oblique box residue) and from
       +13 to +9 % (mean of four other paths); its per-voxel median error fell on three of
       four phantoms (e.g. 52 -> 43 %) and rose on one (45 -> 51 %). On a head moved by
       interpolation alone (how a phantom without a slab model moves it) GM CBF went from
       +4 to -2 %.
    Each minus its baseline mean (as for the enhancement curves), kept only where the
    artefact can matter: where ``edge`` (``edge_strength`` of the unenhanced head, HU/mm) times
    the largest displacement exceeds ``min_artefact_hu``, i.e. near skull, CSF and vessel
    edges and grey-white boundaries. Elsewhere (uniform tissue) they are 0, so the fit there
    keeps all its degrees of freedom. Returns (n_brain, k, T) float32, or None when no voxel
    qualifies (a still head).
    ``n_threads``: threads of each resampling of the scene.
    """
    voxels = np.argwhere(brain)
    parameters = np.asarray(parameters, float)
    # filled in place: a whole brain's regressors are GBs
    regressors = np.zeros((len(voxels), 1 if scene is None else 2, len(parameters)), np.float32)
    regressors[:, 0] = slice_displacement(parameters, brain.shape, spacing, voxels)
    clean = edge[brain] * np.abs(regressors[:, 0]).max(axis=1) < min_artefact_hu
    if clean.all():
        return None
    if scene is not None:  # round_trip, read back only where the regressors are kept
        near = voxels[~clean]
        unmoved = scene[tuple(near.T)]
        image = to_image(scene, spacing)
        for t, p in enumerate(parameters):
            if np.any(p):
                there = _resample(image, rigid_transform(p).GetInverse(), 0.0, n_threads,
                                  extrapolate=True)
                regressors[~clean, 1, t] = _corrected_at(there, spacing, p, near) - unmoved
    regressors -= regressors[..., : max(1, int(baseline_frames))].mean(axis=2, keepdims=True)
    regressors[clean] = 0.0
    return regressors


def artefact_weights(regressor: np.ndarray, edge: np.ndarray, noise_sd: float) -> np.ndarray:
    """Per-voxel frame weights (n_brain, T) for the perfusion fit: 1 / (1 + (a / noise_sd)²).

    a = ARTEFACT_FRACTION x ``edge`` (``edge_strength`` at each brain voxel, HU/mm) x
    |displacement from the baseline position| (mm, ``regressor``'s first row) is the size of the
    first-order motion artefact, which the regressor removes only in part: at cortex next to
    1200 HU bone, 2 mm of through-plane motion on 5 mm slices moves hundreds of HU in and out
    of a voxel whose bolus is 20 HU, and the partial volume is not linear in the displacement
    once an edge crosses the slice. So a frame counts as much as its expected error allows
    (weighted least squares with variance noise² + a²), and such voxels are fitted mostly on
    their frames near the baseline position. Voxels without a regressor (deep tissue) keep
    weight 1. The regressors remove most of the artefact, so a is ARTEFACT_FRACTION = 0.05 of
    the linear one. At 1.0, when the head drifted away before the bolus and stayed (a 220 HU
    bolus arriving at 14 s, 1 mm motion, box residue), every bolus frame of the cortex weighed
    next to nothing and GM CBF came out +24...+59 % (MTT -33...-55 %); at 0.1 GM was within
    9.1 % (0.3: +20 %, 0: +10 %). Since the smoothing guide's bolus channels, fewer voxels are
    averaged with that cortex: its GM CBF / MTT were +8...+19 / -12...-24 % at 0.1 and are
    +12...+15 / -12...-19 % at 0.05. Over 54 moving series (52 of our phantom sets, 2 of an
    independently made one) GM's mean |error| is CBF 5.4 / 5.0 / 4.8 %, CBV 9.4 / 9.2 / 8.9 %,
    MTT 7.9 / 7.1 / 6.8 % at 0.1 / 0.05 / 0.03, no other region's moves by 0.1 point, and no
    dataset's worst region gets worse at 0.05 by more than 0.4 points; 0.03 made one 1.4
    points worse and lets more of a nonlinear edge artefact into the fit (the unit test's
    exponential residue: CBF +16 / +37 / +67 %).
    """
    if regressor.ndim == 3:  # the displacement, as above
        regressor = regressor[:, 0]
    edge = np.float32(ARTEFACT_FRACTION) * np.asarray(edge, np.float32)[:, None]
    weights = np.abs(regressor).astype(np.float32)  # then in place: one (n_brain, T) array
    weights *= edge
    weights /= np.float32(max(noise_sd, 1e-3))
    np.square(weights, out=weights)
    weights += np.float32(1.0)
    return np.reciprocal(weights, out=weights)


# ---------------------------------------------------------------- registration
def _block_factors(spacing, voxel_mm=REGISTRATION_VOXEL_MM) -> tuple[int, int, int]:
    return tuple(max(1, int(round(voxel_mm / s))) if s < voxel_mm else 1 for s in spacing)


def _block_grid(spacing, origin, factors):
    """Spacing and origin (mm) of the grid of f_i x f_j x f_k block means: block k is centred
    on voxel f*k + (f - 1)/2 of the finer grid."""
    return (tuple(s * f for s, f in zip(spacing, factors)),
            tuple(o + 0.5 * (f - 1) * s for o, f, s in zip(origin, factors, spacing)))


def _downsample(volume: np.ndarray, factors, window, antialias: bool = True) -> np.ndarray:
    """Clip to the window (float32), low-pass along the block-averaged axes and average
    f_i x f_j x f_k blocks (trailing remainder dropped)."""
    v = np.clip(np.asarray(volume, dtype=np.float32), window[0], window[1])
    # axis by axis, the one reduced most first: each is one matrix product (both steps are
    # linear and separable), 4x faster than ndimage's filter at 0.85 mm pixels
    for axis in sorted(range(3), key=lambda a: -factors[a]):
        if factors[axis] > 1:
            matrix = _decimation_matrix(v.shape[axis], factors[axis], antialias)
            v = np.moveaxis(np.tensordot(matrix, v, axes=([1], [axis])), 0, axis)
    return v


@lru_cache(maxsize=32)
def _decimation_matrix(n: int, factor: int, antialias: bool) -> np.ndarray:
    """(n // factor, n) float32 matrix of a Gaussian low-pass of ANTIALIAS_SIGMA_BLOCKS blocks
    (ndimage's, reflecting at the ends) followed by block means along one axis."""
    low_pass = np.eye(n)
    if antialias:
        low_pass = ndimage.gaussian_filter1d(low_pass, ANTIALIAS_SIGMA_BLOCKS * factor, axis=0)
    m = n // factor
    return np.ascontiguousarray(low_pass[: m * factor].reshape(m, factor, n).mean(axis=1),
                                dtype=np.float32)


def _affine(tx) -> np.ndarray:
    """4x4 matrix of a centred-at-0 rigid transform (point mapping)."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    m[:3, 3] = np.asarray(tx.GetTranslation()) + np.asarray(tx.GetCenter()) - m[:3, :3] @ np.asarray(tx.GetCenter())
    return m


def _from_affine(m: np.ndarray) -> sitk.Euler3DTransform:
    tx = sitk.Euler3DTransform()
    tx.SetCenter((0.0, 0.0, 0.0))
    tx.SetMatrix(tuple(m[:3, :3].ravel()), 1e-6)
    tx.SetTranslation(tuple(m[:3, 3]))
    return tx


class _Level:
    """One pyramid level of inverse-compositional Gauss-Newton (Lucas-Kanade) rigid registration.

    The reference's steepest-descent images (gradient times the Jacobian of the Euler
    transform at identity) and their 6 x 6 Gauss-Newton matrix are computed once; each
    iteration resamples the moving frame through the current SimpleITK Euler3DTransform,
    solves the 6 x 6 system and composes the current transform with the inverse increment.
    Gauss-Newton scales the six parameters by the curvature of the cost itself, which
    matters here: rotations about the in-plane axes are weakly constrained by a thin slab
    of thick slices, and first-order optimisers (gradient descent with fixed parameter
    scales) stall along them.
    """

    def __init__(self, ref: np.ndarray, spacing, origin):
        gx, gy, gz = np.gradient(ref.astype(np.float64), *spacing)
        # compared within the head's box and 2 voxels of air: the air beyond has no edges,
        # only noise (20-35 % fewer resampled voxels on the phantoms, same accuracy)
        head = np.argwhere(ref > HEAD_MIN_HU)
        if len(head):
            lo = np.maximum(head.min(axis=0) - 2, 0)
            hi = np.minimum(head.max(axis=0) + 3, ref.shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            ref, gx, gy, gz = ref[box], gx[box], gy[box], gz[box]
            origin = tuple(o + s * a for o, s, a in zip(origin, spacing, lo))
        self.ref_img = to_image(ref, spacing, origin)
        axes = [o + s * np.arange(n) for o, s, n in zip(origin, spacing, ref.shape)]
        x, y, z = np.meshgrid(*axes, indexing="ij")
        # moving(T(x)) - ref(x) ~ grad . (w x r + t) = (r x grad) . w + grad . t
        sd = np.stack([y * gz - z * gy, z * gx - x * gz, x * gy - y * gx, gx, gy, gz], axis=-1)
        # float32, (6, voxels) with the voxels in SimpleITK's (k, j, i) order: no copies of the
        # resampled frame, and contiguous rows for the products of every step
        self.sd = np.ascontiguousarray(sd.transpose(3, 2, 1, 0), np.float32).reshape(6, -1)
        self.ref = np.ascontiguousarray(ref.T, np.float32).ravel()

    def step(self, moving: sitk.Image, tx) -> tuple[np.ndarray, float]:
        warped = sitk.Resample(moving, self.ref_img, tx, sitk.sitkLinear, np.nan, sitk.sitkFloat32)
        # (a view of ``warped``, so it must stay referenced until the subtraction copies it)
        err = sitk.GetArrayViewFromImage(warped).ravel() - self.ref
        outside = np.isnan(err)
        # Robust (Huber) weights: voxels the bolus changed, or that moved out of the field of
        # view, do not dominate the least squares.
        size = np.abs(err)
        inside = size[~outside] if outside.any() else size
        scale = max(1.4826 * float(np.median(inside[::SCALE_SAMPLE_STRIDE])), HUBER_MIN_HU)
        k = HUBER_K * scale
        w = np.minimum(np.float32(1.0), np.float32(k) / np.maximum(size, np.float32(1e-12)))
        if outside.any():
            w[outside], err[outside] = 0.0, 0.0
        weighted = self.sd * w
        # the 21 distinct products one by one: BLAS's 6 x n x 6 product is 3x slower
        h = np.empty((6, 6))
        for i in range(6):
            for j in range(i, 6):
                h[i, j] = h[j, i] = weighted[i] @ self.sd[j]
        gradient = (weighted @ err).astype(np.float64)
        # Levenberg-Marquardt damping, plus a tiny ridge for directions the image does not
        # constrain at all (e.g. z for a stack of identical slices): those stay at 0.
        h = h + DAMPING * np.diag(np.diag(h)) + 1e-9 * (np.trace(h) / 6.0 + 1e-12) * np.eye(6)
        dp = np.linalg.solve(h, gradient)
        return dp, float(np.abs(dp[3:]).sum() + FD_RADIUS_MM * np.abs(dp[:3]).sum())


def _register(levels, moving_images, initial) -> np.ndarray:
    m = _affine(rigid_transform(initial))
    for i, (level, moving) in enumerate(zip(levels, moving_images)):
        refining = i >= 2  # the REFINE_VOXEL_MM level
        previous = None
        for _ in range(REFINE_ITERATIONS if refining else MAX_ITERATIONS):
            dp, size = level.step(moving, _from_affine(m))
            move = dp
            if previous is not None:  # extend a geometric series of steps (MAX_STEP_RATIO)
                ratio = size / max(previous[1], 1e-12)
                cosine = dp @ previous[0] / max(np.linalg.norm(dp) * np.linalg.norm(previous[0]),
                                                1e-12)
                if cosine > 0.9 and 0.2 < ratio < MAX_STEP_RATIO:
                    move = dp / (1.0 - ratio)
            m = m @ np.linalg.inv(_affine(rigid_transform(move)))
            previous = (dp, size)
            if size < (REFINE_CONVERGED_MM if refining else
                       CONVERGED_MM if i == len(levels) - 1 else COARSE_CONVERGED_MM):
                break
    return np.asarray(_from_affine(m).GetParameters(), dtype=float)


def _improves(reference, moving, parameters, spacing, origin, margin=0.95) -> bool:
    """Whether the rigid transform lowers the mean squared difference to the reference.

    Compared on the registration grid over voxels the moved frame still covers.
    """
    moved = _resample(to_image(moving, spacing, origin), rigid_transform(parameters), np.nan, 1)
    valid = np.isfinite(moved)
    if not valid.any():
        return False
    after = np.mean((moved[valid] - reference[valid]) ** 2)
    before = np.mean((moving[valid] - reference[valid]) ** 2)
    return bool(after < margin * before)


def correct_motion(data: np.ndarray, spacing, reference: int | None = None, n_threads: int = 1,
                   skip_below_mm: float = SKIP_BELOW_MM, out: np.ndarray | None = None) -> MotionResult:
    """Rigidly register every frame of ``data`` (i, j, k, t) to the reference frame and resample it.

    ``spacing``: voxel size (mm) along i, j, k.  ``reference``: frame index (default 0).
    ``n_threads``: frames registered in parallel threads (SimpleITK and numpy release the GIL
    while they work); each frame then starts from the identity instead of the previous
    frame's solution.  ``skip_below_mm``: frames whose linearised motion estimate (FD units) is below
    this are left untouched; 0 registers every frame.  ``out``: float32 array of ``data``'s
    shape to write the corrected series into (e.g. a memory-mapped file), else a new one.
    See the module docstring for the conventions of the returned parameters and FD.
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError("data must be 4D (i, j, k, t)")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError("spacing needs three positive values (mm)")
    n_t = data.shape[3]
    ref_index = 0 if reference is None else int(reference)
    if not -n_t <= ref_index < n_t:
        raise ValueError(f"reference frame {reference} outside 0..{n_t - 1}")
    ref_index %= n_t

    factors = _block_factors(spacing)
    full_origin = _centred_origin(data.shape[:3], spacing)
    ds_spacing, ds_origin = _block_grid(spacing, full_origin, factors)
    window = REGISTRATION_WINDOW_HU

    # Pyramid: level 1 = the registration grid, level 0 = a further 2 x 2 in-plane block average.
    coarse = (2, 2, 1)
    c_spacing, c_origin = _block_grid(ds_spacing, ds_origin, coarse)

    # A last, finer level (REFINE_VOXEL_MM) where it still averages blocks
    refine = _block_factors(spacing, REFINE_VOXEL_MM)
    refine = None if refine == factors or max(refine) < 2 else refine
    if refine:
        r_spacing, r_origin = _block_grid(spacing, full_origin, refine)

    def pyramid(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        small = _downsample(volume, factors, window)
        return _downsample(small, coarse, (-np.inf, np.inf), antialias=False), small

    ref_c, ref_f = pyramid(data[..., ref_index])
    levels = [_Level(ref_c, c_spacing, c_origin), _Level(ref_f, ds_spacing, ds_origin)]
    if refine:
        levels.append(_Level(_downsample(data[..., ref_index], refine, window), r_spacing, r_origin))

    corrected = np.empty(data.shape, dtype=np.float32, order="F") if out is None else out
    params = np.zeros((n_t, 6))
    still = np.zeros(6)

    def frame_job(t: int, initial: np.ndarray) -> np.ndarray:
        frame = np.asarray(data[..., t], dtype=np.float32)
        if t == ref_index:
            corrected[..., t] = frame
            return still
        small_c, small_f = pyramid(frame)
        moving = [to_image(small_c, c_spacing, c_origin), to_image(small_f, ds_spacing, ds_origin)]
        if skip_below_mm > 0:
            # Cheap first check: one Gauss-Newton step from identity on the registration grid.
            if levels[1].step(moving[1], rigid_transform(still))[1] < skip_below_mm:
                corrected[..., t] = frame
                return still
        if refine:  # only for frames that moved
            moving.append(to_image(_downsample(frame, refine, window), r_spacing, r_origin))
        p = _register(levels, moving, initial)
        if not _improves(ref_f, small_f, p, ds_spacing, ds_origin):
            # A featureless or very noisy series can drift: keep a frame the registration
            # cannot match better than it already is.
            corrected[..., t] = frame
            return still
        moved = _resample(to_image(frame, spacing, full_origin), rigid_transform(p), np.nan, 1)
        # Where the frame does not reach (through-plane motion at the first and last slices),
        # keep its own value rather than inventing air, which would look like a bolus.
        corrected[..., t] = np.where(np.isfinite(moved), moved, frame)
        return p

    # One BLAS thread: between the many small products of the Gauss-Newton steps BLAS's own
    # threads spin and take the CPU the frames' threads need (independent moving phantom,
    # 2 cores: 4.3 s and 8.3 CPU-s -> 3.0 s and 5.1 CPU-s)
    with threadpool_limits(limits=1, user_api="blas"):
        if n_threads <= 1:
            # Sequential: each frame starts from the previous frame's solution (motion is
            # smooth in time).
            prev = np.zeros(6)
            for t in list(range(ref_index, n_t)) + list(range(ref_index - 1, -1, -1)):
                if t == ref_index - 1:
                    prev = np.zeros(6)
                params[t] = frame_job(t, prev)
                prev = params[t]
        else:
            with ThreadPoolExecutor(max_workers=int(n_threads)) as pool:
                jobs = pool.map(lambda t: frame_job(t, np.zeros(6)), range(n_t))
                for t, p in zip(range(n_t), jobs):
                    params[t] = p
    return MotionResult(corrected, params, framewise_displacement(params))
