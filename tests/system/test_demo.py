"""The main job of the README still works from start to end."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_a_container_and_shows_its_output_and_exit_code(
    sandbox_name: Callable[[str], str], sandbox_module: ModuleType
) -> None:
    name = sandbox_name("demo")
    # The session already ran the setup; the demo's own sandbox is booted here.
    r = subprocess.run([str(REPO / "tools/demo"), "--skip-setup", "--sandbox-name", name],
                       capture_output=True, text=True, timeout=300, check=False)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-4000:]
    assert "hello from quilt" in out
    assert 'si "exited" 3' in out
    assert "i 3" in out.split("ExitCode", 1)[1]
    assert "sleep 300" in out and "quilt.slice" in out and "TasksMax=32" in out
    assert out.rstrip().endswith("demo: everything worked")
    assert name not in sandbox_module.Sandbox.names()
