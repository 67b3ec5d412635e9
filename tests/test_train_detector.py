import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_detector
from dataset import color_normalize
from helpers import TINY, tiny_voc
from loss import YoloLoss
from model import YoloConfig, YOLOv1
from utils import GracefulStop, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kw):
    return train_detector.main(["--data", "demo", *TINY, *args], **kw) if kw else train_detector.main(["--data", "demo", *TINY, *args])


def read_log(path: Path) -> dict[int, dict]:
    """Last logged line per step (steps redone after a crash appear twice; the last one counts)."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def test_overfits_a_few_images(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=8)
    res = run(["--data-root", str(root), "--train-set", "2007-test", "--val-set", "2007-test", "--no-augment",
               "--width", "0.125", "--image-size", "96", "--batch-size", "8", "--epochs", "60", "--eval-interval", "60",
               "--lr", "2e-3", "--dropout", "0", "--out-dir", str(tmp_path / "run")])
    log = read_log(tmp_path / "run" / "train_log.jsonl")
    assert log[60]["total"] < 0.1 * log[1]["total"]
    assert res["final_map"] > 0.6
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "VOC07 11-point AP@0.5" and metrics["final_map"] == res["final_map"]
    for name in ("last.pt", "best.pt", "config.json"):
        assert (tmp_path / "run" / name).exists()
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "run").iterdir())


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=24, n_test=4)
    common = [sys.executable, str(ROOT / "train_detector.py"), "--data", "demo", *TINY, "--data-root", str(root),
              "--epochs", "2", "--eval-interval", "100", "--deterministic", "--save-every-steps", "2", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    straight = subprocess.run(common + ["--out-dir", str(full)], check=True, env=env, capture_output=True, text=True)
    crash = tmp_path / "crash"
    proc = subprocess.Popen(common + ["--out-dir", str(crash)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:   # kill once a mid-epoch checkpoint (step 4 of 6) exists
        log = crash / "train_log.jsonl"
        if log.exists() and any(json.loads(l)["step"] >= 5 for l in log.read_text().splitlines()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load_checkpoint(crash / "last.pt")
    assert 0 < ckpt["state"]["step"] < 12 and ckpt["state"]["step_in_epoch"] > 0
    resumed = subprocess.run(common + ["--out-dir", str(crash), "--resume", "auto"], check=True, env=env,
                             capture_output=True, text=True)
    k = ckpt["state"]["step_in_epoch"]   # 6 steps per epoch: step k of epoch 1 is step k, of epoch 2 step 6 + k
    assert f"at epoch {ckpt['state']['step'] // 6 + 1}/2, {k} steps into it (step {ckpt['state']['step']})" in \
        resumed.stdout.split("resumed from", 1)[1], resumed.stdout
    a, b = read_log(full / "train_log.jsonl"), read_log(crash / "train_log.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert a[step] == b[step], step      # bitwise: the floats are equal as written
    ca, cb = load_checkpoint(full / "last.pt"), load_checkpoint(crash / "last.pt")
    for wa, wb in ((ca["model"], cb["model"]), (ca["ema"]["module"], cb["ema"]["module"])):  # weights and average
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ca["ema"]["updates"] == cb["ema"]["updates"] == 12
    # the resumed epoch's printed loss covers the whole epoch: its sums before the crash were saved
    epoch_lines = [[l for l in p.stdout.splitlines() if l.startswith("epoch ") and ": train" in l]
                   for p in (straight, resumed)]
    assert epoch_lines[0] == epoch_lines[1] and len(epoch_lines[0]) == 2, epoch_lines


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=24, n_test=4)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_detector.py"), "--data", "demo", *TINY,
                             "--data-root", str(root), "--epochs", "50", "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "train_log.jsonl").exists()
                                          and (out / "train_log.jsonl").read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["state"]["step"] >= 3 and ckpt["state"]["epoch"] < 50
    e, k, step = ckpt["state"]["epoch"], ckpt["state"]["step_in_epoch"], ckpt["state"]["step"]
    assert step == e * 6 + k    # 24 images in batches of 4
    where = f"epoch {e + 1}/50, {k} steps into it" if k else f"the end of epoch {e}/50"
    assert f"stopped by signal {int(signal.SIGTERM)} at {where} (step {step})" in output, output


def test_nan_step_changes_nothing_and_repeated_nans_stop(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=12, n_test=4)
    cfg = train_detector.parse_args(["--data", "demo", *TINY, "--data-root", str(root), "--width", "0.0625"])
    from dataset import VOCDetection, collate_skip_none
    from demo_data import DEMO_CLASSES
    ds = VOCDetection(root, "2007-trainval", DEMO_CLASSES, 64, 7, train=True)
    loader = torch.utils.data.DataLoader(ds, 4, collate_fn=collate_skip_none)
    model = YOLOv1(YoloConfig(C=5, image_size=64, width=0.0625, batch_norm=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    real = YoloLoss(7, 2, 5)

    class NaNAt(torch.nn.Module):   # the loss of the second step is NaN
        calls = 0

        def forward(self, pred, target):
            terms = real(pred, target)
            NaNAt.calls += 1
            if NaNAt.calls == 2:
                terms["total"] = terms["total"] * float("nan")
            return terms

    forwards = []   # the full model state at the start of every forward pass
    model.register_forward_pre_hook(lambda m, a: forwards.append(
        {**{k: v.clone() for k, v in m.state_dict().items()},
         **{f"opt{i}": st["momentum_buffer"].clone() for i, st in enumerate(opt.state.values())}}))

    state = train_detector.new_state()
    stop = GracefulStop()
    try:
        train_detector.train_one_epoch(model, NaNAt(), opt, sched, scaler, loader, cfg, state, torch.device("cpu"),
                                       None, False, lambda name: None, 3, stop)
        assert state["skipped_steps"] == 1
        before_nan, after_nan = forwards[1], forwards[2]
        assert any(k.startswith("opt") for k in before_nan)
        for k, v in before_nan.items():   # weights, BatchNorm statistics, momentum: bit-identical
            assert torch.equal(v, after_nan[k]), k
        assert not torch.equal(forwards[0]["head.fc2.weight"], forwards[1]["head.fc2.weight"])  # good steps do move

        class AlwaysNaN(torch.nn.Module):
            def forward(self, pred, target):
                terms = real(pred, target)
                terms["total"] = terms["total"] * float("inf")
                return terms

        cfg.max_bad_steps = 2
        state.update(step_in_epoch=0, bad_steps=0)
        with pytest.raises(FloatingPointError, match="consecutive non-finite"):
            train_detector.train_one_epoch(model, AlwaysNaN(), opt, sched, scaler, loader, cfg, state,
                                           torch.device("cpu"), None, False, lambda name: None, 3, stop)
    finally:
        stop.restore()


def _one_epoch_setup(tmp_path, scaler_enabled=False):
    root = tiny_voc(tmp_path / "data", n_trainval=12, n_test=4)
    cfg = train_detector.parse_args(["--data", "demo", *TINY, "--data-root", str(root), "--width", "0.0625"])
    from dataset import VOCDetection
    from demo_data import DEMO_CLASSES
    ds = VOCDetection(root, "2007-trainval", DEMO_CLASSES, 64, 7, train=True)
    model = YOLOv1(YoloConfig(C=5, image_size=64, width=0.0625, batch_norm=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    state = train_detector.new_state()
    return cfg, ds, model, opt, sched, scaler, state


def test_batches_with_no_readable_image_still_count_as_steps(tmp_path):
    """A batch left empty by unreadable images (collate_skip_none gives None) changes no weight and
    leaves the weight average alone, but the step is counted and the LR schedule moves on, so that
    a resume lands where it should (and, under DDP, every process takes the same branch)."""
    from dataset import collate_skip_none
    from utils import ModelEMA
    cfg, ds, model, opt, sched, scaler, state = _one_epoch_setup(tmp_path)
    real = [collate_skip_none([ds[i] for i in range(j, j + 4)]) for j in (0, 4)]
    batches = [real[0], None, None, real[1]]          # what the loader yields: 2 batches of 4 lost entirely
    ema = ModelEMA(model, 0.9)
    weights = []
    model.register_forward_pre_hook(lambda m, a: weights.append(m.head.fc2.weight.detach().clone()))
    stop = GracefulStop()
    try:
        train_detector.train_one_epoch(model, YoloLoss(7, 2, 5), opt, sched, scaler, batches, cfg, state,
                                       torch.device("cpu"), None, False, lambda name: None, 4, stop, ema=ema)
    finally:
        stop.restore()
    assert state["step"] == state["step_in_epoch"] == 4 and sched.last_epoch == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
    assert state["skipped_images"] == 8 and state["skipped_steps"] == 0 and state["bad_steps"] == 0
    assert ema.updates == 2                            # only the two real steps
    assert len(weights) == 2 and not torch.equal(weights[0], weights[1])


def test_fp16_overflow_step_is_skipped_without_touching_the_weight_average(tmp_path):
    """With a GradScaler (fp16), a finite loss whose gradients overflow is the scaler's routine: not
    a bad step, no weight change, the scale halves, and the weight average is not updated."""
    from utils import ModelEMA
    from dataset import collate_skip_none
    torch.manual_seed(0)
    cfg, ds, model, opt, sched, scaler, state = _one_epoch_setup(tmp_path, scaler_enabled=True)
    batches = [collate_skip_none([ds[i] for i in range(j, j + 4)]) for j in (0, 4, 8)]
    real = YoloLoss(7, 2, 5)

    class OverflowAt(torch.nn.Module):   # the second step: a finite loss, gradients past float32's range
        calls = 0

        def forward(self, pred, target):
            terms = real(pred, target)
            OverflowAt.calls += 1
            if OverflowAt.calls == 2:
                terms["total"] = terms["total"] * 1e34   # finite; x the scale (65536) it is not
            return terms

    ema = ModelEMA(model, 0.9)
    weights = []
    model.register_forward_pre_hook(lambda m, a: weights.append(m.head.fc2.weight.detach().clone()))
    scale0 = scaler.get_scale()
    stop = GracefulStop()
    try:
        train_detector.train_one_epoch(model, OverflowAt(), opt, sched, scaler, batches, cfg, state,
                                       torch.device("cpu"), None, False, lambda name: None, 3, stop, ema=ema)
    finally:
        stop.restore()
    assert state["skipped_steps"] == 0 and state["step"] == 3        # not counted as a bad step
    assert scaler.get_scale() == scale0 / 2
    assert torch.equal(weights[1], weights[2]) and not torch.equal(weights[0], weights[1])
    assert ema.updates == 2


def test_resume_with_fp16_from_a_checkpoint_saved_without_a_scaler(tmp_path, monkeypatch):
    """A checkpoint from a run without fp16 (CPU, bf16 GPU) holds an empty GradScaler state; resuming
    it where autocast must use fp16 (a GPU without bf16) starts a fresh scaler instead of failing."""
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    out = tmp_path / "run"
    run(["--data-root", str(root), "--epochs", "1", "--out-dir", str(out), "--amp"])
    assert load_checkpoint(out / "last.pt")["scaler"] == {}
    monkeypatch.setattr(train_detector, "autocast_dtype", lambda device: torch.float16)
    monkeypatch.setattr(train_detector, "cpu_has_native_bf16", lambda: True)
    run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--amp", "--resume", "auto"])
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["state"]["epoch"] == 2 and ckpt["scaler"]["scale"] > 0      # trained on with a live scaler


def test_resume_refuses_incompatible_config(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    out = tmp_path / "run"
    run(["--data-root", str(root), "--epochs", "1", "--out-dir", str(out)])
    with pytest.raises(ValueError, match=r"last\.pt: resuming with other training flags would not continue the run: "
                                         r"--width: width=0\.125 \(the run's: 0\.0625\)"):
        run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--resume", "auto", "--width", "0.125"])
    with pytest.raises(ValueError, match=r"-S: S=5 \(the run's: 7\)"):
        run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--resume", "auto", "-S", "5"])
    with pytest.raises(ValueError, match=r"--head-stride: head_stride=2 \(the run's: 1\)"):
        run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--resume", "auto", "--head-stride", "2"])
    # the optimizer state and the step count fit only the same optimizer and global batch
    with pytest.raises(ValueError, match=r"--optimizer: optimizer=sgd \(the run's: adam\)"):
        run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--resume", "auto", "--optimizer", "sgd"])
    with pytest.raises(ValueError, match=r"--batch-size: batch_size=2 \(the run's: 4\)"):
        run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--resume", "auto", "--batch-size", "2"])


def test_resume_continues_with_the_runs_own_flags_and_never_overwrites_a_run(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    data = ["--data-root", str(root), "--deterministic"]
    own = ["--lr", "5e-4", "--warmup-epochs", "0", "--seed", "4"]      # not the recipe's values
    run([*data, *own, "--epochs", "2", "--out-dir", str(tmp_path / "straight")])
    out = tmp_path / "run"
    run([*data, *own, "--epochs", "1", "--out-dir", str(out)])
    before = (out / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"run holds a run \(last.pt, best.pt\), which a fresh run would overwrite: "
                                         "continue it with --resume auto"):
        run([*data, "--epochs", "1", "--out-dir", str(out)])
    with pytest.raises(ValueError, match="last.pt has trained 1 epochs already: nothing to do at --epochs 1"):
        run([*data, "--epochs", "1", "--out-dir", str(out), "--resume", "auto"])
    assert (out / "last.pt").read_bytes() == before
    # what the SIGTERM message says to run: the run's own LR, warm-up and seed, not the recipe's
    run([*data, "--epochs", "2", "--out-dir", str(out), "--resume", "auto"])
    assert {k: v for k, v in json.loads((out / "config.json").read_text())["train"].items()
            if k in ("lr", "warmup_epochs", "seed")} == {"lr": 5e-4, "warmup_epochs": 0, "seed": 4}
    resumed, straight = load_checkpoint(out / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())     # the same run
    # nothing but where the run is: its epochs, data folder, sizes and workers too, not the recipe's
    with pytest.raises(ValueError, match="last.pt has trained 2 epochs already: nothing to do at --epochs 2"):
        train_detector.main(["--resume", "auto", "--out-dir", str(out)])
    train_detector.main(["--resume", "auto", "--out-dir", str(out), "--epochs", "3"])
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["data_root"], saved["image_size"], saved["width"], saved["workers"]) == (str(root), 64, 0.0625, 0)
    # a folder with best.pt but no last.pt: --resume auto has nothing to resume and must not start over it
    (out / "last.pt").unlink()
    with pytest.raises(ValueError, match=r"holds a run \(best.pt\)"):
        run([*data, "--epochs", "3", "--out-dir", str(out), "--resume", "auto"])


def test_a_run_folder_is_held_by_one_run_at_a_time_and_freed_when_it_is_killed(tmp_path):
    from utils import RunFolder
    holder = f"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from utils import RunFolder
held = RunFolder(Path({str(tmp_path / "r")!r}))
child = os.fork()
if child == 0:       # a loader worker: it inherits the lock file's descriptor and outlives its parent
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(ValueError, match=rf"--out-dir .*r is in use by another run \(process {proc.pid}\)"):
            RunFolder(tmp_path / "r", tmp_path / "r" / "last.pt")
        assert RunFolder.taken(tmp_path / "r")                   # a default run folder skips it
        proc.kill()
        proc.wait()
        assert not RunFolder.taken(tmp_path / "r") and not RunFolder.taken(tmp_path / "new")
        RunFolder(tmp_path / "r", tmp_path / "r" / "last.pt").release()      # free at once, though the worker lives on
    finally:
        proc.kill()
        os.kill(child, signal.SIGKILL)
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    with pytest.MonkeyPatch.context() as m:                            # a network file system without locks
        m.setattr(fcntl, "lockf", no_locks)
        with pytest.warns(UserWarning, match=r"cannot lock it \(No locks available\); a second run"):
            RunFolder(tmp_path / "r", tmp_path / "r" / "last.pt").release()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "best.pt").write_bytes(b"")                      # best.pt alone: nothing to --resume auto
    assert RunFolder.taken(tmp_path / "b")
    with pytest.raises(ValueError, match=r"holds a run \(best.pt\), which a fresh run would overwrite: there is no "
                                         r"last.pt to resume; continue from the best epoch with --resume .*best.pt"):
        RunFolder(tmp_path / "b")
    (tmp_path / "b" / "last.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"b holds last.pt, which continuing best.pt there would overwrite"):
        RunFolder(tmp_path / "b", tmp_path / "b" / "best.pt")           # best.pt, with a last.pt maybe epochs ahead
    RunFolder(tmp_path / "b", tmp_path / "b" / "last.pt").release()    # --resume auto
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=r"b holds another run \(last.pt, best.pt\) than .*c/last.pt"):
        RunFolder(tmp_path / "b", tmp_path / "c" / "last.pt")           # --resume c/last.pt --out-dir b
    RunFolder(tmp_path / "c", tmp_path / "b" / "best.pt").release()    # continued in a folder of its own
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(ValueError, match=r"mine holds files and no run \(e.g. config.json\): give a new or empty"):
        RunFolder(tmp_path / "mine")
    assert (tmp_path / "mine" / "config.json").read_text() == '{"my": "settings"}'
    assert RunFolder.taken(tmp_path / "mine")                          # a default run folder skips it too
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() != 0:                                              # root writes anywhere
        with pytest.raises(OSError, match=r"--out-dir .*ro/run: cannot write there"):
            RunFolder(tmp_path / "ro" / "run")


def test_resumed_run_keeps_its_evaluation_history(tmp_path):
    """metrics.json lists every evaluation of the run, those before a resume included."""
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    split = tmp_path / "split"
    run(["--data-root", str(root), "--epochs", "1", "--out-dir", str(split)])
    half = load_checkpoint(split / "last.pt")
    assert half["state"]["history"] == [{"epoch": 1, "map": half["state"]["history"][0]["map"]}]
    run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(split), "--resume", "auto"])
    metrics = json.loads((split / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][0] == half["state"]["history"][0]
    assert load_checkpoint(split / "last.pt")["state"]["epoch_meter"]["images"] == 0   # reset for the next epoch


def test_resume_at_an_epochs_end_from_a_checkpoint_without_its_sums(tmp_path):
    """A checkpoint of older code (no epoch_meter) saved after an epoch's last step: the steps it did
    trained, so the epoch is not taken for one in which no step ran."""
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)     # 2 steps of 4 per epoch
    out = tmp_path / "run"
    run(["--data-root", str(root), "--epochs", "1", "--out-dir", str(out)])
    ckpt = load_checkpoint(out / "last.pt")
    del ckpt["state"]["epoch_meter"]
    ckpt["state"].update(epoch=0, step_in_epoch=2)                 # epoch 1's 2 steps done, not yet closed
    save_checkpoint(ckpt, out / "last.pt")
    res = run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--resume", "auto"])
    state = load_checkpoint(out / "last.pt")["state"]
    assert (state["epoch"], state["step"]) == (2, 4) and res["final_map"] is not None


def test_max_det_0_keeps_every_detection(tmp_path):
    from utils import decode_predictions
    torch.manual_seed(0)
    out, sizes = torch.rand(2, 7, 7, 30), torch.tensor([[100, 120], [90, 80]])
    every = decode_predictions(out, 2, 20, sizes, 0.001, 0.5, max_det=7 * 7 * 2 * 20)
    zero = decode_predictions(out, 2, 20, sizes, 0.001, 0.5, max_det=0)
    assert min(len(r["scores"]) for r in every) > 300
    for a, b in zip(every, zero):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [len(r["scores"]) for r in decode_predictions(out, 2, 20, sizes, 0.001, 0.5, max_det=5)] == [5, 5]


def test_help_states_each_default_once():
    import argparse
    p = argparse.ArgumentParser(formatter_class=train_detector.HelpFormatter)
    p.add_argument("--no-rescore", dest="rescore", action="store_false", help="confidence target 1")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: from the --data recipe)")
    p.add_argument("--nms-iou", type=float, default=0.5, help="NMS IoU threshold")
    p.add_argument("--seed", type=int, default=0, help="random seed")    # 0 == False: still shown
    out = p.format_help()
    assert "(default: True)" not in out and "(default: None)" not in out
    assert "(default: 0.5)" in out and "random seed (default: 0)" in out and out.count("(default:") == 3


def test_checkpoint_from_before_head_stride_resumes_as_stride_2(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    out = tmp_path / "run"
    run(["--data-root", str(root), "--epochs", "1", "--out-dir", str(out), "--head-stride", "2"])
    ckpt = load_checkpoint(out / "last.pt")
    del ckpt["model_config"]["head_stride"], ckpt["config"]["head_stride"]     # as saved before the field existed
    save_checkpoint(ckpt, out / "last.pt")
    with pytest.raises(ValueError, match="head_stride: 2 in .*, 1 now"):   # the demo recipe's stride is 1
        run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--resume", "auto"])
    result = run(["--data-root", str(root), "--epochs", "2", "--out-dir", str(out), "--resume", "auto",
                  "--head-stride", "2"])
    assert load_checkpoint(out / "last.pt")["state"]["epoch"] == 2 and result["final_map"] is not None


def test_malicious_checkpoint_is_refused_and_code_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt.*weights_only"):
        load_checkpoint(path)
    assert not marker.exists()


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"a": torch.ones(2)}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_weight_average_is_evaluated_saved_and_loaded(tmp_path):
    from evaluate import load_model
    root = tiny_voc(tmp_path / "data", n_trainval=12, n_test=6)
    out = tmp_path / "run"
    res = run(["--data-root", str(root), "--epochs", "2", "--ema-decay", "0.9", "--out-dir", str(out)])
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["ema"]["updates"] == 2 * 3 and ckpt["ema"]["decay"] == 0.9
    model, cfg, _ = load_model(out / "last.pt")
    ema_w, raw_w = ckpt["ema"]["module"], ckpt["model"]
    assert all(torch.equal(v, ema_w[k]) for k, v in model.state_dict().items())       # the average is loaded
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in raw_w)                  # and it is not the raw weights
    # the mAP the run reported (trained under --amp, the demo default) is the average's, in float32:
    # evaluate.py with its default flags reports the same number for the checkpoint
    import evaluate
    again = evaluate.main(["--checkpoint", str(out / "last.pt"), "--data", "demo", "--data-root", str(root),
                           "--device", "cpu", "--batch-size", "4"])
    from utils import cpu_has_native_bf16
    assert json.loads((out / "config.json").read_text())["train"]["amp"] is cpu_has_native_bf16()
    assert again["map"] == pytest.approx(res["final_map"], abs=1e-9)
    # --ema-decay 0: no average, the raw weights are the model
    run(["--data-root", str(root), "--epochs", "1", "--ema-decay", "0", "--out-dir", str(tmp_path / "plain")])
    plain = load_checkpoint(tmp_path / "plain" / "last.pt")
    assert plain["ema"] is None
    model, _, _ = load_model(tmp_path / "plain" / "last.pt")
    assert all(torch.equal(v, plain["model"][k]) for k, v in model.state_dict().items())


def test_amp_falls_back_to_float32_on_a_cpu_without_bf16(tmp_path, monkeypatch, capsys):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    monkeypatch.setattr(train_detector, "cpu_has_native_bf16", lambda: False)
    run(["--data-root", str(root), "--epochs", "1", "--amp", "--out-dir", str(tmp_path / "run")])
    assert "no bf16 hardware" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["amp"] is False
    cfg = train_detector.parse_args(["--data", "demo", "--no-amp"])
    assert cfg.amp is False and train_detector.parse_args(["--data", "voc"]).amp is False


def test_augmentation_strength_and_memory_format_come_from_the_recipe(tmp_path, monkeypatch):
    voc, demo = train_detector.parse_args(["--data", "voc"]), train_detector.parse_args(["--data", "demo"])
    assert (voc.jitter, voc.hsv, voc.channels_last) == (0.2, 1.5, False)        # the paper's augmentation
    assert (demo.jitter, demo.hsv, demo.channels_last) == (0.1, 1.25, True)
    mine = train_detector.parse_args(["--data", "demo", "--jitter", "0.3", "--hsv", "2", "--no-channels-last"])
    assert (mine.jitter, mine.hsv, mine.channels_last) == (0.3, 2.0, False)
    for bad in (["--jitter", "1.5"], ["--jitter", "-0.1"], ["--hsv", "0.5"]):
        with pytest.raises(SystemExit):
            train_detector.parse_args(["--data", "demo", *bad])
    # ... and the training set is built with them
    seen = []

    class Recording(train_detector.VOCDetection):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append((self.train, self.jitter, self.hsv))
    monkeypatch.setattr(train_detector, "VOCDetection", Recording)
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    run(["--data-root", str(root), "--epochs", "1", "--jitter", "0.05", "--hsv", "1.1", "--out-dir", str(tmp_path / "r")])
    assert (True, 0.05, 1.1) in seen


def test_lr_schedules_warm_up_then_step_or_decay_to_zero():
    voc = train_detector.parse_args(["--data", "voc"])
    assert voc.lr_schedule == "step" and voc.lr_steps == "75,105"                   # the paper's
    f = train_detector.lr_factor
    assert f(0, voc) == pytest.approx(0.1) and f(2.5, voc) == pytest.approx(0.55)  # 1e-3 -> 1e-2 over 5 epochs
    assert (f(5, voc), f(74.9, voc), f(75, voc), f(105, voc), f(134.9, voc)) == pytest.approx((1, 1, 0.1, 0.01, 0.01))
    # decays: from 1 at the end of warm-up (epoch 5) to 0 at epoch 135, e.g. a quarter of the way at 37.5
    lin = train_detector.parse_args(["--data", "voc", "--lr-schedule", "linear"])
    cos = train_detector.parse_args(["--data", "voc", "--lr-schedule", "cosine"])
    for epoch, linear, cosine in ((5, 1.0, 1.0), (37.5, 0.75, (1 + 2 ** -0.5) / 2), (70, 0.5, 0.5), (135, 0.0, 0.0)):
        assert f(epoch, lin) == pytest.approx(linear, abs=1e-12) and f(epoch, cos) == pytest.approx(cosine, abs=1e-12)
    assert f(2.5, lin) == f(2.5, cos) == f(2.5, voc)                                   # same warm-up
    with pytest.raises(SystemExit):
        train_detector.parse_args(["--data", "demo", "--lr-schedule", "exp"])


@pytest.mark.parametrize("flags, message", [
    (["--conf-threshold", "2"], "--conf-threshold and --nms-iou must be in [0, 1]"),
    (["--nms-iou", "5"], "--conf-threshold and --nms-iou must be in [0, 1]"),
    (["--workers", "-5"], "--workers, --max-det and --save-every-steps must be >= 0"),
    (["--max-det", "-1"], "--workers, --max-det and --save-every-steps must be >= 0"),
    (["--eval-interval", "-1"], "--eval-interval, --log-interval and --max-bad-steps >= 1"),
    (["--image-size", "65"], "image_size must be a multiple of 32"),
    (["--width", "-1"], "width must be in"),
])
def test_bad_flag_values_stop_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_detector.parse_args(["--data", "demo", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_device_is_named():
    from utils import parse_device
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        parse_device("gpu")
    with pytest.raises(ValueError, match="got 'meta'"):
        parse_device("meta")
    assert parse_device("cpu") == torch.device("cpu")


def test_a_training_step_reads_nothing_back_and_the_loop_reads_it_one_step_late(tmp_path, monkeypatch):
    """train_step leaves the finite check, the optimizer's skip, the BatchNorm restore and the weight
    average's update on the device: no ``.item()``, ``.tolist()`` or ``bool(tensor)`` within a step
    (each would make the host wait for the GPU). The loop reads a step's record only after queueing
    the next one; the numbers it logs are still each step's own."""
    from dataset import collate_skip_none
    from utils import ModelEMA, make_optimizer
    cfg, ds, model, _, sched, scaler, state = _one_epoch_setup(tmp_path)
    opt = make_optimizer(model, "adam", 1e-3, 0.9, 5e-4, torch.device("cpu"))     # fused, as in training
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ema = ModelEMA(model, 0.9)
    batches = [collate_skip_none([ds[i] for i in range(j, j + 4)]) for j in (0, 4, 8)]
    reads = []
    events = []

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *a, **k):
            if events and events[-1] == "in step":
                reads.append(name)
            return original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, guarded)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):   # (.numpy() refuses CUDA tensors)
        forbid(name)
    real_step = train_detector.train_step

    def watched(*a, **k):
        events.append("in step")
        try:
            record, stepped = real_step(*a, **k)
            ema.update(stepped)
            return record, stepped
        finally:
            events.append(f"out {len(events)}")
    monkeypatch.setattr(train_detector, "train_step", watched)
    start = copy.deepcopy(model)
    log = tmp_path / "log.jsonl"
    stop = GracefulStop()
    torch.manual_seed(5)                    # the dropout masks, drawn again below
    try:
        with log.open("w") as f:
            train_detector.train_one_epoch(model, YoloLoss(7, 2, 5), opt, sched, scaler, batches, cfg, state,
                                           torch.device("cpu"), None, True, lambda name: None, 3, stop, log_file=f)
    finally:
        stop.restore()
    assert len(events) == 6 and reads == []
    assert ema.updates == 3 and state["step"] == 3 and state["skipped_steps"] == 0
    # each logged line holds its own step's numbers: step 1's loss recomputed from the starting weights
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [1, 2, 3]
    images, target, info = batches[0]
    torch.manual_seed(5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp):
        out = start.train()(color_normalize(images, info[:, 3], info[:, 4]))
    first = YoloLoss(7, 2, 5)(out.float(), target)
    assert lines[0]["total"] == pytest.approx(first["total"].item(), rel=1e-6)
    assert lines[1]["total"] != lines[0]["total"]


def test_the_papers_recipe_and_loss_weights_reach_the_run(tmp_path, monkeypatch):
    """The paper's numbers (Sec. 2.2) as --data voc's defaults, and the loss weights the run builds its
    loss with: lambda_coord 5, lambda_noobj 0.5 unless given."""
    cfg = train_detector.parse_args(["--data", "voc"])
    assert (cfg.lambda_coord, cfg.lambda_noobj, cfg.dropout, cfg.epochs, cfg.batch_size, cfg.momentum,
            cfg.weight_decay, cfg.lr_steps, cfg.lr_gamma, cfg.image_size, cfg.S, cfg.B) == \
        (5.0, 0.5, 0.5, 135, 64, 0.9, 5e-4, "75,105", 0.1, 448, 7, 2)
    built = []

    class Recorded(train_detector.YoloLoss):
        def __init__(self, S, B, C, lambda_coord, lambda_noobj, rescore):
            built.append((S, B, C, lambda_coord, lambda_noobj))
            super().__init__(S, B, C, lambda_coord, lambda_noobj, rescore)

    monkeypatch.setattr(train_detector, "YoloLoss", Recorded)
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    run(["--data-root", str(root), "--epochs", "1", "--out-dir", str(tmp_path / "a")])
    run(["--data-root", str(root), "--epochs", "1", "--out-dir", str(tmp_path / "b"), "--lambda-coord", "2",
         "--lambda-noobj", "0.25"])
    assert built == [(7, 2, 5, 5.0, 0.5), (7, 2, 5, 2.0, 0.25)]
