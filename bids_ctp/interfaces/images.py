"""Reading and writing the intermediate images that travel between workflow nodes.

Between nodes, images are uncompressed float32 NIfTI files (memory-mapped on read, no gzip
round-trip) carrying the input's affine and header, so every output stays on the input grid.

``check_ctp_header`` validates an input CTP file from its header alone (nothing but the first
few hundred bytes is decompressed), so that a broken file is reported before anything is
written; ``bids.collect_inputs`` and ``LoadCTP`` both call it.
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from dataclasses import dataclass

import nibabel as nb
import numpy as np
from nibabel.openers import ImageOpener

from bids_ctp.errors import DataError, OutputError, one_line

LOGGER = logging.getLogger("bids_ctp.images")

# Voxel spacing accepted in each spatial direction (mm): CT voxels are 0.1-10 mm; anything
# outside this range is a broken header (or a unit mix-up), never a scan.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
# Real-valued voxel types the loader converts to float32 (complex, RGB, void are refused).
SUPPORTED_DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                    "float32", "float64")
# Deflate cannot compress better than 1032:1, so a .nii.gz smaller than 1/1032 of the data its
# header announces is certainly truncated (a cheap check that needs no decompression).
_MAX_DEFLATE_RATIO = 1032
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _NibabelToLog(logging.Handler):
    """nibabel reports the header fields it silently "fixes" (zero or negative pixdim, odd
    qform codes ...) on its own logger, which Python would print to stderr as extra lines.
    ``check_ctp_header`` checks what matters itself; nibabel's notes go to our log at INFO."""

    def emit(self, record):
        logging.getLogger("bids_ctp.nibabel").info("nibabel: %s", record.getMessage())


_NIB_LOGGER = logging.getLogger("nibabel.global")
if not any(isinstance(h, _NibabelToLog) for h in _NIB_LOGGER.handlers):
    _NIB_LOGGER.addHandler(_NibabelToLog())
    _NIB_LOGGER.propagate = False


# what reading a truncated or corrupt gzip stream raises
CORRUPT_DATA_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


@dataclass
class HeaderInfo:
    shape: tuple[int, ...]
    spacing: tuple[float, float, float]  # mm
    dtype: np.dtype  # on disk
    slope: float  # 1.0 / 0.0 when the file is not scaled
    inter: float


def _read_head(path: str, size: int) -> bytes:
    """The first ``size`` bytes of the (decompressed) file; DataError when it is not readable,
    not gzip although named .nii.gz, or gzip although named .nii."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as err:
        raise DataError(f"cannot open: {err.strerror or one_line(err)}") from err
    gz = magic == b"\x1f\x8b"
    if path.endswith(".gz") and not gz:
        raise DataError("not a NIfTI file: named .nii.gz but not gzip-compressed")
    if not path.endswith(".gz") and gz:
        raise DataError("gzip-compressed but named .nii (rename it to .nii.gz)")
    try:
        if gz:
            with gzip.open(path, "rb") as fh:
                return fh.read(size)
        with open(path, "rb") as fh:
            return fh.read(size)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"truncated or corrupt gzip file ({one_line(err)})") from err


def read_raw_header(path) -> "nb.Nifti1Header":
    """The NIfTI-1/2 header exactly as stored (nibabel's own load silently replaces zero or
    negative voxel sizes, which must be refused instead)."""
    path = os.fspath(path)
    head = _read_head(path, nb.Nifti2Header.template_dtype.itemsize)
    for klass in (nb.Nifti1Header, nb.Nifti2Header):
        size = klass.template_dtype.itemsize
        if len(head) < size:
            continue
        for endian in ("<", ">"):
            if int(np.frombuffer(head[:4], dtype=f"{endian}i4")[0]) == size:
                hdr = klass(head[:size], endianness=endian, check=False)
                magic = bytes(hdr["magic"]).rstrip(b"\0")
                if magic in (b"ni1", b"ni2"):
                    raise DataError("header of a two-file (.hdr/.img) NIfTI; convert it to a single "
                                    ".nii/.nii.gz file")
                if magic not in (b"n+1", b"n+2"):
                    raise DataError(f"not a NIfTI file (magic string {magic!r}, expected 'n+1' or 'n+2')")
                return hdr
    if len(head) < nb.Nifti1Header.template_dtype.itemsize:
        raise DataError(f"not a NIfTI file: only {len(head)} bytes, a NIfTI header needs 348 "
                        "(truncated?)")
    raise DataError("not a NIfTI file (no NIfTI-1/NIfTI-2 header)")


def check_ctp_header(path, min_frames: int) -> HeaderInfo:
    """Everything about an input CTP file that the header alone can tell: a NIfTI-1/2 file, 4D
    with at least ``min_frames`` frames, real-valued voxels, plausible voxel spacing (mm), a finite
    non-singular affine, scaling that fits in float32 and a file long enough for its data.

    Raises DataError with the problem (without the file name, which the caller adds)."""
    path = os.fspath(path)
    hdr = read_raw_header(path)
    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise DataError(f"invalid NIfTI header: dim[0] = {ndim} (number of dimensions must be 1-7)")
    shape = tuple(dim[1:ndim + 1])
    if min(shape) < 1:
        raise DataError(f"invalid NIfTI header: image shape {shape} has a size below 1")
    if ndim != 4:
        raise DataError(f"expected a 4D CTP image, got shape {shape}")
    if shape[3] < min_frames:
        raise DataError(f"only {shape[3]} frame(s); at least {min_frames} are needed "
                        f"(shape {shape})")

    code = int(hdr["datatype"])
    try:
        dtype = hdr.get_data_dtype()
    except Exception:  # unknown code
        raise DataError(f"unknown NIfTI data type code {code}") from None
    if dtype.fields is not None or dtype.name not in SUPPORTED_DTYPES:
        name = "RGB" if dtype.fields is not None else dtype.name
        raise DataError(f"unsupported voxel data type {name} (NIfTI code {code}); expected "
                        "integer or float values")

    pixdim = [float(p) for p in hdr["pixdim"][1:4]]
    unit = _xyz_unit(hdr)
    if unit in ("meter", "micron"):
        raise DataError(f"voxel spacing is stored in {unit}s (xyzt_units); bids_ctp expects mm")
    text = " x ".join(f"{p:g}" for p in pixdim)
    if not all(math.isfinite(p) and p > 0 for p in pixdim):
        raise DataError(f"invalid voxel spacing {text} mm (pixdim[1:4] must be finite and > 0)")
    if not all(MIN_SPACING_MM <= p <= MAX_SPACING_MM for p in pixdim):
        raise DataError(f"implausible voxel spacing {text} mm (expected {MIN_SPACING_MM:g}-"
                        f"{MAX_SPACING_MM:g} mm per voxel)")
    try:
        with np.errstate(all="ignore"):
            aff = np.asarray(hdr.get_best_affine(), dtype=float)
        good = bool(np.isfinite(aff).all()) and abs(np.linalg.det(aff[:3, :3])) > 0
    except Exception:
        good = False
    if not good:
        raise DataError("invalid orientation: the qform/sform affine is not finite or is singular")

    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if not math.isfinite(slope):
        raise DataError(f"invalid scaling: scl_slope is {slope:g}")
    if slope == 0.0:  # NIfTI: 0 means "no scaling"
        slope, inter = 1.0, 0.0
    if not math.isfinite(inter):
        raise DataError(f"invalid scaling: scl_inter is {inter:g}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        extreme = max(abs(slope * float(info.min) + inter), abs(slope * float(info.max) + inter))
        if extreme > _FLOAT32_MAX:
            raise DataError(f"scaling overflow: scl_slope {slope:g} and scl_inter {inter:g} scale "
                            f"{dtype.name} values beyond the float32 range")

    offset = float(hdr["vox_offset"])
    if not math.isfinite(offset) or offset < 0:
        raise DataError(f"invalid NIfTI header: vox_offset = {offset:g}")
    data_bytes = math.prod(shape) * dtype.itemsize
    needed = max(int(offset), hdr.template_dtype.itemsize + 4) + data_bytes
    on_disk = os.path.getsize(path)
    if path.endswith(".gz"):
        if needed > _MAX_DEFLATE_RATIO * on_disk + 1024:
            raise DataError(f"truncated or corrupt: the header announces {_size(needed)} of data, "
                            f"which cannot fit in a {_size(on_disk)} .nii.gz")
    elif on_disk < needed:
        raise DataError(f"truncated: the file has {_size(on_disk)}, its header needs {_size(needed)}")
    return HeaderInfo(shape=shape, spacing=tuple(pixdim), dtype=dtype, slope=slope, inter=inter)


def _xyz_unit(hdr) -> str:
    try:
        return hdr.get_xyzt_units()[0]
    except Exception:
        return "unknown"


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} bytes"  # pragma: no cover


def load(path, dtype=np.float32) -> np.ndarray:
    """Voxel data of an intermediate image as ``dtype``: the uncompressed float32 files between
    nodes come back memory-mapped (nothing is read until used). The input series is read with
    :func:`read_frames`."""
    return np.asarray(nb.load(os.fspath(path)).dataobj, dtype=dtype)


def spacing(path) -> tuple[float, ...]:
    return tuple(float(z) for z in nb.load(os.fspath(path)).header.get_zooms()[:3])


def affine(path) -> np.ndarray:
    return nb.load(os.fspath(path)).affine


def read_frames(path, dtype=np.float32):
    """The frames of a 4D NIfTI file one after another, each as a scaled ``dtype`` volume.

    One pass through the (possibly gzipped) file: a whole-brain series never needs to be in
    memory at once, neither as stored (int16) nor converted (float32). Raises EOFError for a
    file that ends early.
    """
    img = nb.load(os.fspath(path))
    proxy = img.dataobj
    shape, stored = img.shape[:3], np.dtype(proxy.dtype)
    frame_bytes = math.prod(shape) * stored.itemsize
    slope, inter = float(proxy.slope), float(proxy.inter)
    with ImageOpener(os.fspath(path)) as stream:
        stream.seek(proxy.offset)
        for _ in range(img.shape[3]):
            raw = stream.read(frame_bytes)
            if len(raw) < frame_bytes:
                raise EOFError(f"file ends after {len(raw)} of a frame's {frame_bytes} bytes")
            frame = np.frombuffer(raw, stored).reshape(shape, order="F").astype(dtype)
            if slope != 1.0:
                frame *= dtype(slope)
            if inter != 0.0:
                frame += dtype(inter)
            yield frame


def create_like(reference, filename: str, shape, dtype=np.float32) -> np.memmap:
    """A new uncompressed NIfTI file in the working directory with the grid (affine,
    qform/sform) of ``reference``, its voxels returned as a writable memory map (Fortran
    order, as NIfTI stores them): stages write a whole-brain 4D result into it piece by piece
    instead of holding a second copy in memory. Flush (or drop) the map before handing the
    file on."""
    ref = nb.load(os.fspath(reference))
    header = ref.header.copy()
    header.extensions.clear()  # not needed between nodes; keeps the voxels at byte 352
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_slope_inter(1.0, 0.0)
    header.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
    header.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    header.set_data_offset(352)
    out = os.path.abspath(filename)
    size = 352 + math.prod(shape) * np.dtype(dtype).itemsize
    try:
        with open(out, "wb") as f:
            header.write_to(f)
            # reserve the disk space now: a memory map written past a full disk kills the
            # process (SIGBUS) without a message
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)
            else:  # pragma: no cover (macOS)
                f.truncate(size)
    except OSError as err:
        if os.path.exists(out):
            os.remove(out)
        raise OutputError(f"cannot write {out} ({size / 1e9:.2g} GB) in the work directory: "
                          f"{err.strerror or err}") from None
    return np.memmap(out, dtype=header.get_data_dtype(), mode="r+", offset=352,
                     shape=tuple(shape), order="F")


def save_like(data: np.ndarray, reference, filename: str, dtype=np.float32) -> str:
    """Save ``data`` in the working directory with the grid (affine, qform/sform) of ``reference``."""
    out = create_like(reference, filename, np.shape(data), dtype)
    out[...] = data
    out.flush()
    return out.filename
