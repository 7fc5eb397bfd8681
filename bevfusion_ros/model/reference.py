"""``BEVFusionReference``: the whole detector as one plain PyTorch forward.

It exists to test the deploy pipeline against: every stage is written here again in torch,
independently of ``bevfusion_ros``'s NumPy/CuPy ops, following the pipeline spec:

1. image resize + crop + normalise with OpenCV's 11-bit fixed-point bilinear (spec 1.2), fp16;
2. lidar -> sparse depth image (spec 4), float32 arithmetic in CUDA's order; among points that
   hit the same pixel the one with the highest index wins (CUDA leaves it to a race; we make it
   deterministic so implementations can be compared exactly);
3. camera backbone network, then the LSS lift as an explicit per-frustum-point scatter-add into
   the BEV grid (spec 3.2-3.5) in float64 geometry with CUDA's float32 grid constants and
   truncation toward zero; every camera uses its own ``img_aug_matrix`` inverse and every kept
   point is summed (mit-han-lab semantics, not CUDA's camera-0 and last-interval quirks);
4. voxelization (spec 5.1): half-open range, float32 true-division indices, mean of the first
   ``max_points_per_voxel`` points in input order over all channels, stored as fp16 like CUDA;
5. the sparse encoder (rulebook convolutions in torch, proven equal to a dense ``conv3d`` in
   its tests), fuser, head, and the box decode of spec 6.3 (score threshold, inclusive
   post-centre range, boxes sorted by score).

Output boxes use CUDA-BEVFusion's Python layout ``[M, 11]``:
``x, y, z, w, l, h, yaw, vx, vy, label, score`` (z is the box centre, see spec 6.5).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.model.bevfusion import BEVFusionModel
from bevfusion_ros.model.camera import CameraBackboneExport, VTransformExport
from bevfusion_ros.model.fuser import FuserExport
from bevfusion_ros.model.head import HeadExport
from bevfusion_ros.model.presets import ModelPreset


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A NumPy array as a tensor on the current default device (see BEVFusionReference.device)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.get_default_device())


def normalize_images(images: Sequence[np.ndarray], preset: ModelPreset) -> torch.Tensor:
    """6 uint8 RGB ``[H, W, 3]`` -> fp16 ``[N, 3, oh, ow]``: fixed-point bilinear, crop, mean/std."""
    image = preset.pipeline.image
    crop_x, crop_y = image.crop
    step = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(image.resize_scale, dtype=torch.float32)

    def source(count: int, offset: int, size: int):
        position = (torch.arange(count, dtype=torch.float32) + offset + 0.5) * step - 0.5
        low = torch.floor(position)
        weight = torch.round((position - low) * 2048).to(torch.int64)   # rint: half to even
        low = low.to(torch.int64)
        return low.clamp(0, size - 1), (low + 1).clamp(0, size - 1), weight

    x0, x1, lx = source(image.output_width, crop_x, image.input_width)
    y0, y1, ly = source(image.output_height, crop_y, image.input_height)
    hx, hy = 2048 - lx, 2048 - ly
    mean = torch.tensor(image.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image.std, dtype=torch.float32).view(3, 1, 1)
    planes = []
    for rgb in images:
        pixels = _tensor(rgb).to(torch.int64).permute(2, 0, 1)
        top = (hx * pixels[:, y0][:, :, x0] + lx * pixels[:, y0][:, :, x1]) >> 4
        bottom = (hx * pixels[:, y1][:, :, x0] + lx * pixels[:, y1][:, :, x1]) >> 4
        blended = (((hy[:, None] * top) >> 16) + ((ly[:, None] * bottom) >> 16) + 2) >> 2
        planes.append(((blended.to(torch.float32) * (1.0 / 255.0) - mean) / std).to(torch.float16))
    return torch.stack(planes)


def depth_images(points: torch.Tensor, calibration: Calibration, preset: ModelPreset) -> torch.Tensor:
    """Sparse depth ``[N, 1, oh, ow]`` fp16: camera-frame z of each point at its network pixel."""
    height, width = preset.pipeline.image.output_height, preset.pipeline.image.output_width
    xyz = points[:, :3].to(torch.float32)
    lidar2image = _tensor(calibration.lidar2image.astype(np.float32))
    augmentation = _tensor(calibration.img_aug_matrix.astype(np.float32))
    index = torch.arange(xyz.shape[0])
    maps = []
    for camera in range(calibration.num_cameras):
        m, a = lidar2image[camera], augmentation[camera]
        h = [m[r, 0] * xyz[:, 0] + m[r, 1] * xyz[:, 1] + m[r, 2] * xyz[:, 2] + m[r, 3] for r in range(3)]
        dist = h[2].clamp(1e-5, 1e5)
        u, v = h[0] / dist, h[1] / dist
        column = a[0, 0] * u + a[0, 1] * v + a[0, 2] * dist + a[0, 3]
        row = a[1, 0] * u + a[1, 1] * v + a[1, 2] * dist + a[1, 3]
        inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
        pixel = row[inside].to(torch.int64) * width + column[inside].to(torch.int64)
        winner = torch.full((height * width,), -1, dtype=torch.int64)
        winner.scatter_reduce_(0, pixel, index[inside], reduce="amax")
        depth = torch.zeros(height * width, dtype=torch.float16)
        hit = winner >= 0
        depth[hit] = dist[winner[hit]].to(torch.float16)
        maps.append(depth.view(1, height, width))
    return torch.stack(maps)


def frustum_bev_cells(calibration: Calibration, preset: ModelPreset) -> tuple[torch.Tensor, torch.Tensor]:
    """BEV cell of every frustum point: (kept point ids into [N*D*fH*fW], flat cell ix*Y + iy)."""
    geometry, image = preset.pipeline.camera_geometry, preset.pipeline.image
    depth_bins, fh, fw = geometry.depth_bins, geometry.feature_height, geometry.feature_width
    d = torch.arange(depth_bins, dtype=torch.float64) * geometry.dbound[2] + geometry.dbound[0]
    v = torch.linspace(0, image.output_height - 1, fh, dtype=torch.float64)
    u = torch.linspace(0, image.output_width - 1, fw, dtype=torch.float64)
    dd, vv, uu = torch.meshgrid(d, v, u, indexing="ij")                  # [D, fH, fW]
    frustum = torch.stack([uu, vv, dd], dim=-1).reshape(-1, 3)
    bounds = (geometry.xbound, geometry.ybound, geometry.zbound)
    # CUDA-BEVFusion keeps bx = min + step/2 and dx = step as float32 and works in double from
    # there: the lower edge becomes -53.99999848 m and the step 0.30000001192 m ("Read first").
    lower = torch.tensor([float(np.float32(b[0] + b[2] / 2.0)) - float(np.float32(b[2])) / 2.0
                          for b in bounds], dtype=torch.float64)
    step = torch.tensor([np.float32(b[2]) for b in bounds], dtype=torch.float64)
    nx, ny, nz = geometry.bev_size
    point_ids, cells = [], []
    for camera in range(calibration.num_cameras):
        augmentation = _tensor(calibration.img_aug_matrix[camera])
        intrinsics = _tensor(calibration.camera_intrinsics[camera, :3, :3])
        camera2lidar = _tensor(calibration.camera2lidar[camera])
        original = torch.linalg.solve(augmentation[:3, :3], (frustum - augmentation[:3, 3]).T).T
        lifted = torch.cat([original[:, :2] * original[:, 2:], original[:, 2:]], dim=1)
        in_camera = torch.linalg.solve(intrinsics, lifted.T).T
        in_lidar = in_camera @ camera2lidar[:3, :3].T + camera2lidar[:3, 3]
        index = torch.trunc((in_lidar - lower) / step).to(torch.int64)    # toward zero, like .long()
        kept = ((index[:, 0] >= 0) & (index[:, 0] < nx) & (index[:, 1] >= 0) & (index[:, 1] < ny)
                & (index[:, 2] >= 0) & (index[:, 2] < nz))
        point_ids.append(torch.nonzero(kept).squeeze(1) + camera * frustum.shape[0])
        cells.append(index[kept, 0] * ny + index[kept, 1])
    return torch.cat(point_ids), torch.cat(cells)


def bev_pool(camera_feature: torch.Tensor, depth_weights: torch.Tensor, point_ids: torch.Tensor,
             cells: torch.Tensor, bev_size: tuple[int, int]) -> torch.Tensor:
    """Scatter-add of depth_weight x feature per frustum point -> camera BEV ``[1, C, X, Y]``.

    camera_feature ``[N, fH, fW, C]`` (NHWC), depth_weights ``[N, D, fH, fW]``.
    """
    cameras, height, width, channels = camera_feature.shape
    pixels = height * width
    per_camera = depth_weights.shape[1] * pixels
    camera = point_ids // per_camera
    pixel = point_ids % pixels
    # index_select rather than advanced indexing: its gradient is an index_add_, not a sort.
    features = camera_feature.reshape(cameras * pixels, channels).index_select(0, camera * pixels + pixel)
    weights = depth_weights.reshape(-1).index_select(0, point_ids)
    bev = torch.zeros(bev_size[0] * bev_size[1], channels, dtype=features.dtype, device=features.device)
    bev.index_add_(0, cells, features * weights[:, None])
    return bev.T.reshape(1, channels, *bev_size)


def voxelize(points: torch.Tensor, preset: ModelPreset) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard voxelization -> (features fp16 ``[M, C]`` mean of first K points, coords ``[M, 4]``).

    Coordinates are (batch 0, ix, iy, iz); voxels are numbered in order of first appearance
    and the first ``max_voxels`` are kept.
    """
    voxel = preset.pipeline.voxelization
    points = points.to(torch.float32)
    low = torch.tensor(voxel.point_range_min, dtype=torch.float32)
    high = torch.tensor(voxel.point_range_max, dtype=torch.float32)
    size = torch.tensor(voxel.voxel_size, dtype=torch.float32)
    grid = torch.tensor(voxel.grid_size)
    xyz = points[:, :3]
    inside = ((xyz >= low) & (xyz < high)).all(dim=1)
    index = torch.floor((xyz - low) / size).to(torch.int64)
    inside &= ((index >= 0) & (index < grid)).all(dim=1)
    points, index = points[inside], index[inside]
    keys = (index[:, 2] * grid[1] + index[:, 1]) * grid[0] + index[:, 0]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    order = torch.arange(keys.shape[0])
    first = torch.full((unique_keys.shape[0],), keys.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, inverse, order, reduce="amin")
    appearance = torch.argsort(first)[: voxel.max_voxels]                # voxel ids by first point
    rank_of_voxel = torch.full_like(first, -1)
    rank_of_voxel[appearance] = torch.arange(appearance.shape[0])
    point_voxel = rank_of_voxel[inverse]
    slot = _arrival_slot(inverse)
    used = (point_voxel >= 0) & (slot < voxel.max_points_per_voxel)
    count = torch.zeros(appearance.shape[0], dtype=torch.float32)
    count.index_add_(0, point_voxel[used], torch.ones(int(used.sum())))
    sums = torch.zeros(appearance.shape[0], points.shape[1], dtype=torch.float32)
    sums.index_add_(0, point_voxel[used], points[used])
    coords = index[first[appearance]]
    batch = torch.zeros(coords.shape[0], 1, dtype=torch.int64)
    return (sums / count[:, None]).to(torch.float16), torch.cat([batch, coords], dim=1).to(torch.int32)


def _arrival_slot(voxel_of_point: torch.Tensor) -> torch.Tensor:
    """For each point, how many earlier points (input order) fell in the same voxel."""
    order = torch.argsort(voxel_of_point, stable=True)
    sorted_voxels = voxel_of_point[order]
    starts = torch.ones_like(sorted_voxels, dtype=torch.bool)
    starts[1:] = sorted_voxels[1:] != sorted_voxels[:-1]
    start_position = torch.cummax(torch.where(starts, torch.arange(order.shape[0]), 0), dim=0).values
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.shape[0]) - start_position
    return slot


def decode_boxes(score: torch.Tensor, rot: torch.Tensor, dim: torch.Tensor, reg: torch.Tensor,
                 height: torch.Tensor, vel: torch.Tensor, preset: ModelPreset) -> torch.Tensor:
    """Head outputs ``[1, *, K]`` -> boxes ``[M, 11]`` (spec 6.3), sorted by descending score."""
    head, voxel = preset.pipeline.head, preset.pipeline.voxelization
    confidence, label = score[0].max(dim=0)                                # first max wins
    cell_x = head.out_size_factor * voxel.voxel_size[0]
    cell_y = head.out_size_factor * voxel.voxel_size[1]
    x = reg[0, 0] * cell_x + voxel.point_range_min[0]
    y = reg[0, 1] * cell_y + voxel.point_range_min[1]
    size = dim[0].exp()                                                    # w, l, h
    z = height[0, 0] - size[2] * 0.5
    low, high = head.post_center_range[:3], head.post_center_range[3:]
    keep = ((confidence >= head.score_threshold) & (x >= low[0]) & (x <= high[0]) & (y >= low[1])
            & (y <= high[1]) & (z >= low[2]) & (z <= high[2]))
    yaw = torch.atan2(rot[0, 0], rot[0, 1])
    boxes = torch.stack([x, y, z, size[0], size[1], size[2], yaw, vel[0, 0], vel[0, 1],
                         label.to(x.dtype), confidence], dim=1)[keep]
    return boxes[torch.argsort(boxes[:, 10], descending=True, stable=True)]


class BEVFusionReference(torch.nn.Module):
    """Plain float PyTorch forward of a :class:`BEVFusionModel` from raw sensor data."""

    def __init__(self, model: BEVFusionModel,
                 lidar_backbone: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 device: str | torch.device = "cpu"):
        """``lidar_backbone(features [M, C], coords [M, 4]) -> [1, 2C, X, Y]`` replaces the
        model's sparse encoder, e.g. to run the BN-folded fp16 weights of an exported SCN file
        (``scn_onnx.run_scn_graph``) so the reference uses exactly the deployed weights.
        ``device``: where every stage runs (e.g. "cuda" for the eager float32 GPU baseline)."""
        super().__init__()
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.lidar_backbone = lidar_backbone or model.encoders.lidar.backbone
        self.preset = model.preset
        camera = model.encoders.camera
        self.camera_backbone = CameraBackboneExport(camera, self.preset)
        self.vtransform = VTransformExport(camera)
        self.fuse = FuserExport(model.fuser, model.decoder)
        self.head = HeadExport(model.heads.object)

    @torch.no_grad()
    def camera_bev(self, images: Sequence[np.ndarray], points: torch.Tensor,
                   calibration: Calibration) -> torch.Tensor:
        """Camera branch up to the vtransform output ``[1, C, X/2, Y/2]``."""
        img = normalize_images(images, self.preset).float()[None]
        depth = depth_images(points, calibration, self.preset).float()[None]
        camera_feature, depth_weights = self.camera_backbone(img, depth)
        point_ids, cells = frustum_bev_cells(calibration, self.preset)
        pooled = bev_pool(camera_feature.double(), depth_weights.double(), point_ids, cells,
                          self.preset.camera_bev_size)
        return self.vtransform(pooled.float())

    @torch.no_grad()
    def lidar_bev(self, points: torch.Tensor) -> torch.Tensor:
        """Lidar branch: voxelize + sparse encoder -> ``[1, 2*C, X, Y]``."""
        features, coords = voxelize(points, self.preset)
        return self.lidar_backbone(features.float(), coords)

    @torch.no_grad()
    def forward(self, images: Sequence[np.ndarray], points: np.ndarray | torch.Tensor,
                calibration: Calibration) -> torch.Tensor:
        """Boxes ``[M, 11]`` (columns ``bevfusion_ros.head.decode.BOX_COLUMNS``) for one frame,
        on the reference's device."""
        with self.device:
            points = torch.as_tensor(points).to(self.device)[:, : self.preset.pipeline.lidar.num_features]
            middle = self.fuse(self.camera_bev(images, points, calibration), self.lidar_bev(points))
            return decode_boxes(*self.head(middle), preset=self.preset)
