"""YOLOv1 networks: the Darknet backbone, its ImageNet classifier head and the detection head.

Everything here is an ``nn.Module`` or a pure function on one; nothing knows about data,
losses, devices or training. Sizes come from one dataclass, :class:`YoloConfig`.

Output convention (stated once, here): the detector returns raw, linear predictions of shape
``(N, S, S, 5B + C)`` indexed ``[n, row, col]`` (row = y cell, col = x cell). Per cell the last
dimension is laid out as

* ``[0 : 4B]``   B boxes, each ``(x, y, sqrt_w, sqrt_h)``: x, y are the box centre's offset inside
  the cell in cell units (0..1 inside the cell); sqrt_w, sqrt_h are the square roots of the box
  width and height relative to the whole image. Predicting square roots is darknet's ``sqrt=1``
  and the paper's "we predict the square root of the bounding box width and height"; the box
  width is ``sqrt_w ** 2``, so any output (negative too) decodes to a valid box.
* ``[4B : 5B]``  B confidences, Pr(Object) * IoU.
* ``[5B : ]``    C conditional class probabilities Pr(Class_i | Object).

:func:`split_output` is the only place that slices this tensor.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch import Tensor

# The paper's Fig. 3, first 20 conv layers: (kernel, filters, stride) or "M" for a 2x2/2 maxpool.
DARKNET_LAYERS: list = [
    (7, 64, 2), "M",
    (3, 192, 1), "M",
    (1, 128, 1), (3, 256, 1), (1, 256, 1), (3, 512, 1), "M",
    *[(1, 256, 1), (3, 512, 1)] * 4, (1, 512, 1), (3, 1024, 1), "M",
    *[(1, 512, 1), (3, 1024, 1)] * 2,
]
# The 4 conv layers the detector adds on top of the backbone (paper Fig. 3, last block).
YOLO_HEAD_CONVS: list = [(3, 1024, 1), (3, 1024, 2), (3, 1024, 1), (3, 1024, 1)]
# Fast YOLO: 9 conv layers. The first 7 form its backbone (input / 64 pixels), the last 2 its head.
FAST_LAYERS: list = [
    (3, 16, 1), "M", (3, 32, 1), "M", (3, 64, 1), "M", (3, 128, 1), "M",
    (3, 256, 1), "M", (3, 512, 1), "M", (3, 1024, 1),
]
FAST_HEAD_CONVS: list = [(3, 1024, 1), (3, 1024, 1)]
# The small network both training scripts use on their generated demo data (CPU-sized), so that a
# demo pretraining checkpoint's backbone fits the demo detector.
DEMO_MODEL: dict = {"width": 0.0625, "batch_norm": True}


@dataclass
class YoloConfig:
    """Every size of the network. The defaults are the paper's VOC detector.

    ``width`` multiplies every conv filter count and the 4096-unit FC layer (rounded to multiples
    of 8, see :func:`_ch`), so that tests and the CPU demo can use a small model with the same
    topology.

    ``head_stride``: the paper's head halves the map with its 2nd conv, which turns the 14x14
    backbone map of a 448 px input into the 7x7 map of the 7x7 grid. At 224 px the backbone map
    is already 7x7, and stride 2 would leave the FC a 4x4 map; ``head_stride=1`` keeps 7x7 (the
    demo recipe's choice: in two of three paired demo runs it ended far ahead, see the README).
    Checkpoints saved before this field existed load as stride 2, which is what they were. Fast
    YOLO's head has no strided conv (its backbone ends at 1/64), so there it changes nothing.
    """
    S: int = 7                 # grid size
    B: int = 2                 # boxes per cell
    C: int = 20                # classes
    image_size: int = 448      # square input, pixels
    variant: str = "yolo"      # "yolo" (24 conv) or "fast" (9 conv)
    batch_norm: bool = False   # the paper has none; with it, convs carry no bias
    width: float = 1.0         # channel multiplier
    fc_dim: int = 4096         # hidden FC units (multiplied by width)
    dropout: float = 0.5
    head_stride: int = 2       # stride of the head's 2nd conv; see the docstring

    def __post_init__(self) -> None:
        if self.variant not in ("yolo", "fast"):
            raise ValueError(f"variant must be 'yolo' or 'fast', got {self.variant!r}")
        for name in ("S", "B", "C", "image_size", "fc_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.width <= 4:
            raise ValueError(f"width must be in (0, 4], got {self.width}")
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"dropout must be in [0, 1], got {self.dropout}")
        if self.head_stride not in (1, 2):
            raise ValueError(f"head_stride must be 2 (the paper) or 1, got {self.head_stride}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        if self.variant == "fast" and self.image_size < 64:   # its six 2x2 max pools
            raise ValueError(f"Fast YOLO needs an image_size of at least 64, got {self.image_size}")

    @property
    def cell_dim(self) -> int:
        return 5 * self.B + self.C

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "YoloConfig":
        """The config a checkpoint saved (``to_dict``; keys added since then take their defaults);
        ``ValueError`` naming ``source`` for an entry that is no YoloConfig (unknown keys, bad values)."""
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: model_config {d} is not a valid YoloConfig ({e})") from None


LEAKY_SLOPE = 0.1


def _he_init(layer: nn.Conv2d | nn.Linear) -> None:
    """He (Kaiming) normal, fan-in, for a layer followed by leaky ReLU(0.1); zero bias.

    Why not PyTorch's default (kaiming_uniform with a=sqrt(5)): it shrinks each layer's output
    variance about 6x under leaky ReLU, so the paper's BatchNorm-free backbone turns a
    unit-variance input into features of std ~0.01; He init keeps them of order 1
    (tests/test_model.py checks both)."""
    nn.init.kaiming_normal_(layer.weight, a=LEAKY_SLOPE, mode="fan_in", nonlinearity="leaky_relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _output_init(layer: nn.Linear) -> None:
    """Normal(0, 0.01) weights and zero bias for a linear output layer (the usual init of
    detection and classification outputs): initial predictions are small and carry no random
    per-cell or per-class offsets."""
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)


CHANNEL_DIVISOR = 8


def _ch(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest multiple of :data:`CHANNEL_DIVISOR` (at least
    one multiple, and never more than 10% below the exact product), as torchvision's MobileNet
    ``_make_divisible`` does. Every paper width is a multiple of 8, so width 1 is unchanged.

    Why round at all: at width 0.0625 plain rounding gives the first layer 4 filters, and with so
    few a whole colour family of the demo data could drop out early in training (one seed of the
    demo recipe ended at 0.66 mAP with two classes barely learned; with 8 filters three seeds gave
    0.76-0.78). Multiples of 8 are also what vectorised CPU and tensor-core kernels like best."""
    d = CHANNEL_DIVISOR
    c = max(d, int(channels * width + d / 2) // d * d)
    return c + d if c < 0.9 * channels * width else c


# Devices on which SpaceToDepthConv2d takes the space-to-depth form (bench.py measures both forms).
SPACE_TO_DEPTH_DEVICES: set[str] = {"cuda"}


def space_to_depth_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """``conv2d(x, weight, bias, stride=2, padding=padding)`` for an odd kernel, computed as a
    stride-1 convolution on the space-to-depth input: the same outputs up to the summation order.

    Each 2x2 pixel block of the zero-padded input becomes 4 channels, ``(N, C, H, W)`` ->
    ``(N, 4C, H'/2, W'/2)`` with ``[4c + 2p + q, m, n] = x_pad[c, 2m + p, 2n + q]``, and the
    ``k x k`` kernel, zero-extended to ``k + 1``, becomes ``(out, 4C, (k+1)/2, (k+1)/2)`` the same
    way. The padded input is made even-sized with one more zero row / column on the far side,
    which changes no output. The input comes out channels_last when the weight is."""
    n, c, h, w = x.shape
    o, _, k, _ = weight.shape
    half = (k + 1) // 2
    x = nn.functional.pad(x, (padding, padding + (w + 2 * padding) % 2, padding, padding + (h + 2 * padding) % 2))
    hh, ww = x.shape[2] // 2, x.shape[3] // 2
    kernel = nn.functional.pad(weight, (0, 2 * half - k, 0, 2 * half - k))
    kernel = kernel.view(o, c, half, 2, half, 2).permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, half, half)
    if c > 1 and weight.stride(1) == 1:   # channels_last weights: gather the blocks straight into NHWC
        x = x.view(n, c, hh, 2, ww, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, hh, ww, 4 * c).permute(0, 3, 1, 2)
        kernel = kernel.contiguous(memory_format=torch.channels_last)
    else:
        x = x.view(n, c, hh, 2, ww, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, hh, ww)
    return nn.functional.conv2d(x, kernel, bias)


class SpaceToDepthConv2d(nn.Conv2d):
    """A stride-2 ``nn.Conv2d`` with an odd kernel on a few input channels (the paper's 7x7/2 stem on
    RGB) that runs as :func:`space_to_depth_conv2d` on the devices in
    :data:`SPACE_TO_DEPTH_DEVICES` and as the plain convolution elsewhere. Same parameters
    (``weight`` keeps its ``(out, in, k, k)`` shape: state_dicts are interchangeable with
    ``nn.Conv2d``), same outputs up to the summation order.

    Why: the direct form gives a GPU's convolution kernels 3 input channels, which tensor cores use
    badly. On an H200 the paper stem took a quarter of the batch-64 bf16 forward pass at 24
    TFLOP/s; as space-to-depth (12 channels; 31% more multiply-adds, all on the zero-extended
    kernel's zeros) it ran 1.45x faster eager (the input's rearrangement included) and 2.1x
    compiled, and the compiled detector went from 9,139 to 10,676 images/s at batch 64
    (BENCH_NOTES.md, 2026-11-27). On the AMD EPYC CPU it made the demo's training step 16-18%
    slower, so CPUs keep the direct form."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int, bias: bool = True):
        if stride != 2 or k % 2 == 0:
            raise ValueError(f"SpaceToDepthConv2d computes stride-2 convolutions with an odd kernel, not "
                             f"stride {stride}, kernel {k}")
        super().__init__(c_in, c_out, k, stride, padding, bias=bias)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if x.device.type in SPACE_TO_DEPTH_DEVICES:
            if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))   # the cast autocast would make, before the
            return space_to_depth_conv2d(x, weight, bias, self.padding[0])   # rearrangement: half its bytes
        return super()._conv_forward(x, weight, bias)


class ConvBlock(nn.Sequential):
    """Conv ("same" padding) -> optional BatchNorm -> leaky ReLU(0.1). A stride-2 convolution on
    RGB input (the paper's stem) is a :class:`SpaceToDepthConv2d`."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, batch_norm: bool):
        conv_type = SpaceToDepthConv2d if stride == 2 and c_in <= 4 and k % 2 == 1 and k > 1 else nn.Conv2d
        layers = OrderedDict(conv=conv_type(c_in, c_out, k, stride, k // 2, bias=not batch_norm))
        _he_init(layers["conv"])
        if batch_norm:
            layers["bn"] = nn.BatchNorm2d(c_out)
        layers["act"] = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        super().__init__(layers)


def _conv_stack(spec: list, c_in: int, width: float, batch_norm: bool, first: int = 1) -> tuple[nn.Sequential, int]:
    """Build named layers conv{i} / pool{j} from a spec list; returns the stack and its out channels."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    i, j = first, 1
    for item in spec:
        if item == "M":
            layers[f"pool{j}"] = nn.MaxPool2d(2, 2)
            j += 1
        else:
            k, c, s = item
            c_out = _ch(c, width)
            layers[f"conv{i}"] = ConvBlock(c_in, c_out, k, s, batch_norm)
            c_in, i = c_out, i + 1
    return nn.Sequential(layers), c_in


class Backbone(nn.Module):
    """The Darknet feature extractor: the paper's first 20 conv layers (or Fast YOLO's first 7).

    Input ``(N, 3, H, W)`` normalised images; output ``(N, out_channels, H/32, W/32)``
    (``H/64`` for Fast YOLO). The same module, with the same state_dict keys, is used by the
    ImageNet classifier and by the detector, so pretrained weights move by ``load_state_dict``.
    """

    def __init__(self, cfg: YoloConfig):
        super().__init__()
        spec = DARKNET_LAYERS if cfg.variant == "yolo" else FAST_LAYERS
        self.layers, self.out_channels = _conv_stack(spec, 3, cfg.width, cfg.batch_norm)
        self.stride = 32 if cfg.variant == "yolo" else 64

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ClassifierHead(nn.Module):
    """Global average pool + FC, the pretraining head of the paper (Sec. 2.2)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        _output_init(self.fc)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class DetectionHead(nn.Module):
    """4 conv (2 for Fast YOLO) + FC fc_dim + leaky + dropout + linear FC to S*S*(5B+C)."""

    def __init__(self, cfg: YoloConfig, in_channels: int, in_size: int):
        super().__init__()
        spec = YOLO_HEAD_CONVS if cfg.variant == "yolo" else FAST_HEAD_CONVS
        spec = [(k, c, cfg.head_stride if s == 2 else s) for k, c, s in spec]
        first = 21 if cfg.variant == "yolo" else 8
        self.convs, c = _conv_stack(spec, in_channels, cfg.width, cfg.batch_norm, first=first)
        size = in_size
        for item in spec:
            size = (size + 2 * (item[0] // 2) - item[0]) // item[2] + 1
        hidden = _ch(cfg.fc_dim, cfg.width)
        self.fc1 = nn.Linear(c * size * size, hidden)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(hidden, cfg.S * cfg.S * cfg.cell_dim)
        _he_init(self.fc1)
        _output_init(self.fc2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.convs(x).flatten(1)
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class YOLOv1(nn.Module):
    """The detector: ``backbone`` + ``head``; ``forward`` returns ``(N, S, S, 5B+C)`` raw outputs."""

    def __init__(self, cfg: YoloConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = DetectionHead(cfg, self.backbone.out_channels, cfg.image_size // self.backbone.stride)

    def forward(self, x: Tensor) -> Tensor:
        S, D = self.cfg.S, self.cfg.cell_dim
        return self.head(self.backbone(x)).view(-1, S, S, D)


class Classifier(nn.Module):
    """The pretraining network: ``backbone`` + ``head`` (avgpool + FC); returns ``(N, num_classes)`` logits."""

    def __init__(self, cfg: YoloConfig, num_classes: int = 1000):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = ClassifierHead(self.backbone.out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def split_output(out: Tensor, B: int, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split raw predictions ``(N, S, S, 5B+C)`` into boxes, confidences and class probabilities.

    Returns ``boxes (N, S, S, B, 4)`` as ``(x, y, sqrt_w, sqrt_h)`` (see the module docstring),
    ``conf (N, S, S, B)`` and ``cls (N, S, S, C)``.
    """
    if out.shape[-1] != 5 * B + C:
        raise ValueError(f"last dim of predictions is {out.shape[-1]}, expected 5*B+C = {5 * B + C}")
    boxes = out[..., : 4 * B].unflatten(-1, (B, 4))
    return boxes, out[..., 4 * B : 5 * B], out[..., 5 * B :]


def load_backbone(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy backbone weights into ``model.backbone`` from a state_dict.

    ``state`` may be a backbone state_dict or a whole model's (keys prefixed ``backbone.``).
    Every backbone tensor must be present with the same shape; otherwise a ``ValueError`` names
    the first mismatches. Nothing is loaded partially.
    """
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} in {source}, {tuple(v.shape)} in model"
             for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        lines = [f"backbone weights in {source} do not fit this model "
                 "(check --width, --variant and --batch-norm against the pretraining run):"]
        if missing:
            lines.append(f"  missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            lines.append(f"  unexpected: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        lines += [f"  shape {w}" for w in wrong[:5]]
        raise ValueError("\n".join(lines))
    model.backbone.load_state_dict(state, strict=True)


@torch.no_grad()
def layer_flops(layer: nn.Conv2d | nn.Linear, out: Tensor) -> int:
    """FLOPs (a multiply-add counted as 2) of a conv or linear layer that produced ``out``, over the
    whole batch; bias adds left out."""
    if isinstance(layer, nn.Conv2d):
        return 2 * out.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return 2 * out.numel() * layer.in_features


def count_params_flops(model: nn.Module, image_size: int) -> tuple[int, int]:
    """Parameter count and forward FLOPs for one ``image_size`` x ``image_size`` image.

    FLOPs count a multiply-add as 2, over conv and linear layers (bias adds, activations,
    pooling and BatchNorm are left out, as is usual). The model runs on "meta" copies of its
    tensors, so nothing is computed and the model is not changed.
    """
    flops = 0

    def hook(m: nn.Module, inp: tuple[Tensor], out: Tensor) -> None:
        nonlocal flops
        flops += layer_flops(m, out) // out.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        tensors = {k: torch.empty_like(v, device="meta") for k, v in
                   [*model.named_parameters(), *model.named_buffers()]}
        torch.func.functional_call(model, tensors, (torch.empty(1, 3, image_size, image_size, device="meta"),))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sum(p.numel() for p in model.parameters()), flops
