"""The last steps of every process that runs in a container, up to execve.

The container's command and every exec take the same path here, inside the
container (namespaces and root already its own), so an exec can never be a
way out: the same user lookup, the same session, the same hardening.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from typing import NoReturn

from quiltd import accounts, linux, security
from quiltd.execproto import FAILURE_EXEC, FAILURE_USER

# Init passes on to the command every signal it can catch, except those the
# kernel raises for init's own faults and SIGCHLD, which is init's to handle.
# (From outside its namespace an uncaught signal would take init's default
# action: end or stop the whole container.) SIGKILL and SIGSTOP cannot be
# caught; the daemon sends those to every process of the scope instead.
FORWARDED_SIGNALS = tuple(
    s for s in signal.valid_signals()
    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
                 signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS)
)
# Python ignores these at start-up; a command must get them back at default.
RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD)


class _Failure(Exception):
    """A reason for the daemon, starting with one of the FAILURE_ words."""


def execute(argv: Sequence[str], env: Sequence[str], workdir: str, user: str,
            stdio: tuple[int, int, int], error_fd: int, nested_userns: bool) -> NoReturn:
    """In a fresh child of init: becomes the command, or reports why not on error_fd and exits 127.

    error_fd is close-on-exec: end of file there with no data tells the
    waiting side that the command was executed.
    """
    try:
        for sig in (*FORWARDED_SIGNALS, *RESTORED_SIGNALS):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.setsid()  # no controlling terminal to push input into (TIOCSTI)
        environ = dict(item.split("=", 1) for item in env)
        if user:
            _switch_user(user, environ)
        try:
            os.chdir(workdir)
        except OSError as e:
            raise _Failure(f"{FAILURE_EXEC}: workdir {workdir}: {e.strerror}") from None
        for std, fd in enumerate(stdio):
            os.dup2(fd, std)
        os.closerange(3, error_fd)
        os.closerange(error_fd + 1, 1 << 16)
        harden_before_exec(nested_userns)
        try:
            os.execvpe(argv[0], list(argv), environ)
        except OSError as e:
            raise _Failure(f"{FAILURE_EXEC}: {argv[0]}: {e.strerror}") from None
    except BaseException as e:
        reason = str(e) if isinstance(e, _Failure) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            os.write(error_fd, reason.encode())
        os._exit(127)


def _switch_user(user: str, env: dict[str, str]) -> None:
    try:
        account = accounts.resolve(user)
    except accounts.UnknownUser as e:
        raise _Failure(f"{FAILURE_USER}: {e}") from None
    if account.home and "HOME" not in env:
        env["HOME"] = account.home
    os.setgroups(list(account.groups))
    os.setgid(account.gid)
    os.setuid(account.uid)


def harden_before_exec(nested_userns: bool) -> None:
    """The final step before execve: what a process in a container may do from here on."""
    # No setuid binary or file capability can raise privileges from here on.
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    # A process already switched to another user holds no capabilities (the
    # switch cleared them) and, under no_new_privs, cannot gain any: only
    # root has a set to reduce, and only root may reduce the bounding set.
    security.restrict_command(drop_capabilities=os.geteuid() == 0, nested_userns=nested_userns)
