"""detect.py: image discovery, preprocessing equal to evaluation's, decoded detections equal to
hand-computed ones, outputs (drawn images, JSON, txt), filters, skipped files, numbering."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import detect
import draw
from dataset import DataError, VOCDetection, collate_skip_none, read_image
from model import YoloConfig, YOLOv1
from utils import predict, save_checkpoint

CLASSES = ["apple", "banana", "cherry"]
S, B, C = 7, 2, 3

# A fixed output (S, S, 5B+C), laid out as model.py's docstring says, independent of the input:
#   cell (row 2, col 3), box 0: centre (3.5/7, 2.5/7) of the image, w 0.4, h 0.2, conf 0.9,
#       classes (0.1, 0.8, 0.1) -> "banana" 0.72 (the others 0.09: under 0.25)
#   cell (row 5, col 1), box 1: centre (1.25/7, 5.75/7), w 0.2, h 0.3, conf 0.6,
#       classes (0.1, 0.0, 0.5) -> "cherry" 0.30 ("apple" 0.06)
FIXED = torch.zeros(S, S, 5 * B + C)
FIXED[2, 3, 0:4] = torch.tensor([0.5, 0.5, math.sqrt(0.4), math.sqrt(0.2)])
FIXED[2, 3, 4 * B + 0] = 0.9
FIXED[2, 3, 5 * B:] = torch.tensor([0.1, 0.8, 0.1])
FIXED[5, 1, 4:8] = torch.tensor([0.25, 0.75, math.sqrt(0.2), math.sqrt(0.3)])
FIXED[5, 1, 4 * B + 1] = 0.6
FIXED[5, 1, 5 * B:] = torch.tensor([0.1, 0.0, 0.5])


def expected_detections(height: int, width: int) -> list[tuple[str, float, list[float]]]:
    """The two detections of FIXED on an image of this size, computed by hand: (class, score, xyxy px)."""
    def box(cx, cy, w, h):
        return [max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height),
                min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height)]
    return [("banana", 0.72, box(3.5 / 7, 2.5 / 7, 0.4, 0.2)), ("cherry", 0.30, box(1.25 / 7, 5.75 / 7, 0.2, 0.3))]


def make_checkpoint(path, image_size: int = 64, fixed: torch.Tensor | None = FIXED, seed: int = 0,
                    shift: torch.Tensor | None = None) -> YOLOv1:
    """A tiny detector saved the way train_detector.py saves one. With ``fixed``, its last layer
    has zero weights and ``fixed`` as bias, so that it outputs ``fixed`` for every input; with
    ``shift`` (and no ``fixed``), random weights and ``shift`` added to the bias."""
    torch.manual_seed(seed)
    cfg = YoloConfig(S=S, B=B, C=C, image_size=image_size, width=0.125, batch_norm=True)
    model = YOLOv1(cfg).eval()
    with torch.no_grad():
        if fixed is not None:
            model.head.fc2.weight.zero_()
            model.head.fc2.bias.copy_(fixed.flatten())
        elif shift is not None:
            model.head.fc2.bias.add_(shift.flatten())
    save_checkpoint({"model": model.state_dict(), "model_config": cfg.to_dict(), "class_names": CLASSES,
                     "config": {"data": "test"}, "state": {"epoch": 3}}, path)
    return model


def write_images(folder) -> dict[str, tuple[int, int]]:
    """Images of odd sizes and modes, a broken one and a non-image file; returns name -> (H, W)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {"rgb.png": (48, 80), "gray.png": (33, 21), "tiny.png": (1, 1), "long.jpg": (17, 300)}
    for name, (h, w) in sizes.items():
        mode_gray = name.startswith(("gray", "tiny"))
        arr = rng.integers(0, 256, (h, w) if mode_gray else (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image, and not an image suffix: ignored in a folder")
    return sizes


def run(argv) -> dict:
    return detect.main([*map(str, argv), "--workers", "0", "--no-progress"])


def test_find_images(tmp_path):
    write_images(tmp_path / "imgs")
    names = [p.name for p in detect.find_images([str(tmp_path / "imgs")])]
    assert names == ["broken.jpg", "gray.png", "long.jpg", "rgb.png", "tiny.png"]   # sorted, .txt left out
    # a file named explicitly is used whatever its suffix; a glob; duplicates appear once, in order
    got = detect.find_images([str(tmp_path / "imgs" / "notes.txt"), str(tmp_path / "imgs" / "*.png"),
                              str(tmp_path / "imgs" / "rgb.png")])
    assert [p.name for p in got] == ["notes.txt", "gray.png", "rgb.png", "tiny.png"]
    with pytest.raises(FileNotFoundError, match="nothere"):
        detect.find_images([str(tmp_path / "nothere.jpg")])
    with pytest.raises(FileNotFoundError, match="matches no image"):
        detect.find_images([str(tmp_path / "imgs" / "*.bmp")])


def test_no_readable_input_is_an_error_after_the_record(tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    make_checkpoint(ckpt)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="none of the 1 input file"):
        run(["--checkpoint", ckpt, tmp_path / "imgs", "--out-dir", out])
    saved = json.loads((out / "detections.json").read_text())    # what was skipped is still written down
    assert saved["num_images"] == 0 and [s["file"] for s in saved["skipped"]] == [str(tmp_path / "imgs" / "a.jpg")]


def test_output_names_unique_by_stem_and_animated_gif_first_frame(tmp_path):
    used: set[str] = set()
    names = [detect.output_name(Path(p), used) for p in ("x/a.jpg", "x/a.png", "y/a.jpeg", "y/b.JPG")]
    assert names == ["a.jpg", "a-2.png", "a-3.jpg", "b.jpg"]          # labels/a.txt, a-2.txt, a-3.txt: no clash
    frames = [Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (10, 120, 240)]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = read_image(gif)
    assert image.shape == (3, 20, 30) and int(image.float().mean().round()) == 10      # the first frame
    assert detect.preprocess(image, 64).shape == (3, 64, 64)


def test_detect_outputs_match_hand_computed(tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    make_checkpoint(ckpt)
    sizes = write_images(tmp_path / "imgs")
    out = tmp_path / "out"
    summary = run(["--checkpoint", ckpt, tmp_path / "imgs", "--out-dir", out, "--save-txt", "--batch-size", "2"])
    saved = json.loads((out / "detections.json").read_text())
    assert saved["num_images"] == summary["num_images"] == 4
    assert [s["file"] for s in saved["skipped"]] == [str(tmp_path / "imgs" / "broken.jpg")]
    assert "broken.jpg" in saved["skipped"][0]["error"]
    for entry in saved["images"]:
        name = entry["file"].rsplit("/", 1)[-1]
        h, w = sizes[name]
        assert (entry["height"], entry["width"]) == (h, w)
        want = expected_detections(h, w)
        got = entry["detections"]
        assert [d["class"] for d in got] == [c for c, _, _ in want]
        assert [d["class_id"] for d in got] == [CLASSES.index(c) for c, _, _ in want]
        np.testing.assert_allclose([d["score"] for d in got], [s for _, s, _ in want], atol=1e-4)
        np.testing.assert_allclose([d["box"] for d in got], [b for _, _, b in want], atol=0.006)
        # the drawn image keeps the original size and its name and format
        drawn = Image.open(out / entry["image"])
        assert drawn.size == (w, h) and drawn.mode == "RGB"
        assert entry["image"] == name
        lines = (out / "labels" / f"{name.rsplit('.', 1)[0]}.txt").read_text().splitlines()
        assert [ln.split()[0] for ln in lines] == ["banana", "cherry"]
        np.testing.assert_allclose([float(v) for v in lines[0].split()[1:]], [0.72, *want[0][2]], atol=0.006)
    # the banana box's left edge is drawn in the banana colour on the (lossless) PNG
    rgb = np.asarray(Image.open(out / "rgb.png"))
    x1, y1, x2, y2 = expected_detections(48, 80)[0][2]
    assert tuple(rgb[int((y1 + y2) / 2), math.floor(x1)]) == draw.class_color(1)


def test_thresholds_and_class_filter(tmp_path):
    ckpt = tmp_path / "best.pt"
    make_checkpoint(ckpt)
    Image.fromarray(np.full((70, 90, 3), 128, np.uint8)).save(tmp_path / "a.png")

    def classes(*extra):
        s = run(["--checkpoint", ckpt, tmp_path / "a.png", "--out-dir", tmp_path / "o", "--no-images", *extra])
        return [d["class"] for d in s["images"][0]["detections"]]

    assert classes() == ["banana", "cherry"]
    assert classes("--conf", "0.5") == ["banana"]
    # lower: banana's cell also scores apple and cherry 0.09, cherry's cell apple 0.06
    assert sorted(classes("--conf", "0.08")) == ["apple", "banana", "cherry", "cherry"]
    assert classes("--conf", "0.05")[-1] == "apple"
    assert classes("--max-det", "1") == ["banana"]
    assert classes("--classes", "cherry") == ["cherry"]
    assert classes("--classes", "0", "--conf", "0.05") == ["apple", "apple"]
    assert classes("--classes", "2", "apple") == ["cherry"]
    assert classes("--classes", "cherry", "--max-det", "1") == ["cherry"]   # the cap applies after the filter
    with pytest.raises(ValueError, match="durian"):
        classes("--classes", "durian")


def test_preprocessing_and_detections_equal_evaluation(tmp_path):
    """detect.py on an image gives what evaluation (VOCDetection + utils.predict) gives for it."""
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    ids = ["000001", "000002"]
    for image_id, (h, w) in zip(ids, [(57, 91), (120, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height></size><object><name>apple</name>"
            "<bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in ids))
    ds = VOCDetection(tmp_path, "2007-test", CLASSES, image_size=64, S=S, train=False)
    for i, image_id in enumerate(ids):
        img = read_image(voc / "JPEGImages" / f"{image_id}.jpg")
        assert torch.equal(detect.preprocess(img, 64), ds[i][0])

    ckpt = tmp_path / "random.pt"
    shift = FIXED.clone()
    shift[..., 4 * B:] += 0.3   # random weights, but scores above 0.01 in every cell
    model = make_checkpoint(ckpt, fixed=None, seed=3, shift=shift)
    ref = predict(model, DataLoader(ds, batch_size=2, collate_fn=collate_skip_none), B, C, torch.device("cpu"),
                  conf_threshold=0.01, nms_iou=0.5, max_det=15, progress=False)
    summary = run(["--checkpoint", ckpt, voc / "JPEGImages", "--out-dir", tmp_path / "o", "--conf", "0.01",
                   "--max-det", "15", "--no-images"])
    assert len(ref) == len(summary["images"]) == 2
    for (_, boxes, scores, labels), entry in zip(ref, summary["images"]):
        got = entry["detections"]
        assert len(got) == len(scores) > 0
        assert [d["class_id"] for d in got] == labels.tolist()
        np.testing.assert_allclose([d["score"] for d in got], scores, atol=6e-5)
        np.testing.assert_allclose([d["box"] for d in got], boxes, atol=0.006)


def test_default_out_dir_is_numbered_and_grid(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "runs" / "detector" / "demo" / "best.pt")
    write_images(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint", "runs/detector/demo/best.pt", "imgs/rgb.png", "imgs/long.jpg"]
    run(args)
    s = run([*args, "--grid", "sheet.jpg", "--grid-count", "2", "--grid-cols", "2", "--grid-cell", "100"])
    assert (tmp_path / "runs/detect/demo/detections.json").is_file()
    assert (tmp_path / "runs/detect/demo-2/detections.json").is_file()
    assert s["grid"] == "sheet.jpg"
    sheet = Image.open(tmp_path / "sheet.jpg")
    assert sheet.size == (2 * 100 + 4, 100)   # two 100 px cells, a 4 px gap, one row


def test_refuses_non_detector_checkpoint(tmp_path):
    save_checkpoint({"model": {}, "model_config": {}}, tmp_path / "cls.pt")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="class_names"):
        run(["--checkpoint", tmp_path / "cls.pt", tmp_path / "a.png", "--out-dir", tmp_path / "o"])


def test_compile_and_channels_last_flags(tmp_path, monkeypatch):
    """--compile wraps the model in utils.StaticBatchCompiled (torch.compile replaced here by a
    recorder, since test_evaluate compiles for real): every forward sees --batch-size images, the
    padded rows are dropped, and the detections are still the hand-computed ones."""
    seen = []

    def fake_compile(module, **kw):
        seen.append(kw)
        convs = [p for p in module.parameters() if p.ndim == 4]
        assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)

        def run(x):
            seen.append(tuple(x.shape))
            return module(x)
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    ckpt = tmp_path / "best.pt"
    make_checkpoint(ckpt)
    sizes = write_images(tmp_path / "imgs")
    saved = run(["--checkpoint", ckpt, tmp_path / "imgs", "--out-dir", tmp_path / "out", "--batch-size", "3",
                 "--compile", "--channels-last", "--no-images"])
    assert seen[0] == {"mode": "default", "dynamic": False}
    assert len(seen) > 2 and all(shape[0] == 3 for shape in seen[1:])       # every batch padded to 3
    assert saved["num_images"] == 4
    for entry in saved["images"]:
        h, w = sizes[entry["file"].rsplit("/", 1)[-1]]
        np.testing.assert_allclose([d["score"] for d in entry["detections"]],
                                   [s for _, s, _ in expected_detections(h, w)], atol=1e-4)
