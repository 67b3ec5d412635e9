"""The fast data pipeline against the straightforward torchvision.transforms.v2 one it replaces.

dataset.py does the paper's scale + translation + flip as one integer crop window and one
antialiased resize (crop_window + warp_image + warp_boxes), and the exposure/saturation jitter
batched in HSV closed form (color_normalize). A straightforward pipeline does
``v2.functional.affine`` (bilinear) on the full image, then ``resize``, ``horizontal_flip``,
and ``ColorJitter``. These tests hold the two to:

* boxes: equal to 1e-3 px when the crop window is exactly the affine (parameters chosen so that
  crop_window's rounding is exact), and within one source pixel (scaled to the output) for
  parameters drawn as in training, where crop_window rounds the window to whole pixels;
* pixels, on a smooth image (gradients up to ~4 levels per pixel) away from the image border
  (the two resample in different orders, so the edges of the padding differ): mean absolute
  difference under 0.5 levels (max 3) for the exact window, under 3 levels (max 12) for drawn
  parameters, whose window is up to half a source pixel off the exact affine;
* colour: exposure equals ``adjust_brightness`` wherever no channel clips; where one clips, HSV
  exposure keeps hue and saturation (brightness clips channels one by one and shifts the hue).
  Saturation is *not* torchvision's ``adjust_saturation`` (a blend with the luma grey); it is
  HSV saturation scaling, checked against colorsys, and coincides with torchvision only on grey
  pixels and at factor 1.
"""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dataset import MEAN, STD, AugmentParams, VOCDetection, color_normalize, crop_window, encode_target, \
    read_image, warp_boxes, warp_image

SIZE = 448
FILL = [round(255 * m) for m in MEAN]


def smooth_image(H: int, W: int, seed: int = 0) -> torch.Tensor:
    """uint8 (3, H, W) of slow sinusoids: gradients under ~4 levels per pixel, no edges."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(H, dtype=torch.float64).view(H, 1)
    x = torch.arange(W, dtype=torch.float64).view(1, W)
    chans = []
    for c in range(3):
        fx, fy, ph = (torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([40.0, 40, 6]) + torch.tensor([70.0, 70, 0])).tolist()
        chans.append(128 + 60 * torch.sin(2 * torch.pi * x / fx + ph) + 50 * torch.cos(2 * torch.pi * y / fy + c))
    return torch.stack(chans).round().clamp(0, 255).to(torch.uint8)


def reference_image(image: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """The straightforward geometric pipeline: affine about the centre on the full image, resize, flip."""
    H, W = image.shape[-2:]
    out = F.affine(image, angle=0.0, translate=[p.tx * W, p.ty * H], scale=p.scale, shear=[0.0, 0.0],
                   interpolation=InterpolationMode.BILINEAR, fill=FILL)
    out = F.resize(out, [SIZE, SIZE], antialias=True)
    return F.horizontal_flip(out) if p.flip else out


def reference_boxes(boxes: torch.Tensor, H: int, W: int, p: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """v2's box transforms on the same affine, then SanitizeBoundingBoxes' rule (sides >= 1 px)."""
    b = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W))
    b = F.affine(b, angle=0.0, translate=[p.tx * W, p.ty * H], scale=p.scale, shear=[0.0, 0.0])
    b = F.resize(b, [SIZE, SIZE])
    if p.flip:
        b = F.horizontal_flip(b)
    b = F.clamp_bounding_boxes(b).as_subclass(torch.Tensor)
    keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
    return b[keep], keep


def interior(window: tuple[int, int, int, int], H: int, W: int, flip: bool, margin: float = 3.0) -> torch.Tensor:
    """(SIZE, SIZE) mask of output pixels whose source lies at least ``margin`` px inside the image."""
    left, top, w, h = window
    u = (torch.arange(SIZE, dtype=torch.float64) + 0.5) * w / SIZE + left
    v = (torch.arange(SIZE, dtype=torch.float64) + 0.5) * h / SIZE + top
    mx = (u >= margin) & (u <= W - margin)
    my = (v >= margin) & (v <= H - margin)
    if flip:
        mx = mx.flip(0)
    return my.view(SIZE, 1) & mx.view(1, SIZE)


# Parameters whose crop window needs no rounding: (W, H, scale, tx * W, ty * H) -> window.
EXACT = [
    (500, 375, AugmentParams(scale=1.25, tx=25 / 500, ty=-3.125 / 375, flip=False), (30, 40, 400, 300)),   # zoom in
    (500, 375, AugmentParams(scale=1.25, tx=25 / 500, ty=-3.125 / 375, flip=True), (30, 40, 400, 300)),
    (500, 360, AugmentParams(scale=0.8, tx=-10 / 500, ty=8 / 360, flip=False), (-50, -55, 625, 450)),      # zoom out: padding
    (500, 360, AugmentParams(scale=0.8, tx=-10 / 500, ty=8 / 360, flip=True), (-50, -55, 625, 450)),
]


@pytest.mark.parametrize("W, H, p, window", EXACT)
def test_exact_window_boxes_equal_v2(W, H, p, window):
    assert crop_window(W, H, p) == window
    boxes = torch.tensor([[10.0, 20, 200, 300],      # clipped at the left/top by the zoom-in
                          [120, 90, 380, 250],       # central
                          [400, 300, W - 1, H - 1],  # near the bottom-right corner
                          [0, 0, 30, 30]])           # leaves the image on zoom-in
    ours, keep = warp_boxes(boxes, window, SIZE, p.flip)
    ref, ref_keep = reference_boxes(boxes, H, W, p)
    assert keep.tolist() == ref_keep.tolist()
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
    # and the grid targets built from them agree
    labels = torch.arange(len(boxes))[keep]
    torch.testing.assert_close(encode_target(ours, labels, SIZE, 7, 20), encode_target(ref, labels, SIZE, 7, 20),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("W, H, p, window", EXACT)
def test_exact_window_pixels_close_to_v2(W, H, p, window):
    img = smooth_image(H, W)
    ours = warp_image(img, window, SIZE, p.flip, FILL)
    ref = reference_image(img, p)
    assert ours.shape == ref.shape == (3, SIZE, SIZE) and ours.dtype == torch.uint8
    mask = interior(window, H, W, p.flip)
    diff = (ours.int() - ref.int()).abs()[:, mask]
    assert diff.float().mean() < 0.5, diff.float().mean()
    assert diff.max() <= 3, diff.max()
    # where the window leaves the image both fill with the same colour
    if window[0] < 0:
        far = ~interior(window, H, W, p.flip, margin=-2.0)   # at least 2 source px outside the image
        assert far.any()
        assert (ours[:, far] == torch.tensor(FILL, dtype=torch.uint8).view(3, 1)).all()
        assert (ref[:, far] == torch.tensor(FILL, dtype=torch.uint8).view(3, 1)).all()


@pytest.mark.parametrize("seed", range(12))
def test_training_draws_match_unrounded_affine(seed):
    """Parameters drawn as in training: crop_window rounds the window to whole pixels, so boxes
    may move by up to one source pixel (scaled to the output); pixels stay close."""
    rng = np.random.default_rng(seed)
    W, H = (500, 375) if seed % 2 else (375, 500)
    p = AugmentParams.sample(rng)
    window = crop_window(W, H, p)
    # boxes kept away from the border so that no box sits at the drop threshold
    boxes = torch.tensor([[0.3 * W, 0.3 * H, 0.6 * W, 0.7 * H], [0.45 * W, 0.35 * H, 0.55 * W, 0.5 * H]])
    ours, keep = warp_boxes(boxes, window, SIZE, p.flip)
    ref, ref_keep = reference_boxes(boxes, H, W, p)
    assert keep.all() and ref_keep.all()
    w_exact, h_exact = W / p.scale, H / p.scale
    tol_x = SIZE / min(window[2], w_exact) + 1e-3     # one source pixel, in output pixels
    tol_y = SIZE / min(window[3], h_exact) + 1e-3
    err = (ours - ref).abs()
    assert (err[:, 0::2] <= tol_x).all() and (err[:, 1::2] <= tol_y).all(), (err, tol_x, tol_y, p)
    img = smooth_image(H, W, seed)
    diff = (warp_image(img, window, SIZE, p.flip, FILL).int() - reference_image(img, p).int()).abs()
    diff = diff[:, interior(window, H, W, p.flip)]
    assert diff.float().mean() < 3, (diff.float().mean(), p)
    assert diff.max() <= 12, (diff.max(), p)


@pytest.mark.parametrize("seed", range(8))
def test_warp_image_equals_plain_crop_then_resize(seed):
    """warp_image works on (H, W, 3) memory (a row-wise fill, the channels-last uint8 resize, a
    flip that keeps that order); its pixels equal, exactly, those of the plain way: a (3, h, w)
    crop padded with the fill colour, resized by v2's resize, flipped by v2's horizontal_flip.
    Inputs in both memory orders, windows inside, across and entirely outside the image."""
    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(20, 400)), int(rng.integers(20, 400))
    hwc = torch.from_numpy(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    for image in (hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()):
        for jitter, size in ((0.1, 448), (0.2, 224), (0.6, 64)):
            p = AugmentParams.sample(rng, jitter)
            for window, flip in ((crop_window(W, H, p), p.flip), ((W + 5, -3, 10, 12), True),
                                 ((1, 2, W - 3, H - 2), False)):
                left, top, w, h = window
                crop = torch.tensor(FILL, dtype=torch.uint8).view(3, 1, 1).repeat(1, h, w)
                for y in range(h):            # row by row: no clever indexing in the reference
                    if 0 <= top + y < H:
                        xs = [x for x in range(w) if 0 <= left + x < W]
                        if xs:
                            crop[:, y, xs[0]:xs[-1] + 1] = image[:, top + y, left + xs[0]:left + xs[-1] + 1]
                ref = F.resize(crop, [size, size], antialias=True)
                ref = F.horizontal_flip(ref) if flip else ref
                out = warp_image(image, window, size, flip, FILL)
                assert out.shape == (3, size, size) and out.dtype == torch.uint8
                if not image.is_contiguous():     # read_image's (H, W, 3) order: kept, for stack_images
                    assert out.permute(1, 2, 0).is_contiguous()
                assert torch.equal(out, ref), (window, size, flip)


@pytest.mark.parametrize("seed", range(4))
def test_warp_images_is_the_float_resize_of_each_crop(seed):
    """warp_images (the batch form --gpu-decode uses on a GPU) against each image's crop built row
    by row, padded with the fill colour, converted to float, resized by v2's resize, rounded and
    flipped by v2's horizontal_flip: equal exactly (the arithmetic torchvision's uint8 resize does on
    a GPU); within one level of warp_image, the CPU's integer uint8 resize (on a CPU both run)."""
    from dataset import warp_images
    rng = np.random.default_rng(seed)
    images, windows, flips, sizes = [], [], [], []
    for i in range(6):
        H, W = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        images.append(torch.from_numpy(rng.integers(0, 256, (3, H, W), dtype=np.uint8)))
        p = AugmentParams.sample(rng, (0.1, 0.2, 0.6)[i % 3])
        windows.append([crop_window(W, H, p), (W + 5, -3, 10, 12), (1, 2, W - 3, H - 2), (0, 0, 64, 64)][i % 4])
        flips.append(bool(i % 2) if i % 4 != 3 else False)
    for size in (64, 96):
        out = warp_images(images, windows, size, flips, FILL)
        assert out.shape == (6, 3, size, size) and out.dtype == torch.uint8
        assert out.is_contiguous(memory_format=torch.channels_last)       # as stack_images batches
        for image, window, flip, got in zip(images, windows, flips, out):
            (H, W), (left, top, w, h) = image.shape[-2:], window
            crop = torch.tensor(FILL, dtype=torch.float32).view(3, 1, 1).repeat(1, h, w)
            for y in range(h):
                if 0 <= top + y < H:
                    xs = [x for x in range(w) if 0 <= left + x < W]
                    if xs:
                        crop[:, y, xs[0]:xs[-1] + 1] = image[:, top + y, left + xs[0]:left + xs[-1] + 1].float()
            ref = F.resize(crop, [size, size], antialias=True).round().to(torch.uint8)
            ref = F.horizontal_flip(ref) if flip else ref
            assert torch.equal(got, ref), (window, size, flip)
            one = warp_image(image, window, size, flip, FILL)
            assert (one.int() - got.int()).abs().max() <= 1, (window, size, flip)
    with pytest.raises(ValueError, match="at least one image"):
        warp_images([], [], 64, [], FILL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_warp_images_on_cuda_is_warp_image_bit_for_bit():
    # on a GPU torchvision's uint8 resize is the float resize rounded: the batch form gives its pixels
    from dataset import warp_images
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, int(rng.integers(100, 500)), int(rng.integers(100, 500))),
                                            dtype=np.uint8)).cuda() for _ in range(8)]
    windows = [crop_window(im.shape[-1], im.shape[-2], AugmentParams.sample(rng, 0.2)) for im in images]
    flips = [bool(i % 2) for i in range(8)]
    got = warp_images(images, windows, 224, flips, FILL)
    ref = torch.stack([warp_image(im, win, 224, flip, FILL) for im, win, flip in zip(images, windows, flips)])
    assert got.is_cuda and torch.equal(got, ref)


def _write_voc(root, image: torch.Tensor, boxes: list[list[int]], names: list[str]) -> None:
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(voc / "JPEGImages" / "000001.jpg", quality=95)
    H, W = image.shape[-2:]
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in zip(names, boxes))
    (voc / "Annotations" / "000001.xml").write_text(
        f"<annotation><size><width>{W}</width><height>{H}</height><depth>3</depth></size>{objs}</annotation>")
    (voc / "ImageSets" / "Main" / "train.txt").write_text("000001\n")


@pytest.mark.parametrize("epoch", range(4))
def test_dataset_item_matches_straightforward_pipeline(tmp_path, epoch):
    """VOCDetection's training item (the path bench.py times) against the straightforward
    pipeline run with the same drawn parameters: same objects in the same cells, coordinates
    within the rounding of the crop window, image close."""
    H, W = 375, 500
    _write_voc(tmp_path, smooth_image(H, W, epoch), [[101, 81, 300, 280], [321, 41, 470, 200]], ["dog", "car"])
    ds = VOCDetection(tmp_path, "2007-train", train=True, seed=3)
    ds.set_epoch(epoch)
    image, target, info = ds[0]
    p = AugmentParams.sample(np.random.default_rng([3, epoch, 0]), ds.jitter, ds.hsv)
    assert info[3:].tolist() == pytest.approx([p.exposure, p.saturation])
    decoded = read_image(ds.items[0][0])
    boxes = VOCDetection.boxes_px(ds.annotation(0))
    ref_boxes, keep = reference_boxes(boxes, H, W, p)
    ref_target = encode_target(ref_boxes, torch.from_numpy(ds.annotation(0).labels)[keep], SIZE, 7, 20)
    assert torch.equal(target[..., 4], ref_target[..., 4]), "objects landed in different cells"
    assert torch.equal(target[..., 5:], ref_target[..., 5:])
    window = crop_window(W, H, p)
    tol = 1.0 / min(window[2], window[3]) * 1.01    # one source pixel, relative to the image
    obj = target[..., 4] > 0
    assert (target[obj][:, 2:4] - ref_target[obj][:, 2:4]).abs().max() <= 2 * tol
    assert (target[obj][:, :2] - ref_target[obj][:, :2]).abs().max() <= tol * 7
    diff = (image.int() - reference_image(decoded, p).int()).abs()[:, interior(window, H, W, p.flip)]
    assert diff.float().mean() < 3


# ----------------------------------------------------------------------------- colour

def _denorm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _random_pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (1, 3, 1, n), dtype=torch.uint8, generator=g)
    img[..., :8] = torch.tensor([0, 77, 128, 255, 3, 200, 254, 90], dtype=torch.uint8)   # grey pixels, black, white
    return img


def test_exposure_equals_adjust_brightness_where_nothing_clips():
    img = _random_pixels(4000)
    x = img.float() / 255
    for e in (0.67, 0.9, 1.0):       # darkening never clips
        ours = _denorm(color_normalize(img, torch.tensor([e]), torch.tensor([1.0])))
        torch.testing.assert_close(ours, F.adjust_brightness(x, e), atol=2e-6, rtol=0)
    e = 1.5
    ours = _denorm(color_normalize(img, torch.tensor([e]), torch.tensor([1.0])))
    tv = F.adjust_brightness(x, e)
    unclipped = (x.amax(1, keepdim=True) * e <= 1).expand_as(x)
    torch.testing.assert_close(ours[unclipped], tv[unclipped], atol=2e-6, rtol=0)
    # where the brightest channel clips, HSV exposure keeps the channels' ratios (hue and
    # saturation) and caps V at 1; per-channel clipping does not, so the two differ there
    clipped = (x.amax(1) * e > 1)[0, 0]
    assert clipped.sum() > 100
    o, inp = ours[0, :, 0, clipped], x[0, :, 0, clipped]
    torch.testing.assert_close(o.amax(0), torch.ones(int(clipped.sum())), atol=2e-6, rtol=0)
    torch.testing.assert_close(o, inp / inp.amax(0, keepdim=True), atol=2e-6, rtol=0)
    assert (tv[0, :, 0, clipped] - o).abs().max() > 0.1


def test_saturation_is_hsv_scaling_not_a_grey_blend():
    img = _random_pixels(600, seed=1)
    x = img.float() / 255
    for s in (0.67, 1.4):
        ours = _denorm(color_normalize(img, torch.tensor([1.0]), torch.tensor([s])))[0, :, 0]
        ref = torch.tensor([colorsys.hsv_to_rgb(h, min(sat * s, 1.0), v) for h, sat, v in
                            (colorsys.rgb_to_hsv(*px) for px in x[0, :, 0].T.double().tolist())]).T.float()
        torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
        tv = F.adjust_saturation(x, s)[0, :, 0]
        grey = (img[0, :, 0].amax(0) == img[0, :, 0].amin(0))
        # coincide on grey (to 1e-4: torchvision's luma weights 0.2989 + 0.587 + 0.114 sum to 0.9999)
        torch.testing.assert_close(ours[:, grey], tv[:, grey], atol=1e-4, rtol=0)
        assert (ours[:, ~grey] - tv[:, ~grey]).abs().max() > 0.05                   # differ on colour
    torch.testing.assert_close(_denorm(color_normalize(img, torch.tensor([1.0]), torch.tensor([1.0]))),
                               F.adjust_saturation(x, 1.0), atol=2e-6, rtol=0)


def _warped(n: int, size: int = 64) -> list[torch.Tensor]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        image = torch.from_numpy(rng.integers(0, 256, (50 + i, 70, 3), dtype=np.uint8)).permute(2, 0, 1)
        out.append(warp_image(image, (-5, 3, 80, 40 + i), size, bool(i % 2), FILL))
    return out


class _Warped(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return _warped(6)[i], torch.tensor([float(i)])


def test_stack_images_batches_without_transposing_and_the_colour_step_gets_nchw():
    """stack_images keeps warp_image's (S, S, 3) memory order (a channels-last batch, also from a
    loader worker through shared memory); the values are torch.stack's, and color_normalize gives
    the same contiguous NCHW result as on an NCHW batch."""
    from dataset import collate_skip_none, color_normalize, stack_images
    images = _warped(4)
    batch = stack_images(images)
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
    assert torch.equal(batch, torch.stack([im.contiguous() for im in images]))
    e, s = torch.tensor([0.8, 1.2, 1.0, 1.4]), torch.tensor([1.3, 0.7, 1.0, 1.1])
    want = color_normalize(batch.contiguous(), e, s)
    got = color_normalize(batch, e, s)
    assert got.is_contiguous() and torch.equal(got, want)
    nchw = [im.contiguous() for im in images]             # other images: stacked the default way
    assert stack_images(nchw).is_contiguous() and torch.equal(stack_images(nchw), batch)
    loader = torch.utils.data.DataLoader(_Warped(), batch_size=3, num_workers=1, collate_fn=collate_skip_none)
    got = list(loader)
    assert all(b[0].is_contiguous(memory_format=torch.channels_last) for b in got)
    assert torch.equal(torch.cat([b[0] for b in got]), torch.stack([im.contiguous() for im in _warped(6)]))
    assert torch.equal(torch.cat([b[1] for b in got]).flatten(), torch.arange(6.0))
