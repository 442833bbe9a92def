"""The accuracy grid of benchmarks/accuracy.py on a few cells, through the real CLI.

Looser bounds than the benchmark's targets, so a regression of the default method (residue
family choice, AIF interpolation, baseline, smoothing) fails CI.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from accuracy import evaluate, make_condition  # noqa: E402

from bids_ctp.cli.run import main  # noqa: E402

MTTS, DELAYS = (3.0, 10.0), (0.3, 4.4)  # delays between fit-grid points
CONDITIONS = {"c0": ("exponential", 10.0, 1.0), "c1": ("box", 10.0, 1.0),
              "c2": ("box", 0.0, 2.0), "c3": ("linear", 10.0, 1.0)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    base = tmp_path_factory.mktemp("grid")
    bids = base / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "grid", "BIDSVersion": "1.10.0"}')
    for n, (label, (shape, noise, interval)) in enumerate(CONDITIONS.items()):
        make_condition(bids, label, shape, noise, interval, seed=n, mtts=MTTS, delays=DELAYS)
    out = base / "out"
    assert main([str(bids), str(out), "participant", "-w", str(base / "work"), "--nprocs", "2",
                 "--brain-mask", str(base / "masks" / "sub-{subject}_brain.nii.gz"),
                 "--aif-mask", str(base / "masks" / "sub-{subject}_aif.nii.gz"),
                 "--no-motion-correction"]) == 0
    return out


@pytest.mark.parametrize("label", sorted(CONDITIONS))
def test_default_method_on_grid_cells(grid, label):
    cells = evaluate(grid, label, "nlr", MTTS, DELAYS)
    for (mtt, delay), err in cells.items():
        assert abs(err["cbf"]) < 15, (label, mtt, delay, err)
        assert abs(err["cbv"]) < 10, (label, mtt, delay, err)
        assert abs(err["tmax"]) < 0.5, (label, mtt, delay, err)
    sidecar = json.loads(next(grid.rglob(f"sub-{label}_desc-nlr_cbf.json")).read_text())
    assert sidecar["ResidueShape"] == CONDITIONS[label][0]  # the family is identified
