"""Perfusion maps in physical units from deconvolution results.

With k(t) = (rho / kH) · F · R(t) from deconvolution (F in mL blood per mL... per g per s):

- CBF [mL/100 g/min] = max k · kH / rho · 100 · 60
- CBV [mL/100 g]     = kH / rho · 100 · ∫k dt (model fit: k_max · MTT)
  (equivalently kH / rho · 100 · ∫C_t / ∫C_a for complete curves)
- MTT [s]            = CBV / CBF · 60 (central volume theorem)
- Tmax [s]           = time of the maximum of k, relative to the AIF
- TTP [s]            = time of the maximum of the tissue curve, from the scan start

rho = brain density (g/mL, default 1.05); kH = (1 - Hct_large) / (1 - Hct_small), default 0.73,
corrects for the lower haematocrit in capillaries (contrast stays in plasma).
Outside the brain mask every map is 0.
"""
from __future__ import annotations

import numpy as np

DEFAULT_DENSITY = 1.05  # g/mL
DEFAULT_KH = 0.73
UNITS = {"cbf": "mL/100g/min", "cbv": "mL/100g", "mtt": "s", "tmax": "s", "ttp": "s"}
DESCRIPTIONS = {
    "cbf": "Cerebral blood flow",
    "cbv": "Cerebral blood volume",
    "mtt": "Mean transit time (CBV / CBF)",
    "tmax": "Time to maximum of the residue function (delay relative to the AIF)",
    "ttp": ("Time to peak of the enhancement curve (nlr: of the fitted model curve; SVD methods: "
            "of the smoothed curve), from the start of the first frame"),
}


def perfusion_maps(flow, area, tmax, ttp, density=DEFAULT_DENSITY, kh=DEFAULT_KH) -> dict:
    """Physical maps from per-voxel ``flow`` = max k (1/s), ``area`` = ∫k dt, ``tmax``, ``ttp``.

    Inputs are 1D arrays over brain voxels (or any shape); returns float32 arrays, same shape.
    Negative flow or area (noise in non-perfused voxels such as CSF) is set to 0.
    """
    scale = kh / density * 100.0
    cbf = np.clip(np.asarray(flow, np.float64), 0, None) * scale * 60.0
    cbv = np.clip(np.asarray(area, np.float64), 0, None) * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        mtt = np.where(cbf > 0, 60.0 * cbv / cbf, 0.0)
    return {
        "cbf": cbf.astype(np.float32),
        "cbv": cbv.astype(np.float32),
        "mtt": mtt.astype(np.float32),
        "tmax": np.asarray(tmax, np.float32),
        "ttp": np.asarray(ttp, np.float32),
    }
