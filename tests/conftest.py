"""Shared fixtures: phantoms, a tiny trained run and its bundle, built once per test session."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "cxr4-dev"
IMAGE_SIZE = 64
# What --backend auto runs on a CPU box: OpenVINO where installed (the [openvino] extra), else ONNX Runtime.
AUTO_CPU_BACKEND = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"


def cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run one of our console scripts as a user would (python -m keeps it tied to this interpreter)."""
    module = {
        "cxr-train": "cxr.train.cli",
        "cxr-export": "cxr.export.cli",
        "cxr-run": "cxr.runtime.cli",
        "cxr-bench": "cxr.bench.cli",
        "cxr-quickstart": "cxr.quickstart",
    }[args[0]]
    result = subprocess.run(
        [sys.executable, "-m", module, *args[1:]], capture_output=True, text=True, timeout=600
    )
    if check is not None:
        assert result.returncode == check, (
            f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def run_parity(
    bundle: Path, data: Path, backends: str, report: Path, check: int | None = 0
) -> subprocess.CompletedProcess:
    """`cxr-export parity` of ``bundle`` (a copy: it writes the card) on ``data`` for ``backends``."""
    return cli(
        "cxr-export",
        "parity",
        str(bundle),
        str(data),
        "--backends",
        backends,
        "--report",
        str(report),
        check=check,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's error must be one line on stderr starting with 'error:' and no traceback."""
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "it/s]" not in line and "img/s]" not in line
    ]
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("error: "), result.stderr
    return lines[-1]


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cxr.train.synth import write_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, per_class=48, size=80, seed=1)
    return root


@pytest.fixture(scope="session")
def trained_run(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cxr.train.fit import FitConfig, fit

    run = tmp_path_factory.mktemp("run")
    fit(
        FitConfig(
            data=phantoms,
            out=run,
            arch="dpn_se_tiny",
            epochs=10,
            image_size=IMAGE_SIZE,
            batch_size=16,
            lr=3e-3,
            seed=0,
        )
    )
    return run


@pytest.fixture(scope="session")
def bundle(trained_run: Path, phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    cli("cxr-export", "onnx", str(trained_run), "--out", str(out))
    cli("cxr-export", "fp16", str(out))
    cli("cxr-export", "int8", str(out), "--calib", str(phantoms), "--samples", "32")
    return out


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data/cxr4-dev is not present (fresh clone)")
    return REAL_DATA
