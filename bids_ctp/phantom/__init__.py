"""Digital CT perfusion phantom: a BIDS dataset of simulated 4D CTP head scans with known answers.

A layered ellipsoidal head (scalp, skull, CSF, grey and white matter, arteries, a
sagittal sinus, an ischemic core and penumbra) is given per-tissue CBF, CBV and
delay; tissue curves follow the indicator-dilution model
``C_t = (density/kh) * CBF/6000 * (AIF(. - delay) conv R)`` with an exponential, box or linear
residue (see :mod:`bids_ctp.phantom.model` for the physics and constants and
:mod:`bids_ctp.phantom.dataset` for baselines and the truth table).  ``make_dataset``
writes the noisy int16 4D images as BIDS raw data and the CBF/CBV/MTT/Tmax/TTP truth,
labels, brain mask, AIF and VOF under ``derivatives/groundtruth``.
"""
from .dataset import make_dataset

__all__ = ["make_dataset"]
