"""Training of the model toolkit's BEVFusion on synthetic scenes (TransFusion targets and losses).

* :mod:`.targets`: dense Gaussian heatmaps, the box encoding (inverse of ``decode_boxes``),
  Hungarian proposal assignment;
* :mod:`.losses`: Gaussian focal + sigmoid focal + L1 (TransFusion weights);
* :mod:`.data`: :class:`SceneDataset` of preprocessed scenes (optionally cached on disk);
* :mod:`.loop`: :func:`train` (AdamW, one-cycle/cosine, clipping, checkpoints, export);
  the CLI is :mod:`bevfusion_ros.tools.train` (``bevfusion-train``).

Importing this package imports torch.
"""
from bevfusion_ros.train.data import SceneDataset, calibration_for_preset, parse_scene_range
from bevfusion_ros.train.loop import TrainConfig, TrainResult, forward_train, train
from bevfusion_ros.train.losses import LossConfig, LossTerms, transfusion_loss
from bevfusion_ros.train.targets import TargetConfig, assign_proposals, encode_boxes, heatmap_targets

__all__ = [
    "LossConfig", "LossTerms", "SceneDataset", "TargetConfig", "TrainConfig", "TrainResult",
    "assign_proposals", "calibration_for_preset", "encode_boxes", "forward_train",
    "heatmap_targets", "parse_scene_range", "train", "transfusion_loss",
]
