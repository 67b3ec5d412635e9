"""Every kind of broken input in one VOC tree: reported by file and reason, never fatal, never silent."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import train_detector
from dataset import VOCDetection, read_image
from demo_data import DEMO_CLASSES
from helpers import TINY, png_bomb, tiny_voc

XML = """<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"""
OBJ = "<object><name>{name}</name>{difficult}<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"


def obj(name="circle", x0=10, y0=10, x1=50, y1=60, difficult="<difficult>0</difficult>"):
    return OBJ.format(name=name, x0=x0, y0=y0, x1=x1, y1=y1, difficult=difficult)


@pytest.fixture
def bad_tree(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    voc = root / "VOCdevkit" / "VOC2007"
    good = voc / "JPEGImages" / "000001.jpg"
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    ids = []

    def add(image_id, image_bytes=None, xml=None):
        ids.append(image_id)
        if image_bytes is not None:
            (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(image_bytes)
        if xml is not None:
            (voc / "Annotations" / f"{image_id}.xml").write_text(xml)

    def jpeg(img, **kw):
        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        return buf.getvalue()

    std_xml = XML.format(w=160, h=120, objects=obj())
    add("truncated", good.read_bytes()[: len(good.read_bytes()) // 3], std_xml)
    add("zerobyte", b"", std_xml)
    add("notimage", b"<html>this is not a picture</html>", std_xml)
    add("gray", jpeg(Image.fromarray(rgb[..., 0], "L")), std_xml)
    add("cmyk", jpeg(Image.fromarray(rgb).convert("CMYK")), std_xml)
    rgba = io.BytesIO()
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA").save(rgba, "PNG")
    add("alpha_png", rgba.getvalue(), std_xml)
    exif = Image.Exif()
    exif[0x0112] = 6                     # rotate 90 degrees clockwise when displayed
    add("exif_rotated", jpeg(Image.fromarray(rgb), exif=exif.tobytes()), XML.format(w=120, h=160, objects=obj()))
    import struct   # an orientation tag of type ASCII, which PIL will not write: a TIFF block by hand
    ascii_tag = (b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", 0x0112, 2, 4) + b"abc\x00"
                 + struct.pack("<I", 0))
    add("exif_ascii", jpeg(Image.fromarray(rgb), exif=ascii_tag), std_xml)
    add("huge", png_bomb(100_000, 100_000), std_xml)
    damaged = bytearray(jpeg(Image.fromarray(np.full((120, 160, 3), 200, np.uint8)), quality=90))
    start = damaged.index(b"\xff\xda") + (len(damaged) - damaged.index(b"\xff\xda")) // 3
    damaged[start:start + 40] = b"\x55" * 40       # inside the compressed data: libjpeg warns, decodes on
    add("damaged", bytes(damaged), std_xml)
    add("missing_image", None, std_xml)
    img = jpeg(Image.fromarray(rgb))
    add("malformed_xml", img, "<annotation><object><name>circle")
    add("entity_xml", img, '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY big "xxxx">]><annotation>&big;</annotation>')
    add("float_coords", img, XML.format(w=160, h=120, objects=obj(x0="10.5", y0="11.2", x1="50.7", y1="60.0")))
    add("outside", img, XML.format(w=160, h=120, objects=obj(x0=-20, y0=100, x1=400, y1=300)))
    add("degenerate", img, XML.format(w=160, h=120, objects=obj(x0=50, x1=49) + obj()))
    add("no_difficult", img, XML.format(w=160, h=120, objects=obj(difficult="")))
    add("unknown_class", img, XML.format(w=160, h=120, objects=obj(name="unicorn") + obj()))
    add("no_objects", img, XML.format(w=160, h=120, objects=""))
    add("size_disagrees", img, XML.format(w=640, h=480, objects=obj()))
    add("swapped_size", img, XML.format(w=120, h=160, objects=obj()))
    add("beyond_image", img, XML.format(w=160, h=120, objects=obj() + obj(x0=170, y0=10, x1=200, y1=50)))
    add("nan_width", img, XML.format(w="nan", h=120, objects=obj()))
    add("inf_difficult", img, XML.format(w=160, h=120, objects=obj(difficult="<difficult>inf</difficult>")))
    lst = voc / "ImageSets" / "Main" / "trainval.txt"
    lines = lst.read_text().splitlines() + ids + ["../../etc/passwd", "sub/dir", "000001"]
    lst.write_text("\n".join(lines) + "\n")
    return root


def report_of(root):
    res = train_detector.main(["--data", "demo", *TINY, "--data-root", str(root), "--check-data"])
    return "\n".join(f"{w}: {y}" for w, y in res["data_report"]["train"])


def test_check_data_names_every_problem(bad_tree):
    text = report_of(bad_tree)
    expected = {
        "truncated.jpg": "decode", "zerobyte.jpg": "empty", "notimage.jpg": "not a readable image (no image format recognised in its bytes)",
        "huge.jpg": "decompression bomb", "missing_image.jpg": "missing", "malformed_xml.xml": "malformed",
        "entity_xml.xml": "DOCTYPE", "degenerate.xml": "degenerate", "unknown_class.xml": "unicorn",
        "size_disagrees.jpg": "annotation says 640x480", "trainval.txt:": "unsafe image id",
        "swapped_size.jpg": "annotation says 120x160, image is 160x120",
        "exif_rotated.jpg": "EXIF orientation 6 ignored",
        "damaged.jpg": "decoded with a warning (Corrupt JPEG data",
        "exif_ascii.jpg": "an unreadable EXIF orientation tag ignored", "nan_width.xml": "<width> is 'nan', not a finite number",
        "inf_difficult.xml": "<difficult> is 'inf', not a finite number",
        "beyond_image.jpg": "annotated object 2 (circle, box [170.0, 10.0, 200.0, 50.0]) lies outside the 160x120",
    }
    for file, reason in expected.items():
        assert any(file in line and reason in line for line in text.splitlines()), (file, reason, text)
    assert "duplicate image id '000001'" in text and "BytesIO" not in text
    for fine in ("gray.jpg", "cmyk.jpg", "alpha_png.jpg", "float_coords", "no_difficult", "no_objects", "/outside."):
        assert fine not in text, fine


def test_check_data_without_a_stderr(bad_tree, monkeypatch):
    """With no stderr (pythonw, 2>&-) the libjpeg capture catches nothing and breaks nothing."""
    import sys
    from dataset import stderr_of_c_libraries
    monkeypatch.setattr(sys, "stderr", None)
    with stderr_of_c_libraries() as said:
        image = read_image(bad_tree / "VOCdevkit" / "VOC2007" / "JPEGImages" / "damaged.jpg")
    assert image.shape == (3, 120, 160) and said == []


def test_handled_cases_decode_correctly(bad_tree):
    voc = bad_tree / "VOCdevkit" / "VOC2007" / "JPEGImages"
    assert read_image(voc / "gray.jpg").shape == (3, 120, 160)
    assert read_image(voc / "cmyk.jpg").shape == (3, 120, 160)
    assert read_image(voc / "alpha_png.jpg").shape == (3, 120, 160)
    # the stored pixels, which VOC boxes refer to; upright as displayed only when asked (detect.py)
    stored = read_image(voc / "exif_rotated.jpg")
    assert stored.shape == (3, 120, 160)
    upright = read_image(voc / "exif_rotated.jpg", exif_orientation=True)
    torch.testing.assert_close(upright, stored.rot90(-1, (1, 2)))          # orientation 6: 90 degrees clockwise
    ds = VOCDetection(bad_tree, "2007-trainval", DEMO_CLASSES, 64, 7)
    by_id = {ds.annotation(i).image_id: i for i in range(len(ds))}
    ann = ds.annotation(by_id["float_coords"])
    assert ann.boxes.tolist() == [[10.5, 11.2, 50.7, 60.0]]
    assert ds.annotation(by_id["no_difficult"]).difficult.tolist() == [False]
    _, target, _ = ds[by_id["no_objects"]]
    assert target.sum() == 0
    _, target, _ = ds[by_id["outside"]]           # clipped to the image: (0, 99)-(160, 120) of 160x120
    cell = target[..., 4].nonzero()
    assert len(cell) == 1
    w, h = target[cell[0, 0], cell[0, 1], 2:4].tolist()
    assert w == pytest.approx(1.0) and h == pytest.approx(21 / 120, abs=1e-6)
    assert ds[by_id["truncated"]] is None and ds[by_id["huge"]] is None
    assert ds[by_id["exif_ascii"]] is not None             # a malformed EXIF tag does not make it unreadable


def test_training_completes_on_bad_data(bad_tree, tmp_path):
    res = train_detector.main(["--data", "demo", *TINY, "--data-root", str(bad_tree), "--epochs", "1",
                               "--batch-size", "4", "--out-dir", str(tmp_path / "run")])
    assert res["final_map"] is not None
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["state"]["skipped_images"] >= 1         # the truncated / zero-byte / bomb images
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert res["skipped_images"] == metrics["skipped_images"] == ckpt["state"]["skipped_images"]


def _add_second_png(root):
    """One more PNG named .jpg in the tree, so that two images decoded in the worker (plus the CMYK
    JPEG) come in one batch and their order is checked."""
    voc = root / "VOCdevkit" / "VOC2007"
    rgb = np.random.default_rng(5).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(voc / "JPEGImages" / "png2.jpg", "PNG")
    (voc / "Annotations" / "png2.xml").write_text(XML.format(w=150, h=100, objects=obj()))
    lst = voc / "ImageSets" / "Main" / "trainval.txt"
    lst.write_text(lst.read_text() + "png2\n")


def test_gpu_decode_batch_is_the_workers_batch(bad_tree):
    # On the CPU, JPEG bytes from the workers decoded and warped in the training process give the
    # workers' own batch bit for bit; the truncated JPEG, which passes its header, fails in the batch's
    # decode and is skipped with the same warning; PNGs named .jpg and the CMYK JPEG are decoded in the
    # worker.
    import warnings
    from dataset import collate_encoded, collate_skip_none
    _add_second_png(bad_tree)
    kw = dict(train=True, jitter=0.2, hsv=1.5, seed=3)
    plain = VOCDetection(bad_tree, "2007-trainval", DEMO_CLASSES, 64, 7, **kw)
    on_device = VOCDetection(bad_tree, "2007-trainval", DEMO_CLASSES, 64, 7, decode_on_device=True, **kw)
    cpu = torch.device("cpu")
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        on_device.set_epoch(epoch)
        caught = {}
        for name, ds in (("plain", plain), ("device", on_device)):
            with warnings.catch_warnings(record=True) as caught[name]:
                warnings.simplefilter("always")
                items = [ds[i] for i in range(len(ds))]
                if name == "device":
                    raw = collate_encoded(items)
                    assert len(raw[0][3]) == 3                      # alpha_png, png2 and cmyk, in the worker
                batch = on_device.finish_on_device(raw, cpu) if name == "device" else collate_skip_none(items)
            caught[name] = sorted(str(w.message).split(": ")[1] for w in caught[name]
                                  if str(w.message).startswith("skipped: "))          # the files named
            if name == "plain":
                ref = batch
        assert caught["device"] == caught["plain"] and any("truncated.jpg" in m for m in caught["plain"])
        images, targets, info = batch
        assert torch.equal(images, ref[0]) and torch.equal(targets, ref[1])
        assert torch.equal(info[:, :5], ref[2]) and info.shape[1] == 10
        assert int((info[:, -1] == 1).sum()) > 0                      # some flipped on the device


def test_gpu_decode_batched_warp_is_the_workers_batch_within_a_level(bad_tree, monkeypatch):
    # The GPU's batched warp (dataset.warp_images), run here on the CPU: the same images, targets and
    # info as the workers' batch, the pixels within one level (float against the CPU's integer
    # resize), the images decoded in the workers (PNGs, CMYK) in their places, the truncated one dropped.
    import warnings
    import dataset
    from dataset import collate_encoded, collate_skip_none, warp_images
    _add_second_png(bad_tree)
    kw = dict(train=True, jitter=0.2, hsv=1.5, seed=3)
    plain = VOCDetection(bad_tree, "2007-trainval", DEMO_CLASSES, 64, 7, **kw)
    on_device = VOCDetection(bad_tree, "2007-trainval", DEMO_CLASSES, 64, 7, decode_on_device=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = collate_skip_none([plain[i] for i in range(len(plain))])
        raw = collate_encoded([on_device[i] for i in range(len(on_device))])
        monkeypatch.setattr(dataset, "BATCHED_WARP_DEVICES", {"cpu"})
        calls = []
        monkeypatch.setattr(dataset, "warp_images", lambda *a: calls.append(len(a[0])) or warp_images(*a))
        images, targets, info = on_device.finish_on_device(raw, torch.device("cpu"))
        monkeypatch.undo()
        one_by_one = on_device.finish_on_device(raw, torch.device("cpu"))[0]
    assert calls == [len(ref[0]) - 3]               # one batched warp, of every JPEG decoded here
    assert torch.equal(targets, ref[1]) and torch.equal(info[:, :5], ref[2])
    assert images.shape == ref[0].shape and images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(one_by_one, ref[0])                     # the per-image warp: the workers' pixels
    diff = (images.int() - ref[0].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.2, (diff.max(), diff.float().mean())
    worker_rows = [i for i, row in enumerate(info.tolist()) if on_device.annotation(int(row[0])).image_id
                   in ("alpha_png", "png2", "cmyk")]
    assert len(worker_rows) == 3 and torch.equal(images[worker_rows], ref[0][worker_rows])   # as they came


def test_decode_pil_is_the_gpu_paths_fallback_and_leaves_warnings_alone(bad_tree, monkeypatch):
    # What --gpu-decode's thread decodes on the CPU when nvJPEG refuses a JPEG: the pixels libjpeg
    # gives through torchvision, a DataError naming the file for a truncated one, and never a change
    # of the process's warnings filters (a catch_warnings there would race with the training loop's).
    import warnings
    from dataset import DataError, decode_pil, read_image

    def no_filters(*args, **kwargs):
        raise AssertionError("the warnings filters were touched")
    jpegs = bad_tree / "VOCdevkit" / "VOC2007" / "JPEGImages"
    for name in ("000001.jpg", "gray.jpg", "truncated.jpg"):
        path = jpegs / name
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        with monkeypatch.context() as m:
            m.setattr(warnings, "catch_warnings", no_filters)
            if name == "truncated.jpg":
                with pytest.raises(DataError, match="truncated.jpg: cannot decode image"):
                    decode_pil(data, path)
                continue
            got = decode_pil(data, path)
        want = read_image(path)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        assert (got.int() - want.int()).abs().max() <= 1


def test_training_with_gpu_decode_is_the_same_run(bad_tree, tmp_path):
    runs = {}
    for name, extra in (("workers", []), ("device", ["--gpu-decode"])):
        runs[name] = train_detector.main(["--data", "demo", *TINY, "--data-root", str(bad_tree), "--epochs", "1",
                                          "--batch-size", "4", "--out-dir", str(tmp_path / name), *extra])
    a, b = runs["workers"], runs["device"]
    assert b["skipped_images"] == a["skipped_images"] >= 1 and b["final_map"] == a["final_map"]
    history = [json.loads((tmp_path / name / "metrics.json").read_text())["history"] for name in runs]
    assert history[0] == history[1]                          # every evaluation's mAP
    logs = [(tmp_path / name / "train_log.jsonl").read_text().splitlines() for name in runs]
    assert len(logs[0]) >= 2 and logs[0] == logs[1]          # every step's loss terms, digit for digit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a GPU")
def test_gpu_decode_batch_on_cuda_is_close_to_the_workers_batch(bad_tree):
    # nvJPEG and the float resize round a little differently from libjpeg and the CPU's uint8 resize;
    # the truncated JPEG may decode on the GPU without an error (nvJPEG reports less than libjpeg)
    import warnings
    from dataset import collate_encoded, collate_skip_none
    kw = dict(train=True, jitter=0.2, hsv=1.5, seed=3)
    plain = VOCDetection(bad_tree, "2007-trainval", DEMO_CLASSES, 64, 7, **kw)
    on_device = VOCDetection(bad_tree, "2007-trainval", DEMO_CLASSES, 64, 7, decode_on_device=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = on_device.finish_on_device(collate_encoded([on_device[i] for i in range(len(on_device))]),
                                         torch.device("cuda"))
        ref = collate_skip_none([plain[i] for i in range(len(plain))])
    assert got[0].is_cuda and got[0].dtype == torch.uint8
    # left out of the pixel comparison: the truncated JPEG (the CPU skips it, nvJPEG may not) and the one
    # damaged inside its data (libjpeg decodes it to wrong pixels; nvJPEG may decode it otherwise)
    ids = {plain.annotation(i).image_id: i for i in range(len(plain))}
    odd = torch.tensor([ids["truncated"], ids["damaged"]], dtype=got[2].dtype)
    rows = (~torch.isin(got[2][:, 0], odd)).nonzero().flatten()
    ref_rows = (~torch.isin(ref[2][:, 0], odd)).nonzero().flatten()
    images, targets, info = got[0][rows.cuda()].cpu(), got[1][rows], got[2][rows]
    assert torch.equal(info[:, :5], ref[2][ref_rows]) and torch.equal(targets, ref[1][ref_rows])
    per_image = (images.int() - ref[0][ref_rows].int()).abs().flatten(1).float().mean(1)
    assert per_image.mean() < 3.0 and per_image.max() < 8.0, per_image    # another picture: tens of levels


def test_a_training_set_with_nothing_to_learn_from_is_refused(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    voc = root / "VOCdevkit" / "VOC2007"
    args = ["--data", "demo", *TINY, "--data-root", str(root), "--epochs", "1"]
    # the demo's annotations under the paper's 20 VOC classes: every object is of an unknown class
    n_objects = sum((voc / "Annotations" / f"{i}.xml").read_text().count("<object>")
                    for i in (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split())
    with pytest.raises(ValueError, match=rf"no object of --data voc's 20 classes in its 8 annotations "
                                         rf"\({n_objects} objects of other classes skipped.*wrong --data\?"):
        train_detector.main(["--data", "voc", *args[2:], "--train-set", "2007-trainval", "--val-set", "2007-test",
                             "--out-dir", str(tmp_path / "voc")])
    assert not (tmp_path / "voc" / "last.pt").exists()
    for i in (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split():
        (voc / "JPEGImages" / f"{i}.jpg").write_bytes(b"")          # every training image unreadable
    with pytest.raises(ValueError, match=r"none of its 8 training images can be read"):
        train_detector.main([*args, "--out-dir", str(tmp_path / "empty")])
    assert not (tmp_path / "empty" / "last.pt").exists()
