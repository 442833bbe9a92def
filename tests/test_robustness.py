"""Issue 6, items 2-4: interrupted, repeated and concurrent runs stay correct; input untouched."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_ctp.phantom import make_dataset

SMALL = dict(shape=(60, 60, 3), spacing=(4.0, 4.0, 5.0), n_frames=20, noise_hu=5.0)


def command(bids, out, work, *extra):
    return [sys.executable, "-m", "bids_ctp", str(bids), str(out), "participant", "-w",
            str(work), "--nprocs", "1", *extra]


def maps(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out).as_posix(): np.asarray(nb.load(p).dataobj)
            for p in sorted(out.rglob("*.nii.gz"))}


def checksums(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    return make_dataset(root / "bids", n_subjects=4, **SMALL)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted run, with bids_dir read-only (permission bits)."""
    base = tmp_path_factory.mktemp("reference")
    before = checksums(dataset.root)
    modes = {p: p.stat().st_mode for p in dataset.root.rglob("*")}
    for p in modes:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        subprocess.run(command(dataset.root, base / "out", base / "work"), check=True,
                       capture_output=True)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert checksums(dataset.root) == before  # nothing inside bids_dir changed
    return maps(base / "out")


def test_rerun_and_fresh_run_are_identical(dataset, reference, tmp_path):
    """Deterministic: a run in a new work dir gives bit-identical maps; a rerun too."""
    for _ in range(2):
        subprocess.run(command(dataset.root, tmp_path / "out", tmp_path / "work"), check=True,
                       capture_output=True)
        result = maps(tmp_path / "out")
        assert result.keys() == reference.keys()
        for name, data in reference.items():
            np.testing.assert_array_equal(result[name], data, err_msg=name)


def test_killed_run_then_rerun_completes(dataset, reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(command(dataset.root, out, work), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    # kill once the workflow is half-way: the first series' smoothing has started
    while time.time() < deadline and not list(work.rglob("smooth")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(command(dataset.root, out, work), check=True, capture_output=True)
    result = maps(out)
    assert result.keys() == reference.keys()
    for name, data in reference.items():
        np.testing.assert_array_equal(result[name], data, err_msg=name)
    assert not [p for p in out.rglob("*") if "tmp" in p.name and p.is_file()]


def test_parallel_runs_into_one_output_dir(dataset, reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    labels = sorted(p.name[4:] for p in dataset.root.glob("sub-*"))
    procs = [subprocess.Popen(command(dataset.root, out, work, "--participant-label", label),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for label in labels]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    result = maps(out)
    assert result.keys() == reference.keys()
    for name, data in reference.items():
        np.testing.assert_array_equal(result[name], data, err_msg=name)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")
                and p.name != ".bidsignore"]
