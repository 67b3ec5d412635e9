"""Pictures of what a model sees and says: boxes, class names and scores drawn on images, side by
side ground truth | prediction, contact sheets, and the TensorBoard logging built on them.

Boxes are ``xyxy`` in continuous 0-based pixels of the image they are drawn on (utils.py's
convention): a box ``(10, 20, 50, 60)`` covers pixel columns 10..49 and rows 20..59, and its
outline is drawn on those pixels, inside the box. Images may be uint8 tensors ``(3, H, W)``,
``(1, H, W)`` or ``(H, W)``, uint8 numpy arrays ``(H, W, 3)`` or ``(H, W)``, or PIL images of any
mode and any size (a 1x1 image too); grayscale is drawn on as RGB so that colours show. Every
function returns a new RGB ``PIL.Image`` and leaves its input unchanged.

Line width and text size follow the image's size (``sqrt(H * W)``) unless given; text is Pillow's
built-in scalable font (no font file needed), on a filled label of the class colour, in black or
white, whichever reads better on that colour.

Why not torchvision.utils (0.29): ``draw_bounding_boxes`` ignores ``font_size`` unless given a
font file path (the built-in font is a ~10 px bitmap, unreadable on large images), always puts
the label inside the box's top-left corner even where that runs off the image, and draws the
outline through the pixel at x2 (one past the box); ``make_grid`` needs images of one size.
Pillow's ImageDraw, which torchvision itself uses, does the drawing here.
"""
from __future__ import annotations

import colorsys
import functools
import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

ImageLike = Any   # Tensor | np.ndarray | PIL.Image.Image, see the module docstring


# ----------------------------------------------------------------------------- colours and fonts

def class_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour for class ``label``: hues a golden-ratio step apart, so that
    neighbouring class ids differ strongly, with the brightness alternating between two levels."""
    hue = (0.6 + label * 0.618033988749895) % 1.0
    value = 1.0 if label % 2 == 0 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return round(255 * r), round(255 * g), round(255 * b)


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background`` (ITU-R BT.601 luma)."""
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


@functools.lru_cache(maxsize=64)
def get_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels (a fixed-size bitmap font where Pillow was built
    without FreeType)."""
    return ImageFont.load_default(size=size)


def auto_sizes(width: int, height: int) -> tuple[int, int]:
    """``(line_width, font_size)`` in pixels for an image of this size, growing with
    ``sqrt(width * height)``: 1 px lines below about 240 x 240 pixels, 3 px / 15 px text at 448 x 448;
    lines at most 8 px, text between 11 and 48 px. The geometric mean keeps very long thin
    images (3000 x 17) drawable."""
    base = math.sqrt(max(width, 1) * max(height, 1))
    return min(max(1, round(base / 160)), 8), min(max(round(base / 30), 11), 48)


# ----------------------------------------------------------------------------- conversion

def to_pil(image: ImageLike) -> Image.Image:
    """Any image of the module docstring -> a new RGB ``PIL.Image``. Raises ``ValueError`` naming
    the shape or dtype it cannot read (float images are refused: their range is ambiguous)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")   # always a copy
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 image tensor, got dtype {image.dtype} (convert normalised images "
                             "back to 0..255 uint8 first)")
        t = image.detach().cpu()
        if t.ndim == 3:
            if t.shape[0] not in (1, 3):
                raise ValueError(f"expected an image tensor (3, H, W), (1, H, W) or (H, W), got {tuple(t.shape)}")
            t = t.permute(1, 2, 0)
        array = t.numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got dtype {image.dtype}")
        array = image
    else:
        raise ValueError(f"expected a Tensor, numpy array or PIL image, got {type(image).__name__}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise ValueError(f"expected an (H, W, 3) or (H, W) image array with H, W >= 1, got {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def to_numpy(image: Image.Image) -> np.ndarray:
    """RGB ``PIL.Image`` -> uint8 ``(H, W, 3)`` array (TensorBoard's ``dataformats="HWC"``)."""
    return np.asarray(image.convert("RGB")).copy()


def _as_list(x: Tensor | np.ndarray | Sequence | None, n: int, name: str, dtype: type) -> list:
    if x is None:
        return []
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but there are {n} boxes")
    return [dtype(v) for v in arr.tolist()]


# ----------------------------------------------------------------------------- drawing

def draw_detections(image: ImageLike, boxes: Tensor | np.ndarray | Sequence, labels: Tensor | np.ndarray | Sequence,
                    scores: Tensor | np.ndarray | Sequence | None = None, class_names: Sequence[str] | None = None,
                    line_width: int | None = None, font_size: int | None = None) -> Image.Image:
    """Draw boxes ``(K, 4)`` (pixel ``xyxy`` of this image) with their class name and, when given,
    score (``"dog 0.87"``) on a copy of ``image``; returns it as an RGB ``PIL.Image``.

    Each box gets its class's colour (:func:`class_color`); its label sits on a filled patch of that
    colour just above the box, or inside the box's top edge when there is no room above, always
    shifted to stay on the image. Lower scores are drawn first, so the best box of a crowd is on
    top. Boxes partly or wholly outside the image are drawn clipped; a box must have
    ``x2 >= x1`` and ``y2 >= y1`` and finite coordinates, otherwise ``ValueError``.
    """
    out = to_pil(image)
    W, H = out.size
    if isinstance(boxes, Tensor):
        boxes = boxes.detach().cpu().numpy()
    box_arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    K = len(box_arr)
    label_list = _as_list(labels, K, "labels", int)
    score_list = _as_list(scores, K, "scores", float) if scores is not None else [None] * K
    if not np.isfinite(box_arr).all():
        raise ValueError(f"boxes hold non-finite coordinates: {box_arr[~np.isfinite(box_arr).all(1)][:3].tolist()}")
    bad = (box_arr[:, 2] < box_arr[:, 0]) | (box_arr[:, 3] < box_arr[:, 1])
    if bad.any():
        raise ValueError(f"boxes must be xyxy with x2 >= x1 and y2 >= y1, got {box_arr[bad][:3].tolist()}")
    auto_lw, auto_fs = auto_sizes(W, H)
    lw, fs = line_width or auto_lw, font_size or auto_fs
    font = get_font(fs)
    draw = ImageDraw.Draw(out)
    order = sorted(range(K), key=lambda i: -math.inf if score_list[i] is None else score_list[i])
    for i in order:
        x1, y1, x2, y2 = box_arr[i].tolist()
        label = label_list[i]
        color = class_color(label)
        # Pixel edges -> the pixels inside: continuous [x1, x2) covers columns floor(x1)..ceil(x2)-1;
        # PIL's rectangle includes both corners and draws its outline inward from them.
        px1, py1 = math.floor(x1), math.floor(y1)
        px2, py2 = max(px1, math.ceil(x2) - 1), max(py1, math.ceil(y2) - 1)
        draw.rectangle((px1, py1, px2, py2), outline=color, width=lw)
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        text = name if score_list[i] is None else f"{name} {score_list[i]:.2f}"
        _draw_label(draw, text, font, color, px1, py1, W, H, lw)
    return out


def _draw_label(draw: ImageDraw.ImageDraw, text: str, font, color: tuple[int, int, int], x: int, y: int,
                W: int, H: int, lw: int) -> None:
    """A filled label patch with ``text`` at the box corner ``(x, y)``: above the box, else inside it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, lw)
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    ly = y - th if y - th >= 0 else max(y, 0)
    lx = min(max(x, 0), max(W - tw, 0))
    draw.rectangle((lx, ly, lx + tw - 1, ly + th - 1), fill=color)
    draw.text((lx + pad - left, ly + pad - top), text, fill=text_color(color), font=font)


def draw_target(image: ImageLike, target: dict[str, Any], class_names: Sequence[str] | None = None,
                **kwargs: Any) -> Image.Image:
    """:func:`draw_detections` of a dict ``{"boxes", "labels"[, "scores"]}`` (the form of
    utils.decode_predictions' results and of ground truth)."""
    return draw_detections(image, target["boxes"], target["labels"], target.get("scores"), class_names, **kwargs)


def titled(image: ImageLike, title: str, font_size: int | None = None) -> Image.Image:
    """``image`` under a white bar holding ``title``; the width stays the image's (a title longer
    than a narrow image is cut)."""
    img = to_pil(image)
    fs = font_size or max(11, min(24, round(img.width / 20)))
    font = get_font(fs)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
    bar = bottom - top + 6
    out = Image.new("RGB", (img.width, img.height + bar), (255, 255, 255))
    ImageDraw.Draw(out).text((3 - left, 3 - top), title, fill=(0, 0, 0), font=font)
    out.paste(img, (0, bar))
    return out


def side_by_side(left: ImageLike, right: ImageLike, titles: tuple[str, str] | None = ("ground truth", "prediction"),
                 gap: int = 4) -> Image.Image:
    """Two images next to each other on white, ``gap`` pixels apart, each under its title (none when
    ``titles`` is None); images of different heights are top-aligned."""
    a, b = to_pil(left), to_pil(right)
    if titles is not None:
        fs = max(11, min(24, round(max(a.width, b.width) / 20)))
        a, b = titled(a, titles[0], fs), titled(b, titles[1], fs)
    out = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), (255, 255, 255))
    out.paste(a, (0, 0))
    out.paste(b, (a.width + gap, 0))
    return out


def make_grid(images: Sequence[ImageLike], cols: int = 3, cell: int = 320, gap: int = 4,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A contact sheet: each image scaled (antialiased, aspect kept, never enlarged) to fit a
    ``cell`` x ``cell`` square and centred in it, ``cols`` per row, ``gap`` pixels apart."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if cols < 1 or cell < 1 or gap < 0:
        raise ValueError(f"make_grid needs cols >= 1, cell >= 1, gap >= 0; got {cols}, {cell}, {gap}")
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * cell + (cols - 1) * gap, rows * cell + (rows - 1) * gap), background)
    for i, image in enumerate(images):
        img = to_pil(image)
        img.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        r, c = divmod(i, cols)
        sheet.paste(img, (c * (cell + gap) + (cell - img.width) // 2, r * (cell + gap) + (cell - img.height) // 2))
    return sheet


def classification_sheet(images: Tensor | Sequence[ImageLike], topk_indices: Tensor | np.ndarray,
                         topk_probs: Tensor | np.ndarray, class_labels: Sequence[str],
                         true_labels: Tensor | np.ndarray | Sequence[int] | None = None, cols: int = 4,
                         cell: int = 192) -> Image.Image:
    """Images with their top-k predicted classes: each image (fit into ``cell`` x ``cell``) above a
    caption listing ``class prob`` best first, the true class in green where it is among them
    and the top-1 in red where it is wrong, then ``true: class``. ``topk_indices`` and
    ``topk_probs`` are ``(N, k)``; ``class_labels`` maps a class index to its name (only the part
    before the first comma is shown, as in ImageNet's ``"tench, Tinca tinca"``)."""
    idx = np.asarray(topk_indices.cpu() if isinstance(topk_indices, Tensor) else topk_indices).reshape(len(images), -1)
    prob = np.asarray(topk_probs.float().cpu() if isinstance(topk_probs, Tensor) else topk_probs).reshape(idx.shape)
    true = None
    if true_labels is not None:
        true = np.asarray(true_labels.cpu() if isinstance(true_labels, Tensor) else true_labels).reshape(-1)
        if len(true) != len(images):
            raise ValueError(f"{len(true)} true labels for {len(images)} images")

    def short(k: int) -> str:
        return class_labels[k].split(",")[0][:24] if 0 <= k < len(class_labels) else str(k)

    fs = 11 if cell < 256 else 13
    font = get_font(fs)
    line = fs + 3
    lines = idx.shape[1] + (true is not None)
    tiles = []
    for n in range(len(images)):
        img = to_pil(images[n])
        img.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        tile = Image.new("RGB", (cell, cell + lines * line + 4), (255, 255, 255))
        tile.paste(img, ((cell - img.width) // 2, (cell - img.height) // 2))
        draw = ImageDraw.Draw(tile)
        y = cell + 2
        for j in range(idx.shape[1]):
            k = int(idx[n, j])
            color = (0, 0, 0)
            if true is not None and k == int(true[n]):
                color = (0, 140, 0)
            elif true is not None and j == 0:
                color = (200, 0, 0)
            draw.text((3, y), f"{short(k)} {prob[n, j]:.2f}", fill=color, font=font)
            y += line
        if true is not None:
            draw.text((3, y), f"true: {short(int(true[n]))}", fill=(90, 90, 90), font=font)
        tiles.append(tile)
    return make_grid(tiles, cols=cols, cell=max(t.height for t in tiles), gap=4)


# ----------------------------------------------------------------------------- TensorBoard

def log_detections(writer, tag: str, images_uint8: Tensor | Sequence[ImageLike], gt_list: Sequence[dict[str, Any]],
                   pred_list: Sequence[dict[str, Any]], class_names: Sequence[str], step: int) -> list[Image.Image]:
    """Log one ground truth | prediction picture per image to TensorBoard as ``<tag>/<i>``.

    ``gt_list[i]`` is ``{"boxes": (M, 4), "labels": (M,)}`` and ``pred_list[i]``
    ``{"boxes": (K, 4), "scores": (K,), "labels": (K,)}``, both in pixel ``xyxy`` of image i (as
    utils.decode_predictions returns them for the image's own size). Returns the pictures.
    """
    if not len(images_uint8) == len(gt_list) == len(pred_list):
        raise ValueError(f"log_detections: {len(images_uint8)} images, {len(gt_list)} ground truths and "
                         f"{len(pred_list)} predictions; they must match")
    pictures = []
    for i, image in enumerate(images_uint8):
        gt = {"boxes": gt_list[i]["boxes"], "labels": gt_list[i]["labels"]}   # ground truth shows no scores
        pair = side_by_side(draw_target(image, gt, class_names), draw_target(image, pred_list[i], class_names),
                            titles=("ground truth", f"prediction ({len(pred_list[i]['labels'])})"))
        writer.add_image(f"{tag}/{i}", to_numpy(pair), step, dataformats="HWC")
        pictures.append(pair)
    return pictures


def log_classifications(writer, tag: str, images_uint8: Tensor | Sequence[ImageLike], topk_indices: Tensor,
                        topk_probs: Tensor, class_labels: Sequence[str], true_labels: Tensor | Sequence[int] | None,
                        step: int, cols: int = 4) -> Image.Image:
    """Log a :func:`classification_sheet` of the images and their top-k classes as one TensorBoard
    image ``tag``; returns it."""
    sheet = classification_sheet(images_uint8, topk_indices, topk_probs, class_labels, true_labels, cols)
    writer.add_image(tag, to_numpy(sheet), step, dataformats="HWC")
    return sheet


@torch.no_grad()
def detection_samples(model: torch.nn.Module, dataset, device: torch.device, indices: Sequence[int] | None = None,
                      num_images: int = 8, conf_threshold: float = 0.25, nms_iou: float = 0.5, max_det: int = 100
                      ) -> tuple[list[Tensor], list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Run a detector on a fixed set of a dataset.VOCDetection's images for :func:`log_detections`.

    ``indices`` (default: ``num_images`` evenly spaced over the dataset, the same every call) pick
    the images. The model sees ``dataset[i]``'s image, i.e. evaluation's preprocessing when the
    dataset was built with ``train=False``; predictions are decoded by utils.decode_predictions
    at each original image size, and are returned with the original images (read again from
    disk) and their ground truth (every object, difficult ones too). ``model`` must be the plain
    module (not DDP-wrapped: this runs on one process); its train/eval mode is restored.
    Unreadable images are left out. Returns ``(images, ground truths, predictions)``.
    """
    from dataset import MEAN, STD, DataError, VOCDetection, color_normalize, read_image
    from utils import decode_predictions
    if indices is None:
        indices = sorted({round(float(v)) for v in np.linspace(0, len(dataset) - 1, min(num_images, len(dataset)))})
    items = [(i, dataset[i]) for i in indices]
    items = [(i, it) for i, it in items if it is not None]
    if not items:
        return [], [], []
    images = torch.stack([it[0] for _, it in items]).to(device)
    sizes = torch.stack([it[2][1:3] for _, it in items]).to(device)
    was_training = model.training
    model.eval()
    try:
        out = model(color_normalize(images, mean=MEAN, std=STD))
    finally:
        model.train(was_training)
    cfg = model.cfg
    preds = decode_predictions(out.float(), cfg.B, cfg.C, sizes, conf_threshold, nms_iou, max_det)
    originals, gts, kept = [], [], []
    for (i, _), p in zip(items, preds):
        path, ann = dataset.items[i]
        try:
            originals.append(read_image(path))
        except DataError:
            continue   # the file changed since dataset[i] read it; nothing to draw on
        gts.append({"boxes": VOCDetection.boxes_px(ann), "labels": torch.from_numpy(ann.labels)})
        kept.append({k: v.cpu() for k, v in p.items()})
    return originals, gts, kept
