"""TransFusion losses (mit-han-lab ``TransFusionHead.loss`` with the nuScenes config values).

    total = heatmap_weight * L_heatmap + cls_weight * L_cls + bbox_weight * L_bbox

* ``L_heatmap``: Gaussian focal loss (CornerNet/CenterPoint; alpha 2, gamma 4) of the dense
  heatmap ``sigmoid(dense_heatmap)`` clamped to [1e-4, 1 - 1e-4] against the Gaussian targets,
  **summed** over the batch and divided by ``max(1, number of target cells equal to 1)``
  (one per object), as ``avg_factor=max(heatmap.eq(1).sum(), 1)``. Weight 1.
* ``L_cls``: sigmoid focal loss (alpha 0.25, gamma 2) of every proposal's class logits
  (``HeadOutput.heatmap`` ``[B, C, K]``) against one-hot targets (the GT class for assigned
  proposals, all zero otherwise), summed and divided by ``max(1, number of positives)``. Weight 1.
* ``L_bbox``: L1 between the 10 regression outputs (center 2, height 1, dim 3, rot 2, vel 2,
  the encoding of :func:`bevfusion_ros.train.targets.encode_boxes`) and the targets of the
  positive proposals, per-channel ``code_weights`` 1 (center, height, dim, rot) and 0.2 (vel),
  summed and divided by ``max(1, number of positives)``; weight 0.25.

All loss arithmetic is float32 (safe under autocast). The assignment runs on detached CPU
copies of the predictions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bevfusion_ros.model.head import HeadOutput
from bevfusion_ros.model.presets import ModelPreset
from bevfusion_ros.train.targets import (
    BOX_CODE_LAYOUT,
    TargetConfig,
    assign_proposals,
    class_targets,
    regression_targets,
)

HEATMAP_CLAMP = 1e-4       # mit-han-lab clamp_sigmoid


@dataclass(frozen=True)
class LossConfig:
    """Weights of the three terms and the per-channel regression weights (TransFusion nuScenes)."""

    heatmap_weight: float = 1.0
    cls_weight: float = 1.0
    bbox_weight: float = 0.25
    code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    gaussian_alpha: float = 2.0
    gaussian_gamma: float = 4.0


@dataclass
class LossTerms:
    """The total (a scalar tensor with grad) and its parts as floats, for logging."""

    total: torch.Tensor
    heatmap: float
    cls: float
    bbox: float
    num_positive: int
    num_objects: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "heatmap": self.heatmap, "cls": self.cls,
                "bbox": self.bbox, "pos": self.num_positive, "objects": self.num_objects}


def gaussian_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
                        gamma: float = 4.0) -> torch.Tensor:
    """Summed Gaussian focal loss of ``sigmoid(logits)`` (clamped like mit-han-lab) vs ``target``
    in [0, 1]: ``-log(p) (1-p)^a`` at target == 1, ``-log(1-p) p^a (1-t)^g`` elsewhere."""
    prob = logits.float().sigmoid().clamp(HEATMAP_CLAMP, 1 - HEATMAP_CLAMP)
    target = target.float()
    positive = target.eq(1).float()
    pos = -prob.log() * (1 - prob).pow(alpha) * positive
    neg = -(1 - prob).log() * prob.pow(alpha) * (1 - target).pow(gamma) * (1 - positive)
    return (pos + neg).sum()


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Summed sigmoid focal loss (mmdet ``py_sigmoid_focal_loss``) of logits vs one-hot targets."""
    logits, target = logits.float(), target.float()
    prob = logits.sigmoid()
    pt = (1 - prob) * target + prob * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()


def regression_predictions(output: HeadOutput) -> torch.Tensor:
    """The head's box outputs stacked in the target layout: ``[B, 10, K]`` float32."""
    return torch.cat([getattr(output, name).float() for name, _ in BOX_CODE_LAYOUT], dim=1)


def transfusion_loss(output: HeadOutput, heatmap_targets: torch.Tensor,
                     gt_boxes: Sequence[np.ndarray], gt_labels: Sequence[np.ndarray],
                     bev_positions: torch.Tensor, preset: ModelPreset,
                     target_config: TargetConfig = TargetConfig(),
                     loss_config: LossConfig = LossConfig()) -> LossTerms:
    """Loss of one batch.

    ``output``: the head's :class:`HeadOutput` (training mode); ``heatmap_targets`` ``[B, C, X, Y]``
    (:func:`bevfusion_ros.train.targets.heatmap_targets`); per sample GT boxes ``[M, 9]`` and
    labels ``[M]`` (NumPy); ``bev_positions`` the head's ``bev_pos`` buffer ``[X*Y, 2]`` (cell
    centres, to know each proposal's query position).
    """
    device = output.dense_heatmap.device
    batch, num_classes, num_proposals = output.heatmap.shape
    num_objects = int(heatmap_targets.eq(1).sum())
    heatmap_loss = gaussian_focal_loss(output.dense_heatmap, heatmap_targets, loss_config.gaussian_alpha,
                                       loss_config.gaussian_gamma) / max(num_objects, 1)

    cls_t, reg_t, positive = [], [], []
    cells = bev_positions.detach().cpu().numpy()
    proposal_class = output.proposal_class.detach().cpu().numpy()
    proposal_index = output.proposal_index.detach().cpu().numpy()
    centre = output.center.detach().float().cpu().numpy()
    logits = output.heatmap.detach().float().cpu().numpy()
    for b in range(batch):
        assignment = assign_proposals(proposal_class[b], cells[proposal_index[b]], centre[b].T,
                                      logits[b], gt_boxes[b], gt_labels[b], preset, target_config)
        cls_t.append(class_targets(assignment, gt_labels[b], num_classes, num_proposals))
        targets, mask = regression_targets(assignment, gt_boxes[b], num_proposals, preset)
        reg_t.append(targets)
        positive.append(mask)
    cls_target = torch.from_numpy(np.stack(cls_t)).to(device)
    reg_target = torch.from_numpy(np.stack(reg_t)).to(device)
    positive_mask = torch.from_numpy(np.stack(positive)).to(device)
    num_positive = int(positive_mask.sum())
    normaliser = max(num_positive, 1)
    cls_loss = sigmoid_focal_loss(output.heatmap, cls_target, loss_config.focal_alpha,
                                  loss_config.focal_gamma) / normaliser
    code_weights = torch.tensor(loss_config.code_weights, dtype=torch.float32, device=device)
    weights = code_weights[None, :, None] * positive_mask[:, None, :].float()
    bbox_loss = ((regression_predictions(output) - reg_target).abs() * weights).sum() / normaliser
    total = (loss_config.heatmap_weight * heatmap_loss + loss_config.cls_weight * cls_loss
             + loss_config.bbox_weight * bbox_loss)
    return LossTerms(total=total, heatmap=float(heatmap_loss.detach()), cls=float(cls_loss.detach()),
                     bbox=float(bbox_loss.detach()), num_positive=num_positive, num_objects=num_objects)
