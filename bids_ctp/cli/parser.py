"""Command line of bids_ctp (BIDS-Apps convention: ``bids_ctp bids_dir output_dir {participant,group}``)."""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from .. import __version__
from ..errors import EX_USAGE
from ..perfusion.deconvolution import METHODS

DESCRIPTION = """\
Quantitative CT perfusion maps (CBF, CBV, MTT, Tmax, TTP) from the 4D CT perfusion (CTP) series of a
BIDS(-like) dataset. Inputs: sub-<label>/[ses-<label>/][ct/]sub-<label>[_ses-<label>]..._ctp.nii[.gz]
(BEP024-style with a ct/ folder, or ISLES'24-style without one). Frame timing comes from the JSON sidecar
(FrameTimesStart, VolumeTiming or RepetitionTime) or else from --frame-interval."""

EPILOG = """\
exit codes: 0 success, 1 processing failed (see crash files), 64 bad command line,
65 unusable input data, 66 input not found, 73 cannot create output.

examples:
  bids_ctp /data/bids /data/bids/derivatives/bids_ctp participant --participant-label 01 02
  bids_ctp /data/isles24/raw_data /out participant --frame-interval 1.0"""


def _default_nprocs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


# nipype execution plugins (nipype.pipeline.plugins) that need nothing beyond nipype itself
PLUGINS = ("Linear", "MultiProc", "LegacyMultiProc", "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS",
           "PBSGraph", "LSF", "Condor", "CondorDAGMan", "OAR")
#: plugins that submit each node as a batch job: nodes run on other machines
CLUSTER_PLUGINS = frozenset(PLUGINS) - {"Linear", "MultiProc", "LegacyMultiProc"}


def _plugin_args(text: str) -> dict:
    """``--plugin-args``: a JSON object, or the path of a JSON or YAML file holding one."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at character {err.pos})") from None
        source = "the JSON text"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"n_procs\": 4}}' or the path of "
                                             f"a JSON/YAML file; no file {text!r}")
        try:
            content = path.read_text()
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {err.strerror or err}") from None
        source = str(path)
        if path.suffix.lower() in (".yml", ".yaml"):
            try:
                import yaml
            except ImportError:
                raise argparse.ArgumentTypeError(f"{path} is YAML but PyYAML is not installed; use JSON") from None
            try:
                value = yaml.safe_load(content)
            except yaml.YAMLError as err:
                raise argparse.ArgumentTypeError(f"{path} is not valid YAML: {err}") from None
        else:
            try:
                value = json.loads(content)
            except json.JSONDecodeError as err:
                raise argparse.ArgumentTypeError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{source} must hold a mapping (e.g. {{\"sbatch_args\": \"-p short\"}}), "
                                         f"not a {type(value).__name__}")
    return value


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit code 64 (EX_USAGE)."""

    def error(self, message):  # noqa: D401 - argparse API
        message = " ".join(str(message).split())
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bids_ctp", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path,
                        help="root of the input dataset (the folder holding the sub-<label> folders); "
                             "it is only read, never written")
    parser.add_argument("output_dir", type=Path,
                        help="root of the derivatives dataset to write (created if missing), e.g. "
                             "<bids_dir>/derivatives/bids_ctp; must not be inside bids_dir except under "
                             "<bids_dir>/derivatives/")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="'participant' computes the maps of the selected participants; 'group' has "
                             "nothing to do yet")

    sel = parser.add_argument_group("selecting inputs")
    sel.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+",
                     metavar="LABEL",
                     help="participant label(s) to process, with or without 'sub-' (default: all participants "
                          "with a CTP series)")
    sel.add_argument("--session-label", "--session_label", dest="session_label", nargs="+", metavar="LABEL",
                     help="session label(s) to process, with or without 'ses-' (default: all sessions)")
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation", "--skip_bids_validator",
                     dest="skip_bids_validation", action="store_true",
                     help="accepted for BIDS-Apps compatibility; has no effect: CT is not part of BIDS yet, so "
                          "the BIDS validator is never run")

    timing = parser.add_argument_group("timing and masks")
    timing.add_argument("--frame-interval", "--frame_interval", dest="frame_interval", type=_positive_float,
                        metavar="SECONDS",
                        help="time between consecutive CTP frames, in seconds (> 0); used only for series whose "
                             "JSON sidecar has no FrameTimesStart, VolumeTiming or RepetitionTime (e.g. "
                             "ISLES'24). The NIfTI header's pixdim[4] is never used silently")
    timing.add_argument("--brain-mask", "--brain_mask", dest="brain_mask", metavar="PATH",
                        help="brain mask (NIfTI, non-zero = brain) on the CTP grid, used instead of the automatic "
                             "one. May contain {subject} and {session} placeholders (labels without prefix), "
                             "e.g. masks/sub-{subject}_ses-{session}_mask.nii.gz; without a placeholder it is "
                             "only allowed when a single CTP series is selected")

    for kind, what in (("aif", "arterial input function (voxels in a large artery)"),
                       ("vof", "venous output function (voxels in a large venous sinus)")):
        timing.add_argument(f"--{kind}-mask", f"--{kind}_mask", dest=f"{kind}_mask", metavar="PATH",
                            help=f"mask (NIfTI, non-zero = selected) on the CTP grid whose voxels are "
                                 f"averaged into the {what}, instead of the automatic choice; "
                                 "placeholders as for --brain-mask")
    model = parser.add_argument_group("perfusion model")
    model.add_argument("--deconvolution", choices=METHODS, default=METHODS[0],
                       help="deconvolution of tissue curves by the arterial input function: 'nlr' = "
                            "least-squares fit of the delayed indicator-dilution model (residue "
                            "family chosen per scan: exponential, gamma2, gamma3, gamma4, gamma6, "
                            "box or linear; fits the bolus delay, so insensitive to it, and unbiased where "
                            "SVD is not); 'csvd' = block-circulant truncated SVD (threshold 10 %%), "
                            "insensitive to bolus delay; 'ssvd' = standard truncated SVD (threshold "
                            "20 %%), biased by bolus delay; 'osvd' = block-circulant SVD with a "
                            "per-voxel threshold from the oscillation index (Wu 2003); 'tikhonov' = "
                            "block-circulant Tikhonov regularisation (mu 0.07) (default: %(default)s)")
    model.add_argument("--no-motion-correction", "--no_motion_correction",
                       dest="motion_correction", action="store_false",
                       help="do not register the frames rigidly to the first one (motion "
                            "correction is on by default; a still series costs about 0.5 s)")
    model.add_argument("--no-vof-scaling", "--no_vof_scaling", dest="vof_scaling",
                       action="store_false",
                       help="do not scale the AIF so that its area equals the venous output "
                            "function's (the scaling corrects partial volume in the artery; it is "
                            "never applied to make the AIF smaller)")
    model.add_argument("--density", type=_positive_float, default=1.05, metavar="G_PER_ML",
                       help="brain tissue density in g/mL, converts CBF/CBV to per-100-g units "
                            "(default: %(default)s)")
    model.add_argument("--kh", type=_fraction, default=0.73, metavar="FACTOR",
                       help="hematocrit correction factor (1 - Hct_large) / (1 - Hct_small), unitless, in (0, 1] "
                            "(default: %(default)s)")

    run = parser.add_argument_group("execution")
    run.add_argument("-w", "--work-dir", "--work_dir", dest="work_dir", type=Path,
                     default=Path(tempfile.gettempdir()) / f"bids_ctp_work-{os.getuid()}", metavar="PATH",
                     help="folder for intermediate files (nipype working directory; outside bids_dir); keep it to resume a run "
                          "(default: %(default)s, one per user so a shared /tmp works)")
    run.add_argument("--nprocs", "--n-procs", "--n_procs", dest="nprocs", type=_positive_int,
                     default=_default_nprocs(), metavar="N",
                     help="number of processes to run in parallel, >= 1 (default: the CPUs available, "
                          "%(default)s)")
    run.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=_positive_int,
                     metavar="N",
                     help="threads used by each multithreaded step (motion correction, smoothing), >= 1; "
                          "with a cluster plugin also the CPUs requested for those jobs (SLURM: "
                          "--cpus-per-task) (default: min(--nprocs, 8))")
    run.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=_positive_float, metavar="GB",
                     help="memory in GB: the limit MultiProc schedules within (its memory_gb), or with "
                          "SLURM the memory requested per job (sbatch --mem, unless --plugin-args sets "
                          "--mem); other cluster plugins: pass it in --plugin-args (default: no limit)")
    run.add_argument("--plugin", choices=PLUGINS, metavar="{" + ",".join(PLUGINS) + "}",
                     help="nipype execution plugin. Linear runs the steps one after the other; MultiProc "
                          "runs independent series (participants, sessions, runs) in parallel on this "
                          "machine; SLURM, SGE, PBS, LSF, ... submit every step as a batch job, so a "
                          "cluster runs the series in parallel; the work directory (-w) and the Python "
                          "running bids_ctp must then be visible on the compute nodes (default: "
                          "MultiProc when --nprocs > 1 and several series are selected, else Linear)")
    run.add_argument("--plugin-args", "--plugin_args", dest="plugin_args", type=_plugin_args,
                     metavar="JSON|FILE",
                     help="arguments of the plugin: a JSON object, or a JSON or YAML file holding one, e.g. "
                          "'{\"sbatch_args\": \"-p short --time=01:00:00\"}' for SLURM or "
                          "'{\"n_procs\": 4, \"memory_gb\": 8}' for MultiProc (see nipype's plugin "
                          "documentation; --nprocs and --mem-gb fill in what this leaves out)")
    run.add_argument("-v", "--verbose", action="count", default=0,
                     help="more log messages: -v for INFO, -vv for DEBUG (default: warnings only)")
    run.add_argument("--version", action="version", version=f"bids_ctp {__version__}",
                     help="print the version and exit")
    return parser

