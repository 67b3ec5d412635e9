"""Checkpoints that are not what a script expects: one ValueError naming the file and the problem."""
import pytest
import torch

import evaluate
import pretrainer
import train_detector
from helpers import TINY, tiny_voc
from utils import SCRIPT_KEYS, load_checkpoint, save_checkpoint


def test_folder_and_empty_file_are_named_as_such(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt is an empty file \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pt")


def test_the_other_scripts_checkpoint_is_named(tmp_path):
    cls = tmp_path / "cls.pt"
    save_checkpoint({k: {} for k in SCRIPT_KEYS["pretrainer.py"]}, cls)
    with pytest.raises(ValueError, match="cls.pt is a pretrainer.py checkpoint, not a train_detector.py one; "
                                         "use it with train_detector.py --backbone"):
        evaluate.load_model(cls)
    det = tmp_path / "det.pt"
    save_checkpoint({k: {} for k in SCRIPT_KEYS["train_detector.py"]}, det)
    with pytest.raises(ValueError, match="det.pt is a train_detector.py checkpoint, not a pretrainer.py one"):
        pretrainer.main(["--data", "demo", "--evaluate", str(det), "--device", "cpu", "--workers", "0"])


def test_resume_with_weights_of_the_wrong_shape_names_the_file(tmp_path):
    root = tiny_voc(tmp_path / "data", n_trainval=8, n_test=4)
    out = tmp_path / "run"
    args = ["--data", "demo", *TINY, "--data-root", str(root), "--out-dir", str(out)]
    train_detector.main([*args, "--epochs", "1"])
    ckpt = load_checkpoint(out / "last.pt")
    key = "head.fc2.bias"
    ckpt["model"][key] = torch.zeros(ckpt["model"][key].numel() + 1)
    save_checkpoint(ckpt, out / "last.pt")
    with pytest.raises(ValueError, match=rf"last.pt: its model weights do not fit this model:\n  .*{key}"):
        train_detector.main([*args, "--epochs", "2", "--resume", "auto"])


def test_output_paths_that_cannot_be_written_are_refused_first(tmp_path, capsys):
    import detect
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--out-dir .*f.txt is a file, not a folder"):
        detect.claim_out_dir(str(a_file), "x")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--bench", "--json", str(tmp_path)])
    assert "is a folder; give a file name" in capsys.readouterr().err
    for flags, message in ((["--json", str(a_file / "o.json")], "f.txt is a file, not a folder"),
                           (["--json", str(a_file / "deep" / "o.json")], "f.txt is a file, not a folder"),
                           (["--save-results", str(a_file)], "f.txt is a file, not a folder"),
                           (["--save-results", str(a_file / "sub")], "f.txt is a file, not a folder")):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--checkpoint", "x.pt", *flags])
        assert message in capsys.readouterr().err, flags
    evaluate.parse_args(["--checkpoint", "x.pt", "--json", str(tmp_path / "new" / "o.json"),
                         "--save-results", str(tmp_path / "results")])   # can be created: accepted


def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "export.py"), "--checkpoint", str(tmp_path / "missing.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"export.py: error: checkpoint {tmp_path / 'missing.pt'} does not exist"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "YOLO_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "does not exist" in proc.stderr
