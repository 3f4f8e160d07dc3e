"""A card means what it says: every preprocessing and input value is checked by type and range, at load and
at write; values the runtime does not implement are refused, not ignored."""

import json

import pytest
from cxr.runtime.card import Card, read_card, write_card
from cxr.runtime.errors import CxrError

BAD_VALUES = [
    ("preprocessing", "border_mask", 0.6),  # blanked every view: 203 films, one answer
    ("preprocessing", "border_mask", float("nan")),
    ("preprocessing", "border_mask", "0.05"),
    ("preprocessing", "border_mask", True),
    ("preprocessing", "thorax_crop", "false"),  # a string left the crop on
    ("preprocessing", "clahe", 1),
    ("preprocessing", "resize", "stretch"),  # accepted and ignored before
    ("preprocessing", "interpolation", "cubic"),
    ("preprocessing", "normalisation_in_graph", False),
    ("preprocessing", "mean", [0.5, 0.5]),
    ("preprocessing", "std", [0.2, 0.0, 0.2]),
    ("preprocessing", "dicom_window", "auto"),
    ("input", "name", "pixels"),
    ("input", "size", 224.0),
    ("parity", "backends", {"fp16": "passed"}),  # wrong type crashed info and predict
    (None, "parity", [1, 2]),
    (None, "training", "none"),
    (None, "format_version", "1"),
    (None, "arch", 92),
]


def _card_dict() -> dict:
    return json.loads(json.dumps(Card().to_dict()))


@pytest.mark.parametrize("section,key,value", BAD_VALUES, ids=[f"{s}.{k}={v!r}" for s, k, v in BAD_VALUES])
def test_a_bad_value_is_refused_in_one_line_naming_it(section, key, value):
    data = _card_dict()
    (data[section] if section else data)[key] = value
    with pytest.raises(CxrError) as caught:
        Card.from_dict(data)
    message = str(caught.value)
    assert "\n" not in message and key in message, message


def test_a_card_without_the_dicom_window_key_keeps_the_old_stretch():
    data = _card_dict()
    del data["preprocessing"]["dicom_window"]
    assert Card.from_dict(data).preprocessing.dicom_window == "minmax"
    assert Card().preprocessing.dicom_window == "window"  # what new runs write


def test_write_card_refuses_a_card_the_runtime_could_not_honour(tmp_path):
    from cxr.runtime.card import Preprocessing

    bad = Card(preprocessing=Preprocessing(border_mask=0.4))
    with pytest.raises(CxrError, match="border_mask"):
        write_card(tmp_path, bad)
    assert not (tmp_path / "card.json").exists()
    write_card(tmp_path, Card())
    assert read_card(tmp_path) == Card()


@pytest.mark.parametrize("command", ["info", "predict"])
def test_a_card_of_the_wrong_shape_is_one_line_for_every_command(bundle, phantoms, tmp_path, command):
    import shutil

    from tests.conftest import cli, one_line_error

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "card.json").read_text())
    data["parity"] = {"backends": {"fp16": "passed"}}  # crashed info and predict with a traceback
    (copy / "card.json").write_text(json.dumps(data))
    image = str(sorted(phantoms.rglob("*.png"))[0])
    args = ("--model", str(copy)) + ((image,) if command == "predict" else ())
    assert "parity.backends" in one_line_error(cli("cxr-run", command, *args, check=1))


@pytest.mark.parametrize(
    "text,words",
    [
        ('{"classes": ["a", "b"], "classes": ["b", "a"]}', "given twice"),  # which one counts?
        ('{"classes": ["a", "b"], "format_version": 1' + "0" * 5000 + "}", "unreadable card"),
        ('{"classes": ["a", "b"], "metrics": ' + "[" * 900 + "]" * 900 + "}", "nested"),
    ],
    ids=["duplicate key", "5000-digit number", "900 levels"],
)
def test_a_card_that_cannot_be_read_one_way_is_refused_in_one_line(tmp_path, text, words):
    (tmp_path / "card.json").write_text(text)
    with pytest.raises(CxrError) as caught:
        read_card(tmp_path)
    assert words in str(caught.value) and "\n" not in str(caught.value)
