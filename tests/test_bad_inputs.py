"""The bad-input catalogue (issue 6, docs/errors.md): every broken input fails through the CLI with one
line ``bids_ctp: error: <file>: <problem>``, the documented exit code, no traceback, nothing changed in
bids_dir and no map written.  Header-level problems are found by ``bids.collect_inputs`` before
anything is written; data-level ones by ``LoadCTP`` (or a later stage) inside the workflow."""
from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_ctp import derivatives
from bids_ctp.cli.run import main
from bids_ctp.interfaces.images import read_raw_header
from bids_ctp.phantom import make_dataset
from bids_ctp.phantom.model import CONSTANTS
from helpers import make_ctp, snapshot

N_FRAMES = 20
MAP_SUFFIXES = ("cbf", "cbv", "mtt", "tmax", "ttp")


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture
def phantom(tmp_path):
    """A tiny valid dataset (60x60x1 voxels of 4x4x5 mm, 20 frames at 1 s): a full run takes ~1.5 s."""
    return make_dataset(tmp_path / "bids", shape=(60, 60, 1), spacing=(4.0, 4.0, 5.0), n_frames=N_FRAMES,
                        noise_hu=0.0)


def ctp_of(phantom) -> Path:
    (image,) = phantom.images
    return image.ctp


def sidecar_of(phantom) -> Path:
    return ctp_of(phantom).with_name(ctp_of(phantom).name.replace(".nii.gz", ".json"))


def edit_sidecar(phantom, **fields):
    path = sidecar_of(phantom)
    meta = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def rewrite(path, data=None, header=None, dtype=None):
    """Save ``path`` again with new voxels and/or raw header fields (written as given: nibabel's checks,
    which would "fix" zero or negative pixdim, are bypassed)."""
    img = nb.load(path)
    data = np.asarray(img.dataobj) if data is None else data
    hdr = img.header.copy()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(dtype or data.dtype)
    new = nb.Nifti1Image(data.astype(dtype or data.dtype), img.affine, hdr)
    new.header.set_slope_inter(1.0, 0.0)
    nb.save(new, path)
    if header:
        raw = read_raw_header(path)  # as on disk (nibabel's loaded header has NaN scaling, offset 0)
        for key, value in header.items():
            if isinstance(key, tuple):
                raw[key[0]][key[1]] = value
            else:
                raw[key] = value
        body = _read_bytes(path)[raw.get_data_offset():]
        _write_bytes(path, raw.binaryblock + b"\0" * (raw.get_data_offset() - len(raw.binaryblock)) + body)


def _read_bytes(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read()


def _write_bytes(path, content):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(content)


def run_bad(root, tmp_path, capsys, *extra, code, words=(), out=None):
    """Run the CLI on a broken dataset; check the exit code, one error line naming ``words``, no traceback,
    bids_dir unchanged (listing and checksums) and no map written.  Returns the error line."""
    root = Path(root)
    before = snapshot(root) if root.is_dir() else None
    out = out if out is not None else tmp_path / "out"
    rc = main([str(root), str(out), "participant", "-w", str(tmp_path / "work"), "--nprocs", "1", *extra])
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert rc == code, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bids_ctp: error: ") and "Traceback" not in stderr + stdout
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    if before is not None:
        assert snapshot(root) == before
    if Path(out).is_dir() and root not in Path(out).parents and Path(out) != root:  # else: snapshot above
        assert not [p for p in Path(out).rglob("*") if p.name.endswith(".nii.gz") or p.suffix == ".tsv"]
        assert not [p for p in Path(out).rglob(".*tmp-*")]
    return lines[0]


def run_good(root, tmp_path, capsys, *extra):
    rc = main([str(root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"), "--nprocs", "1",
               *extra])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert len(list((tmp_path / "out").rglob("*_cbf.nii.gz"))) == 1
    return stderr


# ------------------------------------------------------------------------------- bids_dir, output_dir
def test_bids_dir_missing(tmp_path, capsys):
    run_bad(tmp_path / "nope", tmp_path, capsys, code=66, words=[tmp_path / "nope", "not found"])
    assert not (tmp_path / "out").exists()


def test_bids_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    run_bad(tmp_path / "afile", tmp_path, capsys, code=66, words=[tmp_path / "afile", "not a directory"])


def test_missing_dataset_description_is_accepted(phantom, tmp_path, capsys):
    """ISLES'24 raw_data has no dataset_description.json: accepted (nothing in it is used), logged at -v."""
    (phantom.root / "dataset_description.json").unlink()
    assert run_good(phantom.root, tmp_path, capsys) == ""


def test_unreadable_dataset_description_is_a_warning(phantom, tmp_path, capsys):
    (phantom.root / "dataset_description.json").write_text('{"Name": ')
    stderr = run_good(phantom.root, tmp_path, capsys)
    (line,) = stderr.strip().splitlines()
    assert line.startswith("bids_ctp: WARNING: ") and "dataset_description.json" in line and "ignored" in line


@pytest.mark.parametrize("sub", ["out", "sub-01/out", ".", "derivatives"])
def test_output_dir_inside_bids_dir(phantom, tmp_path, capsys, sub):
    run_bad(phantom.root, tmp_path, capsys, code=64, words=["inside the input dataset"], out=phantom.root / sub)


def test_output_dir_under_derivatives_is_allowed(phantom, tmp_path, capsys):
    before = snapshot(phantom.root)
    out = phantom.root / "derivatives" / "bids_ctp"
    assert main([str(phantom.root), str(out), "participant", "-w", str(tmp_path / "w"), "--nprocs", "1"]) == 0
    capsys.readouterr()
    after = snapshot(phantom.root)
    assert {k: v for k, v in after.items() if not k.startswith("derivatives/bids_ctp")} == before


@pytest.mark.parametrize("option, label, words", [
    ("--participant-label", "07", ["sub-07", "available: sub-01"]),
    ("--session-label", "02", ["ses-02", "available: none"]),
])
def test_unknown_label(phantom, tmp_path, capsys, option, label, words):
    run_bad(phantom.root, tmp_path, capsys, option, label, code=66, words=words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--participant-label", "--session-label"])
@pytest.mark.parametrize("label", ["../01", "01/..", "..", "sub-01/../../etc", "0_1", "0 1", "*", "sub-", "01;rm"])
def test_label_with_path_characters(phantom, tmp_path, capsys, option, label):
    line = run_bad(phantom.root, tmp_path, capsys, option, label, code=64,
                   words=["invalid", "label", repr(label), "letters and digits"])
    assert not (tmp_path / "out").exists(), line


def test_file_with_non_alphanumeric_label_is_skipped(phantom, tmp_path, capsys):
    """A file whose own name carries a bad label is not a BIDS CTP series: skipped with a warning."""
    make_ctp(phantom.root, "sub-0x1/ct/sub-0x1_acq-a+b_ctp.nii.gz", {"RepetitionTime": 1.0}, shape=(6, 6, 2, 12))
    (line,) = run_good(phantom.root, tmp_path, capsys).strip().splitlines()
    assert line.startswith("bids_ctp: WARNING: skipping sub-0x1/ct/sub-0x1_acq-a+b_ctp.nii.gz")


# ------------------------------------------------------------------------------------ input images
def test_no_ctp_images(phantom, tmp_path, capsys):
    ctp_of(phantom).unlink()
    run_bad(phantom.root, tmp_path, capsys, code=66, words=[phantom.root, "no CTP images found"])


@pytest.mark.parametrize("shape, words", [
    ((60, 60, 1), ["expected a 4D CTP image", "(60, 60, 1)"]),
    ((60, 60, 1, 1, N_FRAMES), ["expected a 4D CTP image", f"(60, 60, 1, 1, {N_FRAMES})"]),
    ((60, 60, 1, 1), ["only 1 frame(s)", "at least 10"]),
])
def test_not_a_4d_series(phantom, tmp_path, capsys, shape, words):
    data = np.asarray(nb.load(ctp_of(phantom)).dataobj)[..., 0].reshape(60, 60, 1, 1)
    rewrite(ctp_of(phantom), np.broadcast_to(data.reshape(60, 60, 1, 1, 1)[..., 0, 0], (60, 60, 1)).copy()
            if len(shape) == 3 else np.zeros(shape, np.int16) + data.reshape((60, 60, 1) + (1,) * (len(shape) - 3)))
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), *words])


def test_fewer_than_10_frames(tmp_path, capsys):
    phantom = make_dataset(tmp_path / "bids", shape=(60, 60, 1), spacing=(4.0, 4.0, 5.0), n_frames=9, noise_hu=0.0)
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), "only 9 frame(s)", "at least 10"])


# ------------------------------------------------------------------------------------------- timing
@pytest.mark.parametrize("times, words", [
    ([float(i) for i in range(N_FRAMES - 1)], [f"has {N_FRAMES - 1} values but the image has {N_FRAMES} frames"]),
    ([float(i) for i in range(N_FRAMES + 3)], [f"has {N_FRAMES + 3} values"]),
    ([0.0, 1.0, 3.0, 2.0] + [float(i) for i in range(4, N_FRAMES)], ["strictly increasing", "not increasing"]),
    ([0.0, 1.0, 1.0] + [float(i) for i in range(2, N_FRAMES - 1)], ["strictly increasing", "duplicated"]),
    ([float(i) - 2.0 for i in range(N_FRAMES)], ["must not be negative", "-2"]),
    ([0.0, 1.0, 1.001] + [float(i) for i in range(2, N_FRAMES - 1)], ["only 0.001 s apart"]),
    ([1000.0 * i for i in range(N_FRAMES)], ["milliseconds"]),
    ([0.0, 1.0, "2"] + [float(i) for i in range(3, N_FRAMES)], ["finite numbers"]),
    ([0.0, 1.0, None] + [float(i) for i in range(3, N_FRAMES)], ["finite numbers"]),
    (2.0, ["list of numbers"]),
])
def test_bad_frame_times(phantom, tmp_path, capsys, times, words):
    edit_sidecar(phantom, FrameTimesStart=times)
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[sidecar_of(phantom).with_suffix(".nii.gz"),
                                                            "FrameTimesStart", *words])


@pytest.mark.parametrize("tr, words", [(0, ["> 0"]), (-1.0, ["> 0"]), ("1", ["> 0"]), (0.01, ["0.01 s apart"])])
def test_bad_repetition_time(phantom, tmp_path, capsys, tr, words):
    edit_sidecar(phantom, FrameTimesStart=None, RepetitionTime=tr)
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), "RepetitionTime", *words])


def test_no_timing_at_all(phantom, tmp_path, capsys):
    sidecar_of(phantom).unlink()
    run_bad(phantom.root, tmp_path, capsys, code=65,
            words=[ctp_of(phantom), "no frame timing", "--frame-interval SECONDS"])


def test_frame_interval_too_small(phantom, tmp_path, capsys):
    sidecar_of(phantom).unlink()
    run_bad(phantom.root, tmp_path, capsys, "--frame-interval", "0.001", code=64,
            words=["--frame-interval", "0.001 s apart"])


@pytest.mark.parametrize("content, words", [('{"FrameTimesStart": [0, 1,', ["invalid JSON sidecar"]),
                                            ("[1, 2]", ["must hold an object", "list"])])
def test_broken_sidecar(phantom, tmp_path, capsys, content, words):
    sidecar_of(phantom).write_text(content)
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[sidecar_of(phantom), *words])


# ---------------------------------------------------------------------------------- file integrity
def test_truncated_gzip_found_in_the_header(phantom, tmp_path, capsys):
    content = ctp_of(phantom).read_bytes()
    ctp_of(phantom).write_bytes(content[:120])
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), "truncated"])


def test_truncated_gzip_found_when_loading(phantom, tmp_path, capsys):
    """A .nii.gz cut inside its data passes the header checks; LoadCTP finds it (one line, exit 65)."""
    content = ctp_of(phantom).read_bytes()
    ctp_of(phantom).write_bytes(content[:len(content) // 2])
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom).name, "truncated or corrupt data"])


def test_truncated_uncompressed_nifti(phantom, tmp_path, capsys):
    path = ctp_of(phantom)
    plain = path.with_name(path.name.replace(".nii.gz", ".nii"))
    plain.write_bytes(gzip.decompress(path.read_bytes())[:50000])
    path.unlink()
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[plain, "truncated", "50.0 kB"])


def test_corrupt_gzip_stream(phantom, tmp_path, capsys):
    content = bytearray(ctp_of(phantom).read_bytes())
    middle = len(content) // 2
    content[middle:middle + 64] = bytes(64)
    ctp_of(phantom).write_bytes(bytes(content))
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom).name, "corrupt"])


@pytest.mark.parametrize("name, content, words", [
    ("sub-01_ctp.nii.gz", b"<html>404 Not Found</html>", ["not a NIfTI file", "not gzip-compressed"]),
    ("sub-01_ctp.nii.gz", gzip.compress(b"%PDF-1.4" + bytes(600), mtime=0), ["not a NIfTI file"]),
    ("sub-01_ctp.nii", b"\x89PNG\r\n\x1a\n" + bytes(600), ["not a NIfTI file"]),
    ("sub-01_ctp.nii", gzip.compress(bytes(600), mtime=0), ["gzip-compressed but named .nii"]),
    ("sub-01_ctp.nii", b"", ["not a NIfTI file", "only 0 bytes"]),
], ids=["html-as-nii.gz", "gzipped-pdf-as-nii.gz", "png-as-nii", "gzip-as-nii", "empty-nii"])
def test_not_a_nifti_file(phantom, tmp_path, capsys, name, content, words):
    ctp_of(phantom).unlink()
    path = ctp_of(phantom).parent / name
    path.write_bytes(content)
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[path, *words])


@pytest.mark.parametrize("datatype, words", [(32, ["complex64"]), (128, ["RGB"]), (1, ["data type"]),
                                             (9999, ["unknown NIfTI data type code 9999"])])
def test_unsupported_voxel_type(phantom, tmp_path, capsys, datatype, words):
    rewrite(ctp_of(phantom), header={"datatype": datatype})
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), *words])


# ------------------------------------------------------------------------------------ voxel values
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels(phantom, tmp_path, capsys, bad):
    data = np.asarray(nb.load(ctp_of(phantom)).dataobj, dtype=np.float32)
    data[30, 31, 0, 7] = bad
    rewrite(ctp_of(phantom), data, dtype=np.float32)
    run_bad(phantom.root, tmp_path, capsys, code=65,
            words=[ctp_of(phantom).name, "1 voxel value(s) are NaN or infinite", "(30, 31, 0), frame 7"])


@pytest.mark.parametrize("pixdim, words", [
    ((4.0, 0.0, 5.0), ["invalid voxel spacing 4 x 0 x 5 mm"]),
    ((4.0, -4.0, 5.0), ["invalid voxel spacing", "-4"]),
    ((4.0, 4.0, np.nan), ["invalid voxel spacing", "nan"]),
    ((4.0, 4.0, np.inf), ["invalid voxel spacing", "inf"]),
    ((25.0, 4.0, 5.0), ["implausible voxel spacing 25 x 4 x 5 mm"]),
    ((0.01, 0.01, 5.0), ["implausible voxel spacing 0.01"]),
])
def test_bad_voxel_spacing(phantom, tmp_path, capsys, pixdim, words):
    rewrite(ctp_of(phantom), header={("pixdim", 1): pixdim[0], ("pixdim", 2): pixdim[1], ("pixdim", 3): pixdim[2]})
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), *words])


def test_spacing_in_meters(phantom, tmp_path, capsys):
    rewrite(ctp_of(phantom), header={"xyzt_units": 1 | 8})  # NIFTI_UNITS_METER | SEC
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), "meters", "expects mm"])


def test_bad_affine(phantom, tmp_path, capsys):
    rewrite(ctp_of(phantom), header={"sform_code": 1, "srow_x": [0.0, 0.0, 0.0, 0.0]})
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), "affine", "singular"])


@pytest.mark.parametrize("header, words", [
    ({"scl_slope": 1e36}, ["scaling overflow", "scl_slope 1e+36", "int16", "float32"]),
    ({"scl_slope": -2e34, "scl_inter": 5.0}, ["scaling overflow", "scl_slope -2e+34"]),
    ({"scl_slope": np.inf}, ["invalid scaling: scl_slope is inf"]),
    ({"scl_slope": np.nan}, ["invalid scaling: scl_slope is nan"]),
    ({"scl_slope": 1.0, "scl_inter": np.nan}, ["invalid scaling: scl_inter is nan"]),
])
def test_scaling_overflow_integer(phantom, tmp_path, capsys, header, words):
    rewrite(ctp_of(phantom), header=header)
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom), *words])


@pytest.mark.parametrize("header", [{"scl_slope": 1.0, "scl_inter": 3.3e38}, {"scl_slope": 1e30}])
def test_scaling_gives_values_that_are_not_hu(phantom, tmp_path, capsys, header):
    """Finite in float32 but absurd: found by LoadCTP before any stage overflows."""
    rewrite(ctp_of(phantom), header=header)
    run_bad(phantom.root, tmp_path, capsys, code=65,
            words=[ctp_of(phantom).name, "are not Hounsfield units", "check the scaling (scl_slope"])


def test_scaling_overflow_float(phantom, tmp_path, capsys):
    """Float voxels times a large slope: only the data can tell (LoadCTP)."""
    data = np.asarray(nb.load(ctp_of(phantom)).dataobj, dtype=np.float32)
    rewrite(ctp_of(phantom), data, dtype=np.float32, header={"scl_slope": 1e37})
    run_bad(phantom.root, tmp_path, capsys, code=65,
            words=[ctp_of(phantom).name, "NaN or infinite after scaling (scl_slope/scl_inter)"])


# ------------------------------------------------------------------------------------ data content
def test_user_mask_on_another_grid(phantom, tmp_path, capsys):
    bad = tmp_path / "mask.nii.gz"
    nb.save(nb.Nifti1Image(np.ones((10, 10, 1), np.uint8), np.eye(4)), bad)
    run_bad(phantom.root, tmp_path, capsys, "--brain-mask", str(bad), code=65,
            words=["mask.nii.gz", "not on the CTP grid"])


def test_user_mask_missing(phantom, tmp_path, capsys):
    run_bad(phantom.root, tmp_path, capsys, "--brain-mask", str(tmp_path / "nomask.nii.gz"), code=66,
            words=["brain mask not found", tmp_path / "nomask.nii.gz"])


def test_constant_image_has_no_bolus(phantom, tmp_path, capsys):
    data = np.asarray(nb.load(ctp_of(phantom)).dataobj)
    rewrite(ctp_of(phantom), np.repeat(data[..., :1], N_FRAMES, axis=3))
    run_bad(phantom.root, tmp_path, capsys, code=65, words=[ctp_of(phantom).name, "no contrast bolus"])


def _early_bolus(tmp_path, t0):
    early = dataclasses.replace(CONSTANTS, aif_t0=t0)
    return make_dataset(tmp_path / "bids", shape=(60, 60, 1), spacing=(4.0, 4.0, 5.0), n_frames=N_FRAMES,
                        noise_hu=0.0, constants=early)


def test_bolus_in_the_first_frame(tmp_path, capsys):
    """The arterial bolus peaks before the scan starts (aif_t0 = -6 s): no unenhanced frames."""
    phantom = _early_bolus(tmp_path, -6.0)
    run_bad(phantom.root, tmp_path, capsys, code=65,
            words=[ctp_of(phantom).name, "unenhanced frames", "baseline"])


def test_bolus_already_rising_in_the_first_frame(tmp_path, capsys):
    """Frame 0 holds ~70 % of the arterial peak (aif_t0 = -3 s). Arrival timing against frame 0
    found the bolus 'arriving' in frame 2 and the run succeeded with contrast in its baseline;
    the earliest vessels' start level (81 % of their rise here, about 1 % on every phantom
    that starts before the bolus) now stops it."""
    phantom = _early_bolus(tmp_path, -3.0)
    run_bad(phantom.root, tmp_path, capsys, code=65,
            words=[ctp_of(phantom).name, "already arriving in the first frame", "baseline"])


def test_no_aif_candidate(tmp_path, capsys):
    """Only isolated single bright voxels (1 mm^3, below the 2 mm^3 vessel size): no arterial input."""
    shape, t = (24, 24, 1), np.arange(N_FRAMES, dtype=float)
    bolus = np.where(t > 4, ((t - 4) / 3.0) ** 2 * np.exp(2 - 2 * (t - 4) / 3.0), 0.0)
    data = np.full(shape + (N_FRAMES,), 40.0)
    data += 3.0 * bolus
    data[2::4, 2::4, :, :] += 300.0 * bolus
    path = tmp_path / "bids" / "sub-01" / "ct" / "sub-01_ctp.nii.gz"
    path.parent.mkdir(parents=True)
    img = nb.Nifti1Image(np.round(data).astype(np.int16), np.eye(4))
    img.header.set_zooms((1.0, 1.0, 1.0, 1.0))
    img.header.set_xyzt_units("mm", "sec")
    nb.save(img, path)
    path.with_name("sub-01_ctp.json").write_text(json.dumps({"RepetitionTime": 1.0}))
    mask = tmp_path / "brain.nii.gz"
    nb.save(nb.Nifti1Image(np.ones(shape, np.uint8), np.eye(4)), mask)
    run_bad(tmp_path / "bids", tmp_path, capsys, "--brain-mask", str(mask), code=65,
            words=["sub-01_ctp.nii.gz", "no arterial input candidate"])


# ------------------------------------------------------------------------------------------ output
def test_output_dir_under_a_file(phantom, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    run_bad(phantom.root, tmp_path, capsys, code=73, words=["cannot create output directory", "afile"],
            out=tmp_path / "afile" / "out")


def test_output_dir_is_a_file(phantom, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    run_bad(phantom.root, tmp_path, capsys, code=73, words=["cannot create output directory", tmp_path / "out"])


def test_output_dir_read_only(phantom, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):  # root ignores permission bits: cannot be simulated this way
            pytest.skip("running as root: permission bits do not stop writes (see test_output_dir_under_a_file)")
        run_bad(phantom.root, tmp_path, capsys, code=73, words=["cannot write to output directory", out], out=out)
    finally:
        out.chmod(0o755)


def _disk_full_after(monkeypatch, pattern):
    """Make the atomic writer fail with ENOSPC, half-way through writing, for files matching pattern."""
    real = derivatives.atomic_write

    def atomic_write(path, write):
        if not Path(path).match(pattern):
            return real(path, write)

        def half_then_full(tmp):
            write(tmp)
            size = os.path.getsize(tmp)
            with open(tmp, "r+b") as fh:
                fh.truncate(size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

        return real(path, half_then_full)

    monkeypatch.setattr(derivatives, "atomic_write", atomic_write)


def test_disk_full_writing_dataset_description(phantom, tmp_path, capsys, monkeypatch):
    _disk_full_after(monkeypatch, "dataset_description.json")
    out = tmp_path / "out"
    run_bad(phantom.root, tmp_path, capsys, code=73,
            words=["cannot write", out / "dataset_description.json", "No space left on device"])
    assert [p.name for p in out.iterdir()] == []  # no half-written file, no temporary left


def test_disk_full_writing_maps(phantom, tmp_path, capsys, monkeypatch):
    """Maps written before the disk filled up stay (complete); the one being written leaves nothing."""
    _disk_full_after(monkeypatch, "*_cbv.nii.gz")
    out = tmp_path / "out"
    before = snapshot(phantom.root)
    rc = main([str(phantom.root), str(out), "participant", "-w", str(tmp_path / "work"), "--nprocs", "1"])
    stderr = capsys.readouterr().err
    # whatever the exit code: no half-written or temporary file is left behind
    assert not list(out.rglob("*_cbv.nii.gz")) and not list(out.rglob(".*tmp-*"))
    for done in out.rglob("*.nii.gz"):
        assert np.isfinite(np.asarray(nb.load(done).dataobj)).all()  # complete and readable
    assert snapshot(phantom.root) == before
    (line,) = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert rc == 73, line
    assert line.startswith("bids_ctp: error: ") and "_cbv.nii.gz" in line and "No space left on device" in line


def test_one_line_from_the_real_command(phantom, tmp_path):
    """Outside pytest's capture: numpy/nibabel warnings or nibabel's header notes would add stderr lines."""
    import subprocess
    import sys

    data = np.asarray(nb.load(ctp_of(phantom)).dataobj, dtype=np.float32)
    rewrite(ctp_of(phantom), data, dtype=np.float32, header={"scl_slope": 1e37, ("pixdim", 0): 0.5})
    before = snapshot(phantom.root)
    proc = subprocess.run([sys.executable, "-m", "bids_ctp", str(phantom.root), str(tmp_path / "out"), "participant",
                           "-w", str(tmp_path / "w"), "--nprocs", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 65
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"bids_ctp: error: {ctp_of(phantom).name}: ")
    assert line.endswith("voxel value(s) are NaN or infinite after scaling (scl_slope/scl_inter) "
                         "(first at voxel (0, 0, 0), frame 0)")
    assert snapshot(phantom.root) == before


# ------------------------------------------------------------------------ property and fuzz tests
# hypothesis is in the venv but not (yet) in setup.cfg's test extra: only these tests are skipped without it.
try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

if st is None:  # pragma: no cover
    def test_property_tests_need_hypothesis():
        pytest.skip("hypothesis is not installed (pip install hypothesis)")
else:
    from bids_ctp.bids import (MAX_SCAN_DURATION_S, MIN_FRAME_INTERVAL_S, _n_frames, collect_inputs,
                               resolve_frame_times)
    from bids_ctp.errors import DataError, InputMissingError
    from bids_ctp.interfaces.perfusion import LoadCTP

    FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

    json_scalars = (st.none() | st.booleans() | st.integers(min_value=-10**400, max_value=10**400)
                    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5))
    json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=12)

    @st.composite
    def sidecars(draw):
        """Sidecar timing: anything JSON can hold, and many near-valid lists (right or wrong length,
        with NaN, negative, repeated or unsorted numbers)."""
        n = draw(st.integers(1, 30))
        number = (st.floats(-5, 200) | st.integers(-5, 200) | st.sampled_from([0.0, float("nan"), float("inf")])
                  | json_scalars)
        near = st.one_of(
            st.builds(lambda step, k: [i * step for i in range(n + k)],
                      st.floats(-2, 50, allow_nan=False) | st.sampled_from([1e-9, 0.1, 1e308]), st.integers(-2, 2)),
            st.lists(number, min_size=max(0, n - 2), max_size=n + 2),
            st.lists(st.floats(0, 100), min_size=n, max_size=n).map(sorted),
        )
        keys = st.sampled_from(["FrameTimesStart", "VolumeTiming", "RepetitionTime", "AcquisitionDuration"])
        meta = draw(st.dictionaries(keys, near | json_values | number, max_size=3) | json_values)
        interval = draw(st.none() | st.floats(0.1, 10))
        return meta, n, interval

    @settings(FUZZ, max_examples=250)
    @given(sidecars())
    def test_property_frame_times(tmp_path, case):
        meta, n, interval = case
        path = tmp_path / "sub-01_ctp.nii.gz"  # does not exist: the header hint is skipped
        try:
            times, source = resolve_frame_times(path, meta, n, interval)
        except DataError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
            return
        assert source in ("FrameTimesStart", "VolumeTiming", "RepetitionTime", "--frame-interval")
        assert len(times) == n and all(isinstance(t, float) and np.isfinite(t) for t in times)
        assert times[0] >= 0 and times[-1] - times[0] <= MAX_SCAN_DURATION_S
        assert all(b - a >= MIN_FRAME_INTERVAL_S - 1e-9 for a, b in zip(times, times[1:]))

    FLOATS = st.sampled_from([0.0, -1.0, 1.0, 4.0, 5.0, 0.01, 25.0, 1e30, -1e38, float("nan"), float("inf"),
                              float("-inf"), 3.4e38, 1e-40]) | st.floats(-1e6, 1e6, width=32)
    DTYPES = st.sampled_from([2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 0, 1,
                              255]) | st.integers(-32768, 32767)

    @st.composite
    def nifti_files(draw):
        """A .nii or .nii.gz: random header fields around a valid 4D header, data of a random length."""
        hdr = nb.Nifti1Header()
        hdr.set_data_shape((4, 4, 2, 12))
        hdr.set_data_dtype(np.int16)
        hdr.set_zooms((4.0, 4.0, 5.0, 1.0))
        hdr.set_xyzt_units("mm", "sec")
        for field, value in draw(st.dictionaries(st.sampled_from(
                ["dim0", "dims", "pixdim", "datatype", "scl_slope", "scl_inter", "vox_offset", "qform_code",
                 "sform_code", "srow_x", "quatern_b", "xyzt_units", "sizeof_hdr", "magic"]), st.just(None),
                max_size=6)).items():
            if field == "dim0":
                hdr["dim"][0] = draw(st.integers(-2, 9))
            elif field == "dims":
                hdr["dim"][1:5] = draw(st.lists(st.integers(-2, 14), min_size=4, max_size=4))
            elif field == "pixdim":
                hdr["pixdim"][1:4] = draw(st.lists(FLOATS, min_size=3, max_size=3))
            elif field == "datatype":
                hdr["datatype"] = draw(DTYPES)
            elif field in ("scl_slope", "scl_inter", "quatern_b"):
                hdr[field] = draw(FLOATS)
            elif field == "vox_offset":
                hdr[field] = draw(st.sampled_from([0.0, 348.0, 352.0, 360.0, 1e9, -5.0, float("nan")]))
            elif field in ("qform_code", "sform_code"):
                hdr[field] = draw(st.integers(-5, 5))
            elif field == "srow_x":
                hdr[field] = draw(st.lists(FLOATS, min_size=4, max_size=4))
            elif field == "xyzt_units":
                hdr[field] = draw(st.integers(0, 255))
            elif field == "sizeof_hdr":
                hdr[field] = draw(st.sampled_from([0, 540, 347, 1 << 24]))
            elif field == "magic":
                hdr[field] = draw(st.sampled_from([b"ni1", b"n+2", b"xyz", b""]))
        header = hdr.binaryblock + b"\0" * 4
        n_data = draw(st.sampled_from([0, 10, 4 * 4 * 2 * 12 * 2, 4 * 4 * 2 * 12 * 8]) | st.integers(0, 20000))
        body = header + np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(n_data)
        gz = draw(st.booleans())
        cut = draw(st.none() | st.integers(0, len(body)))
        content = gzip.compress(body, mtime=0) if gz else body
        if cut is not None:
            content = content[:cut]
        return content, gz

    def _check_file(root: Path, content: bytes, gz: bool, index: bool = False):
        """The header checks of collect_inputs (the whole function with ``index``; else only its per-file
        check, 50x faster than indexing with pybids), then LoadCTP when they pass: success or a one-line
        DataError/InputMissingError, nothing else."""
        path = root / "sub-01" / "ct" / ("sub-01_ctp.nii.gz" if gz else "sub-01_ctp.nii")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.with_name("sub-01_ctp.json").write_text('{"RepetitionTime": 1.0}')
        try:
            if index:
                (inp,) = collect_inputs(root)
                times = inp.frame_times
            else:
                times = [float(i) for i in range(_n_frames(path))]
        except (DataError, InputMissingError) as err:
            assert "\n" not in str(err)
            return "header"
        work = root.parent / "load"
        work.mkdir(exist_ok=True)
        try:
            LoadCTP(in_file=str(path), frame_times=times).run(cwd=str(work))
        except DataError as err:
            assert "\n" not in str(err) and str(err).startswith(path.name)
            return "data"
        return "ok"

    @settings(FUZZ, max_examples=200)
    @given(nifti_files(), st.integers(0, 9))
    def test_fuzz_random_nifti_headers(tmp_path_factory, case, which):
        root = tmp_path_factory.mktemp("fuzz") / "bids"
        _check_file(root, *case, index=which == 0)

    @settings(FUZZ, max_examples=150)
    @given(st.binary(max_size=2000), st.booleans(), st.booleans(), st.integers(0, 9))
    def test_fuzz_random_bytes(tmp_path_factory, content, gz, compress, which):
        root = tmp_path_factory.mktemp("bytes") / "bids"
        content = gzip.compress(content, mtime=0) if compress else content
        assert _check_file(root, content, gz, index=which == 0) != "ok"


def test_corrupt_user_mask(phantom, tmp_path, capsys):
    mask = tmp_path / "mask.nii.gz"
    mask.write_bytes(b"\x1f\x8b" + b"not a mask at all" * 10)
    run_bad(phantom.root, tmp_path, capsys, "--brain-mask", str(mask), code=65,
            words=["mask.nii.gz", "cannot read mask"])
