"""The formats table: one source for file names, commands, parity rules, and the README's copy of it."""

import re
from pathlib import Path

import pytest
from cxr.runtime.bundle import engine_name, onnx_name
from cxr.runtime.errors import CxrUsageError
from cxr.runtime.formats import FORMATS, get_format, markdown_table


def test_readme_shows_the_table_as_the_code_has_it():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme


def test_file_names_come_from_the_table():
    assert onnx_name("model", "fp32") == "model.onnx" and onnx_name("explain", "int8") == "explain.int8.onnx"
    assert engine_name("explain", "fp16") == "explain.fp16.engine"
    with pytest.raises(ValueError):
        onnx_name("other", "fp32")


def test_unknown_precision_suggests_the_nearest():
    with pytest.raises(CxrUsageError, match=r"got 'fp61' \(did you mean fp16\?\)"):
        get_format("fp61")
    with pytest.raises(CxrUsageError, match="one of fp32, fp16, int8, bf16, got 'fp8'"):
        get_format("fp8")
    assert get_format("bf16").onnx_name("explain") == "explain.onnx"  # a compute mode of the fp32 graphs
    assert get_format("bf16").backends == ("openvino",) and "| none |" in markdown_table()


def test_parity_defaults_are_the_table_rules():
    """What ``cxr-export parity`` judges by when given no rule option is the table's rules, rule for rule."""
    import typer.main
    from cxr.export.cli import app
    from cxr.export.parity import DEFAULT_RULES, parity_rules

    options = {p.name: p.default for p in typer.main.get_command(app).commands["parity"].params}
    names = ("fp32_max_dprob", "fp16_agreement", "int8_agreement", "alpha")
    assert parity_rules(*(options[name] for name in names)) == DEFAULT_RULES
    assert FORMATS["fp32"].parity.alpha is None and FORMATS["int8"].parity.min_agreement == 0.98


def test_optional_imports_name_their_extra():
    from cxr.runtime.optional import install_hint, require

    assert install_hint("tensorrt.plugins") == "pip install 'cxr-edge[trt]' on a machine with an NVIDIA GPU"
    assert install_hint("tritonclient.grpc", extra="export") == "pip install 'cxr-edge[export]'"
    with pytest.raises(
        CxrUsageError.__mro__[1], match=r"^signing needs no_such_pkg: pip install no_such_pkg$"
    ):
        require("no_such_pkg.sub", "signing")
    assert require("json", "reading cards").dumps([1]) == "[1]"


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_the_extras_table_agrees_with_pyproject():
    """An install hint names the extra that really brings the module (pydicom once said [dicom]: it is a base
    dependency; the extra brings its decoders)."""
    tomllib = pytest.importorskip("tomllib")
    from cxr.runtime.optional import EXTRAS

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    base = {_distribution(r) for r in project["dependencies"]}
    for module, known in EXTRAS.items():
        listed = {_distribution(r) for r in project["optional-dependencies"][known.extra]}
        assert known.distribution in listed and known.distribution not in base, module
    assert "pydicom" in base and "pydicom" not in EXTRAS
