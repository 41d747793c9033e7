"""The Debian package, built from this checkout and installed in a fresh sandbox."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.system.conftest import BUS, BUSYBOX_TARBALL, REPO

pytestmark = pytest.mark.system

# Where tools/setup leaves the package's dependencies: the sandbox has no network.
DEBS = "/var/cache/quilt-test-debs"
DEPENDS = ("python3-dbus-next", "python3-systemd", "python3-pyroute2", "python3-daemon")


@pytest.fixture(scope="module")
def deb() -> Path:
    result = subprocess.run([str(REPO / "tools/build-deb")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (REPO / "out").glob("quiltd_*_all.deb")
    return built


@pytest.fixture(scope="module")
def fresh(sandbox_module: ModuleType, sandbox_name: Callable[[str], str]) -> Iterator[Any]:
    """A sandbox with nothing of Quilt installed (the session's sandbox has this checkout)."""
    sb = sandbox_module.Sandbox.start(sandbox_name("deb"), share=[REPO], die_with_parent=True)
    try:
        yield sb
    finally:
        sb.stop()


def sh(sb: Any, *argv: str, check: bool = True) -> str:
    return str(sb.run(list(argv), check=check, timeout=120).stdout.decode())


def host_network(sb: Any) -> dict[str, Any]:
    """What a user checks of the sandbox's network: nft tables, bridges, veths and ip_forward."""
    links = sh(sb, "ip", "-o", "-d", "link", "show").splitlines()
    return {
        "tables": sorted(sh(sb, "nft", "list", "tables").splitlines()),
        "bridges": sorted(line.split(": ")[1] for line in links if " bridge " in line),
        "veths": sorted(line.split(": ")[1].split("@")[0] for line in links if " veth " in line),
        "forward": sh(sb, "sysctl", "-n", "net.ipv4.ip_forward").strip(),
    }


def test_install_activate_run_remove(fresh: Any, deb: Path) -> None:
    sb = fresh
    # This machine's image forbids starting services from maintainer scripts
    # (policy-rc.d); a real host does not. Gone in the sandbox's overlay only.
    sh(sb, "rm", "-f", "/usr/sbin/policy-rc.d")
    sh(sb, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", "--no-download",
       "--no-install-recommends", f"-o=Dir::Cache::archives={DEBS}", *DEPENDS)
    network_before = host_network(sb)
    assert network_before["forward"] == "0", network_before
    sh(sb, "dpkg", "-i", str(deb))

    assert "quilt" in sh(sb, "getent", "group", "quilt")
    assert sh(sb, "systemctl", "is-active", "quiltd.socket").strip() == "active"
    assert sh(sb, "systemctl", "is-active", "quiltd", check=False).strip() == "inactive"
    assert sh(sb, "stat", "-c", "%a", "/run/quilt", "/var/lib/quilt").split() == ["755", "700"]

    # The bus starts the package's daemon, run by Debian's python3 and libraries.
    assert '"Version" s "0.1.0"' in sh(sb, "busctl", "call", *BUS, "GetSystemInfo")
    assert sh(sb, "systemctl", "is-active", "quiltd").strip() == "active"
    status = sh(sb, "systemctl", "status", "quiltd", "--no-pager")
    assert "/usr/bin/python3 /usr/bin/quiltd" in status
    assert "TriggeredBy: ● quiltd.socket" in status
    assert "quiltd 0.1.0 ready" in sh(sb, "journalctl", "-u", "quiltd", "-o", "cat", "--no-pager")

    subprocess.run([str(REPO / "tools/make-busybox-image"), str(sb.host_path(BUSYBOX_TARBALL))],
                   check=True, capture_output=True)
    sh(sb, "quiltctl", "images", "import", "busybox", BUSYBOX_TARBALL)
    out = sb.run(["quiltctl", "run", "--rm", "busybox", "sh", "-c", "echo from-the-package; exit 5"],
                 check=False)
    assert (out.returncode, out.stdout) == (5, b"from-the-package\n"), out.stderr
    cid = sh(sb, "quiltctl", "run", "-d", "--name", "stays", "busybox", "sleep", "1000").strip()
    deadline = time.monotonic() + 10
    while sh(sb, "quiltctl", "ps", "--filter", "state=running", "-q").split() != [cid]:
        assert time.monotonic() < deadline, sh(sb, "quiltctl", "ps", "-a")
        time.sleep(0.1)
    assert sh(sb, "systemctl", "is-active", f"quilt-{cid}.scope").strip() == "active"
    # A network that routes beyond itself: its own bridge, and ip_forward on.
    sh(sb, "quiltctl", "network", "create", "--egress", "all", "out")
    sh(sb, "quiltctl", "run", "-d", "--network", "out", "busybox", "sleep", "1000")
    during = host_network(sb)
    assert during["forward"] == "1" and "quilt0" in during["bridges"], during
    assert any(b.startswith("qb") for b in during["bridges"]) and len(during["veths"]) == 2, during
    assert "table inet quilt" in during["tables"] and "table bridge quilt" in during["tables"], during

    # Removal takes the daemon, the socket and the containers with it; state stays.
    sh(sb, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "remove", "-y", "-q", "quiltd")
    # The host's network is as it was before the installation.
    assert host_network(sb) == network_before
    assert sh(sb, "systemctl", "is-active", "quiltd", "quiltd.socket", check=False).split() == \
        ["inactive", "inactive"]
    assert sh(sb, "systemctl", "list-units", "--no-legend", "--plain", "quilt-*.scope").strip() == ""
    assert sb.run(["test", "-e", "/var/lib/quilt/quilt.db"], check=False).returncode == 0
    assert sb.run(["test", "-e", "/usr/bin/quiltd"], check=False).returncode != 0
    assert "org.quilt.Quilt1" not in sh(sb, "busctl", "list", "--activatable", "--no-pager")

    sh(sb, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", "quiltd")
    assert host_network(sb) == network_before
    assert sh(sb, "find", "/var/lib/quilt", "/run/quilt", "-mindepth", "1", check=False).strip() == ""
