"""Wall time and peak memory of one participant run on a generated phantom.

Usage: python benchmarks/speed.py [--shape NX NY NZ] [--spacing SX SY SZ] [--frames N] [--noise HU]
Defaults: the seed-size scan 220x220x16x55 at 1x1x5 mm. Prints the time of a fresh run, of a
cached rerun, and the peak resident memory of the run (from /usr/bin/time-like rusage).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bids_ctp.phantom import make_dataset


def timed(cmd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(220, 220, 16))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 5.0))
    parser.add_argument("--frames", type=int, default=55)
    parser.add_argument("--noise", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "bids", shape=tuple(args.shape), spacing=tuple(args.spacing),
                     n_frames=args.frames, noise_hu=args.noise)
        cmd = [sys.executable, "-m", "bids_ctp", str(tmp / "bids"), str(tmp / "out"),
               "participant", "-w", str(tmp / "work")]
        fresh = timed(cmd)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        cached = timed(cmd)
    shape = "x".join(map(str, args.shape)) + f"x{args.frames}"
    print(f"{shape} at {args.spacing} mm: fresh run {fresh:.1f} s, cached rerun {cached:.1f} s, "
          f"peak memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
