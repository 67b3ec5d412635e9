"""draw.py: boxes on the right pixels, labels that stay on the image, any image size and mode,
side-by-side and grid geometry, and TensorBoard logging read back from the event file."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import draw
from dataset import VOCDetection

NAMES = ["circle", "square", "triangle"]


def test_outline_on_the_box_pixels_and_label_above():
    img = torch.zeros(3, 100, 120, dtype=torch.uint8)
    out = np.asarray(draw.draw_detections(img, [[10, 40, 50, 80]], [1], [0.5], NAMES, line_width=1))
    color = draw.class_color(1)
    # continuous box [10, 50) x [40, 80): outline on columns 10 and 49, rows 40 and 79
    for y, x in [(60, 10), (60, 49), (40, 30), (79, 30)]:
        assert tuple(out[y, x]) == color, (y, x)
    for y, x in [(60, 9), (60, 50), (81, 30), (60, 30)]:
        assert tuple(out[y, x]) == (0, 0, 0), (y, x)
    assert img.sum() == 0   # the input is not drawn on
    # the label patch sits just above the box, starting at its left edge
    above = out[:40, 10:]
    assert (above == color).all(-1).sum() > 50
    assert (out[:40, :10] == 0).all()


def test_label_inside_when_no_room_above_and_shifted_onto_the_image():
    out = np.asarray(draw.draw_detections(np.zeros((60, 60, 3), np.uint8), [[55, 0, 60, 30]], [0], None, NAMES,
                                          line_width=1, font_size=11))
    color = draw.class_color(0)
    # the box touches the top and the right edge: the label goes inside the top edge, moved left
    label_cols = np.nonzero((out[:14] == color).all(-1).any(0))[0]
    assert label_cols.min() < 40 and label_cols.max() == 59


@pytest.mark.parametrize("image", [
    torch.zeros(3, 1, 1, dtype=torch.uint8),                     # 1 x 1
    torch.full((3, 17, 3000), 200, dtype=torch.uint8),           # very wide
    torch.full((1, 3000, 17), 30, dtype=torch.uint8),            # very tall, grayscale (1, H, W)
    np.full((40, 30), 90, np.uint8),                             # grayscale numpy (H, W)
    Image.new("L", (50, 20), 10),                                # PIL grayscale
    Image.new("RGBA", (20, 50), (10, 20, 30, 0)),                # PIL with alpha
])
def test_any_size_and_mode(image):
    if isinstance(image, Image.Image):
        W, H = image.size
    elif isinstance(image, np.ndarray):
        H, W = image.shape[:2]
    else:
        H, W = image.shape[-2:]
    boxes = [[0, 0, W, H], [W * 0.25, H * 0.25, W * 0.75, H * 0.75], [-10, -10, W + 10, H + 10], [0, 0, 0, 0]]
    out = draw.draw_detections(image, boxes, [0, 1, 2, 1], [0.9, 0.8, 0.1, 0.5], NAMES)
    assert out.size == (W, H) and out.mode == "RGB"
    # the whole-image box outlines pixel (0, 0) in its colour, unless a label covers it
    arr = np.asarray(out)
    assert not (arr == np.asarray(draw.to_pil(image))).all()   # something was drawn


def test_bad_inputs_are_refused():
    img = torch.zeros(3, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        draw.draw_detections(img.float(), [], [])
    with pytest.raises(ValueError, match="x2 >= x1"):
        draw.draw_detections(img, [[5, 0, 4, 3]], [0])
    with pytest.raises(ValueError, match="non-finite"):
        draw.draw_detections(img, [[0, 0, float("nan"), 3]], [0])
    with pytest.raises(ValueError, match="labels has 2 entries"):
        draw.draw_detections(img, [[0, 0, 4, 3]], [0, 1])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        draw.draw_detections(torch.zeros(4, 5, 5, dtype=torch.uint8), [], [])


def test_colours_distinct_and_text_readable():
    colors = [np.array(draw.class_color(i), float) for i in range(20)]
    dists = [np.abs(a - b).sum() for i, a in enumerate(colors) for b in colors[i + 1:]]
    assert min(dists) > 30
    assert draw.text_color((255, 255, 255)) == (0, 0, 0)
    assert draw.text_color((0, 0, 0)) == (255, 255, 255)
    assert draw.text_color((255, 255, 0)) == (0, 0, 0)      # yellow: black text
    assert draw.text_color((0, 0, 200)) == (255, 255, 255)  # dark blue: white text


def test_side_by_side_and_grid_geometry():
    a, b = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (50, 20), "blue")
    pair = draw.side_by_side(a, b, titles=None, gap=4)
    assert pair.size == (94, 30)
    arr = np.asarray(pair)
    assert tuple(arr[10, 39]) == (255, 0, 0) and tuple(arr[10, 41]) == (255, 255, 255) and tuple(arr[10, 44]) == (0, 0, 255)
    titled = draw.side_by_side(a, b)
    assert titled.width == 94 and titled.height > 30
    assert tuple(np.asarray(titled)[-1, 0]) == (255, 0, 0)   # the image sits under its title bar
    grid = draw.make_grid([a, b, Image.new("RGB", (400, 100), "green")], cols=2, cell=50, gap=2)
    assert grid.size == (2 * 50 + 2, 2 * 50 + 2)
    g = np.asarray(grid)
    assert tuple(g[25, 25]) == (255, 0, 0)                   # 40 x 30 is not enlarged: centred in its cell
    assert tuple(g[25, 2]) == (255, 255, 255)
    assert tuple(g[52 + 25, 25])[1] > 100 and tuple(g[52 + 2, 25]) == (255, 255, 255)   # 400 x 100 -> 50 x 12


def _events(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    return acc


def test_log_detections_to_tensorboard(tmp_path):
    images = [torch.zeros(3, 40, 60, dtype=torch.uint8), torch.full((3, 25, 25), 255, dtype=torch.uint8)]
    gts = [{"boxes": torch.tensor([[5.0, 5, 30, 30]]), "labels": torch.tensor([0])},
           {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    preds = [{"boxes": torch.tensor([[6.0, 4, 31, 29]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([0])},
             {"boxes": torch.tensor([[1.0, 1, 20, 20]]), "scores": torch.tensor([0.3]), "labels": torch.tensor([2])}]
    with SummaryWriter(str(tmp_path)) as w:
        pics = draw.log_detections(w, "val/detections", images, gts, preds, NAMES, step=7)
    acc = _events(tmp_path)
    assert sorted(acc.Tags()["images"]) == ["val/detections/0", "val/detections/1"]
    ev = acc.Images("val/detections/0")[0]
    assert ev.step == 7 and (ev.width, ev.height) == pics[0].size
    logged = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
    assert logged.shape == (pics[0].height, pics[0].width, 3)
    assert pics[0].width == 2 * 60 + 4   # ground truth | prediction, both at the image's size
    # ground truth on the left, prediction on the right: the prediction's box is one pixel off
    left, right = logged[-40:, :60], logged[-40:, 64:]
    color = np.array(draw.class_color(0))
    assert (np.abs(left[20, 5].astype(int) - color) < 40).all() and (np.abs(right[20, 6].astype(int) - color) < 40).all()
    with pytest.raises(ValueError, match="must match"):
        draw.log_detections(None, "x", images, gts[:1], preds, NAMES, 0)


def test_log_classifications_colours_right_and_wrong(tmp_path):
    images = torch.stack([torch.full((3, 32, 32), 50, dtype=torch.uint8)] * 3)
    topk = torch.tensor([[0, 1], [2, 0], [1, 2]])
    probs = torch.tensor([[0.7, 0.2], [0.5, 0.4], [0.6, 0.3]])
    labels = ["circle, disc", "square", "triangle"]
    sheet = draw.classification_sheet(images, topk, probs, labels, torch.tensor([0, 0, 0]), cols=3, cell=64)
    arr = np.asarray(sheet)
    tile_w = sheet.width // 3

    def has(tile, rgb):
        return (arr[64:, tile * tile_w:(tile + 1) * tile_w] == rgb).all(-1).any()

    green, red = (0, 140, 0), (200, 0, 0)
    assert has(0, green) and not has(0, red)   # right at top-1
    assert has(1, green) and has(1, red)       # wrong top-1, true class second
    assert not has(2, green) and has(2, red)   # true class not in the top 2
    with SummaryWriter(str(tmp_path)) as w:
        logged = draw.log_classifications(w, "val/predictions", images, topk, probs, labels, [0, 0, 0], step=3)
    ev = _events(tmp_path).Images("val/predictions")[0]
    assert ev.step == 3 and (ev.width, ev.height) == logged.size


def test_detection_samples_on_a_voc_tree(tmp_path):
    from test_detect import CLASSES, expected_detections, make_checkpoint
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    sizes = [(50, 70), (90, 30), (64, 64)]
    for k, (h, w) in enumerate(sizes, 1):
        Image.fromarray(np.full((h, w, 3), 40 * k, np.uint8)).save(voc / "JPEGImages" / f"{k:06d}.jpg")
        (voc / "Annotations" / f"{k:06d}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height></size><object><name>cherry</name>"
            f"<difficult>{k == 2:d}</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax>"
            "</bndbox></object></annotation>")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n000003\n")
    ds = VOCDetection(tmp_path, "2007-test", CLASSES, image_size=64, train=False)
    model = make_checkpoint(tmp_path / "m.pt").train()
    images, gts, preds = draw.detection_samples(model, ds, torch.device("cpu"), num_images=2)
    assert model.training   # mode restored
    assert [tuple(im.shape[-2:]) for im in images] == [sizes[0], sizes[2]]   # first and last: evenly spaced
    for (h, w), gt, p in zip([sizes[0], sizes[2]], gts, preds):
        assert gt["boxes"].tolist() == [[0.0, 1.0, 10.0, 20.0]] and gt["labels"].tolist() == [2]
        want = expected_detections(h, w)
        assert [CLASSES[i] for i in p["labels"].tolist()] == [c for c, _, _ in want]
        np.testing.assert_allclose(p["scores"].numpy(), [s for _, s, _ in want], atol=1e-5)
        np.testing.assert_allclose(p["boxes"].numpy(), [b for _, _, b in want], atol=1e-3)
    # difficult objects are shown too
    _, gts2, _ = draw.detection_samples(model, ds, torch.device("cpu"), indices=[1])
    assert gts2[0]["labels"].tolist() == [2]
