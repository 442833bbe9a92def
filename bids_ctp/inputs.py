"""What the CLI hands to the workflow for one 4D CTP series."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# BIDS entities copied from the input name to every output name, in BIDS order.
KEPT_ENTITIES = ("subject", "session", "acquisition", "reconstruction", "run")
# Fewest frames a CTP series may have: a baseline (>= 2 frames) and a bolus passage to fit.
MIN_FRAMES = 10


@dataclass
class CTPInput:
    path: Path  # absolute path of the *_ctp.nii[.gz]
    relpath: str  # path relative to bids_dir, POSIX style (for BIDS URIs "bids:raw:<relpath>")
    entities: dict  # subset of KEPT_ENTITIES present in the file name, e.g. {"subject": "01", "session": "01"}
    frame_times: list[float]  # frame start times in s, one per volume, strictly increasing
    timing_source: str  # e.g. "FrameTimesStart", "RepetitionTime", "--frame-interval"
    metadata: dict = field(default_factory=dict)  # the JSON sidecar (empty when there is none)
    brain_mask: Path | None = None  # user-supplied mask on the same grid, or None for the automatic one
    aif_mask: Path | None = None  # user-chosen arterial voxels, or None for automatic selection
    vof_mask: Path | None = None  # user-chosen venous voxels, or None for automatic selection

    @property
    def name(self) -> str:
        """Filename prefix of every output, e.g. ``sub-01_ses-01``."""
        keys = {"subject": "sub", "session": "ses", "acquisition": "acq", "reconstruction": "rec", "run": "run"}
        return "_".join(f"{keys[k]}-{self.entities[k]}" for k in KEPT_ENTITIES if k in self.entities)
