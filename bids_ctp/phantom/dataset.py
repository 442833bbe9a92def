"""Write the phantom as a BIDS raw dataset plus a ground-truth derivatives dataset.

Image model, per voxel and frame: ``baseline_HU[label] + enhancement[label](t) + noise``,
with Gaussian noise of sd ``noise_hu`` drawn from ``numpy.random.default_rng([seed,
subject_index])``, rounded to int16.  Artery voxels (partial-volume fraction f >= 0.5)
get ``f * AIF + (1 - f) * GM curve``; vein voxels the VOF; CSF, skull and air do not
enhance.  Voxels with 0 < f < 0.5 keep their own tissue curve so the truth maps stay exact.

Baseline HU: air -1000, scalp 40, skull 1200, CSF 8, GM 38, WM 28, artery 45,
vein 45, ischemic core 33, penumbra 33.

Perfusion truth (CBF mL/100g/min, CBV mL/100g, delay = Tmax s, MTT = 60 CBV/CBF s)::

    grey matter    60   4.0   1.0   (MTT 4.0)
    white matter   25   2.0   1.5   (MTT 4.8)
    ischemic core  10   1.5   4.0   (MTT 9.0)
    penumbra       25   4.0   4.0   (MTT 9.6)
    scalp           8   1.0   1.0   (MTT 7.5)

Orientation: "RAS" affine = diag(spacing) centred on world 0; "LPS" negates the x
and y axes and flips the voxel arrays along i and j, so that the anatomy in world
space is identical (the core stays in the patient's right hemisphere); "oblique" =
Rz(10 deg) @ Rx(15 deg) @ RAS (anatomy fixed to the voxel grid, hence tilted in the
world).

Head motion (``motion=MM``, off by default): frame t shows the head moved by a rigid
transform T_t (frame 0: identity), a smooth drift plus two jerks (see
:func:`motion_trajectory`), scaled so the largest translation is MM mm and the largest
rotation MM degrees.  The noise-free frame is computed on a sub-voxel grid (at most
``motion_subvoxel_mm``, default ``MOTION_SUBVOXEL_MM``) padded by the largest displacement
(so anatomy outside the field of view can move in), resampled in float32 with linear interpolation and averaged over each
voxel (partial volume, frame 0 too, so frame 0 differs slightly from the motion-free
dataset at tissue edges), then noise is added (the same draws as without motion) and the frame
rounded to int16.  So the CBF and CBV truth of a motion phantom is the mean over each voxel's
sub-voxels (both add by volume; MTT = 60 CBV / CBF), not the label at its centre; Tmax and TTP
are the centre label's.  The truth ``*_desc-groundtruth_motion.tsv`` (columns rot_x rot_y rot_z
trans_x trans_y trans_z; rad and mm) holds, per frame, the parameters of T_t in the
convention of :mod:`bids_ctp.perfusion.motion`: an ``Euler3DTransform`` about the volume
centre, on the voxel axes (i, j, k) scaled by the spacing, that maps a point of frame 0 to
the same anatomical point of frame t.  Resampling frame t through T_t (``out(x) =
frame_t(T_t(x))``) maps it back to frame 0's space, so a perfect registration returns
exactly these parameters.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
from nibabel.openers import ImageOpener
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from .. import __version__
from ..derivatives import atomic_write, write_json, write_text
from ..errors import OutputError, UsageError
from ..perfusion.maps import UNITS
from ..perfusion.motion import PARAMETER_NAMES, rigid_transform, to_image
from . import anatomy as an
from .model import CONSTANTS, RESIDUE_SHAPES, PhantomConstants, arterial_input, tissue_enhancement, true_ttp, venous_output

GENERATOR = "bids_ctp-phantom"
BIDS_VERSION = "1.10.0"
LAYOUTS = ("bep024", "isles24")
ORIENTATIONS = ("RAS", "LPS", "oblique")
DEFAULT_FOV_MM = (220.0, 220.0, 80.0)
MOTION_SUBVOXEL_MM = 1.0  # with motion, frames are averages of sub-voxels of at most this size

BASELINE_HU: dict[int, float] = {
    an.AIR: -1000.0,
    an.SCALP: 40.0,
    an.SKULL: 1200.0,
    an.CSF: 8.0,
    an.GM: 38.0,
    an.WM: 28.0,
    an.ARTERY: 45.0,
    an.VEIN: 45.0,
    an.CORE: 33.0,
    an.PENUMBRA: 33.0,
    an.MUSCLE: 50.0,
    an.ORBITAL_FAT: -80.0,
    an.EYE: 10.0,
    an.SINUS: -1000.0,
}


class Truth(NamedTuple):
    cbf: float  # mL/100g/min
    cbv: float  # mL/100g
    delay: float  # s, AIF-to-tissue delay = true Tmax

    @property
    def mtt(self) -> float:
        return 60.0 * self.cbv / self.cbf


PERFUSION_TRUTH: dict[int, Truth] = {
    an.GM: Truth(60.0, 4.0, 1.0),
    an.WM: Truth(25.0, 2.0, 1.5),
    an.CORE: Truth(10.0, 1.5, 4.0),
    an.PENUMBRA: Truth(25.0, 4.0, 4.0),
    an.SCALP: Truth(8.0, 1.0, 1.0),
}

MAP_DESCRIPTIONS = {
    "cbf": "True cerebral blood flow used to simulate the tissue curves.",
    "cbv": "True cerebral blood volume used to simulate the tissue curves.",
    "mtt": "True mean transit time, 60 * CBV / CBF.",
    "tmax": "True Tmax: the delay of the tissue input relative to the AIF.",
    "ttp": "True time to peak (s from scan start) of the noise-free tissue curve, on a 0.01 s grid.",
}


class PhantomError(UsageError, ValueError):
    """Invalid phantom parameter (exit code 64 on the command line)."""


@dataclass
class PhantomImage:
    subject: str
    session: str | None
    ctp: Path  # the 4D *_ctp.nii.gz
    truth: dict[str, Path] = field(default_factory=dict)  # kind (cbf, ..., dseg, mask, aif, vof, parameters) -> path


@dataclass
class PhantomDataset:
    root: Path
    truth_root: Path  # OUT/derivatives/groundtruth
    frame_times: list[float]
    shape: tuple[int, int, int]
    affine: NDArray[np.float64]
    images: list[PhantomImage] = field(default_factory=list)


def frame_times(n_frames: int = 55, frame_interval: float = 1.0, nonuniform: bool = False) -> list[float]:
    """Frame start times (s).

    Uniform: ``k * frame_interval``.  Non-uniform: a two-phase protocol over about the
    same duration, ``frame_interval`` spacing for the first ~65 % (35 s of the default
    54 s), then alternating 2 and 3 intervals with one irregular 2.6 interval gap, so
    code cannot assume exactly two spacings.
    """
    if n_frames < 3 or frame_interval <= 0:
        raise PhantomError("need at least 3 frames and a positive frame interval")
    if not nonuniform:
        return [round(k * frame_interval, 6) for k in range(n_frames)]
    duration = (n_frames - 1) * frame_interval
    n_first = int(round(0.65 * duration / frame_interval))
    times = [k * frame_interval for k in range(n_first + 1)]
    gaps = [2.0, 3.0, 2.6]  # 2.6: the irregular one
    i = 0
    while True:
        gap = (gaps[i] if i < len(gaps) else (2.0, 3.0)[i % 2]) * frame_interval
        if times[-1] + gap > duration + 0.5 * frame_interval:
            break
        times.append(times[-1] + gap)
        i += 1
    return [round(t, 6) for t in times]


def make_affine(shape: Sequence[int], spacing: Sequence[float], orientation: str = "RAS") -> NDArray[np.float64]:
    """Voxel-to-world (RAS mm) affine with the volume centre at world 0."""
    m = np.diag(np.asarray(spacing, dtype=float))
    if orientation == "LPS":
        m = np.diag([-1.0, -1.0, 1.0]) @ m
    elif orientation == "oblique":
        ax, az = np.deg2rad(15.0), np.deg2rad(10.0)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        m = rz @ rx @ m
    elif orientation != "RAS":
        raise PhantomError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = -m @ ((np.asarray(shape, dtype=float) - 1.0) / 2.0)
    return affine


def motion_trajectory(n_frames: int, magnitude: float, rng: np.random.Generator) -> NDArray[np.float64]:
    """Rigid motion parameters (n_frames, 6): rot_x, rot_y, rot_z (rad), trans_x, trans_y, trans_z (mm).

    Each parameter is ``a * drift(u) + b * jerk1(t) + c * jerk2(t)`` with u = t / (n - 1),
    drift = smoothstep(u) (a slow sag of the head), jerk1 a step at 45 % of the series and
    jerk2 a step at 75 % (the patient moves, then partly settles back), with random weights
    from ``rng``; frame 0 is 0.  Rotations are then scaled so their largest magnitude is
    ``magnitude`` degrees, translations so theirs is ``magnitude`` mm.
    """
    t = np.arange(n_frames, dtype=float)
    u = t / max(n_frames - 1, 1)
    drift = 3 * u**2 - 2 * u**3
    jerk1 = (t >= max(1, round(0.45 * (n_frames - 1)))).astype(float)
    jerk2 = (t >= max(2, round(0.75 * (n_frames - 1)))).astype(float)
    w = rng.uniform(0.3, 1.0, size=(3, 6)) * rng.choice([-1.0, 1.0], size=(3, 6))
    w[2] = -0.5 * w[1] * rng.uniform(0.3, 1.0, size=6)  # jerk2 partly undoes jerk1
    p = drift[:, None] * w[0] + jerk1[:, None] * w[1] + jerk2[:, None] * w[2]
    p[0] = 0.0
    for cols, scale in ((slice(0, 3), np.deg2rad(magnitude)), (slice(3, 6), magnitude)):
        peak = np.abs(p[:, cols]).max()
        p[:, cols] *= scale / peak if peak > 0 else 0.0
    return p


def _volume_weighted_truth(lut, src_labels, art_f, art, inner, blocks) -> dict:
    """CBF, CBV and MTT of partial-volume voxels (the motion path's frames are sub-voxel means).

    A voxel's enhancement is the volume-weighted mean of its sub-voxels' curves, so its CBF and
    CBV are the volume-weighted means of theirs (an artery sub-voxel holds 1 - fraction of grey
    matter), and MTT = 60 CBV / CBF. Tmax and TTP stay those of the label at the voxel centre.
    """
    out = {}
    for m in ("cbf", "cbv"):
        fine = lut[m][src_labels]
        fine[art] = (1.0 - art_f) * lut[m][an.GM]
        out[m] = fine[inner].reshape(blocks).mean(axis=(1, 3, 5), dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["mtt"] = np.where(out["cbf"] > 0, 60.0 * out["cbv"] / out["cbf"], 0.0).astype(np.float32)
    return out


# ---------------------------------------------------------------- writing helpers
def _write_nifti(path: Path, data: np.ndarray, affine: NDArray, zooms: Sequence[float]) -> Path:
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_zooms(tuple(float(z) for z in zooms))
    hdr.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    # nib.save would reset scl_slope/scl_inter to NaN; write header and data ourselves so
    # they read exactly 1 and 0 (the spec'd "no scaling"), gzip level as nibabel's default.
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    hdr.set_data_offset(352)
    fortran = np.asfortranarray(data)

    def write(p: Path) -> None:
        with ImageOpener(p, "wb") as fobj:
            hdr.write_to(fobj)  # 348-byte header + 4-byte empty extension flag
            fobj.write(fortran.T.data)  # NIfTI stores voxels with i fastest (Fortran order)

    return atomic_write(path, write)


def _prepare_output(root: Path) -> None:
    """Refuse a non-empty directory that is not a previous phantom; clear a previous phantom's images."""
    if root.exists() and not root.is_dir():
        raise OutputError(f"output {root} exists and is not a directory")
    if not root.exists() or not any(root.iterdir()):
        return
    try:
        desc = json.loads((root / "dataset_description.json").read_text())
        names = [g.get("Name") for g in desc.get("GeneratedBy", [])]
    except (OSError, ValueError, AttributeError):
        names = []
    if GENERATOR not in names:
        raise OutputError(f"output directory {root} is not empty and is not a previous {GENERATOR} dataset; refusing to overwrite")
    # Remove only what a phantom writes, so stale subjects do not survive a re-run.
    for sub in root.glob("sub-*"):
        shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
    shutil.rmtree(root / "derivatives" / "groundtruth", ignore_errors=True)


# ---------------------------------------------------------------- main entry point
def make_dataset(
    out_dir: str | os.PathLike,
    layout: str = "bep024",
    n_subjects: int = 1,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 5.0),
    n_frames: int = 55,
    frame_interval: float = 1.0,
    nonuniform: bool = False,
    noise_hu: float = 10.0,
    orientation: str = "RAS",
    residue: str = "exponential",
    sessions: bool = False,
    constants: PhantomConstants = CONSTANTS,
    motion: float | None = None,
    motion_subvoxel_mm: float = MOTION_SUBVOXEL_MM,
) -> PhantomDataset:
    """Write the phantom BIDS dataset to ``out_dir`` and its ground truth to ``out_dir/derivatives/groundtruth``.

    ``motion``: simulate rigid head motion of about this many mm and degrees (see the
    module docstring); None or 0 writes exactly the motion-free dataset.
    ``motion_subvoxel_mm``: the sub-voxel size of that simulation; at least the largest
    spacing, the voxel grid itself is moved by linear interpolation (no partial-volume
    model, as a simpler phantom would move a head).
    """
    if layout not in LAYOUTS:
        raise PhantomError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if residue not in RESIDUE_SHAPES:
        raise PhantomError(f"unknown residue {residue!r}; expected one of {RESIDUE_SHAPES}")
    if orientation not in ORIENTATIONS:
        raise PhantomError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")
    if n_subjects < 1 or noise_hu < 0:
        raise PhantomError("need at least one subject and a non-negative noise level")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise PhantomError("spacing needs three positive values (mm)")
    if shape is None:
        shape = tuple(int(np.ceil(f / s - 1e-9)) for f, s in zip(DEFAULT_FOV_MM, spacing))
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise PhantomError("shape needs three positive values")
    if motion is not None and not (np.isfinite(motion) and motion >= 0):
        raise PhantomError("motion needs a non-negative magnitude (mm and degrees)")
    motion = float(motion) if motion else None
    if not (np.isfinite(motion_subvoxel_mm) and motion_subvoxel_mm > 0):
        raise PhantomError("the motion sub-voxel size must be positive (mm)")
    times = frame_times(n_frames, frame_interval, nonuniform)
    t = np.asarray(times)
    intervals = np.diff(t)
    uniform = bool(np.allclose(intervals, intervals[0]))
    median_dt = float(np.median(intervals))

    root = Path(out_dir).absolute()
    _prepare_output(root)
    truth_root = root / "derivatives" / "groundtruth"

    # Anatomy on the RAS-ordered grid; flip for LPS so world anatomy is unchanged.
    labels, fraction = an.make_head(shape, spacing)
    if orientation == "LPS":
        labels, fraction = labels[::-1, ::-1].copy(), fraction[::-1, ::-1].copy()
    affine = make_affine(shape, spacing, orientation)
    if motion:
        # Partial volume: every frame (frame 0 too) is the mean of q_i x q_j x q_k
        # sub-voxels of at most MOTION_SUBVOXEL_MM, as a scanner integrates over the voxel;
        # point-sampled frames would be sharp at rest and blurred by the interpolation once
        # moved, which no real series is.  The sub-voxel anatomy sits on a grid padded
        # (symmetrically, so the centre and the original voxels keep their positions) by
        # the largest displacement, so anatomy outside the field of view can move in.
        sub = tuple(max(1, int(np.ceil(s / motion_subvoxel_mm - 1e-9))) for s in spacing)
        fine_spacing = tuple(s / q for s, q in zip(spacing, sub))
        fine_shape = tuple(n * q for n, q in zip(shape, sub))
        half_extent = 0.5 * float(np.linalg.norm(np.asarray(shape) * np.asarray(spacing)))
        reach = np.sqrt(3.0) * motion + np.sqrt(3.0) * np.deg2rad(motion) * half_extent
        pad = tuple(int(np.ceil(reach / s)) + 1 for s in fine_spacing)
        big_shape = tuple(n + 2 * p for n, p in zip(fine_shape, pad))
        src_labels, src_fraction = an.make_head(big_shape, fine_spacing)
        if orientation == "LPS":
            src_labels, src_fraction = src_labels[::-1, ::-1].copy(), src_fraction[::-1, ::-1].copy()
        inner = tuple(slice(p, p + n) for p, n in zip(pad, fine_shape))
        grid = to_image(np.zeros(fine_shape, dtype=np.float32), fine_spacing)
        blocks = (shape[0], sub[0], shape[1], sub[1], shape[2], sub[2])
    else:
        src_labels, src_fraction = labels, fraction

    # Per-label curves: computed once for the ~5 perfused labels, then looked up by label.
    perfused = sorted(PERFUSION_TRUTH)
    params = np.array([PERFUSION_TRUTH[k] for k in perfused])
    curves = tissue_enhancement(t, params[:, 0], params[:, 1], params[:, 2], residue, constants)
    ttps = true_ttp(t, params[:, 0], params[:, 1], params[:, 2], residue, constants)
    aif = arterial_input(t, constants)
    vof = venous_output(t, constants)
    n_labels = len(an.LABELS)
    table = np.zeros((n_labels, t.size), dtype=np.float32)  # noise-free HU per label and frame
    for k in range(n_labels):
        table[k] = BASELINE_HU[k]
    for k, curve in zip(perfused, curves):
        table[k] += curve
    table[an.VEIN] += vof
    art = src_labels == an.ARTERY
    art_f = src_fraction[art][:, None]
    gm_curve = curves[perfused.index(an.GM)]
    art_curves = (BASELINE_HU[an.ARTERY] + art_f * aif + (1.0 - art_f) * gm_curve).astype(np.float32)

    # Truth maps (label lookups).
    ttp_by_label = dict(zip(perfused, (float(v) for v in ttps)))
    lut = {m: np.zeros(n_labels, dtype=np.float32) for m in UNITS}
    for k, tr in PERFUSION_TRUTH.items():
        lut["cbf"][k], lut["cbv"][k], lut["mtt"][k] = tr.cbf, tr.cbv, tr.mtt
        lut["tmax"][k], lut["ttp"][k] = tr.delay, ttp_by_label[k]
    truth_maps = {m: lut[m][labels] for m in UNITS}
    if motion:
        truth_maps.update(_volume_weighted_truth(lut, src_labels, art_f[:, 0], art, inner, blocks))
    mask = np.isin(labels, an.INTRACRANIAL).astype(np.uint8)

    result = PhantomDataset(root=root, truth_root=truth_root, frame_times=times, shape=shape, affine=affine)
    _write_dataset_files(root, truth_root, layout, n_subjects)
    for index in range(1, n_subjects + 1):
        if layout == "bep024":
            sub, ses = f"{index:02d}", ("01" if sessions else None)
        else:
            sub, ses = f"stroke{index:04d}", "01"
        prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "")
        raw_dir = root / rel / ("ct" if layout == "bep024" else "")

        rng = np.random.default_rng([seed, index])
        data = np.empty(shape + (t.size,), dtype=np.int16, order="F")  # F order: frames contiguous for nibabel
        frame = np.empty(shape, dtype=np.float32)
        moves = motion_trajectory(t.size, motion, np.random.default_rng([seed, index, 1])) if motion else None
        src = np.empty(src_labels.shape, dtype=np.float32) if motion else frame
        for f in range(t.size):
            np.take(table[:, f], src_labels, out=src)
            src[art] = art_curves[:, f]
            if motion:
                if moves[f].any():
                    # Moved frame: out(x) = still(T^-1(x)), so that frame(T(x)) = still(x).
                    moved = sitk.Resample(to_image(src, fine_spacing), grid, rigid_transform(moves[f]).GetInverse(),
                                          sitk.sitkLinear, BASELINE_HU[an.AIR], sitk.sitkFloat32)
                    fine = sitk.GetArrayViewFromImage(moved).T
                else:
                    fine = src[inner]
                frame[...] = fine.reshape(blocks).mean(axis=(1, 3, 5), dtype=np.float32)
            if noise_hu > 0:
                frame += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_hu)
            np.rint(frame, out=frame)
            np.clip(frame, -32768, 32767, out=frame)
            data[..., f] = frame
        ctp = _write_nifti(raw_dir / f"{prefix}_ctp.nii.gz", data, affine, spacing + (median_dt,))
        del data
        sidecar = {
            "Modality": "CT",
            "ContrastBolusIngredient": "IODINE",
            "FrameTimesStart": times,
            "SeriesDescription": "bids_ctp digital CTP phantom",
        }
        if uniform:
            sidecar["RepetitionTime"] = round(float(intervals[0]), 6)
        write_json(raw_dir / f"{prefix}_ctp.json", sidecar)
        image = PhantomImage(subject=sub, session=ses, ctp=ctp)

        tdir = truth_root / rel / "perf"
        for m, units in UNITS.items():
            path = tdir / f"{prefix}_desc-groundtruth_{m}.nii.gz"
            image.truth[m] = _write_nifti(path, truth_maps[m], affine, spacing)
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {"Units": units, "Description": MAP_DESCRIPTIONS[m]})
        image.truth["dseg"] = _write_nifti(tdir / f"{prefix}_dseg.nii.gz", labels, affine, spacing)
        write_text(tdir / f"{prefix}_dseg.tsv", "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in an.LABELS.items()))
        image.truth["mask"] = _write_nifti(tdir / f"{prefix}_desc-brain_mask.nii.gz", mask, affine, spacing)
        for kind, curve in (("aif", aif), ("vof", vof)):
            rows = "".join(f"{ti:.6g}\t{ci:.6f}\n" for ti, ci in zip(times, curve))
            image.truth[kind] = write_text(tdir / f"{prefix}_desc-groundtruth_{kind}.tsv", "time\tenhancement\n" + rows)
        if motion:
            rows = "".join("\t".join(f"{v:.9g}" for v in row) + "\n" for row in moves)
            image.truth["motion"] = write_text(tdir / f"{prefix}_desc-groundtruth_motion.tsv", "\t".join(PARAMETER_NAMES) + "\n" + rows)
        image.truth["parameters"] = write_json(
            tdir / f"{prefix}_desc-groundtruth_parameters.json",
            _parameters(constants, ttp_by_label, residue, noise_hu, seed, index, times, shape, spacing, orientation, affine, layout, motion,
                        motion_subvoxel_mm),
        )
        result.images.append(image)
    return result


def _write_dataset_files(root: Path, truth_root: Path, layout: str, n_subjects: int) -> None:
    generated = [{"Name": GENERATOR, "Version": __version__}]
    write_json(
        root / "dataset_description.json",
        {"Name": f"bids_ctp digital CTP phantom ({layout} layout)", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw", "GeneratedBy": generated},
    )
    write_text(root / ".bidsignore", "*_ctp.*\nct/\n")
    write_text(root / "README", "Simulated 4D CT perfusion head scans written by bids_ctp-phantom.\nGround truth: derivatives/groundtruth/.\n")
    subs = [f"sub-{i:02d}" if layout == "bep024" else f"sub-stroke{i:04d}" for i in range(1, n_subjects + 1)]
    write_text(root / "participants.tsv", "participant_id\n" + "".join(s + "\n" for s in subs))
    write_json(
        truth_root / "dataset_description.json",
        {
            "Name": "bids_ctp phantom ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated,
        },
    )


def _parameters(constants, ttp_by_label, residue, noise_hu, seed, index, times, shape, spacing, orientation, affine, layout, motion=None,
                motion_subvoxel_mm=MOTION_SUBVOXEL_MM) -> dict:
    truth = {
        an.LABELS[k]: {"index": k, "cbf": tr.cbf, "cbv": tr.cbv, "mtt": tr.mtt, "delay": tr.delay, "tmax": tr.delay, "ttp": ttp_by_label[k]}
        for k, tr in PERFUSION_TRUTH.items()
    }
    out = {
        "Generator": {"Name": GENERATOR, "Version": __version__},
        "Constants": {**asdict(constants), "vof_mean_transit": constants.vof_mean_transit},
        "Model": "C_t(t) = (density/kh) * (CBF/6000) * (C_a(. - delay) conv R)(t); MTT = 60*CBV/CBF; VOF = AIF conv unit-area gamma kernel",
        "Residue": residue,
        "Labels": {str(k): v for k, v in an.LABELS.items()},
        "BaselineHU": {an.LABELS[k]: v for k, v in BASELINE_HU.items()},
        "Truth": truth,
        "Arteries": [{"x_mm": x, "y_mm": y, "radius_mm": r} for x, y, r in an.ARTERIES],
        "ArteryVoxelModel": "f * AIF + (1 - f) * grey-matter curve where partial-volume fraction f >= 0.5",
        "NoiseHU": noise_hu,
        "Seed": seed,
        "SubjectIndex": index,
        "NoiseGenerator": f"numpy.random.default_rng([{seed}, {index}]).standard_normal(float32), one draw per frame",
        "FrameTimesStart": times,
        "Shape": list(shape),
        "Spacing": list(spacing),
        "Orientation": orientation,
        "Affine": np.asarray(affine).round(9).tolist(),
        "Layout": layout,
    }
    if motion:
        out["Motion"] = {
            "MagnitudeMmAndDegrees": motion,
            "Trajectory": "smooth drift + jerks at 45 % and 75 % of the series; max |translation| = magnitude mm, max |rotation| = magnitude deg",
            "Generator": f"numpy.random.default_rng([{seed}, {index}, 1])",
            "Convention": "Euler3DTransform (rot_x, rot_y, rot_z rad; trans_x, trans_y, trans_z mm) about the volume centre on the "
            "voxel axes scaled by the spacing; maps a point of frame 0 to the same anatomy in frame t (frame_t(T(x)) = frame_0(x))",
            "Interpolation": f"linear, on the noise-free float frame on a sub-voxel grid (<= {motion_subvoxel_mm:g} mm), then "
            "averaged over each voxel (partial volume, every frame), before noise and int16 rounding",
        }
    return out
