"""The synthetic scene generator: rig, objects, lidar ray casting, rendering, example folder.

Geometry is checked against independent float64 code written here (box frames from the
REP-103 heading, face-plane intersection instead of the slab test, segment intersection
instead of separating axes).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bevfusion_ros.config import NUSCENES_CAMERA_NAMES, NUSCENES_CLASS_NAMES, load_config
from bevfusion_ros.io.frame import load_example_data
from bevfusion_ros.io.tensor import read_tensor
from bevfusion_ros.sim import (
    CLASS_SPECS,
    GROUND_INDEX,
    MISS_INDEX,
    build_scene,
    cast_rays,
    generate_scene,
    synthetic_calibration,
    synthetic_rig,
    write_example_folder,
)
from bevfusion_ros.sim.scene import MAX_RANGE, box_face_colors, lidar_directions
from bevfusion_ros.tools import make_scene

REPO_ROOT = Path(__file__).resolve().parents[1]
GROUND = -1.84
SEEDS = (7, 21, 1234)


@pytest.fixture(scope="module")
def scenes():
    return {seed: generate_scene(seed) for seed in SEEDS}


# ----------------------------------------------------------------------------- independent geometry
def box_frame(box: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, rotation box->lidar, half extents along heading / left / up) in float64."""
    box = np.asarray(box, dtype=np.float64)
    heading = -box[6] - np.pi / 2
    rotation = np.array([[np.cos(heading), -np.sin(heading), 0.0],
                         [np.sin(heading), np.cos(heading), 0.0],
                         [0.0, 0.0, 1.0]])
    return box[:3], rotation, np.array([box[4], box[3], box[5]]) / 2


def surface_distance(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Unsigned distance of each point to the surface of the box."""
    centre, rotation, half = box_frame(box)
    local = (np.asarray(points, dtype=np.float64) - centre) @ rotation
    excess = np.abs(local) - half
    outside = np.linalg.norm(np.maximum(excess, 0.0), axis=1)
    inside = np.min(-excess, axis=1)
    return np.where((excess <= 0).all(axis=1), inside, outside)


def brute_first_hit(origin, direction, boxes) -> tuple[float, int]:
    """Nearest intersection of one ray with the faces of every box (rectangles) and the ground."""
    origin, direction = np.asarray(origin, float), np.asarray(direction, float)
    best, best_index = np.inf, MISS_INDEX
    if direction[2] < 0:
        best, best_index = (GROUND - origin[2]) / direction[2], GROUND_INDEX
    for index, box in enumerate(boxes):
        centre, rotation, half = box_frame(box)
        o, d = rotation.T @ (origin - centre), rotation.T @ direction
        for axis in range(3):
            if d[axis] == 0:
                continue
            for sign in (-1.0, 1.0):
                t = (sign * half[axis] - o[axis]) / d[axis]
                hit = o + t * d
                others = [k for k in range(3) if k != axis]
                if t > 0 and t < best and all(abs(hit[k]) <= half[k] + 1e-9 for k in others):
                    best, best_index = t, index
    if best > MAX_RANGE:
        return np.inf, MISS_INDEX
    return best, best_index


def pixel_rays(calibration, camera: int, columns, rows) -> np.ndarray:
    """Unit lidar-frame directions through pixel centres (u = column, v = row)."""
    intrinsics = calibration.camera_intrinsics[camera, :3, :3]
    homogeneous = np.stack([np.asarray(columns, float), np.asarray(rows, float),
                            np.ones(np.shape(columns))], axis=-1)
    rays = homogeneous @ np.linalg.inv(intrinsics).T @ calibration.camera2lidar[camera, :3, :3].T
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


def segments_intersect(p1, p2, q1, q2) -> bool:
    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    d1, d2 = cross(q1, q2, p1), cross(q1, q2, p2)
    d3, d4 = cross(p1, p2, q1), cross(p1, p2, q2)
    return (d1 * d2 < 0) and (d3 * d4 < 0)


def footprint(box: np.ndarray) -> np.ndarray:
    centre, rotation, half = box_frame(box)
    local = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]]) * half[:2]
    return local @ rotation[:2, :2].T + centre[:2]


def inside_polygon(point, polygon) -> bool:
    """Point strictly inside a convex polygon given counter-clockwise or clockwise."""
    signs = []
    for k in range(len(polygon)):
        a, b = polygon[k], polygon[(k + 1) % len(polygon)]
        signs.append((b[0] - a[0]) * (point[1] - a[1]) - (b[1] - a[1]) * (point[0] - a[0]))
    signs = np.array(signs)
    return bool((signs > 0).all() or (signs < 0).all())


def footprints_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    if any(inside_polygon(p, b) for p in a) or any(inside_polygon(p, a) for p in b):
        return True
    return any(segments_intersect(a[i], a[(i + 1) % 4], b[j], b[(j + 1) % 4])
               for i in range(4) for j in range(4))


def point_segment_distance(point, a, b) -> float:
    ab = b - a
    t = np.clip(np.dot(point - a, ab) / np.dot(ab, ab), 0.0, 1.0)
    return float(np.linalg.norm(point - (a + t * ab)))


# ----------------------------------------------------------------------------- rig
def test_rig_geometry():
    intrinsics, camera2lidar = synthetic_rig()
    assert intrinsics.shape == (6, 3, 3) and camera2lidar.shape == (6, 4, 4)
    assert np.allclose(intrinsics, [[1260, 0, 800], [0, 1260, 450], [0, 0, 1]])
    headings = {"FRONT": 0, "FRONT_RIGHT": -55, "FRONT_LEFT": 55, "BACK": 180,
                "BACK_LEFT": 110, "BACK_RIGHT": -110}
    for index, name in enumerate(NUSCENES_CAMERA_NAMES):
        rotation, position = camera2lidar[index, :3, :3], camera2lidar[index, :3, 3]
        assert np.allclose(rotation.T @ rotation, np.eye(3)) and np.isclose(np.linalg.det(rotation), 1)
        heading = np.radians(headings[name])
        assert np.allclose(rotation[:, 2], [np.cos(heading), np.sin(heading), 0])   # z forward
        assert np.allclose(rotation[:, 1], [0, 0, -1])                              # y down
        assert np.allclose(np.cross(rotation[:, 2], [0, 0, 1]), rotation[:, 0])   # x right
        assert np.isclose(position[2] - GROUND, 1.5)                                # 1.5 m up
        assert 0 < np.linalg.norm(position[:2]) < 1.2                               # near the lidar
    calibration = synthetic_calibration()
    assert calibration.camera_names == NUSCENES_CAMERA_NAMES
    assert np.allclose(calibration.camera2lidar, camera2lidar)
    # A point 20 m straight ahead at camera height projects onto FRONT's principal point.
    point = np.array([20.0 + camera2lidar[0, 0, 3], 0.0, camera2lidar[0, 2, 3], 1.0])
    projected = calibration.lidar2image[0] @ point
    assert np.allclose(projected[:2] / projected[2], [800, 450]) and projected[2] == pytest.approx(20)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_scene(scenes):
    again = generate_scene(SEEDS[0])
    first = scenes[SEEDS[0]]
    for name in ("points", "point_objects", "gt_boxes", "gt_labels"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert all(np.array_equal(a, b) for a, b in zip(first.images, again.images))
    assert first.token == again.token == f"synthetic-seed-{SEEDS[0]}"


def test_different_seeds_differ(scenes):
    a, b = scenes[SEEDS[0]], scenes[SEEDS[1]]
    assert a.gt_boxes.shape != b.gt_boxes.shape or not np.array_equal(a.gt_boxes, b.gt_boxes)
    assert a.points.shape != b.points.shape or not np.array_equal(a.points, b.points)
    assert not np.array_equal(a.images[0], b.images[0])


def test_object_count_and_types(scenes):
    scene = generate_scene(5, num_objects=12)
    assert len(scene.gt_boxes) == 12 and len(scene.gt_labels) == 12
    for scene in scenes.values():
        assert scene.gt_boxes.dtype == np.float32 and scene.gt_boxes.shape[1] == 9
        assert scene.gt_labels.dtype == np.int64
        assert scene.points.dtype == np.float32 and scene.points.shape[1] == 5
        assert len(scene.images) == 6
        assert all(image.shape == (900, 1600, 3) and image.dtype == np.uint8 for image in scene.images)
        assert 20 <= len(scene.gt_boxes) <= 40


# ----------------------------------------------------------------------------- objects
def test_labels_follow_config_class_order(scenes):
    config = load_config(REPO_ROOT / "config" / "cuda-bevfusion-resnet50.yaml")
    assert tuple(config.head.class_names) == NUSCENES_CLASS_NAMES
    all_labels = np.concatenate([scene.gt_labels for scene in scenes.values()])
    assert all_labels.min() >= 0 and all_labels.max() < 10
    assert len(np.unique(all_labels)) >= 6                      # a mix of classes
    for scene in scenes.values():
        assert scene.class_names == tuple(config.head.class_names)


def test_boxes_rest_on_ground_do_not_overlap_and_keep_clear_of_ego(scenes):
    for scene in scenes.values():
        boxes = scene.gt_boxes.astype(np.float64)
        assert np.allclose(boxes[:, 2] - boxes[:, 5] / 2, GROUND, atol=1e-5)   # on the ground
        assert (np.hypot(boxes[:, 0], boxes[:, 1]) <= 50.0 + 1e-4).all()
        prints = [footprint(box) for box in boxes]
        for polygon in prints:
            assert not inside_polygon(np.zeros(2), polygon)
            clearance = min(point_segment_distance(np.zeros(2), polygon[k], polygon[(k + 1) % 4])
                            for k in range(4))
            assert clearance >= 3.0 - 1e-4
        for i in range(len(prints)):
            for j in range(i + 1, len(prints)):
                assert not footprints_overlap(prints[i], prints[j]), (scene.seed, i, j)


def test_sizes_headings_and_velocities(scenes):
    typical = {"car": (4.6, 1.9, 1.7), "bus": (11.0, 2.9, 3.5), "pedestrian": (0.7, 0.7, 1.75),
               "barrier": (0.5, 2.5, 1.0), "traffic_cone": (0.4, 0.4, 1.0), "truck": (7.0, 2.5, 3.0)}
    for scene in scenes.values():
        for box, label in zip(scene.gt_boxes.astype(np.float64), scene.gt_labels):
            name = NUSCENES_CLASS_NAMES[label]
            length, width, height = CLASS_SPECS[name].size
            if name in typical:
                assert (length, width, height) == typical[name]
            assert np.allclose(box[[4, 3, 5]], (length, width, height), rtol=0.3), (name, box)
            speed = np.hypot(box[7], box[8])
            if name in ("barrier", "traffic_cone"):
                assert speed == 0
            if speed > 0:                               # moving along the REP-103 heading
                heading = -box[6] - np.pi / 2
                assert np.allclose(box[7:9] / speed, [np.cos(heading), np.sin(heading)], atol=1e-5)
            assert -np.pi - 1e-6 <= box[6] <= np.pi + 1e-6


# ----------------------------------------------------------------------------- lidar
def test_points_lie_on_ground_or_box_surfaces(scenes):
    for scene in scenes.values():
        points = scene.points.astype(np.float64)
        ground = np.abs(points[:, 2] - GROUND)
        distances = np.stack([surface_distance(points[:, :3], box) for box in scene.gt_boxes], axis=1)
        nearest = np.minimum(ground, distances.min(axis=1))
        assert nearest.max() < 1e-4
        # point_objects names the surface the point lies on.
        on_objects = scene.point_objects >= 0
        assert (ground[~on_objects] < 1e-4).all()
        assert (distances[on_objects, scene.point_objects[on_objects]] < 1e-4).all()
        assert np.linalg.norm(points[:, :3], axis=1).max() <= MAX_RANGE + 1e-3
        intensity = points[:, 3]
        assert (intensity >= 0).all() and (intensity <= 255).all()
        assert np.array_equal(intensity, np.round(intensity))
        assert (points[:, 4] == 0).all()
        # Objects are seen: a good share of the points hit boxes.
        assert on_objects.sum() > 1000


def test_cast_rays_returns_nearest_face(scenes):
    scene = scenes[SEEDS[0]]
    boxes = scene.gt_boxes
    rng = np.random.default_rng(0)
    # Rays from the origin at box interiors (hits, often through other boxes) plus random rays.
    targets = np.concatenate([box[None, :3] + rng.uniform(-0.4, 0.4, (3, 3)) * box[[4, 3, 5]]
                              for box in boxes.astype(np.float64)])
    directions = np.concatenate([targets, rng.standard_normal((100, 3))])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # ... and rays from an elevated point off the origin (the camera case).
    for origin in ((0.0, 0.0, 0.0), (0.6, 0.2, -0.34)):
        distance, index = cast_rays(directions, boxes, origin=origin)
        box_hits = 0
        for ray in range(len(directions)):
            expected_distance, expected_index = brute_first_hit(origin, directions[ray], boxes)
            assert index[ray] == expected_index, ray
            if np.isfinite(expected_distance):
                assert distance[ray] == pytest.approx(expected_distance, abs=1e-9)
            else:
                assert distance[ray] == np.inf
            box_hits += expected_index >= 0
        assert box_hits > len(boxes)


def test_lidar_points_are_first_hits(scenes):
    scene = scenes[SEEDS[1]]
    rng = np.random.default_rng(1)
    sample = rng.choice(len(scene.points), 400, replace=False)
    for point, obj in zip(scene.points[sample, :3].astype(np.float64), scene.point_objects[sample]):
        rng_distance = np.linalg.norm(point)
        expected_distance, expected_index = brute_first_hit(np.zeros(3), point / rng_distance,
                                                            scene.gt_boxes)
        assert expected_index == obj
        assert rng_distance == pytest.approx(expected_distance, abs=1e-4)
    # Beams that returned nothing really miss everything within 70 m.
    directions = lidar_directions()
    distance, index = cast_rays(directions, scene.gt_boxes)
    misses = np.nonzero(index == MISS_INDEX)[0]
    assert len(scene.points) == len(directions) - len(misses)
    for ray in rng.choice(misses, 100, replace=False):
        assert brute_first_hit(np.zeros(3), directions[ray], scene.gt_boxes)[1] == MISS_INDEX


def test_near_car_gets_points():
    heading = 1.2                                        # rear and left side face the lidar
    car = np.array([[8.0, 3.0, GROUND + 0.85, 1.9, 4.6, 1.7, -heading - np.pi / 2, 0, 0]])
    scene = build_scene(car, np.array([0]), seed=0)
    on_car = scene.points[scene.point_objects == 0, :3].astype(np.float64)
    assert len(on_car) > 150
    assert surface_distance(on_car, car[0]).max() < 1e-4
    # Only faces turned towards the lidar are hit: the car's far side stays empty.
    centre, rotation, half = box_frame(car[0])
    local = (on_car - centre) @ rotation
    lidar = rotation.T @ -centre                         # the lidar in the box frame
    axis = np.argmin(np.abs(np.abs(local) - half), axis=1)      # face each point lies on
    side = np.sign(local[np.arange(len(local)), axis])
    assert (side * half[axis] < side * lidar[axis]).all()       # the lidar is outside that face
    assert len(np.unique(axis)) == 2                            # rear and side are seen
    # Points from ground behind the car are shadowed: no ground point straight behind it.
    ground = scene.points[scene.point_objects == -1, :3].astype(np.float64)
    behind = (np.abs(np.arctan2(ground[:, 1], ground[:, 0]) - np.arctan2(3.0, 8.0)) < 0.1) & \
        (np.hypot(ground[:, 0], ground[:, 1]) > 12.0)
    assert not behind.any()


def test_past_sweeps_are_motion_compensated_into_the_current_frame():
    """Three sweeps 0.05 s apart while the ego drives at 10 m/s along +x: the current sweep is the
    one-sweep scene; every past sweep was cast from where the ego was (-10 m/s * lag) and lands
    in the current frame, so a parked car's points lie on its box, a car driving at 8 m/s along
    +y has its points on the box moved back by 8 m/s * lag, and ground points on the ground."""
    parked = np.array([8.0, 3.0, GROUND + 0.85, 1.9, 4.6, 1.7, -1.2 - np.pi / 2, 0, 0])
    moving = np.array([-7.0, -9.0, GROUND + 0.85, 1.9, 4.6, 1.7, -np.pi, 0, 8.0])
    boxes, labels = np.stack([parked, moving]), np.array([0, 0])
    one = build_scene(boxes, labels, seed=0)
    three = build_scene(boxes, labels, seed=0, sweeps=3, ego_velocity=(10.0, 0.0))
    lags = three.points[:, 4]
    np.testing.assert_allclose(np.unique(lags), [0.0, 0.05, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(three.points[lags == 0], one.points)
    for lag in (0.05, 0.1):
        sweep = lags == np.float32(lag)
        on_parked = three.points[sweep & (three.point_objects == 0), :3].astype(np.float64)
        assert len(on_parked) > 50 and surface_distance(on_parked, parked).max() < 1e-3
        back = moving.copy()
        back[1] -= 8.0 * lag
        on_moving = three.points[sweep & (three.point_objects == 1), :3].astype(np.float64)
        assert len(on_moving) > 20 and surface_distance(on_moving, back).max() < 1e-3
        assert surface_distance(on_moving, moving).max() > 0.3
        ground = three.points[sweep & (three.point_objects == -1), :3].astype(np.float64)
        np.testing.assert_allclose(ground[:, 2], GROUND, atol=1e-5)
        # The lowest beam (-30.67 deg) draws its ring around the ego position of that sweep.
        ring = -GROUND / np.tan(np.radians(30.67))
        around = np.hypot(ground[:, 0] + 10.0 * lag, ground[:, 1])
        assert around.min() == pytest.approx(ring, abs=0.01)
        assert np.hypot(ground[:, 0], ground[:, 1]).min() < ring - 0.4


def test_every_visible_near_car_has_points(scenes):
    checked = 0
    for scene in scenes.values():
        for index, (box, label) in enumerate(zip(scene.gt_boxes, scene.gt_labels)):
            if NUSCENES_CLASS_NAMES[label] != "car" or np.hypot(*box[:2]) > 25:
                continue
            direction = box[:3].astype(np.float64) / np.linalg.norm(box[:3])
            if brute_first_hit(np.zeros(3), direction, scene.gt_boxes)[1] != index:
                continue                                 # occluded from the lidar
            assert (scene.point_objects == index).sum() >= 20, (scene.seed, index)
            checked += 1
    assert checked >= 2


# ----------------------------------------------------------------------------- cameras
def test_empty_scene_is_sky_over_ground():
    scene = build_scene(np.zeros((0, 9)), np.zeros(0, dtype=np.int64), seed=3)
    assert len(scene.points) > 0 and (scene.point_objects == -1).all()
    for image in scene.images:
        sky, ground = image[:440].astype(int), image[560:].astype(int)
        assert (sky[..., 2] > sky[..., 0] + 10).all()                  # bluish above the horizon
        gray = ground[np.abs(ground[..., 0] - ground[..., 2]) < 12]
        assert len(gray) > 0.95 * ground[..., 0].size                  # grey below it
        assert ground.std() > 3                                        # with some texture


def test_box_centres_project_into_facing_camera_with_class_colour(scenes):
    coloured = 0
    for scene in scenes.values():
        calibration = scene.calibration
        positions = calibration.camera2lidar[:, :3, 3]
        axes = calibration.camera2lidar[:, :3, 2]
        for index, (box, label) in enumerate(zip(scene.gt_boxes.astype(np.float64), scene.gt_labels)):
            offsets = box[:3] - positions
            cosines = np.einsum("ci,ci->c", offsets, axes) / np.linalg.norm(offsets, axis=1)
            camera = int(np.argmax(cosines))
            if np.degrees(np.arccos(cosines[camera])) > 28:
                continue                                 # in the blind wedge near BACK
            projected = calibration.lidar2image[camera] @ np.append(box[:3], 1.0)
            assert projected[2] > 0
            u, v = projected[:2] / projected[2]
            assert 0 <= u < 1600 and 0 <= v < 900, (scene.seed, index, camera, u, v)
            column, row = int(round(u)), int(round(v))
            rays = pixel_rays(calibration, camera, column + np.array([0, -1, 1, 0, 0]),
                              row + np.array([0, 0, 0, -1, 1]))
            if any(brute_first_hit(positions[camera], ray, scene.gt_boxes)[1] != index for ray in rays):
                continue                                 # another box hides (part of) that pixel
            pixel = scene.images[camera][row, column].astype(np.float64)
            color = np.array(CLASS_SPECS[NUSCENES_CLASS_NAMES[label]].color, dtype=np.float64)
            scale = pixel @ color / (color @ color)      # shading scales the class colour
            assert 0.45 <= scale <= 1.01, (scene.seed, index, pixel, color)
            assert np.abs(pixel - scale * color).max() <= 1.5, (scene.seed, index, pixel, color)
            coloured += 1
    assert coloured >= 20


def test_rendered_occlusion_matches_ray_casting(scenes):
    """Away from edges, every pixel shows the first box its ray hits, or no box at all."""
    scene = scenes[SEEDS[0]]
    face_colors = box_face_colors(scene.gt_boxes, scene.gt_labels).astype(int)     # [M, 6, 3]
    rows, columns = np.mgrid[6:900:12, 6:1600:12]
    rows, columns = rows.ravel(), columns.ravel()
    checked_boxes = checked_background = 0
    for camera in range(6):
        origin = scene.calibration.camera2lidar[camera, :3, 3]
        hits = np.stack([cast_rays(pixel_rays(scene.calibration, camera, columns + du, rows + dv),
                                   scene.gt_boxes, origin=origin, max_range=1e6)[1]
                         for du in (-1, 0, 1) for dv in (-1, 0, 1)], axis=1)
        interior = (hits == hits[:, :1]).all(axis=1)          # not near an object's outline
        pixels = scene.images[camera][rows, columns].astype(int)
        for pixel, hit in zip(pixels[interior], hits[interior, 0]):
            match = np.abs(face_colors - pixel).max(axis=2) <= 1                   # [M, 6]
            if hit >= 0:
                assert match[hit].any(), (camera, pixel, hit)
                checked_boxes += 1
            else:
                assert not match.any(), (camera, pixel)
                checked_background += 1
    assert checked_boxes > 500 and checked_background > 10000


def test_class_colours_are_not_sky_or_ground():
    for spec in CLASS_SPECS.values():
        color = np.array(spec.color, dtype=float)
        assert color.max() - color.min() > 60           # saturated: never a grey
    colors = np.array([spec.color for spec in CLASS_SPECS.values()], dtype=float)
    chroma = colors / np.linalg.norm(colors, axis=1, keepdims=True)
    assert (chroma @ chroma.T - np.eye(len(colors))).max() < 0.995   # distinct classes


def test_box_behind_near_plane_is_clipped():
    # A bus alongside the ego reaches behind the FRONT_LEFT camera: must not crash or smear.
    bus = np.array([[2.0, 4.6, GROUND + 1.75, 2.9, 11.0, 3.5, -np.pi / 2, 0, 0]])
    scene = build_scene(bus, np.array([3]), seed=0)
    image = scene.images[2]                             # FRONT_LEFT looks at the bus's side
    blue = np.array(CLASS_SPECS["bus"].color, dtype=float)
    chroma = image.reshape(-1, 3).astype(float) @ blue / np.linalg.norm(blue)
    norm = np.linalg.norm(image.reshape(-1, 3).astype(float), axis=1) + 1e-9
    assert (chroma / norm > 0.99).mean() > 0.2          # the bus fills a good part of the view
    assert (chroma / norm > 0.99).mean() < 1.0


# ----------------------------------------------------------------------------- example folder
def test_write_example_folder_round_trip(scenes, tmp_path):
    scene = scenes[SEEDS[2]]
    directory = write_example_folder(scene, tmp_path / "synthetic")
    frame = load_example_data(directory)
    assert frame.token == scene.token
    for loaded, original in zip(frame.images, scene.images):
        difference = np.abs(loaded.astype(int) - original.astype(int))
        assert difference.mean() < 2.0
        mse = (difference.astype(float) ** 2).mean()
        assert 10 * np.log10(255 ** 2 / mse) > 35                     # PSNR, JPEG quality 95
    assert read_tensor(directory / "points.tensor").dtype == np.float16
    assert np.array_equal(frame.points, scene.points.astype(np.float16).astype(np.float32))
    assert np.abs(frame.points - scene.points).max() < 0.04          # fp16 at <= 70 m
    for name in ("camera2lidar", "lidar2camera", "camera_intrinsics", "lidar2image", "img_aug_matrix"):
        stored = read_tensor(directory / f"{name}.tensor")
        assert stored.shape == (1, 6, 4, 4)
        expected = getattr(scene.calibration, name).astype(np.float32).astype(np.float64)
        assert np.array_equal(getattr(frame.calibration, name), expected), name
    boxes = read_tensor(directory / "gt_bboxes_3d.tensor")
    labels = read_tensor(directory / "gt_labels_3d.tensor")
    assert boxes.dtype == np.float32 and np.array_equal(boxes, scene.gt_boxes)
    assert labels.dtype == np.int64 and np.array_equal(labels, scene.gt_labels)
    assert read_tensor(directory / "lidar2ego.tensor").shape == (1, 4, 4)
    assert read_tensor(directory / "camera2ego.tensor").shape == (1, 6, 4, 4)


def test_make_scene_cli(tmp_path, capsys):
    out = tmp_path / "scene"
    assert make_scene.main(["--seed", "4", "--out", str(out), "--objects", "6"]) == 0
    printed = capsys.readouterr().out
    assert "objects: 6 (" in printed and "points: " in printed
    frame = load_example_data(out)
    assert frame.token == "synthetic-seed-4"
    assert len(read_tensor(out / "gt_labels_3d.tensor")) == 6
    reference = generate_scene(4, 6)
    assert np.array_equal(frame.points, reference.points.astype(np.float16).astype(np.float32))
    swept = tmp_path / "swept"
    assert make_scene.main(["--seed", "4", "--out", str(swept), "--objects", "6", "--sweeps", "2",
                            "--ego-velocity", "5", "0"]) == 0
    reference = generate_scene(4, 6, sweeps=2, ego_velocity=(5.0, 0.0))
    assert np.array_equal(load_example_data(swept).points,
                          reference.points.astype(np.float16).astype(np.float32))
    assert len(np.unique(reference.points[:, 4])) == 2


def test_generation_is_fast():
    start = time.perf_counter()
    generate_scene(99)
    assert time.perf_counter() - start < 5.0


def test_build_scene_rejects_bad_input():
    with pytest.raises(ValueError, match=r"boxes must be \[M, 9\]"):
        build_scene(np.zeros((2, 7)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="labels must lie in"):
        build_scene(np.zeros((1, 9)) + [10, 0, -1, 1, 1, 1, 0, 0, 0], np.array([10]))
    with pytest.raises(ValueError, match="no synthetic object model"):
        generate_scene(0, 3, class_names=("car", "unicorn"))
