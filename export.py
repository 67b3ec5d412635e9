"""Export a trained detector's network to ONNX, and check the export against PyTorch.

    python export.py --checkpoint runs/detector/demo/best.pt                  # -> runs/detector/demo/best.onnx
    python export.py --checkpoint best.pt --format onnx --output yolov1.onnx --opset 17

The raw network is exported, nothing around it: input ``images`` float32 ``(N, 3, H, W)`` with
H = W = the model's image_size, RGB already resized (whole image, aspect not kept) and
normalised as dataset.color_normalize does, ``(pixel / 255 - MEAN) / STD``; output
``predictions`` float32 ``(N, S, S, 5B + C)``, the layout of model.py's docstring. The batch
size N is dynamic. Decoding and NMS (utils.decode_predictions) are left to the user; the
README's export section spells them out. The class names, S, B, C, image size, MEAN and STD are
stored in the ONNX file's metadata_props.

The exporter is torch.onnx's TorchScript-based one (``dynamo=False``): the torch.export-based
default of PyTorch >= 2.9 needs the onnxscript package, which this project does not install.
After writing the file, the export is checked with onnxruntime (when installed) on random
inputs of batch size 1 and 3: every output must match PyTorch's within ``--atol`` + ``--rtol``
x |PyTorch's|. onnx and onnxruntime come from requirements-dev.txt and are imported only here.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from dataset import MEAN, STD
from model import YoloConfig, YOLOv1
from utils import finite_float, not_a_folder, run_cli

DEFAULT_OPSET = 17
OPSETS = range(7, 21)     # what torch.onnx's TorchScript-based exporter writes (its ONNX_MIN_OPSET to its maximum)
ATOL, RTOL = 1e-4, 1e-3   # float32 kernels of two runtimes differ in summation order, not more


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train_detector.py checkpoint (best.pt / last.pt)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--output", default="", help="output file (default: the checkpoint's path with .onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {OPSETS[0]} to {OPSETS[-1]} (default: {DEFAULT_OPSET})")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnxruntime comparison with PyTorch")
    p.add_argument("--atol", type=finite_float, default=ATOL, help=f"absolute tolerance of the check (default: {ATOL})")
    p.add_argument("--rtol", type=finite_float, default=RTOL, help=f"relative tolerance of the check (default: {RTOL})")
    args = p.parse_args(argv)
    if args.opset not in OPSETS:
        p.error(f"--opset must be in {OPSETS[0]}..{OPSETS[-1]} (torch.onnx's TorchScript exporter), got {args.opset}")
    if args.atol < 0 or args.rtol < 0:
        p.error(f"--atol and --rtol must be >= 0, got {args.atol} and {args.rtol}")
    return args


def load_detector(path: str | Path) -> tuple[YOLOv1, YoloConfig, list[str]]:
    """The detector of a train_detector.py checkpoint (via evaluate.load_model), in eval mode."""
    from evaluate import load_model
    model, cfg, ckpt = load_model(path)
    return model.eval(), cfg, [str(c) for c in ckpt["class_names"]]


def export_onnx(model: YOLOv1, path: str | Path, class_names: Sequence[str], opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (eval mode, on the CPU) to ``path`` as ONNX with a dynamic batch size,
    add the metadata of the module docstring, and validate the file with onnx.checker."""
    import onnx
    cfg: YoloConfig = model.cfg
    if len(class_names) != cfg.C:
        raise ValueError(f"{len(class_names)} class names for a model with C={cfg.C}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    dummy = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
    with warnings.catch_warnings():
        # The TorchScript-based exporter announces its own deprecation (twice); it is our choice, see above.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["predictions"], do_constant_folding=True,
                          dynamic_axes={"images": {0: "batch"}, "predictions": {0: "batch"}})
    proto = onnx.load(str(path))
    meta = {"class_names": json.dumps(list(class_names)), "S": str(cfg.S), "B": str(cfg.B), "C": str(cfg.C),
            "image_size": str(cfg.image_size), "mean": json.dumps(list(MEAN)), "std": json.dumps(list(STD)),
            "input": "images: float32 (N, 3, image_size, image_size), RGB, (pixel / 255 - mean) / std",
            "output": "predictions: float32 (N, S, S, 5B+C) per cell [B x (x, y, sqrt_w, sqrt_h), B x confidence, "
                      "C x class probability]; see yolov1-torch model.py"}
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


@torch.no_grad()
def compare_onnx(path: str | Path, model: torch.nn.Module, inputs: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Run float32 ``inputs (N, 3, H, W)`` through the ONNX file (onnxruntime, CPU) and through
    ``model`` (eval mode, CPU); returns both outputs as numpy arrays."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(["predictions"], {"images": inputs.float().cpu().numpy()})[0]
    ref = model.cpu().eval()(inputs.float().cpu()).numpy()
    return ours, ref


def check_export(path: str | Path, model: torch.nn.Module, inputs: Tensor, atol: float = ATOL,
                 rtol: float = RTOL) -> float:
    """:func:`compare_onnx`, then ``AssertionError`` with the worst element unless every output is
    within ``atol + rtol * |torch|``; returns the largest absolute difference."""
    ours, ref = compare_onnx(path, model, inputs)
    if ours.shape != ref.shape:
        raise AssertionError(f"{path}: ONNX output shape {ours.shape} != PyTorch's {ref.shape}")
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    excess = diff - (atol + rtol * np.abs(ref))
    if (excess > 0).any() or not np.isfinite(ours).all():
        bad = ~np.isfinite(ours)   # a NaN or inf of ONNX's is the element to name, whatever the others do
        worst = np.unravel_index(np.argmax(bad) if bad.any() else np.nanargmax(excess), excess.shape)
        raise AssertionError(f"{path}: ONNX output differs from PyTorch's at {tuple(int(i) for i in worst)}: "
                             f"{ours[worst]} vs {ref[worst]} (atol {atol}, rtol {rtol})")
    return float(diff.max())


def main(argv: list[str] | None = None) -> dict:
    """Run the command line; returns ``{"output", "opset", "max_abs_diff" (None when not checked)}``."""
    args = parse_args(argv)
    output = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".onnx")
    if output.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--output {output} is the checkpoint itself: refusing to overwrite it")
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name such as {output / 'model.onnx'}")
    if output.exists() and output.suffix.lower() != ".onnx":   # a checkpoint, say: only an earlier export is replaced
        raise ValueError(f"--output {output} exists and is not an .onnx file: refusing to overwrite it")
    blocker = not_a_folder(output.parent)
    if blocker:
        raise ValueError(f"--output {output}: {blocker} is a file, so no folder can be made there")
    model, cfg, class_names = load_detector(args.checkpoint)
    # Written beside the output and renamed over it only once exported (and checked): a failed
    # export or check leaves no file, and never half of one, under the output's name.
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)      # mkstemp's 0600 otherwise: the file gets the permissions of any other output
    try:
        from onnx.checker import ValidationError
        try:
            export_onnx(model, tmp, class_names, args.opset)
        except (RuntimeError, ValueError, ValidationError) as e:   # torch.onnx's errors are RuntimeErrors
            raise ValueError(f"torch.onnx could not export this model at --opset {args.opset} "
                             f"({str(e).splitlines()[0][:200]}); nothing written") from e
        result = {"output": str(output), "opset": args.opset, "max_abs_diff": None}
        checked = args.check
        if checked:
            try:
                import onnxruntime  # noqa: F401 - only to know whether the check can run
            except ImportError:
                checked = False
        if checked:
            gen = torch.Generator().manual_seed(0)
            worst = 0.0
            for n in (1, 3):
                x = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=gen)
                try:
                    worst = max(worst, check_export(tmp, model, x, args.atol, args.rtol))
                except AssertionError as e:     # named by the output's name, not the temporary file's
                    raise ValueError(f"{str(e).replace(str(tmp), str(output))}; {output} not written (--atol/--rtol, "
                                     "or --no-check to skip)") from None
            result["max_abs_diff"] = worst
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{args.checkpoint} -> {output} ({output.stat().st_size / 1e6:.1f} MB, ONNX opset {args.opset}): "
          f"input images (N, 3, {cfg.image_size}, {cfg.image_size}) float32 normalised, "
          f"output predictions (N, {cfg.S}, {cfg.S}, {cfg.cell_dim}); N dynamic")
    if args.check and not checked:
        print("onnxruntime is not installed (pip install -r requirements-dev.txt): export not checked")
    elif checked:
        print(f"checked with onnxruntime on random batches of 1 and 3: max |onnx - torch| = "
              f"{result['max_abs_diff']:.2e} (tolerance {args.atol} + {args.rtol} x |torch|)")
    return result


if __name__ == "__main__":
    run_cli(main)
