"""What the nipype interfaces report about the processing they did."""
import nibabel as nb
import numpy as np

from bids_ctp.interfaces.perfusion import SmoothCTP
from bids_ctp.phantom.model import gamma_variate


def test_smoothing_reports_the_guide_channels_it_used(tmp_path):
    """A series without a bolus (noise around 35 HU) is smoothed with the constant channel
    alone, and says so (the sidecars' SmoothingGuideChannels); one with a bolus uses all
    three."""
    rng = np.random.default_rng(3)
    t = np.arange(20.0)
    for bolus_hu, channels in ((0.0, 1), (20.0, 3)):
        data = 35.0 + bolus_hu * gamma_variate(t, 4.0, 3.0, 1.5) + rng.normal(0, 5, (12, 12, 2, 20))
        path = tmp_path / f"series_{channels}.nii"
        nb.save(nb.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
        result = SmoothCTP(in_file=str(path), frame_times=list(t), sigma_mm=1.0).run(
            cwd=str(tmp_path))
        assert result.outputs.guide_channels == channels
