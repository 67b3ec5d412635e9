import pytest
import torch
import torch.nn as nn

import model as model_module
from model import (Backbone, Classifier, SpaceToDepthConv2d, YoloConfig, YOLOv1, count_params_flops, load_backbone,
                   space_to_depth_conv2d, split_output)


def test_paper_detector_params_and_flops():
    # Paper configuration: 24 conv + FC 4096 + FC 1470 at 448x448, no BatchNorm.
    model = YOLOv1(YoloConfig())
    params, flops = count_params_flops(model, 448)
    assert params == 271_703_550
    assert round(flops / 1e9, 1) == 40.6


def test_conv_layer_count_and_classifier_flops():
    cls = Classifier(YoloConfig())
    convs = [m for m in cls.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20
    assert [c.out_channels for c in convs][:6] == [64, 192, 128, 256, 256, 512]
    assert all(m.bias is not None for m in convs)
    _, flops = count_params_flops(cls, 224)
    assert round(flops / 1e9, 1) == 8.4
    det = YOLOv1(YoloConfig())
    assert len([m for m in det.modules() if isinstance(m, torch.nn.Conv2d)]) == 24


def test_fast_yolo_has_nine_convs():
    model = YOLOv1(YoloConfig(variant="fast", width=0.25))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9
    # 16..1024 x 0.25, each rounded to a multiple of 8 (at least 8): the first 4 becomes 8
    assert [c.out_channels for c in convs] == [8, 8, 16, 32, 64, 128, 256, 256, 256]
    assert model(torch.randn(1, 3, 448, 448)).shape == (1, 7, 7, 30)


def test_width_rounds_channels_to_multiples_of_eight():
    # Paper widths (all multiples of 8) are unchanged at width 1; at the demo's 1/16 the paper's
    # 64, 192, 128, 256, 256, 512 give 4, 12, 8, 16, 16, 32, rounded to 8, 16, 8, 16, 16, 32.
    demo = YOLOv1(YoloConfig(width=0.0625, C=5, image_size=224))
    convs = [m.out_channels for m in demo.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[:6] == [8, 16, 8, 16, 16, 32]
    assert convs[-4:] == [64] * 4 and demo.head.fc1.out_features == 4096 // 16
    assert all(c % 8 == 0 for c in convs)
    # never more than 10% below the exact product: 1024 x 0.0264 = 27.0 -> 32, not 24
    odd = YOLOv1(YoloConfig(width=0.0264, C=5, image_size=224))
    assert odd.backbone.layers.conv20.conv.out_channels == 32


def test_head_stride_keeps_the_grid_sized_map():
    # The paper's head: 448 px -> 14x14 backbone map -> 7x7 after the stride-2 conv22. At 224 px
    # the backbone map is 7x7: stride 2 leaves a 4x4 map (ceil, "same" padding), stride 1 keeps 7x7.
    seen = {}
    for stride, size, side in ((2, 448, 7), (2, 224, 4), (1, 224, 7)):
        model = YOLOv1(YoloConfig(C=5, image_size=size, width=0.0625, head_stride=stride))
        assert model.head.convs.conv22.conv.stride == (stride, stride)
        out = model.head.convs(model.backbone(torch.randn(2, 3, size, size)))
        assert out.shape == (2, 64, side, side)
        assert model.head.fc1.in_features == 64 * side * side
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7, 7, 15)
        seen[(stride, size)] = count_params_flops(model, size)
    # the same weights but fc1, and 49/16 times the FLOPs of conv23..24 (64 -> 64, 3x3)
    (p2, f2), (p1, f1) = seen[(2, 224)], seen[(1, 224)]
    assert p1 - p2 == 64 * (49 - 16) * 256
    assert f1 - f2 == 2 * 3 * 3 * 64 * 64 * (49 - 16) * 3 + 2 * 64 * (49 - 16) * 256
    fast = YOLOv1(YoloConfig(variant="fast", width=0.25, head_stride=1))   # no strided head conv: unchanged
    assert fast(torch.randn(1, 3, 448, 448)).shape == (1, 7, 7, 30)
    with pytest.raises(ValueError, match="head_stride"):
        YoloConfig(head_stride=3)


def test_first_conv_flops_by_hand():
    # conv1: 7x7x3 -> 64 at stride 2 on 448 -> 224x224 outputs: 2 * 147 * 64 * 224 * 224 FLOPs.
    model = YOLOv1(YoloConfig())
    conv1 = model.backbone.layers.conv1
    _, flops = count_params_flops(torch.nn.Sequential(conv1), 448)
    assert flops == 2 * 7 * 7 * 3 * 64 * 224 * 224


def test_output_shape_batchnorm_and_names():
    cfg = YoloConfig(C=5, image_size=192, width=0.125, batch_norm=True)
    model = YOLOv1(cfg)
    out = model(torch.randn(2, 3, 192, 192))
    assert out.shape == (2, 7, 7, 15)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.bias is None for m in convs)
    assert any(k.startswith("backbone.layers.conv20.") for k in model.state_dict())
    assert any(k.startswith("head.fc2.") for k in model.state_dict())


def test_split_output_layout():
    out = torch.arange(2 * 7 * 7 * 30, dtype=torch.float32).view(2, 7, 7, 30)
    boxes, conf, cls = split_output(out, 2, 20)
    assert boxes.shape == (2, 7, 7, 2, 4) and conf.shape == (2, 7, 7, 2) and cls.shape == (2, 7, 7, 20)
    assert boxes[0, 0, 0, 1, 0] == 4 and conf[0, 0, 0, 0] == 8 and cls[0, 0, 0, 0] == 10
    with pytest.raises(ValueError):
        split_output(out, 2, 19)


def test_backbone_handover_and_mismatch():
    cfg = YoloConfig(C=5, image_size=192, width=0.125)
    cls = Classifier(cfg, num_classes=10)
    det = YOLOv1(cfg)
    load_backbone(det, cls.state_dict())
    for k, v in cls.backbone.state_dict().items():
        assert torch.equal(det.backbone.state_dict()[k], v)
    other = Classifier(YoloConfig(width=0.25), num_classes=10)
    with pytest.raises(ValueError, match="shape"):
        load_backbone(det, other.state_dict())
    bn = Classifier(YoloConfig(width=0.125, batch_norm=True), num_classes=10)
    with pytest.raises(ValueError, match="missing|unexpected"):
        load_backbone(det, bn.state_dict())


def test_config_validation():
    with pytest.raises(ValueError):
        YoloConfig(variant="tiny")
    with pytest.raises(ValueError):
        YoloConfig(image_size=450)
    with pytest.raises(ValueError, match="Fast YOLO needs an image_size of at least 64, got 32"):
        YoloConfig(variant="fast", image_size=32)
    YoloConfig(variant="yolo", image_size=32)          # five 2x2 pools plus the head's stride-2 conv fit 32


def test_he_init_keeps_the_signal_through_the_batchnorm_free_backbone():
    torch.manual_seed(0)
    backbone = Backbone(YoloConfig(width=0.25, image_size=224))   # the paper's layers, no BatchNorm
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        ours = backbone(x).std().item()
        for m in backbone.modules():            # PyTorch's default init, for comparison
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        default = backbone(x).std().item()
    assert 0.3 < ours < 5, ours
    assert default < 0.05, default


def test_output_layers_init():
    torch.manual_seed(0)
    head = YOLOv1(YoloConfig(C=5, width=0.125, image_size=128, batch_norm=True)).head
    for fc in (head.fc2, Classifier(YoloConfig(width=0.125), 1000).head.fc):
        assert fc.bias.abs().max() == 0 and abs(fc.weight.std().item() - 0.01) < 1e-3
    gain = 2 / (1 + 0.1 ** 2)   # He init of the hidden FC: variance gain / fan_in
    assert abs(head.fc1.weight.var().item() * head.fc1.in_features / gain - 1) < 0.05


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("size", [(448, 448), (31, 30), (7, 9), (1, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_space_to_depth_conv_equals_the_strided_conv(k, size, channels_last):
    # float64, so that only the summation order differs: outputs and both gradients match
    g = torch.Generator().manual_seed(k * 1000 + size[0])
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, 3, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    wf = w.contiguous(memory_format=fmt)
    got = space_to_depth_conv2d(x, wf, b, k // 2)
    ref = torch.nn.functional.conv2d(x, w, b, 2, k // 2)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert got.is_contiguous(memory_format=fmt) or min(got.shape[2:]) == 1
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for a, r in zip(torch.autograd.grad(got, (x, w, b), grad), torch.autograd.grad(ref, (x, w, b), grad)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-10)   # sums of ~10^5 terms


def test_space_to_depth_stem_is_a_conv2d_with_the_same_state(monkeypatch):
    model = YOLOv1(YoloConfig(width=0.25, C=5, image_size=64, fc_dim=64)).double().eval()
    stem = model.backbone.layers.conv1.conv
    assert type(stem) is SpaceToDepthConv2d and (stem.kernel_size, stem.stride) == ((7, 7), (2, 2))
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d) and m is not stem)
    plain = nn.Conv2d(3, stem.out_channels, 7, 2, 3).double()
    plain.load_state_dict(stem.state_dict())           # the same keys and shapes both ways
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        direct = model(x)
        assert torch.equal(stem(x), plain(x))           # on the CPU the direct form itself
        calls = []

        def counted(*args):
            calls.append(args[0].shape)
            return space_to_depth_conv2d(*args)
        monkeypatch.setattr(model_module, "space_to_depth_conv2d", counted)
        monkeypatch.setattr(model_module, "SPACE_TO_DEPTH_DEVICES", {"cpu"})
        torch.testing.assert_close(model(x), direct, rtol=0, atol=1e-12)
    assert calls == [(2, 3, 64, 64)]                    # the stem alone took the other form
    # under autocast the input is cast before its rearrangement: the arithmetic autocast would do
    stem32, plain32 = stem.float(), plain.float()
    x32 = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = stem32(x32), plain32(x32)
    assert calls[-1] == (2, 3, 64, 64) and len(calls) == 2
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="stride-2 convolutions with an odd kernel"):
        SpaceToDepthConv2d(3, 8, 4, 2, 1)
    with pytest.raises(ValueError, match="stride 1"):
        SpaceToDepthConv2d(3, 8, 7, 1, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the space-to-depth form runs on GPUs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_space_to_depth_stem_on_cuda(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    stem = SpaceToDepthConv2d(3, 64, 7, 2, 3).cuda().to(dtype)
    plain = nn.Conv2d(3, 64, 7, 2, 3).cuda().to(dtype)
    plain.load_state_dict(stem.state_dict())
    for fmt in (torch.contiguous_format, torch.channels_last):
        stem, plain = stem.to(memory_format=fmt), plain.to(memory_format=fmt)
        x = torch.randn(4, 3, 448, 448, device="cuda", dtype=dtype)
        got, ref = stem(x), plain(x)
        ref64 = nn.functional.conv2d(x.double(), plain.weight.double(), plain.bias.double(), 2, 3)
        for out in (got, ref):    # each against float64, within the dtype's rounding
            err = ((out.double() - ref64).norm() / ref64.norm()).item()
            assert err < (1e-5 if dtype == torch.float32 else 1e-2), (fmt, err)


# The paper's network (Fig. 3), written out here independently of model.py's tables: per layer
# (kernel, stride) of each convolution, "M" a 2x2 stride-2 max pool; every convolution "same"-padded
# and followed by leaky ReLU(0.1).
PAPER_BACKBONE = [(7, 2), "M", (3, 1), "M", (1, 1), (3, 1), (1, 1), (3, 1), "M",
                  *[(1, 1), (3, 1)] * 4, (1, 1), (3, 1), "M", *[(1, 1), (3, 1)] * 2]
PAPER_HEAD = [(3, 1), (3, 2), (3, 1), (3, 1)]


def _reference_convs(x, sd, prefix, spec, first):
    i = first
    for item in spec:
        if item == "M":
            x = torch.nn.functional.max_pool2d(x, 2, 2)
            continue
        k, s = item
        w, b = sd[f"{prefix}conv{i}.conv.weight"], sd[f"{prefix}conv{i}.conv.bias"]
        assert w.shape[-1] == k, (i, w.shape)
        x = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(x, w, b, s, k // 2), 0.1)
        i += 1
    return x


def test_forward_equals_the_papers_network_written_out():
    """Both networks against a float64 functional reference built from their parameters: catches a
    wrong activation, pool, padding, head activation or classifier pooling, which shapes do not."""
    torch.manual_seed(0)
    cfg = YoloConfig(C=5, image_size=128, width=0.0625, fc_dim=64)
    det, x = YOLOv1(cfg).double().eval(), torch.randn(2, 3, 128, 128, dtype=torch.float64)
    sd = det.state_dict()
    f = _reference_convs(x, sd, "backbone.layers.", PAPER_BACKBONE, 1)                  # (2, c, 4, 4)
    assert f.shape[-2:] == (4, 4)
    h = _reference_convs(f, sd, "head.convs.", PAPER_HEAD, 21).flatten(1)                # (2, c * 2 * 2)
    h = torch.nn.functional.leaky_relu(h @ sd["head.fc1.weight"].T + sd["head.fc1.bias"], 0.1)   # dropout: eval
    ref = (h @ sd["head.fc2.weight"].T + sd["head.fc2.bias"]).view(2, 7, 7, 5 * 2 + 5)
    with torch.no_grad():
        out = det(x)
    assert ref.abs().max() > 0 and torch.allclose(out, ref, rtol=1e-9, atol=1e-12)
    assert cfg.dropout == 0.5                                                             # the paper's rate
    cls = Classifier(cfg, num_classes=7).double().eval()
    sd = cls.state_dict()
    g = _reference_convs(x, sd, "backbone.layers.", PAPER_BACKBONE, 1).mean(dim=(2, 3))  # global average pool
    with torch.no_grad():
        assert torch.allclose(cls(x), g @ sd["head.fc.weight"].T + sd["head.fc.bias"], rtol=1e-9, atol=1e-12)
