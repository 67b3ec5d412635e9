"""Pretrain the Darknet backbone as an ImageNet classifier (paper Sec. 2.2) for train_detector.py.

    python pretrainer.py --data demo                                       # CPU demo, minutes
    python pretrainer.py --data imagenet --data-root ~/data/imagenet       # train/ and val/ inside
    torchrun --nproc-per-node=8 pretrainer.py --data imagenet --data-root ~/data/imagenet
    python pretrainer.py --data imagenet --prepare-val --data-root ~/data/imagenet   # flat val/ -> val/<wnid>/
    python pretrainer.py --data imagenet --data-root ~/data/imagenet --check-data   # list unreadable images
    python pretrainer.py --data imagenet --data-root ~/data/imagenet --evaluate runs/pretrainer/imagenet/best.pt
    python train_detector.py --data voc --data-root ~/data --backbone runs/pretrainer/imagenet/best.pt

The network is the paper's first 20 conv layers + average pool + FC (model.Classifier); its
``backbone.*`` weights are what train_detector.py --backbone loads. Reads top to bottom: config,
distributed setup and seed, data, model, optimizer, LR schedule, resume, then the loop of
train_one_epoch / validate / checkpoint. TensorBoard logs, config.json, last.pt and best.pt go to
the run folder. SIGTERM / SIGINT save last.pt at the next step boundary and exit (0 / 130);
``--resume auto`` continues exactly there. Unreadable images are never fatal and never silent:
val/'s headers are checked at start, --check-data decodes every image of both splits, and training
skips and counts the ones it cannot decode (``data/*`` in TensorBoard).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from dataset import MEAN, STD, batches_on_device, collate_encoded, collate_skip_none, color_normalize
from imagenet import (ImageNetClassification, class_folder_names, load_imagenet, prepare_val, resolve_imagenet_root,
                      val_labels)
from model import DEMO_MODEL, Classifier, YoloConfig, count_params_flops
from utils import (GracefulStop, ResumableSampler, RunFolder, ShardSampler, all_gather_objects, autocast_dtype,
                   check_batch_norm_batch, check_config_compatible, check_epoch_trained, cleanup_distributed,
                   finite_float, gather_rng_states, load_checkpoint, load_resume, load_weights, make_optimizer,
                   print_problems, record_bad_step, remove_partial_checkpoints, require_checkpoint,
                   restore_training_state, restore_unless, reuse_freed_memory, run_cli, run_folder_path, run_position,
                   save_checkpoint, seed_everything, setup_distributed, skip_short_batch, start_host_read,
                   step_if_finite, step_scheduler, to_channels_last, write_json)

# Recipes: flags left unset take these values. "imagenet" is the users' recipe (Adam, LR 0.00025,
# x0.95 every 20 epochs, batch 64, 224 px, no BatchNorm, AMP); "demo" is sized for a 2-core CPU and
# takes the model size from model.DEMO_MODEL, as train_detector.py's demo does, so its backbone fits.
# With --optimizer sgd and no --lr, "sgd_lr" applies (darknet's extraction.cfg starts SGD at 0.1).
RECIPES = {
    "imagenet": dict(epochs=90, batch_size=64, lr=2.5e-4, sgd_lr=0.1, optimizer="adam", momentum=0.9,
                     weight_decay=5e-4, lr_step_epochs=20, lr_gamma=0.95, image_size=224, min_scale=0.08,
                     width=1.0, batch_norm=False, variant="yolo", amp=True, workers=8),
    "demo": dict(epochs=15, batch_size=32, lr=2e-3, sgd_lr=0.05, optimizer="adam", momentum=0.9,
                 weight_decay=5e-4, lr_step_epochs=4, lr_gamma=0.5, image_size=128, min_scale=0.25,
                 **DEMO_MODEL, variant="yolo", amp=True, workers=1),
}
MODEL_KEYS = ("C", "variant", "batch_norm", "width")   # what a resumed checkpoint must match
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "state", "model_config", "class_names", "rng")
# On resume (utils.resume_config) a flag left out is the run's; one given may differ from the run's only
# among these; and these follow the command line, given or not.
RESUME_MAY_CHANGE = ("epochs", "data_root", "val_solution", "devkit_gt", "devkit_synsets", "synset_mapping",
                     "workers", "threads", "amp", "compile", "channels_last", "gpu_decode", "deterministic",
                     "save_every_steps", "max_bad_steps", "log_interval", "preview_images")
RESUME_COMMAND_ONLY = ("resume", "out_dir", "device", "check_data", "evaluate", "prepare_val")


@dataclass
class PretrainConfig:
    data: str = "demo"
    data_root: str = ""
    val_solution: str = ""
    devkit_gt: str = ""
    devkit_synsets: str = ""
    synset_mapping: str = ""
    prepare_val: bool = False
    epochs: int = 0
    batch_size: int = 0          # global, over all processes
    lr: float = 0.0
    optimizer: str = ""
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_step_epochs: int = 0
    lr_gamma: float = 0.0
    clip_grad: float = 0.0
    image_size: int = 0
    mean: list[float] = field(default_factory=lambda: list(MEAN))
    std: list[float] = field(default_factory=lambda: list(STD))
    min_scale: float = 0.0
    color_jitter: float = 0.0
    width: float = 0.0
    batch_norm: bool = False
    variant: str = ""
    resume: str = ""
    out_dir: str = ""
    device: str = "auto"
    workers: int = 0
    threads: int = 0
    amp: bool = True
    compile: bool = False
    channels_last: bool = False
    gpu_decode: bool = False
    seed: int = 0
    deterministic: bool = False
    save_every_steps: int = 0
    max_bad_steps: int = 5
    log_interval: int = 10
    preview_images: int = 8
    check_data: bool = False
    evaluate: str = ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def r(key: str) -> str:
        return f"(default: {RECIPES['imagenet'][key]} on imagenet, {RECIPES['demo'][key]} on demo)"

    p.add_argument("--data", choices=["imagenet", "demo"], default="demo",
                   help="ILSVRC2012 on disk, or the generated demo (data/demo_imagenet) (default: demo)")
    p.add_argument("--data-root", default="", help="folder holding train/ and val/ (or the Kaggle download's top "
                   "folder with ILSVRC/Data/CLS-LOC); demo default: data/demo_imagenet")
    p.add_argument("--val-solution", default="", help="labels of a flat val/: Kaggle LOC_val_solution.csv "
                   "(default: found beside the data)")
    p.add_argument("--devkit-gt", default="", help="labels of a flat val/: the devkit's "
                   "ILSVRC2012_validation_ground_truth.txt (1-based ILSVRC2012_IDs in val image order)")
    p.add_argument("--devkit-synsets", default="", help="with --devkit-gt: text file whose line k holds the wnid of "
                   "ILSVRC2012_ID k (meta.mat's order, not sorted order)")
    p.add_argument("--synset-mapping", default="", help="LOC_synset_mapping.txt with human-readable class names "
                   "(default: found beside the data)")
    p.add_argument("--prepare-val", action="store_true", help="move a flat val/ into val/<wnid>/ class folders "
                   "(never overwrites; a second run changes nothing) and exit")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs {r('epochs')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch size over all processes "
                   f"{r('batch_size')}")
    p.add_argument("--lr", type=finite_float, default=None, help=f"initial learning rate, not scaled with the batch "
                   f"{r('lr')}; with --optimizer sgd {r('sgd_lr')}")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=None, help=f"adam (AdamW: decoupled weight decay) "
                   f"or the paper's SGD with momentum {r('optimizer')}")
    p.add_argument("--momentum", type=finite_float, default=None, help=f"SGD momentum / Adam beta1 {r('momentum')}")
    p.add_argument("--weight-decay", type=finite_float, default=None, help=f"weight decay of conv/FC weights "
                   f"{r('weight_decay')}")
    p.add_argument("--lr-step-epochs", type=int, default=None, help=f"multiply the LR by --lr-gamma every this many "
                   f"epochs {r('lr_step_epochs')}")
    p.add_argument("--lr-gamma", type=finite_float, default=None, help=f"LR step factor {r('lr_gamma')}")
    p.add_argument("--clip-grad", type=finite_float, default=0.0,
                   help="clip the gradient norm to this (default: 0, off)")
    p.add_argument("--image-size", type=int, default=None, help=f"training crop, a multiple of 32; evaluation "
                   f"resizes to size*256/224 and centre-crops {r('image_size')}")
    p.add_argument("--mean", type=finite_float, nargs=3, default=list(MEAN),
                   help=f"RGB normalisation mean (default: {MEAN})")
    p.add_argument("--std", type=finite_float, nargs=3, default=list(STD),
                   help=f"RGB normalisation std (default: {STD})")
    p.add_argument("--min-scale", type=finite_float, default=None, help=f"smallest area fraction of the random resized "
                   f"crop {r('min_scale')}")
    p.add_argument("--color-jitter", type=finite_float, default=0.0,
                   help="exposure and saturation jitter J: factors in "
                   "[1/(1+J), 1+J] (default: 0, off)")
    p.add_argument("--width", type=finite_float, default=None, help=f"channel width multiplier {r('width')}")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help=f"BatchNorm after each conv (the paper has none) {r('batch_norm')}")
    p.add_argument("--variant", choices=["yolo", "fast"], default=None, help=f"YOLO's 20-conv backbone or Fast "
                   f"YOLO's 7 {r('variant')}")
    p.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto' for the run folder's last.pt "
                   "if any")
    p.add_argument("--out-dir", default="", help="run folder (default: runs/pretrainer/<data>, numbered if taken; "
                   "with --resume PATH, PATH's folder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--workers", type=int, default=None, help=f"data loader processes per GPU/process "
                   f"{r('workers')}")
    p.add_argument("--threads", type=int, default=0, help="CPU training only: compute threads of the main process "
                   "(default: 0 = the cores left after --workers, at least 1; oversubscribed cores stall every step)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision: autocast "
                   f"bf16 (CPU, Ampere+), fp16 with a GradScaler elsewhere {r('amp')}")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster on GPUs)")
    p.add_argument("--gpu-decode", action="store_true", help="decode the training JPEGs on the training device, a "
                   "batch at a time (nvJPEG on a GPU), and crop, resize and flip them there; the loader workers only "
                   "read the files. For a GPU whose host CPUs cannot decode fast enough; measure first (bench.py's "
                   "train section): on 16-core H200 hosts the workers' decode trained faster (on a CPU it moves "
                   "the decode into the training process)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise reproducible on CPU)")
    p.add_argument("--save-every-steps", type=int, default=0, help="also write last.pt every N optimizer steps "
                   "(default: 0, per epoch only)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many consecutive non-finite steps "
                   "(default: 5)")
    p.add_argument("--log-interval", type=int, default=10, help="steps between TensorBoard points (default: 10)")
    p.add_argument("--preview-images", type=int, default=8, help="val images shown with their predicted class in "
                   "TensorBoard each epoch (default: 8)")
    p.add_argument("--check-data", action="store_true", help="decode every image of train/ and val/, print each "
                   "unreadable one with its file and reason, and exit without training (slow on ImageNet: all 1.33M "
                   "images are decoded; under torchrun the processes split them). Without it, only val/'s image "
                   "headers are checked at start (train/'s 1.28M files would slow every start down); unreadable "
                   "training images are then skipped, counted and logged as data/skipped_images")
    p.add_argument("--evaluate", default="", metavar="CHECKPOINT", help="validation only: load this pretrainer "
                   "checkpoint and print top-1 / top-5 on val/ with the checkpoint's image size and normalisation "
                   "and this command's --data, --data-root, --batch-size, --amp, --device, --workers; then exit")
    return p


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    p = build_parser()
    args = vars(p.parse_args(argv))
    recipe = RECIPES[args["data"]]
    if args["lr"] is None and (args["optimizer"] or recipe["optimizer"]) == "sgd":
        args["lr"] = recipe["sgd_lr"]
    for k, v in recipe.items():
        if k in args and args[k] is None:
            args[k] = v
    cfg = PretrainConfig(**args)
    # paths as absolute ones: the config saved in every checkpoint must name the same files from any folder
    for key in ("data_root", "val_solution", "devkit_gt", "devkit_synsets", "synset_mapping"):
        setattr(cfg, key, os.path.abspath(getattr(cfg, key)) if getattr(cfg, key) else "")
    if sum(map(bool, (cfg.prepare_val, cfg.check_data, cfg.evaluate))) > 1:
        p.error("--prepare-val, --check-data and --evaluate are separate tasks: give one of them")
    if not 0 <= cfg.seed < 2**31:
        p.error(f"--seed must be in 0..{2**31 - 1}, got {cfg.seed}")
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.lr <= 0 or cfg.lr_step_epochs < 1:
        p.error("--batch-size, --epochs, --lr and --lr-step-epochs must be positive")
    if cfg.image_size < 32 or cfg.image_size % 32:
        p.error(f"--image-size must be a positive multiple of 32, got {cfg.image_size}")
    if not 0 < cfg.min_scale <= 1:
        p.error(f"--min-scale must be in (0, 1], got {cfg.min_scale}")
    if any(s <= 0 for s in cfg.std):
        p.error(f"--std must be positive, got {cfg.std}")
    try:   # the model flags, checked now rather than after the data is read
        YoloConfig(C=1, image_size=cfg.image_size, variant=cfg.variant, width=cfg.width, batch_norm=cfg.batch_norm)
    except ValueError as e:
        p.error(f"model flags (--image-size, --variant, --width): {e}")
    if (cfg.workers is not None and cfg.workers < 0) or cfg.threads < 0:
        p.error(f"--workers and --threads must be >= 0, got {cfg.workers} and {cfg.threads}")
    if not (0 <= cfg.momentum < 1 and cfg.weight_decay >= 0 and cfg.lr_gamma > 0 and cfg.clip_grad >= 0):
        p.error(f"--momentum must be in [0, 1), --weight-decay and --clip-grad >= 0, --lr-gamma > 0; got "
                f"{cfg.momentum}, {cfg.weight_decay}, {cfg.clip_grad} and {cfg.lr_gamma}")
    if min(cfg.save_every_steps, cfg.preview_images, cfg.color_jitter) < 0 or min(cfg.log_interval,
                                                                                   cfg.max_bad_steps) < 1:
        p.error("--save-every-steps, --preview-images and --color-jitter must be >= 0; --log-interval and "
                "--max-bad-steps >= 1")
    return cfg


def accuracy(logits: Tensor, target: Tensor, topk: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose true class is among the k highest logits, for each k in ``topk``.

    ``logits (N, C)``, ``target (N,)`` class indices; returns ``(len(topk),)`` counts (not
    percentages, so that processes can add them exactly). k larger than C counts every sample.
    """
    k_max = min(max(topk), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices                    # (N, k_max), best first
    hit = top.eq(target.view(-1, 1))                           # (N, k_max), at most one True per row
    return torch.stack([hit[:, :min(k, k_max)].any(1).sum() for k in topk])


def lr_factor(step: int, steps_per_epoch: int, cfg: PretrainConfig) -> float:
    """LR / cfg.lr after ``step`` optimizer steps: x lr_gamma every lr_step_epochs whole epochs
    (StepLR over epochs, applied per step so that a mid-epoch resume lands on the same value)."""
    return cfg.lr_gamma ** ((step // steps_per_epoch) // cfg.lr_step_epochs)


def train_step(model, optimizer, scaler, batch, cfg, device, amp_dtype, params: list[Tensor],
               bn_buffers: list[Tensor], backup: list[Tensor]) -> Tensor:
    """Forward, cross-entropy, backward and update on one ``(uint8 images, labels, info)`` batch,
    with no host read: the GPU is never left waiting for the CPU within a step.

    Returns the step's record, a float tensor on the device ``(loss, grad_norm, correct, finite,
    stepped)`` (``RECORD``) that the loop reads one step later. A step whose loss (on any process)
    or gradient norm is not finite changes nothing: :func:`utils.step_if_finite` skips the
    optimizer step on the device, and the BatchNorm statistics (snapshotted into ``backup``) are
    put back. With fp16 an overflow with a finite loss is the GradScaler's routine, not a bad step."""
    images, labels, info = batch
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if cfg.color_jitter > 0:
        info = info.to(device, non_blocking=True)   # whole (pinned) and asynchronous; a column alone would block
        x = color_normalize(images, info[:, 1], info[:, 2], cfg.mean, cfg.std)
    else:
        x = color_normalize(images, mean=cfg.mean, std=cfg.std)
    for saved, b in zip(backup, bn_buffers):
        saved.copy_(b)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    gnorm, finite, stepped = step_if_finite(optimizer, scaler, loss, params, cfg.clip_grad)
    restore_unless(finite, bn_buffers, backup)
    correct = (logits.detach().argmax(1) == labels).sum()
    return torch.stack([loss.detach(), gnorm, correct.float(), finite.float(), stepped.float()])


RECORD = ("loss", "grad_norm", "correct", "finite", "stepped")   # what train_step returns


def train_one_epoch(model, optimizer, scheduler, scaler, loader, cfg: PretrainConfig, state: dict, device,
                    writer, is_main: bool, checkpoint_fn, steps_per_epoch: int, stopper: GracefulStop,
                    bn_buffers: list[Tensor], min_images: int = 1) -> dict:
    """One pass over the training loader (from ``state['step_in_epoch']``); returns mean loss and
    top-1 (%) of the epoch's finite steps (summed in ``state``, so a mid-epoch resume keeps them).
    Non-finite steps never change the weights (nor the BatchNorm statistics): they are counted,
    logged and, after cfg.max_bad_steps in a row, stop training. Unreadable images (dropped from
    their batch by collate_skip_none) are counted over all processes in ``state['skipped_images']``.
    Each step's record is read on the host only after the next step has been queued, so that the
    GPU always has work while the host waits for the numbers."""
    model.train()
    amp_dtype = autocast_dtype(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_proc = cfg.batch_size // world
    meter = state["epoch_meter"]    # {"loss_sum", "correct", "images"} over the epoch's finite steps
    params = [p for p in model.parameters() if p.requires_grad]
    backup = [b.clone() for b in bn_buffers]
    # --gpu-decode: the workers send JPEG bytes, decoded, cropped and resized on the device on a stream of its own
    batches = batches_on_device(loader, loader.dataset.finish_on_device, device) if cfg.gpu_decode else loader
    bar = tqdm(batches, desc=f"epoch {state['epoch'] + 1}/{cfg.epochs}", disable=not is_main, dynamic_ncols=True,
               initial=state["step_in_epoch"], total=steps_per_epoch)
    t0, seen = time.perf_counter(), 0

    def settle(read: Callable[[], list] | None, n: int, step: int, lr: float) -> None:
        """The host's part of step ``step``: its record read back (``read``, from
        utils.start_host_read), the meters, counts and logs."""
        v = dict(zip(RECORD, read())) if read is not None else None
        if v and not v["finite"]:
            record_bad_step(state, step, f"loss={v['loss']}, grad_norm={v['grad_norm']}", cfg.max_bad_steps, is_main,
                            writer)
        elif v:
            state["bad_steps"] = 0
            meter["loss_sum"] += v["loss"] * n
            meter["correct"] += v["correct"]
            meter["images"] += n
        if is_main:
            rate = seen * world / (time.perf_counter() - t0)
            m = max(meter["images"], 1)
            bar.set_postfix(loss=f"{meter['loss_sum'] / m:.3f}", top1=f"{100 * meter['correct'] / m:.1f}",
                            lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            if writer and v and step % cfg.log_interval == 0:
                writer.add_scalar("train/loss", v["loss"], step)
                writer.add_scalar("train/top1", 100.0 * v["correct"] / n, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/images_per_s", rate, step)

    pending = None     # the previous step, settled once this one is queued (the GPU never idles)
    for batch in bar:
        n = 0 if batch is None else batch[0].shape[0]
        read = None
        if not skip_short_batch(n, per_proc, min_images, state, is_main):   # (a short batch: the step is skipped)
            read = start_host_read(train_step(model, optimizer, scaler, batch, cfg, device, amp_dtype, params,
                                              bn_buffers, backup))
        lr = step_scheduler(scheduler)
        state["step"] += 1
        state["step_in_epoch"] += 1
        seen += n
        if pending:
            settle(*pending)
        pending = (read, n, state["step"], lr)
        stop_now = stopper.requested()   # SIGTERM / SIGINT on any process: save at this step boundary, then stop
        if stop_now or (cfg.save_every_steps and state["step"] % cfg.save_every_steps == 0):
            settle(*pending)
            pending = None
            checkpoint_fn("last.pt")
        if stop_now:
            break
    if pending:
        settle(*pending)
    bar.close()
    images = max(meter["images"], 1)
    return {"loss": meter["loss_sum"] / images, "top1": 100 * meter["correct"] / images}


@torch.no_grad()
def validate(model, loader, cfg: PretrainConfig, device) -> dict:
    """Loss, top-1 and top-5 (%) over the whole validation set, each image counted exactly once
    over all processes (ShardSampler shards, then the correct counts are all-reduced)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)   # loss sum, top-1 hits, top-5 hits, images
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    for batch in tqdm(loader, desc="validate", disable=not is_main, leave=False, dynamic_ncols=True):
        if batch is None:
            continue
        images, labels, _ = batch
        labels = labels.to(device, non_blocking=True)
        x = color_normalize(images.to(device, non_blocking=True), mean=cfg.mean, std=cfg.std)
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=cfg.amp):
            logits = model(x)
        logits = logits.float()
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        totals[1:3] += accuracy(logits, labels, (1, 5)).double()
        totals[3] += len(labels)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, c1, c5, n = totals.tolist()
    n_ = max(n, 1)
    return {"loss": loss_sum / n_, "top1": 100 * c1 / n_, "top5": 100 * c5 / n_, "correct1": int(c1),
            "correct5": int(c5), "images": int(n)}


@torch.no_grad()
def preview(model, dataset: ImageNetClassification, indices: list[int], class_labels: list[str], cfg: PretrainConfig,
            device) -> Tensor | None:
    """A uint8 ``(3, H, W)`` grid of val images, each with its predicted class (and probability)
    and its true class written under it with PIL, green when right, red when wrong."""
    items = [it for it in (dataset[i] for i in indices) if it is not None]
    if not items:
        return None
    images = torch.stack([it[0] for it in items])
    model.eval()
    x = color_normalize(images.to(device), mean=cfg.mean, std=cfg.std)
    with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=cfg.amp):
        probs = model(x).float().softmax(1).cpu()
    font = ImageFont.load_default()
    tiles = []
    for (img, label, _), p in zip(items, probs):
        pred = int(p.argmax())
        canvas = Image.new("RGB", (img.shape[2], img.shape[1] + 26), "black")
        canvas.paste(Image.fromarray(img.permute(1, 2, 0).numpy()), (0, 0))
        draw = ImageDraw.Draw(canvas)
        colour = (80, 255, 80) if pred == label else (255, 90, 90)
        short = [s.split(",")[0][:24] for s in (class_labels[pred], class_labels[label])]
        draw.text((2, img.shape[1] + 1), f"{short[0]} {float(p[pred]):.0%}", fill=colour, font=font)
        draw.text((2, img.shape[1] + 13), f"true: {short[1]}", fill=(220, 220, 220), font=font)
        tiles.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1))
    return make_grid(tiles, nrow=min(4, len(tiles)), padding=2)


def run_prepare_val(cfg: PretrainConfig) -> dict:
    """--prepare-val: arrange the flat val/ into class folders and report what happened."""
    if cfg.data == "demo":
        raise ValueError("--prepare-val works on --data imagenet (the demo's val/ is generated in class folders)")
    if not cfg.data_root:
        raise ValueError("--prepare-val needs --data-root (the folder holding val/)")
    root = resolve_imagenet_root(cfg.data_root, split="val")
    labels, source = val_labels(cfg.data_root, root, cfg.val_solution, cfg.devkit_gt, cfg.devkit_synsets)
    train = root / "train"     # its class folders, which val/'s must be among (checked before anything moves)
    report = prepare_val(root / "val", labels, set(class_folder_names(train)) if train.is_dir() else None)
    print(f"--prepare-val {root / 'val'} with labels from {source}: {report.moved} moved into class folders, "
          f"{report.already} already in place, {len(report.missing)} labelled but absent, "
          f"{len(report.unlabelled)} loose images without a label left where they are")
    for what, names in (("absent", report.missing), ("unlabelled", report.unlabelled)):
        if names:
            print(f"  {what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    return {"exit_code": 0, "moved": report.moved, "already": report.already, "missing": len(report.missing),
            "unlabelled": len(report.unlabelled)}


def resolve_data_root(cfg: PretrainConfig, is_main: bool) -> str:
    """The ImageNet tree to read: --data-root, or for the demo data/demo_imagenet, generated by rank 0
    (cached, rebuilt when the generator's version changes) while the other processes wait; a demo
    --data-root is used as it is, and generated only where there is none."""
    if cfg.data == "demo":
        from demo_data import make_demo_imagenet
        data_root = cfg.data_root or "data/demo_imagenet"
        if is_main and (not cfg.data_root or not (Path(data_root) / "train").is_dir()):
            make_demo_imagenet(data_root)
        if dist.is_initialized():
            dist.barrier()
        return data_root
    if not cfg.data_root:
        raise ValueError("--data imagenet needs --data-root (the folder holding train/ and val/)")
    return cfg.data_root


def run_evaluate(cfg: PretrainConfig, rank: int, world: int, device: torch.device) -> dict:
    """--evaluate CHECKPOINT: the training run's validate() on a saved checkpoint, on one process or
    under torchrun, so that a checkpoint's top-1 / top-5 can be reproduced without training."""
    is_main = rank == 0
    ckpt = load_checkpoint(cfg.evaluate)
    require_checkpoint(ckpt, cfg.evaluate, "pretrainer.py", ("model", "config", "model_config", "class_names"))
    trained = ckpt["config"]
    # The view the network was trained for comes from the checkpoint; this command sets the rest.
    cfg = replace(cfg, image_size=trained["image_size"], mean=list(trained["mean"]), std=list(trained["std"]))
    data = load_imagenet(resolve_data_root(cfg, is_main), cfg.image_size, cfg.seed, val_solution=cfg.val_solution,
                         devkit_gt=cfg.devkit_gt, devkit_synsets=cfg.devkit_synsets,
                         synset_mapping=cfg.synset_mapping)
    if list(ckpt["class_names"]) != data.class_names:
        raise ValueError(f"{cfg.evaluate} was trained on {len(ckpt['class_names'])} other classes "
                         f"(first {ckpt['class_names'][:3]}), not the {len(data.class_names)} of {data.root}")
    model = Classifier(YoloConfig.from_dict(ckpt["model_config"], f"checkpoint {cfg.evaluate}"),
                       len(data.class_names)).to(device)
    load_weights(model, ckpt["model"], cfg.evaluate)
    if cfg.channels_last:
        to_channels_last(model)   # the images stay NCHW (see to_channels_last)
    per_proc = cfg.batch_size // world
    loader = DataLoader(data.val, per_proc, sampler=ShardSampler(len(data.val), rank, world),
                        num_workers=cfg.workers, pin_memory=device.type == "cuda", collate_fn=collate_skip_none)
    val = validate(model, loader, cfg, device)
    if is_main:
        unread = len(data.val) - val["images"]
        trained_for = (f" (epoch {ckpt['state']['epoch']}, step {ckpt['state']['step']})"
                       if isinstance(ckpt.get("state"), dict) and {"epoch", "step"} <= ckpt["state"].keys() else "")
        print(f"--evaluate {cfg.evaluate}{trained_for} on "
              f"{data.root / 'val'} at {cfg.image_size} px: loss {val['loss']:.4f} top-1 {val['top1']:.2f}% "
              f"top-5 {val['top5']:.2f}% ({val['images']} images"
              + (f"; {unread} unreadable, skipped)" if unread else ")"))
    cleanup_distributed()
    return {**val, "checkpoint": cfg.evaluate, "exit_code": 0}


def configure_compute(cfg: PretrainConfig, device: torch.device, world: int) -> None:
    """CPU: compute threads (leaving a core to each loader process) and glibc's memory reuse; CUDA:
    cuDNN autotuning (unless --deterministic) and TF32."""
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cfg.threads or max(1, cores // world - cfg.workers))
        reuse_freed_memory()   # no page faults on every step's activations (glibc)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    if cfg.prepare_val:
        return run_prepare_val(cfg)

    # ---- processes and device
    rank, world, local_rank, device = setup_distributed(cfg.device)
    is_main = rank == 0
    if cfg.evaluate:
        seed_everything(cfg.seed + rank, cfg.deterministic)
        configure_compute(cfg, device, world)
        return run_evaluate(cfg, rank, world, device)

    # ---- run folder, and a resumed run's own flags (everything below is built from them)
    out_dir = run_folder_path(cfg.out_dir, cfg.resume, Path(f"runs/pretrainer/{cfg.data}"))
    resume_path, ckpt, cfg = load_resume(cfg, out_dir, "pretrainer.py", RESUME_KEYS, build_parser(), argv,
                                         RESUME_MAY_CHANGE, RESUME_COMMAND_ONLY)

    # ---- batch, seed, threads
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by the {world} processes")
    seed_everything(cfg.seed + rank, cfg.deterministic)
    configure_compute(cfg, device, world)
    min_images = check_batch_norm_batch(
        lambda: Classifier(YoloConfig(C=1, image_size=cfg.image_size, variant=cfg.variant, width=cfg.width,
                                      batch_norm=cfg.batch_norm), 1), cfg.image_size, cfg.batch_size // world)
    # the folder is claimed once the cheap checks have passed (data errors come later: a start that fails
    # there leaves a free folder, RunFolder.taken)
    claim = is_main and not cfg.check_data
    run_folder = RunFolder(out_dir, resume_path) if claim else None

    # ---- data: the demo is generated in the ImageNet layout and read by the same code
    data = load_imagenet(resolve_data_root(cfg, is_main), cfg.image_size, cfg.seed, (cfg.min_scale, 1.0),
                         cfg.color_jitter, cfg.val_solution, cfg.devkit_gt, cfg.devkit_synsets, cfg.synset_mapping,
                         decode_on_device=cfg.gpu_decode)
    train_set, val_set, class_names = data.train, data.val, data.class_names
    # Data problems (images that would be skipped), reported, never fatal: val/'s headers are read at
    # every start; train/'s 1.28M files only with --check-data (its unreadable images are counted as
    # training skips them). --check-data decodes every image of both. The processes split the work.
    data_report: dict[str, list[tuple[str, str]]] = {}
    for name, ds in (("train", train_set), ("val", val_set)) if cfg.check_data else (("val", val_set),):
        shards = all_gather_objects(ds.check_images(decode=cfg.check_data, progress=is_main, shard=(rank, world)))
        data_report[name] = sorted(problem for shard in shards for problem in shard)
    if is_main:
        print(f"config: {json.dumps(asdict(cfg))}")
        print(f"train: {len(train_set)} images in {len(class_names)} classes from {data.root / 'train'}")
        print(f"val: {len(val_set)} images from {data.root / 'val'} ({data.val_layout})")
        for note in data.notes:
            print(f"  note: {note}")
        for name, problems in data_report.items():
            print(f"{name}: {len(problems)} unreadable images found ({'decoded' if cfg.check_data else 'headers read'}"
                  f"), each skipped")
            print_problems(problems, cfg.check_data)
        if "train" not in data_report:
            print("train: images not checked at start (--check-data decodes them all); unreadable ones are skipped, "
                  "counted and logged as data/skipped_images")
    if cfg.check_data:
        cleanup_distributed()
        return {"data_report": data_report, "exit_code": 0}
    per_proc = cfg.batch_size // world
    train_sampler = ResumableSampler(train_set, world, rank, seed=cfg.seed)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", collate_fn=collate_skip_none)
    # --gpu-decode: the training batches hold JPEG bytes (collate_encoded), decoded in train_one_epoch
    train_loader_kw = {**loader_kw, "collate_fn": collate_encoded} if cfg.gpu_decode else loader_kw
    # its own generator: validating draws nothing from the global RNG, so it does not change how the run trains
    val_loader = DataLoader(val_set, per_proc, sampler=ShardSampler(len(val_set), rank, world),
                            persistent_workers=cfg.workers > 0, generator=torch.Generator(), **loader_kw)

    # ---- model, optimizer, schedule
    model_cfg = YoloConfig(C=len(class_names), image_size=cfg.image_size, variant=cfg.variant,
                           batch_norm=cfg.batch_norm, width=cfg.width)
    model = Classifier(model_cfg, len(class_names)).to(device)
    if cfg.channels_last:
        to_channels_last(model)   # the images stay NCHW (see to_channels_last)
    params, flops = count_params_flops(model, cfg.image_size)
    if is_main:
        print(f"model: {model_cfg} | {params / 1e6:.2f}M params, {flops / 1e9:.2f} GFLOPs/image | device {device}"
              + (f", {torch.get_num_threads()} compute threads" if device.type == "cpu" else ""))
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, device)
    steps_per_epoch = train_sampler.num_samples // per_proc   # the loader drops the last partial batch
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train_set)} images)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and autocast_dtype(device) == torch.float16)

    # ---- resume
    state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "best_top1": -1.0, "best_top5": -1.0, "top1": None,
             "top5": None, "bad_steps": 0, "skipped_steps": 0, "skipped_images": 0, "history": [],
             "epoch_meter": {"loss_sum": 0.0, "correct": 0.0, "images": 0}}
    meter_known = True   # the epoch's sums cover all its steps so far
    if ckpt is not None:
        saved_cfg = YoloConfig.from_dict(ckpt["model_config"], f"checkpoint {resume_path}").to_dict()
        check_config_compatible(saved_cfg, model_cfg.to_dict(), MODEL_KEYS, str(resume_path))
        if list(ckpt["class_names"]) != list(class_names):
            raise ValueError(f"{resume_path} was trained on {len(ckpt['class_names'])} other classes "
                             f"(first {ckpt['class_names'][:3]}), not the {len(class_names)} of {data.root}")
        load_weights(model, ckpt["model"], resume_path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{resume_path}: its optimizer or LR scheduler state does not fit this run ({e})") from None
        # an older checkpoint saved mid-epoch without the epoch's sums: its steps before the resume may have trained
        meter_known = "epoch_meter" in ckpt["state"] or not ckpt["state"].get("step_in_epoch")
        state.update(ckpt["state"])
        restore_training_state(ckpt, scaler, rank, world)
        ckpt = None     # (the loaded optimizer state is in the optimizer now)
        if is_main:
            print(f"resumed from {resume_path} at {run_position(state, cfg.epochs)}")
    raw_model = model
    bn_buffers = [b for m in raw_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                  for b in m.buffers()]
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model if world == 1 else raw_model   # no DDP collectives inside an uneven val shard

    writer = SummaryWriter(str(out_dir)) if is_main else None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in remove_partial_checkpoints(out_dir):
            print(f"removed {p}: a checkpoint whose writing was cut off (its process was killed)")
        (out_dir / "config.json").write_text(json.dumps({
            "train": asdict(cfg), "model": model_cfg.to_dict(), "class_names": class_names,
            "class_labels": data.class_labels}, indent=2))
        print(f"run folder: {out_dir}  (tensorboard --logdir {out_dir.parent})")
        for name, problems in data_report.items():
            writer.add_scalar(f"data/{name}_problems", len(problems), state["step"])
            if problems:
                writer.add_text(f"data/{name}_report", "\n\n".join(f"`{w}`: {y}" for w, y in problems[:1000]),
                                state["step"])
    preview_idx = [round(i * (len(val_set) - 1) / max(cfg.preview_images - 1, 1))
                   for i in range(min(cfg.preview_images, len(val_set)))]

    def checkpoint(name: str) -> None:   # called by every process: the RNG states are gathered
        rngs = gather_rng_states()
        if not is_main:
            return
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "state": {**state, "history": list(state["history"]),
                                   "epoch_meter": dict(state["epoch_meter"])},
                         "config": asdict(cfg), "model_config": model_cfg.to_dict(), "class_names": class_names,
                         "class_labels": data.class_labels, **rngs}, out_dir / name)

    # ---- the loop
    stopper = GracefulStop()
    t_start = time.perf_counter()
    try:
        # requested() is one decision for all processes; a process's own flag alone could differ from
        # the others' for a signal that lands between two checks, and send them down different branches
        while state["epoch"] < cfg.epochs and not stopper.requested():
            epoch = state["epoch"]
            train_set.set_epoch(epoch)
            train_sampler.set_epoch(epoch, start=state["step_in_epoch"] * per_proc)
            # its own generator: worker seeding draws nothing from the global RNG, as in train_detector.py
            train_loader = DataLoader(train_set, per_proc, sampler=train_sampler, drop_last=True,
                                      generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch),
                                      **train_loader_kw)
            train = train_one_epoch(model, optimizer, scheduler, scaler, train_loader, cfg, state, device, writer,
                                    is_main, checkpoint, steps_per_epoch, stopper, bn_buffers, min_images)
            if state["step_in_epoch"] < steps_per_epoch:   # stopped by a signal mid-epoch; last.pt is written
                break
            check_epoch_trained(state, epoch, meter_known)
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            state["epoch_meter"] = {"loss_sum": 0.0, "correct": 0.0, "images": 0}
            meter_known = True
            if world > 1:   # evaluate (and save) rank 0's BatchNorm statistics on every process
                for b in raw_model.buffers():
                    dist.broadcast(b, 0)
            val = validate(eval_model, val_loader, cfg, device)
            state["top1"], state["top5"] = val["top1"], val["top5"]
            state["history"].append({"epoch": epoch + 1, "train_loss": train["loss"], "train_top1": train["top1"],
                                     **val})
            if is_main:
                print(f"epoch {epoch + 1}: train loss {train['loss']:.4f} top-1 {train['top1']:.2f}% | val loss "
                      f"{val['loss']:.4f} top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}% ({val['images']} images) "
                      f"| {time.perf_counter() - t_start:.0f}s"
                      + (f" | {state['skipped_images']} unreadable training images skipped so far"
                         if state["skipped_images"] else ""))
                writer.add_scalar("data/skipped_images", state["skipped_images"], state["step"])
                writer.add_scalar("val/loss", val["loss"], state["step"])
                writer.add_scalar("val/top1", val["top1"], state["step"])
                writer.add_scalar("val/top5", val["top5"], state["step"])
                writer.add_scalar("train/epoch_loss", train["loss"], state["step"])
                grid = preview(raw_model, val_set, preview_idx, data.class_labels, cfg, device)
                if grid is not None:
                    writer.add_image("val/predictions", grid, state["step"])
            if val["top1"] > state["best_top1"]:
                state["best_top1"], state["best_top5"] = val["top1"], val["top5"]
                checkpoint("best.pt")
            checkpoint("last.pt")   # a signal during validation stops the run at the loop's next check
    except BaseException:
        if writer:   # its queued points reach disk, e.g. the skipped steps that explain a stop
            writer.close()
        raise
    finally:
        stopper.restore()

    if is_main:
        if stopper.signum is not None:
            print(f"stopped by {signal.Signals(stopper.signum).name} at {run_position(state, cfg.epochs)}: "
                  f"{out_dir / 'last.pt'} written; continue with --resume auto --out-dir {out_dir}")
        metrics = {"best_top1": state["best_top1"], "best_top5": state["best_top5"], "final_top1": state["top1"],
                   "final_top5": state["top5"], "epochs": state["epoch"], "steps": state["step"],
                   "skipped_steps": state["skipped_steps"], "skipped_images": state["skipped_images"],
                   "seconds": time.perf_counter() - t_start, "history": state["history"]}
        write_json(out_dir / "metrics.json", metrics)   # strict JSON (NaN as null), whole or not at all
        if stopper.signum is None:
            print(f"best top-1 {state['best_top1']:.2f}% (top-5 {state['best_top5']:.2f}%) | {out_dir / 'best.pt'}")
    if writer:
        writer.close()
    if run_folder:
        run_folder.release()
    cleanup_distributed()
    return {"out_dir": str(out_dir), "best_top1": state["best_top1"], "best_top5": state["best_top5"],
            "final_top1": state["top1"], "final_top5": state["top5"], "epochs": state["epoch"],
            "step": state["step"], "skipped_steps": state["skipped_steps"], "skipped_images": state["skipped_images"],
            "history": state["history"],
            "exit_code": stopper.exit_code if stopper.signum is not None else 0}


if __name__ == "__main__":
    sys.exit(run_cli(main)["exit_code"])
