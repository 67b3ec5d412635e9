"""CPU experiment, 2026-11-27 (session 11, the AMD EPYC dev box; run it from the repository root):
where a classifier loader worker's time goes, stage by stage, on bench.py's generated ImageNet-size
JPEGs, in one thread. Each stage is timed over all files, best of 3 passes; the output is in
docs/MEASUREMENTS.md ("Session 11"). The stages are the functions
ImageNetClassification.__getitem__ calls; PIL's decode is timed beside torchvision.io's."""
import io
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, ".")   # the repository root
import bench  # noqa: E402
from dataset import decode_encoded, read_encoded, torchvision_read, warp_image  # noqa: E402

torch.set_num_threads(1)
ws = bench.Workspace(64)
ds = bench.classifier_dataset(ws, 224)
paths = [p for p, _ in ws.imagenet_samples()]
datas = [read_encoded(p)[0] for p in paths]
images = [decode_encoded(d, p) for d, p in zip(datas, paths)]
draws = [ds._draw(im.shape[1], im.shape[2], np.random.default_rng([0, 0, i])) for i, im in enumerate(images)]


def timed(name: str, fn) -> None:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(len(paths)):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / len(paths))
    print(f"{name:45s} {best * 1e3:7.3f} ms", flush=True)


def pil_decode(i: int, draft: bool) -> np.ndarray:
    with Image.open(io.BytesIO(bytes(datas[i].numpy()))) as im:
        if draft:
            im.draft("RGB", im.size)
        return np.asarray(im.convert("RGB"))


sizes = sorted({tuple(im.shape[-2:]) for im in images})
print(f"{len(paths)} files, (height, width) {sizes}, {np.mean([d.numel() for d in datas]) / 1024:.0f} KB on average")
timed("read the bytes", lambda i: torchvision_read(paths[i]))
timed("read the bytes + header checks (read_encoded)", lambda i: read_encoded(paths[i]))
timed("decode (decode_encoded, torchvision.io)", lambda i: decode_encoded(datas[i], paths[i]))
timed("decode (PIL)", lambda i: pil_decode(i, False))
timed("decode (PIL, draft at the full size)", lambda i: pil_decode(i, True))
timed("augmentation draw", lambda i: ds._draw(images[i].shape[1], images[i].shape[2], np.random.default_rng([0, 0, i])))
timed("warp_image to 224 px", lambda i: warp_image(images[i], (draws[i][1], draws[i][0], draws[i][3], draws[i][2]),
                                                   224, bool(draws[i][4]), (0, 0, 0)))
timed("the whole __getitem__", lambda i: ds[i])
same = all(np.array_equal(pil_decode(i, True), images[i].permute(1, 2, 0).numpy()) for i in range(len(paths)))
print(f"PIL's draft decode gives torchvision.io's pixels: {same}")
ws.cleanup()
