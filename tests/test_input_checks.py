"""What a user can get wrong on the command line and in the files it names: refused at once, with
one message naming the flag or the file, and nothing of the user's overwritten."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detect
import evaluate
import pretrainer
import train_detector
from dataset import DataError, image_set_ids
from helpers import TINY, tiny_voc
from utils import load_checkpoint, run_cli, save_checkpoint, write_json
from voc_eval import read_results_dir, read_text

ROOT = Path(__file__).resolve().parents[1]


def _usage_error(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2, argv
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["--hsv", "inf"], "argument --hsv: 'inf' is not a finite number"),
    (["--lambda-coord=-inf"], "argument --lambda-coord: '-inf' is not a finite number"),
    (["--lr-steps", "10,2O"], "--lr-steps must be comma-separated epochs (numbers >= 0), got '10,2O'"),
    (["--lr-steps", "-5"], "--lr-steps must be comma-separated epochs"),
    (["--tb-images", "-1"], "--tb-images must be >= 0"),
    (["--warmup-lr", "-1"], "--warmup-lr"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay and --clip-grad >= 0"),
    (["--lr-gamma", "0"], "--lr-gamma > 0"),
    (["--seed", "-1"], "--seed must be in 0..2147483647, got -1"),
    (["--dropout", "1.5"], "dropout must be in [0, 1], got 1.5"),
])
def test_train_detector_refuses_bad_numbers_before_any_work(argv, message, capsys):
    assert message in _usage_error(train_detector.parse_args, argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (["--mean", "nan", "0.5", "0.5"], "argument --mean: 'nan' is not a finite number"),
    (["--log-interval", "0"], "--log-interval and --max-bad-steps >= 1"),
    (["--max-bad-steps", "0"], "--log-interval and --max-bad-steps >= 1"),
    (["--save-every-steps", "-1"], "--save-every-steps, --preview-images and --color-jitter must be >= 0"),
    (["--color-jitter", "-2"], "--save-every-steps, --preview-images and --color-jitter must be >= 0"),
    (["--lr-gamma", "nan"], "argument --lr-gamma: 'nan' is not a finite number"),
    (["--weight-decay", "-1"], "--weight-decay and --clip-grad >= 0"),
])
def test_pretrainer_refuses_bad_numbers_before_any_work(argv, message, capsys):
    assert message in _usage_error(pretrainer.parse_args, argv, capsys)


def test_the_recipes_own_values_pass_the_checks():
    for data in ("demo", "voc"):
        train_detector.parse_args(["--data", data])
    for data in ("demo", "imagenet"):
        for optimizer in ("adam", "sgd"):
            pretrainer.parse_args(["--data", data, "--optimizer", optimizer])


def test_detect_refuses_a_bad_grid_file_before_any_work(tmp_path, capsys):
    args = ["x.jpg", "--checkpoint", "x.pt"]
    assert "--grid out.txt: give a .jpg, .jpeg or .png file name" in _usage_error(
        detect.parse_args, [*args, "--grid", "out.txt"], capsys)
    assert "--grid-cell in 16..4096" in _usage_error(detect.parse_args, [*args, "--grid", "g.jpg", "--grid-cell",
                                                                         "100000"], capsys)
    for width in ("-5", "100000"):   # no box drawn / minutes per box
        assert f"--line-width must be in 0..64 pixels (0: by image size), got {width}" in _usage_error(
            detect.parse_args, [*args, "--line-width", width], capsys)
    (tmp_path / "sheet.jpg").mkdir()
    assert "sheet.jpg: a folder" in _usage_error(detect.parse_args, [*args, "--grid", str(tmp_path / "sheet.jpg")],
                                                 capsys)


def test_outputs_never_replace_the_users_files(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    image = photos / "a.jpg"
    image.write_bytes(b"not looked at")
    with pytest.raises(ValueError, match=r"--out-dir .*photos holds input images \(e.g. .*a.jpg\): the drawn images "
                                         "would overwrite them"):
        detect.refuse_to_overwrite_inputs([image], str(photos), "")
    with pytest.raises(ValueError, match="--grid .*a.jpg is one of the input images"):
        detect.refuse_to_overwrite_inputs([image], str(tmp_path / "out"), str(image))
    detect.refuse_to_overwrite_inputs([image], str(tmp_path / "out"), str(tmp_path / "sheet.jpg"))   # fine
    ckpt = tmp_path / "best.pt"
    save_checkpoint({"model": {}}, ckpt)
    before = ckpt.read_bytes()
    assert "exists and is not a .json file (the checkpoint?): refusing to overwrite it" in _usage_error(
        evaluate.parse_args, ["--checkpoint", str(ckpt), "--json", str(ckpt)], capsys)
    assert ckpt.read_bytes() == before
    write_json(tmp_path / "m.json", {"mAP": float("nan")})            # written whole, strict JSON
    assert (tmp_path / "m.json").read_text().startswith("{") and not list(tmp_path.glob(".m.json.*"))


def test_text_files_with_a_bom_are_read_and_other_encodings_named(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=4, n_test=2)
    lists = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    ids = (lists / "test.txt").read_text().split()
    (lists / "test.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(ids).encode() + b"\r\n")   # Windows Notepad
    report = []
    assert [i for _, i, _ in image_set_ids(root / "VOCdevkit", "2007-test", report)] == ids and not report
    (lists / "test.txt").write_bytes("\n".join(ids).encode("utf-16"))
    with pytest.raises(ValueError, match=r"test.txt: UTF-16 text \(byte 0xff at offset 0\); save it as UTF-8"):
        list(image_set_ids(root / "VOCdevkit", "2007-test", []))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_text(tmp_path / "latin1.txt")
    from imagenet import read_val_solution
    (tmp_path / "sol.csv").write_bytes(b"\xef\xbb\xbfImageId,PredictionString\r\nILSVRC2012_val_00000001,"
                                       b"n01751748 1 2 3 4\r\n")                       # as Excel saves it
    assert read_val_solution(tmp_path / "sol.csv") == {"ILSVRC2012_val_00000001": "n01751748"}
    results = tmp_path / "results"
    results.mkdir()
    (results / "comp4_det_test_circle.txt").write_bytes(b"\xef\xbb\xbf000001 0.9 1 2 30 40\n")
    dets = read_results_dir(results, ["circle"], "test")
    assert dets[0][0] == ["000001"]
    (results / "comp4_det_test_circle.txt").write_text("000001 0.9 31 2 30 40\n")   # xmax < xmin - 1
    with pytest.raises(ValueError, match=r"comp4_det_test_circle.txt:1: .*an empty box"):
        read_results_dir(results, ["circle"], "test")


def test_imagenet_broken_links_and_stray_files_are_not_silent(tmp_path):
    from demo_data import make_demo_imagenet
    from imagenet import load_imagenet
    root = tmp_path / "in"
    make_demo_imagenet(root, n_train_per_class=2, n_val_per_class=1)
    train = root / "train"
    wnid = sorted(p.name for p in train.iterdir())[0]
    (train / wnid / "gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")     # a broken link to an image
    (train / "n99999999.tar").write_bytes(b"")                             # an archive left unextracted
    data = load_imagenet(root, 32)
    assert any("not class folders ignored, e.g. n99999999.tar" in n for n in data.notes)
    assert (train / wnid / "gone.JPEG") in [p for p, _ in data.train.samples]
    problems = data.train.check_images(decode=False)
    assert [Path(f).name for f, _ in problems] == ["gone.JPEG"] and "cannot read" in problems[0][1]
    (train / "n00000000").symlink_to(tmp_path / "missing-folder")          # a class behind a broken link
    with pytest.raises(DataError, match=r"n00000000: a broken symbolic link .* where a class folder is expected"):
        load_imagenet(root, 32)


def test_resume_from_a_checkpoint_whose_model_config_is_not_a_config_names_it(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    out = tmp_path / "run"
    args = ["--data", "demo", *TINY, "--data-root", str(root), "--out-dir", str(out)]
    train_detector.main([*args, "--epochs", "1"])
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["model_config"]["from_the_future"] = 1
    save_checkpoint(ckpt, out / "last.pt")
    with pytest.raises(ValueError, match=r"checkpoint .*last.pt: model_config .* is not a valid YoloConfig"):
        train_detector.main([*args, "--epochs", "2", "--resume", "auto"])


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_previous_kept(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"last.pt: could not write the checkpoint \(\[enforce fail.*MiB free on its "
                                      r"disk\); the previous one is intact"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_run_cli_ends_a_diverged_run_and_os_errors_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_detector.py"])
    for error in (FloatingPointError("5 consecutive non-finite steps (--max-bad-steps)"),
                  OSError("last.pt: could not write the checkpoint")):
        def fail():
            raise error
        with pytest.raises(SystemExit) as e:
            run_cli(fail)
        assert e.value.code == 1
        assert capsys.readouterr().err == f"train_detector.py: error: {error}\n"


def test_bench_refuses_a_bad_device_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--device", "foo"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "YOLO_TRACEBACK": ""})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["bench.py: error: --device must be auto, cpu, cuda or cuda:N, got 'foo'"]


def test_a_batch_batch_norm_cannot_train_on_is_refused_at_start():
    from model import YOLOv1, YoloConfig
    from utils import check_batch_norm_batch

    def yolo(size, **kw):
        return lambda: YOLOv1(YoloConfig(C=5, image_size=size, width=0.0625, **kw))
    with pytest.raises(ValueError, match=r"--batch-size gives 1 image per process, and at --image-size 32 BatchNorm "
                                         r"then sees one value per channel \(.*torch.Size\(\[1, .*, 1, 1\]\)\)"):
        check_batch_norm_batch(yolo(32, batch_norm=True), 32, 1)
    assert check_batch_norm_batch(yolo(32, batch_norm=True), 32, 2) == 2       # two values per channel
    assert check_batch_norm_batch(yolo(32, batch_norm=False), 32, 1) == 1      # no BatchNorm
    assert check_batch_norm_batch(yolo(64, batch_norm=True, head_stride=1), 64, 1) == 1   # a 2x2 map at the end


def test_a_batch_that_unreadable_images_leave_too_small_for_batch_norm_is_skipped(tmp_path, capsys):
    # at 64 px with head stride 2 the head's last map is 1x1: BatchNorm needs two images there, so a batch
    # that unreadable images leave with one is skipped and counted like an empty one, not fatal
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    images = root / "VOCdevkit" / "VOC2007" / "JPEGImages"
    trainval = (root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    for image_id in trainval[3:]:     # 3 readable training images of 8: one of the 2 batches of 4 has under 2
        data = (images / f"{image_id}.jpg").read_bytes()
        (images / f"{image_id}.jpg").write_bytes(data[: len(data) // 3])
    out = train_detector.main(["--data", "demo", *TINY, "--data-root", str(root), "--head-stride", "2",
                               "--epochs", "1", "--out-dir", str(tmp_path / "run")])
    assert out["skipped_images"] == 5
    printed = capsys.readouterr()
    assert "under 2 readable images (BatchNorm needs 2 here) left in a process's batch" in printed.out + printed.err


def test_a_corrupt_checkpoint_is_named_in_one_line_without_torchs_advice(tmp_path):
    path = tmp_path / "g.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    data = path.read_bytes()
    path.write_bytes(b"garbage" + data[7:])                  # the zip header overwritten
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"cannot load checkpoint {path} safely (weights_only=True): ") and "\n" not in message
    assert "weights_only` set to `False`" not in message and "file an issue" not in message
    path.write_bytes(data[: len(data) // 2])                 # truncated: torch's reason, its first sentence whole
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    assert (f"cannot load checkpoint {path} safely (weights_only=True): RuntimeError: PytorchStreamReader failed "
            "reading zip archive: failed finding central directory. It is corrupt, truncated") in str(e.value)


def test_voc_xml_of_another_shape_is_named_not_read_as_background(tmp_path):
    from dataset import VOC_CLASSES, parse_voc_xml
    box = "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>"
    obj = f"<object><name>dog</name>{box}</object>"
    path = tmp_path / "000001.xml"
    path.write_text(f'<annotation xmlns="http://example.org/voc"><size><width>100</width><height>80</height>'
                    f'</size>{obj}</annotation>')
    ann, problems = parse_voc_xml(path, VOC_CLASSES)                  # a namespace: read, and said
    assert ann.boxes.tolist() == [[1, 2, 30, 40]] and (ann.width, ann.height) == (100, 80)
    assert problems == ["XML namespace http://example.org/voc ignored"]
    for text, message in ((f"<annotation><objects>{obj}</objects></annotation>",
                           "<object> elements nested below <objects>, not directly in <annotation>"),
                          (f"<annotation><object><name>dog</name>{box}{box}</object></annotation>",
                           "object 'dog' has 2 <bndbox> elements, not one"),
                          (f"<voc>{obj}</voc>", "root element <voc>, not a VOC <annotation>")):
        path.write_text(text)
        with pytest.raises(DataError, match=f"000001.xml: {message}"):
            parse_voc_xml(path, VOC_CLASSES)
    path.write_text(f"<annotation><object><name>person</name>{box}<part><name>head</name>{box}</part></object>"
                    "</annotation>")                                   # VOC2012's person layout: parts are no objects
    assert parse_voc_xml(path, VOC_CLASSES)[0].labels.tolist() == [VOC_CLASSES.index("person")]


def test_a_demo_data_root_is_used_as_it_is_and_generated_where_there_is_none(tmp_path, monkeypatch):
    import demo_data
    root = demo_data.make_demo_imagenet(tmp_path / "in", n_train_per_class=2, n_val_per_class=1)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert pretrainer.resolve_data_root(pretrainer.parse_args(["--data", "demo", "--data-root", str(root)]),
                                        True) == str(root)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before      # not regenerated
    calls = []
    monkeypatch.setattr(demo_data, "make_demo_voc", lambda where: calls.append(Path(where)))
    (tmp_path / "d" / "VOCdevkit").mkdir(parents=True)       # what an interrupted generation leaves
    with pytest.raises(ValueError, match="no VOCdevkit/VOC2007"):
        train_detector.main(["--data", "demo", "--data-root", str(tmp_path / "d"), *TINY, "--out-dir",
                             str(tmp_path / "run")])
    assert calls == [tmp_path / "d"]                          # generated there this time


def test_paths_are_saved_absolute_and_bench_refuses_bad_numbers(tmp_path, capsys, monkeypatch):
    import bench
    monkeypatch.chdir(tmp_path)
    cfg = train_detector.parse_args(["--data-root", "mydemo", "--backbone", "../b.pt"])
    assert (cfg.data_root, cfg.backbone) == (str(tmp_path / "mydemo"), str(tmp_path.parent / "b.pt"))
    assert pretrainer.parse_args(["--data-root", "in"]).data_root == str(tmp_path / "in")
    for argv, message in ((["--steps", "-1"], "--steps, --det-batch, --cls-batch and --time-budget must be >= 0"),
                          (["--width", "100"], "--width must be in (0, 4], got 100.0"),
                          (["--workers", "-5"], "--workers >= -1")):
        assert message in _usage_error(bench.parse_args, argv, capsys)
    (tmp_path / "best.pt").write_bytes(b"checkpoint")
    assert "exists and is not a .json file: refusing to overwrite it" in _usage_error(
        bench.parse_args, ["--json", str(tmp_path / "best.pt")], capsys)
