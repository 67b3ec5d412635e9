"""PASCAL VOC detection metric (mean average precision), pure numpy.

Reproduces, to the last bit of float64, the py-faster-rcnn port of the VOC devkit
(`lib/datasets/voc_eval.py`, the version detectron2 and mmdetection follow), but
vectorised: 150k detections over 5k images score in well under a second.

Conventions, stated once here:
- Boxes are VOC pixel boxes `xyxy` = (xmin, ymin, xmax, ymax), 1-based and *inclusive*: a box
  covering one pixel has xmin == xmax, width = xmax - xmin + 1. IoU uses that "+1" convention.
- Detections of one class are ranked by score, descending, with a *stable* sort: tied scores keep
  the order in which they were given (the order of the results file).
- Each detection looks only at the ground truth of its own image and class and takes the box of
  maximal IoU (first one on ties), whether already matched or difficult. IoU > threshold (strictly)
  on a difficult box: ignored (neither TP nor FP); on a free box: TP, and the box becomes matched;
  on a matched box: FP (duplicate). Otherwise FP. Difficult boxes do not count in npos.
- AP: VOC2007 11-point (thresholds `np.arange(0., 1.1, 0.1)`, floats as numpy makes them, so
  index 3 is 0.30000000000000004 and a recall of exactly 0.3 does not reach it) or the VOC2010+
  area under the monotone precision envelope.

Differences, on purpose:
- The MATLAB devkit (VOCevaldet.m) matches at `ovmax >= 0.5`; the py-faster-rcnn port, and
  this module, at `ovmax > 0.5`. Only boxes with IoU exactly 0.5 tell them apart; no switch.
- py-faster-rcnn sorts with the unstable `np.argsort`; we sort stably (as the MATLAB `sort` does).
- A class without non-difficult ground truth (npos == 0) has AP = NaN, is excluded from the mean
  (py-faster-rcnn divides by zero, warns and lets nan/0 into the mean). If no class has ground
  truth, mAP is NaN.
- A detection naming an image that is not in the ground truth raises ValueError (py-faster-rcnn:
  KeyError on the first one).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# class index -> (image ids in results-file order, scores (D,), boxes (D, 4) VOC xyxy)
Detections = dict[int, tuple[list[str], np.ndarray, np.ndarray]]


def read_text(path: str | os.PathLike) -> str:
    """A text file the user gives (results files here; image set lists in dataset.py, ImageNet
    label files in imagenet.py) as UTF-8, a byte-order mark at its start dropped (as Windows tools
    write one); a file that is not UTF-8 text is a ValueError naming it and the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        kind = "UTF-16 text" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8 text"
        raise ValueError(f"{path}: {kind} (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8") \
            from None


@dataclass
class GroundTruth:
    """One image's annotation in VOC 1-based inclusive pixel `xyxy` boxes.

    boxes: float64 (M, 4) xmin, ymin, xmax, ymax; labels: int64 (M,) class index 0..C-1;
    difficult: bool (M,). M may be 0 (an image without objects).
    """

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def metric_name(use_07_metric: bool, iou_threshold: float = 0.5) -> str:
    """Name of the metric as printed next to every number, e.g. 'VOC07 11-point AP@0.5'."""
    kind = "VOC07 11-point" if use_07_metric else "VOC area"
    return f"{kind} AP@{iou_threshold:g}"


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """Average precision from the cumulative recall and precision curves (D,) of one class.

    use_07_metric: mean over 11 recall thresholds t in np.arange(0, 1.1, 0.1) of the best
    precision at recall >= t (0 if never reached). Otherwise: area under the precision envelope
    (precision made non-increasing from the right), summed where recall changes. Empty curves give 0.
    """
    rec = np.asarray(rec, dtype=np.float64)
    prec = np.asarray(prec, dtype=np.float64)
    if rec.ndim != 1 or rec.shape != prec.shape:
        raise ValueError(f"rec and prec must be 1-D of one length, got {rec.shape} and {prec.shape}")
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # keep numpy's floats: [3] is 0.30000000000000004
            p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope; max is exact, so same bits as a loop
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _paired_iou(bb: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of row p of `bb` with row p of `gt`, both (P, 4) VOC inclusive boxes -> (P,).

    Same float64 operations in the same order as py-faster-rcnn, so the bits are identical.
    """
    ixmin = np.maximum(gt[:, 0], bb[:, 0])
    iymin = np.maximum(gt[:, 1], bb[:, 1])
    ixmax = np.minimum(gt[:, 2], bb[:, 2])
    iymax = np.minimum(gt[:, 3], bb[:, 3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    uni = ((bb[:, 2] - bb[:, 0] + 1.0) * (bb[:, 3] - bb[:, 1] + 1.0)
           + (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0) - inters)
    return inters / uni


def _match(dimg: np.ndarray, dbox: np.ndarray, gbox: np.ndarray, gdiff: np.ndarray,
           start: np.ndarray, cnt: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy VOC matching of ranked detections of one class -> (tp, fp) float64 (D,) 0/1 flags.

    dimg (D,) image index and dbox (D, 4) in rank order; the class's GT is flat, gbox (G, 4) and
    gdiff (G,), image i owning rows start[i]:start[i]+cnt[i]. Vectorised because each detection is
    tied to its single argmax GT: the greedy loop reduces to "the first-ranked detection over
    threshold on a non-difficult GT is TP, later ones on that GT are FP".
    """
    D = len(dimg)
    dcnt = cnt[dimg]                                  # (D,) GT boxes in the detection's image
    P = int(dcnt.sum())
    seg = np.cumsum(dcnt) - dcnt                      # (D,) first pair of each detection
    rep = np.repeat(np.arange(D), dcnt)               # (P,) detection of each pair
    gidx = start[dimg][rep] + np.arange(P) - seg[rep]  # (P,) GT row of each pair
    ovmax = np.full(D, -np.inf)
    jmax = np.zeros(D, dtype=np.int64)
    has = dcnt > 0
    if P:
        ov = _paired_iou(dbox[rep], gbox[gidx])       # (P,)
        s = seg[has]
        ovmax[has] = np.maximum.reduceat(ov, s)
        # first maximal GT, as np.argmax: smallest pair position attaining the segment max
        pos = np.where(ov == ovmax[rep], np.arange(P), P)
        jmax[has] = gidx[np.minimum.reduceat(pos, s)]
    hit = np.flatnonzero(ovmax > thr)                 # (H,) detections over threshold
    j = jmax[hit]
    cand, cj = hit[~gdiff[j]], j[~gdiff[j]]           # hits on difficult GT are ignored
    _, first = np.unique(cj, return_index=True)       # first occurrence = best-ranked detection
    tp = np.zeros(D)
    tp[cand[first]] = 1.0
    fp = (ovmax <= thr).astype(np.float64)
    fp[cand] = 1.0
    fp[cand[first]] = 0.0
    return tp, fp


def _as_boxes(x: np.ndarray) -> np.ndarray:
    b = np.asarray(x, dtype=np.float64)
    return b.reshape(0, 4) if b.size == 0 else b  # accept [] / (0,) for "no boxes"


def _bad_boxes(b: np.ndarray) -> np.ndarray:
    """(N,) mask of boxes that are non-finite or empty in the inclusive convention (x2 - x1 + 1 <= 0)."""
    return ~np.isfinite(b).all(1) | (b[:, 2] - b[:, 0] + 1.0 <= 0) | (b[:, 3] - b[:, 1] + 1.0 <= 0)


def _check_box_array(b: np.ndarray, what: str) -> None:
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{what}: boxes must have shape (N, 4), got {b.shape}")
    bad = _bad_boxes(b)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} box(es) non-finite or with empty area in the "
                         f"inclusive VOC convention (xmax - xmin + 1 <= 0), first {b[bad][0].tolist()}")


def evaluate_detections(detections: Detections, ground_truth: dict[str, GroundTruth],
                        class_names: Sequence[str], iou_threshold: float = 0.5,
                        use_07_metric: bool = True) -> dict:
    """Score detections of a whole split against its ground truth with the VOC metric.

    detections: class index -> (image ids, scores (D,), boxes (D, 4) VOC xyxy), classes missing
    from the dict have no detections. ground_truth: image id -> GroundTruth, for every image of the
    split. Returns {"metric", "map", "ap": {name: AP}, "per_class": {name: {"ap", "npos", "ndet",
    "recall" (D,), "precision" (D,)}}}; see the module docstring for the rules and edge cases.
    """
    C = len(class_names)
    if len(set(class_names)) != C:
        raise ValueError(f"class_names must be unique, got {list(class_names)}")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    index = {s: i for i, s in enumerate(ground_truth)}
    N = len(index)

    # ground truth of all images, flat, in image order
    boxes, labels, diffs, nobj = [], [], [], []
    for name, gt in ground_truth.items():
        b = _as_boxes(gt.boxes)
        lab = np.asarray(gt.labels, dtype=np.int64).reshape(-1)
        dif = np.asarray(gt.difficult, dtype=bool).reshape(-1)
        if b.ndim != 2 or b.shape[1] != 4 or not len(b) == len(lab) == len(dif):
            raise ValueError(f"ground truth of image {name!r}: boxes {b.shape}, labels {lab.shape}, "
                             f"difficult {dif.shape}; need (M, 4), (M,), (M,)")
        boxes.append(b), labels.append(lab), diffs.append(dif), nobj.append(len(b))
    gb = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    gl = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    gd = np.concatenate(diffs) if diffs else np.zeros(0, dtype=bool)
    gi = np.repeat(np.arange(N), nobj)
    img_names = list(index)
    bad = _bad_boxes(gb)  # checked flat for speed, reported for the first bad image
    if bad.any():
        k = int(np.argmax(bad))
        _check_box_array(gb[gi == gi[k]], f"ground truth of image {img_names[gi[k]]!r}")
    bad = (gl < 0) | (gl >= C)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"ground truth of image {img_names[gi[k]]!r}: label {gl[k]} outside 0..{C - 1}")

    # detections: validate, map image ids to indices, report every unknown id at once
    dets, unknown, n_unknown = {}, set(), 0
    for c, entry in detections.items():
        if not isinstance(c, (int, np.integer)) or not 0 <= c < C:
            raise ValueError(f"detections key {c!r} is not a class index in 0..{C - 1}")
        ids, sc, bx = entry
        sc = np.asarray(sc, dtype=np.float64).reshape(-1)
        bx = _as_boxes(bx)
        what = f"detections of class {c} ({class_names[c]!r})"
        _check_box_array(bx, what)
        if not len(ids) == len(sc) == len(bx):
            raise ValueError(f"{what}: {len(ids)} image ids, {len(sc)} scores, {len(bx)} boxes")
        if np.isnan(sc).any():
            raise ValueError(f"{what}: scores contain NaN")
        di = np.array([index.get(s, -1) for s in ids], dtype=np.int64)
        if (di < 0).any():
            miss = di < 0
            n_unknown += int(miss.sum())
            unknown.update(s for s, m in zip(ids, miss) if m)
        dets[int(c)] = (di, sc, bx)
    if unknown:
        shown = sorted(unknown, key=str)[:5]
        raise ValueError(f"{len(unknown)} image id(s) in the detections are not in the ground truth "
                         f"({n_unknown} detections), e.g. {shown}; wrong split or id format?")

    metric = metric_name(use_07_metric, iou_threshold)
    aps, per_class = {}, {}
    for c, cname in enumerate(class_names):
        m = gl == c
        gbox, gdiff = gb[m], gd[m]
        cnt = np.bincount(gi[m], minlength=N)
        start = np.cumsum(cnt) - cnt
        npos = int((~gdiff).sum())
        di, sc, bx = dets.get(c, (np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4))))
        order = np.argsort(-sc, kind="stable")
        tp, fp = _match(di[order], bx[order], gbox, gdiff, start, cnt, iou_threshold)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if npos == 0:
            rec, ap = np.full(len(tp), np.nan), math.nan  # recall undefined: nothing to find
        else:
            rec = tp / float(npos)
            ap = voc_ap(rec, prec, use_07_metric)
        aps[cname] = ap
        per_class[cname] = {"ap": ap, "npos": npos, "ndet": len(tp), "recall": rec, "precision": prec}
    valid = [a for a in aps.values() if not math.isnan(a)]
    mean = float(np.mean(valid)) if valid else math.nan
    return {"metric": metric, "map": mean, "ap": aps, "per_class": per_class}


def detections_from_pixels(preds: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                           num_classes: int) -> Detections:
    """Per-image decoded detections -> the per-class :data:`Detections` this module scores.

    ``preds`` holds ``(image_id, boxes (K, 4), scores (K,), labels (K,))`` per image, with boxes in
    the project's 0-based continuous pixel ``xyxy`` (utils.py); they become VOC 1-based inclusive
    boxes ``(x1 + 1, y1 + 1, x2, y2)``. Images keep the order given, which decides ties.
    """
    ids: list[list[str]] = [[] for _ in range(num_classes)]
    scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    boxes: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for image_id, b, s, lab in preds:
        b = np.asarray(b, np.float64).reshape(-1, 4) + np.array([1.0, 1.0, 0.0, 0.0])
        s, lab = np.asarray(s, np.float64).reshape(-1), np.asarray(lab).reshape(-1)
        for c in np.unique(lab):
            m = lab == c
            ids[int(c)] += [image_id] * int(m.sum())
            scores[int(c)].append(s[m])
            boxes[int(c)].append(b[m])
    return {c: (ids[c], np.concatenate(scores[c]) if scores[c] else np.zeros(0),
                np.concatenate(boxes[c]) if boxes[c] else np.zeros((0, 4))) for c in range(num_classes)}


def _results_file(path: Path, prefix: str, split: str, cname: str) -> Path:
    return path / f"{prefix}{split}_{cname}.txt"


def read_results_dir(path: str | os.PathLike, class_names: Sequence[str], split: str,
                     prefix: str = "comp4_det_") -> Detections:
    """Read official VOC result files `<prefix><split>_<class>.txt` from a directory.

    Each line: `<image_id> <score> <xmin> <ymin> <xmax> <ymax>` (VOC 1-based inclusive pixels);
    blank lines are skipped. A missing class file means no detections for that class (empty
    entry). A malformed or non-finite line raises ValueError naming the file and line number.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"results directory {str(path)!r} does not exist")
    out: Detections = {}
    for c, cname in enumerate(class_names):
        f = _results_file(path, prefix, split, cname)
        ids, rows = [], []
        for k, line in enumerate(read_text(f).splitlines() if f.exists() else [], 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 6:
                    raise ValueError(f"{len(parts)} fields")
                vals = [float(v) for v in parts[1:]]
                if not all(math.isfinite(v) for v in vals):
                    raise ValueError("non-finite number")
                if _bad_boxes(np.array([vals[1:]])).any():
                    raise ValueError("an empty box in the inclusive VOC convention: xmax - xmin + 1 <= 0 or "
                                     "ymax - ymin + 1 <= 0")
            except ValueError as e:
                raise ValueError(f"{f}:{k}: expected '<image_id> <score> <xmin> <ymin> "
                                 f"<xmax> <ymax>', got {line.strip()!r} ({e})") from None
            ids.append(parts[0])
            rows.append(vals)
        a = np.array(rows, dtype=np.float64).reshape(-1, 5)
        out[c] = (ids, a[:, 0].copy(), a[:, 1:].copy())
    return out


def write_results_dir(path: str | os.PathLike, detections: Detections, class_names: Sequence[str],
                      split: str, prefix: str = "comp4_det_") -> None:
    """Write detections as official VOC result files, one `<prefix><split>_<class>.txt` per class.

    Floats are written in repr precision (shortest text that parses back to the same float64),
    not the devkit's '%.6f'/'%.1f', so reading back gives the very same mAP. Each file is written
    to a temporary name and atomically renamed. Creates the directory if needed.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for c, (ids, sc, bx) in detections.items():
        if not isinstance(c, (int, np.integer)) or not 0 <= c < len(class_names):
            raise ValueError(f"detections key {c!r} is not a class index in 0..{len(class_names) - 1}")
        sc = np.asarray(sc, dtype=np.float64).reshape(-1).tolist()
        bx = np.asarray(bx, dtype=np.float64).reshape(-1, 4).tolist()
        if not len(ids) == len(sc) == len(bx):
            raise ValueError(f"detections of class {c}: {len(ids)} ids, {len(sc)} scores, {len(bx)} boxes")
        lines = []
        for s, p, b in zip(ids, sc, bx):
            if not isinstance(s, str) or not s or len(s.split()) != 1:
                raise ValueError(f"image id {s!r} cannot be written: must be a non-empty str without spaces")
            lines.append(f"{s} {p!r} {b[0]!r} {b[1]!r} {b[2]!r} {b[3]!r}\n")
        f = _results_file(path, prefix, split, class_names[c])
        tmp = f.with_name(f".{f.name}.tmp{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.writelines(lines)
        os.replace(tmp, f)


def format_table(result: dict) -> str:
    """Per-class AP table and mAP line of an `evaluate_detections` result, metric named on each AP."""
    m = result["metric"]
    w = max([len("class"), len("mAP")] + [len(n) for n in result["per_class"]])
    lines = [f"{'class':<{w}}  {'npos':>6}  {'ndet':>7}  AP"]
    for name, pc in result["per_class"].items():
        ap = ("n/a (no ground truth, excluded from mAP)" if math.isnan(pc["ap"])
              else f"{pc['ap']:.4f} {m}")
        lines.append(f"{name:<{w}}  {pc['npos']:>6d}  {pc['ndet']:>7d}  {ap}")
    k = sum(not math.isnan(a) for a in result["ap"].values())
    lines.append(f"{'mAP':<{w}}  {'':>6}  {'':>7}  {result['map']:.4f} {m} "
                 f"(mean over {k} of {len(result['ap'])} classes)")
    return "\n".join(lines)


def synthetic_voc(num_images: int, num_classes: int, dets_per_image: int,
                  seed: int = 0) -> tuple[Detections, dict[str, GroundTruth]]:
    """Random VOC-like split: 1-5 integer GT boxes per image (10% difficult) in 500x375 pixels,
    detections half jittered copies of GT (true class), half random boxes and classes."""
    rng = np.random.default_rng(seed)
    names = [f"{i:06d}" for i in range(num_images)]
    nobj = rng.integers(1, 6, num_images)
    G = int(nobj.sum())
    x1, y1 = rng.integers(1, 400, G), rng.integers(1, 280, G)
    w, h = rng.integers(10, 100, G), rng.integers(10, 95, G)
    gb = np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float64)  # (G, 4)
    gl = rng.integers(0, num_classes, G)
    gd = rng.random(G) < 0.1
    ends = np.cumsum(nobj)
    gt = {n: GroundTruth(gb[e - k:e], gl[e - k:e], gd[e - k:e]) for n, e, k in zip(names, ends, nobj)}
    D = num_images * dets_per_image
    img = np.repeat(np.arange(num_images), dets_per_image)
    src = (ends - nobj)[img] + rng.integers(0, 1 << 30, D) % nobj[img]  # a GT of the same image
    db = gb[src] + rng.normal(0, 6, (D, 4))
    cls = gl[src].copy()
    rand = rng.random(D) < 0.5
    rx, ry = rng.uniform(1, 400, D), rng.uniform(1, 280, D)
    db[rand] = np.stack([rx, ry, rx + rng.uniform(5, 100, D), ry + rng.uniform(5, 95, D)], 1)[rand]
    cls[rand] = rng.integers(0, num_classes, int(rand.sum()))
    db[:, 2:] = np.maximum(db[:, 2:], db[:, :2])
    score = rng.random(D)
    dets: Detections = {}
    for c in range(num_classes):
        m = cls == c
        dets[c] = ([names[i] for i in img[m]], score[m], db[m])
    return dets, gt


def bench(num_images: int = 5000, num_classes: int = 20, dets_per_image: int = 30,
          seed: int = 0) -> dict:
    """Time `evaluate_detections` (VOC07) on synthetic data, annotations already loaded; best of 3."""
    dets, gt = synthetic_voc(num_images, num_classes, dets_per_image, seed)
    names = [f"class{c}" for c in range(num_classes)]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = evaluate_detections(dets, gt, names)
        times.append(time.perf_counter() - t0)
    return {"voc_eval_seconds": min(times), "num_detections": num_images * dets_per_image,
            "num_images": num_images, "map": r["map"]}
