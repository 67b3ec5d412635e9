"""export.py: the ONNX model's outputs equal PyTorch's (onnxruntime) on random and real inputs and
any batch size; its metadata; decoding its output gives evaluation's detections."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import detect
import export
from dataset import MEAN, STD, color_normalize, read_image
from test_detect import CLASSES, make_checkpoint
from utils import decode_predictions


def _model_with_statistics(path):
    """A tiny random detector whose BatchNorm layers hold non-trivial statistics (so that folding
    them into the convolutions on export is exercised), saved as a checkpoint."""
    model = make_checkpoint(path, fixed=None, seed=5, shift=torch.zeros(7, 7, 13))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
    from utils import load_checkpoint, save_checkpoint
    ckpt = load_checkpoint(path)
    ckpt["model"] = model.state_dict()
    save_checkpoint(ckpt, path)
    return model.eval()


def test_onnx_matches_pytorch_on_random_and_real_inputs(tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    model = _model_with_statistics(ckpt)
    result = export.main(["--checkpoint", str(ckpt), "--format", "onnx"])
    path = tmp_path / "run" / "best.onnx"
    assert result["output"] == str(path) and result["opset"] == 17
    assert result["max_abs_diff"] is not None and result["max_abs_diff"] <= export.ATOL

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == CLASSES
    assert (meta["S"], meta["B"], meta["C"], meta["image_size"]) == ("7", "2", "3", "64")
    np.testing.assert_allclose(json.loads(meta["mean"]), MEAN)
    np.testing.assert_allclose(json.loads(meta["std"]), STD)

    # random inputs, batch sizes 1, 2 and 5 through one file (dynamic batch)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 5):
        x = torch.randn(n, 3, 64, 64, generator=gen)
        ours, ref = export.compare_onnx(path, model, x)
        assert ours.shape == ref.shape == (n, 7, 7, 13)
        np.testing.assert_allclose(ours, ref, rtol=export.RTOL, atol=export.ATOL)
        assert np.abs(ref).max() > 0.05   # the comparison is not between two near-zero tensors

    # real inputs: image files preprocessed exactly as detect.py and evaluation do
    rng = np.random.default_rng(0)
    files = []
    for k, (h, w) in enumerate([(120, 90), (33, 250)]):
        f = tmp_path / f"img{k}.png"
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        Image.fromarray(arr).save(f)
        files.append(f)
    images = [read_image(f) for f in files]
    x = color_normalize(torch.stack([detect.preprocess(im, 64) for im in images]), mean=MEAN, std=STD)
    assert export.check_export(path, model, x) <= export.ATOL
    # and the user's decoding of the ONNX output gives evaluation's detections
    ours, ref = export.compare_onnx(path, model, x)
    sizes = torch.tensor([list(im.shape[-2:]) for im in images])
    for a, b in zip(decode_predictions(torch.from_numpy(ours), 2, 3, sizes, 0.001),
                    decode_predictions(torch.from_numpy(ref), 2, 3, sizes, 0.001)):
        assert len(a["scores"]) == len(b["scores"]) > 0
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-2)


def test_check_fails_for_a_different_model(tmp_path):
    ckpt = tmp_path / "m.pt"
    model = _model_with_statistics(ckpt)
    path = export.export_onnx(model, tmp_path / "m.onnx", CLASSES, opset=17)
    other = make_checkpoint(tmp_path / "other.pt", fixed=None, seed=6, shift=torch.zeros(7, 7, 13))
    x = torch.randn(2, 3, 64, 64)
    assert export.check_export(path, model, x) <= export.ATOL
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        export.check_export(path, other, x)



def test_check_names_a_non_finite_onnx_output(monkeypatch):
    """A NaN in ONNX's output is the element the message names, even where the others agree."""
    ref = np.zeros((1, 2, 3), np.float32)
    ours = ref.copy()
    ours[0, 1, 2] = np.nan
    monkeypatch.setattr(export, "compare_onnx", lambda *a: (ours, ref))
    with pytest.raises(AssertionError, match=r"at \(0, 1, 2\): nan vs 0\.0"):
        export.check_export("m.onnx", None, None)


def test_export_never_overwrites_the_checkpoint_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    ckpt = tmp_path / "m.pt"
    _model_with_statistics(ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match="is the checkpoint itself"):
        export.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "." / "m.pt")])
    named_onnx = tmp_path / "weights.onnx"            # a checkpoint named *.onnx: the default output is itself
    named_onnx.write_bytes(before)
    with pytest.raises(ValueError, match="is the checkpoint itself"):
        export.main(["--checkpoint", str(named_onnx)])
    with pytest.raises(ValueError, match="is a folder"):
        export.main(["--checkpoint", str(ckpt), "--output", str(tmp_path)])
    other = tmp_path / "last.pt"                          # another existing file that is no export: kept
    other.write_bytes(before)
    with pytest.raises(ValueError, match="exists and is not an .onnx file: refusing to overwrite it"):
        export.main(["--checkpoint", str(ckpt), "--output", str(other)])
    with pytest.raises(ValueError, match=r"last\.pt is a file, so no folder can be made there"):
        export.main(["--checkpoint", str(ckpt), "--output", str(other / "sub" / "m.onnx")])
    for flags in (["--atol", "-1"], ["--rtol", "nan"], ["--opset", "99"], ["--opset", "5"]):
        with pytest.raises(SystemExit) as e:                # argparse's usage error, before any work
            export.main(["--checkpoint", str(ckpt), *flags])
        assert e.value.code == 2
    # a check that fails leaves no file under the output's name, nor a temporary, and names the output
    real = export.compare_onnx
    monkeypatch.setattr(export, "compare_onnx", lambda *a: (lambda o, r: (o + 1, r))(*real(*a)))
    with pytest.raises(ValueError, match=r"out\.onnx: ONNX output differs from PyTorch.*out\.onnx not written"):
        export.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "out.onnx")])
    monkeypatch.setattr(export, "compare_onnx", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "m.pt", "weights.onnx"]
    assert ckpt.read_bytes() == before == named_onnx.read_bytes() == other.read_bytes()
    res = export.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "out.onnx")])
    assert res["max_abs_diff"] is not None and (tmp_path / "out.onnx").stat().st_size > 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.onnx").stat().st_mode & 0o777 == 0o666 & ~umask      # as any other output file


def test_export_refuses_a_classifier_checkpoint(tmp_path):
    from utils import save_checkpoint
    save_checkpoint({"model": {}, "model_config": {}}, tmp_path / "cls.pt")
    with pytest.raises(ValueError, match="train_detector.py checkpoint"):
        export.main(["--checkpoint", str(tmp_path / "cls.pt")])


# The decoding the README gives to users of the exported model, verbatim: numpy only.
def decode(pred, B, C, height, width, conf_threshold=0.25, iou_threshold=0.5):
    """One image's output (S, S, 5B+C) -> boxes (K, 4) xyxy pixels, scores (K,), labels (K,), best first."""
    S = pred.shape[0]
    box = pred[..., :4 * B].reshape(S, S, B, 4)                    # (x, y, sqrt_w, sqrt_h) per predictor
    conf = np.clip(pred[..., 4 * B:5 * B], 0, 1)                   # (S, S, B) confidence
    cls = np.clip(pred[..., 5 * B:], 0, 1)                         # (S, S, C) Pr(class | object)
    row, col = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    cx = (col[..., None] + box[..., 0]) / S * width                # centre: cell index + offset in the cell
    cy = (row[..., None] + box[..., 1]) / S * height
    w, h = box[..., 2] ** 2 * width, box[..., 3] ** 2 * height     # sizes: squares, relative to the image
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).reshape(-1, 4)
    xyxy = np.clip(xyxy, 0, [width, height, width, height])
    scores = (conf[..., None] * cls[..., None, :]).reshape(-1, C)  # (S*S*B, C) class-specific scores
    i, c = np.nonzero(scores > conf_threshold)
    boxes, scores, labels = xyxy[i], scores[i, c], c
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, labels = boxes[nonempty], scores[nonempty], labels[nonempty]
    keep = []
    for k in np.unique(labels):                                    # NMS per class
        idx = np.nonzero(labels == k)[0]
        order = idx[np.argsort(-scores[idx], kind="stable")]
        while len(order):
            best, rest = order[0], order[1:]
            keep.append(best)
            lt = np.maximum(boxes[best, :2], boxes[rest, :2])
            rb = np.minimum(boxes[best, 2:], boxes[rest, 2:])
            inter = np.prod(np.clip(rb - lt, 0, None), 1)
            area = lambda b: np.prod(b[..., 2:] - b[..., :2], -1)  # noqa: E731
            order = rest[inter / (area(boxes[best]) + area(boxes[rest]) - inter) <= iou_threshold]
    keep = np.array(keep, int)[np.argsort(-scores[keep], kind="stable")]
    return boxes[keep], scores[keep], labels[keep]


def test_readme_decoding_equals_decode_predictions():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        pred = torch.rand(7, 7, 2 * 5 + 4, generator=gen) * 1.2 - 0.1   # some outputs outside [0, 1]
        H, W = [(375, 500), (1, 1), (17, 3000), (640, 480), (100, 100)][trial]
        ref = decode_predictions(pred[None], 2, 4, torch.tensor([[H, W]]), 0.25, 0.5, max_det=10_000)[0]
        boxes, scores, labels = decode(pred.double().numpy(), 2, 4, H, W)
        assert len(scores) == len(ref["scores"]) > 0
        assert (np.diff(scores) <= 0).all()   # best first

        def rows(b, s, lab):   # order-free comparison: clamped outputs make exactly tied scores
            table = np.column_stack([np.round(s, 5), lab, b])
            return table[np.lexsort(table.T[::-1])]

        np.testing.assert_allclose(rows(boxes, scores, labels),
                                   rows(ref["boxes"].double().numpy(), ref["scores"].double().numpy(),
                                        ref["labels"].numpy()), atol=max(1e-4, 1e-5 * max(H, W)))
