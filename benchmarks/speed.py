"""Wall time and peak memory of one participant run on a generated phantom.

Usage: python benchmarks/speed.py [--shape NX NY NZ] [--spacing SX SY SZ] [--frames N]
                                  [--noise HU] [--motion MM] [--motion-share]
                                  [--memory-limit-gib G] [--keep DIR]
Defaults: the seed-size scan 220x220x16x55 at 1x1x5 mm. Prints the time of a fresh run, of a
cached rerun, and the peak resident memory of the run (rusage: anonymous memory plus the pages
of memory-mapped intermediate files it touched, which the kernel can drop).

``--memory-limit-gib`` runs the participant level inside a new memory cgroup with that limit
(needs root and a writable cgroup v1 or v2 memory controller, as in a container started with
``docker run --memory``): the run must finish, and the largest anonymous (non-reclaimable)
memory seen in the cgroup is printed. A whole-brain scan:
``--shape 512 512 320 --spacing 0.45 0.45 0.5 --frames 25 --memory-limit-gib 12``.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bids_ctp.phantom import make_dataset

CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def memory_cgroup(limit_gib: float) -> tuple[Path, str]:
    """A new memory cgroup limited to ``limit_gib``: its directory, and the key of its
    anonymous memory in memory.stat."""
    name = f"bids_ctp_bench_{os.getpid()}"
    limit = str(int(limit_gib * 2**30))
    if (CGROUP_V2 / "cgroup.controllers").exists():
        group = CGROUP_V2 / name
        group.mkdir()
        (group / "memory.max").write_text(limit)
        (group / "memory.swap.max").write_text("0")
        return group, "anon"
    group = CGROUP_V1 / name
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(limit)
    return group, "total_rss"


def timed(cmd, cgroup=None):
    """Run ``cmd`` (in ``cgroup`` if given); wall time (s) and the cgroup's largest anonymous
    memory (bytes, sampled every 0.2 s; 0 without a cgroup)."""
    peak, done = [0], threading.Event()

    def sample():
        group, key = cgroup
        while not done.wait(0.2):
            for line in (group / "memory.stat").read_text().splitlines():
                name, value = line.split()
                if name == key:
                    peak[0] = max(peak[0], int(value))

    enter = None
    if cgroup is not None:
        procs = cgroup[0] / "cgroup.procs"
        enter = lambda: procs.write_text(str(os.getpid()))  # noqa: E731 (runs in the child)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=enter)
    if cgroup is not None:
        threading.Thread(target=sample, daemon=True).start()
    _, stderr = proc.communicate()
    done.set()
    if proc.returncode != 0:
        sys.exit(f"run failed (exit {proc.returncode}; -9: killed, e.g. over the memory "
                 f"limit): {stderr.strip()[-500:]}")
    return time.perf_counter() - start, peak[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(220, 220, 16))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 5.0))
    parser.add_argument("--frames", type=int, default=55)
    parser.add_argument("--frame-interval", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=10.0)
    parser.add_argument("--motion", type=float, help="simulated head motion (mm and degrees)")
    parser.add_argument("--motion-share", action="store_true",
                        help="also time a fresh run with --no-motion-correction and print the "
                             "motion correction's share of the run time")
    parser.add_argument("--memory-limit-gib", type=float)
    parser.add_argument("--keep", type=Path, help="work here and keep the data and outputs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or Path(tmp)
        make_dataset(tmp / "bids", shape=tuple(args.shape), spacing=tuple(args.spacing),
                     n_frames=args.frames, frame_interval=args.frame_interval,
                     noise_hu=args.noise, motion=args.motion)
        cmd = [sys.executable, "-m", "bids_ctp", str(tmp / "bids"), str(tmp / "out"),
               "participant", "-w", str(tmp / "work")]
        cgroup = memory_cgroup(args.memory_limit_gib) if args.memory_limit_gib else None
        try:
            fresh, anon = timed(cmd, cgroup)
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            cached, _ = timed(cmd, cgroup)
            if args.motion_share:
                still, _ = timed(cmd[:4] + [str(tmp / "out_still"), "participant", "-w",
                                            str(tmp / "work_still"), "--no-motion-correction"],
                                 cgroup)
        finally:
            if cgroup is not None:
                cgroup[0].rmdir()
    shape = "x".join(map(str, args.shape)) + f"x{args.frames}"
    limit = (f", {anon / 2**30:.1f} GiB anonymous at most, within a {args.memory_limit_gib:g} "
             "GiB cgroup limit" if cgroup else "")
    print(f"{shape} at {args.spacing} mm: fresh run {fresh:.1f} s, cached rerun {cached:.1f} s, "
          f"peak memory {peak_mb:.0f} MB{limit}")
    if args.motion_share:
        print(f"without motion correction: fresh run {still:.1f} s; the correction costs "
              f"{fresh - still:.1f} s, {100 * (fresh - still) / fresh:.0f} % of the run")


if __name__ == "__main__":
    main()
