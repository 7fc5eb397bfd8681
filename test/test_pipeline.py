"""BEVFusionPipeline on the CPU: end-to-end parity with BEVFusionReference, and bad inputs."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.engines.base import EngineInterfaceError
from bevfusion_ros.io.frame import Frame, load_example_data
from bevfusion_ros.pipeline import BEVFusionPipeline, InputError, ModelDirError

torch = pytest.importorskip("torch")

from bevfusion_ros.lidar.scn_graph import read_scn_onnx  # noqa: E402
from bevfusion_ros.model.bevfusion import build_model  # noqa: E402
from bevfusion_ros.model.export import calibrate_random_weights, export_model_set  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402
from bevfusion_ros.model.reference import BEVFusionReference  # noqa: E402
from bevfusion_ros.model.scn_onnx import run_scn_graph  # noqa: E402

SEED = 7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_model_set(TINY, "fp16", tmp_path_factory.mktemp("tiny"), seed=SEED).out_dir


@pytest.fixture(scope="module")
def pipeline(model_dir):
    return BEVFusionPipeline.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def frame(example_data_dir):
    return load_example_data(example_data_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same weights: seeded model + BN calibration, sparse encoder from the exported file."""
    model = build_model(TINY, SEED)
    calibrate_random_weights(model, SEED)
    nodes = read_scn_onnx(model_dir / "lidar.backbone.xyz.onnx")
    shape = TINY.pipeline.voxelization.sparse_shape
    return BEVFusionReference(model, lambda features, coords: run_scn_graph(nodes, features, coords, shape))


def test_end_to_end_parity_with_reference(pipeline, reference, frame, assert_matches_reference):
    detections = pipeline.forward(frame)
    expected = reference(frame.images, frame.points, frame.calibration).numpy()
    assert len(expected) > 20
    assert_matches_reference(detections.boxes, expected)
    stages = {"upload_points", "upload_images", "normalize", "depth", "camera_backbone", "bevpool", "vtransform",
              "voxelize", "lidar_backbone", "fuser", "head", "decode"}
    assert set(detections.stage_ms) - {"camera_geometry"} == stages
    assert set(pipeline.forward(frame).stage_ms) == stages          # geometry kept: not recomputed


def test_detections_json_follows_rep103(pipeline, frame, tmp_path):
    detections = pipeline.forward(frame)
    detections.to_json(tmp_path / "d.json")
    records = json.loads((tmp_path / "d.json").read_text())["boxes"]
    assert len(records) == len(detections.boxes)
    for record, box in zip(records, detections.boxes):
        assert record["label"] == TINY.pipeline.head.class_names[int(box[9])]
        assert record["center"] == pytest.approx(box[:3].tolist(), abs=1e-5)
        assert record["size"] == pytest.approx([box[4], box[3], box[5]], abs=1e-5)   # l, w, h
        expected_yaw = math.remainder(-box[6] - math.pi / 2, 2 * math.pi)
        assert math.remainder(record["yaw"] - expected_yaw, 2 * math.pi) == pytest.approx(0, abs=1e-5)


def test_geometry_is_recomputed_only_on_calibration_change(pipeline, frame):
    pipeline.forward(frame)
    geometry = pipeline.geometry
    pipeline.forward(frame)
    assert pipeline.geometry is geometry
    shifted = dataclasses.replace(frame.calibration)
    object.__setattr__(shifted, "camera2lidar", frame.calibration.camera2lidar.copy())
    shifted.camera2lidar[:, 0, 3] += 0.5
    object.__setattr__(shifted, "lidar2camera", np.linalg.inv(shifted.camera2lidar))
    object.__setattr__(shifted, "lidar2image", shifted.camera_intrinsics @ shifted.lidar2camera)
    pipeline.forward(Frame(frame.images, frame.points, shifted))
    assert pipeline.geometry is not geometry


def test_bad_points_are_cleaned_and_reported(pipeline, frame):
    points = frame.points.copy()
    points[[3, 10, 20], 0] = np.nan
    points[40, 2] = np.inf
    detections = pipeline.forward(Frame(frame.images, points, frame.calibration))
    assert "dropped 4 points with NaN/inf values" in detections.warnings
    clean = pipeline.forward(Frame(frame.images, np.delete(points, [3, 10, 20, 40], axis=0),
                                   frame.calibration))
    np.testing.assert_array_equal(detections.boxes, clean.boxes)


def test_empty_cloud_gives_camera_only_result(pipeline, frame):
    detections = pipeline.forward(Frame(frame.images, frame.points[:0], frame.calibration))
    assert "empty point cloud: camera-only result" in detections.warnings
    assert len(detections.boxes) > 0 and np.isfinite(detections.boxes).all()


def test_too_many_points_are_truncated(model_dir, frame):
    config = dataclasses.replace(TINY.pipeline, lidar=dataclasses.replace(TINY.pipeline.lidar,
                                                                          max_points=1000))
    small = BEVFusionPipeline.from_model_dir(model_dir, config)
    detections = small.forward(frame)
    assert f"truncated {len(frame.points)} points to lidar.max_points=1000" in detections.warnings
    first = small.forward(Frame(frame.images, frame.points[:1000], frame.calibration))
    np.testing.assert_array_equal(detections.boxes, first.boxes)


def unchecked_frame(frame: Frame, **changes) -> Frame:
    """A Frame built without its own __post_init__ checks, to test the pipeline's checks."""
    unchecked = object.__new__(Frame)
    for field in dataclasses.fields(Frame):
        object.__setattr__(unchecked, field.name, changes.get(field.name, getattr(frame, field.name)))
    return unchecked


@pytest.mark.parametrize("edit, message", [
    (lambda images: images[:5], "5"),
    (lambda images: [images[0][:800]] + images[1:], "camera 0"),
    (lambda images: [images[0].astype(np.float32)] + images[1:], "uint8"),
    (lambda images: images[:3] + [images[3][..., :1]] + images[4:], "camera 3"),
])
def test_bad_images_raise_clear_errors(pipeline, frame, edit, message):
    with pytest.raises(InputError) as error:
        pipeline.forward(unchecked_frame(frame, images=edit(list(frame.images))))
    assert message in str(error.value)


class FakeCupyImage:
    """Looks like a CuPy array to ``is_cupy`` (which reads the type's module name only)."""
    __module__ = "cupy._core.core"

    def __init__(self, image: np.ndarray):
        self.dtype, self.shape, self.ndim = image.dtype, image.shape, image.ndim


def test_cpu_pipeline_rejects_device_images(pipeline, frame):
    images = list(frame.images)
    images[4] = FakeCupyImage(images[4])
    with pytest.raises(InputError, match=r"camera 4: a CuPy \(GPU\) image was given to a CPU pipeline "
                                         r"\(backend 'cpu'\); pass NumPy images"):
        pipeline.forward(unchecked_frame(frame, images=images))
    images[4] = [[0]]
    with pytest.raises(InputError, match=r"camera 4: expected a uint8 numpy image, got list$"):
        pipeline.forward(unchecked_frame(frame, images=images))


def test_points_with_too_few_columns(pipeline, frame):
    with pytest.raises(InputError, match=r"points must be \[N, >=5\]"):
        pipeline.forward(unchecked_frame(frame, points=frame.points[:, :4]))


def test_model_folder_errors(model_dir, tmp_path):
    with pytest.raises(ModelDirError, match="lacks: .*fuser.onnx"):
        for path in model_dir.iterdir():
            if path.name != "fuser.onnx":
                (tmp_path / path.name).symlink_to(path)
        BEVFusionPipeline.from_model_dir(tmp_path)
    with pytest.raises(EngineInterfaceError, match=r"input 'img' has shape \[1, 6, 3, 128, 256\], "
                                                   r"expected \[1, 6, 3, 256, 704\]"):
        BEVFusionPipeline.from_model_dir(model_dir, NUSCENES_R50.pipeline)
    assert isinstance(NUSCENES_R50.pipeline, PipelineConfig)


def test_missing_camera_is_a_black_image(pipeline, frame):
    """A camera left out of ``cameras_used`` is fed black, whatever its slot holds."""
    names = pipeline.config.camera_names
    used = names[:2] + names[3:]
    images = list(frame.images)
    missing = pipeline.forward(unchecked_frame(frame, images=images[:2] + [None] + images[3:]), used)
    black = np.zeros_like(images[2])
    expected = pipeline.forward(Frame(images[:2] + [black] + images[3:], frame.points, frame.calibration))
    assert missing.cameras_used == used and expected.cameras_used == names
    np.testing.assert_array_equal(missing.boxes, expected.boxes)
    with pytest.raises(InputError, match="unknown camera"):
        pipeline.forward(frame, ["CAM_NOWHERE"])


def test_lidar_only_fuses_a_zero_camera_bev(pipeline, frame):
    """No camera: the images are not read, and the boxes are the fuser's on a zero camera BEV."""
    lidar_only = pipeline.forward(frame, ())
    noise = [np.random.default_rng(index).integers(0, 256, image.shape, dtype=np.uint8)
             for index, image in enumerate(frame.images)]
    assert lidar_only.cameras_used == ()
    assert not {"normalize", "depth", "camera_backbone", "bevpool"} & set(lidar_only.stage_ms)
    np.testing.assert_array_equal(pipeline.forward(Frame(noise, frame.points, frame.calibration), ()).boxes,
                                  lidar_only.boxes)
    from bevfusion_ros.head.decode import decode_boxes
    from bevfusion_ros.lidar.voxelize import voxelize
    from bevfusion_ros.pipeline import prepare_points
    config = pipeline.config
    voxels = voxelize(prepare_points(frame.points, config).points, config.voxelization)
    lidar_bev = pipeline.lidar_backbone.run(voxels.features, voxels.coords, config.voxelization.sparse_shape)
    camera_spec = pipeline.engines["camera.vtransform.onnx"].outputs["feat_out"]
    middle = pipeline.engines["fuser.onnx"].run(
        {"camera": np.zeros(camera_spec.shape, camera_spec.dtype), "lidar": lidar_bev})["middle"]
    expected = decode_boxes(pipeline.engines["head.bbox.onnx"].run({"middle": middle}), config)
    np.testing.assert_array_equal(lidar_only.boxes, expected)
    assert not np.array_equal(lidar_only.boxes, pipeline.forward(frame).boxes)
