import math
from pathlib import Path

import pytest
import torch

from model import YoloConfig, YOLOv1
from utils import ModelEMA, to_channels_last


def test_model_ema_follows_the_ramped_average():
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(src, decay=0.9, ramp=4.0)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    expected = {k: v.clone().double() for k, v in src.state_dict().items() if v.is_floating_point()}
    for t in range(1, 8):
        with torch.no_grad():                     # a new set of "trained" weights every step
            for p in src.parameters():
                p.copy_(torch.randn_like(p))
            src[1].running_mean.copy_(torch.randn(2))
            src[1].num_batches_tracked += 3
        ema.update()
        d = 0.9 * (1 - math.exp(-t / 4.0))
        for k, v in src.state_dict().items():
            if k in expected:
                expected[k] = d * expected[k] + (1 - d) * v.double()
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
    assert got["1.num_batches_tracked"] == src[1].num_batches_tracked == 21   # integers are copied
    # round trip through a checkpoint dict
    other = ModelEMA(src, decay=0.9, ramp=4.0)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 7
    assert all(torch.equal(a, b) for a, b in zip(other.module.state_dict().values(), got.values()))


def test_model_ema_rejects_bad_decay():
    for bad in (0.0, 1.0, -0.5, 1.5):
        try:
            ModelEMA(torch.nn.Linear(1, 1), bad)
        except ValueError as e:
            assert "decay" in str(e)
        else:
            raise AssertionError(f"decay {bad} accepted")


def _layouts(model, x):
    """(is NCHW-contiguous, is channels_last) of every conv block's output on input ``x``."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((o.is_contiguous(),
                                                                   o.is_contiguous(memory_format=torch.channels_last))))
             for name, m in model.backbone.layers.named_children() if name.startswith("conv")]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


def test_to_channels_last_keeps_a_narrow_stem_nchw_and_the_outputs_equal():
    torch.manual_seed(0)
    cfg = YoloConfig(C=5, image_size=64, width=0.0625, batch_norm=True, fc_dim=1024, dropout=0.0)
    ref = YOLOv1(cfg).eval()
    model = YOLOv1(cfg).eval()
    model.load_state_dict(ref.state_dict())
    assert to_channels_last(model) is model
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 8 and convs[1].out_channels == 16          # demo widths (model._ch)
    assert convs[0].weight.is_contiguous()                                      # the 8-filter stem: NCHW
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs[1:])
    assert not convs[1].weight.is_contiguous()                                  # 3x3: really converted
    x = torch.randn(2, 3, 64, 64)
    out, seen = _layouts(model, x)
    assert seen[0] == (True, False)                          # stem activations NCHW (fed NCHW images)
    assert all(cl and not nchw for nchw, cl in seen[1:])     # channels_last from the first wide conv on
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)
    # a wide first conv (the paper's 64 filters at width 0.25) converts the whole model
    wide = to_channels_last(YOLOv1(YoloConfig(C=5, image_size=64, width=0.25, fc_dim=256)))
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in wide.modules()
               if isinstance(m, torch.nn.Conv2d))


def test_reuse_freed_memory_keeps_large_blocks_in_the_heap():
    """In a fresh process, a 4 MB tensor (above glibc's initial 128 KB mmap threshold) gets its own
    mmapped block by default, and none after reuse_freed_memory()."""
    import platform
    import subprocess
    import sys
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        from utils import reuse_freed_memory
        assert reuse_freed_memory() is False
        return
    probe = """
import ctypes, sys, torch
from utils import reuse_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
info = getattr(ctypes.CDLL(None), "mallinfo2", None)
if info is None:
    print("no-mallinfo2")     # glibc before 2.33
    sys.exit()
info.restype = MallInfo2
if sys.argv[1] == "on":
    assert reuse_freed_memory() is True
before = info().hblks
x = torch.empty(1 << 20)
print(info().hblks - before)
"""
    def new_mmapped_blocks(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True,
                             cwd=str(Path(__file__).resolve().parents[1]))
        if "no-mallinfo2" in out.stdout:
            pytest.skip("this glibc has no mallinfo2 to count mmapped blocks")
        return int(out.stdout.split()[-1])
    assert new_mmapped_blocks("off") == 1
    assert new_mmapped_blocks("on") == 0
