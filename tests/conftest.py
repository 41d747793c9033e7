"""Fixtures shared by all tests.

System tests (marked `system`, and everything under tests/system/) run against
one private systemd booted by tools/sandbox for the whole session; see
DESIGN.md "Testing". They need root and util-linux's unshare/nsenter. Without
them they fail, unless QUILT_SKIP_SYSTEM=1 is set, in which case they skip.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_DIR = Path(__file__).resolve().parent / "system"
SKIP_ENV = "QUILT_SKIP_SYSTEM"


def _load_sandbox_module() -> ModuleType:
    # tools/sandbox is a stdlib-only script without a .py suffix: load it by path.
    loader = importlib.machinery.SourceFileLoader("quilt_sandbox", str(REPO / "tools" / "sandbox"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


sandbox_tools = _load_sandbox_module()


def system_unavailable() -> str | None:
    """Why system tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "system tests need root (they boot a private systemd in namespaces)"
    for tool in ("unshare", "nsenter", "busctl", "systemctl"):
        if shutil.which(tool) is None:
            return f"system tests need `{tool}` (util-linux / systemd); run tools/setup"
    if not Path(sandbox_tools.SYSTEMD).exists():
        return f"system tests need {sandbox_tools.SYSTEMD} (package systemd); run tools/setup"
    return None


def _require_system() -> None:
    reason = system_unavailable()
    if reason is None:
        return
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{reason} ({SKIP_ENV}=1)")
    pytest.fail(f"{reason}. Set {SKIP_ENV}=1 to skip system tests.", pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    # CI timeouts send SIGTERM; turn it into KeyboardInterrupt so fixture
    # finalizers run and the sandbox is stopped (die_with_parent covers SIGKILL).
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def _on_sigterm(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SYSTEM_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.system)


UNAVAILABLE = pytest.StashKey[str]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("system") is not None:
        reason = system_unavailable()
        if reason is not None and os.environ.get(SKIP_ENV) != "1":
            item.stash[UNAVAILABLE] = reason
        _require_system()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if call.when == "setup" and report.failed and UNAVAILABLE in item.stash:
        # A system test that cannot run here is a failed test, not a fixture
        # error: report it as the test's own outcome (FAILED, not ERROR).
        report.when = "call"


def _reap_stale_test_sandboxes() -> None:
    """Stop sandboxes left by earlier pytest runs that died (named pytest-PID-...)."""
    for name in sandbox_tools.Sandbox.names():
        parts = name.split("-")
        if parts[0] != "pytest" or len(parts) < 2 or not parts[1].isdigit():
            continue
        if sandbox_tools._alive(int(parts[1])):
            continue  # another pytest session's, still running
        try:
            sandbox_tools.Sandbox.attach(name).stop()
        except sandbox_tools.SandboxError:
            with sandbox_tools._state_lock():
                sandbox_tools._cleanup(name)


def unique_sandbox_name(purpose: str = "s") -> str:
    """pytest-<our pid>-<purpose>-<random>: unique, and reapable if we die."""
    return f"pytest-{os.getpid()}-{purpose}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def sandbox_name() -> Callable[[str], str]:
    """sandbox_name(purpose) -> a unique name for an extra sandbox of this session."""
    return unique_sandbox_name


@pytest.fixture(scope="session")
def sandbox_module() -> ModuleType:
    """tools/sandbox as a module (Sandbox, SandboxError, CommandFailed, ...)."""
    return sandbox_tools


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Any]:
    """One booted sandbox for the session, with this checkout installed into it.

    It is a tools/sandbox `Sandbox`: .run(argv), .host_path(p), .bus_address, .pid.
    """
    _require_system()
    _reap_stale_test_sandboxes()
    # die_with_parent: even a SIGKILLed pytest takes its sandbox down with it.
    sb = sandbox_tools.Sandbox.start(
        unique_sandbox_name("session"), share=[REPO], die_with_parent=True
    )
    try:
        sb.install(REPO)
        yield sb
    finally:
        # Runs on test failures and on KeyboardInterrupt (pytest tears down
        # session fixtures before exiting).
        sb.stop()


@pytest.fixture(scope="session")
def bus_address(sandbox: Any) -> str:
    """The sandbox's system bus, for D-Bus clients running on the host (as root)."""
    address: str = sandbox.bus_address
    return address


@pytest.fixture(scope="session")
def busctl(sandbox: Any) -> Callable[..., str]:
    """busctl(*args) runs `busctl ARGS...` inside the sandbox and returns stdout.

    A non-zero exit raises CommandFailed (a CalledProcessError) whose message
    includes busctl's stderr.
    """

    def run(*args: str, timeout: float = 30) -> str:
        result = sandbox.run(["busctl", *args], timeout=timeout)
        out: str = result.stdout.decode()
        return out

    return run
