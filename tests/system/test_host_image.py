"""The built-in host image, and the seccomp filter seen from a real program in it."""

from __future__ import annotations

import ctypes
import json
from typing import Any

import pytest

from quiltd.runtime.security import DENIED_SYSCALLS
from tests.system.conftest import BUS
from tests.system.test_security import journal_lines, run_to_end

pytestmark = pytest.mark.system


def sh(sandbox: Any, *argv: str, check: bool = True) -> Any:
    return sandbox.run(list(argv), check=check)


def test_host_image_is_listed_and_reserved(sandbox: Any, busybox_image: str) -> None:
    listed = sh(sandbox, "busctl", "call", *BUS, "ListImages").stdout.decode()
    assert '"host" "host"' in listed
    refused = sh(sandbox, "busctl", "call", *BUS, "ImportImage", "ssa{sv}", "host",
                 "/var/tmp/quilt-test-busybox.tar.gz", "0", check=False)
    assert refused.returncode != 0 and b"reserved" in refused.stderr
    refused = sh(sandbox, "busctl", "call", *BUS, "RemoveImage", "s", "host", check=False)
    assert refused.returncode != 0 and b"built in" in refused.stderr
    assert '"host" "host"' in sh(sandbox, "busctl", "call", *BUS, "ListImages").stdout.decode()


def test_python_runs_from_the_host_image(sandbox: Any, quilt: Any, name: str) -> None:
    script = (
        "python3 -c 'print(1+1)'; "
        "touch /usr/quilt-probe 2>/dev/null && echo usr-writable || echo usr-read-only; "
        "cut -d: -f1 /etc/passwd | tr '\\n' ' '; echo; "
        "echo intruder:x:0:0::/:/bin/sh >> /etc/passwd && echo etc-private; "
        "echo done 0"
    )
    cid, code = run_to_end(quilt, name, "host", ["/bin/sh", "-c", script])
    lines = journal_lines(sandbox, cid)
    assert code == 0, lines
    assert lines[:5] == ["2", "usr-read-only", "root nobody ", "etc-private", "done 0"], lines
    # The container's /etc is its own: the sandbox's host files did not change.
    assert b"intruder" not in sh(sandbox, "cat", "/etc/passwd").stdout


def _syscall_numbers() -> dict[str, int]:
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    names = [*DENIED_SYSCALLS, "unshare", "clone3"]
    numbers = {n: lib.seccomp_syscall_resolve_name(n.encode()) for n in names}
    return {n: nr for n, nr in numbers.items() if nr >= 0}


SYSCALL_PROBE = """
import ctypes, errno, json, sys
libc = ctypes.CDLL(None, use_errno=True)
numbers = json.loads(sys.argv[1])
for name, nr in sorted(numbers.items()):
    arg0 = 0x10000000 if name == "unshare" else 0  # CLONE_NEWUSER
    rc = libc.syscall(ctypes.c_long(nr), ctypes.c_long(arg0), 0, 0, 0, 0)
    err = ctypes.get_errno()
    want = errno.ENOSYS if name == "clone3" else errno.EPERM
    verdict = "ok" if rc == -1 and err == want else "not ok"
    print(f"{verdict} {name} rc={rc} errno={errno.errorcode.get(err)}")
mode = open("/proc/self/status").read().split("Seccomp:")[1].split()[0]
print("ok Seccomp" if mode == "2" else "not ok Seccomp " + mode)
print("done 0")
"""


def test_seccomp_refuses_each_listed_call(sandbox: Any, quilt: Any, name: str) -> None:
    numbers = _syscall_numbers()
    assert {"kexec_load", "init_module", "bpf", "mount", "reboot", "unshare"} <= set(numbers)
    cid, code = run_to_end(quilt, name, "host", ["python3", "-c", SYSCALL_PROBE, json.dumps(numbers)])
    lines = journal_lines(sandbox, cid)
    assert code == 0, lines
    assert [line for line in lines if line.startswith("not ok")] == [], "\n".join(lines)
    assert sum(line.startswith("ok ") for line in lines) == len(numbers) + 1, "\n".join(lines)
