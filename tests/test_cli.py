"""The bids_ctp command line (bids_ctp.cli.run.main), with the workflow replaced by a fake."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bids_ctp import __version__
from bids_ctp.cli.parser import build_parser
from bids_ctp.cli.run import GROUP_MESSAGE, main
from helpers import listing, make_ctp

N = 12


@pytest.fixture
def ds(tmp_path):
    root = tmp_path / "bids"
    make_ctp(root, "sub-01/ses-01/ct/sub-01_ses-01_ctp.nii.gz", {"FrameTimesStart": [1.5 * i for i in range(N)]})
    make_ctp(root, "sub-02/ct/sub-02_ctp.nii.gz", {"RepetitionTime": 2.0})
    return root


class FakeWorkflow:
    def __init__(self, fail=False):
        self.fail, self.runs, self.base_dir, self.config = fail, [], None, {}

    def run(self, plugin=None, plugin_args=None):
        self.runs.append((plugin, plugin_args))
        if self.fail:
            raise RuntimeError("Workflow did not execute cleanly. Check log for details")


@pytest.fixture
def fake_wf(monkeypatch):
    """Replace bids_ctp.workflows.base (written elsewhere) by a recorder."""
    calls = []
    state = {"fail": False}

    def init_bids_ctp_wf(inputs, output_dir, work_dir, options):
        wf = FakeWorkflow(fail=state["fail"])
        calls.append({"inputs": inputs, "output_dir": output_dir, "work_dir": work_dir, "options": options, "wf": wf})
        return wf

    module = types.ModuleType("bids_ctp.workflows.base")
    module.init_bids_ctp_wf = init_bids_ctp_wf
    monkeypatch.setitem(sys.modules, "bids_ctp.workflows.base", module)
    import bids_ctp.workflows

    monkeypatch.setattr(bids_ctp.workflows, "base", module, raising=False)
    return calls, state


def one_error_line(capsys, *words):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bids_ctp: error: ") and "Traceback" not in err
    for word in words:
        assert str(word) in lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------- parser
def test_defaults_and_spellings(tmp_path):
    args = build_parser().parse_args(["in", "out", "participant"])
    assert args.deconvolution == "nlr" and args.density == 1.05 and args.kh == 0.73 and args.nprocs >= 1
    assert args.work_dir.name == f"bids_ctp_work-{os.getuid()}" and args.verbose == 0 and args.frame_interval is None
    args = build_parser().parse_args(["in", "out", "participant", "--participant_label", "01", "sub-02",
                                      "--session_label", "01", "-w", str(tmp_path), "--nprocs", "3", "-vv",
                                      "--frame_interval", "1.5", "--deconvolution", "ssvd"])
    assert args.participant_label == ["01", "sub-02"] and args.session_label == ["01"]
    assert args.work_dir == tmp_path and args.nprocs == 3 and args.verbose == 2 and args.frame_interval == 1.5


def test_help_mentions_units(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("seconds", "g/mL", "hematocrit", "block-circulant", "{subject}", "exit codes"):
        assert word in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bids_ctp {__version__}"


@pytest.mark.parametrize("argv, words", [
    (["in", "out"], ["required"]),
    (["in", "out", "subject"], ["invalid choice", "subject"]),
    (["in", "out", "participant", "--nprocs", "0"], ["--nprocs", "'0'"]),
    (["in", "out", "participant", "--frame-interval", "-2"], ["--frame-interval", "'-2'"]),
    (["in", "out", "participant", "--frame-interval", "nan"], ["--frame-interval"]),
    (["in", "out", "participant", "--kh", "1.5"], ["--kh"]),
    (["in", "out", "participant", "--deconvolution", "fft"], ["--deconvolution", "fft"]),
    (["in", "out", "participant", "--bogus"], ["--bogus"]),
])
def test_bad_options_exit_64(capsys, argv, words):
    assert main(argv) == 64
    one_error_line(capsys, *words)


# --------------------------------------------------------------------------------------- errors
def test_missing_bids_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 66
    one_error_line(capsys, tmp_path / "nope")
    assert not (tmp_path / "out").exists()


def test_unknown_label(ds, tmp_path, capsys):
    before = listing(ds)
    assert main([str(ds), str(tmp_path / "out"), "participant", "--participant-label", "sub-07"]) == 66
    one_error_line(capsys, "sub-07", "sub-01, sub-02")
    assert not (tmp_path / "out").exists() and listing(ds) == before


def test_sidecar_without_timing(ds, tmp_path, capsys, fake_wf):
    make_ctp(ds, "sub-03/ct/sub-03_ctp.nii.gz", {"Manufacturer": "ACME"})
    out = tmp_path / "out"
    # alone, the series fails before anything is written
    assert main([str(ds), str(out), "participant", "--participant-label", "03"]) == 65
    one_error_line(capsys, "sub-03_ctp.nii.gz", "FrameTimesStart", "--frame-interval")
    assert not out.exists()
    assert fake_wf[0] == []
    # with others, only it fails: they are processed, and the summary says so (exit 65)
    assert main([str(ds), str(out), "participant"]) == 65
    error, summary = capsys.readouterr().err.strip().splitlines()
    assert "sub-03_ctp.nii.gz" in error and "FrameTimesStart" in error
    assert summary.startswith("bids_ctp: 2 of 3 CTP series done") and "1 failed" in summary
    assert {i.name for i in fake_wf[0][0]["inputs"]} == {"sub-01_ses-01", "sub-02"}
    fake_wf[0].clear()
    # the same series works once the user gives the interval; the sidecar still wins elsewhere
    assert main([str(ds), str(out), "participant", "--frame-interval", "0.5"]) == 0
    sources = {i.name: i.timing_source for i in fake_wf[0][0]["inputs"]}
    assert sources == {"sub-01_ses-01": "FrameTimesStart", "sub-02": "RepetitionTime", "sub-03": "--frame-interval"}


@pytest.mark.parametrize("sub", ["out", "code/out", ".", "derivatives"])
def test_output_inside_bids_dir_refused(ds, capsys, sub):
    before = listing(ds)
    assert main([str(ds), str(ds / sub), "participant"]) == 64
    one_error_line(capsys, "inside the input dataset")
    assert listing(ds) == before


def test_work_dir_inside_bids_dir_refused(ds, tmp_path, capsys):
    assert main([str(ds), str(tmp_path / "out"), "participant", "-w", str(ds / "work")]) == 64
    one_error_line(capsys, "work directory")


def test_output_dir_not_creatable(ds, tmp_path, capsys, fake_wf):
    (tmp_path / "afile").write_text("x")
    assert main([str(ds), str(tmp_path / "afile" / "out"), "participant"]) == 73
    one_error_line(capsys, "afile")


# --------------------------------------------------------------------------------------- runs
def test_participant_run(ds, tmp_path, capsys, fake_wf, monkeypatch):
    calls, _ = fake_wf
    before = listing(ds)
    monkeypatch.chdir(tmp_path)
    out, work = Path("derivs"), Path("work")  # relative paths are made absolute
    rc = main([str(ds), str(out), "participant", "--participant-label", "01", "-w", str(work), "--nprocs", "1",
               "--deconvolution", "ssvd"])
    assert rc == 0
    assert listing(ds) == before  # nothing written in bids_dir
    (call,) = calls
    assert [i.relpath for i in call["inputs"]] == ["sub-01/ses-01/ct/sub-01_ses-01_ctp.nii.gz"]
    assert call["inputs"][0].frame_times[1] == 1.5
    assert call["output_dir"] == tmp_path / "derivs" and call["work_dir"] == tmp_path / "work"
    assert call["options"].deconvolution == "ssvd" and call["options"].bids_dir == ds.resolve()
    assert call["wf"].runs == [(None, None)]
    assert call["wf"].base_dir == str(tmp_path / "work")
    desc = json.loads((tmp_path / "derivs" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["DatasetLinks"]["raw"] == ds.resolve().as_uri()
    assert (tmp_path / "derivs" / ".bidsignore").is_file()
    stdout, stderr = capsys.readouterr()
    assert str(tmp_path / "derivs") in stdout and stderr == ""


def test_participant_run_multiproc_under_derivatives(ds, tmp_path, fake_wf):
    calls, _ = fake_wf
    out = ds / "derivatives" / "bids_ctp"
    assert main([str(ds), str(out), "participant", "--nprocs", "2", "-w", str(tmp_path / "w")]) == 0
    assert len(calls[0]["inputs"]) == 2
    assert calls[0]["wf"].runs == [("MultiProc", {"n_procs": 2})]
    assert (out / "dataset_description.json").is_file()


def test_workflow_failure(ds, tmp_path, capsys, fake_wf):
    fake_wf[1]["fail"] = True
    assert main([str(ds), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), "--nprocs", "1"]) == 1
    one_error_line(capsys, tmp_path / "w" / "crash")


def test_group_level(ds, tmp_path, capsys):
    assert main([str(ds), str(tmp_path / "out"), "group"]) == 0
    assert capsys.readouterr().out.strip() == GROUP_MESSAGE
    assert not (tmp_path / "out").exists()


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bids_ctp", str(tmp_path / "nope"), str(tmp_path / "o"),
                           "participant"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 66
    assert proc.stderr.strip() == f"bids_ctp: error: BIDS directory not found: {tmp_path / 'nope'}"


# ------------------------------------------------------------------------ execution plugins
@pytest.mark.parametrize("argv, words", [
    (["in", "out", "participant", "--plugin", "Torque"], ["--plugin", "Torque"]),
    (["in", "out", "participant", "--plugin-args", "{not json"], ["--plugin-args", "JSON"]),
    (["in", "out", "participant", "--plugin-args", "[1, 2]"], ["--plugin-args", "mapping"]),
    (["in", "out", "participant", "--plugin-args", "no_such_file.yml"], ["--plugin-args", "no_such_file.yml"]),
    (["in", "out", "participant", "--mem-gb", "0"], ["--mem-gb"]),
    (["in", "out", "participant", "--omp-nthreads", "0"], ["--omp-nthreads"]),
])
def test_bad_execution_options_exit_64(capsys, argv, words):
    assert main(argv) == 64
    one_error_line(capsys, *words)


def test_execution_defaults():
    args = build_parser().parse_args(["in", "out", "participant"])
    assert args.plugin is None and args.plugin_args is None and args.mem_gb is None and args.omp_nthreads is None


def test_plugin_args_json_and_yaml_files(tmp_path):
    (tmp_path / "a.json").write_text('{"sbatch_args": "-p short"}')
    (tmp_path / "a.yml").write_text("n_procs: 3\nmemory_gb: 2.5\n")
    parse = build_parser().parse_args
    assert parse(["i", "o", "participant", "--plugin-args", str(tmp_path / "a.json")]).plugin_args == {
        "sbatch_args": "-p short"}
    assert parse(["i", "o", "participant", "--plugin_args", str(tmp_path / "a.yml")]).plugin_args == {
        "n_procs": 3, "memory_gb": 2.5}


def _run_with(ds, tmp_path, fake_wf, *extra):
    calls, _ = fake_wf
    assert main([str(ds), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), *extra]) == 0
    (call,) = calls
    (run,) = call["wf"].runs
    return run, call["options"]


def test_multiproc_memory_and_threads(ds, tmp_path, fake_wf):
    run, options = _run_with(ds, tmp_path, fake_wf, "--nprocs", "4", "--mem-gb", "6", "--omp-nthreads", "2")
    assert run == ("MultiProc", {"n_procs": 4, "memory_gb": 6.0}) and options.omp_nthreads == 2


def test_omp_nthreads_default(ds, tmp_path, fake_wf):
    run, options = _run_with(ds, tmp_path, fake_wf, "--nprocs", "12")
    assert run == ("MultiProc", {"n_procs": 12}) and options.omp_nthreads == 8


def test_plugin_args_override_nprocs(ds, tmp_path, fake_wf):
    run, _ = _run_with(ds, tmp_path, fake_wf, "--plugin", "MultiProc", "--nprocs", "1",
                       "--plugin-args", '{"n_procs": 3, "raise_insufficient": false}')
    assert run == ("MultiProc", {"n_procs": 3, "raise_insufficient": False})


def test_omp_nthreads_above_multiproc_procs(ds, tmp_path, capsys, fake_wf):
    assert main([str(ds), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), "--nprocs", "2",
                 "--omp-nthreads", "4"]) == 64
    one_error_line(capsys, "--omp-nthreads")


def test_plugin_args_need_plugin(ds, tmp_path, capsys, fake_wf):
    assert main([str(ds), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 "--plugin-args", '{"n_procs": 2}']) == 64
    one_error_line(capsys, "--plugin")


def test_linear_plugin(ds, tmp_path, fake_wf):
    run, _ = _run_with(ds, tmp_path, fake_wf, "--plugin", "Linear", "--nprocs", "4")
    assert run == ("Linear", {})


def test_slurm_plugin_sets_logname_and_memory(ds, tmp_path, fake_wf, monkeypatch):
    monkeypatch.delenv("LOGNAME", raising=False)
    monkeypatch.delenv("USER", raising=False)
    run, _ = _run_with(ds, tmp_path, fake_wf, "--plugin", "SLURM", "--mem-gb", "1.5",
                       "--plugin-args", '{"sbatch_args": "-p short"}')
    assert run == ("SLURM", {"sbatch_args": "-p short --mem=1536M"})
    assert os.environ["LOGNAME"] and os.environ["USER"]
    assert main([str(ds), str(tmp_path / "out2"), "participant", "-w", str(tmp_path / "w2"), "--plugin", "SLURM",
                 "--mem-gb", "1.5", "--plugin-args", '{"sbatch_args": "--mem=4G"}']) == 0
    assert fake_wf[0][-1]["wf"].runs == [("SLURM", {"sbatch_args": "--mem=4G"})]


def test_workflow_threads_and_slurm_node_args(ds, tmp_path):
    from bids_ctp.bids import collect_inputs
    from bids_ctp.workflows.base import init_bids_ctp_wf

    inputs = collect_inputs(ds, participant_label=["01"])
    args = build_parser().parse_args([str(ds), str(tmp_path), "participant", "--nprocs", "6", "--omp-nthreads", "3",
                                      "--plugin", "SLURM"])
    wf = init_bids_ctp_wf(inputs, tmp_path / "out", tmp_path / "w", options=args)
    nodes = {n.name: n for n in wf._get_all_nodes()}
    assert nodes["smooth"].n_procs == 3 and nodes["smooth"].inputs.n_threads == 3
    assert nodes["curves"].n_procs == 1 and not nodes["curves"].plugin_args  # single-threaded
    assert nodes["motion"].plugin_args == {"sbatch_args": "--cpus-per-task=3", "overwrite": False}
    assert nodes["deconvolve"].n_procs == 3 and nodes["deconvolve"].inputs.n_threads == 3
    assert wf.config["execution"]["poll_sleep_duration"] == 0.5
    args.plugin, args.omp_nthreads = None, None
    wf = init_bids_ctp_wf(inputs, tmp_path / "out", tmp_path / "w", options=args)
    nodes = {n.name: n for n in wf._get_all_nodes()}
    assert nodes["smooth"].n_procs == 6 and not nodes["motion"].plugin_args
