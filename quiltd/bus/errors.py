"""Turns core exceptions into named D-Bus errors at the edge of every method."""

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dbus_next.errors import DBusError

from quiltd.errors import Internal, QuiltError

log = logging.getLogger("quiltd")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Messages quote the value they refuse: a 4 MiB name would come back as a 4 MiB error.
MAX_MESSAGE = 4096


def clipped(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters cut)"


def bus_errors(fn: F) -> F:
    """Wraps a bus method so no library-named error reaches a client.

    functools.wraps keeps the D-Bus signature annotations visible to dbus-next.
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except QuiltError as e:
            raise DBusError(e.dbus_name, clipped(e.message)) from e
        except DBusError:
            raise
        except Exception as e:
            log.exception("internal error in %s", fn.__name__)
            raise DBusError(Internal.dbus_name, clipped(f"internal error: {type(e).__name__}: {e}")) from e

    return wrapper  # type: ignore[return-value]
