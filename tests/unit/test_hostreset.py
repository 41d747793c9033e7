"""What quiltd keeps of ip_forward for the package's removal, without touching the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from quiltd.net import hostreset


def test_the_value_found_first_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = tmp_path / "ip_forward"
    saved = tmp_path / "ip_forward.before"
    monkeypatch.setattr(hostreset, "IP_FORWARD", forward)
    forward.write_text("0\n")
    hostreset.remember_ip_forward(saved)
    forward.write_text("1\n")  # quiltd turned it on
    hostreset.remember_ip_forward(saved)  # a later load, or a restarted quiltd, keeps the first value
    assert saved.read_text() == "0\n"
