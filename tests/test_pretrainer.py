"""Tests of pretrainer.py: recipes and flags, top-k accuracy, the LR schedule, validation counted
once over shards, a tiny end-to-end run (checkpoint contents, TensorBoard, the backbone hand-over
to the detector), exact resume after SIGTERM, SIGINT, non-finite steps, --prepare-val, unreadable
images (--check-data, skipped and counted in training), torchrun and --evaluate.
CPU only, a generated 8-class tree with a few images per class."""
from __future__ import annotations

import json
import shutil
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrainer  # noqa: E402
from dataset import MEAN, STD, DataError, collate_skip_none, color_normalize  # noqa: E402
from demo_data import DEMO_WNID_NAMES, DEMO_WNIDS, make_demo_imagenet, make_flat_val  # noqa: E402
from imagenet import ImageNetClassification, load_imagenet  # noqa: E402
from model import DEMO_MODEL, Classifier, YoloConfig, YOLOv1, load_backbone  # noqa: E402
from test_imagenet import add_bad_images  # noqa: E402
from utils import ShardSampler, load_checkpoint  # noqa: E402

WNIDS = sorted(DEMO_WNIDS)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """8 classes x 4 train images (4 steps of 8 per epoch) and 8 x 2 val images."""
    return make_demo_imagenet(tmp_path_factory.mktemp("inet") / "demo_imagenet", n_train_per_class=4,
                              n_val_per_class=2, seed=0)


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "imagenet", "--data-root", str(root), "--out-dir", str(out), "--epochs", "2",
            "--batch-size", "8", "--lr", "0.01", "--lr-step-epochs", "1", "--lr-gamma", "0.5", "--image-size", "64",
            "--width", "0.0625", "--batch-norm", "--workers", "0", "--threads", "1", "--no-amp", "--deterministic",
            "--preview-images", "2", "--log-interval", "1", *extra]


@pytest.fixture(scope="module")
def run(tree: Path, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("run") / "full"
    return pretrainer.main(_args(tree, out)), out


# --- flags, accuracy, schedule --------------------------------------------------------------------

def test_recipes_and_flags() -> None:
    cfg = pretrainer.parse_args(["--data", "imagenet"])
    # The users' recipe, each a flag default.
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.lr_step_epochs, cfg.lr_gamma) == ("adam", 0.00025, 64, 20, 0.95)
    assert (cfg.batch_norm, cfg.image_size, cfg.amp, cfg.width, cfg.variant) == (False, 224, True, 1.0, "yolo")
    assert cfg.mean == [0.4547857, 0.4349471, 0.40525291] and cfg.std == [0.12003352, 0.12323549, 0.1392444]
    assert pretrainer.parse_args(["--data", "imagenet", "--optimizer", "sgd"]).lr == 0.1
    assert pretrainer.parse_args(["--data", "imagenet", "--optimizer", "sgd", "--lr", "0.02"]).lr == 0.02
    demo = pretrainer.parse_args(["--data", "demo"])
    assert (demo.width, demo.batch_norm) == (DEMO_MODEL["width"], DEMO_MODEL["batch_norm"])
    assert demo.image_size % 32 == 0 and demo.image_size <= 160
    off = pretrainer.parse_args(["--data", "demo", "--no-batch-norm", "--no-amp", "--weight-decay", "0"])
    assert (off.batch_norm, off.amp, off.weight_decay) == (False, False, 0.0)
    with pytest.raises(SystemExit):
        pretrainer.parse_args(["--image-size", "100"])
    with pytest.raises(SystemExit):
        pretrainer.parse_args(["--check-data", "--evaluate", "best.pt"])


def test_accuracy_hand_computed() -> None:
    logits = torch.tensor([
        [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],    # true 1: ranked 2nd          -> top-5 only
        [2.0, 1.0, 0.0, -1.0, -2.0, -3.0],  # true 0: ranked 1st          -> top-1 and top-5
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],    # true 0: ranked 6th (last)   -> neither
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],    # true 4: ranked 5th          -> top-5 only
    ])
    target = torch.tensor([1, 0, 0, 4])
    assert pretrainer.accuracy(logits, target, (1, 5)).tolist() == [1, 3]
    assert pretrainer.accuracy(logits, target, (2, 6, 10)).tolist() == [2, 4, 4]


def test_lr_factor_steps_every_n_epochs() -> None:
    cfg = pretrainer.parse_args(["--data", "imagenet"])   # x0.95 every 20 epochs
    assert pretrainer.lr_factor(0, 10, cfg) == 1.0
    assert pretrainer.lr_factor(199, 10, cfg) == 1.0        # last step of epoch 20
    assert pretrainer.lr_factor(200, 10, cfg) == pytest.approx(0.95)
    assert pretrainer.lr_factor(405, 10, cfg) == pytest.approx(0.95 ** 2)


def test_validation_counts_each_image_once_over_shards(tree: Path) -> None:
    data = load_imagenet(tree, 64)
    torch.manual_seed(0)
    model = Classifier(YoloConfig(C=8, image_size=64, width=0.0625, batch_norm=True), 8).eval()
    cfg = pretrainer.parse_args(["--data", "imagenet", "--no-amp"])
    cpu = torch.device("cpu")
    full = pretrainer.validate(model, DataLoader(data.val, 3, collate_fn=collate_skip_none), cfg, cpu)
    parts = [pretrainer.validate(model, DataLoader(data.val, 3, sampler=ShardSampler(len(data.val), r, 3),
                                                   collate_fn=collate_skip_none), cfg, cpu) for r in range(3)]
    assert full["images"] == len(data.val) == sum(p["images"] for p in parts) == 16
    assert full["correct1"] == sum(p["correct1"] for p in parts)
    assert full["correct5"] == sum(p["correct5"] for p in parts)
    # Independently: one image at a time, argmax and rank by hand.
    c1 = c5 = 0
    with torch.no_grad():
        for image, label, _ in (data.val[i] for i in range(len(data.val))):
            logits = model(color_normalize(image[None], mean=MEAN, std=STD))[0]
            rank = int((logits > logits[label]).sum())
            c1, c5 = c1 + (rank == 0), c5 + (rank < 5)
    assert (full["correct1"], full["correct5"]) == (c1, c5)
    assert full["top1"] == pytest.approx(100 * c1 / 16)


# --- end to end -----------------------------------------------------------------------------------

def test_run_writes_checkpoints_config_and_metrics(run: tuple[dict, Path]) -> None:
    result, out = run
    assert result["exit_code"] == 0 and result["epochs"] == 2 and result["step"] == 8
    for name in ("last.pt", "best.pt", "config.json", "metrics.json"):
        assert (out / name).is_file(), name
    ckpt = load_checkpoint(out / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "state", "config", "model_config", "class_names",
            "class_labels", "rng"} <= set(ckpt)
    assert ckpt["class_names"] == WNIDS
    assert ckpt["class_labels"] == [DEMO_WNID_NAMES[w] for w in WNIDS]
    assert ckpt["model_config"] == YoloConfig(C=8, image_size=64, width=0.0625, batch_norm=True).to_dict()
    assert {k: ckpt["state"][k] for k in ("epoch", "step", "step_in_epoch")} == {"epoch": 2, "step": 8,
                                                                                 "step_in_epoch": 0}
    # x0.5 after each of the 2 epochs (--lr-step-epochs 1 --lr-gamma 0.5).
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == pytest.approx([0.0025, 0.0025])
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 0.01 and config["class_names"] == WNIDS
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["best_top1"] == max(h["top1"] for h in metrics["history"]) == result["best_top1"]


def test_best_checkpoint_accuracy_recomputed_by_hand(run: tuple[dict, Path], tree: Path) -> None:
    _, out = run
    ckpt = load_checkpoint(out / "best.pt")
    model = Classifier(YoloConfig(**ckpt["model_config"]), 8)
    model.load_state_dict(ckpt["model"])
    model.eval()
    data = load_imagenet(tree, 64)
    with torch.no_grad():
        correct = sum(int(model(color_normalize(img[None], mean=MEAN, std=STD))[0].argmax()) == label
                      for img, label, _ in (data.val[i] for i in range(len(data.val))))
    assert ckpt["state"]["best_top1"] == pytest.approx(100 * correct / len(data.val))


def test_tensorboard_has_losses_accuracies_lr_and_predictions(run: tuple[dict, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, out = run
    acc = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/top1", "train/lr", "train/images_per_s", "val/loss", "val/top1",
            "val/top5"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("val/top1")] == [4, 8]
    assert "val/predictions" in tags["images"] and len(acc.Images("val/predictions")) == 2


def test_backbone_arrives_unchanged_in_the_detector(run: tuple[dict, Path]) -> None:
    _, out = run
    ckpt = load_checkpoint(out / "best.pt")            # what train_detector.py --backbone reads
    torch.manual_seed(1)
    detector = YOLOv1(YoloConfig(width=0.0625, batch_norm=True))
    fresh = {k: v.clone() for k, v in detector.backbone.state_dict().items()}
    load_backbone(detector, ckpt["model"], source=str(out / "best.pt"))
    loaded = detector.backbone.state_dict()
    assert set(loaded) == {k[len("backbone."):] for k in ckpt["model"] if k.startswith("backbone.")}
    for k, v in loaded.items():
        assert torch.equal(v, ckpt["model"][f"backbone.{k}"]), k
    assert not torch.equal(loaded["layers.conv1.conv.weight"], fresh["layers.conv1.conv.weight"])
    with pytest.raises(ValueError, match="do not fit"):   # a detector of another width is refused
        load_backbone(YOLOv1(YoloConfig(width=0.125, batch_norm=True)), ckpt["model"])


def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(run, tree: Path, tmp_path: Path,
                                                                    monkeypatch, capsys) -> None:
    _, full = run
    original = ImageNetClassification.__getitem__
    fetched = {"train": 0}

    def getitem(self, index):
        if self.train:
            fetched["train"] += 1
            if fetched["train"] == 32 + 8 + 1:      # first item of epoch 2's second batch
                signal.raise_signal(signal.SIGTERM)
        return original(self, index)

    monkeypatch.setattr(ImageNetClassification, "__getitem__", getitem)
    handler = signal.getsignal(signal.SIGTERM)
    cut = pretrainer.main(_args(tree, tmp_path / "cut"))
    assert cut["exit_code"] == 0 and signal.getsignal(signal.SIGTERM) is handler
    state = load_checkpoint(tmp_path / "cut" / "last.pt")["state"]
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 2, 6)   # that batch's step finished
    assert "stopped by SIGTERM at epoch 2/2, 2 steps into it (step 6)" in capsys.readouterr().out
    monkeypatch.undo()

    resumed = pretrainer.main(_args(tree, tmp_path / "cut", "--resume", "auto"))
    assert resumed["exit_code"] == 0 and resumed["step"] == 8
    assert "at epoch 2/2, 2 steps into it (step 6)" in capsys.readouterr().out.split("resumed from", 1)[1]
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][k][name])), (k, name)
    assert a["state"]["best_top1"] == b["state"]["best_top1"]
    assert resumed["history"] == run[0]["history"]           # per-epoch metrics survive the resume


def test_sigint_saves_and_exits_130(tree: Path, tmp_path: Path, monkeypatch) -> None:
    original = ImageNetClassification.__getitem__

    def getitem(self, index):
        if self.train and not getattr(getitem, "sent", False):
            getitem.sent = True
            signal.raise_signal(signal.SIGINT)
        return original(self, index)

    monkeypatch.setattr(ImageNetClassification, "__getitem__", getitem)
    before = signal.getsignal(signal.SIGINT)   # SIG_IGN when pytest runs as a background job
    result = pretrainer.main(_args(tree, tmp_path / "int", "--epochs", "1"))
    assert result["exit_code"] == 130 and result["step"] == 1
    assert load_checkpoint(tmp_path / "int" / "last.pt")["state"]["step"] == 1
    assert signal.getsignal(signal.SIGINT) is before   # the handler is restored
    monkeypatch.undo()
    # --resume PATH without --out-dir continues in PATH's folder.
    args = _args(tree, tmp_path / "unused", "--epochs", "1", "--resume", str(tmp_path / "int" / "last.pt"))
    i = args.index("--out-dir")
    resumed = pretrainer.main(args[:i] + args[i + 2:])
    assert Path(resumed["out_dir"]) == tmp_path / "int" and resumed["step"] == 4 and resumed["exit_code"] == 0
    assert not (tmp_path / "unused").exists()


class _NaNClassifier(Classifier):
    """Returns NaN logits on the training forwards listed in ``bad`` (1-based), and records
    whether the weights and BatchNorm statistics at the start of each forward equal those at the
    start of the previous bad one (a skipped step must change nothing)."""
    bad: set[int] = set()
    calls = 0
    saved: dict | None = None
    unchanged: list[bool] = []

    def forward(self, x):
        if not self.training or x.is_meta:     # evaluation, and the shape probe of check_batch_norm_batch
            return super().forward(x)
        cls = type(self)
        cls.calls += 1
        now = {k: v.clone() for k, v in self.state_dict().items()}
        if cls.saved is not None:
            cls.unchanged.append(all(torch.equal(now[k], v) for k, v in cls.saved.items()))
            cls.saved = None
        out = super().forward(x)
        if cls.calls in cls.bad:
            cls.saved = now
            return out * float("nan")
        return out


def test_non_finite_steps_are_skipped_then_stop(tree: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pretrainer, "Classifier", _NaNClassifier)
    monkeypatch.setattr(_NaNClassifier, "bad", {2})
    monkeypatch.setattr(_NaNClassifier, "calls", 0)
    monkeypatch.setattr(_NaNClassifier, "unchanged", [])
    result = pretrainer.main(_args(tree, tmp_path / "one", "--epochs", "1", "--max-bad-steps", "2"))
    assert result["skipped_steps"] == 1 and result["step"] == 4
    assert _NaNClassifier.unchanged == [True]              # step 2 left weights and BN statistics alone

    monkeypatch.setattr(_NaNClassifier, "bad", set(range(1, 100)))
    monkeypatch.setattr(_NaNClassifier, "calls", 0)
    with pytest.raises(FloatingPointError, match=r"2 consecutive non-finite steps .*loss=nan"):
        pretrainer.main(_args(tree, tmp_path / "all", "--epochs", "1", "--max-bad-steps", "2"))
    assert not (tmp_path / "all" / "last.pt").exists()


def test_prepare_val_command_then_training_reads_class_folders(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    (root / "train").symlink_to(tree / "train", target_is_directory=True)
    make_flat_val(tree, root / "val")
    shutil.copy(tree / "LOC_val_solution.csv", root)
    csv = (tree / "LOC_val_solution.csv").read_text().splitlines()
    (root / "LOC_val_solution.csv").write_text("\n".join([csv[0], csv[1].replace(csv[1].split(",")[1][:9], "n99999999"),
                                                          *csv[2:]]) + "\n")
    before = sorted(p.name for p in (root / "val").iterdir())
    with pytest.raises(DataError, match=r"1 image\(s\) labelled with classes that train/ does not have, e\.g\. "
                                        r".*\(n99999999\); nothing was moved"):
        pretrainer.main(["--data", "imagenet", "--prepare-val", "--data-root", str(root)])
    assert sorted(p.name for p in (root / "val").iterdir()) == before
    shutil.copy(tree / "LOC_val_solution.csv", root)
    first = pretrainer.main(["--data", "imagenet", "--prepare-val", "--data-root", str(root)])
    assert (first["moved"], first["already"]) == (16, 0)
    second = pretrainer.main(["--data", "imagenet", "--prepare-val", "--data-root", str(root)])
    assert (second["moved"], second["already"]) == (0, 16)
    assert load_imagenet(root, 64).val_layout == "class folders"


@pytest.fixture(scope="module")
def ddp_run(tree: Path, tmp_path_factory) -> tuple[Path, Path]:
    """One epoch under torchrun, 2 CPU processes (gloo), on the tree less one val image; (data root, run folder)."""
    import subprocess
    tmp = tmp_path_factory.mktemp("ddp")
    root = tmp / "odd"
    shutil.copytree(tree, root)
    next((root / "val").glob("*/*.JPEG")).unlink()            # 15 val images: shards of 8 and 7
    out = tmp / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(pretrainer.__file__)), *_args(root, out, "--epochs", "1")]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out


def test_two_processes_with_torchrun_count_an_odd_val_set_once(ddp_run: tuple[Path, Path]) -> None:
    _, out = ddp_run
    metrics = json.loads((out / "metrics.json").read_text())
    # 32 train images, global batch 8 = 4 per process: 4 steps; the 15 val images each counted once.
    assert metrics["history"][0]["images"] == 15 and metrics["steps"] == 4


def test_evaluate_on_one_process_reproduces_the_torchrun_validation(ddp_run: tuple[Path, Path], tmp_path: Path,
                                                                    capsys) -> None:
    root, out = ddp_run
    final = json.loads((out / "metrics.json").read_text())["history"][-1]
    result = pretrainer.main(_args(root, tmp_path / "unused", "--evaluate", str(out / "last.pt")))
    assert result["exit_code"] == 0 and result["images"] == 15
    assert (result["top1"], result["top5"]) == (final["top1"], final["top5"])          # exactly
    assert (result["correct1"], result["correct5"]) == (final["correct1"], final["correct5"])
    assert f"top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}%" in capsys.readouterr().out
    assert not (tmp_path / "unused").exists()                 # evaluation writes nothing


# --- unreadable images ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_tree(tree: Path, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The tree plus, in the first train class, a truncated JPEG, a zero-byte file, a non-image and a
    decompression bomb, and a grayscale and a CMYK JPEG that load (38 train images); plus a zero-byte
    val image (17 val images). Returns (root, {bad train file name: words of its reason})."""
    root = tmp_path_factory.mktemp("bad") / "inet"
    shutil.copytree(tree, root)
    bad = add_bad_images(root / "train" / WNIDS[0])
    (root / "val" / WNIDS[1] / "empty_val.JPEG").write_bytes(b"")
    return root, bad


def test_an_epoch_in_which_no_step_ran_stops_the_run(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "inet"
    shutil.copytree(tree, root)
    for f in (root / "train").rglob("*.JPEG"):    # train/ is not checked at start (only with --check-data)
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"epoch 1: no training step ran"):
        pretrainer.main(_args(root, tmp_path / "run"))
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_check_data_names_each_unreadable_image_and_exits(bad_tree, tmp_path: Path, capsys) -> None:
    root, bad = bad_tree
    result = pretrainer.main(_args(root, tmp_path / "run", "--check-data"))
    assert result["exit_code"] == 0 and not (tmp_path / "run").exists()     # nothing trained, nothing written
    report = result["data_report"]
    train = {Path(f).name: why for f, why in report["train"]}
    assert set(train) == set(bad)                                            # not gray.JPEG nor cmyk.JPEG
    for name, words in bad.items():
        assert words in train[name] and train[name].endswith("; image skipped"), (name, train[name])
    assert report["val"] == [(str(root / "val" / WNIDS[1] / "empty_val.JPEG"), "empty file; image skipped")]
    printed = capsys.readouterr().out
    for f, why in report["train"] + report["val"]:
        assert f"  {f}: {why}\n" in printed
    assert "gray.JPEG" not in printed and "cmyk.JPEG" not in printed


def test_training_skips_and_counts_unreadable_images(bad_tree, tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root, bad = bad_tree
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pretrainer.main(_args(root, out, "--epochs", "1", "--batch-size", "19"))
    named = {Path(str(w.message).split(": ")[1]).name for w in caught if str(w.message).startswith("skipped: ")}
    assert named == set(bad) | {"empty_val.JPEG"}                         # every skip named in a warning
    # 38 train images in 2 steps of 19: each read once, the 4 broken ones skipped and counted.
    assert result["exit_code"] == 0 and result["step"] == 2 and result["skipped_images"] == len(bad) == 4
    assert load_checkpoint(out / "last.pt")["state"]["skipped_images"] == 4
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == 4
    assert result["history"][0]["images"] == 16                              # the zero-byte val image skipped
    printed = capsys.readouterr().out
    assert "val: 1 unreadable images found (headers read), each skipped" in printed
    assert f"  {root / 'val' / WNIDS[1] / 'empty_val.JPEG'}: empty file; image skipped" in printed
    assert "train: images not checked at start" in printed and "4 unreadable training images skipped" in printed
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert [e.value for e in acc.Scalars("data/val_problems")] == [1]
    assert [e.value for e in acc.Scalars("data/skipped_images")] == [4]
    assert any(t.startswith("data/val_report") for t in acc.Tags()["tensors"])      # the report as text
    assert "data/train_problems" not in acc.Tags()["scalars"]                         # train/ is not scanned at start


def test_gpu_decode_trains_as_the_workers_decode(bad_tree, tmp_path: Path) -> None:
    # --gpu-decode on a CPU: the decode moves into the training process with the same pixels, so the
    # run (skips and their warnings included) is the same, loss for loss
    root, bad = bad_tree
    runs = {}
    for name, extra in (("workers", ()), ("device", ("--gpu-decode",))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[name] = pretrainer.main(_args(root, tmp_path / name, "--epochs", "1", "--batch-size", "19", *extra))
        runs[name]["named"] = sorted(Path(str(w.message).split(": ")[1]).name for w in caught
                                     if str(w.message).startswith("skipped: "))
    a, b = runs["workers"], runs["device"]
    assert b["exit_code"] == 0 and b["skipped_images"] == a["skipped_images"] == len(bad)
    assert b["named"] == a["named"] and set(b["named"]) == set(bad) | {"empty_val.JPEG"}
    assert b["history"] == a["history"]                         # train loss and top-1, val loss and top-1/5
    assert load_checkpoint(tmp_path / "device" / "last.pt")["config"]["gpu_decode"] is True


def test_a_batch_without_a_readable_image_is_skipped_not_fatal(tree: Path, tmp_path: Path, monkeypatch) -> None:
    original = ImageNetClassification.__getitem__
    fetched = {"train": 0}

    def getitem(self, index):
        if self.train:
            fetched["train"] += 1
            if fetched["train"] <= 8:                         # the whole first batch unreadable
                return None
        return original(self, index)

    monkeypatch.setattr(ImageNetClassification, "__getitem__", getitem)
    result = pretrainer.main(_args(tree, tmp_path / "run", "--epochs", "1"))
    assert result["exit_code"] == 0 and result["step"] == 4
    assert result["skipped_images"] == 8 and result["skipped_steps"] == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["skipped_images"] == 8


def test_resume_takes_the_runs_flags_and_a_fresh_run_never_overwrites_one(run, tree: Path) -> None:
    out = Path(run[0]["out_dir"])
    before = (out / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"holds a run \(last.pt, best.pt\), which a fresh run would overwrite"):
        pretrainer.main(_args(tree, out))
    with pytest.raises(ValueError, match=r"--lr: lr=0\.02 \(the run's: 0\.01\)"):       # given and different: refused
        pretrainer.main(_args(tree, out, "--epochs", "3", "--lr", "0.02", "--resume", "auto"))
    with pytest.raises(ValueError, match="has trained 2 epochs already: nothing to do at --epochs 2"):
        pretrainer.main(["--data", "imagenet", "--data-root", str(tree), "--out-dir", str(out), "--resume", "auto",
                         "--epochs", "2"])
    assert (out / "last.pt").read_bytes() == before
