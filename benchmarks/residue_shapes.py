"""How the default fit (``nlr``) copes with tissue whose residue is, or is not, one of its families.

Tissue curves for MTT 2, 4, 6, 8, 12 s × delay 0, 1.5, 3 s (CBV 4 mL/100g, 40 noisy copies of
each, white noise of ``--noise`` HU, about what is left after smoothing) are made with a true
residue R(t; MTT) of a given shape; the scan's family is chosen by ``select_residue_shape`` and
every curve fitted with it. Prints, per true shape, the family chosen and the median CBF and MTT
error (%) at each MTT. Shapes: gamma-distributed transit times (shape k; k = 1 is the exponential
residue), box, linear, "plug" (a plug flow over a fraction of MTT, then exponential washout) and
log-normal transit times (sigma).

Usage: python benchmarks/residue_shapes.py [--interval S] [--noise HU]
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy.special import gammaincc
from scipy.stats import lognorm

from bids_ctp.perfusion import deconvolution as dc
from bids_ctp.phantom.model import CONSTANTS, arterial_input

MTTS = (2.0, 4.0, 6.0, 8.0, 12.0)
DELAYS = (0.0, 1.5, 3.0)
COPIES, CBV, FINE_DT = 40, 4.0, 0.01


def true_residue(shape: str, tau: np.ndarray, mtt: float) -> np.ndarray:
    kind, _, value = shape.partition(":")
    if kind == "gamma":
        k = float(value)
        return gammaincc(k, k * tau / mtt)
    if kind == "box":
        return (tau < mtt).astype(float)
    if kind == "linear":
        return np.clip(1.0 - tau / (2.0 * mtt), 0.0, 1.0)
    if kind == "plug":  # plug flow over a fraction f of MTT, then exponential washout
        f = float(value)
        return np.where(tau < f * mtt, 1.0, np.exp(-(tau - f * mtt) / ((1.0 - f) * mtt)))
    if kind == "lognormal":
        sigma = float(value)
        return lognorm.sf(tau, sigma, scale=mtt * np.exp(-0.5 * sigma ** 2))
    raise ValueError(shape)


SHAPES = ("gamma:1", "gamma:1.5", "gamma:2", "gamma:3", "gamma:4", "gamma:6", "gamma:10", "box",
          "linear", "plug:0.3", "plug:0.5", "lognormal:0.3", "lognormal:0.6", "lognormal:1.0")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=1.0, help="s between frames")
    parser.add_argument("--noise", type=float, default=0.5, help="HU per frame")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    times = np.arange(0.0, 55.0, args.interval)
    aif = arterial_input(times)
    fine = np.arange(0.0, 80.0, FINE_DT)
    aif_fine = arterial_input(fine)
    scale = CONSTANTS.density / CONSTANTS.kh / 100.0
    print(f"every {args.interval:g} s, {args.noise:g} HU; CBF / MTT median error (%) at MTT "
          + " ".join(f"{m:g}" for m in MTTS) + " s")
    for shape in SHAPES:
        curves, flows, mtts = [], [], []
        for mtt in MTTS:
            r = true_residue(shape, fine, mtt)
            flow = CBV * scale / (r.sum() * FINE_DT)  # k_max such that its area is CBV·rho/kH
            tissue = flow * np.convolve(aif_fine, r)[: fine.size] * FINE_DT
            for delay in DELAYS:
                clean = np.interp(times - delay, fine, tissue, left=0.0)
                curves.append(clean + rng.normal(0.0, args.noise, (COPIES, times.size)))
                flows += [flow] * COPIES
                mtts += [mtt] * COPIES
        curves, flows, mtts = np.concatenate(curves).astype(np.float32), np.array(flows), np.array(mtts)
        family, _ = dc.select_residue_shape(curves, times, times, aif)
        flow, _, mtt = dc.fit_model(curves, times, times, aif, shape=family)
        cbf_err = [np.median(100 * (flow / flows - 1)[mtts == m]) for m in MTTS]
        mtt_err = [np.median(100 * (mtt / mtts - 1)[mtts == m]) for m in MTTS]
        print(f"{shape:14s} -> {family:11s} CBF " + " ".join(f"{e:+5.1f}" for e in cbf_err)
              + " | MTT " + " ".join(f"{e:+5.1f}" for e in mtt_err), flush=True)


if __name__ == "__main__":
    main()
