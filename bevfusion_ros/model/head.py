"""TransFusion object head: the network inside CUDA-BEVFusion's ``head.bbox.onnx`` (spec 2.5, 6.2).

Module and attribute names mirror mit-han-lab/bevfusion (commit db75150717a9) so that
``state_dict()`` keys equal those of their checkpoints (``shared_conv.weight``,
``heatmap_head.0.conv.weight``, ``decoder.0.self_attn.in_proj_weight``,
``prediction_heads.0.center.0.bn.running_mean``, ...). Facts taken from (no code copied):

- ``bevfusion:mmdet3d/models/heads/bbox/transfusion.py`` (``TransFusionHead``: layers,
  ``create_2D_grid``, ``forward_single``, ``init_weights``),
- ``bevfusion:mmdet3d/models/utils/transformer.py`` (``PositionEmbeddingLearned``,
  ``TransformerDecoderLayer``, ``MultiheadAttention``, ``FFN`` and its -2.19 heatmap bias),
- ``bevfusion:configs/nuscenes/det/transfusion/default.yaml`` (``common_heads``, dropout 0.1,
  BN momentum 0.1),
- ``CUDA-BEVFusion/qat/export-transfuser.py`` (``SubclassHeadBBox``: ``topk`` instead of
  ``argsort``, pedestrian/traffic_cone skip the local-max suppression, the score formula and
  the output order score, rot, dim, reg, height, vel).

BEV tensors are ``[B, C, X, Y]`` (dim 2 is x): a flattened cell index is ``x * Y + y`` and its
centre, in cell units, is ``(x + 0.5, y + 0.5)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bevfusion_ros.model.presets import ModelPreset

# Box regression heads of the prediction FFN and their output channels, in mit-han-lab's
# order (config ``common_heads``); the class ``heatmap`` head is appended after them.
BOX_HEAD_CHANNELS = {"center": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2}
# Classes whose proposals skip the 3x3 local-max suppression (mit-han-lab: nuScenes 8 and 9).
UNSUPPRESSED_CLASSES = ("pedestrian", "traffic_cone")
HEATMAP_PRIOR_BIAS = -2.19    # logit of a 0.1 prior, as mit-han-lab's FFN.init_weights
DROPOUT = 0.1                 # mit-han-lab config; active in training mode only
BN_MOMENTUM = 0.1


class ConvModule(nn.Module):
    """mmcv ``ConvModule`` without bias: ``conv`` -> ``bn`` -> ReLU (attribute names as mmcv).

    ``conv`` is initialised like mmcv (Kaiming normal, fan_out, ReLU gain).
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class PositionEmbeddingLearned(nn.Module):
    """Learned embedding of 2-D positions: Conv1d(2->C), BN1d, ReLU, Conv1d(C->C).

    ``positions`` [B, P, 2] (cell units) -> embedding [B, C, P].
    """

    def __init__(self, input_channels: int, embedding_channels: int) -> None:
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Conv1d(input_channels, embedding_channels, kernel_size=1),
            nn.BatchNorm1d(embedding_channels),
            nn.ReLU(inplace=True),
            nn.Conv1d(embedding_channels, embedding_channels, kernel_size=1))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.position_embedding_head(positions.transpose(1, 2))


class MultiheadAttention(nn.Module):
    """Scaled dot-product attention with packed q/k/v projection ``in_proj_weight`` [3E, E].

    Batch-first here (mit-han-lab's is sequence-first; the arithmetic is the same):
    query [B, Lq, E], key and value [B, Lk, E] -> [B, Lq, E]. Per head h (D = E / heads):
    softmax(q_h k_h^T / sqrt(D)) v_h, heads concatenated, then ``out_proj``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, E] -> [B, heads, L, D]."""
        batch, length, embed = x.shape
        return x.reshape(batch, length, self.num_heads, embed // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, weight_q, bias_q))
        k = self._split_heads(F.linear(key, weight_k, bias_k))
        v = self._split_heads(F.linear(value, weight_v, bias_v))
        q = q * q.shape[-1] ** -0.5
        attention = self.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1))
        heads = attention @ v                                    # [B, heads, Lq, D]
        batch, _, length, _ = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(batch, length, -1))


class TransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, cross-attention to the BEV, ReLU FFN.

    As mit-han-lab: the learned positional embedding is added to query, key **and value** of
    the self-attention (q = k = v = query + pos) and to the cross-attention's key **and value**
    (k = v = bev + bev_pos); the cross-attention query is query + query_pos. LayerNorm eps 1e-5.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_channels: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads, dropout)
        self.multihead_attn = MultiheadAttention(d_model, num_heads, dropout)
        self.linear1 = nn.Linear(d_model, ffn_channels)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_channels, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.self_posembed = PositionEmbeddingLearned(2, d_model)
        self.cross_posembed = PositionEmbeddingLearned(2, d_model)

    def forward(self, query: torch.Tensor, key: torch.Tensor, query_pos: torch.Tensor,
                key_pos: torch.Tensor) -> torch.Tensor:
        """query [B, C, Pq], key [B, C, Pk], query_pos [B, Pq, 2], key_pos [B, Pk, 2] -> [B, C, Pq]."""
        query_pos_embed = self.self_posembed(query_pos).transpose(1, 2)     # [B, Pq, C]
        key_with_pos = (key + self.cross_posembed(key_pos)).transpose(1, 2)  # [B, Pk, C]
        query = query.transpose(1, 2)
        positioned = query + query_pos_embed
        query = self.norm1(query + self.dropout1(self.self_attn(positioned, positioned, positioned)))
        attended = self.multihead_attn(query + query_pos_embed, key_with_pos, key_with_pos)
        query = self.norm2(query + self.dropout2(attended))
        feedforward = self.linear2(self.dropout(F.relu(self.linear1(query))))
        query = self.norm3(query + self.dropout3(feedforward))
        return query.transpose(1, 2)


class FFN(nn.Module):
    """Prediction heads: per head a Sequential(ConvModule(Conv1d C->head_conv, BN1d), Conv1d -> out).

    ``forward`` maps query features [B, C, K] to {head name: [B, out, K]}; the ``heatmap``
    head's output bias starts at the 0.1 prior (-2.19) like mit-han-lab's ``FFN.init_weights``.
    """

    def __init__(self, in_channels: int, head_channels: dict[str, int], head_conv_channels: int
                 ) -> None:
        super().__init__()
        self.head_names = tuple(head_channels)
        for name, out_channels in head_channels.items():
            self.add_module(name, nn.Sequential(
                ConvModule(nn.Conv1d(in_channels, head_conv_channels, 1, bias=False),
                           nn.BatchNorm1d(head_conv_channels, momentum=BN_MOMENTUM)),
                nn.Conv1d(head_conv_channels, out_channels, 1)))
        nn.init.constant_(self.heatmap[-1].bias, HEATMAP_PRIOR_BIAS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(x) for name in self.head_names}


def bev_cell_centres(x_size: int, y_size: int) -> torch.Tensor:
    """Centres (x + 0.5, y + 0.5) of all BEV cells, in cell units: [X * Y, 2], row x * Y + y."""
    x, y = torch.meshgrid(torch.arange(x_size, dtype=torch.float32),
                          torch.arange(y_size, dtype=torch.float32), indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2) + 0.5


class LocalMaxSuppression(nn.Module):
    """Keep only local maxima of a class heatmap, zero everything else (spec 6.2 step 2).

    ``forward(heatmap [B, C, X, Y] probabilities)`` -> heatmap * (heatmap == local_max). The
    local max is a ``kernel_size`` max-pool, stride 1, over the interior only (mit-han-lab pools
    without padding and writes the result into [k//2 : -k//2]); the border of width k // 2 has
    local max 0, so no positive value survives there. Classes named in ``unsuppressed_classes``
    use the heatmap itself as local max (every cell kept). Both masks are constant buffers, so
    the exported graph is MaxPool + Where with static shapes.
    """

    def __init__(self, class_names: tuple[str, ...], bev_size: tuple[int, int], kernel_size: int,
                 unsuppressed_classes: tuple[str, ...] = UNSUPPRESSED_CLASSES) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        border = kernel_size // 2
        interior = torch.zeros(bev_size, dtype=torch.bool)
        interior[border:bev_size[0] - border, border:bev_size[1] - border] = True
        self.register_buffer("interior", interior, persistent=False)
        self.register_buffer("unsuppressed", torch.tensor(
            [name in unsuppressed_classes for name in class_names])[:, None, None], persistent=False)

    def forward(self, heatmap: torch.Tensor) -> torch.Tensor:
        border = self.kernel_size // 2
        # Padded pooling equals the unpadded one on the interior; the border is masked to 0.
        pooled = F.max_pool2d(heatmap, kernel_size=self.kernel_size, stride=1, padding=border)
        local_max = torch.where(self.interior, pooled, torch.zeros_like(pooled))
        local_max = torch.where(self.unsuppressed, heatmap, local_max)
        return heatmap * (heatmap == local_max).to(heatmap.dtype)


def select_top_proposals(suppressed: torch.Tensor, num_proposals: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K over the class-major flattened heatmap [B, C, N] (N = X * Y cells).

    Returns (class [B, K], cell index [B, K]) int64, in descending heatmap order; flat index
    = class * N + cell. ``topk`` as CUDA-BEVFusion's export (mit-han-lab uses argsort).
    """
    batch, classes, cells = suppressed.shape
    flat_index = suppressed.reshape(batch, classes * cells).topk(num_proposals, dim=-1).indices
    proposal_class = torch.div(flat_index, cells, rounding_mode="trunc")   # indices are >= 0
    return proposal_class, flat_index - proposal_class * cells


class HeadOutput(NamedTuple):
    """Everything the head computes, B batch, C classes, K proposals, BEV [X, Y].

    ``score`` [B, C, K] = sigmoid(heatmap) * query_heatmap_score * one_hot(proposal_class);
    ``center`` [B, 2, K] is in BEV-cell units with the query position added (the ``reg``
    output); ``height`` [B, 1, K], ``dim`` [B, 3, K], ``rot`` [B, 2, K], ``vel`` [B, 2, K] and
    ``heatmap`` [B, C, K] (logits) are the prediction FFN outputs of the last decoder layer.
    ``dense_heatmap`` [B, C, X, Y] are the dense class logits, ``query_heatmap_score``
    [B, C, K] the suppressed dense probabilities at each proposal's cell (all classes).
    """

    score: torch.Tensor
    rot: torch.Tensor
    dim: torch.Tensor
    center: torch.Tensor
    height: torch.Tensor
    vel: torch.Tensor
    heatmap: torch.Tensor
    dense_heatmap: torch.Tensor
    query_heatmap_score: torch.Tensor
    proposal_class: torch.Tensor
    proposal_index: torch.Tensor


def gather_cells(values: torch.Tensor, cell_index: torch.Tensor) -> torch.Tensor:
    """values [B, C, N] at cell_index [B, K] -> [B, C, K] (GatherElements in ONNX)."""
    batch, channels, _ = values.shape
    return values.gather(2, cell_index[:, None, :].expand(batch, channels, cell_index.shape[1]))


def one_hot_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels [B, K] int64 -> float32 one-hot [B, num_classes, K] (Equal + Cast in ONNX)."""
    classes = torch.arange(num_classes, device=labels.device)
    return (labels[:, None, :] == classes[None, :, None]).float()


class TransFusionHead(nn.Module):
    """TransFusion head for ``preset``: middle [B, sum(fpn_out_channels), X, Y] -> :class:`HeadOutput`.

    Steps (spec 6.2): shared 3x3 conv; dense class heatmap, sigmoid, :class:`LocalMaxSuppression`
    (pedestrian/traffic_cone exempt, found by name); top-K proposals over all classes; query =
    shared feature at the cell + ``class_encoding(one_hot)``; query position = cell centre;
    decoder layers (cross-attention to every BEV cell); prediction FFNs with the query position
    added to ``center``; score of spec 6.2 step 7.
    """

    def __init__(self, preset: ModelPreset) -> None:
        super().__init__()
        spec = preset.head
        class_names = preset.pipeline.head.class_names
        num_classes = len(class_names)
        hidden = spec.hidden_channels
        self.num_proposals = preset.pipeline.head.num_proposals
        self.shared_conv = nn.Conv2d(sum(preset.fuser.fpn_out_channels), hidden, 3, padding=1)
        self.heatmap_head = nn.Sequential(
            ConvModule(nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
                       nn.BatchNorm2d(hidden, momentum=BN_MOMENTUM)),
            nn.Conv2d(hidden, num_classes, 3, padding=1))
        self.class_encoding = nn.Conv1d(num_classes, hidden, 1)
        self.decoder = nn.ModuleList(
            TransformerDecoderLayer(hidden, spec.num_heads, spec.ffn_channels, DROPOUT)
            for _ in range(spec.num_decoder_layers))
        self.prediction_heads = nn.ModuleList(
            FFN(hidden, {**BOX_HEAD_CHANNELS, "heatmap": num_classes}, spec.head_conv_channels)
            for _ in range(spec.num_decoder_layers))
        # Parameter-free parts (no state_dict entries, so checkpoint keys stay mit-han-lab's).
        self.local_max_suppression = LocalMaxSuppression(class_names, preset.bev_size,
                                                         spec.nms_kernel_size)
        self.register_buffer("bev_pos", bev_cell_centres(*preset.bev_size), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform decoder matrices (mit-han-lab ``init_weights``) and the 0.1 class prior
        on the dense heatmap bias too, so that random-weight scores are ~0.01, not saturated."""
        for parameter in self.decoder.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        nn.init.constant_(self.heatmap_head[-1].bias, HEATMAP_PRIOR_BIAS)

    def forward(self, middle: torch.Tensor) -> HeadOutput:
        features = self.shared_conv(middle)
        batch, hidden, x_size, y_size = features.shape
        flat_features = features.reshape(batch, hidden, x_size * y_size)         # [B, C, N]
        dense_heatmap = self.heatmap_head(features)
        num_classes = dense_heatmap.shape[1]
        suppressed = self.local_max_suppression(dense_heatmap.detach().sigmoid())
        suppressed = suppressed.reshape(batch, num_classes, x_size * y_size)      # [B, classes, N]
        proposal_class, proposal_index = select_top_proposals(suppressed, self.num_proposals)
        one_hot = one_hot_classes(proposal_class, num_classes)                   # [B, classes, K]
        query = gather_cells(flat_features, proposal_index) + self.class_encoding(one_hot)
        query_pos = self.bev_pos[proposal_index]                                  # [B, K, 2]
        bev_pos = self.bev_pos.expand(batch, *self.bev_pos.shape)                 # [B, N, 2]
        for layer, prediction_head in zip(self.decoder, self.prediction_heads):
            query = layer(query, flat_features, query_pos, bev_pos)
            prediction = prediction_head(query)
            prediction["center"] = prediction["center"] + query_pos.transpose(1, 2)
            query_pos = prediction["center"].detach().transpose(1, 2)
        query_heatmap_score = gather_cells(suppressed, proposal_index)
        score = prediction["heatmap"].sigmoid() * query_heatmap_score * one_hot
        return HeadOutput(score=score, dense_heatmap=dense_heatmap,
                          query_heatmap_score=query_heatmap_score, proposal_class=proposal_class,
                          proposal_index=proposal_index, **prediction)


class HeadExport(nn.Module):
    """``head.bbox.onnx``: middle [1, C, X, Y] -> (score [1, classes, K], rot [1, 2, K],
    dim [1, 3, K], reg [1, 2, K], height [1, 1, K], vel [1, 2, K]) in the export's order."""

    OUTPUT_NAMES = ("score", "rot", "dim", "reg", "height", "vel")

    def __init__(self, head: TransFusionHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, middle: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.head(middle)
        return out.score, out.rot, out.dim, out.center, out.height, out.vel


def random_bev_features(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ReLU'd standard normals of ``shape`` (float32), like the post-ReLU BEV maps of the model."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).relu()


def head_input_shape(preset: ModelPreset) -> tuple[int, int, int, int]:
    """Shape of ``middle``: [1, sum(fpn_out_channels), X, Y], e.g. [1, 512, 180, 180]."""
    return (1, sum(preset.fuser.fpn_out_channels), *preset.bev_size)


def head_sample_inputs(preset: ModelPreset, seed: int) -> torch.Tensor:
    """Random ``middle`` [1, C, X, Y] float32 (ReLU'd normals), reproducible from ``seed``."""
    return random_bev_features(head_input_shape(preset), seed)
