"""Thin nipype interfaces, one per stage: load inputs, call ``bids_ctp.perfusion``, save outputs."""
from __future__ import annotations

import os
import warnings

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from bids_ctp.errors import DataError, one_line
from bids_ctp.inputs import MIN_FRAMES
from bids_ctp.interfaces import images
from bids_ctp.perfusion import aif as aif_stage
from bids_ctp.perfusion import curves, deconvolution, maps, mask, motion, preprocess

MIN_SLICES_FOR_MOTION = 3
# Largest |value| accepted from a CTP series: CT is about -1024...30000 HU; beyond this the scaling
# (scl_slope/scl_inter) is wrong or the image is not in HU, and float32 sums would overflow later.
MAX_ABS_HU = 1e5


class _LoadInput(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="4D CTP NIfTI (HU)")
    frame_times = traits.List(traits.Float, mandatory=True, desc="frame start times (s)")


class _LoadOutput(TraitedSpec):
    out_file = File(exists=True, desc="4D float32 HU, uncompressed")
    intensity_scale = traits.Float(desc="factor applied to a series not in HU (1 for CT)")
    qc_flags = traits.List(traits.Str, desc="problems to show in sidecars and reports")


class LoadCTP(SimpleInterface):
    """Check the 4D series against its timing and convert it to float32 HU."""

    input_spec = _LoadInput
    output_spec = _LoadOutput

    def _run_interface(self, runtime):
        name = os.path.basename(self.inputs.in_file)
        # the header checks of bids.collect_inputs again (cheap), for files that bypassed it
        try:
            info = images.check_ctp_header(self.inputs.in_file, MIN_FRAMES)
        except DataError as err:
            raise DataError(f"{name}: {err}") from None
        except Exception as err:  # never a traceback for a broken file
            raise DataError(f"{name}: cannot read the NIfTI header ({one_line(err)})") from None
        n_times = len(self.inputs.frame_times)
        if info.shape[3] != n_times:
            raise DataError(f"{name}: {info.shape[3]} frames but {n_times} frame times")
        # frame by frame into the output file: a whole-brain series is never in memory twice
        data = images.create_like(self.inputs.in_file, "ctp_hu.nii", info.shape)
        low, high, n_bad, first_bad = np.inf, -np.inf, 0, None
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")  # numpy/nibabel overflow warnings would be extra stderr lines
                for t, frame in enumerate(images.read_frames(self.inputs.in_file)):
                    # integer voxels are finite: the header check bounds their scaling within
                    # float32; float data (or float scaling of it) needs the full scan
                    if np.issubdtype(info.dtype, np.floating):
                        bad = ~np.isfinite(frame)
                        if bad.any():
                            n_bad += int(bad.sum())
                            first_bad = first_bad or (*np.argwhere(bad)[0].tolist(), t)
                            continue
                    data[..., t] = frame
                    low, high = min(low, float(frame.min())), max(high, float(frame.max()))
        except MemoryError:
            raise DataError(f"{name}: too large to load (shape {info.shape})") from None
        except images.CORRUPT_DATA_ERRORS as err:
            raise DataError(f"{name}: truncated or corrupt data ({one_line(err)})") from None
        except Exception as err:  # corrupt or truncated file: report it, never a traceback
            raise DataError(f"{name}: cannot read the image data ({one_line(err)})") from None
        if n_bad:
            scaled = info.slope != 1.0 or info.inter != 0.0
            raise DataError(f"{name}: {n_bad} voxel value(s) are NaN or infinite"
                            f"{' after scaling (scl_slope/scl_inter)' if scaled else ''} "
                            f"(first at voxel {first_bad[:3]}, frame {first_bad[3]})")
        if max(-low, high) > MAX_ABS_HU:
            raise DataError(f"{name}: values from {low:.6g} to {high:.6g} are not Hounsfield units (|HU| <= "
                            f"{MAX_ABS_HU:g}); check the scaling (scl_slope {info.slope:g}, scl_inter "
                            f"{info.inter:g})")
        scale, flags = 1.0, []
        if low >= 0 and curves.is_signal_drop(data, preprocess.estimate_noise(data)):
            data[...] = curves.signal_to_concentration(data)
            flags.append("intensities: no negative values and a signal that drops with the "
                         "bolus, taken as MR (DSC) signal S(t) and converted to -ln(S(t)/S0)")
        if not mask.has_skull(data[..., 0], images.spacing(self.inputs.in_file)):
            scale = curves.intensity_scale(data, preprocess.estimate_noise(data))
        if scale != 1.0:
            data *= np.float32(scale)
            flags.append(f"intensities: no skull and a strongest enhancement of "
                         f"{curves.NOMINAL_PEAK_HU / scale:.4g}, not HU; scaled by {scale:.4g} "
                         "(CBF, CBV and MTT do not depend on the scale)")
        self._results["intensity_scale"], self._results["qc_flags"] = scale, flags
        data.flush()
        self._results["out_file"] = data.filename
        return runtime


class _MotionInput(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="4D float32 HU")
    enabled = traits.Bool(True, usedefault=True, desc="False: pass the series through")
    n_threads = traits.Int(1, usedefault=True)


class _MotionOutput(TraitedSpec):
    out_file = File(exists=True, desc="motion-corrected 4D (the input when disabled)")
    mean_file = File(exists=True, desc="time average of the corrected series")
    parameters = traits.List(traits.List(traits.Float), desc="per frame: rotations (rad), "
                             "translations (mm) mapping the reference onto the frame")
    framewise_displacement = traits.List(traits.Float, desc="mm, relative to previous frame")
    qc_flags = traits.List(traits.Str, desc="problems to show in sidecars and reports")
    noise_sd = traits.Float(desc="noise SD (HU) in soft tissue of the series as acquired")
    frame_noise_sd = traits.List(traits.Float, desc="the same per frame (HU)")
    noise_correlation = traits.List(traits.Float, desc="neighbour correlation of that noise "
                                    "along x, y, z")


class MotionCorrection(SimpleInterface):
    """Rigid registration of every frame to the first (SimpleITK), framewise displacement."""

    input_spec = _MotionInput
    output_spec = _MotionOutput

    def _run_interface(self, runtime):
        data = images.load(self.inputs.in_file)
        flags = []
        spacing = images.spacing(self.inputs.in_file)
        if self.inputs.enabled and min(data.shape[:3]) < MIN_SLICES_FOR_MOTION:
            flags.append(f"motion correction skipped: {min(data.shape[:3])} slice(s) cannot "
                         "constrain a 3D rigid registration")
        elif self.inputs.enabled and not mask.has_skull(data[..., 0], spacing):
            # without a skull the only structure is enhancing tissue, so the bolus itself
            # would drive the registration (0.6 mm of invented motion on a still test object)
            flags.append("motion correction skipped: no skull in the first frame "
                         f"(< {mask.MIN_SKULL_ML:g} mL of bone) to register on")
        # noise of the series as acquired: after correction its voxels understate it
        noise_sd, frame_sd = preprocess.frame_noise(data)
        self._results["noise_sd"], self._results["frame_noise_sd"] = noise_sd, frame_sd.tolist()
        self._results["noise_correlation"] = list(preprocess.noise_correlation(data))
        if self.inputs.enabled and not flags:
            corrected = images.create_like(self.inputs.in_file, "ctp_moco.nii", data.shape)
            result = motion.correct_motion(data, spacing, n_threads=self.inputs.n_threads,
                                           out=corrected)
            data = result.corrected
            data.flush()
            self._results["out_file"] = data.filename
            parameters, fd = result.parameters, result.framewise_displacement
        else:
            self._results["out_file"] = self.inputs.in_file
            parameters = np.zeros((data.shape[3], len(motion.PARAMETER_NAMES)))
            fd = np.zeros(data.shape[3])
        self._results["mean_file"] = images.save_like(data.mean(axis=3), self.inputs.in_file,
                                                      "ctp_mean.nii")
        self._results["parameters"] = np.asarray(parameters, float).tolist()
        self._results["framewise_displacement"] = np.asarray(fd, float).tolist()
        self._results["qc_flags"] = flags
        return runtime


class _SmoothInput(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    noise_sd = traits.Float(requires=["frame_noise_sd"],
                            desc="noise SD (HU) of the series as acquired; default: of in_file")
    frame_noise_sd = traits.List(traits.Float, desc="the same per frame (HU)")
    noise_correlation = traits.List(traits.Float, [0.0, 0.0, 0.0], usedefault=True,
                                    desc="neighbour correlation of the noise along x, y, z")
    sigma_mm = traits.Float(desc="spatial sigma (mm); default: adapted to the noise")
    frame_times = traits.List(traits.Float, desc="frame start times (s): the guide's bolus "
                              "timing channel; default 1 s apart")
    n_threads = traits.Int(1, usedefault=True)


class _SmoothOutput(TraitedSpec):
    out_file = File(exists=True)
    noise_sd = traits.Float(desc="estimated per-frame noise SD in soft tissue (HU)")
    sigma_mm = traits.Float(desc="spatial sigma used (mm)")
    guide_channels = traits.Int(desc="channels of the smoothing guide (preprocess."
                                "guide_channels): 1 when no bolus stands out of the noise")


class SmoothCTP(SimpleInterface):
    """Edge-preserving cross-bilateral smoothing (spatial sigma in mm)."""

    input_spec = _SmoothInput
    output_spec = _SmoothOutput

    def _run_interface(self, runtime):
        data = images.load(self.inputs.in_file)
        if isdefined(self.inputs.noise_sd):
            noise, frame_sd = self.inputs.noise_sd, self.inputs.frame_noise_sd
        else:
            noise, frame_sd = preprocess.frame_noise(data)
        spacing = images.spacing(self.inputs.in_file)
        correlation = tuple(self.inputs.noise_correlation)
        sigma = (self.inputs.sigma_mm if isdefined(self.inputs.sigma_mm)
                 else preprocess.smoothing_sigma(noise, spacing, correlation))
        smoothed = images.create_like(self.inputs.in_file, "ctp_smooth.nii", data.shape)
        times = (self.inputs.frame_times if isdefined(self.inputs.frame_times)
                 else np.arange(data.shape[-1]))
        channels = preprocess.guide_channels(preprocess.soft_tissue_curves(data), frame_sd, times)
        preprocess.cross_bilateral(data, spacing, sigma, noise, self.inputs.n_threads, frame_sd,
                                   out=smoothed, correlation=correlation, channels=channels)
        smoothed.flush()
        self._results["guide_channels"] = channels.shape[1]
        self._results["sigma_mm"] = sigma
        self._results["out_file"] = smoothed.filename
        self._results["noise_sd"] = noise
        return runtime


class _MaskInput(BaseInterfaceInputSpec):
    source = traits.Str("image", usedefault=True, desc="input file name for error messages")
    mean_file = File(exists=True, mandatory=True)
    user_mask = File(exists=True, desc="user-supplied brain mask on the same grid")


class _MaskOutput(TraitedSpec):
    out_mask = File(exists=True)
    qc_flags = traits.List(traits.Str, desc="problems to show in sidecars and reports")


class BrainMask(SimpleInterface):
    """Automatic brain mask, or the user's after checking it lies on the CTP grid."""

    input_spec = _MaskInput
    output_spec = _MaskOutput

    def _run_interface(self, runtime):
        ref = nb.load(self.inputs.mean_file)
        flags = []
        if isdefined(self.inputs.user_mask):
            brain = _user_mask(self.inputs.user_mask, self.inputs.mean_file)
        else:
            mean, spacing = images.load(self.inputs.mean_file), ref.header.get_zooms()[:3]
            brain = mask.brain_mask(mean, spacing, mask.slice_axis_from_affine(ref.affine))
            if not mask.has_skull(mean, spacing):
                flags.append(f"brain mask: no skull in the image (< {mask.MIN_SKULL_ML:g} mL "
                             "of bone), taken as skull-stripped: the mask is every voxel from "
                             f"{mask.SOFT_TISSUE_HU[0]:g} to {mask.SOFT_TISSUE_HU[1]:g} HU")
        self._results["qc_flags"] = flags
        if not brain.any():
            raise DataError(f"{self.inputs.source}: brain mask is empty")
        self._results["out_mask"] = images.save_like(brain, self.inputs.mean_file,
                                                     "brain_mask.nii", np.uint8)
        return runtime


class _CurvesInput(BaseInterfaceInputSpec):
    source = traits.Str("image", usedefault=True, desc="input file name for error messages")
    in_file = File(exists=True, mandatory=True, desc="smoothed 4D CTP")
    mask = File(exists=True, mandatory=True)
    frame_times = traits.List(traits.Float, mandatory=True)
    motion_parameters = traits.List(traits.List(traits.Float),
                                    desc="per frame rigid motion (rad, mm): voxels that head "
                                         "motion can fill with bone do not time the bolus")


class _CurvesOutput(TraitedSpec):
    baseline = File(exists=True, desc="mean HU before bolus arrival")
    ttp = File(exists=True, desc="time to peak (s from the first frame)")
    arrival_frame = traits.Int(desc="first frame showing the bolus")
    baseline_frames = traits.Int(desc="number of leading frames averaged into the baseline")
    qc_flags = traits.List(traits.Str, desc="problems to show in sidecars and reports")


class EnhancementCurves(SimpleInterface):
    """Bolus arrival, per-voxel baseline and time to peak."""

    input_spec = _CurvesInput
    output_spec = _CurvesOutput

    def _run_interface(self, runtime):
        data = images.load(self.inputs.in_file)
        brain = images.load(self.inputs.mask, bool)
        times = np.asarray(self.inputs.frame_times) - self.inputs.frame_times[0]
        tissue = data[brain]
        aif_stage.check_first_frame(times, tissue, self.inputs.source)
        timing = None  # a still head: every voxel may time the bolus
        if isdefined(self.inputs.motion_parameters) and np.any(self.inputs.motion_parameters):
            spacing = images.spacing(self.inputs.in_file)
            # the baseline is not known yet; the first frames are unenhanced in any case
            edge = motion.edge_strength(data[..., :curves.MIN_BASELINE_FRAMES].mean(axis=-1),
                                        spacing)
            timing = aif_stage.arrival_reference_voxels(
                tissue, np.argwhere(brain), spacing, self.inputs.motion_parameters, edge)
        arrival = curves.bolus_arrival_frame(tissue, self.inputs.source, eligible=timing,
                                             times=times)
        n_baseline = curves.baseline_frame_count(times, arrival, self.inputs.source)
        # brain voxels only; what noise it still has, the nlr fit takes as an unknown
        base = curves.baseline(tissue, n_baseline, self.inputs.source)
        enhancement = tissue - base[:, None]
        ttp = curves.time_to_peak(times, enhancement)
        self._results["qc_flags"] = (
            ["bolus truncated: the brain is still enhancing at the last frame"]
            if curves.bolus_truncated(enhancement.mean(axis=0)) else [])
        self._results["baseline"] = images.save_like(_fill(brain, base), self.inputs.mask,
                                                     "baseline.nii")
        self._results["ttp"] = images.save_like(_fill(brain, ttp), self.inputs.mask, "ttp.nii")
        self._results["arrival_frame"] = arrival
        self._results["baseline_frames"] = n_baseline
        return runtime


class _EnhancementInput(BaseInterfaceInputSpec):
    source = traits.Str("image", usedefault=True, desc="input file name for error messages")
    in_file = File(exists=True, mandatory=True, desc="smoothed 4D CTP")
    mask = File(exists=True, mandatory=True)
    baseline = File(exists=True, mandatory=True)
    frame_times = traits.List(traits.Float, mandatory=True)


class _VesselInput(_EnhancementInput):
    baseline_frames = traits.Int(mandatory=True, desc="leading frames forming the baseline")
    aif_mask = File(exists=True, desc="user-chosen arterial voxels")
    vof_mask = File(exists=True, desc="user-chosen venous voxels")
    vof_scaling = traits.Bool(True, usedefault=True, desc="scale the AIF to the VOF's area")
    motion_parameters = traits.List(traits.List(traits.Float),
                                    desc="per frame rigid motion (rad, mm): the VOF (and an "
                                         "AIF that is not bolus-shaped) avoid voxels it can "
                                         "fill with bone")


class _VesselOutput(TraitedSpec):
    aif = traits.List(traits.Float, desc="AIF used for deconvolution (HU, after VOF scaling)")
    aif_measured = traits.List(traits.Float, desc="AIF as measured (HU)")
    aif_mask = File(exists=True)
    aif_info = traits.Dict(desc="peak, TTP, voxel count, gamma-variate fit, score, scale factor")
    vof = traits.List(traits.Float, desc="VOF (HU); empty when none was found")
    vof_mask = File(exists=True)
    vof_info = traits.Dict()
    qc_flags = traits.List(traits.Str, desc="problems to show in sidecars and reports")


class SelectVessels(SimpleInterface):
    """Arterial input and venous output functions (automatic or user masks), VOF scaling."""

    input_spec = _VesselInput
    output_spec = _VesselOutput

    def _run_interface(self, runtime):
        inp = self.inputs
        times = np.asarray(inp.frame_times) - inp.frame_times[0]  # as for TTP
        brain, tissue, baseline, data = _enhancement(inp)
        voxels = np.argwhere(brain)
        spacing = images.spacing(inp.mask)
        search = (tissue, voxels, brain.shape, times, spacing, inp.source)
        clusters = None
        automatic = not (isdefined(inp.aif_mask) and isdefined(inp.vof_mask))
        # only automatic selection uses the motion model
        moved = automatic and isdefined(inp.motion_parameters) and np.any(inp.motion_parameters)
        scene = _unenhanced_head(inp, data)[0] if moved else None
        motion_model = {"motion_parameters": inp.motion_parameters if moved else None,
                        "edge": motion.edge_strength(scene, spacing) if moved else None}
        if isdefined(inp.aif_mask):
            aif = self._user_curve(inp.aif_mask, times)
        else:
            # no vessel at all: a data error
            clusters = aif_stage.vessel_clusters(*search, scene=scene, **motion_model)
            aif = aif_stage.select_aif(*search, clusters=clusters, scene=scene, **motion_model)
        if isdefined(inp.vof_mask):
            vof = self._user_curve(inp.vof_mask, times)
        else:
            try:
                vof = aif_stage.select_vof(*search, clusters=clusters, baseline=baseline,
                                           **motion_model)
            except DataError:  # only reached with a user AIF: no VOF then (flagged below)
                vof = None
        factor, transit, vof_problem = aif_stage.vof_scaling(aif, vof)
        scale = factor if inp.vof_scaling else 1.0
        self._results["qc_flags"] = (aif_stage.aif_problems(aif)
                                     + ([vof_problem] if vof_problem else []))
        self._results["aif"] = [float(v) * scale for v in aif.curve]
        self._results["aif_measured"] = [float(v) for v in aif.curve]
        self._results["aif_mask"] = self._save_voxels(aif, brain.shape, "aif_mask.nii")
        self._results["aif_info"] = {**_vessel_info(aif), "VOFScaleFactor": scale,
                                     "VOFScaling": bool(inp.vof_scaling),
                                     "Selection": "user mask" if isdefined(inp.aif_mask)
                                     else "automatic"}
        self._results["vof"] = [] if vof is None else [float(v) for v in vof.curve]
        self._results["vof_mask"] = self._save_voxels(vof, brain.shape, "vof_mask.nii")
        self._results["vof_info"] = {} if vof is None else {
            **_vessel_info(vof), "VenousTransitFit": transit,
            "Selection": "user mask" if isdefined(inp.vof_mask) else "automatic"}
        return runtime

    def _user_curve(self, mask_file, times):
        """Mean enhancement of a user's mask, after checking it lies on the CTP grid."""
        selected = _user_mask(mask_file, self.inputs.mask)
        if not selected.any():
            raise DataError(f"{os.path.basename(mask_file)}: mask selects no voxel")
        data = images.load(self.inputs.in_file)[selected]
        enhancement = data - curves.baseline(data, self.inputs.baseline_frames,
                                             self.inputs.source)[:, None]
        return aif_stage.vessel_curve(enhancement, np.argwhere(selected),
                                      np.arange(len(enhancement)), times)

    def _save_voxels(self, vessel, shape, filename):
        chosen = np.zeros(shape, dtype=np.uint8)
        if vessel is not None:
            chosen[tuple(vessel.voxels.T)] = 1
        return images.save_like(chosen, self.inputs.mask, filename, np.uint8)


def _vessel_info(vessel) -> dict:
    return {"PeakEnhancement": vessel.peak_hu, "TimeToPeak": vessel.ttp_s,
            "NumberOfVoxels": int(len(vessel.voxels)), "GammaVariateFit": vessel.fit,
            "QualityScore": vessel.fit["r2"], "BolusShapeScore": vessel.shape_score,
            "FirstPassArea": aif_stage.gamma_variate_area(vessel.fit)}


def _user_mask(mask_file, reference) -> np.ndarray:
    """A user-supplied mask as booleans, or a DataError when it is not on the CTP grid."""
    ref = nb.load(reference)
    try:
        user = nb.load(mask_file)
        user_shape, user_affine = user.shape, user.affine
    except Exception as err:  # not a NIfTI, truncated, ...: say so, never a traceback
        raise DataError(f"{os.path.basename(mask_file)}: cannot read mask ({one_line(err)})") from err
    if user_shape[:3] != ref.shape[:3] or not np.allclose(user_affine, ref.affine, atol=1e-3):
        raise DataError(f"{os.path.basename(mask_file)}: mask is not on the CTP grid "
                        f"(shape {user_shape}, expected {ref.shape[:3]})")
    try:
        return np.asarray(user.dataobj).reshape(ref.shape[:3]) > 0
    except Exception as err:
        raise DataError(f"{os.path.basename(mask_file)}: cannot read mask ({one_line(err)})") from err


class _DeconvInput(_EnhancementInput):
    aif = traits.List(traits.Float, mandatory=True)
    method = traits.Enum(*deconvolution.METHODS, usedefault=True)
    motion_parameters = traits.List(traits.List(traits.Float),
                                    desc="per frame rigid motion (rad, mm); fitted as a residual "
                                         "artefact regressor by nlr")
    baseline_frames = traits.Int(desc="leading frames forming the baseline")
    noise_sd = traits.Float(0.0, usedefault=True,
                            desc="noise SD (HU) of the series as acquired; without noise, nlr "
                                 "counts the rounding to whole HU as the residual floor")
    n_threads = traits.Int(1, usedefault=True)


class _DeconvOutput(TraitedSpec):
    flow = File(exists=True, desc="max of k = rho/kH * F (1/s)")
    area = File(exists=True, desc="integral of k (dimensionless)")
    tmax = File(exists=True, desc="time of the maximum of k (s)")
    ttp = File(exists=True, desc="nlr: time to peak of the fitted curve (s from the first frame)")
    residue_shape = traits.Str(desc="residue family fitted (nlr), else 'none (model-free)'")
    residue_shape_scores = traits.Dict(desc="nlr: every family's score (select_residue_shape)")


class Deconvolve(SimpleInterface):
    """Tissue curves deconvolved by the AIF (model fit or truncated SVD)."""

    input_spec = _DeconvInput
    output_spec = _DeconvOutput

    def _run_interface(self, runtime):
        brain, tissue, _, data = _enhancement(self.inputs)
        nuisance, weights = (_motion_artefact_model(self.inputs, brain, data, tissue)
                             if self.inputs.method == "nlr" else (None, None))
        del data  # the whole series is not needed beyond this point
        times = np.asarray(self.inputs.frame_times, float)
        aif = np.asarray(self.inputs.aif, float)
        shape, scores = "none (model-free)", {}
        if self.inputs.method == "nlr":
            shape, scores = deconvolution.select_residue_shape(
                tissue, times, times, aif, nuisance=nuisance, weights=weights,
                noise_floor=deconvolution.rounding_floor(self.inputs.noise_sd))
            flow, tmax, mtt = deconvolution.fit_model(tissue, times, times, aif, shape=shape,
                                                      nuisance=nuisance, weights=weights)
            area = flow * mtt
            ttp = deconvolution.model_ttp(times, times, aif, tmax, mtt, shape) - times[0]
            self._results["ttp"] = images.save_like(_fill(brain, ttp), self.inputs.mask,
                                                    "ttp.nii")
        else:  # SVD needs uniform sampling: resample AIF and tissue to the shortest interval
            grid = curves.uniform_grid(times)
            flow, tmax, area = deconvolution.deconvolve(
                curves.resample(times, tissue, grid), curves.resample(times, aif, grid),
                float(grid[1] - grid[0]), self.inputs.method)
        for key, values in (("flow", flow), ("area", area), ("tmax", tmax)):
            self._results[key] = images.save_like(_fill(brain, values), self.inputs.mask,
                                                  f"{key}.nii")
        self._results["residue_shape"] = shape
        self._results["residue_shape_scores"] = scores
        return runtime


class _MapsInput(BaseInterfaceInputSpec):
    flow = File(exists=True, mandatory=True)
    area = File(exists=True, mandatory=True)
    tmax = File(exists=True, mandatory=True)
    ttp = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    density = traits.Float(maps.DEFAULT_DENSITY, usedefault=True, desc="g/mL")
    kh = traits.Float(maps.DEFAULT_KH, usedefault=True, desc="hematocrit factor")


class _MapsOutput(TraitedSpec):
    cbf = File(exists=True)
    cbv = File(exists=True)
    mtt = File(exists=True)
    tmax = File(exists=True)
    ttp = File(exists=True)


class PerfusionMaps(SimpleInterface):
    """CBF, CBV, MTT, Tmax, TTP in physical units; 0 outside the brain mask."""

    input_spec = _MapsInput
    output_spec = _MapsOutput

    def _run_interface(self, runtime):
        brain = images.load(self.inputs.mask, bool)
        values = {k: images.load(getattr(self.inputs, k))[brain]
                  for k in ("flow", "area", "tmax", "ttp")}
        result = maps.perfusion_maps(**values, density=self.inputs.density, kh=self.inputs.kh)
        for key, array in result.items():
            self._results[key] = images.save_like(_fill(brain, array), self.inputs.mask,
                                                  f"{key}.nii")
        return runtime


def _fill(brain: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Scatter per-brain-voxel values into a volume that is 0 outside the brain."""
    out = np.zeros(brain.shape, dtype=np.float32)
    out[brain] = values
    return out


def _unenhanced_head(inputs, data):
    """Mean of the baseline frames over the whole grid, bone included (``data``: the 4D series)."""
    n_baseline = max(1, inputs.baseline_frames if isdefined(inputs.baseline_frames) else 1)
    return data[..., :n_baseline].mean(axis=-1), n_baseline


def _motion_artefact_model(inputs, brain, data, tissue):
    """``motion.residual_motion_regressor`` of this series (``data``, 4D) and its
    ``motion.artefact_weights``, or (None, None) (no motion input or a still head)."""
    if not isdefined(inputs.motion_parameters) or not np.any(inputs.motion_parameters):
        return None, None
    spacing = images.spacing(inputs.in_file)
    scene, n_baseline = _unenhanced_head(inputs, data)
    # Edges of the whole head: the brain-only baseline hides the bone below the cortex at the
    # skull base, whose slice hundreds of HU of bone move into under through-plane motion
    edge = motion.edge_strength(scene, spacing)
    regressor = motion.residual_motion_regressor(
        inputs.motion_parameters, edge, spacing, brain, n_baseline, scene,
        n_threads=inputs.n_threads)
    if regressor is None:
        return None, None
    # the curves' noise, but never below the rounding to whole HU that no noise dithers
    noise = np.hypot(preprocess.estimate_noise(tissue),
                     np.sqrt(deconvolution.rounding_floor(inputs.noise_sd)))
    return regressor, motion.artefact_weights(regressor, edge[brain], noise)


def _enhancement(inputs):
    """Brain mask, the (n_brain_voxels, n_frames) enhancement curves in HU, the baseline
    image they are relative to (brain only) and the series itself."""
    brain = images.load(inputs.mask, bool)
    data = images.load(inputs.in_file)
    base = images.load(inputs.baseline)
    return brain, data[brain] - base[brain][:, None], base, data
