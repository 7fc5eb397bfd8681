"""Demo picture: boxes land in the right camera tiles and at the right BEV pixels."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from bevfusion_ros.analysis.visualize import (
    CLASS_COLORS,
    forward_direction,
    project_edges,
    render_visualization,
    save_visualization,
)
from bevfusion_ros.config import NUSCENES_CLASS_NAMES, PipelineConfig
from bevfusion_ros.detections import Detections
from bevfusion_ros.io import load_example_data

CONFIG = PipelineConfig()
# Default layout for 1600x900 cameras: 480x270 tiles in a 3x2 grid, a 540x540 BEV panel right of
# it showing +-54 m (0.2 m per pixel), a 36-pixel caption below.
TILE_WIDTH, TILE_HEIGHT, BEV_SIDE, CAPTION = 480, 270, 540, 36
TILES = {"FRONT_LEFT": (0, 0), "FRONT": (1, 0), "FRONT_RIGHT": (2, 0),
         "BACK_LEFT": (0, 1), "BACK": (1, 1), "BACK_RIGHT": (2, 1)}
METRES_PER_PIXEL = 108 / BEV_SIDE
# nuScenes' LIDAR_TOP frame has +y forward and +x to the right: a car 10 m ahead heading
# forward (psi = pi/2, CUDA yaw = -pi) and a pedestrian 10 m behind.
CAR_AHEAD = [0.0, 10.0, -1.0, 1.9, 4.5, 1.6, -math.pi, 0.0, 0.0, 0, 0.9]
PEDESTRIAN_BEHIND = [0.0, -10.0, -1.0, 0.7, 0.7, 1.8, 0.0, 0.0, 0.0, 8, 0.5]


@pytest.fixture(scope="module")
def frame(example_data_dir):
    return load_example_data(example_data_dir)


def detections(*rows):
    return Detections(np.array(rows, dtype=np.float32).reshape(-1, 11), NUSCENES_CLASS_NAMES)


@pytest.fixture(scope="module")
def rendered(frame):
    """(picture without boxes, picture with the two boxes)."""
    return (render_visualization(frame, detections(), CONFIG),
            render_visualization(frame, detections(CAR_AHEAD, PEDESTRIAN_BEHIND), CONFIG, note="test"))


def tile(image, name):
    column, row = TILES[name]
    return image[row * TILE_HEIGHT:(row + 1) * TILE_HEIGHT, column * TILE_WIDTH:(column + 1) * TILE_WIDTH]


def bev_panel(image):
    return image[:BEV_SIDE, 3 * TILE_WIDTH:3 * TILE_WIDTH + BEV_SIDE]


def test_size_is_stable_and_bev_front_is_the_front_camera(frame, rendered):
    empty, boxes = rendered
    assert empty.shape == boxes.shape == (2 * TILE_HEIGHT + CAPTION, 3 * TILE_WIDTH + BEV_SIDE, 3)
    assert empty.dtype == np.uint8
    assert forward_direction(frame.calibration) == (0.0, 1.0)


def test_camera_tiles_show_the_boxes_where_the_cameras_see_them(frame, rendered):
    empty, boxes = rendered
    changed = {name: np.any(tile(boxes, name) != tile(empty, name), axis=2) for name in TILES}
    assert {name for name, mask in changed.items() if mask.any()} == {"FRONT", "BACK"}
    # FRONT image untouched by boxes equals the RGB photo downscaled, in BGR.
    photo = cv2.cvtColor(cv2.resize(frame.images[0], (TILE_WIDTH, TILE_HEIGHT), interpolation=cv2.INTER_AREA),
                         cv2.COLOR_RGB2BGR)
    assert np.mean(tile(empty, "FRONT")[40:] == photo[40:]) > 0.999      # below the camera label
    for name, row, index in (("FRONT", CAR_AHEAD, 0), ("BACK", PEDESTRIAN_BEHIND, 3)):
        camera = frame.calibration.camera_names.index(name)
        u, v, depth = frame.calibration.lidar2image[camera, :3] @ [*row[:3], 1.0]
        centre = np.array([u / depth * TILE_WIDTH / 1600, v / depth * TILE_HEIGHT / 900])
        rows, columns = np.nonzero(changed[name])
        assert columns.min() < centre[0] < columns.max() and rows.min() < centre[1] < rows.max()
        assert (columns.max() - columns.min()) < 0.5 * TILE_WIDTH
        color = CLASS_COLORS[int(row[9])]
        assert np.all(tile(boxes, name) == color, axis=2).sum() > 50, f"{name}: {color} not drawn"


def test_bev_shows_footprints_at_their_positions(rendered):
    empty, boxes = rendered
    changed = np.any(bev_panel(boxes) != bev_panel(empty), axis=2)
    rows, columns = np.nonzero(changed)
    ahead = rows < BEV_SIDE / 2
    centre = BEV_SIDE / 2
    for selection, row, extent in ((ahead, CAR_AHEAD, (4.5, 1.9)), (~ahead, PEDESTRIAN_BEHIND, (0.7, 0.7))):
        expected_row = centre - row[1] / METRES_PER_PIXEL                # lidar +y is up
        half_rows, half_columns = np.array(extent) / 2 / METRES_PER_PIXEL
        assert rows[selection].min() == pytest.approx(expected_row - half_rows, abs=3)
        assert rows[selection].max() == pytest.approx(expected_row + half_rows, abs=3)
        assert columns[selection].min() == pytest.approx(centre - half_columns, abs=3)
        assert columns[selection].max() == pytest.approx(centre + half_columns, abs=3)
    # the heading line runs from the car's centre to its front edge (up), not backwards
    car_pixels = np.all(bev_panel(boxes) == CLASS_COLORS[0], axis=2)[:, int(centre)]
    car_row = int(centre - CAR_AHEAD[1] / METRES_PER_PIXEL)
    assert car_pixels[car_row - 8:car_row - 1].all() and not car_pixels[car_row + 2:car_row + 9].any()


def test_ground_truth_footprints_are_white_in_the_bev_only(frame, rendered):
    empty, _ = rendered
    truth = render_visualization(frame, detections(), CONFIG, ground_truth=detections(CAR_AHEAD))
    assert np.array_equal(truth[:, :3 * TILE_WIDTH], empty[:, :3 * TILE_WIDTH])    # cameras: no GT
    changed = np.any(bev_panel(truth) != bev_panel(empty), axis=2)
    rows, columns = np.nonzero(changed)
    centre = BEV_SIDE / 2
    expected_row = centre - CAR_AHEAD[1] / METRES_PER_PIXEL
    assert rows.min() == pytest.approx(expected_row - 4.5 / 2 / METRES_PER_PIXEL, abs=3)
    assert columns.max() == pytest.approx(centre + 1.9 / 2 / METRES_PER_PIXEL, abs=3)
    pixels = bev_panel(truth)[changed].astype(int)
    grey = pixels.max(axis=1) - pixels.min(axis=1) <= 1       # white anti-aliased (over grey/black)
    assert grey.mean() > 0.75 and pixels[grey].max() >= 240


def test_edges_behind_the_camera_are_clipped_to_the_near_plane():
    # Camera = lidar frame (z is depth), f = 100 px, principal point (50, 50); a 2 m cube around
    # the camera centre: its bottom face lies behind the camera, its vertical edges cross it.
    lidar2image = np.eye(4)
    lidar2image[:3, :3] = [[100, 0, 50], [0, 100, 50], [0, 0, 1]]
    cube = detections([0, 0, 0, 2, 2, 2, -math.pi / 2, 0, 0, 0, 1])     # psi = 0: length along x
    segments, visible = project_edges(cube.corners_lidar(), lidar2image)
    np.testing.assert_array_equal(visible[0], [False] * 4 + [True] * 8)
    # edge 8 joins corner 0 (1, 1, -1) to corner 4 (1, 1, 1): clipped start at depth 0.1
    np.testing.assert_allclose(segments[0, 8], [[1050, 1050], [150, 150]], atol=1e-9)
    np.testing.assert_allclose(segments[0, 4], [[150, 150], [150, -50]], atol=1e-9)   # top face, z = 1
    assert np.isfinite(segments[visible]).all()


def test_png_is_written_and_reads_back_identically(frame, tmp_path):
    dets = detections(CAR_AHEAD)
    path = tmp_path / "demo.png"
    save_visualization(path, frame, dets, CONFIG, note="UNTRAINED weights")
    np.testing.assert_array_equal(cv2.imread(str(path)),
                                  render_visualization(frame, dets, CONFIG, note="UNTRAINED weights"))
    with pytest.raises(OSError, match="cannot write visualization"):
        save_visualization(tmp_path / "missing" / "demo.png", frame, dets, CONFIG)
