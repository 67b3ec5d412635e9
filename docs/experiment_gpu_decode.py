"""GPU experiments (issue 6, 2026-11-27): why ``pretrainer.py --gpu-decode`` trains slower end to
end (4,382 img/s on an H200, bench.py run D) than either of its halves (the step alone 8,764, the
data alone 8,181). Each measures the classifier end to end as bench.py does
(``bench._loader_rate``: bench's sizes, 14 loader workers on a 16-core host), every setting taking
turns with the others twice, best of the two printed. Run from the repository root:

    python3 docs/experiment_gpu_decode.py threads    # E: the process's threads
    python3 docs/experiment_gpu_decode.py warp       # F: a warp with fewer launches
    python3 docs/experiment_gpu_decode.py compiled   # G: the compiled step

E. The finishing thread (``dataset.batches_on_device``) and the training loop share the process:
   its cores and the GIL, whose hand-over between threads waits up to ``sys.getswitchinterval()``
   (5 ms). Settings: 14 loader workers or 4 (leaving cores to the main process's threads), the
   switch interval 5 or 0.5 ms, the thread's lead 2 batches or 4.
F. A candidate batch warp with about 70 kernel launches per batch of 64 where
   ``dataset.warp_images`` has about 170, and no per-image ``F.interpolate`` (whose Python checks
   cost host time): the images copied into one padded canvas, one ``torchvision.ops.roi_align``
   for every crop (bilinear samples averaged over each output pixel's footprint, ceil(scale)^2 of
   them: a box filter where warp_images' antialiased resize has a triangle one; the same bilinear
   upsampling), the flips and the rounding once. Its pixels against warp_images' on one batch of
   decoded JPEGs, the host time of both, and the end-to-end rate with each, at both switch intervals.
G. The torch.compile'd model (``pretrainer.py --compile``), whose step costs the host fewer Python
   frames and launches, leaving the finishing thread more of the GIL; the workers' own decode
   beside ``--gpu-decode``, eager and compiled.
"""
import sys
import time
from dataclasses import replace

import torch
from torchvision.ops import roi_align

sys.path.insert(0, ".")   # the repository root
import bench  # noqa: E402
import dataset  # noqa: E402
from dataset import collate_encoded  # noqa: E402


def warp_images_roi(images, windows, size, flips, fill):
    """F's candidate: dataset.warp_images' job with one roi_align (see the docstring above)."""
    N, dev = len(images), images[0].device
    H, W = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    fill_u8 = dataset._fill_pixel(dev, tuple(fill), torch.uint8).view(1, 3, 1, 1)
    canvas = fill_u8.expand(N, 3, H, W).contiguous()          # padded with the fill colour
    for i, im in enumerate(images):
        canvas[i, :, :im.shape[-2], :im.shape[-1]] = im
    shift = dataset._fill_pixel(dev, tuple(fill), torch.float32).view(1, 3, 1, 1)
    x = canvas.float().sub_(shift)      # the fill is 0: roi_align's zeros outside the canvas are the fill
    rois = torch.tensor([[i, l, t, l + w, t + h] for i, (l, t, w, h) in enumerate(windows)], dtype=torch.float32)
    rois = rois.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else rois
    out = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)   # (N, 3, S, S)
    flipped = [i for i, f in enumerate(flips) if f]
    if flipped:
        idx = torch.tensor(flipped)
        idx = idx.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else idx
        out[idx] = out[idx].flip(-1)
    return out.add_(shift).round_().clamp_(0, 255).to(torch.uint8, memory_format=torch.channels_last)


def turns(settings: list[tuple], measure) -> None:
    """``measure(*setting[1:])`` for each setting, all of them in turn twice; the best printed."""
    results: dict[str, list[float]] = {s[0]: [] for s in settings}
    for rnd in range(2):
        for name, *args in settings:
            t0 = time.perf_counter()
            results[name].append(measure(rnd, *args))
            print(f"round {rnd}: {name:34s} {results[name][-1]:8.0f} img/s  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    print(f"\n{'classifier end to end':34s} {'img/s (best of 2)':>18s}")
    for name, rates in results.items():
        print(f"{name:34s} {max(rates):18,.0f}")


mode = sys.argv[1] if len(sys.argv) > 1 else ""
if mode not in ("threads", "warp", "compiled"):
    sys.exit("usage: python3 docs/experiment_gpu_decode.py threads|warp|compiled")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cfg = bench.bench_config(device)
ws = bench.Workspace(cfg.files)
ds = bench.classifier_dataset(ws, cfg.cls_size, decode_on_device=True)
_, _, make_step, _, note = bench._training_setup("classifier", cfg, device)
step = make_step()
print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {note}; "
      f"bench's workers: {cfg.workers}", flush=True)
gpu_decode = dict(collate=collate_encoded, finish=ds.finish_on_device)

if mode == "threads":
    original = dataset.batches_on_device

    def threads(rnd: int, workers: int, switch: float, ahead: int) -> float:
        sys.setswitchinterval(switch)
        bench.batches_on_device = lambda b, f, d, thread=True: original(b, f, d, ahead, thread)
        try:
            return bench._loader_rate(step, ds, cfg.cls_batch, replace(cfg, workers=workers), device, seed=10 + rnd,
                                      **gpu_decode)
        finally:
            sys.setswitchinterval(0.005)
            bench.batches_on_device = original
    turns([("bench", cfg.workers, 0.005, 2), ("4 workers", 4, 0.005, 2), ("switch 0.5 ms", cfg.workers, 0.0005, 2),
           ("4 workers, switch 0.5 ms", 4, 0.0005, 2), ("ahead 4", cfg.workers, 0.005, 4)], threads)

elif mode == "warp":
    items = [ds[i] for i in range(cfg.cls_batch)]
    (data, offsets, sizes, _), *fields = collate_encoded(items)
    b, rows = offsets.tolist(), fields[-1].tolist()
    decoded = dataset._decode_jpegs([data[x:y] for x, y in zip(b[:-1], b[1:])], [ds.path(int(r[0])) for r in rows],
                                    [tuple(s) for s in sizes.tolist()], device)
    windows, flips = [tuple(int(v) for v in r[-5:-1]) for r in rows], [bool(r[-1]) for r in rows]
    for name, fn in (("warp_images", dataset.warp_images), ("roi_align candidate", warp_images_roi)):
        for _ in range(3):
            fn(decoded, windows, cfg.cls_size, flips, (0, 0, 0))
        bench.sync(device)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn(decoded, windows, cfg.cls_size, flips, (0, 0, 0))
            best = min(best, time.perf_counter() - t0)     # the host's time: the call's, not the device's
            bench.sync(device)
        print(f"{name:28s} host {best * 1e3:6.2f} ms per batch of {cfg.cls_batch}", flush=True)
    diff = (warp_images_roi(decoded, windows, cfg.cls_size, flips, (0, 0, 0)).int()
            - dataset.warp_images(decoded, windows, cfg.cls_size, flips, (0, 0, 0)).int()).abs().float()
    values = diff.flatten() if diff.numel() < 2 ** 24 else diff.flatten()[::7]     # torch.quantile's limit
    print(f"candidate against warp_images: mean {diff.mean():.2f} levels, 99th percentile "
          f"{values.quantile(0.99):.0f}, max {diff.max():.0f}", flush=True)
    current = dataset.warp_images

    def warp(rnd: int, fn, switch: float) -> float:
        sys.setswitchinterval(switch)
        dataset.warp_images = fn
        try:
            return bench._loader_rate(step, ds, cfg.cls_batch, cfg, device, seed=10 + rnd, **gpu_decode)
        finally:
            sys.setswitchinterval(0.005)
            dataset.warp_images = current
    turns([("warp_images", current, 0.005), ("roi_align", warp_images_roi, 0.005),
           ("warp_images, switch 0.5 ms", current, 0.0005), ("roi_align, switch 0.5 ms", warp_images_roi, 0.0005)],
          warp)

else:
    plain = bench.classifier_dataset(ws, cfg.cls_size)
    compiled = bench._training_setup("classifier", cfg, device, compiled=True)[2]()
    t0 = time.perf_counter()
    first = next(iter(bench._loader(plain, cfg.cls_batch, 1, 0, device)))
    for _ in range(3):
        compiled(*first)
    bench.sync(device)
    print(f"compiled in {time.perf_counter() - t0:.0f} s", flush=True)

    def run(rnd: int, fn, decode_on_device: bool) -> float:
        return bench._loader_rate(fn, ds if decode_on_device else plain, cfg.cls_batch, cfg, device, seed=20 + rnd,
                                  **(gpu_decode if decode_on_device else {}))
    turns([("eager, --gpu-decode", step, True), ("eager, workers decode", step, False),
           ("compiled, --gpu-decode", compiled, True), ("compiled, workers decode", compiled, False)], run)
ws.cleanup()
