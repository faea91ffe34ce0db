"""The shipped sample run, end to end: it opens, and it shows the trend the README describes."""
from pathlib import Path

import numpy as np

from corrtools import delta_by_magnitude, open_run

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_run.zarr"


def test_sample_store_is_a_complete_run():
    ds = open_run(SAMPLE)
    assert ds.attrs["status"] == "complete" and ds.attrs["total_steps"] == 1500
    assert ds["values"].shape == (750, 1024)
    assert np.array_equal(ds["step"].values, np.arange(2, 1501, 2))


def test_sample_store_delta_grows_with_final_magnitude():
    res = delta_by_magnitude(SAMPLE, bins=4, progress=False)
    med = res["median_over_T"].values  # (param, bin), bins in increasing |w|
    assert med.shape == (4, 4)
    # in every layer the largest-|w| quarter remembers longer than the smallest-|w| quarter
    assert (med[:, -1] > med[:, 0] + 0.1).all(), med
