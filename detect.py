"""Run a trained detector on image files and draw what it finds.

    python detect.py --checkpoint runs/detector/demo/best.pt data/demo/VOCdevkit/VOC2007/JPEGImages/0013*.jpg
    python detect.py --checkpoint best.pt photos/ more/*.png --conf 0.4 --classes dog cat --save-txt
    python detect.py --checkpoint best.pt test_images/ --grid docs/demo_detections.jpg --grid-count 6

SOURCE arguments are image files, folders (their image files, not recursive) or glob patterns
(quote them to use ``**``). Images run through the model in batches (on the GPU when there is
one) with evaluation's preprocessing: the whole image resized to the model's square input
(dataset.warp_image with the identity window, antialiased), then dataset.color_normalize. The
raw outputs are decoded by utils.decode_predictions, the very code of evaluation, at each image's
own size; only the default score threshold differs (0.25, what a person wants to look at, where
mAP needs 0.001).

Written into the output folder (``--out-dir``, default ``runs/detect/<name>``, numbered when
taken): every image with its boxes, class names and scores drawn (draw.py), at its original
size; ``detections.json`` with, per image, every detection's box (``xyxy``, continuous 0-based
pixels of the original image: pixel column i covers [i, i+1)), class and score; and with
``--save-txt`` a ``labels/<image>.txt`` per image, one ``class score x1 y1 x2 y2`` line per
detection. Unreadable files are skipped and listed at the end.
"""
from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import draw
from dataset import MEAN, STD, DataError, color_normalize, read_image, stack_images, warp_image
from model import YoloConfig, YOLOv1
from utils import (autocast_dtype, decode_predictions, finite_float, not_a_folder, parse_device,
                   prepare_for_inference, run_cli)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")   # what torchvision.io decodes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", required=True, help="train_detector.py checkpoint (best.pt / last.pt)")
    p.add_argument("--out-dir", default="", help="output folder (default: runs/detect/<--name>, with -2, -3 ... "
                                                 "appended when it exists)")
    p.add_argument("--name", default="", help="name of the default output folder (default: the checkpoint's "
                                              "folder name, e.g. 'demo' for runs/detector/demo/best.pt)")
    p.add_argument("--conf", type=finite_float, default=0.25,
                   help="keep detections whose class-specific score (confidence x class probability) is above "
                        "this (default: 0.25; evaluation uses 0.001)")
    p.add_argument("--iou", type=finite_float, default=0.5, help="per-class NMS IoU threshold (default: 0.5)")
    p.add_argument("--max-det", type=int, default=100, help="detections kept per image, best first (default: 100)")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="keep only these classes, by name or index (default: all)")
    p.add_argument("--save-txt", action="store_true",
                   help="also write labels/<image>.txt, one 'class score x1 y1 x2 y2' line (pixels) per detection")
    p.add_argument("--no-images", dest="save_images", action="store_false",
                   help="do not write the drawn images (detections.json is always written)")
    p.add_argument("--grid", default="", metavar="FILE",
                   help="also write a contact sheet of the first --grid-count drawn images to FILE (.jpg or .png)")
    p.add_argument("--grid-count", type=int, default=6, help="images on the --grid sheet (default: 6)")
    p.add_argument("--grid-cols", type=int, default=3, help="columns of the --grid sheet (default: 3)")
    p.add_argument("--grid-cell", type=int, default=320, help="pixels per --grid image, longest side (default: 320)")
    p.add_argument("--line-width", type=int, default=0, help="box line width in pixels, 0..64 (default: 0 = by image size)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto = cuda if present)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 where no bf16)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster on GPUs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for --batch-size (CUDA graphs on a GPU): a minute or more to "
                        "compile, then faster; for many images")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or args.max_det < 1:
        p.error("--batch-size and --max-det must be >= 1, --workers >= 0")
    if not 0 <= args.line_width <= 64:
        p.error(f"--line-width must be in 0..64 pixels (0: by image size), got {args.line_width}")
    if not 0.0 <= args.conf < 1.0 or not 0.0 <= args.iou <= 1.0:
        p.error("--conf must be in [0, 1) and --iou in [0, 1]")
    if args.grid and (args.grid_count < 1 or args.grid_cols < 1 or not 16 <= args.grid_cell <= 4096):
        p.error("--grid-count and --grid-cols must be >= 1, --grid-cell in 16..4096")
    if args.grid and Path(args.grid).suffix.lower() not in (".jpg", ".jpeg", ".png"):
        p.error(f"--grid {args.grid}: give a .jpg, .jpeg or .png file name")
    if args.grid and (Path(args.grid).is_dir() or (blocker := not_a_folder(Path(args.grid).parent))):
        p.error(f"--grid {args.grid}: {'a folder' if Path(args.grid).is_dir() else f'{blocker} is a file'}")
    return args


# ----------------------------------------------------------------------------- inputs

def find_images(sources: Sequence[str]) -> list[Path]:
    """Expand SOURCE arguments into image files, in the order given, each once.

    A file is used whatever its suffix (an unreadable one is skipped later, by name); a folder
    gives its files with an image suffix (:data:`IMAGE_SUFFIXES`, any case), sorted, not
    recursive; a glob pattern gives its matching image files, sorted. A source that is none of
    these, or a pattern or folder with no image, raises ``FileNotFoundError`` naming it.
    """
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"folder {path} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        elif glob.has_magic(source):
            matches = sorted(Path(f) for f in glob.glob(source, recursive=True)
                             if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"pattern {source!r} matches no image file ({', '.join(IMAGE_SUFFIXES)})")
        else:
            raise FileNotFoundError(f"{source} is not a file, a folder or a glob pattern that exists")
        found += matches
    seen: set[Path] = set()
    unique = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def preprocess(image: Tensor, image_size: int) -> Tensor:
    """uint8 ``(3, H, W)`` -> uint8 ``(3, image_size, image_size)``: evaluation's geometry exactly
    (dataset.VOCDetection with ``train=False``), i.e. :func:`dataset.warp_image` with the identity
    window, which resizes the whole image (bilinear, antialiased); the aspect ratio is not kept,
    as in training. dataset.color_normalize follows on the batch."""
    H, W = image.shape[-2:]
    return warp_image(image, (0, 0, W, H), image_size, False, (0, 0, 0))


class ImageFiles(Dataset):
    """Image files -> ``(index, original uint8 (3, H, W), model input uint8, error)``; an
    unreadable file gives ``(index, None, None, message naming the file)``."""

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, Tensor | None, str | None]:
        try:
            image = read_image(self.paths[index], exif_orientation=True)   # photos: upright, as displayed
        except DataError as e:
            return index, None, None, str(e)
        return index, image, preprocess(image, self.image_size), None


def _as_list(batch: list) -> list:
    return batch


# ----------------------------------------------------------------------------- model

def load_detector(path: str | Path) -> tuple[YOLOv1, YoloConfig, list[str], dict[str, Any]]:
    """The detector of a train_detector.py checkpoint, in eval mode, with its class names, via
    evaluate.load_model (strict loading, clear errors)."""
    from evaluate import load_model
    model, cfg, ckpt = load_model(path)
    return model.eval(), cfg, [str(c) for c in ckpt["class_names"]], ckpt


def parse_classes(classes: Sequence[str] | None, class_names: Sequence[str]) -> list[int] | None:
    """``--classes`` (names or indices) -> sorted class indices; ``ValueError`` naming an unknown one."""
    if not classes:
        return None
    out = set()
    for c in classes:
        if c in class_names:
            out.add(list(class_names).index(c))
        elif c.isdigit() and int(c) < len(class_names):
            out.add(int(c))
        else:
            raise ValueError(f"--classes {c!r} is neither a class name nor an index of {list(class_names)}")
    return sorted(out)


@torch.no_grad()
def detect_batch(model: torch.nn.Module, images: Tensor, image_sizes: Tensor, cfg: YoloConfig, device: torch.device,
                 conf: float = 0.25, iou: float = 0.5, max_det: int = 100, classes: Sequence[int] | None = None,
                 amp: bool = False) -> list[dict[str, Tensor]]:
    """Preprocessed uint8 images ``(N, 3, s, s)`` -> per image ``{"boxes", "scores", "labels"}`` (CPU
    tensors; boxes pixel ``xyxy`` of the original ``image_sizes (N, 2)`` = ``(height, width)``),
    best first. Decoding is utils.decode_predictions; with ``classes``, the other classes are
    dropped before the ``max_det`` best are kept."""
    x = color_normalize(images.to(device, non_blocking=True), mean=MEAN, std=STD)
    with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=amp):
        out = model(x)
    every = cfg.S * cfg.S * cfg.B * cfg.C   # with a class filter, cap only after filtering
    dets = decode_predictions(out.float(), cfg.B, cfg.C, image_sizes.to(device), conf, iou,
                              every if classes is not None else max_det)
    results = []
    for d in dets:
        if classes is not None:
            keep = torch.isin(d["labels"], torch.tensor(list(classes), device=d["labels"].device))
            d = {k: v[keep][:max_det] for k, v in d.items()}
        results.append({k: v.cpu() for k, v in d.items()})
    return results


# ----------------------------------------------------------------------------- outputs

def claim_out_dir(out_dir: str, name: str) -> Path:
    """``out_dir`` as given (created if needed), or the first of runs/detect/<name>, <name>-2, ...
    that does not exist, created atomically (two runs started together get different folders)."""
    if out_dir:
        path = Path(out_dir)
        if blocker := not_a_folder(path):
            raise ValueError(f"--out-dir {path}: {blocker} is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path("runs/detect") / name
    base.parent.mkdir(parents=True, exist_ok=True)
    path, k = base, 2
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path, k = base.with_name(f"{base.name}-{k}"), k + 1


def refuse_to_overwrite_inputs(files: Sequence[Path], out_dir: str, grid: str, save_images: bool = True) -> None:
    """``ValueError`` when the outputs could land on an input image: an ``--out-dir`` that holds one
    when drawn images are written (they take the inputs' names), or a ``--grid`` file that is one."""
    if save_images and out_dir and Path(out_dir).is_dir():
        folder = Path(out_dir).resolve()
        inside = [f for f in files if f.resolve().parent in (folder, folder / "labels")]
        if inside:
            raise ValueError(f"--out-dir {out_dir} holds input images (e.g. {inside[0]}): the drawn images would "
                             "overwrite them; give another folder")
    if grid and Path(grid).exists() and any(f.resolve() == Path(grid).resolve() for f in files):
        raise ValueError(f"--grid {grid} is one of the input images: refusing to overwrite it")


def output_name(path: Path, used: set[str]) -> str:
    """File name of a drawn image: the source's stem with .png kept for PNG and .jpg otherwise,
    ``-2``, ``-3`` ... appended when two sources share a stem (``a.jpg`` and ``a.png`` too: the
    label file, ``labels/<stem>.txt``, must be unique as well)."""
    suffix = ".png" if path.suffix.lower() == ".png" else ".jpg"
    stem, k = path.stem, 2
    while stem.lower() in used:
        stem, k = f"{path.stem}-{k}", k + 1
    used.add(stem.lower())
    return f"{stem}{suffix}"


def detections_to_json(det: dict[str, Tensor], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One image's detections as JSON-ready dicts, boxes rounded to 0.01 pixel, scores to 1e-4."""
    return [{"box": [round(float(v), 2) for v in b], "class": class_names[int(lab)], "class_id": int(lab),
             "score": round(float(s), 4)}
            for b, s, lab in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())]


def save_image(image, path: Path) -> None:
    """Save a PIL image as JPEG (quality 90) or PNG by ``path``'s suffix."""
    if path.suffix.lower() == ".png":
        image.save(path, optimize=True)
    else:
        image.save(path, quality=90)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the command line; returns the summary that detections.json holds."""
    args = parse_args(argv)
    device = parse_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} was asked for but CUDA is not available")
    files = find_images(args.sources)
    model, cfg, class_names, ckpt = load_detector(args.checkpoint)
    model = prepare_for_inference(model, device, args.channels_last, args.amp, args.batch_size if args.compile else 0)
    classes = parse_classes(args.classes, class_names)
    name = args.name or Path(args.checkpoint).resolve().parent.name or "exp"
    refuse_to_overwrite_inputs(files, args.out_dir, args.grid, args.save_images)
    out_dir = claim_out_dir(args.out_dir, name)
    if args.save_txt:
        (out_dir / "labels").mkdir(exist_ok=True)
    epoch = (ckpt.get("state") or {}).get("epoch")
    print(f"{args.checkpoint}{f' (after epoch {epoch})' if epoch is not None else ''}: {cfg.image_size}px input, "
          f"{cfg.C} classes {class_names}")
    print(f"{len(files)} image(s) on {device}; score > {args.conf}, NMS IoU {args.iou}, max {args.max_det} per image"
          f"{f', classes {[class_names[c] for c in classes]}' if classes is not None else ''}; output: {out_dir}")
    del ckpt

    loader = DataLoader(ImageFiles(files, cfg.image_size), batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=_as_list, pin_memory=device.type == "cuda")
    images_out: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    grid_tiles = []
    used: set[str] = set()
    t0, n_det = time.perf_counter(), 0
    bar = tqdm(total=len(files), unit="img", desc="detect", disable=not args.progress, dynamic_ncols=True)
    for batch in loader:
        good = [item for item in batch if item[1] is not None]
        skipped += [{"file": str(files[i]), "error": err} for i, _, _, err in batch if err is not None]
        if good:
            inputs = stack_images([x for _, _, x, _ in good])
            sizes = torch.tensor([list(img.shape[-2:]) for _, img, _, _ in good])
            dets = detect_batch(model, inputs, sizes, cfg, device, args.conf, args.iou, args.max_det, classes,
                                args.amp)
            for (i, image, _, _), det in zip(good, dets):
                out_name = output_name(files[i], used)
                entry = {"file": str(files[i]), "image": out_name if args.save_images else None,
                         "height": int(image.shape[1]), "width": int(image.shape[2]),
                         "detections": detections_to_json(det, class_names)}
                n_det += len(entry["detections"])
                if args.save_images or (args.grid and len(grid_tiles) < args.grid_count):
                    picture = draw.draw_target(image, det, class_names, line_width=args.line_width or None)
                    if args.save_images:
                        save_image(picture, out_dir / out_name)
                    if args.grid and len(grid_tiles) < args.grid_count:
                        grid_tiles.append(picture)
                if args.save_txt:
                    (out_dir / "labels" / f"{Path(out_name).stem}.txt").write_text("".join(
                        f"{d['class']} {d['score']:.4f} {' '.join(f'{v:.2f}' for v in d['box'])}\n"
                        for d in entry["detections"]))
                images_out.append(entry)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0

    summary = {"checkpoint": str(args.checkpoint), "class_names": class_names,
               "box_format": "xyxy, continuous 0-based pixels of the original image (pixel column i covers [i, i+1))",
               "thresholds": {"conf": args.conf, "iou": args.iou, "max_det": args.max_det,
                              "classes": None if classes is None else [class_names[c] for c in classes]},
               "images": images_out, "skipped": skipped,
               "num_images": len(images_out), "num_detections": n_det, "seconds": round(seconds, 3)}
    (out_dir / "detections.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.grid:
        if not grid_tiles:
            print(f"--grid {args.grid}: no image was readable; nothing written")
        else:
            grid_path = Path(args.grid)
            grid_path.parent.mkdir(parents=True, exist_ok=True)
            sheet = draw.make_grid(grid_tiles, cols=args.grid_cols, cell=args.grid_cell)
            if grid_path.suffix.lower() == ".png":
                sheet.save(grid_path, optimize=True)
            else:
                sheet.save(grid_path, quality=85, optimize=True)
            summary["grid"] = str(grid_path)
            print(f"contact sheet of {len(grid_tiles)} image(s): {grid_path} ({grid_path.stat().st_size / 1024:.0f} KB)")
    print(f"{n_det} detection(s) in {len(images_out)} image(s) in {seconds:.2f}s "
          f"({len(images_out) / max(seconds, 1e-9):.1f} img/s); results in {out_dir}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):")
        for s in skipped:
            print(f"  {s['error']}")
        if not images_out:
            raise DataError(f"none of the {len(skipped)} input file(s) could be read (listed above and in "
                            f"{out_dir / 'detections.json'})")
    return summary


if __name__ == "__main__":
    run_cli(main)
