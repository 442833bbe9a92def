"""Entry point of the ``bids_ctp`` command (console script ``bids_ctp = bids_ctp.cli.run:main``)."""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from ..errors import BidsCtpError, InputMissingError, OutputError, UsageError, one_line
from .parser import CLUSTER_PLUGINS, build_parser

LOGGER = logging.getLogger("bids_ctp")
GROUP_MESSAGE = "bids_ctp: group level has nothing to do yet (no group outputs in this version)"


class _StderrHandler(logging.StreamHandler):
    """Always writes to the *current* ``sys.stderr`` (so redirections and pytest's capsys work)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _level(verbose: int) -> int:
    return logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG


def _setup_logging(verbose: int) -> None:
    if not any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("bids_ctp: %(levelname)s: %(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(_level(verbose))


def _setup_nipype(verbose: int, crashdump_dir: Path) -> None:
    """Silence nipype by default (its node errors carry tracebacks; we print one line per error from
    the crash files instead), INFO with -v, DEBUG with -vv; no network check; crash files go to
    ``crashdump_dir`` (nipype's default is the current directory, which could be inside bids_dir)."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    from nipype import config as ncfg
    from nipype import logging as nlogging

    level = logging.getLevelName(_level(verbose)) if verbose else "CRITICAL"
    for key in ("workflow_level", "interface_level", "utils_level"):
        ncfg.set("logging", key, level)
    ncfg.set("execution", "crashdump_dir", str(crashdump_dir))
    nlogging.update_logging(ncfg)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_location(kind: str, path: Path, bids_dir: Path) -> None:
    """Nothing is ever written into bids_dir, except under <bids_dir>/derivatives/."""
    if _inside(path, bids_dir) and (bids_dir / "derivatives") not in path.parents:
        raise UsageError(f"{kind} {path} is inside the input dataset {bids_dir}; use a folder outside it or "
                         f"under {bids_dir / 'derivatives'}/ (e.g. {bids_dir / 'derivatives' / 'bids_ctp'})")


def _make_dir(kind: str, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {kind} {path}: {err.strerror or err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {kind} {path}: permission denied")


def _run(args) -> int:
    bids_dir = Path(args.bids_dir).expanduser()
    if not bids_dir.exists():
        raise InputMissingError(f"BIDS directory not found: {bids_dir}")
    if not bids_dir.is_dir():
        raise InputMissingError(f"BIDS directory is not a directory: {bids_dir}")
    bids_dir = bids_dir.resolve()
    output_dir = Path(args.output_dir).expanduser().resolve()
    work_dir = Path(args.work_dir).expanduser().resolve()
    _check_location("output_dir", output_dir, bids_dir)
    _check_location("work directory", work_dir, bids_dir)
    args.bids_dir, args.output_dir, args.work_dir = bids_dir, output_dir, work_dir

    if args.analysis_level == "group":
        print(GROUP_MESSAGE)
        return 0

    from ..bids import collect_inputs
    from ..derivatives import write_dataset_description

    # All validation happens here, before anything is written. A series that fails its checks
    # is reported at the end; the others are processed.
    failures = []
    inputs = collect_inputs(bids_dir, participant_label=args.participant_label,
                            session_label=args.session_label, frame_interval=args.frame_interval,
                            brain_mask=args.brain_mask, aif_mask=args.aif_mask,
                            vof_mask=args.vof_mask, failures=failures)
    errors = [(err.exit_code, str(err)) for err in failures]
    if not inputs:
        return _report(errors, 0, len(failures), output_dir)
    LOGGER.info("%d CTP series selected: %s", len(inputs), ", ".join(i.name for i in inputs))

    _make_dir("output directory", output_dir)
    _make_dir("work directory", work_dir)
    write_dataset_description(output_dir, bids_dir)

    plugin, plugin_args = _execution(args, len(inputs))
    crash_dir = work_dir / "crash"
    _setup_nipype(args.verbose, crash_dir)
    from ..workflows.base import init_bids_ctp_wf

    # the workflow copies nipype's global config (crash dir set above) when it is created
    wf = init_bids_ctp_wf(inputs, output_dir=output_dir, work_dir=work_dir, options=args)
    if getattr(wf, "base_dir", None) is None:
        wf.base_dir = str(work_dir)
    old_crashes = set(crash_dir.glob("crash-*"))
    try:
        if plugin is None:
            wf.run()
        else:
            wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:
        LOGGER.debug("workflow failure: %s", err)
        node_errors = _node_errors(set(crash_dir.glob("crash-*")) - old_crashes)
        if node_errors:
            n_done = max(0, len(inputs) - len(node_errors))
        else:  # not one of our errors: a bug; which series finished is unknown
            node_errors = [(1, f"processing failed; see the crash files in {crash_dir} "
                               "(open them with: nipypecli crash <file>)")]
            n_done = 0
        errors += node_errors
    else:
        n_done = len(inputs)
    return _report(errors, n_done, len(inputs) + len(failures), output_dir)


def _report(errors, n_done: int, n_total: int, output_dir: Path) -> int:
    """One line per failed series, a summary when some succeeded; the exit code."""
    for _, message in errors:
        print(f"bids_ctp: error: {message}", file=sys.stderr)
    if not errors:
        print(f"bids_ctp: derivatives of {n_done} CTP series are in {output_dir}")
        return 0
    if n_done:
        print(f"bids_ctp: {n_done} of {n_total} CTP series done (derivatives in {output_dir}); "
              f"{n_total - n_done} failed, listed above", file=sys.stderr)
    return max(code for code, _ in errors)


def _execution(args, n_series: int):
    """The nipype plugin and its arguments from --plugin, --plugin-args, --nprocs, --mem-gb and
    --omp-nthreads; ``(None, None)`` runs the workflow in this process (nipype's Linear).

    Also fills in ``args.omp_nthreads`` (default min(nprocs, 8)), which the workflow reads."""
    if args.omp_nthreads is None:
        args.omp_nthreads = min(args.nprocs, 8)
    plugin = args.plugin
    plugin_args = dict(args.plugin_args or {})
    if plugin is None:
        if plugin_args:
            raise UsageError("--plugin-args needs --plugin (e.g. --plugin MultiProc or --plugin SLURM)")
        # Series are independent branches; with a single series the chain is sequential and
        # MultiProc would only add scheduling overhead (the smoothing node is multithreaded).
        plugin = "MultiProc" if args.nprocs > 1 and n_series > 1 else None
        if plugin is None and args.mem_gb is None:
            return None, None
        plugin = plugin or "Linear"
    if plugin in ("MultiProc", "LegacyMultiProc"):
        plugin_args.setdefault("n_procs", args.nprocs)
        if args.mem_gb is not None:
            plugin_args.setdefault("memory_gb", args.mem_gb)
        n_procs = plugin_args["n_procs"]
        if isinstance(n_procs, int) and args.omp_nthreads > n_procs:
            raise UsageError(f"--omp-nthreads {args.omp_nthreads} is more than the {n_procs} processes "
                             f"{plugin} may use (--nprocs or n_procs in --plugin-args)")
    elif plugin in ("SLURM", "SLURMGraph"):
        sbatch_args = str(plugin_args.get("sbatch_args", ""))
        if args.mem_gb is not None and "--mem" not in sbatch_args:
            sbatch_args = f"{sbatch_args} --mem={max(1, math.ceil(args.mem_gb * 1024))}M".strip()
        if sbatch_args:
            plugin_args["sbatch_args"] = sbatch_args
    if plugin in CLUSTER_PLUGINS:
        # nipype's batch plugins name jobs after $LOGNAME (KeyError without it, e.g. in containers,
        # cron jobs or `su -c`); the jobs run this very interpreter (sys.executable), so the
        # environment bids_ctp runs in must be visible on the compute nodes.
        user = os.environ.get("LOGNAME") or os.environ.get("USER") or _user_name()
        os.environ.setdefault("LOGNAME", user)
        os.environ.setdefault("USER", user)
        if _inside(args.work_dir, Path(tempfile.gettempdir()).resolve()):
            LOGGER.warning("work directory %s is in the temporary folder; with --plugin %s it must be "
                           "visible on every compute node (use -w on a shared filesystem)",
                           args.work_dir, plugin)
        LOGGER.info("submitting the steps with nipype's %s plugin (jobs run %s)", plugin, sys.executable)
    if plugin == "Linear":
        plugin_args = {}
    return plugin, plugin_args


def _user_name() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no passwd entry for this uid (e.g. docker run -u 4242)
        return f"uid{os.getuid()}"


def _node_errors(crash_files) -> list[tuple[int, str]]:
    """(exit code, message) of our errors raised inside workflow nodes, from nipype crash files.

    Only bids_ctp's own error classes count (data, output, ...); anything else is a bug and
    gets the generic message pointing at the crash files.
    """
    from nipype.utils.filemanip import loadcrash

    from .. import errors

    codes = {f"{errors.__name__}.{cls.__name__}: ": cls.exit_code
             for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.BidsCtpError)}
    found = []
    for crash in sorted(crash_files):
        try:
            lines = "".join(loadcrash(str(crash))["traceback"]).strip().splitlines()
        except Exception:  # an unreadable crash file: fall back to the generic message
            continue
        hits = [(code, line.split(marker, 1)[1]) for line in lines
                for marker, code in codes.items() if marker in line]
        if hits:
            found.append(hits[-1])
    return found


def main(argv=None) -> int:
    """Run bids_ctp; returns the exit code (0 ok, 1 processing failed, 64/65/66/73 see errors.py)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and argument errors (64)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    _setup_logging(args.verbose)
    try:
        return _run(args)
    except BidsCtpError as err:
        print(f"bids_ctp: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("bids_ctp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
