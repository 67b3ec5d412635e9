"""GPU experiment (issue 6, 2026-11-27): where ``pretrainer.py --gpu-decode``'s data path spends its
time, stage by stage, on bench.py's generated ImageNet-size JPEGs (~500x400, ~75 KB). Run it from
the repository root: ``python3 docs/profile_gpu_decode.py [cuda|cpu]``.

The goal is 5,000 trained images/s end to end, 12.8 ms per batch of 64, in which the training
process must finish a batch (decode + warp) besides queueing the step (the step alone ran at 7,753
and 8,764 img/s on H200 machines, 8.3 and 7.3 ms per batch). Each stage is timed over one batch of
64, the host clock read after a device sync, best of 5 (the "call's" rows: one call, its host time
against its device time):

1. ``collate_encoded`` of 64 items (the worker's last act; host only);
2. nvJPEG: ``torchvision.io.decode_jpeg`` of the 64 files in one call, and at batch 16 and 1;
   the host time of the call beside the device time (events) shows what holds the host;
3. the 64 warps one by one (``dataset.warp_image``) and ``stack_images``, against
   ``dataset.warp_images`` (the batch form, fewer launches; its pixels compared);
4. ``finish_on_device`` (2 + 3 as training runs them), with either warp;
5. a torch.profiler summary of 10 batches through ``dataset.batches_on_device(thread=False)``
   (the slowest ops by host time; in its thread the profiler would not see them).
"""
import sys
import time

import numpy as np
import torch

sys.path.insert(0, ".")   # the repository root
import bench  # noqa: E402
import dataset  # noqa: E402
from dataset import _decode_jpegs, collate_encoded, stack_images, warp_image, warp_images  # noqa: E402

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
N = 64
ws = bench.Workspace(128)
ds = bench.classifier_dataset(ws, 224, decode_on_device=True)
items = [ds[i] for i in range(N)]
paths = [p for p, _ in ws.imagenet_samples()][:N]


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(name: str, fn, n: int = N, rounds: int = 5) -> float:
    fn()                         # warm-up: nvJPEG handles, kernels, allocator
    sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    print(f"{name:58s} {best * 1e3:8.2f} ms  {best / n * 1e6:7.1f} us/img  {n / best:8.0f} img/s", flush=True)
    return best


def host_vs_device(name: str, fn, n: int = N) -> None:
    """Host time of the call (until it returns) against the device time of its work (events)."""
    if device.type != "cuda":
        return
    fn()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    end.record()
    sync()
    print(f"{name:58s} host {host * 1e3:7.2f} ms, host+device {start.elapsed_time(end):7.2f} ms", flush=True)


print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
batch = collate_encoded(items)
(data, offsets, sizes, _), *fields = batch
bounds = offsets.tolist()
datas = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
hw = [tuple(s) for s in sizes.tolist()]
rows = fields[-1].tolist()
print(f"{N} JPEGs, mean {np.mean([len(d) for d in datas]) / 1024:.0f} KB, mean size "
      f"{np.mean([w for _, w in hw]):.0f}x{np.mean([h for h, _ in hw]):.0f}")

timed("1. collate_encoded (host)", lambda: collate_encoded(items))
for n in (N, 16, 1):
    timed(f"2. decode_jpeg, one call of {n}", lambda n=n: _decode_jpegs(datas[:n], paths[:n], hw[:n], device), n)
host_vs_device("2. decode_jpeg of 64: the call's", lambda: _decode_jpegs(datas, paths, hw, device))
decoded = _decode_jpegs(datas, paths, hw, device)
windows = [tuple(int(v) for v in r[-5:-1]) for r in rows]
flips = [bool(r[-1]) for r in rows]


def warps():
    return [warp_image(im, win, 224, flip, (0, 0, 0)) for im, win, flip in zip(decoded, windows, flips)]


timed("3. warp_image x 64", warps)
host_vs_device("3. warp_image x 64: the calls'", warps)
warped = warps()
timed("3. stack_images of 64", lambda: stack_images(warped))


def batched():
    return warp_images(decoded, windows, 224, flips, (0, 0, 0))


timed("3. warp_images of 64 (batched)", batched)
host_vs_device("3. warp_images of 64: the call's", batched)
diff = (batched().int() - stack_images(warped).int()).abs()
print(f"   warp_images against warp_image: max {int(diff.max())} levels, {float((diff > 0).float().mean()):.2e} "
      "of the values differ", flush=True)
for form, devices in (("per-image warps", set()), ("batched warp", {device.type})):
    dataset.BATCHED_WARP_DEVICES.clear()
    dataset.BATCHED_WARP_DEVICES.update(devices)
    timed(f"4. finish_on_device, {form}", lambda: ds.finish_on_device(batch, device))
    host_vs_device(f"4. finish_on_device, {form}: the call's", lambda: ds.finish_on_device(batch, device))

from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
    for out in dataset.batches_on_device([batch] * 10, ds.finish_on_device, device, thread=False):
        pass
    sync()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
ws.cleanup()
