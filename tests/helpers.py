"""Shared test helpers: a tiny demo VOC tree and tiny training flags."""
from pathlib import Path

from demo_data import make_demo_voc

TINY = ["--width", "0.0625", "--image-size", "64", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--eval-interval", "1", "--log-interval", "1"]


def tiny_voc(root: Path, n_trainval: int = 12, n_test: int = 6) -> Path:
    return make_demo_voc(root, n_trainval=n_trainval, n_test=n_test, seed=0)
