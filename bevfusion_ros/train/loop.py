"""Training loop: the differentiable BEVFusion forward, optimiser, schedule, checkpoints, export.

:func:`forward_train` is the reference's dataflow (:class:`BEVFusionReference`) with gradients
and batches; AdamW with a per-step schedule (:func:`learning_rate`); ``model.pt`` and
``train_state.pt`` in ``out_dir`` let a time-limited run pause and resume with the same result.
The forward step by step, mixed precision, the optimiser, the outputs, resuming and determinism:
docs/training.md, "Loop".
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from bevfusion_ros.io.rig import Rig, load_rig, parse_camera_names
from bevfusion_ros.model.bevfusion import BEVFusionModel, build_model, calibrate_batchnorm
from bevfusion_ros.model.checkpoint import load_checkpoint
from bevfusion_ros.model.export import PRECISIONS
from bevfusion_ros.model.head import HeadOutput
from bevfusion_ros.model.presets import PRESETS, ModelPreset, get_preset
from bevfusion_ros.model.reference import bev_pool
from bevfusion_ros.model.sparse_encoder import flatten_z_into_channels, scatter_dense, sparse_input
from bevfusion_ros.sim.rig import CAMERAS_OPTION_HELP, RIG_OPTION_HELP, select_rig
from bevfusion_ros.train.data import Sample, SceneDataset, collate_samples, parse_scene_range
from bevfusion_ros.train.losses import LossConfig, LossTerms, transfusion_loss
from bevfusion_ros.train.targets import TargetConfig

SCHEDULES = ("onecycle", "cosine", "constant")
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
EXPORT_DIR = "model"


def _option(help: str, default: Any = dataclasses.MISSING, **cli: Any) -> Any:
    """A :class:`TrainConfig` field that is a ``bevfusion-train`` option with this ``help``
    text (metadata keys: see :class:`TrainConfig`)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Everything :func:`train` needs.

    ``bevfusion-train`` (:mod:`bevfusion_ros.tools.train`) has one option per field, built from
    the field's name (``--batch-size``), type and default and its metadata: ``help``, and where
    the field alone does not say it, ``option`` (another name), ``choices``, ``metavar``,
    ``parse`` (the value of the option's text, not called for an absent option without
    ``cli_default``) and ``cli_default`` (the text when the option is not given); fields whose
    metadata has ``cli: False`` are not options.
    """

    preset: ModelPreset = _option("model preset", choices=sorted(PRESETS), parse=get_preset)
    seeds: list[int] = _option("scene seeds: A:B, :B or a,b,c (default 0:8)", option="--scenes",
                               parse=parse_scene_range, cli_default="0:8")
    out_dir: Path = _option("output folder", option="--out")
    rig: Rig | None = _option(RIG_OPTION_HELP, None, parse=load_rig, metavar="RIG.yaml")
    cameras: tuple[str, ...] | None = _option(CAMERAS_OPTION_HELP, None, parse=parse_camera_names,
                                              metavar="NAME,NAME,...")
    epochs: int = _option("passes over the scenes", 1)
    batch_size: int = _option("scenes per optimiser step", 1)
    lr: float = _option("peak learning rate (AdamW)", 1e-3)
    weight_decay: float = _option("AdamW weight decay", 0.01)
    schedule: str = _option("learning-rate schedule", "onecycle", choices=SCHEDULES)
    grad_clip: float = _option("max gradient L2 norm", 35.0)
    device: str = _option("cpu, cuda or cuda:N", "cpu")
    amp: bool = _option("mixed precision (fp16 + GradScaler on CUDA, bfloat16 on CPU)", False)
    seed: int = _option("model init, dropout and order seed", 0)
    resume: Path | None = _option("model.pt (or its folder) to continue from", None)
    export: bool = _option("export the ONNX set to OUT/model", False)
    export_precision: str = _option("precision of the exported ONNX set", "fp16", choices=PRECISIONS)
    cache_dir: Path | None = _option("folder for preprocessed scenes (reused)", None, option="--cache")
    memory_cache: bool = _option("keep preprocessed scenes in RAM (small scene sets, --workers 0)", False)
    workers: int = _option("DataLoader worker processes", 0)
    rulebook_cache: int = _option("scenes whose sparse-conv rulebooks stay cached on the device", 16)
    precise_bn: int = _option("re-estimate BatchNorm statistics on this many scenes at the end "
                              "(0: keep the running averages)", 8)
    num_objects: int | None = _option("objects per scene (default: 20-40 drawn from the seed)", None,
                                      option="--objects")
    max_steps: int | None = _option("shorten the run (and its learning-rate schedule) to this many steps",
                                    None)
    stop_after: int | None = _option("pause after this many steps in total, schedule unchanged "
                                     "(continue with --resume OUT)", None)
    time_limit: float | None = _option("pause after this many seconds (continue with --resume OUT)", None)
    log_every: int = _option("print every n-th step (all go to train_log.jsonl)", 1)
    log: Callable[[str], None] | None = dataclasses.field(default=print, metadata={"cli": False})
    target_config: TargetConfig = dataclasses.field(default_factory=TargetConfig, metadata={"cli": False})
    loss_config: LossConfig = dataclasses.field(default_factory=LossConfig, metadata={"cli": False})


@dataclass
class TrainResult:
    history: list[dict[str, Any]]       # one entry per optimiser step
    checkpoint: Path
    export_dir: Path | None
    seconds_per_step: float


# ----------------------------------------------------------------------------- forward
class RulebookCache:
    """LRU of sparse-conv rulebook dicts per scene seed (``capacity`` 0 disables it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Any, dict] = OrderedDict()

    def get(self, key: Any) -> dict:
        if self.capacity <= 0:
            return {}
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry: dict = {}
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast (fp16 on CUDA, bfloat16 on CPU) when ``enabled``, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def camera_branch(model: BEVFusionModel, images: torch.Tensor, depth: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """images ``[B, N, 3, H, W]``, depth ``[B, N, 1, H, W]`` -> (camera_feature ``[B, N, fH, fW, C]``,
    depth weights ``[B, N, D, fH, fW]``), the layers of ``CameraBackboneExport`` on a batch."""
    camera = model.encoders.camera
    batch, cameras = images.shape[:2]
    p3 = camera["neck"](camera["backbone"](images.flatten(0, 1)))[0]
    vtransform = camera["vtransform"]
    output = vtransform.depth_and_context(p3, depth.flatten(0, 1))
    bins, channels = vtransform.depth_bins, vtransform.context_channels
    weights = output[:, :bins].softmax(dim=1)
    feature = output[:, bins:bins + channels].permute(0, 2, 3, 1)
    return (feature.reshape(batch, cameras, *feature.shape[1:]),
            weights.reshape(batch, cameras, *weights.shape[1:]))


def lidar_branch(model: BEVFusionModel, features: torch.Tensor, coords: torch.Tensor,
                 rulebooks: dict | None = None) -> torch.Tensor:
    """``SparseEncoder.forward`` with a reusable rulebook dict: voxels -> ``[1, 2C, X, Y]``."""
    encoder = model.encoders.lidar.backbone
    x = sparse_input(features, coords, encoder.sparse_shape)
    if rulebooks is not None:
        x = dataclasses.replace(x, rulebooks=rulebooks)
    out = encoder.conv_out(encoder.encoder_layers(encoder.conv_input(x)))
    return flatten_z_into_channels(scatter_dense(out.features, out.coords, out.spatial_shape))


def forward_train(model: BEVFusionModel, samples: list[Sample], device: torch.device | str,
                  amp: bool = False, rulebook_cache: RulebookCache | None = None) -> HeadOutput:
    """Differentiable forward of a batch of samples (docs/training.md) -> the head's output."""
    device = torch.device(device)
    preset = model.preset
    images = torch.stack([s["images"] for s in samples]).to(device, non_blocking=True).float()
    depth = torch.stack([s["depth"] for s in samples]).to(device, non_blocking=True).float()
    with autocast_context(device, amp):
        camera_feature, depth_weights = camera_branch(model, images, depth)
    pooled = []
    for b, sample in enumerate(samples):
        pooled.append(bev_pool(camera_feature[b].float(), depth_weights[b].float(),
                               sample["point_ids"].to(device), sample["cells"].to(device),
                               preset.camera_bev_size))
    lidar = []
    for sample in samples:
        rulebooks = rulebook_cache.get(sample["seed"]) if rulebook_cache is not None else None
        lidar.append(lidar_branch(model, sample["voxel_features"].to(device).float(),
                                  sample["voxel_coords"].to(device), rulebooks))
    with autocast_context(device, amp):
        camera_bev = model.encoders.camera["vtransform"].downsample(torch.cat(pooled))
        middle = model.decoder(model.fuser([camera_bev, torch.cat(lidar).to(camera_bev.dtype)]))
        return model.heads.object(middle)


def compute_loss(model: BEVFusionModel, output: HeadOutput, samples: list[Sample],
                 device: torch.device | str, target_config: TargetConfig = TargetConfig(),
                 loss_config: LossConfig = LossConfig()) -> LossTerms:
    """TransFusion loss of a batch (:func:`bevfusion_ros.train.losses.transfusion_loss`)."""
    heatmaps = torch.stack([s["heatmap"] for s in samples]).to(device)
    return transfusion_loss(output, heatmaps, [s["gt_boxes"].numpy() for s in samples],
                            [s["gt_labels"].numpy() for s in samples], model.heads.object.bev_pos,
                            model.preset, target_config, loss_config)


def precise_batchnorm(model: BEVFusionModel, dataset: SceneDataset, count: int,
                      device: torch.device | str, amp: bool = False,
                      rulebook_cache: RulebookCache | None = None) -> int:
    """Replace every BN's running statistics by their exact average over the first ``count``
    scenes (``calibrate_batchnorm``: BN layers in training mode with cumulative averaging, the
    rest, dropout included, in eval mode), so that the exported eval-mode network sees the
    statistics of its final weights rather than a slow (momentum 0.01) running average.
    Returns the number of BN layers; the model is left in training mode."""
    samples = (dataset[index] for index in range(min(count, len(dataset))))
    model.eval()
    try:
        return calibrate_batchnorm(model, lambda sample: forward_train(model, [sample], device, amp,
                                                                       rulebook_cache), samples)
    finally:
        model.train()


# ----------------------------------------------------------------------------- schedule
def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or total_steps <= 1:
        return base_lr
    progress = min(step / (total_steps - 1), 1.0)
    if schedule == "cosine":
        low = base_lr * 1e-3
        return low + (base_lr - low) * 0.5 * (1 + math.cos(math.pi * progress))
    up = 0.4                                       # onecycle
    if progress < up:
        low = base_lr / 10
        return low + (base_lr - low) * 0.5 * (1 - math.cos(math.pi * progress / up))
    low = base_lr * 1e-4
    return low + (base_lr - low) * 0.5 * (1 + math.cos(math.pi * (progress - up) / (1 - up)))


# ----------------------------------------------------------------------------- checkpoints
def _atomic_save(obj: Any, path: Path) -> None:
    temporary = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def save_checkpoint(model: BEVFusionModel, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, out_dir: Path, epoch: int, step: int,
                    config: TrainConfig) -> Path:
    """Write ``model.pt`` (plain CPU state dict) and ``train_state.pt``; returns model.pt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    _atomic_save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
                 model_path)
    state = {
        "epoch": epoch, "step": step, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "preset": config.preset.name, "rig": config.rig.tag() if config.rig else None,
        "cameras": list(config.preset.pipeline.camera_names), "seed": config.seed, "seeds": list(config.seeds),
        "lr": config.lr, "schedule": config.schedule, "epochs": config.epochs,
        "batch_size": config.batch_size,
    }
    _atomic_save(state, out_dir / STATE_FILE)
    return model_path


def _load_resume(model: BEVFusionModel, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, path: Path, log) -> int:
    """Load weights (and the train state beside them, if any); returns the steps done."""
    path = Path(path)
    model_path = path / MODEL_FILE if path.is_dir() else path
    load_checkpoint(model, model_path)
    state_path = model_path.parent / STATE_FILE
    if not state_path.is_file():
        log and log(f"resume: weights from {model_path} (no {STATE_FILE}: fresh optimiser)")
        return 0
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log and log(f"resume: {model_path} at step {state['step']} (epoch {state['epoch']} done)")
    return int(state["step"])


# ----------------------------------------------------------------------------- loop
def _format_step(epoch: int, epochs: int, index: int, per_epoch: int, step: int, total: int,
                 lr: float, terms: dict[str, Any], seconds: float, data_seconds: float) -> str:
    return (f"epoch {epoch}/{epochs} step {index}/{per_epoch} [{step}/{total}] lr {lr:.2e} "
            f"loss {terms['loss']:.4f} (heatmap {terms['heatmap']:.4f} cls {terms['cls']:.4f} "
            f"bbox {terms['bbox']:.4f}) pos {terms['pos']}/{terms['objects']} "
            f"grad {terms['grad_norm']:.2f} | {seconds:.2f} s/step, data {data_seconds:.2f} s")


def _quiet_worker(_worker_id: int) -> None:
    """DataLoader workers: one thread each (scene generation is NumPy/OpenCV; the workers, not
    their threads, are the parallelism)."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _batches(dataset: SceneDataset, order: list[int], batch_size: int, workers: int, pin: bool
             ) -> Iterable[list[Sample]]:
    if workers > 0:
        return DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                          collate_fn=collate_samples, worker_init_fn=_quiet_worker,
                          prefetch_factor=4, pin_memory=pin)
    return ([dataset[i] for i in order[start:start + batch_size]]
            for start in range(0, len(order), batch_size))


@dataclass
class Trainer:
    """The model, optimiser and loss settings of one run: :meth:`step` is one optimiser step."""

    model: BEVFusionModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    config: TrainConfig
    rulebooks: RulebookCache

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, samples: list[Sample], lr: float) -> dict[str, Any] | None:
        """Forward, loss, backward, clip, update; the loss terms and gradient norm, or None
        (nothing updated) when the loss is not finite."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        output = forward_train(self.model, samples, config.device, config.amp, self.rulebooks)
        terms = compute_loss(self.model, output, samples, config.device, config.target_config,
                             config.loss_config)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(terms.total):
            return None
        if self.scaler is not None:
            self.scaler.scale(terms.total).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            terms.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
            self.optimizer.step()
        return {**terms.as_dict(), "grad_norm": float(grad_norm)}   # float() waits for the device

    def checkpoint(self, out_dir: Path, step: int, per_epoch: int) -> Path:
        """:func:`save_checkpoint` after ``step`` steps of ``per_epoch`` per epoch; model.pt."""
        return save_checkpoint(self.model, self.optimizer, self.scaler, out_dir, step // per_epoch,
                               step, self.config)


def new_trainer(config: TrainConfig) -> tuple[Trainer, int]:
    """Model, optimiser and scaler of ``config`` (resumed if asked); returns the steps done."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config.preset, config.seed).to(device)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
    done = 0
    if config.resume is not None:
        done = _load_resume(model, optimizer, scaler, config.resume, config.log)
        model.to(device)
    return Trainer(model, optimizer, scaler, config, RulebookCache(config.rulebook_cache)), done


def fitted_to_rig(config: TrainConfig) -> TrainConfig:
    """``config`` with its rig resolved (``rig`` and ``cameras``, :func:`select_rig`) and its
    preset fitted to that rig (:meth:`ModelPreset.for_rig`): the cameras the model is exported for."""
    rig = select_rig(config.rig, config.cameras)
    return dataclasses.replace(config, rig=rig, cameras=None, preset=config.preset.for_rig(rig))


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.preset`` on the scenes ``config.seeds`` of ``config.rig``; see docs/training.md."""
    config = fitted_to_rig(config)
    log = config.log or (lambda _message: None)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer, step = new_trainer(config)
    device = torch.device(config.device)
    dataset = SceneDataset(config.preset, config.seeds, config.cache_dir, config.memory_cache,
                           config.target_config, config.num_objects, config.rig)
    per_epoch = math.ceil(len(dataset) / config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    stop = min(total, config.stop_after) if config.stop_after is not None else total
    deadline = time.monotonic() + (config.time_limit if config.time_limit is not None else math.inf)
    history: list[dict[str, Any]] = []
    log(f"training {config.preset.name} on {len(dataset)} scenes, {config.epochs} epochs x "
        f"{per_epoch} steps (batch {config.batch_size}), device {device}, amp {config.amp}, "
        f"{sum(p.numel() for p in trainer.parameters):,} parameters, {config.rig.describe()} -> {out_dir}"
        + (f"; resuming at step {step}" if step else ""))
    with open(out_dir / LOG_FILE, "a" if config.resume is not None else "w") as log_file:
        while step < stop and time.monotonic() < deadline:
            epoch, skip = divmod(step, per_epoch)
            order = np.random.default_rng(config.seed + epoch).permutation(len(dataset)).tolist()
            ready = time.perf_counter()
            for index, samples in enumerate(_batches(dataset, order[skip * config.batch_size:],
                                                     config.batch_size, config.workers,
                                                     device.type == "cuda"), start=skip + 1):
                start = time.perf_counter()
                lr = learning_rate(step, total, config.lr, config.schedule)
                terms = trainer.step(samples, lr)
                step += 1
                if terms is None:
                    log(f"epoch {epoch + 1} step {index}: non-finite loss, step skipped")
                else:
                    record = {"epoch": epoch + 1, "step": step, "lr": lr, **terms,
                              "seconds": time.perf_counter() - start, "data_seconds": start - ready}
                    history.append(record)
                    log_file.write(json.dumps(record) + "\n")
                    if step % config.log_every == 0 or step == stop:
                        log(_format_step(epoch + 1, config.epochs, index, per_epoch, step, total, lr,
                                         record, record["seconds"], record["data_seconds"]))
                ready = time.perf_counter()
                if step >= stop or time.monotonic() >= deadline:
                    break
            if step % per_epoch == 0 or step >= stop or time.monotonic() >= deadline:
                model_path = trainer.checkpoint(out_dir, step, per_epoch)
                log_file.flush()
                log(f"step {step}/{total}: checkpoint {model_path}")
    if step < total:
        log(f"paused after step {step} of {total}: continue with --resume {out_dir}")
    return _finish(trainer, dataset, config, out_dir, step, per_epoch, total, history)


def _finish(trainer: Trainer, dataset: SceneDataset, config: TrainConfig, out_dir: Path,
            step: int, per_epoch: int, total: int, history: list[dict[str, Any]]) -> TrainResult:
    """After the last step of the run: precise BN, checkpoint, export (not when paused)."""
    log = config.log or (lambda _message: None)
    model_path = out_dir / MODEL_FILE
    finished = step >= total
    if finished and config.precise_bn > 0 and history:
        count = precise_batchnorm(trainer.model, dataset, config.precise_bn, config.device,
                                  config.amp, trainer.rulebooks)
        log(f"precise BN: statistics of {count} BatchNorm layers re-estimated on "
            f"{min(config.precise_bn, len(dataset))} scenes")
        model_path = trainer.checkpoint(out_dir, step, per_epoch)
    if not model_path.is_file():
        model_path = trainer.checkpoint(out_dir, step, per_epoch)
    export_dir = None
    if config.export and finished:
        from bevfusion_ros.model.export import export_model_set
        export_dir = out_dir / EXPORT_DIR
        result = export_model_set(config.preset, config.export_precision, export_dir, checkpoint=model_path,
                                  trained_on=f"{len(config.seeds)} synthetic scenes of the {config.rig.describe()}")
        log(f"exported {config.preset.name} ({config.export_precision}) to {export_dir} "
            f"in {result.seconds:.1f} s")
    # The first steps also build rulebooks and caches: report the median.
    step_seconds = [record["seconds"] for record in history]
    seconds_per_step = float(np.median(step_seconds)) if step_seconds else float("nan")
    return TrainResult(history, model_path, export_dir, seconds_per_step)
