"""The one error hierarchy of Quilt.

Every error a client can see is a QuiltError subclass carrying its D-Bus
error name; the bus layer turns anything else into Internal.
"""

from __future__ import annotations

ERROR_PREFIX = "org.quilt.Quilt1.Error."


class QuiltError(Exception):
    """Base of all errors that reach a client with a name of their own."""

    dbus_name = ERROR_PREFIX + "Internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSuchContainer(QuiltError):
    dbus_name = ERROR_PREFIX + "NoSuchContainer"


class NameTaken(QuiltError):
    dbus_name = ERROR_PREFIX + "NameTaken"


class InvalidArgument(QuiltError):
    dbus_name = ERROR_PREFIX + "InvalidArgument"


class NoSuchImage(QuiltError):
    dbus_name = ERROR_PREFIX + "NoSuchImage"


class NoSuchVolume(QuiltError):
    dbus_name = ERROR_PREFIX + "NoSuchVolume"


class InvalidImage(QuiltError):
    dbus_name = ERROR_PREFIX + "InvalidImage"


class InvalidState(QuiltError):
    dbus_name = ERROR_PREFIX + "InvalidState"


class AccessDenied(QuiltError):
    dbus_name = ERROR_PREFIX + "AccessDenied"


class Timeout(QuiltError):
    dbus_name = ERROR_PREFIX + "Timeout"


class Unreachable(QuiltError):
    """A registry could not be reached: refused connection, unknown host, TLS failure."""

    dbus_name = ERROR_PREFIX + "Unreachable"


class NoReply(QuiltError):
    """Client side: quiltd did not answer within the call's timeout (as libdbus names it)."""

    dbus_name = "org.freedesktop.DBus.Error.NoReply"


class Internal(QuiltError):
    dbus_name = ERROR_PREFIX + "Internal"


class StartFailed(QuiltError):
    """The container could not be started; the message says why (also in its State reason)."""

    dbus_name = ERROR_PREFIX + "StartFailed"


class NoSuchExec(QuiltError):
    dbus_name = ERROR_PREFIX + "NoSuchExec"


class ExecFailed(QuiltError):
    """The command could not be executed in the container; the message says why."""

    dbus_name = ERROR_PREFIX + "ExecFailed"


class OutputTruncated(QuiltError):
    """Exec's output went over max_output; ExecEx returns it cut, with flags."""

    dbus_name = ERROR_PREFIX + "OutputTruncated"


class NoSuchPath(QuiltError):
    """A path named in a call does not exist inside the container."""

    dbus_name = ERROR_PREFIX + "NoSuchPath"


class LimitExceeded(QuiltError):
    """A cap was reached; the message names it.

    A copy's or an import's size, the Exec output quiltd holds, the user
    namespace ranges, what the journal can be watched with.
    """

    dbus_name = ERROR_PREFIX + "LimitExceeded"


class CopyFailed(QuiltError):
    """A file could not be read or written inside the container (read-only, full, ...)."""

    dbus_name = ERROR_PREFIX + "CopyFailed"
class Busy(QuiltError):
    """The state database is locked by another process; the message gives the cause. Try again."""

    dbus_name = ERROR_PREFIX + "Busy"


class NoSpace(QuiltError):
    """The state directory's filesystem is full: nothing could be recorded."""

    dbus_name = ERROR_PREFIX + "NoSpace"


class NoSuchNetwork(QuiltError):
    dbus_name = ERROR_PREFIX + "NoSuchNetwork"


class AddressesExhausted(QuiltError):
    """A network has no free address left for one more container."""

    dbus_name = ERROR_PREFIX + "AddressesExhausted"


# Raised by quiltd.cluster, the layer that spreads sandboxes over many hosts'
# quiltds; quiltd itself never answers these.


class HostLost(QuiltError):
    """The host a sandbox was placed on is gone (dead, cut off, or its Ray node ended)."""

    dbus_name = ERROR_PREFIX + "HostLost"


class Unplaceable(QuiltError):
    """No live host can take a sandbox: too little room, no image, or the affinity rules out every host."""

    dbus_name = ERROR_PREFIX + "Unplaceable"


class NotSupported(QuiltError):
    """What this host, or this kind of container, cannot do (or, from quiltd.cluster, a host's older
    quiltd lacks the call); the message says why."""

    dbus_name = ERROR_PREFIX + "NotSupported"
