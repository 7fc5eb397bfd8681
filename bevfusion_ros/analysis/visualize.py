"""Demo picture in the style of CUDA-BEVFusion's ``cuda-bevfusion.jpg`` (spec 7.2), OpenCV only.

Layout (BGR uint8): the camera images downscaled in a 3-column grid (nuScenes rigs: FRONT_LEFT,
FRONT, FRONT_RIGHT on top, BACK_LEFT, BACK, BACK_RIGHT below) with every box's 12 edges
projected through ``lidar2image``; right of it a square bird's-eye view of the lidar points
(coloured by height) with a 10 m grid, the ego vehicle and each box as its footprint plus a
heading line, turned so that the front camera looks up (nuScenes' lidar has +y forward, a
REP-103 lidar +x); below both a caption (score threshold, number of boxes,
a note such as "UNTRAINED weights", the classes present in their colours).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.detections import Detections
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.frame import Frame

# Grid position of the nuScenes cameras, row-major; other cameras follow in calibration order.
DEMO_CAMERA_GRID = ("FRONT_LEFT", "FRONT", "FRONT_RIGHT", "BACK_LEFT", "BACK", "BACK_RIGHT")
GRID_COLUMNS = 3
# Per class index (BGR), matplotlib's tab10 with its grey swapped for gold; cycles beyond 10.
CLASS_COLORS = ((180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
                (75, 86, 140), (194, 119, 227), (0, 215, 255), (34, 189, 188), (207, 190, 23))
# The 12 edges of a box over the corner order of Detections.corners_lidar.
BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4),
             (0, 4), (1, 5), (2, 6), (3, 7))
NEAR_PLANE_M = 0.1          # box edges are clipped to camera depth >= this
GRID_STEP_M = 10.0
EGO_SIZE_M = (4.0, 1.8)     # length, width of the ego marker
CAPTION_HEIGHT = 36
FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, GRID_GREY = (255, 255, 255), (70, 70, 70)


@dataclass(frozen=True)
class Rect:
    """Pixel rectangle: top-left (x, y) and size."""

    x: int
    y: int
    width: int
    height: int

    def view(self, canvas: np.ndarray) -> np.ndarray:
        """The part of ``canvas`` ``[H, W, 3]`` this rectangle covers (a writable view)."""
        return canvas[self.y:self.y + self.height, self.x:self.x + self.width]


@dataclass(frozen=True)
class VisualizationLayout:
    """Where everything goes on the canvas.

    camera_tiles: camera name -> tile; bev: the square BEV panel showing lidar x, y in
    [-bev_range_m, bev_range_m] with the lidar-frame unit vector ``forward`` pointing up;
    caption: the text band at the bottom.
    """

    camera_tiles: dict[str, Rect]
    bev: Rect
    caption: Rect
    bev_range_m: float
    forward: tuple[float, float] = (1.0, 0.0)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the canvas."""
        return self.caption.y + self.caption.height, self.bev.x + self.bev.width

    def bev_pixels(self, xy: np.ndarray) -> np.ndarray:
        """Lidar (x, y) ``[..., 2]`` metres -> (column, row) ``[..., 2]`` float pixels inside the
        BEV panel (add ``bev.x``, ``bev.y`` for canvas pixels): ``forward`` up, its left
        (counter-clockwise normal) to the left, the lidar origin at the centre."""
        forward_x, forward_y = self.forward
        ahead = xy[..., 0] * forward_x + xy[..., 1] * forward_y
        left = xy[..., 1] * forward_x - xy[..., 0] * forward_y
        metres_per_pixel = 2 * self.bev_range_m / self.bev.width
        return np.stack([(self.bev_range_m - left) / metres_per_pixel,
                         (self.bev_range_m - ahead) / metres_per_pixel], axis=-1)

    def lidar_xy(self, ahead: np.ndarray, left: np.ndarray) -> np.ndarray:
        """Lidar (x, y) ``[..., 2]`` of points given ``ahead`` along ``forward`` and ``left`` of it."""
        forward_x, forward_y = self.forward
        return np.stack([ahead * forward_x - left * forward_y, ahead * forward_y + left * forward_x],
                        axis=-1)


def grid_order(camera_names: Sequence[str]) -> list[str]:
    """Cameras in grid order: the demo layout for the nuScenes names, then the rest."""
    def position(name: str) -> tuple[int, int]:
        known = name in DEMO_CAMERA_GRID
        return (0, DEMO_CAMERA_GRID.index(name)) if known else (1, list(camera_names).index(name))
    return sorted(camera_names, key=position)


def forward_direction(calibration: Calibration) -> tuple[float, float]:
    """The lidar axis (+-x or +-y) closest to the FRONT camera's (else camera 0's) optical axis."""
    names = calibration.camera_names
    index = names.index("FRONT") if "FRONT" in names else 0
    axis_x, axis_y = calibration.camera2lidar[index, :2, 2]             # camera +z in the lidar frame
    if abs(axis_x) >= abs(axis_y):
        return float(np.sign(axis_x)), 0.0
    return 0.0, float(np.sign(axis_y))


def make_layout(camera_names: Sequence[str], image_size: tuple[int, int], bev_range_m: float,
                forward: tuple[float, float] = (1.0, 0.0), camera_width: int = 480
                ) -> VisualizationLayout:
    """Layout for cameras of ``image_size`` (width, height) drawn ``camera_width`` pixels wide."""
    camera_height = round(camera_width * image_size[1] / image_size[0])
    tiles = {name: Rect((index % GRID_COLUMNS) * camera_width, (index // GRID_COLUMNS) * camera_height,
                        camera_width, camera_height)
             for index, name in enumerate(grid_order(camera_names))}
    grid_height = math.ceil(len(camera_names) / GRID_COLUMNS) * camera_height
    bev = Rect(GRID_COLUMNS * camera_width, 0, grid_height, grid_height)
    caption = Rect(0, grid_height, bev.x + bev.width, CAPTION_HEIGHT)
    return VisualizationLayout(tiles, bev, caption, bev_range_m, forward)


def class_color(label: int) -> tuple[int, int, int]:
    """BGR colour of a class index."""
    return CLASS_COLORS[label % len(CLASS_COLORS)]


def project_edges(corners: np.ndarray, lidar2image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box edges in original-image pixels, clipped to the near plane.

    corners ``[M, 8, 3]`` lidar frame, lidar2image ``[4, 4]`` -> (segments ``[M, 12, 2, 2]``
    as (u, v) of both ends, visible ``[M, 12]`` bool: some part lies in front of the camera).
    """
    homogeneous = corners @ lidar2image[:3, :3].T + lidar2image[:3, 3]       # (u d, v d, d)
    edges = np.array(BOX_EDGES)
    start, end = homogeneous[:, edges[:, 0]], homogeneous[:, edges[:, 1]]   # [M, 12, 3]
    depth_start, depth_end = start[..., 2:], end[..., 2:]
    visible = (depth_start[..., 0] >= NEAR_PLANE_M) | (depth_end[..., 0] >= NEAR_PLANE_M)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip((NEAR_PLANE_M - depth_start) / (depth_end - depth_start), 0.0, 1.0)
    # Move the end behind the near plane onto it (a straight 3D segment stays straight).
    clipped_start = np.where(depth_start < NEAR_PLANE_M, start + t * (end - start), start)
    clipped_end = np.where(depth_end < NEAR_PLANE_M, start + t * (end - start), end)
    segments = np.stack([clipped_start, clipped_end], axis=2)               # [M, 12, 2, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        pixels = segments[..., :2] / segments[..., 2:]
    return pixels, visible


def draw_camera(image_rgb: np.ndarray, lidar2image: np.ndarray, detections: Detections,
                corners: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One camera tile ``[height, width, 3]`` BGR of ``size`` (width, height) with box edges."""
    tile = cv2.cvtColor(cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    scale = np.array([size[0] / image_rgb.shape[1], size[1] / image_rgb.shape[0]])
    segments, visible = project_edges(corners, lidar2image)
    for index in reversed(range(len(detections))):                    # best box drawn last
        color = class_color(int(detections.labels[index]))
        for (start, end), shown in zip(segments[index] * scale, visible[index]):
            if shown:
                cv2.line(tile, tuple(np.round(start).astype(int)), tuple(np.round(end).astype(int)),
                         color, 2, cv2.LINE_AA)
    return tile


def draw_bev_points(panel: np.ndarray, layout: VisualizationLayout, points: np.ndarray,
                    z_range: tuple[float, float]) -> None:
    """Lidar points ``[N, >=3]`` as single pixels coloured by height (turbo over ``z_range``)."""
    pixels = np.floor(layout.bev_pixels(points[:, :2])).astype(np.int64)
    inside = ((pixels[:, 0] >= 0) & (pixels[:, 0] < panel.shape[1])
              & (pixels[:, 1] >= 0) & (pixels[:, 1] < panel.shape[0]))
    heights = points[inside, 2]
    order = np.argsort(heights, kind="stable")                          # higher points on top
    levels = np.clip((heights[order] - z_range[0]) / (z_range[1] - z_range[0]) * 255, 0, 255)
    colors = cv2.applyColorMap(levels.astype(np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0]
    panel[pixels[inside][order, 1], pixels[inside][order, 0]] = colors


def draw_bev_grid(panel: np.ndarray, layout: VisualizationLayout) -> None:
    """Lines every GRID_STEP_M metres (through the origin) and the ego vehicle."""
    limit = layout.bev_range_m
    steps = int(limit // GRID_STEP_M)
    for offset in np.arange(-steps, steps + 1) * GRID_STEP_M:
        for line in (((offset, -limit), (offset, limit)), ((-limit, offset), (limit, offset))):
            start, end = np.round(layout.bev_pixels(np.array(line, dtype=np.float64))).astype(int)
            cv2.line(panel, tuple(start), tuple(end), GRID_GREY, 1)
    length, width = EGO_SIZE_M
    ego = layout.lidar_xy(np.array([1, 1, -1, -1, 0]) * length / 2,
                          np.array([1, -1, -1, 1, 0]) * width / 2)     # 4 corners, then the centre
    pixels = np.round(layout.bev_pixels(ego)).astype(np.int32)
    cv2.polylines(panel, [pixels[:4]], True, WHITE, 1)
    cv2.line(panel, tuple(pixels[4]), tuple((pixels[0] + pixels[1]) // 2), WHITE, 1)


def draw_bev_boxes(panel: np.ndarray, layout: VisualizationLayout, detections: Detections,
                   corners: np.ndarray, color: tuple[int, int, int] | None = None,
                   thickness: int = 2) -> None:
    """Each box's footprint and a line from its centre to the middle of its front edge, in its
    class colour (or ``color``)."""
    footprints = layout.bev_pixels(corners[:, :4, :2])                  # [M, 4, 2]
    fronts = layout.bev_pixels((corners[:, 0, :2] + corners[:, 1, :2]) / 2)
    centres = footprints.mean(axis=1)
    for index in reversed(range(len(detections))):
        box_color = color if color is not None else class_color(int(detections.labels[index]))
        cv2.polylines(panel, [np.round(footprints[index]).astype(np.int32)], True, box_color,
                      thickness, cv2.LINE_AA)
        cv2.line(panel, tuple(np.round(centres[index]).astype(int)),
                 tuple(np.round(fronts[index]).astype(int)), box_color, thickness, cv2.LINE_AA)


def draw_label(canvas: np.ndarray, text: str, origin: tuple[int, int],
               color: tuple[int, int, int] = WHITE) -> None:
    """Text with a black outline, readable on any background."""
    cv2.putText(canvas, text, origin, FONT, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, origin, FONT, 0.6, color, 1, cv2.LINE_AA)


def draw_caption(canvas: np.ndarray, layout: VisualizationLayout, detections: Detections,
                 score_threshold: float, note: str) -> None:
    """Threshold, box count and note on the left; the classes present in their colours."""
    rect = layout.caption
    baseline = rect.y + rect.height - 12
    text = f"score >= {score_threshold:.2f}   {len(detections)} boxes" + (f"   {note}" if note else "")
    draw_label(canvas, text, (rect.x + 10, baseline))
    x = rect.x + 20 + cv2.getTextSize(text, FONT, 0.6, 1)[0][0]
    for label in sorted(set(detections.labels.tolist())):
        name = detections.class_names[label]
        x += 20
        draw_label(canvas, name, (x, baseline), class_color(label))
        x += cv2.getTextSize(name, FONT, 0.6, 1)[0][0]


def render_visualization(frame: Frame, detections: Detections, config: PipelineConfig,
                         note: str = "", camera_width: int = 480,
                         ground_truth: Detections | None = None) -> np.ndarray:
    """The demo picture of ``frame`` with ``detections``: BGR uint8 ``[H, W, 3]``.

    The canvas size depends only on the camera count, the first image's aspect ratio and
    ``camera_width``; the BEV shows the voxelization range, and ``ground_truth`` boxes (when
    given) as thin white footprints under the detections.
    """
    calibration = frame.calibration
    voxel = config.voxelization
    bev_range = max(abs(v) for v in (*voxel.point_range_min[:2], *voxel.point_range_max[:2]))
    first = frame.images[0]
    layout = make_layout(calibration.camera_names, (first.shape[1], first.shape[0]), bev_range,
                         forward_direction(calibration), camera_width)
    canvas = np.zeros((*layout.size, 3), dtype=np.uint8)
    corners = detections.corners_lidar()
    for index, name in enumerate(calibration.camera_names):
        rect = layout.camera_tiles[name]
        rect.view(canvas)[:] = draw_camera(frame.images[index], calibration.lidar2image[index],
                                           detections, corners, (rect.width, rect.height))
        draw_label(canvas, name, (rect.x + 8, rect.y + 22))
    panel = layout.bev.view(canvas)
    draw_bev_grid(panel, layout)
    draw_bev_points(panel, layout, frame.points, (voxel.point_range_min[2], voxel.point_range_max[2]))
    if ground_truth is not None:
        draw_bev_boxes(panel, layout, ground_truth, ground_truth.corners_lidar(), WHITE, 1)
    draw_bev_boxes(panel, layout, detections, corners)
    draw_caption(canvas, layout, detections, config.head.score_threshold, note)
    return canvas


def save_visualization(path: str | Path, frame: Frame, detections: Detections,
                       config: PipelineConfig, note: str = "",
                       ground_truth: Detections | None = None) -> None:
    """Render (see :func:`render_visualization`) and write a PNG to ``path``."""
    image = render_visualization(frame, detections, config, note, ground_truth=ground_truth)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write visualization to {path}")
