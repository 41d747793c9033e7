"""Registry pulls: ImportImage of a `docker://`, `oci-archive:` or `docker-archive:` source.

skopeo is the transport and the verifier (it checks every blob against its
digest): it copies a `docker://` image into a private OCI layout directory
under the state directory, and the ordinary OCI layout import takes it from
there. skopeo runs as the unprivileged user `nobody` with no capabilities,
writing into a directory only that user may enter; the registry credentials
of the daemon's standard containers auth file are read by the daemon and
handed to skopeo as an open descriptor, so skopeo reads no file of root's.

The archive transports are local files: they are imported by the path import,
which opens them with the caller's own permissions, so a caller imports only
what it could read itself. No other transport is taken (`dir:`, `oci:`,
`containers-storage:`, `docker-daemon:` would read host state as the daemon).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import platform
import pwd
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quiltd.access import Credentials
from quiltd.errors import (
    AccessDenied,
    InvalidArgument,
    InvalidImage,
    LimitExceeded,
    NoSuchImage,
    QuiltError,
    Timeout,
    Unreachable,
)
from quiltd.fs.remove import remove_path

SKOPEO = "skopeo"
PULLS_DIR = "pulls"  # under the state directory
PULL_USER = "nobody"
DEFAULT_TIMEOUT_SEC = 600
MAX_TIMEOUT_SEC = 24 * 3600
POLL_INTERVAL = 0.1  # seconds between looks at how much skopeo has written
ERROR_TAIL = 2000  # characters of skopeo's message kept in an error

# Where skopeo and podman look for root's registry credentials, in their order
# (containers-auth.json(5)), for a daemon with no XDG_RUNTIME_DIR: the first
# that exists is used.
AUTH_FILES = (
    Path("/run/containers/0/auth.json"),
    Path("/root/.config/containers/auth.json"),
    Path("/root/.docker/config.json"),
)


# Who reads the pulled layout: the daemon itself, since the directory is its own.
ROOT = Credentials(0, frozenset({0}))


class Transport(enum.Enum):
    DOCKER = "docker"
    OCI_ARCHIVE = "oci-archive"
    DOCKER_ARCHIVE = "docker-archive"


# The transports skopeo knows; named so that a refusal says it is known but not taken.
_KNOWN_TRANSPORTS = ("dir", "oci", "containers-storage", "docker-daemon", "ostree", "sif", "tarball")

# docker://HOST[:PORT]/PATH[:TAG][@sha256:HEX], as the distribution spec allows them.
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?(?::[0-9]{1,5})?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"
_DOCKER_RE = re.compile(
    rf"(?:(?P<host>{_HOST})/)?(?P<path>{_PATH})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?")


@dataclass(frozen=True)
class PullSource:
    transport: Transport
    reference: str  # docker: HOST/PATH[:TAG][@DIGEST]; archives: the absolute path
    ref: str | None = None  # archives: which image of the archive (`path:ref`)

    def __str__(self) -> str:
        if self.transport is Transport.DOCKER:
            return f"docker://{self.reference}"
        return f"{self.transport.value}:{self.reference}" + (f":{self.ref}" if self.ref else "")


def parse_source(source: str) -> PullSource | None:
    """The pull a source names, or None for a plain path (the path import's business)."""
    if source.startswith("/"):
        return None
    transport, sep, rest = source.partition(":")
    if not sep:
        return None  # not absolute: the path import explains what it takes
    if transport == Transport.DOCKER.value:
        if not rest.startswith("//"):
            raise InvalidArgument(f"a docker source is docker://HOST/REPOSITORY:TAG or @sha256:DIGEST, "
                                  f"got {source!r}")
        match = _DOCKER_RE.fullmatch(rest[2:])
        if match is None:
            raise InvalidArgument(f"{source!r} is not an image reference: docker://HOST/REPOSITORY:TAG or "
                                  "docker://HOST/REPOSITORY@sha256:DIGEST, the repository in lower case")
        host = match["host"]
        # Short names would be resolved by registries.conf's search list, differently per host: the
        # registry is always spelled out.
        if host is None or not ("." in host or ":" in host or host == "localhost"):
            raise InvalidArgument(f"{source!r} names no registry: spell it out, as in "
                                  "docker://docker.io/library/busybox:latest")
        reference = rest[2:]
        if match["tag"] is None and match["digest"] is None:
            reference += ":latest"
        return PullSource(Transport.DOCKER, reference)
    if transport in (Transport.OCI_ARCHIVE.value, Transport.DOCKER_ARCHIVE.value):
        # As skopeo reads them: the path ends at the first ':' and the rest names the image.
        path, _, ref = rest.partition(":")
        if not path.startswith("/"):
            raise InvalidArgument(f"the path of {transport}: must be absolute, got {source!r}")
        return PullSource(Transport(transport), path, ref or None)
    if transport in _KNOWN_TRANSPORTS:
        raise InvalidArgument(f"the transport {transport}: is not taken: it would read the daemon's own "
                              "files or stores; use docker://, oci-archive:, docker-archive: or an "
                              "absolute path")
    raise InvalidArgument(f"unknown image source {source!r}: give an absolute path, docker://HOST/REPO:TAG, "
                          "oci-archive:PATH[:REF] or docker-archive:PATH[:REF]")


def pulls_dir(state_dir: Path) -> Path:
    return state_dir / PULLS_DIR


def leftovers(state_dir: Path) -> list[Path]:
    """What pulls cut off by a daemon's death left; recovery removes them."""
    parent = pulls_dir(state_dir)
    return sorted(parent.iterdir()) if parent.is_dir() else []


Progress = Callable[[int, int], None]


def copy(source: PullSource, work: Path, timeout_sec: int, max_bytes: int, progress: Progress) -> Path:
    """Copies a docker:// image into an OCI layout under work (a new directory); returns the layout.

    Blocking: run it in a worker thread. Raises a named error for each way a
    pull fails; the caller removes work whatever happens.
    """
    assert source.transport is Transport.DOCKER
    user = pwd.getpwnam(PULL_USER)
    work.parent.mkdir(mode=0o711, exist_ok=True)
    os.chmod(work.parent, 0o711)  # entered, never listed, by the pull user
    work.mkdir(mode=0o700)
    os.chown(work, user.pw_uid, user.pw_gid)
    layout = work / "layout"
    auth = _auth_fd()
    try:
        argv = [SKOPEO, "--command-timeout", f"{timeout_sec}s", "copy", "--retry-times", "0",
                "--override-os", "linux", "--override-arch", host_arch(),
                "--src-authfile", f"/proc/self/fd/{auth}",
                f"docker://{source.reference}", f"oci:{layout}:pulled"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "TMPDIR": str(work)}
        _run_skopeo(argv, env, user, auth, work, str(source), timeout_sec, max_bytes, progress)
    finally:
        os.close(auth)
    check_platform(layout, str(source))
    return layout


def _auth_fd() -> int:
    """The first standard auth file there is, as a memfd skopeo may read.

    With none, an empty one: skopeo must not look for a file of its own user's.
    """
    data = b"{}"
    for path in AUTH_FILES:
        try:
            data = path.read_bytes()
            break
        except FileNotFoundError:
            continue
        except OSError as e:
            raise AccessDenied(f"cannot read the registry credentials in {path}: {e.strerror}") from None
    fd = os.memfd_create("quilt-registry-auth", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def _run_skopeo(argv: list[str], env: dict[str, str], user: pwd.struct_passwd, auth: int,
                work: Path, label: str, timeout_sec: int, max_bytes: int, progress: Progress) -> None:
    deadline = time.monotonic() + timeout_sec + 5  # skopeo's own timeout answers first
    with subprocess.Popen(argv, env=env, cwd=work, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          pass_fds=(auth,), start_new_session=True) as proc:
        try:
            while True:
                try:
                    proc.wait(POLL_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    pass
                written = _bytes_under(work)
                progress(written, 0)
                if written > max_bytes:
                    raise LimitExceeded(f"{label}: the download passed max_bytes ({max_bytes} bytes)")
                if time.monotonic() > deadline:
                    raise Timeout(f"{label}: the pull took longer than {timeout_sec} s")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise classify(label, stderr, timeout_sec)
    progress(_bytes_under(work), 0)


def _bytes_under(top: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(top):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _message(stderr: str) -> str:
    """skopeo's reason, without its log decoration."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "skopeo failed without a message"
    found = re.search(r'msg="(.*)"\s*$', text)
    if found:
        text = found.group(1).replace('\\"', '"')
    return text[-ERROR_TAIL:]


def classify(label: str, stderr: str, timeout_sec: int) -> QuiltError:
    """The named error for a failed skopeo copy, from its message."""
    reason = _message(stderr)
    low = reason.lower()
    if "manifest unknown" in low or "name unknown" in low or "repository name not known" in low \
            or "not found" in low:
        return NoSuchImage(f"{label}: the registry has no such image or tag ({reason})")
    if "unauthorized" in low or "authentication required" in low or "invalid username/password" in low \
            or ("denied" in low and "permission denied" not in low):
        return AccessDenied(f"{label}: the registry refused the login ({reason}); credentials come from "
                            f"the first of {', '.join(map(str, AUTH_FILES))} that exists")
    if "deadline exceeded" in low or "timeout" in low or "timed out" in low:
        return Timeout(f"{label}: the registry did not answer within {timeout_sec} s ({reason})")
    if "digest" in low and ("match" in low or "mismatch" in low):
        return InvalidImage(f"{label}: a blob does not match its digest ({reason})")
    if "no image found in manifest list" in low or "choosing image instance" in low:
        return InvalidImage(f"{label}: no image for {host_arch()}/linux ({reason})")
    if "dial tcp" in low or "connection refused" in low or "no such host" in low or "unreachable" in low \
            or "pinging container registry" in low or "connection reset" in low or "unexpected eof" in low \
            or "tls" in low or "certificate" in low or "server gave http response" in low:
        hint = ""
        if "server gave http response" in low:
            hint = ("; the registry speaks plain HTTP: list it with insecure = true in "
                    "/etc/containers/registries.conf.d/ (see docs/images.md)")
        return Unreachable(f"{label}: cannot reach the registry ({reason}){hint}")
    return InvalidImage(f"{label}: the pull failed ({reason})")


_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "riscv64": "riscv64",
           "ppc64le": "ppc64le", "s390x": "s390x"}


def host_arch() -> str:
    """This host's architecture as OCI images name it."""
    machine = platform.machine()
    return _ARCHES.get(machine, machine)


def check_platform(layout: Path, label: str) -> None:
    """Refuses an image built for another architecture or OS: its programs would not run here.

    skopeo picks this host's entry of a manifest list, but copies a lone
    manifest whatever it is for.
    """
    try:
        index = json.loads((layout / "index.json").read_bytes())
        manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]))
        config = json.loads(_blob(layout, manifest["config"]["digest"]))
        arch, os_name = config.get("architecture"), config.get("os")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise InvalidImage(f"{label}: the pulled image has no readable config: {e}") from None
    if (arch, os_name) != (host_arch(), "linux"):
        raise InvalidImage(f"{label}: the image is for {os_name}/{arch}; this host runs linux/{host_arch()}")


def _blob(layout: Path, digest: object) -> bytes:
    if not isinstance(digest, str) or not re.fullmatch(_DIGEST, digest):
        raise ValueError(f"bad digest {digest!r}")
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def remove(work: Path) -> None:
    # skopeo wrote it as nobody: not the daemon's own tree.
    with contextlib.suppress(OSError):
        remove_path(work)
