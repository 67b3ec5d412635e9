"""Datasets on their real on-disk layouts, annotation parsing, box-aware augmentation, grid targets.

Conventions: boxes inside this module are ``xyxy`` in continuous 0-based pixels (see utils.py);
VOC's 1-based inclusive corners are converted once, in :func:`parse_voc_xml`'s consumer
:meth:`VOCDetection.boxes_px`. Grid indexing is ``(row, col)`` = ``(y cell, x cell)``.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
import os
import re
import sys
import tempfile
import threading
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from voc_eval import GroundTruth, read_text

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Normalisation shared by pretraining and detection (the users' recipe), RGB in 0..1.
MEAN: tuple[float, float, float] = (0.4547857, 0.4349471, 0.40525291)
STD: tuple[float, float, float] = (0.12003352, 0.12323549, 0.1392444)
MAX_IMAGE_PIXELS = 64_000_000   # larger headers are refused as decompression bombs


IMAGE_SKIPPED = "image skipped"   # how check_images's reason for an image that cannot be read ends


class DataError(ValueError):
    """Bad input data; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- VOC annotations

@dataclass
class Annotation:
    """One image's VOC annotation. ``boxes`` are VOC 1-based inclusive ``(xmin, ymin, xmax, ymax)``."""
    image_id: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))        # float64 (M, 4)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (M,)
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))   # (M,)


class _RefuseDoctype(ET.TreeBuilder):
    """Builds the tree, refusing a DOCTYPE: entity declarations live in one, so nothing is expanded."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise DataError(f"{self.path}: XML with a DOCTYPE or entity declarations is refused (no entity expansion)")


def parse_voc_xml(path: str | Path, class_names: Sequence[str]) -> tuple[Annotation, list[str]]:
    """Parse a VOC annotation file. Returns the annotation and a list of problems that were handled.

    Only ``<object>`` children of the root are objects (``<part>`` boxes of VOC person layout are
    not). Coordinates may be written as floats. A missing ``difficult`` tag means 0, any nonzero
    value 1 (as in the devkit). Objects of a
    class outside ``class_names`` and boxes with ``xmin > xmax`` or ``ymin > ymax`` are skipped
    and reported in the returned list (corners are inclusive: ``xmin == xmax`` is one pixel wide, as
    in the VOC devkit). Files with a DOCTYPE or entity declarations are refused
    (no entity expansion), as are files that are not well-formed XML, whose root is not
    ``<annotation>``, whose objects are nested deeper, or with an object of several ``<bndbox>``:
    :class:`DataError`. An XML namespace is ignored (and reported).
    """
    path = Path(path)
    parser = ET.XMLParser(target=_RefuseDoctype(path))   # the parser sees a DOCTYPE in any encoding (UTF-16 too)
    try:
        parser.feed(path.read_bytes())
        root = parser.close()
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from None
    problems: list[str] = []
    if root.tag.startswith("{"):     # a namespaced file: the VOC tags are the local names
        problems.append(f"XML namespace {root.tag[1:].partition('}')[0]} ignored")
        for el in root.iter():
            el.tag = el.tag.rpartition("}")[2]
    if root.tag != "annotation":
        raise DataError(f"{path}: root element <{root.tag}>, not a VOC <annotation>")
    if not root.findall("object") and root.find(".//object") is not None:
        raise DataError(f"{path}: <object> elements nested below <{root.find('.//object/..').tag}>, not directly "
                        "in <annotation> as VOC writes them")

    def num(node: ET.Element | None, tag: str, default: float | None = None) -> float:
        el = node.find(tag) if node is not None else None
        if el is None or el.text is None or not el.text.strip():
            if default is not None:
                return default
            raise DataError(f"{path}: missing <{tag}>")
        try:
            value = float(el.text)
        except ValueError:
            raise DataError(f"{path}: <{tag}> is {el.text!r}, not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{path}: <{tag}> is {el.text.strip()!r}, not a finite number")
        if abs(value) > 1e9:   # no image is that large (MAX_IMAGE_PIXELS); float32 boxes would overflow
            raise DataError(f"{path}: <{tag}> is {el.text.strip()!r}, beyond any image's size")
        return value

    size = root.find("size")
    width, height = int(num(size, "width", 0)), int(num(size, "height", 0))
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_names:
            problems.append(f"unknown class {name!r} skipped")
            continue
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{path}: object {name!r} has no <bndbox>")
        if len(obj.findall("bndbox")) > 1:
            raise DataError(f"{path}: object {name!r} has {len(obj.findall('bndbox'))} <bndbox> elements, not one")
        box = [num(bb, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        if box[0] > box[2] or box[1] > box[3]:
            problems.append(f"degenerate box {box} of {name!r} dropped (xmin > xmax or ymin > ymax)")
            continue
        boxes.append(box)
        labels.append(class_names.index(name))
        difficult.append(int(num(obj, "difficult", 0)) != 0)   # any nonzero value, as the devkit reads it
    ann = Annotation(path.stem, width, height, np.array(boxes, np.float64).reshape(-1, 4),
                     np.array(labels, np.int64), np.array(difficult, bool))
    return ann, problems


def resolve_voc_root(data_root: str | Path) -> Path:
    """Return the ``VOCdevkit`` folder from ``data_root`` (which may be it or hold it)."""
    root = Path(data_root)
    for cand in (root / "VOCdevkit", root):
        if any((cand / f"VOC{y}").is_dir() for y in ("2007", "2012")):
            return cand
    raise DataError(f"--data-root {root}: no VOCdevkit/VOC2007 or VOCdevkit/VOC2012 folder found there")


def parse_image_set(spec: str) -> list[tuple[str, str]]:
    """``"2007-trainval+2012-trainval"`` -> ``[("2007", "trainval"), ("2012", "trainval")]``."""
    out = []
    for part in spec.split("+"):
        m = re.fullmatch(r"(\d{4})-(\w+)", part.strip())
        if not m:
            raise ValueError(f"image set {part!r} in {spec!r} is not of the form YEAR-SPLIT (e.g. 2007-test)")
        out.append((m.group(1), m.group(2)))
    return out


def image_set_ids(root: Path, image_set: str, report: list[tuple[str, str]]):
    """Yield ``(year, image_id, voc_folder)`` for every id listed in ``image_set``'s
    ``ImageSets/Main/<split>.txt`` files under the VOCdevkit folder ``root``. Ids with a path
    separator or ``..`` are refused and repeated ids ignored, each recorded in ``report`` as
    ``(file:line, reason)``; a missing list file raises :class:`DataError`."""
    seen: set[tuple[str, str]] = set()
    for year, split in parse_image_set(image_set):
        voc = root / f"VOC{year}"
        list_file = voc / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise DataError(f"image set file {list_file} does not exist (is --data-root right?)")
        for line_no, line in enumerate(read_text(list_file).splitlines(), 1):
            image_id = line.split()[0] if line.strip() else ""      # per-class lists add a label after the id
            if not image_id:
                continue
            where = f"{list_file}:{line_no}"
            if "/" in image_id or "\\" in image_id or ".." in image_id or image_id.startswith("."):
                report.append((where, f"unsafe image id {image_id!r} refused"))
                continue
            if (year, image_id) in seen:
                report.append((where, f"duplicate image id {image_id!r} ignored"))
                continue
            seen.add((year, image_id))
            yield year, image_id, voc


# ----------------------------------------------------------------------------- augmentation

@dataclass
class AugmentParams:
    """One draw of the paper's augmentation (Sec. 2.2): scale and translation of up to
    ``jitter`` of the image size, exposure and saturation factors in HSV, horizontal flip."""
    scale: float = 1.0
    tx: float = 0.0          # fraction of width
    ty: float = 0.0          # fraction of height
    flip: bool = False
    exposure: float = 1.0
    saturation: float = 1.0

    @staticmethod
    def sample(rng: np.random.Generator, jitter: float = 0.2, hsv: float = 1.5) -> "AugmentParams":
        def rand_scale() -> float:  # darknet's rand_scale: uniform in [1, hsv], inverted half the time
            s = rng.uniform(1.0, hsv)
            return float(s if rng.random() < 0.5 else 1.0 / s)
        return AugmentParams(float(rng.uniform(1 - jitter, 1 + jitter)), float(rng.uniform(-jitter, jitter)),
                             float(rng.uniform(-jitter, jitter)), bool(rng.random() < 0.5), rand_scale(), rand_scale())


def crop_window(width: int, height: int, p: AugmentParams) -> tuple[int, int, int, int]:
    """Source window ``(left, top, w, h)`` (integer pixels, may extend past the image) that the
    scale-about-centre + translation of ``p`` maps onto the whole output. Rounded to whole pixels so
    that the boxes follow the pixels exactly."""
    w, h = max(1, round(width / p.scale)), max(1, round(height / p.scale))
    left = round(width / 2 - (width / 2 + p.tx * width) / p.scale)
    top = round(height / 2 - (height / 2 + p.ty * height) / p.scale)
    return left, top, w, h


def warp_image(image: Tensor, window: tuple[int, int, int, int], size: int, flip: bool, fill: Sequence[int]) -> Tensor:
    """Crop ``window`` from a uint8 ``(3, H, W)`` image (padding with ``fill`` outside it), resize
    to ``size`` x ``size`` (bilinear, antialiased) and optionally flip: the whole geometric
    augmentation as one resample of the pixels, on the image's device (a loader worker's CPU, or
    the GPU for ``--gpu-decode``, :func:`decode_on_device_batch`). Returns a ``(3, size, size)`` tensor whose memory
    is in ``(size, size, 3)`` order (channels last) for an image in :func:`read_image`'s order.

    Works on the pixels in ``(H, W, 3)`` order, the order :func:`read_image` decodes them in:
    the padded crop is then filled and copied row by row, and the uint8 resize takes its
    vectorised channels-last path. The result stays in that order: :func:`stack_images` batches
    it without a transposition and :func:`color_normalize` makes the batch contiguous on the
    device (on a GPU nearly free; a 448 px transposition costs a CPU core ~0.17 ms). The pixels
    are those of a ``(3, H, W)`` crop resized the plain way (a test checks)."""
    left, top, w, h = window
    (x0, y0, x1, y1), inside = _window_in_image(window, *image.shape[-2:])
    hwc = image.permute(1, 2, 0)                                          # (H, W, 3), a view
    if inside:
        crop = hwc[top:top + h, left:left + w].contiguous()   # dense: the resize's fast path (0.3 vs 0.6 ms)
    else:
        crop = torch.empty((h, w, 3), dtype=image.dtype, device=image.device)
        row = _fill_pixel(image.device, tuple(fill), image.dtype).repeat(w)   # one padded row, (w * 3,)
        crop.view(h, w * 3).copy_(row.expand(h, w * 3))
        if x1 > x0 and y1 > y0:
            crop[y0 - top:y1 - top, x0 - left:x1 - left] = hwc[y0:y1, x0:x1]
    out = TF.resize(crop.permute(2, 0, 1), [size, size], antialias=True)   # (3, S, S), (S, S, 3) in memory
    if flip:
        return out.flip(-1)                                                 # flip keeps the memory order
    # never the caller's own pixels (resize returns its input at the same size: an identity window)
    return out.clone() if out.untyped_storage().data_ptr() == image.untyped_storage().data_ptr() else out


def _window_in_image(window: tuple[int, int, int, int], H: int, W: int) -> tuple[tuple[int, int, int, int], bool]:
    """The part of ``window`` ``(left, top, w, h)`` inside an ``H`` x ``W`` image, as ``(x0, y0,
    x1, y1)``, and whether that is the whole window (no padding needed)."""
    left, top, w, h = window
    box = (max(left, 0), max(top, 0), min(left + w, W), min(top + h, H))
    return box, box == (left, top, left + w, top + h)


# Where decode_on_device_batch warps a batch with warp_images rather than image by image (warp_image): on
# a GPU each kernel launch costs the host microseconds, and warp_image launches ~6 per image. On a CPU
# the worker's own warp_image runs, so that --gpu-decode there gives the workers' pixels bit for bit.
BATCHED_WARP_DEVICES: set[str] = {"cuda"}


def warp_images(images: Sequence[Tensor], windows: Sequence[tuple[int, int, int, int]], size: int,
                flips: Sequence[bool], fill: Sequence[int]) -> Tensor:
    """:func:`warp_image` for a list of uint8 ``(3, H_i, W_i)`` images on one device (each its own
    ``window`` and flip), with few kernel launches: per image the crop converted to float (padded
    with ``fill`` where the window leaves the image: one more) and its antialiased bilinear resize,
    a flip for the flipped ones; then once for the batch the rounding and the conversion to uint8.
    :func:`warp_image` launches about 6 per image (torchvision's uint8 resize on a GPU converts,
    resizes, rounds and converts back, each image alone) and adds torchvision's dispatch in Python.

    The pixels are those of ``torchvision.transforms.v2.functional.resize`` of the uint8 crop on a
    GPU (float interpolation, rounded): :func:`warp_image`'s there, bit for bit. On a CPU
    torchvision resizes uint8 with integer arithmetic, which rounds a little differently (at most 1
    apart; a test checks). Returns uint8 ``(N, 3, size, size)``, channels last in memory as
    :func:`stack_images` makes the workers' batches."""
    if not images:
        raise ValueError("warp_images needs at least one image")
    out = []
    for image, (left, top, w, h), flip in zip(images, windows, flips):
        (x0, y0, x1, y1), inside = _window_in_image((left, top, w, h), *image.shape[-2:])
        if inside:
            crop = image[:, top:top + h, left:left + w].float()            # one copy, converted on the way
        else:
            crop = _fill_pixel(image.device, tuple(fill), torch.float32).view(3, 1, 1).expand(3, h, w).contiguous()
            if x1 > x0 and y1 > y0:
                crop[:, y0 - top:y1 - top, x0 - left:x1 - left] = image[:, y0:y1, x0:x1]
        resized = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear",
                                                  align_corners=False, antialias=True)   # (1, 3, S, S)
        out.append(resized.flip(-1) if flip else resized)
    return torch.cat(out).round_().to(torch.uint8, memory_format=torch.channels_last)


def warp_boxes(boxes: Tensor | np.ndarray, window: tuple[int, int, int, int], size: int, flip: bool,
               min_size: float = 1.0) -> tuple[Tensor, Tensor] | tuple[np.ndarray, np.ndarray]:
    """Map pixel ``xyxy`` boxes ``(M, 4)`` through :func:`warp_image`'s geometry, clip them to the
    output and drop those narrower or lower than ``min_size`` output pixels. Returns the boxes
    and the boolean keep mask over the input boxes, as tensors or arrays like ``boxes``."""
    # NumPy inside: a handful of boxes per image, where each torch call costs more than its work.
    b = boxes.numpy() if isinstance(boxes, Tensor) else boxes
    left, top, w, h = window
    out = (b - np.array([left, top, left, top], b.dtype)) * np.array([size / w, size / h] * 2, b.dtype)
    out = out.clip(0, size)
    if flip:
        out = np.stack([size - out[:, 2], out[:, 1], size - out[:, 0], out[:, 3]], 1)
    keep = ((out[:, 2] - out[:, 0]) >= min_size) & ((out[:, 3] - out[:, 1]) >= min_size)
    if isinstance(boxes, Tensor):
        return torch.from_numpy(out[keep]), torch.from_numpy(keep)
    return out[keep], keep


@functools.lru_cache(maxsize=16)
def _fill_pixel(device: torch.device, fill: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The padding colour as a ``(3,)`` tensor on ``device``, made once (on a GPU a tensor built from
    a list is a blocking copy: one stall per padded image otherwise)."""
    return torch.tensor(fill, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """The ``(1, 3, 1, 1)`` mean and std tensors on ``device``, made once: building them from Python
    lists on every call would be a blocking host-to-GPU copy, a stall of the GPU queue per step."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def color_normalize(images: Tensor, exposure: Tensor | None = None, saturation: Tensor | None = None,
                    mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """uint8 ``(N, 3, H, W)`` RGB batch -> normalised float, with per-image HSV exposure and
    saturation scaling (``(N,)`` factors; None = 1). Runs on whatever device the batch is on, so
    colour augmentation happens on the GPU for the whole batch.

    Scaling V and S in HSV with hue fixed has a closed form in RGB: with V = max, m = min,
    S = (V - m) / V and k_c = (V - c) / (V - m), every channel is c = V (1 - S k_c); the new
    image is c' = V' (1 - S' k_c) with V' = min(V e, 1), S' = min(S s, 1). No hue is computed.
    """
    if not images.is_contiguous():    # a loader's batches are channels-last (stack_images): NCHW for the model
        # on a CPU NumPy's transposition (0.04 ms per 224 px image) is twice as fast as torch's uint8 one
        if images.device.type == "cpu":
            out = torch.empty(images.shape, dtype=images.dtype)     # torch's memory, NumPy's faster copy
            np.copyto(out.numpy(), images.numpy())
            images = out
        else:
            images = images.contiguous()
    if (exposure is None) != (saturation is None):
        raise ValueError("color_normalize: give both exposure and saturation (colour augmentation) or neither")
    x = images.float()                                   # (N, 3, H, W) in 0..255, the one full-size buffer
    mean_t, std_t = _mean_std(x.device, tuple(mean), tuple(std))
    if exposure is not None:
        N = x.shape[0]
        e, s = exposure.to(x).view(N, 1, 1, 1), saturation.to(x).view(N, 1, 1, 1)
        # max and min over channels on the input's own dtype (uint8: a quarter of the bytes)
        V = images.amax(1, keepdim=True).float()         # (N, 1, H, W), whole numbers 0..255
        chroma = V - images.amin(1, keepdim=True).float()
        V_new = V.mul(e / 255).clamp_(max=1)             # V' in 0..1
        # c' = V' - a (V - c) with one gain per pixel a = V' S' / (V - m) = V' min(s / V, 1 / (V - m));
        # any finite a is right where V = m (grey pixels), hence the clamps.
        a = torch.minimum(s / V.clamp(min=1), chroma.clamp_(min=1).reciprocal_()).mul_(V_new)
        x.mul_(a).add_(V_new.sub_(a * V))                # c' = (V' - a V) + a c, in 0..1
        return x.sub_(mean_t).div_(std_t)
    return x.div_(255).sub_(mean_t).div_(std_t)


# ----------------------------------------------------------------------------- grid targets

def encode_target(boxes: Tensor | np.ndarray, labels: Tensor | np.ndarray, image_size: int, S: int, C: int) -> Tensor:
    """Pixel ``xyxy`` boxes ``(M, 4)`` on a ``image_size`` square image -> ``(S, S, 5 + C)`` target.

    Each object goes to the cell ``(row, col)`` holding its centre; per cell
    ``(x, y, w, h, obj, one-hot C)`` with x, y the centre's offset within the cell (cell units)
    and w, h relative to the image. One object per cell: when several centres fall in the same
    cell, the one with the largest box area is kept (ties: the first listed).
    """
    # NumPy, not torch: a handful of objects per image, where a torch call costs more than its work.
    target = np.zeros((S, S, 5 + C), np.float32)
    if len(boxes):
        b = np.asarray(boxes.detach().cpu() if isinstance(boxes, Tensor) else boxes, np.float64)
        cx = (b[:, 0] + b[:, 2]) * S / (2 * image_size)     # centre in cell units; exact on cell borders
        cy = (b[:, 1] + b[:, 3]) * S / (2 * image_size)
        wh = (b[:, 2:] - b[:, :2]) / image_size
        col = np.clip(np.floor(cx), 0, S - 1).astype(np.int64)
        row = np.clip(np.floor(cy), 0, S - 1).astype(np.int64)
        order = np.argsort(-(wh[:, 0] * wh[:, 1]), kind="stable")   # largest first, ties in listed order
        lab = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
        for i in order[::-1]:                                      # written last = kept
            r, c = row[i], col[i]
            target[r, c] = 0
            target[r, c, :5] = (cx[i] - c, cy[i] - r, wh[i, 0], wh[i, 1], 1)
            target[r, c, 5 + lab[i]] = 1
    return torch.from_numpy(target)


# ----------------------------------------------------------------------------- images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_image(path: Path, exif_orientation: bool = False) -> Tensor:
    """Decode an image file to uint8 RGB ``(3, H, W)``: grayscale, palette, 16-bit, CMYK, alpha and
    animation (the first frame) handled; zero-byte, non-image, unreadable, truncated and oversized
    (decompression bomb) files raise :class:`DataError` naming the file. PNGs (any extension) are
    decoded by PIL, the rest by torchvision.io.

    The pixels are the stored ones, as darknet, the VOC devkit and torchvision's datasets read them,
    and so as the datasets' boxes refer to them; ``exif_orientation=True`` turns them upright as
    an EXIF orientation tag says (detect.py, for photos). A JPEG damaged inside its compressed
    data, not at its end, decodes to wrong pixels with only a libjpeg warning on stderr, which
    :meth:`VOCDetection.check_images` (``decode=True``, ``--check-data``) catches and reports."""
    data, *_ = read_encoded(path)
    return decode_encoded(data, path, exif_orientation)


def read_encoded(path: Path) -> tuple[Tensor, int, int, bool]:
    """An image file's bytes (1-D uint8), its ``(width, height)`` from the header and whether it is a
    JPEG for the device's decoder (:func:`is_device_jpeg`), after the checks :func:`read_image` makes
    before decoding: a :class:`DataError` naming the file for an unreadable, empty or non-image file
    and for a header over ``MAX_IMAGE_PIXELS``."""
    try:
        data = torchvision_read(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.numel() == 0:
        raise DataError(f"{path}: empty file")
    with _open_header(data, path) as im:       # one look at the header for all three
        (w, h), device_jpeg = im.size, is_device_jpeg(data, im.mode)
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: header claims {w}x{h} pixels, over the {MAX_IMAGE_PIXELS} limit (decompression bomb?)")
    return data, w, h, device_jpeg


def decode_encoded(data: Tensor, path: Path, exif_orientation: bool = False) -> Tensor:
    """:func:`read_image`'s decode of the bytes :func:`read_encoded` read from ``path``."""
    if bytes(data[:8].numpy()) == PNG_SIGNATURE:
        return decode_pil(data, path, exif_orientation)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # libjpeg warns (not fails) on truncated data
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates io in favour of torchcodec
            img = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=exif_orientation)
    except (RuntimeError, UserWarning) as e:
        raise DataError(f"{path}: cannot decode image ({str(e).splitlines()[0][:200]})") from None
    return img[0] if img.ndim == 4 else img       # an animated GIF: (frames, 3, H, W); its first frame


@contextlib.contextmanager
def stderr_of_c_libraries():
    """Collect what is written to file descriptor 2 inside the block (a list that holds the text
    once the block ends). libjpeg reports damage inside a JPEG's compressed data there, as a
    warning, and decodes on with wrong pixels; nothing reaches Python. Used by
    :meth:`VOCDetection.check_images` around each decode, not in training's loaders."""
    text: list[str] = []
    if sys.stderr is None:   # no stderr at all (pythonw, 2>&-): nothing to catch
        yield text
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:          # file descriptor 2 closed: the same
        yield text
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace"))


def decode_pil(data: Tensor, path: Path, exif_orientation: bool = False) -> Tensor:
    """Image bytes (PNG for :func:`decode_encoded`; a JPEG nvJPEG refused for :func:`_decode_jpegs`)
    -> uint8 RGB ``(3, H, W)`` through PIL (turned upright by its EXIF orientation with
    ``exif_orientation``, as in :func:`read_image`). Not torchvision.io for PNGs: its ``decode_png``
    (torchvision 0.29) kills the process with a segfault on a PNG whose compressed data is
    damaged, and returns uint16 for 16-bit PNGs. 16-bit grey is scaled to 8 bits (v / 257);
    PIL reads 16-bit colour as 8-bit itself. Leaves the ``warnings`` filters alone (it runs in a
    thread for ``--gpu-decode``): the callers checked the header's size against
    :data:`MAX_IMAGE_PIXELS`, under PIL's own decompression-bomb warning."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            im.load()
            if exif_orientation:
                im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):                       # 16-bit (or 32-bit integer) grey
                grey = np.asarray(im).astype(np.float64) / 257
                im = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L")
            array = np.asarray(im.convert("RGB"))                 # (H, W, 3) uint8
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({_pil_reason(e)})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)    # (3, H, W), (H, W, 3) in memory like decode_image's


def torchvision_read(path: Path) -> Tensor:
    data = Path(path).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


@contextlib.contextmanager
def _open_header(data: Tensor, path: Path):
    """The image in ``data`` opened by PIL, which reads only its header until asked for pixels;
    :class:`DataError` naming ``path`` for a file that is no image or a decompression bomb."""
    if data.numel() == 0:
        raise DataError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                yield im
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({_pil_reason(e)})") from None


def _pil_reason(error: Exception) -> str:
    """PIL's reason, first line, without the in-memory file object it names for unknown formats."""
    if isinstance(error, UnidentifiedImageError):
        return "no image format recognised in its bytes"
    return str(error).splitlines()[0][:200]


def image_header_size(data: Tensor, path: Path, with_orientation: bool = False) -> tuple[int, ...]:
    """Width and height from the file header (PIL reads only the header), and with
    ``with_orientation`` its EXIF orientation tag (1, upright, where it has none; 0 where the tag
    cannot be read); :class:`DataError` for a file that is no image."""
    with _open_header(data, path) as im:
        if with_orientation:
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except (TypeError, ValueError, OSError, SyntaxError):   # a malformed tag: not a bad image
                orientation = 0
            return (*im.size, orientation)
        return im.size


# ----------------------------------------------------------------------------- VOC dataset

class VOCDetection(Dataset):
    """PASCAL VOC detection on its real layout ``VOCdevkit/VOC<year>/{ImageSets/Main,Annotations,JPEGImages}``.

    ``image_set`` like ``"2007-trainval+2012-trainval"``. Items are ``(image, target, info)``:
    ``image`` uint8 ``(3, size, size)`` (colour augmentation and normalisation happen batched, in
    :func:`color_normalize`), ``target`` ``(S, S, 5 + C)`` from :func:`encode_target`, and
    ``info`` float64 ``(5,)`` = ``(index, orig_height, orig_width, exposure, saturation)``.
    An unreadable image yields ``None`` (named in a warning); :func:`collate_skip_none` drops it.

    ``decode_on_device=True`` (``train_detector.py --gpu-decode``): for a JPEG the item's image is
    ``(its file's bytes, height, width)``, its augmentation drawn from the header's size, and
    ``info`` has five more columns ``(left, top, w, h, flip)``, the window :func:`warp_image`
    crops; the collation is
    :func:`collate_encoded`, and :meth:`finish_on_device` decodes and warps the batch on the GPU.
    Other images (:func:`is_device_jpeg`: PNGs, CMYK JPEGs ...) are decoded and warped in the
    worker as usual (their ``flip`` column 0).

    ``cache_images=True`` keeps every decoded image in memory after its first read (about
    ``H * W * 3`` bytes each: a few hundred MB for the demo, far more for VOC): later epochs skip
    the JPEG decode. The cache lives in the process that reads: it lasts with ``--workers 0``
    (train_detector.py rebuilds its training loader's worker processes every epoch).

    Annotation problems are collected in ``self.report`` (file, reason) rather than stopping:
    ids that are unsafe or duplicated, missing files and unparseable annotations are left out;
    unknown classes and degenerate boxes are dropped from their image.
    """

    def __init__(self, data_root: str | Path, image_set: str, class_names: Sequence[str] = VOC_CLASSES,
                 image_size: int = 448, S: int = 7, train: bool = False, keep_difficult: bool = False,
                 jitter: float = 0.2, hsv: float = 1.5, seed: int = 0, mean: Sequence[float] = MEAN,
                 cache_images: bool = False, decode_on_device: bool = False):
        self.root = resolve_voc_root(data_root)
        self.class_names = list(class_names)
        self.image_size, self.S, self.C = image_size, S, len(class_names)
        self.train, self.keep_difficult, self.jitter, self.hsv = train, keep_difficult, jitter, hsv
        self.seed, self.epoch = seed, 0
        self.fill = [round(255 * m) for m in mean]   # padding normalises to 0
        self.report: list[tuple[str, str]] = []
        self.decode_on_device = decode_on_device
        self.cache: dict[int, Tensor] | None = {} if cache_images and not decode_on_device else None
        self.items: list[tuple[Path, Annotation]] = []
        multi = len(parse_image_set(image_set)) > 1
        for year, image_id, voc in image_set_ids(self.root, image_set, self.report):
            img, xml = voc / "JPEGImages" / f"{image_id}.jpg", voc / "Annotations" / f"{image_id}.xml"
            if not img.is_file():
                self.report.append((str(img), "image file missing; id skipped"))
                continue
            if not xml.is_file():
                self.report.append((str(xml), "annotation file missing; id skipped"))
                continue
            try:
                ann, problems = parse_voc_xml(xml, self.class_names)
            except DataError as e:
                self.report.append((str(xml), str(e).split(": ", 1)[-1] + "; id skipped"))
                continue
            self.report += [(str(xml), p) for p in problems]
            ann.image_id = f"{year}_{image_id}" if multi else image_id
            self.items.append((img, ann))
        if not self.items:
            raise DataError(f"image set {image_set!r} under {self.root} holds no usable image")

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index) only: reproducible across workers and resumes."""
        self.epoch = epoch

    def annotation(self, index: int) -> Annotation:
        return self.items[index][1]

    def ground_truth(self) -> dict[str, GroundTruth]:
        """Every image's annotation for the VOC metric (VOC coordinates, difficult objects included)."""
        return {ann.image_id: GroundTruth(ann.boxes, ann.labels, ann.difficult) for _, ann in self.items}

    @staticmethod
    def boxes_px(ann: Annotation, as_array: bool = False) -> Tensor | np.ndarray:
        """VOC 1-based inclusive corners -> 0-based continuous pixel ``xyxy`` float32 (the one
        conversion), as a tensor or, with ``as_array``, a NumPy array."""
        b = ann.boxes.astype(np.float32)
        b[:, :2] -= 1
        return b if as_array else torch.from_numpy(b)

    def check_images(self, decode: bool = True, progress: bool = False) -> list[tuple[str, str]]:
        """Open every image (``decode=False``: headers only, fast) and return ``(file, reason)`` for
        each one that would be skipped in training, annotation sizes that disagree with the real
        image (the real size is what the boxes are clipped to), objects that lie wholly outside it
        (no pixel to learn from: training drops them; the VOC metric still counts them, as the
        devkit does), EXIF orientation tags, which are ignored (:func:`read_image`), and with
        ``decode`` the JPEGs that libjpeg decodes only with a warning (damaged compressed data:
        the pixels may be wrong; training uses them as decoded)."""
        from tqdm import tqdm
        problems = []
        for path, ann in tqdm(self.items, desc="checking images", disable=not progress, leave=False):
            try:
                warning = ""
                if decode:   # read_image's own checks and messages first, on bytes read once
                    data, *_ = read_encoded(path)
                    with stderr_of_c_libraries() as said:
                        decode_encoded(data, path)
                    warning = " ".join(said[0].split())
                else:
                    data = torchvision_read(path)
                W, H, orientation = image_header_size(data, path, with_orientation=True)
            except (DataError, OSError) as e:
                problems.append((str(path), f"{str(e).split(': ', 1)[-1]}; {IMAGE_SKIPPED}"))
                continue
            if warning:
                problems.append((str(path), f"decoded with a warning ({warning[:200]}): its pixels may be wrong; "
                                            "used as decoded"))
            if orientation != 1:
                tag = f"EXIF orientation {orientation}" if orientation else "an unreadable EXIF orientation tag"
                problems.append((str(path), f"{tag} ignored: the image and its boxes are read as stored, "
                                            "unrotated (as darknet and the VOC devkit read them)"))
            if ann.width and ann.height and (ann.width, ann.height) != (W, H):
                problems.append((str(path), f"annotation says {ann.width}x{ann.height}, image is {W}x{H}; "
                                            "the real size is used"))
            b = self.boxes_px(ann, as_array=True)
            outside = (b[:, 0] >= W) | (b[:, 1] >= H) | (b[:, 2] <= 0) | (b[:, 3] <= 0)
            for i in np.flatnonzero(outside):
                problems.append((str(path), f"annotated object {i + 1} ({self.class_names[ann.labels[i]]}, box "
                                            f"{ann.boxes[i].tolist()}) lies outside the {W}x{H} image: dropped from "
                                            "training"))
        return problems

    def __getitem__(self, index: int):
        path, ann = self.items[index]
        image = self.cache.get(index) if self.cache is not None else None
        data = None
        if image is None:
            try:
                if self.decode_on_device:   # a JPEG's bytes and the draws; decode_on_device_batch does the rest
                    data, W, H, device_jpeg = read_encoded(path)
                    if not device_jpeg:
                        image, data = decode_encoded(data, path), None     # PNG, CMYK ...: decoded here
                    else:
                        data = (data, H, W)                                 # collate_encoded's form
                else:
                    image = read_image(path)
            except DataError as e:
                warnings.warn(f"skipped: {e}")
                return None
            if self.cache is not None:
                self.cache[index] = image
        if image is not None:
            H, W = image.shape[-2:]
        keep = np.ones(len(ann.labels), bool) if self.keep_difficult else ~ann.difficult
        boxes = self.boxes_px(ann, as_array=True)[keep].clip(0, np.array([W, H, W, H], np.float32))
        labels = ann.labels[keep]
        p = AugmentParams()
        if self.train:
            p = AugmentParams.sample(np.random.default_rng([self.seed, self.epoch, index]), self.jitter, self.hsv)
        window = crop_window(W, H, p)
        boxes, kept = warp_boxes(boxes, window, self.image_size, p.flip)
        target = encode_target(boxes, labels[kept], self.image_size, self.S, self.C)
        info = [index, H, W, p.exposure, p.saturation]
        if data is not None:
            return data, target, torch.tensor(info + [*window, float(p.flip)], dtype=torch.float64)
        image = warp_image(image, window, self.image_size, p.flip, self.fill)
        if self.decode_on_device:
            info += [*window, 0.0]
        return image, target, torch.tensor(info, dtype=torch.float64)

    def finish_on_device(self, batch: list | None, device: torch.device) -> list | None:
        """A batch of ``decode_on_device=True`` (collated by :func:`collate_encoded`) decoded and
        warped on ``device``: ``[uint8 (N, 3, S, S), targets, info]``, or ``None``
        (:func:`decode_on_device_batch`)."""
        return decode_on_device_batch(batch, lambda i: self.items[i][0], self.image_size, self.fill, device)


def stack_images(images: Sequence[Tensor]) -> Tensor:
    """uint8 ``(3, S, S)`` images -> an ``(N, 3, S, S)`` batch, copied as they lie in memory: those
    of :func:`warp_image`, ``(S, S, 3)`` in memory, go row for row into an ``(N, S, S, 3)`` batch
    (in a loader worker straight into shared memory, as ``default_collate`` does), returned as its
    channels-last ``(N, 3, S, S)`` view. ``torch.stack`` would transpose them to NCHW on the way
    (0.3 ms per 448 px image on a CPU core), a job :func:`color_normalize` leaves to the device."""
    hwc = [im.permute(1, 2, 0) for im in images]
    if all(x.is_contiguous() for x in hwc):
        return torch.utils.data.default_collate(hwc).permute(0, 3, 1, 2)
    return torch.utils.data.default_collate(list(images))


JPEG_SOI = b"\xff\xd8\xff"


def is_device_jpeg(data: Tensor, mode: str) -> bool:
    """Whether a file's bytes, whose header PIL reads as ``mode``, are a JPEG that
    :func:`decode_on_device_batch` hands to the device's decoder: a colour (YCbCr) or grayscale one.
    CMYK and other JPEGs, and other formats, are decoded in the loader worker (nvJPEG may refuse
    them, or decode them otherwise than libjpeg)."""
    return bytes(data[:3].numpy()) == JPEG_SOI and mode in ("RGB", "L")


_DEVICE_DECODER_REFUSED: list[Path] = []     # the first image the device's JPEG decoder refused, if any


def collate_encoded(batch: list):
    """The collation for datasets with ``decode_on_device=True`` (``--gpu-decode``), whose items'
    first field is ``(bytes, height, width)`` for a JPEG (the size from its header, which the worker
    read) or, for other formats, the image the worker decoded and warped: the ``None`` of unreadable
    images dropped; the bytes concatenated into one tensor (one piece of shared memory per batch for
    the worker to hand over and to pin, not one per image) with ``offsets`` such that image ``i``'s
    bytes are ``data[offsets[i]:offsets[i + 1]]`` and ``sizes[i]`` its ``(height, width)`` (none and
    ``(0, 0)`` for an image decoded in the worker: those come in order in ``decoded``); the other
    fields batched as usual. Returns ``[(data, offsets, sizes, decoded), *fields]``, or ``None`` when
    no image is left."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    images, *rest = zip(*batch)
    encoded = [x if isinstance(x, tuple) else (x.new_empty(0), 0, 0) for x in images]
    offsets = torch.tensor([0] + [len(data) for data, _, _ in encoded]).cumsum(0)
    sizes = torch.tensor([[h, w] for _, h, w in encoded], dtype=torch.int64)
    decoded = [x for x in images if not isinstance(x, tuple)]
    return [(torch.cat([data for data, _, _ in encoded]), offsets, sizes, decoded),
            *(torch.utils.data.default_collate(list(f)) for f in rest)]


def decode_on_device_batch(batch: list | None, path_of: Callable[[int], Path], size: int, fill: Sequence[int],
                           device: torch.device) -> list | None:
    """Finish on ``device`` a batch collated by :func:`collate_encoded`: the JPEGs decoded together
    by ``torchvision.io.decode_jpeg`` (nvJPEG on a GPU) and each warped as its worker drew to
    ``size``, ``fill`` outside the image (:func:`warp_images` on the :data:`BATCHED_WARP_DEVICES`,
    else :func:`warp_image`), stacked with the images decoded
    in the workers. The last field is the items' info: column 0 the dataset index (``path_of``
    names its file), the last five ``(left, top, w, h, flip)``. Returns ``[uint8 (N, 3, size,
    size) on device, *fields]`` without the images that failed to decode (a warning names each),
    or ``None`` when none is left.

    On a CPU the pixels are the workers' own, bit for bit (the same functions; tests check); a GPU's
    decoder and its float resize round a little differently."""
    if batch is None:
        return None
    (data, offsets, sizes, worker_decoded), *fields = batch
    rows = fields[-1].tolist()          # info: index first, (left, top, w, h, flip) last
    bounds, hw = offsets.tolist(), sizes.tolist()
    others = iter(worker_decoded)
    items = [data[a:b] if b > a else next(others) for a, b in zip(bounds[:-1], bounds[1:])]
    jpegs = [i for i, x in enumerate(items) if x.dim() == 1]
    decoded = dict(zip(jpegs, _decode_jpegs([items[i] for i in jpegs], [path_of(int(rows[i][0])) for i in jpegs],
                                            [tuple(hw[i]) for i in jpegs], device)))
    keep = [i for i, x in enumerate(items) if x.dim() == 3 or decoded[i] is not None]
    if not keep:
        return None
    on_device = [i for i in keep if i in decoded]       # the JPEGs decoded here
    draws = [(tuple(int(v) for v in rows[i][-5:-1]), bool(rows[i][-1])) for i in on_device]   # (window, flip)
    if torch.device(device).type in BATCHED_WARP_DEVICES and on_device:
        warped = warp_images([decoded[i] for i in on_device], [win for win, _ in draws], size,
                             [flip for _, flip in draws], fill)                       # (M, 3, S, S)
    else:
        warped = [warp_image(decoded[i], win, size, flip, fill) for i, (win, flip) in zip(on_device, draws)]
    if isinstance(warped, Tensor) and len(on_device) == len(keep):
        images = warped                 # the usual batch on a GPU: every image a JPEG warped here
    else:                               # images decoded and warped in a worker come as they are
        by_index = dict(zip(on_device, warped))
        images = stack_images([by_index[i] if i in by_index else items[i].to(device, non_blocking=True)
                               for i in keep])
    if len(keep) < len(items):     # only when an image was dropped: indexing makes new tensors,
        keep_t = torch.tensor(keep)    # pinned again for the step's non-blocking copies
        fields = [f[keep_t].pin_memory() if f.is_pinned() else f[keep_t] for f in fields]
    return [images, *fields]


def batches_on_device(batches: Iterable, finish: Callable[[Any, torch.device], list | None],
                      device: torch.device, ahead: int = 2, thread: bool = True) -> Iterator[list | None]:
    """``finish(batch, device)`` for each of ``batches`` in order (``finish``: a dataset's
    ``finish_on_device``, for ``--gpu-decode``; it returns a list of tensors, or ``None``).

    On a GPU the finishing runs in a thread of its own (``thread=False``: in the caller's, as
    bench.py compares), which works on the batch the caller will ask for next and on ``ahead``
    more, on a CUDA stream of its own (:func:`_side_stream`). The thread: the decode and the warps
    cost the host 5-8 ms per 64 images (H200 machines), and torchvision's JPEG decode holds its
    caller until its images are done, which on a GPU busy with a training step can mean until the
    step's kernels let nvJPEG's run; done by the caller, the host would wait for the step and the
    step for the host (an H200, 2026-11-27, without the thread: 3,101 trained images/s against
    7,753 for the step alone and 7,684 for the data alone; with it, on another H200, 4,382 against
    8,764 and 8,181). PyTorch's and torchvision's calls release the GIL while they work, so the
    caller goes on queueing steps meanwhile. The stream: the decode waits for the earlier batches'
    decoding only (:func:`_decode_jpegs`), never for a step.

    Each batch is handed over safely to the stream that is current when the caller asks for it (the
    training step's): that stream waits for the event recorded after the batch's work on the side
    stream, and the batch's device tensors are marked as used by it (``record_stream``), so that
    their memory goes back to the side stream only once the caller's work on them is done. The
    warnings of a batch's finishing (a skipped image) are issued in the caller's thread as the
    batch is handed over (:func:`_warn`): the ``warnings`` filters are the process's, and one that
    the caller's thread has turned into errors for a moment (``decode_encoded``, in a loader
    without workers) must not raise in this thread. An error in ``finish`` or in ``batches``
    reaches the caller, with its traceback, after the batches before it."""
    device = torch.device(device)
    if device.type != "cuda":
        for batch in batches:
            yield finish(batch, device)
        return
    import concurrent.futures
    if device.index is None:    # the caller's current device; a new thread's would be device 0
        device = torch.device("cuda", torch.cuda.current_device())
    side = _side_stream(device)

    def finish_on_side(batch):
        _deferred.messages = []
        try:
            with torch.cuda.device(device), torch.cuda.stream(side):
                out = finish(batch, device)
                done = torch.cuda.Event()
                done.record(side)
            return out, done, _deferred.messages
        finally:
            _deferred.messages = None

    def hand_over(out, done, messages):
        for message in messages:
            warnings.warn(message)
        caller = torch.cuda.current_stream(device)
        caller.wait_event(done)
        _record_stream(out, caller)
        return out

    if not thread:
        for batch in batches:
            yield hand_over(*finish_on_side(batch))
        return
    it = iter(batches)          # iterated here, in the caller's thread; only finish runs in the other
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches_on_device")
    failed: Exception | None = None     # an error of the loader's, raised after the batches before it

    def submit_next(pending: collections.deque) -> None:
        nonlocal failed
        try:
            nxt = next(it, _END)
        except Exception as e:
            failed, nxt = e, _END
        if nxt is not _END:
            pending.append(pool.submit(finish_on_side, nxt))

    try:
        pending: collections.deque = collections.deque()
        for _ in range(ahead + 1):
            if failed is None:
                submit_next(pending)
        while pending:
            if failed is None:
                submit_next(pending)
            # one expression: while the caller has the batch, nothing here keeps it (it is freed, to the
            # side stream once the caller's queued work on it is done, as soon as the caller drops it)
            yield hand_over(*pending.popleft().result())
        if failed is not None:
            raise failed
    finally:                # also when the caller stops early: no batch is finished after this returns
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
_deferred = threading.local()      # in batches_on_device's thread: the messages _warn keeps for the caller


def _warn(message: str) -> None:
    """``warnings.warn(message)``, or in :func:`batches_on_device`'s thread, the message kept for
    the caller's thread to issue with the batch."""
    kept = getattr(_deferred, "messages", None)
    if kept is None:
        warnings.warn(message, stacklevel=2)
    else:
        kept.append(message)


def _record_stream(batch: list | None, stream: "torch.cuda.Stream") -> None:
    """Mark the batch's device tensors as used by ``stream`` (its memory is then reused only once
    the work queued on ``stream`` before the batch is freed has run)."""
    for t in batch or ():
        if isinstance(t, Tensor) and t.is_cuda:
            t.record_stream(stream)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The stream :func:`batches_on_device` finishes batches on, one per device for the process: a
    new one per epoch would strand the memory cached for the last one, and would come round-robin
    from the pool that NCCL takes its stream from (and, sharing it, wait for the all-reduce). High
    priority: a separate pool, and the small warp kernels go first."""
    return torch.cuda.Stream(device, priority=-1)


def _decode_jpegs(datas: list[Tensor], paths: list[Path], sizes: list[tuple[int, int]],
                  device: torch.device) -> list[Tensor | None]:
    """``datas`` (the files ``paths``) decoded to RGB on ``device``, all in one call; if that call
    fails, one by one, and an image the device's decoder refuses (a damaged JPEG, say) on the CPU:
    by :func:`decode_encoded` on a CPU device, by PIL (:func:`decode_pil`) for a GPU. ``None`` for
    an image nothing decodes, or whose size is not ``sizes``' ``(height, width)``, its header's (the
    worker drew its window from the header), with a warning naming the file.

    For a GPU this runs in :func:`batches_on_device`'s thread, where nothing may touch the
    ``warnings`` filters: they are the process's, and ``catch_warnings`` there would race with the
    training loop's own (``utils.step_scheduler``), which could leave UserWarnings raised as errors
    for good. nvJPEG raises on damaged data, and PIL does, where torchvision's libjpeg decode warns."""
    from torchvision.io import decode_jpeg

    def decode(data):
        if device.type == "cuda":
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)      # libjpeg's warnings on damaged data, as read_image
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    if not datas:
        return []
    if device.type == "cuda":
        # nvJPEG writes its outputs from its own stream without waiting for the work queued on ours, into
        # blocks the caching allocator may just have recycled from that work (the previous batch's warp,
        # say): wait for it first (pytorch/vision#9606; torchcodec added the same barrier, #1634). Under
        # batches_on_device "ours" is its side stream, which holds no training step: the wait is short.
        torch.cuda.current_stream(device).synchronize()
    try:
        out = decode(datas)
    except (RuntimeError, UserWarning):
        out = []
        for data, path in zip(datas, paths):
            try:
                out.append(decode(data))
            except (RuntimeError, UserWarning) as refused:
                try:
                    cpu = decode_pil(data, path) if device.type == "cuda" else decode_encoded(data, path)
                    out.append(cpu.to(device))
                except DataError as e:
                    _warn(f"skipped: {e}")
                    out.append(None)
                    continue
                if device.type != "cpu" and not _DEVICE_DECODER_REFUSED:    # once: it may refuse every image
                    _DEVICE_DECODER_REFUSED.append(path)
                    reason = str(refused).splitlines()[0][:200]
                    _warn(f"{path}: the {device.type} JPEG decoder refused it ({reason}); decoded on the "
                                  "CPU, as any other image it refuses will be (said once)")
    for k, (image, (h, w), path) in enumerate(zip(out, sizes, paths)):
        if image is not None and tuple(image.shape[-2:]) != (h, w):
            _warn(f"skipped: {path}: decoded to {image.shape[-1]}x{image.shape[-2]} pixels, its header says "
                          f"{w}x{h}")
            out[k] = None
    return out


def collate_skip_none(batch: list):
    """Default collation after dropping the ``None`` items of unreadable images; the images (the
    first of each item's fields) are batched by :func:`stack_images`."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    images, *rest = zip(*batch)
    return [stack_images(images), *(torch.utils.data.default_collate(list(field)) for field in rest)]
