"""Cluster execution: a two-participant phantom through nipype's SLURM plugin on a real SLURM.

Skipped (with the reason) where there is no SLURM: no ``sbatch`` on PATH, or no controller
answering. ``.ci/run`` starts a single-node SLURM with ``../shared/tools/slurm-up`` when it can.
"""
import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from bids_ctp.phantom import make_dataset

MAPS = ("cbf", "cbv", "mtt", "tmax", "ttp")


def _slurm_ready():
    if shutil.which("sbatch") is None:
        return "sbatch not found: no SLURM on this machine (.ci/run starts one with ../shared/tools/slurm-up)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if states.returncode != 0 or not {"idle", "mix", "alloc"} & set(states.stdout.split()):
        return f"SLURM has no usable node (sinfo: {(states.stdout + states.stderr).strip()!r})"
    return None


SKIP = _slurm_ready()


@pytest.mark.skipif(SKIP is not None, reason=str(SKIP))
def test_two_participants_through_slurm(tmp_path):
    make_dataset(tmp_path / "bids", n_subjects=2, shape=(60, 60, 2), spacing=(4, 4, 5), n_frames=20,
                 noise_hu=5, seed=3)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("LOGNAME", "USER")}  # bids_ctp sets them
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bids_ctp", str(tmp_path / "bids"), str(out), "participant",
                           "-w", str(work), "--plugin", "SLURM", "--nprocs", "1", "--mem-gb", "0.5",
                           "--plugin-args", '{"sbatch_args": "--ntasks=1"}'],
                          capture_output=True, text=True, env=env, timeout=900)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"SLURM run of 2 participants: {elapsed:.1f} s")

    truth_root = tmp_path / "bids" / "derivatives" / "groundtruth"
    for sub in ("sub-01", "sub-02"):
        perf = out / sub / "perf"
        mask = np.asarray(nib.load(perf / f"{sub}_desc-brain_mask.nii.gz").dataobj) > 0
        assert mask.shape == (60, 60, 2) and mask.sum() > 500
        for name in MAPS:
            data = np.asarray(nib.load(perf / f"{sub}_desc-nlr_{name}.nii.gz").dataobj)
            assert data.shape == (60, 60, 2) and np.isfinite(data).all(), (sub, name)
        # the maps are the real thing: median CBF/CBV in the truth's brain close to the truth
        truth_mask = np.asarray(nib.load(truth_root / sub / "perf" / f"{sub}_desc-brain_mask.nii.gz").dataobj) > 0
        for name in ("cbf", "cbv"):
            data = np.asarray(nib.load(perf / f"{sub}_desc-nlr_{name}.nii.gz").dataobj)
            truth = np.asarray(nib.load(truth_root / sub / "perf" / f"{sub}_desc-groundtruth_{name}.nii.gz").dataobj)
            both = truth_mask & mask
            ratio = np.median(data[both]) / np.median(truth[both])
            assert 0.5 < ratio < 2, (sub, name, ratio)  # coarse 2-slice phantom: sanity only
        assert (perf / f"{sub}_desc-nlr_aif.tsv").is_file()

    # same maps as a local run (Linear, in one process)
    local = subprocess.run([sys.executable, "-m", "bids_ctp", str(tmp_path / "bids"), str(tmp_path / "local"),
                            "participant", "-w", str(tmp_path / "work_local"), "--plugin", "Linear"],
                           capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]
    for sub in ("sub-01", "sub-02"):
        for name in MAPS:
            rel = f"{sub}/perf/{sub}_desc-nlr_{name}.nii.gz"
            np.testing.assert_allclose(np.asarray(nib.load(out / rel).dataobj),
                                       np.asarray(nib.load(tmp_path / "local" / rel).dataobj), rtol=1e-5, atol=1e-5)

    # every step went through sbatch: nipype leaves the batch scripts and the jobs' SLURM logs
    scripts = list(work.glob("*/batch/batchscript_*.sh"))
    logs = list(work.glob("*/batch/slurm-*.out"))
    assert len(scripts) >= 16 and len(logs) >= 16, (len(scripts), len(logs))
    assert any(sys.executable in p.read_text() for p in scripts)  # the jobs run this venv's python
