"""``virtfleet-controller keys``: init, enroll, rotate, show, and its refusals (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.signing import HostKeyring, derive_host_key, parse_master, read_secret_file
from controller.main import main


def keys(tmp_path: Path, *args: str) -> int:
    return main(["keys", "--master-key-file", str(tmp_path / "master.key"), *args])


def test_init_enroll_rotate_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys(tmp_path, "init") == 0
    assert keys(tmp_path, "enroll", "hv1", "hv2", "--out-dir", str(tmp_path)) == 0
    master_path = tmp_path / "master.key"
    master = parse_master(read_secret_file(master_path)[0], master_path)
    ring = HostKeyring(tmp_path / "hv1.key", "hv1")
    assert ring.signing_key("hv1", 0) == ("hv1:1", derive_host_key(master.current.secret, 1, "hv1"))
    assert (tmp_path / "hv2.key").stat().st_mode & 0o777 == 0o600

    assert keys(tmp_path, "rotate") == 0
    # a host key file is not overwritten unless told
    assert keys(tmp_path, "enroll", "hv1", "--out", str(tmp_path / "hv1.key")) == 2
    assert "exists already" in capsys.readouterr().err
    assert keys(tmp_path, "enroll", "hv1", "--out", str(tmp_path / "hv1.key"), "--force") == 0
    assert ring.signing_key("hv1", 0)[0] == "hv1:2"  # the running agent re-reads its file
    assert ring.verifying_key("hv1", 1, 0) is not None  # and still knows generation 1
    capsys.readouterr()
    assert keys(tmp_path, "show") == 0
    shown = capsys.readouterr().out
    assert "generation 2: created" in shown and "(current)" in shown
    assert master.current.secret.hex() not in shown


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys(tmp_path, "show") == 2
    assert "cannot read key file" in capsys.readouterr().err
    assert keys(tmp_path, "init") == 0
    assert keys(tmp_path, "init") == 2
    assert keys(tmp_path, "enroll", "a", "b", "--out", str(tmp_path / "x.key")) == 2
    assert "--out takes the key file of one host" in capsys.readouterr().err
    assert keys(tmp_path, "enroll", "bad/host", "--out-dir", str(tmp_path)) == 2
