"""Input side: find the 4D CTP series of a BIDS(-like) dataset and work out their frame timing.

Two layouts are accepted (see shared/docs/bids-conventions.md, section 1):

* BEP024-style: ``sub-<l>/[ses-<l>/]ct/sub-<l>[_ses-<l>][_acq-][_rec-][_run-]_ctp.nii[.gz]`` (+ ``.json``)
* ISLES'24-style: ``sub-<l>/ses-<l>/sub-<l>_ses-<l>_ctp.nii.gz`` (no datatype folder, usually no sidecar)

``derivatives/`` (and ``code/``, ``sourcedata/`` ...) are never indexed.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import re
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from .errors import DataError, InputMissingError, UsageError, one_line
from .inputs import KEPT_ENTITIES, MIN_FRAMES, CTPInput

LOGGER = logging.getLogger("bids_ctp.bids")

CTP_EXTENSIONS = (".nii", ".nii.gz")
# Folders at the dataset root that never hold raw CTP series. ``derivatives`` is listed so that pybids
# does not even walk it (ISLES'24 ships large derivative trees).
_IGNORED_ROOT_DIRS = re.compile(r"^/(code|models|sourcedata|stimuli|derivatives|phenotype)(/|$)")
# Files that cannot matter to us: anything with an extension that is not a CTP image or JSON sidecar,
# and anything not ending in "ctp.<ext>" (inherited sidecars such as "/ctp.json" still pass).
# Matched against "/<relative path>"; directories have no dot in their last component, so they pass.
_IGNORED_FILES = re.compile(r"^(?!.*ctp\.(nii|nii\.gz|json)$).*/[^/]*\.[^/]*$")
# BIDS labels are letters and digits only; anything else (``/``, ``..``, ``*``, spaces) is refused, so a
# label can never point outside the dataset or the output folder.
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
# Frame timing sanity: CT gantries need >= 0.25 s per rotation, so frames closer than this are duplicates
# (and would make the uniform resampling grid huge); a CTP series lasts minutes, not hours, so a longer
# one means the times are not in seconds (e.g. milliseconds).
MIN_FRAME_INTERVAL_S = 0.1
MAX_SCAN_DURATION_S = 3600.0


@lru_cache(maxsize=1)
def _ct_config() -> dict:
    """pybids' default BIDS config with ``ct`` added to the datatype folders."""
    import bids

    cfg_file = Path(bids.__file__).parent / "layout" / "config" / "bids.json"
    cfg = copy.deepcopy(json.loads(cfg_file.read_text()))
    cfg["name"] = "bids_ct"
    for ent in cfg["entities"]:
        if ent["name"] == "datatype" and "|ct)" not in ent["pattern"]:
            ent["pattern"] = ent["pattern"].replace("|pet)", "|pet|ct)")
    return cfg


def _load_layout(bids_dir: Path):
    """Index ``bids_dir`` in memory (no database file is written anywhere)."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(
        validate=False,
        ignore=[_IGNORED_ROOT_DIRS, _IGNORED_FILES],
        index_metadata=True,
        suffix="ctp",  # only index sidecar metadata for the CTP series
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return BIDSLayout(str(bids_dir), validate=False, config=[copy.deepcopy(_ct_config())], indexer=indexer,
                              database_path=None, derivatives=False)
        except Exception as err:  # pybids raises many kinds (bad JSON, bad description ...)
            raise DataError(f"{bids_dir}: cannot index the dataset: {one_line(err)}") from err


def _strip(labels, prefix: str) -> list[str] | None:
    """Accept labels with or without ``sub-``/``ses-``; ``None`` or empty means "all".

    A label that is empty or not purely alphanumeric (``/``, ``..``, ``_``, ``*`` ...) is a UsageError."""
    if not labels:
        return None
    if isinstance(labels, str):
        labels = [labels]
    kind = "participant" if prefix == "sub-" else "session"
    out = []
    for raw in labels:
        label = str(raw).strip()
        if label.startswith(prefix):
            label = label[len(prefix):]
        if not _LABEL.match(label):
            raise UsageError(f"invalid {kind} label {str(raw)!r}: BIDS labels contain letters and digits "
                             f"only (e.g. --{kind}-label 01 or {prefix}01)")
        if label not in out:
            out.append(label)
    return out or None


def _fmt(labels, prefix: str, limit: int = 20) -> str:
    """``sub-01, sub-02``; long lists are cut so that the error stays one readable line."""
    if not labels:
        return "none"
    text = ", ".join(f"{prefix}{lab}" for lab in labels[:limit])
    return text + (f", ... ({len(labels)} in all)" if len(labels) > limit else "")


def _entities_from_name(filename: str) -> dict:
    """The kept BIDS entities of a file name, as the exact strings written there (keeps zero padding)."""
    keys = {"sub": "subject", "ses": "session", "acq": "acquisition", "rec": "reconstruction", "run": "run"}
    ents = {}
    for part in filename.split("_")[:-1]:  # the last part is the suffix + extension
        key, sep, value = part.partition("-")
        if sep and key in keys and value:
            ents[keys[key]] = value
    return {k: ents[k] for k in KEPT_ENTITIES if k in ents}


def _layout_ok(relpath: str, ents: dict) -> bool:
    """``sub-X/[ses-Y/][ct/]file``: the folders must agree with the file name."""
    parts = relpath.split("/")
    folders = parts[:-1]
    if not folders or folders[0] != f"sub-{ents.get('subject')}":
        return False
    folders = folders[1:]
    if "session" in ents:
        if not folders or folders[0] != f"ses-{ents['session']}":
            return False
        folders = folders[1:]
    return folders in ([], ["ct"])


def _n_frames(path: Path) -> int:
    """Frame count of a CTP file after every header-level check (see images.check_ctp_header)."""
    from .interfaces.images import check_ctp_header

    try:
        info = check_ctp_header(path, MIN_FRAMES)
    except DataError as err:
        raise DataError(f"{path}: {err}") from err
    except Exception as err:  # defensive: a header nibabel cannot even parse
        raise DataError(f"{path}: cannot read the NIfTI header: {one_line(err)}") from err
    return info.shape[3]


def _header_interval(path) -> float | None:
    """pixdim[4] in seconds, or None when the header does not say (or cannot be read)."""
    try:
        import nibabel as nb

        hdr = nb.load(str(path)).header
        value = float(hdr["pixdim"][4])
        unit = hdr.get_xyzt_units()[1]
    except Exception:
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return value / 1000.0 if unit == "msec" else value / 1e6 if unit == "usec" else value


def _is_number(value) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError):  # e.g. a 400-digit integer from JSON
        return False


def _check_times(path, field: str, values, n_frames: int) -> list[float]:
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{path}: {field} must be a list of numbers (s), got {values!r}")
    if len(values) != n_frames:
        raise DataError(f"{path}: {field} has {len(values)} values but the image has {n_frames} frames")
    if not all(_is_number(v) for v in values):
        raise DataError(f"{path}: {field} must contain finite numbers (s) only")
    times = [float(v) for v in values]
    if times and times[0] < 0:
        raise DataError(f"{path}: {field} must not be negative (s from the scan start), but value 0 is "
                        f"{times[0]:g}")
    for i in range(1, len(times)):
        if times[i] <= times[i - 1]:
            what = "duplicated" if times[i] == times[i - 1] else "not increasing"
            raise DataError(f"{path}: {field} must be strictly increasing, but value {i} ({times[i]:g}) "
                            f"is not after value {i - 1} ({times[i - 1]:g}): {what}")
    return times


def _check_spacing(path, field: str, times: list[float], error=DataError) -> list[float]:
    """Frames at least MIN_FRAME_INTERVAL_S apart and a scan no longer than MAX_SCAN_DURATION_S."""
    if len(times) > 1:
        gaps = [b - a for a, b in zip(times, times[1:])]
        i = min(range(len(gaps)), key=gaps.__getitem__)
        if gaps[i] < MIN_FRAME_INTERVAL_S - 1e-9:  # (0.3 - 0.2 < 0.1 in floating point)
            raise error(f"{path}: {field} puts frames {i} and {i + 1} only {gaps[i]:g} s apart (at least "
                        f"{MIN_FRAME_INTERVAL_S:g} s expected): duplicated frames or times not in seconds?")
        if not math.isfinite(times[-1]) or times[-1] - times[0] > MAX_SCAN_DURATION_S:
            raise error(f"{path}: {field} gives a scan of {times[-1] - times[0]:g} s (more than "
                        f"{MAX_SCAN_DURATION_S:g} s): are the times in milliseconds instead of seconds?")
    return times


def _check_interval(path, field: str, value) -> float:
    if not _is_number(value) or float(value) <= 0:
        raise DataError(f"{path}: {field} must be a number of seconds > 0, got {value!r}")
    return float(value)


def resolve_frame_times(path, metadata, n_frames: int, frame_interval: float | None = None
                        ) -> tuple[list[float], str]:
    """Frame start times (s) of one CTP series and where they came from.

    First hit wins: sidecar ``FrameTimesStart`` -> ``VolumeTiming`` -> ``RepetitionTime`` (uniform, from 0)
    -> ``frame_interval`` (``--frame-interval``). The NIfTI header is never trusted; it is only quoted in
    the error message as a hint. A field that is present but invalid is an error, not skipped.
    """
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, Mapping):
        raise DataError(f"{path}: the JSON sidecar must hold an object {{...}}, got {type(metadata).__name__}")
    for field in ("FrameTimesStart", "VolumeTiming"):
        if metadata.get(field) is not None:
            times = _check_spacing(path, field, _check_times(path, field, metadata[field], n_frames))
            _warn_ignored_interval(path, field, frame_interval)
            return times, field
    if metadata.get("RepetitionTime") is not None:
        tr = _check_interval(path, "RepetitionTime", metadata["RepetitionTime"])
        times = _check_spacing(path, "RepetitionTime", [i * tr for i in range(n_frames)])
        _warn_ignored_interval(path, "RepetitionTime", frame_interval)
        return times, "RepetitionTime"
    if frame_interval is not None:
        if not _is_number(frame_interval) or float(frame_interval) <= 0:
            raise UsageError(f"--frame-interval must be a number of seconds > 0, got {frame_interval!r}")
        step = float(frame_interval)
        times = _check_spacing(path, "--frame-interval", [i * step for i in range(n_frames)], UsageError)
        return times, "--frame-interval"
    msg = (f"{path}: no frame timing: the sidecar has no FrameTimesStart, VolumeTiming or RepetitionTime; "
           f"pass --frame-interval SECONDS")
    hint = _header_interval(path)
    if hint is not None:
        msg += f" (the NIfTI header says {hint:g} s per frame)"
    raise DataError(msg)


def _warn_ignored_interval(path, field, frame_interval):
    if frame_interval is not None:
        LOGGER.warning("%s: using %s from the sidecar; --frame-interval is ignored for this file", path, field)


def _mask_for(template: str, ents: dict, path: Path, kind: str = "brain") -> Path:
    mask = template
    if "{subject}" in mask:
        mask = mask.replace("{subject}", ents["subject"])
    if "{session}" in mask:
        if "session" not in ents:
            raise UsageError(f"--{kind}-mask {template} uses {{session}}, but {path.name} has no session")
        mask = mask.replace("{session}", ents["session"])
    mask_path = Path(mask).expanduser().absolute()
    if not mask_path.is_file():
        raise InputMissingError(f"{kind} mask not found: {mask_path} (for {path.name})")
    return mask_path


def _check_description(bids_dir: Path) -> None:
    """``dataset_description.json`` is not needed (nothing in it is used) and ISLES'24's ``raw_data`` has
    none: a missing one is only logged (``-v``), so that it adds no line to every error of an ISLES'24 run;
    an unreadable one is a warning, never an error."""
    path = bids_dir / "dataset_description.json"
    if not path.exists():
        if any(p.name.startswith("sub-") for p in bids_dir.iterdir()):
            LOGGER.info("%s has no dataset_description.json; reading it as a BIDS-like dataset "
                           "(as ISLES'24 raw_data)", bids_dir)
        return
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        LOGGER.warning("%s: unreadable, ignored (%s)", path, one_line(err))
        return
    if not isinstance(description, dict):
        LOGGER.warning("%s: not a JSON object, ignored", path)
    elif description.get("DatasetType") == "derivative":
        LOGGER.warning("%s says DatasetType 'derivative'; bids_dir should be the raw dataset", path)


def _check_sidecars(bids_dir: Path) -> None:
    """Every ``*ctp.json`` that could apply to a CTP series must be a JSON object (pybids' own message for
    a broken one names no file, and one broken sidecar stops the indexing of the whole dataset)."""
    candidates = list(bids_dir.glob("*ctp.json"))
    for sub in bids_dir.glob("sub-*"):
        if sub.is_dir():
            candidates += [p for p in sub.rglob("*ctp.json") if p.is_file()]
    for path in sorted(candidates):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read the JSON sidecar: {one_line(err)}") from err
        except ValueError as err:
            raise DataError(f"{path}: invalid JSON sidecar: {one_line(err)}") from err
        if not isinstance(content, dict):
            raise DataError(f"{path}: the JSON sidecar must hold an object {{...}}, got a {type(content).__name__}")


def collect_inputs(bids_dir, participant_label=None, session_label=None, frame_interval=None,
                   brain_mask=None, aif_mask=None, vof_mask=None,
                   failures: list | None = None) -> list[CTPInput]:
    """All selected CTP series of ``bids_dir``, validated (4D, frame timing, mask present), sorted by path.

    Raises InputMissingError (unknown labels, no CTP series, missing mask), DataError (unusable image or
    timing) or UsageError (a mask without placeholders for several series).
    """
    bids_dir = Path(bids_dir).expanduser().absolute()
    if not bids_dir.is_dir():
        raise InputMissingError(f"BIDS directory not found: {bids_dir}")
    subjects = _strip(participant_label, "sub-")
    sessions = _strip(session_label, "ses-")
    _check_description(bids_dir)
    _check_sidecars(bids_dir)

    layout = _load_layout(bids_dir)
    found = []
    for bf in layout.get(suffix="ctp", extension=list(CTP_EXTENSIONS)):
        path = Path(bf.path)
        relpath = path.relative_to(bids_dir).as_posix()
        ents = _entities_from_name(path.name)
        if "subject" not in ents or not _layout_ok(relpath, ents):
            LOGGER.warning("skipping %s: not in sub-<label>/[ses-<label>/][ct/]", relpath)
            continue
        bad = [f"{k}-{v}" for k, v in ents.items() if not _LABEL.match(v)]
        if bad:
            LOGGER.warning("skipping %s: BIDS labels are letters and digits only (%s)", relpath, ", ".join(bad))
            continue
        found.append((relpath, path, ents, bf))
    found.sort(key=lambda item: item[0])
    if not found:
        hint = ""
        for sub in ("raw_data", "rawdata"):  # ISLES'24 archives keep the inputs one level down
            if (bids_dir / sub).is_dir():
                hint = f"; did you mean {bids_dir / sub}?"
        raise InputMissingError(f"{bids_dir}: no CTP images found (expected "
                                f"sub-<label>/[ses-<label>/][ct/]sub-<label>[_ses-<label>]..._ctp.nii[.gz]){hint}")

    available_subjects = sorted({e["subject"] for _, _, e, _ in found})
    if subjects:
        missing = [s for s in subjects if s not in available_subjects]
        if missing:
            raise InputMissingError(f"no CTP images for participant label(s) {_fmt(missing, 'sub-')} in "
                                    f"{bids_dir}; available: {_fmt(available_subjects, 'sub-')}")
        found = [item for item in found if item[2]["subject"] in subjects]
    if sessions:
        available_sessions = sorted({e["session"] for _, _, e, _ in found if "session" in e})
        missing = [s for s in sessions if s not in available_sessions]
        if missing:
            who = f" of {_fmt(subjects, 'sub-')}" if subjects else ""
            raise InputMissingError(f"no CTP images for session label(s) {_fmt(missing, 'ses-')}{who} in "
                                    f"{bids_dir}; available: {_fmt(available_sessions, 'ses-')}")
        found = [item for item in found if item[2].get("session") in sessions]
    if not found:  # e.g. every selected participant lacks the selected sessions
        raise InputMissingError(f"{bids_dir}: no CTP images match the selected participants/sessions")

    templates = {kind: str(t) for kind, t in
                 (("brain", brain_mask), ("aif", aif_mask), ("vof", vof_mask)) if t is not None}
    for kind, template in templates.items():
        if "{subject}" not in template and "{session}" not in template and len(found) > 1:
            raise UsageError(f"--{kind}-mask {template} has no {{subject}}/{{session}} placeholder but "
                             f"{len(found)} CTP series are selected; use e.g. masks/sub-{{subject}}_mask.nii.gz "
                             "or select one series with --participant-label/--session-label")

    inputs: list[CTPInput] = []
    by_name: dict[str, str] = {}
    for relpath, path, ents, bf in found:
        try:
            n_frames = _n_frames(path)
            try:
                metadata = dict(bf.get_metadata() or {})
            except Exception as err:
                raise DataError(f"{path}: cannot read the JSON sidecar: {one_line(err)}") from err
            times, source = resolve_frame_times(path, metadata, n_frames, frame_interval)
            masks = {f"{kind}_mask": _mask_for(t, ents, path, kind) for kind, t in templates.items()}
        except (DataError, InputMissingError) as err:
            if failures is None:
                raise
            failures.append(err)  # this series fails; the others go on
            continue
        item = CTPInput(path=path, relpath=relpath, entities=ents, frame_times=times, timing_source=source,
                        metadata=metadata, **masks)
        if item.name in by_name:
            raise DataError(f"{relpath} and {by_name[item.name]} would write the same outputs ({item.name}_*); "
                            "keep one of them or tell them apart with acq-/run- entities")
        by_name[item.name] = relpath
        LOGGER.info("%s: %d frames, timing from %s", relpath, n_frames, source)
        inputs.append(item)
    return inputs
