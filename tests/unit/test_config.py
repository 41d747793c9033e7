"""/etc/quilt/quiltd.conf: what it may say, and that anything else stops the daemon."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quiltd.core import config
from quiltd.core.config import Config, ConfigError


def test_no_file_grants_members_nothing(tmp_path: Path) -> None:
    assert config.load(tmp_path / "none.conf") == Config((), False)


def test_roots_and_host_image() -> None:
    got = config.parse("# shared work\n[members]\nmount_roots = /srv/agents  /data/shared/\n"
                       "   /more\nhost_image = yes\n")
    assert got == Config(("/srv/agents", "/data/shared", "/more"), True)
    assert config.parse("[members]\n") == Config()
    assert config.parse("") == Config()


@pytest.mark.parametrize(("text", "message"), [
    ("[member]\nhost_image = yes\n", "unknown section(s) member"),
    ("[members]\nhost-image = yes\n", "unknown key(s) host-image"),
    ("[members]\nhost_image = maybe\n", "host_image must be yes or no"),
    ("[members]\nmount_roots = srv/agents\n", "must be an absolute path"),
    ("[members]\nmount_roots = /\n", "must be an absolute path other than /"),
    ("mount_roots = /srv\n", "no section headers"),
])
def test_anything_else_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.parse(text)
