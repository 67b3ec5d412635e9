"""Tests of voc_eval.py: hand-computed cases, a loop reference of py-faster-rcnn, I/O round trip."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from voc_eval import (GroundTruth, evaluate_detections, format_table, metric_name,  # noqa: E402
                      read_results_dir, voc_ap, write_results_dir)

A = [1, 1, 10, 10]       # 10x10 = 100 px (inclusive coordinates)
B = [21, 21, 40, 40]     # 20x20
FAR = [100, 100, 110, 110]


def gt(boxes, labels=None, difficult=None) -> GroundTruth:
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    lab = np.zeros(len(b), np.int64) if labels is None else np.array(labels, np.int64)
    dif = np.zeros(len(b), bool) if difficult is None else np.array(difficult, bool)
    return GroundTruth(b, lab, dif)


def dets(rows):
    """rows of (image_id, score, box) -> the (ids, scores, boxes) triple of one class."""
    return ([r[0] for r in rows], np.array([r[1] for r in rows], np.float64),
            np.array([r[2] for r in rows], np.float64).reshape(-1, 4))


def ap_of(rows, truth, names=("obj",), use_07=True):
    return evaluate_detections({0: dets(rows)}, truth, list(names), use_07_metric=use_07)


# ---------------------------------------------------------------- hand-computed rules
def test_tp_and_low_iou_fp():
    # ranks: a/A TP, b/FAR FP (IoU 0), b/B TP; npos 2 -> rec .5 .5 1, prec 1 .5 2/3
    # 07: t = 0..0.5 (6 thresholds) p = 1; t = .6..1 (5) p = 2/3 -> 6/11 + 10/33 = 28/33
    # area: envelope 1 1 2/3 -> .5*1 + .5*2/3 = 5/6
    truth = {"a": gt([A]), "b": gt([B])}
    rows = [("a", .9, A), ("b", .8, FAR), ("b", .7, B)]
    r07 = ap_of(rows, truth)
    assert r07["ap"]["obj"] == pytest.approx(28 / 33, rel=1e-12)
    assert r07["map"] == r07["ap"]["obj"]
    assert np.array_equal(r07["per_class"]["obj"]["recall"], [.5, .5, 1.])
    assert np.array_equal(r07["per_class"]["obj"]["precision"], [1., .5, 2 / 3])
    assert ap_of(rows, truth, use_07=False)["ap"]["obj"] == pytest.approx(5 / 6, rel=1e-12)


def test_duplicate_is_fp():
    # second detection on A (IoU 1, A already matched) is FP: same tp/fp as above -> 28/33, 5/6
    truth = {"a": gt([A]), "b": gt([B])}
    rows = [("a", .9, A), ("a", .8, [1, 1, 10, 11]), ("b", .7, B)]
    assert ap_of(rows, truth)["ap"]["obj"] == pytest.approx(28 / 33, rel=1e-12)
    assert ap_of(rows, truth, use_07=False)["ap"]["obj"] == pytest.approx(5 / 6, rel=1e-12)


def test_difficult_ignored_and_not_in_npos():
    # both hits on difficult A are ignored, B is TP; npos 1 -> rec 0 0 1, prec 0 0 1 -> AP 1, 1
    # (were they FPs: prec 0 0 1/3 -> AP 1/3)
    truth = {"a": gt([A], difficult=[True]), "b": gt([B])}
    rows = [("a", .9, A), ("a", .85, A), ("b", .8, B)]
    for use_07 in (True, False):
        r = ap_of(rows, truth, use_07=use_07)
        assert r["ap"]["obj"] == pytest.approx(1.0, rel=1e-12)
        assert r["per_class"]["obj"]["npos"] == 1 and r["per_class"]["obj"]["ndet"] == 3


def test_iou_exactly_half_is_not_a_match():
    # GT [1,1,10,20] = 10x20 = 200 px. Det A: inter 100, union 100+200-100 = 200 -> IoU 0.5 exactly:
    # FP under "> 0.5". Det [1,1,10,19] (inside the GT): inter 190, union 190+200-190 -> .95: TP.
    # rec 0 1, prec 0 .5 -> AP .5 (07: max prec at rec >= t is .5 for every t; area: 1 * .5)
    # with ">= 0.5" it would be TP then duplicate -> AP 1
    truth = {"a": gt([[1, 1, 10, 20]])}
    rows = [("a", .9, A), ("a", .8, [1, 1, 10, 19])]
    for use_07 in (True, False):
        assert ap_of(rows, truth, use_07=use_07)["ap"]["obj"] == pytest.approx(.5, rel=1e-12)


def test_tied_scores_keep_given_order():
    # tie at .5: given order FAR then A -> FP, TP: rec 0 1, prec 0 .5 -> AP .5
    # given order A then FAR -> TP, FP: rec 1 1, prec 1 .5 -> AP 1
    truth = {"a": gt([A])}
    for use_07 in (True, False):
        assert ap_of([("a", .5, FAR), ("a", .5, A)], truth, use_07=use_07)["ap"]["obj"] == pytest.approx(.5)
        assert ap_of([("a", .5, A), ("a", .5, FAR)], truth, use_07=use_07)["ap"]["obj"] == pytest.approx(1.)


def test_class_without_gt_is_nan_and_excluded_and_class_without_dets_is_zero():
    # cat: one TP -> AP 1; dog: GT, no detections -> AP 0; cow: detections, no GT -> NaN;
    # bird: nothing -> NaN. mAP = mean(1, 0) = .5
    truth = {"a": gt([A, B], labels=[0, 1]), "e": gt([])}
    d = {0: dets([("a", .9, A)]), 2: dets([("a", .8, B), ("e", .7, A)])}
    names = ["cat", "dog", "cow", "bird"]
    for use_07 in (True, False):
        r = evaluate_detections(d, truth, names, use_07_metric=use_07)
        assert r["ap"]["cat"] == pytest.approx(1.) and r["ap"]["dog"] == 0.0
        assert math.isnan(r["ap"]["cow"]) and math.isnan(r["ap"]["bird"])
        assert r["map"] == pytest.approx(.5)
        assert r["per_class"]["cow"]["ndet"] == 2 and r["per_class"]["cow"]["npos"] == 0
        table = format_table(r)
        assert "excluded" in table and metric_name(use_07) in table.splitlines()[-1]


def test_empty_images():
    # a detection on an image without objects is FP: FP then TP -> AP .5 (both metrics)
    truth = {"a": gt([A]), "e": gt([]), "f": gt(np.zeros((0, 4)))}
    rows = [("e", .9, A), ("a", .8, A)]
    for use_07 in (True, False):
        assert ap_of(rows, truth, use_07=use_07)["ap"]["obj"] == pytest.approx(.5)
    assert math.isnan(ap_of(rows[:1], {"e": gt([])})["map"])  # no GT at all -> mAP NaN


def test_unknown_image_id_raises():
    truth = {"a": gt([A])}
    rows = [("a", .9, A)] + [(f"x{i}", .5, A) for i in range(7)]
    with pytest.raises(ValueError, match=r"7 image id\(s\).*x0"):
        ap_of(rows, truth)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="label 3 outside"):
        ap_of([], {"a": gt([A], labels=[3])})
    with pytest.raises(ValueError, match="empty area"):
        ap_of([("a", .9, [10, 10, 5, 5])], {"a": gt([A])})
    with pytest.raises(ValueError, match="class index"):
        evaluate_detections({1: dets([])}, {"a": gt([A])}, ["obj"])


def test_11_point_threshold_is_numpy_arange_float():
    # 10 GT, 3 TP: rec ends at 3/10 == 0.3 < np.arange(0, 1.1, .1)[3] == 0.30000000000000004,
    # so only t = 0, .1, .2 see precision 1 -> AP 3/11 (with exact tenths it would be 4/11)
    assert 3 / 10 == 0.3 and np.arange(0., 1.1, 0.1)[3] > 0.3
    truth = {f"i{k}": gt([A]) for k in range(10)}
    r = ap_of([(f"i{k}", 1 - k / 10, A) for k in range(3)], truth)
    assert r["per_class"]["obj"]["recall"][-1] == 0.3
    assert r["ap"]["obj"] == pytest.approx(3 / 11, rel=1e-12)
    assert voc_ap(np.array([.3]), np.array([1.]), True) == pytest.approx(3 / 11, rel=1e-12)
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0 == voc_ap(np.zeros(0), np.zeros(0), False)


# ---------------------------------------------------------------- loop reference
def ref_ap(rec, prec, use_07):
    if use_07:
        ap = 0.
        for t in np.arange(0., 1.1, 0.1):
            best = 0.
            for r, p in zip(rec, prec):
                if r >= t and p > best:
                    best = p
            ap = ap + best / 11.
        return ap
    mrec = [0.] + list(rec) + [1.]
    mpre = [0.] + list(prec) + [0.]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = [i for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]]
    return np.sum(np.array([(mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in steps]))


def ref_eval(detections, ground_truth, class_names, thr=0.5, use_07=True):
    """py-faster-rcnn's algorithm, one detection at a time (stable sort, NaN for npos == 0)."""
    aps, curves = {}, {}
    for c, name in enumerate(class_names):
        recs, npos = {}, 0
        for img, g in ground_truth.items():
            m = g.labels == c
            recs[img] = {"bbox": g.boxes[m], "difficult": g.difficult[m], "det": [False] * int(m.sum())}
            npos += int((~g.difficult[m]).sum())
        ids, scores, boxes = detections.get(c, ([], np.zeros(0), np.zeros((0, 4))))
        order = np.argsort(-scores, kind="stable")
        tp, fp = np.zeros(len(ids)), np.zeros(len(ids))
        for d, k in enumerate(order):
            R, bb, ovmax, jmax = recs[ids[k]], boxes[k], -np.inf, -1
            for j, g in enumerate(R["bbox"]):
                iw = max(min(g[2], bb[2]) - max(g[0], bb[0]) + 1., 0.)
                ih = max(min(g[3], bb[3]) - max(g[1], bb[1]) + 1., 0.)
                uni = ((bb[2] - bb[0] + 1.) * (bb[3] - bb[1] + 1.)
                       + (g[2] - g[0] + 1.) * (g[3] - g[1] + 1.) - iw * ih)
                ov = iw * ih / uni
                if ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax > thr:
                if not R["difficult"][jmax]:
                    if not R["det"][jmax]:
                        tp[d], R["det"][jmax] = 1., True
                    else:
                        fp[d] = 1.
            else:
                fp[d] = 1.
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        rec = tp / float(npos) if npos else np.full(len(tp), np.nan)
        aps[name] = ref_ap(rec, prec, use_07) if npos else math.nan
        curves[name] = (rec, prec)
    valid = [a for a in aps.values() if not math.isnan(a)]
    return aps, (np.mean(valid) if valid else math.nan), curves


def random_split(seed, n_img=40, n_cls=4):
    """Random data with overlapping and identical GT, difficult boxes, duplicates and tied scores."""
    rng = np.random.default_rng(seed)
    truth, pool = {}, []
    for i in range(n_img):
        m = int(rng.integers(0, 6))
        xy = rng.integers(1, 60, (m, 2))
        b = np.concatenate([xy, xy + rng.integers(0, 30, (m, 2))], 1).astype(np.float64)
        lab = rng.integers(0, n_cls - 1, m)  # the last class has no GT
        if m >= 2 and rng.random() < .5:
            b[1], lab[1] = b[0], lab[0]  # identical GT: argmax ties must pick the first
        truth[f"img{i}"] = GroundTruth(b, lab, rng.random(m) < .2)
        pool += [(f"img{i}", int(lab[k]), b[k]) for k in range(m)]
    d = {}
    for c in range(n_cls):
        rows, own = [], [p for p in pool if p[1] == c] or pool
        for _ in range(int(rng.integers(0, 60))):
            src = own if rng.random() < .8 else pool
            img, _, b = src[int(rng.integers(len(src)))]
            u = rng.random()
            if u < .15 and (b[3] - b[1] + 1) % 2 == 0:  # top half of an even-height GT: IoU .5 exactly
                b = np.array([b[0], b[1], b[2], b[1] + (b[3] - b[1] + 1) / 2 - 1])
            elif u < .4:
                x, y = rng.uniform(1, 60, 2)
                b = np.array([x, y, x + rng.uniform(0, 30), y + rng.uniform(0, 30)])
            elif rng.random() < .6:
                b = b + np.round(rng.normal(0, 2, 4), 1)
                b[2:] = np.maximum(b[2:], b[:2])
            rows.append((img, float(rng.integers(0, 8)) / 8, b))  # few score values -> ties
        rows += rows[: len(rows) // 5]  # exact duplicates
        d[c] = dets(rows)
    return d, truth, [f"c{k}" for k in range(n_cls)]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("use_07", [True, False])
def test_equals_loop_reference_exactly(seed, use_07):
    d, truth, names = random_split(seed)
    thr = 0.5 if seed % 4 else 0.3
    r = evaluate_detections(d, truth, names, iou_threshold=thr, use_07_metric=use_07)
    aps, mean, curves = ref_eval(d, truth, names, thr, use_07)
    for name in names:
        assert r["ap"][name] == aps[name] or (math.isnan(aps[name]) and math.isnan(r["ap"][name]))
        rec, prec = curves[name]
        assert np.array_equal(r["per_class"][name]["recall"], rec, equal_nan=True)
        assert np.array_equal(r["per_class"][name]["precision"], prec)
    assert r["map"] == mean


# ---------------------------------------------------------------- results files
def test_results_dir_round_trip(tmp_path):
    d, truth, names = random_split(3)
    for c in d:  # non-round floats, so '%.6f' would not survive
        ids, s, b = d[c]
        d[c] = (ids, s + np.random.default_rng(c).random(len(s)) / 3, b + 1 / 3)
    del d[1]
    write_results_dir(tmp_path, d, names, "test")
    back = read_results_dir(tmp_path, names, "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"comp4_det_test_{names[c]}.txt" for c in (0, 2, 3)]
    assert len(back[1][0]) == 0
    for c in d:
        assert back[c][0] == d[c][0]
        assert np.array_equal(back[c][1], d[c][1]) and np.array_equal(back[c][2], d[c][2])
    for use_07 in (True, False):
        a = evaluate_detections(d, truth, names, use_07_metric=use_07)
        b = evaluate_detections(back, truth, names, use_07_metric=use_07)
        assert a["map"] == b["map"] and a["ap"] == b["ap"]


def test_malformed_results_line_names_file_and_line(tmp_path):
    f = tmp_path / "comp4_det_val_obj.txt"
    f.write_text("img0 0.9 1 1 10 10\n\nimg1 0.8 1 1 10\n")
    with pytest.raises(ValueError, match=r"comp4_det_val_obj\.txt:3"):
        read_results_dir(tmp_path, ["obj"], "val")
    f.write_text("img0 0.9 1 1 10 ten\n")
    with pytest.raises(ValueError, match=r"comp4_det_val_obj\.txt:1"):
        read_results_dir(tmp_path, ["obj"], "val")


# ---------------------------------------------------------------- independent cross-check
def coco_friendly_split(seed=0, n_img=30, n_cls=3):
    """No difficult boxes, GT far apart (one per grid cell), detections either close to one GT
    (IoU > .6) or far from all (IoU < .3), distinct scores, 13 GT per class (no recall of .3, .6, .7)."""
    rng = np.random.default_rng(seed)
    cells = [(i, k) for i in range(n_img) for k in range(4)]
    pick = rng.permutation(len(cells))[: 13 * n_cls]
    truth = {f"im{i}": gt([]) for i in range(n_img)}
    boxes = {i: [] for i in range(n_img)}
    labels = {i: [] for i in range(n_img)}
    for n, p in enumerate(pick):
        i, k = cells[p]
        boxes[i].append([100 * k + 10, 10, 100 * k + 49, 49])  # 40x40, 60 px apart
        labels[i].append(n % n_cls)
    d = {c: [] for c in range(n_cls)}
    for i in range(n_img):
        truth[f"im{i}"] = gt(boxes[i], labels[i]) if boxes[i] else gt([])
        for b, lab in zip(boxes[i], labels[i]):
            for _ in range(int(rng.integers(0, 3))):  # 0..2 hits, second one a duplicate
                d[lab].append((f"im{i}", rng.random(), np.array(b) + rng.integers(-3, 4, 4)))
        for _ in range(2):
            x = 100 * rng.integers(0, 4) + 60.
            d[int(rng.integers(n_cls))].append((f"im{i}", rng.random(), [x, 60., x + 30, 90.]))
    return {c: dets(r) for c, r in d.items()}, truth, [f"k{c}" for c in range(n_cls)]


def test_matches_pycocotools_11_point():
    """COCO AP at IoU .5 with 11 recall thresholds equals VOC07 AP on data where the rules agree.

    They agree here because: no difficult (COCO has crowd instead), GT boxes far apart (COCO's
    matcher moves on to the next-best *unmatched* GT, VOC stays with the argmax GT and calls it
    a duplicate), every IoU far from .5 (COCO matches at >= .5, VOC at > .5, and COCO's IoU is
    continuous: VOC's inclusive [x1, y1, x2, y2] becomes COCO [x1, y1, x2 - x1 + 1, y2 - y1 + 1]),
    distinct scores (COCO breaks ties per image first), recall never exactly at .3/.6/.7 (COCO
    uses exact linspace tenths where VOC uses np.arange floats), < 100 detections per image and
    class (COCO's maxDets), and precision tp / (tp + fp + eps) differs from ours by ~1e-16.
    """
    pytest.importorskip("pycocotools", reason="pycocotools not installed; cross-check skipped")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    d, truth, names = coco_friendly_split()
    img_id = {name: n + 1 for n, name in enumerate(truth)}
    anns = []
    for name, g in truth.items():
        for b, lab in zip(g.boxes.tolist(), g.labels.tolist()):
            w, h = b[2] - b[0] + 1, b[3] - b[1] + 1  # inclusive pixels -> continuous width
            anns.append({"id": len(anns) + 1, "image_id": img_id[name], "category_id": lab + 1,
                         "iscrowd": 0, "bbox": [b[0], b[1], w, h], "area": w * h})
    coco = COCO()
    coco.dataset = {"images": [{"id": v} for v in img_id.values()], "annotations": anns,
                    "categories": [{"id": c + 1, "name": n} for c, n in enumerate(names)]}
    coco.createIndex()
    res = [{"image_id": img_id[i], "category_id": c + 1, "score": float(s),
            "bbox": [b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1]}
           for c, (ids, sc, bx) in d.items() for i, s, b in zip(ids, sc, bx.tolist())]
    E = COCOeval(coco, coco.loadRes(res), "bbox")
    E.params.iouThrs = np.array([0.5])
    E.params.recThrs = np.linspace(0, 1, 11)
    E.evaluate()
    E.accumulate()
    coco_ap = E.eval["precision"][0, :, :, 0, -1].mean(0)  # (K,) over the 11 recall thresholds
    r = evaluate_detections(d, truth, names, use_07_metric=True)
    assert [r["ap"][n] for n in names] == pytest.approx(coco_ap.tolist(), abs=1e-9)


def test_matches_torchmetrics_11_point():
    """Same cross-check through torchmetrics (COCO rules, see test_matches_pycocotools_11_point)."""
    pytest.importorskip("torchmetrics", reason="torchmetrics not installed; cross-check skipped")
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    d, truth, names = coco_friendly_split()
    try:
        metric = MeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5],
                                      rec_thresholds=np.linspace(0, 1, 11).tolist(), class_metrics=True)
    except ModuleNotFoundError as e:  # torchmetrics needs a COCO backend
        pytest.skip(f"torchmetrics backend missing: {e}")
    for name, g in truth.items():
        rows = [(c, s, b) for c, (ids, sc, bx) in d.items() for i, s, b in zip(ids, sc, bx) if i == name]
        pb = torch.tensor(np.array([b for _, _, b in rows]).reshape(-1, 4) + [0, 0, 1, 1], dtype=torch.float64)
        metric.update([{"boxes": pb, "scores": torch.tensor([s for _, s, _ in rows], dtype=torch.float64),
                        "labels": torch.tensor([c for c, _, _ in rows], dtype=torch.int64)}],
                      [{"boxes": torch.tensor(g.boxes + [0, 0, 1, 1]), "labels": torch.tensor(g.labels)}])
    out = metric.compute()
    r = evaluate_detections(d, truth, names, use_07_metric=True)
    per_class = dict(zip(out["classes"].tolist(), out["map_per_class"].tolist()))
    assert [r["ap"][n] for n in names] == pytest.approx([per_class[c] for c in range(len(names))], abs=1e-6)
