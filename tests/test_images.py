"""Reading the input series frame by frame and writing intermediate images through memory maps."""
import nibabel as nb
import numpy as np
import pytest

from bids_ctp.interfaces import images


def _scaled_int16(path, byteorder):
    rng = np.random.default_rng(3)
    raw = rng.integers(-1500, 3000, size=(7, 6, 5, 4)).astype(np.dtype(np.int16).newbyteorder(byteorder))
    affine = np.array([[0.4, 0.1, 0, -30], [0, 0.5, 0, 12], [0, 0, 2.5, 4], [0, 0, 0, 1]])
    img = nb.Nifti1Image(raw, affine)
    img.header.set_data_dtype(raw.dtype)
    img.header.set_slope_inter(0.5, -1024.0)
    img.header.extensions.append(nb.nifti1.Nifti1Extension(6, b"a comment"))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    img.to_filename(path)
    return raw.astype(np.float64) * 0.5 - 1024.0, affine


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_frames_read_one_by_one_are_the_scaled_series(tmp_path, name, byteorder):
    truth, _ = _scaled_int16(tmp_path / name, byteorder)
    frames = list(images.read_frames(tmp_path / name))
    assert len(frames) == 4
    for t, frame in enumerate(frames):
        assert frame.dtype == np.float32 and frame.shape == (7, 6, 5)
        np.testing.assert_array_equal(frame, truth[..., t].astype(np.float32))


def test_a_file_that_ends_early_is_an_eof_error(tmp_path):
    _scaled_int16(tmp_path / "a.nii", "<")
    content = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "a.nii").write_bytes(content[:-100])
    with pytest.raises(EOFError, match="file ends after"):
        list(images.read_frames(tmp_path / "a.nii"))


def test_memory_mapped_output_keeps_the_grid(tmp_path, monkeypatch):
    _, affine = _scaled_int16(tmp_path / "ref.nii.gz", "<")
    monkeypatch.chdir(tmp_path)
    out = images.create_like(tmp_path / "ref.nii.gz", "series.nii", (7, 6, 5, 4))
    values = np.arange(7 * 6 * 5 * 4, dtype=np.float32).reshape(7, 6, 5, 4)
    for t in range(4):  # written piece by piece, as the stages do
        out[..., t] = values[..., t]
    out.flush()
    img = nb.load(out.filename)
    assert img.get_data_dtype() == np.float32 and img.header.get_slope_inter() == (None, None)
    np.testing.assert_array_equal(np.asarray(img.dataobj), values)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 2)
    assert img.header.get_zooms()[:3] == pytest.approx((0.4, 0.5099, 2.5), abs=1e-4)
    mask = nb.load(images.save_like(values[..., 0] > 100, tmp_path / "ref.nii.gz", "m.nii", np.uint8))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (values[..., 0] > 100).astype(np.uint8))


def test_full_disk_is_a_one_line_output_error_and_leaves_no_file(tmp_path, monkeypatch):
    """The space is reserved before the memory map is written: writing a map past a full disk
    kills the process (SIGBUS) without a message."""
    import errno
    import os

    from bids_ctp.errors import OutputError

    _scaled_int16(tmp_path / "ref.nii.gz", "<")
    monkeypatch.chdir(tmp_path)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OutputError, match=r"series.nii \(0.0034 GB\) in the work directory: No space left"):
        images.create_like(tmp_path / "ref.nii.gz", "series.nii", (20, 20, 20, 106))
    assert not (tmp_path / "series.nii").exists()
