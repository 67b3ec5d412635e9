import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (MEAN, STD, AugmentParams, DataError, VOCDetection, color_normalize, crop_window,
                     encode_target, parse_image_set, parse_voc_xml, read_image, warp_boxes, warp_image)

CLASSES = ("cat", "dog", "person")

GENUINE_2007 = """<annotation>
	<folder>VOC2007</folder>
	<filename>000005.jpg</filename>
	<source><database>The VOC2007 Database</database><annotation>PASCAL VOC2007</annotation></source>
	<size><width>500</width><height>375</height><depth>3</depth></size>
	<segmented>0</segmented>
	<object><name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>
		<bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax><ymax>339</ymax></bndbox></object>
	<object><name>cat</name><pose>Unspecified</pose><truncated>0</truncated><difficult>1</difficult>
		<bndbox><xmin>5</xmin><ymin>244</ymin><xmax>67</xmax><ymax>374</ymax></bndbox></object>
</annotation>"""

# VOC2012 layout: person with <part> boxes (head/hand), float-free but with an <actions> block,
# and the difficult tag missing on an object (means 0).
GENUINE_2012 = """<annotation>
	<filename>2012_000001.jpg</filename>
	<folder>VOC2012</folder>
	<object>
		<name>person</name>
		<actions><jumping>0</jumping><other>1</other></actions>
		<bndbox><xmax>200.5</xmax><xmin>10.0</xmin><ymax>300</ymax><ymin>20</ymin></bndbox>
		<difficult>0</difficult>
		<part><bndbox><xmax>60</xmax><xmin>30</xmin><ymax>70</ymax><ymin>25</ymin></bndbox><name>head</name></part>
		<part><bndbox><xmax>190</xmax><xmin>170</xmin><ymax>150</ymax><ymin>130</ymin></bndbox><name>hand</name></part>
		<pose>Unspecified</pose>
		<truncated>0</truncated>
	</object>
	<object><name>horse</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>
	<object><name>dog</name><bndbox><xmin>50</xmin><ymin>1</ymin><xmax>49</xmax><ymax>5</ymax></bndbox></object>
	<object><name>cat</name><bndbox><xmin>50</xmin><ymin>7</ymin><xmax>50</xmax><ymax>7</ymax></bndbox></object>
	<segmented>0</segmented>
	<size><depth>3</depth><height>333</height><width>500</width></size>
</annotation>"""


def test_parse_genuine_voc2007(tmp_path):
    p = tmp_path / "000005.xml"
    p.write_text(GENUINE_2007)
    ann, problems = parse_voc_xml(p, CLASSES)
    assert problems == []
    assert (ann.width, ann.height) == (500, 375)
    np.testing.assert_array_equal(ann.boxes, [[263, 211, 324, 339], [5, 244, 67, 374]])
    np.testing.assert_array_equal(ann.labels, [1, 0])
    np.testing.assert_array_equal(ann.difficult, [False, True])
    p.write_text(GENUINE_2007.replace("<difficult>1</difficult>", "<difficult>7</difficult>"))
    assert parse_voc_xml(p, CLASSES)[0].difficult.tolist() == [False, True]   # nonzero, as the devkit reads it
    p.write_text(GENUINE_2007.replace("<xmax>324</xmax>", "<xmax>1e308</xmax>"))   # finite, but float32's inf
    with pytest.raises(DataError, match=r"000005\.xml: <xmax> is '1e308', beyond any image's size"):
        parse_voc_xml(p, CLASSES)
    p.write_text(GENUINE_2007)
    # VOC 1-based inclusive -> 0-based continuous pixels: width stays xmax - xmin + 1
    px = VOCDetection.boxes_px(ann)
    assert px[0].tolist() == [262, 210, 324, 339]
    assert px[0, 2] - px[0, 0] == 324 - 263 + 1


def test_parse_voc2012_parts_floats_unknown_and_degenerate(tmp_path):
    p = tmp_path / "2012_000001.xml"
    p.write_text(GENUINE_2012)
    ann, problems = parse_voc_xml(p, CLASSES)
    assert len(ann.boxes) == 2         # parts are not objects; horse unknown; dog inverted (xmax < xmin)
    np.testing.assert_array_equal(ann.boxes, [[10.0, 20, 200.5, 300], [50, 7, 50, 7]])   # the cat: one pixel
    assert ann.labels.tolist() == [2, 0] and ann.difficult.tolist() == [False, False]
    np.testing.assert_array_equal(VOCDetection.boxes_px(ann, as_array=True)[1], [49, 6, 50, 7])
    assert any("horse" in q for q in problems) and any("degenerate" in q for q in problems)


@pytest.mark.parametrize("text,match", [
    ("<annotation><object>", "malformed"),
    ('<!DOCTYPE a [<!ENTITY x "y">]><annotation/>', "DOCTYPE"),
    ("<annotation><object><name>cat</name><bndbox><xmin>a</xmin></bndbox></object></annotation>", "not a number"),
])
def test_parse_refuses_bad_xml(tmp_path, text, match):
    p = tmp_path / "bad.xml"
    p.write_text(text)
    with pytest.raises(DataError, match=match) as e:
        parse_voc_xml(p, CLASSES)
    assert "bad.xml" in str(e.value)


def test_entity_declarations_are_refused_in_utf16_too(tmp_path):
    """In UTF-16 the declaration's bytes are not the ASCII ``<!DOCTYPE``: the parser itself refuses it."""
    text = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY e "dog">]>' \
           '<annotation><object><name>&e;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>' \
           '<ymax>5</ymax></bndbox></object></annotation>'
    p = tmp_path / "u16.xml"
    p.write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match="DOCTYPE"):
        parse_voc_xml(p, CLASSES)
    p.write_bytes(text.replace('<!DOCTYPE a [<!ENTITY e "dog">]>', "").replace("&e;", "dog").encode("utf-16"))
    ann, _ = parse_voc_xml(p, CLASSES)        # the same file without the declaration is read
    assert ann.labels.tolist() == [1]


def test_image_set_names():
    assert parse_image_set("2007-trainval+2012-trainval") == [("2007", "trainval"), ("2012", "trainval")]
    with pytest.raises(ValueError):
        parse_image_set("trainval")


def test_image_set_lines_with_a_label_after_the_id(tmp_path):
    """Per-class lists (``aeroplane_trainval.txt``) hold ``<id> <label>``, by spaces or a tab: the id is
    the first field."""
    from helpers import tiny_voc
    from demo_data import DEMO_CLASSES
    root = tiny_voc(tmp_path / "data", n_trainval=4, n_test=2)
    main = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    ids = main.joinpath("trainval.txt").read_text().split()
    main.joinpath("circle_trainval.txt").write_text(f"{ids[0]}  1\n{ids[1]}\t-1\n{ids[2]} 0\n\n")
    ds = VOCDetection(root, "2007-circle_trainval", DEMO_CLASSES, 64)
    assert [a.image_id for _, a in ds.items] == ids[:3] and not ds.report


def _rect_image(H, W, box):
    img = torch.zeros(3, H, W, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    img[:, y0:y1, x0:x1] = 255
    return img


@pytest.mark.parametrize("seed", range(12))
def test_augmentation_keeps_box_on_its_pixels(seed):
    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(150, 400)), int(rng.integers(150, 400))
    x0, y0 = int(rng.integers(10, W // 2)), int(rng.integers(10, H // 2))
    box = (x0, y0, x0 + int(rng.integers(30, W // 2 - 5)), y0 + int(rng.integers(30, H // 2 - 5)))
    img = _rect_image(H, W, box)
    p = AugmentParams.sample(rng)
    win = crop_window(W, H, p)
    out = warp_image(img, win, 192, p.flip, fill=(0, 0, 0))
    boxes, keep = warp_boxes(torch.tensor([box], dtype=torch.float32), win, 192, p.flip)
    mask = out[0] > 127
    if not keep[0]:
        assert mask.sum() < 5
        return
    ys, xs = mask.nonzero(as_tuple=True)
    found = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    for got, want in zip(found, boxes[0].tolist()):
        assert abs(got - want) <= 1.0, (found, boxes[0].tolist(), p)


def test_boxes_clipped_and_vanishing_dropped():
    boxes = torch.tensor([[0.0, 0, 50, 50], [150, 150, 199, 199], [-20, 10, 30, 40]])
    # window shifted right by 100 px: the first box leaves, the third is clipped at 0
    out, keep = warp_boxes(boxes, (60, 0, 200, 200), 200, flip=False)
    assert keep.tolist() == [False, True, False]
    out, keep = warp_boxes(boxes, (-10, 0, 200, 200), 200, flip=True)
    assert keep.tolist() == [True, True, True]
    assert out[2].tolist() == [160.0, 10.0, 200.0, 40.0]   # x in [0, 40] after shift, flipped about 200


def test_encode_target_cell_offsets_and_conflict():
    boxes = torch.tensor([[0.0, 0, 64, 64],          # centre (32, 32) -> cell (0, 0) at 64 px cells
                          [130, 70, 190, 186],       # centre (160, 128) -> row 2, col 2
                          [140, 140, 150, 150]])     # centre (145, 145) -> row 2, col 2, smaller: loses
    t = encode_target(boxes, torch.tensor([0, 1, 2]), 448, 7, 3)
    assert t[..., 4].sum() == 2
    assert torch.allclose(t[0, 0, :5], torch.tensor([0.5, 0.5, 64 / 448, 64 / 448, 1]))
    assert torch.allclose(t[2, 2, :4], torch.tensor([0.5, 0.0, 60 / 448, 116 / 448]))
    assert t[2, 2, 5:].tolist() == [0, 1, 0]
    # off the diagonal: centre (x 100, y 300) -> row 300 // 64 = 4, col 100 // 64 = 1 (row from y, col from x)
    t3 = encode_target(torch.tensor([[80.0, 260, 120, 340]]), torch.tensor([1]), 448, 7, 3)
    assert t3[..., 4].nonzero().tolist() == [[4, 1]]
    assert torch.allclose(t3[4, 1, :5], torch.tensor([100 / 64 - 1, 300 / 64 - 4, 40 / 448, 80 / 448, 1]))
    # equal areas: the first listed keeps the cell
    t2 = encode_target(torch.tensor([[0.0, 0, 10, 10], [2, 2, 12, 12]]), torch.tensor([0, 2]), 448, 7, 3)
    assert t2[0, 0, 5:].tolist() == [1, 0, 0]


def test_color_normalize_matches_hsv_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 4, 5), generator=g, dtype=torch.uint8)
    e, s = torch.tensor([1.4, 0.7]), torch.tensor([0.6, 1.5])
    got = color_normalize(img, e, s)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for n in range(2):
        ref = torch.zeros(3, 4, 5)
        for y in range(4):
            for x in range(5):
                r, gg, b = (img[n, :, y, x].double() / 255).tolist()
                h, sat, v = colorsys.rgb_to_hsv(r, gg, b)
                ref[:, y, x] = torch.tensor(colorsys.hsv_to_rgb(h, min(sat * s[n].item(), 1), min(v * e[n].item(), 1)))
        assert torch.allclose(got[n] * std + mean, ref, atol=1e-5)
    plain = color_normalize(img)
    assert torch.allclose(plain * std + mean, img.float() / 255, atol=1e-6)


def test_read_image_modes_and_errors(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((10, 12), 77, np.uint8)).save(gray)
    assert read_image(gray).shape == (3, 10, 12)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.full((6, 7, 4), 200, np.uint8), "RGBA").save(rgba)
    assert read_image(rgba).shape == (3, 6, 7)
    empty = tmp_path / "e.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="e.jpg"):
        read_image(empty)
    text = tmp_path / "t.jpg"
    text.write_text("not an image")
    with pytest.raises(DataError, match="t.jpg"):
        read_image(text)


def test_png_decoding_pixels_16_bit_and_corrupt_data(tmp_path):
    """PNGs go through PIL (torchvision 0.29's decode_png segfaults on damaged data): 8-bit PNGs of
    every colour type give torchvision's pixels exactly, 16-bit grey is scaled to uint8, and a PNG
    whose compressed data is damaged (zlib checksum broken, chunk CRC kept valid) is a DataError.
    The decoding runs in a child process, so a crash fails the test instead of killing pytest."""
    import struct
    import subprocess
    import sys
    import zlib
    from pathlib import Path

    from torchvision.io import ImageReadMode, decode_image
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    images = {"L": Image.fromarray(rgba[..., 0], "L"), "LA": Image.fromarray(rgba[..., :2], "LA"),
              "RGB": Image.fromarray(rgba[..., :3], "RGB"), "RGBA": Image.fromarray(rgba, "RGBA"),
              "P": Image.fromarray(rgba[..., :3], "RGB").quantize(16)}
    for mode, im in images.items():
        path = tmp_path / f"{mode}.jpg"          # a PNG under a .jpg name: found by its signature
        im.save(path, "PNG")
        ours = read_image(path)
        ref = decode_image(str(path), mode=ImageReadMode.RGB)
        assert ours.dtype == torch.uint8 and torch.equal(ours, ref), mode
    grey16 = np.array([[0, 257, 65535], [128, 30000, 1000]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")     # mode I;16
    out = read_image(tmp_path / "g16.png")
    expected = torch.from_numpy(np.round(grey16 / 257).astype(np.uint8))
    assert out.dtype == torch.uint8 and all(torch.equal(out[c], expected) for c in range(3))

    buf = io.BytesIO()
    Image.fromarray(rgba[..., :3], "RGB").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4:i])[0]
    data[i + 4 + n - 1] ^= 0xFF                                           # the zlib stream's adler32
    data[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 4 + n])))
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from dataset import DataError, "
            "read_image\ntry:\n    read_image(Path(sys.argv[2]))\nexcept DataError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "bad.png: cannot decode image" in proc.stdout


def test_cache_images_serves_the_same_items_without_reading_again(tmp_path):
    from demo_data import DEMO_CLASSES, make_demo_voc
    root = make_demo_voc(tmp_path / "data", n_trainval=4, n_test=1, seed=0)
    plain = VOCDetection(root, "2007-trainval", DEMO_CLASSES, 64, 7, train=True)
    cached = VOCDetection(root, "2007-trainval", DEMO_CLASSES, 64, 7, train=True, cache_images=True)
    expected = {}
    for epoch in (0, 1):                  # augmentation differs per epoch; read from disk
        plain.set_epoch(epoch)
        expected[epoch] = [plain[i] for i in range(len(plain))]
    cached.set_epoch(0)
    cached[0], cached[1]
    assert sorted(cached.cache) == [0, 1]
    for i in range(len(cached)):
        cached[i]
    for path, _ in cached.items:          # every read from now on must come from memory
        path.unlink()
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        for i in range(len(cached)):
            for got, want in zip(cached[i], expected[epoch][i]):
                assert torch.equal(got, want), (epoch, i)
    with pytest.warns(UserWarning, match="skipped"):
        assert plain[0] is None           # without the cache the deleted file is gone
