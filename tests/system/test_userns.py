"""userns=true: root in the container is a range of unprivileged host ids, not host root."""

from __future__ import annotations

import contextlib
import io
import secrets
import tarfile
import time
from typing import Any

import pytest

from quiltd import errors
from tests.system.conftest import eventually, run
from tests.system.test_copy import copy_in, copy_out, make_tar
from tests.system.test_security import journal_lines, run_to_end

pytestmark = pytest.mark.system

STATE_DIR = "/var/lib/quilt"
RANGE = 65536
FIRST_BASE = 0x80000
SECRET = "/var/lib/quilt-test-secret"


def host_ids(sandbox: Any, path: str) -> tuple[int, int]:
    uid, gid = sandbox.run(["stat", "-c", "%u %g", path]).stdout.split()
    return int(uid), int(gid)


async def running(q: Any, *refs: str) -> None:
    for ref in refs:
        async def up(ref: str = ref) -> bool:
            state = (await q.info(ref))["State"]
            assert state in ("starting", "running"), await q.info(ref)
            return bool(state == "running")
        await eventually(up)


async def sh(q: Any, ref: str, script: str) -> str:
    code, out, err = await q.exec(ref, ["sh", "-c", script])
    assert code == 0, (script, out, err)
    return str(out.decode())


def test_container_root_is_an_unprivileged_range_of_host_ids(sandbox: Any, quilt: Any, name: str) -> None:
    # A root-only host file: host root may read it, a container's root may not.
    sandbox.run(["sh", "-c", f"echo top-secret > {SECRET} && chmod 600 {SECRET}"])
    plain = f"{name}-plain"

    async def scenario() -> None:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["sleep", "1000"], userns=True,
                                    mounts=[[SECRET, "/secret", True]])
            await q.create(plain, "busybox", ["sleep", "1000"], mounts=[[SECRET, "/secret", True]])
            try:
                await running(q, name, plain)
                info = await q.info(name)
                base = info["UserNamespaceBase"]
                assert base >= FIRST_BASE and base % RANGE == 0, base
                assert (await q.info(plain))["UserNamespaceBase"] == 0
                # Inside: root, with the map the daemon recorded.
                assert await sh(q, name, "id -u; id -g") == "0\n0\n"
                for table in ("uid_map", "gid_map"):
                    mapping = (await sh(q, name, f"cat /proc/self/{table}")).split()
                    assert mapping == ["0", str(base), str(RANGE)]
                # Outside: the init and an exec run as the range's first id.
                status = sandbox.run(["cat", f"/proc/{info['Pid']}/status"]).stdout.decode()
                uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
                assert uids == [str(base)] * 4, status
                # The image is the container root's: it may change it, and
                # what it writes lands on the host as the range's ids.
                assert (await sh(q, name, "stat -c '%u %g' /bin/busybox /")).split() == ["0"] * 4
                await sh(q, name, "echo agent:x:1000:1000::/home/agent:/bin/sh >> /etc/passwd; "
                                  "mkdir -p /home/agent && chown 1000:1000 /home/agent && touch /made")
                upper = f"{STATE_DIR}/containers/{cid}/upper"
                assert host_ids(sandbox, f"{upper}/made") == (base, base)
                assert host_ids(sandbox, f"{upper}/home/agent") == (base + 1000, base + 1000)
                assert host_ids(sandbox, f"{upper}/etc/passwd") == (base, base)
                assert await sh(q, name, "su agent -c 'id -u'") == "1000\n"
                # Host root's file stays closed to the container's root, and
                # open to root in a container without a user namespace.
                code, _, err = await q.exec(name, ["cat", "/secret"])
                assert code != 0 and b"Permission denied" in err, err
                assert await sh(q, plain, "cat /secret") == "top-secret\n"
                # Capabilities in its set reach nothing the host owns.
                code, _, err = await q.exec(name, ["sh", "-c", "hostname other || exit 3"])
                assert code == 3, err
            finally:
                await q.remove(name, force=True)
                await q.remove(plain, force=True)

    try:
        run(scenario())
    finally:
        sandbox.run(["rm", "-f", SECRET])


def test_ranges_are_distinct_kept_across_restarts_and_freed_on_removal(sandbox: Any, quilt: Any,
                                                                       name: str) -> None:
    first, second, third = (f"{name}-{i}" for i in range(3))

    async def scenario() -> None:
        async with quilt() as q:
            for ref in (first, second):
                await q.create(ref, "busybox", ["sleep", "1000"], userns=True)
            await running(q, first, second)
            bases = [(await q.info(ref))["UserNamespaceBase"] for ref in (first, second)]
            assert bases[0] != bases[1] and abs(bases[0] - bases[1]) >= RANGE, bases
            pid = (await q.info(second))["Pid"]
        try:
            sandbox.run(["systemctl", "restart", "quiltd"])
            async with quilt() as q:
                # The same process, the same range, and it still answers as root.
                info = await q.info(second)
                assert (info["Pid"], info["UserNamespaceBase"]) == (pid, bases[1])
                assert await sh(q, second, "id -u") == "0\n"
                await q.remove(first, force=True)
                await q.create(third, "busybox", ["sleep", "1000"], userns=True)
                assert (await q.info(third))["UserNamespaceBase"] == bases[0]  # the lowest free range
        finally:
            async with quilt() as q:
                for ref in (first, second, third):
                    with contextlib.suppress(errors.NoSuchContainer):
                        await q.remove(ref, force=True)

    run(scenario())


def test_volumes_and_copies_keep_container_ids(sandbox: Any, quilt: Any, name: str) -> None:
    vol = f"vol-{secrets.token_hex(4)}"
    plain = f"{name}-plain"

    async def scenario() -> None:
        async with quilt() as q:
            cid, _ = await q.create(name, "busybox", ["sleep", "1000"], userns=True,
                                    volumes=[[vol, "/data", False]])
            try:
                await running(q, name)
                base = (await q.info(name))["UserNamespaceBase"]
                await sh(q, name, "echo shared > /data/f && chown 1000:1000 /data/f")
                # A volume keeps plain ids on disk, so any container reads them alike.
                assert host_ids(sandbox, f"{STATE_DIR}/volumes/{vol}/f") == (1000, 1000)
                await q.create(plain, "busybox", ["sleep", "1000"], volumes=[[vol, "/data", True]])
                await running(q, plain)
                assert await sh(q, plain, "stat -c '%u %g' /data/f; cat /data/f") == "1000 1000\nshared\n"
                # CopyIn: ids from the tar are the container's ids; CopyOut gives them back.
                await copy_in(q, name, "/tmp", make_tar({"in.txt": b"in\n"}, mode=0o640, uid=1234))
                assert await sh(q, name, "stat -c '%u %g %a' /tmp/in.txt") == "1234 1234 640\n"
                assert host_ids(sandbox, f"{STATE_DIR}/containers/{cid}/upper/tmp/in.txt") == \
                    (base + 1234, base + 1234)
                with tarfile.open(fileobj=io.BytesIO(await copy_out(q, name, "/tmp/in.txt"))) as tar:
                    assert [(m.name, m.uid, m.gid) for m in tar] == [("in.txt", 1234, 1234)]
                # A stopped container takes a copy the same way.
                await q.stop(name, 5)
                await q.wait(name, 10_000_000)
                await copy_in(q, name, "/", make_tar({"later.txt": b"later\n"}, mode=0o644, uid=0))
                assert host_ids(sandbox, f"{STATE_DIR}/containers/{cid}/upper/later.txt") == (base, base)
                await q.start(name)
                await running(q, name)
                assert await sh(q, name, "stat -c '%u' /later.txt; cat /later.txt") == "0\nlater\n"
            finally:
                await q.remove(name, force=True)
                await q.remove(plain, force=True)
                await q.remove_volume(vol)

    run(scenario())



@pytest.mark.parametrize("userns", [False, True])
def test_a_missing_workdir_is_made_as_the_containers_root(sandbox: Any, quilt: Any, name: str,
                                                          userns: bool) -> None:
    # An image's WorkingDir (or the option) need not exist in the image.
    cid, code = run_to_end(quilt, name, "busybox", ["sh", "-c", "pwd; stat -c %u .; echo done 0"],
                           workdir="/srv/new/app", userns=userns)
    assert code == 0
    assert journal_lines(sandbox, cid) == ["/srv/new/app", "0", "done 0"]


def test_host_image_with_a_capped_layer_in_a_user_namespace(sandbox: Any, quilt: Any, name: str) -> None:
    # The host's /usr is not idmapped: root-owned there, it shows as nobody's
    # and stays usable read-only; the capped layer on its tmpfs is root's.
    script = ("python3 -c 'import os; print(os.getuid())'; stat -c %u /usr/bin/python3; "
              "touch /made && stat -c %u /made; echo done 0")
    cid, code = run_to_end(quilt, name, "host", ["sh", "-c", script], userns=True, disk_max=8 << 20)
    assert code == 0, journal_lines(sandbox, cid)
    assert journal_lines(sandbox, cid) == ["0", "65534", "0", "done 0"]


@pytest.mark.parametrize("nested", [False, True])
def test_nested_user_namespaces_only_when_asked(quilt: Any, name: str, nested: bool) -> None:
    # What bwrap or a browser's sandbox does: a user namespace of its own,
    # and a mount in a mount namespace that one owns.
    nest = "mkdir -p /mnt && unshare -U -r -m sh -c 'mount -t tmpfs none /mnt && touch /mnt/x && id -u'"

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "1000"], userns=True, nested_userns=nested)
            try:
                await running(q, name)
                assert (await q.info(name))["NestedUserNamespaces"] is nested
                code, out, err = await q.exec(name, ["sh", "-c", nest])
                if nested:
                    assert (code, out) == (0, b"0\n"), err
                    # Still nothing over what the host owns: the container's own mount table.
                    code, _, err = await q.exec(name, ["mount", "-t", "tmpfs", "none", "/mnt"])
                    assert code != 0 and b"permission denied" in err, err  # busybox's words for EPERM
                else:
                    assert code != 0 and b"not permitted" in err, err
            finally:
                await q.remove(name, force=True)

    run(scenario())


def test_nested_userns_needs_userns(quilt: Any, name: str) -> None:
    async def scenario() -> None:
        async with quilt() as q:
            with pytest.raises(errors.InvalidArgument, match="nested_userns needs userns"):
                await q.create(name, "busybox", ["true"], nested_userns=True)
            assert name not in [row[1] for row in await q.list_containers()]

    run(scenario())


def test_icmp_echo_needs_no_raw_socket(quilt: Any, name: str) -> None:
    # Root in a user namespace has no CAP_NET_RAW over its network; an ICMP
    # echo socket is what ping (iputils, Python) uses instead.
    echo = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); "
            "s.settimeout(5); s.sendto(bytes([8, 0, 0xf7, 0xff, 0, 0, 0, 0]), ('10.88.0.1', 0)); "
            "reply, _ = s.recvfrom(64); print(reply[0])")  # type 0: echo reply

    async def scenario() -> None:
        async with quilt() as q:
            await q.create(name, "host", ["sleep", "1000"], userns=True)
            try:
                await running(q, name)
                assert await q.exec(name, ["python3", "-c", echo]) == (0, b"0\n", b"")
            finally:
                await q.remove(name, force=True)

    run(scenario())


def test_background_exec_end_is_kept_while_the_daemon_is_down(sandbox: Any, quilt: Any, name: str) -> None:
    # Init writes the status file after it has become the container's root,
    # an unprivileged host id: it must still be able to.
    async def start() -> str:
        async with quilt() as q:
            await q.create(name, "busybox", ["sleep", "3600"], userns=True)
            await running(q, name)
            return str(await q.exec_start(name, ["sh", "-c", "sleep 1; exit 5"]))

    exec_id = run(start())
    sandbox.run(["systemctl", "stop", "quiltd"])
    time.sleep(2)  # it ends while no daemon runs

    async def after() -> None:
        async with quilt() as q:
            assert await q.exec_wait(exec_id, 10_000_000) == ("exited", 5)
            await q.remove(name, force=True)

    run(after())
