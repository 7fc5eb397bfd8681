"""Deterministic synthetic driving scenes: boxes on a ground plane, a ray-cast lidar sweep and
the rendered images of a camera rig (default: the six cameras of :data:`~bevfusion_ros.sim.rig.SYNTHETIC_RIG`;
any :class:`~bevfusion_ros.io.rig.Rig`), in the lidar frame of :mod:`bevfusion_ros.sim.rig`.

* :func:`generate_scene` ``(seed, num_objects=None)`` samples objects of the ten nuScenes
  classes and builds everything from them; the same seed gives identical arrays.
* :func:`build_scene` does the sensor part for given boxes (tests, hand-made scenes).
* :func:`cast_rays` is the vectorised ray caster (oriented-box slab test + ground plane).
* :func:`write_example_folder` writes a CUDA-BEVFusion example-data folder that
  :func:`bevfusion_ros.io.frame.load_example_data` reads.

Boxes use CUDA-BEVFusion's layout ``x, y, z, w, l, h, yaw, vx, vy`` (:mod:`bevfusion_ros.detections`):
z is the box centre (boxes rest on the ground, so ``z = GROUND_Z + h / 2``), l is the extent
along the REP-103 heading ``psi = -yaw - pi/2``, w across it; the velocity points along psi.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from bevfusion_ros.config import NUSCENES_CLASS_NAMES, ImageConfig
from bevfusion_ros.detections import VX, VY, YAW, H, L, W, X, Y, Z, cuda_yaw, rep103_heading
from bevfusion_ros.head.decode import BOX_COLUMNS
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.io.rig import Rig
from bevfusion_ros.io.tensor import write_tensor
from bevfusion_ros.sim.rig import GROUND_Z, IMAGE_HEIGHT, IMAGE_WIDTH, SYNTHETIC_RIG, lidar2ego, rig_calibration

# ----------------------------------------------------------------------------- constants
MAX_RANGE = 70.0                 # m, lidar
SWEEP_PERIOD_S = 0.05            # s between lidar sweeps (20 Hz, as nuScenes' LIDAR_TOP)
MAX_OBJECT_DISTANCE = 50.0       # m, object centres
MIN_EGO_CLEARANCE = 3.0          # m, between the lidar origin and any object footprint
OBJECT_GAP = 0.5                 # m, minimum gap between footprints
BEAM_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)   # HDL-32E-like, 1.33 deg apart
DEFAULT_AZIMUTH_STEPS = 1080
NEAR_PLANE = 0.1                 # m, camera near plane
GROUND_INDEX, MISS_INDEX = -1, -2  # cast_rays' index for the ground and for no hit

# Shading of a box face: AMBIENT + DIFFUSE * max(0, normal . SUN) times the class colour.
SUN_DIRECTION = np.array([0.45, 0.35, 0.82]) / np.linalg.norm([0.45, 0.35, 0.82])
AMBIENT, DIFFUSE = 0.5, 0.5
SKY_HORIZON = np.array([205.0, 218.0, 235.0])
SKY_ZENITH = np.array([70.0, 125.0, 205.0])
GROUND_GRAY = 105.0
FOG_DISTANCE = 120.0             # m, e-folding distance of the ground's blend into the haze


@dataclass(frozen=True)
class ClassSpec:
    """How objects of one class are sampled, drawn and seen by the lidar.

    size: (length along the heading, width, height) in metres, jittered by ``jitter`` (relative
    std, clipped to +-2 std); max_speed 0 means a static class; aligned: probability that the
    heading follows the road (the lidar x axis, either direction) plus ``aligned_offset``.
    """

    size: tuple[float, float, float]
    jitter: float
    max_speed: float
    weight: float
    color: tuple[int, int, int]
    intensity: float
    aligned: float = 0.7
    aligned_offset: float = 0.0


CLASS_SPECS: dict[str, ClassSpec] = {
    "car": ClassSpec((4.6, 1.9, 1.7), 0.08, 14.0, 0.34, (210, 30, 30), 45.0),
    "truck": ClassSpec((7.0, 2.5, 3.0), 0.12, 12.0, 0.08, (230, 140, 20), 55.0),
    "construction_vehicle": ClassSpec((6.5, 2.8, 3.2), 0.12, 2.0, 0.03, (235, 215, 0), 70.0, 0.3),
    "bus": ClassSpec((11.0, 2.9, 3.5), 0.06, 12.0, 0.04, (30, 70, 190), 50.0, 0.9),
    "trailer": ClassSpec((10.0, 2.6, 3.6), 0.10, 10.0, 0.03, (120, 60, 160), 35.0, 0.8),
    "barrier": ClassSpec((0.5, 2.5, 1.0), 0.05, 0.0, 0.12, (255, 140, 200), 110.0, 0.9, np.pi / 2),
    "motorcycle": ClassSpec((2.1, 0.8, 1.5), 0.08, 12.0, 0.04, (0, 160, 160), 55.0),
    "bicycle": ClassSpec((1.75, 0.6, 1.3), 0.08, 6.0, 0.05, (80, 200, 50), 30.0),
    "pedestrian": ClassSpec((0.7, 0.7, 1.75), 0.08, 1.8, 0.20, (200, 50, 220), 20.0, 0.2),
    "traffic_cone": ClassSpec((0.4, 0.4, 1.0), 0.06, 0.0, 0.07, (255, 80, 0), 200.0, 0.0),
}
MOVING_PROBABILITY = 0.6          # chance that an object of a non-static class moves

# Corners in units of (l/2, w/2, h/2) in the box frame (x along the heading, y left, z up), the
# order of Detections.corners_lidar: bottom front-left, front-right, rear-right, rear-left, then top.
UNIT_CORNERS = np.array([[1, 1, -1], [1, -1, -1], [-1, -1, -1], [-1, 1, -1],
                         [1, 1, 1], [1, -1, 1], [-1, -1, 1], [-1, 1, 1]], dtype=np.float64)
# Faces as corner indices, and their outward normals in the box frame.
FACES = np.array([[0, 1, 5, 4], [2, 3, 7, 6], [3, 0, 4, 7], [1, 2, 6, 5], [4, 5, 6, 7], [0, 3, 2, 1]])
FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                        dtype=np.float64)


@dataclass(frozen=True)
class Scene:
    """One synthetic frame.

    images:        one ``[H, W, 3]`` uint8 RGB image per camera of the rig, calibration order
                   (the default rig: six ``[900, 1600, 3]``);
    points:        float32 ``[N, 5]`` x, y, z, intensity (0-255, integer valued), time lag (s;
                   0 in the current sweep, k * SWEEP_PERIOD_S in past sweep k);
    point_objects: int32 ``[N]`` index of the box each point hit, -1 for the ground;
    calibration:   the rig's (:func:`bevfusion_ros.sim.rig.rig_calibration`);
    gt_boxes:      float32 ``[M, 9]`` x, y, z (centre), w, l, h, yaw, vx, vy (CUDA layout);
    gt_labels:     int64 ``[M]`` indices into ``class_names``.
    """

    seed: int
    images: list[np.ndarray]
    points: np.ndarray
    point_objects: np.ndarray
    calibration: Calibration
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    class_names: tuple[str, ...] = NUSCENES_CLASS_NAMES

    @property
    def token(self) -> str:
        return f"synthetic-seed-{self.seed}"

    def to_frame(self) -> Frame:
        """The scene as a :class:`Frame` (what ``load_example_data`` returns, minus JPEG loss)."""
        return Frame(images=list(self.images), points=self.points, calibration=self.calibration,
                     token=self.token)

    def class_counts(self) -> dict[str, int]:
        """Objects per class name (classes without objects left out), in class order."""
        counts = np.bincount(self.gt_labels, minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, counts) if count}


# ----------------------------------------------------------------------------- box geometry
def box_headings(boxes: np.ndarray) -> np.ndarray:
    """REP-103 heading psi ``[M]`` of CUDA-layout boxes."""
    return rep103_heading(np.asarray(boxes, dtype=np.float64)[:, YAW])


def box_rotations(boxes: np.ndarray) -> np.ndarray:
    """Box frame -> lidar frame rotations ``[M, 3, 3]`` (about z by the heading)."""
    heading = box_headings(boxes)
    cos, sin = np.cos(heading), np.sin(heading)
    rotations = np.zeros((len(heading), 3, 3))
    rotations[:, 0, 0], rotations[:, 0, 1] = cos, -sin
    rotations[:, 1, 0], rotations[:, 1, 1] = sin, cos
    rotations[:, 2, 2] = 1.0
    return rotations


def box_half_extents(boxes: np.ndarray) -> np.ndarray:
    """Half extents ``[M, 3]`` along the box frame's x (length), y (width), z (height)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return boxes[:, [L, W, H]] / 2


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """Corners ``[M, 8, 3]`` in the lidar frame (order of :data:`UNIT_CORNERS`)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    local = UNIT_CORNERS[None] * box_half_extents(boxes)[:, None]
    return np.einsum("mij,mkj->mki", box_rotations(boxes), local) + boxes[:, None, :3]


def face_normals(boxes: np.ndarray) -> np.ndarray:
    """Outward face normals ``[M, 6, 3]`` in the lidar frame (order of :data:`FACES`)."""
    return np.einsum("mij,fj->mfi", box_rotations(boxes), FACE_NORMALS)


def face_shades(normals: np.ndarray) -> np.ndarray:
    """Brightness factor per face normal: AMBIENT + DIFFUSE * max(0, n . SUN_DIRECTION)."""
    return AMBIENT + DIFFUSE * np.maximum(0.0, normals @ SUN_DIRECTION)


def box_face_colors(boxes: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str] = NUSCENES_CLASS_NAMES) -> np.ndarray:
    """RGB colour ``[M, 6, 3]`` uint8 of each face: the class colour scaled by the face's shade."""
    colors = np.array([CLASS_SPECS[class_names[label]].color for label in labels],
                      dtype=np.float64).reshape(-1, 3)
    shaded = colors[:, None, :] * face_shades(face_normals(boxes))[..., None]
    return np.clip(np.round(shaded), 0, 255).astype(np.uint8)


def _footprint(x: float, y: float, heading: float, length: float, width: float,
               margin: float = 0.0) -> np.ndarray:
    """Footprint rectangle ``[4, 2]`` grown by ``margin`` on every side."""
    cos, sin = np.cos(heading), np.sin(heading)
    half_l, half_w = length / 2 + margin, width / 2 + margin
    local = np.array([[half_l, half_w], [half_l, -half_w], [-half_l, -half_w], [-half_l, half_w]])
    return local @ np.array([[cos, sin], [-sin, cos]]) + (x, y)


def _rectangles_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating-axis test of two convex quadrilaterals ``[4, 2]``."""
    for polygon in (a, b):
        for index in range(2):
            edge = polygon[index + 1] - polygon[index]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() < pb.min() or pb.max() < pa.min():
                return False
    return True


# ----------------------------------------------------------------------------- objects
def sample_objects(rng: np.random.Generator, num_objects: int,
                   class_names: Sequence[str] = NUSCENES_CLASS_NAMES,
                   max_attempts: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Sample up to ``num_objects`` non-overlapping boxes resting on the ground.

    Returns float32 boxes ``[M, 9]`` (CUDA layout) and int64 labels ``[M]``. Centres lie within
    :data:`MAX_OBJECT_DISTANCE` of the lidar, footprints at least :data:`MIN_EGO_CLEARANCE` from
    it and :data:`OBJECT_GAP` from each other; an object that finds no free place in
    ``max_attempts`` tries is dropped (only happens in very crowded scenes).
    """
    unknown = [name for name in class_names if name not in CLASS_SPECS]
    if unknown:
        raise ValueError(f"no synthetic object model for classes {unknown}; known: {list(CLASS_SPECS)}")
    specs = [CLASS_SPECS[name] for name in class_names]
    weights = np.array([spec.weight for spec in specs])
    weights /= weights.sum()
    boxes: list[list[float]] = []
    labels: list[int] = []
    footprints: list[np.ndarray] = []
    for _ in range(num_objects):
        label = int(rng.choice(len(specs), p=weights))
        spec = specs[label]
        scale = 1.0 + spec.jitter * np.clip(rng.standard_normal(3), -2.0, 2.0)
        length, width, height = (np.array(spec.size) * scale).tolist()
        if rng.random() < spec.aligned:
            heading = float(spec.aligned_offset + np.pi * rng.integers(2) + 0.08 * rng.standard_normal())
        else:
            heading = float(rng.uniform(-np.pi, np.pi))
        speed = rng.uniform(0.2, spec.max_speed) if spec.max_speed > 0 and \
            rng.random() < MOVING_PROBABILITY else 0.0
        radius_bound = MIN_EGO_CLEARANCE + np.hypot(length, width) / 2
        for _attempt in range(max_attempts):
            radius = rng.uniform(radius_bound, MAX_OBJECT_DISTANCE)
            azimuth = rng.uniform(-np.pi, np.pi)
            x, y = radius * np.cos(azimuth), radius * np.sin(azimuth)
            footprint = _footprint(x, y, heading, length, width, OBJECT_GAP / 2)
            if not any(_rectangles_overlap(footprint, other) for other in footprints):
                break
        else:
            continue
        footprints.append(footprint)
        yaw = float(cuda_yaw(heading))
        boxes.append([x, y, GROUND_Z + height / 2, width, length, height, yaw,
                      speed * np.cos(heading), speed * np.sin(heading)])
        labels.append(label)
    boxes_array = np.array(boxes, dtype=np.float32).reshape(-1, 9)
    # Re-seat on the ground after the float32 rounding of z and h.
    boxes_array[:, Z] = np.float32(GROUND_Z) + boxes_array[:, H] / np.float32(2)
    return boxes_array, np.array(labels, dtype=np.int64)


# ----------------------------------------------------------------------------- ray casting
def cast_rays(directions: np.ndarray, boxes: np.ndarray, origin: Sequence[float] = (0.0, 0.0, 0.0),
              ground_z: float = GROUND_Z, max_range: float = MAX_RANGE
              ) -> tuple[np.ndarray, np.ndarray]:
    """First hit of rays ``origin + t * direction`` (``directions`` ``[R, 3]``, unit length).

    Tests the ground plane ``z = ground_z`` (seen from above) and every oriented box (slab test in
    the box frame; the origin must lie outside the boxes). Returns float64 distances ``[R]``
    (inf for no hit within ``max_range``) and int64 indices ``[R]``: the box index,
    :data:`GROUND_INDEX` or :data:`MISS_INDEX`.
    """
    directions = np.asarray(directions, dtype=np.float64)
    start = np.asarray(origin, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    count = len(directions)
    distance = np.full(count, np.inf)
    index = np.full(count, MISS_INDEX, dtype=np.int64)
    if start[2] > ground_z:
        down = directions[:, 2] < 0
        distance[down] = (ground_z - start[2]) / directions[down, 2]
        index[down] = GROUND_INDEX
    headings, halves = box_headings(boxes), box_half_extents(boxes)
    for number, box in enumerate(boxes):
        cos, sin = np.cos(headings[number]), np.sin(headings[number])
        relative = start - box[:3]
        local_origin = np.array([cos * relative[0] + sin * relative[1],
                                 -sin * relative[0] + cos * relative[1], relative[2]])
        local = np.empty_like(directions)
        local[:, 0] = cos * directions[:, 0] + sin * directions[:, 1]
        local[:, 1] = -sin * directions[:, 0] + cos * directions[:, 1]
        local[:, 2] = directions[:, 2]
        local = np.where(np.abs(local) < 1e-12, np.where(local < 0, -1e-12, 1e-12), local)
        inverse = 1.0 / local
        t1 = (-halves[number] - local_origin) * inverse
        t2 = (halves[number] - local_origin) * inverse
        near = np.minimum(t1, t2).max(axis=1)
        far = np.maximum(t1, t2).min(axis=1)
        hit = (near <= far) & (near > 0) & (near < distance)
        distance[hit] = near[hit]
        index[hit] = number
    missed = distance > max_range
    distance[missed] = np.inf
    index[missed] = MISS_INDEX
    return distance, index


def lidar_directions(azimuth_steps: int = DEFAULT_AZIMUTH_STEPS) -> np.ndarray:
    """Unit beam directions ``[32 * azimuth_steps, 3]``, azimuth-major (one column of 32 beams
    per azimuth step, azimuth from -pi), elevations :data:`BEAM_ELEVATIONS_DEG`."""
    azimuth = -np.pi + 2 * np.pi * np.arange(azimuth_steps) / azimuth_steps
    elevation = np.radians(BEAM_ELEVATIONS_DEG)
    azimuth, elevation = np.meshgrid(azimuth, elevation, indexing="ij")
    return np.stack([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                     np.sin(elevation)], axis=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------- ground
class GroundTexture:
    """Seeded ground appearance: blotchy grey asphalt and dashed lane markings along x."""

    CELL = 0.2                       # m per texture cell
    SIZE = 256                       # cells per tile side (the tile repeats every 51.2 m)
    LANE_LINES = (-5.25, -1.75, 1.75, 5.25)   # y of the dashed lines, m
    LANE_HALF_WIDTH = 0.075
    DASH, PERIOD = 3.0, 9.0          # m

    def __init__(self, rng: np.random.Generator):
        pad = 8                      # wrap-around padding so the blurred tile repeats seamlessly
        noise = np.pad(rng.standard_normal((self.SIZE, self.SIZE)).astype(np.float32), pad, mode="wrap")
        blurred = cv2.GaussianBlur(noise, (0, 0), 2.0)[pad:-pad, pad:-pad]
        self.noise = (blurred / blurred.std()).astype(np.float32)

    def sample(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(noise ~N(0, 1), lane-marking mask) at ground points ``x, y`` (same shape)."""
        ix = np.floor(x * (1 / self.CELL)).astype(np.int32) & (self.SIZE - 1)
        iy = np.floor(y * (1 / self.CELL)).astype(np.int32) & (self.SIZE - 1)
        marking = np.abs(y - self.LANE_LINES[0]) < self.LANE_HALF_WIDTH
        for line in self.LANE_LINES[1:]:
            marking |= np.abs(y - line) < self.LANE_HALF_WIDTH
        marking &= np.mod(x, self.PERIOD) < self.DASH
        return self.noise[ix, iy], marking

    def gray(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ground grey level (float, 0-255) at ``x, y``."""
        noise, marking = self.sample(x, y)
        return np.where(marking, 225.0, GROUND_GRAY + 9.0 * noise)

    def intensity(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Lidar intensity (float) of the ground: dark asphalt, retro-reflective markings."""
        noise, marking = self.sample(x, y)
        return np.where(marking, 100.0, 12.0 + 4.0 * noise)


# ----------------------------------------------------------------------------- lidar
def simulate_lidar(boxes: np.ndarray, labels: np.ndarray, texture: GroundTexture,
                   rng: np.random.Generator, class_names: Sequence[str] = NUSCENES_CLASS_NAMES,
                   azimuth_steps: int = DEFAULT_AZIMUTH_STEPS, sweeps: int = 1,
                   ego_velocity: Sequence[float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """The 32-beam lidar at the origin: float32 points ``[N, 5]`` (x, y, z, intensity, time lag)
    and the hit box index per point (int32, -1 = ground). Intensities are integers in 0-255.

    ``sweeps`` > 1 adds past sweeps, as nuScenes aggregates them, motion-compensated into the
    current lidar frame: sweep k was taken ``k * SWEEP_PERIOD_S`` seconds earlier (its time lag)
    from where the ego was then, ``-ego_velocity * lag`` (straight-line ego motion, vx, vy in
    m/s in the lidar frame), with every box at ``centre - velocity * lag``. The ground and
    static boxes therefore line up across sweeps; moving boxes leave a trail behind them.
    """
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    directions = lidar_directions(azimuth_steps)
    object_intensity = np.array([CLASS_SPECS[class_names[label]].intensity for label in labels])
    object_intensity = object_intensity * rng.uniform(0.8, 1.2, len(labels))
    clouds, indices = [], []
    for sweep in range(sweeps):
        lag = sweep * SWEEP_PERIOD_S
        origin = np.array([-ego_velocity[0] * lag, -ego_velocity[1] * lag, 0.0])
        past = np.array(boxes, dtype=np.float64).reshape(-1, 9)
        past[:, [X, Y]] -= past[:, [VX, VY]] * lag
        distance, index = cast_rays(directions, past, origin)
        hit = index != MISS_INDEX
        xyz = origin + directions[hit] * distance[hit, None]
        index = index[hit]
        intensity = np.empty(len(xyz))
        ground = index == GROUND_INDEX
        intensity[ground] = texture.intensity(xyz[ground, 0], xyz[ground, 1])
        intensity[~ground] = object_intensity[index[~ground]]
        intensity += rng.uniform(-3.0, 3.0, len(xyz))
        intensity = np.clip(np.round(intensity), 0, 255)
        clouds.append(np.concatenate([xyz, intensity[:, None], np.full((len(xyz), 1), lag)], axis=1))
        indices.append(index)
    return np.concatenate(clouds).astype(np.float32), np.concatenate(indices).astype(np.int32)


# ----------------------------------------------------------------------------- cameras
def _render_background(camera2lidar: np.ndarray, intrinsics: np.ndarray, texture: GroundTexture,
                       width: int, height: int) -> np.ndarray:
    """Sky gradient above the horizon, fogged textured ground below; uint8 RGB ``[H, W, 3]``.

    Computed in float32 over the whole pixel grid (pixel centres at integer u, v)."""
    f32 = np.float32
    rotation, position = camera2lidar[:3, :3].astype(f32), camera2lidar[:3, 3].astype(f32)
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    yn = ((np.arange(height) - cy) / fy).astype(f32)[:, None]
    xn = ((np.arange(width) - cx) / fx).astype(f32)[None, :] - f32(intrinsics[0, 1] / fx) * yn
    dx, dy, dz = (rotation[axis, 0] * xn + rotation[axis, 1] * yn + rotation[axis, 2] for axis in range(3))
    inverse_norm = 1.0 / np.sqrt(dx * dx + dy * dy + dz * dz)
    # Sky: horizon colour blending into the zenith colour with the ray's elevation.
    sky_weight = np.clip(dz * inverse_norm * f32(1 / 0.35), 0.0, 1.0) ** f32(0.7)
    # Ground: hit point of the ray on z = GROUND_Z, grey texture blended into the haze with distance.
    ground = dz < -1e-6
    t = np.where(ground, f32(GROUND_Z - position[2]) / np.where(ground, dz, f32(-1)), f32(0))
    gray = texture.gray(position[0] + t * dx, position[1] + t * dy).astype(f32)
    haze = np.exp(t / (inverse_norm * f32(-FOG_DISTANCE)))          # 1 - fog
    image = np.empty((height, width, 3), dtype=np.uint8)
    for channel in range(3):
        horizon, zenith = f32(SKY_HORIZON[channel]), f32(SKY_ZENITH[channel])
        sky = horizon + (zenith - horizon) * sky_weight
        floor = horizon + (gray - horizon) * haze
        value = np.where(ground, floor, sky) + f32(0.5)
        image[..., channel] = np.clip(value, 0, 255).astype(np.uint8)
    return image


def _clip_polygon(polygon: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """Sutherland-Hodgman: keep the part of ``polygon`` ``[K, D]`` where ``p . normal >= offset``."""
    values = polygon @ normal - offset
    output = []
    count = len(polygon)
    for index in range(count):
        current, following = polygon[index], polygon[(index + 1) % count]
        value, next_value = values[index], values[(index + 1) % count]
        if value >= 0:
            output.append(current)
        if (value >= 0) != (next_value >= 0):
            output.append(current + (following - current) * (value / (value - next_value)))
    return np.array(output).reshape(-1, polygon.shape[1])


def _point_box_distance(point: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Euclidean distance ``[M]`` from ``point`` to each box (0 inside)."""
    local = np.einsum("mji,mj->mi", box_rotations(boxes), point[None] - np.asarray(boxes)[:, :3])
    return np.linalg.norm(np.maximum(np.abs(local) - box_half_extents(boxes), 0.0), axis=1)


def _draw_face(image: np.ndarray, depth: np.ndarray, uv: np.ndarray, plane: tuple[np.ndarray, float],
               intrinsics: np.ndarray, color: tuple[int, ...]) -> None:
    """Fill polygon ``uv`` ``[K, 2]`` with ``color`` where its plane ``n . X = d`` (camera frame)
    is nearer than ``depth``; update ``depth`` there (z-buffer)."""
    height, width = depth.shape
    x0, y0 = np.maximum(np.floor(uv.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(uv.max(axis=0)).astype(int) + 1, (width, height))
    if x0 >= x1 or y0 >= y1:
        return
    mask = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round((uv - (x0, y0)) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    inside = mask.view(bool)
    if not inside.any():
        return
    normal, offset = plane
    fx, skew, cx = intrinsics[0]
    fy, cy = intrinsics[1, 1], intrinsics[1, 2]
    yn = (np.arange(y0, y1) - cy) / fy
    xn = (np.arange(x0, x1)[None, :] - cx - skew * yn[:, None]) / fx
    denominator = normal[0] * xn + normal[1] * yn[:, None] + normal[2]       # z = d / (n . ray)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(denominator * offset > 0, offset / denominator, np.inf)
    window = depth[y0:y1, x0:x1]
    update = inside & (z < window)
    window[update] = z[update]
    image[y0:y1, x0:x1][update] = color


def render_camera(boxes: np.ndarray, labels: np.ndarray, calibration: Calibration, camera: int,
                  texture: GroundTexture, class_names: Sequence[str] = NUSCENES_CLASS_NAMES,
                  width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT) -> np.ndarray:
    """Render camera ``camera``: the background, then each box's camera-facing faces as filled
    polygons (``cv2.fillPoly``), far boxes first (painter's order by camera-to-box distance),
    clipped to z > :data:`NEAR_PLANE`, with a per-pixel depth test so that the occlusion is
    also right where the painter's order between two boxes is not."""
    camera2lidar = calibration.camera2lidar[camera]
    intrinsics = calibration.camera_intrinsics[camera, :3, :3]
    image = _render_background(camera2lidar, intrinsics, texture, width, height)
    if len(boxes) == 0:
        return image
    depth = np.full((height, width), np.inf)
    boxes = np.asarray(boxes, dtype=np.float64)
    position = camera2lidar[:3, 3]
    lidar2camera = calibration.lidar2camera[camera]
    corners = box_corners(boxes)
    corners_camera = corners @ lidar2camera[:3, :3].T + lidar2camera[:3, 3]
    normals = face_normals(boxes)
    normals_camera = normals @ lidar2camera[:3, :3].T
    centres = corners[:, FACES].mean(axis=2)                                # [M, 6, 3]
    facing = np.einsum("mfi,mfi->mf", normals, position - centres) > 1e-9
    colors = box_face_colors(boxes, labels, class_names)
    guard = [(np.array([1.0, 0.0]), -2.0 * width), (np.array([-1.0, 0.0]), -3.0 * width),
             (np.array([0.0, 1.0]), -2.0 * height), (np.array([0.0, -1.0]), -3.0 * height)]
    order = np.argsort(-_point_box_distance(position, boxes), kind="stable")
    for number in order:
        box_camera = corners_camera[number]
        if (box_camera[:, 2] <= NEAR_PLANE).all():
            continue
        if (box_camera[:, 2] > NEAR_PLANE).all():
            projected = box_camera @ intrinsics.T
            uv = projected[:, :2] / projected[:, 2:]
            if (uv[:, 0] < 0).all() or (uv[:, 0] > width).all() or \
                    (uv[:, 1] < 0).all() or (uv[:, 1] > height).all():
                continue
        for face in np.nonzero(facing[number])[0]:
            polygon = _clip_polygon(box_camera[FACES[face]], np.array([0.0, 0.0, 1.0]), NEAR_PLANE)
            if len(polygon) < 3:
                continue
            projected = polygon @ intrinsics.T
            uv = projected[:, :2] / projected[:, 2:]
            for normal, offset in guard:
                uv = _clip_polygon(uv, normal, offset)
                if len(uv) < 3:
                    break
            else:
                plane_normal = normals_camera[number, face]
                plane = (plane_normal, float(plane_normal @ polygon[0]))
                _draw_face(image, depth, uv, plane, intrinsics,
                           tuple(int(c) for c in colors[number, face]))
    return image


# ----------------------------------------------------------------------------- scenes
def _validate_objects(boxes: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 9:
        raise ValueError(f"boxes must be [M, 9] ({', '.join(BOX_COLUMNS[:VY + 1])}), got {list(boxes.shape)}")
    if labels.shape != (len(boxes),):
        raise ValueError(f"labels must be [{len(boxes)}], got {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)}), got {sorted(set(labels.tolist()))}")


def build_scene(boxes: np.ndarray, labels: np.ndarray, seed: int = 0,
                class_names: Sequence[str] = NUSCENES_CLASS_NAMES,
                azimuth_steps: int = DEFAULT_AZIMUTH_STEPS,
                image: ImageConfig | None = None, sweeps: int = 1,
                ego_velocity: Sequence[float] = (0.0, 0.0), rig: Rig = SYNTHETIC_RIG) -> Scene:
    """Lidar sweep(s) and the images of ``rig``'s cameras of the given boxes (CUDA layout
    ``[M, 9]``, stored as float32) on the ground; ``seed`` drives the ground texture and the
    intensity noise; ``sweeps`` and ``ego_velocity``: past sweeps with ego motion
    (:func:`simulate_lidar`); ``image``: the calibration's ``img_aug_matrix`` (default
    :func:`~bevfusion_ros.sim.rig.default_image_config` of the rig)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    boxes = boxes.reshape(0, 9) if boxes.size == 0 else boxes
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    class_names = tuple(class_names)
    _validate_objects(boxes, labels, class_names)
    _, texture_seed, lidar_seed = np.random.SeedSequence(seed).spawn(3)
    texture = GroundTexture(np.random.default_rng(texture_seed))
    calibration = rig_calibration(rig, image)
    points, point_objects = simulate_lidar(boxes, labels, texture, np.random.default_rng(lidar_seed),
                                           class_names, azimuth_steps, sweeps, ego_velocity)
    width, height = rig.image_size
    images = [render_camera(boxes, labels, calibration, camera, texture, class_names, width, height)
              for camera in range(calibration.num_cameras)]
    return Scene(seed=seed, images=images, points=points, point_objects=point_objects,
                 calibration=calibration, gt_boxes=boxes, gt_labels=labels, class_names=class_names)


def generate_scene(seed: int, num_objects: int | None = None,
                   class_names: Sequence[str] = NUSCENES_CLASS_NAMES,
                   azimuth_steps: int = DEFAULT_AZIMUTH_STEPS, sweeps: int = 1,
                   ego_velocity: Sequence[float] = (0.0, 0.0), rig: Rig = SYNTHETIC_RIG) -> Scene:
    """A random scene, identical for identical arguments: ``num_objects`` (default 20-40 drawn
    from the seed) objects of ``class_names`` (labels index this order; default the nuScenes
    order of ``config/cuda-bevfusion-resnet50.yaml``), the lidar sweep(s) and the images of
    ``rig``'s cameras (default the six of :data:`~bevfusion_ros.sim.rig.SYNTHETIC_RIG`). One sweep
    by default (what the shipped model was trained on); ``sweeps`` > 1 adds past sweeps taken
    while the ego moved at ``ego_velocity`` (:func:`simulate_lidar`); the first sweep, the
    objects and the images do not depend on them, the objects and the lidar not on the rig."""
    object_seed = np.random.SeedSequence(seed).spawn(3)[0]
    rng = np.random.default_rng(object_seed)
    if num_objects is None:
        num_objects = int(rng.integers(20, 41))
    if num_objects < 0:
        raise ValueError(f"num_objects must be >= 0, got {num_objects}")
    boxes, labels = sample_objects(rng, num_objects, class_names)
    return build_scene(boxes, labels, seed, class_names, azimuth_steps, sweeps=sweeps,
                       ego_velocity=ego_velocity, rig=rig)


# ----------------------------------------------------------------------------- example folder
def write_example_folder(scene: Scene, directory: str | Path, jpeg_quality: int = 95) -> Path:
    """Write ``scene`` as a CUDA-BEVFusion example-data folder and return its path.

    Files: ``{i}-{NAME}.jpg`` per camera (JPEG, ``jpeg_quality``), ``points.tensor`` (float16
    [N, 5], as in the real example data), the calibration matrices ``camera2lidar``,
    ``lidar2camera``, ``camera_intrinsics``, ``lidar2image``, ``img_aug_matrix``, ``camera2ego``
    (float32 [1, N, 4, 4]), ``lidar2ego`` and ``lidar_aug_matrix`` (identity) float32 [1, 4, 4],
    ``gt_bboxes_3d.tensor`` float32 [M, 9] (z = box centre), ``gt_labels_3d.tensor`` int64 [M]
    and ``token.txt``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    calibration = scene.calibration
    for index, (name, image) in enumerate(zip(calibration.camera_names, scene.images)):
        path = directory / f"{index}-{name}.jpg"
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]):
            raise OSError(f"cannot write {path}")
    write_tensor(directory / "points.tensor", scene.points.astype(np.float16))
    for name in ("camera2lidar", "lidar2camera", "camera_intrinsics", "lidar2image", "img_aug_matrix"):
        write_tensor(directory / f"{name}.tensor", getattr(calibration, name)[None].astype(np.float32))
    ego = lidar2ego()
    write_tensor(directory / "camera2ego.tensor", (ego @ calibration.camera2lidar)[None].astype(np.float32))
    write_tensor(directory / "lidar2ego.tensor", ego[None].astype(np.float32))
    write_tensor(directory / "lidar_aug_matrix.tensor", np.eye(4, dtype=np.float32)[None])
    write_tensor(directory / "gt_bboxes_3d.tensor", scene.gt_boxes.astype(np.float32))
    write_tensor(directory / "gt_labels_3d.tensor", scene.gt_labels.astype(np.int64))
    (directory / "token.txt").write_text(scene.token + "\n")
    return directory
