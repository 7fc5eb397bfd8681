"""TransFusion training targets: dense Gaussian heatmaps, box encoding, proposal assignment.

Conventions are the head's (:mod:`bevfusion_ros.model.head`, spec 6.2/6.3): BEV grid
``[C, X, Y]``, cells of ``out_size_factor * voxel`` from the voxelizer's ``point_range_min``;
ground-truth boxes ``[M, 9]`` in the CUDA layout with z the box centre. :func:`encode_boxes` is
the exact inverse of ``decode_boxes``; :func:`heatmap_targets` follows mmdet3d/TransFusion;
:func:`assign_proposals` is a one-to-one (Hungarian) assignment restricted to feasible pairs,
solved by ``scipy.optimize.linear_sum_assignment``.
The encoding, the heatmap radius and the assignment costs, and why: docs/training.md, "Targets".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from bevfusion_ros.model.presets import ModelPreset

BOX_CODE_SIZE = 10
# (name, channels) of the encoded box, in the head's BOX_HEAD_CHANNELS order.
BOX_CODE_LAYOUT = (("center", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2))
INFEASIBLE_COST = 1.0e6        # cost of a forbidden pair; such pairs are dropped after solving


@dataclass(frozen=True)
class TargetConfig:
    """Target and assignment parameters (TransFusion ``train_cfg`` defaults)."""

    gaussian_overlap: float = 0.1      # min_overlap of gaussian_radius
    min_radius: int = 2                # cells
    cls_cost_weight: float = 0.15      # FocalLossCost weight
    reg_cost_weight: float = 0.25      # BBoxBEVL1Cost weight
    focal_alpha: float = 0.25          # of the class cost
    focal_gamma: float = 2.0
    match_margin: float = 1.0          # cells beyond the GT's heatmap radius a proposal may sit


@dataclass(frozen=True)
class BevGrid:
    """The head's BEV grid in metres: origin (xmin, ymin), cell size (cx, cy), size (X, Y)."""

    xmin: float
    ymin: float
    cell_x: float
    cell_y: float
    size_x: int
    size_y: int

    @classmethod
    def of(cls, preset: ModelPreset) -> "BevGrid":
        voxel, head = preset.pipeline.voxelization, preset.pipeline.head
        size_x, size_y = preset.bev_size
        return cls(voxel.point_range_min[0], voxel.point_range_min[1],
                   head.out_size_factor * voxel.voxel_size[0],
                   head.out_size_factor * voxel.voxel_size[1], size_x, size_y)

    @property
    def range_xy(self) -> tuple[float, float]:
        """Extent of the grid in metres (x, y), e.g. (108, 108)."""
        return self.size_x * self.cell_x, self.size_y * self.cell_y


# ----------------------------------------------------------------------------- box encoding
def encode_boxes(boxes: np.ndarray, preset: ModelPreset) -> np.ndarray:
    """GT boxes ``[M, 9]`` -> regression targets ``[M, 10]`` float64 (layout in docs/training.md)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    grid = BevGrid.of(preset)
    code = np.empty((len(boxes), BOX_CODE_SIZE), dtype=np.float64)
    code[:, 0] = (boxes[:, 0] - grid.xmin) / grid.cell_x
    code[:, 1] = (boxes[:, 1] - grid.ymin) / grid.cell_y
    code[:, 2] = boxes[:, 2] + boxes[:, 5] * 0.5
    code[:, 3:6] = np.log(boxes[:, 3:6])
    code[:, 6] = np.sin(boxes[:, 6])
    code[:, 7] = np.cos(boxes[:, 6])
    code[:, 8:10] = boxes[:, 7:9]
    return code


# ----------------------------------------------------------------------------- heatmaps
def gaussian_radius(length: float, width: float, min_overlap: float) -> float:
    """mmdet3d ``gaussian_radius((length, width), min_overlap)`` (CenterNet's three cases,
    returning ``(b + sqrt(b^2 - 4ac)) / 2`` each, i.e. without the ``/ 2a`` of the quadratic
    formula, exactly as mmdet3d/TransFusion compute it). Sizes in BEV cells."""
    height, width = float(length), float(width)
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def heatmap_radii(boxes: np.ndarray, preset: ModelPreset, config: TargetConfig = TargetConfig()
                  ) -> np.ndarray:
    """Integer Gaussian radius (cells) of each box: ``max(min_radius, int(gaussian_radius(
    (l / cy, w / cx), overlap)))`` (TransFusion: width = w / voxel_x / factor, length likewise)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    grid = BevGrid.of(preset)
    radii = [max(config.min_radius,
                 int(gaussian_radius(box[4] / grid.cell_y, box[3] / grid.cell_x,
                                     config.gaussian_overlap)))
             for box in boxes]
    return np.asarray(radii, dtype=np.int64)


def gaussian_2d(radius: int) -> np.ndarray:
    """mmdet3d ``gaussian_2d((d, d), sigma=d / 6)`` with d = 2r + 1: ``[d, d]`` float64, 1 at the
    centre, values below ``eps * max`` zeroed."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    h = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h


def draw_gaussian(heatmap: np.ndarray, centre: tuple[int, int], radius: int) -> None:
    """mmdet3d ``draw_heatmap_gaussian`` on one ``[X, Y]`` map (in place, element-wise max):
    ``centre`` = integer (ix, iy), clipped at the map borders."""
    gaussian = gaussian_2d(radius)
    ix, iy = centre
    size_x, size_y = heatmap.shape
    left, right = min(ix, radius), min(size_x - ix, radius + 1)
    top, bottom = min(iy, radius), min(size_y - iy, radius + 1)
    if left + right <= 0 or top + bottom <= 0:
        return
    window = heatmap[ix - left:ix + right, iy - top:iy + bottom]
    patch = gaussian[radius - left:radius + right, radius - top:radius + bottom]
    np.maximum(window, patch.astype(heatmap.dtype), out=window)


def boxes_in_grid(boxes: np.ndarray, preset: ModelPreset) -> np.ndarray:
    """bool ``[M]``: centre inside the BEV grid ``[min, max)`` in x and y and positive sizes
    (mmdet3d's ObjectRangeFilter on the point-cloud range)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    grid = BevGrid.of(preset)
    span_x, span_y = grid.range_xy
    return ((boxes[:, 0] >= grid.xmin) & (boxes[:, 0] < grid.xmin + span_x)
            & (boxes[:, 1] >= grid.ymin) & (boxes[:, 1] < grid.ymin + span_y)
            & (boxes[:, 3:6] > 0).all(axis=1))


def centre_cells(boxes: np.ndarray, preset: ModelPreset) -> np.ndarray:
    """Box centres in BEV-cell units ``[M, 2]`` float64 (continuous; the cell is ``int()``)."""
    return encode_boxes(boxes, preset)[:, 0:2]


def heatmap_targets(boxes: np.ndarray, labels: np.ndarray, preset: ModelPreset,
                    config: TargetConfig = TargetConfig()) -> np.ndarray:
    """Dense target ``[C, X, Y]`` float32: one Gaussian per box (inside the grid) in its class
    channel; exactly 1.0 at each box's centre cell."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    grid = BevGrid.of(preset)
    heatmap = np.zeros((preset.num_classes, grid.size_x, grid.size_y), dtype=np.float32)
    keep = boxes_in_grid(boxes, preset)
    boxes, labels = boxes[keep], labels[keep]
    for box, label, radius, centre in zip(boxes, labels, heatmap_radii(boxes, preset, config),
                                          centre_cells(boxes, preset)):
        draw_gaussian(heatmap[label], (int(centre[0]), int(centre[1])), int(radius))
    return heatmap


# ----------------------------------------------------------------------------- assignment
@dataclass(frozen=True)
class Assignment:
    """Positive proposals of one sample: ``proposal[i]`` (index into K) regresses GT ``gt[i]``."""

    proposal: np.ndarray
    gt: np.ndarray

    def __len__(self) -> int:
        return int(self.proposal.shape[0])


def _focal_class_cost(logits: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """mmdet ``FocalLossCost`` per (proposal, class): pos - neg focal terms, ``[K, C]``."""
    prob = 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))
    eps = 1e-12
    neg = -np.log(1 - prob + eps) * (1 - alpha) * prob ** gamma
    pos = -np.log(prob + eps) * alpha * (1 - prob) ** gamma
    return pos - neg


def assign_proposals(proposal_class: np.ndarray, proposal_cells: np.ndarray,
                     pred_centre: np.ndarray, cls_logits: np.ndarray, gt_boxes: np.ndarray,
                     gt_labels: np.ndarray, preset: ModelPreset,
                     config: TargetConfig = TargetConfig()) -> Assignment:
    """One-to-one Hungarian assignment of K proposals to M GT boxes (one sample).

    proposal_class ``[K]`` int, proposal_cells ``[K, 2]`` the query positions (cell centres,
    cell units), pred_centre ``[K, 2]`` the predicted centres (cell units), cls_logits
    ``[C, K]`` (the proposals' ``heatmap`` logits), gt_boxes ``[M, 9]``, gt_labels ``[M]``.
    Feasible pairs: same class and ``|proposal_cell - gt_centre| <= radius + match_margin``
    (cells); cost = 0.15 * focal class cost + 0.25 * L1 of the predicted and GT centres
    normalised by the grid extent. Pairs matched only through infeasible entries are dropped.
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 9)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    empty = Assignment(np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(gt_boxes) == 0 or len(proposal_class) == 0:
        return empty
    grid = BevGrid.of(preset)
    gt_centre = centre_cells(gt_boxes, preset)                                    # [M, 2]
    radii = heatmap_radii(gt_boxes, preset, config).astype(np.float64)           # [M]
    proposal_cells = np.asarray(proposal_cells, dtype=np.float64)
    distance = np.linalg.norm(proposal_cells[:, None, :] - gt_centre[None, :, :], axis=2)  # [K, M]
    feasible = ((np.asarray(proposal_class)[:, None] == gt_labels[None, :])
                & (distance <= radii[None, :] + config.match_margin)
                & boxes_in_grid(gt_boxes, preset)[None, :])
    if not feasible.any():
        return empty
    class_cost = _focal_class_cost(np.asarray(cls_logits, dtype=np.float64).T,
                                   config.focal_alpha, config.focal_gamma)[:, gt_labels]   # [K, M]
    scale = np.array([grid.size_x, grid.size_y], dtype=np.float64)          # cells -> fraction
    pred = np.asarray(pred_centre, dtype=np.float64) / scale
    reg_cost = np.abs(pred[:, None, :] - (gt_centre / scale)[None, :, :]).sum(axis=2)
    cost = config.cls_cost_weight * class_cost + config.reg_cost_weight * reg_cost
    cost = np.where(feasible, cost, INFEASIBLE_COST)
    # Only rows/columns with a feasible entry take part (smaller problem, same optimum).
    rows_used = np.nonzero(feasible.any(axis=1))[0]
    cols_used = np.nonzero(feasible.any(axis=0))[0]
    rows, cols = linear_sum_assignment(cost[np.ix_(rows_used, cols_used)])
    proposal, gt = rows_used[rows], cols_used[cols]
    keep = feasible[proposal, gt]
    order = np.argsort(proposal[keep], kind="stable")
    return Assignment(proposal[keep][order].astype(np.int64), gt[keep][order].astype(np.int64))


def regression_targets(assignment: Assignment, gt_boxes: np.ndarray, num_proposals: int,
                       preset: ModelPreset) -> tuple[np.ndarray, np.ndarray]:
    """(targets ``[10, K]`` float32, positive mask ``[K]`` bool) for one sample."""
    targets = np.zeros((BOX_CODE_SIZE, num_proposals), dtype=np.float32)
    positive = np.zeros(num_proposals, dtype=bool)
    if len(assignment):
        code = encode_boxes(np.asarray(gt_boxes)[assignment.gt], preset)
        targets[:, assignment.proposal] = code.T.astype(np.float32)
        positive[assignment.proposal] = True
    return targets, positive


def class_targets(assignment: Assignment, gt_labels: np.ndarray, num_classes: int,
                  num_proposals: int) -> np.ndarray:
    """One-hot ``[C, K]`` float32: GT class for positives, all zero (background) otherwise."""
    targets = np.zeros((num_classes, num_proposals), dtype=np.float32)
    if len(assignment):
        targets[np.asarray(gt_labels)[assignment.gt], assignment.proposal] = 1.0
    return targets
