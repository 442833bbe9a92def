"""Write one CTP series' results as BIDS-Derivatives (gzip NIfTI + JSON sidecars, atomically)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from bids_ctp import derivatives
from bids_ctp.inputs import CTPInput
from bids_ctp.perfusion import motion, preprocess
from bids_ctp.perfusion.maps import DESCRIPTIONS, UNITS

MAP_NAMES = tuple(UNITS)


class _WriterInput(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    ctp_input = traits.Dict(mandatory=True, desc="CTPInput fields")
    method = traits.Str(mandatory=True)
    residue_shape = traits.Str(mandatory=True)
    residue_shape_scores = traits.Dict(desc="family -> score; empty for model-free methods")
    density = traits.Float(mandatory=True)
    kh = traits.Float(mandatory=True)
    noise_sd = traits.Float(mandatory=True)
    noise_correlation = traits.List(traits.Float, [0.0, 0.0, 0.0], usedefault=True)
    sigma_mm = traits.Float(mandatory=True)
    guide_channels = traits.Int(mandatory=True)
    arrival_frame = traits.Int(mandatory=True)
    baseline_frames = traits.Int(mandatory=True)
    aif = traits.List(traits.Float, mandatory=True)
    aif_measured = traits.List(traits.Float, mandatory=True)
    aif_info = traits.Dict(mandatory=True)
    aif_mask = File(exists=True, mandatory=True)
    vof = traits.List(traits.Float, mandatory=True)
    motion_parameters = traits.List(traits.List(traits.Float), mandatory=True)
    framewise_displacement = traits.List(traits.Float, mandatory=True)
    intensity_scale = traits.Float(1.0, usedefault=True, desc="factor applied to a series "
                                   "not in HU before processing")
    load_flags = traits.List(traits.Str, desc="problems found loading the series")
    motion_flags = traits.List(traits.Str, desc="problems found by motion correction")
    mask_flags = traits.List(traits.Str, desc="problems found making the brain mask")
    curve_flags = traits.List(traits.Str, desc="problems found in the enhancement curves")
    vessel_flags = traits.List(traits.Str, desc="problems found with the AIF and VOF")
    vof_info = traits.Dict(mandatory=True)
    vof_mask = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    user_mask = traits.Bool(False, usedefault=True)
    cbf = File(exists=True, mandatory=True)
    cbv = File(exists=True, mandatory=True)
    mtt = File(exists=True, mandatory=True)
    tmax = File(exists=True, mandatory=True)
    ttp = File(exists=True, mandatory=True)


class _WriterOutput(TraitedSpec):
    out_files = traits.List(File(exists=True))


class WriteDerivatives(SimpleInterface):
    input_spec = _WriterInput
    output_spec = _WriterOutput

    def _run_interface(self, runtime):
        # Everything is written into a hidden staging folder first and moved into place only
        # when all files are complete, so a failure (e.g. disk full) leaves no partial set.
        staging = Path(tempfile.mkdtemp(prefix=".bids_ctp-staging-", dir=self.inputs.output_dir))
        try:
            self._write_all(staging)
            final = []
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                target = Path(self.inputs.output_dir) / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                final.append(str(target))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._results["out_files"] = final
        return runtime

    def _write_all(self, root: Path) -> None:
        """Write every output under ``root`` (BIDS-Derivatives layout)."""
        inp = self.inputs
        ctp = CTPInput(**inp.ctp_input)
        source = f"bids:raw:{ctp.relpath}"
        times = [float(t) for t in ctp.frame_times]
        common = {
            "Sources": [source],
            "SkullStripped": True,
            "DeconvolutionMethod": inp.method, "ResidueShape": inp.residue_shape,
            "TissueDensity": inp.density, "TissueDensityUnits": "g/mL",
            "HematocritFactor": inp.kh,
            "FrameTimesStart": times, "FrameTimingSource": ctp.timing_source,
            "BolusArrivalFrame": inp.arrival_frame,
            "BaselineFrames": list(range(inp.baseline_frames)),
            "EstimatedNoiseSD": round(inp.noise_sd, 3), "EstimatedNoiseSDUnits": "HU",
            # neighbour correlation of that noise along x, y, z (0: white); the smoothing's
            # size and weights count it
            "EstimatedNoiseCorrelation": [round(r, 3) for r in inp.noise_correlation],
            "SmoothingFilter": ("cross-bilateral with adaptive weights (propagation-separation), "
                                "guided by each curve's components along " + (
                                    "a constant, the median bolus and that bolus delayed"
                                    if inp.guide_channels > 1 else
                                    "a constant (no bolus stood out of the noise)")
                                + ", in noise units"),
            "SmoothingGuideChannels": inp.guide_channels,
            **({"SmoothingGuideBolusDelay": preprocess.GUIDE_DELAY_S,
                "SmoothingGuideBolusDelayUnits": "s"} if inp.guide_channels > 1 else {}),
            "SmoothingSigma": round(inp.sigma_mm, 3), "SmoothingSigmaUnits": "mm",
            "ValuesOutsideBrain": 0,
            # not BIDS "TimeZero" (a clock time in PET-BIDS): the origin of TTP and AIF times
            "TimeOrigin": "start of the first frame (FrameTimesStart[0])",
        }
        if inp.intensity_scale != 1.0:
            common["IntensityScale"] = inp.intensity_scale
            common["IntensityScaleDescription"] = (
                "the series was not in HU (no skull; its strongest enhancement outside a CT "
                "artery's range) and was multiplied by this factor before processing: noise, "
                "AIF and VOF are in input units x IntensityScale; CBF, CBV, MTT do not depend "
                "on it")
        fd = np.asarray(inp.framewise_displacement, float)
        flags = [flag for trait in ("load_flags", "motion_flags", "mask_flags", "curve_flags",
                                    "vessel_flags")
                 if isdefined(getattr(inp, trait)) for flag in getattr(inp, trait)]
        if motion.motion_qc_flag(fd):
            flags.append(f"motion: framewise displacement up to {fd.max():.2f} mm "
                         f"(threshold {motion.MOTION_FD_THRESHOLD_MM} mm)")
        common["QualityFlags"] = flags
        if isdefined(inp.residue_shape_scores) and inp.residue_shape_scores:
            # mean log-likelihood per tissue curve relative to its best family (a small
            # margin is no measure of a wrong choice: deconvolution.select_residue_shape)
            common["ResidueShapeScores"] = {k: round(v, 3)
                                            for k, v in inp.residue_shape_scores.items()}

        def save(src, suffix, desc, sidecar, dtype=np.float32):
            path = derivatives.output_path(root, ctp, suffix, desc)
            img = nb.load(src)
            data = np.asarray(img.dataobj, dtype=dtype)
            new = nb.Nifti1Image(data, img.affine, img.header)
            new.header.set_data_dtype(dtype)
            derivatives.save_nifti(new, path)
            derivatives.write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)

        for name in MAP_NAMES:
            save(getattr(inp, name), name, inp.method,
                 {"Description": DESCRIPTIONS[name], "Units": UNITS[name], **common})
        save(inp.brain_mask, "mask", "brain",
             {"Type": "Brain", "Sources": [source],
              "Description": "user-supplied brain mask" if inp.user_mask
              else "automatic brain mask (intracranial soft tissue)"}, np.uint8)
        vessels = {
            "aif": ("arterial input function", {"enhancement": inp.aif,
                                                "measured": inp.aif_measured}, inp.aif_info),
            "vof": ("venous output function", {"enhancement": inp.vof}, inp.vof_info),
        }
        for kind, (what, columns, info) in vessels.items():
            if not columns["enhancement"]:  # no VOF found
                continue
            save(getattr(inp, f"{kind}_mask"), "mask", kind,
                 {"Type": "ROI", "Sources": [source],
                  "Description": f"voxels averaged into the {what}"}, np.uint8)
            tsv = derivatives.output_path(root, ctp, kind, inp.method, ".tsv")
            rows = "".join("\t".join(f"{v:.4f}" for v in row) + "\n"
                           for row in zip(times, *columns.values()))
            derivatives.write_text(tsv, "\t".join(["time", *columns]) + "\n" + rows)
            derivatives.write_json(tsv.with_suffix(".json"), {
                "Description": f"{what[0].upper()}{what[1:]}: mean enhancement of its voxels",
                "time": {"Description": "frame start time", "Units": "s"},
                "enhancement": {"Description": "HU above the pre-bolus baseline, as used "
                                "(the AIF after VOF scaling)", "Units": "HU"},
                **({"measured": {"Description": "AIF before VOF scaling", "Units": "HU"}}
                   if "measured" in columns else {}),
                "Sources": [source], **info, "QualityFlags": flags,
            })
        tsv = derivatives.output_path(root, ctp, "timeseries", "motion", ".tsv")
        names = (*motion.PARAMETER_NAMES, "framewise_displacement")
        rows = "".join("\t".join(f"{v:.6f}" for v in (*p, d)) + "\n"
                       for p, d in zip(inp.motion_parameters, fd))
        derivatives.write_text(tsv, "\t".join(names) + "\n" + rows)
        derivatives.write_json(tsv.with_suffix(".json"), {
            "Description": "Rigid head motion per frame, relative to the first frame "
                           "(all zero when motion correction was switched off)",
            **{n: {"Units": "rad"} for n in names[:3]}, **{n: {"Units": "mm"} for n in names[3:6]},
            "framewise_displacement": {
                "Description": "Power et al. 2012, relative to the previous frame, rotations as "
                               f"arc length on a {motion.FD_RADIUS_MM:.0f} mm sphere",
                "Units": "mm"},
            "FDThreshold": motion.MOTION_FD_THRESHOLD_MM, "QualityFlags": flags,
            "Sources": [source]})

