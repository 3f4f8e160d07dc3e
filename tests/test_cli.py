"""Every usage error on every CLI: one line on stderr, exit 2, no traceback; a bare command shows its help."""

import subprocess
import sys

import pytest

from tests.conftest import cli, one_line_error

CLIS = ("cxr-train", "cxr-export", "cxr-run", "cxr-bench")
USAGE_ERRORS = [
    ("cxr-train", "fit", "data", "--out", "r", "--batch-size", "abc"),  # not an integer
    ("cxr-train", "fit"),  # missing argument
    ("cxr-train", "fit", "data"),  # missing required option
    ("cxr-train", "fitt"),  # unknown command
    ("cxr-export", "onnx", "run", "--bogus"),  # unknown option
    ("cxr-export", "parity", "bundle", "data", "--batch-size"),  # option without its value
    ("cxr-run", "predict", "x.png"),  # missing --model
    ("cxr-run", "predcit"),
    ("cxr-run", "predict", "x.png", "--model", "b", "--top-k", "two"),
    ("cxr-bench", "latency", "--model", "b", "--duration-s", "soon"),
    ("cxr-bench", "lattency"),
    ("cxr-bench", "lime", "--model", "b", "--count", "0"),  # our own check: exit 2 as well
    ("cxr-train", "fit", ".", "--out", "r", "--epochs", "0"),
    ("cxr-train", "fit", ".", "--out", "r", "--balance", "oversample"),
    ("cxr-export", "-q", "-v", "fp16", "bundle"),  # contradicting verbosity
    ("cxr-export", "int8", "b", "--calib", ".", "--calibration", "kl"),
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=[" ".join(a) for a in USAGE_ERRORS])
def test_usage_error_is_one_line_and_exit_2(args):
    line = one_line_error(cli(*args, check=2))
    assert "--help" in line or "must" in line


def test_unknown_command_suggests_the_right_one():
    assert "Did you mean 'fit'?" in one_line_error(cli("cxr-train", "fitt", check=2))


@pytest.mark.parametrize("name", CLIS)
def test_bare_command_prints_help_without_a_traceback(name):
    result = cli(name, check=2)
    assert "Usage:" in result.stdout and "Traceback" not in result.stderr + result.stdout


def test_fit_rejects_bad_options_before_importing_torch(tmp_path):
    """``cxr-train fit --epochs 0`` must answer at once: torch (seconds to import) is never loaded."""
    code = (
        "import sys\n"
        "from cxr.train.cli import app\n"
        "from cxr.runtime.cli_util import run_app\n"
        "try:\n"
        f"    run_app(app, ['fit', {str(tmp_path)!r}, '--out', 'r', '--epochs', '0'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "exit 2 False", result.stdout + result.stderr


@pytest.mark.slow
def test_quiet_hides_library_messages_but_not_results(trained_run, tmp_path):
    loud = cli("cxr-export", "onnx", str(trained_run), "--out", str(tmp_path / "a"))
    quiet = cli("cxr-export", "--quiet", "onnx", str(trained_run), "--out", str(tmp_path / "b"))
    assert "ORT vs PyTorch max |dprob|" in loud.stdout and "ORT vs PyTorch" not in quiet.stdout
    assert quiet.stdout.startswith("bundle digest: sha256:") and len(quiet.stdout.splitlines()) == 1
    verbose = cli("cxr-export", "--verbose", "onnx", str(trained_run), "--out", str(tmp_path / "c"))
    assert "cxr.export.onnx_export: wrote" in verbose.stdout
