"""The nipype workflow: one independent branch per CTP series, one node per stage.

    load -> motion -> smooth -> curves -> aif -> deconvolve -> maps -> write
                \\-> brain mask -----^

Intermediate images are uncompressed float32 NIfTI files in the work directory; nipype caches
every node there, so a rerun with the same inputs and options recomputes nothing.
"""
from __future__ import annotations

import dataclasses
import os
import re

from nipype.pipeline import engine as pe

from bids_ctp import __version__
from bids_ctp.cli.parser import CLUSTER_PLUGINS
from bids_ctp.interfaces.derivatives import WriteDerivatives
from bids_ctp.interfaces.perfusion import (BrainMask, Deconvolve, EnhancementCurves, LoadCTP,
                                           MotionCorrection, PerfusionMaps, SelectVessels,
                                           SmoothCTP)
from bids_ctp.perfusion.maps import DEFAULT_DENSITY, DEFAULT_KH


def init_bids_ctp_wf(inputs, output_dir, work_dir, options=None) -> pe.Workflow:
    """Top-level workflow over all selected CTP series (``list[CTPInput]``)."""
    # versioned name: a new release never reuses results cached by an older one
    wf = pe.Workflow(name=f"bids_ctp_{__version__.replace('.', '_')}_wf",
                     base_dir=os.fspath(work_dir))
    wf.config["execution"]["remove_unnecessary_outputs"] = False
    # nipype's default 2 s scheduler poll would dominate a run of a few seconds; a batch scheduler
    # is asked about every pending job at each poll, so it gets a gentler (still short) interval
    cluster = getattr(options, "plugin", None) in CLUSTER_PLUGINS
    wf.config["execution"]["poll_sleep_duration"] = 0.5 if cluster else 0.05
    for ctp_input in inputs:
        wf.add_nodes([init_ctp_wf(ctp_input, output_dir, options)])
    return wf


def omp_nthreads(options=None) -> int:
    """Threads per multithreaded node: ``--omp-nthreads``, else min(``--nprocs``, 8), else
    min(CPUs, 8)."""
    value = getattr(options, "omp_nthreads", None)
    if not value:
        value = min(int(getattr(options, "nprocs", None) or os.cpu_count() or 1), 8)
    return max(1, int(value))


def init_ctp_wf(ctp_input, output_dir, options=None) -> pe.Workflow:
    """Perfusion analysis of one 4D CTP series."""
    method = getattr(options, "deconvolution", "nlr")
    density = getattr(options, "density", DEFAULT_DENSITY)
    kh = getattr(options, "kh", DEFAULT_KH)
    threads = omp_nthreads(options)

    times = list(ctp_input.frame_times)
    wf = pe.Workflow(name=re.sub(r"\W", "_", ctp_input.name) + "_wf")
    load = pe.Node(LoadCTP(in_file=os.fspath(ctp_input.path), frame_times=times), name="load")
    moco = pe.Node(MotionCorrection(enabled=getattr(options, "motion_correction", True),
                                    n_threads=threads), name="motion", n_procs=threads)
    smooth = pe.Node(SmoothCTP(frame_times=times, n_threads=threads), name="smooth",
                     n_procs=threads)
    source = ctp_input.path.name  # named in data-error messages
    brain = pe.Node(BrainMask(source=source), name="brain_mask")
    if ctp_input.brain_mask is not None:
        brain.inputs.user_mask = os.fspath(ctp_input.brain_mask)
    enhancement = pe.Node(EnhancementCurves(frame_times=times, source=source), name="curves")
    aif = pe.Node(SelectVessels(frame_times=times, source=source,
                                vof_scaling=getattr(options, "vof_scaling", True)), name="aif")
    for kind in ("aif", "vof"):
        if getattr(ctp_input, f"{kind}_mask", None) is not None:
            setattr(aif.inputs, f"{kind}_mask", os.fspath(getattr(ctp_input, f"{kind}_mask")))
    deconvolve = pe.Node(Deconvolve(frame_times=times, method=method, source=source,
                                    n_threads=threads), name="deconvolve", n_procs=threads)
    if getattr(options, "plugin", None) in ("SLURM", "SLURMGraph") and threads > 1:
        for node in (moco, smooth, deconvolve):  # appended to the run's sbatch_args
            node.plugin_args = {"sbatch_args": f"--cpus-per-task={threads}", "overwrite": False}
    perfusion = pe.Node(PerfusionMaps(density=density, kh=kh), name="maps")
    fields = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
              for k, v in dataclasses.asdict(ctp_input).items()}
    write = pe.Node(WriteDerivatives(output_dir=os.fspath(output_dir), ctp_input=fields,
                                     method=method, density=density, kh=kh,
                                     user_mask=ctp_input.brain_mask is not None),
                    name="write", overwrite=True)  # always rewrite: outputs may have been removed

    wf.connect([
        (load, moco, [("out_file", "in_file")]),
        (load, write, [("intensity_scale", "intensity_scale"), ("qc_flags", "load_flags")]),
        (moco, smooth, [("out_file", "in_file"), ("noise_sd", "noise_sd"),
                        ("frame_noise_sd", "frame_noise_sd"),
                        ("noise_correlation", "noise_correlation")]),
        (moco, brain, [("mean_file", "mean_file")]),
        (moco, write, [("parameters", "motion_parameters"),
                       ("noise_correlation", "noise_correlation"),
                       ("framewise_displacement", "framewise_displacement"),
                       ("qc_flags", "motion_flags")]),
        (smooth, enhancement, [("out_file", "in_file")]),
        (brain, enhancement, [("out_mask", "mask")]),
        (smooth, aif, [("out_file", "in_file")]),
        (brain, aif, [("out_mask", "mask")]),
        (enhancement, aif, [("baseline", "baseline"), ("baseline_frames", "baseline_frames")]),
        (smooth, deconvolve, [("out_file", "in_file")]),
        (brain, deconvolve, [("out_mask", "mask")]),
        (enhancement, deconvolve, [("baseline", "baseline"), ("baseline_frames", "baseline_frames")]),
        (moco, deconvolve, [("parameters", "motion_parameters"), ("noise_sd", "noise_sd")]),
        (moco, aif, [("parameters", "motion_parameters")]),
        (moco, enhancement, [("parameters", "motion_parameters")]),
        (aif, deconvolve, [("aif", "aif")]),
        (deconvolve, perfusion, [("flow", "flow"), ("area", "area"), ("tmax", "tmax")]),
        (deconvolve, write, [("residue_shape", "residue_shape"),
                              ("residue_shape_scores", "residue_shape_scores")]),
        # nlr: TTP of the fitted curve; SVD methods: of the smoothed curve itself
        ((deconvolve if method == "nlr" else enhancement), perfusion, [("ttp", "ttp")]),
        (brain, perfusion, [("out_mask", "mask")]),
        (perfusion, write, [("cbf", "cbf"), ("cbv", "cbv"), ("mtt", "mtt"), ("tmax", "tmax"),
                            ("ttp", "ttp")]),
        (brain, write, [("out_mask", "brain_mask"), ("qc_flags", "mask_flags")]),
        (smooth, write, [("noise_sd", "noise_sd"), ("sigma_mm", "sigma_mm"),
                         ("guide_channels", "guide_channels")]),
        (enhancement, write, [("arrival_frame", "arrival_frame"),
                              ("baseline_frames", "baseline_frames"), ("qc_flags", "curve_flags")]),
        (aif, write, [("aif", "aif"), ("aif_measured", "aif_measured"), ("aif_info", "aif_info"),
                      ("aif_mask", "aif_mask"), ("vof", "vof"), ("vof_info", "vof_info"),
                      ("vof_mask", "vof_mask"), ("qc_flags", "vessel_flags")]),
    ])
    return wf
