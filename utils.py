"""Shared helpers: boxes, prediction decoding, checkpoints, seeding, distributed setup, logging.

Box conventions (stated once, here):

* Pixel boxes are ``xyxy`` in continuous 0-based pixel coordinates: pixel column i covers
  ``[i, i+1)``. A VOC box with 1-based inclusive corners ``(xmin, ymin, xmax, ymax)`` is
  ``(xmin - 1, ymin - 1, xmax, ymax)`` here, so width = ``xmax - xmin + 1`` in both.
* Normalised boxes are the same divided by image width / height (0..1).
* Cell boxes are ``(x, y, sqrt_w, sqrt_h)`` as the model predicts them (see model.py).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import errno
import fcntl
import functools
import json
import math
import os
import random
import secrets
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import batched_nms

from model import split_output


# ----------------------------------------------------------------------------- boxes

def box_iou_elementwise(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """IoU of corresponding boxes: ``a[..., 4]`` and ``b[..., 4]`` in ``xyxy``, broadcast together.

    The diagonal of ``torchvision.ops.box_iou`` without the N x M matrix (the loss needs one IoU
    per predictor, not all pairs). Degenerate boxes (x2 < x1) count as empty; returns 0 where
    the union is empty.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return inter / union.clamp(min=eps)


def cell_boxes_to_xyxy(boxes: Tensor, S: int) -> Tensor:
    """Cell boxes ``(..., S, S, B, 4)`` as ``(x, y, sqrt_w, sqrt_h)`` -> normalised ``xyxy``.

    Dims -4 and -3 are (row, col); x, y are offsets in the cell, so the centre is
    ``((col + x) / S, (row + y) / S)`` and the size is ``(sqrt_w ** 2, sqrt_h ** 2)``.
    """
    idx = torch.arange(S, device=boxes.device, dtype=boxes.dtype)
    cx = (boxes[..., 0] + idx.view(S, 1)) / S       # col index varies along dim -2 of (S, S, B)
    cy = (boxes[..., 1] + idx.view(S, 1, 1)) / S
    w, h = boxes[..., 2].square(), boxes[..., 3].square()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


@torch.no_grad()
def decode_predictions(out: Tensor, B: int, C: int, image_sizes: Tensor, conf_threshold: float = 0.001,
                       nms_iou: float = 0.5, max_det: int = 300) -> list[dict[str, Tensor]]:
    """Raw outputs ``(N, S, S, 5B+C)`` -> per image ``{"boxes": (K, 4), "scores": (K,), "labels": (K,)}``.

    Boxes are ``xyxy`` pixels of the original image (``image_sizes (N, 2)`` as ``(height, width)``),
    clipped to it. Each of the S*S*B boxes gets a class-specific score for every class,
    ``conf * Pr(class | object)`` (paper eq. 2; both factors clamped to [0, 1] since the outputs
    are linear), scores <= ``conf_threshold`` are dropped, then per-class NMS at ``nms_iou`` and the
    ``max_det`` best are kept (0: all), sorted by score.
    """
    N, S = out.shape[0], out.shape[1]
    boxes, conf, cls = split_output(out.float(), B, C)
    xyxy = cell_boxes_to_xyxy(boxes, S).reshape(N, -1, 4)                  # (N, S*S*B, 4) normalised
    scale = image_sizes.to(xyxy).flip(-1).repeat(1, 2).unsqueeze(1)        # (N, 1, 4) as w, h, w, h
    xyxy = torch.minimum((xyxy * scale).clamp(min=0), scale)
    scores = conf.clamp(0, 1).unsqueeze(-1) * cls.clamp(0, 1).unsqueeze(-2)  # (N, S, S, B, C)
    scores = scores.reshape(N, -1, C)                                      # (N, S*S*B, C)
    results = []
    for n in range(N):
        box_i, label = (scores[n] > conf_threshold).nonzero(as_tuple=True)
        b, s = xyxy[n, box_i], scores[n, box_i, label]
        nonempty = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])   # clipping can leave boxes of zero area
        b, s, label = b[nonempty], s[nonempty], label[nonempty]
        keep = batched_nms(b, s, label, nms_iou)[:max_det or None]
        results.append({"boxes": b[keep], "scores": s[keep], "labels": label[keep]})
    return results


@torch.no_grad()
def predict(model: torch.nn.Module, loader, B: int, C: int, device: torch.device, amp: bool = False,
            conf_threshold: float = 0.001, nms_iou: float = 0.5, max_det: int = 300,
            progress: bool = True) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Run a detector over a loader of ``(uint8 images, target, info)`` batches (dataset.py) and
    decode. Returns ``[(dataset index, boxes px xyxy (K, 4), scores (K,), labels (K,))]`` sorted by
    index, gathered from every process: with a :class:`ShardSampler` each image appears once."""
    from dataset import MEAN, STD, color_normalize   # dataset imports nothing of utils; kept local for clarity
    from tqdm import tqdm
    model.eval()
    preds = []
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    for batch in tqdm(loader, desc="predict", disable=not (progress and is_main), leave=False, dynamic_ncols=True):
        if batch is None:
            continue
        images, _, info = batch
        x = color_normalize(images.to(device, non_blocking=True), mean=MEAN, std=STD)
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=amp):
            out = model(x)
        results = decode_predictions(out.float(), B, C, info[:, 1:3].to(device), conf_threshold, nms_iou, max_det)
        for idx, r in zip(info[:, 0].long().tolist(), results):
            preds.append((idx, r["boxes"].cpu().double().numpy(), r["scores"].cpu().double().numpy(),
                          r["labels"].cpu().numpy()))
    preds = [p for part in all_gather_objects(preds) for p in part]
    preds.sort(key=lambda p: p[0])
    return preds


class StaticBatchCompiled(torch.nn.Module):
    """``module`` under ``torch.compile`` for inference at one batch size, for ``--compile`` in
    evaluate.py and detect.py. A smaller batch (a loader's last) is padded with zeros to
    ``batch_size`` and the padding's outputs dropped, so the model compiles once, and on a GPU
    (mode ``reduce-overhead``: CUDA graphs, one launch per batch) records one graph. The outputs
    are those of ``module`` up to the compiler's reordering of float sums."""

    def __init__(self, module: torch.nn.Module, batch_size: int, device: torch.device) -> None:
        super().__init__()
        self.module, self.batch_size = module, batch_size
        self.mode = "reduce-overhead" if device.type == "cuda" else "default"
        self._compiled = torch.compile(module, mode=self.mode, dynamic=False)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if n > self.batch_size:
            raise ValueError(f"a batch of {n} images, over the {self.batch_size} the model was compiled for")
        if n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        return self._compiled(x)[:n]


# ----------------------------------------------------------------------------- checkpoints

def not_a_folder(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists, when it is not a folder (so that nothing can
    be created under it); None when ``path`` can be made or is a folder already."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` atomically: to a temporary file in the same folder
    (:func:`partial_checkpoint_name`, created with the usual permissions under the umask), flushed
    to disk, then renamed over ``path``, and the rename itself synced to disk. A crash mid-write
    leaves the old file intact; :func:`remove_partial_checkpoints` clears what a killed process left
    behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_checkpoint_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError of its zip writer
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise OSError(f"{path}: could not write the checkpoint ({str(e).splitlines()[0][:200]}; {free / 2**20:.0f} "
                      f"MiB free on its disk); {'the previous one is intact' if path.exists() else 'nothing written'}"
                      ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):   # POSIX: the folder's entry, so that the rename survives a power cut
        try:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:   # the checkpoint is complete and in place; only the rename's durability is unsure
            warnings.warn(f"{path} is written, but its folder could not be synced ({e}): after a power cut the "
                          "previous file may be back")


PARTIAL_SUFFIX = ".tmp"


def partial_checkpoint_name(path: Path, pid: int | None = None) -> Path:
    """Where :func:`save_checkpoint` writes ``path`` before renaming it: ``.<name>.<pid>.<random>.tmp``
    beside it (``pid``: this process's by default)."""
    return path.parent / f".{path.name}.{os.getpid() if pid is None else pid}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def remove_partial_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`save_checkpoint` leaves in ``folder`` when its process
    is killed mid-write (a checkpoint's size each), except those of a process still running (a run
    sharing the folder); returns the deleted files. Call it when a run starts."""
    stale = []
    for p in sorted(Path(folder).glob(f".*.pt.*{PARTIAL_SUFFIX}")):
        pid = p.name.rsplit(".", 3)[-3]
        if pid.isdigit() and _process_running(int(pid)):
            continue
        p.unlink(missing_ok=True)
        stale.append(p)
    return stale


def _process_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    return True


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (never unpickles code); clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is an empty file (0 bytes)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        # torch's own text spans lines and suggests weights_only=False: keep only what names the cause
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(e).splitlines()
                 if not line.strip().startswith(boilerplate)]
        cause = next((line for line in lines if line), "").split(". ")[0].rstrip(".")   # its first sentence
        if len(cause) > 200:
            cause = cause[:200].rsplit(" ", 1)[0] + " ..."
        raise ValueError(f"cannot load checkpoint {path} safely (weights_only=True): {type(e).__name__}: {cause}. "
                         "It is corrupt, truncated, not a PyTorch checkpoint, or holds objects other than tensors "
                         "and plain Python data; it will not be loaded unsafely") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


SCRIPT_KEYS = {   # what each training script's checkpoints always hold
    "train_detector.py": ("model", "optimizer", "scheduler", "scaler", "state", "ema", "config", "model_config",
                          "class_names", "rng"),
    "pretrainer.py": ("model", "optimizer", "scheduler", "scaler", "state", "config", "model_config", "class_names",
                      "class_labels", "rng"),
}


def require_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike, script: str,
                       keys: tuple[str, ...] | None = None) -> None:
    """Raise ``ValueError`` naming ``path`` unless ``ckpt`` holds ``keys`` (default: all that
    ``script`` saves), saying which script's checkpoint it looks like when it is the other one's."""
    missing = [k for k in (keys or SCRIPT_KEYS[script]) if k not in ckpt]
    other = next((name for name, need in SCRIPT_KEYS.items() if name != script and all(k in ckpt for k in need)), None)
    if other:
        use = ("; use it with train_detector.py --backbone to start a detector from its backbone"
               if other == "pretrainer.py" else "")
        raise ValueError(f"checkpoint {path} is a {other} checkpoint, not a {script} one{use}")
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: it is not a complete {script} checkpoint")
    names = ckpt.get("class_names")
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"checkpoint {path}: its class_names are {names!r}, not a list of names")


def load_weights(module: torch.nn.Module, state: dict[str, Tensor], path: str | os.PathLike, what: str = "model") -> None:
    """``module.load_state_dict(state)`` (strict), with a mismatch reported as one ``ValueError``
    that names ``path`` and the first differing tensors."""
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: its {what} weights are a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = "\n  ".join(line.strip() for line in str(e).splitlines()[1:6] if line.strip())
        raise ValueError(f"checkpoint {path}: its {what} weights do not fit this model:\n  {detail}") from None


def gather_rng_states() -> dict[str, Any]:
    """The checkpoint's RNG entries: ``rng_ranks``, every process's :func:`rng_state` (one
    all-gather, so every process must call it), and ``rng``, rank 0's (what older code reads)."""
    rngs = all_gather_objects(rng_state())
    return {"rng": rngs[0], "rng_ranks": rngs}


def restore_training_state(ckpt: dict[str, Any], scaler: torch.amp.GradScaler, rank: int, world: int) -> None:
    """Resume's GradScaler and RNG part: the scaler's state unless it was saved empty (a run without
    fp16: CPU, bf16 GPU; the scaler then starts fresh), and this process's own RNG streams (dropout)
    when the checkpoint has them for the same number of processes. Otherwise rank 0 continues rank 0's
    streams and every other process reseeds from them and its rank, so that no two draw the same
    dropout masks."""
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    per_rank = ckpt.get("rng_ranks")
    if per_rank and len(per_rank) == world:
        set_rng_state(per_rank[rank])
        return
    set_rng_state(ckpt["rng"])
    if rank:
        seed_everything(int(torch.randint(0, 2**31, ()).item()) + rank)   # torch's seeds every CUDA device too


def check_config_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    """Raise ``ValueError`` naming every key in ``keys`` whose value differs between two configs."""
    diffs = [f"{k}: {saved.get(k)!r} in {source}, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"{source} was trained with an incompatible configuration:\n  " + "\n  ".join(diffs))


def rng_state() -> dict[str, Any]:
    """All RNG states (python, numpy, torch, CUDA) as plain data loadable with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(x: Any) -> Any:
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


# ----------------------------------------------------------------------------- runtime

def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def run_cli(main: Callable[[], Any]) -> Any:
    """Run a script's ``main()``. Bad input (a ``ValueError`` such as ``dataset.DataError``, a missing
    or misplaced file, any other ``OSError`` such as a full disk) and a training run that diverged
    (``FloatingPointError``, after ``--max-bad-steps``) end with one line, ``<script>: error:
    <message>``, and exit status 1 instead of a traceback; ``YOLO_TRACEBACK=1`` in the environment
    shows the traceback too."""
    try:
        return main()
    except (ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("YOLO_TRACEBACK"):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(1)


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, str]:
    """``{destination: its flags}`` for the flags ``argv`` gives (rather than leaving them at their
    defaults), e.g. ``{"augment": "--no-augment", "amp": "--amp/--no-amp"}``: ``parser`` (a fresh
    one; it is changed) parses ``argv`` again with every default suppressed. (Through ``_actions``:
    ``set_defaults(dest=SUPPRESS)`` would put the marker itself in the namespace.)"""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    names = {a.dest: "/".join(a.option_strings) for a in parser._actions}
    return {dest: names[dest] for dest in vars(parser.parse_args(argv))}


def resume_config(cfg: Any, saved: dict[str, Any], given: dict[str, str], may_change: tuple[str, ...],
                  command_only: tuple[str, ...], source: str) -> Any:
    """The config a resumed run continues with (``cfg`` a config dataclass, ``saved`` the one in the
    checkpoint, ``given`` what :func:`given_flags` found on the command line): every flag the command
    leaves out is the checkpoint's, so that ``--resume auto --out-dir RUN`` alone continues RUN as it
    was started (epochs, data folder and all). A flag the command gives with another value is taken
    if it is in ``may_change`` (epochs to train further, the data folder, device, workers, intervals,
    evaluation settings ...) and refused otherwise, naming both values (the optimizer state, the LR
    schedule, the data order and the step count fit only what they were made with). The flags in
    ``command_only`` (where to write, which task) always follow the command line."""
    changes, conflicts = {}, []
    for key, old in saved.items():
        if key in command_only or not hasattr(cfg, key) or _to_plain(getattr(cfg, key)) == _to_plain(old):
            continue
        if key not in given:
            changes[key] = old
        elif key not in may_change:
            conflicts.append(f"{given[key]}: {key}={getattr(cfg, key)} (the run's: {old})")
    if conflicts:
        raise ValueError(f"{source}: resuming with other training flags would not continue the run: "
                         f"{'; '.join(conflicts)}. Leave them out (the run's own values are used) or start a new run")
    return dataclasses.replace(cfg, **changes)


def run_folder_path(out_dir: str, resume: str, default: Path) -> Path:
    """A training run's folder: ``--out-dir``; else, resuming a checkpoint file, that file's folder;
    else ``default``, numbered (``-2``, ``-3`` ...) past taken folders (:meth:`RunFolder.taken`).
    Rank 0's choice for every process; a path under a file is a ``ValueError``, found before any
    work rather than when the first checkpoint is written."""
    path = Path(out_dir) if out_dir else Path(resume).parent if resume not in ("", "auto") else default
    if not out_dir and not resume:
        k = 2
        while RunFolder.taken(path):
            path, k = default.with_name(f"{default.name}-{k}"), k + 1
    path = Path(all_gather_objects(str(path))[0])
    if blocker := not_a_folder(path):
        raise ValueError(f"--out-dir {path}: {blocker} is a file, not a folder")
    return path


def load_resume(cfg: Any, out_dir: Path, script: str, keys: tuple[str, ...], parser: argparse.ArgumentParser,
                argv: list[str] | None, may_change: tuple[str, ...], command_only: tuple[str, ...]
                ) -> tuple[Path | None, dict[str, Any] | None, Any]:
    """``(checkpoint path, checkpoint, config)`` of a resumed run (``--resume auto``: the run folder's
    last.pt when there is one; ``--resume PATH``), checked to hold ``keys``, with the config the run
    continues with (:func:`resume_config`, ``parser`` and ``argv`` telling which flags were given);
    ``(None, None, cfg)`` for a fresh run. A run that has trained ``cfg.epochs`` already is a
    ``ValueError``: there is nothing to do."""
    path = out_dir / "last.pt" if cfg.resume == "auto" else Path(cfg.resume) if cfg.resume else None
    if path is None or (cfg.resume == "auto" and not path.exists()):
        return None, None, cfg
    ckpt = load_checkpoint(path)
    require_checkpoint(ckpt, path, script, keys)
    cfg = resume_config(cfg, ckpt.get("config") or {}, given_flags(parser, argv), may_change, command_only, str(path))
    if ckpt["state"]["epoch"] >= cfg.epochs:
        raise ValueError(f"{path} has trained {ckpt['state']['epoch']} epochs already: nothing to do at --epochs "
                         f"{cfg.epochs}; give more epochs to train it further")
    return path, ckpt, cfg


class RunFolder:
    """A run folder held by this process: created (a folder that cannot be written is found before
    any work), refused when it already holds a run's checkpoints and this is not a resume (a fresh
    run would overwrite them) or, for a fresh run, other files and no run (a folder of the user's,
    whose config.json or metrics.json it would overwrite), and locked while the process lives: a second run started in it is
    refused, where the two would take turns writing its checkpoints. The lock is a POSIX record lock
    (``lockf`` on ``.lock``): it belongs to this process, not to the loader workers it forks, and the
    OS drops it the moment the process ends, killed or not. (Within one process it does not exclude:
    a notebook may call ``main`` again after a failed run.)"""

    def __init__(self, path: Path, resume_from: Path | None = None):
        self.path = path
        if resume_from is None and path.is_dir() and not any((path / n).exists() for n in (LOCK_NAME, "last.pt",
                                                                                          "best.pt")):
            others = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            if others:   # a folder of the user's own (its config.json, metrics.json would be overwritten)
                raise ValueError(f"--out-dir {path} holds files and no run (e.g. {others[0]}): give a new or empty "
                                 "folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock = open(path / LOCK_NAME, "a+")
        except OSError as e:
            raise OSError(f"--out-dir {path}: cannot write there ({e.strerror or e})") from None
        try:
            locked = _try_lock(self._lock)
        except OSError as e:    # a file system without locks (some network ones)
            warnings.warn(f"--out-dir {path}: cannot lock it ({e.strerror or e}); a second run started in it "
                          "would not be refused")
            locked = True
        if not locked:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self._lock.close()
            raise ValueError(f"--out-dir {path} is in use by another run (process {holder}); wait for it to "
                             "end or give another --out-dir")
        held = [name for name in ("last.pt", "best.pt") if (path / name).exists()]
        problem = None
        if held and resume_from is None:
            advice = ("continue it with --resume auto" if "last.pt" in held else
                      f"there is no last.pt to resume; continue from the best epoch with --resume {path / 'best.pt'}")
            problem = f"holds a run ({', '.join(held)}), which a fresh run would overwrite: {advice}"
        elif held and not _same_file(resume_from.parent, path):
            problem = (f"holds another run ({', '.join(held)}) than {resume_from}, which continuing that one there "
                       "would overwrite")
        elif "last.pt" in held and not _same_file(resume_from, path / "last.pt"):
            problem = (f"holds last.pt, which continuing {resume_from.name} there would overwrite (it may be epochs "
                       f"ahead): resume last.pt with --resume auto, or continue {resume_from.name} in another "
                       "--out-dir")
        if problem:
            self.release()
            raise ValueError(f"--out-dir {path} {problem}" + ("" if problem.endswith("--out-dir") else
                                                               ", or give another --out-dir"))
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()

    @staticmethod
    def taken(path: Path) -> bool:
        """Whether a default run folder is taken: it holds a run's checkpoints, a run holds it now, or
        it holds files and never held a run (a folder left by a start that failed before its first
        checkpoint is free)."""
        if (path / "last.pt").exists() or (path / "best.pt").exists():
            return True
        if path.is_dir() and not (path / LOCK_NAME).exists():
            return any(not p.name.startswith(".") for p in path.iterdir())
        try:
            with open(path / LOCK_NAME, "a") as f:
                return not _try_lock(f)          # (a lock taken here is dropped again when f closes)
        except OSError:                          # no lock file, or a lock-less file system: free
            return False

    def release(self) -> None:
        self._lock.close()     # closing the file drops the lock


LOCK_NAME = ".lock"


def _try_lock(f) -> bool:
    """Take the POSIX record lock on the open file ``f`` without waiting: True if taken, False if
    another process holds it; other ``OSError`` (a file system without locks) propagate."""
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def finite_float(text: str) -> float:
    """argparse ``type`` for float flags: NaN and infinities are refused when the flags are read,
    not found mid-run (an infinite LR, a NaN loss weight)."""
    value = float(text)            # a ValueError: argparse's "invalid finite_float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def check_batch_norm_batch(build: Callable[[], torch.nn.Module], image_size: int, per_process: int) -> int:
    """The smallest batch per process that the model ``build()`` makes can train on: 2 where a
    BatchNorm layer would see a single value per channel at batch 1 (a 1x1 map), which it cannot
    normalise, else 1; found by a forward pass on the ``meta`` device (shapes only, no memory, no
    arithmetic). A ``per_process`` below it is a ``ValueError`` naming the flags, at start instead of
    at the first step; the training loops skip (and count) a batch that unreadable images left
    smaller than it."""
    with torch.device("meta"):
        model = build().train()
    try:
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    except ValueError as e:
        if "value per channel" not in str(e):
            raise
        if per_process < 2:
            raise ValueError(f"--batch-size gives {per_process} image per process, and at --image-size {image_size} "
                             f"BatchNorm then sees one value per channel ({e}): give a larger --batch-size or "
                             "--image-size") from None
        return 2
    return 1


def parse_device(device_arg: str) -> torch.device:
    """``--device``: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; anything else is a
    ``ValueError`` naming the flag."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device_arg!r}")
    return device


def setup_distributed(device_arg: str) -> tuple[int, int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun (``WORLD_SIZE`` set).

    Returns ``(rank, world_size, local_rank, device)``. NCCL on CUDA, gloo on CPU. Without
    torchrun: rank 0 of 1 on ``device_arg`` ("auto" picks CUDA when present).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = parse_device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available")
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        host_group()            # made now, by every process at the same point
    return rank, world, local_rank, device


def host_group() -> Any:
    """A gloo process group over all processes, for the few numbers the host itself decides on
    each step (unreadable-image counts, stop requests). Under NCCL those would go through the GPU
    queue, and reading the result back would wait for every kernel queued before it. None without
    torchrun."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return _gloo_group()


@functools.cache
def _gloo_group() -> Any:
    return dist.new_group(backend="gloo")    # also under gloo, so that CPU runs test this very path


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _gloo_group.cache_clear()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every process (a one-element list without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device supports it (CPU, Ampere+ GPUs), else fp16 (needs a GradScaler)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast makes
    training faster; elsewhere it is emulated and slower than float32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MB for reuse rather than give each back
    to the OS (``mallopt`` M_MMAP_THRESHOLD 32 MB, M_TRIM_THRESHOLD 256 MB). Returns False, changing
    nothing, where the C library has no ``mallopt`` (not glibc).

    Why: PyTorch's CPU tensors come from malloc, and by default glibc serves a large block with
    fresh ``mmap`` pages and unmaps it when freed, so every training step page-faults its
    activations in again. On the 2-core dev CPU this made the demo's colour augmentation of a
    16x3x224x224 batch take 11.2 ms instead of 3.9, and the demo training ran at 208 images/s
    instead of 228 (docs/MEASUREMENTS.md). The price: the process keeps its peak heap."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):     # no C library handle (e.g. Windows)
        return False
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


def to_channels_last(model: torch.nn.Module, min_channels: int | None = None) -> torch.nn.Module:
    """Put ``model``'s parameters and buffers in channels_last memory format (faster convolutions
    with cuDNN and oneDNN), except a narrow stem where that is faster: the leading convolutions
    with fewer than ``min_channels`` filters keep NCHW weights. Feed the model NCHW images: a
    convolution's output is channels_last when its input or its weight is, so the stem's
    activations stay NCHW and the first wide convolution turns them into channels_last.
    ``min_channels=None`` picks it for the device the model is on (:func:`keeps_narrow_stem_nchw`):
    16, or 0 (everything channels_last) on a CPU without AMX. Models whose first convolution is
    wide (the paper's 64 filters) are converted whole either way."""
    if min_channels is None:
        device = next(model.parameters()).device
        min_channels = 16 if keeps_narrow_stem_nchw(device) else 0
    model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            if m.out_channels >= min_channels:
                break
            m.weight.data = m.weight.data.contiguous()
    return model


def prepare_for_inference(model: torch.nn.Module, device: torch.device, channels_last: bool = False,
                          amp: bool = False, compile_batch: int = 0) -> torch.nn.Module:
    """``model`` on ``device`` the way evaluate.py and detect.py run it: ``--channels-last``
    (:func:`to_channels_last`), ``--amp`` (:func:`cast_for_autocast`; call it under autocast), and
    ``--compile`` at batch ``compile_batch`` (:class:`StaticBatchCompiled`; 0: eager)."""
    model = model.to(device)
    if channels_last:
        to_channels_last(model)
    if amp:   # the weights autocast casts, cast once: the same outputs without a cast per batch
        cast_for_autocast(model, autocast_dtype(device))
    return StaticBatchCompiled(model, compile_batch, device) if compile_batch else model


def cast_for_autocast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the weights of ``model``'s convolutions and linear layers to ``dtype`` once, for
    inference under ``torch.autocast(dtype=dtype)``, which would otherwise cast them on every call
    (for the paper's 271M weights, 1.6 GB of memory traffic per batch) to the same values: the
    outputs are unchanged (a test checks them bit for bit). BatchNorm, which autocast does not cast,
    keeps its float32 parameters. For evaluate.py and detect.py with ``--amp``; not for training,
    whose optimizer needs the float32 weights."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.to(dtype)
    return model


def keeps_narrow_stem_nchw(device: torch.device) -> bool:
    """Whether :func:`to_channels_last` leaves a stem of fewer than 16 filters in NCHW on ``device``:
    everywhere but on a CPU without AMX units.

    Why (bench.py's ``demo`` section, the demo model's bf16 training step, whose first two convs
    have 8 and 16 filters): BatchNorm's channels_last kernels vectorise over channels and crawl
    with fewer channels than a SIMD vector holds (the backward pass of a bf16 (16, 8, 112, 112)
    BatchNorm: 13 ms in channels_last, 1.7 ms in NCHW on a Xeon with AMX; 12.5 ms more on an AMD
    EPYC). On the Xeon with AMX the NCHW stem made the step 1.14x faster (2026-11-26). On the AMD
    EPYC (AVX-512 with BF16, no AMX) the 3-to-8-filter 7x7 convolution is what crawls in NCHW
    (fwd + bwd 29 ms against 11), and channels_last everywhere made the step 1.2-1.3x faster
    (2026-11-27). GPUs keep the NCHW stem: on an H200 the demo step ran at 1,031 img/s with it and 961
    with everything channels_last (direct stem), 801 against 837 with the space-to-depth stem on a
    slower host (2026-11-27): host-bound either way, within a few per cent."""
    return device.type != "cpu" or bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


class ModelEMA:
    """Exponential moving average of a model's weights (and BatchNorm statistics) for evaluation.

    After each optimizer step, :meth:`update` moves every floating-point tensor of the copy toward
    the training model's: ``ema = d * ema + (1 - d) * model``. The decay ramps up as
    ``d = decay * (1 - exp(-updates / ramp))``, so the copy follows the fast-changing early weights
    closely and averages over about ``1 / (1 - decay)`` steps later on. Integer buffers
    (``num_batches_tracked``) are copied. ``source`` is the plain model (not a DDP or compiled
    wrapper); ``module`` is the averaged copy, always in eval mode and without gradients.
    """

    def __init__(self, source: torch.nn.Module, decay: float, ramp: float = 500.0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.source, self.decay, self.ramp = source, decay, ramp
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        # Matching tensors of the copy and the source, paired once (both walk in the same order). The
        # pairs stay valid under in-place changes (optimizer steps, load_state_dict); build the
        # average after the model is on its device and in its memory format.
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()],
                         [*source.parameters(), *source.buffers()]))
        self._floats = ([e for e, _ in pairs if e.is_floating_point()],
                        [m for e, m in pairs if e.is_floating_point()])
        self._others = [(e, m) for e, m in pairs if not e.is_floating_point()]
        device = pairs[0][0].device if pairs else torch.device("cpu")
        self._updates = torch.zeros((), dtype=torch.float64, device=device)   # on the device: see update()

    @property
    def updates(self) -> int:
        """Optimizer steps averaged in so far (a host read)."""
        return int(self._updates.item())

    @torch.no_grad()
    def update(self, stepped: Tensor | None = None) -> None:
        """Average in the source's current weights. ``stepped`` (a 0-dim bool tensor, from
        :func:`step_if_finite`) makes the update conditional on the optimizer having stepped: the
        count and the weights then move only where it is true. The decision stays on the device,
        like the step's own, so that training never waits for a host read."""
        w = torch.ones_like(self._updates) if stepped is None else stepped.to(self._updates.dtype)
        self._updates += w
        d = self.decay * (1.0 - torch.exp(-self._updates / self.ramp))      # float64, as the host would
        if self._floats[0]:
            weight = ((1.0 - d) * w).float()                                  # 0 where not stepped: no change
            torch._foreach_lerp_(*self._floats, [weight.to(e.dtype) for e in self._floats[0]])
        for e, m in self._others:
            e.copy_(m if stepped is None else torch.where(stepped, m, e))

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "ramp": self.ramp}

    @staticmethod
    def check_state(state, source: str | os.PathLike, keys: tuple[str, ...] = ("module", "updates")) -> None:
        """``ValueError`` naming ``source`` unless ``state`` (a checkpoint's 'ema' entry) is a dict
        holding ``keys`` (to load only the averaged weights, ``("module",)`` is enough)."""
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ValueError(f"checkpoint {source}: its 'ema' entry is not a weight average's state "
                             f"(a dict with {' and '.join(repr(k) for k in keys)})")

    def load_state_dict(self, state: dict, source: str | os.PathLike = "checkpoint") -> None:
        """The inverse of :meth:`state_dict`; a state that does not fit is one ``ValueError``
        naming ``source`` (the checkpoint file)."""
        self.check_state(state, source)
        load_weights(self.module, state["module"], source, "weight-average")
        self._updates.fill_(int(state["updates"]))


def print_problems(problems: list[tuple[str, str]], show_all: bool, limit: int = 20) -> None:
    """Print ``(where, why)`` data problems, indented; the first ``limit`` unless ``show_all``
    (--check-data lists them all)."""
    for where, why in problems[: None if show_all else limit]:
        print(f"  {where}: {why}")
    if len(problems) > limit and not show_all:
        print(f"  ... and {len(problems) - limit} more (--check-data lists them all)")


def record_bad_step(state: dict, step: int, detail: str, max_bad_steps: int, is_main: bool, writer=None) -> None:
    """The bookkeeping of a non-finite step, one for both training loops: counted in ``state``
    (``bad_steps`` in a row, ``skipped_steps`` in all), printed on the main process and logged
    (``writer``, the main process's), and ``FloatingPointError`` once ``max_bad_steps`` come in a
    row. ``detail`` names the step's loss and gradient norm."""
    from tqdm import tqdm
    state["bad_steps"] += 1
    state["skipped_steps"] += 1
    if is_main:
        tqdm.write(f"non-finite loss or gradient at step {step}: {detail}; step skipped "
                   f"({state['skipped_steps']} so far)")
    if writer:
        writer.add_scalar("train/skipped_steps", state["skipped_steps"], step)
    if state["bad_steps"] >= max_bad_steps:
        raise FloatingPointError(f"{state['bad_steps']} consecutive non-finite steps (--max-bad-steps); last "
                                 f"{detail}. The last good checkpoint is intact.")


def skip_short_batch(n: int, per_proc: int, min_images: int, state: dict, is_main: bool) -> bool:
    """The bookkeeping of a batch that unreadable images left short, one for both training loops:
    ``n`` of the process's ``per_proc`` images were read (collate_skip_none dropped the others),
    counted over all processes (one all-reduce) in ``state["skipped_images"]``. True when a process
    was left with under ``min_images`` (none, or one where BatchNorm needs two): every process then
    skips the step (DDP needs all of them in each backward), which still counts, so that the LR
    schedule and a resume stay aligned."""
    from tqdm import tqdm
    dropped, short = sum_over_ranks([per_proc - n, float(n < min_images)])
    state["skipped_images"] += int(dropped)
    if short and is_main:
        left = "no readable image" if min_images == 1 else "under 2 readable images (BatchNorm needs 2 here)"
        tqdm.write(f"step {state['step'] + 1}: {left} left in a process's batch (see the warnings above); step "
                   f"skipped by every process ({state['skipped_images']} images skipped so far)")
    return bool(short)


def check_epoch_trained(state: dict, epoch: int, sums_complete: bool = True) -> None:
    """``ValueError`` when epoch ``epoch`` (0-based) ended without a step that trained: its sums
    (``state["epoch_meter"]``, the same on every process) counted no image. ``sums_complete=False``
    for an epoch resumed from an older checkpoint that did not save them, whose earlier steps may
    have trained."""
    if sums_complete and not state["epoch_meter"]["images"]:
        raise ValueError(f"epoch {epoch + 1}: no training step ran, every batch being short of readable images "
                         "(the warnings above name them); check the data with --check-data")


def format_loss(terms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if math.isfinite(v) else f"{k}={v}" for k, v in terms.items())


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def write_json(path: str | Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` as strict JSON, whole or not at all (a temporary file renamed over ``path``);
    NaN (the AP of a class without ground truth, say) becomes null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(_nan_to_none(summary), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)      # whole or not at all
    finally:
        tmp.unlink(missing_ok=True)


def run_position(state: dict, epochs: int) -> str:
    """Where a training run stands, for its stop and resume messages, counting epochs from 1 as the
    progress bars do: ``state["epoch"]`` is the 0-based epoch under way (or next), ``state["step_in_epoch"]``
    the steps of it done, ``state["step"]`` the steps done in all."""
    e, k, step = state["epoch"], state["step_in_epoch"], state["step"]
    if k:
        return f"epoch {e + 1}/{epochs}, {k} steps into it (step {step})"
    return f"the end of epoch {e}/{epochs} (step {step})" if e else f"the start (step {step})"


class ShardSampler(torch.utils.data.Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample on exactly one process, none repeated.

    For evaluation: DistributedSampler pads the last shard with repeated samples, which would
    count some images twice in a metric.
    """

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (also for one process) that can start mid-epoch.

    The order of an epoch depends only on (seed, epoch), as in DistributedSampler; ``start``
    samples of this process's share are skipped, so a run resumed after ``k`` steps of an epoch
    sees exactly the batches an uninterrupted run would have seen next.
    """

    def __init__(self, dataset, world: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=world > 1)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class GracefulStop:
    """SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) set a flag instead of killing the process;
    the training loop checks :meth:`requested` at each step boundary, saves a checkpoint and exits.

    Under torchrun the flag is OR-reduced over all processes, so every rank stops at the same step.
    A second SIGINT while stopping raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> bool:
        flag = self.signum is not None
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([float(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())   # on the host: no GPU wait
            flag = bool(t.item())
            if flag and self.signum is None:
                self.signum = signal.SIGTERM
        return flag

    @property
    def exit_code(self) -> int:
        return 130 if self.signum == signal.SIGINT else 0

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def min_over_ranks(t: Tensor) -> Tensor:
    """``t`` replaced, in place, by its element-wise minimum over all processes (itself without
    torchrun), so that all processes take the same branch, e.g. skipping a step whose loss is NaN
    on one of them. Nothing is read back: under NCCL the all-reduce is queued on the GPU behind the
    step that computed ``t``, and the host goes on."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def step_if_finite(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: Tensor,
                   params: list[Tensor], clip_grad: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """The update after ``scaler.scale(loss).backward()``: unscale the gradients, clip their norm
    to ``clip_grad`` (0: no clipping), and step the optimizer only if the loss (on every process:
    gradients are all-reduced, losses are not) and the gradient norm are finite.

    The decision is made on the device, so that the host never waits for the GPU within a step:
    the fused optimizers of :func:`make_optimizer` take it as the ``found_inf`` tensor of
    GradScaler's protocol (a skipped step leaves weights, moments and step counts as they were);
    any other optimizer costs one host read. Returns 0-dim device tensors ``(grad_norm, finite,
    stepped)``: ``stepped``, the optimizer changed the weights; ``finite``, not a bad step. With
    fp16 the GradScaler lowers its scale after an overflow; with a finite loss that is its
    routine, so such a step is finite but not stepped.
    """
    scaler.unscale_(optimizer)                         # no-op without fp16
    grads = [p.grad for p in params if p.grad is not None]
    gnorm = torch.nn.utils.get_total_norm(grads).float()
    if clip_grad > 0:                                  # (clip_grad_norm_ with an infinite limit would
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, gnorm)  # still rewrite every gradient)
    loss_ok = min_over_ranks(torch.isfinite(loss.detach()).float().reshape(1)).reshape(()).bool()
    stepped = loss_ok & torch.isfinite(gnorm)
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, (~stepped).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif stepped.item():
        optimizer.step()
    if scaler.is_enabled():
        scaler.update()                                # from the overflow check that unscale_ made
    return gnorm, (loss_ok if scaler.is_enabled() else stepped), stepped


@torch.no_grad()
def restore_unless(keep: Tensor, tensors: list[Tensor], saved: list[Tensor]) -> None:
    """Put each of ``tensors`` back to its ``saved`` copy unless ``keep`` (a 0-dim bool tensor),
    decided on the device (e.g. the BatchNorm statistics of a step that was not finite)."""
    for t, s in zip(tensors, saved):
        t.copy_(torch.where(keep, t, s))


def step_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """Advance a per-step LR schedule by one step, taken or skipped (the schedule follows steps, so
    that a resume lands on the same value); returns the LR that step used. A skipped first step
    (an optimizer that never ran) would make torch warn about the call order: not a problem here."""
    lr = scheduler.get_last_lr()[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        scheduler.step()
    return lr


def sum_over_ranks(values: list[float]) -> list[float]:
    """Host numbers ``values`` summed element-wise over all processes (one all-reduce on the
    :func:`host_group`, which never waits for a GPU; themselves without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=host_group())
    return t.tolist()


def start_host_read(t: Tensor) -> Callable[[], list]:
    """Queue a copy of the small device tensor ``t`` to (pinned) host memory and return a function
    that waits for that copy alone and gives ``t.tolist()``. Called at the end of a step and read
    after the next step is queued, the host then waits only for the step it reads, never for the
    queue to drain (a plain ``.tolist()`` of a CUDA tensor waits for everything queued before it)."""
    if t.device.type != "cuda":
        return t.tolist
    host = t.to("cpu", non_blocking=True)                # torch allocates it pinned for a non-blocking copy
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))     # the stream the copy went on

    def read() -> list:
        done.synchronize()
        return host.tolist()
    return read


def make_optimizer(model: torch.nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW (beta1 = ``momentum``), with weight decay on weights only (biases
    and BatchNorm parameters, the tensors of at most one dimension, get none); fused (one kernel
    over all tensors) on CUDA and CPU."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = True if device.type in ("cuda", "cpu") else None
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
        if fused and momentum:
            # A fused SGD makes its momentum buffers with empty_like on its first step and fills them
            # in the kernel, so a first step skipped through found_inf (see step_if_finite; also
            # GradScaler's fp16 overflow) would leave garbage in them. Zeros give the same first step
            # (buffer = momentum * 0 + grad) and nothing to leave uninitialised.
            for p in decay + no_decay:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt
    if name == "adam":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=fused)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")
