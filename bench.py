"""Measure YOLOv1's speed against the hardware limit and against a straightforward implementation.

    python bench.py                                   # whatever device it finds; ~1 minute on a CPU
    python bench.py --json runs/bench.json            # also write the table as JSON (incrementally)
    python bench.py --compile                         # add torch.compile rows (1-3 minutes of compiling; on
                                                      # a GPU up to 3 more for max-autotune, within --time-budget)
    python bench.py --only pipeline,eval              # a subset of: pipeline, peak, train, demo, infer, eval, compile
    python bench.py --smoke                           # tiny sizes, ~30 s: what CI runs

Sections, each printed as soon as it is measured (one row per number):

* ``pipeline``: training-data images/s per CPU core (one process, one thread) for the detector
  (decode, the paper's scale/translate/flip as one warp + resize, exposure/saturation, grid
  targets) and the classifier (decode, random resized crop, flip), ours beside a straightforward
  ``torchvision.transforms.v2`` pipeline, on photo-like JPEGs that this script writes to a temporary
  folder at VOC (~500x375) and ImageNet (~500x400) sizes (~75 KB at quality 90). Ours is what a
  loader worker does, ``VOCDetection.__getitem__`` / ``ImageNetClassification.__getitem__``, plus
  the per-image share of the batched ``dataset.color_normalize`` timed where training runs it: on
  the GPU, or on one CPU core on a machine without one. Both speedups are printed: with that
  colour share (``pipeline_speedup``) and of the worker alone (``pipeline_speedup_worker``).
* ``peak``: the matrix-product TFLOP/s of the device (bf16 8192^3 on a GPU, fp32 1024^3 on a CPU),
  the denominator of every MFU here.
* ``train``: images/s, TFLOP/s, MFU and peak memory of the detector (448 px, batch 64) and the
  classifier (224 px, the pretraining recipe's batch), with the data already on the device and
  end to end from a DataLoader; the step is train_detector.py's / pretrainer.py's (colour
  augmentation on the device, bf16 autocast, channels_last, fused optimizer, the script's
  per-step finite-loss check); the on-device step again with the stem in its other form (direct on
  a GPU, space-to-depth on a CPU: ``model.SpaceToDepthConv2d``); last, both models end to end and
  their data alone with ``--gpu-decode``'s pipeline (the workers read the files; decode and warp on
  the device), end to end again with the warp in its other form (image by image on a GPU,
  batched on a CPU: ``dataset.BATCHED_WARP_DEVICES``), and once more finished by the training
  loop itself rather than in a thread (``dataset.batches_on_device(thread=False)``).
* ``demo``: images/s of the demo recipe's training step (its small model, 224 px, batch 16, with
  the weight average's update) in NCHW, in channels_last everywhere, and in channels_last with the
  narrow stem left NCHW; ``--channels-last`` picks one of the last two for the device
  (``utils.to_channels_last``).
* ``infer``: detector images/s at batch 1 (the paper's FPS) and batch 64, eager fp32, eager bf16,
  bf16 weights, and replayed as a CUDA graph; where the batch-64 pass spends its time, layer by
  layer (the six slowest conv blocks, pools or linear layers, with their TFLOP/s; a conv block's
  time includes its activation); the stem convolution alone at batch 64, direct and as
  space-to-depth (``model.SpaceToDepthConv2d``, which runs the latter on GPUs); decode + NMS
  milliseconds per image.
* ``eval``: seconds to score a 5,000-image VOC split (voc_eval.bench) and to load its annotations
  (evaluate.bench_annotation_loading).
* ``compile`` (with ``--compile``): the same training step (on the device and end to end from the
  DataLoader) and inference under torch.compile as evaluate.py / detect.py ``--amp --channels-last
  --compile`` run it (``utils.StaticBatchCompiled``: mode reduce-overhead on a GPU, under autocast
  with the weights cast once; until 2026-11-27 mode default on bf16 weights at batch 64), and on a
  GPU, last, batch 64 under mode max-autotune.

FLOPs count a multiply-add as 2 (model.count_params_flops); a trained image costs 3x its forward
FLOPs (forward + backward). MFU = achieved FLOP/s / the matrix-product peak measured in this run.
On a CPU the networks are narrowed (``--width``) so that the run takes about a minute; the table
says which sizes were used. Every part runs under a time limit and a broad ``except`` that records
its error as a row: on a short GPU lease one failing part must not cost the others' numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dataset import (MEAN, STD, VOC_CLASSES, VOCDetection, batches_on_device, collate_skip_none, color_normalize,
                     encode_target, read_image)
from model import (SPACE_TO_DEPTH_DEVICES, Classifier, YoloConfig, YOLOv1, count_params_flops, layer_flops,
                   space_to_depth_conv2d)
from utils import (autocast_dtype, finite_float, make_optimizer, not_a_folder, parse_device, prepare_for_inference,
                   reuse_freed_memory, run_cli, start_host_read, to_channels_last)

SECTIONS: tuple[str, ...] = ("pipeline", "peak", "train", "demo", "infer", "eval", "compile")
VOC_SIZES: tuple[tuple[int, int], ...] = ((500, 375), (375, 500), (500, 333), (500, 400))   # (W, H), VOC's common shapes
IMAGENET_SIZES: tuple[tuple[int, int], ...] = ((500, 400), (500, 375), (400, 500), (500, 333))
JPEG_QUALITY = 90
DET_SIZE, CLS_SIZE = 448, 224   # the paper's input sizes; the pipeline section always uses these


# ----------------------------------------------------------------------------- configuration

@dataclass
class BenchConfig:
    """Every size the benchmark uses. :func:`bench_config` picks them for the device."""
    device: str = "cpu"
    det_width: float = 1.0        # YoloConfig.width of the detector (1.0 = the paper's)
    det_size: int = DET_SIZE      # detector input in the train/infer sections
    det_batch: int = 64
    cls_width: float = 1.0
    cls_size: int = CLS_SIZE
    cls_batch: int = 64           # pretrainer.py's imagenet recipe
    warmup_steps: int = 5
    steps: int = 20               # timed training steps per row, data on the device
    loader_steps: int = 40        # timed steps per end-to-end row (after the prefetched backlog is drained)
    infer_batch: int = 64
    infer_iters: int = 100        # timed batch-1 forward passes
    pipeline_images: int = 96     # timed images per round of a pipeline measurement (the baseline: a third)
    files: int = 128              # JPEGs written per dataset (cycled through: decode costs the same)
    eval_images: int = 5000
    peak_n: int = 8192            # matrix size of the peak measurement
    workers: int = 8              # DataLoader processes in the end-to-end rows
    amp: bool = True              # bf16 autocast (fp16 + GradScaler where no bf16)
    channels_last: bool = True
    time_budget_s: float = 420.0  # parts that would start after this are skipped


def bench_config(device: torch.device, smoke: bool = False) -> BenchConfig:
    """Paper sizes on a GPU (~2 minutes eager, ~5-8 with --compile, the 420 s budget permitting); narrowed networks on a CPU
    (~1 minute); tiny everything with ``smoke`` (~30 s, for CI)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":   # ~10 timed batches per loader worker: workers deliver in waves
        workers = max(1, min(cpus - 2, 16))
        return BenchConfig(device=str(device), workers=workers, loader_steps=max(40, 10 * workers))
    cfg = BenchConfig(device=str(device), det_width=0.125, det_batch=4, cls_width=0.25, cls_batch=8, warmup_steps=1,
                      steps=3, loader_steps=3, infer_batch=8, infer_iters=5, pipeline_images=96, files=32,
                      peak_n=1024, workers=1, amp=False, channels_last=False, time_budget_s=1e9)
    if smoke:
        cfg = replace(cfg, det_width=0.0625, det_size=64, det_batch=2, cls_width=0.0625, cls_size=64, cls_batch=2,
                      steps=2, loader_steps=2, infer_batch=2, infer_iters=3, pipeline_images=6, files=6,
                      eval_images=200, peak_n=256)
    return cfg


# ----------------------------------------------------------------------------- the table

@dataclass
class Row:
    section: str
    variant: str
    value: float | None
    unit: str
    note: str = ""
    key: str = ""           # stable name in the JSON "results" dict


class Report:
    """The rows measured so far: each printed (and flushed) when added, and the whole report
    rewritten atomically to ``json_path`` so that a run cut off by a timeout leaves its numbers."""

    def __init__(self, json_path: str | None, meta: dict[str, Any]):
        self.json_path = Path(json_path) if json_path else None
        self.meta = meta
        self.rows: list[Row] = []
        self.results: dict[str, float | None] = {}
        self.complete = False
        print(f"{'section':<9} | {'variant':<50} | {'value':>10} | {'unit':<10} | note", flush=True)
        self.write()

    def add(self, section: str, variant: str, value: float | None, unit: str, note: str = "", key: str = "") -> None:
        if value is not None and not math.isfinite(value):
            value = None
        row = Row(section, variant, value, unit, note, key)
        self.rows.append(row)
        if key:
            self.results[key] = value
        print(format_row(row), flush=True)
        self.write()

    def write(self) -> None:
        if self.json_path is None:
            return
        doc = {**self.meta, "complete": self.complete, "results": self.results,
               "pipeline_speedup": self.results.get("pipeline_speedup"),
               "voc_eval_seconds": self.results.get("voc_eval_seconds"),
               "rows": [asdict(r) for r in self.rows]}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(f".{self.json_path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.json_path)

    def table(self) -> str:
        head = f"{'section':<9} | {'variant':<50} | {'value':>10} | {'unit':<10} | note"
        return "\n".join([head, "-" * len(head)] + [format_row(r) for r in self.rows])


def format_row(r: Row) -> str:
    if r.value is None:
        v = "-"
    elif abs(r.value) >= 1000 or r.value == int(r.value) and abs(r.value) >= 10:
        v = f"{r.value:,.0f}"
    else:
        v = f"{r.value:.3g}"
    return f"{r.section:<9} | {r.variant:<50} | {v:>10} | {r.unit:<10} | {r.note}"


class PartTimeout(Exception):
    """A benchmark part ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (SIGALRM; no limit where
    that is unavailable). The exception arrives between Python bytecodes, so a long C call (one
    CUDA kernel, one compile step) finishes first."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0 or not math.isfinite(seconds):
        yield
        return

    def on_alarm(signum, frame):
        raise PartTimeout(f"ran past its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 10.0)   # again every 10 s, should a library swallow the first
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_part(report: Report, section: str, part: str, fn: Callable[[], None], limit_s: float) -> bool:
    """Run one part of a section under ``limit_s``; an error or timeout becomes an ``error`` row
    (with the traceback on stderr) and the benchmark goes on. Returns True when it finished."""
    t0 = time.perf_counter()
    try:
        with time_limit(limit_s):
            fn()
        ok = True
    except Exception as e:  # noqa: BLE001 - the one place a broad catch is right: record the failure, keep measuring
        traceback.print_exc()
        sys.stderr.flush()
        report.add(section, f"{part}: error", None, "", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        ok = False
    report.add(section, f"{part}: time taken", time.perf_counter() - t0, "s")
    return ok


# ----------------------------------------------------------------------------- timing helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` averaged over ``iters`` back-to-back calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- generated data

def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ``(H, W, 3)`` uint8 image with a photo's statistics as far as a JPEG codec cares: smooth
    colour gradients (large-scale noise), texture at a few scales and a little sensor noise, so
    that a 500x375 file is ~75 KB at quality 90, about what VOC's weigh, and decodes at a photo's cost."""
    def layer(cells: int, amp: float) -> Tensor:
        h, w = max(2, height // cells), max(2, width // cells)
        low = torch.from_numpy(rng.standard_normal((1, 3, h, w), dtype=np.float32)).mul_(amp)
        return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
    img = 120 + layer(64, 55) + layer(12, 24) + layer(2, 18)
    img += torch.from_numpy(rng.standard_normal((3, height, width), dtype=np.float32)).mul_(7.0)
    return img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    from PIL import Image
    Image.fromarray(array).save(path, quality=JPEG_QUALITY)


def write_voc_tree(root: Path, n: int, seed: int = 0) -> Path:
    """A VOC2007-layout folder of ``n`` photo-like JPEGs with 1-4 random objects each; returns root."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        W, H = VOC_SIZES[i % len(VOC_SIZES)]
        _save_jpeg(photo_like(rng, H, W), voc / "JPEGImages" / f"{image_id}.jpg")
        objects = []
        for _ in range(int(rng.integers(1, 5))):
            w, h = int(rng.integers(30, W // 2)), int(rng.integers(30, H // 2))
            x1, y1 = int(rng.integers(1, W - w)), int(rng.integers(1, H - h))
            objects.append(f"<object><name>{VOC_CLASSES[int(rng.integers(20))]}</name><difficult>0</difficult>"
                           f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x1 + w}</xmax><ymax>{y1 + h}</ymax>"
                           f"</bndbox></object>")
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{W}</width><height>{H}</height>"
            f"<depth>3</depth></size>{''.join(objects)}</annotation>\n")
    (voc / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{s}\n" for s in ids))
    return root


def write_imagenet_files(root: Path, n: int, classes: int = 4, seed: int = 1) -> list[tuple[Path, int]]:
    """``n`` photo-like JPEGs in ``root/train/<wnid>/``; returns ``[(path, class index)]``."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = i % classes
        folder = root / "train" / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        W, H = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
        path = folder / f"n{label:08d}_{i}.JPEG"
        _save_jpeg(photo_like(rng, H, W), path)
        samples.append((path, label))
    return samples


class Workspace:
    """The generated JPEGs, written on first use into a temporary folder removed at exit."""

    def __init__(self, files: int):
        self.files = files
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._voc: Path | None = None
        self._imagenet: list[tuple[Path, int]] | None = None

    @property
    def root(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="yolo-bench-")
        return Path(self._tmp.name)

    def voc_root(self) -> Path:
        if self._voc is None:
            self._voc = write_voc_tree(self.root / "voc", self.files)
        return self._voc

    def imagenet_samples(self) -> list[tuple[Path, int]]:
        if self._imagenet is None:
            self._imagenet = write_imagenet_files(self.root / "imagenet", self.files)
        return self._imagenet

    def mean_file_kb(self, paths: Sequence[Path]) -> float:
        return float(np.mean([p.stat().st_size for p in paths]) / 1024)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def detector_dataset(ws: Workspace, image_size: int, seed: int = 0, decode_on_device: bool = False) -> VOCDetection:
    return VOCDetection(ws.voc_root(), "2007-train", image_size=image_size, train=True, seed=seed,
                        decode_on_device=decode_on_device)


def classifier_dataset(ws: Workspace, image_size: int, seed: int = 0, decode_on_device: bool = False):
    from imagenet import ImageNetClassification
    samples = ws.imagenet_samples()
    classes = sorted({label for _, label in samples})
    return ImageNetClassification(samples, [f"n{c:08d}" for c in classes], image_size, train=True, seed=seed,
                                  root=ws.root / "imagenet" / "train", decode_on_device=decode_on_device)


# ----------------------------------------------------------------------------- the straightforward pipelines

def straightforward_detector_transform(size: int = DET_SIZE):
    """The baseline: what one writes first with torchvision.transforms.v2 for the paper's
    augmentation, on the full-size uint8 image and its boxes (a dict with "image", "boxes",
    "labels"): random affine (scale 0.8-1.2, translate 20%), exposure/saturation jitter of 1.5x
    (ColorJitter brightness/saturation 0.5), flip, resize, drop boxes that left the image."""
    from torchvision.transforms import v2
    return v2.Compose([
        v2.RandomAffine(degrees=0, translate=(0.2, 0.2), scale=(0.8, 1.2)),
        v2.ColorJitter(brightness=0.5, saturation=0.5),
        v2.RandomHorizontalFlip(),
        v2.Resize((size, size), antialias=True),
        v2.SanitizeBoundingBoxes(),
    ])


def straightforward_detector_sample(transform, image: Tensor, boxes: Tensor, labels: Tensor, S: int = 7,
                                    C: int = 20) -> tuple[Tensor, Tensor]:
    """Apply the baseline ``transform`` to a decoded uint8 image and its pixel ``xyxy`` boxes,
    then encode the grid target with the same :func:`dataset.encode_target` as ours."""
    from torchvision import tv_tensors
    H, W = image.shape[-2:]
    sample = {"image": tv_tensors.Image(image),
              "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)), "labels": labels}
    out = transform(sample)
    size = out["image"].shape[-1]
    return out["image"], encode_target(out["boxes"].as_subclass(Tensor), out["labels"], size, S, C)


def straightforward_classifier_transform(size: int = CLS_SIZE):
    """The baseline for pretraining: torchvision's ImageNet recipe on the decoded uint8 image."""
    from torchvision.transforms import v2
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


# ----------------------------------------------------------------------------- section: pipeline

def interleaved_rates(fns: dict[str, tuple[Callable[[int], Any], int]], n: int, rounds: int = 3) -> dict[str, float]:
    """Items per second of each ``fn(i)`` (``i`` cycling over ``n`` files), ``count`` items per
    round. The variants take turns, round after round, and each keeps its fastest round: on a
    shared machine, load that comes and goes then hits every variant alike, and the fastest round
    is the closest to what the code itself costs."""
    for fn, _ in fns.values():
        for i in range(2):
            fn(i % n)       # warm-up: lazy imports, allocator, page cache
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, (fn, count) in fns.items():
            t0 = time.perf_counter()
            for i in range(count):
                fn(i % n)
            best[name] = max(best[name], count / (time.perf_counter() - t0))
    return best


def color_share_ms(device: torch.device, size: int, jitter: bool, batch: int) -> float:
    """Milliseconds per image of :func:`dataset.color_normalize` on a uint8 batch of ``batch``
    images of ``size`` px already on ``device``, channels-last as the loader delivers them (so the
    transposition to NCHW is counted), with or without exposure/saturation jitter: the
    per-image share of the colour step where training runs it, at the training batch size. Call
    with one thread on a CPU."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)   # the loader's order
    images = images.permute(0, 3, 1, 2).to(device)           # (dataset.stack_images): made contiguous in the step
    e = torch.rand(batch, generator=g).add_(0.67).to(device) if jitter else None
    s = torch.rand(batch, generator=g).add_(0.67).to(device) if jitter else None
    color_normalize(images, e, s)
    best = math.inf
    for _ in range(5):      # fastest of 5: the cost of the code, not of the neighbours' load
        best = min(best, time_calls(lambda: color_normalize(images, e, s), iters=1, warmup=0, device=device))
    return 1000 * best / batch


def _color_note(device: torch.device, batch: int) -> str:
    where = "the GPU" if device.type == "cuda" else "1 CPU core"
    return f"dataset.color_normalize, batch {batch} on {where} (where training runs it)"


def part_pipeline_detector(report: Report, cfg: BenchConfig, ws: Workspace) -> None:
    device = torch.device(cfg.device)
    ds = detector_dataset(ws, DET_SIZE)
    n = len(ds)
    paths = [p for p, _ in ds.items]
    anns = [(VOCDetection.boxes_px(a), torch.from_numpy(a.labels)) for _, a in ds.items]
    tf = straightforward_detector_transform(DET_SIZE)
    count = cfg.pipeline_images
    with torch_threads(1):
        r = interleaved_rates({
            "decode": (lambda i: read_image(paths[i]), count),
            "ours": (lambda i: ds[i], count),
            "base": (lambda i: straightforward_detector_sample(tf, read_image(paths[i]), *anns[i]), max(4, count // 3)),
        }, n, rounds=5)
        batch = cfg.det_batch
        color_ms = color_share_ms(device, DET_SIZE, jitter=True, batch=batch)
    ours = 1000 / (1000 / r["ours"] + color_ms)
    kb = ws.mean_file_kb(paths)
    report.add("pipeline", "JPEG decode (VOC-size)", 1000 / r["decode"], "ms/img",
               f"dataset.read_image, 1 core, {kb:.0f} KB files", key="decode_ms_voc")
    report.add("pipeline", "detector ours: decode+warp+targets", r["ours"], "img/s/core",
               "VOCDetection.__getitem__ (448 px): what a loader worker does", key="pipeline_detector_worker_per_core")
    report.add("pipeline", "detector ours: colour share", color_ms, "ms/img", _color_note(device, batch),
               key="color_normalize_ms_detector")
    report.add("pipeline", "detector ours (total)", ours, "img/s/core", "worker + colour share",
               key="pipeline_detector_ours_per_core")
    report.add("pipeline", "detector straightforward v2", r["base"], "img/s/core",
               "RandomAffine+ColorJitter+flip+Resize+Sanitize on uint8; same decode, same encode_target",
               key="pipeline_detector_baseline_per_core")
    report.add("pipeline", "detector speedup (ours total / straightforward)", ours / r["base"], "x", "goal >= 4x",
               key="pipeline_speedup")
    report.add("pipeline", "detector speedup (worker / straightforward)", r["ours"] / r["base"], "x",
               "the loader workers' share alone (on a GPU machine the colour runs on the GPU)",
               key="pipeline_speedup_worker")


def part_pipeline_classifier(report: Report, cfg: BenchConfig, ws: Workspace) -> None:
    from torchvision import tv_tensors
    device = torch.device(cfg.device)
    ds = classifier_dataset(ws, CLS_SIZE)
    paths = [p for p, _ in ws.imagenet_samples()]
    tf = straightforward_classifier_transform(CLS_SIZE)
    count = cfg.pipeline_images
    with torch_threads(1):
        r = interleaved_rates({
            "decode": (lambda i: read_image(paths[i]), count),
            "ours": (lambda i: ds[i], count),
            "base": (lambda i: tf(tv_tensors.Image(read_image(paths[i]))), max(4, count // 2)),
        }, len(paths), rounds=5)
        batch = cfg.cls_batch
        color_ms = color_share_ms(device, CLS_SIZE, jitter=False, batch=batch)
    ours = 1000 / (1000 / r["ours"] + color_ms)
    kb = ws.mean_file_kb(paths)
    report.add("pipeline", "JPEG decode (ImageNet-size)", 1000 / r["decode"], "ms/img",
               f"dataset.read_image, 1 core, {kb:.0f} KB files", key="decode_ms_imagenet")
    report.add("pipeline", "classifier ours: decode+crop+flip", r["ours"], "img/s/core",
               "ImageNetClassification.__getitem__ (224 px)", key="pipeline_classifier_worker_per_core")
    report.add("pipeline", "classifier ours: normalise share", color_ms, "ms/img", _color_note(device, batch),
               key="color_normalize_ms_classifier")
    report.add("pipeline", "classifier ours (total)", ours, "img/s/core", "worker + normalise share",
               key="pipeline_classifier_ours_per_core")
    report.add("pipeline", "classifier straightforward v2", r["base"], "img/s/core",
               "RandomResizedCrop+flip+ToDtype+Normalize on uint8; same decode",
               key="pipeline_classifier_baseline_per_core")
    report.add("pipeline", "classifier speedup (ours total / straightforward)", ours / r["base"], "x", "",
               key="classifier_pipeline_speedup")


# ----------------------------------------------------------------------------- section: peak

class Peak:
    """The device's matrix-product TFLOP/s, measured once (on demand if the peak part was skipped)."""

    def __init__(self, cfg: BenchConfig):
        self.cfg, self.tflops, self.dtype = cfg, None, None

    def get(self) -> float:
        if self.tflops is None:
            self.measure()
        return self.tflops

    def measure(self) -> float:
        device = torch.device(self.cfg.device)
        n = self.cfg.peak_n
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=self.dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=self.dtype, generator=g)
        # on a GPU, 25 warm-up products (clocks and power settle) and the best of 3 blocks of 100
        # (~0.15 s each on an H100): every MFU here is divided by this number
        iters, warmup = (100, 25) if device.type == "cuda" else (5, 3)
        sec = min(time_calls(lambda: torch.mm(a, b), iters, warmup=warmup if i == 0 else 0, device=device)
                  for i in range(3))
        self.tflops = 2 * n ** 3 / sec / 1e12
        return self.tflops


def part_peak(report: Report, cfg: BenchConfig, peak: Peak) -> None:
    t = peak.measure()
    dtype = str(peak.dtype).replace("torch.", "")
    report.add("peak", f"matmul {cfg.peak_n}^3 {dtype}", t, "TFLOP/s",
               f"{torch.get_num_threads()} threads" if cfg.device == "cpu" else torch.cuda.get_device_name(),
               key="peak_tflops")


# ----------------------------------------------------------------------------- section: train

PREFETCH = 2   # batches each loader worker keeps ready


def _loader(dataset, batch: int, n_batches: int, workers: int, device: torch.device, seed: int = 0,
            collate: Callable = collate_skip_none):
    """Random batches with replacement (the generated set is small; decode cost per image is what
    counts), loaded the way the training scripts should: pinned memory (for non_blocking copies),
    persistent workers."""
    from torch.utils.data import DataLoader, RandomSampler
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch * n_batches,
                            generator=torch.Generator().manual_seed(seed))
    kw = dict(persistent_workers=True, prefetch_factor=PREFETCH) if workers > 0 else {}
    return DataLoader(dataset, batch, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      collate_fn=collate, drop_last=True, **kw)


def _loader_note(cfg: BenchConfig, device: torch.device) -> str:
    """How :func:`_loader` loads, as it does on this device."""
    parts = ["pinned memory"] if device.type == "cuda" else []
    if cfg.workers > 0:
        parts.append(f"persistent workers, prefetch {PREFETCH}")
    return ", ".join(parts) or "in the main process"


def _loader_rate(step: Callable, dataset, batch: int, cfg: BenchConfig, device: torch.device, seed: int,
                 collate: Callable = collate_skip_none, finish: Callable | None = None, thread: bool = True) -> float:
    """Images/s of ``step`` fed by a fresh loader, timed once the batches the workers prefetched
    while starting are used up (else the number would be the step's rate, not the pipeline's).
    ``finish``: each batch goes through ``dataset.batches_on_device(loader, finish, device,
    thread=thread)`` first, as the training scripts' ``--gpu-decode`` does (with the thread)."""
    warmup = cfg.warmup_steps + (cfg.workers * PREFETCH if device.type == "cuda" else 0)
    loader = _loader(dataset, batch, warmup + cfg.loader_steps, cfg.workers, device, seed, collate)
    batches = iter(loader) if finish is None else batches_on_device(loader, finish, device, thread=thread)
    return _time_steps(step, batches, warmup, cfg.loader_steps, batch, device)


def _optimizer(model: torch.nn.Module, recipe: dict, device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer exactly as the training scripts build it (``utils.make_optimizer``)."""
    return make_optimizer(model, recipe["optimizer"], recipe["lr"], recipe["momentum"], recipe["weight_decay"], device)


def late_reader() -> Callable[[Tensor], None]:
    """What the training loops do with each step's record: start its copy to the host
    (``utils.start_host_read``) and read the previous step's, now that this one is queued."""
    pending: list[Callable[[], list]] = []

    def read_late(record: Tensor) -> None:
        read = start_host_read(record)
        if pending:
            pending.pop()()
        pending.append(read)
    return read_late


def detector_step(model, criterion, optimizer, scaler, cfg: BenchConfig, device: torch.device,
                  read_now: bool = False) -> Callable:
    """One training step as train_detector.py takes it: ``train_detector.train_step``, whose record
    (loss terms, finite, stepped) is copied to pinned host memory without waiting
    (``utils.start_host_read``) and read once the next step is queued. ``read_now=True`` reads
    each record at once instead (``.tolist()``, which waits for the GPU queue to drain): the
    difference between the two rates is what the late read saves."""
    from types import SimpleNamespace
    from train_detector import train_step
    amp_dtype = autocast_dtype(device)
    step_cfg = SimpleNamespace(amp=cfg.amp, clip_grad=0.0)
    read_late = late_reader()

    def step(images: Tensor, target: Tensor, info: Tensor) -> None:
        record, _ = train_step(model, criterion, optimizer, scaler, (images, target, info), step_cfg, device,
                               amp_dtype)
        if read_now:
            record.tolist()
        else:
            read_late(record)
    return step


def classifier_step(model, optimizer, scaler, cfg: BenchConfig, device: torch.device) -> Callable:
    """One training step as pretrainer.py takes it: ``pretrainer.train_step`` (no colour jitter: the
    recipe's default), its record read one step later."""
    from types import SimpleNamespace
    from pretrainer import train_step
    amp_dtype = autocast_dtype(device)
    params = list(model.parameters())
    bn_buffers = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                  for b in m.buffers()]
    backup = [b.clone() for b in bn_buffers]
    step_cfg = SimpleNamespace(color_jitter=0.0, mean=MEAN, std=STD, amp=cfg.amp, clip_grad=0.0)
    read_late = late_reader()

    def step(images: Tensor, labels: Tensor, info: Tensor) -> None:
        read_late(train_step(model, optimizer, scaler, (images, labels, info), step_cfg, device, amp_dtype, params,
                             bn_buffers, backup))
    return step


def _time_steps(step: Callable, batches: Iterator, warmup: int, steps: int, batch: int, device: torch.device) -> float:
    """Images/s of ``step`` over ``steps`` batches drawn from ``batches`` after ``warmup`` steps."""
    for _ in range(warmup):
        step(*next(batches))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


@contextlib.contextmanager
def _flipped(devices: set[str], device: torch.device) -> Iterator[bool]:
    """Inside the block ``device.type``'s membership of ``devices`` (a module's set, read at every
    call) is flipped; yields whether it is a member there."""
    saved = set(devices)
    devices ^= {device.type}
    try:
        yield device.type in devices
    finally:
        devices.clear()
        devices.update(saved)


@contextlib.contextmanager
def other_stem_form(device: torch.device) -> Iterator[str]:
    """Inside the block the stem (``model.SpaceToDepthConv2d``) takes the form it does not take on
    ``device``: direct on a GPU, space-to-depth on a CPU. Yields that form's name."""
    import model as model_module
    with _flipped(model_module.SPACE_TO_DEPTH_DEVICES, device) as space_to_depth:
        yield "space-to-depth" if space_to_depth else "direct"


@contextlib.contextmanager
def other_warp_form(device: torch.device) -> Iterator[str]:
    """Inside the block ``--gpu-decode``'s batches are warped in the form ``device`` does not use:
    image by image (``dataset.warp_image``) on a GPU, batched (``dataset.warp_images``) on a CPU.
    Yields that form's name."""
    import dataset as dataset_module
    with _flipped(dataset_module.BATCHED_WARP_DEVICES, device) as batched:
        yield "batched warp" if batched else "per-image warps"


def _other_stem_row(report: Report, section: str, name: str, step: Callable, first: tuple, batch: int,
                    cfg: BenchConfig, device: torch.device, key: str) -> None:
    """The on-device step again with the stem in its other form: which form pays, same step, same run."""
    with other_stem_form(device) as form:
        rate = _time_steps(step, _cycle_device_batch(first, device), cfg.warmup_steps, cfg.steps, batch, device)
    report.add(section, f"{name} train on device, stem {form}", rate, "img/s",
               "the stem's other form (model.SpaceToDepthConv2d), the step otherwise the same", key=key)


def _report_training(report: Report, section: str, name: str, how: str, rate: float, flops: int, peak: Peak,
                     note: str, key: str) -> None:
    achieved = rate * 3 * flops / 1e12
    report.add(section, f"{name} train {how}", rate, "img/s", note, key=f"{key}_images_per_s")
    report.add(section, f"{name} train {how}: achieved", achieved, "TFLOP/s", "3 x forward FLOPs per image",
               key=f"{key}_tflops")
    report.add(section, f"{name} train {how}: MFU", 100 * achieved / peak.get(), "%",
               f"of the {peak.get():.3g} TFLOP/s matmul peak", key=f"{key}_mfu_percent")


def _first_step_then_reset_peak(step: Callable, first: tuple, device: torch.device) -> float | None:
    """On a GPU, one training step and then a fresh peak-memory counter, so that the peak reported is
    training's steady state: with cudnn.benchmark the first step tries several algorithms, whose
    trial workspaces come from the same allocator. Returns that first step's peak (GiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    step(*first)
    sync(device)
    first_peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()   # the trial workspaces' cached blocks go too, or "reserved" would keep them
    torch.cuda.reset_peak_memory_stats(device)
    return first_peak


def _memory_rows(report: Report, section: str, name: str, device: torch.device, key: str,
                 first_peak: float | None = None) -> None:
    if device.type == "cuda":
        report.add(section, f"{name} train: peak memory", torch.cuda.max_memory_allocated(device) / 2**30, "GiB",
                   f"allocated, steady state; {torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB reserved; "
                   f"the first step (cuDNN autotuning): {first_peak:.2f} GiB", key=key)
    else:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
        report.add(section, f"{name} train: peak memory", rss, "GiB", "process peak RSS so far (CPU)", key=key)


def _cycle_device_batch(batch: tuple, device: torch.device) -> Iterator:
    on_device = tuple(t.to(device) for t in batch)
    while True:
        yield on_device


def _training_setup(name: str, cfg: BenchConfig, device: torch.device, compiled: bool = False):
    """The detector's or the classifier's training as its script builds it: ``(model, optimizer,
    make_step, flops, note)``, where ``make_step(read_now=False)`` makes the step (the detector's can
    read its record at once), ``flops`` are the forward FLOPs per image and ``note`` describes the
    rows. ``compiled``: the step runs the torch.compile'd model."""
    if name == "detector":
        from loss import YoloLoss
        from train_detector import RECIPES
        mcfg, recipe, size, batch = YoloConfig(image_size=cfg.det_size, width=cfg.det_width), RECIPES["voc"], \
            cfg.det_size, cfg.det_batch
        model = YOLOv1(mcfg).to(device)
    else:
        from pretrainer import RECIPES
        mcfg, recipe, size, batch = YoloConfig(width=cfg.cls_width), RECIPES["imagenet"], cfg.cls_size, cfg.cls_batch
        model = Classifier(mcfg, num_classes=1000).to(device)
    if cfg.channels_last:
        to_channels_last(model)
    _, flops = count_params_flops(model, size)
    optimizer = _optimizer(model, recipe, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and autocast_dtype(device) == torch.float16)
    if compiled:
        torch._dynamo.reset()   # a fresh cache: earlier compiles of forward must not make shapes dynamic
    net = torch.compile(model) if compiled else model

    def make_step(read_now: bool = False) -> Callable:
        if name == "detector":
            return detector_step(net, YoloLoss(mcfg.S, mcfg.B, mcfg.C), optimizer, scaler, cfg, device, read_now)
        return classifier_step(net, optimizer, scaler, cfg, device)
    note = (f"{size} px, width {mcfg.width}, batch {batch}, {recipe['optimizer']}"
            f"{' fused' if optimizer.defaults.get('fused') else ''}, {'bf16 autocast' if cfg.amp else 'fp32'}"
            f"{', channels_last' if cfg.channels_last else ''}")
    model.train()
    return model, optimizer, make_step, flops, note


def part_train_detector(report: Report, cfg: BenchConfig, ws: Workspace, peak: Peak, compiled: bool = False) -> None:
    device = torch.device(cfg.device)
    section = "compile" if compiled else "train"
    model, optimizer, make_step, flops, note = _training_setup("detector", cfg, device, compiled)
    step = make_step()
    ds = detector_dataset(ws, cfg.det_size)
    first = next(iter(_loader(ds, cfg.det_batch, 1, 0, device)))
    first_peak = None if compiled else _first_step_then_reset_peak(step, first, device)
    if compiled:
        t0 = time.perf_counter()
        step(*first)
        sync(device)
        report.add(section, "detector train: first step (compiling)", time.perf_counter() - t0, "s", "torch.compile default mode")
    rate = _time_steps(step, _cycle_device_batch(first, device), cfg.warmup_steps, cfg.steps, cfg.det_batch, device)
    tag = "compiled " if compiled else ""
    _report_training(report, section, "detector", f"{tag}on device", rate, flops, peak, note,
                     f"train_detector_{tag.strip() + '_' if compiled else ''}device")
    if not compiled:
        _memory_rows(report, section, "detector", device, "train_detector_peak_memory_gib", first_peak)
        _other_stem_row(report, section, "detector", step, first, cfg.det_batch, cfg, device,
                        "train_detector_device_other_stem_images_per_s")
    if device.type == "cuda":
        eager_read = make_step(read_now=True)
        rate = _time_steps(eager_read, _cycle_device_batch(first, device), 2, cfg.steps, cfg.det_batch, device)
        report.add(section, f"detector train {tag}on device, record read at once", rate, "img/s",
                   "each step's numbers read before the next is queued (a sync per step): what the late read saves",
                   key=f"train_detector_{tag.strip() + '_' if compiled else ''}device_sync_images_per_s")
        del eager_read   # it holds the model and optimizer: the classifier's memory rows come next
    # end to end: the goal (40% MFU from the DataLoader) is about this row, compiled or not
    rate = _loader_rate(step, ds, cfg.det_batch, cfg, device, seed=3 if compiled else 1)
    _report_training(report, section, "detector", f"{tag}end to end ({cfg.workers} workers)", rate, flops, peak, note,
                     f"train_detector_{tag.strip() + '_' if compiled else ''}e2e")
    if not compiled:
        rate = _loader_rate(lambda *batch: None, ds, cfg.det_batch, cfg, device, seed=2)
        report.add(section, f"detector data loader alone ({cfg.workers} workers)", rate, "img/s",
                   _loader_note(cfg, device), key="loader_detector_images_per_s")
    del model, optimizer, make_step, step, first
    if device.type == "cuda":
        torch.cuda.empty_cache()


def part_demo_step(report: Report, cfg: BenchConfig) -> None:
    """The demo recipe's training step as train_detector.py runs it (``train_step`` plus the weight
    average's update; DEMO_MODEL at its image size and batch, AMP where the recipe would use it) on
    a fixed batch, taking turns so that all meet the same machine load, in three memory formats: NCHW,
    channels_last everywhere, and channels_last with the narrow stem left NCHW. ``--channels-last``
    picks one of the last two for the device (``utils.to_channels_last``, ``keeps_narrow_stem_nchw``)."""
    from demo_data import DEMO_CLASSES
    from loss import YoloLoss
    from train_detector import RECIPES
    from utils import ModelEMA, cpu_has_native_bf16, keeps_narrow_stem_nchw
    device = torch.device(cfg.device)
    r = RECIPES["demo"]
    amp = r["amp"] and (device.type == "cuda" or cpu_has_native_bf16())
    n, size, C = r["batch_size"], r["image_size"], len(DEMO_CLASSES)
    mcfg = YoloConfig(C=C, image_size=size, width=r["width"], batch_norm=r["batch_norm"], fc_dim=r["fc_dim"],
                      dropout=r["dropout"], head_stride=r["head_stride"])
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    boxes = torch.tensor([[20.0, 30.0, 120.0, 110.0], [100.0, 90.0, 200.0, 210.0]]) * size / 224
    target = encode_target(boxes, torch.tensor([0, C - 1]), size, mcfg.S, C).expand(n, -1, -1, -1).contiguous()
    info = torch.tensor([[i, size, size, 1.2, 0.8] for i in range(n)], dtype=torch.float64)
    images, target, info = images.to(device), target.to(device), info.to(device)   # one fixed batch, on the device
    formats = {"nchw": ("NCHW", lambda m: m),
               "channels_last_all": ("channels_last everywhere", lambda m: to_channels_last(m, min_channels=0)),
               "channels_last_stem": ("channels_last, NCHW stem", lambda m: to_channels_last(m, min_channels=16))}
    fns = {}
    for key, (_, convert) in formats.items():
        torch.manual_seed(0)
        model = convert(YOLOv1(mcfg).to(device))
        optimizer = _optimizer(model, r, device)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        ema = ModelEMA(model, r["ema_decay"])
        step = detector_step(model, YoloLoss(C=C), optimizer, scaler, replace(cfg, amp=amp), device)

        def one(_i: int, step=step, ema=ema) -> None:
            step(images, target, info)
            ema.update()
            sync(device)   # the update's kernels belong to this variant's round
        fns[key] = (one, max(8, cfg.steps))
    rounds = 5
    rates = interleaved_rates(fns, 1, rounds)
    how = f"width {r['width']}, {size} px, batch {n}, {'bf16 autocast' if amp else 'fp32'}, fastest of {rounds} rounds"
    for key, rate in rates.items():
        report.add("demo", f"demo recipe train step, {formats[key][0]}", rate * n, "img/s", how,
                   key=f"demo_step_{key}_images_per_s")
    picked = "channels_last_stem" if keeps_narrow_stem_nchw(device) else "channels_last_all"
    report.add("demo", "--channels-last / NCHW", rates[picked] / rates["nchw"], "x",
               f"--channels-last here: {formats[picked][0]}", key="demo_step_channels_last_speedup")
    report.add("demo", "NCHW stem / channels_last everywhere", rates["channels_last_stem"] / rates["channels_last_all"],
               "x", "what leaving the 8-filter stem in NCHW gains", key="demo_step_nchw_stem_speedup")


def part_train_classifier(report: Report, cfg: BenchConfig, ws: Workspace, peak: Peak) -> None:
    device = torch.device(cfg.device)
    model, optimizer, make_step, flops, note = _training_setup("classifier", cfg, device)
    step = make_step()
    ds = classifier_dataset(ws, cfg.cls_size)
    first = next(iter(_loader(ds, cfg.cls_batch, 1, 0, device)))
    first_peak = _first_step_then_reset_peak(step, first, device)
    rate = _time_steps(step, _cycle_device_batch(first, device), cfg.warmup_steps, cfg.steps, cfg.cls_batch, device)
    _report_training(report, "train", "classifier", "on device", rate, flops, peak, note, "train_classifier_device")
    _memory_rows(report, "train", "classifier", device, "train_classifier_peak_memory_gib", first_peak)
    _other_stem_row(report, "train", "classifier", step, first, cfg.cls_batch, cfg, device,
                    "train_classifier_device_other_stem_images_per_s")
    rate = _loader_rate(step, ds, cfg.cls_batch, cfg, device, seed=1)
    _report_training(report, "train", "classifier", f"end to end ({cfg.workers} workers)", rate, flops, peak, note,
                     "train_classifier_e2e")
    rate = _loader_rate(lambda *batch: None, ds, cfg.cls_batch, cfg, device, seed=2)
    report.add("train", f"classifier data loader alone ({cfg.workers} workers)", rate, "img/s",
               _loader_note(cfg, device), key="loader_classifier_images_per_s")
    del model, optimizer, make_step, step
    if device.type == "cuda":
        torch.cuda.empty_cache()


def part_gpu_decode(report: Report, cfg: BenchConfig, ws: Workspace, peak: Peak) -> None:
    """Both models end to end, and their data alone, as ``--gpu-decode`` feeds them (train_detector.py,
    pretrainer.py): the workers read the files, draw the augmentation and (detector) encode the
    targets; the JPEGs are decoded (nvJPEG on a GPU) and warped on the device
    (``dataset.decode_on_device_batch``, in ``dataset.batches_on_device``'s thread); then end to end
    again with the warp in its other form (``other_warp_form``), and without the thread. A part of
    its own, after the other parts but the GPU's max-autotune one: a failure of this path must not
    cost the earlier parts' numbers."""
    from dataset import collate_encoded
    device = torch.device(cfg.device)
    decoder = "nvJPEG" if device.type == "cuda" else "libjpeg in the main process"

    def measure(name: str) -> None:
        _, _, make_step, flops, note = _training_setup(name, cfg, device)
        step = make_step()
        batch = cfg.det_batch if name == "detector" else cfg.cls_batch
        ds = (detector_dataset(ws, cfg.det_size, decode_on_device=True) if name == "detector"
              else classifier_dataset(ws, cfg.cls_size, decode_on_device=True))
        note = f"{note}; {decoder}: decode + warp on the device; {_loader_note(cfg, device)}"

        def rate_of(fn: Callable, seed: int, thread: bool = True) -> float:
            return _loader_rate(fn, ds, batch, cfg, device, seed=seed, collate=collate_encoded,
                                finish=ds.finish_on_device, thread=thread)
        _report_training(report, "train", name, f"end to end, --gpu-decode ({cfg.workers} workers)", rate_of(step, 3),
                         flops, peak, note, f"train_{name}_e2e_gpu_decode")
        report.add("train", f"{name} data alone, --gpu-decode ({cfg.workers} workers)", rate_of(lambda *b: None, 4),
                   "img/s", note, key=f"loader_{name}_gpu_decode_images_per_s")
        with other_warp_form(device) as form:      # which warp pays, same step, same run
            rate = rate_of(step, 5)
        report.add("train", f"{name} train end to end, --gpu-decode, {form}", rate, "img/s",
                   f"the warp {device.type} does not use (dataset.BATCHED_WARP_DEVICES)",
                   key=f"train_{name}_e2e_gpu_decode_other_warp_images_per_s")
        rate = rate_of(step, 6, thread=False)
        report.add("train", f"{name} train end to end, --gpu-decode, finished by the training loop", rate,
                   "img/s", "dataset.batches_on_device(thread=False): decode and warps in the loop's own "
                   "thread (on a GPU; the same as the first row on a CPU)",
                   key=f"train_{name}_e2e_gpu_decode_no_thread_images_per_s")

    for name in ("detector", "classifier"):
        measure(name)              # its model and optimizer freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- section: infer

def cuda_graph_forward(model: torch.nn.Module, example: Tensor) -> Callable[[Tensor], Tensor]:
    """Capture ``model(example)`` (eval, no grad) as a CUDA graph; returns ``run(x)`` that copies
    ``x`` into the captured input and replays the graph: one launch for the whole network. The
    returned tensor is the graph's output buffer, overwritten by the next call."""
    static_in = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):          # cuDNN autotuning and lazy allocations happen outside the capture
            model(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_in)

    def run(x: Tensor) -> Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out
    return run


def _inference_inputs(cfg: BenchConfig, batch: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, cfg.det_size, cfg.det_size), dtype=torch.uint8, generator=g)
    return color_normalize(images.to(device), mean=MEAN, std=STD)


def trained_like_outputs(N: int, S: int, B: int, C: int, device: torch.device, seed: int = 0) -> Tensor:
    """Raw detector outputs ``(N, S, S, 5B+C)`` shaped like a trained network's (boxes inside their
    cells, confidences spread over 0..1, peaked class probabilities), so that decoding and NMS get
    a realistic number of candidates; an untrained network's near-zero outputs give almost none."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(N, S, S, B, 4, generator=g) * torch.tensor([1.0, 1.0, 0.7, 0.7]) + torch.tensor([0, 0, 0.1, 0.1])
    conf = torch.rand(N, S, S, B, generator=g).pow(3)
    cls = torch.softmax(3 * torch.randn(N, S, S, C, generator=g), -1)
    return torch.cat([boxes.flatten(-2), conf, cls], -1).to(device)


def part_infer(report: Report, cfg: BenchConfig, compiled: bool = False) -> None:
    """Detector forward passes on normalised inputs already on the device (no decode): fp32,
    bf16 autocast as utils.predict runs it, bf16 weights, a CUDA graph, or torch.compile."""
    from utils import decode_predictions
    device = torch.device(cfg.device)
    section = "compile" if compiled else "infer"
    mcfg = YoloConfig(image_size=cfg.det_size, width=cfg.det_width)
    model = YOLOv1(mcfg).to(device).eval()
    x1, xb = _inference_inputs(cfg, 1, device), _inference_inputs(cfg, cfg.infer_batch, device)
    size = f"{cfg.det_size} px, width {cfg.det_width}"
    nb = cfg.infer_batch
    iters_b = max(3, cfg.infer_iters // 10)
    amp_dtype = autocast_dtype(device)

    def rate(fn: Callable[[], Any], batch: int, iters: int) -> float:
        with torch.no_grad():
            return batch / time_calls(fn, iters, warmup=3, device=device)

    def add(variant: str, r: float, note: str, key: str) -> None:
        if "batch 1," in variant:
            note = f"{1000 / r:.2f} ms/img; {note}"
        report.add(section, variant, r, "img/s", note, key=key)

    def autocast_fwd(net: torch.nn.Module, x: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=amp_dtype):
            return net(x)

    if compiled:   # what evaluate.py / detect.py --amp --channels-last --compile run
        for batch, x, key in ((nb, xb, "infer_compiled_batch_images_per_s"),
                              (1, x1, "infer_compiled_batch1_images_per_s")):
            torch._dynamo.reset()   # each batch size its own static-shape compile
            net = prepare_for_inference(model, device, channels_last=True, amp=True, compile_batch=batch)
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(3):      # reduce-overhead records its CUDA graph on a later call
                    autocast_fwd(net, x)
            sync(device)
            report.add(section, f"detector infer batch {batch}: compiling", time.perf_counter() - t0, "s",
                       f"mode {net.mode}")
            add(f"detector infer batch {batch}, compiled bf16", rate(lambda: autocast_fwd(net, x), batch,
                cfg.infer_iters if batch == 1 else iters_b),
                f"{size}, utils.StaticBatchCompiled (torch.compile mode {net.mode}) under autocast, weights cast once "
                "(utils.cast_for_autocast)", key)
        return

    cl = torch.channels_last
    half = YOLOv1(mcfg).to(device).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(dtype=amp_dtype, memory_format=cl)     # bf16 weights: no per-call weight casts at batch 1
    x1h, xbh = x1.to(amp_dtype).contiguous(memory_format=cl), xb.to(amp_dtype).contiguous(memory_format=cl)
    add("detector infer batch 1, fp32 eager", rate(lambda: model(x1), 1, cfg.infer_iters),
        f"{size}; forward only{' (tf32 on)' if device.type == 'cuda' else ''}", "infer_fp32_batch1_images_per_s")
    to_channels_last(model)   # NCHW images, as utils.predict feeds them
    add("detector infer batch 1, bf16 autocast channels_last", rate(lambda: autocast_fwd(model, x1), 1,
        cfg.infer_iters), "float32 weights cast by autocast on every call", "infer_autocast_batch1_images_per_s")
    add("detector infer batch 1, bf16 weights channels_last", rate(lambda: half(x1h), 1, cfg.infer_iters),
        "the arithmetic of evaluate.py / detect.py --amp, which cast the weights once (utils.cast_for_autocast)",
        "infer_bf16_batch1_images_per_s")
    if device.type == "cuda":
        run = cuda_graph_forward(half, x1h)
        add("detector infer batch 1, bf16 CUDA graph", rate(lambda: run(x1h), 1, cfg.infer_iters),
            "bf16 weights, one torch.cuda.CUDAGraph replay per image", "infer_cudagraph_batch1_images_per_s")
    add(f"detector infer batch {nb}, bf16 autocast channels_last", rate(lambda: autocast_fwd(model, xb), nb, iters_b),
        size, "infer_autocast_batch_images_per_s")
    add(f"detector infer batch {nb}, bf16 weights channels_last", rate(lambda: half(xbh), nb, iters_b), size,
        "infer_bf16_batch_images_per_s")
    layer_profile(report, section, half, xbh, device, iters_b)
    stem_forms(report, section, half.backbone.layers.conv1.conv, xbh, device, iters_b)
    out = trained_like_outputs(nb, mcfg.S, mcfg.B, mcfg.C, device)
    sizes = torch.tensor([[375.0, 500.0]], device=device).expand(nb, 2)
    sec = time_calls(lambda: decode_predictions(out, mcfg.B, mcfg.C, sizes), max(2, iters_b // 2), 1, device)
    kept = sum(len(r["scores"]) for r in decode_predictions(out, mcfg.B, mcfg.C, sizes)) / nb
    scores = out[..., 4 * mcfg.B:5 * mcfg.B].unsqueeze(-1) * out[..., 5 * mcfg.B:].unsqueeze(-2)
    cand = float((scores > 0.001).sum()) / nb
    report.add(section, "decode + NMS", 1000 * sec / nb, "ms/img",
               f"utils.decode_predictions, batch {nb}, trained-like outputs: {cand:.0f} candidates, {kept:.0f} kept "
               "per image", key="decode_nms_ms_per_image")


def part_infer_autotuned(report: Report, cfg: BenchConfig) -> None:
    """GPU only: batch-64 inference compiled with mode max-autotune (inductor benchmarks its own
    Triton kernels against cuDNN's for every layer, and replays a CUDA graph), the prepared model
    and autocast as in the compile section: whether the slow compile buys the batch-64 goal. Last,
    under its own time limit, since autotuning can take minutes."""
    device = torch.device(cfg.device)
    amp_dtype = autocast_dtype(device)
    model = YOLOv1(YoloConfig(image_size=cfg.det_size, width=cfg.det_width)).to(device).eval()
    prepared = prepare_for_inference(model, device, channels_last=True, amp=True)
    x = _inference_inputs(cfg, cfg.infer_batch, device)
    torch._dynamo.reset()
    net = torch.compile(prepared, mode="max-autotune", dynamic=False)

    def fwd() -> Tensor:
        with torch.autocast(device.type, dtype=amp_dtype):
            return net(x)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            fwd()
    sync(device)
    report.add("compile", f"detector infer batch {cfg.infer_batch}: compiling, max-autotune", time.perf_counter() - t0,
               "s", "")
    with torch.no_grad():
        sec = time_calls(fwd, max(3, cfg.infer_iters // 10), warmup=3, device=device)
    report.add("compile", f"detector infer batch {cfg.infer_batch}, compiled max-autotune", cfg.infer_batch / sec,
               "img/s", "torch.compile mode max-autotune under autocast, weights cast once",
               key="infer_compiled_autotune_batch_images_per_s")


def stem_forms(report: Report, section: str, stem: torch.nn.Conv2d, x: Tensor, device: torch.device,
               iters: int) -> None:
    """The stem convolution alone on batch ``x``, in its two forms (model.SpaceToDepthConv2d): the
    direct stride-2 convolution and :func:`model.space_to_depth_conv2d`, the input's rearrangement
    included, each with its TFLOP/s (the direct form's multiply-adds, as MFU counts them)."""
    w, b, pad = stem.weight, stem.bias, stem.padding[0]
    size = (x.shape[2] + 2 * pad - w.shape[2]) // 2 + 1
    flops = 2 * x.shape[0] * w.numel() * size * ((x.shape[3] + 2 * pad - w.shape[3]) // 2 + 1)
    used = "space-to-depth" if device.type in SPACE_TO_DEPTH_DEVICES else "direct"
    kind = f"{w.shape[2]}x{w.shape[3]}/2, {w.shape[1]} to {w.shape[0]} channels"
    for form, fn, key in (("direct", lambda: F.conv2d(x, w, b, 2, pad), "infer_stem_direct_ms"),
                          ("space-to-depth", lambda: space_to_depth_conv2d(x, w, b, pad),
                           "infer_stem_space_to_depth_ms")):
        with torch.no_grad():
            sec = time_calls(fn, iters, warmup=3, device=device)
        report.add(section, f"batch {x.shape[0]} stem alone, {form}", 1000 * sec, "ms",
                   f"{flops / sec / 1e12:.3g} TFLOP/s; {kind}, {x.dtype}"
                   f"{', the form the model runs here' if form == used else ''}", key=key)


def layer_profile(report: Report, section: str, model: torch.nn.Module, x: Tensor, device: torch.device,
                  iters: int, top: int = 6) -> None:
    """Where a forward pass spends its time: each conv block, pool and linear layer of ``model`` on
    batch ``x``, timed with CUDA events (on a CPU, the clock) recorded by forward hooks, averaged
    over ``iters`` passes; rows for the ``top`` slowest, with their share of the pass and their
    TFLOP/s (multiply-add = 2), and the sum over all layers."""
    from model import ConvBlock
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (ConvBlock, torch.nn.MaxPool2d,
                                                                        torch.nn.Linear))]
    marks: dict[str, list] = {n: [] for n, _ in layers}
    flops: dict[str, float] = {}

    def clock() -> Any:
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def pre(name: str) -> Callable:
        return lambda m, inp: marks[name].append([clock()])

    def post(name: str) -> Callable:
        def hook(m, inp, out):
            marks[name][-1].append(clock())
            if name not in flops:       # the shapes never change: counted on the first pass
                layer = m.conv if isinstance(m, ConvBlock) else m
                flops[name] = float(layer_flops(layer, out)) if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)) \
                    else 0.0
        return hook

    handles = [h for n, m in layers for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    try:
        with torch.no_grad():
            model(x)                               # warm-up, not timed
            for v in marks.values():
                v.clear()
            for _ in range(iters):
                model(x)
        sync(device)
    finally:
        for h in handles:
            h.remove()
    if device.type == "cuda":
        ms = {n: sum(a.elapsed_time(b) for a, b in v) / len(v) for n, v in marks.items()}
    else:
        ms = {n: 1000 * sum(b - a for a, b in v) / len(v) for n, v in marks.items()}
    total = sum(ms.values())
    for rank, name in enumerate(sorted(ms, key=ms.get, reverse=True)[:top], 1):
        tflops = flops[name] / (ms[name] / 1000) / 1e12 if ms[name] > 0 else 0.0
        report.add(section, f"batch {x.shape[0]} slowest layer {rank}: {name}", ms[name], "ms",
                   f"{100 * ms[name] / total:.1f}% of the layers' time, {tflops:.3g} TFLOP/s",
                   key=f"infer_slowest_layer_{rank}_ms")
    report.add(section, f"batch {x.shape[0]}: all {len(layers)} layers", total, "ms",
               "bf16 weights channels_last, eager, timed layer by layer (hooks)", key="infer_layers_total_ms")


# ----------------------------------------------------------------------------- section: eval

def part_voc_eval(report: Report, cfg: BenchConfig) -> None:
    from voc_eval import bench
    r = bench(num_images=cfg.eval_images)
    report.add("eval", f"VOC07 scoring, {r['num_images']} images", r["voc_eval_seconds"], "s",
               f"{r['num_detections']} detections, 20 classes, best of 3", key="voc_eval_seconds")


def part_annotations(report: Report, cfg: BenchConfig, ws: Workspace) -> None:
    from evaluate import bench_annotation_loading
    r = bench_annotation_loading(ws.root / "annotations", cfg.eval_images)
    note = f"{r['num_images']} files, {r['num_objects']} objects"
    report.add("eval", "annotation loading, parse every file", r["no_cache_seconds"], "s", note,
               key="annotation_loading_no_cache_seconds")
    report.add("eval", "annotation loading, filling the cache", r["cold_seconds"], "s", note,
               key="annotation_loading_cold_seconds")
    report.add("eval", "annotation loading, from the cache", r["warm_seconds"], "s", note + ", best of 3",
               key="annotation_loading_warm_seconds")


# ----------------------------------------------------------------------------- main

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: auto = CUDA when present)")
    p.add_argument("--only", default="", help=f"comma-separated sections to run, of {', '.join(SECTIONS)} "
                   "(default: all but compile; compile also needs --compile or --only compile)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd training and inference "
                   "(after every eager row; default: off)")
    p.add_argument("--json", default="", help="write the results here as JSON, rewritten after every row (default: none)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, ~30 s (CI; default: off)")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader processes in the end-to-end rows "
                   "(default: CPUs - 2 up to 16 on a GPU, 1 on a CPU)")
    p.add_argument("--det-batch", type=int, default=0, help="detector training batch (default: 64 on a GPU, 4 on a CPU)")
    p.add_argument("--cls-batch", type=int, default=0, help="classifier training batch (default: 64 on a GPU, the "
                   "pretraining recipe's; 8 on a CPU)")
    p.add_argument("--width", type=finite_float, default=0.0,
                   help="channel width of both networks (default: 1.0 on a GPU, "
                   "the paper's; on a CPU 0.125 for the detector, 0.25 for the classifier)")
    p.add_argument("--steps", type=int, default=0, help="timed training steps per on-device row (default: 20 on a GPU, 3 on a CPU)")
    p.add_argument("--no-amp", action="store_true", help="fp32 training on CUDA (default: bf16 autocast on CUDA, fp32 on a CPU)")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW memory format on CUDA (default: channels_last on CUDA)")
    p.add_argument("--time-budget", type=finite_float, default=0.0,
                   help="seconds after which remaining parts are skipped "
                   "(default: 420 on a GPU, none on a CPU)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    args.sections = only or [s for s in SECTIONS if s != "compile" or args.compile]
    if args.json and (Path(args.json).is_dir() or (blocker := not_a_folder(Path(args.json).parent))):
        p.error(f"--json {args.json}: {'a folder' if Path(args.json).is_dir() else f'{blocker} is a file'}")
    if args.json and Path(args.json).exists() and Path(args.json).suffix.lower() != ".json":
        p.error(f"--json {args.json} exists and is not a .json file: refusing to overwrite it")
    if min(args.steps, args.det_batch, args.cls_batch, args.time_budget) < 0 or args.workers < -1:
        p.error("--steps, --det-batch, --cls-batch and --time-budget must be >= 0 (0: the default), --workers >= -1")
    if args.width and not 0 < args.width <= 4:
        p.error(f"--width must be in (0, 4], got {args.width}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    device = parse_device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} was asked for but CUDA is not available")
        torch.cuda.set_device(device.index or 0)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        reuse_freed_memory()   # as the training scripts do on a CPU
    cfg = bench_config(device, args.smoke)
    overrides = {"workers": args.workers if args.workers >= 0 else None, "det_batch": args.det_batch or None,
                 "cls_batch": args.cls_batch or None, "det_width": args.width or None, "cls_width": args.width or None,
                 "steps": args.steps or None, "time_budget_s": args.time_budget or None}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_amp:
        cfg.amp = False
    if args.no_channels_last:
        cfg.channels_last = False
    warnings.filterwarnings("ignore", category=DeprecationWarning)   # torchvision 0.29's io deprecation notes

    report = Report(args.json, {"machine": machine_info(device), "config": asdict(cfg), "sections": args.sections})
    ws, peak = Workspace(cfg.files), Peak(cfg)
    parts: list[tuple[str, str, Callable[[], None], float]] = [
        ("pipeline", "detector", lambda: part_pipeline_detector(report, cfg, ws), 120),
        ("pipeline", "classifier", lambda: part_pipeline_classifier(report, cfg, ws), 90),
        ("peak", "matmul", lambda: part_peak(report, cfg, peak), 60),
        ("train", "detector", lambda: part_train_detector(report, cfg, ws, peak), 180),
        ("train", "classifier", lambda: part_train_classifier(report, cfg, ws, peak), 120),
        ("demo", "train step", lambda: part_demo_step(report, cfg), 120),
        ("infer", "detector", lambda: part_infer(report, cfg), 120),
        ("eval", "voc_eval", lambda: part_voc_eval(report, cfg), 90),
        ("eval", "annotations", lambda: part_annotations(report, cfg, ws), 120),
        ("compile", "train detector", lambda: part_train_detector(report, cfg, ws, peak, compiled=True), 240),
        ("compile", "infer detector", lambda: part_infer(report, cfg, compiled=True), 240),
        ("train", "--gpu-decode", lambda: part_gpu_decode(report, cfg, ws, peak), 150),
    ]
    if device.type == "cuda":   # minutes of autotuning on a CPU for a number no one needs there
        parts.append(("compile", "infer autotuned", lambda: part_infer_autotuned(report, cfg), 180))
    start = time.perf_counter()
    try:
        for section, part, fn, limit in parts:
            if section not in args.sections:
                continue
            left = cfg.time_budget_s - (time.perf_counter() - start)
            # a compile needs a minute or more; max-autotune took 169 s on an H200 (2026-11-27): its whole limit
            if left < (limit if part == "infer autotuned" else 90 if section == "compile" and device.type == "cuda"
                       else 5):
                report.add(section, f"{part}: skipped", None, "",
                           f"{max(left, 0):.0f} s of the {cfg.time_budget_s:.0f} s time budget left")
                continue
            run_part(report, section, part, fn, min(limit * (1 if device.type == "cuda" else 3), left))
    finally:
        ws.cleanup()
    report.complete = True
    report.add("total", "bench.py wall time", time.perf_counter() - start, "s", f"sections: {','.join(args.sections)}")
    print("\n" + report.table(), flush=True)
    if args.json:
        print(f"wrote {args.json}", flush=True)
    return {"rows": [asdict(r) for r in report.rows], "results": report.results}


if __name__ == "__main__":
    run_cli(main)
