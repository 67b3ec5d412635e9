import math
from pathlib import Path

import pytest
import torch

from model import YoloConfig, YOLOv1
from utils import ModelEMA, keeps_narrow_stem_nchw, to_channels_last


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
    assert to_channels_last(model, min_channels=16) is model
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
    wide = to_channels_last(YOLOv1(YoloConfig(C=5, image_size=64, width=0.25, fc_dim=256)), min_channels=16)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in wide.modules()
               if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("amx", [True, False])
def test_to_channels_last_keeps_the_narrow_stem_nchw_on_a_cpu_only_with_amx(monkeypatch, amx):
    """The default layout follows keeps_narrow_stem_nchw: the 8-filter stem NCHW on a CPU with AMX,
    channels_last everywhere on one without (where the NCHW 7x7 stem conv is the slow part)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert keeps_narrow_stem_nchw(torch.device("cpu")) is amx
    assert keeps_narrow_stem_nchw(torch.device("cuda")) is True
    model = to_channels_last(YOLOv1(YoloConfig(C=5, image_size=64, width=0.0625, batch_norm=True, fc_dim=1024)))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].weight.is_contiguous() is amx
    assert convs[0].weight.is_contiguous(memory_format=torch.channels_last) is not amx
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs[1:])


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


# --- the update decided on the device (utils.step_if_finite) ---------------------------------------

def _net_and_optimizer(name: str, seed: int = 0):
    from utils import make_optimizer
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = make_optimizer(net, name, lr=0.05, momentum=0.9, weight_decay=1e-3, device=torch.device("cpu"))
    return net, opt


def _loss(net, x, scale: float = 1.0):
    return net(x).square().mean() * scale


def _state(net, opt):
    return {**{k: v.clone() for k, v in net.state_dict().items()},
            **{f"{i}.{k}": v.clone() for i, st in enumerate(opt.state.values()) for k, v in st.items()}}


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_step_if_finite_matches_a_plain_step_and_a_bad_step_changes_nothing(name):
    """The fused optimizers (what make_optimizer builds) skip on the device: a finite step is the
    plain ``optimizer.step()`` bit for bit; a NaN loss (first step, then later) leaves weights,
    moments and step counts alone, and training goes on as if the bad step never came."""
    from utils import step_if_finite
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    net, opt = _net_and_optimizer(name)
    ref, ref_opt = _net_and_optimizer(name)
    assert getattr(opt, "_step_supports_amp_scaling", False)           # fused: the device-side path

    start = _state(net, opt)
    loss = _loss(net, x1, float("nan"))
    loss.backward()
    gnorm, finite, stepped = step_if_finite(opt, scaler, loss, list(net.parameters()))
    assert not finite and not stepped and gnorm.isnan()
    after = _state(net, opt)
    for k, v in start.items():                         # a skipped first step: nothing moved or filled
        assert torch.equal(v, after[k]), k
    for n, o, x in ((net, opt, x1), (ref, ref_opt, x1), (net, opt, x2), (ref, ref_opt, x2)):
        o.zero_grad(set_to_none=True)
        loss = _loss(n, x)
        loss.backward()
        if n is net:
            gnorm, finite, stepped = step_if_finite(o, scaler, loss, list(n.parameters()))
            assert finite and stepped
            expected = torch.cat([p.grad.flatten() for p in n.parameters()]).norm()
            torch.testing.assert_close(gnorm, expected)
        else:
            o.step()
    got, want = _state(net, opt), _state(ref, ref_opt)
    assert got.keys() == want.keys()
    for k, v in want.items():                          # bit for bit the plain optimizer's two steps
        assert torch.equal(got[k], v), k


def test_step_if_finite_clips_like_clip_grad_norm_and_counts_an_inf_gradient_as_bad():
    from utils import step_if_finite
    x = torch.randn(8, 6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    net, opt = _net_and_optimizer("sgd")
    ref, ref_opt = _net_and_optimizer("sgd")
    _loss(net, x, 100.0).backward()
    _loss(ref, x, 100.0).backward()
    gnorm, finite, stepped = step_if_finite(opt, scaler, _loss(net, x, 100.0), list(net.parameters()), clip_grad=0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    assert gnorm > 0.5 and torch.equal(gnorm, ref_norm)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a finite loss with an infinite gradient: a bad step without fp16
    opt.zero_grad()
    _loss(net, x).backward()
    next(net.parameters()).grad[0, 0] = float("inf")
    before = _state(net, opt)
    _, finite, stepped = step_if_finite(opt, scaler, _loss(net, x), list(net.parameters()))
    assert not finite and not stepped
    assert all(torch.equal(v, _state(net, opt)[k]) for k, v in before.items())


def test_a_plain_optimizer_takes_the_host_path():
    """An optimizer without GradScaler's found_inf protocol is stepped (or not) after one host read."""
    from utils import step_if_finite
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    w = net.weight.detach().clone()
    loss = net(torch.randn(3, 4)).sum() * float("inf")
    loss.backward()
    assert not step_if_finite(opt, scaler, loss, list(net.parameters()))[2]
    assert torch.equal(net.weight, w)
    opt.zero_grad()
    loss = net(torch.randn(3, 4)).sum()
    loss.backward()
    assert step_if_finite(opt, scaler, loss, list(net.parameters()))[2]
    assert not torch.equal(net.weight, w)


def test_model_ema_update_is_conditional_on_the_device():
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema, ref = ModelEMA(src, decay=0.9, ramp=4.0), ModelEMA(src, decay=0.9, ramp=4.0)
    for t, taken in enumerate([True, False, True, False, False, True]):
        with torch.no_grad():
            for p in src.parameters():
                p.add_(torch.randn_like(p))
            src[1].num_batches_tracked += 1
        before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        ema.update(torch.tensor(taken))
        if taken:
            ref.update()
        else:
            assert all(torch.equal(v, ema.module.state_dict()[k]) for k, v in before.items())
        assert ema.updates == ref.updates
    for k, v in ref.module.state_dict().items():       # the same as updating only after the steps taken
        assert torch.equal(v, ema.module.state_dict()[k]), k


def test_checkpoints_get_the_umask_permissions_and_cut_off_writes_are_cleared(tmp_path):
    import os
    import subprocess
    import sys
    from utils import partial_checkpoint_name, remove_partial_checkpoints, save_checkpoint
    old = os.umask(0o027)
    try:
        save_checkpoint({"a": torch.ones(1)}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o640    # mkstemp's own would be 0o600
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)                                        # a process that has ended
    stale = [partial_checkpoint_name(tmp_path / "last.pt", dead_pid),
             partial_checkpoint_name(tmp_path / "best.pt", dead_pid),
             tmp_path / ".last.pt.k2x9q1.tmp"]                         # as mkstemp named them before
    live = partial_checkpoint_name(tmp_path / "last.pt", os.getppid())  # a running process's save in progress
    for p in (*stale, live):
        p.write_bytes(b"partial")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert remove_partial_checkpoints(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", "notes.tmp", live.name])


def test_resume_on_another_process_count_gives_each_process_its_own_streams():
    """Per-process RNG states fit only the same process count; otherwise rank 0 continues rank 0's
    streams and the others reseed from them and their rank: no two processes draw the same."""
    from utils import restore_training_state, rng_state
    torch.manual_seed(5)
    saved = rng_state()
    expected = torch.rand(3)
    ckpt = {"scaler": None, "rng": saved, "rng_ranks": [saved, saved]}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    draws = []
    for rank in range(3):
        restore_training_state(ckpt, scaler, rank, world=3)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], expected)
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    restore_training_state(ckpt, scaler, 1, world=3)
    assert torch.equal(torch.rand(3), draws[1])          # deterministic for a given rank
    restore_training_state(ckpt, scaler, 1, world=2)     # the same count: the saved stream of rank 1
    assert torch.equal(torch.rand(3), expected)


def test_weight_average_state_that_does_not_fit_names_the_file():
    ema = ModelEMA(torch.nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="ckpt.pt: its 'ema' entry"):
        ema.load_state_dict({"updates": 3}, source="ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt: its weight-average weights do not fit"):
        ema.load_state_dict({"module": {"weight": torch.zeros(3, 3)}, "updates": 3}, source="ckpt.pt")


def test_color_normalize_wants_both_augmentation_factors_or_neither():
    from dataset import MEAN, STD, color_normalize
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="both exposure and saturation"):
        color_normalize(images, torch.ones(2), None, MEAN, STD)


def test_weights_cast_once_give_autocasts_outputs_bit_for_bit():
    """cast_for_autocast casts the conv and linear weights as autocast would on every call, and
    leaves BatchNorm in float32: under autocast the outputs are the same, bit for bit, in both
    memory formats."""
    import copy
    from utils import cast_for_autocast
    torch.manual_seed(0)
    model = YOLOv1(YoloConfig(C=5, image_size=64, width=0.0625, batch_norm=True, fc_dim=256)).eval()
    for m in model.modules():   # non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 64, 64)
    for convert in (lambda m: m, lambda m: to_channels_last(m, min_channels=0)):
        ref = convert(copy.deepcopy(model))
        cast = cast_for_autocast(convert(copy.deepcopy(model)), torch.bfloat16)
        assert cast.head.fc1.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for m in cast.modules() if isinstance(m, torch.nn.BatchNorm2d)
                   for p in (*m.parameters(), m.running_mean))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ref(x), cast(x))


def test_resume_restores_a_live_grad_scaler_and_leaves_a_fresh_one_for_an_empty_state():
    """fp16 runs (GPUs before Ampere) resume with the scaler's scale and growth count; a run saved without
    fp16 (its scaler's state empty) gives the resumed one a fresh scaler. A CPU scaler stands in."""
    from utils import restore_training_state, rng_state
    saved = {**torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7).state_dict(), "_growth_tracker": 3}
    ckpt = {"scaler": saved, "rng": rng_state()}
    scaler = torch.amp.GradScaler("cpu")
    restore_training_state(ckpt, scaler, 0, world=1)
    assert scaler.state_dict() == saved and scaler.get_scale() == 256.0
    fresh = torch.amp.GradScaler("cpu")
    restore_training_state({**ckpt, "scaler": {}}, fresh, 0, world=1)
    assert fresh.state_dict() == torch.amp.GradScaler("cpu").state_dict()


def test_decode_drops_a_score_on_the_threshold_and_keeps_one_above():
    """One box, score conf 0.5 x Pr(class 0) 0.5 = 0.25 exactly: dropped at threshold 0.25 (scores
    <= threshold go), kept just below it, where it lands in pixels as hand-computed."""
    from utils import decode_predictions
    B, C = 2, 2
    out = torch.zeros(1, 7, 7, 5 * B + C)
    out[0, 3, 3, :4] = torch.tensor([0.5, 0.5, 0.5, 0.5])    # box 0: centre of cell (3, 3), sqrt w = sqrt h = 0.5
    out[0, 3, 3, 4 * B] = 0.5                                 # its confidence
    out[0, 3, 3, 5 * B] = 0.5                                 # Pr(class 0 | object)
    sizes = torch.tensor([[100, 200]])                        # (height, width)
    assert len(decode_predictions(out, B, C, sizes, conf_threshold=0.25)[0]["scores"]) == 0
    kept = decode_predictions(out, B, C, sizes, conf_threshold=0.2499)[0]
    assert kept["scores"].tolist() == [0.25] and kept["labels"].tolist() == [0]
    # centre (0.5, 0.5) of the image, w = 0.25 * 200 px, h = 0.25 * 100 px
    assert torch.allclose(kept["boxes"], torch.tensor([[75.0, 37.5, 125.0, 62.5]]))
