"""GPU experiment, 2026-11-27 on an H200 (its output: docs/stem_h200_log.txt; run it from the
repository root): why the paper stem (7x7/2, 3->64) runs at 24 TFLOP/s at batch 64, and whether a
space-to-depth form (4x4/1 on 12 channels, same outputs) fixes it. Prints a table. The form it
tested became model.space_to_depth_conv2d; bench.py's infer section now times both forms."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")   # the repository root: model.py, utils.py
from model import YOLOv1, YoloConfig  # noqa: E402
from utils import prepare_for_inference  # noqa: E402

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = dev.type == "cpu"
N, H = (2, 64) if SMOKE else (64, 448)
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
rows = []


def row(name, ms, note=""):
    rows.append((name, ms, note))
    print(f"{name:55s} {ms:9.3f} ms  {note}", flush=True)


def bench(fn, iters=10, rounds=5):
    for _ in range(3):
        fn()
    res = []
    for _ in range(rounds):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            torch.cuda.synchronize()
            res.append(a.elapsed_time(b) / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            res.append((time.perf_counter() - t) * 1000 / iters)
    return statistics.median(res)


def s2d_weight(w):
    """(O, C, 7, 7) -> (O, 4C, 4, 4): w'[o, c*4+p*2+q, a, b] = w[o, c, 2a+p, 2b+q] (0 at index 7)."""
    O, C, k, _ = w.shape
    w8 = F.pad(w, (0, 8 - k, 0, 8 - k))                       # (O, C, 8, 8)
    return w8.view(O, C, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(O, C * 4, 4, 4)


def s2d_input(x, pad=3):
    """(N, C, H, W) -> (N, 4C, (H+2p)/2, (W+2p)/2) channels_last: [c*4+p*2+q, m, n] = xpad[c, 2m+p, 2n+q]."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    hh, ww = (h + 2 * pad) // 2, (w + 2 * pad) // 2
    y = xp.view(n, c, hh, 2, ww, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, hh, ww, c * 4)
    return y.permute(0, 3, 1, 2)                             # a channels_last view


# --- correctness of the space-to-depth form, float64 on the CPU
g = torch.Generator().manual_seed(1)
xw = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
ww = torch.randn(8, 3, 7, 7, generator=g, dtype=torch.float64)
ref = F.conv2d(xw, ww, stride=2, padding=3)
got = F.conv2d(s2d_input(xw), s2d_weight(ww))
print("s2d max abs err vs direct (float64):", (got - ref).abs().max().item(), got.shape, ref.shape)
assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-10)

# --- the stem alone, bf16, batch N
cfg = YoloConfig(image_size=H)
full = YOLOv1(cfg).to(dev).eval()
conv = full.backbone.layers.conv1.conv
w = conv.weight.detach().to(torch.bfloat16)
bias = conv.bias.detach().to(torch.bfloat16)
x = torch.randn(N, 3, H, H, device=dev)          # normalised images, fp32 NCHW as color_normalize gives
xb = x.to(torch.bfloat16)
flops = 2 * N * 64 * (H // 2) ** 2 * 3 * 49
act = lambda t: F.leaky_relu_(t, 0.1)  # noqa: E731


def tf(ms):
    return f"{flops / ms / 1e9:.0f} TFLOP/s"


wcl = w.contiguous(memory_format=torch.channels_last)
xcl = xb.contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    ms = bench(lambda: act(F.conv2d(xb, wcl, bias, 2, 3))); row("stem NCHW in, CL weight (today)", ms, tf(ms))
    ms = bench(lambda: act(F.conv2d(xcl, wcl, bias, 2, 3))); row("stem CL in, CL weight", ms, tf(ms))
    ms = bench(lambda: act(F.conv2d(xb, w, bias, 2, 3))); row("stem NCHW in, NCHW weight", ms, tf(ms))
    ms = bench(lambda: F.conv2d(xcl, wcl, bias, 2, 3)); row("stem CL, conv only (no leaky)", ms, tf(ms))
    ms = bench(lambda: xb.contiguous(memory_format=torch.channels_last)); row("NCHW->CL input copy", ms)
    for c in (4, 8, 16):
        xp = torch.zeros(N, c, H, H, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        xp[:, :3] = xb
        wp = torch.zeros(64, c, 7, 7, device=dev, dtype=torch.bfloat16)
        wp[:, :3] = w
        wp = wp.contiguous(memory_format=torch.channels_last)
        ms = bench(lambda: act(F.conv2d(xp, wp, bias, 2, 3))); row(f"stem CL padded to {c} ch", ms, tf(ms))
    ws = s2d_weight(w).contiguous(memory_format=torch.channels_last)
    xs = s2d_input(xb).contiguous(memory_format=torch.channels_last)
    ms = bench(lambda: act(F.conv2d(xs, ws, bias))); row("s2d 12ch 4x4/1, input prepared", ms, tf(ms))
    ms = bench(lambda: s2d_input(xb).contiguous(memory_format=torch.channels_last)); row("s2d input transform (bf16)", ms)
    ms = bench(lambda: s2d_input(x.to(torch.bfloat16)).contiguous(memory_format=torch.channels_last))
    row("s2d input transform (fp32 -> bf16)", ms)
    ws16 = F.pad(s2d_weight(w), (0, 0, 0, 0, 0, 4)).contiguous(memory_format=torch.channels_last)
    xs16 = F.pad(s2d_input(xb), (0, 0, 0, 0, 0, 4)).contiguous(memory_format=torch.channels_last)
    ms = bench(lambda: act(F.conv2d(xs16, ws16, bias))); row("s2d padded 16ch, input prepared", ms, tf(ms))
    err = (act(F.conv2d(xs, ws, bias)).float() - act(F.conv2d(xcl, wcl, bias, 2, 3)).float()).norm() / \
        act(F.conv2d(xcl, wcl, bias, 2, 3)).float().norm()
    print("s2d vs direct bf16 rel err:", err.item())
    # im2col-free alternative: the stem as compiled by inductor
    try:
        cst = torch.compile(lambda t: act(F.conv2d(t.to(torch.bfloat16), wcl, bias, 2, 3)), dynamic=False)
        ms = bench(lambda: cst(x)); row("stem compiled (default), fp32 NCHW in", ms, tf(ms))
        cs2 = torch.compile(lambda t: act(F.conv2d(s2d_input(t.to(torch.bfloat16)), ws, bias)), dynamic=False)
        ms = bench(lambda: cs2(x)); row("s2d stem compiled (default), fp32 NCHW in", ms, tf(ms))
    except Exception as e:  # noqa: BLE001
        print("compile of stem failed:", repr(e)[:300])


# --- whole detector with an s2d stem
class S2DConv(torch.nn.Conv2d):
    """Conv2d(3, C, 7, 2, 3) computed as a 4x4 stride-1 conv on the space-to-depth input."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(s2d_input(x, self.padding[0]).contiguous(memory_format=torch.channels_last),
                        s2d_weight(weight), bias)


def with_s2d(model):
    c = model.backbone.layers.conv1.conv
    s = S2DConv(c.in_channels, c.out_channels, 7, 2, 3, bias=c.bias is not None).to(dev)
    s.load_state_dict(c.state_dict())
    model.backbone.layers.conv1.conv = s
    return model


import copy  # noqa: E402

for name, m in (("today", copy.deepcopy(full)), ("s2d stem", with_s2d(copy.deepcopy(full)))):
    with torch.no_grad():
        net = prepare_for_inference(m, dev, channels_last=True, amp=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out_e = net(x)
            ms = bench(lambda: net(x)); row(f"detector b{N} eager bf16, {name}", ms, f"{N / ms * 1000:.0f} img/s")
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        cnet = prepare_for_inference(m, dev, channels_last=True, amp=True, compile_batch=N)
        t0 = time.perf_counter()
        for _ in range(3):
            out_c = cnet(x)
        print(f"compile {name}: {time.perf_counter() - t0:.1f} s")
        ms = bench(lambda: cnet(x), iters=20); row(f"detector b{N} compiled reduce-overhead, {name}", ms,
                                                   f"{N / ms * 1000:.0f} img/s")
        if name == "today":
            ref_out = out_e.float().clone()
        else:
            print("s2d whole-model rel err vs today (bf16 eager):",
                  ((out_e.float() - ref_out).norm() / ref_out.norm()).item())
    torch._dynamo.reset()
# training fwd+bwd eager, fp32 weights + autocast, channels_last
for name, mk in (("today", lambda: copy.deepcopy(full)), ("s2d stem", lambda: with_s2d(copy.deepcopy(full)))):
    m = mk().train().to(memory_format=torch.channels_last)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = m(x).float().square().mean()
        loss.backward()
    ms = bench(step, iters=5, rounds=3); row(f"detector b{N} train fwd+bwd eager, {name}", ms, f"{N / ms * 1000:.0f} img/s")
    del m
print("\nTABLE")
for r in rows:
    print(f"{r[0]:55s} {r[1]:9.3f} ms  {r[2]}")
