"""ILSVRC2012 (ImageNet-1k) classification data on its real on-disk layouts.

Layouts read (``--data-root`` may be the folder holding ``train/`` and ``val/``, or the Kaggle
download's top folder holding ``ILSVRC/Data/CLS-LOC/{train,val}``):

* ``train/<wnid>/*.JPEG``: one folder per class (torchvision ``ImageFolder``).
* ``val/<wnid>/*.JPEG``: the same, or
* ``val/ILSVRC2012_val_XXXXXXXX.JPEG``: the official flat folder, labelled by either
  - the Kaggle ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token of the
    prediction string is the wnid), found beside the data or given with ``val_solution``, or
  - the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (line i holds the 1-based
    ILSVRC2012_ID of ``ILSVRC2012_val_<i:08d>``) plus a *synsets file*: one wnid per line, line k
    being ILSVRC2012_ID k (the order of the devkit's ``meta.mat``, which is NOT sorted order),
    so that no MATLAB file has to be read here.

Conventions (stated once, here): class index = position of the wnid in the sorted list of the
``train/`` class folders (``ImageFolder``'s order); ``class_labels`` are the human-readable names
from ``LOC_synset_mapping.txt`` (``<wnid> <names>`` per line) when present, else the wnids.
Items are ``(image, label, info)``: ``image`` uint8 ``(3, size, size)`` (normalisation and colour
jitter happen batched on the device with :func:`dataset.color_normalize`), ``label`` the class
index and ``info`` float64 ``(3,)`` = ``(index, exposure, saturation)``. Augmentation draws come
from ``numpy.random.default_rng([seed, epoch, index])``, so they do not depend on workers,
processes or resumes.
"""
from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from dataset import (IMAGE_SKIPPED, DataError, decode_encoded, decode_on_device_batch, read_encoded, read_image,
                     warp_image)
from voc_eval import read_text

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".webp")
KAGGLE_SUBDIR = Path("ILSVRC") / "Data" / "CLS-LOC"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
DEVKIT_GT = Path("ILSVRC2012_devkit_t12") / "data" / "ILSVRC2012_validation_ground_truth.txt"
EVAL_RESIZE_RATIO = 256 / 224   # evaluation: resize the shorter side to 256, centre-crop 224


# ----------------------------------------------------------------------------- layout

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _check_safe_name(name: str, where: str) -> None:
    """Names from label files become file and folder names: refuse anything that could escape."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise DataError(f"{where}: unsafe name {name!r} refused (no path separators, no leading dot)")


def resolve_imagenet_root(data_root: str | Path, split: str = "train") -> Path:
    """The folder holding ``train/`` and ``val/``: ``data_root`` itself or, for the Kaggle
    download, ``data_root/ILSVRC/Data/CLS-LOC``. :class:`DataError` when neither has ``split/``."""
    root = Path(data_root)
    for cand in (root, root / KAGGLE_SUBDIR):
        if (cand / split).is_dir():
            return cand
    raise DataError(f"--data-root {root}: no {split}/ folder there nor in {root / KAGGLE_SUBDIR} "
                    f"(expected {split}/<wnid>/*.JPEG{' or a flat val/' if split == 'val' else ''})")


def find_metadata(name: str | Path, data_root: str | Path, image_root: str | Path) -> Path | None:
    """``name`` in ``data_root`` or ``image_root`` (where downloads put the devkit files), or None."""
    for folder in dict.fromkeys((Path(data_root), Path(image_root))):
        if (folder / name).is_file():
            return folder / name
    return None


def class_folder_names(split_dir: str | Path) -> list[str]:
    """The class folders of ``split_dir``, sorted (hidden entries and files ignored);
    :class:`DataError` for a broken symbolic link where a class folder is expected."""
    with os.scandir(split_dir) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    for e in entries:   # a class folder behind a broken link would silently become a missing class
        if e.is_symlink() and not os.path.exists(e.path):
            raise DataError(f"{e.path}: a broken symbolic link (to {os.readlink(e.path)}) where a class folder "
                            "is expected; fix or remove it")
    return sorted(e.name for e in entries if e.is_dir())


def scan_class_folders(split_dir: str | Path, allow_empty: bool = False) -> dict[str, list[Path]]:
    """``split_dir/<class>/<image>`` -> ``{class: sorted image paths}`` for every class folder.
    Hidden entries and non-image files are ignored; an empty class folder is a :class:`DataError`
    unless ``allow_empty``."""
    split_dir = Path(split_dir)
    out: dict[str, list[Path]] = {}
    for name in class_folder_names(split_dir):
        with os.scandir(split_dir / name) as it:   # a broken link to an image is listed: training skips and counts it
            files = sorted(e.name for e in it if _is_image(e.name) and (e.is_file() or e.is_symlink()))
        if not files and not allow_empty:
            raise DataError(f"{split_dir / name}: class folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        out[name] = [split_dir / name / f for f in files]
    return out


def loose_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (not in sub-folders), sorted by name."""
    with os.scandir(folder) as it:
        return sorted(Path(folder) / e.name for e in it if _is_image(e.name) and (e.is_file() or e.is_symlink()))


# ----------------------------------------------------------------------------- label files

def read_synset_mapping(path: str | Path) -> dict[str, str]:
    """``LOC_synset_mapping.txt`` (``<wnid> <comma-separated names>`` per line) -> ``{wnid: names}``."""
    path = Path(path)
    out: dict[str, str] = {}
    for line_no, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, names = line.strip().partition(" ")
        if wnid in out:
            raise DataError(f"{path}:{line_no}: wnid {wnid} listed twice")
        out[wnid] = names.strip() or wnid
    return out


def read_val_solution(path: str | Path) -> dict[str, str]:
    """Kaggle ``LOC_val_solution.csv`` -> ``{image id: wnid}``.

    Columns ``ImageId,PredictionString``; the prediction string is ``<wnid> xmin ymin xmax ymax``
    repeated once per box, every box of an image carrying the image's class. Rows whose boxes
    disagree on the class, repeated ids and a missing header are :class:`DataError` naming the line.
    """
    path = Path(path)
    out: dict[str, str] = {}
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise DataError(f"{path}: expected the header 'ImageId,PredictionString', got {header}")
    for line_no, row in enumerate(reader, 2):
        if not row:
            continue
        if len(row) < 2 or not row[1].split():
            raise DataError(f"{path}:{line_no}: expected 'ImageId,<wnid> xmin ymin xmax ymax ...', got {row}")
        image_id, tokens = row[0].strip(), row[1].split()
        wnids = set(tokens[0::5])
        if len(wnids) != 1:
            raise DataError(f"{path}:{line_no}: boxes of {image_id} name several classes {sorted(wnids)}")
        if image_id in out:
            raise DataError(f"{path}:{line_no}: image {image_id} listed twice")
        _check_safe_name(image_id, f"{path}:{line_no}")
        out[image_id] = wnids.pop()
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def _lines(path: Path) -> list[str]:
    """The lines of a text file without trailing blank lines (line numbers carry meaning here)."""
    lines = read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_devkit_ground_truth(gt_path: str | Path, synsets_path: str | Path) -> dict[str, str]:
    """Devkit ``ILSVRC2012_validation_ground_truth.txt`` + synsets file -> ``{image id: wnid}``.

    Line i (1-based) of the ground truth is the ILSVRC2012_ID of ``ILSVRC2012_val_<i:08d>``.
    Line k of the synsets file holds the wnid of ILSVRC2012_ID k as its first token (more tokens,
    such as names, are ignored). Blank lines, IDs out of range and non-numbers are
    :class:`DataError` naming the file and line.
    """
    gt_path, synsets_path = Path(gt_path), Path(synsets_path)
    synsets = []
    for line_no, line in enumerate(_lines(synsets_path), 1):
        if not line.strip():
            raise DataError(f"{synsets_path}:{line_no}: blank line (line k must hold the wnid of ILSVRC2012_ID k)")
        synsets.append(line.split()[0])
    if len(set(synsets)) != len(synsets):
        raise DataError(f"{synsets_path}: a wnid is listed twice")
    out: dict[str, str] = {}
    for line_no, line in enumerate(_lines(gt_path), 1):
        try:
            k = int(line)
        except ValueError:
            raise DataError(f"{gt_path}:{line_no}: {line.strip()!r} is not an ILSVRC2012_ID") from None
        if not 1 <= k <= len(synsets):
            raise DataError(f"{gt_path}:{line_no}: ILSVRC2012_ID {k} is outside 1..{len(synsets)}, "
                            f"the lines of {synsets_path}")
        out[f"ILSVRC2012_val_{line_no:08d}"] = synsets[k - 1]
    if not out:
        raise DataError(f"{gt_path}: no labels")
    return out


def val_labels(data_root: str | Path, image_root: str | Path, val_solution: str = "", devkit_gt: str = "",
               devkit_synsets: str = "") -> tuple[dict[str, str], str]:
    """Labels of a flat val folder and where they came from: ``devkit_gt`` + ``devkit_synsets``
    when given, else ``val_solution`` or a ``LOC_val_solution.csv`` beside the data. The devkit's
    ground truth in its usual place is only used together with ``devkit_synsets``."""
    if devkit_gt or devkit_synsets:
        gt = Path(devkit_gt) if devkit_gt else find_metadata(DEVKIT_GT, data_root, image_root)
        if gt is None or not devkit_synsets:
            raise DataError("the devkit ground truth needs both --devkit-gt (ILSVRC2012_validation_ground_truth.txt) "
                            "and --devkit-synsets (wnids in ILSVRC2012_ID order)")
        return read_devkit_ground_truth(gt, devkit_synsets), f"{gt} + {devkit_synsets}"
    csv_path = Path(val_solution) if val_solution else find_metadata(VAL_SOLUTION, data_root, image_root)
    if csv_path is None:
        raise DataError(f"{Path(image_root) / 'val'} is a flat folder and no labels were found: put {VAL_SOLUTION} "
                        f"in {data_root}, or pass --val-solution, or --devkit-gt with --devkit-synsets "
                        "(or arrange it into class folders once with --prepare-val)")
    return read_val_solution(csv_path), str(csv_path)


# ----------------------------------------------------------------------------- --prepare-val

@dataclass
class PrepareReport:
    """What :func:`prepare_val` did: files moved, already in place, labelled but absent, and
    loose images without a label (left where they are)."""
    moved: int = 0
    already: int = 0
    missing: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)


def _move_no_overwrite(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` without ever replacing an existing ``dst``: a hard link fails when
    ``dst`` exists (atomically, unlike a check before a rename), then ``src`` is unlinked. On a
    filesystem without hard links it falls back to a checked rename."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        if dst.exists():
            raise FileExistsError(f"{dst} exists") from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    if os.path.samefile(a, b):
        return True
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def prepare_val(val_dir: str | Path, labels: dict[str, str], classes: set[str] | None = None) -> PrepareReport:
    """Arrange a flat val folder into ``val_dir/<wnid>/<file>`` class folders, safely.

    Plans every move first. With ``classes`` (train/'s class folders), a label of an image to be
    arranged that is none of them stops the run with a :class:`DataError`, before anything is
    changed (training would refuse that class folder). A file whose destination already holds *different* bytes stops the
    whole run with a :class:`FileExistsError` naming both, before anything is changed; a
    destination with the same bytes (a run interrupted between link and unlink) just drops the
    duplicate source. Nothing is ever overwritten, nothing deleted that is not also in place, and
    a second run changes nothing. Loose images without a label stay where they are.
    """
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise DataError(f"{val_dir}: no such folder")
    report = PrepareReport()
    plan: list[tuple[Path, Path]] = []
    conflicts: list[str] = []
    foreign: list[str] = []    # labels that are no train class
    loose: dict[str, Path] = {}
    for p in loose_images(val_dir):   # labels are keyed by file stem: two files with one stem are ambiguous
        if p.stem in loose:
            conflicts.append(f"{loose[p.stem]} and {p.name} share the image id {p.stem!r}")
        loose[p.stem] = p
    placed = {p.stem: wnid for wnid, paths in scan_class_folders(val_dir, allow_empty=True).items()
              for p in paths}
    for image_id in sorted(labels):
        wnid = labels[image_id]
        _check_safe_name(wnid, f"label of {image_id}")
        if image_id in placed and placed[image_id] != wnid:
            conflicts.append(f"{image_id} is in {val_dir / placed[image_id]} but labelled {wnid}")
        src = loose.pop(image_id, None)
        if src is None:
            if placed.get(image_id) == wnid:
                report.already += 1
            else:
                report.missing.append(image_id)
            continue
        if classes is not None and wnid not in classes:
            foreign.append(f"{src.name} ({wnid})")
        dst = val_dir / wnid / src.name
        if dst.exists() and not _same_file(src, dst):
            conflicts.append(f"{src} -> {dst} (holds different bytes)")
        plan.append((src, dst))
    if foreign:
        raise DataError(f"--prepare-val: {len(foreign)} image(s) labelled with classes that train/ does not have, "
                        f"e.g. {', '.join(foreign[:3])}; nothing was moved: are these the labels of this dataset?")
    if conflicts:
        raise FileExistsError(f"--prepare-val: {len(conflicts)} conflict(s) (files already in class folders, "
                              "or one image id for two files); nothing was moved. Resolve them by hand:\n  "
                              + "\n  ".join(conflicts[:10]))
    report.unlabelled = sorted(p.name for p in loose.values())
    for src, dst in plan:
        dst.parent.mkdir(exist_ok=True)
        if dst.exists():      # identical bytes, checked above: the move was already done
            os.unlink(src)
            report.already += 1
        else:
            _move_no_overwrite(src, dst)
            report.moved += 1
    return report


# ----------------------------------------------------------------------------- transforms

def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A crop ``(top, left, h, w)`` in integer pixels covering a random fraction ``scale`` of the
    image area with aspect ratio ``w / h`` drawn log-uniformly from ``ratio`` (the Inception
    crop). After 10 draws that do not fit, the largest centred crop within ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_transform(image: Tensor, size: int) -> Tensor:
    """Evaluation view: resize the shorter side to ``size * 256/224`` (256 for 224), centre-crop
    ``size`` x ``size``. uint8 in, uint8 out."""
    image = TF.resize(image, [round(size * EVAL_RESIZE_RATIO)], antialias=True)
    return TF.center_crop(image, [size, size])


# ----------------------------------------------------------------------------- image checks

def check_image_header(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the header alone (no decode): :class:`DataError` naming the file
    for what :func:`dataset.read_image` refuses before decoding (a zero-byte file, a file that is
    no image, a header over ``MAX_IMAGE_PIXELS``). A truncated file passes; only a decode finds it."""
    _, w, h, _ = read_encoded(Path(path))
    return w, h


def _reason(error: Exception, path: str) -> str:
    """The message of a :class:`DataError` / OSError without the ``"<path>: "`` it starts with."""
    if isinstance(error, OSError):
        return f"cannot read ({error.strerror or error})"
    text = str(error)
    return text[len(path) + 2:] if text.startswith(f"{path}: ") else text


# ----------------------------------------------------------------------------- dataset

class ImageNetClassification(Dataset):
    """A list of ``(image path, class index)`` with the training or evaluation view.

    ``train=True``: random resized crop (``scale`` of the area, one crop + antialiased resize of
    the uint8 image) to ``image_size``, horizontal flip, and with ``color_jitter`` J > 0 exposure
    and saturation factors drawn in [1, 1+J] and inverted half the time (darknet's ``rand_scale``),
    applied batched by :func:`dataset.color_normalize`; the training image is ``(3, S, S)`` with its
    memory in ``(S, S, 3)`` order (:func:`dataset.warp_image`), and ``info`` is ``(index, exposure,
    saturation)``. ``train=False``: :func:`eval_transform`.

    ``decode_on_device=True`` (training only; ``pretrainer.py --gpu-decode``): for a colour or
    grayscale JPEG the item's image is ``(its file's bytes, height, width)``, its crop and flip drawn
    from the header's size, and ``info`` has five more columns ``(left, top, w, h, flip)``; the collation is
    :func:`dataset.collate_encoded`, and :meth:`finish_on_device` decodes, crops, resizes and flips
    the batch on the GPU. Other images are decoded and warped in the worker (their ``flip`` 0).
    An unreadable image yields ``None`` and a warning naming it; :func:`dataset.collate_skip_none`
    drops it.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], class_names: Sequence[str], image_size: int,
                 train: bool = False, seed: int = 0, scale: tuple[float, float] = (0.08, 1.0),
                 color_jitter: float = 0.0, root: str | Path = "", decode_on_device: bool = False):
        if not samples:
            raise DataError(f"{root or 'dataset'}: no images")
        # Paths as one bytes array and labels as one int array, not 1.28M Python objects: data loader
        # workers read them without touching reference counts, so forked memory stays shared.
        self.paths = np.array([os.fsencode(p) for p, _ in samples])
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.class_names = list(class_names)
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, 0
        self.scale, self.color_jitter, self.root = scale, color_jitter, Path(root)
        self.decode_on_device = decode_on_device and train

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """``[(image path, class index)]``, built on demand (for inspection, not for loading)."""
        return [(Path(os.fsdecode(p)), int(label)) for p, label in zip(self.paths, self.labels)]

    def check_images(self, decode: bool = True, progress: bool = False,
                     shard: tuple[int, int] = (0, 1)) -> list[tuple[str, str]]:
        """Open every image and return ``(file, reason)`` for each one that :meth:`__getitem__`
        would skip, in dataset order. ``decode=True`` decodes it fully (:func:`dataset.read_image`,
        what training does); ``decode=False`` reads only the header (:func:`check_image_header`:
        much faster, but a truncated file passes). ``shard=(rank, world)`` checks indices
        ``rank, rank + world, ...`` only, so that processes can split the work."""
        rank, world = shard
        problems = []
        for raw in tqdm(self.paths[rank::world], desc=f"{'decoding' if decode else 'checking'} {self.root.name}",
                        disable=not progress, leave=False, dynamic_ncols=True):
            path = os.fsdecode(raw)
            try:
                if decode:
                    read_image(Path(path))
                else:
                    check_image_header(path)
            except (DataError, OSError) as e:
                problems.append((path, f"{_reason(e, path)}; {IMAGE_SKIPPED}"))
        return problems

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index) only: reproducible across workers and resumes."""
        self.epoch = epoch

    def __getitem__(self, index: int):
        path, label = Path(os.fsdecode(self.paths[index])), int(self.labels[index])
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        try:
            if self.decode_on_device:   # JPEG bytes and the draws; decode_on_device_batch does the rest
                data, width, height, device_jpeg = read_encoded(path)
                if device_jpeg:
                    top, left, h, w, flip, exposure, saturation = self._draw(height, width, rng)
                    return (data, height, width), label, torch.tensor([index, exposure, saturation, left, top, w, h,
                                                                       flip], dtype=torch.float64)
                image = decode_encoded(data, path)     # PNG, CMYK ...: decoded here, as without the option
            else:
                image = read_image(path)
        except DataError as e:
            warnings.warn(f"skipped: {e}")
            return None
        if not self.train:
            return eval_transform(image, self.image_size).contiguous(), label, \
                torch.tensor([index, 1.0, 1.0], dtype=torch.float64)
        top, left, h, w, flip, exposure, saturation = self._draw(image.shape[-2], image.shape[-1], rng)
        # the crop + resize + flip of TF.resized_crop, pixel for pixel, in the decoded (H, W, 3)
        # memory order: a dense crop takes the resize's fast path, and the batch stays channels-last
        # until color_normalize (dataset.warp_image)
        image = warp_image(image, (left, top, w, h), self.image_size, bool(flip), (0, 0, 0))
        info = [index, exposure, saturation] + ([left, top, w, h, 0.0] if self.decode_on_device else [])
        return image, label, torch.tensor(info, dtype=torch.float64)

    def path(self, index: int) -> Path:
        return Path(os.fsdecode(self.paths[index]))

    def finish_on_device(self, batch: list | None, device: torch.device) -> list | None:
        """A training batch of ``decode_on_device=True`` (collated by :func:`dataset.collate_encoded`)
        decoded, cropped, resized and flipped on ``device``: ``[uint8 (N, 3, S, S), labels, info]``
        with ``info`` ``(index, exposure, saturation, left, top, w, h, flip)``, or ``None``
        (:func:`dataset.decode_on_device_batch`)."""
        return decode_on_device_batch(batch, self.path, self.image_size, (0, 0, 0), device)

    def _draw(self, height: int, width: int, rng: np.random.Generator) -> tuple[float, ...]:
        """The training view's random draws for an image of ``height`` x ``width``, in this order:
        the crop ``(top, left, h, w)``, the flip (1 or 0), and exposure and saturation (1 without
        ``color_jitter``)."""
        top, left, h, w = random_resized_crop_box(height, width, rng, self.scale)
        flip = float(rng.random() < 0.5)
        exposure = saturation = 1.0
        if self.color_jitter > 0:
            def rand_scale() -> float:
                f = rng.uniform(1.0, 1.0 + self.color_jitter)
                return float(f if rng.random() < 0.5 else 1.0 / f)
            exposure, saturation = rand_scale(), rand_scale()
        return top, left, h, w, flip, exposure, saturation


@dataclass
class ImageNetData:
    """Both splits of one ImageNet tree plus its class list and what was noticed while reading it."""
    train: ImageNetClassification
    val: ImageNetClassification
    class_names: list[str]       # wnids, sorted: index = class id
    class_labels: list[str]      # human-readable names (the wnid where none is known)
    root: Path
    val_layout: str              # "class folders" or "flat folder labelled by <file>"
    notes: list[str] = field(default_factory=list)


def load_imagenet(data_root: str | Path, image_size: int, seed: int = 0, scale: tuple[float, float] = (0.08, 1.0),
                  color_jitter: float = 0.0, val_solution: str = "", devkit_gt: str = "", devkit_synsets: str = "",
                  synset_mapping: str = "", decode_on_device: bool = False) -> ImageNetData:
    """Read an ImageNet tree (see the module docstring for the layouts) into train and val datasets.

    Class order is the sorted wnids of ``train/``. Every val image must belong to one of them:
    an unknown class folder, a flat image without a label or a label naming an unknown wnid is a
    :class:`DataError`. ``val/`` holding both class folders and loose images (an interrupted
    ``--prepare-val``) is refused too. Labels without an image are only noted (a val subset).
    """
    data_root = Path(data_root)
    root = resolve_imagenet_root(data_root)
    train_classes = scan_class_folders(root / "train")
    class_names = sorted(train_classes)
    if not class_names:
        raise DataError(f"{root / 'train'}: no class folders (expected train/<wnid>/*.JPEG)")
    index = {w: i for i, w in enumerate(class_names)}
    train_samples = [(p, index[w]) for w in class_names for p in train_classes[w]]
    notes: list[str] = []
    with os.scandir(root / "train") as it:
        stray = sorted(e.name for e in it if not e.name.startswith(".") and not e.is_dir())
    if stray:
        notes.append(f"{root / 'train'}: {len(stray)} entries that are not class folders ignored, e.g. {stray[0]} "
                     "(an archive left unextracted? its class would be missing)")

    mapping_path = Path(synset_mapping) if synset_mapping else find_metadata(SYNSET_MAPPING, data_root, root)
    names = read_synset_mapping(mapping_path) if mapping_path else {}
    if mapping_path:
        unnamed = [w for w in class_names if w not in names]
        if unnamed:
            notes.append(f"{mapping_path} names no label for {len(unnamed)} classes, e.g. {unnamed[0]}")
    class_labels = [names.get(w, w) for w in class_names]

    val_dir = root / "val"
    if not val_dir.is_dir():
        raise DataError(f"{root}: no val/ folder (expected val/<wnid>/*.JPEG or val/ILSVRC2012_val_*.JPEG)")
    # An empty class folder in val/ only means no val image of that class (or an interrupted --prepare-val).
    folders = {w: paths for w, paths in scan_class_folders(val_dir, allow_empty=True).items() if paths}
    loose = loose_images(val_dir)
    if folders and loose:
        raise DataError(f"{val_dir} holds both class folders and {len(loose)} loose images (e.g. {loose[0].name}): "
                        "an interrupted --prepare-val? Run it again to finish the arrangement; images it leaves "
                        "loose have no label (it names them): move or delete them")
    if folders:
        unknown = [w for w in folders if w not in index]
        if unknown:
            raise DataError(f"{val_dir / unknown[0]}: val class not among the {len(class_names)} train classes "
                            f"({len(unknown)} such folders)")
        val_samples = [(p, index[w]) for w in sorted(folders) for p in folders[w]]
        layout = "class folders"
    elif loose:
        labels, source = val_labels(data_root, root, val_solution, devkit_gt, devkit_synsets)
        val_samples = []
        for p in loose:
            wnid = labels.get(p.stem)
            if wnid is None:
                raise DataError(f"{p}: no label for this image in {source}")
            if wnid not in index:
                raise DataError(f"{p}: labelled {wnid} in {source}, not one of the {len(class_names)} train classes")
            val_samples.append((p, index[wnid]))
        if len(labels) > len(loose):
            notes.append(f"{len(labels) - len(loose)} images labelled in {source} are not in {val_dir}")
        layout = f"flat folder labelled by {source}"
    else:
        raise DataError(f"{val_dir}: no images (expected val/<wnid>/*.JPEG or val/ILSVRC2012_val_*.JPEG)")

    train = ImageNetClassification(train_samples, class_names, image_size, True, seed, scale, color_jitter,
                                   root / "train", decode_on_device)
    val = ImageNetClassification(val_samples, class_names, image_size, False, seed, root=val_dir)
    return ImageNetData(train, val, class_names, class_labels, root, layout, notes)
