import math

import torch

from utils import ModelEMA


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
