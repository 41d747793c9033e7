"""The built-in image `host`: the host's /usr, read-only, under a root of its own.

The fastest way to give an agent Python and the usual tools is the host's
own. The image is a small skeleton the daemon writes at start-up: empty
top-level directories, the host's /bin, /lib, /lib64 and /sbin links as they
are (on a merged-/usr host they point into usr/), and a private /etc with
only what programs need to start and name users. Each container of it gets
the host's /usr (and any of those top-level directories that is a real
directory on the host) bound read-only and nosuid; everything else,
/etc included, is its own overlay as with any image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from quiltd.fs.remove import remove_path
from quiltd.model import Image

NAME = "host"
IMAGE_ID = "host"
TOP_DIRS = {"usr": 0o755, "etc": 0o755, "tmp": 0o1777, "var": 0o755, "var/tmp": 0o1777, "run": 0o755,
            "root": 0o700, "home": 0o755, "proc": 0o555, "sys": 0o555, "dev": 0o755, "mnt": 0o755}
SYSTEM_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_FILES = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
}
# Copied from the host when present: the loader's cache (without it
# programs still start, but search the default paths only).
ETC_COPIED = ("resolv.conf", "ld.so.cache")


def prepare(images_dir: Path, host_root: Path = Path("/")) -> Image:
    """The skeleton for the host as it is now, written once per distinct content.

    Running containers have a skeleton as their overlay's lower layer, so one
    is never changed in place: a host whose resolver or libraries changed
    gets a new directory (`host-<digest>`) and new containers use that one.
    """
    staging = images_dir / f".{NAME}.new"
    with contextlib.suppress(OSError):
        remove_path(staging)
    staging.mkdir(mode=0o755)
    digest = hashlib.sha256()
    for rel, mode in TOP_DIRS.items():
        (staging / rel).mkdir(exist_ok=True)
        os.chmod(staging / rel, mode)
    for name in SYSTEM_DIRS:
        host = host_root / name
        if host.is_symlink():
            (staging / name).symlink_to(os.readlink(host))
            digest.update(f"link {name} {os.readlink(host)}\n".encode())
        elif host.is_dir():
            (staging / name).mkdir(mode=0o755)
            digest.update(f"dir {name}\n".encode())
    files = {name: text.encode() for name, text in ETC_FILES.items()}
    for name in ETC_COPIED:
        try:
            files[name] = (host_root / "etc" / name).read_bytes()
        except OSError:
            files[name] = b""
    for name, data in sorted(files.items()):
        (staging / "etc" / name).write_bytes(data)
        digest.update(f"file {name} {len(data)}\n".encode() + data)
    for name, target in _copy_alternatives(host_root / "etc/alternatives", staging / "etc/alternatives"):
        digest.update(f"alternative {name} {target}\n".encode())
    dest = images_dir / f"{NAME}-{digest.hexdigest()[:16]}"
    if dest.exists():
        remove_path(staging)
    else:
        staging.rename(dest)
    return Image(name=NAME, id=IMAGE_ID, path=str(dest), size_bytes=0,
                 created_usec=int(dest.stat().st_mtime * 1_000_000))


def binds(host_root: Path = Path("/")) -> tuple[tuple[str, str, bool], ...]:
    """(host source, target in the container, read-only) for each container of the image."""
    found = [(str(host_root / "usr"), "/usr", True)]
    for name in SYSTEM_DIRS:
        host = host_root / name
        if host.is_dir() and not host.is_symlink():
            found.append((str(host), f"/{name}", True))
    return tuple(found)


def _copy_alternatives(src: Path, dest: Path) -> list[tuple[str, str]]:
    """Debian's /usr/bin/awk, editor, ... are links through /etc/alternatives into /usr."""
    dest.mkdir(mode=0o755)
    copied: list[tuple[str, str]] = []
    try:
        entries = sorted(src.iterdir())
    except OSError:
        return copied
    for entry in entries:
        if entry.is_symlink():
            target = os.readlink(entry)
            if target.startswith(("/usr/", "/bin/", "/sbin/", "/lib")):
                (dest / entry.name).symlink_to(target)
                copied.append((entry.name, target))
    return copied
