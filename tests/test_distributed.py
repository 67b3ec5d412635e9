"""torchrun with 2 CPU processes (gloo): training runs, and evaluation over shards equals one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import evaluate
from helpers import TINY, tiny_voc

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cmd = [exe, "--standalone", f"--nproc-per-node={nproc}", str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_train_detector_under_torchrun_matches_single_process_eval(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=16, n_test=7)    # 7 val images: shards of 4 and 3
    out = tmp_path / "run"
    torchrun("train_detector.py", ["--data", "demo", *TINY, "--data-root", str(root), "--epochs", "2",
                                   "--batch-size", "8", "--out-dir", str(out), "--conf-threshold", "0.0"])
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]             # 16 images / global batch 8 = 2 steps per epoch
    single = evaluate.main(["--checkpoint", str(out / "last.pt"), "--data", "demo", "--data-root", str(root),
                            "--set", "2007-test", "--device", "cpu", "--workers", "0", "--conf-threshold", "0.0",
                            "--no-progress"])
    assert single["map"] == metrics["final_map"]
    assert single["metric"] == metrics["metric"]


def test_resume_under_torchrun_restores_each_process_rng(tmp_path):
    """Each process draws its own dropout masks (seeded seed + rank). A checkpoint keeps every
    process's RNG state and a resume gives each its own back, so 1 epoch + resume to 2 ends with the
    same weights, bit for bit, as 2 epochs straight (with one shared state it would not). The split
    run also evaluates after epoch 1 (its last) and the straight one does not: the validation loader
    has its own generator, so evaluating draws nothing from the RNG that dropout uses."""
    import torch

    from utils import load_checkpoint
    root = tiny_voc(tmp_path / "data", n_trainval=16, n_test=4)
    common = ["--data", "demo", *TINY, "--data-root", str(root), "--batch-size", "8", "--dropout", "0.5",
              "--deterministic", "--eval-interval", "100"]
    torchrun("train_detector.py", [*common, "--epochs", "2", "--out-dir", str(tmp_path / "full")])
    torchrun("train_detector.py", [*common, "--epochs", "1", "--out-dir", str(tmp_path / "split")])
    first = load_checkpoint(tmp_path / "split" / "last.pt")
    assert len(first["rng_ranks"]) == 2
    assert not torch.equal(first["rng_ranks"][0]["torch"], first["rng_ranks"][1]["torch"])
    torchrun("train_detector.py", [*common, "--epochs", "2", "--out-dir", str(tmp_path / "split"), "--resume", "auto"])
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["state"]["step"] == b["state"]["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_evaluation_with_an_empty_validation_shard_and_no_weight_average(tmp_path):
    """One validation image for two processes: rank 1's shard is empty. Without a weight average the
    trained model itself is evaluated; through the DDP wrapper its forward would broadcast the
    BatchNorm buffers, a collective that rank 1 never joins (the run hung). It is evaluated as the
    plain module, with rank 0's statistics, and its mAP equals evaluate.py's in one process."""
    root = tiny_voc(tmp_path / "data", n_trainval=16, n_test=1)
    out = tmp_path / "run"
    torchrun("train_detector.py", ["--data", "demo", *TINY, "--data-root", str(root), "--epochs", "1",
                                   "--batch-size", "8", "--batch-norm", "--ema-decay", "0", "--out-dir", str(out),
                                   "--conf-threshold", "0.0"])
    metrics = json.loads((out / "metrics.json").read_text())
    single = evaluate.main(["--checkpoint", str(out / "last.pt"), "--data", "demo", "--data-root", str(root),
                            "--set", "2007-test", "--device", "cpu", "--workers", "0", "--conf-threshold", "0.0",
                            "--no-progress"])
    assert single["map"] == metrics["final_map"]
