"""Tests of imagenet.py: the ImageNet layouts (class folders, flat val + LOC_val_solution.csv, flat
val + devkit ground truth), the --prepare-val helper, the crops, the dataset items and the image
checks. CPU only, tiny generated trees (demo_data.make_demo_imagenet / make_flat_val)."""
from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import DataError, collate_skip_none  # noqa: E402
from helpers import png_bomb  # noqa: E402
from demo_data import DEMO_WNID_NAMES, DEMO_WNIDS, make_demo_imagenet, make_flat_val  # noqa: E402
from imagenet import (ImageNetClassification, check_image_header, eval_transform, load_imagenet,  # noqa: E402
                      prepare_val, random_resized_crop_box, read_devkit_ground_truth, read_val_solution, val_labels)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """8 classes x 2 train images, 8 x 2 val images in class folders, plus the Kaggle files."""
    return make_demo_imagenet(tmp_path_factory.mktemp("inet") / "demo_imagenet", n_train_per_class=2,
                              n_val_per_class=2, seed=0)


def _truth(tree: Path) -> dict[str, str]:
    """Ground truth read straight off the generated class folders: {image id: wnid}."""
    return {p.stem: p.parent.name for p in (tree / "val").glob("*/*.JPEG")}


def _flat_copy(tree: Path, dst: Path, with_csv: bool = True) -> Path:
    """An ImageNet root whose val/ is the official flat folder (train/ shared by a symlink)."""
    dst.mkdir(parents=True)
    (dst / "train").symlink_to(tree / "train", target_is_directory=True)
    make_flat_val(tree, dst / "val")
    if with_csv:
        shutil.copy(tree / "LOC_val_solution.csv", dst)
    shutil.copy(tree / "LOC_synset_mapping.txt", dst)
    return dst


def _snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_ino, p.stat().st_mtime_ns,
                                       None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def _labels_by_id(ds: ImageNetClassification) -> dict[str, str]:
    return {p.stem: ds.class_names[label] for p, label in ds.samples}


def add_bad_images(folder: Path) -> dict[str, str]:
    """Write broken images into ``folder`` (a truncated JPEG, a zero-byte file, a non-image and a
    decompression bomb, all named .JPEG) plus a grayscale and a CMYK JPEG that must load. Returns
    ``{bad file name: words its reason holds}`` (also used by test_pretrainer.py)."""
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)

    def jpeg(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        return buf.getvalue()

    full = jpeg(Image.fromarray(rgb))
    (folder / "truncated.JPEG").write_bytes(full[: len(full) // 2])    # header intact, scan data cut
    (folder / "zerobyte.JPEG").write_bytes(b"")
    (folder / "notimage.JPEG").write_bytes(b"<html>this is not a picture</html>")
    (folder / "bomb.JPEG").write_bytes(png_bomb(100_000, 100_000))
    (folder / "gray.JPEG").write_bytes(jpeg(Image.fromarray(rgb[..., 0], "L")))
    (folder / "cmyk.JPEG").write_bytes(jpeg(Image.fromarray(rgb).convert("CMYK")))
    return {"truncated.JPEG": "cannot decode", "zerobyte.JPEG": "empty file", "notimage.JPEG": "not a readable image (no image format recognised in its bytes)",
            "bomb.JPEG": "decompression bomb"}


# --- layouts --------------------------------------------------------------------------------------

def test_class_folder_layout(tree: Path) -> None:
    data = load_imagenet(tree, 64)
    assert data.class_names == sorted(DEMO_WNIDS)
    assert data.class_labels == [DEMO_WNID_NAMES[w] for w in sorted(DEMO_WNIDS)]
    assert data.val_layout == "class folders"
    assert len(data.train) == 16 and len(data.val) == 16
    for p, label in data.train.samples:
        assert p.parent.name == data.class_names[label]
    assert _labels_by_id(data.val) == _truth(tree)


def test_kaggle_layout_is_found_under_ilsvrc_data_cls_loc(tree: Path, tmp_path: Path) -> None:
    inner = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC"
    inner.mkdir(parents=True)
    (inner / "train").symlink_to(tree / "train", target_is_directory=True)
    make_flat_val(tree, inner / "val")
    shutil.copy(tree / "LOC_val_solution.csv", tmp_path / "kaggle")
    shutil.copy(tree / "LOC_synset_mapping.txt", tmp_path / "kaggle")
    data = load_imagenet(tmp_path / "kaggle", 64)
    assert data.root == inner
    assert data.val_layout.startswith("flat folder labelled by") and "LOC_val_solution.csv" in data.val_layout
    assert _labels_by_id(data.val) == _truth(tree)
    assert data.class_labels[0] == DEMO_WNID_NAMES[sorted(DEMO_WNIDS)[0]]


def test_flat_val_with_loc_val_solution(tree: Path, tmp_path: Path) -> None:
    root = _flat_copy(tree, tmp_path / "flat")
    assert not any(p.is_dir() for p in (root / "val").iterdir())
    data = load_imagenet(root, 64)
    assert _labels_by_id(data.val) == _truth(tree)
    assert [p.name for p, _ in data.val.samples] == sorted(p.name for p in (root / "val").iterdir())


def test_read_val_solution_takes_the_wnid_of_every_box(tmp_path: Path) -> None:
    f = tmp_path / "sol.csv"
    f.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4 \n"
                 "ILSVRC2012_val_00000002,n09193705 5 6 7 8 n09193705 1 1 9 9 \n")
    assert read_val_solution(f) == {"ILSVRC2012_val_00000001": "n01751748", "ILSVRC2012_val_00000002": "n09193705"}
    f.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n09193705 5 6 7 8 n01751748 1 1 9 9\n")
    with pytest.raises(DataError, match=r"sol.csv:2: .*several classes"):
        read_val_solution(f)
    f.write_text("ImageId,PredictionString\n../escape,n09193705 5 6 7 8\n")
    with pytest.raises(DataError, match="unsafe"):
        read_val_solution(f)


def _write_devkit(tree: Path, folder: Path) -> tuple[Path, Path]:
    """Devkit files for the demo's val set with ILSVRC2012_IDs in a non-sorted (reversed) wnid
    order, as meta.mat's IDs are: line k of the synsets file is ID k."""
    folder.mkdir(parents=True, exist_ok=True)
    id_order = list(reversed(DEMO_WNIDS))
    synsets = folder / "synsets.txt"
    synsets.write_text("".join(f"{w} {DEMO_WNID_NAMES[w]}\n" for w in id_order))
    truth = _truth(tree)
    gt = folder / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{id_order.index(truth[f'ILSVRC2012_val_{i:08d}']) + 1}\n"
                          for i in range(1, len(truth) + 1)))
    return gt, synsets


def test_flat_val_with_devkit_ground_truth(tree: Path, tmp_path: Path) -> None:
    root = _flat_copy(tree, tmp_path / "flat", with_csv=False)
    gt, synsets = _write_devkit(tree, tmp_path / "devkit")
    data = load_imagenet(root, 64, devkit_gt=str(gt), devkit_synsets=str(synsets))
    assert _labels_by_id(data.val) == _truth(tree)
    assert "ground_truth" in data.val_layout
    # The same file read with the IDs in sorted order would mislabel: the order matters.
    assert read_devkit_ground_truth(gt, synsets)["ILSVRC2012_val_00000001"] == _truth(tree)["ILSVRC2012_val_00000001"]


def test_devkit_errors_name_file_and_line(tmp_path: Path) -> None:
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n00000002\nn00000001\n")
    gt = tmp_path / "gt.txt"
    gt.write_text("1\n3\n")
    with pytest.raises(DataError, match=r"gt.txt:2: ILSVRC2012_ID 3 is outside 1..2"):
        read_devkit_ground_truth(gt, synsets)
    gt.write_text("2\nx\n")
    with pytest.raises(DataError, match=r"gt.txt:2: 'x' is not an ILSVRC2012_ID"):
        read_devkit_ground_truth(gt, synsets)
    gt.write_text("2\n1\n\n")
    assert read_devkit_ground_truth(gt, synsets) == {"ILSVRC2012_val_00000001": "n00000001",
                                                     "ILSVRC2012_val_00000002": "n00000002"}
    synsets.write_text("n00000002\n\nn00000001\n")
    with pytest.raises(DataError, match=r"synsets.txt:2: blank line"):
        read_devkit_ground_truth(gt, synsets)
    with pytest.raises(DataError, match="--devkit-synsets"):
        val_labels(tmp_path, tmp_path, devkit_gt=str(gt))


def test_flat_val_problems_fail_loudly(tree: Path, tmp_path: Path) -> None:
    root = _flat_copy(tree, tmp_path / "flat", with_csv=False)
    with pytest.raises(DataError, match="flat folder and no labels"):
        load_imagenet(root, 64)
    rows = list(csv.reader((tree / "LOC_val_solution.csv").open()))
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows[:-1])             # one image left without a label
    with pytest.raises(DataError, match=rf"{rows[-1][0]}.JPEG: no label"):
        load_imagenet(root, 64)
    rows[1][1] = "n99999999 1 1 5 5"                    # a class that train/ does not have
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=r"labelled n99999999 .* not one of the 8 train classes"):
        load_imagenet(root, 64)


def test_mixed_val_layout_is_refused(tree: Path, tmp_path: Path) -> None:
    root = _flat_copy(tree, tmp_path / "flat")
    (root / "val" / DEMO_WNIDS[0]).mkdir()
    first = sorted((root / "val").glob("*.JPEG"))[0]
    os.rename(first, root / "val" / DEMO_WNIDS[0] / first.name)
    with pytest.raises(DataError, match="both class folders and .* loose images.*--prepare-val"):
        load_imagenet(root, 64)


def test_unknown_val_class_folder_is_refused(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "r"
    shutil.copytree(tree, root)
    shutil.copytree(root / "val" / DEMO_WNIDS[0], root / "val" / "n12345678")
    with pytest.raises(DataError, match="n12345678: val class not among the 8 train classes"):
        load_imagenet(root, 64)


# --- --prepare-val --------------------------------------------------------------------------------

def test_prepare_val_arranges_safely_and_second_run_changes_nothing(tree: Path, tmp_path: Path) -> None:
    root = _flat_copy(tree, tmp_path / "flat")
    (root / "val" / "notes.JPEG").write_bytes(b"an unlabelled loose file")
    truth = _truth(tree)
    labels = read_val_solution(root / "LOC_val_solution.csv")
    labels["ILSVRC2012_val_99999999"] = DEMO_WNIDS[0]       # labelled, but no such image
    report = prepare_val(root / "val", labels)
    assert (report.moved, report.already) == (len(truth), 0)
    assert report.missing == ["ILSVRC2012_val_99999999"] and report.unlabelled == ["notes.JPEG"]
    # Every image is now in its class folder with its original bytes; nothing else moved.
    for image_id, wnid in truth.items():
        moved = root / "val" / wnid / f"{image_id}.JPEG"
        assert moved.read_bytes() == (tree / "val" / wnid / f"{image_id}.JPEG").read_bytes()
    assert sorted(p.name for p in (root / "val").iterdir() if p.is_file()) == ["notes.JPEG"]
    before = _snapshot(root / "val")
    report = prepare_val(root / "val", labels)
    assert (report.moved, report.already) == (0, len(truth))
    assert _snapshot(root / "val") == before
    (root / "val" / "notes.JPEG").unlink()
    data = load_imagenet(root, 64)
    assert data.val_layout == "class folders" and _labels_by_id(data.val) == truth


def test_prepare_val_refuses_to_overwrite_a_different_file(tree: Path, tmp_path: Path) -> None:
    root = _flat_copy(tree, tmp_path / "flat")
    labels = read_val_solution(root / "LOC_val_solution.csv")
    image_id = sorted(labels)[3]
    (root / "val" / labels[image_id]).mkdir()
    squatter = root / "val" / labels[image_id] / f"{image_id}.JPEG"
    squatter.write_bytes(b"not the same image")
    before = _snapshot(root / "val")
    with pytest.raises(FileExistsError, match=rf"{image_id}.JPEG -> .*{image_id}.JPEG \(holds different bytes\)"):
        prepare_val(root / "val", labels)
    assert _snapshot(root / "val") == before                 # nothing moved, nothing overwritten


def test_prepare_val_refuses_two_files_with_one_image_id(tree: Path, tmp_path: Path) -> None:
    # Labels are keyed by file stem: x.JPEG and x.png cannot both be the labelled image x.
    root = _flat_copy(tree, tmp_path / "flat")
    labels = read_val_solution(root / "LOC_val_solution.csv")
    image_id = sorted(labels)[2]
    shutil.copy(root / "val" / f"{image_id}.JPEG", root / "val" / f"{image_id}.png")
    before = _snapshot(root / "val")
    with pytest.raises(FileExistsError, match=rf"{image_id}.png share the image id '{image_id}'"):
        prepare_val(root / "val", labels)
    assert _snapshot(root / "val") == before                 # nothing moved


def test_prepare_val_finishes_an_interrupted_move(tree: Path, tmp_path: Path) -> None:
    # A run killed between link and unlink leaves the same file in both places.
    root = _flat_copy(tree, tmp_path / "flat")
    labels = read_val_solution(root / "LOC_val_solution.csv")
    image_id = sorted(labels)[0]
    (root / "val" / labels[image_id]).mkdir()
    os.link(root / "val" / f"{image_id}.JPEG", root / "val" / labels[image_id] / f"{image_id}.JPEG")
    report = prepare_val(root / "val", labels)
    assert (report.moved, report.already) == (len(labels) - 1, 1)
    assert not any(p.is_file() for p in (root / "val").iterdir())
    assert _labels_by_id(load_imagenet(root, 64).val) == _truth(tree)


# --- crops and items ------------------------------------------------------------------------------

def test_random_resized_crop_box_bounds_and_fallback() -> None:
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_box(200, 300, rng, (0.08, 1.0))
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        fractions.append(h * w / (200 * 300))
    # Areas span the scale range; on a 3:2 image the largest crop within 4:3 is 266x200 (0.887).
    assert 0.07 < min(fractions) < 0.12 and 0.85 < max(fractions) <= 0.8867
    # Scale 1 on a 3:1 image cannot fit any ratio in [3/4, 4/3]: the largest centred 4:3 crop.
    assert random_resized_crop_box(100, 300, rng, (1.0, 1.0)) == (0, 83, 100, 133)
    assert random_resized_crop_box(300, 100, rng, (1.0, 1.0)) == (83, 0, 133, 100)


def test_eval_transform_resizes_shorter_side_and_centre_crops() -> None:
    # 300x200 image, size 64: shorter side -> 73 (64 * 256/224), so the crop covers the centre
    # +-87.7 source pixels; a bright 40x40 square at the source centre lands on output ~[25, 39].
    img = torch.zeros(3, 200, 300, dtype=torch.uint8)
    img[:, 80:120, 130:170] = 255
    out = eval_transform(img, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    assert (out[:, 27:37, 27:37] > 200).all()
    assert (out[:, :22] < 20).all() and (out[:, 42:] < 20).all()
    assert (out[:, :, :22] < 20).all() and (out[:, :, 42:] < 20).all()


def test_items_are_uint8_and_deterministic_per_seed_epoch_index(tree: Path) -> None:
    data = load_imagenet(tree, 64, seed=1, color_jitter=0.5)
    image, label, info = data.train[5]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert label == data.train.samples[5][1] and info[0] == 5
    assert 1 / 1.5 <= info[1] <= 1.5 and 1 / 1.5 <= info[2] <= 1.5
    again = data.train[5]
    assert torch.equal(again[0], image) and torch.equal(again[2], info)
    data.train.set_epoch(1)
    assert not torch.equal(data.train[5][0], image)
    val_image, _, val_info = data.val[0]
    assert val_image.shape == (3, 64, 64) and val_info[1] == 1.0 and val_info[2] == 1.0
    assert torch.equal(data.val[0][0], val_image)


def test_training_view_is_the_plain_resized_crop_and_flip(tree: Path) -> None:
    # the same draws replayed by hand through torchvision's resized_crop: the same pixels, bit for bit
    import numpy as np
    import torchvision.transforms.v2.functional as TF
    from dataset import read_image
    data = load_imagenet(tree, 64, seed=3, color_jitter=0.5)
    flips = 0
    for epoch in range(3):
        data.train.set_epoch(epoch)
        for i in range(len(data.train)):
            image = data.train[i][0]
            rng = np.random.default_rng([3, epoch, i])
            src = read_image(data.train.samples[i][0])
            top, left, h, w = random_resized_crop_box(src.shape[1], src.shape[2], rng, (0.08, 1.0))
            ref = TF.resized_crop(src.contiguous(), top, left, h, w, [64, 64], antialias=True)
            flip = rng.random() < 0.5
            flips += flip
            assert torch.equal(image, ref.flip(-1) if flip else ref), (epoch, i)
            assert image.permute(1, 2, 0).is_contiguous()     # (S, S, 3) memory, as stack_images batches it
    assert 0 < flips < 3 * len(data.train)


def test_decode_on_device_batch_is_the_workers_batch(tree: Path, tmp_path: Path) -> None:
    # On the CPU, bytes from the workers decoded and cropped in the training process give the
    # workers' own batch bit for bit; broken files are skipped with the same warnings, a PNG (named
    # .JPEG, as one of ImageNet's) and grayscale / CMYK JPEGs load.
    from dataset import collate_encoded
    root = tmp_path / "r"
    shutil.copytree(tree, root)
    folder = root / "train" / sorted(DEMO_WNIDS)[1]
    bad = add_bad_images(folder)
    for k, name in enumerate(("png.JPEG", "png2.JPEG")):      # two, so that their order is checked
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (90 - 10 * k, 70, 3), dtype=np.uint8)).save(
            folder / name, "PNG")
    plain = load_imagenet(root, 48, seed=2, color_jitter=0.5).train
    on_device = load_imagenet(root, 48, seed=2, color_jitter=0.5, decode_on_device=True).train
    assert on_device.decode_on_device and not plain.decode_on_device
    names = {Path(os.fsdecode(p)).name for p in on_device.paths}
    assert {"png.JPEG", "gray.JPEG", "cmyk.JPEG"} | set(bad) <= names
    cpu = torch.device("cpu")
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        on_device.set_epoch(epoch)
        with warnings.catch_warnings(record=True) as caught_plain:
            warnings.simplefilter("always")
            ref = collate_skip_none([plain[i] for i in range(len(plain))])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = [on_device[i] for i in range(len(on_device))]
            raw = collate_encoded(items)
            # bytes for all but the 3 files refused before decoding and the 3 decoded in the worker (the
            # PNGs and the CMYK JPEG); the truncated JPEG goes as bytes and fails in the batch's decode
            data, offsets, sizes, decoded = raw[0]
            assert int((offsets.diff() > 0).sum()) == len(plain) - 3 - 3 and len(decoded) == 3
            assert torch.equal(offsets.diff() > 0, sizes.prod(1) > 0)      # a header size for each JPEG
            assert data.dtype == torch.uint8 and data.dim() == 1 and int(offsets[-1]) == len(data)
            got = on_device.finish_on_device(raw, cpu)
        skipped = {Path(str(w.message).split(": ")[1]).name for w in caught if str(w.message).startswith("skipped: ")}
        assert skipped == set(bad) == {Path(str(w.message).split(": ")[1]).name for w in caught_plain}
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[2][:, :3], ref[2], rtol=0, atol=0)      # index, exposure, saturation
        assert got[2].shape[1] == 8
    assert on_device.finish_on_device(collate_encoded([None, None]), cpu) is None


def test_decode_on_device_skips_an_image_whose_size_is_not_its_headers(tree: Path) -> None:
    # the worker drew the crop from the header's size: a decoded image of another size is skipped, named
    from dataset import collate_encoded, read_image
    on_device = load_imagenet(tree, 32, seed=1, decode_on_device=True).train
    batch = collate_encoded([on_device[i] for i in range(4)])
    sizes = batch[0][2]                    # (height, width) of each image's header, as the workers read them
    assert sizes.tolist() == [list(read_image(on_device.path(i)).shape[-2:]) for i in range(4)]
    liar = on_device.path(2)
    sizes[2] = torch.tensor([5, 7])        # as if its header had said 7x5
    with pytest.warns(UserWarning, match=f"skipped: {liar}: decoded to .* pixels, its header says 7x5"):
        images, labels, info = on_device.finish_on_device(batch, torch.device("cpu"))
    assert images.shape[0] == 3 and info[:, 0].tolist() == [0, 1, 3]
    assert torch.equal(labels, batch[1][[0, 1, 3]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a GPU")
def test_decode_on_device_batch_on_cuda_is_close_to_the_workers_batch(tree: Path, tmp_path: Path) -> None:
    # nvJPEG and the float resize on the GPU round differently from libjpeg and the CPU's uint8
    # resize (chroma upsampling, rounding): about a grey level on average, never a different picture.
    # Broken files: those refused before decoding are skipped by name; the truncated JPEG may decode
    # on the GPU without an error (nvJPEG reports less than libjpeg), so it may or may not be skipped.
    from dataset import collate_encoded
    root = tmp_path / "r"
    shutil.copytree(tree, root)
    folder = root / "train" / sorted(DEMO_WNIDS)[1]
    bad = add_bad_images(folder)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(
        folder / "png.JPEG", "PNG")
    on_device = load_imagenet(root, 64, seed=4, decode_on_device=True).train
    plain = load_imagenet(root, 64, seed=4).train
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate_encoded([on_device[i] for i in range(len(on_device))])
        got = on_device.finish_on_device(batch, torch.device("cuda"))
        ref = collate_skip_none([plain[i] for i in range(len(plain))])
    skipped = [Path(str(w.message).split(": ")[1]).name for w in caught if str(w.message).startswith("skipped: ")]
    assert {"zerobyte.JPEG", "notimage.JPEG", "bomb.JPEG"} <= set(skipped) <= set(bad)
    assert got[0].is_cuda and got[0].dtype == torch.uint8
    if got[0].shape[0] == ref[0].shape[0] + 1:        # the truncated JPEG decoded on the GPU: leave it out
        index = next(i for i, p in enumerate(on_device.paths) if Path(os.fsdecode(p)).name == "truncated.JPEG")
        rows = (got[2][:, 0] != index).nonzero().flatten()
        got = [got[0][rows.cuda()], got[1][rows], got[2][rows]]
    assert got[0].shape == ref[0].shape and torch.equal(got[1], ref[1])
    diff = (got[0].cpu().int() - ref[0].int()).abs()
    assert diff.float().mean() < 3.0, diff.float().mean()      # another picture would be tens of levels off
    per_image = diff.flatten(1).float().mean(1)
    assert per_image.max() < 8.0, per_image                    # the grayscale JPEG too


def test_batches_on_device_hands_each_batch_over_to_the_callers_stream(monkeypatch) -> None:
    # The protocol, with stand-ins for CUDA's streams and events (no GPU needed): each batch is
    # finished in another thread on the side stream, an event recorded there after it; before the
    # caller gets the batch, the caller's stream waits for that event and every device tensor of the
    # batch is marked as used by the caller's stream. Without the wait the step could read a batch
    # not yet written; without record_stream its memory could be handed to the next batch's decode
    # while the step still reads it. Errors reach the caller; stopping early stops the thread.
    import contextlib
    import threading
    import time
    import dataset
    log: list[tuple] = []
    local = threading.local()

    class Stream:
        def __init__(self, name: str):
            self.name = name

        def wait_event(self, event: "Event") -> None:
            log.append(("wait", self.name, event.name))

    class Event:
        count = 0

        def record(self, stream: Stream) -> None:
            self.name = f"event {Event.count} on {stream.name}"
            Event.count += 1

    class DeviceTensor(torch.Tensor):
        is_cuda = True

        def record_stream(self, stream: Stream) -> None:
            log.append(("record", stream.name, int(self[0])))

    def current(device=None) -> Stream:
        return getattr(local, "stream", None) or Stream("caller")

    @contextlib.contextmanager
    def on(stream: Stream):
        saved, local.stream = getattr(local, "stream", None), stream
        try:
            yield
        finally:
            local.stream = saved

    monkeypatch.setattr(dataset, "_side_stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", current)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    main = threading.get_ident()

    def finish(batch, device):
        log.append(("finish", batch, current().name, threading.get_ident() != main))
        if batch == "bad":
            raise ValueError("bad batch")
        if batch == 3:
            dataset._warn("skipped: an image of batch 3")     # as _decode_jpegs warns
        return None if batch is None else [torch.full((2,), batch).as_subclass(DeviceTensor), torch.zeros(1)]

    def show(message, *args, **kwargs):      # where each warning is issued: the caller's thread only
        log.append(("warned", str(message), threading.get_ident() == main))

    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", show)
        for k, out in enumerate(dataset.batches_on_device([0, None, 2, 3, 4], finish, cuda)):
            log.append(("caller gets", k, None if out is None else int(out[0][0])))
    assert [e for e in log if e[0] == "finish"] == [("finish", b, "side", True) for b in (0, None, 2, 3, 4)]
    caller = [e for e in log if e[0] != "finish"]
    want = []
    for k in range(5):
        want += [("warned", "skipped: an image of batch 3", True)] if k == 3 else []     # with its batch
        want += [("wait", "caller", f"event {k} on side")] + ([("record", "caller", k)] if k != 1 else [])
        want.append(("caller gets", k, None if k == 1 else k))
    assert caller == want

    log.clear()        # thread=False: the same hand-over, each batch finished in the caller's thread
    Event.count = 0
    for k, out in enumerate(dataset.batches_on_device([0, None, 2], finish, cuda, thread=False)):
        log.append(("caller gets", k, None if out is None else int(out[0][0])))
    assert [e for e in log if e[0] == "finish"] == [("finish", b, "side", False) for b in (0, None, 2)]
    assert [e for e in log if e[0] != "finish"] == want[:want.index(("caller gets", 2, 2)) + 1]

    # errors come after the batches before them: finish's, and the loader's (raised while the thread
    # is batches ahead of the caller)
    got = dataset.batches_on_device([0, 1, "bad", 4], finish, cuda)
    assert int(next(got)[0][0]) == 0 and int(next(got)[0][0]) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(got)

    def loader():
        yield from (0, 1, 2)
        raise RuntimeError("worker died")
    got = dataset.batches_on_device(loader(), finish, cuda)
    assert [int(next(got)[0][0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="worker died"):
        next(got)

    # the caller stops: the batch being finished completes, those queued behind it never start
    log.clear()

    def slow(batch, device):
        time.sleep(0.2)
        return finish(batch, device)
    early = dataset.batches_on_device(range(100), slow, cuda, ahead=2)
    next(early)                          # batch 0; the thread goes on to batch 1, 2 and 3 wait
    early.close()
    finished = len([e for e in log if e[0] == "finish"])
    time.sleep(0.5)
    assert finished == 2 and len([e for e in log if e[0] == "finish"]) == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("batches_on_device")]


def _loader_and_reference(tree: Path, device: torch.device, batch_size: int = 6):
    from torch.utils.data import DataLoader
    from dataset import collate_encoded
    ds = load_imagenet(tree, 64, seed=5, decode_on_device=True).train
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_encoded, num_workers=2,
                        pin_memory=device.type == "cuda")
    return ds, loader, [ds.finish_on_device(b, device) for b in loader]     # on the caller's stream, one by one


def test_batches_on_device_gives_the_batches_finish_on_device_gives(tree: Path) -> None:
    from dataset import batches_on_device
    cpu = torch.device("cpu")
    ds, loader, ref = _loader_and_reference(tree, cpu)
    got = list(batches_on_device(loader, ds.finish_on_device, cpu))
    assert len(got) == len(ref) == -(-len(ds) // 6)
    for g, want in zip(got, ref):
        assert all(torch.equal(a, b) for a, b in zip(g, want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_batches_on_device_on_cuda_waits_for_each_batch_and_keeps_its_memory(tree: Path) -> None:
    # 1. Each batch is written on the side stream ~100 ms after its finish returns, and the caller
    #    copies it at once: without the caller's wait for the side stream the copies read zeros.
    # 2. The caller's copy of each batch waits ~100 ms on its stream while the caller drops the batch;
    #    then (not before: the thread waits for it) the next finish scribbles over a fresh block of the
    #    same size at once: without record_stream that block would be the dropped batch's memory, and
    #    the copy would read 255s. Batches of 2, so that most finishes come after a drop.
    import itertools
    import threading
    from dataset import batches_on_device
    dev = torch.device("cuda", torch.cuda.current_device())
    ds, loader, ref = _loader_and_reference(tree, dev)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    sleep_100ms = int(10_000_000 * 100 / start.elapsed_time(end))

    def late(batch, device):
        out = ds.finish_on_device(batch, device)
        image = torch.zeros_like(out[0])
        torch.cuda._sleep(sleep_100ms)
        image.copy_(out[0])
        return [image, *out[1:]]
    early = [b[0].clone() for b in batches_on_device(loader, late, dev)]

    assert len(early) == len(ref)
    for a, want in zip(early, ref):
        assert torch.equal(a, want[0])

    ds, loader, ref = _loader_and_reference(tree, dev, batch_size=2)
    dropped = [threading.Event() for _ in ref]
    count = itertools.count()

    def scribbling(batch, device):
        k = next(count)
        assert k == 0 or dropped[k - 1].wait(timeout=60), "the caller never dropped its batch"
        torch.full((2 * 3 * 64 * 64,), 255, dtype=torch.uint8, device=device)    # freed at once: a fresh block
        return ds.finish_on_device(batch, device)
    copies = []
    for k, batch in enumerate(batches_on_device(loader, scribbling, dev)):
        torch.cuda._sleep(sleep_100ms)
        copies.append(batch[0].clone())
        del batch
        dropped[k].set()
    torch.cuda.synchronize()
    assert len(copies) == len(ref) == -(-len(ds) // 2) >= 5       # several finishes after a drop
    for c, want in zip(copies, ref):
        assert torch.equal(c, want[0])


def test_unreadable_image_is_skipped_with_a_warning_naming_it(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "r"
    shutil.copytree(tree, root)
    data = load_imagenet(root, 64)
    bad = data.train.samples[2][0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match=str(bad.name)):
        assert data.train[2] is None
    with pytest.warns(UserWarning, match=str(bad.name)):
        batch = collate_skip_none([data.train[i] for i in range(4)])
    assert batch[0].shape == (3, 3, 64, 64) and batch[1].tolist() == [data.train.samples[i][1] for i in (0, 1, 3)]


def test_check_images_by_header_and_by_decode(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "r"
    shutil.copytree(tree, root)
    folder = root / "train" / sorted(DEMO_WNIDS)[0]
    bad = add_bad_images(folder)
    data = load_imagenet(root, 64)
    decoded = data.train.check_images(decode=True)
    assert [f for f, _ in decoded] == sorted(str(folder / name) for name in bad)     # full paths, dataset order
    for f, why in decoded:
        assert bad[Path(f).name] in why and why.endswith("; image skipped") and str(folder) not in why, (f, why)
    # Headers only: everything but the truncated file, which only a decode finds.
    header = data.train.check_images(decode=False)
    assert sorted(Path(f).name for f, _ in header) == sorted(set(bad) - {"truncated.JPEG"})
    assert data.val.check_images(decode=True) == []
    # Processes split the work: the shards together find each problem once.
    parts = [data.train.check_images(decode=False, shard=(r, 3)) for r in range(3)]
    assert sorted(f for part in parts for f, _ in part) == sorted(f for f, _ in header)
    # Grayscale and CMYK load as RGB.
    index = {p.name: i for i, (p, _) in enumerate(data.train.samples)}
    for name in ("gray.JPEG", "cmyk.JPEG"):
        assert data.train[index[name]][0].shape == (3, 64, 64)
        assert check_image_header(folder / name) == (160, 120)
