"""bench.py: the smoke run end to end, and the pieces its numbers rest on."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
from dataset import VOCDetection, read_image

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "bench.py", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elapsed = time.perf_counter() - t0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    errors = [r for r in doc["rows"] if r["variant"].endswith(": error") or r["variant"].endswith(": skipped")]
    assert not errors, errors
    assert doc["sections"] == ["pipeline", "peak", "train", "demo", "infer", "eval"]   # compile only when asked
    res = doc["results"]
    for key in ("pipeline_speedup", "pipeline_speedup_worker", "classifier_pipeline_speedup", "peak_tflops",
                "train_detector_device_images_per_s", "train_detector_e2e_images_per_s",
                "train_detector_device_mfu_percent", "train_classifier_e2e_images_per_s",
                "infer_fp32_batch1_images_per_s", "infer_bf16_batch_images_per_s", "decode_nms_ms_per_image",
                "voc_eval_seconds", "annotation_loading_warm_seconds", "demo_step_nchw_images_per_s",
                "demo_step_channels_last_stem_images_per_s", "demo_step_channels_last_all_images_per_s",
                "train_classifier_e2e_gpu_decode_images_per_s", "loader_classifier_gpu_decode_images_per_s",
                "train_detector_e2e_gpu_decode_images_per_s", "loader_detector_gpu_decode_images_per_s",
                "train_detector_device_other_stem_images_per_s", "train_classifier_device_other_stem_images_per_s"):
        assert res[key] is not None and res[key] > 0, key
    assert doc["pipeline_speedup"] == res["pipeline_speedup"] and doc["voc_eval_seconds"] == res["voc_eval_seconds"]
    # the speedup is the ratio of the two rates it is printed beside
    assert res["pipeline_speedup"] == pytest.approx(res["pipeline_detector_ours_per_core"]
                                                    / res["pipeline_detector_baseline_per_core"])
    from utils import keeps_narrow_stem_nchw   # --channels-last's layout on this CPU
    picked = "stem" if keeps_narrow_stem_nchw(torch.device("cpu")) else "all"
    assert res["demo_step_channels_last_speedup"] == pytest.approx(res[f"demo_step_channels_last_{picked}_images_per_s"]
                                                                   / res["demo_step_nchw_images_per_s"])
    assert res["demo_step_nchw_stem_speedup"] == pytest.approx(res["demo_step_channels_last_stem_images_per_s"]
                                                               / res["demo_step_channels_last_all_images_per_s"])
    # both forms of the stem were timed
    assert res["infer_stem_direct_ms"] > 0 and res["infer_stem_space_to_depth_ms"] > 0
    # the per-layer profile: its slowest layers are part of its total
    layers = {k: v for k, v in res.items() if k.startswith("infer_slowest_layer_")}
    assert 1 <= len(layers) <= 6 and all(v > 0 for v in layers.values())
    assert [layers[f"infer_slowest_layer_{i}_ms"] for i in range(1, len(layers) + 1)] == sorted(layers.values())[::-1]
    assert sum(layers.values()) <= res["infer_layers_total_ms"] * (1 + 1e-9)
    # MFU is achieved FLOP/s over the measured peak, achieved = images/s x 3 x forward FLOPs
    assert res["train_detector_device_mfu_percent"] == pytest.approx(
        100 * res["train_detector_device_tflops"] / res["peak_tflops"])
    assert doc["machine"]["device"] == "cpu" and doc["config"]["det_size"] == 64
    for section in ("pipeline", "peak", "train", "demo", "infer", "eval", "total"):   # the printed table
        assert f"\n{section:<9} | " in proc.stdout
    print(f"smoke run: {elapsed:.1f} s")


def _report(tmp_path) -> bench.Report:
    return bench.Report(str(tmp_path / "r.json"), {"machine": {}, "config": {}})


def test_report_json_is_rewritten_after_every_row(tmp_path):
    r = _report(tmp_path)
    r.add("peak", "matmul", 12.5, "TFLOP/s", key="peak_tflops")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"] == {"peak_tflops": 12.5} and doc["complete"] is False
    r.add("eval", "scoring", float("nan"), "s", key="voc_eval_seconds")    # NaN is not JSON: null
    doc = json.loads((tmp_path / "r.json").read_text())
    assert len(doc["rows"]) == 2 and doc["rows"][1]["value"] is None and doc["voc_eval_seconds"] is None


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path, capsys):
    r = _report(tmp_path)
    assert not bench.run_part(r, "train", "detector", lambda: 1 / 0, 30)
    assert bench.run_part(r, "infer", "detector", lambda: r.add("infer", "x", 1.0, "img/s"), 30)
    variants = [row.variant for row in r.rows]
    assert variants == ["detector: error", "detector: time taken", "x", "detector: time taken"]
    assert "ZeroDivisionError" in r.rows[0].note
    assert "ZeroDivisionError" in capsys.readouterr().err     # the traceback goes to stderr


def test_a_part_past_its_time_limit_is_stopped(tmp_path):
    r = _report(tmp_path)

    def forever():
        while True:
            time.sleep(0.01)
    t0 = time.perf_counter()
    assert not bench.run_part(r, "compile", "train", forever, 0.3)
    assert time.perf_counter() - t0 < 5
    assert r.rows[0].variant == "train: error" and "PartTimeout" in r.rows[0].note


def test_training_rows_arithmetic(tmp_path):
    r = _report(tmp_path)
    peak = bench.Peak(bench.BenchConfig())
    peak.tflops = 800.0
    bench._report_training(r, "train", "detector", "on device", 2600.0, int(40.6e9), peak, "", "k")
    achieved = 2600 * 3 * 40.6e9 / 1e12        # 316.68 TFLOP/s
    assert r.results["k_images_per_s"] == 2600.0
    assert r.results["k_tflops"] == pytest.approx(achieved)
    assert r.results["k_mfu_percent"] == pytest.approx(100 * achieved / 800)   # 39.6 %


def test_sections_flag():
    assert bench.parse_args([]).sections == ["pipeline", "peak", "train", "demo", "infer", "eval"]
    assert bench.parse_args(["--compile"]).sections[-1] == "compile"
    assert bench.parse_args(["--only", "eval, pipeline"]).sections == ["eval", "pipeline"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "pipline"])


def test_paper_sizes_on_gpu_small_on_cpu():
    gpu = bench.bench_config(torch.device("cuda"))
    assert (gpu.det_width, gpu.det_size, gpu.det_batch, gpu.cls_size, gpu.amp, gpu.channels_last) == \
        (1.0, 448, 64, 224, True, True)
    cpu = bench.bench_config(torch.device("cpu"))
    assert cpu.det_width < 1 and not cpu.amp and cpu.peak_n == 1024


def test_generated_voc_tree_reads_back(tmp_path):
    root = bench.write_voc_tree(tmp_path, 4)
    ds = VOCDetection(root, "2007-train", train=True)
    assert len(ds) == 4 and not ds.report
    for i, (path, ann) in enumerate(ds.items):
        W, H = bench.VOC_SIZES[i % len(bench.VOC_SIZES)]
        img = read_image(path)
        assert img.shape == (3, H, W)
        assert (ann.boxes[:, 0] >= 1).all() and (ann.boxes[:, 2] <= W).all() and (ann.boxes[:, 3] <= H).all()
        assert 40 < path.stat().st_size / 1024 < 200          # photo-sized JPEGs, not flat colour
        image, target, _ = ds[i]
        assert image.shape == (3, 448, 448) and 1 <= target[..., 4].sum() <= len(ann.labels)


def test_photo_like_is_smooth_but_not_flat():
    img = bench.photo_like(np.random.default_rng(0), 120, 160).astype(np.float64)
    assert img.shape == (120, 160, 3)
    assert img.std() > 20                                           # colour variation across the image
    assert np.abs(np.diff(img, axis=1)).mean() < 15                 # neighbours close: not white noise


def test_straightforward_detector_baseline_keeps_boxes_on_their_objects():
    """The baseline pipeline bench.py times is a working one: a white square on black stays
    framed by its box through RandomAffine, flip and resize."""
    img = torch.zeros(3, 300, 400, dtype=torch.uint8)
    img[:, 100:200, 150:260] = 255
    tf = bench.straightforward_detector_transform(448)
    torch.manual_seed(0)
    for _ in range(5):
        out, target = bench.straightforward_detector_sample(tf, img, torch.tensor([[150.0, 100, 260, 200]]),
                                                            torch.tensor([3]))
        assert out.shape == (3, 448, 448) and target.shape == (7, 7, 25)
        obj = target[..., 4].nonzero()
        assert len(obj) == 1
        r, c = obj[0].tolist()
        x, y, w, h = target[r, c, :4].tolist()
        cx, cy = (c + x) / 7 * 448, (r + y) / 7 * 448
        mask = out.float().mean(0) > 60       # ColorJitter may darken the square to ~128
        ys, xs = mask.nonzero(as_tuple=True)
        assert abs(cx - (xs.min() + xs.max() + 1) / 2) < 3 and abs(cy - (ys.min() + ys.max() + 1) / 2) < 3
        assert abs(w * 448 - (xs.max() - xs.min() + 1)) < 4 and target[r, c, 5 + 3] == 1


def test_trained_like_outputs_give_nms_work():
    out = bench.trained_like_outputs(2, 7, 2, 20, torch.device("cpu"))
    assert out.shape == (2, 7, 7, 30)
    conf, cls = out[..., 8:10], out[..., 10:]
    assert (conf >= 0).all() and (conf <= 1).all()
    torch.testing.assert_close(cls.sum(-1), torch.ones(2, 7, 7))
    assert ((conf.unsqueeze(-1) * cls.unsqueeze(-2)) > 0.001).sum() > 200     # candidates for NMS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_forward_equals_eager():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).cuda().eval()
    x = torch.randn(1, 3, 16, 16, device="cuda")
    run = bench.cuda_graph_forward(model, x)
    for _ in range(2):
        x2 = torch.randn_like(x)
        torch.testing.assert_close(run(x2), model(x2))


def test_other_stem_form_toggles_the_stem_and_restores_it():
    import model
    before = set(model.SPACE_TO_DEPTH_DEVICES)
    stem = model.SpaceToDepthConv2d(3, 8, 7, 2, 3).double()
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    plain = torch.nn.functional.conv2d(x, stem.weight, stem.bias, 2, 3)
    with bench.other_stem_form(torch.device("cpu")) as form:
        assert form == "space-to-depth" and "cpu" in model.SPACE_TO_DEPTH_DEVICES
        other = stem(x)
        assert not torch.equal(other, plain)                      # the other summation order: it ran
        torch.testing.assert_close(other, plain, rtol=0, atol=1e-12)
    assert model.SPACE_TO_DEPTH_DEVICES == before and torch.equal(stem(x), plain)
    with bench.other_stem_form(torch.device("cuda")) as form:     # (no GPU needed: only the set changes)
        assert form == "direct" and "cuda" not in model.SPACE_TO_DEPTH_DEVICES
    assert model.SPACE_TO_DEPTH_DEVICES == before
