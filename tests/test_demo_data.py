"""Tests of demo_data.py: the generated VOC and ImageNet demo trees (layout, annotation format,
determinism, caching, atomic install) and the mask-to-box helper. CPU only, small counts."""
from __future__ import annotations

import csv
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo_data  # noqa: E402
from demo_data import (DEMO_CLASSES, DEMO_WNIDS, make_demo_imagenet, make_demo_voc,  # noqa: E402
                       make_flat_val, mask_to_box, render_voc_image)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parse_voc(xml_path: Path) -> tuple[ET.Element, list[dict]]:
    ann = ET.parse(xml_path).getroot()
    objects = []
    for obj in ann.findall("object"):
        objects.append({
            "name": obj.findtext("name"),
            "pose": obj.findtext("pose"),
            "truncated": int(obj.findtext("truncated")),
            "difficult": int(obj.findtext("difficult")),
            "box": tuple(int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")),
        })
    return ann, objects


# --- mask_to_box ------------------------------------------------------------------------------

def test_mask_to_box_is_one_based_inclusive() -> None:
    mask = np.zeros((60, 80), dtype=bool)
    mask[5:9, 10:50] = True  # rows 5..8, columns 10..49 (0-based)
    assert mask_to_box(mask) == (11, 6, 50, 9)
    mask[:] = False
    mask[0, 0] = True
    assert mask_to_box(mask) == (1, 1, 1, 1)
    mask[59, 79] = True
    assert mask_to_box(mask) == (1, 1, 80, 60)


def test_mask_to_box_tight_around_irregular_shape() -> None:
    yy, xx = np.mgrid[0:50, 0:70]
    mask = (xx - 30.5) ** 2 + (yy - 20.5) ** 2 <= 10 ** 2  # disc centred between pixels 30 and 31
    mask[45, 3] = True  # a stray pixel widens the box
    assert mask_to_box(mask) == (4, 12, 41, 46)  # rows 11..30 and 45, columns 3 and 21..40


def test_mask_to_box_rejects_bad_masks() -> None:
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="2-D"):
        mask_to_box(np.ones((4, 4, 3), dtype=bool))


# --- rendered detection images ------------------------------------------------------------------

def test_rendered_boxes_are_tight_boxes_of_visible_pixels() -> None:
    n_objects, truncated, difficult, overlapping = 0, 0, 0, 0
    for index in range(1, 151):
        demo = render_voc_image(0, index)
        H, W = demo.labels.shape
        assert demo.image.shape == (H, W, 3) and demo.image.dtype == np.uint8
        assert 200 <= H <= 320 and 200 <= W <= 320
        assert 1 <= len(demo.objects) <= 4
        assert set(np.unique(demo.labels)) <= set(range(len(demo.objects) + 1))
        for i, obj in enumerate(demo.objects):
            assert obj.name in DEMO_CLASSES
            assert mask_to_box(demo.labels == i + 1) == obj.box
            side = max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]) + 1
            assert side <= 0.7 * min(H, W)
        boxes = [o.box for o in demo.objects]
        overlapping += any(a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
                           for k, a in enumerate(boxes) for b in boxes[k + 1:])
        n_objects += len(demo.objects)
        truncated += sum(o.truncated for o in demo.objects)
        difficult += sum(o.difficult for o in demo.objects)
    # The mix the issue asks for: some occlusion, some border cuts, a few difficult tiny objects.
    assert overlapping >= 20
    assert 0.1 <= truncated / n_objects <= 0.4
    assert 1 <= difficult <= 0.08 * n_objects


def test_render_is_deterministic_and_per_image() -> None:
    a, b = render_voc_image(3, 7), render_voc_image(3, 7)
    assert np.array_equal(a.image, b.image) and a.objects == b.objects
    assert not np.array_equal(render_voc_image(3, 8).image[:50, :50], a.image[:50, :50])


# --- VOC tree -----------------------------------------------------------------------------------

def test_voc_layout_and_annotations(tmp_path: Path) -> None:
    root = make_demo_voc(tmp_path / "demo", n_trainval=20, n_test=6, seed=0)
    assert root == tmp_path / "demo"
    voc = root / "VOCdevkit" / "VOC2007"
    main = voc / "ImageSets" / "Main"
    trainval = main.joinpath("trainval.txt").read_text().split()
    test = main.joinpath("test.txt").read_text().split()
    assert trainval == [f"{i:06d}" for i in range(1, 21)]
    assert test == [f"{i:06d}" for i in range(21, 27)]
    assert sorted(main.joinpath("train.txt").read_text().split() + main.joinpath("val.txt").read_text().split()) == trainval
    assert len(list((voc / "JPEGImages").iterdir())) == 26
    assert len(list((voc / "Annotations").iterdir())) == 26

    for image_id in trainval + test:
        ann, objects = _parse_voc(voc / "Annotations" / f"{image_id}.xml")
        assert ann.tag == "annotation"
        assert ann.findtext("folder") == "VOC2007"
        assert ann.findtext("filename") == f"{image_id}.jpg"
        assert ann.find("source") is not None
        assert ann.findtext("segmented") == "0"
        W, H = int(ann.findtext("size/width")), int(ann.findtext("size/height"))
        assert ann.findtext("size/depth") == "3"
        with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (W, H)
        assert 1 <= len(objects) <= 4
        cells = set()
        for obj in objects:
            assert obj["name"] in DEMO_CLASSES
            assert obj["pose"] == "Unspecified"
            assert obj["truncated"] in (0, 1) and obj["difficult"] in (0, 1)
            xmin, ymin, xmax, ymax = obj["box"]
            assert 1 <= xmin <= xmax <= W and 1 <= ymin <= ymax <= H
            if xmin == 1 or ymin == 1 or xmax == W or ymax == H:
                assert obj["truncated"] == 1, (image_id, obj)
            # One object per cell of YOLOv1's 7x7 grid, under either half-pixel centre convention.
            cell_of = [(int(((ymin - 1 + ymax) / 2 + d) / H * 7), int(((xmin - 1 + xmax) / 2 + d) / W * 7))
                       for d in (-0.5, 0.0, 0.5)]
            assert cell_of[0] == cell_of[1] == cell_of[2], (image_id, obj)
            assert cell_of[1] not in cells, (image_id, objects)
            cells.add(cell_of[1])


def test_voc_generation_is_byte_identical(tmp_path: Path) -> None:
    a = make_demo_voc(tmp_path / "a", n_trainval=8, n_test=3, seed=5)
    b = make_demo_voc(tmp_path / "b", n_trainval=8, n_test=3, seed=5)
    assert _tree_bytes(a) == _tree_bytes(b)
    c = make_demo_voc(tmp_path / "c", n_trainval=8, n_test=3, seed=6)
    assert _tree_bytes(a) != _tree_bytes(c)


def test_voc_generation_in_several_processes_writes_the_same_bytes(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    serial = make_demo_voc(tmp_path / "serial", n_trainval=8, n_test=3, seed=5)
    monkeypatch.setattr(demo_data, "IMAGES_PER_PROCESS", 2)       # 11 images: as many processes as cores
    parallel = make_demo_voc(tmp_path / "parallel", n_trainval=8, n_test=3, seed=5)
    assert _tree_bytes(serial) == _tree_bytes(parallel)


def test_voc_image_does_not_depend_on_dataset_size(tmp_path: Path) -> None:
    small = make_demo_voc(tmp_path / "s", n_trainval=3, n_test=0) / "VOCdevkit" / "VOC2007"
    large = make_demo_voc(tmp_path / "l", n_trainval=5, n_test=2) / "VOCdevkit" / "VOC2007"
    for name in ("JPEGImages/000003.jpg", "Annotations/000003.xml"):
        assert (small / name).read_bytes() == (large / name).read_bytes()


def test_voc_cache_hit_and_regeneration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_demo_voc(tmp_path / "demo", n_trainval=5, n_test=2)
    voc = root / "VOCdevkit" / "VOC2007"
    jpeg, marker = voc / "JPEGImages" / "000001.jpg", voc / ".complete"
    mtimes = (jpeg.stat().st_mtime_ns, marker.stat().st_mtime_ns)

    def must_not_render(*args: object) -> None:
        raise AssertionError("cache hit expected, but the demo was regenerated")

    with monkeypatch.context() as m:
        m.setattr(demo_data, "render_voc_image", must_not_render)
        assert make_demo_voc(tmp_path / "demo", n_trainval=5, n_test=2) == root
    assert (jpeg.stat().st_mtime_ns, marker.stat().st_mtime_ns) == mtimes

    # Other parameters: the old demo tree is replaced, nothing is left beside it.
    make_demo_voc(tmp_path / "demo", n_trainval=5, n_test=4)
    assert len((voc / "ImageSets" / "Main" / "test.txt").read_text().split()) == 4
    assert sorted(p.name for p in (root / "VOCdevkit").iterdir()) == ["VOC2007"]


def test_voc_refuses_to_overwrite_foreign_tree(tmp_path: Path) -> None:
    voc = tmp_path / "demo" / "VOCdevkit" / "VOC2007"
    voc.mkdir(parents=True)
    (voc / "precious.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="not a demo tree"):
        make_demo_voc(tmp_path / "demo", n_trainval=2, n_test=1)
    assert (voc / "precious.txt").read_text() == "real data"


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = demo_data.render_voc_image

    def dies_at_third(seed: int, index: int):
        if index == 3:
            raise KeyboardInterrupt
        return real(seed, index)

    monkeypatch.setattr(demo_data, "render_voc_image", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        make_demo_voc(tmp_path / "demo", n_trainval=5, n_test=0)
    assert list((tmp_path / "demo" / "VOCdevkit").iterdir()) == []


def test_race_loser_uses_winner_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = demo_data.render_voc_image
    state = {"raced": False}

    def racing_render(seed: int, index: int):
        if not state["raced"]:  # while this generation runs, another one finishes first
            state["raced"] = True
            make_demo_voc(tmp_path / "demo", n_trainval=4, n_test=1)
        return real(seed, index)

    monkeypatch.setattr(demo_data, "render_voc_image", racing_render)
    root = make_demo_voc(tmp_path / "demo", n_trainval=4, n_test=1)
    monkeypatch.undo()
    assert state["raced"]
    assert _tree_bytes(root) == _tree_bytes(make_demo_voc(tmp_path / "fresh", n_trainval=4, n_test=1))
    assert sorted(p.name for p in (root / "VOCdevkit").iterdir()) == ["VOC2007"]


def test_bad_counts_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_trainval"):
        make_demo_voc(tmp_path, n_trainval=0)
    with pytest.raises(ValueError, match="n_val_per_class"):
        make_demo_imagenet(tmp_path, n_val_per_class=-1)


# --- ImageNet tree ------------------------------------------------------------------------------

def test_imagenet_layout_and_val_solution(tmp_path: Path) -> None:
    root = make_demo_imagenet(tmp_path / "inet", n_train_per_class=3, n_val_per_class=2, seed=0)
    assert root == tmp_path / "inet"
    assert sorted(p.name for p in (root / "train").iterdir()) == list(DEMO_WNIDS)
    for wnid in DEMO_WNIDS:
        assert sorted(p.name for p in (root / "train" / wnid).iterdir()) == [f"{wnid}_{k}.JPEG" for k in (1, 2, 3)]
        assert len(list((root / "val" / wnid).glob("ILSVRC2012_val_*.JPEG"))) == 2

    mapping = root.joinpath("LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in mapping] == list(DEMO_WNIDS)
    assert mapping[0] == "n00000001 circle, disc"

    val_files = {p.stem: p for p in (root / "val").glob("*/*.JPEG")}
    assert sorted(val_files) == [f"ILSVRC2012_val_{v:08d}" for v in range(1, 17)]
    with open(root / "LOC_val_solution.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    assert sorted(r[0] for r in rows[1:]) == sorted(val_files)
    for image_id, prediction in rows[1:]:
        fields = prediction.split()
        assert len(fields) % 5 == 0 and fields
        path = val_files[image_id]
        with Image.open(path) as im:
            W, H = im.size
            assert im.format == "JPEG" and 160 <= W <= 256 and 160 <= H <= 256
        for k in range(0, len(fields), 5):
            wnid, box = fields[k], [int(v) for v in fields[k + 1:k + 5]]
            assert wnid == path.parent.name
            assert 1 <= box[0] <= box[2] <= W and 1 <= box[1] <= box[3] <= H
            assert box[2] - box[0] + 1 >= 0.3 * min(W, H)  # one big shape


def test_imagenet_tree_loads_with_image_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    root = make_demo_imagenet(tmp_path / "inet", n_train_per_class=2, n_val_per_class=1)
    train, val = datasets.ImageFolder(root / "train"), datasets.ImageFolder(root / "val")
    assert train.classes == list(DEMO_WNIDS) == val.classes
    assert len(train) == 16 and len(val) == 8
    image, label = val[0]
    assert image.mode == "RGB" and 0 <= label < 8


def test_imagenet_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_demo_imagenet(tmp_path / "a", n_train_per_class=2, n_val_per_class=1, seed=1)
    b = make_demo_imagenet(tmp_path / "b", n_train_per_class=2, n_val_per_class=1, seed=1)
    assert _tree_bytes(a) == _tree_bytes(b)
    marker_mtime = (a / ".complete").stat().st_mtime_ns
    monkeypatch.setattr(demo_data, "render_imagenet_image", lambda *args: pytest.fail("regenerated"))
    assert make_demo_imagenet(tmp_path / "a", n_train_per_class=2, n_val_per_class=1, seed=1) == a
    assert (a / ".complete").stat().st_mtime_ns == marker_mtime


def test_make_flat_val(tmp_path: Path) -> None:
    root = make_demo_imagenet(tmp_path / "inet", n_train_per_class=1, n_val_per_class=2)
    dst = make_flat_val(root, tmp_path / "flat")
    assert dst == tmp_path / "flat"
    flat = sorted(p.name for p in dst.iterdir())
    assert flat == [f"ILSVRC2012_val_{v:08d}.JPEG" for v in range(1, 17)]
    for src in (root / "val").glob("*/*.JPEG"):
        assert (dst / src.name).read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_val_"):
        make_flat_val(tmp_path / "nowhere", tmp_path / "flat2")


# --- command line -------------------------------------------------------------------------------

def test_cli_generates_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo_data.main(["--root", str(tmp_path), "--n-trainval", "3", "--n-test", "1",
                    "--n-train-per-class", "1", "--n-val-per-class", "1"])
    out = capsys.readouterr().out
    assert str(tmp_path / "demo") in out and str(tmp_path / "demo_imagenet") in out
    assert (tmp_path / "demo" / "VOCdevkit" / "VOC2007" / ".complete").is_file()
    assert (tmp_path / "demo_imagenet" / "LOC_val_solution.csv").is_file()


def test_class_colours_contrast_with_what_they_cover(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each class has its own hue family; its colour's luminance must differ by MIN_CONTRAST from
    # at least 90% of the pixels it covers. Mid-grey hues (green, magenta) need dark shades for
    # that: with values 0.5-1 only 53% of crosses made it, with VALUE_RANGE 0.3-1 over 70%.
    met: dict[str, list[bool]] = {name: [] for name in demo_data.DEMO_CLASSES}
    original = demo_data._class_colour

    def checked(rng, name, luma_under):
        colour = original(rng, name, luma_under)
        ok = np.mean(np.abs(luma_under - colour @ demo_data._LUMA) >= demo_data.MIN_CONTRAST) >= 0.9
        met[name].append(bool(ok))
        return colour

    monkeypatch.setattr(demo_data, "_class_colour", checked)
    for index in range(1, 121):
        demo_data.render_voc_image(0, index)
    for name, flags in met.items():
        assert len(flags) >= 30 and np.mean(flags) >= 0.7, (name, len(flags), np.mean(flags))
