"""bids_ctp: quantitative CT perfusion maps from BIDS datasets."""

__version__ = "0.1.0"
