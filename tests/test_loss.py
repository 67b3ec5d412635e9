import math

import torch

from loss import YoloLoss


def iou_xyxy(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def cell_box(x, y, sw, sh, row, col, S):
    cx, cy, w, h = (col + x) / S, (row + y) / S, sw * sw, sh * sh
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def loop_loss(pred, target, S, B, C, l_coord=5.0, l_noobj=0.5, rescore=True):
    """Plain per-image, per-cell, per-box transcription of the paper's eq. (3) with darknet's choices."""
    N = pred.shape[0]
    coord = obj = noobj = cls = 0.0
    for n in range(N):
        for r in range(S):
            for c in range(S):
                p, t = pred[n, r, c].tolist(), target[n, r, c].tolist()
                has_obj = t[4] > 0
                resp = -1
                if has_obj:
                    tbox = cell_box(t[0], t[1], math.sqrt(t[2]), math.sqrt(t[3]), r, c, S)
                    ious, errs = [], []
                    for b in range(B):
                        pb = p[4 * b: 4 * b + 4]
                        ious.append(iou_xyxy(cell_box(*pb, r, c, S), tbox))
                        # darknet's box_rmse: centre / S and w, h, all relative to the image
                        errs.append((pb[0] / S - t[0] / S) ** 2 + (pb[1] / S - t[1] / S) ** 2
                                    + (pb[2] ** 2 - t[2]) ** 2 + (pb[3] ** 2 - t[3]) ** 2)
                    if max(ious) > 0:
                        resp = max(range(B), key=lambda b: (ious[b], -b))
                    else:
                        resp = min(range(B), key=lambda b: (errs[b], b))
                    pb = p[4 * resp: 4 * resp + 4]
                    coord += l_coord * ((pb[0] - t[0]) ** 2 + (pb[1] - t[1]) ** 2
                                        + (pb[2] - math.sqrt(t[2])) ** 2 + (pb[3] - math.sqrt(t[3])) ** 2)
                    goal = ious[resp] if rescore else 1.0
                    obj += (p[4 * B + resp] - goal) ** 2
                    cls += sum((p[5 * B + k] - t[5 + k]) ** 2 for k in range(C))
                for b in range(B):
                    if b != resp:
                        noobj += l_noobj * p[4 * B + b] ** 2
    return {"coord": coord / N, "obj": obj / N, "noobj": noobj / N, "cls": cls / N,
            "total": (coord + obj + noobj + cls) / N}


def random_case(N, S, B, C, seed, p_obj=0.3):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(N, S, S, 5 * B + C, generator=g, dtype=torch.float64) * 0.5
    pred[..., : 4 * B] = torch.rand(N, S, S, 4 * B, generator=g, dtype=torch.float64)  # mostly overlapping boxes
    pred[0, 0, 0, 2:4] = -0.4   # negative sqrt outputs are fine
    target = torch.zeros(N, S, S, 5 + C, dtype=torch.float64)
    mask = torch.rand(N, S, S, generator=g) < p_obj
    target[..., :2] = torch.rand(N, S, S, 2, generator=g, dtype=torch.float64)
    target[..., 2:4] = torch.rand(N, S, S, 2, generator=g, dtype=torch.float64) * 0.6 + 0.01
    target[..., 4] = 1
    labels = torch.randint(0, C, (N, S, S), generator=g)
    target[..., 5:] = torch.nn.functional.one_hot(labels, C).double()
    target[~mask] = 0
    return pred, target


def test_vectorised_loss_equals_loop():
    for seed, (N, S, B, C) in enumerate([(3, 7, 2, 20), (2, 4, 3, 5), (4, 5, 1, 3)]):
        pred, target = random_case(N, S, B, C, seed)
        # a far-away predictor (IoU 0 for both boxes) exercises the smallest-error tie-break
        pred[0, 1, 1, : 4 * B] = torch.tensor([5.0, 5.0, 0.01, 0.01] * B, dtype=torch.float64)
        pred[0, 1, 1, 4:8] = torch.tensor([4.0, 4.5, 0.01, 0.01], dtype=torch.float64) if B >= 2 else pred[0, 1, 1, 4:8]
        target[0, 1, 1, :5] = torch.tensor([0.5, 0.5, 0.1, 0.1, 1.0], dtype=torch.float64)
        for rescore in (True, False):
            got = YoloLoss(S, B, C, rescore=rescore)(pred, target)
            want = loop_loss(pred.float().double(), target.float().double(), S, B, C, rescore=rescore)
            for k in want:
                assert math.isclose(float(got[k]), want[k], rel_tol=1e-5, abs_tol=1e-6), (k, float(got[k]), want[k])


def test_without_overlap_the_responsible_box_is_darknets_closest():
    """Target at its cell's centre, 0.01 x 0.01 of the image. Box 0 has its size but sits 0.12 cells
    off (image-relative error (0.12 / 7)^2 = 2.9e-4), box 1 is centred with size 0 (2e-4): neither
    overlaps it, and darknet's box_rmse picks box 1 (in cell units with sqrt sizes box 0 would win:
    0.0144 against 0.02). Box 1's coordinate error is what the coord term then holds."""
    S, B, C = 7, 2, 1
    pred, target = torch.zeros(1, S, S, 5 * B + C), torch.zeros(1, S, S, 5 + C)
    target[0, 3, 3] = torch.tensor([0.5, 0.5, 0.01, 0.01, 1.0, 1.0])
    pred[0, 3, 3, :8] = torch.tensor([0.62, 0.5, 0.1, 0.1, 0.5, 0.5, 0.0, 0.0])
    terms = YoloLoss(S, B, C, lambda_coord=1.0, rescore=False)(pred, target)
    assert math.isclose(float(terms["coord"]), 2 * 0.1 ** 2, rel_tol=1e-5)   # box 1: sqrt sizes 0 vs 0.1
    assert math.isclose(float(terms["obj"]), 1.0, rel_tol=1e-6)              # box 1's confidence 0, target 1


def test_perfect_prediction_gives_zero_loss():
    S, B, C = 7, 2, 20
    _, target = random_case(2, S, B, C, seed=3)
    pred = torch.zeros(2, S, S, 5 * B + C, dtype=torch.float64)
    obj = target[..., 4] > 0
    box = torch.cat([target[..., :2], target[..., 2:4].sqrt()], -1)
    pred[..., 0:4] = box                       # predictor 0 exact
    pred[..., 4:8] = box * torch.tensor([1, 1, 0.5, 0.5], dtype=torch.float64)   # predictor 1 worse
    pred[..., 8] = obj.double()                # conf = IoU = 1 for the exact box
    pred[..., 9] = 0
    pred[..., 10:] = target[..., 5:]
    terms = YoloLoss(S, B, C)(pred, target)
    assert float(terms["total"]) < 1e-10


def test_loss_finite_for_extreme_outputs_and_empty_images():
    S, B, C = 7, 2, 20
    pred = torch.randn(2, S, S, 30) * 1e3
    target = torch.zeros(2, S, S, 25)
    terms = YoloLoss(S, B, C)(pred, target)
    assert all(torch.isfinite(v) for v in terms.values())
    assert float(terms["coord"]) == 0 and float(terms["cls"]) == 0
    pred.requires_grad_(True)
    _, target = random_case(2, S, B, C, seed=1)
    YoloLoss(S, B, C)(pred, target.float())["total"].backward()
    assert torch.isfinite(pred.grad).all()
