import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import AUTO_CPU_BACKEND, cli


@pytest.mark.slow
def test_latency_and_report(bundle, tmp_path):
    cli(
        "cxr-bench",
        "latency",
        "--model",
        str(bundle),
        "--batch-sizes",
        "1,4",
        "--warmup-s",
        "0.1",
        "--duration-s",
        "0.4",
        "--out",
        str(tmp_path),
    )
    results = list(tmp_path.glob("latency_*.json"))
    assert len(results) == 1 and results[0].with_suffix(".png").is_file()
    data = json.loads(results[0].read_text())
    assert {"pytorch-fp32", "onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8"} <= set(
        data["backends"]
    )
    assert data["b1_order"] == "interleaved" and data["environment"]["cpu_vector"]
    report = cli("cxr-bench", "report", str(results[0])).stdout
    for name, entry in data["backends"].items():
        assert entry["b1_ms"]["runs"] >= 2 and entry["throughput_img_s"]["4"] > 0
        row = next(line for line in report.splitlines() if f"| {name} |" in line)
        assert f"{entry['b1_ms']['p50']:.2f}" in row  # the report shows the measured numbers, not others
    assert data["preprocess_ms_per_image"] > 0 and "x |" in report
    bound = data["compute"]  # a CPU host: how much of its fp32 matrix rate each backend uses
    assert bound["fp32_floor_ms"] == pytest.approx(
        1000 * bound["gflop_per_image"] / bound["host_fp32_matmul_gflops"]
    )
    for name, entry in data["backends"].items():
        expected = (
            bound["gflop_per_image"] / (entry["b1_ms"]["p50"] / 1000) / bound["host_fp32_matmul_gflops"]
        )
        assert entry["share_of_host_fp32_rate"] == pytest.approx(expected)
        assert f"{expected:.0%} |" in next(line for line in report.splitlines() if f"| {name} |" in line)


def test_interleaved_b1_takes_turns_and_keeps_each_backends_own_time():
    import itertools
    import time

    from cxr.bench.latency import interleaved_b1

    calls: list[str] = []

    def runner(key: str, seconds: float):
        def run(batch: np.ndarray) -> np.ndarray:
            calls.append(key)
            time.sleep(seconds)
            return batch

        return run

    stats = interleaved_b1(
        {"fast": runner("fast", 0.001), "slow": runner("slow", 0.01)},
        8,
        warmup_s=0.0,
        duration_s=0.1,
        rounds=3,
        settle_s=0.0,
    )
    turns = [key for key, _ in itertools.groupby(calls[4:])]  # after two warm-up runs each
    assert turns == ["fast", "slow"] * 3  # three rounds, each backend once per round
    assert stats["fast"]["runs"] > stats["slow"]["runs"] >= 3  # the same time each, so more fast runs
    assert stats["slow"]["p50"] > 5 * stats["fast"]["p50"] and stats["fast"]["p50"] >= 1.0


def test_graph_gflop_counts_grouped_convolutions_and_gemm():
    from cxr.bench.compute_bound import graph_gflop, host_fp32_gflops
    from onnx import TensorProto, helper, numpy_helper

    weights = [
        numpy_helper.from_array(np.zeros((32, 4, 3, 3), np.float32), "conv_w"),  # 16 in, 32 out, 4 groups
        numpy_helper.from_array(np.zeros((10, 32), np.float32), "fc_w"),  # Gemm with transB
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv_w"], ["y"], group=4, pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["y"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    conv = 2 * (4 * 3 * 3) * (32 * 8 * 8)  # each output value: 4 input channels x 3 x 3
    gemm = 2 * 32 * 10
    assert graph_gflop(model.SerializeToString()) * 1e9 == pytest.approx(conv + gemm)
    assert host_fp32_gflops(repeats=2) > 0.1


@pytest.mark.slow
def test_lime_benchmark_times_ours_per_precision_against_both_peers(bundle, phantoms, tmp_path):
    pytest.importorskip("captum", reason="captum not installed (pip install 'cxr-edge[bench]')")
    images = sorted((phantoms / "covid19").glob("*.png"))[:3]
    result = cli(
        "cxr-bench",
        "lime",
        "--model",
        str(bundle),
        *map(str, images),
        "--samples",
        "200",
        "--sweep",
        "100",
        "--precision",
        "fp32,fp16",
        "--peer",
        "stock,captum",
        "--out",
        str(tmp_path),
    )
    data = json.loads((tmp_path / "lime.json").read_text())
    assert (tmp_path / "lime.png").stat().st_size > 1000 and data["images"] == 3
    for precision in ("fp32", "fp16"):
        ours = data["ours"][precision]
        assert len(ours["per_image_s"]) == 3 and ours["first_image_s"] > ours["open_s"] > 0
        assert ours["backend"].startswith(f"{AUTO_CPU_BACKEND} {precision} on cpu")
        assert ours["first"]["timing"]["model_s"] < ours["first"]["total_s"]
    assert data["captum"]["device"] == "cpu" and len(data["captum"]["per_image_s"]) == 3
    assert data["speedup_vs_captum"]["fp32"] > 0 and "ours vs captum" in result.stdout
    # lime hands its classifier float64 RGB images; ours sends only the 0/1 rows (padded to 64 columns)
    assert data["bytes_ratio_from_lime"] > 100 and data["host_overhead_speedup"] > 1


def test_lime_benchmark_refuses_an_unknown_peer(bundle, tmp_path):
    from tests.conftest import one_line_error

    result = cli(
        "cxr-bench", "lime", "--model", str(bundle), "--peer", "shap", "--out", str(tmp_path), check=2
    )
    assert "unknown shap" in one_line_error(result)


@pytest.mark.slow
def test_serve_load_reports_batching_and_equality_with_local(bundle, phantoms, tmp_path):
    pytest.importorskip("pytriton", reason="serving extra not installed")
    out = tmp_path / "load"
    result = cli(
        "cxr-bench",
        "serve-load",
        str(phantoms),
        "--model",
        str(bundle),
        "--clients",
        "4",
        "--max-requests",
        "120",
        "--max-seconds",
        "60",
        "--max-batch",
        "8",
        "--out",
        str(out),
    )
    report = json.loads((out / "serve_load.json").read_text())
    server = report["server"]
    assert server["requests"] == 120 and server["errors"] == 0
    assert server["all_equal_local"] and server["max_abs_dprob_vs_local"] <= 1e-5
    assert sum(int(size) * count for size, count in server["batch_sizes_formed"].items()) == 120
    assert max(int(size) for size in server["batch_sizes_formed"]) <= 8
    latency = server["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    # 4 clients, one request each at a time: no request can take longer than the whole level
    assert latency["p50"] <= 1000 * server["seconds"]
    assert server["requests_per_s"] * server["seconds"] == pytest.approx(120)
    assert report["local"]["images_per_s"] > 0 and report["images"] == len(list(phantoms.rglob("*.png")))
    assert (
        report["ratio_server_vs_local_throughput"]
        == server["requests_per_s"] / report["local"]["images_per_s"]
    )
    assert "batches formed" in result.stdout and (out / "serve_load.png").stat().st_size > 1000


@pytest.mark.slow
def test_device_ablation_script_runs_end_to_end_as_a_cpu_dry_run(tmp_path):
    """The one-call GPU ablation (issue 15) as its documented CPU dry run: six fits, their evaluations,
    the table, and one tarball without weights; FIT_OPTIONS reaches every fit."""
    import os
    import subprocess
    import sys
    import tarfile

    from cxr.train.synth import write_phantoms

    data = tmp_path / "data"
    write_phantoms(data, per_class=12, size=64, seed=2)
    dry_run = {
        "ARCH": "dpn_se_tiny",
        "SIZE": "48",
        "DEVICE": "cpu",
        "EPOCHS": "1",
        "AUDIT": "2",
        "COMPARE": "resnet18",
        "JOBS": "2",
        "FIT_OPTIONS": "--weight-decay 0.05",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
    }
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_ablation_device.sh"
    result = subprocess.run(
        ["bash", str(script), str(data)],
        env={**os.environ, **dry_run},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and "wrote" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    with tarfile.open(tmp_path / "out" / "ablation.tar.gz") as tar:
        names = tar.getnames()
        runs = ("all_on", "all_off", "no_crop", "no_clahe", "no_erase", "resnet18_all_on")
        assert all(f"ablation/{run}/evaluation.json" in names for run in runs)
        assert not any(name.endswith("model.pt") for name in names)
        table = tar.extractfile("ablation/clinical.md").read().decode()
        card = json.loads(tar.extractfile("ablation/no_crop/card.json").read())
    assert sum(line.startswith(f"| {run} |") for run in runs for line in table.splitlines()) == 6
    assert card["training"]["weight_decay"] == 0.05 and card["preprocessing"]["thorax_crop"] is False
