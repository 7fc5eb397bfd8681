"""The image row band the GPU upload stages (the rest of bevfusion_ros.runtime.upload needs a GPU:
test/gpu/test_upload_gpu.py)."""
import numpy as np

from bevfusion_ros.camera.normalize import normalize_tables
from bevfusion_ros.config import ImageConfig
from bevfusion_ros.runtime.upload import source_row_band

NUSCENES = ImageConfig()


def test_row_band_covers_exactly_the_rows_normalization_reads():
    rows = normalize_tables(NUSCENES).rows
    band = source_row_band(NUSCENES)
    used = np.union1d(rows.low, rows.high)
    assert band.start == used.min() and band.stop == used.max() + 1
    assert (band.start, band.stop) == (367, 900)            # nuScenes: 59 % of the rows
