"""`quiltctl exec -t`: a command on a pseudo-terminal of the container, and our terminal on its master.

quiltd hands over the master of a pty made in the container's own devpts
(ExecWithPty). We relay our stdin to it (with -i) and its output to our
stdout, put our terminal in raw mode meanwhile (so keys such as Ctrl-C
reach the command's line discipline, as with podman exec -it), and copy our
window size onto the master at the start and on every SIGWINCH: the
command gets SIGWINCH from its own terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from quiltd import linux
from quiltd.cli import ctlstreams
from quiltd.client import QuiltClient

T = TypeVar("T")
RELAY_WAIT = 2.0  # after the command ends, how long its last output may take to reach us


def _our_size() -> tuple[int, int] | None:
    for fd in (0, 1, 2):
        if os.isatty(fd):
            with contextlib.suppress(OSError):
                return linux.get_size(fd)
    return None


def _copy_out(master: int, out: int) -> None:
    """The terminal's output to ours, until the command (and all that holds its terminal) is gone.

    master is this thread's own copy, closed at the end: the caller may
    stop waiting for it and close its own.
    """
    try:
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: no process holds the terminal any more
                return
            if not chunk:
                return
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    except OSError:
        return
    finally:
        os.close(master)


async def run(q: QuiltClient, ref: str, command: list[str], options: dict[str, Any], interactive: bool,
              call: Callable[[Awaitable[tuple[str, int]]], Awaitable[tuple[str, int]]]) -> int:
    options = dict(options)
    size = _our_size()
    if size and all(size):
        options["rows"], options["cols"] = size
    term = os.environ.get("TERM")
    if term and not any(e.startswith("TERM=") for e in options.get("env", [])):
        options["env"] = [*options.get("env", []), f"TERM={term}"]
    exec_id, master = await call(q.exec_with_pty(ref, command, **options))
    loop = asyncio.get_running_loop()
    saved = None
    try:
        if interactive and os.isatty(0):
            saved = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSANOW)  # not TCSAFLUSH: what was typed ahead goes to the command
        if interactive:
            # Not waited for: it may sit in a read of our stdin when the command is done.
            ctlstreams.start(ctlstreams.pump, os.dup(0), os.dup(master), True)
        output = ctlstreams.start(_copy_out, os.dup(master), sys.stdout.fileno())

        def resize() -> None:
            now = _our_size()
            if now and all(now):
                with contextlib.suppress(OSError):
                    linux.set_size(master, *now)

        loop.add_signal_handler(signal.SIGWINCH, resize)
        try:
            _, code = await q.exec_wait(exec_id)
        finally:
            loop.remove_signal_handler(signal.SIGWINCH)
        await loop.run_in_executor(None, output.join, RELAY_WAIT)
        return code
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        os.close(master)
