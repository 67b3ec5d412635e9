"""Train the YOLOv1 detector on PASCAL VOC (or the generated demo set) with the YOLO loss.

    python train_detector.py --data demo                                  # CPU demo, minutes
    python train_detector.py --data voc --data-root ~/data --backbone runs/pretrainer/x/best.pt
    torchrun --nproc-per-node=8 train_detector.py --data voc --data-root ~/data ...

Reads top to bottom: config, distributed setup and seed, data, model, optimizer, resume, then
the loop of train_one_epoch / evaluate / checkpoint. Logs to TensorBoard in the run folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dataset import (IMAGE_SKIPPED, MEAN, STD, VOC_CLASSES, VOCDetection, batches_on_device, collate_encoded,
                     collate_skip_none, color_normalize)
from draw import detection_samples, log_detections
from loss import YoloLoss
from model import DEMO_MODEL, YoloConfig, YOLOv1, count_params_flops, load_backbone
from utils import (GracefulStop, ModelEMA, ResumableSampler, RunFolder, ShardSampler, autocast_dtype,
                   check_batch_norm_batch, check_config_compatible, check_epoch_trained, cleanup_distributed,
                   cpu_has_native_bf16, finite_float, format_loss, gather_rng_states, load_checkpoint, load_resume,
                   load_weights, make_optimizer, predict, print_problems, record_bad_step, remove_partial_checkpoints,
                   restore_training_state, restore_unless, reuse_freed_memory, run_cli, run_folder_path, run_position,
                   save_checkpoint, seed_everything, setup_distributed, skip_short_batch, start_host_read,
                   step_if_finite, step_scheduler, to_channels_last, write_json)
from voc_eval import detections_from_pixels, evaluate_detections, format_table

# Recipes: flags left unset take these values. "voc" is the paper's (Sec. 2.2).
RECIPES = {
    "voc": dict(epochs=135, batch_size=64, lr=1e-2, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                warmup_epochs=5, warmup_lr=1e-3, lr_schedule="step", lr_steps="75,105", lr_gamma=0.1, image_size=448,
                width=1.0, batch_norm=False, variant="yolo", train_set="2007-trainval+2012-trainval",
                val_set="2007-test", eval_interval=5, workers=8, dropout=0.5, amp=False, ema_decay=0.0, fc_dim=4096,
                head_stride=2, cache_images=False, channels_last=False, jitter=0.2, hsv=1.5),
    # demo: a constant LR after warm-up, no steps: the weight average (ema_decay) does the annealing
    "demo": dict(epochs=90, batch_size=16, lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=5e-4,
                 warmup_epochs=2, warmup_lr=1e-4, lr_schedule="step", lr_steps="", lr_gamma=0.1, image_size=224,
                 dropout=0.0,
                 **DEMO_MODEL, variant="yolo", train_set="2007-trainval",
                 val_set="2007-test", eval_interval=19, workers=0, amp=True, ema_decay=0.995, fc_dim=8192,
                 head_stride=1, cache_images=True, channels_last=True, jitter=0.1, hsv=1.25),
}
MODEL_KEYS = ("S", "B", "C", "image_size", "variant", "batch_norm", "width", "fc_dim", "head_stride")
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "state", "model_config", "class_names", "rng")
# On resume (utils.resume_config) a flag left out is the run's; one given may differ from the run's only
# among these; and these follow the command line, given or not.
RESUME_MAY_CHANGE = ("epochs", "data_root", "val_set", "workers", "amp", "compile", "channels_last", "gpu_decode",
                     "cache_images", "deterministic", "eval_interval", "conf_threshold", "nms_iou", "max_det",
                     "save_every_steps", "max_bad_steps", "log_interval", "tb_images", "backbone")
RESUME_COMMAND_ONLY = ("resume", "out_dir", "device", "check_data")


@dataclass
class TrainConfig:
    data: str = "demo"
    data_root: str = ""
    train_set: str = ""
    val_set: str = ""
    keep_difficult: bool = False
    cache_images: bool | None = None
    augment: bool = True
    jitter: float = -1.0
    hsv: float = 0.0
    epochs: int = 0
    batch_size: int = 0          # global, over all processes
    lr: float = 0.0              # peak LR for the global batch size
    optimizer: str = ""
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0
    lr_schedule: str = ""
    lr_steps: str = ""
    lr_gamma: float = 0.0
    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5
    rescore: bool = True
    clip_grad: float = 0.0
    image_size: int = 0
    S: int = 7
    B: int = 2
    width: float = 0.0
    fc_dim: int = 0
    head_stride: int = 0
    batch_norm: bool | None = None
    variant: str = ""
    dropout: float = -1.0
    backbone: str = ""
    resume: str = ""
    out_dir: str = ""
    device: str = "auto"
    workers: int = -1
    amp: bool | None = None
    ema_decay: float = -1.0
    compile: bool = False
    channels_last: bool | None = None
    gpu_decode: bool = False
    seed: int = 0
    deterministic: bool = False
    eval_interval: int = 0
    conf_threshold: float = 0.001
    nms_iou: float = 0.5
    max_det: int = 300
    save_every_steps: int = 0
    max_bad_steps: int = 5
    log_interval: int = 10
    tb_images: int = 6
    check_data: bool = False


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, except where the help states it (the recipe flags) or there is
    none to state (switches, empty strings)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "(default:" in (action.help or "") or action.default is None or action.default == "" \
                or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    r = "(default: from the --data recipe: paper's on voc, CPU-sized on demo)"
    p.add_argument("--data", choices=["voc", "demo"], default="demo", help="dataset")
    p.add_argument("--data-root", default="", help="folder holding VOCdevkit (or VOCdevkit itself); demo: data/demo")
    p.add_argument("--train-set", default="", help=f"image sets joined by '+', e.g. 2007-trainval+2012-trainval {r}")
    p.add_argument("--val-set", default="", help=f"image set to evaluate mAP on, e.g. 2007-test {r}")
    p.add_argument("--keep-difficult", action="store_true", help="keep VOC 'difficult' objects in the training targets")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=None,
                   help=f"keep decoded training images in memory after the first epoch (with --workers 0) {r}")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="turn off the paper's augmentation (scale/translate, exposure/saturation, flip)")
    p.add_argument("--jitter", type=finite_float, default=-1.0,
                   help=f"random scale and translation of up to this fraction of the image size (paper: 0.2) {r}")
    p.add_argument("--hsv", type=finite_float, default=0.0,
                   help=f"random exposure and saturation factors in [1/hsv, hsv] (paper: 1.5) {r}")
    p.add_argument("--epochs", type=int, default=0, help=f"epochs {r}")
    p.add_argument("--batch-size", type=int, default=0, help=f"global batch size over all processes {r}")
    p.add_argument("--lr", type=finite_float, default=0.0, help=f"peak learning rate {r}")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="", help=f"optimizer {r}")
    p.add_argument("--momentum", type=finite_float, default=0.0, help=f"SGD momentum / Adam beta1 {r}")
    p.add_argument("--weight-decay", type=finite_float, default=0.0, help=f"weight decay {r}")
    p.add_argument("--warmup-epochs", type=finite_float, default=0.0,
                   help=f"epochs of linear LR warm-up from --warmup-lr {r}")
    p.add_argument("--warmup-lr", type=finite_float, default=0.0, help=f"LR at the start of warm-up {r}")
    p.add_argument("--lr-schedule", choices=["step", "linear", "cosine"], default=None,
                   help=f"after warm-up: step (x --lr-gamma at --lr-steps), or a linear or cosine decay to 0 at the "
                        f"last epoch {r}")
    p.add_argument("--lr-steps", default="", help=f"comma-separated epochs where LR is multiplied by --lr-gamma {r}")
    p.add_argument("--lr-gamma", type=finite_float, default=0.0, help=f"LR step factor {r}")
    p.add_argument("--lambda-coord", type=finite_float, default=5.0, help="weight of the coordinate loss")
    p.add_argument("--lambda-noobj", type=finite_float, default=0.5, help="weight of the no-object confidence loss")
    p.add_argument("--no-rescore", dest="rescore", action="store_false", help="confidence target 1 instead of the IoU")
    p.add_argument("--clip-grad", type=finite_float, default=0.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--image-size", type=int, default=0, help=f"input size, a multiple of 32 {r}")
    p.add_argument("-S", type=int, default=7, help="grid size")
    p.add_argument("-B", type=int, default=2, help="boxes per cell")
    p.add_argument("--width", type=finite_float, default=0.0, help=f"channel width multiplier {r}")
    p.add_argument("--fc-dim", type=int, default=0, help=f"hidden units of the head's first FC layer, before --width {r}")
    p.add_argument("--head-stride", type=int, choices=[1, 2], default=0,
                   help=f"stride of the head's 2nd conv: the paper's 2 maps 448 px to the 7x7 grid; 1 keeps a "
                        f"224 px input's 7x7 map (YOLO variant) {r}")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None, help=f"BatchNorm after each conv {r}")
    p.add_argument("--variant", choices=["yolo", "fast"], default="", help=f"YOLO (24 conv) or Fast YOLO (9 conv) {r}")
    p.add_argument("--dropout", type=finite_float, default=-1.0, help=f"dropout after the first FC layer {r}")
    p.add_argument("--backbone", default="", help="pretrainer.py checkpoint whose backbone initialises the detector")
    p.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto' for the run folder's last.pt if any")
    p.add_argument("--out-dir", default="", help="run folder (default: runs/detector/<data>, numbered if taken)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--workers", type=int, default=-1, help=f"data loader processes per GPU/process {r}")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: bf16 autocast (fp16 + GradScaler on GPUs without bf16; on a CPU only "
                        f"where it has bf16 hardware, AVX512-BF16 or AMX) {r}")
    p.add_argument("--ema-decay", type=finite_float, default=-1.0,
                   help=f"evaluate and save an exponential moving average of the weights with this decay (0: off) {r}")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help=f"channels_last memory format (faster on GPUs, and for the demo model on a CPU) {r}")
    p.add_argument("--gpu-decode", action="store_true", help="decode the training JPEGs on the training device, a "
                   "batch at a time (nvJPEG on a GPU), and warp them there; the loader workers read the files, draw "
                   "the augmentation from the header's size and encode the targets. For a GPU whose host CPUs cannot "
                   "decode fast enough; measure first (bench.py's train section): on 16-core H200 hosts the "
                   "workers' decode trained at least as fast (on a CPU it moves the decode into the training process; with "
                   "it --cache-images caches nothing)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise reproducible on CPU)")
    p.add_argument("--eval-interval", type=int, default=0, help=f"evaluate mAP every N epochs (and at the end) {r}")
    p.add_argument("--conf-threshold", type=finite_float, default=0.001,
                   help="score threshold for mAP (darknet's VOC validation)")
    p.add_argument("--nms-iou", type=finite_float, default=0.5, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="detections kept per image (0: all)")
    p.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N optimizer steps (0: per epoch only)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many consecutive non-finite steps")
    p.add_argument("--log-interval", type=int, default=10, help="steps between TensorBoard loss points")
    p.add_argument("--tb-images", type=int, default=6, help="validation images drawn in TensorBoard each evaluation")
    p.add_argument("--check-data", action="store_true", help="decode every image, print every data problem, and exit")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = build_parser()
    p.set_defaults(**{k: None for k in RECIPES["voc"]})   # unset recipe flags are filled in below
    args = vars(p.parse_args(argv))
    for k, v in RECIPES[args["data"]].items():
        if args[k] is None:
            args[k] = v
    cfg = TrainConfig(**args)
    # paths as absolute ones: the config saved in every checkpoint must name the same files from any folder
    cfg.data_root, cfg.backbone = (os.path.abspath(x) if x else "" for x in (cfg.data_root, cfg.backbone))
    if not 0 <= cfg.seed < 2**31:
        p.error(f"--seed must be in 0..{2**31 - 1}, got {cfg.seed}")
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.lr <= 0:
        p.error("--batch-size, --epochs and --lr must be positive")
    if not (0 <= cfg.jitter < 1 and cfg.hsv >= 1):
        p.error(f"--jitter must be in [0, 1) and --hsv at least 1, got {cfg.jitter} and {cfg.hsv}")
    if not (0 <= cfg.conf_threshold <= 1 and 0 <= cfg.nms_iou <= 1):
        p.error(f"--conf-threshold and --nms-iou must be in [0, 1], got {cfg.conf_threshold} and {cfg.nms_iou}")
    if min(cfg.workers, cfg.max_det, cfg.save_every_steps) < 0 or min(cfg.eval_interval, cfg.log_interval,
                                                                       cfg.max_bad_steps) < 1:
        p.error("--workers, --max-det and --save-every-steps must be >= 0; --eval-interval, --log-interval and "
                "--max-bad-steps >= 1")
    if not (0 <= cfg.momentum < 1 and cfg.weight_decay >= 0 and cfg.lr_gamma > 0 and cfg.clip_grad >= 0):
        p.error(f"--momentum must be in [0, 1), --weight-decay and --clip-grad >= 0, --lr-gamma > 0; got "
                f"{cfg.momentum}, {cfg.weight_decay}, {cfg.clip_grad} and {cfg.lr_gamma}")
    if min(cfg.warmup_epochs, cfg.warmup_lr, cfg.lambda_coord, cfg.lambda_noobj, cfg.tb_images) < 0:
        p.error("--warmup-epochs, --warmup-lr, --lambda-coord, --lambda-noobj and --tb-images must be >= 0")
    if not 0 <= cfg.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    try:
        steps = [float(s) for s in cfg.lr_steps.split(",") if s.strip()]
    except ValueError:
        steps = [-1.0]
    if any(not (math.isfinite(s) and s >= 0) for s in steps):
        p.error(f"--lr-steps must be comma-separated epochs (numbers >= 0), got {cfg.lr_steps!r}")
    try:   # the model flags, checked now rather than after the data is read (C is the data's)
        model_config(cfg, C=20)
    except ValueError as e:
        p.error(f"model flags (-S, -B, --image-size, --variant, --width, --fc-dim, --dropout, --head-stride): {e}")
    return cfg


def model_config(cfg: TrainConfig, C: int) -> YoloConfig:
    """The detector the flags describe, for ``C`` classes (``ValueError`` for impossible flags)."""
    return YoloConfig(S=cfg.S, B=cfg.B, C=C, image_size=cfg.image_size, variant=cfg.variant,
                      batch_norm=bool(cfg.batch_norm), width=cfg.width, fc_dim=cfg.fc_dim, dropout=cfg.dropout,
                      head_stride=cfg.head_stride)


def lr_factor(epoch: float, cfg: TrainConfig) -> float:
    """LR / cfg.lr at a fractional epoch: linear warm-up from warmup_lr, then steps of lr_gamma at
    lr_steps, or a linear or cosine decay from 1 at the end of warm-up to 0 at cfg.epochs."""
    if epoch < cfg.warmup_epochs:
        start = cfg.warmup_lr / cfg.lr
        return start + (1 - start) * epoch / cfg.warmup_epochs
    if cfg.lr_schedule != "step":
        t = min(1.0, (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9))
        return 1 - t if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    steps = [float(s) for s in cfg.lr_steps.split(",") if s.strip()]
    return cfg.lr_gamma ** sum(epoch >= s for s in steps)


def train_step(model, criterion, optimizer, scaler, batch, cfg: TrainConfig, device,
               amp_dtype) -> tuple[Tensor, Tensor]:
    """Forward, loss, backward and update on one ``(uint8 images, target, info)`` batch, with no
    host read: the GPU is never left waiting for the CPU within a step.

    Returns the step's record, a float tensor on the device ``(total, coord, obj, noobj, cls,
    grad_norm, finite, stepped)`` that the loop reads one step later (``RECORD``), and ``stepped``
    (a 0-dim bool tensor) for the weight average. A step whose loss (on any process) or gradient
    norm is not finite changes nothing: :func:`utils.step_if_finite` skips the optimizer step on
    the device, and the BatchNorm statistics of its forward pass are put back. With fp16 an
    overflow with a finite loss is the GradScaler's routine: finite, but not stepped.
    """
    images, target, info = batch
    images = images.to(device, non_blocking=True)
    target = target.to(device, non_blocking=True)
    info = info.to(device, non_blocking=True)    # whole (pinned) and asynchronous; a column alone would block
    x = color_normalize(images, info[:, 3], info[:, 4], MEAN, STD)  # colour aug on the device
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
        out = model(x)
    terms = criterion(out.float(), target)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["total"]).backward()
    gnorm, finite, stepped = step_if_finite(optimizer, scaler, terms["total"], list(model.parameters()), cfg.clip_grad)
    restore_unless(finite, buffers, saved)
    losses = [terms[k].detach().float() for k in RECORD[:5]]
    return torch.stack([*losses, gnorm, finite.float(), stepped.float()]), stepped


RECORD = ("total", "coord", "obj", "noobj", "cls", "grad_norm", "finite", "stepped")   # what train_step returns


def train_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, cfg: TrainConfig, state: dict, device,
                    writer, is_main: bool, checkpoint_fn, steps_per_epoch: int, stopper: GracefulStop,
                    log_file=None, ema: ModelEMA | None = None, min_images: int = 1) -> dict:
    """One pass over ``loader``. A step whose loss or gradient is not finite changes nothing (weights,
    optimizer state, BatchNorm statistics and the weight average ``ema`` are left as they were); it
    is logged and counted, and ``cfg.max_bad_steps`` of them in a row stop the run. Returns the
    epoch's mean loss terms over its finite steps (summed in ``state['epoch_meter']``, so a mid-epoch
    resume keeps them).

    Each step's record is read on the host (meters, counts, logs) only after the next step has been
    queued, so that the GPU always has work while the host waits for the numbers."""
    model.train()
    amp_dtype = autocast_dtype(device)
    meter = state["epoch_meter"]   # {"images", "total", "coord", ...}: sums over the epoch's finite steps
    per_proc = cfg.batch_size // (dist.get_world_size() if dist.is_initialized() else 1)
    # --gpu-decode: the workers send JPEG bytes, decoded and warped on the device on a stream of its own
    batches = batches_on_device(loader, loader.dataset.finish_on_device, device) if cfg.gpu_decode else loader
    bar = tqdm(batches, desc=f"epoch {state['epoch'] + 1}/{cfg.epochs}", disable=not is_main, dynamic_ncols=True,
               initial=state["step_in_epoch"], total=steps_per_epoch)
    t0, seen = time.perf_counter(), 0

    def settle(read: Callable[[], list] | None, n: int, step: int, lr: float) -> None:
        """The host's part of step ``step``: its record read back (``read``, from
        utils.start_host_read), the meters, counts and logs."""
        values = dict(zip(RECORD, read())) if read is not None else {}
        vals = {k: values[k] for k in RECORD[:5] if k in values}
        if values.get("finite", 1.0) and vals:
            state["bad_steps"] = 0
            meter["images"] += n
            for k, v in vals.items():
                meter[k] += v * n
        elif values:
            record_bad_step(state, step, f"loss terms {format_loss(vals)}, grad_norm={values['grad_norm']:.4g}",
                            cfg.max_bad_steps, is_main, writer)
        if is_main:
            rate = seen * (dist.get_world_size() if dist.is_initialized() else 1) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{meter['total'] / max(meter['images'], 1):.3f}", lr=f"{lr:.2e}",
                            img_s=f"{rate:.0f}")
            if log_file:
                log_file.write(json.dumps({"step": step, "epoch": state["epoch"], **vals}) + "\n")
            if writer and step % cfg.log_interval == 0:
                for k, v in vals.items():
                    writer.add_scalar(f"train/loss_{k}", v, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/images_per_s", rate, step)

    pending = None     # the previous step, settled once this one is queued (the GPU never idles)
    for batch in bar:
        n = 0 if batch is None else batch[0].shape[0]
        read = None
        if not skip_short_batch(n, per_proc, min_images, state, is_main):   # (a short batch: the step is skipped)
            record, stepped = train_step(model, criterion, optimizer, scaler, batch, cfg, device, amp_dtype)
            read = start_host_read(record)
            if ema:
                ema.update(stepped)
        lr = step_scheduler(scheduler)
        state["step"] += 1
        state["step_in_epoch"] += 1
        seen += n
        if pending:
            settle(*pending)
        pending = (read, n, state["step"], lr)
        if cfg.save_every_steps and state["step"] % cfg.save_every_steps == 0:
            settle(*pending)
            pending = None
            checkpoint_fn("last.pt")
        if stopper.requested():
            break
    if pending:
        settle(*pending)
    bar.close()
    return {k: meter[k] / max(meter["images"], 1) for k in RECORD[:5]}


def new_epoch_meter() -> dict:
    """The loss sums of an epoch's finite steps, kept in ``state`` (and so in checkpoints)."""
    return {"images": 0, **{k: 0.0 for k in RECORD[:5]}}


def new_state() -> dict:
    """A fresh run's progress, counters and history: what checkpoints keep under ``state``."""
    return {"epoch": 0, "step": 0, "step_in_epoch": 0, "best_map": -1.0, "bad_steps": 0, "skipped_steps": 0,
            "skipped_images": 0, "history": [], "epoch_meter": new_epoch_meter()}


def evaluate(model, loader, dataset: VOCDetection, cfg: TrainConfig, model_cfg: YoloConfig, device) -> dict:
    """VOC07 mAP@0.5 on the validation set, each image counted exactly once over all processes.
    Always in float32 (TF32 on GPUs), also under --amp: the mAP printed is the one evaluate.py
    reports for the checkpoint with its default flags (bf16 boxes cost the demo about 0.005 mAP)."""
    preds = predict(model, loader, model_cfg.B, model_cfg.C, device, False, cfg.conf_threshold, cfg.nms_iou,
                    cfg.max_det)
    named = [(dataset.annotation(i).image_id, b, s, l) for i, b, s, l in preds]
    return evaluate_detections(detections_from_pixels(named, model_cfg.C), dataset.ground_truth(),
                               dataset.class_names, use_07_metric=True)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)

    # ---- processes and device
    rank, world, local_rank, device = setup_distributed(cfg.device)
    is_main = rank == 0

    # ---- run folder, and a resumed run's own flags (everything below is built from them)
    out_dir = run_folder_path(cfg.out_dir, cfg.resume, Path(f"runs/detector/{cfg.data}"))
    resume_path, ckpt, cfg = load_resume(cfg, out_dir, "train_detector.py", RESUME_KEYS, build_parser(), argv,
                                         RESUME_MAY_CHANGE, RESUME_COMMAND_ONLY)

    # ---- batch, seed, threads, precision
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by the {world} processes")
    seed_everything(cfg.seed + rank, cfg.deterministic)
    if device.type == "cpu":   # compute threads + loader processes = cores: oversubscription stalls both
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world - max(cfg.workers, 0)))
        reuse_freed_memory()   # no page faults on every step's activations (glibc)
    if cfg.amp and device.type == "cpu" and not cpu_has_native_bf16():
        cfg.amp = False   # emulated bf16 is slower than float32
        if is_main:
            print("--amp: this CPU has no bf16 hardware (AVX512-BF16 or AMX); training in float32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    min_images = check_batch_norm_batch(lambda: YOLOv1(model_config(cfg, C=20)), cfg.image_size,
                                        cfg.batch_size // world)
    # the folder is claimed once the cheap checks have passed (data errors come later: a start that fails
    # there leaves a free folder, RunFolder.taken)
    claim = is_main and not cfg.check_data
    run_folder = RunFolder(out_dir, resume_path) if claim else None

    # ---- data
    if cfg.data == "demo":
        from demo_data import DEMO_CLASSES, make_demo_voc
        demo_root = Path(cfg.data_root or "data/demo")
        # data/demo is cached and rebuilt when the generator's version changes; a --data-root tree is used
        # as it is, and generated only where there is none (an interrupted generation leaves no VOC2007)
        if is_main and (not cfg.data_root or not (demo_root / "VOCdevkit" / "VOC2007").is_dir()):
            make_demo_voc(demo_root)
        if dist.is_initialized():
            dist.barrier()
        data_root, class_names = cfg.data_root or "data/demo", DEMO_CLASSES
    else:
        if not cfg.data_root:
            raise ValueError("--data voc needs --data-root (the folder holding VOCdevkit)")
        data_root, class_names = cfg.data_root, VOC_CLASSES
    model_cfg = model_config(cfg, C=len(class_names))
    train_set = VOCDetection(data_root, cfg.train_set, class_names, cfg.image_size, cfg.S, train=cfg.augment,
                             keep_difficult=cfg.keep_difficult, jitter=cfg.jitter, hsv=cfg.hsv, seed=cfg.seed,
                             cache_images=cfg.cache_images, decode_on_device=cfg.gpu_decode)
    val_set = VOCDetection(data_root, cfg.val_set, class_names, cfg.image_size, cfg.S, train=False)
    # Data problems: annotation and list problems were collected while indexing; images are checked
    # here by header (--check-data decodes every one). All are reported, none stops training.
    data_report = {}
    for name, ds in (("train", train_set), ("val", val_set)):
        image_problems = ds.check_images(decode=cfg.check_data, progress=is_main)
        data_report[name] = ds.report + image_problems
    if is_main:
        print(f"config: {json.dumps(asdict(cfg))}")
        for name, ds in (("train", train_set), ("val", val_set)):
            rep = data_report[name]
            print(f"{name}: {len(ds)} images from {ds.root} ({cfg.train_set if name == 'train' else cfg.val_set}); "
                  f"{len(rep)} data problems found and handled")
            print_problems(rep, cfg.check_data)
        if cfg.cache_images and cfg.gpu_decode:
            print("--cache-images with --gpu-decode: the training images are not decoded in the loader, so nothing "
                  "is cached")
        elif cfg.cache_images and cfg.workers > 0:
            print(f"--cache-images with --workers {cfg.workers}: each epoch's loader processes cache only what "
                  "they read and end with the epoch, so it saves little; it pays off with --workers 0")
    if cfg.check_data:
        cleanup_distributed()
        return {"data_report": data_report}
    # a training set with nothing to learn from is refused rather than trained on for nothing
    unreadable = sum(why.endswith(IMAGE_SKIPPED) for _, why in data_report["train"])
    if unreadable == len(train_set):
        raise ValueError(f"{train_set.root} ({cfg.train_set}): none of its {len(train_set)} training images can be "
                         "read (listed above)")
    if not any(len(ann.labels) for _, ann in train_set.items):
        unknown = sum("unknown class" in why for _, why in train_set.report)
        raise ValueError(f"{train_set.root} ({cfg.train_set}): no object of --data {cfg.data}'s {len(class_names)} "
                         f"classes in its {len(train_set)} annotations ({unknown} objects of other classes skipped, "
                         "listed above)" + ("; wrong --data?" if unknown else ""))
    per_proc = cfg.batch_size // world
    train_sampler = ResumableSampler(train_set, world, rank, seed=cfg.seed)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", collate_fn=collate_skip_none,
                     persistent_workers=cfg.workers > 0)
    # rebuilt every epoch (see the loop); --gpu-decode: batches of JPEG bytes, decoded in train_one_epoch
    train_loader_kw = {**loader_kw, "persistent_workers": False,
                       "collate_fn": collate_encoded if cfg.gpu_decode else collate_skip_none}
    # its own generator: an evaluation draws nothing from the global RNG (dropout), so how often the run
    # evaluates does not change how it trains
    val_loader = DataLoader(val_set, per_proc, sampler=ShardSampler(len(val_set), rank, world),
                            generator=torch.Generator(), **loader_kw)

    # ---- model, loss, optimizer, schedule
    model = YOLOv1(model_cfg).to(device)
    if cfg.backbone and ckpt is None:    # (a resumed run has its weights in its checkpoint)
        backbone = load_checkpoint(cfg.backbone)
        if "model" not in backbone:
            raise ValueError(f"checkpoint {cfg.backbone} lacks 'model': not a pretrainer.py (or train_detector.py) "
                             "checkpoint")
        averaged = bool(backbone.get("ema"))   # a detector's checkpoint: its weight average, the weights it is used with
        load_backbone(model, backbone["ema"]["module"] if averaged else backbone["model"], source=cfg.backbone)
        del backbone
        if is_main:
            print(f"backbone initialised from {cfg.backbone}{' (its weight average)' if averaged else ''}")
    if cfg.channels_last:
        to_channels_last(model)   # the images stay NCHW (see to_channels_last)
    params, flops = count_params_flops(model, cfg.image_size)
    if is_main:
        print(f"model: {model_cfg} | {params / 1e6:.2f}M params, {flops / 1e9:.2f} GFLOPs/image")
    criterion = YoloLoss(cfg.S, cfg.B, len(class_names), cfg.lambda_coord, cfg.lambda_noobj, cfg.rescore)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, device)
    steps_per_epoch = train_sampler.num_samples // per_proc   # the loader drops the last partial batch
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train_set)} images)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step / steps_per_epoch, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and autocast_dtype(device) == torch.float16)

    # ---- resume
    state = new_state()
    meter_known = True   # the epoch's sums cover all its steps so far
    ema_state = None
    if ckpt is not None:
        saved_cfg = YoloConfig.from_dict(ckpt["model_config"], f"checkpoint {resume_path}").to_dict()
        check_config_compatible(saved_cfg, model_cfg.to_dict(), MODEL_KEYS, str(resume_path))
        if list(ckpt["class_names"]) != list(class_names):
            raise ValueError(f"{resume_path} was trained on classes {ckpt['class_names']}, not {list(class_names)}")
        load_weights(model, ckpt["model"], resume_path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{resume_path}: its optimizer or LR scheduler state does not fit this run ({e})") from None
        ema_state = ckpt.get("ema")
        # an older checkpoint saved mid-epoch without the epoch's sums: its steps before the resume may have trained
        meter_known = "epoch_meter" in ckpt["state"] or not ckpt["state"].get("step_in_epoch")
        state.update(ckpt["state"])
        if not meter_known and is_main:
            print(f"{resume_path} predates the saved epoch loss sums: epoch {state['epoch'] + 1}'s printed loss "
                  "covers only the steps after this resume")
        restore_training_state(ckpt, scaler, rank, world)
        ckpt = None     # (the loaded optimizer state is in the optimizer now: GBs for the paper model)
        if is_main:
            print(f"resumed from {resume_path} at {run_position(state, cfg.epochs)}")
    raw_model = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)   # rank 0's weights
    # The weight average is what gets evaluated, drawn and used by evaluate.py / detect.py / export.py;
    # built from the (resumed, broadcast) weights, then given the checkpoint's average when it has one.
    ema = ModelEMA(raw_model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema and ema_state:
        ema.load_state_dict(ema_state, source=resume_path)
    if cfg.compile:
        model = torch.compile(model)
    # What is evaluated: never the DDP wrapper, whose forward is a collective (it broadcasts buffers)
    # that a process with an empty or unreadable validation shard would never join.
    eval_model = ema.module if ema else model if world == 1 else raw_model
    sample_model = ema.module if ema else raw_model    # the same weights as a plain module, for drawing

    writer = SummaryWriter(str(out_dir)) if is_main else None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in remove_partial_checkpoints(out_dir):
            print(f"removed {p}: a checkpoint whose writing was cut off (its process was killed)")
        (out_dir / "config.json").write_text(json.dumps({"train": asdict(cfg), "model": model_cfg.to_dict(),
                                                          "class_names": list(class_names)}, indent=2))
        print(f"run folder: {out_dir}  (tensorboard --logdir {out_dir.parent})")
        for name, rep in data_report.items():
            writer.add_scalar(f"data/{name}_problems", len(rep), state["step"])
            if rep:
                writer.add_text(f"data/{name}_report", "\n\n".join(f"`{w}`: {y}" for w, y in rep[:1000]), state["step"])

    def checkpoint(name: str) -> None:   # called by every process: the RNG states are gathered
        rngs = gather_rng_states()
        if not is_main:
            return
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "state": {**state, "history": list(state["history"]),
                                   "epoch_meter": dict(state["epoch_meter"])},
                         "ema": ema.state_dict() if ema else None,
                         "config": asdict(cfg), "model_config": model_cfg.to_dict(),
                         "class_names": list(class_names), **rngs}, out_dir / name)

    # ---- the loop
    last_result = None
    stopper = GracefulStop()
    # Every step's loss terms, one JSON line each (after a crash, the steps redone after resuming
    # appear again: the last line for a step is the one that counts).
    log_file = open(out_dir / "train_log.jsonl", "a", buffering=1) if is_main else None
    try:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            train_set.set_epoch(epoch)
            train_sampler.set_epoch(epoch, start=state["step_in_epoch"] * per_proc)
            # The loader's own generator keeps worker seeding out of the global RNG (dropout), so a
            # resumed run draws exactly the random numbers an uninterrupted one would.
            train_loader = DataLoader(train_set, per_proc, sampler=train_sampler, drop_last=True,
                                      generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch),
                                      **train_loader_kw)
            losses = train_one_epoch(model, criterion, optimizer, scheduler, scaler, train_loader, cfg, state, device,
                                     writer, is_main, checkpoint, steps_per_epoch, stopper, log_file, ema,
                                     min_images)
            if stopper.requested():   # one decision for all processes (a signal may land on one between checks)
                checkpoint("last.pt")
                if is_main:
                    print(f"stopped by signal {stopper.signum} at {run_position(state, cfg.epochs)}; "
                          f"checkpoint saved to {out_dir / 'last.pt'} (continue with --resume auto --out-dir {out_dir})")
                cleanup_distributed()
                sys.exit(stopper.exit_code)     # the writer is closed on the way out (except BaseException)
            check_epoch_trained(state, epoch, meter_known)
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            state["epoch_meter"] = new_epoch_meter()
            meter_known = True
            if writer:
                writer.add_scalar("data/skipped_images", state["skipped_images"], state["step"])
            if is_main:
                print(f"epoch {epoch + 1}: train {format_loss(losses)}"
                      + (f" | {state['skipped_images']} unreadable training images skipped so far"
                         if state["skipped_images"] else ""))
            if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
                if world > 1:   # BatchNorm statistics follow each process's own last batches:
                    for b in eval_model.buffers():   # evaluate (and save) rank 0's on every process
                        dist.broadcast(b, 0)
                last_result = evaluate(eval_model, val_loader, val_set, cfg, model_cfg, device)
                state["history"].append({"epoch": epoch + 1, "map": last_result["map"]})
                if is_main:
                    print(format_table(last_result))
                    writer.add_scalar("val/mAP50", last_result["map"], state["step"])
                    for name, ap in last_result["ap"].items():
                        if not math.isnan(ap):
                            writer.add_scalar(f"val_AP50/{name}", ap, state["step"])
                    # the same few validation images every evaluation: ground truth | prediction
                    images, gts, preds = detection_samples(sample_model, val_set, device, num_images=cfg.tb_images)
                    log_detections(writer, "val/detections", images, gts, preds, class_names, state["step"])
                if last_result["map"] > state["best_map"]:
                    state["best_map"] = last_result["map"]
                    checkpoint("best.pt")
            checkpoint("last.pt")
    except BaseException:
        if writer:   # its queued points reach disk, e.g. the skipped steps that explain a stop
            writer.close()
        raise
    finally:
        stopper.restore()   # leave the process's signal handlers as they were

    if is_main and last_result is not None:
        for name, pc in last_result["per_class"].items():   # precision-recall curve per class, at the end
            if pc["npos"] and len(pc["recall"]):
                keep = np.linspace(0, len(pc["recall"]) - 1, min(len(pc["recall"]), 200)).astype(int)[::-1]
                r, p = np.asarray(pc["recall"])[keep], np.asarray(pc["precision"])[keep]   # by rising threshold
                writer.add_pr_curve_raw(f"val_pr/{name}", true_positive_counts=np.round(r * pc["npos"]),
                                        false_positive_counts=np.round(r * pc["npos"] / np.maximum(p, 1e-12)
                                                                       - r * pc["npos"]),
                                        true_negative_counts=np.zeros_like(r), false_negative_counts=pc["npos"]
                                        - np.round(r * pc["npos"]), precision=p, recall=r,
                                        global_step=state["step"], num_thresholds=len(r))
        metrics = {"metric": last_result["metric"], "final_map": last_result["map"], "best_map": state["best_map"],
                   "epochs": state["epoch"], "history": state["history"], "skipped_images": state["skipped_images"],
                   "skipped_steps": state["skipped_steps"],
                   "final_ap": last_result["ap"]}
        write_json(out_dir / "metrics.json", metrics)   # strict JSON (NaN as null), whole or not at all
        print(f"final mAP ({last_result['metric']}): {last_result['map']:.4f} | best: {state['best_map']:.4f} "
              f"| {out_dir / 'metrics.json'}")
    if writer:
        writer.close()
    if log_file:
        log_file.close()
    if run_folder:
        run_folder.release()
    cleanup_distributed()
    return {"out_dir": str(out_dir), "best_map": state["best_map"],
            "final_map": last_result["map"] if last_result else None, "skipped_images": state["skipped_images"]}


if __name__ == "__main__":
    run_cli(main)
