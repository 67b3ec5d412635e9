"""Tests of evaluate.py: the program end to end on a tiny demo set with tiny checkpoints, result
files round trip, hand-computed AP through --results and --json, errors, the annotation cache."""
import json
import math
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
from dataset import VOC_CLASSES, VOCDetection  # noqa: E402
from demo_data import DEMO_CLASSES, make_demo_voc  # noqa: E402
from model import YoloConfig, YOLOv1  # noqa: E402
from utils import save_checkpoint  # noqa: E402
from voc_eval import GroundTruth, evaluate_detections  # noqa: E402

TINY = dict(S=7, B=2, C=len(DEMO_CLASSES), image_size=64, width=1 / 16, batch_norm=True)
RUN = ["--workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "4"]


def write_checkpoint(path: Path, model: YOLOv1, class_names=DEMO_CLASSES) -> Path:
    """A checkpoint with the keys train_detector.py writes (the ones evaluate.py reads)."""
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                     "class_names": list(class_names), "config": {"data": "demo", "image_size": model.cfg.image_size},
                     "state": {"epoch": 3}}, path)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_voc(tmp_path_factory.mktemp("demo") / "demo", n_trainval=1, n_test=6, seed=1)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    """A random model whose boxes are object-sized (sqrt w, h ~ 0.6) with confidences and class
    probabilities ~ 0.5: many detections, a few right by chance, so the mAP is small but not 0."""
    torch.manual_seed(0)
    model = YOLOv1(YoloConfig(**TINY))
    B = model.cfg.B
    bias = torch.zeros(model.cfg.S, model.cfg.S, model.cfg.cell_dim)
    bias[..., :4 * B] = torch.tensor([0.5, 0.5, 0.6, 0.6] * B)
    bias[..., 4 * B:] = 0.5
    with torch.no_grad():
        model.head.fc2.weight.mul_(0.3)
        model.head.fc2.bias.copy_(bias.flatten())
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt", model)


def same(a, b) -> bool:
    """Equal, with NaN equal to NaN (and to JSON's null)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    nan = lambda x: x is None or (isinstance(x, float) and math.isnan(x))  # noqa: E731
    return (nan(a) and nan(b)) or a == b


def read_xml(path: Path, class_names) -> tuple[int, int, list]:
    """(width, height, [(class, difficult, box)]) by ElementTree, independently of dataset.py."""
    root = ET.parse(path).getroot()
    objs = [(o.findtext("name"), o.findtext("difficult") == "1",
             [float(o.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")])
            for o in root.findall("object") if o.findtext("name") in class_names]
    return int(root.find("size").findtext("width")), int(root.find("size").findtext("height")), objs


def read_results(folder: Path, split: str, class_names) -> dict[str, list[list[str]]]:
    return {c: [ln.split() for ln in (folder / f"comp4_det_{split}_{c}.txt").read_text().splitlines()]
            for c in class_names}


# ---------------------------------------------------------------- with a model

def test_end_to_end_random_model_and_round_trip(demo, random_ckpt, tmp_path, capsys):
    res, js = tmp_path / "results", tmp_path / "eval.json"
    out = evaluate.main(["--checkpoint", str(random_ckpt), "--data", "demo", "--data-root", str(demo),
                         "--save-results", str(res), "--json", str(js), "--max-det", "40", *RUN])
    printed = capsys.readouterr().out
    assert "VOC07 11-point AP@0.5" in printed and "mAP" in printed
    assert out["metric"] == "VOC07 11-point AP@0.5" and out["num_images"] == 6 and out["unreadable_images"] == 0
    assert set(out["ap"]) == set(DEMO_CLASSES) and out["thresholds"]["max_det"] == 40
    assert 0 < out["map"] < 0.5
    # result files: one per class, each line id, score, 1-based box inside the image
    voc = demo / "VOCdevkit" / "VOC2007"
    lines = read_results(res, "test", DEMO_CLASSES)
    assert sorted(p.name for p in res.iterdir()) == sorted(f"comp4_det_test_{c}.txt" for c in DEMO_CLASSES)
    per_image: dict[str, int] = {}
    for c, rows in lines.items():
        assert len(rows) == out["per_class"][c]["ndet"]
        for image_id, *vals in rows:
            s, x1, y1, x2, y2 = map(float, vals)
            W, H, _ = read_xml(voc / "Annotations" / f"{image_id}.xml", DEMO_CLASSES)
            # 0-based continuous x1 < x2 in [0, W] is VOC x1 + 1 <= W, x2 <= W, width x2 - x1 + 1 > 0
            # (a sub-pixel box has xmin > xmax in VOC's inclusive convention)
            assert 0.001 < s <= 1 and 1 <= x1 < W + 1 and 1 <= y1 < H + 1 and 0 < x2 <= W and 0 < y2 <= H
            assert x2 - x1 + 1 > 0 and y2 - y1 + 1 > 0
            per_image[image_id] = per_image.get(image_id, 0) + 1
    assert sum(per_image.values()) == out["num_detections"] > 0
    assert max(per_image.values()) == 40   # the cap binds: this model has ~150 boxes per image
    # the JSON holds what main returned
    saved = json.loads(js.read_text())
    assert saved["map"] == out["map"] and same(saved["ap"], out["ap"]) and same(saved["per_class"], out["per_class"])
    # --results reads the files back to the very same numbers, for both metrics
    back = evaluate.main(["--results", str(res), "--data", "demo", "--data-root", str(demo), "--annotation-cache", ""])
    assert back["map"] == out["map"] and same(back["ap"], out["ap"])
    assert back["num_detections"] == out["num_detections"]
    area = evaluate.main(["--checkpoint", str(random_ckpt), "--data", "demo", "--data-root", str(demo),
                          "--metric", "area", "--max-det", "40", *RUN])
    area_back = evaluate.main(["--results", str(res), "--data", "demo", "--data-root", str(demo), "--metric", "area",
                               "--annotation-cache", ""])
    assert area["metric"] == "VOC area AP@0.5" and area_back["map"] == area["map"] != out["map"]


def test_unreadable_test_images_are_counted(demo, random_ckpt, tmp_path, capsys):
    import shutil
    root = tmp_path / "demo"
    shutil.copytree(demo, root)
    images = sorted((root / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))
    test_ids = (root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()
    broken = next(p for p in images if p.stem in test_ids)
    broken.write_bytes(broken.read_bytes()[:200])                     # truncated
    with pytest.warns(UserWarning, match=broken.name):
        out = evaluate.main(["--checkpoint", str(random_ckpt), "--data", "demo", "--data-root", str(root), *RUN])
    assert out["unreadable_images"] == 1 and out["num_images"] == 6
    assert "1 of the 6 images could not be read" in capsys.readouterr().out


def test_constant_model_detections_by_hand(demo, tmp_path):
    """A model whose output is its last bias: one box, class 'square', score 1, in cell (row 3, col 2).
    Its result lines and its AP are computed here from the box geometry and the XML files."""
    cfg = YoloConfig(**TINY)
    model = YOLOv1(cfg)
    S, B, C = cfg.S, cfg.B, cfg.C
    out = torch.zeros(S, S, 5 * B + C)
    out[3, 2, 0:4] = torch.tensor([0.5, 0.25, 0.5, 0.75])  # x, y in the cell; sqrt w, sqrt h
    out[3, 2, 4 * B] = 1.0                                  # confidence of box 0
    out[3, 2, 5 * B + 1] = 1.0                              # Pr(square | object)
    with torch.no_grad():
        model.head.fc2.weight.zero_()
        model.head.fc2.bias.copy_(out.flatten())
    ckpt = write_checkpoint(tmp_path / "const.pt", model)
    res = tmp_path / "res"
    got = evaluate.main(["--checkpoint", str(ckpt), "--data", "demo", "--data-root", str(demo),
                         "--save-results", str(res), *RUN])
    voc = demo / "VOCdevkit" / "VOC2007"
    ids = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()
    lines = read_results(res, "test", DEMO_CLASSES)
    assert all(not lines[c] for c in DEMO_CLASSES if c != "square")
    assert [r[0] for r in lines["square"]] == ids            # one per image, in set order
    cx, cy, w, h = 2.5 / 7, 3.25 / 7, 0.25, 0.5625
    truth, boxes = {}, []
    for image_id, row in zip(ids, lines["square"]):
        W, H, objs = read_xml(voc / "Annotations" / f"{image_id}.xml", DEMO_CLASSES)
        px = [max((cx - w / 2) * W, 0), max((cy - h / 2) * H, 0), min((cx + w / 2) * W, W), min((cy + h / 2) * H, H)]
        voc_box = [px[0] + 1, px[1] + 1, px[2], px[3]]      # 0-based continuous -> VOC 1-based inclusive
        assert float(row[1]) == 1.0
        np.testing.assert_allclose([float(v) for v in row[2:]], voc_box, atol=1e-4)
        boxes.append(voc_box)
        truth[image_id] = GroundTruth(np.array([o[2] for o in objs]).reshape(-1, 4),
                                      np.array([list(DEMO_CLASSES).index(o[0]) for o in objs], np.int64),
                                      np.array([o[1] for o in objs], bool))
    expected = evaluate_detections({1: (ids, np.ones(len(ids)), np.array(boxes))}, truth, list(DEMO_CLASSES))
    assert got["map"] == pytest.approx(expected["map"], abs=1e-9)
    for c in DEMO_CLASSES:
        assert got["ap"][c] == pytest.approx(expected["ap"][c], abs=1e-9, nan_ok=True)
        assert got["per_class"][c]["ndet"] == (len(ids) if c == "square" else 0)


def test_incompatible_checkpoint_is_refused(demo, tmp_path):
    voc_model = YOLOv1(YoloConfig(**{**TINY, "C": 20}))
    ckpt = write_checkpoint(tmp_path / "voc.pt", voc_model, VOC_CLASSES)
    with pytest.raises(ValueError, match=r"voc\.pt was trained on 20 classes .*--data demo has 5 classes"):
        evaluate.main(["--checkpoint", str(ckpt), "--data", "demo", "--data-root", str(demo), *RUN])
    # classes right, but weights of another width than the model_config says
    bad = YOLOv1(YoloConfig(**TINY)).state_dict()
    other = YOLOv1(YoloConfig(**{**TINY, "width": 1 / 8})).state_dict()
    save_checkpoint({"model": other, "model_config": YoloConfig(**TINY).to_dict(),
                     "class_names": list(DEMO_CLASSES)}, tmp_path / "mixed.pt")
    assert bad.keys() == other.keys()
    with pytest.raises(ValueError, match=r"mixed\.pt: its model weights do not fit this model"):
        evaluate.main(["--checkpoint", str(tmp_path / "mixed.pt"), "--data", "demo", "--data-root", str(demo), *RUN])
    # malformed entries: one ValueError naming the file, never a KeyError / TypeError traceback
    good = {"model": bad, "model_config": YoloConfig(**TINY).to_dict(), "class_names": list(DEMO_CLASSES)}
    for name, broken, message in (("ema", {"ema": {"updates": 3}}, "its 'ema' entry is not a weight average"),
                                  ("notdict", {"model": [1, 2]}, "its model weights are a list, not a state dict"),
                                  ("names", {"class_names": "abc"}, "its class_names are 'abc', not a list")):
        save_checkpoint({**good, **broken}, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=rf"{name}\.pt: {message}"):
            evaluate.load_model(tmp_path / f"{name}.pt")
    save_checkpoint({"model": bad}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=r"bare\.pt lacks \['model_config', 'class_names'\]"):
        evaluate.main(["--checkpoint", str(tmp_path / "bare.pt"), "--data", "demo", "--data-root", str(demo), *RUN])


# ---------------------------------------------------------------- --results against hand-computed AP

def write_voc(root: Path, images: dict[str, list[tuple[str, list[int], int]]], year="2007", split="test") -> Path:
    """A VOC tree of annotations only (no JPEGs): id -> [(class, box, difficult)]."""
    voc = root / "VOCdevkit" / f"VOC{year}"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for image_id, objs in images.items():
        body = "".join(f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
                       f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                       for c, b, d in objs)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>500</width><height>400</height></size>{body}</annotation>\n")
    (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    return root


DOG1, DOG2, CAT, CAT_DIFF = [11, 21, 110, 120], [201, 51, 300, 200], [51, 51, 250, 250], [301, 201, 360, 300]
HAND = {"000001": [("dog", DOG1, 0), ("cat", CAT_DIFF, 1)], "000002": [("dog", DOG2, 0)],
        "000003": [("cat", CAT, 0)]}


def write_hand_results(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    box = lambda b: " ".join(map(str, b))  # noqa: E731
    (folder / "comp4_det_test_dog.txt").write_text(
        f"000001 0.9 {box(DOG1)}\n000003 0.8 400 300 450 350\n000002 0.7 {box(DOG2)}\n{extra}")
    (folder / "comp4_det_test_cat.txt").write_text(f"000001 0.95 {box(CAT_DIFF)}\n000003 0.6 {box(CAT)}\n")
    return folder


def test_results_hand_computed_ap_and_json(tmp_path, capsys):
    root = write_voc(tmp_path / "voc", HAND)
    res = write_hand_results(tmp_path / "res")
    js = tmp_path / "out" / "eval.json"
    out = evaluate.main(["--results", str(res), "--data-root", str(root), "--json", str(js),
                         "--annotation-cache", str(tmp_path / "cache")])
    # dog: TP, FP, TP over 2 GT -> recall .5 .5 1, precision 1 .5 2/3.
    # 11-point: t = 0 .. 0.5 reach precision 1, t = 0.6 .. 1 precision 2/3.
    # cat: the difficult hit is ignored, the other is TP: AP 1. The 18 other classes have no GT.
    dog07 = (6 * 1 + 5 * (2 / 3)) / 11
    saved = json.loads(js.read_text())
    assert saved["metric"] == "VOC07 11-point AP@0.5"
    # (11 sums of p / 11 in float64: 1.0000000000000002 for a perfect class, hence approx)
    assert saved["ap"]["dog"] == pytest.approx(dog07, abs=1e-12) and saved["ap"]["cat"] == pytest.approx(1, abs=1e-12)
    assert saved["map"] == pytest.approx((dog07 + 1) / 2, abs=1e-12)
    assert all(saved["ap"][c] is None for c in VOC_CLASSES if c not in ("dog", "cat"))
    assert saved["per_class"]["dog"] == {"ap": saved["ap"]["dog"], "npos": 2, "ndet": 3}
    assert saved["per_class"]["cat"] == {"ap": saved["ap"]["cat"], "npos": 1, "ndet": 2}
    assert saved["num_images"] == 3 and saved["num_detections"] == 5 and saved["set"] == "2007-test"
    assert saved["source"] == {"results": str(res)}
    assert math.isnan(out["ap"]["bird"]) and out["map"] == saved["map"]
    assert "0.8485 VOC07 11-point AP@0.5" in capsys.readouterr().out
    area = evaluate.main(["--results", str(res), "--data-root", str(root), "--metric", "area",
                          "--annotation-cache", ""])
    assert area["metric"] == "VOC area AP@0.5"
    assert area["ap"]["dog"] == pytest.approx(0.5 * 1 + 0.5 * (2 / 3), abs=1e-12)


def test_results_errors(tmp_path):
    root = write_voc(tmp_path / "voc", HAND)
    res = write_hand_results(tmp_path / "res", extra="000777 0.5 1 1 20 20\n")
    with pytest.raises(ValueError, match=r"res against --set 2007-test.*'000777'"):
        evaluate.main(["--results", str(res), "--data-root", str(root), "--annotation-cache", ""])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "comp4_det_val_dog.txt").write_text("")
    with pytest.raises(ValueError, match=r"no comp4_det_test_<class>\.txt.*comp4_det_val_dog\.txt"):
        evaluate.main(["--results", str(empty), "--data-root", str(root), "--annotation-cache", ""])
    (empty / "comp4_det_test_circle.txt").write_text("000001 0.5 1 1 20 20\n")
    with pytest.raises(ValueError, match=r"comp4_det_test_circle\.txt.*wrong --data"):
        evaluate.main(["--results", str(empty), "--data-root", str(root), "--annotation-cache", ""])
    with pytest.raises(SystemExit):
        evaluate.main(["--results", str(res), "--data-root", str(root), "--save-results", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match=r"results folder .*comp4_det_test_dog\.txt is a file"):
        evaluate.main(["--results", str(res / "comp4_det_test_dog.txt"), "--data-root", str(root),
                       "--annotation-cache", ""])


def test_results_without_the_file_of_a_class_with_objects_say_so(tmp_path, capsys):
    root = write_voc(tmp_path / "voc", HAND)
    res = write_hand_results(tmp_path / "res")
    (res / "comp4_det_test_cat.txt").unlink()     # cat has an object; the 18 classes without one say nothing
    out = evaluate.main(["--results", str(res), "--data-root", str(root), "--annotation-cache", ""])
    assert out["ap"]["cat"] == 0 and out["per_class"]["cat"]["npos"] == 1
    said = [line for line in capsys.readouterr().out.splitlines() if "file for" in line]
    assert said == [f"{res}: no comp4_det_test_<class>.txt file for cat, of which the set has objects: scored as no "
                    "detections (AP 0)"]


def test_default_metric_and_split():
    assert evaluate.default_metric("2007-test") == "voc07"
    assert evaluate.default_metric("2012-val") == "area"
    assert evaluate.default_metric("2010-val+2012-val") == "area"
    with pytest.raises(ValueError, match="--metric"):
        evaluate.default_metric("2007-test+2012-val")
    assert evaluate.results_split("2007-test") == "test"
    assert evaluate.results_split("2007-test+2012-val") == "2007-test+2012-val"


# ---------------------------------------------------------------- ground truth and its cache

def test_ground_truth_equals_vocdetection(tmp_path):
    """Same ids, boxes, labels, difficult flags and report as dataset.VOCDetection, problems included."""
    root = make_demo_voc(tmp_path / "demo", n_trainval=2, n_test=4, seed=1)
    voc = root / "VOCdevkit" / "VOC2007"
    shutil.copy(voc / "JPEGImages" / "000003.jpg", voc / "JPEGImages" / "000099.jpg")  # image without annotation
    xml = voc / "Annotations" / "000004.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>un", 1))                  # an unknown class
    with open(voc / "ImageSets" / "Main" / "test.txt", "a") as f:
        f.write("../etc\n000004\n000099\n")
    for spec in ("2007-test", "2007-test+2007-train"):
        ds = VOCDetection(root, spec, DEMO_CLASSES, image_size=64)
        for cache in (None, tmp_path / "cache", tmp_path / "cache"):   # uncached, cold, warm
            gt, report = evaluate.load_ground_truth(root, spec, DEMO_CLASSES, cache)
            want = ds.ground_truth()
            assert list(gt) == list(want)
            for k in want:
                for field in ("boxes", "labels", "difficult"):
                    a, b = getattr(gt[k], field), getattr(want[k], field)
                    assert a.dtype == b.dtype and np.array_equal(a, b)
            assert report == ds.report and len(report) == 4


def test_cache_is_never_stale(tmp_path, monkeypatch):
    root = write_voc(tmp_path / "voc", HAND)
    cache = tmp_path / "cache"
    calls = []
    real = evaluate.parse_voc_xml
    monkeypatch.setattr(evaluate, "parse_voc_xml", lambda p, c: calls.append(Path(p).name) or real(p, c))
    gt0, _ = evaluate.load_ground_truth(root, "2007-test", VOC_CLASSES, cache)
    assert len(calls) == 3 and len(list(cache.iterdir())) == 1
    calls.clear()
    gt1, _ = evaluate.load_ground_truth(root, "2007-test", VOC_CLASSES, cache)
    assert calls == [] and all(np.array_equal(gt0[k].boxes, gt1[k].boxes) for k in gt0)
    # same size, same mtime, other content: found by the content hash
    xml = root / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    st = xml.stat()
    text = xml.read_text()
    assert "<xmin>201</xmin>" in text
    xml.write_text(text.replace("<xmin>201</xmin>", "<xmin>202</xmin>"))
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert xml.stat().st_size == st.st_size and xml.stat().st_mtime_ns == st.st_mtime_ns
    gt2, _ = evaluate.load_ground_truth(root, "2007-test", VOC_CLASSES, cache)
    assert calls == ["000002.xml"] and gt2["000002"].boxes[0, 0] == 202.0
    # another class list (labels are class indices): nothing served from the cache
    calls.clear()
    classes = list(reversed(VOC_CLASSES))
    gt3, _ = evaluate.load_ground_truth(root, "2007-test", classes, cache)
    assert len(calls) == 3 and gt3["000002"].labels[0] == classes.index("dog")
    # another parser (dataset.py edited): nothing served from the cache
    calls.clear()
    monkeypatch.setattr(evaluate, "_parser_fingerprint", lambda: "edited")
    evaluate.load_ground_truth(root, "2007-test", classes, cache)
    assert len(calls) == 3
    # a corrupt cache file is rebuilt with a warning, not trusted
    calls.clear()
    next(cache.iterdir()).write_text("{not json")
    gt4, _ = evaluate.load_ground_truth(root, "2007-test", classes, cache)
    assert len(calls) == 3 and np.array_equal(gt4["000002"].boxes, gt3["000002"].boxes)


def test_bench_annotation_loading(tmp_path):
    out = evaluate.bench_annotation_loading(tmp_path, n=40)
    assert out["num_images"] == 40 and 40 <= out["num_objects"] <= 200
    assert all(out[k] > 0 for k in ("no_cache_seconds", "cold_seconds", "warm_seconds"))
    gt, report = evaluate.load_ground_truth(tmp_path, "2007-test", VOC_CLASSES, None)
    assert report == [] and sum(len(g.labels) for g in gt.values()) == out["num_objects"]


def test_compile_gives_the_eager_detections(demo, random_ckpt):
    """--compile: torch.compile at one batch size, the last (partial) batch padded: the same mAP
    and detections as the eager model (6 images at batch 4: a full batch and a padded one)."""
    args = ["--checkpoint", str(random_ckpt), "--data", "demo", "--data-root", str(demo), "--max-det", "40", *RUN]
    eager = evaluate.main(args)
    compiled = evaluate.main([*args, "--compile"])
    assert compiled["num_images"] == eager["num_images"] == 6
    assert compiled["num_detections"] == eager["num_detections"]
    assert compiled["map"] == pytest.approx(eager["map"], abs=1e-6)
    for c in DEMO_CLASSES:
        assert compiled["per_class"][c]["ndet"] == eager["per_class"][c]["ndet"]


def test_static_batch_compiled_pads_and_refuses_a_larger_batch(monkeypatch):
    from utils import StaticBatchCompiled
    seen = []

    def fake_compile(module, **kw):            # records the shapes the compiled graph would see
        def run(x):
            seen.append(tuple(x.shape))
            return module(x)
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    x = torch.randn(4, 3, 8, 8)
    wrapped = StaticBatchCompiled(net, 4, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x[:3]), net(x[:3]))     # padded to 4, the padding's rows dropped
        assert wrapped(x).shape == (4, 5)
    assert seen == [(4, 3, 8, 8), (4, 3, 8, 8)]
    with pytest.raises(ValueError, match="over the 4"):
        wrapped(torch.randn(5, 3, 8, 8))
