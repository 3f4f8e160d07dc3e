"""The README's first command: ``bash quickstart.sh`` ends in ``cxr-quickstart``, the whole pipeline on
phantoms. Here at a small size, in-process, with the closing note the command prints."""

import json

import pytest

from tests.conftest import cli


@pytest.mark.slow
def test_the_quick_start_runs_every_stage_and_says_where_the_results_are(tmp_path):
    from cxr.quickstart import run_quickstart

    result = run_quickstart(tmp_path, epochs=1, size=48, per_class=10)
    records = [json.loads(line) for line in result.predictions.read_text().splitlines()]
    assert len(records) == 4 and all(r["error"] is None and r["explanation"] for r in records)
    assert len(list((result.reports / "overlays").glob("*.png"))) == 4
    parity = json.loads((result.reports / "parity.json").read_text())
    assert set(parity["backends"]) == {"onnx", "fp16"} and result.parity_passed == parity["passed"]
    assert list(result.reports.glob("latency_*.json")) and result.exit_code == (0 if parity["passed"] else 1)
    assert f"parity table: {result.reports / 'parity.json'}" in "\n".join(result.lines())


def test_the_quick_start_has_its_own_command():
    assert "--epochs" in cli("cxr-quickstart", "--help").stdout
    assert "quickstart" not in cli("cxr-bench", "--help").stdout  # a benchmark command no more
