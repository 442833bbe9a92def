"""Input discovery, frame timing and output naming (bids_ctp.bids, bids_ctp.derivatives)."""
import json
import os
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_ctp import __version__
from bids_ctp.bids import collect_inputs, resolve_frame_times
from bids_ctp.derivatives import output_path, save_nifti, write_dataset_description, write_json
from bids_ctp.errors import DataError, InputMissingError, OutputError, UsageError
from bids_ctp.inputs import CTPInput
from helpers import listing, make_ctp

N = 12


@pytest.fixture
def bep_ds(tmp_path):
    """BEP024-style: ct/ folders, with and without sessions, sidecars with and without timing."""
    root = tmp_path / "bep"
    make_ctp(root, "sub-01/ses-01/ct/sub-01_ses-01_ctp.nii.gz", {"FrameTimesStart": [2.0 * i for i in range(N)]})
    make_ctp(root, "sub-01/ses-02/ct/sub-01_ses-02_ctp.nii.gz", {"RepetitionTime": 1.5})
    make_ctp(root, "sub-02/ct/sub-02_acq-low_run-01_ctp.nii", {"VolumeTiming": [0.5 * i for i in range(N)]})
    make_ctp(root, "sub-02/ct/sub-02_acq-low_run-01_ct.nii.gz", shape=(6, 6, 2))  # not a CTP
    make_ctp(root, "derivatives/other/sub-01/ses-01/ct/sub-01_ses-01_ctp.nii.gz", {"RepetitionTime": 1})
    make_ctp(root, "derivatives/sub-09/ct/sub-09_ctp.nii.gz", {"RepetitionTime": 1})
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.10.0"}))
    return root


@pytest.fixture
def isles_ds(tmp_path):
    """ISLES'24-style: no datatype folder, no sidecars, no dataset_description.json."""
    root = tmp_path / "isles"
    for case in ("stroke0001", "stroke0002"):
        make_ctp(root, f"sub-{case}/ses-01/sub-{case}_ses-01_ctp.nii.gz", pixdim4=2.0)
        make_ctp(root, f"sub-{case}/ses-01/perfusion-maps/sub-{case}_ses-01_cbf.nii.gz", shape=(6, 6, 2))
        make_ctp(root, f"derivatives/sub-{case}/ses-01/sub-{case}_ses-01_space-ncct_ctp.nii.gz")
    return root


# --------------------------------------------------------------------------------------- discovery
def test_bep_layout_discovery(bep_ds):
    before = listing(bep_ds)
    inputs = collect_inputs(bep_ds)
    assert [i.relpath for i in inputs] == [
        "sub-01/ses-01/ct/sub-01_ses-01_ctp.nii.gz",
        "sub-01/ses-02/ct/sub-01_ses-02_ctp.nii.gz",
        "sub-02/ct/sub-02_acq-low_run-01_ctp.nii",
    ]
    first, second, third = inputs
    assert first.path == bep_ds / first.relpath and first.path.is_absolute()
    assert first.entities == {"subject": "01", "session": "01"}
    assert first.timing_source == "FrameTimesStart" and first.frame_times[:3] == [0.0, 2.0, 4.0]
    assert first.metadata["FrameTimesStart"][1] == 2.0
    assert second.timing_source == "RepetitionTime" and second.frame_times[-1] == pytest.approx(1.5 * (N - 1))
    assert third.entities == {"subject": "02", "acquisition": "low", "run": "01"}
    assert third.name == "sub-02_acq-low_run-01"
    assert third.timing_source == "VolumeTiming" and len(third.frame_times) == N
    assert all(i.brain_mask is None for i in inputs)
    assert listing(bep_ds) == before  # nothing written (no pybids database)


def test_isles_layout_discovery(isles_ds):
    inputs = collect_inputs(isles_ds, frame_interval=1.0)
    assert [i.name for i in inputs] == ["sub-stroke0001_ses-01", "sub-stroke0002_ses-01"]
    assert inputs[0].relpath == "sub-stroke0001/ses-01/sub-stroke0001_ses-01_ctp.nii.gz"
    assert inputs[0].timing_source == "--frame-interval"
    assert inputs[0].frame_times == [float(i) for i in range(N)]
    assert inputs[0].metadata == {}


def test_inherited_sidecar(tmp_path):
    make_ctp(tmp_path, "sub-01/ct/sub-01_ctp.nii.gz")
    (tmp_path / "ctp.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    (inp,) = collect_inputs(tmp_path)
    assert inp.timing_source == "RepetitionTime" and inp.frame_times[1] == 2.0


@pytest.mark.parametrize("labels", [["01"], ["sub-01"], "01"])
def test_participant_filter_with_or_without_prefix(bep_ds, labels):
    inputs = collect_inputs(bep_ds, participant_label=labels)
    assert {i.entities["subject"] for i in inputs} == {"01"} and len(inputs) == 2


def test_several_labels(bep_ds, isles_ds):
    assert len(collect_inputs(bep_ds, participant_label=["sub-01", "02"])) == 3
    inputs = collect_inputs(isles_ds, participant_label=["stroke0002", "sub-stroke0001"], frame_interval=1)
    assert len(inputs) == 2
    assert [i.relpath for i in collect_inputs(bep_ds, session_label=["ses-02"])] == [
        "sub-01/ses-02/ct/sub-01_ses-02_ctp.nii.gz"]
    assert len(collect_inputs(bep_ds, participant_label="01", session_label=["01", "ses-02"])) == 2


def test_unknown_labels(bep_ds):
    with pytest.raises(InputMissingError) as exc:
        collect_inputs(bep_ds, participant_label=["01", "sub-07", "08"])
    msg = str(exc.value)
    assert "sub-07" in msg and "sub-08" in msg and "available: sub-01, sub-02" in msg
    assert "sub-09" not in msg  # derivatives are never indexed
    with pytest.raises(InputMissingError) as exc:
        collect_inputs(bep_ds, participant_label="01", session_label="03")
    assert "ses-03" in str(exc.value) and "available: ses-01, ses-02" in str(exc.value)
    with pytest.raises(InputMissingError, match=r"ses-01 of sub-02 .*available: none"):
        collect_inputs(bep_ds, participant_label="02", session_label="01")


def test_no_ctp_images(tmp_path):
    make_ctp(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", shape=(6, 6, 2))
    make_ctp(tmp_path, "derivatives/sub-01/ct/sub-01_ctp.nii.gz", {"RepetitionTime": 1})
    with pytest.raises(InputMissingError, match="no CTP images found"):
        collect_inputs(tmp_path)
    with pytest.raises(InputMissingError, match="not found"):
        collect_inputs(tmp_path / "missing")
    make_ctp(tmp_path, "raw_data/sub-01/ses-01/sub-01_ses-01_ctp.nii.gz")
    with pytest.raises(InputMissingError, match=r"did you mean .*raw_data\?"):
        collect_inputs(tmp_path)


def test_long_label_lists_are_cut(tmp_path):
    for i in range(25):
        make_ctp(tmp_path, f"sub-{i:02d}/ct/sub-{i:02d}_ctp.nii.gz", {"RepetitionTime": 1}, shape=(2, 2, 1, 3))
    with pytest.raises(InputMissingError) as exc:
        collect_inputs(tmp_path, participant_label="99")
    assert "sub-19, ... (25 in all)" in str(exc.value) and "sub-20" not in str(exc.value)


def test_non_4d_image(tmp_path):
    path = make_ctp(tmp_path, "sub-01/ct/sub-01_ctp.nii.gz", {"RepetitionTime": 1}, shape=(6, 6, 2))
    with pytest.raises(DataError) as exc:
        collect_inputs(tmp_path)
    assert str(exc.value) == f"{path}: expected a 4D CTP image, got shape (6, 6, 2)"


def test_duplicate_outputs_refused(tmp_path):
    make_ctp(tmp_path, "sub-01/ses-01/ct/sub-01_ses-01_ctp.nii.gz", {"RepetitionTime": 1})
    make_ctp(tmp_path, "sub-01/ses-01/sub-01_ses-01_ctp.nii.gz", {"RepetitionTime": 1})
    with pytest.raises(DataError, match="same outputs"):
        collect_inputs(tmp_path)


# --------------------------------------------------------------------------------------- timing
def test_timing_resolution_order(tmp_path):
    p = tmp_path / "sub-01_ctp.nii.gz"
    ft = [0, 1, 3, 6]
    both = {"FrameTimesStart": ft, "VolumeTiming": [0, 2, 4, 6], "RepetitionTime": 9}
    assert resolve_frame_times(p, both, 4, frame_interval=5) == ([0.0, 1.0, 3.0, 6.0], "FrameTimesStart")
    assert resolve_frame_times(p, {"VolumeTiming": [0, 2, 4, 7], "RepetitionTime": 9}, 4, 5) == (
        [0.0, 2.0, 4.0, 7.0], "VolumeTiming")
    assert resolve_frame_times(p, {"RepetitionTime": 1.5}, 4, 5) == ([0.0, 1.5, 3.0, 4.5], "RepetitionTime")
    assert resolve_frame_times(p, {}, 3, 2) == ([0.0, 2.0, 4.0], "--frame-interval")
    assert resolve_frame_times(p, None, 3, 0.5) == ([0.0, 0.5, 1.0], "--frame-interval")


@pytest.mark.parametrize("meta, field, words", [
    ({"FrameTimesStart": [0, 1, 2]}, "FrameTimesStart", "3 values but the image has 4 frames"),
    ({"FrameTimesStart": [0, 1, 1, 2]}, "FrameTimesStart", "strictly increasing"),
    ({"FrameTimesStart": [0, 2, 1, 3]}, "FrameTimesStart", "strictly increasing"),
    ({"FrameTimesStart": [0, 1, "x", 3]}, "FrameTimesStart", "finite numbers"),
    ({"FrameTimesStart": [0, 1, float("nan"), 3]}, "FrameTimesStart", "finite numbers"),
    ({"FrameTimesStart": 2.0}, "FrameTimesStart", "list of numbers"),
    ({"VolumeTiming": [0, 1]}, "VolumeTiming", "2 values"),
    ({"RepetitionTime": -1.0}, "RepetitionTime", "> 0"),
    ({"RepetitionTime": 0}, "RepetitionTime", "> 0"),
    ({"RepetitionTime": "2"}, "RepetitionTime", "> 0"),
    ({"RepetitionTime": True}, "RepetitionTime", "> 0"),
])
def test_invalid_timing(tmp_path, meta, field, words):
    p = tmp_path / "sub-01_ses-01_ctp.nii.gz"
    with pytest.raises(DataError) as exc:
        resolve_frame_times(p, meta, 4, frame_interval=1.0)  # an invalid sidecar is never skipped
    msg = str(exc.value)
    assert msg.startswith(f"{p}: ") and field in msg and words in msg


def test_no_timing_message_with_and_without_header_hint(tmp_path):
    with_hint = make_ctp(tmp_path, "a/sub-01_ctp.nii.gz", pixdim4=2.0)
    without = make_ctp(tmp_path, "b/sub-01_ctp.nii.gz", pixdim4=0.0)
    with pytest.raises(DataError) as exc:
        resolve_frame_times(with_hint, {}, N)
    assert str(exc.value) == (
        f"{with_hint}: no frame timing: the sidecar has no FrameTimesStart, VolumeTiming or RepetitionTime; "
        "pass --frame-interval SECONDS (the NIfTI header says 2 s per frame)")
    with pytest.raises(DataError) as exc:
        resolve_frame_times(without, {"Manufacturer": "x"}, N)
    assert str(exc.value).endswith("pass --frame-interval SECONDS")
    with pytest.raises(UsageError):
        resolve_frame_times(without, {}, N, frame_interval=-1)


def test_collect_reports_missing_timing(isles_ds):
    with pytest.raises(DataError) as exc:
        collect_inputs(isles_ds)
    assert "sub-stroke0001_ses-01_ctp.nii.gz: no frame timing" in str(exc.value)
    assert "2 s per frame" in str(exc.value)


# --------------------------------------------------------------------------------------- brain masks
def test_brain_mask_placeholders(bep_ds, tmp_path):
    masks = tmp_path / "masks"
    for ses in ("01", "02"):
        make_ctp(masks, f"sub-01_ses-{ses}_mask.nii.gz", shape=(6, 6, 2))
    inputs = collect_inputs(bep_ds, participant_label="01",
                            brain_mask=str(masks / "sub-{subject}_ses-{session}_mask.nii.gz"))
    assert [i.brain_mask for i in inputs] == [masks / "sub-01_ses-01_mask.nii.gz", masks / "sub-01_ses-02_mask.nii.gz"]

    single = collect_inputs(bep_ds, participant_label="01", session_label="02",
                            brain_mask=masks / "sub-01_ses-01_mask.nii.gz")
    assert single[0].brain_mask == masks / "sub-01_ses-01_mask.nii.gz"

    with pytest.raises(UsageError, match="placeholder"):
        collect_inputs(bep_ds, participant_label="01", brain_mask=masks / "sub-01_ses-01_mask.nii.gz")
    with pytest.raises(UsageError, match=r"uses \{session\}, but sub-02_acq-low_run-01_ctp.nii has no session"):
        collect_inputs(bep_ds, brain_mask=str(masks / "sub-{subject}_ses-{session}_mask.nii.gz"))
    (masks / "sub-01_ses-02_mask.nii.gz").unlink()
    with pytest.raises(InputMissingError, match=r"brain mask not found: .*sub-01_ses-02_mask.nii.gz"):
        collect_inputs(bep_ds, participant_label="01", brain_mask=str(masks / "sub-{subject}_ses-{session}_mask.nii.gz"))
    with pytest.raises(InputMissingError, match="brain mask not found: .*nothere.nii.gz"):
        collect_inputs(bep_ds, participant_label="01", session_label="01", brain_mask=tmp_path / "nothere.nii.gz")


# --------------------------------------------------------------------------------------- outputs
def _input(**entities):
    return CTPInput(path=Path("/x.nii.gz"), relpath="x.nii.gz", entities=entities, frame_times=[0.0, 1.0],
                    timing_source="RepetitionTime")


def test_output_path_naming(tmp_path):
    with_ses = _input(subject="01", session="02")
    assert output_path(tmp_path, with_ses, "cbf", desc="csvd") == (
        tmp_path / "sub-01/ses-02/perf/sub-01_ses-02_desc-csvd_cbf.nii.gz")
    no_ses = _input(subject="stroke0001", acquisition="low", reconstruction="soft", run="02")
    assert output_path(tmp_path, no_ses, "tmax") == (
        tmp_path / "sub-stroke0001/perf/sub-stroke0001_acq-low_rec-soft_run-02_tmax.nii.gz")
    assert output_path(tmp_path, with_ses, "mask", desc="brain", extension=".json") == (
        tmp_path / "sub-01/ses-02/perf/sub-01_ses-02_desc-brain_mask.json")
    assert output_path(tmp_path, with_ses, "cbf", desc="csvd", extension=".svg", datatype="figures") == (
        tmp_path / "sub-01/ses-02/figures/sub-01_ses-02_desc-csvd_cbf.svg")
    with pytest.raises(ValueError):
        output_path(tmp_path, with_ses, "cbf", desc="c_svd")


def test_dataset_description(tmp_path):
    bids_dir, out = tmp_path / "raw data", tmp_path / "out"
    bids_dir.mkdir()
    (out).mkdir()
    (out / ".bidsignore").write_text("extra/\n*_cbf.*\n")
    path = write_dataset_description(out, bids_dir)
    assert path == out / "dataset_description.json"
    desc = json.loads(path.read_text())
    uri = bids_dir.as_uri()
    assert uri.startswith("file:///") and "raw%20data" in uri
    assert desc == {
        "Name": "bids_ctp derivatives", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bids_ctp", "Version": __version__,
                         "CodeURL": "https://github.com/bids-apps/bids_ctp"}],
        "SourceDatasets": [{"URL": uri}], "DatasetLinks": {"raw": uri},
    }
    assert list(desc) == ["Name", "BIDSVersion", "DatasetType", "GeneratedBy", "SourceDatasets", "DatasetLinks"]
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert ignore[0] == "extra/" and ignore.count("*_cbf.*") == 1
    for pat in ("*_cbv.*", "*_mtt.*", "*_tmax.*", "*_ttp.*", "*_aif.*", "*_mask.*", "figures/"):
        assert pat in ignore
    write_dataset_description(out, bids_dir)  # idempotent, replaces atomically
    assert sorted(os.listdir(out)) == [".bidsignore", "dataset_description.json"]


def test_atomic_writes_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub-01" / "perf" / "sub-01_desc-csvd_cbf.json"
    write_json(target, {"Units": "mL/100g/min", "B": np.float32(1.5), "A": np.arange(3)})
    assert target.read_text().startswith('{\n  "Units"')
    assert json.loads(target.read_text()) == {"Units": "mL/100g/min", "B": 1.5, "A": [0, 1, 2]}
    img = nb.Nifti1Image(np.ones((3, 3, 2), np.float32), np.eye(4))
    nii = save_nifti(img, target.with_name("sub-01_desc-csvd_cbf.nii.gz"))
    with open(nii, "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"  # gzip
    assert nb.load(str(nii)).shape == (3, 3, 2)
    save_nifti(img, target.with_name("plain.nii"))
    assert sorted(os.listdir(target.parent)) == [
        "plain.nii", "sub-01_desc-csvd_cbf.json", "sub-01_desc-csvd_cbf.nii.gz"]

    with pytest.raises(TypeError):  # not serialisable: no partial file left behind
        write_json(target.with_name("bad.json"), {"x": object()})
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root can write anyway
            with pytest.raises(OutputError):
                write_json(tmp_path / "ro" / "x.json", {})
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    assert sorted(os.listdir(target.parent)) == [
        "plain.nii", "sub-01_desc-csvd_cbf.json", "sub-01_desc-csvd_cbf.nii.gz"]


def test_dataset_description_names_the_container(tmp_path, monkeypatch):
    monkeypatch.setenv("BIDS_CTP_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("BIDS_CTP_CONTAINER_TAG", "bids/ctp:0.1.0")
    (tmp_path / "raw").mkdir()
    write_dataset_description(tmp_path / "out", tmp_path / "raw")
    generated = json.loads((tmp_path / "out" / "dataset_description.json").read_text())["GeneratedBy"]
    assert generated[0]["Container"] == {"Type": "docker", "Tag": "bids/ctp:0.1.0"}
    monkeypatch.delenv("BIDS_CTP_CONTAINER_TYPE")
    write_dataset_description(tmp_path / "out2", tmp_path / "raw")
    generated = json.loads((tmp_path / "out2" / "dataset_description.json").read_text())["GeneratedBy"]
    assert "Container" not in generated[0]
