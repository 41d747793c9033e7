"""The account files init reads for every exec: parsed again only when they change."""

from __future__ import annotations

import os
from pathlib import Path

from quiltd.runtime import accounts


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\n")
    assert accounts._read(str(passwd)) == [["root", "x", "0", "0", "root", "/root", "/bin/sh"]]
    # Same size, new content: as `usermod` in the container would leave it.
    passwd.write_text("root:x:0:0:root:/home:/bin/sh\n")
    assert accounts._read(str(passwd))[0][5] == "/home"
    with passwd.open("a") as f:
        f.write("app:x:1000:1000::/srv:/bin/sh\n")
    assert [line[0] for line in accounts._read(str(passwd))] == ["root", "app"]
    replacement = tmp_path / "new"
    replacement.write_text("other:x:7:7::/:/bin/sh\n")
    os.replace(replacement, passwd)
    assert [line[0] for line in accounts._read(str(passwd))] == ["other"]


def test_a_missing_or_odd_file_has_no_lines(tmp_path: Path) -> None:
    assert accounts._read(str(tmp_path / "none")) == []
    os.mkfifo(tmp_path / "fifo")
    assert accounts._read(str(tmp_path / "fifo")) == []
