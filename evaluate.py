"""Evaluate a YOLOv1 checkpoint, or a folder of VOC result files, with the PASCAL VOC metric.

    python evaluate.py --checkpoint runs/detector/voc/best.pt --data-root ~/data --set 2007-test
    python evaluate.py --checkpoint runs/detector/demo/best.pt --data demo --json runs/eval.json
    python evaluate.py --checkpoint best.pt --data-root ~/data --save-results runs/results/2007-test
    python evaluate.py --results runs/results/2007-test --data-root ~/data --set 2007-test
    torchrun --nproc-per-node=8 evaluate.py --checkpoint best.pt --data-root ~/data
    python evaluate.py --bench                       # scoring and annotation loading times

With a checkpoint, the model runs over the set (batched, on the GPU when there is one, each
torchrun process a shard of the images) and is scored by the very code train_detector.py uses:
utils.predict, voc_eval.detections_from_pixels, dataset.VOCDetection.ground_truth and
voc_eval.evaluate_detections. With ``--results`` no model runs: the official result files
``comp4_det_<split>_<class>.txt`` (VOC 1-based pixels) are scored against the annotations alone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

import dataset
from dataset import VOC_CLASSES, DataError, VOCDetection, collate_skip_none, image_set_ids, parse_image_set, \
    parse_voc_xml, resolve_voc_root
from model import YoloConfig, YOLOv1
from utils import (ModelEMA, ShardSampler, cleanup_distributed, finite_float, load_checkpoint, load_weights,
                   not_a_folder, predict, prepare_for_inference, require_checkpoint, run_cli, setup_distributed,
                   write_json)
from voc_eval import (GroundTruth, bench as bench_scoring, detections_from_pixels, evaluate_detections, format_table,
                      read_results_dir, write_results_dir)

REPO = Path(__file__).resolve().parent
DEFAULT_CACHE = REPO / "data" / "cache" / "voc_annotations"   # data/ is git-ignored
CACHE_VERSION = 1   # bump when the cache file layout changes
RESULTS_PREFIX = "comp4_det_"   # comp4: trained with data from outside VOC (ImageNet pretraining)


# ----------------------------------------------------------------------------- options

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default="", help="train_detector.py checkpoint (best.pt / last.pt) to run")
    src.add_argument("--results", default="", help="folder of VOC result files comp4_det_<split>_<class>.txt to score "
                                                   "without a model")
    src.add_argument("--bench", action="store_true", help="time scoring and annotation loading on generated data, "
                                                          "print the numbers and exit")
    p.add_argument("--data", choices=["voc", "demo"], default="voc",
                   help="class list and data: voc = the 20 VOC classes; demo = the generated shapes "
                        "(data/demo, made by demo_data.py when --data-root is not given) (default: voc)")
    p.add_argument("--data-root", default="", help="folder holding VOCdevkit (or VOCdevkit itself)")
    p.add_argument("--set", default="2007-test", help="image set, YEAR-SPLIT joined by '+' (default: 2007-test)")
    p.add_argument("--metric", choices=["auto", "voc07", "area"], default="auto",
                   help="voc07 = VOC2007 11-point AP, area = VOC2010+ area under the precision envelope; "
                        "auto = voc07 for 2007-2009 sets, area for 2010+ (default: auto)")
    p.add_argument("--iou-threshold", type=finite_float, default=0.5,
                   help="IoU a detection needs (strictly more) to match a ground-truth box (default: 0.5)")
    p.add_argument("--conf-threshold", type=finite_float, default=0.001,
                   help="detections scoring at most this are dropped (darknet's VOC validation) (default: 0.001)")
    p.add_argument("--nms-iou", type=finite_float, default=0.5, help="per-class NMS IoU threshold (default: 0.5)")
    p.add_argument("--max-det", type=int, default=300,
                   help="detections kept per image, best first, as in training; 0 = no cap, as darknet (default: 300)")
    p.add_argument("--save-results", default="", help="also write the detections as VOC result files into this folder")
    p.add_argument("--results-prefix", default=RESULTS_PREFIX, help=f"result file prefix (default: {RESULTS_PREFIX})")
    p.add_argument("--json", default="", help="write the per-class AP and the mAP to this JSON file")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, per process (default: 32)")
    p.add_argument("--workers", type=int, default=4, help="data loader processes per process (default: 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto = cuda if present)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 where no bf16)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster on GPUs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for --batch-size (CUDA graphs on a GPU): a minute or more to "
                        "compile, then faster; for large sets")
    p.add_argument("--annotation-cache", default=str(DEFAULT_CACHE),
                   help="folder of the parsed-annotation cache used with --results ('' = off) "
                        f"(default: {DEFAULT_CACHE.relative_to(REPO)} in the repository)")
    p.add_argument("--bench-images", type=int, default=5000, help="images in --bench (default: 5000)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    if not (args.checkpoint or args.results or args.bench):
        p.error("give --checkpoint (run a model), --results (score result files) or --bench")
    if args.results and args.save_results:
        p.error("--save-results writes the detections of a --checkpoint; with --results they are already files")
    if args.batch_size < 1 or args.workers < 0 or args.max_det < 0:
        p.error("--batch-size must be >= 1, --workers and --max-det >= 0")
    if not 0.0 <= args.iou_threshold < 1.0 or not 0.0 <= args.nms_iou <= 1.0:
        p.error("--iou-threshold must be in [0, 1) and --nms-iou in [0, 1]")
    if not 0.0 <= args.conf_threshold <= 1.0:
        p.error(f"--conf-threshold must be in [0, 1], got {args.conf_threshold}")
    # output paths that cannot be written are found now, not after the whole evaluation
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json} is a folder; give a file name")
    if args.json and Path(args.json).exists() and Path(args.json).suffix.lower() != ".json":
        p.error(f"--json {args.json} exists and is not a .json file (the checkpoint?): refusing to overwrite it")
    for flag, value, folder in (("--json", args.json, Path(args.json).parent),
                                ("--save-results", args.save_results, Path(args.save_results))):
        if value and (blocker := not_a_folder(folder)):
            p.error(f"{flag} {value}: {blocker} is a file, not a folder")
    return args


def default_metric(image_set: str) -> str:
    """'voc07' (11-point AP) for sets of 2007-2009, 'area' for 2010+, the devkits' own rule."""
    years = {int(y) for y, _ in parse_image_set(image_set)}
    if all(y < 2010 for y in years):
        return "voc07"
    if all(y >= 2010 for y in years):
        return "area"
    raise ValueError(f"--set {image_set} mixes years before and after 2010, whose devkits use different "
                     "AP definitions; choose one with --metric voc07 or --metric area")


def results_split(image_set: str) -> str:
    """The ``<split>`` of result file names: ``2007-test`` -> ``test`` (the official name); a set
    of several parts keeps its whole spec, e.g. ``2007-test+2012-val``."""
    parts = parse_image_set(image_set)
    return parts[0][1] if len(parts) == 1 else image_set.replace(" ", "")


def data_source(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Root folder and class list for ``--data``. Demo: data/demo, generated if needed, unless
    ``--data-root`` names an existing demo tree (used as is, e.g. a small one in a test)."""
    if args.data == "demo":
        from demo_data import DEMO_CLASSES, make_demo_voc
        if args.data_root:
            return Path(args.data_root), list(DEMO_CLASSES)
        if not torch.distributed.is_initialized():
            make_demo_voc("data/demo")   # safe in concurrent processes: one tree is installed atomically
        else:
            if torch.distributed.get_rank() == 0:
                make_demo_voc("data/demo")
            torch.distributed.barrier()
        return Path("data/demo"), list(DEMO_CLASSES)
    if not args.data_root:
        raise ValueError("--data voc needs --data-root (the folder holding VOCdevkit)")
    return Path(args.data_root), list(VOC_CLASSES)


# ----------------------------------------------------------------------------- ground truth with a cache

def _parser_fingerprint() -> str:
    """Hash of everything that decides what parse_voc_xml returns besides the file: its module's
    source and this cache's layout. Editing dataset.py therefore empties the cache."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"cache v{CACHE_VERSION}\n".encode())
    h.update(Path(dataset.__file__).read_bytes())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str, class_names: list[str]) -> dict[str, list]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"warning: annotation cache {path} unreadable ({e}); rebuilding it", file=sys.stderr)
        return {}
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint or data.get("classes") != class_names:
        return {}   # made by another parser or for other classes: start afresh, it is overwritten below
    return data.get("entries", {})


def _write_cache(path: Path, fingerprint: str, class_names: list[str], entries: dict[str, list]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "classes": class_names, "entries": entries}))
        os.replace(tmp, path)   # atomic: concurrent readers see the old or the new file, never half of one
    except OSError as e:
        print(f"warning: annotation cache not written to {path} ({e}); the next run parses again", file=sys.stderr)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def load_ground_truth(data_root: str | Path, image_set: str, class_names: Sequence[str],
                      cache_dir: str | Path | None = DEFAULT_CACHE
                      ) -> tuple[dict[str, GroundTruth], list[tuple[str, str]]]:
    """Ground truth of an image set from its annotations alone (no image files needed).

    Returns ``(image id -> GroundTruth, report)``; ids, skipped files and the report follow
    :class:`dataset.VOCDetection` rule for rule (unsafe or duplicate ids, missing or unparseable
    annotations are reported and left out; ids carry a ``YEAR_`` prefix when the set has several
    parts), except that a missing JPEG is no reason to drop an image here: the metric needs only
    annotations. Parsing goes through :func:`dataset.parse_voc_xml`.

    With ``cache_dir``, parsed annotations are kept in one JSON file per (VOC root, set), keyed
    per file by the BLAKE2 hash of its bytes; every file is still read on every call, so an edited
    file is parsed again whatever its size or mtime. The cache also holds a fingerprint of
    dataset.py and the class list, and is ignored when they differ: it cannot serve stale data.
    """
    class_names = list(class_names)
    root = resolve_voc_root(data_root)
    parts = parse_image_set(image_set)
    cache_file, entries, fingerprint = None, {}, ""
    if cache_dir:
        fingerprint = _parser_fingerprint()
        key = _digest(f"{root.resolve()}\n{image_set}".encode())
        cache_file = Path(cache_dir) / f"{key}.json"
        entries = _read_cache(cache_file, fingerprint, class_names)
    fresh: dict[str, list] = {}
    gt: dict[str, GroundTruth] = {}
    report: list[tuple[str, str]] = []
    for year, image_id, voc in image_set_ids(root, image_set, report):
        xml = f"{voc}{os.sep}Annotations{os.sep}{image_id}.xml"   # plain strings: pathlib costs more than hashing here
        try:
            with open(xml, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, IsADirectoryError):
            report.append((xml, "annotation file missing; id skipped"))
            continue
        digest, rel = _digest(raw), f"VOC{year}/{image_id}"
        entry = entries.get(rel)
        if entry is None or entry[0] != digest:
            try:
                ann, problems = parse_voc_xml(xml, class_names)
            except DataError as e:
                report.append((xml, str(e).split(": ", 1)[-1] + "; id skipped"))
                continue
            entry = [digest, ann.boxes.tolist(), ann.labels.tolist(), ann.difficult.tolist(), problems]
            with open(xml, "rb") as f:
                if _digest(f.read()) != digest:   # rewritten while parsed: do not cache that parse
                    entry[0] = ""
        fresh[rel] = entry
        report += [(xml, p) for p in entry[4]]
        name = image_id if len(parts) == 1 else f"{year}_{image_id}"
        gt[name] = GroundTruth(np.array(entry[1], np.float64).reshape(-1, 4), np.array(entry[2], np.int64),
                               np.array(entry[3], bool))
    if not gt:
        raise DataError(f"image set {image_set!r} under {root} holds no usable annotation")
    if cache_file is not None and fresh != entries:
        _write_cache(cache_file, fingerprint, class_names, fresh)
    return gt, report


def bench_annotation_loading(tmpdir: str | Path, n: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Write ``n`` VOC-like annotation files (1-5 objects of the VOC classes, 10% difficult, the
    tags of real VOC2007 files) with an ``ImageSets/Main/test.txt`` under ``tmpdir``, then time
    building the ground truth from them: ``no_cache`` (parse every file, as dataset.VOCDetection
    does), ``cold`` (parse and fill an empty cache) and ``warm`` (cache filled; best of 3). The
    files were just written, so all three read from the page cache, not the disk."""
    rng = np.random.default_rng(seed)
    voc = Path(tmpdir) / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(1, n + 1)]
    for image_id in ids:
        W, H = int(rng.integers(300, 501)), int(rng.integers(200, 501))
        objects = []
        for _ in range(int(rng.integers(1, 6))):
            x1, y1 = int(rng.integers(1, W - 20)), int(rng.integers(1, H - 20))
            x2, y2 = int(rng.integers(x1 + 10, W + 1)), int(rng.integers(y1 + 10, H + 1))
            objects.append(
                f"\t<object>\n\t\t<name>{VOC_CLASSES[int(rng.integers(20))]}</name>\n\t\t<pose>Unspecified</pose>\n"
                f"\t\t<truncated>{int(rng.integers(2))}</truncated>\n\t\t<difficult>{int(rng.random() < 0.1)}"
                f"</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n"
                f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n")
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>The VOC2007 Database</database>\n\t\t<annotation>PASCAL VOC2007"
            f"</annotation>\n\t\t<image>flickr</image>\n\t</source>\n\t<owner>\n\t\t<name>bench</name>\n"
            f"\t</owner>\n\t<size>\n\t\t<width>{W}</width>\n\t\t<height>{H}</height>\n\t\t<depth>3</depth>\n"
            f"\t</size>\n\t<segmented>0</segmented>\n{''.join(objects)}</annotation>\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{s}\n" for s in ids))
    cache = Path(tmpdir) / "cache"

    def timed(cache_dir: Path | None) -> tuple[float, dict[str, GroundTruth]]:
        t0 = time.perf_counter()
        gt, _ = load_ground_truth(tmpdir, "2007-test", VOC_CLASSES, cache_dir)
        return time.perf_counter() - t0, gt

    no_cache, gt = timed(None)
    cold, _ = timed(cache)
    warm = min(timed(cache)[0] for _ in range(3))
    return {"num_images": len(gt), "num_objects": int(sum(len(g.labels) for g in gt.values())),
            "no_cache_seconds": no_cache, "cold_seconds": cold, "warm_seconds": warm}


# ----------------------------------------------------------------------------- model

def load_model(path: str | Path, class_names: Sequence[str] | None = None, data: str = "") -> tuple[YOLOv1, YoloConfig, dict]:
    """Build the detector a train_detector.py checkpoint describes and load its weights (strictly).
    Raises ValueError naming the checkpoint when keys are missing, its classes differ from the
    data's (``class_names``; None takes the checkpoint's own) or its weights do not fit its own
    model config."""
    ckpt = load_checkpoint(path)
    require_checkpoint(ckpt, path, "train_detector.py", ("model", "model_config", "class_names"))
    saved = list(ckpt["class_names"])
    if class_names is not None and saved != list(class_names):
        trained_on = (ckpt.get("config") or {}).get("data")
        hint = f"; it was trained with --data {trained_on}" if trained_on and trained_on != data else ""
        raise ValueError(f"checkpoint {path} was trained on {len(saved)} classes {saved}, but --data {data} has "
                         f"{len(class_names)} classes {list(class_names)}{hint}")
    cfg = YoloConfig.from_dict(ckpt["model_config"], f"checkpoint {path}")
    if cfg.C != len(saved):
        raise ValueError(f"checkpoint {path}: model_config has C={cfg.C} but class_names lists {len(saved)} classes")
    model = YOLOv1(cfg)
    ema = ckpt.get("ema")
    if ema:
        ModelEMA.check_state(ema, path, ("module",))
    # the weight average when trained with one
    load_weights(model, ema["module"] if ema else ckpt["model"], path, "weight-average" if ema else "model")
    return model, cfg, ckpt


# ----------------------------------------------------------------------------- output

def summarize(result: dict, **extra: Any) -> dict[str, Any]:
    """The JSON-ready part of an evaluate_detections result: metric, mAP, per-class AP, npos and
    ndet (no curves), plus ``extra``. NaN (a class without ground truth) stays NaN here."""
    return {"metric": result["metric"], "map": result["map"], "ap": dict(result["ap"]),
            "per_class": {k: {"ap": v["ap"], "npos": v["npos"], "ndet": v["ndet"]}
                          for k, v in result["per_class"].items()}, **extra}


def check_results_dir(path: Path, class_names: Sequence[str], split: str, prefix: str) -> list[str]:
    """Refuse a results folder with no file for any class of this split (wrong --set, --data or
    --results-prefix would otherwise score 0), or with files of classes the data does not have;
    return the classes without a file (scored as no detections)."""
    if not path.is_dir():
        raise FileNotFoundError(f"results folder {path} " + ("is a file" if path.exists() else "does not exist"))
    pattern = re.compile(re.escape(f"{prefix}{split}_") + r"(.+)\.txt")
    found = {m.group(1): f.name for f in path.iterdir() if (m := pattern.fullmatch(f.name))}
    foreign = sorted(set(found) - set(class_names))
    if foreign:
        raise ValueError(f"results folder {path}: {[found[c] for c in foreign]} name classes that are not in "
                         f"--data's list {list(class_names)}; wrong --data?")
    if not found:
        present = sorted(f.name for f in path.iterdir() if f.suffix == ".txt")[:5]
        raise ValueError(f"results folder {path} has no {prefix}{split}_<class>.txt file for --set's split "
                         f"{split!r} (found {present or 'no .txt files'}); check --set and --results-prefix")
    return [c for c in class_names if c not in found]


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the command line; returns the summary (what --json writes, NaN for classes without
    ground truth), or the benchmark numbers with --bench."""
    args = parse_args(argv)
    if args.bench:
        return run_bench(args.bench_images)
    metric = default_metric(args.set) if args.metric == "auto" else args.metric
    use_07 = metric == "voc07"
    split = results_split(args.set)

    if args.results:
        rank = int(os.environ.get("RANK", "0"))
        root, class_names = data_source(args)
        t0 = time.perf_counter()
        gt, report = load_ground_truth(root, args.set, class_names, args.annotation_cache or None)
        t_ann = time.perf_counter() - t0
        results = Path(args.results)
        no_file = check_results_dir(results, class_names, split, args.results_prefix)
        dets = read_results_dir(results, class_names, split, args.results_prefix)
        t0 = time.perf_counter()
        try:
            result = evaluate_detections(dets, gt, class_names, args.iou_threshold, use_07)
        except ValueError as e:
            raise ValueError(f"results in {results} against --set {args.set} under {root}: {e}") from None
        t_score = time.perf_counter() - t0
        summary = summarize(result, set=args.set, data_root=str(root), source={"results": str(results)},
                            num_images=len(gt), num_detections=int(sum(len(d[0]) for d in dets.values())),
                            seconds={"annotations": t_ann, "score": t_score})
        if rank == 0:
            print(f"{results}: {summary['num_detections']} detections of {len(gt)} images of {args.set} "
                  f"from {root} (annotations read in {t_ann:.2f}s)")
            _print_report(report)
            lost = [c for c in no_file if result["per_class"][c]["npos"]]
            if lost:   # scored as no detections, as the devkit would; said, since a file may have been lost
                print(f"{results}: no {args.results_prefix}{split}_<class>.txt file for {', '.join(lost)}, of which "
                      f"the set has objects: scored as no detections (AP 0)")
            _finish(summary, result, args)
        return summary

    # ---- with a model: processes, device
    rank, world, _, device = setup_distributed(args.device)
    is_main = rank == 0
    if device.type == "cuda":   # as in train_detector.py, so both report the same number
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    root, class_names = data_source(args)
    model, cfg, ckpt = load_model(args.checkpoint, class_names, args.data)
    model = prepare_for_inference(model, device, args.channels_last, args.amp, args.batch_size if args.compile else 0)

    # ---- data: the same dataset and ground truth as train_detector.evaluate
    t0 = time.perf_counter()
    ds = VOCDetection(root, args.set, class_names, cfg.image_size, cfg.S, train=False)
    gt = ds.ground_truth()
    t_ann = time.perf_counter() - t0
    loader = DataLoader(ds, args.batch_size, sampler=ShardSampler(len(ds), rank, world), num_workers=args.workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_skip_none)
    max_det = args.max_det or cfg.S * cfg.S * cfg.B * cfg.C   # 0: every box of every class can stay
    if is_main:
        epoch = (ckpt.get("state") or {}).get("epoch")
        print(f"{args.checkpoint}{f' (after epoch {epoch})' if epoch is not None else ''}: {cfg}")
        print(f"{args.set}: {len(ds)} images from {ds.root} (annotations read in {t_ann:.2f}s); {world} process(es) "
              f"on {device}; score > {args.conf_threshold}, NMS IoU {args.nms_iou}, max {max_det} per image")
        _print_report(ds.report)

    # ---- predict (gathered from every process), score
    t0 = time.perf_counter()
    preds = predict(model, loader, cfg.B, cfg.C, device, args.amp, args.conf_threshold, args.nms_iou, max_det,
                    progress=args.progress)
    t_pred = time.perf_counter() - t0
    named = [(ds.annotation(i).image_id, b, s, lab) for i, b, s, lab in preds]
    dets = detections_from_pixels(named, cfg.C)
    t0 = time.perf_counter()
    result = evaluate_detections(dets, gt, class_names, args.iou_threshold, use_07)
    t_score = time.perf_counter() - t0
    summary = summarize(result, set=args.set, data_root=str(root), source={"checkpoint": str(args.checkpoint)},
                        num_images=len(ds), num_detections=int(sum(len(p[2]) for p in preds)),
                        unreadable_images=len(ds) - len(preds),
                        thresholds={"conf_threshold": args.conf_threshold, "nms_iou": args.nms_iou,
                                    "max_det": max_det},
                        seconds={"annotations": t_ann, "predict": t_pred, "score": t_score})
    if is_main:
        print(f"predicted {summary['num_detections']} detections of {len(preds)} images in {t_pred:.1f}s")
        if len(preds) < len(ds):
            print(f"{len(ds) - len(preds)} of the {len(ds)} images could not be read (named in the warnings above): "
                  "their objects count as missed")
        if args.save_results:
            write_results_dir(args.save_results, dets, class_names, split, args.results_prefix)
            print(f"result files: {Path(args.save_results) / f'{args.results_prefix}{split}_<class>.txt'}")
        _finish(summary, result, args)
    cleanup_distributed()
    return summary


def _print_report(report: list[tuple[str, str]]) -> None:
    if report:
        print(f"{len(report)} annotation problem(s) handled:")
        for where, why in report[:20]:
            print(f"  {where}: {why}")
        if len(report) > 20:
            print(f"  ... and {len(report) - 20} more")


def _finish(summary: dict[str, Any], result: dict, args: argparse.Namespace) -> None:
    print(format_table(result))
    print(f"scored in {summary['seconds']['score']:.3f}s")
    if args.json:
        write_json(args.json, summary)
        print(f"wrote {args.json}")


def run_bench(n: int) -> dict[str, Any]:
    """Time voc_eval scoring (n images x 20 classes x 30 detections) and annotation loading of n
    files, print and return both."""
    import platform
    import tempfile
    scoring = bench_scoring(num_images=n)
    with tempfile.TemporaryDirectory() as tmp:
        loading = bench_annotation_loading(tmp, n)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"scoring: {scoring['num_detections']} detections, {n} images, 20 classes: "
          f"{scoring['voc_eval_seconds']:.3f}s (best of 3)")
    print(f"annotations: {loading['num_images']} files, {loading['num_objects']} objects: "
          f"{loading['no_cache_seconds']:.3f}s parsing every file, {loading['cold_seconds']:.3f}s filling the "
          f"cache, {loading['warm_seconds']:.3f}s from the cache (best of 3)")
    return {"scoring": scoring, "annotations": loading}


if __name__ == "__main__":
    run_cli(main)
