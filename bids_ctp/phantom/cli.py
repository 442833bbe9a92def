"""Command line: ``bids_ctp-phantom OUT [options]`` writes the phantom BIDS dataset."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ..errors import BidsCtpError
from .dataset import LAYOUTS, MOTION_SUBVOXEL_MM, ORIENTATIONS, make_dataset
from .model import RESIDUE_SHAPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bids_ctp-phantom",
        description="Write a BIDS dataset of simulated 4D CT perfusion head scans, with the ground truth "
        "(CBF, CBV, MTT, Tmax, TTP maps, labels, AIF/VOF) in OUT/derivatives/groundtruth.",
    )
    p.add_argument("out", metavar="OUT", help="output BIDS root; must be empty, absent, or a previous phantom (which is replaced)")
    p.add_argument("--layout", choices=LAYOUTS, default="bep024",
                   help="bep024: sub-01/ct/sub-01_ctp.nii.gz; isles24: sub-stroke0001/ses-01/sub-stroke0001_ses-01_ctp.nii.gz (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; subject i uses numpy default_rng([seed, i]) (default: %(default)s)")
    p.add_argument("--subjects", type=int, default=1, metavar="N", help="number of subjects; same anatomy, independent noise (default: %(default)s)")
    p.add_argument("--sessions", action="store_true", help="bep024 only: put each image in ses-01 (isles24 always has ses-01)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("NX", "NY", "NZ"),
                   help="grid size in voxels (default: a 220 x 220 x 80 mm field of view at --spacing)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=(1.0, 1.0, 5.0),
                   help="voxel size in mm (default: 1 1 5)")
    p.add_argument("--frames", type=int, default=55, metavar="N", help="number of time frames (default: %(default)s)")
    p.add_argument("--frame-interval", type=float, default=1.0, metavar="S", help="seconds between frames (default: %(default)s)")
    p.add_argument("--nonuniform", action="store_true",
                   help="two-phase protocol: frame-interval spacing up to ~65%% of the duration, then 2-3 intervals with one irregular gap")
    p.add_argument("--noise", type=float, default=10.0, metavar="HU", help="Gaussian noise sd per voxel and frame, HU (default: %(default)s)")
    p.add_argument("--orientation", choices=ORIENTATIONS, default="RAS",
                   help="RAS: diagonal affine; LPS: x and y axes negated (DICOM-like); oblique: rotated 15 deg about x and 10 deg about z (default: %(default)s)")
    p.add_argument("--residue", choices=RESIDUE_SHAPES, default="exponential",
                   help="tissue residue function shape (default: %(default)s)")
    p.add_argument("--motion", type=float, default=None, metavar="MM",
                   help="simulate rigid head motion (smooth drift plus two jerks) of up to MM mm translation and MM degrees "
                   "rotation; the truth goes to *_desc-groundtruth_motion.tsv (default: no motion)")
    p.add_argument("--motion-subvoxel", type=float, default=MOTION_SUBVOXEL_MM, metavar="MM",
                   help="sub-voxel size of the motion simulation (partial volume); a value of at least the largest "
                   "spacing moves the voxel grid itself by linear interpolation, as a phantom without a partial-volume "
                   "model would (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        ds = make_dataset(
            args.out, layout=args.layout, n_subjects=args.subjects, seed=args.seed, shape=args.shape,
            spacing=args.spacing, n_frames=args.frames, frame_interval=args.frame_interval, nonuniform=args.nonuniform,
            noise_hu=args.noise, orientation=args.orientation, residue=args.residue, sessions=args.sessions,
            motion=args.motion, motion_subvoxel_mm=args.motion_subvoxel,
        )
    except BidsCtpError as err:
        print(f"bids_ctp-phantom: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"bids_ctp-phantom: error: cannot write {args.out}: {err}", file=sys.stderr)
        return 73
    for image in ds.images:
        print(f"wrote {image.ctp.relative_to(ds.root)}  ({' x '.join(map(str, ds.shape))} x {len(ds.frame_times)} frames)")
    print(f"ground truth in {ds.truth_root}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
