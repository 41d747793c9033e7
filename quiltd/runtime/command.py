"""The last steps of every process that runs in a container, up to execve.

The container's command and every exec get the same restrictions, so an
exec can never be a way out: the same user lookup, the same session, the
same capabilities, no_new_privs and seccomp filter (restrict). Init
restricts itself before it starts the command, and the command and each
exec inherit that: they are spawned without running any Python in the
child (spawn), which lets the standard library use vfork, so a start does
not copy init's memory map.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from quiltd import linux
from quiltd.runtime import accounts, ptys, security
from quiltd.runtime.wire import Code, Failure

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


class _Failure(Exception):
    """A reason for the daemon, as the wire's failure record."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.failure = Failure(code, message)


class SpawnFailed(Exception):
    """Why an exec could not be started, as the wire's failure record."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _set_home(account: accounts.Account, env: dict[str, str]) -> None:
    # As docker does: the entry's home, "/" for a user without one, unless
    # the environment sets HOME already.
    env.setdefault("HOME", account.home or "/")


def _root() -> accounts.Account:
    try:
        return accounts.resolve("0")
    except accounts.UnknownUser:  # root's entry has an odd id: root all the same
        return accounts.Account(0, 0, (0,), "")


def _account(user: str) -> accounts.Account:
    try:
        return accounts.resolve(user)
    except accounts.UnknownUser as e:
        raise _Failure(Code.USER, str(e)) from None


def spawn(argv: Sequence[str], env: Sequence[str], workdir: str, user: str,
          stdio: tuple[int, int, int], terminal: bool = False) -> subprocess.Popen[bytes]:
    """From init, once restricted: starts an exec in a new session; SpawnFailed says why not.

    With terminal, stdio is the peer of a pty (see ptys), which becomes the
    session's controlling terminal. The caller reaps the process (init reaps
    every child) and must then set its returncode.
    """
    environ = dict(item.split("=", 1) for item in env)
    ids: dict[str, Any] = {}
    try:
        if user:
            account = _account(user)
            _set_home(account, environ)
            ids = {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}
            if terminal:
                # The terminal is the user's, as login makes it: tools that
                # open it by its name (or check its owner) work.
                with contextlib.suppress(OSError):
                    os.fchown(stdio[0], account.uid, -1)
        else:
            _set_home(_root(), environ)
        if terminal:
            # The one exec that runs Python in its child (so it forks, not
            # vforks): nothing else can make a terminal the controlling one.
            ids["preexec_fn"] = ptys.take_as_controlling_terminal
        # close_fds leaves the child nothing of init's but stdio; restore_signals
        # gives it SIGPIPE and SIGXFSZ back (Python ignores them).
        return subprocess.Popen(list(argv), stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], cwd=workdir,
                                env=environ, start_new_session=True, close_fds=True, restore_signals=True,
                                **ids)
    except _Failure as e:
        raise SpawnFailed(e.failure) from None
    except OSError as e:
        if e.filename == workdir:
            raise SpawnFailed(Failure(Code.EXEC, f"workdir {workdir}: {e.strerror}")) from None
        raise SpawnFailed(Failure(Code.EXEC, f"{argv[0]}: {e.strerror}")) from None


def restrict(nested_userns: bool) -> None:
    """What a process in a container may do from here on; its children inherit it."""
    # No setuid binary or file capability can raise privileges from here on.
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    # A process already switched to another user holds no capabilities (the
    # switch cleared them) and, under no_new_privs, cannot gain any: only
    # root has a set to reduce, and only root may reduce the bounding set.
    security.restrict_command(drop_capabilities=os.geteuid() == 0, nested_userns=nested_userns)
