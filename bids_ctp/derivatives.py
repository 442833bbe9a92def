"""Output side: BIDS-Derivatives names and atomic writers (temporary file in the same folder + os.replace)."""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

from . import __version__
from .errors import OutputError
from .inputs import CTPInput

CODE_URL = "https://github.com/bids-apps/bids_ctp"
BIDS_VERSION = "1.10.0"
BIDSIGNORE = ("*_cbf.*", "*_cbv.*", "*_mtt.*", "*_tmax.*", "*_ttp.*", "*_aif.*", "*_mask.*", "figures/")

_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def output_path(output_dir, ctp_input: CTPInput, suffix: str, desc: str | None = None,
                extension: str = ".nii.gz", datatype: str = "perf") -> Path:
    """``output_dir/sub-<l>/[ses-<l>/]<datatype>/<name>[_desc-<desc>]_<suffix><extension>``."""
    if not _LABEL.match(suffix or ""):
        raise ValueError(f"invalid BIDS suffix {suffix!r} (letters and digits only)")
    if desc is not None and not _LABEL.match(desc):
        raise ValueError(f"invalid desc label {desc!r} (letters and digits only)")
    if extension and not extension.startswith("."):
        extension = "." + extension
    ents = ctp_input.entities
    folder = Path(output_dir) / f"sub-{ents['subject']}"
    if "session" in ents:
        folder = folder / f"ses-{ents['session']}"
    if datatype:
        folder = folder / datatype
    name = ctp_input.name + (f"_desc-{desc}" if desc else "") + f"_{suffix}{extension}"
    return folder / name


def _extension(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".tsv.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a hidden temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {path.parent}: {err.strerror or err}") from err
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{_extension(path)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return path


def _json_default(obj):
    """numpy scalars/arrays and paths in sidecars."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path, obj) -> Path:
    """Write ``obj`` as JSON (indent 2, keys in insertion order), atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"
    return write_text(path, text)


def write_text(path, text: str) -> Path:
    """Write a text file atomically."""

    def write(tmp):
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write)


def save_nifti(img, path) -> Path:
    """Save a nibabel image atomically (the temporary name keeps ``.nii.gz`` so nibabel compresses it)."""
    return atomic_write(path, lambda tmp: img.to_filename(str(tmp)))


def _generated_by() -> dict:
    """This program, and the container it runs in when the image says so (Dockerfile ENV)."""
    entry = {"Name": "bids_ctp", "Version": __version__, "CodeURL": CODE_URL}
    kind, tag = os.environ.get("BIDS_CTP_CONTAINER_TYPE"), os.environ.get("BIDS_CTP_CONTAINER_TAG")
    if kind and tag:
        entry["Container"] = {"Type": kind, "Tag": tag}
    return entry


def write_dataset_description(output_dir, bids_dir) -> Path:
    """Write ``dataset_description.json`` and ``.bidsignore`` at the derivatives root (idempotent)."""
    output_dir = Path(output_dir)
    raw_uri = Path(bids_dir).expanduser().absolute().as_uri()
    description = {
        "Name": "bids_ctp derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [_generated_by()],
        "SourceDatasets": [{"URL": raw_uri}],
        "DatasetLinks": {"raw": raw_uri},
    }
    path = write_json(output_dir / "dataset_description.json", description)

    # Keep lines a user may have added to an existing .bidsignore.
    ignore_file = output_dir / ".bidsignore"
    lines = []
    if ignore_file.is_file():
        lines = [ln.strip() for ln in ignore_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    lines += [pat for pat in BIDSIGNORE if pat not in lines]
    write_text(ignore_file, "\n".join(lines) + "\n")
    return path
