"""Keys and signatures: a key is never replaced or used when others can read it; a bundle is signed only
when every file matches its card; key, signature and card reads are capped and refuse non-regular files."""

from __future__ import annotations

import os
import shutil
import stat
import threading

import pytest

from tests.conftest import cli, one_line_error

pytest.importorskip("cryptography", reason="signing needs the [sign] extra")


def test_keygen_never_replaces_a_key_and_force_moves_the_old_pair_aside(tmp_path):
    cli("cxr-export", "keygen", str(tmp_path / "site"))
    private = (tmp_path / "site.key").read_bytes()
    assert stat.S_IMODE((tmp_path / "site.key").stat().st_mode) == 0o600
    refused = cli("cxr-export", "keygen", str(tmp_path / "site"), check=1)
    assert "refused to replace a key" in one_line_error(refused)
    assert (tmp_path / "site.key").read_bytes() == private
    forced = cli("cxr-export", "keygen", str(tmp_path / "site"), "--force")
    assert "moved the old pair aside" in forced.stdout
    old = sorted(p.name for p in tmp_path.iterdir() if ".old-" in p.name)
    assert len(old) == 2 and (tmp_path / old[0]).read_bytes() == private
    assert (tmp_path / "site.key").read_bytes() != private


def test_a_private_key_others_can_read_is_not_used(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cli("cxr-export", "keygen", str(tmp_path / "site"))
    (tmp_path / "site.key").chmod(0o644)
    result = cli("cxr-export", "sign", str(copy), "--key", str(tmp_path / "site.key"), check=1)
    assert "chmod 600" in one_line_error(result) and not (copy / ".card.json.sig").exists()


def test_sign_refuses_a_bundle_whose_graph_no_longer_matches_its_card(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cli("cxr-export", "keygen", str(tmp_path / "site"))
    with open(copy / "model.onnx", "ab") as graph:
        graph.write(b"\0")
    result = cli("cxr-export", "sign", str(copy), "--key", str(tmp_path / "site.key"), check=1)
    assert "sha256 does not match" in one_line_error(result) and not (copy / ".card.json.sig").exists()


def test_keys_and_signatures_are_read_capped_and_regular_only(bundle, phantoms, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    image = str(next(phantoms.rglob("*.png")))
    cli("cxr-export", "keygen", str(tmp_path / "site"))
    cli("cxr-export", "sign", str(copy), "--key", str(tmp_path / "site.key"))
    with open(copy / ".card.json.sig", "wb") as signature:
        signature.truncate(200 << 20)  # 200 MB, sparse: read whole, it cost 418 MB
    big = cli(
        "cxr-run",
        "predict",
        image,
        "--model",
        str(copy),
        "--trusted-key",
        str(tmp_path / "site.pub"),
        check=1,
    )
    assert "more than a signature can be" in one_line_error(big)
    zero = cli("cxr-run", "predict", image, "--model", str(copy), "--trusted-key", "/dev/zero", check=1)
    assert "must be a regular file" in one_line_error(zero)
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    holder = threading.Thread(
        target=lambda: cli(
            "cxr-run", "predict", image, "--model", str(copy), "--trusted-key", str(fifo), check=None
        ),
        daemon=True,
    )
    holder.start()
    holder.join(timeout=120)
    assert not holder.is_alive()  # a FIFO hung for ever
    result = cli("cxr-run", "predict", image, "--model", str(copy), "--trusted-key", str(fifo), check=1)
    assert "must be a regular file" in one_line_error(result)


def test_info_exits_non_zero_when_no_classifier_runs(bundle, tmp_path):
    from cxr.runtime.card import read_card, write_card

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    for name in list(copy.iterdir()):
        if name.name.endswith(".onnx") and name.name != "model.onnx":
            name.unlink()
    (copy / "model.onnx").write_bytes(b"not a graph any backend can load")
    write_card(copy, read_card(copy))  # re-hashed, as a careless edit would be
    result = cli("cxr-run", "info", "--model", str(copy), check=1)
    assert "cannot run" in result.stdout
    assert "no classifier graph of this bundle runs" in one_line_error(result)


def test_keygen_into_a_missing_folder_and_signing_with_the_public_key_are_one_line(bundle, tmp_path):
    assert "no such folder" in one_line_error(
        cli("cxr-export", "keygen", str(tmp_path / "no" / "site"), check=1)
    )
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cli("cxr-export", "keygen", str(tmp_path / "site"))
    result = cli("cxr-export", "sign", str(copy), "--key", str(tmp_path / "site.pub"), check=1)
    assert "a public key; --key needs the private one" in one_line_error(result)


def test_a_bundle_in_a_folder_others_can_write_is_warned_about(bundle, phantoms, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    copy = shared / "bundle"
    shutil.copytree(bundle, copy)
    os.chmod(shared, 0o777)  # anyone could rename the bundle away and put another in its place
    image = str(next(phantoms.rglob("*.png")))
    assert (
        "writable by group or others (shared)"
        in cli("cxr-run", "predict", image, "--model", str(copy)).stderr
    )
    os.chmod(shared, 0o1777)  # the sticky bit: only the owner may rename it
    assert "writable by group or others" not in cli("cxr-run", "predict", image, "--model", str(copy)).stderr
